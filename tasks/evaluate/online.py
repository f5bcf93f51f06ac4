"""Online completions for many users from one serving release: `PersonalizedGenerator` with a bounded user LRU,
release-bound user fits (serve_core.release_fit) and per-request sampling settings in one batched decode.

Every row of a batch has its own max_tokens, temperature (0 = greedy), top_p and random stream (seed): a sampled
row draws one uniform number per step from its own generator, so its text does not depend on what it was batched
with (as greedy rows already do not). Sampling first keeps the `SAMPLE_TOP_K` most likely tokens (torch.multinomial
over a 50k vocabulary is slow on CPU; clap._pick does the same), then the top_p nucleus among them.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from latentpref.tasks.data.batching import tokenize_prompts
from latentpref.tasks.data.store import Store
from latentpref.tasks.evaluate.serve_core import BoundedLRU, CompletionRequest, Release, release_fit
from latentpref.tasks.evaluate.serving import PersonalizedGenerator

log = logging.getLogger(__name__)

SAMPLE_TOP_K = 50
# "auto": the project's LM precision (tasks/models/precision.py: bf16 autocast where the CPU computes it natively)
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ServedUser:
    policy: Any                       # UserPolicy, or the sentence saying why the prior is served
    artifact_version: str | None      # the user's fit that answered (also for a cold start), None if none

    @property
    def reason(self) -> str | None:
        """Why the population prior answers, or None when the user's own fit does."""
        return self.policy if isinstance(self.policy, str) else None

    @property
    def refitted_online(self) -> bool:
        """Whether the user's fit is an online refit (POST /v1/feedback) rather than a night's."""
        return self.reason is None and str(self.policy.manifest.get("night", "")).startswith("online-")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str                # "length" (max_tokens reached) or "stop" (end-of-text token)
    prompt_tokens: int
    completion_tokens: int
    personalized: bool
    reason: str | None                # why the population prior was served (None when personalized)
    user_artifact_version: str | None
    refitted_online: bool = False     # the user's fit came from their feedback today (POST /v1/feedback)


