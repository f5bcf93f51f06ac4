"""Render the published benchmark figures of README.md and benchmarks/README.md from benchmarks/results/*.json.

    python benchmarks/render.py            # rewrite every generated region in place
    python benchmarks/render.py --check    # exit 1 naming each stale region (nothing written)

A generated region sits between marker comments; everything outside the markers is left alone:

    <!-- table:personalize -->            a block (a Markdown table, or a note when its JSON is missing)
    ...
    <!-- /table -->
    ... prose <!-- text:scale-inputs -->...<!-- /text --> prose ...     an inline fragment

Each region NAME is one function in `RENDERERS` that reads the JSONs it needs through `Results`. A missing result
file (serve.json, fewshot.json and compare-small.json are optional) leaves its table out with a note naming the
file and the command that makes it; a missing key inside a present file is shown as "n/a". A figure with no JSON
behind it (a measured night, a micro-benchmark by hand) stays hand-typed in the prose and says where it comes from.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")
NA = "n/a"

# a region's body never holds another comment, so a stray opening marker cannot swallow the text up to a later close
REGION = re.compile(r"(?P<open><!-- (?P<kind>table|text):(?P<name>[a-z0-9_.-]+) -->)(?P<body>(?:(?!<!--).)*?)"
                    r"(?P<close><!-- /(?P=kind) -->)", re.S)

# how to make each optional result (named in the note of a table left out)
MAKE = {
    "personalize.json": "python benchmarks/personalize.py --out benchmarks/results/personalize.json",
    "compare.json": "python benchmarks/compare.py --out benchmarks/results/compare.json",
    "compare-small.json": "python benchmarks/compare.py --preset small --out benchmarks/results/compare-small.json",
    "generate.json": "python benchmarks/generate.py --out benchmarks/results/generate.json",
    "serve.json": "python benchmarks/serve.py --out benchmarks/results/serve.json",
    "fewshot.json": "python benchmarks/fewshot.py --out benchmarks/results/fewshot.json",
    "clap_throughput*.json": "python benchmarks/clap_throughput.py --out benchmarks/results/clap_throughput_NAME.json",
    "clap_spec*.json": "python benchmarks/clap_spec.py --out benchmarks/results/clap_spec_NAME.json",
}


class MissingResult(Exception):
    """A result file a region needs is not in the results folder."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class Results:
    """The result JSONs of one folder, read once each."""

    def __init__(self, folder: Path | str = RESULTS):
        self.folder = Path(folder)
        self._cache: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self._cache:
            path = self.folder / name
            if not path.exists():
                raise MissingResult(name)
            self._cache[name] = json.loads(path.read_text())
        return self._cache[name]

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.folder.glob(pattern))

    def each(self, pattern: str) -> list[tuple[str, Any]]:
        """(name, parsed JSON) of every file matching `pattern`, sorted by name; MissingResult when none does."""
        names = self.glob(pattern)
        if not names:
            raise MissingResult(pattern)
        return [(name, self(name)) for name in names]


