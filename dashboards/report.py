"""Static HTML report of one nightly run: comparison table with intervals, per-user results, plots as PNG
files next to the page (viewable offline, no external assets)."""
from __future__ import annotations

import html
import os
from typing import Any

import pyarrow as pa


def _plots(per_user: pa.Table | None, history: list[dict[str, Any]], out_dir: str) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if history:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("nll_per_token", "kl", "active_units")):
            ax.plot(steps, [h.get(key, float("nan")) for h in history])
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "clap_training.png"), dpi=80)
        plt.close(fig)
        made.append(("clap_training.png", "CLaP pretraining curves (stage 1 then stage 2)"))
    if per_user is not None and per_user.num_rows:
        methods = list(dict.fromkeys(per_user["method"].to_pylist()))
        data = [[w for m, w in zip(per_user["method"].to_pylist(), per_user["win_rate"].to_pylist()) if m == meth]
                for meth in methods]
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.boxplot(data, tick_labels=methods)
        ax.set_ylabel("per-user win rate vs reference")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "win_rates.png"), dpi=80)
        plt.close(fig)
        made.append(("win_rates.png", "Distribution of per-user win rates"))
    return made


def _table_html(table: pa.Table, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for r in table.to_pylist():
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, float):
                lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
                text = f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if isinstance(lo, float) and isinstance(hi, float) else "")
            else:
                text = "–" if v is None else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_report(out_dir: str, *, run_id: str, comparison: pa.Table | None, per_user: pa.Table | None,
                  history: list[dict[str, Any]], lineage: dict[str, str]) -> str:
    """Write index.html (+ PNGs) into `out_dir`; returns the path of index.html."""
    os.makedirs(out_dir, exist_ok=True)
    plots = _plots(per_user, history, out_dir)
    sections = [f"<h1>latentpref nightly run {html.escape(run_id)}</h1>"]
    sections.append("<section id='lineage'><h2>Lineage</h2><ul>" + "".join(
        f"<li><b>{html.escape(k)}</b>: <code>{html.escape(str(v))}</code></li>" for k, v in lineage.items())
        + "</ul></section>")
    if comparison is not None:
        sections.append("<section id='comparison'><h2>Methods side by side (mean [95% bootstrap CI] over users)</h2>"
                        + _table_html(comparison, ["method", "users", "mean_reward", "win_rate", "heldout_accuracy",
                                                   "perplexity", "fit_seconds", "trainable_params", "artifact_bytes"])
                        + "</section>")
    for name, caption in plots:
        sections.append(f"<section id='{name[:-4]}'><h2>{html.escape(caption)}</h2>"
                        f"<img src='{name}' alt='{html.escape(caption)}'></section>")
    if per_user is not None:
        sections.append("<section id='per-user'><h2>Per user</h2>" + _table_html(
            per_user, ["user_id", "cohort", "method", "n_train_pairs", "mean_reward", "win_rate", "heldout_accuracy",
                       "perplexity", "fit_seconds"]) + "</section>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>latentpref {html.escape(run_id)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path
