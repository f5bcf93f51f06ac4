"""Smoke test of the spec-sized CLaP benchmark (benchmarks/clap_spec.py, issue #14's GPU run) on CPU, tiny sizes.

It runs the real sampling, CLaP stages 1 and 2 (with the OOM-safe micro-batch accumulation) and the posterior
probe on the random tiny Llama, so the script a lent GPU machine runs is known to work before device time is spent.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "clap_spec.py"


def _clap_spec():
    spec = importlib.util.spec_from_file_location("clap_spec_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--pool-tokens", "--bow-weight", "1"]], ids=["product", "pool-bow"])
def test_clap_spec_runs_both_stages_and_probes_the_posterior(tmp_path, extra):
    out = tmp_path / "clap_spec.json"
    argv = ["--out", str(out), "--base", "tiny-llama", "--device", "cpu", "--prompts", "40", "--candidates", "4",
            "--prompt-tokens", "16", "--response-tokens", "12", "--prompts-per-batch", "4",
            "--responses-per-prompt", "4", "--micro-prompts", "3", "--stage2-micro-prompts", "2",
            "--stage1-steps", "4", "--stage2-steps", "2", "--probe-prompts", "8", "--probe-every", "2", *extra]
    assert _clap_spec().main(argv) == 0
    result = json.loads(out.read_text())
    assert result["sampling"]["candidates"] == 40 * 4
    assert result["settings"]["pool_tokens"] is bool(extra)
    for stage, steps in (("stage1", 4), ("stage2", 2)):
        s = result[stage]
        assert s["steps"] == steps and s["micro_prompts"] in (3, 2)
        assert math.isfinite(s["final"]["loss"]) and s["median_step_s"] > 0
        assert s["projected_spec_stage_s"] == pytest.approx(3125 * s["median_step_s"])
    if extra:
        assert result["stage1"]["final"]["bow_per_token"] > 0
    probe = result["probe"]
    assert probe["rows"] == 8 * 4
    steps = [(p["stage"], p["step"]) for p in probe["posterior_mean"]]
    assert steps == [(1, 0), (1, 2), (1, 4), (2, 2)]
    assert all(-1.0 <= p["corr"] <= 1.0 for p in probe["posterior_mean"])
    assert -1.0 <= probe["lm_layer8_mean_pooled"] <= 1.0
    assert result["projected_spec_pretrain_s"] == pytest.approx(
        result["stage1"]["projected_spec_stage_s"] + result["stage2"]["projected_spec_stage_s"])


def test_clap_spec_reuses_its_candidates_cache_and_refuses_a_mismatched_one(tmp_path):
    bench = _clap_spec()
    cache = tmp_path / "cands.parquet"
    base = ["--base", "tiny-llama", "--device", "cpu", "--candidates", "2", "--prompt-tokens", "8",
            "--response-tokens", "6", "--prompts-per-batch", "2", "--responses-per-prompt", "2", "--stage1-steps", "1",
            "--stage2-steps", "0", "--probe-prompts", "4", "--probe-every", "1", "--candidates-cache", str(cache)]
    assert bench.main(["--out", str(tmp_path / "a.json"), "--prompts", "30", *base]) == 0
    assert cache.is_file()
    assert bench.main(["--out", str(tmp_path / "b.json"), "--prompts", "30", *base]) == 0
    first, second = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert "sampling_read_from" not in first and second["sampling_read_from"] == "cands.parquet"
    assert second["sampling"]["new_tokens_per_s"] is None and first["sampling"]["new_tokens_per_s"] > 0
    assert second["probe"]["mean_within_prompt_range"] == pytest.approx(first["probe"]["mean_within_prompt_range"])
    with pytest.raises(ValueError, match="holds other prompts"):
        bench.main(["--out", str(tmp_path / "c.json"), "--prompts", "40", *base])


def test_clap_spec_on_a_nights_population_with_the_preference_term(tmp_path):
    """--population reads a night's prompts, candidates and pairs instead of sampling; --preference-weight trains the
    population preference term and every probe scores the users' held-out pairs from the posterior means."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    words = "good bad great awful fun dull moving flat".split()
    n = 12
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n)],
                             "prompt": [f"The film was {words[i % 8]} and" for i in range(n)],
                             "split": ["train"] * 8 + ["val"] * 4}), tmp_path / "prompts.parquet")
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n) for _ in range(4)],
                             "text": [f" it felt {words[(i + j) % 8]} to me" for i in range(n) for j in range(4)]}),
                   tmp_path / "candidates.parquet")
    users = ["ua", "ub"] * 8
    pq.write_table(pa.table({"user_id": users, "prompt": [f"The film was {words[i % 8]} and" for i in range(16)],
                             "chosen": [" it felt great" if u == "ua" else " it felt awful" for u in users],
                             "rejected": [" it felt awful" if u == "ua" else " it felt great" for u in users],
                             "weight": [1.0] * 16, "split": ["train"] * 12 + ["heldout"] * 4}),
                   tmp_path / "pairs.parquet")
    out = tmp_path / "pref.json"
    argv = ["--out", str(out), "--base", "tiny-llama", "--device", "cpu", "--population", str(tmp_path),
            "--preference-weight", "10", "--preference-pairs", "4", "--prompt-tokens", "12", "--response-tokens", "8",
            "--prompts-per-batch", "2", "--responses-per-prompt", "4", "--stage1-steps", "2", "--stage2-steps", "0",
            "--probe-prompts", "4", "--probe-every", "1"]
    assert _clap_spec().main(argv) == 0
    result = json.loads(out.read_text())
    assert result["sampling_read_from"] == tmp_path.name and result["settings"]["population"] == tmp_path.name
    assert result["probe"]["pairs"]["users"] == 2 and result["probe"]["pairs"]["heldout"] == 4
    assert result["probe"]["rows"] == 4 * 4
    assert math.isfinite(result["stage1"]["final"]["preference"])
    for row in result["probe"]["posterior_mean"]:
        assert 0.0 <= row["pair_heldout_accuracy"] <= 1.0 and 0.0 <= row["direction_heldout_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="--preference-weight needs --population"):
        _clap_spec().main(["--out", str(tmp_path / "x.json"), "--base", "tiny-llama", "--device", "cpu",
                           "--preference-weight", "1", "--stage1-steps", "0", "--stage2-steps", "0"])
