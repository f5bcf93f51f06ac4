"""Per-user stage logic: fitting + storing a chunk of users (the flow, pipelines/personalize.py, fans `fit_chunk` out
as Ray tasks; nothing here imports Ray).

A chunk reads the CLaP version's latent cache (tasks/policy/cache.py), so fitting never runs the LM (spec
latent-dpo.md §3.6, §8), and writes each user's policy where tasks/policy/store.py says (layout, versions, pointer).

Modes (`ChunkJob.mode`, PersonalizeConfig.mode): `head-only` fits a Gaussian head on cached features
(`fit_user.fit_users`); `trunk-frozen` and `faithful` fit part of / all of a copy of the CLaP encoder
(`fit_encoder.fit_encoder_users`), which needs the CLaP itself (`ChunkJob.clap_path`). Discrete CLaPs
(`latent_type="discrete"`, spec lpc.md §6.3): a user is K numbers (`delta`, fitted by `fit_codes.fit_code_users`),
stored under mode `codes` with the estimator in the version and the user's mean code mixture in the manifest
(`code_mixture`, K floats). Only the head-only style fit exists for codes: other modes raise.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import torch

from latentpref.tasks.data.ipc import table_from_ipc, table_to_ipc  # noqa: F401  (table_to_ipc: for the flow)
from latentpref.tasks.data.store import Store
from latentpref.tasks.models.latent import POLICY_LOGVAR_BOUND
# the policy's home: re-exported here for the callers of the old paths
from latentpref.tasks.policy.cache import CACHE_FORMAT, LatentCache, build_latent_cache, text_key  # noqa: F401
from latentpref.tasks.policy.settings import FitSettings
from latentpref.tasks.policy.table import PolicyTable, StagedChunk
from latentpref.tasks.policy.store import (  # noqa: F401
    CODES_FILE,
    CODES_MODE,
    ENCODER_MODES,
    HEAD_FILE,
    MODES,
    POLICY_FILE,
    UserPolicy,
    current_fit,
    fit_version,
    is_discrete,
    load_user_head,
    load_user_policy,
    previous_fit,
    seed_policy,
    store_user,
    store_users,
    user_data_hash,
    user_folder,
)

log = logging.getLogger(__name__)

_store_user = store_user      # old private names (tests, benchmarks)
_previous = previous_fit


@dataclass(frozen=True)
class ChunkJob:
    """One Ray task's worth of users (plain data, picklable)."""

    store_root: str
    clap_version: str
    user_ids: tuple[str, ...]
    fit: FitSettings            # built once from the config (PersonalizeConfig.fit_settings()); a mapping of
    #                             its fields is accepted (unset noise_draws: fresh samples in the faithful mode)
    mode: str
    min_pairs: int
    # the chunk's train pairs, exactly one of: an Arrow IPC stream (small refits, tools, tests), or a Parquet file
    # of the store and its row groups holding them (the night: tasks/train/night_pairs.py, so no job carries pairs)
    pairs_ipc: bytes | None = None
    pairs_path: tuple[str, ...] = ()
    pairs_row_groups: tuple[int, ...] = ()
    warm_start: bool = True
    clap_path: tuple[str, ...] = ()   # the CLaP folder in the store; needed by the encoder modes
    discrete_estimator: str = "dpo"   # discrete CLaPs: "dpo" | "mean_posterior" (fit_codes.CodeFitConfig)
    cache_path: tuple[str, ...] = ()  # a safetensors latent cache (tools, tests); () = the CLaP version's
    #                                   content-keyed latent table (the night: tasks/policy/text_cache.py)
    read_version: int | None = None   # the policy table version the night read (None: the latest at the task)
    night: str = ""                   # the run writing the rows (the table's `night` column)
    records_path: tuple[str, ...] = ()  # run_chunk: where this task writes its per-user records (Parquet)

    def __post_init__(self) -> None:
        if (self.pairs_ipc is None) == (not self.pairs_path):
            raise ValueError("ChunkJob needs its pairs as exactly one of pairs_ipc (Arrow IPC bytes) or pairs_path "
                             f"(+ pairs_row_groups); got pairs_ipc={'None' if self.pairs_ipc is None else 'bytes'}, "
                             f"pairs_path={self.pairs_path!r}")
        if self.pairs_path and not self.pairs_row_groups:
            raise ValueError(f"ChunkJob.pairs_path={self.pairs_path!r} needs pairs_row_groups (the chunk's row groups "
                             "of that file); a chunk without pairs passes the empty table as pairs_ipc")
        object.__setattr__(self, "pairs_path", tuple(self.pairs_path))
        object.__setattr__(self, "pairs_row_groups", tuple(int(g) for g in self.pairs_row_groups))
        object.__setattr__(self, "fit", FitSettings.of(self.fit, fresh_noise=self.mode == "faithful"))

    def read_pairs(self, store: Store) -> pa.Table:
        """The chunk's train pairs, from the job's bytes or its row groups of the run's pairs file.

        Raises:
            ValueError: the row groups hold users outside the chunk (the file was rewritten since the job was made).
        """
        if self.pairs_ipc is not None:
            return table_from_ipc(self.pairs_ipc)
        pairs = store.read_row_groups(*self.pairs_path, row_groups=self.pairs_row_groups)
        stray = set(pc.unique(pairs["user_id"]).to_pylist()) - set(self.user_ids)
        if stray:
            raise ValueError(f"{'/'.join(self.pairs_path)} row groups {list(self.pairs_row_groups)} hold "
                             f"{len(stray)} users outside this chunk of {len(self.user_ids)}: the run's pairs file "
                             "is not the one this job was planned on (rewritten by another attempt of the night?)")
        return pairs


