"""The real nightly flow on the tiny preset with discrete latent codes (`pretrain.latent_type=discrete`, LPC, spec
lpc.md §6.3): CLaP pretraining with the LPC pair objective, per-user code fits, evaluation and the report.

Kept cheap: smaller data, fewer CLaP steps, no baselines, two evaluated users (the Gaussian night, test_nightly_tiny.py, covers
those parts); one flow run shared by the assertions.
"""
import json
import os

import mlflow
import pytest
from safetensors.torch import load_file

from latentpref.pipelines.config import load_config
from latentpref.pipelines.nightly import nightly
from latentpref.tasks.data.store import Store
from latentpref.tasks.policy.table import PolicyTable, night_tag

pytestmark = pytest.mark.slow

N_CODES = 8


@pytest.fixture(scope="module")
def discrete_run(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("nightly-discrete") / "store")
    cfg = load_config("tiny", overrides=[
        f"runtime.store={store}", "runtime.ray_num_cpus=2", "runtime.mlflow_experiment=it-nightly-discrete",
        # smaller data than the preset (as test_generate.py): this night checks plumbing, not quality
        "data.n_prompts=80", "data.sft_steps=0", "data.n_candidates=4", "data.n_users=12",
        "pretrain.latent_type=discrete", f"pretrain.n_codes={N_CODES}", "pretrain.stage1_steps=20",
        "pretrain.stage2_steps=10", "pretrain.checkpoint_every=30", "personalize.steps=50",
        "evaluate.baselines=[]", "evaluate.n_users=2", "evaluate.prompts_per_user=4", "evaluate.max_new_tokens=12"])
    report = nightly(cfg)
    return cfg, report, store


def _stages(client, report):
    runs = client.search_runs([report.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{report.run_id}'")
    return {r.info.run_name: r for r in runs}


def test_clap_manifest_and_mlflow_record_the_discrete_latent(discrete_run):
    cfg, report, store = discrete_run
    manifest = json.load(open(os.path.join(store, "models", "clap", report.clap_version, "_manifest.json")))
    assert manifest["latent_type"] == "discrete"
    assert len(manifest["code_usage"]) == N_CODES and sum(manifest["code_usage"]) > 0
    assert sum(manifest["code_usage_expected"]) == pytest.approx(sum(manifest["code_usage"]), rel=1e-6)
    client = mlflow.MlflowClient(report.tracking_uri)
    pretrain = _stages(client, report)["pretrain"]
    assert pretrain.data.params["pretrain.latent_type"] == "discrete"
    history = client.get_metric_history(pretrain.info.run_id, "code_usage_perplexity")
    assert len(history) == cfg.pretrain.stage1_steps + cfg.pretrain.stage2_steps
    assert all(1.0 <= h.value <= N_CODES + 1e-4 for h in history)
    for name in ("candidate_code_usage_perplexity", "candidate_expected_code_perplexity"):
        assert 1.0 <= pretrain.data.metrics[name] <= N_CODES + 1e-4
    assert "lpc_pair_loss" in pretrain.data.metrics and pretrain.data.metrics["lpc_pair_loss"] > 0
    assert "user_code_usage_perplexity" in _stages(client, report)["personalize"].data.metrics


def test_every_user_is_k_numbers_with_a_code_mixture(discrete_run):
    cfg, report, store = discrete_run
    assert report.users["fitted"] + report.users["cold_start"] == cfg.data.n_users
    assert report.users["fitted"] > 0
    # one row per user in the policy table: K code offsets and the manifest's code mixture
    table = PolicyTable(Store(store), report.clap_version)
    policies = table.policies([f"u{i:05d}" for i in range(cfg.data.n_users)], night_tag(report.run_id))
    assert len(policies) == cfg.data.n_users
    for policy in policies.values():
        assert policy.tensors["delta"].shape == (N_CODES,) and policy.manifest["artifact"] == "codes.safetensors"
        assert policy.manifest["mode"] == "codes" and policy.manifest["latent_type"] == "discrete"
        assert len(policy.manifest["code_mixture"]) == N_CODES
        assert sum(policy.manifest["code_mixture"]) == pytest.approx(1.0, abs=1e-4)
    assert table.dataset().schema.field("params").type.list_size == N_CODES


def test_evaluation_rows_and_report(discrete_run):
    cfg, report, store = discrete_run
    client = mlflow.MlflowClient(report.tracking_uri)
    evaluate = _stages(client, report)["evaluate"]
    per_user = client.search_runs([report.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{evaluate.info.run_id}'")
    by_method = {}
    for r in per_user:
        by_method.setdefault(r.data.tags["method"], []).append(r)
    assert {"latent_dpo", "clap_prior", "base_lm"} <= set(by_method)
    assert len(by_method["latent_dpo"]) == cfg.evaluate.n_users
    for r in by_method["latent_dpo"]:
        assert r.data.metrics["fit_seconds"] > 0 and 0.0 <= r.data.metrics["win_rate"] <= 1.0
        assert r.data.metrics["trainable_params"] == N_CODES
        assert "heldout_accuracy" in r.data.metrics
    report_dir = os.path.join(store, "runs", report.run_id, "report")
    assert os.path.exists(os.path.join(report_dir, "code_usage.png"))
    assert "code-usage" in open(os.path.join(report_dir, "index.html")).read()
