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

Personal best-of-K (`complete_best_of`, the completions API's `best_of`): K samples of a request, each scored with
the user's own latent DPO implicit reward (`latent_rewards`), the best one returned. The reward needs no LM pass:
the CLaP posterior mean of (prompt, sample) against the user's p_theta(z|x) and the population prior.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.data.store import Store
# imported, not copied: the served reward and the evaluated one cannot drift apart
from latentpref.tasks.evaluate.evaluate import latent_implicit_reward
from latentpref.tasks.policy.store import is_discrete, latents, load_user_policy

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
        response_tokens: response truncation (keep the first tokens) when a sample is scored (`rewards`), as the
            CLaP posterior saw responses in training; None = the CLaP manifest's `response_tokens`, read when first
            needed (whole samples if the manifest has none).
    """

    def __init__(self, clap, tokenizer, store: Store, *, clap_version: str | None, prompt_tokens: int = 64,
                 response_tokens: int | None = None):
        self.clap = clap.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.clap_version = clap_version
        self.prompt_tokens = prompt_tokens
        self.response_tokens = response_tokens
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
                   prompt_tokens=int(manifest.get("prompt_tokens", 64)),
                   response_tokens=manifest.get("response_tokens"))

    # ------------------------------------------------------------------------------------------ users
    def _policy(self, user_id: str):
        """The user's stored policy (`UserPolicy`), or a sentence saying why there is none (cached)."""
        if user_id not in self._policies:
            # the night the serving release pins for this CLaP (a tag), else the table's latest rows
            found = load_user_policy(self.store, user_id, clap_version=self.clap_version,
                                     at=self._pinned_night())   # raises InvalidUserId for a malformed id
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

    def _pinned_night(self) -> str | None:
        """The policy tag of the store's serving release when it serves this CLaP version, else None (latest)."""
        if not hasattr(self, "_night"):
            from latentpref.tasks.evaluate.serve_core import current_release
            try:
                release = current_release(self.store)
            except FileNotFoundError:
                release = None
            self._night = (release.policy_tag if release is not None and release.clap_version == self.clap_version
                           else None)
        return self._night

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

    def reward_policy(self, user_id: str | None):
        """The policy whose latent reward scores this user's samples, or None where the population prior is
        served (no user id, no usable fit, cold start): every reward is then 0."""
        policy = None if user_id is None else self._policy(user_id)
        return None if isinstance(policy, str) else policy

    def _scoring_tokens(self) -> int:
        """Response truncation for `rewards`: as given, else the CLaP manifest's (read once), else no truncation."""
        if self.response_tokens is None:
            folder = ("models", "clap", self.clap_version or "", "_manifest.json")
            manifest = self.store.read_json(*folder) if self.clap_version and self.store.exists(*folder) else {}
            self.response_tokens = int(manifest.get("response_tokens") or 0)   # 0: whole samples
        return self.response_tokens or 1_000_000

    @torch.no_grad()
    def rewards(self, user_ids: list[str | None], prompts: list[str], responses: list[str]) -> np.ndarray:
        """Each row's latent reward (N,) float64 under its user's policy (`latent_rewards`): one call per user.

        Raises:
            ValueError: lists of different lengths; InvalidUserId (a ValueError) for a malformed user id.
        """
        if not len(user_ids) == len(prompts) == len(responses):
            raise ValueError(f"{len(user_ids)} user ids, {len(prompts)} prompts, {len(responses)} responses")
        out = np.zeros(len(user_ids))
        rows: dict[str | None, list[int]] = {}
        for i, u in enumerate(user_ids):
            rows.setdefault(u, []).append(i)
        for user_id, idx in rows.items():
            policy = self.reward_policy(user_id)
            if policy is not None:
                out[idx] = latent_rewards(self.clap, self.tokenizer, policy, [prompts[i] for i in idx],
                                          [responses[i] for i in idx], prompt_tokens=self.prompt_tokens,
                                          response_tokens=self._scoring_tokens())
        return out

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


# ---------------------------------------------------------------------------------------------- personal best-of-K
@torch.no_grad()
def latent_rewards(clap, tokenizer, policy, prompts: list[str], responses: list[str], *, prompt_tokens: int,
                   response_tokens: int) -> np.ndarray:
    """The user's latent DPO implicit reward of each (prompt, response): no LM pass, only the CLaP encoder.

    Gaussian: R(y) = log p_theta(mu_y|x) - log N(mu_y; 0, I) at the response's posterior mean mu_y (spec
    latent-dpo.md §3.6; `evaluate.latent_implicit_reward`). Discrete (lpc.md §6.3): the expected implicit code
    reward sum_k q(k|x,y) (log p_u(k|x) - log p(k|x)), as in `evaluate._latent_heldout_accuracy`. Either way the
    population prior (policy None, or a cold start) scores every response 0.

    Args:
        policy: a `UserPolicy` fitted against `clap`, or None (the population prior).
        prompts, responses: N each; tokenised as at training time (prompts keep their last `prompt_tokens`,
            responses their first `response_tokens`).
    Returns:
        (N,) float64 rewards; only differences between responses of one prompt mean anything.
    Raises:
        ValueError: lists of different lengths; a policy of the other latent type than `clap`.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if policy is None or not prompts:
        return np.zeros(len(prompts))
    if policy.discrete != is_discrete(clap):
        raise ValueError(f"a {'discrete' if policy.discrete else 'Gaussian'} user policy (mode {policy.mode!r}) "
                         f"cannot score responses of a {'discrete' if is_discrete(clap) else 'Gaussian'} CLaP: it is "
                         "a fit of another CLaP version")
    unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}   # best-of-K: K responses share one prompt
    row = torch.tensor([unique[p] for p in prompts])
    u_ids, u_mask = tokenize_prompts(tokenizer, list(unique), prompt_tokens)                   # (U, Tp)
    p_ids, p_mask = u_ids[row], u_mask[row]                                                   # (N, Tp)
    r_ids, r_mask = tokenize_responses(tokenizer, responses, response_tokens)                  # (N, Tr)
    if policy.discrete:
        tiny = torch.finfo(torch.float32).tiny     # log 0 -> -inf, and 0 * -inf = nan for a code q never uses
        code_reward = (policy.code_probs(clap.encoder, u_ids, u_mask).clamp_min(tiny).log()
                       - torch.log_softmax(clap.prior_logits(u_ids, u_mask).float(), -1))     # (U, K)
        q = torch.softmax(clap.encode_logits(p_ids, p_mask, r_ids, r_mask).float(), -1)       # (N, K)
        return (q * code_reward[row]).sum(-1).double().numpy()
    mu_p, logvar_p = policy.latent(clap.encoder, u_ids, u_mask)                                # (U, D) each
    mu_y, _ = clap.encode(p_ids, p_mask, r_ids, r_mask)                                        # (N, D)
    return latent_implicit_reward(mu_p[row], logvar_p[row], mu_y).double().numpy()


GOLDEN_GAMMA = 0x9E3779B97F4A7C15   # SplitMix64's increment: consecutive request seeds give unrelated sample seeds


def best_of_seeds(seed: int, k: int) -> list[int]:
    """The K sampling seeds of a best-of-K request with seed `seed`: the first is `seed` itself (so best_of=1 is the
    plain request, and the plain request's text is among the K), the others derived from it."""
    return [(seed + j * GOLDEN_GAMMA) % 2**63 for j in range(k)]


@dataclass(frozen=True)
class BestOf:
    completion: Any              # the chosen sample (`online.Completion`)
    best_of: int                 # K asked for
    reward: float | None         # the chosen sample's latent reward; None: the prior answered (no user reward)
    completion_tokens: int       # new tokens over every sample drawn (as OpenAI counts best_of's usage)


def complete_best_of(generator, requests: list) -> list[BestOf]:
    """Answer completions requests with `best_of` = K: K samples each, the one with the highest latent reward of the
    request's user returned (ties: the first). Every sample of every request goes into ONE batched decode.

    Sample j uses seed `best_of_seeds(request seed, K)[j]`; each row draws from its own generator, so a request with
    a fixed seed gets the same answer whatever it is batched with. Samples are scored as their text, tokenised as
    at training time. Where the population prior answers, every reward would be 0 and the first sample win: only
    that one is drawn.

    Args:
        generator: an `online.OnlineGenerator` (its `complete` decodes; `rewards` scores).
        requests: `serve_core.CompletionRequest`s (best_of 1 = a plain completion).
    Raises:
        ValueError: best_of < 1, or best_of > 1 with temperature 0 (its samples would be one greedy text).
    """
    rows, owner, ks = [], [], []
    for i, r in enumerate(requests):
        if r.best_of < 1 or (r.best_of > 1 and r.temperature == 0):
            raise ValueError(f"best_of={r.best_of} with temperature={r.temperature}: best_of must be >= 1, and 1 "
                             "for greedy decoding")
        k = r.best_of if r.best_of > 1 and generator.reward_policy(r.user) is not None else 1
        seeds = [r.seed] if k == 1 else best_of_seeds(r.seed if r.seed is not None else secrets.randbits(63), k)
        rows += [dataclasses.replace(r, seed=s, best_of=1) for s in seeds]
        owner += [i] * k
        ks.append(k)
    completions = generator.complete(rows)
    scored = [j for j, i in enumerate(owner) if ks[i] > 1]
    reward = np.full(len(rows), np.nan)
    if scored:
        reward[scored] = generator.rewards([rows[j].user for j in scored], [rows[j].prompt for j in scored],
                                           [completions[j].text for j in scored])
    out, start = [], 0
    for r, k in zip(requests, ks):
        best = start + int(np.argmax(reward[start:start + k])) if k > 1 else start
        out.append(BestOf(completions[best], r.best_of, None if k == 1 else float(reward[best]),
                          sum(c.completion_tokens for c in completions[start:start + k])))
        start += k
    return out
