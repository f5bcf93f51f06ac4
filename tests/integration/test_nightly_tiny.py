"""The real nightly flow on the tiny preset: local Ray, serverless Prefect, sqlite MLflow, local Parquet.

One flow run (module-scoped fixture) is shared by the assertions below; a second run then checks that an
unchanged night is skipped stage by stage.
"""
import json
import os

import mlflow
import pyarrow.parquet as pq
import pytest

from latentpref.pipelines.config import load_config
from latentpref.pipelines.nightly import nightly
from latentpref.tasks.data.store import Store
from latentpref.tasks.evaluate.serve_core import current_release
from latentpref.tasks.policy.table import PolicyTable, night_tag
from latentpref.tasks.policy.text_cache import TextLatentTable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    store = str(root / "store")
    # plus users outside the cohorts (evaluated too) and the baselines on a subset of the evaluated users (issue 27)
    cfg = load_config("tiny", overrides=[f"runtime.store={store}", "runtime.ray_num_cpus=2",
                                         "runtime.mlflow_experiment=it-nightly", "data.n_out_of_cohort=4",
                                         "evaluate.n_out_of_cohort_users=2", "evaluate.baseline_users=3"])
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
    # the machine's peak used memory per stage (issue 14: a night must fit the box), in the report and MLflow
    assert set(report.stage_peak_mem_mb) == set(report.stages_run)
    assert all(v > 0 for v in report.stage_peak_mem_mb.values())
    parent = client.get_run(report.run_id).data.metrics
    assert parent["stage_peak_mem_mb_pretrain"] == report.stage_peak_mem_mb["pretrain"]


def test_per_user_metrics_for_latent_dpo_and_lora(tiny_run):
    cfg, report, store = tiny_run
    client = mlflow.MlflowClient(report.tracking_uri)
    stages = {r.info.run_name: r for r in _children(client, report.experiment_id, report.run_id)}
    per_user = _children(client, report.experiment_id, stages["evaluate"].info.run_id)
    by_method = {}
    for r in per_user:
        by_method.setdefault(r.data.tags["method"], []).append(r)
    assert {"latent_dpo", "lora_dpo", "base_lm", "clap_prior"} <= set(by_method)
    assert len(by_method["latent_dpo"]) == cfg.evaluate.n_users + cfg.evaluate.n_out_of_cohort_users
    for r in by_method["latent_dpo"] + by_method["lora_dpo"]:
        assert {"mean_reward", "win_rate", "fit_seconds", "perplexity"} <= set(r.data.metrics)
        assert r.data.metrics["fit_seconds"] > 0
        assert r.data.tags["clap_version"] == report.clap_version
        assert 0.0 <= r.data.metrics["win_rate"] <= 1.0
    for r in by_method["latent_dpo"]:
        assert r.data.tags["user_artifact_version"].startswith(report.clap_version)
        assert 0 < r.data.metrics["artifact_bytes"] < 64 * 1024   # head-only target (issue 5)


ALL_METHODS = {"base_lm", "clap_prior", "oracle_best_of_k", "latent_dpo", "latent_dpo_best_of_k", "lora_dpo",
               "full_dpo", "ptuning_dpo"}
LINEAGE_TAGS = {"clap_version", "base_model_version", "pairs_digest", "candidates_digest", "prompts_digest",
                "user_id", "method", "cohort"}


