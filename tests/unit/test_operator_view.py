"""Issue 18 without a night: the first real error behind Ray's wrappers, the headline quality column, the quiet
console (what reaches the terminal, what the log file gets), and killed nights told apart from running ones."""
from __future__ import annotations

import io
import logging
import os
import sys
from types import SimpleNamespace

import pytest

from latentpref.pipelines import console, runs


def _ray_task_error(cause: BaseException):
    import ray.exceptions
    try:
        raise cause
    except type(cause) as err:
        return ray.exceptions.RayTaskError("fit_chunk", "Traceback (most recent call last):\n  ...\n"
                                           f"{type(err).__name__}: {err}", err).as_instanceof_cause()


def test_root_cause_unwraps_ray_but_keeps_our_own_errors():
    wrapped = _ray_task_error(ValueError("user u1 has no pairs"))
    assert type(wrapped).__name__ == "RayTaskError(ValueError)"
    assert runs.describe_error(wrapped) == "ValueError: user u1 has no pairs"
    from ray.train import WorkerGroupError
    train = WorkerGroupError("Training failed due to worker errors", {1: RuntimeError("rank 1 OOM"),
                                                                       0: KeyError("step")})
    assert runs.describe_error(train) == "KeyError: 'step'"   # the lowest rank's error
    try:
        try:
            raise OSError("bucket gone")
        except OSError as err:
            raise RuntimeError("store unavailable: bucket gone") from err
    except RuntimeError as ours:
        assert runs.describe_error(ours) == "RuntimeError: store unavailable: bucket gone"


def test_headline_prefers_win_rate_vs_prior_and_labels_the_fallback():
    rows = [{"method": "latent_dpo", "win_rate": 0.6, "win_rate_lo": 0.5, "win_rate_hi": 0.7},
            {"method": "lora_dpo", "win_rate": 0.55, "win_rate_lo": 0.4, "win_rate_hi": 0.7},
            {"method": "full_dpo", "win_rate": 0.58, "win_rate_lo": 0.5, "win_rate_hi": 0.66},
            {"method": "clap_prior", "win_rate": 0.9}, {"method": "oracle_best_of_k", "win_rate": 0.95}]
    metric, values = runs.quality_metrics(rows)
    h = runs.headline(values, metric)
    assert metric == "win_rate" and "no win_rate_vs_prior" in h["label"]
    assert h["latent_dpo"] == {"method": "latent_dpo", "value": 0.6, "lo": 0.5, "hi": 0.7}
    assert h["best_baseline"]["method"] == "full_dpo"   # the prior, references and ceilings are not baselines
    rows[0]["win_rate_vs_prior"], rows[1]["win_rate_vs_prior"] = 0.7, 0.52
    metric, values = runs.quality_metrics(rows)
    h = runs.headline(values, metric)
    assert metric == "win_rate_vs_prior" and h["label"] == "win rate vs prior"
    assert h["latent_dpo"]["value"] == 0.7 and h["best_baseline"]["method"] == "lora_dpo"


def test_progress_on_a_pipe_is_throttled_and_on_a_terminal_rewritten(monkeypatch):
    pipe = io.StringIO()
    c = console.Console(pipe)
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(console.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 30.0)
    for done in range(0, 21):
        c.progress("personalize", done, 20)
    c.stage_done("personalize", 200.0, "20 users: 20 fitted")
    lines = pipe.getvalue().splitlines()
    assert 2 <= len(lines) <= 8, lines   # one line per 30 s of a 200 s stage, then the summary
    assert lines[0].startswith("  personalize 3/20 users, ETA ")
    assert lines[-1] == "  personalize   3m20s  20 users: 20 fitted"

    tty = io.StringIO()
    tty.isatty = lambda: True
    c = console.Console(tty)
    for done in range(0, 21):
        c.progress("evaluate", done, 20)
    c.stage_done("evaluate", 5.0, "done")
    assert tty.getvalue().count("\n") == 1 and tty.getvalue().count("\r") >= 20


