"""prepare stage as a Prefect task: logs the produced tables as MLflow dataset inputs."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import tracking
from latentpref.pipelines.config import DataConfig
from latentpref.tasks.data.prepare import DataArtifacts, prepare_data
from latentpref.tasks.data.store import Store


@task(name="prepare", cache_policy=NO_CACHE)   # skipping is by content digest in the store (manifests)
def prepare_stage(cfg: DataConfig, store: Store, parent_run_id: str) -> DataArtifacts:
    import mlflow
    logger = get_run_logger()
    with mlflow.start_run(run_name="prepare", parent_run_id=parent_run_id, nested=True):
        tracking.log_params(tracking.flatten("data", cfg))
        def progress(stage: str, done: int, total: int) -> None:
            if done == total or done % max(total // 10, 1) == 0:   # about every 10%
                logger.info("prepare/%s %d/%d", stage, done, total)
        data = prepare_data(cfg, store, progress=progress)
        for name, ref in (("prompts", data.prompts), ("candidates", data.candidates), ("pairs", data.pairs),
                          ("users_hidden", data.users)):
            tracking.log_table_input(ref.url(store), name=name, digest=ref.digest, context="output",
                                     rows=ref.rows)
        mlflow.set_tags({"base_model_version": data.base_model_version, "skipped": ",".join(data.skipped)})
        if data.scorer.get("sst2_test_accuracy") is not None:
            mlflow.log_metric("scorer_sst2_test_accuracy", data.scorer["sst2_test_accuracy"])
        mlflow.log_metrics({f"seconds_{k}": v for k, v in data.timings_s.items()}
                           | {"rows_prompts": data.prompts.rows, "rows_candidates": data.candidates.rows,
                              "rows_pairs": data.pairs.rows, "rows_users": data.users.rows})
    logger.info("prepare: %d prompts, %d candidates, %d users, %d pairs (skipped: %s)", data.prompts.rows,
                data.candidates.rows, data.users.rows, data.pairs.rows, ", ".join(data.skipped) or "none")
    return data
