"""Static HTML report of one nightly run: index.html + PNG plots in one folder, viewable offline.

Sections (stable element ids, checked by tests/integration/test_report.py):
    comparison     per-method quality and per-user fit time side by side, means with 95% bootstrap intervals, pooled
                   and per user group (seen / unseen / out_of_cohort)
    cohorts        cohort x cohort mean hidden reward (rows judge, columns write), per method: is the diagonal personal?
    generations    each evaluated user's first prompt and every method's continuation of it
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

SECTIONS = ("comparison", "cohorts", "generations", "win-rates", "few-shot", "training", "user-latents",
            "code-usage", "lineage", "per-user")
# the methods a generation table shows, in this order: un-personalised first, then the personalised ones
_GENERATION_METHODS = ("clap_prior", "latent_dpo", "latent_dpo_best_of_k", "lora_dpo", "ptuning_dpo", "full_dpo", "oracle_best_of_k",
                       "base_lm")
# quality columns of the pooled and per-group comparison tables, in this order (absent ones are left out)
_QUALITY_COLUMNS = ("win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped", "win_rate", "mean_reward",
                    "heldout_accuracy", "latent_heldout_accuracy")
# the evaluation's user groups (`group` column), in display order
GROUPS = {
    "seen": "users whose pairs the CLaP's training read",
    "unseen": "cohort users held out from the CLaP's training",
    "out_of_cohort": "users whose hidden reward is a random mixture of the scorer features, never read by the CLaP",
}
_NEW_COLUMNS_NOTE = (
    "win_rate_vs_base: how often the method's text beats the base LM's under the user's hidden reward. "
    "own_vs_swapped: the user's own text against the text written under the policy of the evaluated user with the "
    "least similar hidden reward (swap_partner in the per-user table), same prompt and seed, judged by the user's "
    "hidden reward: a win rate, 0.5 = nothing personal learnt (a fit that learnt only what most users share writes the "
    "same text for both); – for methods without a per-user policy (base_lm, clap_prior, oracle_best_of_k).")
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
    comparison_by_group: pa.Table | None = None   # the same per (group, method); `group` in GROUPS
    cohort_matrix: dict | None = None        # comparison/cohort_matrix.json: {"methods": {m: {...}}, "baseline": m}
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


def cohort_matrix_arrays(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(raw, centred), both (judges, writers): the mean hidden reward of one method's cohort matrix (NaN where a
    cell has no value) and each row minus its mean over the row's cells with a value. Reward scales differ per
    judge, so only the centred values compare across rows.

    Raises:
        ValueError: `mean_reward` is not a judges x writers grid.
    """
    judges, writers = list(entry.get("judges") or []), list(entry.get("writers") or [])
    rows = entry.get("mean_reward") or []
    if len(rows) != len(judges) or any(not isinstance(r, list) or len(r) != len(writers) for r in rows):
        raise ValueError(f"mean_reward is not a {len(judges)} x {len(writers)} grid (judges x writers)")
    raw = np.array([[_num(v) for v in r] for r in rows], dtype=float).reshape(len(judges), len(writers))
    centred = np.full_like(raw, np.nan)
    for i, r in enumerate(raw):
        if np.isfinite(r).any():
            c = r - np.nanmean(r)
            centred[i] = np.where(np.abs(c) < 1e-9 * max(np.nanmax(np.abs(r)), 1e-30), 0.0, c)   # no "-5.6e-17"
    return raw, centred


def _short(v: float, spec: str = ".3g") -> str:
    return "–" if math.isnan(v) else format(v, spec)