# ------------------------------------------------------------------------------------------------ formatting
def get(d: Any, *keys: Any) -> Any:
    """d[k1][k2]... or None where any level is missing."""
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def num(x: Any, digits: int = 2) -> str:
    """A number with `digits` decimals (thousands separated); integers as integers; None -> n/a."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NA
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and digits == 0):
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def sig(x: Any, figures: int = 3) -> str:
    """A number to `figures` significant figures (never an exponent)."""
    if x is None:
        return NA
    x = float(x)
    if x == 0:
        return "0"
    digits = figures - 1 - int(math.floor(math.log10(abs(x))))
    return f"{x:,.{digits}f}" if digits > 0 else f"{round(x, digits):,.0f}"


def kb(n: Any) -> str:
    return NA if n is None else f"{n / 1000:,.1f} KB"


def times(x: Any) -> str:
    return NA if x is None else f"{x:,.0f}x" if x >= 100 else f"{x:,.1f}x"


CHANCE = 0.5   # a preference accuracy's coin-flip level (ties count half)


def cheaper(speedup: Any) -> str:
    """A speedup vs a baseline in words: 23.6 -> '23.6x cheaper', 0.174 -> '5.7x dearer'."""
    if speedup is None:
        return NA
    return f"{times(speedup)} cheaper" if speedup >= 1 else f"{times(1 / speedup)} dearer"


def ci(x: Any, lo_hi: Any, digits: int = 2) -> str:
    if x is None:
        return NA
    if isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 and None not in lo_hi:
        return f"{num(x, digits)} [{num(lo_hi[0], digits)}, {num(lo_hi[1], digits)}]"
    return num(x, digits)


def load(avg: Any) -> str:
    """The 1-minute load average of a getloadavg() triple (or a bare number)."""
    v = avg[0] if isinstance(avg, (list, tuple)) and avg else avg
    return NA if v is None else f"{v:.2f}"


def duration(s: float) -> str:
    """Seconds as the unit a reader plans with: s, min, h, d."""
    if s < 100:
        return f"{s:.0f} s"
    if s < 100 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    if s < 100 * 86400:
        return f"{s / 86400:.1f} d"
    return f"{s / 86400:.0f} d"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; `align` one character per column: l, r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def source(*names: str) -> str:
    return "Generated by `python benchmarks/render.py` from " + ", ".join(f"`benchmarks/results/{n}`" for n in names) + "."


# ------------------------------------------------------------------------------------------------ personalize
MODES = ("head-only", "trunk-frozen", "faithful")


def _per_user_slot_wall(detail: dict | None) -> float | None:
    if not detail or not detail.get("users"):
        return None
    return detail["wall_s"] * detail.get("workers", 1) / detail["users"]


def _carried(p: dict, key: str) -> str:
    """A label suffix for a section copied from an earlier run (`personalize.py --carry`)."""
    return " (earlier run, its own settings)" if key in (get(p, "carried", "keys") or []) else ""


def personalize_table(r: Results) -> str:
    p = r("personalize.json")
    world, tput = p.get("world", {}), p.get("throughput_detail", {})
    lora = p.get("lora_detail", {})
    held = p.get("heldout_detail", {})
    passes = lora.get("epochs")
    cols = [*MODES, "lora_dpo"]
    lora_s = get(p, "settings", "lora_dpo") or {}
    targets = lora_s.get("target_modules")   # recorded since the small-preset run; a GPT-2 base's is c_attn
    lora_params = (f"{num(lora_s['trainable_params'])} (peft, {', '.join(targets)})" if lora_s.get("trainable_params")
                   else f"(peft, {', '.join(targets)})" if targets else "(peft)")

    def row(label: str, cell: Callable[[str], str]) -> list[str]:
        return [label, *(cell(m) for m in cols)]

    def target(m: str, mode: str, text: str) -> str:
        return f" ({text})" if m == mode else ""

    rows = [
        row("trained parameters per user",
            lambda m: lora_params if m == "lora_dpo" else num(get(world, "trainable_params", m))),
        row("artifact (safetensors)", lambda m: "" if m == "lora_dpo" else
            kb(get(world, "artifact_bytes", m)) + target(m, "head-only", "target ≤ 64 KiB")),
        row("steps / lr / noise draws (product settings)", lambda m: "" if m == "lora_dpo" else
            f"{num(get(p, 'settings', 'steps', m))} / {get(p, 'settings', 'lr', m)} / "
            f"{get(p, 'settings', 'noise_draws', m) or 'fresh'}"),
        row("users/hour, 2 cores, wall" + _carried(p, "throughput_detail"), lambda m: "" if m == "lora_dpo" else
            num(get(p, "users_per_hour", m), 0) + target(m, "head-only", "target ≥ 100,000")
            + (f" ({num(get(tput, m, 'steps'))} steps)" if _carried(p, "throughput_detail") else "")),
        row("CPU s per user (product steps)" + _carried(p, "throughput_detail"), lambda m: "" if m == "lora_dpo" else
            sig(get(tput, m, "cpu_s_per_user"))),
        row(f"s per user, same {num(get(p, 'settings', 'pairs_per_user'))} pairs, {num(passes)} passes"
            + _carried(p, "lora_detail"),
            lambda m: sig(get(p, "seconds_per_user", m))),
        row("speedup vs LoRA-DPO (same passes)", lambda m: "1x" if m == "lora_dpo" else
            times(get(p, "speedup_vs_lora_dpo", m)) + target(m, "faithful", "target ≥ 10x")),
    ]
    if p.get("heldout_accuracy"):   # the latent-space measure (its section can be skipped: `--skip heldout`)
        rows.append(row(f"latent-space held-out accuracy ({num(held.get('users'))} users, "
                        f"{num(held.get('heldout_pairs'))} pairs; prior {num(get(p, 'heldout_accuracy', 'prior'), 2)})"
                        + _carried(p, "heldout_detail"),
                        lambda m: "" if m == "lora_dpo" else num(get(p, "heldout_accuracy", m), 3)))
    prod = p.get("product")
    if prod:   # issue #15 item 1: one user alone at the night's settings, its own encoding counted
        q = prod.get("quality", {})

        def reached(m: str) -> str:
            hit = get(q, "reached", m)
            return f"{sig(hit['seconds'])} ({num(hit['steps'])} steps)" if hit else "not reached"

        rows[2] = row("steps / lr / noise draws (product settings)", lambda m:
                      f"{num(lora_s.get('steps'))} steps of {num(lora_s.get('batch_size'))} pairs / {lora_s.get('lr')}"
                      if m == "lora_dpo" else f"{num(get(p, 'settings', 'steps', m))} / {get(p, 'settings', 'lr', m)} / "
                      f"{get(p, 'settings', 'noise_draws', m) or 'fresh'}")
        rows += [
            row(f"s per user alone, product settings, {num(prod.get('users'))} real users (fit + own encoding)",
                lambda m: sig(get(prod, "seconds_per_user_with_encoding", m))),
            row("of which the user's own encoding (latent: CLaP cache; LoRA: reference log-probs)",
                lambda m: sig(get(prod, "encode_seconds_per_user", m))),
            row("speedup vs LoRA-DPO at product settings (wall, with encoding)", lambda m: "1x" if m == "lora_dpo"
                else times(get(prod, "speedup_vs_lora_dpo", m))),
            row("speedup vs LoRA-DPO at product settings (CPU s, fit only)", lambda m: "1x" if m == "lora_dpo"
                else times(get(prod, "speedup_vs_lora_dpo_cpu_fit_only", m))),
            row(f"held-out accuracy through the LM, product settings ({num(prod.get('heldout_pairs'))} pairs)",
                lambda m: num(get(prod, "heldout_accuracy", m), 3)),
            row(f"s per user to LM held-out accuracy ≥ {num(q.get('target_heldout_accuracy'), 3)}", reached),
            row("speedup vs LoRA-DPO at equal quality", lambda m: "1x" if m == "lora_dpo"
                else times(get(q, "speedup_vs_lora_dpo", m))),
        ]
        if p.get("users_per_hour_with_encoding"):   # measured only with the throughput section in the same run
            rows.insert(-3, row("users/hour, 2 cores, batched fit + own encoding", lambda m: "" if m == "lora_dpo"
                                else num(get(p, "users_per_hour_with_encoding", m), 0)))
    header = ["", *MODES, f"LoRA-DPO (r = {num(lora_s.get('r', 8))})"]
    return table(header, rows) + "\n\n" + source("personalize.json")


def personalize_reading(r: Results) -> str:
    """What the product-settings rows say, in words (cost order, where the time goes, what equal quality means)."""
    p = r("personalize.json")
    prod = p.get("product")
    if not prod:
        return "no product-settings section in this run"
    enc, total = prod.get("encode_seconds_per_user", {}), prod.get("seconds_per_user_with_encoding", {})
    q = prod.get("quality", {})
    t = q.get("target_heldout_accuracy")
    best = {m: max(c["heldout_accuracy"] for c in q.get("curves", {}).get(m, [{"heldout_accuracy": float("nan")}]))
            for m in MODES}
    head_share = (enc.get("head-only") or 0) / total["head-only"] if total.get("head-only") else None
    parts = [
        "one user alone at the product settings: " + ", ".join(
            f"{m} {cheaper(get(prod, 'speedup_vs_lora_dpo', m))}" for m in MODES) + " than LoRA-DPO (wall, own "
        "encoding counted)",
        f"of head-only's {sig(total.get('head-only'))} s, {NA if head_share is None else f'{head_share * 100:.0f}%'} "
        "is the user's own encoding (the user's texts through the LM and the CLaP encoder), not the fit",
    ]
    if t is not None:
        chance = f" (below chance, {CHANCE})" if t < CHANCE else ""
        parts.append(
            f"the equal-quality target is {num(t, 3)}{chance}: the best LM held-out accuracy anywhere on each latent "
            "mode's step grid is " + ", ".join(f"{m} {num(best[m], 3)}" for m in MODES)
            + f", and LoRA-DPO's at its product steps is {num(get(prod, 'heldout_accuracy', 'lora_dpo'), 3)} "
            f"({num(prod.get('heldout_pairs'))} held-out pairs of {num(prod.get('users'))} users)")
    return "; ".join(parts)


def fewshot_full_users_fit(r: Results) -> str:
    """The few-shot curve's fit seconds, at its largest N, of the users who had all N pairs (a like-for-like point
    for the personalize table's per-user seconds)."""
    f = r("fewshot.json")
    n, used = f["n_pairs"][-1], f["n_pairs_used"][-1]
    c = f["methods"]["latent_dpo_faithful"]
    full = [s for s, k in zip(c["fit_seconds_per_user"][-1], used) if k == n]
    threads = get(f, "machine", "threads")
    return (f"its faithful fits of the {len(full)} users with all {n} pairs took {sig(min(full))}-{sig(max(full))} s "
            f"with {num(threads)} threads")


