"""Static HTML report of one nightly run: index.html + PNG plots in one folder, viewable offline.

Sections (stable element ids, checked by tests/integration/test_report.py):
    comparison     per-method quality and per-user fit time side by side, means with 95% bootstrap intervals
    win-rates      distribution of per-user win rates, per method
    few-shot       quality as a user's pairs grow (benchmarks/fewshot.py's curve of this CLaP, when it was run)
    training       CLaP pretraining curves (stage 1, then stage 2)
    user-latents   2-D PCA map of users' mean latents, coloured by cohort
    code-usage     codebook usage; only for runs with discrete latents
    lineage        data digests, model versions, MLflow run ids
    per-user       the per-user evaluation table
A section whose input is missing still renders, saying what is missing, so a partial run gives a partial report.
Rendering only: pipelines/report.py gathers the inputs from MLflow and the store into a `ReportData`.
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from latentpref.dashboards.user_map import UserMap

SECTIONS = ("comparison", "generations", "win-rates", "few-shot", "training", "user-latents", "code-usage",
            "lineage", "per-user")
# the methods a generation table shows, in this order: un-personalised first, then the personalised ones
_GENERATION_METHODS = ("clap_prior", "latent_dpo", "lora_dpo", "ptuning_dpo", "full_dpo", "oracle_best_of_k",
                       "base_lm")
_TRAINING_METRICS = ("loss", "nll_per_token", "kl", "contrastive", "active_units")
# the few-shot curve's panels: (metric of benchmarks/fewshot.py, axis label)
_FEWSHOT_PANELS = (("heldout_accuracy", "held-out accuracy (LM-based)"), ("win_rate_vs_prior", "win rate vs the prior"))


@dataclass
class ReportData:
    run_id: str
    title: str
    summary: dict[str, str] = field(default_factory=dict)        # short facts under the title
    lineage: dict[str, list[tuple[str, str]]] = field(default_factory=dict)   # group -> (key, value) rows
    comparison: pa.Table | None = None       # evaluate.summarise(): method, users, <metric>, <metric>_lo/_hi
    per_user: pa.Table | None = None         # one row per (user, method)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    history_source: str = ""
    stage_boundary: int | None = None        # last step of CLaP stage 1
    user_map: UserMap | None = None
    latent_type: str = "gaussian"
    code_usage: list[int] | None = None      # discrete latents: how often each code is chosen
    fewshot: dict | None = None              # benchmarks/fewshot.py's result JSON for this CLaP version
    notes: dict[str, str] = field(default_factory=dict)          # section id -> why it is empty / caveats


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    return plt


def _method_colors(methods: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _save(fig, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=90)
    _pyplot().close(fig)
    return name


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)) else float("nan")


def plot_comparison(comparison: pa.Table, out_dir: str) -> str:
    """Three panels sharing the method axis: win rate, mean hidden reward, per-user fit seconds (log scale when
    methods differ by more than 20x)."""
    plt = _pyplot()
    rows = comparison.to_pylist()
    methods = [r["method"] for r in rows]
    colors = _method_colors(methods)
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(rows) + 1.6), sharey=True)
    fit = [_num(r.get("fit_seconds")) for r in rows]
    fit = [v for v in fit if v > 0]
    log_fit = bool(fit) and max(fit) / min(fit) > 20   # latent heads vs LoRA often differ by orders of magnitude
    panels = (("win_rate", "win rate vs reference", False), ("mean_reward", "mean hidden reward", False),
              ("fit_seconds", "fit seconds per user" + (" (log)" if log_fit else ""), log_fit))
    for ax, (key, label, log) in zip(axes, panels):
        for i, r in enumerate(rows):
            m, lo, hi = _num(r.get(key)), _num(r.get(f"{key}_lo")), _num(r.get(f"{key}_hi"))
            if math.isnan(m) or (key == "fit_seconds" and m <= 0):
                text = "no per-user fit" if key == "fit_seconds" else "n/a"
                ax.annotate(text, (0.02, i), xycoords=("axes fraction", "data"), va="center", fontsize=8, color="#777")
                continue
            err = None
            if not (math.isnan(lo) or math.isnan(hi)):
                err = [[max(m - lo, 0.0)], [max(hi - m, 0.0)]]
            ax.errorbar([m], [i], xerr=err, fmt="o", color=colors[r["method"]], capsize=4)
        if log:
            from matplotlib.ticker import NullFormatter
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())   # labelled minor ticks overlap on short ranges
        elif key == "fit_seconds":
            ax.set_xlim(left=0)
        if key == "win_rate":
            ax.axvline(0.5, color="#aaa", ls="--", lw=1)
            ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, methods)
    axes[0].invert_yaxis()
    fig.suptitle("mean over users with 95% bootstrap interval", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "comparison.png")


def plot_win_rates(per_user: pa.Table, out_dir: str) -> str:
    """Per method: box of per-user win rates with every user as a jittered dot."""
    plt = _pyplot()
    methods = list(dict.fromkeys(per_user["method"].to_pylist()))
    colors = _method_colors(methods)
    data = {m: [] for m in methods}
    for m, w in zip(per_user["method"].to_pylist(), per_user["win_rate"].to_pylist()):
        if w is not None and math.isfinite(w):
            data[m].append(float(w))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(methods) + 2), 3.6))
    ax.boxplot([data[m] for m in methods], positions=range(len(methods)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, m in enumerate(methods):
        xs = i + rng.uniform(-0.15, 0.15, size=len(data[m]))
        ax.scatter(xs, data[m], s=18, color=colors[m], alpha=0.8, zorder=3)
    ax.set_xticks(range(len(methods)), methods)
    ax.axhline(0.5, color="#aaa", ls="--", lw=1)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("per-user win rate vs reference")
    fig.tight_layout()
    return _save(fig, out_dir, "win_rates.png")


def plot_training(history: dict[str, list[tuple[int, float]]], stage_boundary: int | None, out_dir: str) -> str:
    plt = _pyplot()
    keys = [k for k in _TRAINING_METRICS if history.get(k)] or sorted(history)[:5]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.9), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, values = zip(*sorted(history[key]))
        ax.plot(steps, values, lw=1.4)
        if stage_boundary is not None:
            ax.axvline(stage_boundary + 0.5, color="#c44", ls="--", lw=1)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_dir, "clap_training.png")


def plot_user_map(user_map: UserMap, out_dir: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    cohorts = sorted(set(c for c, cold in zip(user_map.cohorts, user_map.cold_start) if not cold))
    cmap = plt.get_cmap("tab10")
    xy = user_map.coords
    for j, cohort in enumerate(cohorts):
        idx = [i for i, (c, cold) in enumerate(zip(user_map.cohorts, user_map.cold_start)) if c == cohort and not cold]
        ax.scatter(xy[idx, 0], xy[idx, 1], s=36, color=cmap(j % 10), label=cohort, alpha=0.85, zorder=3)
    cold = [i for i, c in enumerate(user_map.cold_start) if c]
    if cold:
        ax.scatter(xy[cold, 0], xy[cold, 1], s=40, marker="x", color="#888", label="cold start (prior)", zorder=3)
    ev = [i for i, e in enumerate(user_map.evaluated) if e]
    if ev:
        ax.scatter(xy[ev, 0], xy[ev, 1], s=120, facecolors="none", edgecolors="black", lw=1.2,
                   label="evaluated", zorder=4)
    e1, e2 = user_map.explained
    fmt = (lambda v: "n/a" if math.isnan(v) else f"{100 * v:.0f}% of variance")
    ax.set_xlabel(f"PC1 ({fmt(e1)})")
    ax.set_ylabel(f"PC2 ({fmt(e2)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", frameon=True)
    fig.tight_layout()
    return _save(fig, out_dir, "user_latents.png")


def _curve_points(ns: list[int], values: list[Any], cis: list[Any] | None
                  ) -> tuple[list[int], list[float], list[int], list[float], list[float]]:
    """(N, value) of the points that have a value, and (N, lo, hi) of those with a whole interval: a method can
    miss a point (no user had a value there) and an older result may carry no `<metric>_ci`."""
    xs, ys, bx, lo, hi = [], [], [], [], []
    for k, (n, v) in enumerate(zip(ns, values)):
        if math.isnan(_num(v)):
            continue
        xs.append(n)
        ys.append(_num(v))
        ci = cis[k] if cis is not None and k < len(cis) else None
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(math.isnan(_num(c)) for c in ci):
            bx.append(n)
            lo.append(_num(ci[0]))
            hi.append(_num(ci[1]))
    return xs, ys, bx, lo, hi


def plot_fewshot(result: dict[str, Any], out_dir: str) -> str:
    """Two panels sharing N (pairs per user, log2 axis): held-out accuracy and win rate vs the prior, one line per
    method with its 95% bootstrap band over users; the dashed line at 0.5 is chance / the prior's own value."""
    plt = _pyplot()
    ns = [int(n) for n in result.get("n_pairs", [])]
    methods = result.get("methods", {})
    colors = _method_colors(list(methods))
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.9), sharex=True)
    for ax, (metric, label) in zip(axes, _FEWSHOT_PANELS):
        for name, m in methods.items():
            xs, ys, bx, lo, hi = _curve_points(ns, m.get(metric) or [], m.get(f"{metric}_ci"))
            if not xs:
                continue
            ax.plot(xs, ys, marker="o", ms=4, lw=1.5, color=colors[name], label=name)
            if bx:
                ax.fill_between(bx, lo, hi, color=colors[name], alpha=0.15, lw=0)
        ax.axhline(0.5, color="#aaa", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        if ns:
            from matplotlib.ticker import NullFormatter
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("pairs per user N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out_dir, "fewshot.png")


def plot_code_usage(counts: list[int], out_dir: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(counts) + 3), 3.0))
    ax.bar(range(len(counts)), counts, width=0.9)
    ax.set_xlabel("code")
    ax.set_ylabel("times chosen")
    fig.tight_layout()
    return _save(fig, out_dir, "code_usage.png")


