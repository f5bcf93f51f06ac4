"""A Ray worker process dies in the middle of the per-user fan-out: Ray retries its task, and every user
ends with exactly one row in the policy table (nothing lost, nothing duplicated).

The store is a copy of the shared night's finished stages (prepare, CLaP, latent table) without the policy table,
so `latentpref personalize` skips straight to fitting every user on the 2-node cluster. The fault hook in
tasks/train/personalize.py (`_fault_point`) is armed by creating the marker file named in the Ray nodes'
environment: the first worker to reach it, with its chunk's rows already written as an uncommitted fragment,
removes the file and exits (os._exit), exactly like a killed process. The driver never commits that fragment.
"""
from __future__ import annotations

import io
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

import services

pytestmark = pytest.mark.slow


def test_killed_worker_is_retried_and_every_user_has_one_artifact(live_services, night):
    svc = live_services
    store = f"s3://{services.BUCKET}/fault-worker"
    services.copy_store(svc, night.store, store)
    marker = Path(svc.env["LATENTPREF_FAULT_KILL_CHUNK"])
    marker.write_text("armed")
    run = services.run_cli(svc, services.cli_args(svc, "personalize", store, experiment="fault-worker"),
                           svc.work_dir / "logs" / "fault-worker.log")
    armed_left = marker.exists()
    marker.unlink(missing_ok=True)
    assert run.rc == 0, run.output[-4000:]
    assert not armed_left, "no worker reached the fault point: nothing was killed"

    fs = svc.s3.fs()
    root = store.removeprefix("s3://")
    keys = [k.removeprefix(root + "/") for k in fs.find(root)]
    run_id = run.field("MLflow run id")
    with fs.open(f"{root}/runs/{run_id}/personalize_users.parquet", "rb") as fh:
        records = pq.read_table(io.BytesIO(fh.read())).to_pylist()
    users = [r["user_id"] for r in records]
    status = [r["status"] for r in records]
    # nothing duplicated: one record and one row per user (the dead attempt's fragment is never committed)
    assert len(users) == len(set(users)) == 6
    rows = services.policy_rows(svc, store, f"night-{run_id}")
    assert set(rows) == set(users)
    assert {r["user_id"]: r["version"] for r in records} == rows
    assert not [k for k in keys if k.startswith("users/")]            # no object per user
    # nothing lost: every user fitted (or cold start) by the retried task
    assert status.count("fitted") + status.count("cold_start") == 6 and status.count("unchanged") == 0
    client = mlflow.MlflowClient(tracking_uri=svc.mlflow.url)
    stage = client.search_runs([client.get_run(run_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{run_id}' and attributes.run_name = 'personalize'")[0]
    assert stage.data.metrics["users"] == 6
    print(f"worker kill: {status.count('fitted')} users fitted, {status.count('cold_start')} cold start, "
          f"0 lost of 6, one row each")