def pick_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token (B,) per row: argmax where temperature is 0, else a top-k/top-p sample from the row's generator.

    Args:
        logits: (B, V) float32; temperature, top_p: (B,); generators: one per row (None for greedy rows).
    """
    out = logits.argmax(-1)
    rows = (temperature > 0).nonzero().flatten()
    if len(rows):
        scaled = logits[rows] / temperature[rows, None]
        values, index = scaled.topk(min(SAMPLE_TOP_K, scaled.shape[-1]), dim=-1)     # (S, k), descending
        probs = torch.softmax(values, dim=-1)
        keep = (probs.cumsum(-1) - probs) < top_p[rows, None]   # nucleus: the smallest prefix with mass >= top_p
        probs = probs * keep
        cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
        u = torch.stack([torch.rand((), generator=generators[int(r)]) for r in rows])    # (S,) own streams
        choice = (cdf < u[:, None]).sum(-1).clamp(max=values.shape[-1] - 1)
        out[rows] = index.gather(-1, choice[:, None]).squeeze(-1)
    return out


class OnlineGenerator(PersonalizedGenerator):
    """One release's CLaP + tokenizer + a bounded LRU of its users' policies.

    Args:
        release: the serving release (CLaP version + which user fits belong to it).
        cache_users: LRU capacity (users); memory does not grow with the number of stored users.
        dtype: "auto" (runtime.lm_dtype / LATENTPREF_LM_DTYPE), "float32" or "bfloat16" (the LM's matmuls under CPU
            autocast; latents stay float32).
    """

    def __init__(self, clap, tokenizer, store: Store, *, release: Release, prompt_tokens: int = 64,
                 cache_users: int = 1024, dtype: str = "auto"):
        super().__init__(clap, tokenizer, store, clap_version=release.clap_version, prompt_tokens=prompt_tokens)
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
        self.release = release
        self.dtype = dtype
        self.users: BoundedLRU[str | None, ServedUser] = BoundedLRU(cache_users)
        # online refits (POST /v1/feedback) land in the policy table after the release's tag: the latest version,
        # refreshed by `refresh_online`, answers for users refitted since (night `online-<release>`)
        self._latest = None
        self._online_seen_at = 0.0
        self._pinned = threading.local()      # complete(): the entries a batch was answered with
        self.forgotten: set[str] = set()      # tombstone keys (tasks/policy/forget.py): never personalized again

    @classmethod
    def from_release(cls, store: Store, release: Release, **kw) -> "OnlineGenerator":
        """Load the release's CLaP and tokenizer from the store.

        Raises:
            FileNotFoundError: the release's CLaP folder is not complete in the store.
        """
        from latentpref.tasks.models.clap import load_clap
        from latentpref.tasks.models.registry import load_tokenizer
        folder = ("models", "clap", release.clap_version)
        if not store.exists(*folder, "_manifest.json"):
            raise FileNotFoundError(f"CLaP version {release.clap_version!r} of release {release.release_id!r} is "
                                    f"not in store {store.url()}")
        manifest = store.read_json(*folder, "_manifest.json")
        clap = load_clap(store.local_copy(*folder))
        tokenizer = load_tokenizer(store.local_copy(*manifest["base_model_path"]))
        return cls(clap, tokenizer, store, release=release, prompt_tokens=int(manifest.get("prompt_tokens", 64)),
                   **kw)

    # ------------------------------------------------------------------------------------------ users
    def served_user(self, user_id: str | None) -> ServedUser:
        """The user's policy in this release (LRU-cached), or why the population prior answers instead."""
        hit = self.users.get(user_id)
        if hit is not None:
            return hit
        from latentpref.tasks.policy.forget import tombstone_key
        if user_id is None:
            entry = ServedUser("no user id in the request", None)
        elif self.forgotten and tombstone_key(user_id) in self.forgotten:
            entry = ServedUser("was forgotten (a deletion request)", None)
        else:
            policy, why = release_fit(self.store, user_id, self.release)
            online = self._online_policy(user_id)
            if online is not None:
                policy, why = online, None
            if policy is None:
                entry = ServedUser(why, None)
            elif policy.cold_start:
                entry = ServedUser("has too little feedback (cold start)", policy.manifest["version"])
            else:
                entry = ServedUser(policy, policy.manifest["version"])
        self.users.put(user_id, entry)
        return entry

    @property
    def online_night(self) -> str:
        from latentpref.tasks.evaluate.feedback import ONLINE_NIGHT_PREFIX
        return f"{ONLINE_NIGHT_PREFIX}{self.release.release_id}"

    def _online_policy(self, user_id: str):
        """The user's row refitted online for this release (newer than its tag), or None."""
        ds = self._latest
        if ds is None:
            return None
        from latentpref.tasks.policy.table import INDEX_COLUMN
        import pyarrow.compute as pc
        from latentpref.tasks.policy.table import PolicyTable
        rows = ds.to_table(filter=(pc.field(INDEX_COLUMN) == user_id) & (pc.field("night") == self.online_night))
        if not rows.num_rows:
            return None
        table = PolicyTable(self.store, self.release.clap_version)
        return table.policies_from_rows(rows)[user_id]

    def refresh_online(self) -> int:
        """Open the policy table's latest version; drop from the LRU every user refitted online since the last
        call (by any replica), so their next request reads the new row. Returns how many were dropped."""
        from latentpref.tasks.policy.table import PolicyTable
        ds = PolicyTable(self.store, self.release.clap_version).dataset()
        if ds is None or (self._latest is not None and ds.version == self._latest.version):
            return 0
        since = self._online_seen_at
        self._online_seen_at = time.time() - 5.0      # a refit committing now with an earlier clock is seen next time
        changed = ds.to_table(columns=["user_id"], filter=f"night = '{self.online_night}' AND written_at > {since}")
        self._latest = ds
        for user_id in set(changed["user_id"].to_pylist()):
            self.users.pop(user_id)
        return changed.num_rows

    def forget(self, user_id: str) -> None:
        """Stop personalizing the user now (this replica); `refresh_forgotten` spreads it to the others."""
        from latentpref.tasks.policy.forget import tombstone_key
        self.forgotten.add(tombstone_key(user_id))
        self.users.pop(user_id)

    def refresh_forgotten(self) -> None:
        """Pick up tombstones written by other replicas or `latentpref forget`: their users leave the LRU."""
        from latentpref.tasks.policy.forget import forgotten_keys, tombstone_key
        keys = forgotten_keys(self.store)
        if keys - self.forgotten:
            self.forgotten = keys
            for user_id in [u for u in self.users.keys() if u is not None and tombstone_key(u) in keys]:
                self.users.pop(user_id)

    def put_refit(self, policies: dict) -> None:
        """Serve these freshly refitted policies from now on (this replica's own refits: no table read)."""
        from latentpref.tasks.policy.forget import tombstone_key
        for user_id, policy in policies.items():
            if tombstone_key(user_id) in self.forgotten:
                continue
            self.users.put(user_id, ServedUser("has too little feedback (cold start)", policy.manifest["version"])
                           if policy.cold_start else ServedUser(policy, policy.manifest["version"]))

    def _policy(self, user_id):   # PersonalizedGenerator._latents asks here: release-bound and LRU-bounded
        pinned = getattr(self._pinned, "entries", None)
        if pinned is not None and user_id in pinned:
            return pinned[user_id].policy
        return self.served_user(user_id).policy

    # ------------------------------------------------------------------------------------------ generation
    def _autocast(self):
        if self.dtype == "auto":
            from latentpref.tasks.models import precision
            return precision.lm_autocast("cpu")
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=DTYPES[self.dtype])

    @torch.no_grad()
    def complete(self, requests: list[CompletionRequest]) -> list[Completion]:
        """One batched decode for requests of any users; results in request order.

        Raises:
            ValueError: a prompt + max_tokens beyond the base LM's positions.
        """
        users = [r.user for r in requests]
        entries = [self.served_user(u) for u in users]
        ids, mask = tokenize_prompts(self.tokenizer, [r.prompt for r in requests], self.prompt_tokens)
        # the latents of exactly these entries (an online refit may replace a user's LRU entry meanwhile)
        self._pinned.entries = dict(zip(users, entries))
        try:
            z, _ = self._latents(users, ids, mask)                                    # (B, D) float32
        finally:
            self._pinned.entries = None
        n_new = max(r.max_tokens for r in requests)
        temperature = torch.tensor([r.temperature for r in requests])
        top_p = torch.tensor([r.top_p for r in requests])
        generators = [None if r.temperature == 0 else
                      torch.Generator().manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
                      for r in requests]
        tokens = self._decode(z, ids, mask, n_new, temperature, top_p, generators).tolist()
        eos = self.tokenizer.eos_token_id
        out = []
        for r, e, row, n_prompt in zip(requests, entries, tokens, mask.sum(-1).tolist()):
            row = row[:r.max_tokens]
            finish = "length"
            if eos is not None and eos in row:
                row, finish = row[:row.index(eos)], "stop"
            out.append(Completion(self.tokenizer.decode(row, skip_special_tokens=True), finish, int(n_prompt),
                                  len(row), e.reason is None, e.reason, e.artifact_version, e.refitted_online))
        return out

    def _decode(self, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, n_new: int,
                temperature: torch.Tensor, top_p: torch.Tensor, generators: list) -> torch.Tensor:
        """`clap.decode` with per-row sampling settings: (B, n_new) new tokens, left-padded prompts, each row's
        own prefix and positions (so batched == row by row)."""
        clap = self.clap
        B, Tp = ids.shape
        P = clap.cfg.n_prefix
        limit = clap.max_positions
        if limit is not None and P + Tp + n_new > limit:
            raise ValueError(f"{P} prefix + {Tp} prompt + {n_new} new tokens exceed the base's {limit} positions")
        body, lm_head = clap.base_lm.base_model, clap.base_lm.get_output_embeddings()
        with self._autocast():
            cache = clap.prefix_cache(z)
            full = torch.cat([mask.new_ones(B, P), mask, mask.new_ones(B, n_new)], dim=1).long()   # (B, P+Tp+N)
            width = P + Tp
            pos = P + (mask.long().cumsum(-1) - 1).clamp(min=0)                                      # (B, Tp)
            h = body(input_ids=ids, attention_mask=full[:, :width], position_ids=pos, cache=cache, use_cache=True)
            last = h.last_hidden_state[:, -1]
            next_pos = pos[:, -1:] + 1
            new = torch.empty(B, n_new, dtype=torch.long)
            for step in range(n_new):
                token = pick_tokens(lm_head(last).float(), temperature, top_p, generators)
                new[:, step] = token
                if step == n_new - 1:
                    break
                width += 1
                h = body(input_ids=token[:, None], attention_mask=full[:, :width], position_ids=next_pos,
                         cache=cache, use_cache=True)
                last = h.last_hidden_state[:, -1]
                next_pos = next_pos + 1
        return new
