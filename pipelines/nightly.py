"""The nightly flow: prepare -> pretrain (Ray Train) -> personalize (Ray fan-out) -> evaluate -> report."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from prefect import flow, get_run_logger

from latentpref.pipelines import console, runs, tracking
from latentpref.pipelines.config import STAGES, NightlyConfig, Stage
from latentpref.pipelines.evaluate import evaluate_stage
from latentpref.pipelines.memory import MemoryWatch
from latentpref.pipelines.personalize import personalize_stage
from latentpref.pipelines.prepare import prepare_stage
from latentpref.pipelines.pretrain import pretrain_stage
from latentpref.pipelines.report import finalize_report, report_stage
from latentpref.pipelines.runtime import apply_precision, mlflow_uris, open_store, ray_session, setup_mlflow
from latentpref.tasks.data.locks import store_lock

log = logging.getLogger(__name__)


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
    stage_seconds: dict = field(default_factory=dict)
    stage_peak_mem_mb: dict = field(default_factory=dict)   # pipelines/memory.py: whole-machine used memory
    status: str = "RUNNING"
    log_path: str | None = None
    quality: dict = field(default_factory=dict)      # runs.headline(): latent DPO and the best baseline


class NightFailed(RuntimeError):
    """A stage of the night raised: which one, the first real error (not a Ray wrapper), and where to look.
    The original exception is the `__cause__`."""

    def __init__(self, report: NightlyReport, stage: str, error: str):
        super().__init__(f"stage {stage} failed: {error}")
        self.report, self.stage, self.error = report, stage, error

    def __reduce__(self):   # picklable with its fields (Prefect may serialise a flow's exception)
        return (type(self), (self.report, self.stage, self.error))


def _stage_line(name: str, result, report: NightlyReport) -> str:
    """The operator's one summary line of a finished stage."""
    if name == "prepare":
        skipped = "all stored" if len(result.skipped) >= 5 else (
            f"stored: {', '.join(result.skipped)}" if result.skipped else "all built")
        return (f"{result.prompts.rows} prompts, {result.users.rows} users, {result.pairs.rows} pairs ({skipped})")
    if name == "pretrain":
        if result.skipped:
            return f"CLaP {result.version} stored (model version {result.model_version}), skipped"
        nll = result.final_metrics.get("nll_per_token")
        return f"CLaP {result.version} trained" + (f", nll/token {nll:.3f}" if nll is not None else "") + \
            f", model version {result.model_version}"
    if name == "personalize":
        u = report.users
        return f"{u['total']} users: {u['fitted']} fitted, {u['unchanged']} unchanged, {u['cold_start']} cold start"
    if name == "evaluate":
        q = report.quality
        text = f"{len(result.users)} users"
        if q.get("latent_dpo"):
            p = q["latent_dpo"]
            text += f", latent_dpo {q['label']} {p['value']:.3f}"
            if p.get("lo") is not None:
                text += f" [{p['lo']:.3f}, {p['hi']:.3f}]"
        personal = q.get("personal", {})
        if personal.get("win_rate_vs_base", {}).get("value") is not None:
            text += f", vs base LM {personal['win_rate_vs_base']['value']:.3f}"
        if personal.get("own_vs_swapped", {}).get("value") is not None:
            text += f", own vs swapped {personal['own_vs_swapped']['value']:.3f}"
        if q.get("best_baseline"):
            b = q["best_baseline"]
            text += f"; best baseline {b['method']} {b['value']:.3f}"
        groups = q.get("groups") or {}
        if groups:
            text += " | " + ", ".join(f"{g} {v['win_rate']:.2f}" for g, v in groups.items() if "win_rate" in v)
        return text
    return str(result)