def test_baselines_side_by_side_with_lineage(tiny_run):
    """Issue 6: every baseline and latent DPO on the same users, one child run per (user, method) carrying the
    data and model versions, dataset inputs on the stage run, the comparison table on the parent run."""
    cfg, report, store = tiny_run
    assert set(cfg.evaluate.baselines) == {"lora_dpo", "full_dpo", "ptuning_dpo"} and cfg.evaluate.n_users == 3
    n_eval = cfg.evaluate.n_users + cfg.evaluate.n_out_of_cohort_users
    n_base = cfg.evaluate.baseline_users
    assert n_base < n_eval   # the baselines run on a subset of the evaluated users
    client = mlflow.MlflowClient(report.tracking_uri)
    stages = {r.info.run_name: r for r in _children(client, report.experiment_id, report.run_id)}
    evaluate = client.get_run(stages["evaluate"].info.run_id)
    inputs = {d.dataset.name: d.dataset for d in evaluate.inputs.dataset_inputs}
    assert {"prompts", "pairs", "users_hidden"} <= set(inputs)
    assert all(inputs[n].source for n in inputs)
    per_user = _children(client, report.experiment_id, evaluate.info.run_id)
    by_method: dict[str, list] = {}
    for r in per_user:
        assert LINEAGE_TAGS <= set(r.data.tags), r.data.tags
        assert r.data.tags["clap_version"] == report.clap_version
        by_method.setdefault(r.data.tags["method"], []).append(r)
    assert set(by_method) == ALL_METHODS
    users = {r.data.tags["user_id"] for r in by_method["latent_dpo"]}
    assert len(users) == n_eval
    for method, rs in by_method.items():
        mine = {r.data.tags["user_id"] for r in rs}
        assert (len(mine) == n_base and mine < users) if method in cfg.evaluate.baselines else mine == users
    for method in ("lora_dpo", "full_dpo", "ptuning_dpo"):
        for r in by_method[method]:
            m = r.data.metrics
            assert m["fit_flops"] > 0 and m["peak_rss_bytes"] > 0 and m["fit_seconds"] > 0
            assert 0.0 <= m["heldout_accuracy"] <= 1.0
    params = {k: by_method[k][0].data.metrics["trainable_params"] for k in ("lora_dpo", "full_dpo", "ptuning_dpo")}
    assert params["ptuning_dpo"] < params["lora_dpo"] < params["full_dpo"]
    # the comparison table: parent-run artifact in three formats, one row per method with bootstrap intervals
    artifacts = {a.path for a in client.list_artifacts(report.run_id, "comparison")}
    assert {"comparison/comparison.parquet", "comparison/comparison.csv", "comparison/comparison.md"} <= artifacts
    local = client.download_artifacts(report.run_id, "comparison/comparison.parquet")
    table = pq.read_table(local).to_pylist()
    assert {r["method"] for r in table} == ALL_METHODS
    for r in table:
        assert r["users"] == (n_base if r["method"] in cfg.evaluate.baselines else n_eval)
        assert r["win_rate_lo"] <= r["win_rate"] <= r["win_rate_hi"]
        assert r["win_rate_vs_prior_lo"] <= r["win_rate_vs_prior"] <= r["win_rate_vs_prior_hi"]
    row = {r["method"]: r for r in table}
    assert row["clap_prior"]["win_rate_vs_prior"] == 0.5          # against itself: every prompt ties
    # the ceiling: per prompt the best of K prior samples (the first of which is clap_prior's own text)
    assert row["oracle_best_of_k"]["win_rate_vs_prior"] >= 0.5
    assert row["oracle_best_of_k"]["mean_reward"] >= row["clap_prior"]["mean_reward"]
    assert row["oracle_best_of_k"]["reward_spread"] >= 0
    assert 0 <= row["latent_dpo"]["latent_heldout_accuracy"] <= 1 and row["latent_dpo"]["z_sensitivity_nats"] > 0


def test_clear_preference_user_improves_over_unpersonalised(tiny_run):
    """Issue 6: for the evaluated user with the clearest preference, the latent fit (in latent space: the implicit
    reward at the responses' posterior means, `latent_heldout_accuracy`) and LoRA-DPO (through the LM,
    `heldout_accuracy`) predict that user's held-out choices better than the un-personalised models, which by
    construction score every pair a tie (0.5). Latent DPO's LM-based `heldout_accuracy` (the user's z against the
    prior's z, with the LM run) is reported, not asserted: whether the latent's direction reaches the LM depends on
    how well CLaP tied z to text, which the tiny CLaP does not (issue 14's diagnostics)."""
    import json

    cfg, report, store = tiny_run
    per_user = pq.read_table(os.path.join(store, "runs", report.run_id, "evaluation_per_user.parquet")).to_pylist()
    users_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(store, "data")) for f in fs
                   if f == "users.parquet"]
    hidden = {r["user_id"]: r for r in pq.read_table(users_files[0]).to_pylist()}

    def clarity(user_id: str) -> float:   # preference strength over the BT noise temperature
        weights = json.loads(hidden[user_id]["weights_json"])
        return sum(abs(w) for w in weights.values()) / max(hidden[user_id]["bt_temperature"], 1e-6)

    # among the cohort users (an out-of-cohort user's raw weights mix every feature, so this clarity is not theirs)
    evaluated = sorted({r["user_id"] for r in per_user if r["group"] != "out_of_cohort"}, key=clarity, reverse=True)
    clear = evaluated[0]
    acc = {r["method"]: r["heldout_accuracy"] for r in per_user if r["user_id"] == clear}
    latent = {r["method"]: r.get("latent_heldout_accuracy") for r in per_user if r["user_id"] == clear}
    assert latent["latent_dpo"] > 0.5, (clear, latent)
    assert 0.0 <= acc["latent_dpo"] <= 1.0
    assert acc["lora_dpo"] > 0.5, (clear, acc)


