"""The HTML report of a real tiny nightly run: built by `latentpref report RUN_ID` from MLflow + the store, then
opened in headless Chromium (Debian package `chromium`), screenshotted, and checked for its sections, decoded
plots and an empty console.

The night is the session's one tiny night shared with test_generate.py (`tiny_night`); the last two tests render
hand-built report data (no night).
"""
import json
import os
import re
import signal
import subprocess

import mlflow
import pyarrow as pa
import pytest
from test_generate import tiny_night   # tests/integration is on sys.path (pytest's default rootdir imports)

from latentpref.dashboards.report import SECTIONS, ReportData, render_report
from latentpref.pipelines import cli

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
GAUSSIAN_SECTIONS = [s for s in SECTIONS if s != "code-usage"]


@pytest.fixture(scope="module")
def night(session_dir):
    return tiny_night(session_dir)


@pytest.fixture(scope="module")
def report_dir(night, tmp_path_factory):
    """`latentpref report RUN_ID` into a fresh folder (MLflow from the environment, as in CI)."""
    _, report, store = night
    out = str(tmp_path_factory.mktemp("report") / "site")
    assert cli.main(["report", report.run_id, "--store", store, "--out", out]) == 0
    return out


def _page(report_dir) -> str:
    with open(os.path.join(report_dir, "index.html"), encoding="utf-8") as fh:
        return fh.read()


def _has_fewshot(night) -> bool:
    """Whether the store holds this CLaP's few-shot curve: the night never runs the benchmark, but
    test_fewshot_smoke.py runs it on this same store (`--store` copies the curve there), so it depends on the order."""
    _, report, store = night
    return os.path.exists(os.path.join(store, "reports", "fewshot", f"{report.clap_version}.json"))


def _cohort_images(night) -> set[str]:
    """One heatmap per method of the night's cohort matrix (latent DPO and the baseline the evaluation shows)."""
    _, report, store = night
    path = os.path.join(store, "runs", report.run_id, "cohort_matrix.json")
    assert os.path.exists(path), f"the evaluate stage wrote no {path}"
    with open(path) as fh:
        return {f"cohorts_{method}.png" for method in json.load(fh)["methods"]}


def _expected_images(night) -> set[str]:
    return {"comparison.png", "win_rates.png", "clap_training.png", "user_latents.png"} | _cohort_images(night) | (
        {"fewshot.png"} if _has_fewshot(night) else set())