def plot_cohort_matrix(method: str, entry: dict[str, Any], out_dir: str) -> str:
    """Heatmap of one method's cohort matrix: rows = judge cohort (whose reward), columns = writer cohort (whose
    policies wrote). Colour = the row-centred value scaled by the row's largest deviation (each row uses the whole
    scale: compare within rows); text = raw mean reward over its row-centred value; the row's maximum in bold; the
    diagonal boxed."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    judges, writers, users = entry["judges"], entry["writers"], entry.get("users") or {}
    raw, centred = cohort_matrix_arrays(entry)
    J, W = raw.shape
    spread = np.abs(np.nan_to_num(centred)).max(axis=1, keepdims=True) if W else np.zeros((J, 1))
    normed = centred / np.where(spread > 0, spread, 1.0)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")   # a cell without users
    fig, ax = plt.subplots(figsize=(1.2 * W + 3.2, 0.7 * J + 2.2))
    im = ax.imshow(np.ma.masked_invalid(normed), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i in range(J):
        best = int(np.nanargmax(raw[i])) if np.isfinite(raw[i]).any() else -1
        for j in range(W):
            if math.isnan(raw[i, j]):
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="#777")
                continue
            ax.text(j, i, f"{_short(raw[i, j])}\n({_short(centred[i, j], '+.2g')})", ha="center", va="center",
                    fontsize=8, fontweight="bold" if j == best else "normal",
                    color="white" if abs(normed[i, j]) > 0.65 else "black")
        if judges[i] in writers:   # "personal" = this cell is the row's maximum
            j = writers.index(judges[i])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=2.2))
    label = (lambda c: f"{c} (n={users[c]})" if c in users else str(c))
    ax.set_xticks(range(W), [label(c) for c in writers], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(J), [label(c) for c in judges], fontsize=8)
    ax.set_xlabel("writer cohort (whose policies wrote the texts)")
    ax.set_ylabel("judge cohort (whose hidden reward)")
    ax.set_title(f"{method}: mean hidden reward (row-centred in brackets)", fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.045, pad=0.03)
    bar.set_label("row-centred / row's largest deviation", fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, f"cohorts_{_file_safe(method)}.png")


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "method"


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
          ".missing{color:#a33}code{font-size:12px}nav a{margin-right:12px;font-size:14px}"
          "table.cohorts td{text-align:right}table.cohorts td.diag{outline:2px solid #222;outline-offset:-2px}")


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


def group_tables_html(by_group: pa.Table) -> str:
    """One small comparison table per user group (GROUPS order, then any other group), with what the groups mean
    and which have no evaluated users."""
    if "group" not in by_group.column_names:
        return _missing("the group column of the per-group comparison")
    names = by_group["group"].to_pylist()
    present = list(dict.fromkeys(names))
    out = ["<p class='note'>Groups: " + "; ".join(f"<b>{_esc(g)}</b> = {_esc(m)}" for g, m in GROUPS.items())
           + ".</p>"]
    for group in [g for g in GROUPS if g in present] + [g for g in present if g not in GROUPS]:
        sub = by_group.filter(pa.array([n == group for n in names]))
        users = [u for u in (sub["users"].to_pylist() if "users" in sub.column_names else []) if u is not None]
        count = f"{max(users)} users" if users else "users: –"
        out.append(f"<h3 class='group'>{_esc(group)} <small>({count}; {_esc(GROUPS.get(group, 'unknown group'))})"
                   "</small></h3>" + _table_html(sub, ["method", "users", *_QUALITY_COLUMNS]))
    absent = [g for g in GROUPS if g not in present]
    if absent:
        out.append(f"<p class='note'>No evaluated users in: {_esc(', '.join(absent))}.</p>")
    return "".join(out)


def _cohort_methods(matrix: dict[str, Any]) -> list[str]:
    """latent_dpo first, then the baseline, then any other method the file holds."""
    methods = list(matrix.get("methods") or {})
    first = ["latent_dpo", matrix.get("baseline")]
    return [m for m in first if m in methods] + [m for m in methods if m not in first]


def cohort_table_html(entry: dict[str, Any]) -> str:
    """Rows = judge cohorts, columns = writer cohorts; a cell is the raw mean reward over its row-centred value, the
    diagonal boxed, the row's maximum in bold, and per row whether the diagonal is that maximum."""
    judges, writers, users = entry["judges"], entry["writers"], entry.get("users") or {}
    raw, centred = cohort_matrix_arrays(entry)
    label = (lambda c: f"{_esc(c)} <small>(n={_esc(users[c])})</small>" if c in users else _esc(c))
    head = ("<th>judge ↓ · writer →</th>" + "".join(f"<th>{label(w)}</th>" for w in writers)
            + "<th>diagonal is the row's max</th>")
    rows = []
    for i, judge in enumerate(judges):
        best = int(np.nanargmax(raw[i])) if np.isfinite(raw[i]).any() else -1
        cells = []
        for j, writer in enumerate(writers):
            text = f"{_short(raw[i, j])}<br><small>{_short(centred[i, j], '+.2g')}</small>"
            cls = " class='diag'" if writer == judge else ""
            cells.append(f"<td{cls}>" + (f"<b>{text}</b>" if j == best else text) + "</td>")
        personal = "–" if judge not in writers or best < 0 else ("yes" if writers[best] == judge else "no")
        rows.append(f"<tr><th>{label(judge)}</th>{''.join(cells)}<td>{personal}</td></tr>")
    return f"<table class='cohorts'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def diagonal_summary(entry: dict[str, Any]) -> tuple[int, int]:
    """(k, n): the diagonal is its row's maximum for k of the n judge cohorts that also write (out_of_cohort not
    counted: its users share no reward, so its diagonal mixes unrelated users)."""
    raw, _ = cohort_matrix_arrays(entry)
    k = n = 0
    for i, judge in enumerate(entry["judges"]):
        if judge == "out_of_cohort" or judge not in entry["writers"] or not np.isfinite(raw[i]).any():
            continue
        n += 1
        k += int(entry["writers"][int(np.nanargmax(raw[i]))] == judge)
    return k, n


