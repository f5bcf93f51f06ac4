"""The operator's view across nights, from MLflow: what ran, how long each stage took, how many users were fitted,
kept or cold-started, whether quality moved, what failed and how to resume (`latentpref runs`).

A night's facts live on its nightly (parent) run: tags `failed_stage`, `error`, `clap_version`, `quality_metric`;
metrics `stage_seconds_<stage>`, `users_*`, `win_rate*.<method>`, `nightly_seconds` (pipelines/nightly.py). Nights
from before those existed fall back to their stage runs (start/end times, the personalize run's user counts).
"""
from __future__ import annotations

import json
import socket
import time
from typing import Any

from latentpref.pipelines.config import STAGES
# methods that are not a per-user baseline fitted on the user's pairs (references / the unpersonalised prior)
NOT_BASELINES = {"latent_dpo", "base_lm", "clap_prior"}
FALLBACK_METRIC = "win_rate"
PREFERRED_METRIC = "win_rate_vs_prior"   # added by the evaluation when present; `win_rate` otherwise, labelled so


# ------------------------------------------------------------------------------------------------ errors
def _is_ray_wrapper(exc: BaseException) -> bool:
    """Ray's envelopes around a worker's error (a task's `RayTaskError(X)`, Ray Train's failure unions)."""
    name, mod = type(exc).__name__, type(exc).__module__ or ""
    return mod.split(".")[0] == "ray" and (name.startswith("RayTaskError") or name in {
        "RayActorError", "TrainingFailedError", "WorkerGroupError", "ControllerError", "RayTrainError"})


