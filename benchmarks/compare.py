"""Side-by-side comparison of every personalisation method on the same users and pairs (issue #6, #7).

    python benchmarks/compare.py --out compare.json [--preset tiny] [--store DIR] [--users 6]
                                 [--latent-types gaussian,discrete] [--set section.key=value ...]

Runs the real nightly flow (prepare -> pretrain -> personalize -> evaluate, `until=evaluate`) once per latent
type on one store, so the data stage is shared (digest-skipped on the second run) and every method sees the
same users, prompts and pairs:
- the first latent type's run also fits the baselines (LoRA-DPO, full DPO, P-Tuning-DPO, spec §5) per user
  through their Ray fan-out;
- the other latent types' runs evaluate only their own CLaP prior and per-user latent fits (methods suffixed
  with the latent type, e.g. `latent_dpo_discrete`).
Per method the JSON holds the means over the evaluated users (and 95% bootstrap intervals) of win rate vs the
true continuation, mean reward under each user's hidden reward, perplexity under the base LM, held-out
preference accuracy, per-user fit seconds, trainable parameters, artifact bytes and, for the baselines, the
FLOPs estimate and peak RSS.
Whether personalisation is *personal* (issue 27), per method as well: `win_rate_vs_base`, the share of prompts where
the method's text beats the plain LM's (base_lm, same prompt and seed) under the user's hidden reward, and
`own_vs_swapped`, the user's text against the text written for the evaluated user with the least similar hidden
reward (same prompt and seed, judged by the user's reward; 0.5 = nothing personal learnt; null for base_lm,
clap_prior and the oracle, whose text is nobody's own). The objects `seen` (users whose pairs the CLaP's training
read), `unseen` (cohort users it never read) and `out_of_cohort` (users outside every cohort) hold the same figures
over that group's users only (the night's `comparison_by_group.parquet`), for the groups the method has users in.
Everything is measured in this one invocation on this machine; the JSON records
the load average, since the box may be shared.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


METRICS = ("win_rate_vs_prior", "win_rate", "mean_reward", "perplexity", "heldout_accuracy", "latent_heldout_accuracy",
           "win_rate_vs_base", "own_vs_swapped")
GROUPS = ("seen", "unseen", "out_of_cohort")   # tasks/evaluate/personal.GROUPS, in the order the JSON lists them
BASELINES = ("lora_dpo", "full_dpo", "ptuning_dpo")


def _method_summary(row: dict[str, Any]) -> dict[str, Any]:
    """One method's row of the night's own comparison table (`tasks.evaluate.evaluate.summarise`: means over users
    with 95% bootstrap intervals, medians of the cost columns) in this benchmark's JSON layout."""
    out: dict[str, Any] = {"users": row["users"]}
    for key in METRICS + ("fit_seconds",):
        name = "seconds_per_user" if key == "fit_seconds" else key
        out[name] = row.get(key)
        if row.get(key) is not None:
            out[f"{name}_ci95"] = [row[f"{key}_lo"], row[f"{key}_hi"]]
    for key in ("trainable_params", "artifact_bytes", "fit_flops", "peak_rss_bytes"):
        out[key] = None if row.get(key) is None else float(row[key])
    return out


