"""Personalised generation for many (user, prompt) requests at once.

Different users batch in ONE forward pass of the shared LM: only the latent prefix differs per row
(spec latent-dpo.md §8.7). A user's z is the mean of their p_θ(z|x) (spec §4.1.9, §9.12: z = μ_θ(x)); users
without a usable stored fit get the population prior's mean (z = 0) and a notice saying so. Head-only users'
heads are applied together (one encoder pass over the batch, one einsum); users fitted in an encoder mode
(trunk-frozen / faithful) get their own encoder pass, then join the same batched decode.

Discrete-code CLaPs (lpc.md §6.3): a user's z is the expected code vector p_u(.|x) @ codebook with
p_u(k|x) = softmax(log p(k|x) + delta_u); users without a usable fit get the population prior's expected code
(delta = 0), which depends on the prompt. All code users share one encoder pass.

Greedy decoding is batch-independent (`CLaP.generate`: left padding is inert, each row has its own prefix and
positions), so a request's greedy text is the same whoever it is batched with. Sampling draws from one
generator per batch, so sampled texts depend on the batch's composition and order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from latentpref.tasks.data.batching import tokenize_prompts
from latentpref.tasks.data.store import Store
from latentpref.tasks.policy.store import latents, load_user_policy

log = logging.getLogger(__name__)

Request = tuple[str, str]   # (user_id, prompt)


@dataclass(frozen=True)
class GenerationResult:
    user_id: str
    prompt: str
    text: str
    personalized: bool           # False: the population prior was used (see `notice`)
    notice: str | None = None
    token_ids: tuple[int, ...] = ()   # the new tokens `text` decodes


class PersonalizedGenerator:
    """Serve many users from one shared CLaP: per-row latent prefix, one batched decode.

    Args:
        clap: a loaded `CLaP` (put in eval mode here).
        tokenizer: its tokenizer (pad = eos).
        store: where the per-user heads live (`tasks/policy/store.py` layout).
        clap_version: version of `clap`; heads fitted against another version are ignored (their latent space
            is another model's), and those users fall back to the prior with a notice.
        prompt_tokens: prompt truncation (keep the last tokens), as at training time (spec §9.10).
    """

    def __init__(self, clap, tokenizer, store: Store, *, clap_version: str | None, prompt_tokens: int = 64):
        self.clap = clap.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.clap_version = clap_version
        self.prompt_tokens = prompt_tokens
        self._policies: dict[str, Any] = {}   # user_id -> UserPolicy, or the reason there is none

    @classmethod
    def from_store(cls, store: Store, clap_version: str | None = None) -> "PersonalizedGenerator":
        """Load the current CLaP (or `clap_version`) and its tokenizer from the store.

        Raises:
            FileNotFoundError: the store holds no trained CLaP (run `latentpref nightly` first).
        """
        from latentpref.tasks.models.clap import load_clap
        from latentpref.tasks.models.registry import load_tokenizer
        if clap_version is None:
            if not store.exists("models", "clap", "current.json"):
                raise FileNotFoundError(f"no trained CLaP in store {store.url()}: run `latentpref nightly` first")
            clap_version = store.read_json("models", "clap", "current.json")["version"]
        if not store.exists("models", "clap", clap_version, "_manifest.json"):
            raise FileNotFoundError(f"CLaP version {clap_version!r} is not in store {store.url()}")
        manifest = store.read_json("models", "clap", clap_version, "_manifest.json")
        clap = load_clap(store.local_copy("models", "clap", clap_version))
        tokenizer = load_tokenizer(store.local_copy(*manifest["base_model_path"]))
        return cls(clap, tokenizer, store, clap_version=clap_version,
                   prompt_tokens=int(manifest.get("prompt_tokens", 64)))

    # ------------------------------------------------------------------------------------------ users
    def _policy(self, user_id: str):
        """The user's stored policy (`UserPolicy`), or a sentence saying why there is none (cached)."""
        if user_id not in self._policies:
            found = load_user_policy(self.store, user_id)   # raises InvalidUserId for a malformed id
            if found is None:
                why = "has no fitted encoder"
            elif found.cold_start:
                why = "has too little feedback (cold start)"
            elif self.clap_version is not None and found.manifest.get("clap_version") != self.clap_version:
                why = (f"was fitted against CLaP {found.manifest.get('clap_version')!r}, "
                       f"not the served {self.clap_version!r}")
            else:
                why = None
            if why is not None:
                log.warning("user %r %s: serving the population prior", user_id, why)
            self._policies[user_id] = why if why is not None else found
        return self._policies[user_id]

    @torch.no_grad()
    def latents(self, user_ids: list[str], prompts: list[str]) -> tuple[torch.Tensor, list[str | None]]:
        """z = μ_θ(x) per request from each user's head, batched over users.

        Returns:
            z (B, latent_dim) float32 (zero rows = prior mean), and per request None or a notice.
        """
        if len(user_ids) != len(prompts):
            raise ValueError(f"{len(user_ids)} user ids but {len(prompts)} prompts")
        return self._latents(user_ids, *tokenize_prompts(self.tokenizer, prompts, self.prompt_tokens))

    def _latents(self, user_ids: list[str], ids: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, list[str | None]]:
        policies = [self._policy(u) for u in user_ids]
        notices = [f"user {u!r} {p}: using the population prior" if isinstance(p, str) else None
                   for u, p in zip(user_ids, policies)]
        z = latents([None if isinstance(p, str) else p for p in policies], self.clap.encoder, ids, mask)
        return z, notices

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, requests: list[Request], *, max_new_tokens: int = 32, do_sample: bool = False,
                 seed: int = 0, batch_size: int = 64,
                 progress: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        """Generate for many (user_id, prompt) requests; users mix freely within a batch.

        Requests are grouped by prompt length (less padding) into batches of `batch_size`; results come back in
        request order. Exactly `max_new_tokens` tokens are decoded (no EOS stop, as in `CLaP.generate`).

        Raises:
            ValueError: bad sizes; InvalidUserId (a ValueError) for a malformed user id.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        lengths = [min(len(self.tokenizer.encode(p)), self.prompt_tokens) for _, p in requests]
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        out: list[GenerationResult | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            users, prompts = [requests[i][0] for i in idx], [requests[i][1] for i in idx]
            ids, mask = tokenize_prompts(self.tokenizer, prompts, self.prompt_tokens)
            z, notices = self._latents(users, ids, mask)
            gen = torch.Generator().manual_seed(seed)
            tokens = self.clap.generate(z, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                        top_k=50 if do_sample else 0, generator=gen)
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for i, u, p, t, n, row in zip(idx, users, prompts, texts, notices, tokens.tolist()):
                out[i] = GenerationResult(u, p, t, n is None, n, tuple(row))
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
        return out  # type: ignore[return-value]

