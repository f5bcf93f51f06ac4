"""report stage: gather one nightly run from MLflow (+ the store it points to) and render the static HTML report.

Any run id works: the run is looked up in MLflow, walked up to its nightly root, and everything else is found
from there: stage runs (children), their tags, params, metric histories, dataset inputs (digests + URIs) and
artifacts; the store comes from the run's `runtime.store` param (or its dataset URIs), so the report does not
depend on the store or MLflow server the CLI happens to be configured with. Bulky inputs the report needs that
MLflow does not hold (per-user heads, the latent cache) are read from that store.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import config
from latentpref.tasks.data.store import MANIFEST, Store

log = logging.getLogger(__name__)

STAGES = tuple(s for s in config.STAGES if s != "report")   # the stages with an MLflow run of their own
_HISTORY_KEYS = ("loss", "nll_per_token", "kl", "contrastive", "active_units", "stage")
MAP_PROMPTS = 16          # fixed prompts (first of the test split) each user's mean latent is taken over
MAP_MAX_USERS = 2000      # a bigger population is subsampled (deterministically) for the map
FEWSHOT_DIR = ("reports", "fewshot")   # <clap_version>.json: benchmarks/fewshot.py --store writes the curve there


class RunNotFound(ValueError):
    """The run id is not in the MLflow the report reads (the CLI prints it as an error, exit code 2)."""


# ------------------------------------------------------------------------------------------------ MLflow side
def nightly_root(client, run_id: str):
    """The nightly run `run_id` belongs to (itself, or the nearest ancestor tagged flow=nightly)."""
    from mlflow.exceptions import MlflowException
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RunNotFound(f"MLflow run {run_id!r} not found at {client.tracking_uri}: pass the --mlflow-uri "
                          f"(or --store) the night was logged with ({str(err).splitlines()[0][:200]})") from err
    seen = {run.info.run_id}
    while run.data.tags.get("flow") != "nightly" and run.data.tags.get("mlflow.parentRunId"):
        parent = run.data.tags["mlflow.parentRunId"]
        if parent in seen:
            break
        run = client.get_run(parent)
        seen.add(parent)
    return run


def stage_runs(client, root) -> dict[str, Any]:
    children = client.search_runs([root.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{root.info.run_id}'", max_results=200)
    return {r.info.run_name: r for r in children if r.info.run_name in STAGES}


def dataset_inputs(stages: dict[str, Any]) -> dict[str, dict[str, str]]:
    """name -> {digest, uri, rows} over the stage runs' MLflow dataset inputs (first stage wins)."""
    out: dict[str, dict[str, str]] = {}
    for name in STAGES:
        run = stages.get(name)
        for d in (run.inputs.dataset_inputs if run is not None and run.inputs else []):
            if d.dataset.name in out:
                continue
            try:
                uri = json.loads(d.dataset.source).get("uri", "")
            except (TypeError, ValueError):
                uri = str(d.dataset.source)
            rows = next((t.value for t in d.tags if t.key == "rows"), "")
            out[d.dataset.name] = {"digest": d.dataset.digest, "uri": uri, "rows": rows}
    return out


def artifact_table(client, run_id: str | None, path: str) -> pa.Table | None:
    if run_id is None:
        return None
    try:
        with tempfile.TemporaryDirectory() as d:
            local = client.download_artifacts(run_id, path, d)
            return pq.read_table(local)
    except Exception as err:   # noqa: BLE001 - a missing artifact only empties one section
        log.info("report: artifact %s of run %s unavailable (%s)", path, run_id, err)
        return None


def artifact_json(client, run_id: str | None, path: str) -> Any:
    """A JSON artifact of `run_id`, or None when it is missing (the caller falls back to the store's copy)."""
    if run_id is None:
        return None
    try:
        with tempfile.TemporaryDirectory() as d:
            with open(client.download_artifacts(run_id, path, d), encoding="utf-8") as fh:
                return json.load(fh)
    except Exception as err:   # noqa: BLE001 - a missing artifact only empties one section
        log.info("report: artifact %s of run %s unavailable (%s)", path, run_id, err)
        return None


