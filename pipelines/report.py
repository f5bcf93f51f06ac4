"""report stage: render the static HTML dashboard of a run and store it (store + MLflow artifact)."""
from __future__ import annotations

import os
import tempfile

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.tasks.data.store import Store


def build_report(store: Store, run_id: str, out_dir: str) -> str:
    from latentpref.dashboards.report import render_report
    def maybe(*parts):
        return store.read_table(*parts) if store.exists(*parts) else None
    comparison = maybe("runs", run_id, "comparison.parquet")
    per_user = maybe("runs", run_id, "evaluation_per_user.parquet")
    history, lineage = [], {"mlflow_run_id": run_id}
    if store.exists("models", "clap", "current.json"):
        version = store.read_json("models", "clap", "current.json")["version"]
        manifest = store.read_json("models", "clap", version, "_manifest.json")
        history = manifest.get("history", [])
        lineage.update({"clap_version": version, "base_model_version": manifest.get("base_model_version", "")})
    return render_report(out_dir, run_id=run_id, comparison=comparison, per_user=per_user, history=history,
                         lineage=lineage)


@task(name="report", cache_policy=NO_CACHE)
def report_stage(store: Store, run_id: str) -> str:
    import mlflow
    logger = get_run_logger()
    with tempfile.TemporaryDirectory() as d:
        build_report(store, run_id, d)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as fh:
                store.write_bytes(fh.read(), "runs", run_id, "report", name)
        mlflow.MlflowClient().log_artifacts(run_id, d, artifact_path="report")
    url = store.url("runs", run_id, "report", "index.html")
    logger.info("report: %s", url)
    return url