def test_lineage_command_reaches_the_evaluation_runs(tiny_run, capsys):
    import json

    from latentpref.pipelines.cli import main

    cfg, report, store = tiny_run
    per_user = pq.read_table(os.path.join(store, "runs", report.run_id, "evaluation_per_user.parquet"))
    user = per_user["user_id"][0].as_py()
    assert main(["lineage", user, "--preset", "tiny", "--set", f"runtime.store={store}",
                 "--set", "runtime.mlflow_experiment=it-nightly"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert chain["clap_version"] == report.clap_version and chain["data_hash"]
    runs = [r for r in chain["evaluation_runs"] if r["parent_run_id"]]
    assert {r["method"] for r in runs} == ALL_METHODS
    assert all(r["clap_version"] == report.clap_version for r in runs)


def test_every_user_has_an_artifact_and_data_is_parquet(tiny_run):
    cfg, report, store = tiny_run
    assert report.users["total"] == cfg.data.n_users + cfg.data.n_out_of_cohort
    assert report.users["fitted"] + report.users["cold_start"] == cfg.data.n_users + cfg.data.n_out_of_cohort
    # one row per user in the CLaP's policy table, tagged by the night, and no object per user
    total = cfg.data.n_users + cfg.data.n_out_of_cohort
    table = PolicyTable(Store(store), report.clap_version)
    night = night_tag(report.run_id)
    assert night in table.tags()
    rows = table.rows([f"u{i:05d}" for i in range(total)], night, columns=["user_id", "artifact", "params"])
    assert rows.num_rows == total and set(rows["artifact"].to_pylist()) == {"head.safetensors"}
    assert all(p is not None for p in rows["params"].to_pylist())
    assert not os.path.exists(os.path.join(store, "users"))
    release = current_release(Store(store))
    assert release.policy_tag == night and release.clap_version == report.clap_version
    records = pq.read_table(os.path.join(store, "runs", report.run_id, "personalize_users.parquet"))
    assert records.num_rows == total and not os.listdir(os.path.join(store, "runs", report.run_id,
                                                                      "personalize_users"))
    texts = TextLatentTable(Store(store), report.clap_version)   # every text of the night has its latent row
    assert texts.missing_texts(pq.read_table(pairs_path(store))["prompt"].to_pylist(), [], discrete=False)[0] == []
    pairs_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(store, "data")) for f in fs
                   if f == "pairs.parquet"]
    assert len(pairs_files) == 1
    pairs = pq.read_table(pairs_files[0])
    assert set(pairs["user_id"].to_pylist()) <= {f"u{i:05d}" for i in range(total)}
    assert {"user_id", "prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert os.path.exists(os.path.join(store, "runs", report.run_id, "report", "index.html"))


def pairs_path(store: str) -> str:
    return next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(store, "data")) for f in fs
                if f == "pairs.parquet")


def test_unchanged_night_is_skipped(tiny_run):
    cfg, report, store = tiny_run
    again = nightly(cfg, until="personalize")
    assert again.clap_version == report.clap_version
    assert again.users["unchanged"] == report.users["fitted"] + report.users["cold_start"]
    table = PolicyTable(Store(store), report.clap_version)
    assert table.count() == report.users["total"]      # an unchanged night commits no row
    assert night_tag(again.run_id) in table.tags()     # ... but still tags its night
    client = mlflow.MlflowClient(again.tracking_uri)
    stages = {r.info.run_name: r for r in _children(client, again.experiment_id, again.run_id)}
    assert set(stages["prepare"].data.tags["skipped"].split(",")) == {"prompts", "sft", "scorer", "candidates", "population"}
    assert stages["pretrain"].data.tags.get("skipped") == "true"