def usage_stats(counts: list[int]) -> dict[str, float]:
    """Perplexity of the code distribution (exp entropy: the 'effective number of codes') and dead codes."""
    c = np.asarray(counts, dtype=float)
    total = c.sum()
    if total <= 0:
        return {"perplexity": 0.0, "dead": float(len(c)), "codes": float(len(c))}
    p = c[c > 0] / total
    return {"perplexity": float(np.exp(-(p * np.log(p)).sum())), "dead": float((c == 0).sum()),
            "codes": float(len(c))}


# ------------------------------------------------------------------------------------------------ HTML
def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _cell(r: dict[str, Any], c: str) -> str:
    v = r.get(c)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
        text = f"{v:.3f}"
        if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
            text += f" [{lo:.3f}, {hi:.3f}]"
        return text
    return "–" if v is None else str(v)


def _table_html(table: pa.Table, columns: list[str]) -> str:
    columns = [c for c in columns if c in table.column_names]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(_cell(r, c))}</td>" for c in columns) + "</tr>"
                   for r in table.to_pylist())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _img(name: str, alt: str) -> str:
    return f"<img src='{_esc(name)}' alt='{_esc(alt)}'>"


def _section(sid: str, title: str, body: str, note: str | None = None) -> str:
    extra = f"<p class='note'>{_esc(note)}</p>" if note else ""
    return f"<section id='{sid}'><h2>{_esc(title)}</h2>{extra}{body}</section>"


