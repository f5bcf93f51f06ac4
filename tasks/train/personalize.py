"""Per-user stage logic: the user-independent latent cache, and fitting + storing a chunk of users.

The flow (pipelines/personalize.py) fans `fit_chunk` out as Ray tasks; nothing here imports Ray.

Cache (spec latent-dpo.md §8): per CLaP version, the frozen posterior (mu, logvar) of every
(prompt, response) text and the frozen encoder's query features of every prompt. A user's pairs are then
just rows of that cache, and fitting never runs the LM (spec §3.6).

Per-user artifacts: users/<key[:2]>/<key>/<clap_version>-<data_hash>/{head.safetensors, manifest.json}
plus users/<key[:2]>/<key>/current.json pointing at the newest fit. The folder name derives from
(user, CLaP version, data version), and every file is written atomically with the manifest last, so a
retried task rewrites identical bytes and a reader never sees half an artifact.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.data.store import Store, json_digest
from latentpref.tasks.data.validate import user_storage_key

log = logging.getLogger(__name__)


def text_key(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:20]


@dataclass
class LatentCache:
    """prompt_key -> row of `features` (Q, d); response_key -> row of `mu`/`logvar` (D,)."""

    prompt_index: dict[str, int]
    features: torch.Tensor      # (N_prompts, Q, d) float32
    response_index: dict[str, int]
    mu: torch.Tensor            # (N_responses, D) float32
    logvar: torch.Tensor

    def to_bytes(self) -> bytes:
        meta = {"prompt_keys": ",".join(self.prompt_index), "response_keys": ",".join(self.response_index)}
        return st_save({"features": self.features.contiguous(), "mu": self.mu.contiguous(),
                        "logvar": self.logvar.contiguous()}, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "LatentCache":
        from safetensors import safe_open  # metadata lives in the header
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        import json
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
        pk = [k for k in meta.get("prompt_keys", "").split(",") if k]
        rk = [k for k in meta.get("response_keys", "").split(",") if k]
        return cls({k: i for i, k in enumerate(pk)}, tensors["features"], {k: i for i, k in enumerate(rk)},
                   tensors["mu"], tensors["logvar"])


@torch.no_grad()
def build_latent_cache(clap, tokenizer, prompts: list[str], prompt_response: list[tuple[str, str]], *,
                       prompt_tokens: int, response_tokens: int, batch_size: int = 64) -> LatentCache:
    """Encode every distinct prompt (features of p(z|x)) and (prompt, response) (posterior q(z|x,y))."""
    clap.eval()
    uniq_prompts = list(dict.fromkeys(prompts))
    feats = []
    for i in range(0, len(uniq_prompts), batch_size):
        ids, mask = tokenize_prompts(tokenizer, uniq_prompts[i:i + batch_size], prompt_tokens)
        feats.append(clap.encoder.features(ids, mask).float())
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
    )


def user_data_hash(pairs: pa.Table) -> str:
    """Version of one user's training feedback: order-independent digest of its (prompt, chosen, rejected, weight)."""
    rows = sorted(zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist(),
                      [1.0 if w is None else float(w) for w in pairs["weight"].to_pylist()]))
    return json_digest(rows)


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
    manifest = current_fit(store, user_id)
    if manifest is None:
        return None
    folder = user_folder(user_id)
    tensors = st_load(store.read_bytes(*folder, manifest["version"], "head.safetensors"))
    return tensors["weight"], tensors["bias"], manifest


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


