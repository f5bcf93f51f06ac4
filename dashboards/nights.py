"""Static HTML page across nights (nights.html, beside a night's index.html): how the pipeline behaves over time.

Sections (stable element ids, checked by tests/integration/test_runs.py):
    nights         one row per night: start, status, duration, users, headline quality, failed stage and error
    quality        per-night win rate per method with its 95% bootstrap interval
    stage-times    per-stage wall time per night (stacked); failed and killed nights marked
    user-outcomes  users per night: fitted / unchanged / cold start
    drift          per-user distance between a user's mean latent tonight and the night before, warm-started or
                   not, with the most-changed users listed
Rendering only: pipelines/report.py gathers the nights (pipelines/runs.py) and drift tables.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pyarrow as pa

from latentpref.dashboards.report import _CHECK_SCRIPT, _STYLE, _esc, _missing, _pyplot, _save, _section

SECTIONS = ("nights", "quality", "stage-times", "user-outcomes", "drift")
from latentpref.pipelines.config import STAGES  # noqa: E402
OUTCOMES = (("fitted", "#4c78a8"), ("unchanged", "#9ecae9"), ("cold_start", "#bbbbbb"))
TOP_CHANGED = 10


def _label(n: dict[str, Any]) -> str:
    return f"{(n.get('start') or '?')[5:16]}\n{n['run_id'][:6]}"


def _dur(s: float | None) -> str:
    if s is None:
        return "–"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def plot_quality(nights: list[dict], out_dir: str) -> str | None:
    """Win rate per method per night, 95% CI as error bars (methods offset a little so bars do not overlap)."""
    methods = sorted({m for n in nights for m in n.get("win_rates", {})})
    if not methods:
        return None
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(nights) + 3), 3.6))
    x = np.arange(len(nights))
    for j, m in enumerate(methods):
        off = (j - (len(methods) - 1) / 2) * 0.08
        pts = [(i, n["win_rates"][m]) for i, n in enumerate(nights) if m in n.get("win_rates", {})]
        if not pts:
            continue
        xs = [i + off for i, _ in pts]
        v = [p[0] for _, p in pts]
        lo = [max(p[0] - p[1], 0.0) if p[1] is not None else 0.0 for _, p in pts]
        hi = [max(p[2] - p[0], 0.0) if p[2] is not None else 0.0 for _, p in pts]
        ax.errorbar(xs, v, yerr=[lo, hi], fmt="o-", capsize=3, color=cmap(j % 10), label=m, lw=1)
    ax.axhline(0.5, color="#aaa", ls="--", lw=1)
    ax.set_xticks(x, [_label(n) for n in nights], fontsize=8)
    ax.set_xlim(-0.5, len(nights) - 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("win rate (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, out_dir, "nights_quality.png")


def plot_stage_times(nights: list[dict], out_dir: str) -> str:
    plt = _pyplot()
    cmap = plt.get_cmap("Set2")
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(nights) + 3), 3.4))
    x = np.arange(len(nights))
    bottom = np.zeros(len(nights))
    for k, stage in enumerate(STAGES):
        vals = np.array([(n["stages"].get(stage) or 0.0) for n in nights], dtype=float)
        if vals.any():
            ax.bar(x, vals, bottom=bottom, color=cmap(k), label=stage, width=0.6)
            bottom += vals
    for i, n in enumerate(nights):
        if n["status"] in ("FAILED", "KILLED"):
            ax.annotate(f"{n['status'].lower()}\n({n.get('failed_stage') or '?'})", (i, bottom[i]),
                        ha="center", va="bottom", fontsize=8, color="#b22")
    ax.set_xticks(x, [_label(n) for n in nights], fontsize=8)
    ax.set_ylabel("wall time (s)")
    ax.set_ylim(0, max(bottom.max() * 1.25, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, out_dir, "nights_stage_times.png")


def plot_outcomes(nights: list[dict], out_dir: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(nights) + 3), 3.2))
    x = np.arange(len(nights))
    bottom = np.zeros(len(nights))
    for key, color in OUTCOMES:
        vals = np.array([n["users"].get(key, 0) for n in nights], dtype=float)
        ax.bar(x, vals, bottom=bottom, color=color, label=key.replace("_", " "), width=0.6)
        bottom += vals
    for i, n in enumerate(nights):
        if not n["users"]:
            ax.annotate("no personalize\nresult", (i, 0), ha="center", va="bottom", fontsize=8, color="#b22")
    ax.set_xticks(x, [_label(n) for n in nights], fontsize=8)
    ax.set_ylabel("users")
    ax.set_ylim(0, max(bottom.max() * 1.2, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, out_dir, "nights_users.png")


def plot_drift(nights: list[dict], drift: dict[str, pa.Table], out_dir: str) -> str | None:
    """Per night with a previous night to compare to: each user's latent distance, warm-started or not."""
    shown = [(i, n) for i, n in enumerate(nights) if drift.get(n["run_id"]) is not None]
    if not shown:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(nights) + 3), 3.4))
    rng = np.random.default_rng(0)
    groups = ((True, "warm-started refit", "#d62728", "o"), (False, "refit from the prior", "#ff7f0e", "s"),
              (None, "unchanged / not refitted", "#7f7f7f", "."))
    used = set()
    for i, n in shown:
        rows = [r for r in drift[n["run_id"]].to_pylist() if r.get("distance") is not None]
        for key, label, color, marker in groups:
            pts = [r["distance"] for r in rows if (r.get("warm_start") if r.get("refit") else None) is key]
            if not pts:
                continue
            xs = i + rng.uniform(-0.18, 0.18, size=len(pts))
            ax.scatter(xs, pts, s=22, color=color, marker=marker, alpha=0.8, zorder=3,
                       label=None if key in used else label)
            used.add(key)
    ax.set_xticks(np.arange(len(nights)), [_label(n) for n in nights], fontsize=8)
    ax.set_xlim(-0.5, len(nights) - 0.5)
    ax.set_ylabel("‖mean latent tonight − last night‖")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, out_dir, "nights_drift.png")