COHORT_MATRIX = "cohort_matrix.json"   # parent run artifact comparison/<this>; store runs/<id>/<this>


def cohort_matrix(client, store: Store, run_id: str) -> tuple[dict[str, Any] | None, str]:
    """The evaluate stage's cohort x cohort matrix of the night (MLflow artifact, else the store's copy) and a note
    when there is none: a night from before the matrix existed, or an unreadable file, only empties one section."""
    found = artifact_json(client, run_id, f"comparison/{COHORT_MATRIX}")
    where = f"MLflow run {run_id} (comparison/{COHORT_MATRIX})"
    if found is None:
        where = store.url("runs", run_id, COHORT_MATRIX)
        try:
            if not store.exists("runs", run_id, COHORT_MATRIX):
                return None, f"The night wrote no cohort matrix (no {where} and no MLflow artifact)."
            found = store.read_json("runs", run_id, COHORT_MATRIX)
        except Exception as err:  # noqa: BLE001 - one empty section, never a failed report
            log.warning("report: cohort matrix %s unreadable: %s", where, err)
            return None, f"The cohort matrix at {where} could not be read: {type(err).__name__}: {err}"
    if not isinstance(found, dict) or not isinstance(found.get("methods"), dict) or not found["methods"]:
        return None, f"The cohort matrix from {where} has no methods: not the evaluate stage's cohort_matrix.json."
    return found, ""


def training_history(client, root, stages: dict[str, Any], clap_version: str | None
                     ) -> tuple[dict[str, list[tuple[int, float]]], str, str | None]:
    """CLaP metric histories from the pretrain run that trained this CLaP version (tonight's, or the earlier run
    that trained it when tonight's pretrain was skipped). Returns (history, source sentence, run id)."""
    candidates = []
    tonight = stages.get("pretrain")
    if tonight is not None and tonight.data.tags.get("skipped") != "true":
        candidates.append(tonight)
    elif clap_version:
        exp_ids = [root.info.experiment_id] + [e.experiment_id for e in client.search_experiments()
                                               if e.experiment_id != root.info.experiment_id]
        for exp_id in exp_ids:
            found = client.search_runs([exp_id], filter_string=f"attributes.run_name = 'pretrain' and "
                                                               f"tags.clap_version = '{clap_version}'",
                                       order_by=["attributes.start_time ASC"], max_results=50)
            candidates += [r for r in found if r.data.tags.get("skipped") != "true" and r.data.metrics]
            if candidates:
                break
    for run in candidates:
        history = {}
        for key in _HISTORY_KEYS:
            if key in run.data.metrics:
                history[key] = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        if history:
            when = "tonight" if run is tonight else "by an earlier night (tonight's pretrain was skipped: same version)"
            return history, f"From MLflow run {run.info.run_id}, which trained CLaP {clap_version} {when}.", \
                run.info.run_id
    return {}, "", None


def manifest_history(store: Store, clap_version: str) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """Fallback: the per-step history the pretrain stage keeps in the CLaP manifest."""
    if not store.exists("models", "clap", clap_version, MANIFEST):
        return {}, ""
    rows = store.read_json("models", "clap", clap_version, MANIFEST).get("history", [])
    history = {k: [(int(r["step"]), float(r[k])) for r in rows if k in r] for k in _HISTORY_KEYS}
    return ({k: v for k, v in history.items() if v},
            f"From the CLaP {clap_version} manifest in the store (no MLflow metric history found).")


# ------------------------------------------------------------------------------------------------ store side
def _store_of(root, datasets: dict[str, dict[str, str]], fallback: Store | None, clap_version: str | None) -> Store:
    """The store the night wrote to: its `runtime.store` param, else the root of its dataset URIs, else fallback."""
    options: list[str] = []
    param = root.data.params.get("runtime.store")
    if param and param != "None":
        options.append(param)
    for d in datasets.values():
        uri = d.get("uri", "")
        if "/data/" in uri:
            options.append(uri[: uri.rindex("/data/")])
    if fallback is not None:
        options.append(fallback.root)
    for option in options:
        store = Store(option)
        try:
            if store.exists("runs", root.info.run_id) or (
                    clap_version and store.exists("models", "clap", clap_version)):
                return store
        except Exception:  # noqa: BLE001 - an unreachable candidate is just not the one
            continue
    raise FileNotFoundError(f"none of the stores {options} holds run {root.info.run_id}: pass --store")