def _missing(what: str) -> str:
    return f"<p class='missing'>Not available for this run: {_esc(what)}.</p>"


NIGHTS_PAGE = "nights.html"   # the across-nights page, rendered beside index.html (dashboards/nights.py)
_SUMMARY_START, _SUMMARY_END = "<!--night-summary-->", "<!--/night-summary-->"


def summary_html(summary: dict[str, str]) -> str:
    """The facts under the title, between markers so the flow can swap in the night's final state."""
    rows = "".join(f"<dt>{_esc(k)}</dt><dd data-key='{_esc(k)}'>{_esc(v)}</dd>" for k, v in summary.items())
    return f"{_SUMMARY_START}<dl class='summary' id='night-summary'>{rows}</dl>{_SUMMARY_END}"


def replace_summary(page: str, summary: dict[str, str]) -> str:
    """`page` with its summary block replaced (ValueError if it has none)."""
    start, end = page.find(_SUMMARY_START), page.find(_SUMMARY_END)
    if start < 0 or end < start:
        raise ValueError("the page has no night-summary block")
    return page[:start] + summary_html(summary) + page[end + len(_SUMMARY_END):]


# after load, the page records whether every plot decoded: a headless browser can read it back (--dump-dom)
_CHECK_SCRIPT = """<script>
addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images, function (i) {
    return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute('data-images', String(document.images.length));
  document.body.setAttribute('data-broken-images', String(broken.length));
});
</script>"""

_STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1250px;color:#222}"
          "h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:1.6em}"
          "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
          "th{background:#f0f0f0;text-align:left}img{max-width:100%;border:1px solid #eee}"
          "dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}"
          "dl.summary dt{font-weight:600}dl.summary dd{margin:0}.note{color:#555;font-size:13px}"
          ".missing{color:#a33}code{font-size:12px}nav a{margin-right:12px;font-size:14px}")


