"""CLaP pretraining on a real local Ray Train cluster: 2 CPU workers (DDP over gloo), both stages, checkpoints,
the pipeline stage's MLflow registration; then a worker killed mid-run (os._exit) and the run resumed from the
last checkpoint (FailureConfig).

Tiny data written by hand in the store layout the prepare stage produces (prompts / candidates Parquet and a
`save_pretrained` base model folder), so each fit takes ~20 s and nothing depends on the prepare stage.
"""
from __future__ import annotations

import json
import logging
import math
import os

import pyarrow as pa
import pytest
import torch

from latentpref.pipelines.config import DataConfig, PretrainConfig
from latentpref.tasks.data.prepare import DataArtifacts, TableRef
from latentpref.tasks.data.store import MANIFEST, Store
from latentpref.tasks.models.clap import load_clap
from latentpref.tasks.models.registry import load_base_model
from latentpref.tasks.train.pretrain import PretrainJob, run_pretrain

pytestmark = pytest.mark.slow

WORDS = "good bad great awful fun dull moving flat sharp slow bright grim warm cold".split()
STAGE1, STAGE2, EVERY = 3, 3, 4   # checkpoints after steps 4 and 6 (the last step always checkpoints)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # someone else's session: use it, leave it running
        yield ray
        return
    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store(str(tmp_path_factory.mktemp("pretrain-store")))
    n = 12
    prompts = pa.table({
        "prompt_id": [f"p{i}" for i in range(n)],
        "split": ["train"] * 10 + ["val", "test"],
        "prompt": [f"The film was {WORDS[i]} and the plot" for i in range(n)],
    })
    cands = pa.table({
        "prompt_id": [f"p{i}" for i in range(n) for _ in range(4)],
        "text": [f" felt {WORDS[(i + j) % len(WORDS)]} to me, {WORDS[j]} at the end" for i in range(n)
                 for j in range(4)],
    })
    # two users of opposite taste on the train prompts, and one held-out pair (never read by pretraining)
    pairs = pa.table({
        "user_id": ["ua", "ub"] * 10 + ["ua"],
        "prompt": [f"The film was {WORDS[i % 10]} and the plot" for i in range(20)] + ["The film was good"],
        "chosen": [" felt good to me" if i % 2 == 0 else " felt awful to me" for i in range(20)] + [" x"],
        "rejected": [" felt awful to me" if i % 2 == 0 else " felt good to me" for i in range(20)] + [" y"],
        "weight": [1.0] * 21,
        "split": ["train"] * 20 + ["heldout"],
    })
    store.write_table(pairs, "data", "pairs", "t", "pairs.parquet")
    store.write_table(prompts, "data", "prompts", "t", "prompts.parquet")
    store.write_table(cands, "data", "candidates", "t", "candidates.parquet")
    model, tokenizer = load_base_model("tiny-gpt2", seed=0)
    folder = store.url("models", "base", "t")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return store


def _job(store: Store, **kw) -> PretrainJob:
    return PretrainJob(store_root=store.root, base_model_path="models/base/t",
                       prompts_path=["data", "prompts", "t", "prompts.parquet"],
                       candidates_path=["data", "candidates", "t", "candidates.parquet"],
                       prompt_tokens=12, response_tokens=8, latent_dim=8, n_query=2, n_prefix=2,
                       stage1_steps=STAGE1, stage2_steps=STAGE2, prompts_per_batch=2, responses_per_prompt=2,
                       kl_samples=4, checkpoint_every=EVERY, lr=1e-3, **kw)


def _history(result) -> list[dict]:
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "history.json")) as fh:
            return json.load(fh)


