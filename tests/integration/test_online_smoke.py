"""Smoke test of the online-feedback benchmark (benchmarks/online.py --tiny): a tiny store built by the real nightly
flow, a Serve replica taking feedback and completions, the replica killed mid-stream, a night, two users forgotten
(one with `latentpref forget`, one with DELETE /v1/users/{id}) and the store searched for them. Checks the JSON has
every key and that nothing answered 2xx was lost or counted twice, and nothing of the forgotten users is left, so the
full run (the default store, minutes) is known to work before it is started.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "online.py"
KEYS = ("feedback_requests", "feedback_to_policy_p50_s", "feedback_to_policy_p99_s", "completion_p99_ms",
        "completion_p99_ms_without_feedback", "lost_feedback", "double_counted", "forget_bytes_left")


def test_online_tiny_loses_nothing_counts_nothing_twice_and_forgets(tmp_path):
    out = tmp_path / "online.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--work", str(tmp_path),
                           "--tiny-users", "8", "--users", "6", "--feedback-clients", "2", "--completion-clients", "2",
                           "--baseline-requests", "8", "--feedback-interval-s", "0.2", "--settle-s", "15",
                           "--forget-cli", "1", "--forget-api", "1", "--poll", "status"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seconds = time.monotonic() - t0
    r = json.loads(out.read_text())

    assert set(KEYS) <= set(r)
    assert r["feedback_requests"] == 6 and r["feedback"]["answered_2xx"] == 6, r["feedback"]
    assert r["lost_feedback"] == 0, r["checks"]
    assert r["double_counted"] == 0, r["checks"]
    assert r["forget_bytes_left"] == 0, r["forget"]["where"]
    assert r["forget"]["users"] == 2 and [c["rc"] for c in r["forget"]["cli"]] == [0]
    assert [a["status"] for a in r["forget"]["api"]] == [200]
    assert r["forget"]["still_personalized_after"] == 0
    assert r["kill"].get("new_pid") and r["kill"]["new_pid"] != r["kill"]["pid"], r["kill"]   # Serve restarted it
    resent = r["feedback"]["resent_after_kill"]          # answers lost in the kill: the same request again
    assert resent["requests"] >= 1 and resent["answered_already_stored"] == resent["requests"] == resent["same_batch"]
    assert r["completion_p99_ms_without_feedback"] > 0 and r["completions"]["requests"] > 0
    # tiny loads are short: every completion may overlap the kill window, which completion_p99_ms leaves out
    assert r["completion_p99_ms"] is None or r["completion_p99_ms"] > 0
    timing = r["feedback_to_policy"]     # every timed request is either clear of the kill window or waited through it
    split = timing["outside_kill_window"]
    assert split["requests"] + split["waited_through_the_kill"] == timing["requests_timed"] == 6, timing
    # --poll status: the clients learnt of new fits from POST /v1/users/status
    assert timing["status_polls"] >= 1 and 1 <= timing["to_status_requests"] <= 6, timing
    assert r["settings"]["poll"] == "status"
    assert r["night"]["rc"] == 0 and sum(r["night"]["feedback_users"].values()) == 6
    assert len(r["machine"]["load_average_at_start"]) == 3 and r["settings"]["tiny"] is True
    print(f"online --tiny: {seconds:.0f}s; feedback_to_policy p99 {r['feedback_to_policy_p99_s']}s, "
          f"night found feedback users {r['night']['feedback_users']}")
