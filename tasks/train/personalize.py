"""Per-user stage logic: the user-independent latent cache, and fitting + storing a chunk of users.

The flow (pipelines/personalize.py) fans `fit_chunk` out as Ray tasks; nothing here imports Ray.

Cache (spec latent-dpo.md §8): per CLaP version, the frozen posterior (mu, logvar) of every
(prompt, response) text, the frozen encoder's query features of every prompt (head-only mode) and every prompt's
tokens (the encoder modes run the policy encoder on them). A user's pairs are then just rows of that cache, and
fitting never runs the LM (spec §3.6).

Modes (`ChunkJob.mode`, PersonalizeConfig.mode): `head-only` fits a Gaussian head on cached features
(`fit_user.fit_users`); `trunk-frozen` and `faithful` fit part of / all of a copy of the CLaP encoder
(`fit_encoder.fit_encoder_users`), which needs the CLaP itself (`ChunkJob.clap_path`).

Per-user artifacts: users/<key[:2]>/<key>/<version>/{<artifact>, manifest.json} plus users/<key[:2]>/<key>/current.json
pointing at the newest fit. version = <clap_version>-<data_hash> for head-only (the original layout, so existing
fits stay valid) and <clap_version>-<mode>-<data_hash> for the encoder modes; the artifact is `head.safetensors`
(head-only and every cold start: the zero head = the prior) or `policy.safetensors` (the mode's trained tensors,
named as in `LatentEncoder`). The folder name derives from (user, CLaP version, mode, data version), and every
file is written atomically with the manifest last, so a retried task rewrites identical bytes and a reader never
sees half an artifact.

Discrete CLaPs (`latent_type="discrete"`, spec lpc.md §6.3): the cache also holds every response's code posterior
logits, every prompt's prior logits and every train pair's pair-posterior logits; a user is K numbers (`delta`,
`codes.safetensors`, fitted by `fit_codes.fit_code_users`), stored under mode `codes` with the estimator in the
version (<clap_version>-codes-<estimator>-<data_hash>) and the user's mean code mixture in the manifest
(`code_mixture`, K floats). Only the head-only style fit exists for codes: other modes raise.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.data.store import Store, json_digest
from latentpref.tasks.data.validate import user_storage_key

log = logging.getLogger(__name__)

MODES = ("head-only", "trunk-frozen", "faithful")
ENCODER_MODES = ("trunk-frozen", "faithful")
CACHE_FORMAT = "2"          # 2: + prompt tokens (encoder modes); bump when the cache layout changes
HEAD_FILE = "head.safetensors"
POLICY_FILE = "policy.safetensors"
CODES_FILE = "codes.safetensors"      # discrete CLaPs: {"delta": (K,)}
CODE_ONLY_FIT_KEYS = ("code_evidence_ratio",)   # ChunkJob.fit keys that only the discrete code fits read
CODES_MODE = "codes"                  # the stored `mode` of a discrete user policy (fit or cold start)


def text_key(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:20]


@dataclass
class LatentCache:
    """prompt_key -> row of `features` (Q, d) and `prompt_ids`; response_key -> row of `mu`/`logvar` (D,)."""

    prompt_index: dict[str, int]
    features: torch.Tensor      # (N_prompts, Q, d) float32
    response_index: dict[str, int]
    mu: torch.Tensor            # (N_responses, D) float32
    logvar: torch.Tensor
    prompt_ids: torch.Tensor | None = None    # (N_prompts, T) int64, left-padded to a common width
    prompt_mask: torch.Tensor | None = None   # (N_prompts, T) int64, 1 = real token
    # discrete CLaPs only (None for Gaussian ones); mu then holds the expected code vector and logvar zeros
    code_logits: torch.Tensor | None = None   # (N_responses, K) float32 posterior q(k|x,y) logits
    prior_logits: torch.Tensor | None = None  # (N_prompts, K) float32 prior p(k|x) logits
    pair_index: dict[str, int] | None = None  # text_key(prompt, chosen, rejected) -> row of pair_logits
    pair_logits: torch.Tensor | None = None   # (N_pairs, K) float32 pair posterior q(k|x, y_w > y_l) logits

    @property
    def discrete(self) -> bool:
        return self.code_logits is not None

    def to_bytes(self) -> bytes:
        meta = {"prompt_keys": ",".join(self.prompt_index), "response_keys": ",".join(self.response_index),
                "format": CACHE_FORMAT}
        tensors = {"features": self.features.contiguous(), "mu": self.mu.contiguous(),
                   "logvar": self.logvar.contiguous()}
        if self.prompt_ids is not None:
            tensors["prompt_ids"] = self.prompt_ids.contiguous()
            tensors["prompt_mask"] = self.prompt_mask.contiguous()
        if self.discrete:
            tensors["code_logits"] = self.code_logits.contiguous()
            tensors["prior_logits"] = self.prior_logits.contiguous()
            tensors["pair_logits"] = self.pair_logits.contiguous()
            meta["pair_keys"] = ",".join(self.pair_index or {})
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "LatentCache":
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {})   # metadata lives in the header
        pk = [k for k in meta.get("prompt_keys", "").split(",") if k]
        rk = [k for k in meta.get("response_keys", "").split(",") if k]
        qk = [k for k in meta.get("pair_keys", "").split(",") if k]
        discrete = "code_logits" in tensors
        return cls({k: i for i, k in enumerate(pk)}, tensors["features"], {k: i for i, k in enumerate(rk)},
                   tensors["mu"], tensors["logvar"], tensors.get("prompt_ids"), tensors.get("prompt_mask"),
                   tensors.get("code_logits"), tensors.get("prior_logits"),
                   {k: i for i, k in enumerate(qk)} if discrete else None, tensors.get("pair_logits"))


@torch.no_grad()
def build_latent_cache(clap, tokenizer, prompts: list[str], prompt_response: list[tuple[str, str]], *,
                       prompt_tokens: int, response_tokens: int, batch_size: int = 64,
                       pairs: list[tuple[str, str, str]] = ()) -> LatentCache:
    """Encode every distinct prompt (features of p(z|x), tokens) and (prompt, response) (posterior q(z|x,y)).

    A discrete CLaP also gets code posterior logits per response, prior logits per prompt and pair-posterior
    logits per distinct (prompt, chosen, rejected) of `pairs` (ignored for Gaussian CLaPs)."""
    if getattr(clap, "discrete", False):
        return _build_code_cache(clap, tokenizer, prompts, prompt_response, pairs, prompt_tokens=prompt_tokens,
                                 response_tokens=response_tokens, batch_size=batch_size)
    clap.eval()
    uniq_prompts = list(dict.fromkeys(prompts))
    feats, ids_rows, mask_rows = [], [], []
    width = max(prompt_tokens, 1)
    for i in range(0, len(uniq_prompts), batch_size):
        ids, mask = tokenize_prompts(tokenizer, uniq_prompts[i:i + batch_size], prompt_tokens)
        feats.append(clap.encoder.features(ids, mask).float())
        # left-pad every batch to one width: extra pads are masked keys, so the encoding does not change
        pad = width - ids.shape[1]
        ids_rows.append(torch.nn.functional.pad(ids, (pad, 0), value=tokenizer.pad_token_id))
        mask_rows.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
    uniq_pairs = list(dict.fromkeys(prompt_response))
    mus, logvars = [], []
    for i in range(0, len(uniq_pairs), batch_size):
        chunk = uniq_pairs[i:i + batch_size]
        p_ids, p_mask = tokenize_prompts(tokenizer, [p for p, _ in chunk], prompt_tokens)
        r_ids, r_mask = tokenize_responses(tokenizer, [r for _, r in chunk], response_tokens)
        mu, logvar = clap.encode(p_ids, p_mask, r_ids, r_mask)
        mus.append(mu.float())
        logvars.append(logvar.float())
    d = clap.encoder.features(*tokenize_prompts(tokenizer, ["x"], prompt_tokens)).shape[1:]
    D = clap.cfg.latent_dim
    return LatentCache(
        {text_key(p): i for i, p in enumerate(uniq_prompts)},
        torch.cat(feats) if feats else torch.zeros((0, *d)),
        {text_key(p, r): i for i, (p, r) in enumerate(uniq_pairs)},
        torch.cat(mus) if mus else torch.zeros((0, D)),
        torch.cat(logvars) if logvars else torch.zeros((0, D)),
        torch.cat(ids_rows) if ids_rows else torch.zeros((0, width), dtype=torch.long),
        torch.cat(mask_rows) if mask_rows else torch.zeros((0, width), dtype=torch.long),
    )


def _build_code_cache(clap, tokenizer, prompts: list[str], prompt_response: list[tuple[str, str]],
                      pairs: list[tuple[str, str, str]] | tuple, *, prompt_tokens: int, response_tokens: int,
                      batch_size: int) -> LatentCache:
    clap.eval()
    uniq_prompts = list(dict.fromkeys(prompts))
    feats, priors, ids_rows, mask_rows = [], [], [], []
    width = max(prompt_tokens, 1)
    for i in range(0, len(uniq_prompts), batch_size):
        ids, mask = tokenize_prompts(tokenizer, uniq_prompts[i:i + batch_size], prompt_tokens)
        f = clap.encoder.features(ids, mask).float()
        feats.append(f)
        priors.append(clap.encoder.code_logits(f))
        pad = width - ids.shape[1]
        ids_rows.append(torch.nn.functional.pad(ids, (pad, 0), value=tokenizer.pad_token_id))
        mask_rows.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
    uniq_pairs = list(dict.fromkeys(prompt_response))
    logits = []
    for i in range(0, len(uniq_pairs), batch_size):
        chunk = uniq_pairs[i:i + batch_size]
        p_ids, p_mask = tokenize_prompts(tokenizer, [p for p, _ in chunk], prompt_tokens)
        r_ids, r_mask = tokenize_responses(tokenizer, [r for _, r in chunk], response_tokens)
        logits.append(clap.encode_logits(p_ids, p_mask, r_ids, r_mask).float())
    uniq_triples = list(dict.fromkeys(pairs))
    pair_logits = []
    for i in range(0, len(uniq_triples), batch_size):
        chunk = uniq_triples[i:i + batch_size]
        p_ids, p_mask = tokenize_prompts(tokenizer, [p for p, _, _ in chunk], prompt_tokens)
        c_ids, c_mask = tokenize_responses(tokenizer, [c for _, c, _ in chunk], response_tokens)
        r_ids, r_mask = tokenize_responses(tokenizer, [r for _, _, r in chunk], response_tokens)
        pair_logits.append(clap.pair_logits(p_ids, p_mask, c_ids, c_mask, r_ids, r_mask).float())
    d = clap.encoder.features(*tokenize_prompts(tokenizer, ["x"], prompt_tokens)).shape[1:]
    K = clap.cfg.n_codes
    code_logits = torch.cat(logits) if logits else torch.zeros((0, K))
    mu = clap.encoder.code_latent(torch.softmax(code_logits, -1)).float()   # expected code vector per response
    return LatentCache(
        {text_key(p): i for i, p in enumerate(uniq_prompts)},
        torch.cat(feats) if feats else torch.zeros((0, *d)),
        {text_key(p, r): i for i, (p, r) in enumerate(uniq_pairs)},
        mu, torch.zeros_like(mu),
        torch.cat(ids_rows) if ids_rows else torch.zeros((0, width), dtype=torch.long),
        torch.cat(mask_rows) if mask_rows else torch.zeros((0, width), dtype=torch.long),
        code_logits,
        torch.cat(priors) if priors else torch.zeros((0, K)),
        {text_key(p, c, r): i for i, (p, c, r) in enumerate(uniq_triples)},
        torch.cat(pair_logits) if pair_logits else torch.zeros((0, K)),
    )


def user_data_hash(pairs: pa.Table) -> str:
    """Version of one user's training feedback: order-independent digest of its (prompt, chosen, rejected, weight)."""
    rows = sorted(zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist(),
                      [1.0 if w is None else float(w) for w in pairs["weight"].to_pylist()]))
    return json_digest(rows)