def test_report_has_every_section_and_its_plots(night, report_dir):
    _, report, _ = night
    page = _page(report_dir)
    assert re.findall(r"<section id='([a-z-]+)'", page) == GAUSSIAN_SECTIONS   # no code usage: Gaussian latents
    fewshot = re.search(r"<section id='few-shot'>.*?</section>", page, re.S).group(0)
    if not _has_fewshot(night):   # a benchmark run by hand: the section says how to get it
        assert "Not available for this run: the few-shot benchmark" in fewshot
        page = page.replace(fewshot, "")
    assert "Not available" not in page, "every section of a finished night has its data"
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == _expected_images(night)
    for name in images:
        with open(os.path.join(report_dir, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert "http://" not in page and "https://" not in page   # nothing to fetch: viewable offline
    # lineage: model versions, MLflow run ids of the night and its stages, data digests
    client = mlflow.MlflowClient(report.tracking_uri)
    stages = client.search_runs([report.experiment_id], f"tags.mlflow.parentRunId = '{report.run_id}'")
    assert report.clap_version in page and report.run_id in page
    for run in stages:
        assert run.info.run_id in page, run.info.run_name
        for d in run.inputs.dataset_inputs:
            assert d.dataset.digest in page, d.dataset.name
    # the per-method table shows means with intervals, pooled and per user group
    assert re.search(r"latent_dpo</td><td>\d+</td><td>[0-9.]+ \[[0-9.]+, [0-9.]+\]", page)
    comparison = re.search(r"<section id='comparison'>.*?</section>", page, re.S).group(0)
    assert "<th>win_rate_vs_base</th><th>own_vs_swapped</th>" in comparison
    assert re.findall(r"<h3 class='group'>([a-z_]+) ", comparison), "no per-group table"
    cohorts = re.search(r"<section id='cohorts'>.*?</section>", page, re.S).group(0)
    assert "<h3>latent_dpo</h3>" in cohorts and "Diagonal is its row's maximum for" in cohorts


def test_any_run_of_the_night_gives_its_report(night, tmp_path):
    """A stage run's id resolves to its nightly run (run id -> MLflow -> parent -> store)."""
    _, report, store = night
    client = mlflow.MlflowClient(report.tracking_uri)
    evaluate = client.search_runs([report.experiment_id], f"tags.mlflow.parentRunId = '{report.run_id}' and "
                                                          "attributes.run_name = 'evaluate'")[0]
    out = str(tmp_path / "from-child")
    assert cli.main(["report", evaluate.info.run_id, "--out", out]) == 0   # no --store: MLflow says where
    assert "nightly run" in _page(out) and report.run_id in _page(out)
    assert cli.main(["report", "0" * 32, "--out", str(tmp_path / "none")]) == 2   # unknown run: error, no trace


def test_the_flow_stores_the_report(night):
    _, report, store = night
    assert report.report_path and os.path.exists(report.report_path)
    assert os.path.exists(os.path.join(store, "runs", report.run_id, "report", "user_latents.png"))
    client = mlflow.MlflowClient(report.tracking_uri)
    assert "report/index.html" in {a.path for a in client.list_artifacts(report.run_id, "report")}


def _chromium(args: list[str], profile: str, timeout_s: int = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the browser's own process group, started just above
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish in {timeout_s}s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(night, report_dir, tmp_path):
    url = "file://" + os.path.join(report_dir, "index.html")
    shot = os.path.join(report_dir, "screenshot.png")
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", url], str(tmp_path / "profile-shot"))
    assert res.returncode == 0, res.stderr[-2000:]
    with open(shot, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1280, 2000)
    assert os.path.getsize(shot) > 50_000, "a blank page compresses to a few KB"

    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], str(tmp_path / "profile-dom"))
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    for section in GAUSSIAN_SECTIONS:
        assert f'<section id="{section}">' in dom, section
    # set by the page's load handler: every <img> decoded (naturalWidth > 0)
    images = len(_expected_images(night))
    assert f'data-images="{images}"' in dom and 'data-broken-images="0"' in dom, re.findall(r"<body[^>]*>", dom)
    console = [line for line in (res.stderr + "\n").splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console


def _synthetic_groups_and_cohorts() -> ReportData:
    """Report data with the issue-27 inputs only: pooled and per-group comparison, a 3 x 3 cohort matrix for latent
    DPO and its baseline."""
    row = {"users": 3, "win_rate_vs_prior": 0.6, "win_rate_vs_prior_lo": 0.5, "win_rate_vs_prior_hi": 0.7,
           "win_rate_vs_base": 0.55, "win_rate_vs_base_lo": 0.45, "win_rate_vs_base_hi": 0.65,
           "own_vs_swapped": 0.7, "own_vs_swapped_lo": 0.6, "own_vs_swapped_hi": 0.8}
    comparison = pa.Table.from_pylist([dict(row, method="latent_dpo"), dict(row, method="lora_dpo")])
    by_group = pa.Table.from_pylist([dict(row, method=m, group=g) for g in ("seen", "unseen", "out_of_cohort")
                                     for m in ("latent_dpo", "lora_dpo")])
    cohorts = ["positive", "negative", "out_of_cohort"]
    entry = {"judges": cohorts, "writers": cohorts, "users": {c: 2 for c in cohorts}}
    matrix = {"baseline": "lora_dpo", "methods": {
        "latent_dpo": dict(entry, mean_reward=[[1.0, -1.0, 0.2], [-0.5, 0.4, 0.0], [0.1, 0.2, 0.3]]),
        "lora_dpo": dict(entry, mean_reward=[[0.1, 0.3, 0.2], [0.0, 0.1, None], [0.1, 0.2, 0.1]])}}
    return ReportData(run_id="r", title="groups and cohorts", comparison=comparison, comparison_by_group=by_group,
                      cohort_matrix=matrix)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} not installed (Debian: apt-get install -y chromium)")
def test_group_and_cohort_sections_render_in_headless_chromium(tmp_path):
    """The comparison's per-group tables and the cohort heatmaps decode and lay out in a browser (hand-built data:
    the night's own check is test_report_renders_in_headless_chromium)."""
    out = str(tmp_path / "site")
    url = "file://" + render_report(out, _synthetic_groups_and_cohorts())
    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], str(tmp_path / "profile-dom"))
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert '<section id="comparison">' in dom and '<section id="cohorts">' in dom
    assert len(re.findall(r'<h3 class="group">', dom)) == 3
    assert len(re.findall(r'<td class="diag">', dom)) == 6          # 3 cohorts x 2 methods
    # comparison.png + one heatmap per method
    assert 'data-images="3"' in dom and 'data-broken-images="0"' in dom, re.findall(r"<body[^>]*>", dom)
    console = [line for line in (res.stderr + "\n").splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console


def test_discrete_runs_get_a_code_usage_section(tmp_path):
    """Code usage renders only for discrete latents (report data built by hand; the real discrete night is
    tests/integration/test_nightly_discrete.py)."""
    base = dict(run_id="r", title="t", comparison=pa.table({"method": ["latent_dpo"], "users": [1]}))
    gaussian = render_report(str(tmp_path / "g"), ReportData(**base))
    assert "id='code-usage'" not in open(gaussian).read()
    discrete = render_report(str(tmp_path / "d"), ReportData(**base, latent_type="discrete",
                                                              code_usage=[5, 0, 3, 8]))
    page = open(discrete).read()
    assert "id='code-usage'" in page and "never used 1" in page
    assert os.path.exists(tmp_path / "d" / "code_usage.png")