def test_quiet_console_sends_everything_else_to_the_log_file(tmp_path, capfd):
    store = str(tmp_path / "store")
    with console.operator_console(verbose=False, store_root=store) as screen:
        print("a print from some library")
        logging.getLogger("some.library").warning("PlacementGroupCleaner: State API may be temporarily unavailable")
        os.write(2, b"C++ or a child process writing to fd 2\n")
        import warnings
        warnings.warn("transformers says so", FutureWarning)
        screen.line("  prepare          3s  200 prompts")
        screen.error("error: shown on stderr")
        log_path = screen.log_path
    out, err = capfd.readouterr()
    assert out == "  prepare          3s  200 prompts\n" and err == "error: shown on stderr\n"
    text = open(log_path).read()
    for expected in ("a print from some library", "PlacementGroupCleaner", "C++ or a child process",
                     "transformers says so", "200 prompts"):
        assert expected in text, expected
    assert os.path.dirname(log_path) == os.path.join(store, "runs")
    print("after the night")   # fds are back on the console
    assert capfd.readouterr().out == "after the night\n"


def test_verbose_console_keeps_everything_on_screen_and_in_the_file(tmp_path, capfd):
    with console.operator_console(verbose=True, store_root=str(tmp_path)) as screen:
        logging.getLogger("latentpref.test").warning("a library warning")
        os.write(1, b"fd 1 stays on the console\n")
        log_path = screen.log_path
    out, err = capfd.readouterr()
    assert "fd 1 stays on the console" in out
    assert "a library warning" in open(log_path).read()


def _run(run_id, status, start, *, tags=None, metrics=None, end=None):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=f"nightly-{run_id}", status=status,
                                                start_time=start, end_time=end),
                           data=SimpleNamespace(tags={"flow": "nightly", "preset": "tiny", **(tags or {})},
                                                metrics=metrics or {}, params={"runtime.store": "/nowhere"}))


def _stage(name, start, end):
    return SimpleNamespace(info=SimpleNamespace(run_id=name, run_name=name, status="RUNNING" if end is None else
                                                "FINISHED", start_time=start, end_time=end),
                           data=SimpleNamespace(tags={}, metrics={}, params={}))


def test_a_night_left_running_by_a_dead_process_is_killed():
    children = [_stage("prepare", 0, 5000), _stage("pretrain", 5000, 9000), _stage("personalize", 9000, None)]
    older = runs.night_of(None, _run("a" * 32, "RUNNING", 0), children, newest=False)
    assert older["status"] == "KILLED" and older["failed_stage"] == "personalize"
    assert older["stages"] == {"prepare": 5.0, "pretrain": 4.0, "personalize": None}
    assert older["resume"].startswith("latentpref nightly --preset tiny --store /nowhere")
    # the newest night with no lock on its store (the store is gone here: cannot tell) stays RUNNING
    newest = runs.night_of(None, _run("b" * 32, "RUNNING", 0), children, newest=True)
    assert newest["status"] in ("RUNNING", "KILLED")
    done = runs.night_of(None, _run("c" * 32, "FINISHED", 0, end=60000,
                                    metrics={"stage_seconds_prepare": 2.0, "users_fitted": 3.0, "users_total": 5.0,
                                             "win_rate.latent_dpo": 0.6, "nightly_seconds": 58.0}), [], newest=True)
    assert done["stages"] == {"prepare": 2.0} and done["seconds"] == 58.0 and done["resume"] is None
    assert done["users"] == {"total": 5, "fitted": 3} and done["quality"]["latent_dpo"]["value"] == 0.6
    table = runs.format_nights([done, older])
    assert "KILLED" in table and "killed in stage personalize" in table and "resume: latentpref nightly" in table


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_flow_commands_take_v(verbose):
    from latentpref.pipelines.cli import build_parser
    args = build_parser().parse_args(["nightly", *(["-v"] if verbose else [])])
    assert args.verbose is verbose
    assert build_parser().parse_args(["runs", "--last", "3", "--json"]).last == 3


