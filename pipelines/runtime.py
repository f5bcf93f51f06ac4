"""Connections to the outside world, all chosen by configuration: store, Ray, MLflow.

Embedded defaults (no configuration): a local folder store, a local Ray started on demand, MLflow on sqlite
with a local artifact folder inside the store. The same code talks to s3://, a Ray cluster and an MLflow
server when `runtime.store`, `runtime.ray_address` and `runtime.mlflow_tracking_uri` say so.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from latentpref.pipelines.config import RuntimeConfig
from latentpref.tasks.data.store import Store

log = logging.getLogger(__name__)


def open_store(cfg: RuntimeConfig) -> Store:
    store = Store(cfg.store)
    if store.is_local:
        Path(store.url()).mkdir(parents=True, exist_ok=True)
    return store


def mlflow_uris(cfg: RuntimeConfig, store: Store) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    configured = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        artifact = None
        if configured.startswith(("sqlite:", "file:")) or "://" not in configured:
            artifact = store.url("mlflow", "artifacts") if not store.is_local else \
                Path(store.url("mlflow", "artifacts")).as_uri()
        return configured, artifact
    if store.is_local:
        folder = Path(store.url("mlflow"))
    else:  # an S3 store with no MLflow server configured: keep tracking in a local folder
        folder = Path.cwd() / "latentpref-mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = store.url("mlflow", "artifacts") if not store.is_local else (folder / "artifacts").as_uri()
    return f"sqlite:///{folder / 'mlflow.db'}", artifacts


def setup_mlflow(cfg: RuntimeConfig, store: Store) -> str:
    """Point MLflow at the configured tracking server and experiment; returns the experiment id."""
    import mlflow
    # MLflow >= 3 clients fetch artifacts through presigned S3 URLs signed with the server's credentials;
    # with temporary credentials the URL carries the session token into S3 request logs. Download via the
    # server instead (found by the credential-leak scan, tests/integration/test_distributed.py).
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    uri, artifact_location = mlflow_uris(cfg, store)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.mlflow_experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(cfg.mlflow_experiment, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def apply_precision(cfg: RuntimeConfig) -> str:
    """Make `runtime.lm_dtype` this process's LM precision (when set); returns the setting in force, which
    `ray_session` hands to every Ray worker."""
    from latentpref.tasks.models import precision
    if cfg.lm_dtype is not None:
        precision.set_setting(cfg.lm_dtype)
    return precision.setting()


@contextmanager
def ray_session(cfg: RuntimeConfig):
    """Connect to the configured Ray cluster, or start a local one; shut down only what we started."""
    import ray
    started = False
    if not ray.is_initialized():
        # no runtime_env secrets: workers inherit credentials from the node's environment (local Ray:
        # this process; a cluster: its nodes' own IAM/env), so keys never travel through Ray metadata
        from latentpref.tasks.models import precision
        # the LM precision is the only setting workers take from the driver's environment: every process of a
        # night computes alike, on a cluster too
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                      runtime_env={"env_vars": {precision.ENV_VAR: apply_precision(cfg)}})
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, **kwargs)
        else:
            # address="local": always a fresh private instance, never silently joining a cluster that
            # `ray start` left on this machine
            ray.init(address="local", num_cpus=cfg.ray_num_cpus,
                     object_store_memory=cfg.ray_object_store_mb * 1024 * 1024, **kwargs)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
