"""Test-session environment: isolated Prefect home and MLflow store, quiet offline defaults.

Set at import time, before any test module imports prefect or mlflow (they read these on import).
"""
import os
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="latentpref-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_SESSION_DIR, "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# MLflow's default is now sqlite:///mlflow.db in the CWD: never let a test write into the repo
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.join(_SESSION_DIR, 'mlflow.db')}")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# LM passes in fp32 unless a test asks for bf16: many tests compare numbers against fp32 references
os.environ.setdefault("LATENTPREF_LM_DTYPE", "fp32")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)   # oversubscribed threads were up to 9x slower next to Ray workers


@pytest.fixture(scope="session")
def session_dir() -> str:
    return _SESSION_DIR
