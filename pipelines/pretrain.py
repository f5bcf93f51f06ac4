"""pretrain stage: CLaP on Ray Train, stored as a versioned model folder and logged to MLflow."""
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


@dataclass(frozen=True)
class ClapArtifact:
    version: str
    path: tuple[str, ...]           # store folder holding the CLaP model (save_clap layout)
    final_metrics: dict[str, float]
    skipped: bool = False


def clap_version(cfg: PretrainConfig, data_cfg: DataConfig, data: DataArtifacts) -> str:
    settings = cfg.model_dump(exclude={"num_workers", "use_gpu", "checkpoint_every", "max_failures"})
    return json_digest({"pretrain": settings, "base": data.base_model_version, "prompts": data.prompts.digest,
                        "candidates": data.candidates.digest, "pt": data_cfg.prompt_tokens,
                        "rt": data_cfg.response_tokens})


def _use_gpu(setting: str) -> bool:
    if setting in ("true", "false"):
        return setting == "true"
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_stage(cfg: PretrainConfig, data_cfg: DataConfig, data: DataArtifacts, store: Store,
                   parent_run_id: str, fault: dict | None = None) -> ClapArtifact:
    import mlflow

    from latentpref.tasks.train.pretrain import PretrainJob, run_pretrain
    logger = get_run_logger()
    version = clap_version(cfg, data_cfg, data)
    folder = ("models", "clap", version)
    with mlflow.start_run(run_name="pretrain", parent_run_id=parent_run_id, nested=True):
        mlflow.set_tags({"clap_version": version, "base_model_version": data.base_model_version})
        tracking.log_params(tracking.flatten("pretrain", cfg))
        tracking.log_table_input(data.candidates.url(store), name="candidates", digest=data.candidates.digest,
                                 context="training", rows=data.candidates.rows)
        done = stage_done(store, *folder)
        if done:
            logger.info("pretrain: CLaP %s already trained, skipped", version)
            mlflow.set_tag("skipped", "true")
            store.write_json({"version": version}, "models", "clap", "current.json")
            return ClapArtifact(version, folder, done.get("final_metrics", {}), skipped=True)
        use_gpu = _use_gpu(cfg.use_gpu)
        job = PretrainJob(store_root=store.root, base_model_path="/".join(data.base_model_path),
                          prompts_path=list(data.prompts.path), candidates_path=list(data.candidates.path),
                          prompt_tokens=data_cfg.prompt_tokens, response_tokens=data_cfg.response_tokens,
                          **cfg.model_dump(include={"latent_dim", "n_query", "n_prefix", "encoder_layers",
                                                    "stage1_steps", "stage2_steps", "prompts_per_batch",
                                                    "responses_per_prompt", "lr", "kl_samples", "kl_weight",
                                                    "contrastive_weight", "checkpoint_every", "seed"}),
                          **(fault or {}))
        logger.info("pretrain: CLaP %s on Ray Train, %d workers, gpu=%s, %d+%d steps", version, cfg.num_workers,
                    use_gpu, cfg.stage1_steps, cfg.stage2_steps)
        result = run_pretrain(job, storage_path=store.url("ray_train"), name=f"clap-{version}",
                              num_workers=cfg.num_workers, use_gpu=use_gpu, max_failures=cfg.max_failures)
        if result.checkpoint is None:
            raise RuntimeError(f"CLaP pretraining {version} finished without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as d:
            history = json.loads(open(os.path.join(d, "history.json")).read())
            with tempfile.TemporaryDirectory() as out:
                import shutil
                shutil.copytree(os.path.join(d, "clap"), out, dirs_exist_ok=True)
                store.upload_folder(out, *folder)
        tracking.log_history(history, prefix="")
        final = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
        store.write_json({"version": version, "final_metrics": final, "history": history,
                          "ray_train_path": result.path, "base_model_path": list(data.base_model_path),
                          "base_model_version": data.base_model_version, "prompt_tokens": data_cfg.prompt_tokens,
                          "response_tokens": data_cfg.response_tokens}, *folder, MANIFEST)
        store.write_json({"version": version}, "models", "clap", "current.json")
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in final.items()})
        logger.info("pretrain: done, nll/token %.3f, kl %.3f, active units %d", final.get("nll_per_token", 0),
                    final.get("kl", 0), int(final.get("active_units", 0)))
    return ClapArtifact(version, folder, final)