def test_sys_streams_are_untouched(tmp_path):
    before = (sys.stdout, sys.stderr)
    with console.operator_console(verbose=False, store_root=str(tmp_path)):
        pass
    assert (sys.stdout, sys.stderr) == before


def _latents(rows, clap="c1"):
    import pyarrow as pa
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("user_id", pa.string()), ("version", pa.string()), ("status", pa.string()), ("warm_start", pa.bool_()),
        ("cold_start", pa.bool_()), ("z", pa.list_(pa.float32()))])).replace_schema_metadata({"clap_version": clap})


def test_user_drift_between_two_nights():
    from latentpref.pipelines.report import user_drift
    last = _latents([{"user_id": "a", "version": "v1", "status": "fitted", "warm_start": False, "cold_start": False,
                      "z": [0.0, 0.0]},
                     {"user_id": "b", "version": "v1", "status": "fitted", "warm_start": False, "cold_start": False,
                      "z": [1.0, 1.0]}])
    tonight = _latents([{"user_id": "a", "version": "v2", "status": "fitted", "warm_start": True,
                         "cold_start": False, "z": [3.0, 4.0]},
                        {"user_id": "b", "version": "v1", "status": "unchanged", "warm_start": False,
                         "cold_start": False, "z": [1.0, 1.0]},
                        {"user_id": "new", "version": "v1", "status": "fitted", "warm_start": False,
                         "cold_start": False, "z": [9.0, 9.0]}])
    drift = {r["user_id"]: r for r in user_drift(tonight, last, "prev").to_pylist()}
    assert set(drift) == {"a", "b"}   # a user new tonight has no previous latent
    assert drift["a"]["distance"] == pytest.approx(5.0) and drift["a"]["refit"] and drift["a"]["warm_start"]
    assert drift["b"] == {**drift["b"], "distance": 0.0, "refit": False, "warm_start": None}
    other_space = user_drift(_latents(tonight.to_pylist(), clap="c2"), last, "prev")
    assert other_space["distance"].to_pylist() == [None, None]   # another CLaP: latents not comparable


def test_across_nights_page_has_its_four_panels(tmp_path):
    import re

    from latentpref.dashboards.nights import SECTIONS, render_nights
    from latentpref.pipelines.report import user_drift
    ok = runs.night_of(None, _run("a" * 32, "FINISHED", 0, end=60000, metrics={
        "stage_seconds_prepare": 2.0, "stage_seconds_evaluate": 30.0, "users_total": 2.0, "users_fitted": 2.0,
        "users_unchanged": 0.0, "users_cold_start": 0.0, "win_rate.latent_dpo": 0.6, "win_rate_lo.latent_dpo": 0.5,
        "win_rate_hi.latent_dpo": 0.7, "win_rate.lora_dpo": 0.55}), [], newest=False)
    failed = runs.night_of(None, _run("b" * 32, "FAILED", 70000, end=80000, tags={
        "failed_stage": "personalize", "error": "WorkerCrashedError: died"},
        metrics={"stage_seconds_prepare": 2.0, "stage_seconds_personalize": 5.0}), [], newest=True)
    last = _latents([{"user_id": "a", "version": "v1", "status": "fitted", "warm_start": False,
                      "cold_start": False, "z": [0.0, 0.0]}])
    tonight = _latents([{"user_id": "a", "version": "v2", "status": "fitted", "warm_start": True,
                         "cold_start": False, "z": [3.0, 4.0]}])
    path = render_nights(str(tmp_path), [ok, failed, {**ok, "run_id": "c" * 32}],
                         {"c" * 32: user_drift(tonight, last, "a" * 32)}, title="t")
    page = open(path).read()
    assert re.findall(r"<section id='([a-z-]+)'", page) == list(SECTIONS)
    assert set(re.findall(r"<img src='([^']+)'", page)) == {"nights_quality.png", "nights_stage_times.png",
                                                             "nights_users.png", "nights_drift.png"}
    assert "class='failed'" in page and "personalize: WorkerCrashedError: died" in page
    assert "<td>a</td><td>5.0000</td>" in page   # the most-changed users
