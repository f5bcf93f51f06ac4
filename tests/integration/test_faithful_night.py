"""A real tiny night with `personalize.mode=faithful` through personalize, evaluate and generate (issue 15 item 7).

Kept cheap: it starts from a copy of the finished data, models and cache folders of the session's one tiny night
(`test_generate.tiny_night`, shared with test_generate.py and test_report.py), so prepare and pretrain are skipped
by their digests and only personalize (every user fitted faithfully: a whole copy of the CLaP encoder per user) and
evaluate run, without baselines (the Gaussian night, test_nightly_tiny.py, covers those). One flow run shared by the
assertions below.
"""
import json
import os
import shutil

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from test_generate import SMALLER, tiny_night   # tests/integration is on sys.path (pytest's default rootdir imports)

from latentpref.pipelines import cli
from latentpref.pipelines.config import load_config
from latentpref.pipelines.nightly import nightly
from latentpref.tasks.data.batching import tokenize_prompts
from latentpref.tasks.data.store import Store
from latentpref.tasks.evaluate.serving import PersonalizedGenerator

try:   # the policy's home after the personalize refactor; the old path re-exports it
    from latentpref.tasks.policy.store import load_user_policy
except ImportError:  # pragma: no cover
    from latentpref.tasks.train.personalize import load_user_policy

pytestmark = pytest.mark.slow

EXPERIMENT = "it-faithful"
FAITHFUL = ["personalize.mode=faithful", f"runtime.mlflow_experiment={EXPERIMENT}", "evaluate.baselines=[]"]


@pytest.fixture(scope="module")
def faithful_night(session_dir, tmp_path_factory):
    _, base_report, base_store = tiny_night(session_dir)
    store = str(tmp_path_factory.mktemp("nightly-faithful") / "store")
    for folder in ("data", "models", "cache"):   # finished stages only: users, runs and releases start empty
        if os.path.isdir(os.path.join(base_store, folder)):
            shutil.copytree(os.path.join(base_store, folder), os.path.join(store, folder))
    cfg = load_config("tiny", overrides=[f"runtime.store={store}", *SMALLER, *FAITHFUL])
    assert cfg.personalize.mode == "faithful" and cfg.runtime.mlflow_experiment == EXPERIMENT
    report = nightly(cfg, until="evaluate")
    return cfg, report, store, base_report


