"""The report's per-group comparison and cohort x cohort section (issue #27): the evaluate stage's
comparison_by_group.parquet and cohort_matrix.json, read by pipelines/report.py and drawn by dashboards/report.py.
Synthetic tables only: no night, no Ray, no Prefect run."""
from __future__ import annotations

import html
import json
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from latentpref.dashboards.report import (SECTIONS, ReportData, cohort_matrix_arrays, diagonal_summary,
                                          plot_cohort_matrix, render_report)
from latentpref.pipelines.report import COHORT_MATRIX, cohort_matrix
from latentpref.tasks.data.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


def _row(method: str, users: int, base: float | None, swapped: float | None) -> dict:
    ci = (lambda v: (None, None) if v is None else (v - 0.05, v + 0.05))
    return {"method": method, "users": users, "win_rate_vs_prior": 0.6, "win_rate_vs_prior_lo": 0.5,
            "win_rate_vs_prior_hi": 0.7, "win_rate_vs_base": base, "win_rate_vs_base_lo": ci(base)[0],
            "win_rate_vs_base_hi": ci(base)[1], "own_vs_swapped": swapped, "own_vs_swapped_lo": ci(swapped)[0],
            "own_vs_swapped_hi": ci(swapped)[1]}


def _comparison() -> pa.Table:
    return pa.Table.from_pylist([_row("latent_dpo", 6, 0.625, 0.75), _row("base_lm", 6, None, None)])


def _by_group() -> pa.Table:
    """Seen and unseen users only: no out_of_cohort users were evaluated."""
    rows = [dict(_row("latent_dpo", 4, 0.7, 0.8), group="seen"), dict(_row("base_lm", 4, None, None), group="seen"),
            dict(_row("latent_dpo", 2, 0.45, 0.55), group="unseen"),
            dict(_row("base_lm", 2, None, None), group="unseen")]
    return pa.Table.from_pylist(rows)


def _matrix() -> dict:
    """Rows judge, columns write. latent_dpo: rows positive [2, -1, 0.5] (mean 0.5, centred [1.5, -1.5, 0]) and
    negative [0.1, 0.3, 0.2] (centred [-0.1, 0.1, 0]): both diagonals are their row's max. lora_dpo: positive's row
    peaks at negative's policies (diagonal not max), and out_of_cohort's row lacks one cell."""
    cohorts = ["positive", "negative", "out_of_cohort"]
    users = {"positive": 3, "negative": 2, "out_of_cohort": 1}
    return {"baseline": "lora_dpo", "methods": {
        "lora_dpo": {"judges": cohorts, "writers": cohorts, "users": users,
                     "mean_reward": [[0.2, 0.4, 0.3], [0.0, 0.5, 0.1], [0.1, None, 0.3]]},
        "latent_dpo": {"judges": cohorts, "writers": cohorts, "users": users,
                       "mean_reward": [[2.0, -1.0, 0.5], [0.1, 0.3, 0.2], [0.4, 0.0, 0.2]]},
    }}


def _section(page: str, sid: str) -> str:
    found = re.search(rf"<section id='{sid}'>(.*?)</section>", page, re.S)
    assert found, sid
    return found.group(1)


def test_cohorts_section_follows_the_comparison():
    assert SECTIONS[SECTIONS.index("comparison") + 1] == "cohorts"


def test_row_centring():
    raw, centred = cohort_matrix_arrays(_matrix()["methods"]["latent_dpo"])
    np.testing.assert_allclose(raw[0], [2.0, -1.0, 0.5])
    np.testing.assert_allclose(centred[:2], [[1.5, -1.5, 0.0], [-0.1, 0.1, 0.0]], atol=1e-12)
    raw, centred = cohort_matrix_arrays(_matrix()["methods"]["lora_dpo"])
    assert np.isnan(raw[2, 1]) and np.isnan(centred[2, 1])      # a missing cell stays missing
    np.testing.assert_allclose(centred[2, [0, 2]], [-0.1, 0.1])  # ... and the row's mean skips it


def test_diagonal_summary_leaves_out_of_cohort_out():
    assert diagonal_summary(_matrix()["methods"]["latent_dpo"]) == (2, 2)
    assert diagonal_summary(_matrix()["methods"]["lora_dpo"]) == (1, 2)


def test_a_ragged_matrix_is_refused():
    with pytest.raises(ValueError, match="not a 2 x 2 grid"):
        cohort_matrix_arrays({"judges": ["a", "b"], "writers": ["a", "b"], "mean_reward": [[1.0, 2.0], [3.0]]})


def test_plot_cohort_matrix_writes_a_png(tmp_path):
    name = plot_cohort_matrix("lora_dpo", _matrix()["methods"]["lora_dpo"], str(tmp_path))
    assert name == "cohorts_lora_dpo.png" and (tmp_path / name).read_bytes()[:8] == PNG