def generations_html(per_user: pa.Table | None) -> str:
    """Per evaluated user: the first evaluation prompt and each method's continuation of it, with that text's
    reward under the user's hidden preference (the evaluation's `sample_prompt` / `sample` / `sample_reward`)."""
    if per_user is None or not per_user.num_rows or "sample" not in per_user.column_names:
        return _missing("per-user generations (evaluate stage)")
    rows = per_user.to_pylist()
    out = []
    for user in dict.fromkeys(r["user_id"] for r in rows):
        mine = {r["method"]: r for r in rows if r["user_id"] == user}
        first = next(iter(mine.values()))
        prompt = first.get("sample_prompt")
        head = (f"<h3>{_esc(user)} <small>({_esc(first.get('cohort', ''))})</small></h3>"
                + (f"<p class='prompt'>… {_esc(prompt)}</p>" if prompt else ""))
        cells = "".join(
            f"<tr><th>{_esc(m)}</th><td>{_esc(mine[m].get('sample', ''))}</td>"
            f"<td>{_cell(mine[m], 'sample_reward')}</td><td>{_cell(mine[m], 'win_rate_vs_prior')}</td></tr>"
            for m in _GENERATION_METHODS if m in mine)
        out.append(head + "<table><thead><tr><th>method</th><th>continuation</th><th>reward (this text)</th>"
                   "<th>win rate vs prior (all prompts)</th></tr></thead><tbody>" + cells + "</tbody></table>")
    return "".join(out)


def _fmt(v: Any, spec: str) -> str:
    x = _num(v)
    return "–" if math.isnan(x) else format(x, spec)


def _at(values: Any, k: int) -> Any:
    return values[k] if isinstance(values, list) and k < len(values) else None