def _inner(exc: BaseException) -> BaseException | None:
    """The exception a Ray wrapper carries: a task error's `cause`, Ray Train's `controller_failure` or first
    `worker_failures` entry (lowest rank), else `raise ... from`."""
    for attr in ("cause", "controller_failure"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return inner
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        if isinstance(first, BaseException):
            return first
    return exc.__cause__


def root_cause(exc: BaseException) -> BaseException:
    """The first real error behind `exc`: unwraps Ray's task and Train envelopes (our own errors, which already
    say what failed, are kept as they are)."""
    seen: set[int] = set()
    while _is_ray_wrapper(exc) and id(exc) not in seen:
        seen.add(id(exc))
        inner = _inner(exc)
        if inner is None:
            break
        exc = inner
    return exc


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message` of the root cause (no Ray traceback dump)."""
    cause = root_cause(exc)
    name = type(cause).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):
        name = name[len("RayTaskError("):-1]
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    # a RayTaskError's text starts with the traceback header of the worker; its last line is the error itself
    if lines and (lines[0].startswith(("ray::", "Traceback")) or "Traceback" in lines[0]):
        lines = lines[-1:]
    msg = lines[0] if lines else ""
    text = f"{name}: {msg}" if msg and not msg.startswith(name) else (msg or name)
    return text[:limit]


# ------------------------------------------------------------------------------------------------ quality
def quality_metric(rows: list[dict]) -> str:
    """Which comparison column the headline quality uses: win rate vs the prior when the evaluation has it."""
    return PREFERRED_METRIC if any(r.get(PREFERRED_METRIC) is not None for r in rows) else FALLBACK_METRIC


# whether the text is the user's own (issue 27): logged beside the headline as `<figure>{,_lo,_hi}.<method>`, and per
# user group as `<group>.<figure>.<method>` (with the headline column as `<group>.win_rate.<method>`)
PERSONAL_FIGURES = ("own_vs_swapped", "win_rate_vs_base")
GROUPS = ("seen", "unseen", "out_of_cohort")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v


def quality_metrics(rows: list[dict], by_group: dict[str, list[dict]] | None = None) -> tuple[str, dict[str, float]]:
    """(metric column, {`win_rate.<method>`, `win_rate_lo.<method>`, `win_rate_hi.<method>`: value, plus the personal
    figures and the per-group ones}) for the parent run: one set of names whichever column the headline comes from
    (the tag `quality_metric` says which)."""
    metric = quality_metric(rows)
    out: dict[str, float] = {}
    for r in rows:
        for name, col in (("win_rate", metric), *((f, f) for f in PERSONAL_FIGURES)):
            for suffix in ("", "_lo", "_hi"):
                v = r.get(f"{col}{suffix}")
                if _finite(v):
                    out[f"{name}{suffix}.{r['method']}"] = float(v)
    for group, group_rows in (by_group or {}).items():
        for r in group_rows:
            for name, col in (("win_rate", metric), *((f, f) for f in PERSONAL_FIGURES)):
                if _finite(r.get(col)):
                    out[f"{group}.{name}.{r['method']}"] = float(r[col])
    return metric, out


def headline(metrics: dict[str, float], metric: str) -> dict[str, Any]:
    """Latent DPO and the best per-user baseline from a night's `win_rate*.<method>` metrics, with latent DPO's
    personal figures and its per-group headline when the night has them."""
    def point(method: str, name: str = "win_rate") -> dict[str, Any]:
        return {"method": method, "value": metrics.get(f"{name}.{method}"),
                "lo": metrics.get(f"{name}_lo.{method}"), "hi": metrics.get(f"{name}_hi.{method}")}
    methods = sorted(k.split(".", 1)[1] for k in metrics if k.startswith("win_rate."))
    baselines = [m for m in methods if m not in NOT_BASELINES and not m.startswith("oracle")]   # ceilings aren't
    best = max(baselines, key=lambda m: metrics[f"win_rate.{m}"], default=None)
    label = "win rate vs prior" if metric == PREFERRED_METRIC else "win_rate (vs reference; no win_rate_vs_prior)"
    personal = {f: point("latent_dpo", f) for f in PERSONAL_FIGURES if f"{f}.latent_dpo" in metrics}
    groups = {g: {name: metrics[f"{g}.{name}.latent_dpo"] for name in ("win_rate", *PERSONAL_FIGURES)
                  if f"{g}.{name}.latent_dpo" in metrics}
              for g in GROUPS if f"{g}.win_rate.latent_dpo" in metrics}
    return {"metric": metric, "label": label,
            "latent_dpo": point("latent_dpo") if "latent_dpo" in methods else None,
            "best_baseline": point(best) if best else None,
            "personal": personal, "groups": groups}


# ------------------------------------------------------------------------------------------------ nights
def _lock_holder_alive(store_root: str | None) -> bool | None:
    """True/False when the store's nightly lock says whether its holder lives; None when it cannot tell."""
    if not store_root or store_root == "None":
        return None
    try:
        from latentpref.tasks.data.locks import _alive
        from latentpref.tasks.data.store import Store
        store = Store(store_root)
        if not store.exists("locks", "nightly.lock"):
            return False
        holder = store.read_json("locks", "nightly.lock")
    except Exception:  # noqa: BLE001 - an unreachable store: cannot tell
        return None
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    return _alive(holder["pid"])


def _iso(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if ms else None


def night_of(client, run, stage_runs: list, *, newest: bool) -> dict[str, Any]:
    """One night's facts from its parent run and its stage runs."""
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    children = {r.info.run_name: r for r in stage_runs if r.info.run_name in STAGES}
    stages: dict[str, float | None] = {}
    for name in STAGES:
        if f"stage_seconds_{name}" in metrics:
            stages[name] = metrics[f"stage_seconds_{name}"]
        elif name in children and children[name].info.end_time:
            c = children[name].info
            stages[name] = (c.end_time - c.start_time) / 1000
        elif name in children:
            stages[name] = None   # started, never finished
    status = run.info.status
    store = params.get("runtime.store")
    failed_stage, error = tags.get("failed_stage"), tags.get("error")
    if status == "RUNNING":
        # nights on one store never overlap (store lock): a RUNNING night older than another, or one whose lock
        # is gone / held by a dead process, was killed without a chance to record it
        alive = _lock_holder_alive(store) if newest else False
        if alive is False:
            status = "KILLED"
            unfinished = [n for n in STAGES if n in children and not children[n].info.end_time]
            failed_stage = failed_stage or (unfinished[-1] if unfinished else
                                            next((n for n in STAGES if n not in children), None))
            error = error or "the night's process was killed (nothing recorded after this stage started)"
    seconds = metrics.get("nightly_seconds")
    if seconds is None and run.info.end_time:
        seconds = (run.info.end_time - run.info.start_time) / 1000
    pm = children["personalize"].data.metrics if "personalize" in children else {}
    users = {k: int(metrics.get(f"users_{k}", pm.get("users" if k == "total" else f"users_{k}", -1)))
             for k in ("total", "fitted", "unchanged", "cold_start")}
    users = {k: v for k, v in users.items() if v >= 0}
    metric = tags.get("quality_metric", FALLBACK_METRIC)
    wr = {k: v for k, v in metrics.items()
          if k.startswith(("win_rate", *PERSONAL_FIGURES)) or k.split(".", 1)[0] in GROUPS}
    quality = headline(wr, metric)
    win_rates = {k.split(".", 1)[1]: (v, wr.get(f"win_rate_lo.{k.split('.', 1)[1]}"),
                                      wr.get(f"win_rate_hi.{k.split('.', 1)[1]}"))
                 for k, v in wr.items() if k.startswith("win_rate.")}
    until = tags.get("until", "report")
    command = "nightly" if until == "report" else until
    resume = None
    if status in ("FAILED", "KILLED"):
        resume = (f"latentpref {command} --preset {tags.get('preset', 'tiny')}"
                  + (f" --store {store}" if store and store != "None" else "")
                  + "  (re-run: finished stages and unchanged users are skipped; it continues from what was stored)")
    return {"run_id": run.info.run_id, "name": run.info.run_name, "start": _iso(run.info.start_time),
            "start_ms": run.info.start_time, "status": status, "seconds": seconds, "stages": stages,
            "users": users, "quality": quality, "win_rates": win_rates, "clap_version": tags.get("clap_version"),
            "clap_model_version": tags.get("clap_model_version"), "failed_stage": failed_stage, "error": error,
            "resume": resume, "store": store, "preset": tags.get("preset")}


def list_nights(client, experiment_id: str, last: int = 10, *, until_ms: int | None = None) -> list[dict[str, Any]]:
    """The last `last` nightly runs of the experiment (started at or before `until_ms`), newest first."""
    where = "tags.flow = 'nightly'" + (f" and attributes.start_time <= {until_ms}" if until_ms else "")
    runs = client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                              max_results=last)
    nights = []
    for i, run in enumerate(runs):
        children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                      max_results=50)
        nights.append(night_of(client, run, children, newest=i == 0))
    return nights


# ------------------------------------------------------------------------------------------------ text
def _dur(s: float | None) -> str:
    if s is None:
        return "–"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def _wr(p: dict | None) -> str:
    if not p or p.get("value") is None:
        return "–"
    ci = f" [{p['lo']:.2f},{p['hi']:.2f}]" if p.get("lo") is not None and p.get("hi") is not None else ""
    return f"{p['value']:.2f}{ci}"


def _value(p: dict | None) -> str:
    return "–" if not p or p.get("value") is None else f"{p['value']:.2f}"


def format_nights(nights: list[dict[str, Any]]) -> str:
    """A plain-text table, one night a line, then what failed and how to resume."""
    if not nights:
        return "no nightly runs in this MLflow experiment yet"
    head = (f"{'run id':<12} {'started (UTC)':<19} {'status':<8} {'total':>6} "
            + " ".join(f"{s[:8]:>8}" for s in STAGES) + f" {'fit/same/cold':>13} {'latent_dpo':>17} "
            f"{'own/swap':>8} {'best baseline':>26} {'CLaP':<10}")
    lines = [head]
    for n in nights:
        u = n["users"]
        users = f"{u.get('fitted', '–')}/{u.get('unchanged', '–')}/{u.get('cold_start', '–')}" if u else "–"
        best = n["quality"]["best_baseline"]
        best_txt = f"{best['method']} {_wr(best)}" if best else "–"
        lines.append(f"{n['run_id'][:12]:<12} {n['start'] or '–':<19} {n['status']:<8} {_dur(n['seconds']):>6} "
                     + " ".join(f"{_dur(n['stages'].get(s)) if s in n['stages'] else '':>8}" for s in STAGES)
                     + f" {users:>13} {_wr(n['quality']['latent_dpo']):>17} "
                     f"{_value(n['quality'].get('personal', {}).get('own_vs_swapped')):>8} {best_txt:>26} "
                     f"{(n['clap_version'] or '–')[:10]:<10}")
    labels = {n["quality"]["label"] for n in nights if n["quality"]["latent_dpo"]}
    if labels:
        lines.append("quality: " + "; ".join(sorted(labels)) + ", mean over evaluated users [95% CI]; own/swap: "
                     "latent DPO's text vs the text of the least similar user's policy, by the user's reward")
    newest = next((n for n in nights if n["quality"].get("groups")), None)
    if newest:
        lines.append(f"by user group ({newest['run_id'][:12]}, latent_dpo): " + "; ".join(
            f"{g} " + ", ".join(f"{k} {v:.2f}" for k, v in figs.items()) for g, figs in newest["quality"]["groups"].items()))
    for n in nights:
        if n["status"] in ("FAILED", "KILLED"):
            lines.append(f"{n['run_id'][:12]} {n['status'].lower()} in stage {n['failed_stage'] or '?'}: "
                         f"{n['error'] or 'no error recorded'}")
            lines.append(f"  resume: {n['resume']}")
    return "\n".join(lines)


def to_json(nights: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v for k, v in n.items() if k != "start_ms"} for n in nights], indent=2)