def _group_rows(night, run_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """{(group, method): comparison row} of one night: its `comparison_by_group.parquet`, else recomputed from its
    per-user rows when they carry the group (a night written before the file existed has neither: {})."""
    if night.exists("runs", run_id, "comparison_by_group.parquet"):
        table = night.read_table("runs", run_id, "comparison_by_group.parquet")
    else:
        from latentpref.tasks.evaluate.evaluate import summarise_by_group
        per_user = night.read_table("runs", run_id, "evaluation_per_user.parquet")
        if "group" not in per_user.column_names:
            logging.getLogger(__name__).warning("night %s has no user groups: no seen / unseen / out_of_cohort "
                                                "figures", run_id)
            return {}
        table = summarise_by_group(per_user)
    return {(row["group"], row["method"]): row for row in table.to_pylist()} if "method" in table.column_names else {}


LATENT_METHODS = ("latent_dpo", "clap_prior")


def run(preset: str, store: str, users: int, latent_types: list[str], overrides: list[str],
        modes: list[str] | None = None, baselines: list[str] | None = list(BASELINES), on_night=None) -> dict:
    """One night per (latent type, personalize mode); the first also fits the baselines. Later runs keep only
    their latent rows, suffixed `_<mode>` (non-default mode) and `_<latent type>` (non-Gaussian).
    `on_night(partial)` gets the result so far after each night (a long comparison keeps what it measured)."""
    from latentpref.pipelines.config import load_config
    from latentpref.pipelines.nightly import nightly
    from latentpref.tasks.data.store import Store

    modes = modes or [None]
    methods: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    t_all = time.perf_counter()
    combos = [(t, m) for t in latent_types for m in modes]
    for i, (latent_type, mode) in enumerate(combos):
        first = ", ".join(baselines) if baselines is not None else None
        sets = [f"runtime.store={store}", f"evaluate.n_users={users}", *overrides]
        if i > 0 or first is not None:   # the first run fits the baselines (the preset's unless --baselines)
            sets.insert(2, "evaluate.baselines=[" + (first if i == 0 else "") + "]")
        if latent_type != "gaussian":
            sets.append(f"pretrain.latent_type={latent_type}")
        if mode is not None:
            sets.append(f"personalize.mode={mode}")
        cfg = load_config(preset, overrides=sets)
        t0 = time.perf_counter()
        report = nightly(cfg, until="evaluate")
        seconds = time.perf_counter() - t0
        night = Store(store)
        per_user = night.read_table("runs", report.run_id, "evaluation_per_user.parquet").to_pylist()
        by_group = _group_rows(night, report.run_id)
        type_suffix = "" if latent_type == latent_types[0] else f"_{latent_type}"
        mode_suffix = "" if mode in (None, modes[0]) else "_" + mode.replace("-", "_")
        for row in night.read_table("runs", report.run_id, "comparison.parquet").to_pylist():
            method = row["method"]
            if i > 0 and method not in LATENT_METHODS:
                continue   # base LM, oracle and baselines: the first run's, on the same users and pairs
            if method == "clap_prior" and mode_suffix:
                continue   # the same CLaP prior as this latent type's first-mode run
            name = method + (mode_suffix if method == "latent_dpo" else "") + type_suffix
            methods[name] = _method_summary(row)
            methods[name]["latent_type"] = latent_type if method in LATENT_METHODS else None
            methods[name]["mode"] = cfg.personalize.mode if method == "latent_dpo" else None
            methods[name].update({g: _method_summary(by_group[g, method]) for g in GROUPS if (g, method) in by_group})
        runs[f"{latent_type}/{cfg.personalize.mode}"] = {
            "mlflow_run_id": report.run_id, "clap_version": report.clap_version, "seconds": round(seconds, 1),
            "users": sorted({r["user_id"] for r in per_user})}
        if on_night is not None and i + 1 < len(combos):
            on_night({"methods": methods, "runs": runs, "preset": preset, "overrides": overrides,
                      "seconds": round(time.perf_counter() - t_all, 1), "complete": False,
                      "nights_planned": [f"{t}/{m or 'preset mode'}" for t, m in combos]})
    return {"methods": methods, "runs": runs, "preset": preset, "overrides": overrides,
            "seconds": round(time.perf_counter() - t_all, 1), "complete": True}


def _write(args, result: dict) -> None:
    """The JSON, with where and how it was measured; written after every night, then once complete."""
    result.update({"load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "store": args.store or "temporary (deleted)"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--store", default=None, help="store to use (reused if it holds a finished run); "
                                                      "default: a temporary folder, deleted afterwards")
    parser.add_argument("--users", type=int, default=6, help="users evaluated with every method")
    parser.add_argument("--latent-types", default="gaussian,discrete")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma list of baselines fitted in the first run; 'preset' = the preset's own "
                             "evaluate.baselines")
    parser.add_argument("--modes", default=None, help="comma list of personalize modes to evaluate per latent "
                        "type (e.g. head-only,faithful); default: the preset's mode only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    # as the CLI does: a busy 2-core box can take longer than Prefect's default 20 s to start its ephemeral server
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    latent_types = [t.strip() for t in args.latent_types.split(",") if t.strip()]
    bad = [t for t in latent_types if t not in ("gaussian", "discrete")]
    if bad or not latent_types:
        parser.error(f"--latent-types: expected a comma list of gaussian, discrete; got {args.latent_types!r}")
    with tempfile.TemporaryDirectory(prefix="latentpref-compare-") as tmp:
        store = args.store or str(Path(tmp) / "store")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
        bad = [m for m in modes or [] if m not in ("head-only", "trunk-frozen", "faithful")]
        if bad:
            parser.error(f"--modes: expected a comma list of head-only, trunk-frozen, faithful; got {args.modes!r}")
        baselines = None if args.baselines == "preset" else [b.strip() for b in args.baselines.split(",") if b.strip()]
        bad = [b for b in baselines or [] if b not in BASELINES]
        if bad:
            parser.error(f"--baselines: expected 'preset' or a comma list of {', '.join(BASELINES)}; got {bad}")
        result = run(args.preset, store, args.users, latent_types, args.overrides, modes, baselines,
                     on_night=lambda partial: _write(args, partial))
    _write(args, result)
    print(json.dumps({m: {k: v.get(k) for k in ("win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped", "win_rate",
                                                 "heldout_accuracy", "seconds_per_user")}
                      for m, v in result["methods"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
