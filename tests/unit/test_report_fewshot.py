"""The report's few-shot section (issue #15 item 6): benchmarks/fewshot.py's curve, found in the store by
pipelines/report.py and plotted by dashboards/report.py. Synthetic results only: no night, no Ray, no Prefect run."""
from __future__ import annotations

import json
import re

import pytest

from latentpref.dashboards.report import SECTIONS, ReportData, plot_fewshot, render_report
from latentpref.pipelines.report import FEWSHOT_DIR, fewshot_result
from latentpref.tasks.data.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


def _result() -> dict:
    """A fewshot.py result in its shape: a missing point (None), a method without intervals, the prior at 0.5."""
    return {
        "n_pairs": [1, 2, 4, 8], "complete": True, "n_pairs_planned": [1, 2, 4, 8],
        "n_pairs_used": [[1, 1, 1], [2, 2, 2], [4, 4, 4], [8, 8, 5]],
        "preset": "tiny", "clap_version": "clap-abc123", "users": ["u0", "u1", "u2"],
        "methods": {
            "latent_dpo": {
                "users": 3,
                "heldout_accuracy": [0.512, 0.55, None, 0.6789],
                "heldout_accuracy_ci": [[0.4, 0.6], [0.45, 0.65], [None, None], [0.6, 0.75]],
                "win_rate_vs_prior": [0.5, 0.5312, 0.58, 0.61],
                "win_rate_vs_prior_ci": [[0.4, 0.6], [0.42, 0.64], [0.5, 0.66], [0.52, 0.7]],
                "seconds_per_user": [0.0412, 0.05, 0.06, 0.08],
            },
            "lora_dpo": {   # an older result: no intervals at all
                "users": 2,
                "heldout_accuracy": [0.47, 0.49, 0.52, 0.56],
                "win_rate_vs_prior": [0.44, None, 0.51, 0.53],
                "seconds_per_user": [12.3, 13.1, 14.0, 15.5],
            },
            "clap_prior": {
                "users": 3,
                "heldout_accuracy": [0.5, 0.5, 0.5, 0.5],
                "heldout_accuracy_ci": [[0.5, 0.5]] * 4,
                "win_rate_vs_prior": [0.5, 0.5, 0.5, 0.5],
                "win_rate_vs_prior_ci": [[0.5, 0.5]] * 4,
                "seconds_per_user": [0.0, 0.0, 0.0, 0.0],
            },
        },
    }


def _section(page: str, sid: str) -> str:
    found = re.search(rf"<section id='{sid}'>(.*?)</section>", page, re.S)
    assert found, sid
    return found.group(1)


def test_plot_fewshot_writes_a_png(tmp_path):
    assert plot_fewshot(_result(), str(tmp_path)) == "fewshot.png"
    assert (tmp_path / "fewshot.png").read_bytes()[:8] == PNG


def test_plot_fewshot_survives_a_method_without_any_value(tmp_path):
    result = _result()
    result["methods"]["empty"] = {"heldout_accuracy": [None] * 4, "win_rate_vs_prior": [None] * 4}
    assert (tmp_path / plot_fewshot(result, str(tmp_path))).read_bytes()[:8] == PNG


def test_section_follows_win_rates():
    assert SECTIONS[SECTIONS.index("win-rates") + 1] == "few-shot"


def test_report_plots_and_tabulates_the_curve(tmp_path):
    page = open(render_report(str(tmp_path), ReportData(run_id="r", title="t", fewshot=_result()))).read()
    assert "few-shot" in re.findall(r"<section id='([a-z-]+)'", page)
    body = _section(page, "few-shot")
    assert "Few-shot curve" in page and "<img src='fewshot.png'" in body
    assert (tmp_path / "fewshot.png").read_bytes()[:8] == PNG
    assert "Not available" not in body
    # rows = methods, columns = N, cells "acc / win (seconds)"
    assert all(f"<th>N = {n}</th>" in body for n in (1, 2, 4, 8))
    assert "<th>latent_dpo</th><td>0.51 / 0.50 (0.0412 s)</td><td>0.55 / 0.53 (0.05 s)</td>" in body
    assert "<td>– / 0.58 (0.06 s)</td>" in body           # a missing value shows as a dash
    assert "<td>0.49 / – (13.1 s)</td>" in body and "<th>clap_prior</th><td>0.50 / 0.50 (0 s)</td>" in body
    # the note: users (fewer for LoRA-DPO), preset, CLaP, capped N
    assert "3 users (lora_dpo on 2)" in body and "preset tiny" in body and "clap-abc123" in body
    assert "fewer train pairs than N" in body


def test_report_without_the_curve_says_what_is_missing(tmp_path):
    page = open(render_report(str(tmp_path), ReportData(run_id="r", title="t",
                                                        notes={"few-shot": "No few-shot result at X."}))).read()
    body = _section(page, "few-shot")
    assert "Not available for this run: the few-shot benchmark for this CLaP" in body
    assert "python benchmarks/fewshot.py --store STORE" in body and "No few-shot result at X." in body
    assert "<img" not in body and not (tmp_path / "fewshot.png").exists()


def test_a_partial_result_says_so(tmp_path):
    result = dict(_result(), complete=False, n_pairs_planned=[1, 2, 4, 8, 16])
    page = open(render_report(str(tmp_path), ReportData(run_id="r", title="t", fewshot=result))).read()
    assert "Partial: only N = 1, 2, 4, 8 of 1, 2, 4, 8, 16 finished." in _section(page, "few-shot")


# ------------------------------------------------------------------------------------------------ the store side
@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


def test_collect_reads_the_curve_of_its_clap(store):
    store.write_json(_result(), *FEWSHOT_DIR, "clap-abc123.json")
    found, note = fewshot_result(store, "clap-abc123")
    assert found == json.loads(json.dumps(_result())) and note == ""
    assert fewshot_result(store, "clap-other")[0] is None     # another CLaP's curve is not this night's


@pytest.mark.parametrize("content, says", [
    (None, "No few-shot result at"),
    (b"{not json", "could not be read"),
    (b'{"methods": {}}', "not a fewshot.py result"),
    (b"[1, 2]", "not a fewshot.py result"),
])
def test_a_missing_or_broken_curve_is_a_note_not_an_error(store, content, says):
    if content is not None:
        store.write_bytes(content, *FEWSHOT_DIR, "clap-abc123.json")
    found, note = fewshot_result(store, "clap-abc123")
    assert found is None and says in note


def test_no_clap_version_no_curve(store):
    found, note = fewshot_result(store, None)
    assert found is None and "no CLaP version" in note