def test_pretrain_stage_two_workers_both_stages_registered_in_mlflow(ray_cluster, store, tmp_path):
    """The pipeline stage end to end: a 2-worker Ray Train fit of both stages, the CLaP folder in the store,
    per-step metrics (rank 0's history) in MLflow and the CLaP registered as a model version; then an unchanged
    re-run is skipped and finds the same registered version instead of registering another."""
    import mlflow

    from latentpref.pipelines.pretrain import CLAP_MODEL_NAME, pretrain_stage

    cfg = PretrainConfig(latent_dim=8, n_query=2, n_prefix=2, stage1_steps=STAGE1, stage2_steps=STAGE2,
                         prompts_per_batch=2, responses_per_prompt=2, kl_samples=4, checkpoint_every=EVERY,
                         num_workers=2, use_gpu="false", max_failures=0)
    data_cfg = DataConfig(prompt_tokens=12, response_tokens=8)
    ref = TableRef(("data", "prompts", "t", "prompts.parquet"), "0" * 16, 12)
    data = DataArtifacts(prompts=ref, candidates=TableRef(("data", "candidates", "t", "candidates.parquet"),
                                                           "1" * 16, 48),
                         users=ref, pairs=ref, base_model_path=("models", "base", "t"), base_model_version="b0")
    client = mlflow.MlflowClient()
    # artifacts (the registered CLaP) under tmp_path: a bare set_experiment would put them in ./mlruns
    exp_id = client.create_experiment(f"it-pretrain-ray-{tmp_path.name}", artifact_location=tmp_path.as_uri())
    mlflow.set_experiment(experiment_id=exp_id)
    with mlflow.start_run(run_name="parent") as parent:
        clap = pretrain_stage(cfg, data_cfg, data, store, parent.info.run_id)
        again = pretrain_stage(cfg, data_cfg, data, store, parent.info.run_id)

    # Ray Train: both stages, one row per step, from a fresh start
    manifest = store.read_json(*clap.path, MANIFEST)
    history = manifest["history"]
    assert [r["step"] for r in history] == list(range(1, STAGE1 + STAGE2 + 1))
    assert [r["stage"] for r in history] == [1] * STAGE1 + [2] * STAGE2
    assert all(r["resumed_from_step"] == 0 for r in history)
    for r in history:
        assert all(math.isfinite(v) for v in r.values())
        assert r["tokens_per_s"] > 0 and 0 <= r["active_units"] <= 8
    assert all(r["contrastive"] == 0 for r in history[:STAGE1])
    assert all(r["contrastive"] > 0 for r in history[STAGE1:])
    model = load_clap(store.local_copy(*clap.path))
    base0, _ = load_base_model(store.url("models", "base", "t"))
    # the base moved in stage 2 (frozen in stage 1)
    assert any(not torch.equal(p, q) for p, q in zip(model.base_lm.parameters(), base0.parameters()))

    # MLflow: the registered model version, its tags, the run tags, per-step metrics
    assert clap.model_name == CLAP_MODEL_NAME and clap.model_version >= 1
    assert manifest["clap_model_version"] == clap.model_version
    mv = client.get_model_version(CLAP_MODEL_NAME, str(clap.model_version))
    assert mv.tags["clap_version"] == clap.version and mv.tags["base_model_version"] == "b0"
    assert client.get_run(parent.info.run_id).data.tags["clap_model_version"] == str(clap.model_version)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trained = [r for r in runs if r.data.tags.get("skipped") != "true"]
    assert len(runs) == 2 and len(trained) == 1
    run = trained[0]
    assert run.data.tags["clap_model_version"] == str(clap.model_version)
    assert run.data.tags["clap_version"] == clap.version     # the content digest stays a tag too
    for key in ("nll_per_token", "kl", "tokens_per_s", "active_units", "contrastive_acc"):
        assert len(client.get_metric_history(run.info.run_id, key)) == STAGE1 + STAGE2, key
    registered = mlflow.artifacts.download_artifacts(f"models:/{CLAP_MODEL_NAME}/{clap.model_version}")
    torch.testing.assert_close(load_clap(registered).state_dict(), model.state_dict())

    # unchanged inputs: skipped, same registered version, none added
    assert again.skipped and again.model_version == clap.model_version
    found = client.search_model_versions(f"name = '{CLAP_MODEL_NAME}' and tag.clap_version = '{clap.version}'")
    assert len(found) == 1


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, store, tmp_path):
    """Rank 1 dies (os._exit(1)) right after step 5, one step past the step-4 checkpoint. The controller
    restarts the worker group; `ray.train.get_checkpoint()` hands it the step-4 checkpoint, so step 5 is
    trained again (in stage 2, from the stored step) and the run ends at step 6 with one history row per step.
    The Gaussian population preference term is on: its users' directions are checkpointed with the trainer state
    and the restarted group continues with them (not with fresh ones), on both DDP workers."""
    marker = tmp_path / "fault-fired"
    result = run_pretrain(_job(store, fail_at_step=5, fail_marker=str(marker), preference_weight=1.0,
                               preference_pairs_per_batch=4, pairs_path=["data", "pairs", "t", "pairs.parquet"]),
                          storage_path=str(tmp_path / "ray"), name="fault", num_workers=2, use_gpu=False,
                          max_failures=2)
    assert marker.exists(), "the fault never fired"
    assert result.error is None
    assert result.metrics["step"] == STAGE1 + STAGE2
    history = _history(result)
    assert [r["step"] for r in history] == list(range(1, STAGE1 + STAGE2 + 1))   # continuous, no step twice
    assert [r["stage"] for r in history] == [1] * STAGE1 + [2] * STAGE2
    # rows 1-4 come from the first worker group (fresh start) via the step-4 checkpoint; rows 5-6 from the
    # restarted group, which started from that checkpoint (not from scratch, not from step 5)
    assert [r["resumed_from_step"] for r in history] == [0, 0, 0, 0, 4, 4]
    assert all(math.isfinite(r["preference"]) and r["preference"] > 0 and 0 <= r["preference_acc"] <= 1
               for r in history)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False)
    directions = state["user_directions"]["weight"]
    assert tuple(directions.shape) == (2, 8)     # two users with train pairs (the held-out pair is not read)
    from latentpref.tasks.train.loop import UserDirections
    moved = (directions - UserDirections(2, 8, seed=0).weight.detach()).abs().max().item()
    # trained over all 6 steps: Adam moves a weight by at most ~lr = 0.01 per step, so directions re-initialised by the
    # restarted group (2 steps) could not have moved 0.03; resumed ones trained 6 steps
    assert moved > 0.03, moved