def read_uri_table(store: Store, uri: str) -> pa.Table | None:
    """A Parquet table by the URI MLflow recorded (inside the store if it is under its root)."""
    import fsspec
    if not uri:
        return None
    root = store.url().rstrip("/") + "/"
    try:
        if uri.startswith(root):
            return store.read_table(*uri[len(root):].split("/"))
        with fsspec.open(uri, "rb") as fh:
            return pq.read_table(io.BytesIO(fh.read()))
    except Exception as err:  # noqa: BLE001
        log.info("report: table %s unreadable (%s)", uri, err)
        return None


def _fixed_prompts(prompts: pa.Table) -> list[str]:
    texts = prompts["prompt"].to_pylist()
    splits = prompts["split"].to_pylist() if "split" in prompts.column_names else ["test"] * len(texts)
    test = [t for t, s in zip(texts, splits) if s == "test"]
    return (test or texts)[:MAP_PROMPTS]


class _ClapForPrompts:
    """The night's CLaP and its tokenised fixed prompts, loaded on first use only (the cache usually suffices)."""

    def __init__(self, store: Store, clap_version: str, prompts: list[str]):
        self.store, self.clap_version, self.prompts = store, clap_version, prompts
        self._loaded = None

    def get(self):
        """(clap, input_ids, attention_mask) of the fixed prompts."""
        if self._loaded is None:
            from latentpref.tasks.data.batching import tokenize_prompts
            from latentpref.tasks.models.clap import load_clap
            from latentpref.tasks.models.registry import load_tokenizer
            manifest = self.store.read_json("models", "clap", self.clap_version, MANIFEST)
            clap = load_clap(self.store.local_copy("models", "clap", self.clap_version))
            tokenizer = load_tokenizer(self.store.local_copy(*manifest["base_model_path"]))
            ids, mask = tokenize_prompts(tokenizer, self.prompts, int(manifest.get("prompt_tokens", 64)))
            self._loaded = (clap, ids, mask)
        return self._loaded


def prompt_features(store: Store, clap_version: str, prompts: list[str], model: _ClapForPrompts):
    """(N, Q, d) query features of `prompts` (the input of head-only policies): from the personalize stage's latent
    cache when it holds them all, else computed with the CLaP encoder."""
    import torch

    from latentpref.tasks.policy.cache import text_key
    from latentpref.tasks.policy.text_cache import TextLatentTable
    try:
        cache = TextLatentTable(store, clap_version).load(prompts, [])
        return cache.features[[cache.prompt_index[text_key(p)] for p in prompts]].float(), "the latent cache"
    except KeyError:     # not all of them encoded (or no table): the encoder computes them
        pass
    clap, ids, mask = model.get()
    with torch.no_grad():
        return clap.encoder.features(ids, mask).float(), "the CLaP encoder"


def _policy_of_run(store: Store, record: dict[str, Any], clap_version: str):
    """The user's policy in the exact version the night recorded (else their current one, same CLaP only)."""
    from latentpref.tasks.policy.store import load_user_policy
    policy = load_user_policy(store, record["user_id"], version=record["version"])
    if policy is not None:
        return policy
    policy = load_user_policy(store, record["user_id"])   # that version was pruned
    if policy is None or policy.manifest.get("clap_version") != clap_version:
        return None
    return policy