def personalize_machine(r: Results) -> str:
    m = r("personalize.json").get("machine", {})
    return (f"{num(m.get('cpus'))} CPU cores, one intra-op thread per worker process; load average "
            f"{load(m.get('load_avg_at_start'))} at the start, {load(m.get('load_avg_at_end'))} at the end "
            f"({num(m.get('total_seconds'), 0)} s in all)")


def personalize_world(r: Results) -> str:
    p = r("personalize.json")
    w, s = p.get("world", {}), p.get("settings", {})
    version = str(w.get("clap_version") or NA)[:8]
    return (f"{s.get('preset', NA)} preset's stored run, CLaP {version}: "
            f"d = {num(w.get('d'))}, D = {num(w.get('latent_dim'))} latents, {num(w.get('n_query'))} queries, "
            f"{num(w.get('prompt_tokens'))}-token prompts, {num(w.get('response_tokens'))}-token responses; "
            f"{num(s.get('pairs_per_user'))} pairs per user")


def personalize_settings(r: Results) -> str:
    s = r("personalize.json").get("settings", {})

    def per_mode(key: str, fmt: Callable[[Any], str]) -> str:
        return " / ".join(fmt(get(s, key, m)) for m in MODES)

    return (f"{per_mode('steps', num)} full-batch Adam steps, lr {per_mode('lr', str)}, noise draws "
            f"{per_mode('noise_draws', lambda v: 'fresh every step' if v is None else str(v))} "
            f"(head-only / trunk-frozen / faithful), beta {s.get('beta', NA)}, {num(s.get('n_samples'))} samples per "
            f"source, evidence ratio {s.get('evidence_ratio', NA)}, {str(s.get('loss_type', NA)).upper()}")


def personalize_measured_on(r: Results) -> str:
    t = r("personalize.json").get("throughput_detail", {})
    parts = []
    for m in MODES:
        d = t.get(m, {})
        how = "extrapolated to an hour" if d.get("extrapolated") else "measured"
        parts.append(f"{m} {how} from {num(d.get('users'))} users on {num(d.get('workers'))} worker processes")
    return "; ".join(parts)


def personalize_passes(r: Results) -> str:
    lora = r("personalize.json").get("lora_detail", {})
    return (f"{num(lora.get('epochs'))} passes over the same pairs for every method (latent modes: "
            f"{num(lora.get('latent_steps'))} full-batch steps; LoRA-DPO: {num(lora.get('lora_steps'))} steps of "
            f"{num(lora.get('lora_batch_pairs'))} pairs), mean over {num(lora.get('users'))} users")


# ------------------------------------------------------------------------------------------------ capacity model
SIZES = {"head-only": (4, 5, 6, 7), "trunk-frozen": (6,), "faithful": (4, 5, 6, 7)}
CLUSTERS = ((1, 2), (2, 16), (10, 16), (100, 16))


def _capacity_inputs(p: dict) -> dict[str, Any]:
    sr = p.get("scale_run", {})
    fixed = get(sr, "fixed_s") or {}
    t_fixed = (fixed.get("ray_start") or 0.0) + (fixed.get("worker_warmup") or 0.0)
    # t_encode: a user's own texts through the LM + CLaP encoder (the latent cache the fits read), per user of
    # pairs_per_user pairs: the product section's one-user encode seconds per pair (issue 15: users/hour counts it)
    prod = p.get("product") or {}
    pairs = prod.get("train_pairs_per_user") or []
    per_user = get(p, "settings", "pairs_per_user")
    t_encode = {m: (get(prod, "encode_seconds_per_user", m) / (sum(pairs) / len(pairs)) * per_user
                    if pairs and per_user and get(prod, "encode_seconds_per_user", m) is not None else None)
                for m in MODES}
    return {"U": sr.get("users_per_task", 256), "t_io": get(sr, "model_inputs", "nonfit_s_per_user"),
            "T_fixed": t_fixed, "fixed": fixed, "t_encode": t_encode}


def predicted_wall(n_users: int, slots: int, users_per_task: int, t_user: float, t_fixed: float) -> float:
    """The capacity model: T_fixed + ceil(ceil(N / U) / S) * U * t (benchmarks/README.md)."""
    tasks = math.ceil(n_users / users_per_task)
    return t_fixed + math.ceil(tasks / slots) * min(users_per_task, n_users) * t_user


def capacity_terms(r: Results) -> str:
    p = r("personalize.json")
    t, c = p.get("throughput_detail", {}), _capacity_inputs(p)
    head = t.get("head-only", {})
    fixed = c["fixed"]
    rows = [
        ["`t_fit`, head-only", f"{sig(head.get('cpu_s_per_user'))} s CPU/user ({sig(_per_user_slot_wall(head))} s "
         f"wall per user per slot)", f"{num(p.get('settings', {}).get('pairs_per_user'))} pairs, "
         f"{num(head.get('steps'))} steps; linear in pairs and steps; hardly depends on d"],
        ["`t_fit`, trunk-frozen / faithful", " / ".join(sig(get(t, m, "cpu_s_per_user")) for m in MODES[1:])
         + " s CPU/user", f"{' / '.join(num(get(t, m, 'steps')) for m in MODES[1:])} steps; "
         f"{num(get(p, 'world', 'trainable_params', 'trunk-frozen'))} / "
         f"{num(get(p, 'world', 'trainable_params', 'faithful'))} trained parameters; scales with encoder FLOPs "
         "(below)"],
        ["`t_encode` (the user's own texts through the LM + CLaP encoder)",
         NA if c["t_encode"]["head-only"] is None else f"{sig(c['t_encode']['head-only'])} s/user",
         f"{num(get(p, 'settings', 'pairs_per_user'))} pairs, from the product section's one-user encoding "
         "(seconds per pair); the same for every latent mode; not in the scale run (synthetic cache)"],
        ["`t_io` (fit_chunk's non-fit part per user)",
         NA if c["t_io"] is None else f"{c['t_io'] * 1000:.1f} ms",
         "data hash, current-fit lookup, 3 small writes, local disk (scale run, steps = 0)"],
        ["`T_fixed`", f"{num(fixed.get('ray_start'), 1)} s Ray start + {num(fixed.get('worker_warmup'), 1)} s "
         "worker warm-up (imports)", "scale run; encoder modes add one CLaP load per worker (cached across its tasks)"],
    ]
    return table(["term", "measured", "note"], rows, "lll") + "\n\n" + source("personalize.json")


