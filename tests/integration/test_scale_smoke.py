"""Smoke test of the scale benchmark (benchmarks/scale.py --quick): two small head-only nights through the real
fan-out (`fan_out_fits` + `run_chunk`) into the policy table, a 10^4-row table upserted and looked up, a tiny night
and table on a moto S3 server; the encode section is skipped. Checks the JSON has every key with sane values, so the
full run (tens of minutes) is known to work before it is started.
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
NIGHT_KEYS = ("users", "changed", "tasks", "wall_s", "predicted_s", "objects_written", "encoded_texts",
              "driver_peak_rss_mb")


def test_scale_quick_writes_every_key_with_sane_values(tmp_path):
    out = tmp_path / "scale.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seconds = time.monotonic() - t0
    r = json.loads(out.read_text())

    assert r["machine"]["cores"] >= 1 and r["machine"]["versions"]["lance"] and r["machine"]["versions"]["ray"]
    assert len(r["machine"]["load_avg_at_start"]) == 3 and len(r["machine"]["load_avg_at_end"]) == 3
    assert r["settings"]["quick"] is True and r["settings"]["head"]["params"] == 4160   # tiny: Q 4, d 64, D 32

    nights = r["nights"]
    assert [n["users"] for n in nights] == [128, 256]
    upt = r["settings"]["users_per_task"]
    for n in nights:
        assert set(NIGHT_KEYS) <= set(n)
        assert n["changed"] == n["users"] == n["fitted"]               # every user changed and fitted
        assert n["tasks"] == math.ceil(n["users"] / upt)
        assert n["encoded_texts"] == 0                                  # synthetic latent cache
        assert 0 < n["objects_written"] <= 3 * n["tasks"] + 50
        assert n["objects_by_kind"]["lance_data"] == n["tasks"]        # one fragment per task
        assert n["objects_by_kind"]["records_parts"] == n["tasks"] and n["objects_by_kind"]["records"] == 1
        assert n["wall_s"] > 0 and n["predicted_s"] > 0 and n["commits"] >= 1
        assert 0 < n["driver_peak_rss_mb"] < 2048
    assert nights[0]["table_rows_after"] == 128
    assert nights[1]["table_rows_before"] == 128 and nights[1]["table_rows_after"] == 256   # 128 upserted, 128 new
    assert all(p["t_fit_s_per_user"] > 0 and p["t_io_s_per_user"] > 0 for p in r["nights_probes"])
    assert len(r["nights_probes"]) == 3 and r["nights_probes"][0] == r["nights_probes"][2]   # --quick: one probe

    t = r["table"]
    assert t["rows"] == 10_000 and t["upsert_rows"] == 1_000 and t["replaced_rows"] == 1_000
    assert t["row_bytes"] >= 4 * 4160 and t["files"] > 0 and t["upsert_s"] > 0
    assert 0 < t["lookup_p50_ms"] <= t["lookup_p99_ms"]
    assert t["lookup_detail"]["lookups_not_one_row"] == 0              # the upsert replaced, not duplicated
    check = t["row_delete_check"]                                      # upserts beyond fragment 0 replace too
    assert check["duplicates"] == 0 and check["rows_total"] == 2000
    probe = t["compaction_probe"]
    assert probe["fragments_after"] < probe["fragments_before"]
    assert probe["after"]["policy_columns"]["lookups_not_one_row"] == 0

    s = r["s3"]
    assert s["rows"] == 2_000 and s["row_bytes"] >= 4 * 4160 and s["puts_per_night"] > 0
    assert s["puts_per_night"] == s["night"]["s3_requests"]["PUT"]
    assert 0 < s["lookup_p50_ms"] <= s["lookup_p99_ms"]
    assert s["lookup_detail"]["lookups_not_one_row"] == 0
    assert s["night"]["objects_written"] <= 3 * s["night"]["tasks"] + 50

    assert r["encode"] == {"skipped": True}
    assert isinstance(r["targets_met"], dict) and r["targets"]["lookup_p99_ms_local"] == 10.0
    print(f"scale --quick: {seconds:.0f}s")
