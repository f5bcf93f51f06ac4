"""The nightly flow process is killed (SIGKILL) in the middle of the per-user fan-out, then started again:
finished stages are skipped (manifests), users committed to the policy table before the kill are `unchanged`, the
rest are fitted, the killed night never got a tag (so serving never saw it), and at no point is a partial object
visible in the store (every write is one whole PUT; the table's commits are atomic).

While the killed run was alive it held the store lock; the re-run takes over the lock of the dead process.
"""
from __future__ import annotations

import json
import time

import mlflow
import pytest

import services

pytestmark = pytest.mark.slow


def _assert_nothing_partial(fs, root: str) -> None:
    keys = [k.removeprefix(root + "/") for k in fs.find(root)]
    assert not [k for k in keys if any(p.startswith(".tmp") for p in k.split("/"))]
    assert not [k for k in keys if k.startswith("users/")]     # no object per user


def test_flow_killed_mid_fanout_resumes_without_redoing_work(live_services, night):
    svc = live_services
    store = f"s3://{services.BUCKET}/fault-resume"
    root = store.removeprefix("s3://")
    services.copy_store(svc, night.store, store)
    fs = svc.s3.fs()
    # one user per Ray task and longer fits, so the fan-out lasts long enough to be interrupted
    args = services.cli_args(svc, "personalize", store, "--set", "personalize.users_per_task=1",
                             "--set", "personalize.steps=300", "--set", "personalize.commit_every_s=0",
                             experiment="fault-resume")
    log = svc.work_dir / "logs" / "fault-resume.log"
    proc = services.start_cli(svc, args, log)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            if services.policy_rows(svc, store):      # a commit with users in it
                break
            time.sleep(0.25)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert fs.exists(f"{root}/locks/nightly.lock")
    finally:
        services.kill_group(proc)   # SIGKILL: no cleanup, no lock release
    time.sleep(3)   # Ray notices the dead driver and stops its workers
    done_at_kill = services.policy_rows(svc, store)
    assert 1 <= len(done_at_kill) < 6, f"{len(done_at_kill)} users committed at the kill"
    assert services.policy_tags(svc, store) == []     # the killed night never tagged: nothing for serving
    _assert_nothing_partial(fs, root)
    assert fs.exists(f"{root}/locks/nightly.lock")   # left behind by the dead run

    rerun = services.run_cli(svc, args, svc.work_dir / "logs" / "fault-resume-2.log")
    assert rerun.rc == 0, rerun.output[-4000:]
    users = json.loads(rerun.output.split("users         :", 1)[1].splitlines()[0])
    run_id = rerun.field("MLflow run id")
    _assert_nothing_partial(fs, root)
    current = services.policy_rows(svc, store, f"night-{run_id}")
    assert len(current) == 6 and not fs.exists(f"{root}/locks/nightly.lock")
    for user, version in done_at_kill.items():
        assert current[user] == version    # users committed before the kill kept their row
    assert services.policy_tags(svc, store) == [f"night-{run_id}"]
    assert users["total"] == 6 and users["unchanged"] >= len(done_at_kill)
    assert users["fitted"] + users["unchanged"] + users["cold_start"] == 6
    # finished stages were skipped, by their manifests
    client = mlflow.MlflowClient(tracking_uri=svc.mlflow.url)
    stages = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}
    assert set(stages["prepare"].data.tags["skipped"].split(",")) >= {"prompts", "sft", "candidates", "population"}
    assert stages["pretrain"].data.tags["skipped"] == "true"
    print(f"flow kill: {len(done_at_kill)} users done before the kill, re-run {users}")