def fit_version(clap_version: str, mode: str, data_hash: str, settings: dict[str, Any] | None = None) -> str:
    """Folder name of one fit: a function of everything the fitted policy is a function of.

    `settings` = the fit's settings (FitConfig fields: loss type, beta, steps, lr, samples, evidence ratio, noise
    draws, seed; plus min_pairs / estimator where they apply): a changed setting is a new version, so the next
    night refits the users it concerns instead of serving old artifacts as if they were the new settings.
    Without `settings` (artifacts written before they were part of it) the old layout is kept."""
    tag = "" if settings is None else f"-s{json_digest(settings)[:10]}"
    return (f"{clap_version}{tag}-{data_hash}" if mode == "head-only"
            else f"{clap_version}-{mode}{tag}-{data_hash}")


def user_folder(user_id: str) -> tuple[str, str, str]:
    key = user_storage_key(user_id)
    return ("users", key[:2], key)


def current_fit(store: Store, user_id: str) -> dict[str, Any] | None:
    """The manifest of the user's newest stored fit, or None."""
    folder = user_folder(user_id)
    if not store.exists(*folder, "current.json"):
        return None
    pointer = store.read_json(*folder, "current.json")
    return store.read_json(*folder, pointer["version"], "manifest.json")


def load_user_head(store: Store, user_id: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """(weight, bias, manifest) of a head-only (or cold-start) fit, or None when the user has none.

    Raises:
        ValueError: the user's current fit is a trunk-frozen / faithful policy, which has no head of its own:
            use `load_user_policy(store, user_id).latent(encoder, ids, mask)`.
    """
    manifest = current_fit(store, user_id)
    if manifest is None:
        return None
    if manifest.get("artifact", HEAD_FILE) != HEAD_FILE:
        raise ValueError(f"user {user_id!r}'s current fit is a {manifest.get('mode')!r} policy, not a Gaussian head; "
                         "use load_user_policy(store, user_id).latent(clap.encoder, input_ids, attention_mask)")
    folder = user_folder(user_id)
    tensors = st_load(store.read_bytes(*folder, manifest["version"], HEAD_FILE))
    return tensors["weight"], tensors["bias"], manifest


@dataclass(frozen=True)
class UserPolicy:
    """One user's stored p_theta(z|x), whatever the mode that fitted it."""

    mode: str
    tensors: dict[str, torch.Tensor]   # head-only / cold start: weight, bias; encoder modes: encoder tensors
    manifest: dict[str, Any]

    @property
    def cold_start(self) -> bool:
        return bool(self.manifest.get("cold_start"))

    @torch.no_grad()
    def latent(self, encoder, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) (B, latent_dim) float32 of this user's policy on left-padded prompts; the serving z is mu
        (spec §9.12). `encoder` is the CLaP's (`clap.encoder`) of the same version.

        Discrete (mode `codes`): mu = z = p_u(.|x) @ codebook, the expected code vector (lpc.md §6.3), and logvar
        zeros (a placeholder: the latent is not Gaussian; use `code_probs` for the distribution)."""
        if self.mode == CODES_MODE:
            z = encoder.code_latent(self.code_probs(encoder, input_ids, attention_mask))
            return z, torch.zeros_like(z)
        if self.cold_start:
            zeros = torch.zeros(input_ids.shape[0], encoder.cfg.latent_dim)
            return zeros, zeros.clone()          # the population prior N(0, I)
        if self.mode == "head-only":
            from latentpref.tasks.train.fit_user import user_latent
            features = encoder.features(input_ids, attention_mask)
            return user_latent(self.tensors["weight"], self.tensors["bias"], features)
        from latentpref.tasks.train.fit_encoder import policy_latent
        return policy_latent(encoder, self.tensors, input_ids, attention_mask)

    @torch.no_grad()
    def code_probs(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """p_u(k|x) (B, K) float32 of a discrete (mode `codes`) policy; cold start (delta = 0) = the CLaP prior.

        Raises:
            ValueError: a Gaussian policy.
        """
        if self.mode != CODES_MODE:
            raise ValueError(f"code_probs needs a discrete-code policy (mode {CODES_MODE!r}); this one is "
                             f"{self.mode!r}")
        from latentpref.tasks.train.fit_codes import user_code_probs
        prior = encoder.code_logits(encoder.features(input_ids, attention_mask))
        return user_code_probs(self.tensors["delta"], prior)


def load_user_policy(store: Store, user_id: str) -> UserPolicy | None:
    manifest = current_fit(store, user_id)
    if manifest is None:
        return None
    folder = user_folder(user_id)
    tensors = st_load(store.read_bytes(*folder, manifest["version"], manifest.get("artifact", HEAD_FILE)))
    return UserPolicy(manifest.get("mode", "head-only"), tensors, manifest)


@dataclass(frozen=True)
class ChunkJob:
    """One Ray task's worth of users (plain data, picklable)."""

    store_root: str
    clap_version: str
    cache_path: tuple[str, ...]
    user_ids: tuple[str, ...]
    pairs_ipc: bytes            # the chunk's train pairs as an Arrow IPC stream
    fit: dict[str, Any]         # FitConfig fields
    mode: str
    min_pairs: int
    warm_start: bool = True
    clap_path: tuple[str, ...] = ()   # the CLaP folder in the store; needed by the encoder modes
    discrete_estimator: str = "dpo"   # discrete CLaPs: "dpo" | "mean_posterior" (fit_codes.CodeFitConfig)


def table_from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


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


def fit_chunk(job: ChunkJob) -> list[dict[str, Any]]:
    """Fit (batched) every user of the chunk that needs it and store their artifacts. Idempotent.

    Users whose (CLaP version, mode, feedback) match their current fit are skipped ("unchanged"); users with
    fewer than `min_pairs` pairs get the population prior N(0, I) as a zero head ("cold_start"); the rest are
    fitted together, warm-started from their previous fit of the same CLaP version and mode. `job.fit` holds
    FitConfig fields; without an explicit `noise_draws` the faithful mode draws fresh latent samples every step
    (the reference estimator), the others reuse FitConfig's few draws (spec §8 caching; see fit_user).

    Raises:
        ValueError: unknown mode, or an encoder mode without `clap_path` / with a cache lacking prompt tokens.
    """
    from latentpref.tasks.train.fit_user import FitConfig, init_params

    if job.mode not in MODES:
        raise ValueError(f"mode={job.mode!r}; expected one of {MODES}")
    if job.mode in ENCODER_MODES and not job.clap_path:
        raise ValueError(f"mode={job.mode!r} trains a copy of the CLaP encoder: ChunkJob.clap_path must name the "
                         "CLaP folder in the store")
    torch.set_num_threads(1)
    store = Store(job.store_root)
    cache = LatentCache.from_bytes(store.read_bytes(*job.cache_path))
    if job.mode in ENCODER_MODES and cache.prompt_ids is None:
        raise ValueError(f"latent cache {'/'.join(job.cache_path)} has no prompt tokens (format < {CACHE_FORMAT}); "
                         f"mode={job.mode!r} needs them: delete it so the flow rebuilds it")
    pairs = table_from_ipc(job.pairs_ipc)
    Q, d = cache.features.shape[1:]
    D = cache.mu.shape[1]
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(pairs["user_id"].to_pylist()):
        by_user.setdefault(u, []).append(i)
    if cache.discrete:
        return _fit_code_chunk(job, store, cache, pairs, by_user)

    records: list[dict[str, Any]] = []
    to_fit: list[tuple[str, str]] = []          # (user_id, data_hash)
    for user_id in job.user_ids:
        rows = pairs.take(pa.array(by_user.get(user_id, []), type=pa.int64()))   # [] alone is a null-typed array
        n = rows.num_rows
        data_hash = user_data_hash(rows)
        version = fit_version(job.clap_version, job.mode, data_hash, _version_settings(job))
        existing = current_fit(store, user_id)
        if existing is not None and existing["version"] == version:
            records.append({**existing, "status": "unchanged"})
            continue
        if n < job.min_pairs:
            # cold start: too little evidence for a fit -> the population prior N(0, I) (zero head), any mode
            weight, bias = init_params(1, Q, d, D)
            records.append(_store_user(store, user_id, version, HEAD_FILE,
                                       {"weight": weight[0], "bias": bias[0]}, {
                "cold_start": True, "n_pairs": n, "data_hash": data_hash, "clap_version": job.clap_version,
                "fit_settings": _version_settings(job),
                "mode": job.mode, "fit_seconds": 0.0, "train_accuracy": None, "final_loss": None}))
            continue
        to_fit.append((user_id, data_hash))
    if not to_fit:
        return records

    sub, user_index = _stack_users(pairs, by_user, [u for u, _ in to_fit])
    prompts = sub["prompt"].to_pylist()
    p_idx = torch.tensor([cache.prompt_index[text_key(p)] for p in prompts], dtype=torch.long)
    c_idx = [cache.response_index[text_key(p, c)] for p, c in zip(prompts, sub["chosen"].to_pylist())]
    r_idx = [cache.response_index[text_key(p, r)] for p, r in zip(prompts, sub["rejected"].to_pylist())]
    post = (cache.mu[c_idx], cache.logvar[c_idx], cache.mu[r_idx], cache.logvar[r_idx])
    weights = torch.tensor([1.0 if w is None else float(w) for w in sub["weight"].to_pylist()])
    user_index_t = torch.tensor(user_index, dtype=torch.long)
    cfg = FitConfig(**{k: v for k, v in job.fit.items() if k not in CODE_ONLY_FIT_KEYS})
    if job.mode == "faithful" and "noise_draws" not in job.fit:
        cfg = dataclasses.replace(cfg, noise_draws=None)   # faithful = the reference estimator: fresh samples
    ids = [u for u, _ in to_fit]
    t0 = time.perf_counter()
    if job.mode == "head-only":
        from latentpref.tasks.train.fit_user import fit_users
        init = _warm_start_heads(store, ids, job.clap_version, Q, d, D) if job.warm_start else None
        result = fit_users(cache.features[p_idx], *post, user_index_t, len(to_fit), cfg, init=init,
                           pair_weight=weights)
        artifacts = [(HEAD_FILE, {"weight": result.weight[i], "bias": result.bias[i]}) for i in range(len(to_fit))]
        n_params = int(result.weight[0].numel() + result.bias[0].numel())
    else:
        from latentpref.tasks.train.fit_encoder import fit_encoder_users
        encoder = _load_encoder(job.store_root, tuple(job.clap_path))
        init = _warm_start_policies(store, ids, job.clap_version, job.mode) if job.warm_start else None
        used, pair_prompt = torch.unique(p_idx, return_inverse=True)     # only the chunk's prompts
        result = fit_encoder_users(encoder, job.mode, cache.prompt_ids[used], cache.prompt_mask[used], pair_prompt,
                                   *post, user_index_t, len(to_fit), cfg, init=init, pair_weight=weights)
        artifacts = [(POLICY_FILE, state) for state in result.states]
        n_params = result.trainable_params
    per_user_s = (time.perf_counter() - t0) / len(to_fit)
    for u_i, (user_id, data_hash) in enumerate(to_fit):
        if u_i == 1:
            _fault_point()   # test-only: die with one user of the chunk stored and the rest not
        name, tensors = artifacts[u_i]
        records.append(_store_user(store, user_id, fit_version(job.clap_version, job.mode, data_hash,
                                                               _version_settings(job)), name,
                                   tensors, {
            "cold_start": False, "n_pairs": len(by_user[user_id]), "data_hash": data_hash,
            "clap_version": job.clap_version, "fit_settings": _version_settings(job),
            "mode": job.mode, "fit_seconds": per_user_s,
            "trainable_params": n_params, "loss_type": cfg.loss_type,
            "train_accuracy": float(result.final_accuracy[u_i]), "final_loss": float(result.final_loss[u_i]),
            "warm_start": bool(init is not None and (job.mode == "head-only" or init[u_i] is not None))}))
    return records


def _fit_code_chunk(job: ChunkJob, store: Store, cache: LatentCache, pairs: pa.Table,
                    by_user: dict[str, list[int]]) -> list[dict[str, Any]]:
    """`fit_chunk` for a discrete CLaP: per-user code offsets delta (K numbers), batched (fit_codes)."""
    from latentpref.tasks.train.fit_codes import CodeFitConfig, fit_code_users, user_code_probs

    if job.mode != "head-only":
        raise ValueError(f"personalize.mode={job.mode!r} is not supported with a discrete-code CLaP "
                         "(pretrain.latent_type='discrete'): a user is K code offsets fitted on cached posteriors, "
                         "the head-only style; use personalize.mode=head-only")
    fit = {k: job.fit[k] for k in ("steps", "lr", "beta", "loss_type", "gamma", "weight_decay") if k in job.fit}
    # lpc.md §6.3: code fits keep every positive-gap pair (evidence ratio 1); the Gaussian fits' 0.5 (latent-dpo.md
    # §3.6) does not carry over, so the code fits have their own setting
    if "code_evidence_ratio" in job.fit:
        fit["evidence_ratio"] = job.fit["code_evidence_ratio"]
    cfg = CodeFitConfig(estimator=job.discrete_estimator, **fit)
    mode_tag = f"{CODES_MODE}-{cfg.estimator}"       # the estimator changes the result: part of the version
    K = cache.prior_logits.shape[1]
    prompts_all = pairs["prompt"].to_pylist()

    def mixture(rows: list[int], delta: torch.Tensor) -> list[float]:
        """Mean p_u(k|x) over the user's pair prompts (over every cached prompt if the user has none)."""
        if rows:
            prior = cache.prior_logits[[cache.prompt_index[text_key(prompts_all[i])] for i in rows]]
        else:
            prior = cache.prior_logits
        if prior.shape[0] == 0:
            return [1.0 / K] * K
        return user_code_probs(delta, prior).mean(0).tolist()

    records: list[dict[str, Any]] = []
    to_fit: list[tuple[str, str]] = []
    for user_id in job.user_ids:
        rows = pairs.take(pa.array(by_user.get(user_id, []), type=pa.int64()))
        n = rows.num_rows
        data_hash = user_data_hash(rows)
        version = fit_version(job.clap_version, mode_tag, data_hash, _version_settings(job))
        existing = current_fit(store, user_id)
        if existing is not None and existing["version"] == version:
            records.append({**existing, "status": "unchanged"})
            continue
        if n < job.min_pairs:
            # cold start: delta = 0 is exactly the population prior p(k|x) (lpc.md §6.3 "cold start = prior")
            zero = torch.zeros(K)
            records.append(_store_user(store, user_id, version, CODES_FILE, {"delta": zero}, {
                "cold_start": True, "n_pairs": n, "data_hash": data_hash, "clap_version": job.clap_version,
                "fit_settings": _version_settings(job),
                "mode": CODES_MODE, "latent_type": "discrete", "estimator": cfg.estimator, "fit_seconds": 0.0,
                "train_accuracy": None, "final_loss": None,
                "code_mixture": mixture(by_user.get(user_id, []), zero)}))
            continue
        to_fit.append((user_id, data_hash))
    if not to_fit:
        return records

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
    weights = torch.tensor([1.0 if w is None else float(w) for w in sub["weight"].to_pylist()])
    ids = [u for u, _ in to_fit]
    init = None
    if job.warm_start and cfg.estimator == "dpo":
        prev = [_previous(store, u, job.clap_version, CODES_MODE) for u in ids]
        prev = [p if p is not None and p.manifest.get("estimator") == cfg.estimator else None for p in prev]
        if any(p is not None for p in prev):
            init = torch.stack([p.tensors["delta"].float() if p is not None else torch.zeros(K) for p in prev])
    result = fit_code_users(cache.prior_logits[p_idx], cache.code_logits[c_idx], cache.code_logits[r_idx],
                            torch.tensor(user_index, dtype=torch.long), len(to_fit), cfg, pair_logits=pair_logits,
                            init=init, pair_weight=weights)
    per_user_s = result.seconds / len(to_fit)
    for u_i, (user_id, data_hash) in enumerate(to_fit):
        if u_i == 1:
            _fault_point()
        records.append(_store_user(store, user_id, fit_version(job.clap_version, mode_tag, data_hash,
                                                               _version_settings(job)), CODES_FILE,
                                   {"delta": result.delta[u_i]}, {
            "cold_start": False, "n_pairs": len(by_user[user_id]), "data_hash": data_hash,
            "clap_version": job.clap_version, "fit_settings": _version_settings(job),
            "mode": CODES_MODE, "latent_type": "discrete",
            "estimator": cfg.estimator, "fit_seconds": per_user_s, "trainable_params": K,
            "loss_type": cfg.loss_type, "train_accuracy": float(result.final_accuracy[u_i]),
            "final_loss": float(result.final_loss[u_i]), "code_mixture": result.mixture[u_i].tolist(),
            "warm_start": bool(init is not None and bool(init[u_i].abs().sum() > 0))}))
    return records


def _version_settings(job: ChunkJob) -> dict[str, Any]:
    """What a chunk's fits are a function of besides the CLaP, mode and data: part of every fit's version and
    manifest (`fit_settings`), so lineage can tell which settings produced an artifact."""
    return {**job.fit, "min_pairs": job.min_pairs, "discrete_estimator": job.discrete_estimator}


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


def _previous(store: Store, user_id: str, clap_version: str, mode: str) -> UserPolicy | None:
    """The user's current fit if it can seed tonight's: same CLaP version and mode, and not a cold start."""
    prev = load_user_policy(store, user_id)
    if prev is None or prev.cold_start or prev.mode != mode or prev.manifest.get("clap_version") != clap_version:
        return None
    return prev


def _warm_start_heads(store: Store, user_ids: list[str], clap_version: str, Q: int, d: int, D: int):
    """Previous night's heads (same CLaP version) as the starting point; zeros (prior) where none."""
    from latentpref.tasks.train.fit_user import init_params
    weight, bias = init_params(len(user_ids), Q, d, D)
    found = False
    for i, user_id in enumerate(user_ids):
        prev = _previous(store, user_id, clap_version, "head-only")
        if prev is not None:
            weight[i], bias[i] = prev.tensors["weight"], prev.tensors["bias"]
            found = True
    return (weight, bias) if found else None


def _warm_start_policies(store: Store, user_ids: list[str], clap_version: str, mode: str):
    """Previous night's policy tensors per user (None -> standardized CLaP encoder copy), or None if nobody has one."""
    init = [_previous(store, u, clap_version, mode) for u in user_ids]
    return [p.tensors if p is not None else None for p in init] if any(p is not None for p in init) else None


def _store_user(store: Store, user_id: str, version: str, artifact: str, tensors: dict[str, torch.Tensor],
                info: dict[str, Any]) -> dict[str, Any]:
    folder = user_folder(user_id)
    blob = st_save({k: v.detach().float().contiguous() for k, v in tensors.items()},
                   metadata={"user_id": user_id, "version": version})
    store.write_bytes(blob, *folder, version, artifact)
    manifest = {"user_id": user_id, "version": version, "artifact": artifact, "artifact_bytes": len(blob),
                "written_at": time.time(), **info}
    store.write_json(manifest, *folder, version, "manifest.json")
    store.write_json({"version": version}, *folder, "current.json")   # pointer flips last
    return {**manifest, "status": "fitted" if not info.get("cold_start") else "cold_start"}