def fewshot_table_html(result: dict[str, Any]) -> str:
    """Rows = methods, columns = N; a cell is "held-out accuracy / win rate vs prior (seconds per user)"."""
    ns = result.get("n_pairs", [])
    head = "<th>method</th>" + "".join(f"<th>N = {_esc(n)}</th>" for n in ns)
    rows = []
    for name, m in result.get("methods", {}).items():
        cells = "".join(
            f"<td>{_fmt(_at(m.get('heldout_accuracy'), k), '.2f')} / {_fmt(_at(m.get('win_rate_vs_prior'), k), '.2f')}"
            f" ({_fmt(_at(m.get('seconds_per_user'), k), '.3g')} s)</td>" for k in range(len(ns)))
        rows.append(f"<tr><th>{_esc(name)}</th>{cells}</tr>")
    return (f"<table class='fewshot'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            "<p class='note'>Cell: held-out accuracy / win rate vs the prior (seconds per user: encoding + fit, one "
            "user alone).</p>")


def fewshot_note(result: dict[str, Any], extra: str | None) -> str:
    """Who and what the curve measured: users, preset, CLaP version, partial runs and capped N."""
    parts = []
    users = result.get("users")
    n_users = len(users) if isinstance(users, list) else users
    if n_users:
        per = {name: m.get("users") for name, m in result.get("methods", {}).items()}
        fewer = ", ".join(f"{name} on {u}" for name, u in per.items() if isinstance(u, int) and u != n_users)
        parts.append(f"{n_users} users" + (f" ({fewer})" if fewer else "") + ".")
    facts = [f"{k} {result[k]}" for k in ("preset", "clap_version") if result.get(k)]
    if facts:
        parts.append("Benchmark run with " + ", ".join(facts) + ".")
    used = result.get("n_pairs_used") or []
    if any(isinstance(u, list) and any(isinstance(x, int) and x < n for x in u)
           for n, u in zip(result.get("n_pairs", []), used)):
        parts.append("Users with fewer train pairs than N use all they have (n_pairs_used in the JSON).")
    if result.get("complete") is False:
        done, planned = (", ".join(map(str, result.get(k) or [])) for k in ("n_pairs", "n_pairs_planned"))
        parts.append(f"Partial: only N = {done} of {planned or '?'} finished.")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def render_report(out_dir: str, data: ReportData) -> str:
    """Write index.html and its PNGs into `out_dir`; returns the path of index.html."""
    os.makedirs(out_dir, exist_ok=True)
    notes = data.notes
    parts: list[str] = [f"<h1>{_esc(data.title)}</h1>"]
    parts.append(summary_html(data.summary))
    shown = [s for s in SECTIONS if s != "code-usage" or data.latent_type == "discrete"]
    parts.append("<nav>" + "".join(f"<a href='#{s}'>{s}</a>" for s in shown)
                 + f"<a href='{NIGHTS_PAGE}'>across nights &rarr;</a></nav>")

    # quality and fit time side by side
    if data.comparison is not None and data.comparison.num_rows:
        body = _img(plot_comparison(data.comparison, out_dir), "quality and fit time per method") + _table_html(
            data.comparison, ["method", "users", "win_rate_vs_prior", "win_rate", "mean_reward", "heldout_accuracy",
                              "latent_heldout_accuracy", "z_sensitivity_nats", "reward_spread", "perplexity",
                              "fit_seconds", "trainable_params", "artifact_bytes"])
    else:
        body = _missing("the comparison table (evaluate stage)")
    parts.append(_section("comparison", "Quality and per-user fit time, side by side (mean [95% bootstrap CI])",
                          body, notes.get("comparison")))

    parts.append(_section("generations", "What each evaluated user gets: the same prompt and sampling seed, "
                          "un-personalised (clap_prior) next to each personalised method", generations_html(data.per_user),
                          notes.get("generations")))

    if data.per_user is not None and data.per_user.num_rows:
        body = _img(plot_win_rates(data.per_user, out_dir), "per-user win rates")
    else:
        body = _missing("per-user evaluation results")
    parts.append(_section("win-rates", "Distribution of per-user win rates", body, notes.get("win-rates")))

    if data.fewshot and data.fewshot.get("n_pairs") and data.fewshot.get("methods"):
        body = _img(plot_fewshot(data.fewshot, out_dir), "few-shot curve") + fewshot_table_html(data.fewshot)
        note = fewshot_note(data.fewshot, notes.get("few-shot")) or None
    else:
        body = _missing("the few-shot benchmark for this CLaP (python benchmarks/fewshot.py --store STORE "
                        "--preset P --out F)")
        note = notes.get("few-shot")
    parts.append(_section("few-shot", "Few-shot curve: quality as a user's pairs grow (mean [95% CI] over users)",
                          body, note))

    body = (_img(plot_training(data.history, data.stage_boundary, out_dir), "CLaP training curves")
            if data.history else _missing("CLaP training metrics"))
    note = " ".join(x for x in (data.history_source, notes.get("training")) if x) or None
    parts.append(_section("training", "CLaP pretraining curves (dashed line: stage 1 → stage 2)", body, note))

    if data.user_map is not None and len(data.user_map.user_ids):
        um = data.user_map
        body = _img(plot_user_map(um, out_dir), "user latents PCA")
        note = (f"{len(um.user_ids)} users ({sum(um.cold_start)} cold start), mean of μ_θ(x) over "
                f"{um.n_prompts} fixed prompts; rings mark evaluated users. " + notes.get("user-latents", ""))
    else:
        body, note = _missing("per-user heads"), notes.get("user-latents")
    parts.append(_section("user-latents", "Users' mean latents, PCA, coloured by cohort", body, note))

    if data.latent_type == "discrete":
        if data.code_usage:
            st = usage_stats(data.code_usage)
            body = _img(plot_code_usage(data.code_usage, out_dir), "code usage")
            note = (f"{int(st['codes'])} codes, effective number used (perplexity) {st['perplexity']:.1f}, "
                    f"never used {int(st['dead'])}.")
        else:
            body, note = _missing("code usage counts"), notes.get("code-usage")
        parts.append(_section("code-usage", "Codebook usage (discrete latents)", body, note))

    lineage = "".join(
        f"<h3>{_esc(group)}</h3><table><tbody>" + "".join(
            f"<tr><th>{_esc(k)}</th><td><code>{_esc(v)}</code></td></tr>" for k, v in rows) + "</tbody></table>"
        for group, rows in data.lineage.items())
    parts.append(_section("lineage", "Lineage", lineage or _missing("lineage"), notes.get("lineage")))

    if data.per_user is not None and data.per_user.num_rows:
        body = _table_html(data.per_user, ["user_id", "cohort", "method", "n_train_pairs", "win_rate_vs_prior",
                                           "win_rate", "mean_reward", "heldout_accuracy", "z_sensitivity_nats",
                                           "perplexity", "fit_seconds"])
    else:
        body = _missing("per-user evaluation results")
    parts.append(_section("per-user", "Per user", body, notes.get("per-user")))

    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(data.title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}{_CHECK_SCRIPT}</body></html>")
    path = os.path.join(out_dir, "index.html")
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, path)
    return path
