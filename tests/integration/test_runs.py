"""The operator's view across nights (issue 18): three consecutive tiny nights on one store, run through the CLI
in-process exactly as an operator would (`latentpref nightly`, quiet console), the second one with a Ray worker
killed in the per-user fan-out and no retries, so its personalize stage fails. Then `latentpref runs` lists them,
each night's report shows its final state, and the across-nights page renders in headless Chromium.

The store is a copy of the session's tiny night (test_generate.tiny_night): every night skips prepare and pretrain
(stored), so the three together cost about three evaluate stages. Feedback ingested for two users before the
second night gives the nights something to refit (and the drift panel something to show).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import mlflow
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_generate import SMALLER, tiny_night   # tests/integration is on sys.path (rootdir imports)

from latentpref.dashboards.nights import SECTIONS as NIGHT_SECTIONS
from latentpref.pipelines import cli
from latentpref.tasks.data.store import Store

pytestmark = pytest.mark.slow

EXPERIMENT = "it-runs"
REFIT = ("u00000", "u00001")   # consecutive ids: one Ray task (users_per_task 8) fits both, so the fault hits it


def _args(command: str, store: str, *extra: str) -> list[str]:
    sets = [o for o in SMALLER if not o.startswith("runtime.mlflow_experiment=")]
    return [command, "--preset", "tiny", "--store", store, "--set", f"runtime.mlflow_experiment={EXPERIMENT}",
            *[a for o in sets for a in ("--set", o)], *extra]


def _night(capfd, store: str, *extra: str) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = cli.main(_args("nightly", store, *extra))
    out, err = capfd.readouterr()
    return rc, out, err


def _run_id(out: str) -> str:
    return re.search(r"MLflow run id : ([0-9a-f]{32})", out).group(1)


@pytest.fixture(scope="module")
def three_nights(session_dir, tmp_path_factory):
    """(store, [(rc, stdout, stderr, run_id)] of nights 1..3): the console of each night."""
    _, _, source = tiny_night(session_dir)
    store = str(tmp_path_factory.mktemp("runs") / "store")
    shutil.copytree(source, store, ignore=shutil.ignore_patterns("runs", "locks", "mlflow", "ray_train"))
    # night 1: every user unchanged; the `latentpref` command in its own process, as an operator runs it, so its
    # console is exactly what a terminal would show (Prefect's server, Ray, workers, interpreter exit included)
    work = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "latentpref.pipelines.cli", *_args("nightly", store)], env=env,
                          cwd=str(work), capture_output=True, text=True, timeout=1200)
    nights = [(proc.returncode, proc.stdout, proc.stderr, _run_id(proc.stdout))]
    capfd = _CapFD()
    with capfd:

        pairs = Store(store).read_table(*next(("data", "population", d, "pairs.parquet")
                                              for d in Store(store).listdir("data", "population")))
        donor = pairs.filter(pc.equal(pairs["user_id"], "u00005")).slice(0, 6)
        fresh = pa.table({"user_id": [REFIT[i % 2] for i in range(donor.num_rows)],
                          "prompt": donor["prompt"], "chosen": donor["rejected"], "rejected": donor["chosen"]})
        feedback = str(tmp_path_factory.mktemp("feedback") / "new.parquet")
        pq.write_table(fresh, feedback)
        assert cli.main(["ingest", feedback, *_args("ingest", store)[1:]]) == 0

        marker = str(tmp_path_factory.mktemp("fault") / "kill-chunk")
        open(marker, "w").close()
        os.environ["LATENTPREF_FAULT_KILL_CHUNK"] = marker   # Ray workers of the next night inherit it
        try:                                                 # night 2: a worker dies, no retries: personalize fails
            rc, out, err = _night(capfd, store, "--set", "personalize.max_retries=0")
        finally:
            os.environ.pop("LATENTPREF_FAULT_KILL_CHUNK", None)
        assert not os.path.exists(marker), f"no worker reached the fault point:\n{out}\n{err}"
        nights.append((rc, out, err, _run_id(out)))

        rc, out, err = _night(capfd, store)                  # night 3: continues from what was stored
        nights.append((rc, out, err, _run_id(out)))
    return store, nights


class _CapFD:
    """fd-level capture (like capfd) for a module-scoped fixture: fds 1/2 into temp files, read back and cleared by readouterr()."""

    def __enter__(self):
        import tempfile
        self.files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]
        self.saved = [os.dup(1), os.dup(2)]
        for fd, f in zip((1, 2), self.files):
            os.dup2(f.fileno(), fd)
        return self

    def readouterr(self) -> tuple[str, str]:
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        out = []
        for f in self.files:
            f.seek(0)
            out.append(f.read().decode("utf-8", "replace"))
            f.seek(0)
            f.truncate()
        return out[0], out[1]

    def __exit__(self, *exc):
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        for f in self.files:
            f.close()


def test_default_console_is_quiet(three_nights):
    store, nights = three_nights
    rc, out, err, run_id = nights[0]
    assert rc == 0, out + err
    lines = (out + err).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    noisy = [ln for ln in lines if re.search(r"warn|PlacementGroupCleaner|HTTP Request|Traceback|it/s\]", ln, re.I)]
    assert noisy == [], noisy
    for stage in ("prepare", "pretrain", "personalize", "evaluate", "report"):
        assert re.search(rf"^  {stage}\s+\d+(m\d\ds|s)\s+\S", out, re.M), (stage, out)
    assert "latentpref nightly: finished in" in out and "latentpref report: done" not in out
    # the full log is in the night's run folder and in MLflow, with what the console left out
    log_path = os.path.join(store, "runs", run_id, "nightly.log")
    assert f"full log      : {log_path}" in out
    text = open(log_path, encoding="utf-8", errors="replace").read()
    assert len(text.splitlines()) > len(lines) and "personalize" in text
    client = mlflow.MlflowClient()
    assert "logs/nightly.log" in {a.path for a in client.list_artifacts(run_id, "logs")}


def test_failed_night_names_stage_cause_and_resume(three_nights):
    store, nights = three_nights
    rc, out, err, run_id = nights[1]
    assert rc == 1
    assert re.search(r"FAILED in stage personalize: WorkerCrashedError: The worker died", err), err
    assert "RayTaskError" not in err and "Traceback" not in out + err
    assert "continues from what was stored" in err
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_stage"] == "personalize" and "WorkerCrashedError" in run.data.tags["error"]
    # the night's report exists although it failed, and shows its final state
    page = open(os.path.join(store, "runs", run_id, "report", "index.html"), encoding="utf-8").read()
    assert "<dd data-key='status'>FAILED</dd>" in page and "<dd data-key='failed stage'>personalize</dd>" in page
    assert "still running" not in page and "RUNNING" not in page


def test_runs_lists_the_three_nights(three_nights, capsys):
    store, nights = three_nights
    ids = [n[3] for n in nights]
    assert [n[0] for n in nights] == [0, 1, 0]
    capsys.readouterr()
    assert cli.main(_args("runs", store, "--last", "3", "--json")) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [n["run_id"] for n in listed] == ids[::-1]                    # newest first
    third, second, first = listed
    assert [n["status"] for n in listed] == ["FINISHED", "FAILED", "FINISHED"]
    # night 1 keeps the copied fits (it refits them only if the fit settings changed since the session's night)
    assert first["users"]["total"] == 12 and sum(first["users"][k] for k in ("fitted", "unchanged", "cold_start")) == 12
    # night 2's worker died with both refits staged but not committed (a dead task's rows never reach the policy
    # table); night 3 fitted both and kept everyone else
    assert third["users"] == {"total": 12, "fitted": 2, "unchanged": 10, "cold_start": 0}
    assert second["failed_stage"] == "personalize" and second["error"].startswith("WorkerCrashedError")
    assert second["resume"].startswith(f"latentpref nightly --preset tiny --store {store}")
    assert set(second["stages"]) == {"prepare", "pretrain", "personalize"} and second["stages"]["personalize"]
    assert second["users"] == {} and second["quality"]["latent_dpo"] is None
    for night in (first, third):
        assert set(night["stages"]) == {"prepare", "pretrain", "personalize", "evaluate", "report"}
        assert all(v > 0 for v in night["stages"].values())
        assert night["seconds"] >= sum(night["stages"].values())
        q = night["quality"]
        assert q["metric"] in ("win_rate_vs_prior", "win_rate")
        assert 0 <= q["latent_dpo"]["lo"] <= q["latent_dpo"]["value"] <= q["latent_dpo"]["hi"] <= 1
        assert q["best_baseline"]["method"] == "lora_dpo"
        assert night["failed_stage"] is None and night["resume"] is None
    assert first["clap_version"] == second["clap_version"] == third["clap_version"]
    # the plain table: one line per night, then the failure and how to resume
    assert cli.main(_args("runs", store, "--last", "3")) == 0
    table = capsys.readouterr().out
    assert all(i[:12] in table for i in ids)
    assert f"{ids[1][:12]} failed in stage personalize: WorkerCrashedError" in table
    assert "  resume: latentpref nightly" in table


def test_reports_show_final_state_and_drift(three_nights):
    store, nights = three_nights
    run_id = nights[2][3]
    folder = os.path.join(store, "runs", run_id, "report")
    page = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
    assert "<dd data-key='status'>FINISHED</dd>" in page and "still running" not in page
    assert re.search(r"<dd data-key='time per stage'>prepare \d+s · pretrain \d+s · personalize", page)
    assert "nights.html" in page
    across = open(os.path.join(folder, "nights.html"), encoding="utf-8").read()
    assert re.findall(r"<section id='([a-z-]+)'", across) == list(NIGHT_SECTIONS)
    assert "Not available" not in across
    assert all(n[3][:12] in across for n in nights)
    # drift of night 3 against night 1 (night 2 has no personalize result): the two refit users moved
    drift = pq.read_table(os.path.join(store, "runs", run_id, "drift.parquet")).to_pylist()
    moved = {r["user_id"]: r for r in drift if r["refit"]}
    assert set(moved) == set(REFIT)
    assert all(r["distance"] > 0 and r["warm_start"] for r in moved.values())
    assert all(r["distance"] == 0 for r in drift if not r["refit"])
    top = across[across.index("most-changed users"):]
    assert top.index(REFIT[0]) >= 0 and top.index(REFIT[1]) >= 0


def test_across_nights_page_renders_in_headless_chromium(three_nights, tmp_path):
    from test_report import CHROMIUM, _chromium
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install -y chromium)")
    store, nights = three_nights
    folder = os.path.join(store, "runs", nights[2][3], "report")
    url = "file://" + os.path.join(folder, "nights.html")
    shot = str(tmp_path / "nights.png")
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,2600", url], str(tmp_path / "profile-shot"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert os.path.getsize(shot) > 50_000, "a blank page compresses to a few KB"
    shutil.copyfile(shot, os.path.join(folder, "nights-screenshot.png"))   # kept with the store for a look
    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], str(tmp_path / "profile-dom"))
    assert res.returncode == 0, res.stderr[-2000:]
    for section in NIGHT_SECTIONS:
        assert f'<section id="{section}">' in res.stdout, section
    assert 'data-images="4"' in res.stdout and 'data-broken-images="0"' in res.stdout
    console = [ln for ln in (res.stderr + "\n").splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
