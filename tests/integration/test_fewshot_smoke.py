"""Smoke test of the few-shot benchmark (issue 15 item 6) on the session's tiny night.

`benchmarks/fewshot.py` reads the store (CLaP, base LM, pairs, users, prompts) and writes only its finished result
into it (`reports/fewshot/<clap_version>.json`, for the report), so it runs on the finished store of
`test_generate.tiny_night` directly, with that night's overrides: 2 users, N in {1, 2}, every method.
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_generate import SMALLER, tiny_night   # tests/integration is on sys.path (pytest's default rootdir imports)

pytestmark = pytest.mark.slow

FEWSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "fewshot.py"


def _fewshot():
    spec = importlib.util.spec_from_file_location("fewshot_bench", FEWSHOT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def curve(session_dir, tmp_path_factory):
    _, _, store = tiny_night(session_dir)
    out = tmp_path_factory.mktemp("fewshot") / "fewshot.json"
    overrides = [o for o in SMALLER if not o.startswith("runtime.")]
    t0 = time.perf_counter()
    argv = ["--out", str(out), "--store", store, "--preset", "tiny", "--users", "2", "--n-pairs", "1,2"]
    for o in overrides:
        argv += ["--set", o]
    assert _fewshot().main(argv) == 0
    return json.loads(out.read_text()), time.perf_counter() - t0, store


def test_curve_has_every_method_and_point(curve):
    result, seconds, _ = curve
    assert result["n_pairs"] == [1, 2] and result["preset"] == "tiny"
    assert set(result["methods"]) == {"latent_dpo", "latent_dpo_faithful", "lora_dpo", "clap_prior"}
    for name, m in result["methods"].items():
        for metric in ("heldout_accuracy", "win_rate_vs_prior", "seconds_per_user"):
            assert len(m[metric]) == 2, (name, metric)
            assert len(m[f"{metric}_ci"]) == 2 and all(len(ci) == 2 for ci in m[f"{metric}_ci"])
        assert all(0.0 <= v <= 1.0 for v in m["heldout_accuracy"] + m["win_rate_vs_prior"]), name
        assert m["users"] == 2
    # issue 27: is it personal (per method and N, the night's measures), and per user group
    for name, m in result["methods"].items():
        for metric in ("win_rate_vs_base", "own_vs_swapped"):
            assert len(m[metric]) == 2 and len(m[f"{metric}_ci"]) == 2, (name, metric)
            assert [len(v) for v in m[f"{metric}_per_user"]] == [2, 2], (name, metric)
        assert all(0.0 <= v <= 1.0 for v in m["win_rate_vs_base"]), name
        if name != "clap_prior":   # two users: each is the other's swap partner
            assert all(0.0 <= v <= 1.0 for v in m["own_vs_swapped"]), name
        groups = [result["user_groups"][u] for u in result["users"][:m["users"]]]
        assert {g for g in ("seen", "unseen", "out_of_cohort") if g in m} == set(groups), name
        for g in set(groups):
            assert m[g]["users"] == groups.count(g) and len(m[g]["win_rate_vs_prior"]) == 2, (name, g)
    assert result["methods"]["clap_prior"]["own_vs_swapped"] == [None, None]   # the same text for everyone
    assert set(result["user_groups"]) == set(result["users"])
    assert result["clap_read_pairs"] is False   # the tiny preset's CLaP reads no pairs: no user is "seen"
    assert "seen" not in result["user_groups"].values()
    assert result["methods"]["clap_prior"]["heldout_accuracy"] == [0.5, 0.5]
    assert result["methods"]["clap_prior"]["win_rate_vs_prior"] == [0.5, 0.5]
    for name in ("latent_dpo", "latent_dpo_faithful", "lora_dpo"):
        assert all(s > 0 for s in result["methods"][name]["seconds_per_user"]), name
    assert result["n_pairs_used"] == [[1, 1], [2, 2]]
    # the night's settings, read from the config with the night's overrides
    assert result["settings"]["lora_dpo"]["steps"] == 4
    assert result["settings"]["latent"]["head-only"]["steps"] == 30
    # budget: well under 2 minutes on an idle 2-core box; 143 s measured at load average ~35 (shared box), so only a
    # runaway fails here
    assert seconds < 600, f"the smoke run took {seconds:.0f}s"


def test_renders(curve, tmp_path):
    sys.path.insert(0, str(FEWSHOT.parent))
    import render
    result, _, _ = curve
    (tmp_path / "fewshot.json").write_text(json.dumps(result))
    text = render.fewshot_table(render.Results(tmp_path))
    assert "N = 1" in text and "latent_dpo_faithful" in text


def test_the_store_gets_the_same_result(curve):
    """--store: the finished result is also in the store, keyed by the CLaP version, where the report finds it."""
    from latentpref.pipelines.report import fewshot_result
    from latentpref.tasks.data.store import Store
    result, _, store = curve
    copy = Path(store, "reports", "fewshot", f"{result['clap_version']}.json")
    assert copy.exists()
    canonical = (lambda obj: json.dumps(obj, sort_keys=True))   # NaN-safe equality
    assert canonical(json.loads(copy.read_text())) == canonical(result)
    assert result["complete"] is True   # partial results go to --out only
    found, note = fewshot_result(Store(store), result["clap_version"])
    assert note == "" and canonical(found) == canonical(result)


def test_resume_keeps_the_measured_points_and_refuses_other_inputs(curve, tmp_path):
    """--resume: an interrupted run's --out (partial, N = 1 done) is continued: N = 1 is taken over as stored (marked
    values prove it was not measured again), N = 2 is measured; a resume on other inputs is refused, naming them."""
    result, _, store = curve
    partial = json.loads(json.dumps(result))
    partial["complete"], partial["n_pairs"], partial["n_pairs_used"] = False, [1], result["n_pairs_used"][:1]
    for m in partial["methods"].values():
        for key in [k for k in m if k.endswith("_per_user")]:
            m[key] = m[key][:1]
    partial["methods"]["latent_dpo"]["heldout_accuracy_per_user"] = [[0.125, 0.875]]
    out = tmp_path / "fewshot.json"
    out.write_text(json.dumps(partial))
    argv = ["--out", str(out), "--store", store, "--preset", "tiny", "--users", "2", "--n-pairs", "1,2", "--resume"]
    for o in [o for o in SMALLER if not o.startswith("runtime.")]:
        argv += ["--set", o]
    assert _fewshot().main(argv) == 0
    resumed = json.loads(out.read_text())
    assert resumed["complete"] is True and resumed["n_pairs"] == [1, 2]
    latent = resumed["methods"]["latent_dpo"]
    assert latent["heldout_accuracy_per_user"][0] == [0.125, 0.875] and latent["heldout_accuracy"][0] == 0.5
    assert len(latent["heldout_accuracy_per_user"][1]) == 2
    assert all(0.0 <= v <= 1.0 for v in latent["heldout_accuracy_per_user"][1])
    assert all(s > 0 for s in latent["seconds_per_user_per_user"][1])
    assert any(n.startswith("resumed: N = [1]") for n in resumed["notes"])
    out.write_text(json.dumps(partial))
    with pytest.raises(ValueError, match="users"):
        _fewshot().main([*argv[:7], "1", *argv[8:]])     # --users 1
    with pytest.raises(ValueError, match="--lora-users"):
        _fewshot().main([*argv, "--lora-users", "1"])    # LoRA-DPO on 1 of the 2 users: its per-user lists differ
    # a curve measured before issue 27 lacks own_vs_swapped / win_rate_vs_base: refused (its texts are gone)
    for m in partial["methods"].values():
        for key in [k for k in m if k.startswith(("own_vs_swapped", "win_rate_vs_base"))]:
            del m[key]
    out.write_text(json.dumps(partial))
    with pytest.raises(ValueError, match="own_vs_swapped / win_rate_vs_base .* rerun without --resume"):
        _fewshot().main(argv)


def test_out_of_cohort_users_are_added_after_the_others():
    """--out-of-cohort-users K: the first K users outside the cohorts join after the --users sorted ids (a hand-made
    night: users of the three groups, every user with a train and a held-out pair except u00001's missing held-out)."""
    fewshot = _fewshot()
    pa = fewshot.pa
    users = pa.table({"user_id": ["u00000", "u00001", "u00002", "u00003", "u00004", "u00005"],
                      "group": ["population", "population", "holdout", "population", "out_of_cohort",
                                "out_of_cohort"]})
    train = pa.table({"user_id": users["user_id"].to_pylist()})
    heldout = pa.table({"user_id": ["u00000", "u00002", "u00003", "u00004", "u00005"]})
    night = SimpleNamespace(users=users, train=train, heldout=heldout)
    assert fewshot.pick_users(night, 2) == ["u00000", "u00002"] == fewshot.pick_users(night, 2, 0)
    assert fewshot.pick_users(night, 2, 1) == ["u00000", "u00002", "u00004"]
    assert fewshot.pick_users(night, 5, 2) == ["u00000", "u00002", "u00003", "u00004", "u00005"]