def test_pooled_encoder_and_bag_of_words_train_through_ray(ray_cluster, store, tmp_path):
    """The encoder options reach the worker: the checkpointed CLaP has the pooled view and a BoW head whose bias was
    calibrated on real responses before step 1 (no feature_norm here), and every step logs a finite BoW term."""
    result = run_pretrain(_job(store, pool_tokens=True, bow_weight=0.5, bow_lr=1e-2),
                          storage_path=str(tmp_path / "ray"), name="bow", num_workers=1, use_gpu=False,
                          max_failures=0)
    assert result.error is None
    history = _history(result)
    assert len(history) == STAGE1 + STAGE2
    assert all(math.isfinite(r["bow_per_token"]) and r["bow_per_token"] > 0 for r in history)
    with result.checkpoint.as_directory() as d:
        model = load_clap(os.path.join(d, "clap"))
    assert model.cfg.pool_tokens and model.cfg.bow_head and model.encoder.ln_pool is not None
    # calibrated: log unigram frequencies (below 0, not the zero init), sharper than log(1 / vocab) for seen tokens
    vocab = model.bow.bias.shape[0]
    assert model.bow.bias.max() < 0 and model.bow.bias.max() > math.log(1.0 / vocab)



def test_follow_stage_trains_only_the_follow_adapter_and_resumes_inside_it(ray_cluster, store, tmp_path):
    """Stage 3 ("follow", issue 28 lever 2) on 2 DDP workers: it runs after stages 1-2, only the follow adapter
    changes in it (the encoder, the main adapter and the base are the stage-2 checkpoint's), the prior's text
    (z = 0) is exactly the stage-2 CLaP's, and a worker killed inside stage 3 resumes from the step-8 checkpoint
    (the population heads are refitted from the unchanged encoder)."""
    marker = tmp_path / "fault-fired"
    follow = dict(follow_steps=4, follow_rank=4, follow_pairs_per_batch=2, follow_lr=1e-2,
                  follow_fit={"steps": 5, "lr": 1e-2, "n_samples": 4},
                  pairs_path=["data", "pairs", "t", "pairs.parquet"])
    total = STAGE1 + STAGE2 + 4
    result = run_pretrain(_job(store, fail_at_step=9, fail_marker=str(marker), **follow),
                          storage_path=str(tmp_path / "ray"), name="follow", num_workers=2, use_gpu=False,
                          max_failures=2)
    assert marker.exists(), "the fault never fired"
    assert result.error is None and result.metrics["step"] == total
    history = _history(result)
    assert [r["stage"] for r in history] == [1] * STAGE1 + [2] * STAGE2 + [3] * 4
    assert [r["resumed_from_step"] for r in history][-2:] == [8, 8]
    assert all(math.isfinite(r["follow_dpo"]) and 0 <= r["follow_acc"] <= 1 for r in history[-4:])
    with result.checkpoint.as_directory() as d:
        model = load_clap(os.path.join(d, "clap"))
    assert model.cfg.follow_rank == 4 and model.adapter.follow.out.abs().sum() > 0
    # the same job without stage 3 is the stage-2 CLaP: everything but the follow adapter is equal
    plain = run_pretrain(_job(store, **{**follow, "follow_steps": 0}), storage_path=str(tmp_path / "ray"),
                         name="plain", num_workers=2, use_gpu=False, max_failures=0)
    with plain.checkpoint.as_directory() as d:
        stage2 = load_clap(os.path.join(d, "clap"))
    followed = {k: v for k, v in model.state_dict().items() if not k.startswith("adapter.follow.")}
    torch.testing.assert_close(followed, stage2.state_dict())