@functools.lru_cache(maxsize=1)
def _load_encoder(store_root: str, clap_path: tuple[str, ...]):
    """The CLaP's latent encoder, loaded once per worker process (Ray reuses workers across chunks)."""
    from latentpref.tasks.models.clap import load_clap
    clap = load_clap(Store(store_root).local_copy(*clap_path))
    encoder = clap.encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def _stack_users(pairs: pa.Table, by_user: dict[str, list[int]], user_ids: list[str]) -> tuple[pa.Table, list[int]]:
    """The users' pair rows stacked in `user_ids` order, and each row's user index 0..len(user_ids)-1."""
    rows, user_index = [], []
    for u_i, user_id in enumerate(user_ids):
        rows.extend(by_user[user_id])
        user_index.extend([u_i] * len(by_user[user_id]))
    return pairs.take(rows), user_index


@dataclass
class ChunkResult:
    """A chunk's fits, staged in the policy table but not committed (the driver commits: tasks/policy/table.py)."""

    records: list[dict[str, Any]]
    staged: StagedChunk


def fit_chunk(job: ChunkJob) -> list[dict[str, Any]]:
    """`stage_chunk` and commit at once (one chunk on its own: tools, tests); returns the per-user records."""
    result = stage_chunk(job)
    PolicyTable(Store(job.store_root), job.clap_version).commit(result.staged, message=f"chunk of {len(job.user_ids)}")
    return result.records


def run_chunk(job: ChunkJob) -> dict[str, Any]:
    """The night's Ray task: `stage_chunk`, its per-user records written to `job.records_path` (one Parquet file),
    and only what the driver needs returned: the staged fragments and counts, so the driver's memory does not grow
    with the number of users."""
    result = stage_chunk(job)
    store = Store(job.store_root)
    records = result.records
    store.write_table(records_table(records), *job.records_path)
    status = [r.get("status") for r in records]
    fitted_s = [r["fit_seconds"] for r in records if r.get("status") == "fitted"]
    mixtures = [r["code_mixture"] for r in records if r.get("code_mixture")]
    return {"staged": result.staged, "records_path": job.records_path, "users": len(records),
            "fitted": status.count("fitted"), "unchanged": status.count("unchanged"),
            "cold_start": status.count("cold_start"), "fit_seconds_sum": float(sum(fitted_s)),
            "artifact_bytes_sum": float(sum(r.get("artifact_bytes") or 0 for r in records)),
            "mixture_sum": [float(x) for x in torch.tensor(mixtures).sum(0)] if mixtures else None,
            "mixture_n": len(mixtures),
            "last_written_at": max((r.get("written_at", 0.0) for r in records), default=0.0)}


