"""The spread of a preset's night: the same night's quality over seeds, and levers switched on and off (issues 27, 28).

    python benchmarks/nights.py --out benchmarks/results/nights-default.json \\
        [--night STORE:RUN_ID[:LABEL] ...]            # nights already run (e.g. the README command on a clean clone)
        [--preset default --seeds 1,2 --store DIR]    # and/or run more: `latentpref nightly --seed-shift N` each
        [--set section.key=value ...]                 # overrides of the nights it runs (a lever's on/off)

One night's quality figures are a sample: another seed draws other candidates, users, pairs, CLaP batches and
samples. Every night here is a whole night (prepare -> ... -> report) whose seeds are all shifted together
(`--seed-shift`); the JSON holds each night's figures (pooled and per user group: seen / unseen / out_of_cohort,
means over users with 95% bootstrap intervals, from the night's own comparison tables), its stage seconds, CLaP
version and NLL, the CPU it ran on, and per method and figure the mean, standard deviation, min and max over the
nights with the same `label` (default: "seeds"). Nights given with --night are read from their store as they are.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

FIGURES = ("win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped", "heldout_accuracy", "latent_heldout_accuracy",
           "perplexity", "mean_reward", "fit_seconds", "z_sensitivity_nats")
METHODS = ("latent_dpo", "latent_dpo_best_of_k", "clap_prior", "base_lm", "oracle_best_of_k", "lora_dpo", "ptuning_dpo", "full_dpo")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def night_population(store, digest: str | None):
    """A night store's population tables (data/population/<digest>/): `digest`, or the store's only one. Returns
    (digest, pairs table, users table, {user_id: group}). The read-outs of benchmarks/follow.py and space.py use it."""
    from latentpref.tasks.data.users import user_groups
    found = [v for v in store.listdir("data", "population") if store.exists("data", "population", v, "pairs.parquet")]
    if digest is None and len(found) != 1:
        raise SystemExit(f"error: the store holds {len(found)} population datasets {found}; name one with --data")
    digest = digest or found[0]
    pairs = store.read_table("data", "population", digest, "pairs.parquet")
    users = store.read_table("data", "population", digest, "users.parquet")
    return digest, pairs, users, dict(zip(users["user_id"].to_pylist(), user_groups(users)))


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"users": row.get("users")}
    for f in FIGURES:
        if row.get(f) is not None:
            out[f] = row[f]
            if row.get(f"{f}_lo") is not None:
                out[f"{f}_ci95"] = [row[f"{f}_lo"], row[f"{f}_hi"]]
    return out


def read_night(store_root: str, run_id: str, label: str) -> dict[str, Any]:
    """One finished night's figures from its store (runs/<run_id>/: comparison tables and nightly_report.json)."""
    from latentpref.tasks.data.store import Store
    store = Store(store_root)
    for name in ("comparison.parquet", "nightly_report.json"):
        if not store.exists("runs", run_id, name):
            raise ValueError(f"night {run_id} in {store_root} has no {name}: not a finished night of this store")
    report = store.read_json("runs", run_id, "nightly_report.json")
    pooled = {r["method"]: _figures(r) for r in store.read_table("runs", run_id, "comparison.parquet").to_pylist()}
    groups: dict[str, dict[str, Any]] = {}
    if store.exists("runs", run_id, "comparison_by_group.parquet"):
        for r in store.read_table("runs", run_id, "comparison_by_group.parquet").to_pylist():
            groups.setdefault(r["group"], {})[r["method"]] = _figures(r)
    manifest = {}
    clap = report.get("clap_version")
    if clap and store.exists("models", "clap", clap, "_manifest.json"):
        manifest = store.read_json("models", "clap", clap, "_manifest.json")
    return {"label": label, "run_id": run_id, "store": store_root, "clap_version": clap,
            "clap_final_metrics": manifest.get("final_metrics", {}), "seconds": report.get("seconds"),
            "stage_seconds": report.get("stage_seconds"), "stage_peak_mem_mb": report.get("stage_peak_mem_mb"),
            "methods": pooled, "groups": groups}


