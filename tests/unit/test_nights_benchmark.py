"""benchmarks/nights.py: a night's figures read back from its store, and their spread over nights."""
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "nights.py"
spec = importlib.util.spec_from_file_location("nights_benchmark", _PATH)
nights = importlib.util.module_from_spec(spec)
sys.modules["nights_benchmark"] = nights
spec.loader.exec_module(nights)


def _night(root: Path, run_id: str, win: float, own: float) -> None:
    run = root / "runs" / run_id
    run.mkdir(parents=True)
    row = {"method": "latent_dpo", "users": 4, "win_rate_vs_prior": win, "win_rate_vs_prior_lo": win - 0.1,
           "win_rate_vs_prior_hi": win + 0.1, "own_vs_swapped": own, "own_vs_swapped_lo": own - 0.1,
           "own_vs_swapped_hi": own + 0.1}
    pq.write_table(pa.Table.from_pylist([row]), run / "comparison.parquet")
    pq.write_table(pa.Table.from_pylist([dict(row, group="unseen", users=2)]), run / "comparison_by_group.parquet")
    (run / "nightly_report.json").write_text(json.dumps({"clap_version": "c1", "seconds": 900.0,
                                                         "stage_seconds": {"pretrain": 300.0}}))


def test_read_nights_and_their_spread(tmp_path):
    _night(tmp_path, "r1", 0.6, 0.7)
    _night(tmp_path, "r2", 0.7, 0.8)
    got = [nights.read_night(str(tmp_path), r, "seeds") for r in ("r1", "r2")]
    assert got[0]["methods"]["latent_dpo"]["win_rate_vs_prior_ci95"] == pytest.approx([0.5, 0.7])
    assert got[1]["groups"]["unseen"]["latent_dpo"]["users"] == 2
    s = nights.spread(got)["seeds"]
    assert s["nights"] == 2
    win = s["pooled"]["latent_dpo"]["win_rate_vs_prior"]
    assert win["mean"] == pytest.approx(0.65) and win["min"] == 0.6 and win["max"] == 0.7
    assert win["std"] == pytest.approx(0.0707, abs=1e-3)
    assert s["unseen"]["latent_dpo"]["own_vs_swapped"]["mean"] == pytest.approx(0.75)


def test_read_night_refuses_an_unfinished_night(tmp_path):
    (tmp_path / "runs" / "r0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no comparison.parquet"):
        nights.read_night(str(tmp_path), "r0", "seeds")


def test_night_population_finds_the_stores_only_dataset_or_the_named_one(tmp_path):
    from latentpref.tasks.data.store import Store
    store = Store(str(tmp_path))

    def population(digest: str, groups: list[str]) -> None:
        folder = tmp_path / "data" / "population" / digest
        folder.mkdir(parents=True)
        ids = [f"{digest}-u{i}" for i in range(len(groups))]
        pq.write_table(pa.table({"user_id": ids, "group": groups}), folder / "users.parquet")
        pq.write_table(pa.table({"user_id": ids, "prompt": ["p"] * len(ids)}), folder / "pairs.parquet")

    population("aa", ["population", "holdout"])
    digest, pairs, users, groups = nights.night_population(store, None)
    assert digest == "aa" and pairs.num_rows == 2 and groups == {"aa-u0": "population", "aa-u1": "holdout"}
    population("bb", ["out_of_cohort"])
    with pytest.raises(SystemExit, match="2 population datasets"):
        nights.night_population(store, None)
    assert nights.night_population(store, "bb")[3] == {"bb-u0": "out_of_cohort"}
