"""pretrain stage: CLaP on Ray Train, stored as a versioned model folder and registered in MLflow.

Two identifiers, both kept: `clap_version` (tag) is the content digest of everything the CLaP depends on and names
its store folder; `clap_model_version` (tag) is the version number of the registered MLflow model
`latentpref-clap` (a LoggedModel of the pretrain run holding the saved CLaP folder), which later stages and
people reference for lineage (`models:/latentpref-clap/<n>`). The registered version carries the digest as its
`clap_version` tag, so an unchanged night finds it again instead of registering a duplicate.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import tracking
from latentpref.pipelines.config import DataConfig, PretrainConfig
from latentpref.tasks.data.prepare import DataArtifacts
from latentpref.tasks.data.store import MANIFEST, Store, json_digest, stage_done


CLAP_MODEL_NAME = "latentpref-clap"   # MLflow registered-model name of the pretrained CLaP


@dataclass(frozen=True)
class ClapArtifact:
    version: str
    path: tuple[str, ...]           # store folder holding the CLaP model (save_clap layout)
    final_metrics: dict[str, float]
    skipped: bool = False
    model_name: str | None = None   # MLflow registered model and version number of this CLaP
    model_version: int | None = None
    # whether its training read population users' pairs (the LPC pair objective or the population preference term):
    # the evaluation then counts those users as "seen"
    read_pairs: bool = False


# PretrainConfig fields that only a discrete CLaP reads: left out of a Gaussian CLaP's digest, so adding them did
# not change the version (and invalidate the stored models, caches and user fits) of any Gaussian run
DISCRETE_FIELDS = frozenset({"latent_type", "n_codes", "tau_start", "tau_end", "straight_through", "lpc_kl_weight",
                             "lpc_pair_weight", "lpc_loss_type", "lpc_beta", "lpc_gamma"})


PREFERENCE_FIELDS = frozenset({"preference_weight", "preference_lr", "preference_pairs_per_batch"})
SPACE_FIELDS = frozenset({"preference_dims", "preference_layer", "preference_l2", "preference_only_share"})
FOLLOW_FIELDS = frozenset({"follow_steps", "follow_rank", "follow_pairs_per_batch", "follow_lr", "follow_beta",
                           "follow_nll_weight"})


def _uses_pairs(cfg: PretrainConfig) -> bool:
    """A discrete CLaP with the LPC pair objective, or a Gaussian one with the population preference term, trains
    on the pooled preference pairs too."""
    if cfg.latent_type == "discrete":
        return cfg.lpc_pair_weight > 0
    return cfg.preference_weight > 0 or cfg.preference_dims > 0 or cfg.follow_steps > 0


def _follow_on(cfg: PretrainConfig) -> bool:
    return cfg.latent_type == "gaussian" and cfg.follow_steps > 0


def clap_version(cfg: PretrainConfig, data_cfg: DataConfig, data: DataArtifacts,
                 follow_fit: dict | None = None) -> str:
    """The CLaP's content digest. `follow_fit`: the per-user fit settings the follow stage fits the population with
    (the personalize section's; hashed only when the follow stage is on)."""
    from latentpref.tasks.models import precision
    exclude = {"num_workers", "use_gpu", "checkpoint_every", "max_failures", "threads_per_worker"}
    if cfg.latent_type == "gaussian":
        exclude |= DISCRETE_FIELDS
    # encoder options added later are hashed only when on, so CLaPs trained before they existed keep their version
    if not cfg.pool_tokens:
        exclude.add("pool_tokens")
    if cfg.bow_weight == 0:
        exclude |= {"bow_weight", "bow_lr"}
    if cfg.latent_type == "discrete" or cfg.preference_weight == 0:
        exclude |= PREFERENCE_FIELDS
    if cfg.latent_type == "discrete" or cfg.preference_dims == 0:
        exclude |= SPACE_FIELDS
    if cfg.preference_only_share == 0:
        exclude.add("preference_only_share")
    if not _follow_on(cfg):
        exclude |= FOLLOW_FIELDS
    from latentpref.tasks.models.clap import ADAPTER_LAYOUT
    inputs = {"pretrain": cfg.model_dump(exclude=exclude), "base": data.base_model_version, "layout": ADAPTER_LAYOUT,
              "prompts": data.prompts.digest, "candidates": data.candidates.digest, "pt": data_cfg.prompt_tokens,
              "rt": data_cfg.response_tokens,
              # bf16 and fp32 training give different weights: the precision is part of what a CLaP is
              "lm_dtype": str(precision.lm_dtype(_train_device(cfg))).removeprefix("torch.")}
    if _follow_on(cfg):
        if follow_fit is None:
            raise ValueError("pretrain.follow_steps > 0 needs the per-user fit settings (follow_fit) it fits the "
                             "population users with")
        inputs["follow_fit"] = follow_fit
    if _uses_pairs(cfg):
        inputs["pairs"] = data.pairs.digest
        inputs["users"] = data.users.digest   # which users' pairs it reads (their groups)
    return json_digest(inputs)


def _final_metrics(history: list[dict]) -> dict[str, float]:
    """The last stage-1/2 row (the CLaP's NLL, KL, active units: what the night reports), plus the last follow-stage
    row's own metrics (`follow_*`) when stage 3 ran."""
    numeric = lambda row: {k: v for k, v in row.items() if isinstance(v, (int, float))}  # noqa: E731
    clap_rows = [r for r in history if r.get("stage", 1) < 3]
    final = numeric(clap_rows[-1]) if clap_rows else {}
    follow_rows = [r for r in history if r.get("stage") == 3]
    if follow_rows:
        final.update({k: v for k, v in numeric(follow_rows[-1]).items() if k.startswith("follow_")})
        final["follow_steps"] = len(follow_rows)
    return final


def _register_clap(local_dir: str, *, version: str, run_id: str, base_model_version: str) -> int:
    """Log the saved CLaP folder as a LoggedModel of the run `run_id` and register it as a new version of
    `CLAP_MODEL_NAME`; returns the version number. (MLflow 3 registers `runs:/...` URIs only for logged models,
    so a plain artifact folder goes through `initialize_logged_model` + `log_model_artifacts`.)"""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    client = mlflow.MlflowClient()
    tags = {"clap_version": version, "base_model_version": base_model_version}
    model = mlflow.initialize_logged_model(name="clap", source_run_id=run_id, tags=tags, model_type="clap")
    try:
        client.log_model_artifacts(model.model_id, local_dir)
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    registered = mlflow.register_model(f"models:/{model.model_id}", CLAP_MODEL_NAME, tags=tags)
    return int(registered.version)


def _registered_version(version: str) -> int | None:
    """Latest registered version of `CLAP_MODEL_NAME` whose `clap_version` tag is this digest, if any."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().search_model_versions(
            f"name = '{CLAP_MODEL_NAME}' and tag.clap_version = '{version}'")
    except MlflowException:   # no such registered model yet
        return None
    return max((int(v.version) for v in found), default=None)


def _tag_model_version(model_version: int, parent_run_id: str) -> None:
    import mlflow
    mlflow.set_tag("clap_model_version", str(model_version))
    mlflow.MlflowClient().set_tag(parent_run_id, "clap_model_version", str(model_version))


def _perplexity(counts: list[float]) -> float:
    """exp(entropy) of code counts: the effective number of codes in use (lpc.md §6.3 collapse detector)."""
    import torch

    from latentpref.tasks.models.lpc import code_usage_perplexity
    return float(code_usage_perplexity(torch.tensor(counts, dtype=torch.float64))) if sum(counts) else 0.0


def _prefix_init(cfg: PretrainConfig, data_cfg: DataConfig) -> str:
    """auto: anchor the adapter on pretrained bases, the spec's random init on the random tiny ones."""
    from latentpref.tasks.models.registry import TINY_SPECS
    if cfg.prefix_init != "auto":
        return cfg.prefix_init
    return "random" if data_cfg.base_model in TINY_SPECS else "anchor"


def _train_device(cfg: PretrainConfig) -> str:
    import ray
    if cfg.use_gpu == "auto" and not ray.is_initialized():
        return "cpu"   # read without a Ray session (lineage, report): GPUs are only known inside one
    return "cuda" if _use_gpu(cfg.use_gpu) else "cpu"


def _use_gpu(setting: str) -> bool:
    if setting in ("true", "false"):
        return setting == "true"
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


# test-only fault injection, never set in production: extra PretrainJob fields (e.g. {"fail_at_step": 3}) that a
# test sets with monkeypatch.setitem(pipelines.pretrain.TEST_FAULT, ...), instead of a parameter of the flow
TEST_FAULT: dict = {}


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_stage(cfg: PretrainConfig, data_cfg: DataConfig, data: DataArtifacts, store: Store,
                   parent_run_id: str, follow_fit: dict | None = None) -> ClapArtifact:
    """`follow_fit`: `FitSettings.gaussian()` of the night's personalize section (the follow stage fits the
    population users as the night will fit a user); required when `cfg.follow_steps` > 0."""
    import mlflow

    from latentpref.tasks.train.pretrain import CODE_USAGE_FILE, PretrainJob, run_pretrain
    logger = get_run_logger()
    version = clap_version(cfg, data_cfg, data, follow_fit)
    folder = ("models", "clap", version)
    with mlflow.start_run(run_name="pretrain", parent_run_id=parent_run_id, nested=True):
        mlflow.set_tags({"clap_version": version, "base_model_version": data.base_model_version})
        tracking.log_params(tracking.flatten("pretrain", cfg))
        tracking.log_table_input(data.candidates.url(store), name="candidates", digest=data.candidates.digest,
                                 context="training", rows=data.candidates.rows)
        run_id = mlflow.active_run().info.run_id
        done = stage_done(store, *folder)
        if done:
            mlflow.set_tag("skipped", "true")
            # the registry may be another tracking server than the one of the training night: look the digest
            # up there, and register the stored folder only if this registry has never seen it
            model_version = _registered_version(version)
            if model_version is None:
                model_version = _register_clap(store.local_copy(*folder), version=version, run_id=run_id,
                                               base_model_version=data.base_model_version)
            _tag_model_version(model_version, parent_run_id)
            logger.info("pretrain: CLaP %s already trained (%s version %d), skipped", version, CLAP_MODEL_NAME,
                        model_version)
            store.write_json({"version": version}, "models", "clap", "current.json")
            read = done.get("read_pairs", _uses_pairs(cfg))   # manifests from before the field: the settings say it
            return ClapArtifact(version, folder, done.get("final_metrics", {}), skipped=True, read_pairs=read,
                                model_name=CLAP_MODEL_NAME, model_version=model_version)
        use_gpu = _use_gpu(cfg.use_gpu)
        prefix_init = _prefix_init(cfg, data_cfg)
        job = PretrainJob(store_root=store.root, base_model_path="/".join(data.base_model_path),
                          prompts_path=list(data.prompts.path), candidates_path=list(data.candidates.path),
                          prompt_tokens=data_cfg.prompt_tokens, response_tokens=data_cfg.response_tokens,
                          pairs_path=list(data.pairs.path) if _uses_pairs(cfg) else None,
                          users_path=list(data.users.path) if _uses_pairs(cfg) else None,
                          prefix_init=prefix_init,
                          # auto: standardise the encoder's features exactly where the adapter is anchored
                          feature_norm=(prefix_init == "anchor" if cfg.feature_norm is None
                                        else cfg.feature_norm),
                          threads_per_worker=cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.num_workers),
                          **cfg.model_dump(include={"latent_dim", "n_query", "n_prefix", "encoder_layers", "anchor_scale", "adapter_lr", "pool_tokens",
                                                    "bow_weight", "bow_lr",
                                                    "stage1_steps", "stage2_steps", "prompts_per_batch",
                                                    "responses_per_prompt", "lr", "kl_samples", "kl_weight",
                                                    "contrastive_weight", "max_grad_norm", "checkpoint_every", "seed",
                                                    *DISCRETE_FIELDS, *PREFERENCE_FIELDS, *SPACE_FIELDS,
                                                    *FOLLOW_FIELDS}),
                          follow_fit=follow_fit if _follow_on(cfg) else None,
                          **TEST_FAULT)
        logger.info("pretrain: CLaP %s on Ray Train, %d workers, gpu=%s, %d+%d steps", version, cfg.num_workers,
                    use_gpu, cfg.stage1_steps, cfg.stage2_steps)
        result = run_pretrain(job, storage_path=store.url("ray_train"), name=f"clap-{version}",
                              num_workers=cfg.num_workers, use_gpu=use_gpu, max_failures=cfg.max_failures)
        if result.checkpoint is None:
            raise RuntimeError(f"CLaP pretraining {version} finished without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as d:
            # rank 0's history: every worker computes the same metrics on its shard; only rank 0 checkpoints
            history = json.loads(open(os.path.join(d, "history.json")).read())
            usage_file = os.path.join(d, CODE_USAGE_FILE)
            code_usage = json.loads(open(usage_file).read()) if os.path.exists(usage_file) else None
            with tempfile.TemporaryDirectory() as out:
                import shutil
                shutil.copytree(os.path.join(d, "clap"), out, dirs_exist_ok=True)
                store.upload_folder(out, *folder)
                model_version = _register_clap(out, version=version, run_id=run_id,
                                               base_model_version=data.base_model_version)
        tracking.log_history(history, prefix="")
        final = _final_metrics(history)
        extra = {}
        if code_usage is not None:
            # discrete: argmax-code counts over the training candidates (report: code-usage section) and the
            # soft (expected) usage; their perplexities are the collapse detectors of the final CLaP
            extra = {"latent_type": "discrete", "code_usage": code_usage["argmax"],
                     "code_usage_expected": code_usage["expected"]}
            mlflow.log_metrics({"candidate_code_usage_perplexity": _perplexity(code_usage["argmax"]),
                                "candidate_expected_code_perplexity": _perplexity(code_usage["expected"])})
        # the manifest is written last: it marks the stage done (stage_done)
        store.write_json({**extra, "version": version, "final_metrics": final, "history": history,
                          "ray_train_path": result.path, "base_model_path": list(data.base_model_path),
                          "base_model_version": data.base_model_version, "prompt_tokens": data_cfg.prompt_tokens,
                          "response_tokens": data_cfg.response_tokens, "clap_model_name": CLAP_MODEL_NAME,
                          "clap_model_version": model_version, "read_pairs": _uses_pairs(cfg)}, *folder, MANIFEST)
        store.write_json({"version": version}, "models", "clap", "current.json")
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in final.items()})
        _tag_model_version(model_version, parent_run_id)
        logger.info("pretrain: done, nll/token %.3f, kl %.3f, active units %d, %.0f tokens/s; registered %s "
                    "version %d", final.get("nll_per_token", 0), final.get("kl", 0),
                    int(final.get("active_units", 0)), final.get("tokens_per_s", 0), CLAP_MODEL_NAME, model_version)
    return ClapArtifact(version, folder, final, model_name=CLAP_MODEL_NAME, model_version=model_version,
                        read_pairs=_uses_pairs(cfg))