def _wr(p: tuple | None) -> str:
    if not p or p[0] is None:
        return "–"
    return f"{p[0]:.3f}" + (f" [{p[1]:.3f}, {p[2]:.3f}]" if p[1] is not None and p[2] is not None else "")


def _nights_table(nights: list[dict]) -> str:
    head = ["run id", "started (UTC)", "status", "duration", *STAGES, "fitted / unchanged / cold", "latent_dpo",
            "best baseline", "CLaP", "failed stage: error"]
    rows = []
    for n in nights:
        u = n["users"]
        q = n["quality"]
        lat = q.get("latent_dpo")
        best = q.get("best_baseline")
        cells = [n["run_id"][:12], n.get("start") or "–", n["status"], _dur(n["seconds"]),
                 *[_dur(n["stages"].get(s)) if s in n["stages"] else "" for s in STAGES],
                 f"{u.get('fitted', '–')} / {u.get('unchanged', '–')} / {u.get('cold_start', '–')}" if u else "–",
                 _wr((lat["value"], lat["lo"], lat["hi"])) if lat else "–",
                 f"{best['method']} {_wr((best['value'], best['lo'], best['hi']))}" if best else "–",
                 (n.get("clap_version") or "–")[:12],
                 f"{n['failed_stage']}: {n['error']}" if n.get("failed_stage") else ""]
        cls = " class='failed'" if n["status"] in ("FAILED", "KILLED") else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_esc(c)}</td>" for c in cells[:-1])
                    + f"<td class='err'>{_esc(cells[-1])}</td></tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _top_changed(nights: list[dict], drift: dict[str, pa.Table]) -> str:
    parts = []
    for n in reversed(nights):   # newest first
        table = drift.get(n["run_id"])
        if table is None:
            continue
        rows = [r for r in table.to_pylist() if r.get("distance") is not None and math.isfinite(r["distance"])
                and r["distance"] > 0]
        rows.sort(key=lambda r: -r["distance"])
        if not rows:
            parts.append(f"<p class='note'>Night {_esc(n['run_id'][:12])}: no user's latent changed.</p>")
            continue
        body = "".join(f"<tr><td>{_esc(r['user_id'])}</td><td>{r['distance']:.4f}</td>"
                       f"<td>{_esc(r.get('status') or '–')}</td>"
                       f"<td>{'yes' if r.get('warm_start') else ('no' if r.get('refit') else '–')}</td></tr>"
                       for r in rows[:TOP_CHANGED])
        prev = table.schema.metadata.get(b"previous_run", b"?").decode() if table.schema.metadata else "?"
        parts.append(f"<h3>Night {_esc(n['run_id'][:12])} vs {_esc(prev[:12])}: most-changed users</h3>"
                     "<table><thead><tr><th>user</th><th>latent distance</th><th>status tonight</th>"
                     f"<th>warm-started</th></tr></thead><tbody>{body}</tbody></table>")
    return "".join(parts)


def render_nights(out_dir: str, nights: list[dict], drift: dict[str, pa.Table], *, title: str,
                  notes: dict[str, str] | None = None) -> str:
    """Write nights.html and its PNGs into `out_dir`; `nights` oldest first. Returns the page's path."""
    os.makedirs(out_dir, exist_ok=True)
    notes = notes or {}
    parts = [f"<h1>{_esc(title)}</h1>",
             "<nav><a href='index.html'>&larr; this night's report</a>"
             + "".join(f"<a href='#{s}'>{s}</a>" for s in SECTIONS) + "</nav>"]
    parts.append(_section("nights", f"The last {len(nights)} nights", _nights_table(nights) if nights
                          else _missing("nightly runs in this experiment"), notes.get("nights")))
    img = plot_quality(nights, out_dir) if nights else None
    parts.append(_section("quality", "Quality per night: win rate per method (mean over evaluated users, 95% CI)",
                          f"<img src='{img}' alt='quality per night'>" if img else _missing("evaluated nights"),
                          notes.get("quality")))
    body = f"<img src='{plot_stage_times(nights, out_dir)}' alt='stage wall time per night'>" if nights else \
        _missing("nights")
    parts.append(_section("stage-times", "Wall time per stage and night", body, notes.get("stage-times")))
    body = f"<img src='{plot_outcomes(nights, out_dir)}' alt='users per night by outcome'>" if nights else \
        _missing("nights")
    parts.append(_section("user-outcomes", "Users per night by outcome", body, notes.get("user-outcomes")))
    img = plot_drift(nights, drift, out_dir)
    body = (f"<img src='{img}' alt='per-user drift between nights'>" + _top_changed(nights, drift)) if img else \
        _missing("two consecutive nights with user latents")
    parts.append(_section("drift", "Per-user drift between consecutive nights", body, notes.get("drift")))
    style = _STYLE + ("tr.failed td{background:#fbeaea}h3{font-size:1em;margin-top:1em}"
                      "td.err{max-width:230px}td{vertical-align:top}#nights td,#nights th{font-size:12px;padding:2px 5px}")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}{_CHECK_SCRIPT}</body></html>")
    path = os.path.join(out_dir, "nights.html")
    with open(path + ".part", "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(path + ".part", path)
    return path