def _stages(client, report) -> dict:
    runs = client.search_runs([report.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{report.run_id}'")
    return {r.info.run_name: r for r in runs}


def _fitted(store: str, report) -> list[str]:
    records = pq.read_table(os.path.join(store, "runs", report.run_id, "personalize_users.parquet")).to_pylist()
    return [r["user_id"] for r in records if not r["cold_start"]]


def test_users_are_fitted_in_faithful_mode(faithful_night, capsys):
    cfg, report, store, base_report = faithful_night
    assert report.clap_version == base_report.clap_version      # the base night's CLaP, not retrained
    client = mlflow.MlflowClient(report.tracking_uri)
    stages = _stages(client, report)
    assert stages["pretrain"].data.tags.get("skipped") == "true"
    assert stages["personalize"].data.tags["mode"] == "faithful"
    assert report.users["fitted"] + report.users["cold_start"] == cfg.data.n_users
    assert report.users["fitted"] > 0 and report.users["unchanged"] == 0   # the copied store had no user fits

    records = pq.read_table(os.path.join(store, "runs", report.run_id, "personalize_users.parquet")).to_pylist()
    fitted = [r for r in records if not r["cold_start"]]
    assert fitted and all(r["mode"] == "faithful" for r in fitted)
    for r in fitted:
        policy = load_user_policy(Store(store), r["user_id"])
        assert policy is not None and policy.mode == "faithful" and not policy.cold_start
        manifest = policy.manifest
        assert manifest["clap_version"] == report.clap_version and "-faithful-" in manifest["version"]
        # the whole encoder is the user's (spec §4.1.8): far more than head-only's per-query heads
        assert manifest["trainable_params"] == sum(t.numel() for t in policy.tensors.values()) > 50_000
        assert 0.0 < manifest["final_loss"] < 10.0 and manifest["fit_seconds"] > 0

    user = fitted[0]["user_id"]
    assert cli.main(["lineage", user, "--preset", "tiny", "--set", f"runtime.store={store}",
                     "--set", f"runtime.mlflow_experiment={EXPERIMENT}"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert chain["mode"] == "faithful" and "-faithful-" in chain["artifact_version"]
    assert chain["clap_version"] == report.clap_version


def test_evaluation_has_the_latent_rows_of_the_faithful_fits(faithful_night):
    cfg, report, store, _ = faithful_night
    per_user = pq.read_table(os.path.join(store, "runs", report.run_id, "evaluation_per_user.parquet")).to_pylist()
    latent = [r for r in per_user if r["method"] == "latent_dpo"]
    assert len(latent) == cfg.evaluate.n_users
    assert {r["method"] for r in per_user} >= {"latent_dpo", "clap_prior", "base_lm", "oracle_best_of_k"}
    for r in latent:
        policy = load_user_policy(Store(store), r["user_id"])
        assert policy.mode == "faithful"
        assert r["trainable_params"] == policy.manifest["trainable_params"]
        assert r["fit_seconds"] > 0 and r["artifact_bytes"] > 0
        assert 0.0 <= r["heldout_accuracy"] <= 1.0 and 0.0 <= r["latent_heldout_accuracy"] <= 1.0
        assert 0.0 <= r["win_rate_vs_prior"] <= 1.0 and r["latent_shift"] > 0   # the user's z is not the prior's
        assert r["z_sensitivity_nats"] >= 0
    table = {r["method"]: r for r in
             pq.read_table(os.path.join(store, "runs", report.run_id, "comparison.parquet")).to_pylist()}
    assert table["latent_dpo"]["users"] == cfg.evaluate.n_users
    assert table["latent_dpo"]["win_rate_vs_prior_lo"] <= table["latent_dpo"]["win_rate_vs_prior"] \
        <= table["latent_dpo"]["win_rate_vs_prior_hi"]
    # MLflow: one child run per evaluated user, tagged with the faithful artifact it used
    client = mlflow.MlflowClient(report.tracking_uri)
    evaluate = _stages(client, report)["evaluate"]
    children = client.search_runs([report.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{evaluate.info.run_id}'")
    tagged = [r for r in children if r.data.tags["method"] == "latent_dpo"]
    assert len(tagged) == cfg.evaluate.n_users
    assert all("-faithful-" in r.data.tags["user_artifact_version"] for r in tagged)


def test_generate_serves_the_users_faithful_policy(faithful_night, capsys):
    _, report, store, _ = faithful_night
    user = _fitted(store, report)[0]
    prompt = "The movie was"
    generator = PersonalizedGenerator.from_store(Store(store))
    assert generator.clap_version == report.clap_version
    result = generator.generate([(user, prompt)], max_new_tokens=6)[0]
    assert result.personalized and result.notice is None
    assert len(result.token_ids) == 6 and isinstance(result.text, str)
    # the z it decoded with is mu of the user's own (faithfully fitted) encoder, not the prior's mean (0)
    z, notices = generator.latents([user], [prompt])
    policy = load_user_policy(Store(store), user)
    ids, mask = tokenize_prompts(generator.tokenizer, [prompt], generator.prompt_tokens)
    mu, _ = policy.latent(generator.clap.encoder, ids, mask)
    assert notices == [None] and torch.count_nonzero(z) > 0
    torch.testing.assert_close(z, mu.float())

    rc = cli.main(["generate", "--user", user, "--prompt", prompt, "--max-new-tokens", "6", "--store", store])
    out = capsys.readouterr()
    assert rc == 0 and out.out == result.text + "\n"
    assert "notice" not in out.err