def capacity_settings(r: Results) -> str:
    p = r("personalize.json")
    c = _capacity_inputs(p)
    steps = " / ".join(num(get(p, "throughput_detail", m, "steps")) for m in MODES)
    enc = "t_encode + " if c["t_encode"]["head-only"] is not None else ""
    return (f"`t = {enc}t_fit + t_io` on CPU time (an unshared box), `T_fixed` = {c['T_fixed']:.1f} s, "
            f"`U` = {num(c['U'])}, "
            f"at the product's steps ({steps} for head-only / trunk-frozen / faithful)")


def capacity_predicted(r: Results) -> str:
    p = r("personalize.json")
    t, c = p.get("throughput_detail", {}), _capacity_inputs(p)
    header = ["users changed", *(f"{n} node{'s' if n > 1 else ''} x {k} cores" for n, k in CLUSTERS)]
    rows = []
    for mode, exps in SIZES.items():
        cpu = get(t, mode, "cpu_s_per_user")
        if cpu is None or c["t_io"] is None:
            rows.append([f"{mode}", *([NA] * len(CLUSTERS))])
            continue
        for e in exps:
            t_user = cpu + c["t_io"] + (c["t_encode"][mode] or 0.0)
            cells = [duration(predicted_wall(10 ** e, n * k, c["U"], t_user, c["T_fixed"]))
                     for n, k in CLUSTERS]
            rows.append([f"{mode} 10^{e}", *cells])
    return table(header, rows) + "\n\n" + source("personalize.json")


# ------------------------------------------------------------------------------------------------ scale run
def scale_inputs(r: Results) -> str:
    sr = r("personalize.json").get("scale_run", {})
    probes = sr.get("probes") or [{}]
    t_io = get(sr, "model_inputs", "nonfit_s_per_user")
    return (f"`t_fit` from a {num(probes[0].get('users'))}-user probe on the same data and steps run just before "
            f"({sig(_per_user_slot_wall(probes[0]))} s wall per user per slot) and again just after "
            f"({sig(_per_user_slot_wall(probes[-1]))} s), `t_io` = {NA if t_io is None else f'{t_io * 1000:.1f}'} ms from "
            f"`fit_chunk` with steps = 0, `T_fixed` from the run")


def scale_setup(r: Results) -> str:
    sr = r("personalize.json").get("scale_run", {})
    return (f"{num(sr.get('users'))} head-only users, {num(sr.get('tasks'))} `fit_chunk` tasks of "
            f"{num(sr.get('users_per_task'))} users on local Ray with {num(sr.get('workers'))} CPUs, "
            f"{num(sr.get('steps'))} steps per user")


def scale_table(r: Results) -> str:
    sr = r("personalize.json").get("scale_run", {})
    t_io = get(sr, "model_inputs", "nonfit_s_per_user")
    ratio = sr.get("measured_over_predicted")
    rows = [
        [f"measured ({num(sr.get('users'))} users, Ray start to last artifact)",
         f"{num(sr.get('wall_s'), 1)} s ({num(sr.get('users_per_hour_end_to_end'), 0)} users/hour end to end, at "
         f"{num(sr.get('steps'))} steps)"],
        [f"predicted, probe before ({sig(get(sr, 'model_inputs', 'fit_s_per_user_slot'))} s wall per user per slot + "
         f"{NA if t_io is None else f'{t_io * 1000:.1f}'} ms t_io)",
         f"{num(sr.get('predicted_wall_s'), 1)} s (measured / predicted = {num(ratio)})"],
        ["predicted, probe after", f"{num(sr.get('predicted_wall_s_probe_after'), 1)} s"],
        ["predicted, mean of the two probes", f"{num(sr.get('predicted_wall_s_probe_mean'), 1)} s"],
        ["predicted from CPU time", f"{num(sr.get('predicted_wall_s_idle_box'), 1)} s"],
    ]
    return table(["", "wall time"], rows, "ll") + "\n\n" + source("personalize.json")


def scale_observed(r: Results) -> str:
    sr = r("personalize.json").get("scale_run", {})
    probes = sr.get("probes") or []
    ratio = sr.get("measured_over_predicted")
    walls = " and ".join(f"{num(q.get('wall_s'), 1)} s" for q in probes)
    users = num(probes[0].get("users")) if probes else NA
    if ratio is None:
        verdict = "the capacity model's error is n/a"
    elif ratio <= 1:
        verdict = f"the capacity model over-predicts by {(1 - ratio) * 100:.0f}%"
    else:
        verdict = f"the capacity model under-predicts by {(ratio - 1) * 100:.0f}%"
    share = sr.get("cpu_share_during_fanout")
    return (f"load average {load(sr.get('load_avg_before'))} before, {load(sr.get('load_avg_after'))} after; the "
            f"workers got {NA if share is None else f'{share * 100:.0f}%'} of the CPU during the fan-out; the two "
            f"probes took {walls} for {users} users, and {verdict}")


# ------------------------------------------------------------------------------------------------ compare
COMPARE_COLUMNS = (   # (key, header, digits); a column shows when any method has its key
    ("latent_type", "latent", None),
    ("mode", "mode", None),
    ("users", "users", 0),
    ("win_rate_vs_prior", "win rate vs prior [95% CI]", 2),
    ("win_rate_vs_base", "win rate vs base LM [95% CI]", 2),   # issue 27 (absent from earlier JSONs: no column)
    ("own_vs_swapped", "own vs swapped [95% CI]", 2),
    ("win_rate", "win rate [95% CI]", 2),
    ("mean_reward", "mean reward [95% CI]", 2),
    ("perplexity", "perplexity", 0),
    ("heldout_accuracy", "held-out accuracy", 2),
    ("latent_heldout_accuracy", "latent held-out accuracy", 2),
    ("seconds_per_user", "s per user", 2),
    ("trainable_params", "trained parameters", 0),
    ("artifact_bytes", "artifact", None),
)


TEXT_COLUMNS = ("latent_type", "mode")
# issue 27: per user group, the figures that say whether personalisation is personal
GROUPS = ("seen", "unseen", "out_of_cohort")
GROUP_COLUMNS = (("win_rate_vs_prior", "win rate vs prior"), ("win_rate_vs_base", "win rate vs base LM"),
                 ("own_vs_swapped", "own vs swapped"), ("heldout_accuracy", "held-out accuracy (LM)"))
GROUP_NOTE = ("seen = users whose pairs the CLaP's training read, unseen = cohort users it never read, out of cohort = "
              "users outside every cohort; own vs swapped = the user's text against the text written for the evaluated "
              "user with the least similar hidden reward, judged by the user's reward (0.5 = nothing personal); held-out "
              "accuracy = the LM run's ranking of the user's held-out pairs (the policy against its reference)")


def _personal(pairs: list[tuple[str, str | None]]) -> str:
    """' (label value, ...)' of the (label, value) pairs that have a value; '' when none has (an earlier JSON)."""
    shown = [f"{label} {value}" for label, value in pairs if value is not None]
    return f" ({', '.join(shown)})" if shown else ""


