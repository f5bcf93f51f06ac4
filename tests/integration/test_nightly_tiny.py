"""The real nightly flow on the tiny preset: local Ray, serverless Prefect, sqlite MLflow, local Parquet.

One flow run (module-scoped fixture) is shared by the assertions below; a second run then checks that an
unchanged night is skipped stage by stage.
"""
import os

import mlflow
import pyarrow.parquet as pq
import pytest

from latentpref.pipelines.config import load_config
from latentpref.pipelines.nightly import nightly

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    store = str(root / "store")
    cfg = load_config("tiny", overrides=[f"runtime.store={store}", "runtime.ray_num_cpus=2",
                                         "runtime.mlflow_experiment=it-nightly"])
    report = nightly(cfg)
    return cfg, report, store


def _children(client, exp_id, parent_id):
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def test_mlflow_parent_and_stage_children(tiny_run):
    cfg, report, store = tiny_run
    client = mlflow.MlflowClient(report.tracking_uri)
    parent = client.get_run(report.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["clap_version"] == report.clap_version
    stages = {r.info.run_name: r for r in _children(client, report.experiment_id, report.run_id)}
    assert {"prepare", "pretrain", "personalize", "evaluate"} <= set(stages)
    # the produced Parquet tables are logged as dataset inputs with their digests
    prepare = client.get_run(stages["prepare"].info.run_id)
    names = {d.dataset.name: d.dataset.digest for d in prepare.inputs.dataset_inputs}
    assert {"prompts", "candidates", "pairs", "users_hidden"} <= set(names)
    assert all(len(v) == 16 for v in names.values())
    assert prepare.data.metrics["scorer_sst2_test_accuracy"] > 0.75   # the learned scorer (SST-2 test)
    # CLaP training curves are logged step by step
    history = client.get_metric_history(stages["pretrain"].info.run_id, "nll_per_token")
    assert len(history) == cfg.pretrain.stage1_steps + cfg.pretrain.stage2_steps
    # comparison table on the parent run
    artifacts = {a.path for a in client.list_artifacts(report.run_id, "comparison")}
    assert "comparison/comparison.md" in artifacts


def test_per_user_metrics_for_latent_dpo_and_lora(tiny_run):
    cfg, report, store = tiny_run
    client = mlflow.MlflowClient(report.tracking_uri)
    stages = {r.info.run_name: r for r in _children(client, report.experiment_id, report.run_id)}
    per_user = _children(client, report.experiment_id, stages["evaluate"].info.run_id)
    by_method = {}
    for r in per_user:
        by_method.setdefault(r.data.tags["method"], []).append(r)
    assert {"latent_dpo", "lora_dpo", "base_lm", "clap_prior"} <= set(by_method)
    assert len(by_method["latent_dpo"]) == cfg.evaluate.n_users
    for r in by_method["latent_dpo"] + by_method["lora_dpo"]:
        assert {"mean_reward", "win_rate", "fit_seconds", "perplexity"} <= set(r.data.metrics)
        assert r.data.metrics["fit_seconds"] > 0
        assert r.data.tags["clap_version"] == report.clap_version
        assert 0.0 <= r.data.metrics["win_rate"] <= 1.0
    for r in by_method["latent_dpo"]:
        assert r.data.tags["user_artifact_version"].startswith(report.clap_version)
        assert 0 < r.data.metrics["artifact_bytes"] < 64 * 1024   # head-only target (issue 5)


def test_every_user_has_an_artifact_and_data_is_parquet(tiny_run):
    cfg, report, store = tiny_run
    assert report.users["total"] == cfg.data.n_users
    assert report.users["fitted"] + report.users["cold_start"] == cfg.data.n_users
    currents = []
    for dirpath, _, files in os.walk(os.path.join(store, "users")):
        if "current.json" in files:
            currents.append(dirpath)
            assert any(f == "head.safetensors" for _, _, fs in os.walk(dirpath) for f in fs)
    assert len(currents) == cfg.data.n_users
    pairs_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(store, "data")) for f in fs
                   if f == "pairs.parquet"]
    assert len(pairs_files) == 1
    pairs = pq.read_table(pairs_files[0])
    assert set(pairs["user_id"].to_pylist()) <= {f"u{i:05d}" for i in range(cfg.data.n_users)}
    assert {"user_id", "prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert os.path.exists(os.path.join(store, "runs", report.run_id, "report", "index.html"))


def test_unchanged_night_is_skipped(tiny_run):
    cfg, report, store = tiny_run
    again = nightly(cfg, until="personalize")
    assert again.clap_version == report.clap_version
    assert again.users["unchanged"] == report.users["fitted"] + report.users["cold_start"]
    client = mlflow.MlflowClient(again.tracking_uri)
    stages = {r.info.run_name: r for r in _children(client, again.experiment_id, again.run_id)}
    assert set(stages["prepare"].data.tags["skipped"].split(",")) == {"prompts", "sft", "scorer", "candidates", "population"}
    assert stages["pretrain"].data.tags.get("skipped") == "true"