@flow(name="nightly", log_prints=False)
def nightly(cfg: NightlyConfig, until: Stage = "report") -> NightlyReport:
    """Run the chain up to and including `until`. Finished stages are skipped by content digest.

    Raises:
        NightFailed: a stage raised (the night's MLflow run is FAILED, tagged with the stage and the error).
    """
    import mlflow
    logger = get_run_logger()
    t0 = time.perf_counter()
    store = open_store(cfg.runtime)
    exp_id = setup_mlflow(cfg.runtime, store)
    apply_precision(cfg.runtime)   # this process's LM precision (prepare runs here); ray_session passes it on
    stop = STAGES.index(until)
    screen = console.current()
    # prepare alone needs no Ray; every later stage does
    ray_ctx = ray_session(cfg.runtime) if stop >= 1 else contextlib.nullcontext()
    report: NightlyReport | None = None
    failure: tuple[str, BaseException] | None = None
    with store_lock(store, "nightly"), ray_ctx, MemoryWatch() as memory:
        try:
            with mlflow.start_run(run_name=cfg.runtime.run_name or f"nightly-{cfg.preset}") as parent:
                run_id = parent.info.run_id
                report = NightlyReport(run_id, exp_id, mlflow.get_tracking_uri(), store.url(), [], 0.0)
                report.log_path = console.attach_run(store, run_id)
                mlflow.set_tags({"preset": cfg.preset, "flow": "nightly", "until": until})
                tracking.log_params({**tracking.flatten("runtime", cfg.runtime), "preset": cfg.preset})
                if screen is not None:
                    screen.line(f"latentpref {'nightly' if until == 'report' else until}: MLflow run {run_id}, "
                                f"store {store.url()}")
                current = ["prepare"]

                def stage(name: str, fn, *args, **kwargs):
                    current[0] = name
                    t = time.perf_counter()
                    try:
                        with memory.stage(name):
                            result = fn(*args, **kwargs)
                    finally:   # a failed stage's time counts too (not in stages_run)
                        seconds = time.perf_counter() - t
                        report.stage_seconds[name] = seconds
                        mlflow.log_metric(f"stage_seconds_{name}", seconds)
                        if name in memory.peaks_mb:   # the machine's used memory at its peak while the stage ran
                            report.stage_peak_mem_mb[name] = memory.peaks_mb[name]
                            mlflow.log_metric(f"stage_peak_mem_mb_{name}", memory.peaks_mb[name])
                    report.stages_run.append(name)
                    return result, seconds

                try:
                    data, s = stage("prepare", prepare_stage, cfg.data, store, run_id)
                    mlflow.set_tags({"base_model_version": data.base_model_version,
                                     "pairs_digest": data.pairs.digest})
                    _say(screen, "prepare", s, data, report)
                    if stop >= 1:
                        clap, s = stage("pretrain", pretrain_stage, cfg.pretrain, cfg.data, data, store, run_id,
                                        cfg.personalize.fit_settings().gaussian())
                        report.clap_version = clap.version
                        mlflow.set_tag("clap_version", clap.version)
                        _say(screen, "pretrain", s, clap, report)
                    if stop >= 2:
                        fits, s = stage("personalize", personalize_stage, cfg.personalize, cfg.data, data, clap,
                                        store, run_id)
                        report.users = {"total": fits.n_users, "fitted": fits.n_fitted,
                                        "unchanged": fits.n_unchanged, "cold_start": fits.n_cold_start}
                        mlflow.log_metrics({f"users_{k}": v for k, v in report.users.items()})
                        _say(screen, "personalize", s, fits, report)
                    if stop >= 3:
                        evaluation, s = stage("evaluate", evaluate_stage, cfg.evaluate, cfg.data, cfg.personalize,
                                              data, clap, fits, store, run_id)
                        report.comparison = evaluation.comparison
                        metric, quality = runs.quality_metrics(evaluation.comparison, evaluation.by_group)
                        mlflow.set_tag("quality_metric", metric)
                        if quality:
                            mlflow.log_metrics(quality)
                        report.quality = runs.headline(quality, metric)
                        _say(screen, "evaluate", s, evaluation, report)
                    if stop >= 4:
                        report.report_path, s = stage("report", report_stage, store, run_id)
                        _say(screen, "report", s, "HTML report rendered", report)
                    # deletion requests served while this night held the store (DELETE /v1/users): purged now
                    from latentpref.tasks.policy.forget import purge_pending
                    try:
                        purged = purge_pending(store, mlflow.get_tracking_uri())
                        if purged:
                            mlflow.log_metric("users_forgotten", purged)
                    except Exception:   # the tombstones already keep them out; the purge stays queued
                        log.exception("purging forgotten users failed; `latentpref forget` finishes it")
                except BaseException as err:
                    failure = (current[0], err)
                    error = runs.describe_error(err)
                    mlflow.set_tags({"failed_stage": current[0], "error": error[:500],
                                     "error_type": type(runs.root_cause(err)).__name__})
                    log.exception("nightly: stage %s failed: %s", current[0], error)
                    raise
                finally:
                    report.seconds = time.perf_counter() - t0
                    mlflow.log_metric("nightly_seconds", report.seconds)
                    report.status = "FAILED" if failure else "FINISHED"
                    store.write_json(report.__dict__, "runs", run_id, "nightly_report.json")
        except BaseException as err:
            if report is None or failure is None or not isinstance(err, Exception):   # Ctrl-C: stop now
                raise
            report.report_path = _finalize(store, report, failure) or report.report_path
            raise NightFailed(report, failure[0], runs.describe_error(err)) from err
        report.report_path = _finalize(store, report, None) or report.report_path
    logger.info("nightly done in %.1fs: MLflow run %s (%s), store %s", report.seconds, report.run_id,
                mlflow_uris(cfg.runtime, store)[0], store.url())
    return report


def _say(screen, name: str, seconds: float, result, report: NightlyReport) -> None:
    if screen is not None:
        screen.stage_done(name, seconds, _stage_line(name, result, report))


def _finalize(store, report: NightlyReport, failure: tuple[str, BaseException] | None) -> str | None:
    """After the night's MLflow run has ended: its report shows the final state (status, duration, per-stage
    times; the failed stage and error), the across-nights page includes tonight, the log goes to MLflow.
    Best effort: a night's outcome never depends on its report. Returns the report's URL, if any."""
    url = None
    try:
        url = finalize_report(store, report.run_id, failed=failure is not None)
    except Exception:  # noqa: BLE001
        log.exception("nightly: the final report of run %s could not be written", report.run_id)
    where = console.ship_log(store, report.run_id)
    if where:
        report.log_path = where
    return url