def _compare_groups(methods: dict) -> str:
    """The per-group figures of a comparison (`seen` / `unseen` / `out_of_cohort` objects of each method) as a table;
    '' when no method has any (a JSON made before issue 27)."""
    rows = []
    for method, m in methods.items():
        for group in GROUPS:
            g = m.get(group)
            if isinstance(g, dict):
                rows.append([method, group.replace("_", " "), num(g.get("users")),
                             *(ci(g[k], g.get(f"{k}_ci95")) if g.get(k) is not None else "" for k, _ in GROUP_COLUMNS)])
    if not rows:
        return ""
    return ("By user group (" + GROUP_NOTE + "):\n\n"
            + table(["method", "group", "users", *(f"{h} [95% CI]" for _, h in GROUP_COLUMNS)], rows,
                    "llr" + "r" * len(GROUP_COLUMNS))
            + "\n\n")


def _compare_table(r: Results, name: str) -> str:
    c = r(name)
    methods = c.get("methods", {})
    cols = [col for col in COMPARE_COLUMNS if any(m.get(col[0]) is not None for m in methods.values())]
    rows = []
    for method, m in methods.items():
        cells = [method]
        for key, _, digits in cols:
            v = m.get(key)
            if key == "seconds_per_user" and not m.get("trainable_params"):
                cells.append("")                      # nothing fitted (base LM, priors, oracle)
            elif key in TEXT_COLUMNS:
                cells.append(v or "")
            elif key == "artifact_bytes":
                cells.append(kb(v) if v else "")
            elif key in ("trainable_params", "users"):
                cells.append(num(int(v)) if v else "")
            elif f"{key}_ci95" in m:
                cells.append(ci(v, m[f"{key}_ci95"], digits))
            else:
                cells.append(num(v, digits) if v is not None else "")
        rows.append(cells)
    runs = c.get("runs", {})
    times_ = ", ".join(f"{k} night {num(v.get('seconds'), 0)} s" for k, v in runs.items())
    note = (f"Preset `{c.get('preset', NA)}`, overrides {c.get('overrides') or 'none'}; {times_}; "
            f"{num(c.get('seconds'), 0)} s in all on {num(c.get('cpu_count'))} CPUs, load average "
            f"{load(c.get('load_average'))}. Means over users with 95% bootstrap intervals; s per user = the "
            "evaluation's per-user fit time.")
    if c.get("complete") is False:
        planned = ", ".join(c.get("nights_planned") or []) or NA
        n_planned = len(c.get("nights_planned") or [])
        note += (f" Partial: {len(runs)} of the {n_planned} planned nights finished ({', '.join(runs) or 'none'}; "
                 f"planned: {planned}).")
    if c.get("notes"):
        note += " " + " ".join(c["notes"])
    align = "l" + "".join("l" if key in TEXT_COLUMNS else "r" for key, _, _ in cols)
    return (table(["method", *(h for _, h, _ in cols)], rows, align) + "\n\n" + _compare_groups(methods) + note + " "
            + source(name))


def compare_table(r: Results) -> str:
    return _compare_table(r, "compare.json")


def compare_small_table(r: Results) -> str:
    return _compare_table(r, "compare-small.json")


# ------------------------------------------------------------------------------------------------ generate
def generate_table(r: Results) -> str:
    g = r("generate.json")
    rows = [
        ["requests (distinct users, personalised)",
         f"{num(g.get('requests'))} ({num(g.get('distinct_users'))}, {num(g.get('personalized_requests'))})"],
        ["new tokens per request, decoding", f"{num(g.get('max_new_tokens'))}, {g.get('decoding', NA)}"],
        ["batched tokens/s", num(g.get("batched_tokens_per_s"), 0)],
        ["one request at a time, tokens/s", num(g.get("sequential_tokens_per_s"), 0)],
        ["speedup", f"{times(g.get('speedup'))} (target {times(g.get('target_speedup'))}: "
                    f"{'met' if g.get('meets_target') else 'not met'})"],
        ["batched == one at a time (greedy)", num(g.get("outputs_match"))],
        ["timing", f"{g.get('timing', NA)}; {num(g.get('torch_threads'))} torch thread(s), {g.get('device', NA)}, "
                   f"load average {load(g.get('load_average_1m'))}"],
    ]
    return table(["", "value"], rows, "ll") + "\n\n" + source("generate.json")


# ------------------------------------------------------------------------------------------------ CLaP throughput
def clap_throughput_table(r: Results) -> str:
    results = r.each("clap_throughput*.json")
    rows = []
    for name, t in results:
        dtype = t.get("lm_dtype") or get(t, "model", "dtype") or NA
        prefix = get(t, "clap_config", "prefix_init") or "random"

        def rate(key: str, ratio: str | None = None) -> str:
            v = t.get(f"{key}_tokens_per_s")
            if v is None:
                return NA
            return f"{v:,.0f}" + (f" ({t[ratio]:.2f})" if ratio and t.get(ratio) is not None else "")

        rows.append([f"`{name}`", f"{t.get('base', NA)}, {dtype}, prefix {prefix}, {num(t.get('threads'))} thr",
                     num(get(t, "batch", "tokens_per_step")), rate("plain_finetune"),
                     rate("clap_stage1", "stage1_ratio"), rate("clap_stage2", "stage2_ratio"),
                     rate("clap_stage2_full_passes", "stage2_full_passes_ratio"),
                     times(t.get("stage2_speedup_shared_prompt_cache")),
                     load(t.get("load_average_1m_start_end"))])
    header = ["file", "base, LM dtype, prefix, threads", "tokens/step", "plain fine-tune tok/s",
              "stage 1 tok/s (vs plain)", "stage 2 tok/s (vs plain)", "stage 2, B full passes (vs plain)",
              "shared prompt cache speedup", "load"]
    return table(header, rows, "ll" + "r" * 7) + "\n\n" + source(*(name for name, _ in results))


# ------------------------------------------------------------------------------------------------ CLaP at spec size
def _lm_probe(t: dict) -> float | None:
    """A clap_spec result's probe on the frozen LM's states (its key names the layer)."""
    return next((v for k, v in (t.get("probe") or {}).items() if k.startswith("lm_layer")), None)


