"""`latentpref serve` starts and answers while two CPU-bound processes (a night's workers, say) hold both cores of
the box: its readiness budget outlasts the load instead of Ray Serve's 5 s proxy check killing it."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/serve_store.py
import serve_store  # noqa: E402
from services import free_port  # noqa: E402

from latentpref.tasks.data.store import Store  # noqa: E402

pytestmark = pytest.mark.slow
BUSY_S = 240


def test_serve_starts_and_answers_beside_two_busy_processes(tmp_path):
    store = Store(str(tmp_path / "store"))
    serve_store.night(store, "clapv1", ["user-0", "user-1"], seed=1)
    # two CPU-bound processes, bounded in time (they stop by themselves)
    burn = f"import time\nt=time.time()\nwhile time.time()-t<{BUSY_S}: pass"
    busy = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "latentpref.pipelines.cli", "serve", "--store", store.root,
                                   "--port", str(port), "--start-budget", "300"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 300, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    body = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(2)
        assert body is not None, f"serve did not come up (exit {server.poll()}):\n{log.read_text()[-3000:]}"
        assert all(p.poll() is None for p in busy), "the busy processes ended before the server was up"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=json.dumps({"model": "latentpref", "prompt": "The film was",
                                                      "max_tokens": 4, "user": "user-0"}).encode())
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["personalization"]["served"] == "personalized"
        assert "Traceback" not in log.read_text()     # no failed start attempt surfaced as a traceback
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        for p in busy:
            p.kill()


def test_a_start_that_cannot_complete_says_why_in_one_line(tmp_path):
    empty = tmp_path / "no-store"
    out = subprocess.run([sys.executable, "-m", "latentpref.pipelines.cli", "serve", "--store", str(empty),
                          "--port", str(free_port()), "--start-budget", "20"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 4, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nightly" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
