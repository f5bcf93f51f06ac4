"""The nightly flow: prepare -> pretrain (Ray Train) -> personalize (Ray fan-out) -> evaluate -> report."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from prefect import flow, get_run_logger

from latentpref.pipelines import tracking
from latentpref.pipelines.config import NightlyConfig
from latentpref.pipelines.evaluate import evaluate_stage
from latentpref.pipelines.personalize import personalize_stage
from latentpref.pipelines.prepare import prepare_stage
from latentpref.pipelines.pretrain import pretrain_stage
from latentpref.pipelines.report import report_stage
from latentpref.pipelines.runtime import mlflow_uris, open_store, ray_session, setup_mlflow
from latentpref.tasks.data.locks import store_lock

log = logging.getLogger(__name__)
Stage = Literal["prepare", "pretrain", "personalize", "evaluate", "report"]
STAGES: tuple[str, ...] = ("prepare", "pretrain", "personalize", "evaluate", "report")


@dataclass
class NightlyReport:
    run_id: str
    experiment_id: str
    tracking_uri: str
    store: str
    stages_run: list[str]
    seconds: float
    clap_version: str | None = None
    users: dict = field(default_factory=dict)
    comparison: list = field(default_factory=list)
    report_path: str | None = None


@flow(name="nightly", log_prints=False)
def nightly(cfg: NightlyConfig, until: Stage = "report", fault: dict | None = None) -> NightlyReport:
    """Run the chain up to and including `until`. Finished stages are skipped by content digest."""
    import mlflow
    logger = get_run_logger()
    t0 = time.perf_counter()
    store = open_store(cfg.runtime)
    exp_id = setup_mlflow(cfg.runtime, store)
    stop = STAGES.index(until)
    # prepare alone needs no Ray; every later stage does
    ray_ctx = ray_session(cfg.runtime) if stop >= 1 else contextlib.nullcontext()
    with store_lock(store, "nightly"), ray_ctx, \
            mlflow.start_run(run_name=cfg.runtime.run_name or f"nightly-{cfg.preset}") as parent:
        run_id = parent.info.run_id
        mlflow.set_tags({"preset": cfg.preset, "flow": "nightly", "until": until})
        tracking.log_params({**tracking.flatten("runtime", cfg.runtime), "preset": cfg.preset})
        report = NightlyReport(run_id, exp_id, mlflow.get_tracking_uri(), store.url(), [], 0.0)

        data = prepare_stage(cfg.data, store, run_id)
        report.stages_run.append("prepare")
        mlflow.set_tags({"base_model_version": data.base_model_version, "pairs_digest": data.pairs.digest})
        if stop >= 1:
            clap = pretrain_stage(cfg.pretrain, cfg.data, data, store, run_id, fault=(fault or {}).get("pretrain"))
            report.stages_run.append("pretrain")
            report.clap_version = clap.version
            mlflow.set_tag("clap_version", clap.version)
        if stop >= 2:
            fits = personalize_stage(cfg.personalize, cfg.data, data, clap, store, run_id)
            report.stages_run.append("personalize")
            report.users = {"total": fits.n_users, "fitted": fits.n_fitted, "unchanged": fits.n_unchanged,
                            "cold_start": fits.n_cold_start}
        if stop >= 3:
            evaluation = evaluate_stage(cfg.evaluate, cfg.data, cfg.personalize, data, clap, fits, store, run_id)
            report.stages_run.append("evaluate")
            report.comparison = evaluation.comparison
        if stop >= 4:
            report.report_path = report_stage(store, run_id)
            report.stages_run.append("report")
        report.seconds = time.perf_counter() - t0
        mlflow.log_metric("nightly_seconds", report.seconds)
        store.write_json(report.__dict__, "runs", run_id, "nightly_report.json")
    logger.info("nightly done in %.1fs: MLflow run %s (%s), store %s", report.seconds, run_id,
                mlflow_uris(cfg.runtime, store)[0], store.url())
    return report