_COHORTS_NOTE = (
    "Rows: the judge cohort, whose hidden reward scores the texts; columns: the writer cohort, whose policies wrote "
    "them. A cell is the mean, over the judge cohort's users and the writer cohort's users, of the judge's hidden "
    "reward of the writer's texts (top line). Reward scales differ per judge, so read along a row: the line below is "
    "the cell minus its row's mean, and the heatmap's colour is that row-centred value divided by the row's largest "
    "deviation. A personal method makes the diagonal (boxed) its row's maximum (bold). out_of_cohort gathers users "
    "whose random rewards share nothing, so its diagonal need not stand out.")


def cohorts_html(matrix: dict[str, Any] | None, out_dir: str) -> str:
    """Per method (latent DPO, then the baseline): heatmap PNG, the numbers as a table, and a one-line verdict."""
    methods = _cohort_methods(matrix) if isinstance(matrix, dict) and isinstance(matrix.get("methods"), dict) else []
    if not methods:
        return _missing("the cohort x cohort matrix (comparison/cohort_matrix.json, evaluate stage)")
    out = []
    for method in methods:
        entry = matrix["methods"][method]
        tag = " <small>(baseline)</small>" if method == matrix.get("baseline") else ""
        out.append(f"<h3>{_esc(method)}{tag}</h3>")
        try:
            k, n = diagonal_summary(entry)
            out.append(f"<p class='note'>Diagonal is its row's maximum for {k} of {n} cohorts.</p>"
                       + _img(plot_cohort_matrix(method, entry, out_dir), f"cohort matrix of {method}")
                       + cohort_table_html(entry))
        except (KeyError, TypeError, ValueError) as err:   # one malformed method, not a failed report
            out.append(_missing(f"a readable cohort matrix for {method} ({type(err).__name__}: {err})"))
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
            data.comparison, ["method", "users", *_QUALITY_COLUMNS, "z_sensitivity_nats", "reward_spread",
                              "perplexity", "fit_seconds", "trainable_params", "artifact_bytes"])
        if {"win_rate_vs_base", "own_vs_swapped"} & set(data.comparison.column_names):
            body += f"<p class='note'>{_esc(_NEW_COLUMNS_NOTE)}</p>"
    else:
        body = _missing("the comparison table (evaluate stage)")
    body += "<h3>Per user group</h3>" + (
        group_tables_html(data.comparison_by_group)
        if data.comparison_by_group is not None and data.comparison_by_group.num_rows
        else _missing("the per-group comparison (comparison/comparison_by_group.parquet, evaluate stage)"))
    parts.append(_section("comparison", "Quality and per-user fit time, side by side (mean [95% bootstrap CI])",
                          body, notes.get("comparison")))

    body = cohorts_html(data.cohort_matrix, out_dir)
    guide = _COHORTS_NOTE if "<img" in body else None   # how to read the heatmaps, when there are some
    parts.append(_section("cohorts", "Cohort x cohort: whose reward (rows) of whose policies' texts (columns)", body,
                          " ".join(x for x in (guide, notes.get("cohorts")) if x) or None))

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
        body = _table_html(data.per_user, ["user_id", "cohort", "group", "method", "n_train_pairs",
                                           "win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped", "swap_partner",
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
