"""Real services for the distributed and fault tests: moto S3, a 2-node Ray cluster, an MLflow server.

Every service is a subprocess bound to 127.0.0.1 on free ports, with its output in a log file, and is
stopped by its own PID: SIGTERM, wait, then SIGKILL, then any of its descendants that outlived it (Ray's
`ray start --block` spawns gcs_server/raylet/workers), again each by PID. Nothing is killed by name.

The environment every process of a test night shares (`night_env`) is built once and given to the Ray
nodes *before* they start: Ray workers inherit the node's environment, not the driver's, so S3 endpoint
and credentials must be there from the beginning (ECOSYSTEM.md §2, §6).

A plain module (not a conftest): `tests/faults/conftest.py` and `tests/integration/conftest.py` share one
set of services per pytest session through `shared()` below.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
BUCKET = "latentpref"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def tail(path: Path | str, n_chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no log>"


def wait_for(ready: Callable[[], bool], *, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
             log_path: Path | None = None, poll_s: float = 0.2) -> None:
    """Poll `ready()` until true; fail naming the service, with its log tail, if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception:   # not up yet (connection refused, partial start)
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting; log tail:\n"
                               f"{tail(log_path) if log_path else ''}")
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s; log tail:\n{tail(log_path) if log_path else ''}")