def clap_spec_table(r: Results) -> str:
    """benchmarks/clap_spec.py: CLaP step times (projected to the spec's 3,125 steps per stage) and the posterior
    probe next to the frozen LM's, one row per result file, each with the sizes it ran at."""
    results = r.each("clap_spec*.json")
    rows = []
    for name, t in results:
        cfg = t.get("settings") or {}
        variant = [f"KL weight {cfg['kl_weight']:g}" if cfg.get("kl_weight", 1.0) != 1.0 else "",
                   f"{cfg['encoder_layers']} encoder blocks" if cfg.get("encoder_layers", 2) != 2 else "",
                   "pooled encoder view" if cfg.get("pool_tokens") else "",
                   f"bag-of-words weight {cfg['bow_weight']:g}" if cfg.get("bow_weight") else "",
                   f"population preference weight {cfg['preference_weight']:g}" if cfg.get("preference_weight")
                   else ""]
        variant = ", ".join(v for v in variant if v) or "product settings"
        n_prompts, n_rows = get(t, "sampling", "prompts"), get(t, "sampling", "candidates")
        per_prompt = round(n_rows / n_prompts) if n_prompts and n_rows else cfg.get("candidates", NA)
        sizes = (f"{num(n_prompts)} prompts x {per_prompt} candidates, "
                 f"{cfg.get('prompt_tokens', NA)} + {cfg.get('response_tokens', NA)} tokens; steps of "
                 f"{cfg.get('prompts_per_batch', NA)} x {cfg.get('responses_per_prompt', NA)} rows")
        probe = t.get("probe") or {}
        curve = probe.get("posterior_mean") or []
        lm = _lm_probe(t)

        def stage(n: int) -> str:
            s = t.get(f"stage{n}")
            if not s:
                return "not run"
            memory = f", peak {num(s['peak_gpu_memory_gb'], 1)} GB" if s.get("peak_gpu_memory_gb") else ""
            return (f"{num(s.get('steps'))} steps, {s['median_step_s']:.3g} s/step{memory}; 3,125 steps: "
                    f"{duration(s['projected_spec_stage_s'])}")
        sampling = t.get("sampling") or {}
        sampled = (f"{num(get(t, 'timings_s', 'sample_candidates'), 0)} s ({num(sampling['new_tokens_per_s'], 0)} "
                   "tok/s)" if sampling.get("new_tokens_per_s") else f"read from {t.get('sampling_read_from', NA)}")
        where = t.get("device_name") or t.get("device", NA)
        if t.get("load_average_1m_start_end"):
            where += f" (load {load(t['load_average_1m_start_end'])})"
        pair_curve = [p for p in curve if p.get("stage") == 1 and p.get("pair_heldout_accuracy") is not None]
        rows.append([f"`{name}`", f"{where}; {variant}", sizes, sampled,
                     stage(1), stage(2),
                     ", ".join(f"{p['step']}: {p['corr']:.3f}" for p in curve if p.get("stage") == 1),
                     f"{num(lm, 3)} ({num(probe.get('prompts'))} prompts)" if lm is not None else NA,
                     ", ".join(f"{p['step']}: {p['pair_heldout_accuracy']:.3f}" for p in pair_curve) or NA])
    header = ["file", "device; CLaP variant", "sizes", "candidate sampling", "stage 1", "stage 2 (contrastive)",
              "probe: posterior mean, step: corr", "probe: frozen LM layer 8",
              "users' held-out pairs, linear in the posterior mean, step: accuracy"]
    return table(header, rows, "llll" + "r" * 5) + "\n\n" + source(*(name for name, _ in results))


# ------------------------------------------------------------------------------------------------ serve
def serve_table(r: Results) -> str:
    s = r("serve.json")
    met = s.get("meets_target") or {}

    def flag(key: str) -> str:
        return "" if key not in met else (" (target met)" if met[key] else " (target not met)")

    rows = [
        ["requests (errors)", f"{num(s.get('requests'))} ({num(s.get('errors'))}){flag('errors')}"],
        ["tokens/s under load", num(s.get("tokens_per_s"), 1)],
        ["tokens/s, one request at a time", num(s.get("sequential_tokens_per_s"), 1)],
        ["speedup", times(s.get("speedup")) + flag("speedup")],
        ["latency p50 / p99", f"{num(s.get('p50_ms'), 0)} ms / {num(s.get('p99_ms'), 0)} ms"],
        ["RSS at start → end", f"{num(s.get('rss_mb_start'), 0)} MB → {num(s.get('rss_mb_end'), 0)} MB"
                              + flag("rss_within_10pct")],
        ["reloads (night switch under load)", num(s.get("reloads")) + flag("switch")],
        ["mixed-version responses", num(s.get("mixed_version_responses"))],
    ]
    extra = [(k, v) for k, v in (("stored users", s.get("stored_users")), ("distinct users", s.get("distinct_users")),
                                 ("client threads", s.get("concurrency")), ("max tokens", s.get("max_tokens")),
                                 ("CPUs", s.get("cpu_count")), ("load average", s.get("load_average_1m")))
             if v is not None]
    note = "; ".join(f"{k} {load(v) if k == 'load average' else num(v)}" for k, v in extra)
    return table(["", "value"], rows, "ll") + "\n\n" + (note + ". " if note else "") + source("serve.json")


# ------------------------------------------------------------------------------------------------ few-shot
def _point(v: Any) -> str:
    """One curve point: a number, [mean, lo, hi], or {mean|value, lo, hi}."""
    if isinstance(v, dict):
        mean = v.get("mean", v.get("value"))
        return ci(mean, [v.get("lo"), v.get("hi")]) if "lo" in v else num(mean)
    if isinstance(v, (list, tuple)):
        return ci(v[0], list(v[1:3])) if len(v) == 3 else NA
    return num(v)


def fewshot_table(r: Results) -> str:
    f = r("fewshot.json")
    n_pairs = f.get("n_pairs", [])
    rows = []
    for method, curves in f.get("methods", {}).items():
        label = method + (f" ({curves['mode']})" if curves.get("mode") else "") + \
            (f", {curves['users']} users" if curves.get("users") else "")
        for metric in ("heldout_accuracy", "win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped",
                       "seconds_per_user"):
            values, cis = curves.get(metric), curves.get(f"{metric}_ci") or []
            if values is None or (metric in FEWSHOT_PERSONAL and all(v is None for v in values)):
                continue   # issue 27's measures: absent from earlier curves, null for the prior
            cells = []
            for i in range(len(n_pairs)):
                v = values[i] if i < len(values) else None
                lo_hi = cis[i] if i < len(cis) else None
                digits = 3 if metric == "seconds_per_user" else 2
                cells.append(NA if v is None else ci(v, lo_hi, digits) if lo_hi and lo_hi[0] is not None
                             else _point(v))
            rows.append([label, metric.replace("_", " "), *cells])
    m = f.get("machine", {})
    note = (f"Preset `{f.get('preset', NA)}`" + (f", overrides {', '.join(f['overrides'])}" if f.get("overrides") else "")
            + f"; N capped at what each user has (`n_pairs_used`); means over users with 95% bootstrap intervals; "
            f"{num(m.get('total_seconds'), 0)} s on {num(m.get('cpus'))} CPUs, load average "
            f"{load(m.get('load_avg_at_start'))} at the start. "
            + " ".join(n.rstrip() if n.rstrip().endswith(".") else n.rstrip() + "." for n in f.get("notes", [])))
    return table(["method", "measure", *(f"N = {n}" for n in n_pairs)], rows, "ll" + "r" * len(n_pairs)) + \
        "\n\n" + _fewshot_groups(f) + note.strip() + " " + source("fewshot.json")