def user_map(store: Store, clap_version: str, records: pa.Table, users: pa.Table | None, prompts: pa.Table,
             evaluated: set[str]):
    """PCA map of every user the night fitted (or kept): mean of μ_θ(x) over fixed prompts, any fit mode."""
    import numpy as np
    import torch

    from latentpref.dashboards.user_map import UserMap, mean_user_latents, pca_2d
    cohort_of = dict(zip(users["user_id"].to_pylist(), users["cohort"].to_pylist())) if users is not None else {}
    rows = [r for r in records.to_pylist() if r.get("version")]
    if len(rows) > MAP_MAX_USERS:
        pick = np.random.default_rng(0).choice(len(rows), MAP_MAX_USERS, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    found = [(r["user_id"], _policy_of_run(store, r, clap_version)) for r in rows]
    found = [(u, p) for u, p in found if p is not None]
    if not found:
        return None, "no stored user policies found for this run's users"
    fixed = _fixed_prompts(prompts)
    model = _ClapForPrompts(store, clap_version, fixed)
    z: list[torch.Tensor | None] = [None] * len(found)
    heads = [i for i, (_, p) in enumerate(found) if p.mode == "head-only" and not p.cold_start]
    source = ""
    if heads:   # one batched einsum over cached prompt features for every head-only user
        feats, source = prompt_features(store, clap_version, fixed, model)
        stacked = mean_user_latents(torch.stack([found[i][1].tensors["weight"].float() for i in heads]),
                                    torch.stack([found[i][1].tensors["bias"].float() for i in heads]), feats)
        for j, i in enumerate(heads):
            z[i] = stacked[j]
    for i, (_, policy) in enumerate(found):
        # trunk-frozen / faithful: the user's own encoder pass; discrete codes too (a cold start's delta = 0 is the
        # population prior p(k|x), whose expected code is not 0)
        if z[i] is None and (not policy.cold_start or policy.discrete):
            clap, ids, mask = model.get()
            z[i] = policy.latent(clap.encoder, ids, mask)[0].float().mean(0)
    D = next((t.numel() for t in z if t is not None), 1)
    latents = torch.stack([t if t is not None else torch.zeros(D) for t in z])   # cold start: the prior mean 0
    coords, explained = pca_2d(latents.numpy())
    ids = [u for u, _ in found]
    um = UserMap(ids, [cohort_of.get(u, "unknown (ingested)") for u in ids], [p.cold_start for _, p in found],
                 [u in evaluated for u in ids], coords, explained, len(fixed), latents=latents.numpy(),
                 versions=[p.manifest.get("version", "") for _, p in found],
                 warm_start=[p.manifest.get("warm_start") for _, p in found])
    return um, f"Prompt features from {source}." if source else ""


def code_usage(store: Store, clap_version: str | None, latent_type: str) -> tuple[list[int] | None, str]:
    """Codebook usage of a discrete-latent CLaP, as recorded in its model manifest (`code_usage`: how often each
    code is the argmax posterior over the training candidates, written by the pretrain stage). Gaussian runs get
    no section at all."""
    if latent_type != "discrete" or not clap_version:
        return None, ""
    manifest = store.read_json("models", "clap", clap_version, MANIFEST) \
        if store.exists("models", "clap", clap_version, MANIFEST) else {}
    counts = manifest.get("code_usage")
    if not counts:
        return None, f"CLaP {clap_version} recorded no code_usage in its manifest."
    return [int(c) for c in counts], ""


def fewshot_result(store: Store, clap_version: str | None) -> tuple[dict[str, Any] | None, str]:
    """The few-shot curve of this CLaP version (benchmarks/fewshot.py's result, which it copies into the store), and
    a note when there is none. The benchmark is run by hand, not by the night, so a missing or unreadable file only
    empties the report's few-shot section; the note says which it was."""
    if not clap_version:
        return None, "The night recorded no CLaP version, so no few-shot curve can be matched to it."
    path = (*FEWSHOT_DIR, f"{clap_version}.json")
    try:
        if not store.exists(*path):
            return None, f"No few-shot result at {store.url(*path)}."
        result = store.read_json(*path)
    except Exception as err:  # noqa: BLE001 - one empty section, never a failed report
        log.warning("report: few-shot result %s unreadable: %s", store.url(*path), err)
        return None, f"The few-shot result at {store.url(*path)} could not be read: {type(err).__name__}: {err}"
    if not isinstance(result, dict) or not result.get("n_pairs") or not isinstance(result.get("methods"), dict):
        return None, f"The few-shot result at {store.url(*path)} has no n_pairs / methods: not a fewshot.py result."
    return result, ""


# ------------------------------------------------------------------------------------------------ assemble
def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "–"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "did not finish"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def night_summary(client, root, store: Store | None, per_user: pa.Table | None = None) -> dict[str, str]:
    """The facts under the report's title, as MLflow has them now: status, duration and per-stage times (the
    failed stage and its error, and how to resume) and the users. Cheap, so the flow can re-render it once the
    night's run has ended (`finalize_report`)."""
    from latentpref.pipelines import runs
    children = client.search_runs([root.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{root.info.run_id}'", max_results=200)
    night = runs.night_of(client, root, children, newest=True)
    tags = root.data.tags
    summary = {"MLflow run": f"{root.info.run_name} ({root.info.run_id})", "status": night["status"],
               "preset": tags.get("preset", "–"),
               "stages": ", ".join(s for s in runs.STAGES if s in night["stages"]) or "–",
               "started": _fmt_time(root.info.start_time),
               "duration": _clock(night["seconds"]) if night["seconds"] is not None else "still running"}
    if night["stages"]:
        summary["time per stage"] = " · ".join(f"{name} {_clock(sec)}" for name, sec in night["stages"].items())
    if night["failed_stage"]:
        summary["failed stage"] = night["failed_stage"]
        summary["error"] = night["error"] or "–"
    if night["resume"]:
        summary["resume"] = night["resume"]
    u = night["users"]
    if u:
        summary["users"] = (f"{u.get('total', 0)} total: {u.get('fitted', 0)} fitted, {u.get('unchanged', 0)} "
                            f"unchanged, {u.get('cold_start', 0)} cold start")
    pm = next((r.data.metrics for r in children if r.info.run_name == "personalize"), {})
    if pm:
        summary["nightly fit time per user"] = (f"{pm['mean_fit_seconds_per_user']:.3f} s (batched fit)"
                                                if pm.get("users_fitted") else "no user refitted tonight")
    if per_user is None and store is not None and store.exists("runs", root.info.run_id, "evaluation_per_user.parquet"):
        per_user = store.read_table("runs", root.info.run_id, "evaluation_per_user.parquet")
    if per_user is not None:
        summary["evaluated users"] = str(len(set(per_user["user_id"].to_pylist())))
    return summary


def collect(client, run_id: str, fallback_store: Store | None = None):
    """Everything the report shows, as a `ReportData`."""
    from latentpref.dashboards.report import ReportData
    root = nightly_root(client, run_id)
    tags, params, metrics = root.data.tags, root.data.params, root.data.metrics
    stages = stage_runs(client, root)
    datasets = dataset_inputs(stages)
    clap_version = tags.get("clap_version") or (stages["pretrain"].data.tags.get("clap_version")
                                                 if "pretrain" in stages else None)
    store = _store_of(root, datasets, fallback_store, clap_version)
    rid = root.info.run_id
    sid = {name: run.info.run_id for name, run in stages.items()}
    notes: dict[str, str] = {}

    def table(run: str | None, artifact: str, file: str) -> pa.Table | None:
        found = artifact_table(client, run, artifact)
        if found is None and store.exists("runs", rid, file):   # MLflow lacks it: the store keeps a copy
            found = store.read_table("runs", rid, file)
        return found

    comparison = table(rid, "comparison/comparison.parquet", "comparison.parquet")
    by_group = table(rid, "comparison/comparison_by_group.parquet", "comparison_by_group.parquet")
    matrix, matrix_note = cohort_matrix(client, store, rid)
    if matrix_note:
        notes["cohorts"] = matrix_note
    per_user = table(sid.get("evaluate"), "evaluation_per_user.parquet", "evaluation_per_user.parquet")
    records = table(sid.get("personalize"), "personalize_users.parquet", "personalize_users.parquet")

    try:
        history, history_source, trained_by = training_history(client, root, stages, clap_version)
        if not history and clap_version:
            history, history_source = manifest_history(store, clap_version)
    except Exception as err:  # noqa: BLE001 - one empty section, never a failed night
        log.warning("report: CLaP training curves unavailable: %s", err)
        history, history_source, trained_by = {}, "", None
        notes["training"] = f"Training curves could not be read: {err}"
    ones = [step for step, stage in history.pop("stage", []) if stage <= 1]
    boundary = max(ones) if ones else None

    umap = None
    if records is None:
        notes["user-latents"] = "the night did not reach the personalize stage"
    elif clap_version and "prompts" in datasets:
        try:
            prompts = read_uri_table(store, datasets["prompts"]["uri"])
            users = read_uri_table(store, datasets.get("users_hidden", {}).get("uri", ""))
            evaluated = set(per_user["user_id"].to_pylist()) if per_user is not None else set()
            if prompts is not None:
                umap, notes["user-latents"] = user_map(store, clap_version, records, users, prompts, evaluated)
        except Exception as err:  # noqa: BLE001
            log.warning("report: user latent map unavailable: %s", err)
            notes["user-latents"] = f"The user map could not be computed: {err}"

    pre_params = stages["pretrain"].data.params if "pretrain" in stages else {}
    latent_type = pre_params.get("pretrain.latent_type", "gaussian")
    usage, usage_note = code_usage(store, clap_version, latent_type)
    if usage_note:
        notes["code-usage"] = usage_note
    fewshot, fewshot_note = fewshot_result(store, clap_version)
    if fewshot_note:
        notes["few-shot"] = fewshot_note

    summary = night_summary(client, root, store, per_user=per_user)
    mlflow_rows = [("tracking URI", client.tracking_uri), ("experiment id", root.info.experiment_id),
                   ("nightly run", rid)] + [(f"{name} run", sid[name]) for name in STAGES if name in sid]
    if trained_by and trained_by != sid.get("pretrain"):
        mlflow_rows.append(("CLaP trained by run", trained_by))
    lineage: dict[str, list[tuple[str, str]]] = {
        "MLflow": mlflow_rows,
        "Models": [("CLaP version", clap_version or "–"), ("base model version", tags.get("base_model_version", "–")),
                   ("latent type", latent_type)],
        "Data": [(name, ", ".join(x for x in (f"digest {d['digest']}", d.get("rows") and f"{d['rows']} rows",
                                               d["uri"]) if x))
                 for name, d in sorted(datasets.items())],
        "Store": [("store", store.url()), ("report rendered", _fmt_time(int(time.time() * 1000)))],
    }
    if clap_version and store.exists("models", "clap", clap_version, MANIFEST):
        manifest = store.read_json("models", "clap", clap_version, MANIFEST)
        lineage["Models"].append(("base model folder", "/".join(manifest.get("base_model_path", []))))
        lineage["Models"].append(("CLaP folder", store.url("models", "clap", clap_version)))
    if tags.get("pairs_digest"):
        lineage["Data"].append(("pairs digest (run tag)", tags["pairs_digest"]))

    return ReportData(run_id=rid, title=f"latentpref nightly run {root.info.run_name or rid}", summary=summary,
                      lineage=lineage, comparison=comparison, comparison_by_group=by_group,
                      cohort_matrix=matrix, per_user=per_user, history=history,
                      history_source=history_source, stage_boundary=boundary, user_map=umap, latent_type=latent_type,
                      code_usage=usage, fewshot=fewshot, notes=notes)


def build_report(run_id: str, out_dir: str, *, tracking_uri: str | None = None, store: Store | None = None,
                 with_data: bool = False, nights: bool = True):
    """Render the report of the nightly run `run_id` (any run of that night works) into `out_dir`, with the
    across-nights page (nights.html) of the nights up to it.

    Args:
        tracking_uri: MLflow to read; None = the current one (inside the flow: the night's).
        store: used only if MLflow does not say where the night's store is.
        with_data: also return the gathered `ReportData`.
        nights: render nights.html too (the flow's report stage leaves it to `finalize_report`).
    Returns:
        Path of index.html (and the ReportData when `with_data`).
    Raises:
        RunNotFound (a ValueError): no such run in that MLflow.
    """
    import mlflow

    from latentpref.dashboards.report import render_report
    client = mlflow.MlflowClient(tracking_uri)
    data = collect(client, run_id, store)
    path = render_report(out_dir, data)
    if not nights:
        return (path, data) if with_data else path
    try:
        root = nightly_root(client, data.run_id)
        nights_page(client, root, _store_of(root, {}, store, None), out_dir)
    except Exception as err:  # noqa: BLE001 - the night's own report stands without it
        log.warning("report: the across-nights page could not be rendered: %s", err)
    return (path, data) if with_data else path


# ------------------------------------------------------------------------------------------------ across nights
LATENTS_FILE = "user_latents.parquet"   # runs/<id>/: each mapped user's mean latent and artifact version
DRIFT_FILE = "drift.parquet"            # runs/<id>/: per-user distance to the previous night's latent
NIGHTS_SHOWN = 14


def latents_table(data, records: pa.Table | None, clap_version: str | None) -> pa.Table | None:
    """Tonight's mean user latents (the user map's points before PCA), with version and fit facts."""
    um = data.user_map
    if um is None or um.latents is None:
        return None
    status = dict(zip(records["user_id"].to_pylist(), records["status"].to_pylist())) if records is not None else {}
    table = pa.table({"user_id": um.user_ids, "version": um.versions or [""] * len(um.user_ids),
                      "status": [status.get(u) for u in um.user_ids],
                      "warm_start": pa.array(um.warm_start or [None] * len(um.user_ids), pa.bool_()),
                      "cold_start": um.cold_start,
                      "z": pa.array([row.astype("float32").tolist() for row in um.latents],
                                    pa.list_(pa.float32()))})
    return table.replace_schema_metadata({"clap_version": clap_version or ""})


def user_drift(tonight: pa.Table, previous: pa.Table, previous_run: str) -> pa.Table:
    """Per user on both nights' maps: Euclidean distance between the mean latents (0 when the artifact version is
    the same), whether the user was refit tonight and whether that fit was warm-started. Latents of different CLaP
    versions live in different spaces: no distance then."""
    import numpy as np
    clap_t = (tonight.schema.metadata or {}).get(b"clap_version")
    clap_p = (previous.schema.metadata or {}).get(b"clap_version")
    same_space = clap_t == clap_p
    prev = {r["user_id"]: r for r in previous.to_pylist()}
    rows = []
    for r in tonight.to_pylist():
        p = prev.get(r["user_id"])
        if p is None:
            continue
        refit = r["version"] != p["version"]
        distance = None
        if same_space:
            distance = 0.0 if not refit else float(np.linalg.norm(np.asarray(r["z"]) - np.asarray(p["z"])))
        rows.append({"user_id": r["user_id"], "status": r["status"], "refit": refit,
                     "warm_start": r["warm_start"] if refit else None, "cold_start": r["cold_start"],
                     "distance": distance, "version": r["version"], "previous_version": p["version"]})
    schema = pa.schema([("user_id", pa.string()), ("status", pa.string()), ("refit", pa.bool_()),
                        ("warm_start", pa.bool_()), ("cold_start", pa.bool_()), ("distance", pa.float64()),
                        ("version", pa.string()), ("previous_version", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {"previous_run": previous_run, "same_clap": str(same_space)})


def previous_night(client, root, store: Store, file: str) -> str | None:
    """The latest nightly run before `root` in its experiment whose run folder holds `file`."""
    earlier = client.search_runs([root.info.experiment_id],
                                 filter_string=f"tags.flow = 'nightly' and attributes.start_time < "
                                               f"{root.info.start_time}",
                                 order_by=["attributes.start_time DESC"], max_results=NIGHTS_SHOWN)
    return next((r.info.run_id for r in earlier if store.exists("runs", r.info.run_id, file)), None)


def record_drift(client, store: Store, run_id: str, data, records: pa.Table | None,
                 clap_version: str | None) -> pa.Table | None:
    """Store tonight's user latents and their drift since the previous night (Parquet in the run folder, MLflow
    artifacts and metrics of the night). Returns the drift table, or None without a previous night."""
    import mlflow
    latents = latents_table(data, records, clap_version)
    if latents is None:
        return None
    store.write_table(latents, "runs", run_id, LATENTS_FILE)
    root = client.get_run(run_id)
    prev = previous_night(client, root, store, LATENTS_FILE)
    if prev is None:
        return None
    drift = user_drift(latents, store.read_table("runs", prev, LATENTS_FILE), prev)
    store.write_table(drift, "runs", run_id, DRIFT_FILE)
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(drift, os.path.join(d, DRIFT_FILE))
        client.log_artifact(run_id, os.path.join(d, DRIFT_FILE), artifact_path="drift")
    dist = [x for x in drift["distance"].to_pylist() if x is not None]
    if dist:
        mlflow.MlflowClient().log_batch(run_id, metrics=[
            mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0) for k, v in (
                ("drift_mean", sum(dist) / len(dist)), ("drift_max", max(dist)),
                ("drift_users_refit", sum(drift["refit"].to_pylist())))])
    return drift


def nights_page(client, root, store: Store, out_dir: str) -> str:
    """nights.html in `out_dir`: the last nights of `root`'s experiment up to `root`, oldest first."""
    from latentpref.dashboards.nights import render_nights
    from latentpref.pipelines import runs
    nights = runs.list_nights(client, root.info.experiment_id, last=NIGHTS_SHOWN,
                              until_ms=root.info.start_time)[::-1]
    drift, notes = {}, {}
    for n in nights:
        try:
            if store.exists("runs", n["run_id"], DRIFT_FILE):
                drift[n["run_id"]] = store.read_table("runs", n["run_id"], DRIFT_FILE)
        except Exception as err:  # noqa: BLE001
            log.info("report: drift of night %s unreadable (%s)", n["run_id"], err)
    labels = sorted({n["quality"]["label"] for n in nights if n["quality"]["latent_dpo"]})
    if labels:
        notes["quality"] = "Metric: " + "; ".join(labels) + "."
    notes["drift"] = ("Distance between a user's mean latent μ_θ(x) over fixed prompts tonight and on the previous "
                      "night with a personalize result (same CLaP version only); users on the user map (all users "
                      f"up to {MAP_MAX_USERS}).")
    title = f"latentpref: the last {len(nights)} nights of experiment {root.info.experiment_id}"
    return render_nights(out_dir, nights, drift, title=title, notes=notes)


def finalize_report(store: Store, run_id: str, *, failed: bool = False) -> str | None:
    """Once the night's MLflow run has ended: its report's summary shows the final state (status, duration,
    per-stage times, failed stage and error), or a whole report is rendered for a night that `failed` before its
    report stage; the across-nights page includes the night. A run that stopped early on purpose (`latentpref
    personalize`) and succeeded gets none. Returns the report's URL, or None."""
    import mlflow

    from latentpref.dashboards.report import replace_summary
    client = mlflow.MlflowClient()
    root = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as d:
        if store.exists("runs", run_id, "report", "index.html"):
            page = store.read_bytes("runs", run_id, "report", "index.html").decode("utf-8")
            with open(os.path.join(d, "index.html"), "w", encoding="utf-8") as fh:
                fh.write(replace_summary(page, night_summary(client, root, store)))
            nights_page(client, root, store, d)
        elif failed:
            build_report(run_id, d, store=store)
        else:
            return None
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as fh:
                store.write_bytes(fh.read(), "runs", run_id, "report", name)
        client.log_artifacts(run_id, d, artifact_path="report")
    return store.url("runs", run_id, "report", "index.html")


@task(name="report", cache_policy=NO_CACHE)
def report_stage(store: Store, run_id: str) -> str:
    import mlflow
    logger = get_run_logger()
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as d:
        _, data = build_report(run_id, d, store=store, with_data=True, nights=False)
        try:
            records = store.read_table("runs", run_id, "personalize_users.parquet") \
                if store.exists("runs", run_id, "personalize_users.parquet") else None
            record_drift(client, store, run_id, data, records, client.get_run(run_id).data.tags.get("clap_version"))
        except Exception as err:  # noqa: BLE001 - a missing drift panel never fails the night
            logger.warning("report: per-user drift not recorded: %s", err)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as fh:
                store.write_bytes(fh.read(), "runs", run_id, "report", name)
        client.log_artifacts(run_id, d, artifact_path="report")
    url = store.url("runs", run_id, "report", "index.html")
    logger.info("report: %s", url)
    return url
