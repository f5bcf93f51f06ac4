"""The nightly flow on real distributed components, all on 127.0.0.1 (tests/services.py):

- a Ray cluster of 2 nodes (`ray start --head` + `ray start --address`, 1 CPU each, token auth on),
- S3: a `moto_server` process; the store is s3://latentpref/night (s3fs, endpoint and keys from the env),
- MLflow: `mlflow server` with a sqlite backend and its artifacts proxied to s3://latentpref/mlflow.

`latentpref nightly` runs once as a subprocess (the `night` fixture, shared with tests/faults); the tests
below check what landed in S3 and MLflow, that both Ray nodes worked, and that no credential leaked.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

import services

pytestmark = pytest.mark.slow


def _store_keys(svc, night) -> list[str]:
    prefix = night.store.removeprefix("s3://").split("/", 1)[1]
    return [k.removeprefix(prefix + "/") for k in services.list_keys(svc, night.store)]


def _user_ids(svc, night, keys) -> list[str]:
    users_key = next(k for k in keys if re.fullmatch(r"data/population/[0-9a-f]+/users\.parquet", k))
    with svc.s3.fs().open(f"{night.store.removeprefix('s3://')}/{users_key}", "rb") as fh:
        return pq.read_table(io.BytesIO(fh.read()))["user_id"].to_pylist()


def test_night_succeeded_on_both_ray_nodes(live_services, night):
    assert night.run.rc == 0 and night.run_id
    users = json.loads(night.run.output.split("users         :", 1)[1].splitlines()[0])
    assert users["total"] == 6 and users["fitted"] + users["cold_start"] == 6
    nodes = {n["id"] for n in live_services.ray.nodes() if n["alive"]}
    assert len(nodes) == 2
    # workers of the night's job ran on both nodes (Ray Train: 2 DDP workers of 1 CPU on two 1-CPU nodes)
    assert live_services.ray.nodes_used_by(night.run.pid) == nodes


def test_results_landed_in_s3(live_services, night):
    keys = _store_keys(live_services, night)
    for pattern in (r"data/prompts/[0-9a-f]+/prompts\.parquet", r"data/candidates/[0-9a-f]+/candidates\.parquet",
                    r"data/population/[0-9a-f]+/pairs\.parquet", r"models/base/[0-9a-f]+/_manifest\.json",
                    r"models/clap/[0-9a-f]+/_manifest\.json", r"cache/[0-9a-f]+/texts\.lance/_versions/.+\.manifest",
                    r"policies/[0-9a-f]+\.lance/_versions/.+\.manifest",
                    rf"runs/{night.run_id}/personalize_users\.parquet",
                    rf"runs/{night.run_id}/evaluation_per_user\.parquet", rf"runs/{night.run_id}/comparison\.parquet",
                    rf"runs/{night.run_id}/report/index\.html", rf"runs/{night.run_id}/nightly_report\.json"):
        assert any(re.fullmatch(pattern, k) for k in keys), f"no {pattern} in the store"
    fs = live_services.s3.fs()
    root = night.store.removeprefix("s3://")
    for k in keys:   # every Parquet table in the store is whole and readable
        if k.endswith(".parquet"):
            with fs.open(f"{root}/{k}", "rb") as fh:
                assert pq.read_table(io.BytesIO(fh.read())).num_rows > 0, k
    # one row per user in the policy table, at the night's tag, and no object per user
    user_ids = _user_ids(live_services, night, keys)
    rows = services.policy_rows(live_services, night.store, f"night-{night.run_id}")
    assert set(rows) == set(user_ids) and len(user_ids) == 6
    assert not [k for k in keys if k.startswith("users/")]
    assert not [k for k in keys if any(p.startswith(".tmp") for p in k.split("/"))]   # atomic writes only
    assert "locks/nightly.lock" not in keys   # released


def test_mlflow_server_has_parent_child_runs_and_s3_artifacts(live_services, night):
    client = mlflow.MlflowClient(tracking_uri=live_services.mlflow.url)
    parent = client.get_run(night.run_id)
    assert parent.info.status == "FINISHED"
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:")   # proxied by the server to S3
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{night.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert {"prepare", "pretrain", "personalize", "evaluate"} <= set(by_name)
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_name["personalize"].data.metrics["users"] == 6
    assert parent.data.tags["clap_version"] == by_name["pretrain"].data.tags["clap_version"]
    per_user = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{by_name['evaluate'].info.run_id}'")
    assert {r.data.tags["method"] for r in per_user} >= {"latent_dpo", "lora_dpo"}
    # artifacts went through the server into S3
    assert {a.path for a in client.list_artifacts(night.run_id, "comparison")} >= {"comparison/comparison.md"}
    mlflow_keys = services.list_keys(live_services, f"s3://{services.BUCKET}/mlflow")
    assert any(k.endswith(f"{night.run_id}/artifacts/comparison/comparison.md") for k in mlflow_keys)
    assert any(k.endswith(f"{night.run_id}/artifacts/report/index.html") for k in mlflow_keys)


def test_user_ids_never_become_path_components(live_services, night):
    keys = _store_keys(live_services, night)
    user_ids = set(_user_ids(live_services, night, keys))
    mlflow_keys = services.list_keys(live_services, f"s3://{services.BUCKET}/mlflow")
    offenders = [k for k in keys + mlflow_keys for part in k.split("/")
                 if part in user_ids or any(u in part for u in user_ids)]
    assert offenders == []


def _texts_of_mlflow(client, tmp_path: Path) -> list[tuple[str, bytes]]:
    """Every param, tag, metric name, dataset input and artifact byte of every run on the server."""
    out: list[tuple[str, bytes]] = []
    for exp in client.search_experiments():
        out.append((f"experiment {exp.name}", json.dumps({"name": exp.name, "tags": exp.tags,
                                                          "loc": exp.artifact_location}).encode()))
        for run in client.search_runs([exp.experiment_id], max_results=5000):
            rid = run.info.run_id
            out.append((f"run {rid} params/tags/metrics", json.dumps(
                {"params": run.data.params, "tags": run.data.tags, "metrics": sorted(run.data.metrics),
                 "name": run.info.run_name}).encode()))
            for d in client.get_run(rid).inputs.dataset_inputs:
                out.append((f"run {rid} input {d.dataset.name}", json.dumps(
                    {"source": d.dataset.source, "digest": d.dataset.digest,
                     "tags": [(t.key, t.value) for t in d.tags]}).encode()))
            if client.list_artifacts(rid):
                local = Path(client.download_artifacts(rid, "", str(tmp_path / rid)))
                for f in local.rglob("*"):
                    if f.is_file():
                        out.append((f"run {rid} artifact {f.relative_to(local)}", f.read_bytes()))
    return out


def test_no_credential_leaks_in_logs_mlflow_or_store(live_services, night, tmp_path, monkeypatch):
    """The run had distinctive AWS secret key, session token, MLflow token and Ray auth token in its
    environment; none may appear in any log, MLflow record or stored object.

    Known way in (MLflow >= 3.x client default): artifact downloads through presigned S3 URLs, which carry the
    server's session token (X-Amz-Security-Token) into S3 request logs. The flow must download through the
    server's proxy (MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false); this scanner does too, so the downloads
    below add nothing to the logs they scan.
    """
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    secrets = {k: v.encode() for k, v in live_services.creds.values().items()}
    assert all(len(v) >= 16 for v in secrets.values())
    sources: list[tuple[str, bytes]] = []
    # logs: the CLI run, every service, every Ray process of both nodes
    for f in [*live_services.work_dir.rglob("*.log"), *Path(live_services.ray.temp_dir).rglob("*")]:
        if f.is_file() and f.suffix in (".log", ".out", ".err", ".txt", ".json", ""):
            sources.append((str(f), f.read_bytes()))
    assert any("night.log" in s for s, _ in sources) and len(sources) > 10
    # Prefect's database of the CLI runs (flow parameters, task inputs, the log lines sent to its API)
    prefect_home = live_services.env.get("PREFECT_HOME")
    if prefect_home:
        sources += [(str(f), f.read_bytes()) for f in Path(prefect_home).glob("*.db*") if f.is_file()]
    client = mlflow.MlflowClient(tracking_uri=live_services.mlflow.url)
    tracked = _texts_of_mlflow(client, tmp_path)
    assert any("artifact" in s for s, _ in tracked)
    sources += tracked
    # every object in the bucket: the store and MLflow's artifact root
    fs = live_services.s3.fs()
    for key in fs.find(services.BUCKET):
        sources.append((f"s3://{key}", fs.cat_file(key)))
    leaks = []
    for where, blob in sources:
        for name, secret in secrets.items():
            at = blob.find(secret)
            if at >= 0:   # where and in what context (the secret itself redacted)
                context = blob[max(0, at - 100):at + len(secret) + 20].replace(secret, b"<" + name.encode() + b">")
                leaks.append(f"{name} in {where}: ...{context.decode(errors='replace')}...")
    print(f"credential scan: {len(sources)} logs/records/objects, {len(secrets)} secrets, {len(leaks)} leaks")
    assert leaks == [], "\n".join(leaks[:10])