FEWSHOT_PERSONAL = ("win_rate_vs_base", "own_vs_swapped")
FEWSHOT_GROUP_COLUMNS = (("heldout_accuracy", "held-out accuracy"), *GROUP_COLUMNS)


def _fewshot_groups(f: dict) -> str:
    """The curve's per-group figures at its largest N (each method's `seen` / `unseen` / `out_of_cohort` objects) as
    a table; '' when no method has any (a curve made before issue 27)."""
    n_pairs = f.get("n_pairs") or []
    rows = []
    for method, curves in f.get("methods", {}).items():
        for group in GROUPS:
            g = curves.get(group)
            if not isinstance(g, dict):
                continue
            cells = []
            for key, _ in FEWSHOT_GROUP_COLUMNS:
                v, lo_hi = get(g, key, -1), get(g, f"{key}_ci", -1)
                cells.append("" if v is None else ci(v, lo_hi))
            rows.append([method, group.replace("_", " "), num(g.get("users")), *cells])
    if not rows:
        return ""
    return (f"By user group at N = {num(n_pairs[-1] if n_pairs else None)} (" + GROUP_NOTE + "):\n\n"
            + table(["method", "group", "users", *(f"{h} [95% CI]" for _, h in FEWSHOT_GROUP_COLUMNS)], rows,
                    "llr" + "r" * len(FEWSHOT_GROUP_COLUMNS)) + "\n\n")


# ------------------------------------------------------------------------------------------------ README headline
def readme_headline(r: Results) -> str:
    rows = []

    def add(name: str, what: Callable[[], str]) -> None:
        try:
            rows.append([f"[`{name}`](benchmarks/README.md)", what()])
        except MissingResult:
            rows.append([f"`{name}`", f"not measured yet (`{MAKE.get(name, '')}`)"])

    def personalize() -> str:
        p = r("personalize.json")
        prod = p.get("product")
        if prod:
            eq = get(prod, "quality", "speedup_vs_lora_dpo") or {}
            uph = (f"{num(get(p, 'users_per_hour_with_encoding', 'head-only'), 0)} users/hour on "
                   f"{num(get(p, 'machine', 'cpus'))} CPU cores (batched, own encoding counted)"
                   if p.get("users_per_hour_with_encoding") else
                   f"{num(get(p, 'users_per_hour', 'head-only'), 0)} users/hour on {num(get(p, 'machine', 'cpus'))} "
                   f"CPU cores (batched fit only{_carried(p, 'throughput_detail')})")
            target = get(prod, "quality", "target_heldout_accuracy")
            chance = ", below chance" if target is not None and target < CHANCE else ""
            return (f"head-only {uph}; one user alone at "
                    f"the {get(p, 'settings', 'preset')} preset's settings, faithful latent DPO "
                    f"{cheaper(get(prod, 'speedup_vs_lora_dpo', 'faithful'))} and head-only "
                    f"{cheaper(get(prod, 'speedup_vs_lora_dpo', 'head-only'))} than LoRA-DPO; at equal LM "
                    f"held-out accuracy ({num(target, 3)}{chance}) faithful "
                    f"{cheaper(eq.get('faithful'))}, head-only {cheaper(eq.get('head-only'))}; LM held-out accuracy "
                    f"at product settings: head-only {num(get(prod, 'heldout_accuracy', 'head-only'), 2)}, faithful "
                    f"{num(get(prod, 'heldout_accuracy', 'faithful'), 2)}, LoRA-DPO "
                    f"{num(get(prod, 'heldout_accuracy', 'lora_dpo'), 2)} ({num(prod.get('users'))} users)")
        return (f"head-only {num(get(p, 'users_per_hour', 'head-only'), 0)} users/hour on "
                f"{num(get(p, 'machine', 'cpus'))} CPU cores; per user on the same pairs and passes, faithful latent "
                f"DPO {times(get(p, 'speedup_vs_lora_dpo', 'faithful'))} and head-only "
                f"{times(get(p, 'speedup_vs_lora_dpo', 'head-only'))} cheaper than LoRA-DPO")

    def compare() -> str:
        c = r("compare.json")
        m = c.get("methods", {})
        key = "win_rate_vs_prior" if any("win_rate_vs_prior" in v for v in m.values()) else "win_rate"
        shown = ", ".join(f"{k} {num(v.get(key))}" + _personal([
            ("vs base LM", None if v.get("win_rate_vs_base") is None else num(v["win_rate_vs_base"])),
            ("own vs swapped", None if v.get("own_vs_swapped") is None else num(v["own_vs_swapped"]))])
            for k, v in m.items() if v.get(key) is not None)
        return f"{key.replace('_', ' ')} ({c.get('preset', NA)} preset, {num(get(m, 'latent_dpo', 'users'))} users): {shown}"

    def compare_small() -> str:
        c = r("compare-small.json")
        m = c.get("methods", {})
        shown = ", ".join(f"{k} {ci(v.get('win_rate_vs_prior'), v.get('win_rate_vs_prior_ci95'))}"
                          + _personal([("vs base LM", None if v.get("win_rate_vs_base") is None
                                        else ci(v["win_rate_vs_base"], v.get("win_rate_vs_base_ci95"))),
                                       ("own vs swapped", None if v.get("own_vs_swapped") is None
                                        else ci(v["own_vs_swapped"], v.get("own_vs_swapped_ci95")))])
                          + (f" at {num(v['seconds_per_user'], 3)} s/user" if v.get("seconds_per_user") else "")
                          + (f", perplexity {num(v['perplexity'], 0)}" if v.get("perplexity") is not None else "")
                          for k, v in m.items() if v.get("win_rate_vs_prior") is not None)
        partial = " (partial: " + ", ".join(c.get("runs", {})) + " only)" if c.get("complete") is False else ""
        return (f"win rate vs the prior [95% CI] ({c.get('preset', NA)} preset, "
                f"{num(get(m, 'latent_dpo', 'users'))} users{partial}): {shown}")

    def fewshot() -> str:
        f = r("fewshot.json")
        n = f.get("n_pairs") or [None]
        parts = []
        for method, c in f.get("methods", {}).items():
            acc, acc_ci, win, win_ci, secs = (c.get(k) or [None] for k in (
                "heldout_accuracy", "heldout_accuracy_ci", "win_rate_vs_prior", "win_rate_vs_prior_ci",
                "seconds_per_user"))
            if method == "clap_prior" or acc[-1] is None:
                continue
            label = method + (f" ({c['mode']})" if c.get("mode") else "") + \
                (f" ({c['users']} users)" if c.get("users") and c["users"] != len(f.get("users") or []) else "")
            personal = [(label_, None if get(c, key, -1) is None else ci(get(c, key, -1), get(c, f"{key}_ci", -1)))
                        for label_, key in (("vs base LM", "win_rate_vs_base"), ("own vs swapped", "own_vs_swapped"))]
            parts.append(f"{label}: held-out accuracy {num(acc[0])} (N = {num(n[0])}) to {ci(acc[-1], acc_ci[-1])} "
                         f"(N = {num(n[-1])}), win rate vs prior {ci(win[-1], win_ci[-1])}{_personal(personal)}, "
                         f"{sig(secs[-1])} s/user")
        partial = "" if f.get("complete", True) else f"; partial: N = {', '.join(map(str, n))} done"
        return (f"LM-run held-out accuracy and win rate vs the prior [95% CI] as pairs per user grow "
                f"({f.get('preset', NA)} preset, "
                f"{num(len(f.get('users') or []))} users{partial}): " + "; ".join(parts))

    def clap_spec() -> str:
        parts = []
        for name, t in r.each("clap_spec*.json"):
            if t.get("device") != "cuda" or t.get("settings", {}).get("bow_weight") \
                    or t.get("settings", {}).get("population"):
                continue
            curve = get(t, "probe", "posterior_mean") or [{}]
            lm = _lm_probe(t)
            stage2 = (f", stage 2 {duration(t['stage2']['projected_spec_stage_s'])}" if t.get("stage2") else "")
            parts.append(f"{t.get('device_name', NA)} at the spec's sizes: 3,125 steps of stage 1 "
                         f"{duration(get(t, 'stage1', 'projected_spec_stage_s'))}{stage2}; sentiment probe from the "
                         f"posterior mean {num(curve[-1].get('corr'), 2)} vs the frozen LM's {num(lm, 2)}")
        return "; ".join(parts) or "no GPU run"

    def generate() -> str:
        g = r("generate.json")
        return (f"{num(g.get('requests'))} requests from {num(g.get('distinct_users'))} users in one batched decode: "
                f"{num(g.get('batched_tokens_per_s'), 0)} tokens/s vs {num(g.get('sequential_tokens_per_s'), 0)} one "
                f"at a time ({times(g.get('speedup'))})")

    def serve() -> str:
        s = r("serve.json")
        return (f"{num(s.get('requests'))} requests, {num(s.get('errors'))} errors, {num(s.get('tokens_per_s'), 0)} "
                f"tokens/s ({times(s.get('speedup'))} over one at a time), p99 {num(s.get('p99_ms'), 0)} ms, "
                f"{num(s.get('mixed_version_responses'))} mixed-version responses across a night switch")

    def throughput() -> str:
        parts = []
        for _, t in r.each("clap_throughput*.json"):
            parts.append(f"{t.get('base', NA)} {t.get('lm_dtype') or get(t, 'model', 'dtype')}: stage 1 "
                         f"{num(t.get('stage1_ratio'))}x, stage 2 {num(t.get('stage2_ratio'))}x")
        return "CLaP tokens/s relative to a plain fine-tune: " + "; ".join(parts)

    add("personalize.json", personalize)
    add("compare.json", compare)
    add("compare-small.json", compare_small)
    add("fewshot.json", fewshot)
    add("generate.json", generate)
    add("serve.json", serve)
    add("clap_throughput*.json", throughput)
    add("clap_spec*.json", clap_spec)
    return table(["result", "headline"], rows, "ll") + "\n\n" + "Generated by `python benchmarks/render.py` from " \
        "`benchmarks/results/` (machine, load and settings are in each JSON and in `benchmarks/README.md`)."


