"""The nightly flow process is killed (SIGKILL) in the middle of the per-user fan-out, then started again:
finished stages are skipped (manifests), users finished before the kill are `unchanged`, the rest are
fitted, and at no point is a partial object visible in the store (every write is one whole PUT).

While the killed run was alive it held the store lock; the re-run takes over the lock of the dead process.
"""
from __future__ import annotations

import json
import time

import mlflow
import pytest
from safetensors.torch import load as st_load

import services

pytestmark = pytest.mark.slow


def _user_state(fs, root: str) -> tuple[list[str], dict[str, str]]:
    keys = sorted(k.removeprefix(root + "/") for k in fs.find(root))
    current = {k.rsplit("/", 1)[0]: json.loads(fs.cat_file(f"{root}/{k}"))["version"]
               for k in keys if k.startswith("users/") and k.endswith("/current.json")}
    return keys, current


def _assert_nothing_partial(fs, root: str, keys: list[str]) -> None:
    assert not [k for k in keys if any(p.startswith(".tmp") for p in k.split("/"))]
    for k in keys:
        if k.startswith("users/"):
            blob = fs.cat_file(f"{root}/{k}")
            if k.endswith(".json"):
                json.loads(blob)
            elif k.endswith(".safetensors"):
                assert st_load(blob)   # a whole safetensors file (a torn one fails to parse)
    for folder in {k.rsplit("/", 1)[0] for k in keys if k.startswith("users/") and k.endswith("/current.json")}:
        version = json.loads(fs.cat_file(f"{root}/{folder}/current.json"))["version"]
        # the pointer flips last: whatever it points at is complete
        manifest = json.loads(fs.cat_file(f"{root}/{folder}/{version}/manifest.json"))
        assert f"{folder}/{version}/{manifest.get('artifact', 'head.safetensors')}" in keys


def test_flow_killed_mid_fanout_resumes_without_redoing_work(live_services, night):
    svc = live_services
    store = f"s3://{services.BUCKET}/fault-resume"
    root = store.removeprefix("s3://")
    services.copy_store(svc, night.store, store)
    fs = svc.s3.fs()
    # one user per Ray task and longer fits, so the fan-out lasts long enough to be interrupted
    args = services.cli_args(svc, "personalize", store, "--set", "personalize.users_per_task=1",
                             "--set", "personalize.steps=300", experiment="fault-resume")
    log = svc.work_dir / "logs" / "fault-resume.log"
    proc = services.start_cli(svc, args, log)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            if fs.exists(f"{root}/users") and any(k.endswith("/current.json") for k in fs.find(f"{root}/users")):
                break
            time.sleep(0.25)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert fs.exists(f"{root}/locks/nightly.lock")
    finally:
        services.kill_group(proc)   # SIGKILL: no cleanup, no lock release
    time.sleep(3)   # Ray notices the dead driver and stops its workers
    keys, done_at_kill = _user_state(fs, root)
    assert 1 <= len(done_at_kill) < 6, f"{len(done_at_kill)} users done at the kill"
    _assert_nothing_partial(fs, root, keys)
    assert "locks/nightly.lock" in keys   # left behind by the dead run

    rerun = services.run_cli(svc, args, svc.work_dir / "logs" / "fault-resume-2.log")
    assert rerun.rc == 0, rerun.output[-4000:]
    users = json.loads(rerun.output.split("users         :", 1)[1].splitlines()[0])
    keys, current = _user_state(fs, root)
    _assert_nothing_partial(fs, root, keys)
    assert len(current) == 6 and "locks/nightly.lock" not in keys
    for folder, version in done_at_kill.items():
        assert current[folder] == version   # finished users kept their artifact
    for folder in current:                   # and nobody has two
        assert {k.split("/")[3] for k in keys if k.startswith(folder + "/") and k.count("/") == 4} == {current[folder]}
    assert users["total"] == 6 and users["unchanged"] >= len(done_at_kill)
    assert users["fitted"] + users["unchanged"] + users["cold_start"] == 6
    # finished stages were skipped, by their manifests
    client = mlflow.MlflowClient(tracking_uri=svc.mlflow.url)
    run_id = rerun.field("MLflow run id")
    stages = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}
    assert set(stages["prepare"].data.tags["skipped"].split(",")) >= {"prompts", "sft", "candidates", "population"}
    assert stages["pretrain"].data.tags["skipped"] == "true"
    print(f"flow kill: {len(done_at_kill)} users done before the kill, re-run {users}")
