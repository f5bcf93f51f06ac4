"""MLflow helpers used by the flows (tasks never log; they return metrics, STYLE.md §5).

Credential hygiene: params are flattened from configs that hold no secrets (credentials come from the
environment), and `safe_value` redacts anything that looks like a key or a URL with userinfo anyway.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key)", re.I)
_URL_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def safe_value(key: str, value: Any) -> str:
    if _SECRET_KEY.search(key):
        return "***"
    return _URL_USERINFO.sub(r"\1***@", str(value))[:500]


def flatten(prefix: str, obj: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    else:
        out[prefix] = safe_value(prefix, obj)
    return out


def log_params(params: dict[str, Any]) -> None:
    import mlflow
    items = {k: safe_value(k, v) for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 90):   # MLflow batches at most 100 params per call
        mlflow.log_params({k: items[k] for k in keys[i:i + 90]})


def log_table_input(url: str, *, name: str, digest: str, context: str, rows: int | None = None) -> None:
    """Record a Parquet table as a run input (name, digest, source URI): MLflow dataset lineage."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    import warnings
    with warnings.catch_warnings():   # local paths match two equivalent source classes; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(url)
    ds = MetaDataset(source=source, name=name, digest=digest)
    tags = {"rows": str(rows)} if rows is not None else None
    mlflow.log_input(ds, context=context, tags=tags)


def log_json_artifact(obj: Any, name: str, artifact_path: str | None = None) -> None:
    import mlflow
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_table_artifact(table, name: str, artifact_path: str | None = None) -> None:
    """A pyarrow table as Parquet + CSV artifacts (CSV so it opens in the MLflow UI)."""
    import mlflow
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(table, str(Path(d) / f"{name}.parquet"))
        pacsv.write_csv(table, str(Path(d) / f"{name}.csv"))
        mlflow.log_artifact(str(Path(d) / f"{name}.parquet"), artifact_path=artifact_path)
        mlflow.log_artifact(str(Path(d) / f"{name}.csv"), artifact_path=artifact_path)


def log_history(history: list[dict[str, float]], *, prefix: str = "") -> None:
    """Per-step metric rows (each with a `step`) as MLflow metric histories, in one batch per row."""
    import mlflow
    for row in history:
        step = int(row.get("step", 0))
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "step"}, step=step)
