"""The user-independent latent cache of one CLaP version (spec latent-dpo.md §8): what every per-user fit reads.

Per CLaP version, the frozen posterior (mu, logvar) of every (prompt, response) text, the frozen encoder's query
features of every prompt (head-only mode) and every prompt's tokens (the encoder modes run the policy encoder on
them). A user's pairs are then just rows of that cache, and fitting never runs the LM (spec §3.6).

Discrete CLaPs (`latent_type="discrete"`, spec lpc.md §6.3): the cache also holds every response's code posterior
logits, every prompt's prior logits and every train pair's pair-posterior logits; `mu` then holds the expected code
vector and `logvar` zeros.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.policy.store import is_discrete

__all__ = ["CACHE_FORMAT", "LatentCache", "build_latent_cache", "text_key"]

CACHE_FORMAT = "2"          # 2: + prompt tokens (encoder modes); bump when the cache layout changes


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
    if is_discrete(clap):
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