def test_report_shows_the_new_columns_groups_and_cohorts(tmp_path):
    data = ReportData(run_id="r", title="t", comparison=_comparison(), comparison_by_group=_by_group(),
                      cohort_matrix=_matrix())
    page = open(render_report(str(tmp_path), data)).read()
    assert re.findall(r"<section id='([a-z-]+)'", page)[:2] == ["comparison", "cohorts"]

    comparison = html.unescape(_section(page, "comparison"))
    assert "<th>win_rate_vs_base</th><th>own_vs_swapped</th>" in comparison
    assert "<td>0.625 [0.575, 0.675]</td><td>0.750 [0.700, 0.800]</td>" in comparison
    assert "<td>base_lm</td><td>6</td><td>0.600 [0.500, 0.700]</td><td>–</td><td>–</td>" in comparison
    # one table per group that has users, with what the groups mean
    assert "<h3 class='group'>seen <small>(4 users; users whose pairs the CLaP's training read)" in comparison
    assert "<h3 class='group'>unseen <small>(2 users; cohort users held out" in comparison
    assert "<td>latent_dpo</td><td>2</td><td>0.600 [0.500, 0.700]</td><td>0.450 [0.400, 0.500]</td>" in comparison
    assert "<b>out_of_cohort</b> = users whose hidden reward is a random mixture" in comparison
    assert "No evaluated users in: out_of_cohort." in comparison
    assert "Not available" not in comparison

    cohorts = _section(page, "cohorts")
    assert "Not available" not in cohorts and "row-centred" in cohorts
    # latent DPO first, then the baseline; a PNG and a table each
    assert cohorts.index("<h3>latent_dpo</h3>") < cohorts.index("<h3>lora_dpo <small>(baseline)</small></h3>")
    assert re.findall(r"<img src='([^']+)'", cohorts) == ["cohorts_latent_dpo.png", "cohorts_lora_dpo.png"]
    for name in ("cohorts_latent_dpo.png", "cohorts_lora_dpo.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert "<th>positive <small>(n=3)</small></th>" in cohorts
    # diagonal boxed, row max bold, raw over centred
    assert "<td class='diag'><b>2<br><small>+1.5</small></b></td><td>-1<br><small>-1.5</small></td>" in cohorts
    assert "<td class='diag'>0.2<br><small>-0.1</small></td><td><b>0.4<br><small>+0.1</small></b></td>" in cohorts
    assert "<td>–<br><small>–</small></td>" in cohorts     # lora_dpo's missing cell
    assert "Diagonal is its row's maximum for 2 of 2 cohorts." in cohorts
    assert "Diagonal is its row's maximum for 1 of 2 cohorts." in cohorts


def test_missing_inputs_render_notes(tmp_path):
    data = ReportData(run_id="r", title="t", comparison=_comparison(),
                      notes={"cohorts": "The night wrote no cohort matrix (no X)."})
    page = open(render_report(str(tmp_path), data)).read()
    assert "Not available for this run: the per-group comparison" in _section(page, "comparison")
    cohorts = _section(page, "cohorts")
    assert "Not available for this run: the cohort x cohort matrix" in cohorts
    assert "The night wrote no cohort matrix (no X)." in cohorts and "<img" not in cohorts
    assert not [f for f in os.listdir(tmp_path) if f.startswith("cohorts_")]


def test_a_malformed_method_empties_only_itself(tmp_path):
    matrix = _matrix()
    matrix["methods"]["lora_dpo"]["mean_reward"] = [[0.1, 0.2]]
    page = open(render_report(str(tmp_path), ReportData(run_id="r", title="t", cohort_matrix=matrix))).read()
    cohorts = _section(page, "cohorts")
    assert "<img src='cohorts_latent_dpo.png'" in cohorts and "cohorts_lora_dpo.png" not in cohorts
    assert "a readable cohort matrix for lora_dpo (ValueError: mean_reward is not a 3 x 3 grid" in cohorts


def test_old_tables_without_the_new_columns_still_render(tmp_path):
    old = pa.table({"method": ["latent_dpo"], "users": [3], "win_rate": [0.5]})
    page = open(render_report(str(tmp_path), ReportData(run_id="r", title="t", comparison=old))).read()
    assert "own_vs_swapped" not in _section(page, "comparison")


# ------------------------------------------------------------------------------------------------ the collect side
class _Client:
    """MLflow client stand-in: serves `artifacts` {path: obj} as JSON files, anything else is missing."""

    def __init__(self, artifacts: dict | None = None):
        self.artifacts = artifacts or {}

    def download_artifacts(self, run_id, path, dst):
        if path not in self.artifacts:
            raise OSError(f"no artifact {path}")
        local = os.path.join(dst, os.path.basename(path))
        with open(local, "w") as fh:
            json.dump(self.artifacts[path], fh)
        return local


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


def test_collect_prefers_the_mlflow_artifact(store):
    store.write_json({"methods": {"other": {}}}, "runs", "r1", COHORT_MATRIX)
    found, note = cohort_matrix(_Client({f"comparison/{COHORT_MATRIX}": _matrix()}), store, "r1")
    assert found == _matrix() and note == ""


def test_collect_falls_back_to_the_store(store):
    store.write_json(_matrix(), "runs", "r1", COHORT_MATRIX)
    found, note = cohort_matrix(_Client(), store, "r1")
    assert found == _matrix() and note == ""


@pytest.mark.parametrize("content, says", [
    (None, "The night wrote no cohort matrix"),
    (b"{not json", "could not be read"),
    (b'{"methods": {}}', "has no methods"),
    (b"[1, 2]", "has no methods"),
])
def test_a_missing_or_broken_matrix_is_a_note_not_an_error(store, content, says):
    if content is not None:
        store.write_bytes(content, "runs", "r1", COHORT_MATRIX)
    found, note = cohort_matrix(_Client(), store, "r1")
    assert found is None and says in note
