"""Personalised generation for many (user, prompt) requests at once.

Different users batch in ONE forward pass of the shared LM: only the latent prefix differs per row
(spec latent-dpo.md §8.7). A user's z is the mean of their p_θ(z|x) (spec §4.1.9); users without a
stored fit get the population prior's mean (z = 0) and a notice saying so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from latentpref.tasks.data.batching import tokenize_prompts
from latentpref.tasks.data.store import Store


@dataclass(frozen=True)
class GenerationResult:
    user_id: str
    prompt: str
    text: str
    personalized: bool
    notice: str | None = None


class PersonalizedGenerator:
    def __init__(self, clap, tokenizer, store: Store, *, prompt_tokens: int = 64):
        self.clap = clap.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.prompt_tokens = prompt_tokens
        self._heads: dict[str, tuple | None] = {}

    @classmethod
    def from_store(cls, store: Store, clap_version: str | None = None) -> "PersonalizedGenerator":
        from latentpref.tasks.models.clap import load_clap
        from latentpref.tasks.models.registry import load_tokenizer
        if clap_version is None:
            if not store.exists("models", "clap", "current.json"):
                raise FileNotFoundError(f"no trained CLaP in store {store.url()}: run `latentpref nightly` first")
            clap_version = store.read_json("models", "clap", "current.json")["version"]
        manifest = store.read_json("models", "clap", clap_version, "_manifest.json")
        clap = load_clap(store.local_copy("models", "clap", clap_version))
        tokenizer = load_tokenizer(store.local_copy(*manifest["base_model_path"]))
        gen = cls(clap, tokenizer, store, prompt_tokens=manifest.get("prompt_tokens", 64))
        gen.clap_version = clap_version
        return gen

    def _head(self, user_id: str):
        from latentpref.tasks.train.personalize import load_user_head
        if user_id not in self._heads:
            found = load_user_head(self.store, user_id)
            if found is not None and found[2].get("clap_version") != getattr(self, "clap_version", None):
                found = None   # a fit against another CLaP version is meaningless for this model
            self._heads[user_id] = found
        return self._heads[user_id]

    @torch.no_grad()
    def latents(self, user_ids: list[str], prompts: list[str]) -> tuple[torch.Tensor, list[str | None]]:
        from latentpref.tasks.train.fit_user import predict_latent
        ids, mask = tokenize_prompts(self.tokenizer, prompts, self.prompt_tokens)
        feats = self.clap.encoder.features(ids, mask).float()
        z = torch.zeros(len(prompts), self.clap.cfg.latent_dim)
        notices: list[str | None] = []
        for i, user_id in enumerate(user_ids):
            head = self._head(user_id)
            if head is None or head[2].get("cold_start"):
                why = "has no fitted encoder" if head is None else "has too little feedback (cold start)"
                notices.append(f"user {user_id!r} {why}: using the population prior")
                continue
            mu, _ = predict_latent(head[0], head[1], feats[i:i + 1])
            z[i] = mu[0]
            notices.append(None)
        return z, notices

    @torch.no_grad()
    def generate(self, requests: list[tuple[str, str]], *, max_new_tokens: int = 32, do_sample: bool = False,
                 seed: int = 0, batch_size: int = 64) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            users, prompts = [u for u, _ in chunk], [p for _, p in chunk]
            z, notices = self.latents(users, prompts)
            ids, mask = tokenize_prompts(self.tokenizer, prompts, self.prompt_tokens)
            gen = torch.Generator().manual_seed(seed)
            tokens = self.clap.generate(z, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                        top_k=50 if do_sample else 0, generator=gen)
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            out.extend(GenerationResult(u, p, t, n is None, n) for u, p, t, n in zip(users, prompts, texts, notices))
        return out