def test_personal_measures_and_user_groups(tiny_run):
    """Issue 27: own_vs_swapped (against the least similar evaluated user's policy, judged by the user's reward),
    win_rate_vs_base, the user groups reported apart, and the cohort x cohort picture."""
    import json

    cfg, report, store = tiny_run
    run_dir = os.path.join(store, "runs", report.run_id)
    per_user = pq.read_table(os.path.join(run_dir, "evaluation_per_user.parquet")).to_pylist()
    # the tiny CLaP reads no pairs: every cohort user is unseen; the out-of-cohort users are their own group
    groups = {r["user_id"]: r["group"] for r in per_user}
    assert sorted(groups.values()).count("out_of_cohort") == cfg.evaluate.n_out_of_cohort_users
    assert set(groups.values()) == {"unseen", "out_of_cohort"}
    for r in per_user:
        assert 0.0 <= r["win_rate_vs_base"] <= 1.0
        if r["method"] in ("base_lm", "clap_prior", "oracle_best_of_k"):
            assert r["own_vs_swapped"] is None and r["swap_partner"] is None
        else:
            assert 0.0 <= r["own_vs_swapped"] <= 1.0
            assert r["swap_partner"] != r["user_id"] and r["swap_partner"] in groups
    base_rows = [r for r in per_user if r["method"] == "base_lm"]
    assert all(r["win_rate_vs_base"] == 0.5 for r in base_rows)   # against itself: every prompt ties
    by_group = pq.read_table(os.path.join(run_dir, "comparison_by_group.parquet")).to_pylist()
    assert {r["group"] for r in by_group} == {"unseen", "out_of_cohort"}
    latent = {r["group"]: r for r in by_group if r["method"] == "latent_dpo"}
    assert latent["out_of_cohort"]["users"] == cfg.evaluate.n_out_of_cohort_users
    assert latent["unseen"]["own_vs_swapped_lo"] <= latent["unseen"]["own_vs_swapped"] <= latent["unseen"]["own_vs_swapped_hi"]
    cohorts = json.loads(open(os.path.join(run_dir, "cohort_matrix.json")).read())
    picture = cohorts["methods"]["latent_dpo"]
    assert "out_of_cohort" in picture["judges"] and picture["judges"] == picture["writers"]
    assert len(picture["mean_reward"]) == len(picture["judges"])
    assert cohorts["baseline"] in cfg.evaluate.baselines and cohorts["baseline"] in cohorts["methods"]
    # the MLflow parent run carries the per-group figures
    client = mlflow.MlflowClient(report.tracking_uri)
    stages = {r.info.run_name: r for r in _children(client, report.experiment_id, report.run_id)}
    metrics = client.get_run(stages["evaluate"].info.run_id).data.metrics
    assert "out_of_cohort.latent_dpo.own_vs_swapped" in metrics and "latent_dpo.win_rate_vs_base" in metrics


def test_prepared_texts_pass_the_feedback_validation(tiny_run):
    """Issue 27 item 7: every prompt and candidate of a prepared store is feedback the product itself accepts
    (control characters are cleaned at preparation), so `ingest` never quarantines feedback on its own texts."""
    import pyarrow as pa

    from latentpref.tasks.data.validate import validate_feedback

    cfg, report, store = tiny_run
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(store, "data")) for f in fs]
    prompts = pq.read_table(next(f for f in files if f.endswith("prompts.parquet")))
    cands = pq.read_table(next(f for f in files if f.endswith("candidates.parquet")))
    prompt_of = dict(zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()))
    texts = cands["text"].to_pylist()
    rows = {"user_id": [], "prompt": [], "chosen": [], "rejected": []}
    for i, (pid, text) in enumerate(zip(cands["prompt_id"].to_pylist(), texts)):
        rows["user_id"].append(f"u{i}")   # one row per candidate: no duplicates
        rows["prompt"].append(prompt_of[pid])
        rows["chosen"].append(text)
        rows["rejected"].append(text + " (other)")
    for j, ref in enumerate(prompts["reference"].to_pylist()):
        rows["user_id"].append(f"r{j}")
        rows["prompt"].append(prompts["prompt"][j].as_py())
        rows["chosen"].append(ref)
        rows["rejected"].append(ref + " (other)")
    good, bad = validate_feedback(pa.table(rows))
    assert bad.num_rows == 0, bad.slice(0, 5).to_pylist()
    assert good.num_rows == len(texts) + prompts.num_rows


def test_forgotten_user_is_gone_and_the_next_night_does_not_bring_them_back(tiny_run, capsys):
    """`latentpref forget` on a real night's store: no file holds the id any more (policy table versions, run
    tables, logs, MLflow's artifacts and database), lineage shows a tombstone, and the next night skips them.
    Last in this file: it changes the shared store."""
    from latentpref.pipelines.cli import main

    cfg, report, store = tiny_run
    evaluated = pq.read_table(os.path.join(store, "runs", report.run_id, "evaluation_per_user.parquet"))
    victim = sorted(set(evaluated["user_id"].to_pylist()))[0]      # one with MLflow runs of their own
    args = ["--store", store, "--preset", "tiny"]
    assert main(["forget", victim, *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policies"]["rows"] >= 1 and out["mlflow"]["runs_deleted"] >= 1
    left = []
    for dirpath, _, files in os.walk(store):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                if victim.encode() in fh.read():
                    left.append(path)
    # the prepared data still names them (the simulated population; prepare's digest covers those files)?
    assert not left, left
    assert main(["lineage", victim, *args]) == 0
    stone = json.loads(capsys.readouterr().out)
    assert stone["forgotten"] is True and victim not in json.dumps(stone)
    again = nightly(cfg, until="personalize")
    records = pq.read_table(os.path.join(store, "runs", again.run_id, "personalize_users.parquet"))
    assert victim not in records["user_id"].to_pylist()
    assert victim not in PolicyTable(Store(store), report.clap_version).manifests([victim])