def _descendants(pid: int) -> list:
    """psutil handles of a process's descendants (a handle refuses to signal a recycled PID)."""
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_pid_tree(proc: subprocess.Popen, *, timeout_s: float = 20.0) -> None:
    """Stop one process we started, by PID, then any descendants that outlived it, each by PID."""
    import psutil
    children = _descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    survivors = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in survivors:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(survivors, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class Process:
    """One service subprocess: command, environment, log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            # own session: a Ctrl-C on pytest must not reach the service before its fixture stops it
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.cmd))
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None:
            stop_pid_tree(self.proc, timeout_s=timeout_s)
            log.info("stopped %s (pid %d, rc %s)", self.name, self.proc.pid, self.proc.returncode)
            self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# -- environment -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Secrets:
    """Distinctive credential values: the security test scans every log and MLflow record for them."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    mlflow_token: str
    ray_token: str

    @classmethod
    def make(cls) -> "Secrets":
        h = secrets.token_hex(8)
        return cls(f"AKIALATENTPREF{h[:6].upper()}", f"sekret-{h}-XYZ", f"sesstok-{h}-QRS", f"mlflowtok-{h}-KLM",
                   secrets.token_hex(16))   # Ray validates its token format: hex

    def values(self) -> dict[str, str]:
        """The values that must never show up anywhere (the access key id is an identifier, not a secret)."""
        return {"AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_SESSION_TOKEN": self.session_token,
                "MLFLOW_TRACKING_TOKEN": self.mlflow_token, "RAY_AUTH_TOKEN": self.ray_token}


def night_env(base: dict[str, str], *, s3_url: str, creds: Secrets, work_dir: Path) -> dict[str, str]:
    """Environment for every process of a test night: S3 endpoint and credentials, quiet offline defaults."""
    env = {k: v for k, v in base.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PREFECT_API"))}
    env.update({
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
        "AWS_SESSION_TOKEN": creds.session_token,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_url,          # botocore/s3fs and pyarrow (Ray Train storage_path)
        "MLFLOW_S3_ENDPOINT_URL": s3_url,       # the MLflow server's artifact store
        "AWS_EC2_METADATA_DISABLED": "true",    # offline: never wait on the instance metadata service
        "MLFLOW_TRACKING_TOKEN": creds.mlflow_token,
        # token auth (Ray 2.60 default) with a token from the environment, not ~/.ray/auth_token
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": creds.ray_token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(work_dir / "tmp"),
    })
    (work_dir / "tmp").mkdir(parents=True, exist_ok=True)
    return env


# -- moto S3 -----------------------------------------------------------------------------------------------

@dataclass
class MotoS3:
    """`moto_server` subprocess. State is in memory: a restart on the same port comes back empty."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 60) -> "MotoS3":
        exe = shutil.which("moto_server") or "moto_server"
        self.process = Process("moto", [exe, "-H", HOST, "-p", str(self.port)], self.env, self.log_path).start()
        wait_for(lambda: urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).status == 200,
                 timeout_s=timeout_s, what="moto_server", proc=self.process.proc, log_path=self.log_path)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        wait_for(lambda: not port_open(self.port), timeout_s=10, what="moto port release")

    def fs(self):
        """A fresh (uncached) s3fs filesystem on this server, with the night's credentials."""
        import s3fs
        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"], secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 token=self.env.get("AWS_SESSION_TOKEN"), endpoint_url=self.url,
                                 skip_instance_cache=True, use_listings_cache=False)

    def make_bucket(self, bucket: str = BUCKET) -> None:
        fs = self.fs()
        if not fs.exists(bucket):
            fs.mkdir(bucket)


# -- Ray: a head node and a worker node, 1 CPU each --------------------------------------------------------

@dataclass
class RayCluster:
    env: dict[str, str]
    work_dir: Path
    num_cpus_per_node: int = 1
    object_store_mb: int = 192
    port: int = field(default_factory=free_port)
    head: Process | None = None
    worker: Process | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def temp_dir(self) -> Path:
        # short path: Ray's Unix sockets live under it and paths over ~107 bytes fail
        return Path(self.env["LATENTPREF_RAY_TEMP"])

    def _node_args(self) -> list[str]:
        # two raylets on one host: every per-node port must differ, so all are chosen here
        return ["--num-cpus", str(self.num_cpus_per_node), "--num-gpus", "0",
                "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", "--block",
                "--log-style", "record"]

    def start(self, timeout_s: float = 120) -> "RayCluster":
        ray = shutil.which("ray") or "ray"
        # a test cluster has nothing to drain on SIGTERM: stop at once instead of waiting up to 30 s
        self.env = {**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.head = Process("ray-head", [ray, "start", "--head", "--node-ip-address", HOST, "--port", str(self.port),
                                         "--include-dashboard=false",
                                         "--temp-dir", str(self.temp_dir), *self._node_args()],
                            self.env, self.work_dir / "ray-head.log").start()
        wait_for(lambda: port_open(self.port), timeout_s=timeout_s, what="Ray head (GCS)", proc=self.head.proc,
                 log_path=self.head.log_path)
        self.worker = Process("ray-worker", [ray, "start", "--address", self.address, "--node-ip-address", HOST,
                                             *self._node_args()],
                              self.env, self.work_dir / "ray-worker.log").start()
        wait_for(lambda: self.alive_nodes() == 2, timeout_s=timeout_s, what="2 Ray nodes", proc=self.worker.proc,
                 log_path=self.worker.log_path, poll_s=1.0)
        return self

    def nodes(self) -> list[dict]:
        """`ray.nodes()` as seen by a separate driver process (the test process never joins the cluster)."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print('NODES=' + json.dumps([{'alive': n['Alive'], 'id': n['NodeID'], "
                "'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes()])); ray.shutdown()" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                             timeout=120)
        for line in out.stdout.splitlines():
            if line.startswith("NODES="):
                return json.loads(line[len("NODES="):])
        raise RuntimeError(f"ray.nodes() failed: {out.stderr[-2000:]}")

    def nodes_used_by(self, driver_pid: int) -> set[str]:
        """Ids of the nodes whose workers ran tasks/actors for the job of the driver process `driver_pid`.

        From Ray's own logs (shared temp dir of both nodes): the driver's log names its job id, each worker's
        log files name the job it served and the node it ran on.
        """
        logs = self.temp_dir / "session_latest" / "logs"
        drivers = list(logs.glob(f"python-core-driver-*_{driver_pid}.log"))
        if not drivers:
            return set()
        job = drivers[0].name[len("python-core-driver-"):][:8]
        nodes = set()
        for out in logs.glob(f"worker-*-{job}-*.out"):
            worker_id = out.name.split("-")[1]
            for core in logs.glob(f"python-core-worker-{worker_id}_*.log"):
                m = re.search(r"node_id=([0-9a-f]{56})", core.read_text(errors="replace"))
                if m:
                    nodes.add(m.group(1))
        return nodes

    def alive_nodes(self) -> int:
        return sum(1 for n in self.nodes() if n["alive"])

    def stop(self) -> None:
        for p in (self.worker, self.head):
            if p is not None:
                p.stop(timeout_s=30)
        self.worker = self.head = None


# -- MLflow tracking server: sqlite backend, artifacts proxied to S3 ---------------------------------------

@dataclass
class MlflowServer:
    env: dict[str, str]
    work_dir: Path
    artifacts: str = f"s3://{BUCKET}/mlflow"
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        exe = shutil.which("mlflow") or "mlflow"
        db = self.work_dir / "mlflow.db"
        cmd = [exe, "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", self.artifacts,
               "--host", HOST, "--port", str(self.port), "--workers", "1"]
        # no job executor (huey workers in /dev/shm): not needed for tracking, slow to start and to stop
        env = {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = Process("mlflow", cmd, env, self.work_dir / "mlflow-server.log").start()
        wait_for(lambda: urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200,
                 timeout_s=timeout_s, what="mlflow server", proc=self.process.proc, log_path=self.process.log_path,
                 poll_s=0.5)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


# -- one set of services per pytest session ----------------------------------------------------------------

@dataclass
class Services:
    work_dir: Path
    creds: Secrets
    env: dict[str, str]
    s3: MotoS3
    ray: RayCluster
    mlflow: MlflowServer

    def stop(self) -> None:
        for svc in (self.ray, self.mlflow, self.s3):   # Ray first: its workers may still talk to S3
            try:
                svc.stop()
            except Exception:   # one failed stop must not leave the others running
                log.exception("stopping %s failed", type(svc).__name__)
        if os.environ.get("LATENTPREF_KEEP_SERVICE_LOGS"):
            log.warning("service logs kept in %s and %s", self.work_dir, self.ray.temp_dir)
        else:
            shutil.rmtree(self.ray.temp_dir, ignore_errors=True)
            shutil.rmtree(self.work_dir, ignore_errors=True)


_shared: dict[str, object] = {}
_lock = threading.Lock()


def start_services() -> Services:
    work = Path(tempfile.mkdtemp(prefix="lp-svc-", dir="/tmp"))
    creds = Secrets.make()
    s3_port = free_port()
    env = night_env(dict(os.environ), s3_url=f"http://{HOST}:{s3_port}", creds=creds, work_dir=work)
    env["LATENTPREF_RAY_TEMP"] = str(Path(tempfile.mkdtemp(prefix="lpr", dir="/tmp")))
    # fault hook of tasks/train/personalize.py: armed by creating this file, consumed by the worker it kills
    env["LATENTPREF_FAULT_KILL_CHUNK"] = str(work / "faults" / "kill-chunk")
    (work / "faults").mkdir()
    s3 = MotoS3(env, work / "moto.log", port=s3_port)
    mlflow = MlflowServer(env, work)
    ray = RayCluster(env, work)
    services = Services(work, creds, env, s3, ray, mlflow)
    atexit.register(services.stop)   # an interrupted session still stops them (stop is idempotent)
    try:
        s3.start()
        s3.make_bucket()
        mlflow.start()
        ray.start()
    except BaseException:
        services.stop()
        raise
    return services


def expect_users(nodeids: list[str]) -> None:
    """Register the collected tests that use the shared services (pytest_collection_modifyitems)."""
    with _lock:
        pending = _shared.setdefault("pending", set())
        pending.update(nodeids)   # type: ignore[union-attr]


def test_finished(nodeid: str) -> None:
    """After each test: once the last registered user has run, stop the services right away, so the rest of
    the session (other integration tests, unit tests) does not share 2 cores with an idle Ray cluster."""
    with _lock:
        pending = _shared.get("pending")
        if not pending or nodeid not in pending:
            return
        pending.discard(nodeid)   # type: ignore[union-attr]
        if pending or "services" not in _shared:
            return
        services = _shared["services"]
    log.info("last test using the services finished: stopping them")
    services.stop()   # type: ignore[union-attr]


def shared() -> Services:
    """The session's services, started on first use (by whichever test directory needs them first)."""
    with _lock:
        if "services" not in _shared:
            _shared["services"] = start_services()
            _shared["users"] = 0
        _shared["users"] = int(_shared["users"]) + 1
        return _shared["services"]   # type: ignore[return-value]


def release() -> None:
    """Drop one user of the shared services; the last one stops them."""
    with _lock:
        _shared["users"] = int(_shared.get("users", 1)) - 1
        if _shared["users"] <= 0 and "services" in _shared:
            services = _shared.pop("services")
            services.stop()   # type: ignore[union-attr]


# -- the nightly CLI as a subprocess against the services --------------------------------------------------

# The tiny preset made smaller still: every stage runs for real (Ray Train DDP over both nodes, fan-out of
# several chunks, LoRA baseline), in about a minute on 2 cores.
NIGHT_OVERRIDES = (
    "data.n_prompts=80", "data.sft_steps=8", "data.n_candidates=4", "data.n_users=6", "data.max_pairs=16",
    "data.heldout_pairs_per_user=4", "data.learned_scorer=false",
    "pretrain.stage1_steps=4", "pretrain.stage2_steps=2", "pretrain.checkpoint_every=3",
    "personalize.steps=30", "personalize.users_per_task=3",
    "evaluate.n_users=2", "evaluate.prompts_per_user=2", "evaluate.max_new_tokens=8", "evaluate.baseline_steps=2",
    "evaluate.baselines=[lora_dpo]",
)


@dataclass
class CliRun:
    args: list[str]
    rc: int
    log_path: Path
    seconds: float
    pid: int

    @property
    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def field(self, label: str) -> str | None:
        """A value the CLI prints as `  <label> : value`."""
        for line in self.output.splitlines():
            if line.strip().startswith(label) and ":" in line:
                return line.split(":", 1)[1].strip().split(" ")[0]
        return None


def cli_args(svc: Services, command: str, store: str, *extra: str, experiment: str = "latentpref-nightly") -> list[str]:
    return [command, "--preset", "tiny", "--store", store, "--ray-address", svc.ray.address,
            "--mlflow-uri", svc.mlflow.url, "--set", f"runtime.mlflow_experiment={experiment}",
            *[a for o in NIGHT_OVERRIDES for a in ("--set", o)], *extra]


def start_cli(svc: Services, args: list[str], log_path: Path, *, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
    """`latentpref <args>` in its own process group (so a kill reaches its Prefect server child too)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd = svc.work_dir / "cwd"   # never the repo: nothing may land there
    cwd.mkdir(exist_ok=True)
    with open(log_path, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "latentpref.pipelines.cli", *args], env=env or svc.env,
                                cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def run_cli(svc: Services, args: list[str], log_path: Path, *, timeout_s: float = 600,
            env: dict[str, str] | None = None) -> CliRun:
    t0 = time.monotonic()
    proc = start_cli(svc, args, log_path, env=env)
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    finally:
        reap_group(proc)
    return CliRun(args, rc, log_path, time.monotonic() - t0, proc.pid)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a CLI run we started and its process group (its own session), like a node losing the job."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def reap_group(proc: subprocess.Popen) -> None:
    """After a CLI run ended: stop what it left in its process group (Prefect's temporary API server)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def copy_store(svc: Services, src: str, dst: str, folders: tuple[str, ...] = ("data", "models", "cache")) -> None:
    """Server-side copy of finished stage folders (manifests included) to a fresh store prefix."""
    fs = svc.s3.fs()
    for folder in folders:
        if fs.exists(f"{src}/{folder}"):
            fs.copy(f"{src}/{folder}", f"{dst}/{folder}", recursive=True)


def lance_options(svc: Services) -> dict[str, str]:
    """Lance storage options for the test's moto server (what Store.lance_options gives the night's processes)."""
    return {"aws_endpoint": svc.s3.url, "allow_http": "true", "aws_region": "us-east-1",
            "aws_access_key_id": svc.env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": svc.env["AWS_SECRET_ACCESS_KEY"],
            "aws_session_token": svc.env.get("AWS_SESSION_TOKEN", "")}


def policy_rows(svc: Services, store: str, at: str | int | None = None) -> dict[str, str]:
    """user_id -> fit version in the store's (one) policy table at `at` (latest by default); {} before the first
    commit."""
    import lance
    fs = svc.s3.fs()
    root = store.removeprefix("s3://")
    tables = [p for p in fs.ls(f"{root}/policies") if p.endswith(".lance")] if fs.exists(f"{root}/policies") else []
    if not tables:
        return {}
    assert len(tables) == 1, tables
    ds = lance.dataset(f"s3://{tables[0]}", version=at, storage_options=lance_options(svc))
    rows = ds.to_table(columns=["user_id", "version"])
    users = rows["user_id"].to_pylist()
    assert len(users) == len(set(users)), f"a user with two rows: {sorted(users)}"
    return dict(zip(users, rows["version"].to_pylist()))


def policy_tags(svc: Services, store: str) -> list[str]:
    import lance
    fs = svc.s3.fs()
    root = store.removeprefix("s3://")
    (table,) = [p for p in fs.ls(f"{root}/policies") if p.endswith(".lance")]
    return sorted(lance.dataset(f"s3://{table}", storage_options=lance_options(svc)).tags.list())


def list_keys(svc: Services, prefix: str) -> list[str]:
    """Every object key under an s3 prefix (without the bucket)."""
    fs = svc.s3.fs()
    return sorted(k.split("/", 1)[1] for k in fs.find(prefix.removeprefix("s3://")))


@dataclass
class Night:
    """The shared full night against all three services: the distributed test asserts on it, the fault
    tests start from copies of its finished stages."""

    store: str
    run: CliRun
    run_id: str


def base_night(svc: Services) -> Night:
    with _lock:
        if "night" in _shared:
            return _shared["night"]   # type: ignore[return-value]
        store = f"s3://{BUCKET}/night"
        run = run_cli(svc, cli_args(svc, "nightly", store), svc.work_dir / "logs" / "night.log")
        if run.rc != 0:
            raise RuntimeError(f"the distributed night failed (rc {run.rc}); log tail:\n{run.output[-6000:]}")
        night = Night(store, run, run.field("MLflow run id") or "")
        _shared["night"] = night
        return night


# ---- pytest fixtures shared by tests/faults and tests/integration (each conftest imports them) ------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def live_services():
    """moto S3 + MLflow server + 2-node Ray cluster, started once per session (by the first test needing
    them, here or in the other directory), stopped by PID right after the last such test."""
    svc = shared()
    yield svc
    release()


@pytest.fixture(scope="session")
def night(live_services):
    """The full nightly flow (tiny preset, smaller still) on s3:// + Ray cluster + MLflow server."""
    return base_night(live_services)


@pytest.hookimpl(trylast=True)   # after -k / -m deselection: only tests that will run are counted
def pytest_collection_modifyitems(items):
    expect_users([i.nodeid for i in items if "live_services" in getattr(i, "fixturenames", ())])


@pytest.fixture(autouse=True)
def _stop_services_after_their_last_test(request):
    yield
    test_finished(request.node.nodeid)
