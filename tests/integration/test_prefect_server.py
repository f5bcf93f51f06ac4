"""The nightly deployment run through a real Prefect server, as production runs it (issue #9).

The test starts `prefect server start` on loopback (own PREFECT_HOME, sqlite), serves the real deployment
object of `pipelines/deploy.py:build_deployment()` from a runner process (`prefect.serve`, which starts each
flow run as `python -m prefect.engine` from the deployment's entrypoint, like a worker does), asks the server
for a run with `run_deployment`, and reads back from the server's API: the run COMPLETED, it carries the
deployment's parameters, and the nightly subflow recorded every stage as a task run.

The night is the tiny preset made smaller still (tests/services.py NIGHT_OVERRIDES): every stage runs for
real, with a local Ray and sqlite MLflow inside a temp folder. Every process is stopped by PID (process
group of its own session) in the fixtures' teardown; the wall time goes to the log, never into an assertion.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from services import HOST, NIGHT_OVERRIDES, Process, free_port, stop_pid_tree, tail, wait_for

from latentpref.pipelines import deploy
from latentpref.pipelines.nightly import STAGES

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "nightly-it"            # not the production name: nothing here may look like the real schedule
RUN_TIMEOUT_S = 1500                 # a hang fails the test instead of blocking CI (about 5 min when loaded)


def _server_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # the server's scheduler would pre-create the cron's future runs: only the run we ask for may exist
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port; yields its API URL; stopped by PID (and descendants)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    exe = Path(sys.executable).parent / "prefect"
    cmd = [str(exe) if exe.exists() else "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    server = Process("prefect-server", cmd, _server_env(home), home / "server.log")
    t0 = time.monotonic()
    server.start()
    url = f"http://{HOST}:{port}/api"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, timeout_s=180,
                 what="prefect server", proc=server.proc, log_path=server.log_path, poll_s=0.5)
        log.warning("prefect server up at %s in %.1f s", url, time.monotonic() - t0)
        yield url, home, server
    finally:
        server.stop(timeout_s=30)


@pytest.fixture(scope="module")
def night_params(tmp_path_factory):
    """The deployment's parameters: tiny night, everything inside a temp folder, local Ray."""
    root = tmp_path_factory.mktemp("prefect-night")
    return {
        "preset": "tiny",
        "store": str(root / "store"),
        "mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "overrides": [*NIGHT_OVERRIDES, "runtime.ray_num_cpus=2", "runtime.mlflow_experiment=it-prefect-server"],
        "until": "report",
    }


_SERVE = """
import json, sys
from prefect import serve
from latentpref.pipelines.deploy import build_deployment
serve(build_deployment(name=sys.argv[1], parameters=json.loads(sys.argv[2])), limit=1,
      print_starting_message=False)
"""


@pytest.fixture(scope="module")
def runner(prefect_server, night_params, tmp_path_factory):
    """A runner process serving the real deployment object; cwd = repository root, where the deployment's
    relative entrypoint resolves (as for a worker). Stopped by PID, with the flow runs it started."""
    url, home, _ = prefect_server
    work = tmp_path_factory.mktemp("prefect-runner")
    env = _server_env(home)
    env.update({
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(work / "home"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",     # pick the run up quickly (default 10 s)
        "PREFECT_LOGGING_LEVEL": "INFO",          # flow/task logs (progress lines) go to the server
        "MLFLOW_TRACKING_URI": night_params["mlflow_tracking_uri"],   # nothing may default into the repo
        "RAY_AUTH_MODE": "disabled",              # a private local Ray (ECOSYSTEM.md §2)
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    })
    log_path = work / "runner.log"
    with open(log_path, "ab") as fh:   # own session: stopped below by PID, never by a signal to our group
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, DEPLOYMENT, json.dumps(night_params)], env=env,
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc, log_path
    finally:
        stop_pid_tree(proc, timeout_s=60)   # SIGTERM lets the runner cancel its flow run first


def _read_deployment(url: str, name: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 180):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def registered() -> bool:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            found["dep"] = client.read_deployment_by_name(f"{deploy.FLOW_NAME}/{name}")
            return True

    found: dict = {}
    wait_for(registered, timeout_s=timeout_s, what="deployment registered by the runner", proc=proc,
             log_path=log_path, poll_s=1.0)
    return found["dep"]


def test_nightly_deployment_runs_through_a_prefect_server(prefect_server, runner, night_params):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, _, _ = prefect_server
    runner_proc, runner_log = runner
    dep = _read_deployment(url, DEPLOYMENT, runner_proc, runner_log)
    assert dep.entrypoint == deploy.ENTRYPOINT
    assert dep.parameters == night_params
    assert dep.schedules and dep.schedules[0].schedule.cron == deploy.CRON

    with temporary_settings({PREFECT_API_URL: url}):
        t0 = time.monotonic()
        flow_run = run_deployment(dep.id, timeout=0)   # create the run; the runner picks it up
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                flow_run = client.read_flow_run(flow_run.id)
                if flow_run.state is not None and flow_run.state.is_final():
                    break
                assert runner_proc.poll() is None, f"the runner died; log tail:\n{tail(runner_log)}"
                assert time.monotonic() < deadline, (
                    f"flow run still {flow_run.state.type if flow_run.state else None} after {RUN_TIMEOUT_S}s; "
                    f"runner log tail:\n{tail(runner_log)}")
                time.sleep(2)
            wall_s = time.monotonic() - t0
            # timing is reported, never asserted (shown with `-o log_cli=true` or on failure)
            log.warning("nightly through the Prefect server: %.1f s wall (request -> final state), flow run "
                        "%.1f s (server's total_run_time)", wall_s, flow_run.total_run_time.total_seconds())

            assert flow_run.state.is_completed(), (
                f"state {flow_run.state.type}: {flow_run.state.message}; runner log tail:\n{tail(runner_log)}")
            assert flow_run.deployment_id == dep.id
            assert flow_run.parameters == night_params

            (sub,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
            assert client.read_flow(sub.flow_id).name == "nightly"
            assert sub.state.is_completed()
            tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[sub.id])))
            names = {t.name.rsplit("-", 1)[0] for t in tasks}   # task run names are "<task>-<suffix>"
            assert set(STAGES) <= names, names
            assert all(t.state.is_completed() for t in tasks), [(t.name, t.state.type) for t in tasks]

            # the progress lines of the stages reached the server's log store
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[sub.id])), limit=200)
            assert any(entry.message.startswith("prepare:") for entry in logs), [e.message for e in logs][:20]

    store = Path(night_params["store"])
    assert list((store / "runs").glob("*/report/index.html")), "the night's HTML report is missing"