def _table_from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def fit_chunk(job: ChunkJob) -> list[dict[str, Any]]:
    """Fit (batched) every user of the chunk that needs it and store their artifacts. Idempotent."""
    from latentpref.tasks.train.fit_user import FitConfig, fit_users, init_params

    torch.set_num_threads(1)
    store = Store(job.store_root)
    cache = LatentCache.from_bytes(store.read_bytes(*job.cache_path))
    pairs = _table_from_ipc(job.pairs_ipc)
    Q, d = cache.features.shape[1:]
    D = cache.mu.shape[1]
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(pairs["user_id"].to_pylist()):
        by_user.setdefault(u, []).append(i)

    records: list[dict[str, Any]] = []
    to_fit: list[str] = []
    for user_id in job.user_ids:
        rows = pairs.take(by_user.get(user_id, []))
        n = rows.num_rows
        data_hash = user_data_hash(rows)
        version = f"{job.clap_version}-{data_hash}"
        existing = current_fit(store, user_id)
        if existing is not None and existing["version"] == version:
            records.append({**existing, "status": "unchanged"})
            continue
        if n < job.min_pairs:
            # cold start: too little evidence for a fit -> the population prior N(0, I) (zero head)
            weight, bias = init_params(1, Q, d, D)
            records.append(_store_user(store, user_id, version, weight[0], bias[0], {
                "cold_start": True, "n_pairs": n, "data_hash": data_hash, "clap_version": job.clap_version,
                "mode": job.mode, "fit_seconds": 0.0, "train_accuracy": None, "final_loss": None}))
            continue
        to_fit.append(user_id)

    if to_fit:
        sel_rows, user_index = [], []
        for u_i, user_id in enumerate(to_fit):
            sel_rows.extend(by_user[user_id])
            user_index.extend([u_i] * len(by_user[user_id]))
        sub = pairs.take(sel_rows)
        prompts = sub["prompt"].to_pylist()
        feats = cache.features[[cache.prompt_index[text_key(p)] for p in prompts]]
        c_idx = [cache.response_index[text_key(p, c)] for p, c in zip(prompts, sub["chosen"].to_pylist())]
        r_idx = [cache.response_index[text_key(p, r)] for p, r in zip(prompts, sub["rejected"].to_pylist())]
        weights = torch.tensor([1.0 if w is None else float(w) for w in sub["weight"].to_pylist()])
        init = None
        if job.warm_start:
            init = _warm_start(store, to_fit, job.clap_version, Q, d, D)
        cfg = FitConfig(**job.fit)
        t0 = time.perf_counter()
        result = fit_users(feats, cache.mu[c_idx], cache.logvar[c_idx], cache.mu[r_idx], cache.logvar[r_idx],
                           torch.tensor(user_index), len(to_fit), cfg, init=init, pair_weight=weights)
        per_user_s = (time.perf_counter() - t0) / len(to_fit)
        for u_i, user_id in enumerate(to_fit):
            rows = pairs.take(by_user[user_id])
            data_hash = user_data_hash(rows)
            records.append(_store_user(store, user_id, f"{job.clap_version}-{data_hash}",
                                       result.weight[u_i], result.bias[u_i], {
                "cold_start": False, "n_pairs": rows.num_rows, "data_hash": data_hash,
                "clap_version": job.clap_version, "mode": job.mode, "fit_seconds": per_user_s,
                "train_accuracy": float(result.final_accuracy[u_i]), "final_loss": float(result.final_loss[u_i]),
                "warm_start": init is not None}))
    return records


def _warm_start(store: Store, user_ids: list[str], clap_version: str, Q: int, d: int, D: int):
    """Previous night's heads (same CLaP version) as the starting point; zeros (prior) where none."""
    from latentpref.tasks.train.fit_user import init_params
    weight, bias = init_params(len(user_ids), Q, d, D)
    found = False
    for i, user_id in enumerate(user_ids):
        prev = load_user_head(store, user_id)
        if prev is not None and prev[2].get("clap_version") == clap_version and not prev[2].get("cold_start"):
            weight[i], bias[i] = prev[0], prev[1]
            found = True
    return (weight, bias) if found else None


def _store_user(store: Store, user_id: str, version: str, weight: torch.Tensor, bias: torch.Tensor,
                info: dict[str, Any]) -> dict[str, Any]:
    folder = user_folder(user_id)
    blob = st_save({"weight": weight.detach().float().contiguous(), "bias": bias.detach().float().contiguous()},
                   metadata={"user_id": user_id, "version": version})
    store.write_bytes(blob, *folder, version, "head.safetensors")
    manifest = {"user_id": user_id, "version": version, "artifact_bytes": len(blob),
                "written_at": time.time(), **info}
    store.write_json(manifest, *folder, version, "manifest.json")
    store.write_json({"version": version}, *folder, "current.json")   # pointer flips last
    return {**manifest, "status": "fitted" if not info.get("cold_start") else "cold_start"}
