"""prepare stage as a Prefect task: logs the produced tables as MLflow dataset inputs."""
from __future__ import annotations

import time
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import console, tracking
from latentpref.pipelines.config import DataConfig
from latentpref.tasks.data.prepare import DataArtifacts, prepare_data
from latentpref.tasks.data.store import Store


def _eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _progress_logger(logger) -> Callable[[str, int, int], None]:
    """progress(stage, done, total) -> a log line about every 10% of a sub-step: done/total, elapsed, ETA.

    The clock of a sub-step starts at its first report (sub-steps with many items report done=0 at start).
    """
    started: dict[str, tuple[float, int]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        t0, done0 = started.setdefault(stage, (now, done))
        if not (done == total or done == done0 or done % max(total // 10, 1) == 0):
            return
        line = f"prepare/{stage} {done}/{total}"
        if total > 5 and done > done0:   # the item rate is known: elapsed and ETA
            rate = (now - t0) / (done - done0)
            line += f" ({done / total:.0%}, {_eta(now - t0)} elapsed, ETA {_eta(rate * (total - done))})"
        logger.info(line)
        console.progress("prepare", done, total, unit=stage)

    return progress


@task(name="prepare", cache_policy=NO_CACHE)   # skipping is by content digest in the store (manifests)
def prepare_stage(cfg: DataConfig, store: Store, parent_run_id: str) -> DataArtifacts:
    import mlflow
    logger = get_run_logger()
    with mlflow.start_run(run_name="prepare", parent_run_id=parent_run_id, nested=True):
        tracking.log_params(tracking.flatten("data", cfg))
        data = prepare_data(cfg, store, progress=_progress_logger(logger))
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
    logger.info("prepare: seconds per sub-step %s", ", ".join(f"{k}={v:.1f}" for k, v in data.timings_s.items()))
    return data