RECORD_COLUMNS = ("user_id", "status", "mode", "cold_start", "n_pairs", "fit_seconds", "train_accuracy",
                  "final_loss", "artifact_bytes", "version", "data_hash")


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """Per-user records as the night's table (`runs/<run>/personalize_users.parquet`): one schema whatever the mix."""
    schema = pa.schema([("user_id", pa.string()), ("status", pa.string()), ("mode", pa.string()),
                        ("cold_start", pa.bool_()), ("n_pairs", pa.int64()), ("fit_seconds", pa.float64()),
                        ("train_accuracy", pa.float64()), ("final_loss", pa.float64()),
                        ("artifact_bytes", pa.int64()), ("version", pa.string()), ("data_hash", pa.string())])
    return pa.Table.from_pylist([{k: r.get(k) for k in RECORD_COLUMNS} for r in records], schema=schema)


def stage_chunk(job: ChunkJob) -> ChunkResult:
    """Fit (batched) every user of the chunk that needs it and stage their rows in the policy table. Idempotent.

    Users whose (CLaP version, mode, settings, feedback) match their row at `job.read_version` are skipped
    ("unchanged"); users with fewer than `min_pairs` pairs get the population prior ("cold_start": a zero head, or
    delta = 0 for codes); the rest are fitted together, warm-started from their previous fit of the same CLaP
    version and mode.

    Raises:
        ValueError: unknown mode, or an encoder mode without `clap_path` / with a cache lacking prompt tokens, or
            a mode other than head-only with a discrete CLaP.
    """
    if job.mode not in MODES:
        raise ValueError(f"mode={job.mode!r}; expected one of {MODES}")
    if job.mode in ENCODER_MODES and not job.clap_path:
        raise ValueError(f"mode={job.mode!r} trains a copy of the CLaP encoder: ChunkJob.clap_path must name the "
                         "CLaP folder in the store")
    torch.set_num_threads(1)
    store = Store(job.store_root)
    pairs = job.read_pairs(store)
    if job.cache_path:
        cache = LatentCache.from_bytes(store.read_bytes(*job.cache_path))
    else:   # exactly this chunk's texts, from the content-keyed table the night's encoding tasks filled
        from latentpref.tasks.policy.text_cache import TextLatentTable
        prompts, chosen, rejected = (pairs[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
        cache = TextLatentTable(store, job.clap_version).load(
            prompts, list(zip(prompts, chosen)) + list(zip(prompts, rejected)), list(zip(prompts, chosen, rejected)))
    if job.mode in ENCODER_MODES and cache.prompt_ids is None:
        raise ValueError(f"latent cache {'/'.join(job.cache_path)} has no prompt tokens (format < {CACHE_FORMAT}); "
                         f"mode={job.mode!r} needs them: delete it so the flow rebuilds it")
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(pairs["user_id"].to_pylist()):
        by_user.setdefault(u, []).append(i)
    table = PolicyTable(store, job.clap_version)
    read_version = job.read_version if job.read_version is not None else table.latest_version()
    # every user's row of the version the night read, in one indexed lookup (not one read per user)
    current = table.policies(job.user_ids, read_version) if read_version is not None else {}
    chunk = _ChunkState(store, table, read_version, current)
    fit = _fit_code_chunk if is_discrete(cache) else _fit_gaussian_chunk
    records, fits = fit(job, chunk, cache, pairs, by_user)
    staged, stored = table.stage(fits, read_version=read_version, night=job.night, n_params=_head_size(cache))
    _fault_point()
    stored_by_user = {r["user_id"]: r for r in stored}
    records = [r if r is not None else stored_by_user[u] for u, r in zip(job.user_ids, records)]
    return ChunkResult(records, staged)


def _head_size(cache: LatentCache) -> int:
    """Floats of one user's row in the policy table: the Gaussian head (weight (Q, d, 2D/Q) + bias (Q, 2D/Q) =
    2D(d + 1)) or a discrete CLaP's K code offsets."""
    if is_discrete(cache):
        return int(cache.prior_logits.shape[1])
    d, D = int(cache.features.shape[2]), int(cache.mu.shape[1])
    return 2 * D * (d + 1)


@dataclass
class _ChunkState:
    store: Store
    table: PolicyTable
    read_version: int | None
    current: dict[str, UserPolicy]       # the chunk's users' rows at read_version

    def seed(self, user_id: str, clap_version: str, mode: str) -> UserPolicy | None:
        return seed_policy(self.current.get(user_id), clap_version, mode)


def _fit_gaussian_chunk(job: ChunkJob, chunk: "_ChunkState", cache: LatentCache, pairs: pa.Table,
                        by_user: dict[str, list[int]]) -> tuple[list[dict[str, Any] | None], list[tuple]]:
    """`fit_chunk` for a Gaussian CLaP: a head per user (head-only) or the mode's encoder tensors."""
    from latentpref.tasks.train.fit_user import FitConfig, init_params

    Q, d = cache.features.shape[1:]
    D = cache.mu.shape[1]

    def cold_start(user_id: str):   # too little evidence: the population prior N(0, I) (zero head), any mode
        weight, bias = init_params(1, Q, d, D)
        return HEAD_FILE, {"weight": weight[0], "bias": bias[0]}, {"mode": job.mode}

    records, fits, to_fit = _triage(job, chunk, pairs, by_user, job.mode, cold_start)
    if not to_fit:
        return records, fits
    sub, user_index = _stack_users(pairs, by_user, [u for u, _ in to_fit])
    prompts = sub["prompt"].to_pylist()
    p_idx = torch.tensor([cache.prompt_index[text_key(p)] for p in prompts], dtype=torch.long)
    c_idx = [cache.response_index[text_key(p, c)] for p, c in zip(prompts, sub["chosen"].to_pylist())]
    r_idx = [cache.response_index[text_key(p, r)] for p, r in zip(prompts, sub["rejected"].to_pylist())]
    post = (cache.mu[c_idx], cache.logvar[c_idx], cache.mu[r_idx], cache.logvar[r_idx])
    weights = _pair_weights(sub)
    user_index_t = torch.tensor(user_index, dtype=torch.long)
    cfg = FitConfig(**job.fit.gaussian())
    ids = [u for u, _ in to_fit]
    t0 = time.perf_counter()
    if job.mode == "head-only":
        from latentpref.tasks.train.fit_user import fit_users
        # a projected head is not where the fit ended (scaled, coordinates dropped): such fits start fresh
        warm = job.warm_start and not job.fit.project_dims
        init = _warm_start_heads(chunk, ids, job.clap_version, Q, d, D) if warm else None
        result = fit_users(cache.features[p_idx], *post, user_index_t, len(to_fit), cfg, init=init,
                           pair_weight=weights)
        if job.fit.project_dims:   # personalize.preference_only: the user is a position in the preference space
            from latentpref.tasks.train.fit_user import project_heads
            result.weight, result.bias = project_heads(result.weight, result.bias, job.fit.project_dims,
                                                       job.fit.project_scale)
        artifacts = [(HEAD_FILE, {"weight": result.weight[i], "bias": result.bias[i]}) for i in range(len(to_fit))]
        n_params = int(result.weight[0].numel() + result.bias[0].numel())
    else:
        from latentpref.tasks.train.fit_encoder import fit_encoder_users
        encoder = _load_encoder(job.store_root, tuple(job.clap_path))
        init = _warm_start_policies(chunk, ids, job.clap_version, job.mode) if job.warm_start else None
        used, pair_prompt = torch.unique(p_idx, return_inverse=True)     # only the chunk's prompts
        result = fit_encoder_users(encoder, job.mode, cache.prompt_ids[used], cache.prompt_mask[used], pair_prompt,
                                   *post, user_index_t, len(to_fit), cfg, init=init, pair_weight=weights)
        artifacts = [(POLICY_FILE, state) for state in result.states]
        n_params = result.trainable_params
    per_user_s = (time.perf_counter() - t0) / len(to_fit)
    infos = [{"mode": job.mode, "trainable_params": n_params,
              "warm_start": bool(init is not None and (job.mode == "head-only" or init[u_i] is not None))}
             for u_i in range(len(to_fit))]
    return records, fits + _fitted(job, job.mode, to_fit, by_user, artifacts, infos, result, per_user_s,
                                   cfg.loss_type)


def _fit_code_chunk(job: ChunkJob, chunk: "_ChunkState", cache: LatentCache, pairs: pa.Table,
                    by_user: dict[str, list[int]]) -> tuple[list[dict[str, Any] | None], list[tuple]]:
    """`fit_chunk` for a discrete CLaP: per-user code offsets delta (K numbers), batched (fit_codes)."""
    from latentpref.tasks.train.fit_codes import CodeFitConfig, fit_code_users, user_code_probs

    if job.mode != "head-only":
        raise ValueError(f"personalize.mode={job.mode!r} is not supported with a discrete-code CLaP "
                         "(pretrain.latent_type='discrete'): a user is K code offsets fitted on cached posteriors, "
                         "the head-only style; use personalize.mode=head-only")
    cfg = CodeFitConfig(estimator=job.discrete_estimator, **job.fit.codes())
    mode_tag = f"{CODES_MODE}-{cfg.estimator}"       # the estimator changes the result: part of the version
    K = cache.prior_logits.shape[1]
    prompts_all = pairs["prompt"].to_pylist()
    codes_info = {"mode": CODES_MODE, "latent_type": "discrete", "estimator": cfg.estimator}

    def cold_start(user_id: str):   # delta = 0 is exactly the population prior p(k|x) (lpc.md §6.3)
        zero = torch.zeros(K)
        rows = by_user.get(user_id, [])   # mean p_u(k|x) over the user's prompts (every cached prompt if none)
        prior = (cache.prior_logits[[cache.prompt_index[text_key(prompts_all[i])] for i in rows]] if rows
                 else cache.prior_logits)
        mixture = user_code_probs(zero, prior).mean(0).tolist() if prior.shape[0] else [1.0 / K] * K
        return CODES_FILE, {"delta": zero}, {**codes_info, "code_mixture": mixture}

    records, fits, to_fit = _triage(job, chunk, pairs, by_user, mode_tag, cold_start)
    if not to_fit:
        return records, fits
    sub, user_index = _stack_users(pairs, by_user, [u for u, _ in to_fit])
    prompts, chosen, rejected = (sub[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
    p_idx = [cache.prompt_index[text_key(p)] for p in prompts]
    c_idx = [cache.response_index[text_key(p, c)] for p, c in zip(prompts, chosen)]
    r_idx = [cache.response_index[text_key(p, r)] for p, r in zip(prompts, rejected)]
    pair_logits = None
    if cfg.estimator == "mean_posterior":
        keys = [text_key(p, c, r) for p, c, r in zip(prompts, chosen, rejected)]
        missing = sum(k not in cache.pair_index for k in keys)
        if missing:
            raise ValueError(f"latent cache {'/'.join(job.cache_path)} lacks the pair posterior of {missing} pairs; "
                             "estimator='mean_posterior' needs every pair encoded (build the cache with pairs=)")
        pair_logits = cache.pair_logits[[cache.pair_index[k] for k in keys]]
    ids = [u for u, _ in to_fit]
    init = None
    if job.warm_start and cfg.estimator == "dpo":
        prev = [chunk.seed(u, job.clap_version, CODES_MODE) for u in ids]
        prev = [p if p is not None and p.manifest.get("estimator") == cfg.estimator else None for p in prev]
        if any(p is not None for p in prev):
            init = torch.stack([p.tensors["delta"].float() if p is not None else torch.zeros(K) for p in prev])
    result = fit_code_users(cache.prior_logits[p_idx], cache.code_logits[c_idx], cache.code_logits[r_idx],
                            torch.tensor(user_index, dtype=torch.long), len(to_fit), cfg, pair_logits=pair_logits,
                            init=init, pair_weight=_pair_weights(sub))
    artifacts = [(CODES_FILE, {"delta": result.delta[u_i]}) for u_i in range(len(to_fit))]
    infos = [{**codes_info, "trainable_params": K, "code_mixture": result.mixture[u_i].tolist(),
              "warm_start": bool(init is not None and bool(init[u_i].abs().sum() > 0))} for u_i in range(len(to_fit))]
    return records, fits + _fitted(job, mode_tag, to_fit, by_user, artifacts, infos, result,
                                   result.seconds / len(to_fit), cfg.loss_type)


def _triage(job: ChunkJob, chunk: "_ChunkState", pairs: pa.Table, by_user: dict[str, list[int]], mode_tag: str,
            cold_start: Callable[[str], tuple[str, dict, dict]]
            ) -> tuple[list[dict[str, Any] | None], list[tuple], list[tuple[str, str]]]:
    """Records of the chunk in user order (unchanged users' records filled in; None for every user to be stored),
    the cold-start fits to stage, and the (user, data hash) to fit."""
    records: list[dict[str, Any] | None] = []
    fits: list[tuple] = []
    to_fit: list[tuple[str, str]] = []
    for user_id in job.user_ids:
        rows = pairs.take(pa.array(by_user.get(user_id, []), type=pa.int64()))   # [] alone is a null-typed array
        data_hash = user_data_hash(rows)
        version = fit_version(job.clap_version, mode_tag, data_hash, _version_settings(job))
        existing = chunk.current.get(user_id)
        if existing is not None and existing.manifest.get("version") == version:
            records.append({**existing.manifest, "status": "unchanged"})
            continue
        if rows.num_rows < job.min_pairs:
            artifact, tensors, info = cold_start(user_id)
            fits.append((user_id, version, artifact, tensors, {
                "cold_start": True, "n_pairs": rows.num_rows, "data_hash": data_hash,
                "clap_version": job.clap_version, "fit_settings": _version_settings(job), "fit_seconds": 0.0,
                "train_accuracy": None, "final_loss": None, **info}))
        else:
            to_fit.append((user_id, data_hash))
        records.append(None)
    return records, fits, to_fit


def _fitted(job: ChunkJob, mode_tag: str, to_fit: list[tuple[str, str]], by_user: dict[str, list[int]],
            artifacts: list[tuple[str, dict]], infos: list[dict], result, per_user_s: float,
            loss_type: str) -> list[tuple]:
    fits = []
    for u_i, (user_id, data_hash) in enumerate(to_fit):
        name, tensors = artifacts[u_i]
        fits.append((user_id, fit_version(job.clap_version, mode_tag, data_hash, _version_settings(job)), name,
                     tensors, {
            "cold_start": False, "n_pairs": len(by_user[user_id]), "data_hash": data_hash,
            "clap_version": job.clap_version, "fit_settings": _version_settings(job), "fit_seconds": per_user_s,
            "loss_type": loss_type, "train_accuracy": float(result.final_accuracy[u_i]),
            "final_loss": float(result.final_loss[u_i]), **infos[u_i]}))
    return fits


def _pair_weights(sub: pa.Table) -> torch.Tensor:
    return torch.tensor([1.0 if w is None else float(w) for w in sub["weight"].to_pylist()])


def _version_settings(job: ChunkJob) -> dict[str, Any]:
    """What a chunk's fits are a function of besides the CLaP, mode and data: part of every fit's version and
    manifest (`fit_settings`), so lineage can tell which settings produced an artifact. `policy_logvar_bound`: the
    fit's log-variance bound changed what a fit computes when it came in, so fits from before it are refitted."""
    return {**job.fit.as_dict(), "min_pairs": job.min_pairs, "discrete_estimator": job.discrete_estimator,
            "policy_logvar_bound": POLICY_LOGVAR_BOUND}


def _fault_point() -> None:
    """Test-only fault injection (tests/faults/test_worker_kill.py); a no-op unless armed.

    When the worker's environment has LATENTPREF_FAULT_KILL_CHUNK=<file> and that file exists, the first worker
    to remove it exits at once (os._exit: no cleanup, like a killed process), so exactly one task dies once.
    """
    marker = os.environ.get("LATENTPREF_FAULT_KILL_CHUNK")
    if not marker:
        return
    try:
        os.unlink(marker)   # atomic: of two racing workers only one succeeds
    except FileNotFoundError:
        return
    log.warning("fault injection: worker %d exits in the middle of a chunk", os.getpid())
    os._exit(1)


def _warm_start_heads(chunk: "_ChunkState", user_ids: list[str], clap_version: str, Q: int, d: int, D: int):
    """Previous night's heads (same CLaP version) as the starting point; zeros (prior) where none."""
    from latentpref.tasks.train.fit_user import init_params
    weight, bias = init_params(len(user_ids), Q, d, D)
    found = False
    for i, user_id in enumerate(user_ids):
        prev = chunk.seed(user_id, clap_version, "head-only")
        if prev is not None:
            weight[i], bias[i] = prev.tensors["weight"], prev.tensors["bias"]
            found = True
    return (weight, bias) if found else None


def _warm_start_policies(chunk: "_ChunkState", user_ids: list[str], clap_version: str, mode: str):
    """Previous night's policy tensors per user (None -> standardized CLaP encoder copy), or None if nobody has one."""
    init = [chunk.seed(u, clap_version, mode) for u in user_ids]
    return [p.tensors if p is not None else None for p in init] if any(p is not None for p in init) else None