RENDERERS: dict[str, Callable[[Results], str]] = {   # region name -> its renderer
    "readme-headline": readme_headline,
    "personalize": personalize_table,
    "personalize-machine": personalize_machine,
    "personalize-world": personalize_world,
    "personalize-settings": personalize_settings,
    "personalize-measured-on": personalize_measured_on,
    "personalize-passes": personalize_passes,
    "personalize-reading": personalize_reading,
    "fewshot-full-users-fit": fewshot_full_users_fit,
    "capacity-terms": capacity_terms,
    "capacity-settings": capacity_settings,
    "capacity-predicted": capacity_predicted,
    "scale-setup": scale_setup,
    "scale-inputs": scale_inputs,
    "scale-run": scale_table,
    "scale-observed": scale_observed,
    "compare": compare_table,
    "compare-small": compare_small_table,
    "generate": generate_table,
    "clap-throughput": clap_throughput_table,
    "clap-spec": clap_spec_table,
    "serve": serve_table,
    "fewshot": fewshot_table,
}


# ------------------------------------------------------------------------------------------------ regions
def render_region(kind: str, name: str, results: Results) -> str:
    """The new body of one region (with its surrounding newlines for a table)."""
    if name not in RENDERERS:
        raise KeyError(f"unknown generated region {name!r} (known: {', '.join(sorted(RENDERERS))})")
    try:
        body = RENDERERS[name](results)
    except MissingResult as missing:
        how = MAKE.get(missing.name)
        body = (f"_Table left out: `benchmarks/results/{missing.name}` is not there"
                + (f" (make it with `{how}`)" if how else "") + "._") if kind == "table" \
            else f"n/a (`benchmarks/results/{missing.name}` missing)"
    return f"\n{body}\n" if kind == "table" else body


def render_text(text: str, results: Results) -> tuple[str, list[str]]:
    """(`text` with every region re-rendered, names of the regions whose body changed)."""
    stale: list[str] = []

    def sub(m: re.Match) -> str:
        body = render_region(m["kind"], m["name"], results)
        if body != m["body"]:
            stale.append(f"{m['kind']}:{m['name']}")
        return m["open"] + body + m["close"]

    return REGION.sub(sub, text), stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale region")
    ap.add_argument("--results", default=str(RESULTS), help="folder of the result JSONs (default: %(default)s)")
    ap.add_argument("files", nargs="*", help="Markdown files to render (default: README.md, benchmarks/README.md)")
    args = ap.parse_args(argv)
    results = Results(args.results)
    files = [Path(f) for f in args.files] or list(DOCS)
    stale_any = False
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            new, stale = render_text(text, results)
        except KeyError as err:
            print(f"{path}: {err.args[0]}", file=sys.stderr)
            return 2
        try:
            shown = path.resolve().relative_to(ROOT)
        except ValueError:
            shown = path
        if not stale:
            continue
        if args.check:
            stale_any = True
            for name in stale:
                print(f"stale: {shown} {name} (run `python benchmarks/render.py`)", file=sys.stderr)
        else:
            path.write_text(new, encoding="utf-8")
            print(f"rendered {shown}: {', '.join(stale)}")
    return 1 if stale_any else 0


if __name__ == "__main__":
    sys.exit(main())