def spread(nights: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label, method (pooled and per group) and figure: mean, std (sample, over nights), min, max, n."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(n["label"] for n in nights):
        mine = [n for n in nights if n["label"] == label]
        entry: dict[str, Any] = {"nights": len(mine)}
        for scope in ("pooled", "seen", "unseen", "out_of_cohort"):
            tables = [n["methods"] if scope == "pooled" else n["groups"].get(scope, {}) for n in mine]
            for method in METHODS:
                for f in FIGURES:
                    vals = [t[method][f] for t in tables if method in t and t[method].get(f) is not None]
                    if vals:
                        entry.setdefault(scope, {}).setdefault(method, {})[f] = {
                            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            "min": min(vals), "max": max(vals), "n": len(vals)}
        out[label] = entry
    return out


TABLE_FIGURES = (("win_rate_vs_prior", "win vs prior"), ("win_rate_vs_base", "win vs base LM"),
                 ("own_vs_swapped", "own vs swapped"), ("heldout_accuracy", "held-out acc. (LM)"),
                 ("latent_heldout_accuracy", "held-out acc. (latent)"), ("perplexity", "perplexity"))


def markdown(nights: list[dict[str, Any]], label: str, method: str = "latent_dpo") -> str:
    """`method`'s figures over the nights of `label`: mean +- std (min-max) per user group, as a markdown table."""
    entry = spread(nights)[label]
    lines = ["| " + " | ".join(["group", *(name for _, name in TABLE_FIGURES)]) + " |",
             "|" + "---|" * (len(TABLE_FIGURES) + 1)]
    for scope in ("pooled", "seen", "unseen", "out_of_cohort"):
        figs = entry.get(scope, {}).get(method)
        if not figs:
            continue
        cells = []
        for key, _ in TABLE_FIGURES:
            f = figs.get(key)
            fmt = ".1f" if key == "perplexity" else ".2f"
            cells.append("–" if f is None else
                         f"{f['mean']:{fmt}} ± {f['std']:{fmt}} ({f['min']:{fmt}}-{f['max']:{fmt}})")
        lines.append(f"| {'all' if scope == 'pooled' else scope} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_night(preset: str, store: str, seed_shift: int, overrides: list[str]) -> str:
    from latentpref.pipelines.config import load_config
    from latentpref.pipelines.nightly import nightly
    cfg = load_config(preset, overrides=[f"runtime.store={store}", *overrides], seed_shift=seed_shift)
    return nightly(cfg).run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--night", action="append", default=[], metavar="STORE:RUN_ID[:LABEL]",
                        help="a finished night to read (repeatable)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", default="", help="comma list of seed shifts to run (e.g. 1,2)")
    parser.add_argument("--store", default=None, help="store of the nights it runs (one per seed: STORE/seed<N>)")
    parser.add_argument("--label", default="seeds", help="label of the nights it runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    nights = []
    for spec in args.night:
        parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.split(":", 1)
        if len(parts) < 2:
            parser.error(f"--night {spec!r}: expected STORE:RUN_ID[:LABEL]")
        store, run_id, label = (parts + ["seeds"])[:3]
        nights.append(read_night(store, run_id, label))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if seeds and not args.store:
        parser.error("--seeds needs --store (each seed's night keeps its store: STORE/seed<N>)")
    for shift in seeds:
        store = str(Path(args.store) / f"seed{shift}")
        t0 = time.perf_counter()
        run_id = run_night(args.preset, store, shift, args.overrides)
        night = read_night(store, run_id, args.label)
        night.update({"seed_shift": shift, "overrides": args.overrides, "wall_s": round(time.perf_counter() - t0, 1)})
        nights.append(night)
        _write(args.out, nights)
    _write(args.out, nights)
    for label in dict.fromkeys(n["label"] for n in nights):
        print(f"{label} ({sum(n['label'] == label for n in nights)} nights), latent_dpo, mean ± std (min-max):")
        print(markdown(nights, label))
    return 0


def _write(out: str, nights: list[dict[str, Any]]) -> None:
    result = {"nights": nights, "spread": spread(nights), "cpu": _cpu(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "load_average": list(os.getloadavg())}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
