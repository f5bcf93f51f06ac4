"""Two nightly runs on the same store at once: the lock lets exactly one in, the other refuses with a clear
message before writing anything. Checked on S3 (moto server), where the lock is a conditional PUT.
"""
from __future__ import annotations

import threading
import time

import pytest

import services
from latentpref.tasks.data.locks import StoreLocked, store_lock
from latentpref.tasks.data.store import Store


@pytest.fixture
def s3_env(live_services, monkeypatch):
    """This test process talks to the session's moto server with the night's credentials."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.setenv(key, live_services.env[key])
    return live_services


def _race(store: Store, contenders: int = 4, rounds: int = 3) -> None:
    """`contenders` threads ask for the lock at the same instant; exactly one may get it, each round."""
    for round_ in range(rounds):
        barrier = threading.Barrier(contenders)
        release = threading.Event()
        outcome: dict[int, str] = {}

        def contender(i: int) -> None:
            barrier.wait()
            try:
                with store_lock(store, "nightly"):
                    outcome[i] = "holder"
                    release.wait(10)
            except StoreLocked as err:
                outcome[i] = str(err)
        threads = [threading.Thread(target=contender, args=(i,)) for i in range(contenders)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(outcome) < contenders and time.monotonic() < deadline:   # every contender has decided
            time.sleep(0.05)
        release.set()
        for t in threads:
            t.join(30)
        holders = [i for i, v in outcome.items() if v == "holder"]
        refused = [v for v in outcome.values() if v != "holder"]
        assert len(holders) == 1, (round_, outcome)
        assert len(refused) == contenders - 1
        assert all("is locked by another 'nightly' run" in v for v in refused)
        assert not store.exists("locks", "nightly.lock")   # released by its holder


def test_lock_on_s3_admits_exactly_one_of_simultaneous_runs(s3_env):
    _race(Store(f"s3://{services.BUCKET}/lock-race"))


def test_lock_on_a_local_store_admits_exactly_one_of_simultaneous_runs(tmp_path):
    _race(Store(str(tmp_path / "store")))


@pytest.mark.slow
def test_second_nightly_refuses_while_one_runs(s3_env):
    svc = s3_env
    url = f"s3://{services.BUCKET}/lock-cli"
    with store_lock(Store(url), "nightly") as held:   # exactly what a running nightly holds
        run = services.run_cli(svc, services.cli_args(svc, "nightly", url, experiment="lock-cli"),
                               svc.work_dir / "logs" / "lock-cli.log")
        keys = services.list_keys(svc, url)
    assert run.rc != 0
    assert f"store {url} is locked by another 'nightly' run (pid {held['pid']}" in run.output
    assert keys == ["lock-cli/locks/nightly.lock"]   # the refused run wrote nothing
