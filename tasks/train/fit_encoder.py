"""Per-user Latent DPO that trains (part of) a copy of the CLaP latent encoder: `faithful` and `trunk-frozen`.

Spec latent-dpo.md §3.6 / §2.5: the per-user policy p_theta(z|x) is a copy of the CLaP latent encoder,
initialised from the CLaP posterior weights and standardized (zero head, so pi_theta = pi_ref = N(0, I) at step
0), run on the prompt only; the loss is latent DPO against the frozen posteriors of y_w / y_l.

Modes (what trains; everything else is frozen and computed once per prompt, because it does not depend on the
user, spec §8):
- `faithful`: queries, ln_in, every encoder block, ln_out, head. Departure from the reference (spec §9.14): the
  encoder's own token-embedding copy (and our GPT-2 position table, which the reference lacks, §9.4) is frozen.
  The reference trains the 50k x d embedding per user with dense AdamW state (38.6M parameters x 3 for GPT-2
  small: ~460 MB per user) although each user's prompts touch a few hundred rows.
- `trunk-frozen`: token embedding, ln_in and all blocks but the top one are frozen: the prompt rows' outputs of
  the frozen blocks and their attention keys/values are cached per prompt, and only the query rows go through
  the frozen blocks each step (prompt tokens never see the queries: causal attention, queries last). Trains the
  top block, the queries and ln_out + head.
(`head-only`, where only the head trains on cached features, is `fit_user.fit_users`.)

Batching: users of a chunk are fitted together, one Adam over all their parameters and one backward of the sum
of their losses (Adam is elementwise and each loss touches one user's copy, so this equals separate fits); each
user's forward is its own call on its own prompts. Stacking users' weights and `torch.func.vmap`-ing the blocks
was measured on CPU (tiny GPT-2, 64 prompts per user): no faster than the loop, since one user's prompts already
fill the matmuls (and transformers' CPU SDPA has no vmap batching rule, so it falls back to a slow per-sample
loop). On a GPU with many small users vmap would cut kernel launches; not done here.

The latent-DPO half (samples, evidence mask, preference link, per-user normaliser) is `fit_user`'s, so the three
modes share one implementation of the objective (DPO / IPO / SimPO via `FitConfig.loss_type`).

Plain torch; no ray / prefect / mlflow here.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentpref.tasks.models.policy import policy_latent  # noqa: F401  (the encoder policy's forward)
from latentpref.tasks.objectives import check_pair_weight, latent_dpo_pair_terms
from latentpref.tasks.train.fit_user import (
    FitConfig,
    PairSamples,
    draw_pair_samples,
    pair_loss_terms,
    reduce_per_user,
    step_noise,
)

__all__ = ["EncoderFitResult", "EncoderMode", "PolicyEncoder", "PromptTrunk", "FrozenTrunk", "SPEC_FAITHFUL",
           "fit_encoder_users", "policy_latent", "trainable_names"]

logger = logging.getLogger(__name__)

EncoderMode = Literal["faithful", "trunk-frozen"]

# spec §2.1 / §4.1.8 train_lpo arguments: beta 0.1, 16 samples per source, evidence ratio 0.5, lr 1e-4
SPEC_FAITHFUL = FitConfig(steps=100, lr=1e-4, beta=0.1, n_samples=16, evidence_ratio=0.5, noise_draws=None)


def _check_mode(mode: str) -> None:
    if mode not in get_args(EncoderMode):
        raise ValueError(f"mode={mode!r}; expected one of {get_args(EncoderMode)} (head-only is fit_user.fit_users)")


def _n_frozen_blocks(mode: str, n_layers: int) -> int:
    return 0 if mode == "faithful" else n_layers - 1


def trainable_names(encoder: nn.Module, mode: str) -> list[str]:
    """Names (as in `LatentEncoder.state_dict`) of the parameters a mode trains: the per-user artifact's keys."""
    _check_mode(mode)
    n_frozen = _n_frozen_blocks(mode, len(encoder.blocks))
    keep = ["queries", "ln_out.", "h2z."] + [f"blocks.{i}." for i in range(n_frozen, len(encoder.blocks))]
    if mode == "faithful":
        keep.append("ln_in.")
    return [n for n, _ in encoder.named_parameters() if any(n == k or n.startswith(k) for k in keep)]


class PromptTrunk(NamedTuple):
    """User-independent encodings of P prompts (the frozen part of the policy encoder), float32."""

    bias: Tensor              # (P, 1, L, L) additive attention bias, L = T + Q (causal + key padding)
    pos: Tensor               # (P, L) positions from the mask (queries right after the last real token)
    q_add: Tensor             # (P, Q, d) position embedding of the query rows (GPT-2), zeros for Llama
    x_tok: Tensor | None      # faithful: (P, T, d) token (+ position) embeddings of the prompt rows
    h_prompt: Tensor | None   # trunk-frozen: (P, T, d) prompt rows after the frozen blocks
    kv: tuple[tuple[Tensor, Tensor], ...]  # trunk-frozen: per frozen block, the prompt rows' attention K / V
    rope: tuple[Tensor, Tensor] | None     # Llama: (cos, sin) (P, L, head_dim)

    def select(self, idx: Tensor) -> "PromptTrunk":
        def pick(t):
            return None if t is None else t.index_select(0, idx)
        return PromptTrunk(pick(self.bias), pick(self.pos), pick(self.q_add), pick(self.x_tok), pick(self.h_prompt),
                           tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv),
                           None if self.rope is None else (pick(self.rope[0]), pick(self.rope[1])))


class _PrefixKV:
    """The one method of a transformers `Cache` that an attention layer calls: `update(k, v, layer_idx, ...)`.

    Empty, it records the K/V it is given (prompt rows, computed once); filled, it returns prefix + new, so the
    query rows attend to the cached prompt rows without recomputing them (explicit K/V, spec §9.15)."""

    def __init__(self, k: Tensor | None = None, v: Tensor | None = None) -> None:
        self.k, self.v = k, v

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self.k is None:
            self.k, self.v = key_states, value_states
            return key_states, value_states
        return torch.cat([self.k, key_states], dim=-2), torch.cat([self.v, value_states], dim=-2)


def _run_block(kind: str, block: nn.Module, h: Tensor, bias: Tensor, pos: Tensor,
               rope: tuple[Tensor, Tensor] | None, cache: _PrefixKV | None = None) -> Tensor:
    if kind == "gpt2":
        return block(h, attention_mask=bias, cache=cache)
    return block(h, attention_mask=bias, position_ids=pos, position_embeddings=rope, cache=cache)


class FrozenTrunk(nn.Module):
    """The frozen part of the policy encoder (float32 copies, requires_grad False): embeddings, and for
    trunk-frozen also ln_in and the lower blocks. `encode` builds the per-prompt cache; `query_rows` runs the
    query rows through the frozen blocks against that cache (the only frozen compute left per step)."""

    def __init__(self, encoder: nn.Module, mode: str) -> None:
        super().__init__()
        _check_mode(mode)
        self.mode, self.kind = mode, encoder.kind
        self.n_query = encoder.cfg.n_query
        n_frozen = _n_frozen_blocks(mode, len(encoder.blocks))
        self.wte = encoder.wte                                  # shared, never copied (the big one)
        self.wpe = encoder.wpe
        self.rotary = encoder.rotary
        self.ln_in = copy.deepcopy(encoder.ln_in).float() if mode == "trunk-frozen" else None
        self.blocks = nn.ModuleList(copy.deepcopy(encoder.blocks[i]).float() for i in range(n_frozen))
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> PromptTrunk:
        """Per-prompt cache for (P, T) prompts (any padding layout; positions come from the mask)."""
        P, T = input_ids.shape
        Q = self.n_query
        mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(P, Q, dtype=torch.bool)], dim=1)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)          # as LatentEncoder.features (clap._positions)
        L = T + Q
        if self.wpe is not None and L > self.wpe.num_embeddings:
            raise ValueError(f"encoder input of {T} tokens + {Q} queries exceeds the {self.wpe.num_embeddings} "
                             "GPT-2 positions")
        causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        allowed = (causal & mask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=input_ids.device)
        bias = torch.zeros(P, 1, L, L, device=input_ids.device).masked_fill(~allowed[:, None],
                                                                             torch.finfo(torch.float32).min)
        x_tok = self.wte(input_ids).float()
        if self.wpe is not None:
            pe = self.wpe(pos).float()
            x_tok, q_add = x_tok + pe[:, :T], pe[:, T:]
        else:
            q_add = x_tok.new_zeros(P, Q, x_tok.shape[-1])
        rope = None
        if self.rotary is not None:
            cos, sin = self.rotary(x_tok, pos)
            rope = (cos.float(), sin.float())
        if self.mode == "faithful":
            return PromptTrunk(bias, pos, q_add, x_tok, None, (), rope)
        h = self.ln_in(x_tok)
        kv = []
        for block in self.blocks:
            rec = _PrefixKV()
            h = _run_block(self.kind, block, h, bias[:, :, :T, :T], pos[:, :T],
                           None if rope is None else (rope[0][:, :T], rope[1][:, :T]), cache=rec)
            kv.append((rec.k, rec.v))
        return PromptTrunk(bias, pos, q_add, None, h, tuple(kv), rope)

    def query_rows(self, queries: Tensor, trunk: PromptTrunk) -> Tensor:
        """trunk-frozen: queries (Q, d) -> (P, Q, d) query rows after ln_in and the frozen blocks (with grad)."""
        T = trunk.h_prompt.shape[1]
        q = self.ln_in(queries.unsqueeze(0) + trunk.q_add)
        rope = None if trunk.rope is None else (trunk.rope[0][:, T:], trunk.rope[1][:, T:])
        for block, (k, v) in zip(self.blocks, trunk.kv):
            q = _run_block(self.kind, block, q, trunk.bias[:, :, T:], trunk.pos[:, T:], rope, cache=_PrefixKV(k, v))
        return q


class PolicyEncoder(nn.Module):
    """The trainable part of one user's policy encoder. Parameter names match `LatentEncoder`'s, so a state
    dict of this module loads onto a CLaP encoder (`policy_latent`). Float32 (Adam on bf16 weights stalls)."""

    def __init__(self, encoder: nn.Module, mode: str, *, standardize: bool = True) -> None:
        super().__init__()
        _check_mode(mode)
        self.mode, self.kind = mode, encoder.kind
        self.n_query, self.latent_dim = encoder.cfg.n_query, encoder.cfg.latent_dim
        n_frozen = _n_frozen_blocks(mode, len(encoder.blocks))
        self.queries = nn.Parameter(encoder.queries.detach().float().clone())
        self.ln_in = copy.deepcopy(encoder.ln_in).float() if mode == "faithful" else None
        # ModuleDict keyed by the encoder's block index: names "blocks.<i>.*" as in LatentEncoder
        self.blocks = nn.ModuleDict({str(i): copy.deepcopy(encoder.blocks[i]).float()
                                     for i in range(n_frozen, len(encoder.blocks))})
        self.ln_out = copy.deepcopy(encoder.ln_out).float()
        self.h2z = copy.deepcopy(encoder.h2z).float()
        for p in self.parameters():
            p.requires_grad_(True)
        if standardize:   # spec §2.2: zero head -> exactly N(0, I) = pi_ref at step 0
            with torch.no_grad():
                self.h2z.weight.zero_()
                self.h2z.bias.zero_()

    def forward(self, frozen: FrozenTrunk, trunk: PromptTrunk) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each (P, latent_dim) float32, for the P prompts of `trunk`."""
        Q = self.n_query
        if self.mode == "faithful":
            h = self.ln_in(torch.cat([trunk.x_tok, self.queries.unsqueeze(0) + trunk.q_add], dim=1))
        else:
            h = torch.cat([trunk.h_prompt, frozen.query_rows(self.queries, trunk)], dim=1)
        for block in self.blocks.values():
            h = _run_block(self.kind, block, h, trunk.bias, trunk.pos, trunk.rope)
        f = self.ln_out(h[:, -Q:])                                                            # (P, Q, d)
        out = F.linear(f, self.h2z.weight, self.h2z.bias)                                     # (P, Q, 2k)
        k = self.latent_dim // Q
        return out[..., :k].reshape(f.shape[0], -1), out[..., k:].reshape(f.shape[0], -1)


@dataclass
class EncoderFitResult:
    states: list[dict[str, Tensor]]  # per user: the trained tensors (names as LatentEncoder), float32 on CPU
    loss_curve: list[float]          # per step: mean over users with pairs of their latent-DPO loss
    final_loss: Tensor               # (U,) latent-DPO loss after the last step (fresh noise); NaN w/o pairs
    final_accuracy: Tensor           # (U,) share of kept latent pairs ranked correctly; NaN w/o pairs
    n_pairs: Tensor                  # (U,) int64
    trainable_params: int            # per user
    seconds: float
    config: FitConfig = field(default_factory=FitConfig)


def fit_encoder_users(encoder: nn.Module, mode: EncoderMode, prompt_ids: Tensor, prompt_mask: Tensor,
                      pair_prompt: Tensor, chosen_mu: Tensor, chosen_logvar: Tensor, rejected_mu: Tensor,
                      rejected_logvar: Tensor, user_index: Tensor, n_users: int, cfg: FitConfig = SPEC_FAITHFUL, *,
                      init: list[dict[str, Tensor] | None] | None = None,
                      pair_weight: Tensor | None = None) -> EncoderFitResult:
    """Fit every user's policy encoder (faithful or trunk-frozen) by Latent DPO (spec §3.6).

    Args:
        encoder: the CLaP posterior encoder (`CLaP.encoder`, a LatentEncoder); never modified.
        mode: "faithful" | "trunk-frozen".
        prompt_ids, prompt_mask: (P, T) tokens of the distinct prompts (any padding layout, explicit mask).
        pair_prompt: (N,) int, row of `prompt_ids` of each pair's prompt.
        chosen_mu, chosen_logvar, rejected_mu, rejected_logvar: (N, D) frozen CLaP posteriors of y_w / y_l.
        user_index: (N,) int, user 0..n_users-1 of each pair.
        n_users: U; users without pairs keep their initial state (standardized copy -> N(0, I)).
        cfg: FitConfig (steps, lr, beta, n_samples, evidence_ratio, loss_type, seed, weight_decay, gamma,
            noise_draws; batch_pairs = pairs per chunk of users fitted together).
        init: optional per-user warm start: that user's `states` from an earlier fit (or None).
        pair_weight: optional (N,) non-negative weights.
    Returns:
        EncoderFitResult.
    Raises:
        ValueError: unknown mode, inconsistent shapes, ids out of range, bad init keys.
    """
    _check_mode(mode)
    t0 = time.perf_counter()
    N = pair_prompt.shape[0]
    post = (chosen_mu, chosen_logvar, rejected_mu, rejected_logvar)
    shapes = {tuple(t.shape) for t in post}
    D = encoder.cfg.latent_dim
    if shapes != {(N, D)}:
        raise ValueError(f"posteriors must all be (N={N}, latent_dim={D}); got {sorted(shapes)}")
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} / prompt_mask {tuple(prompt_mask.shape)} must be "
                         "the same (P, T)")
    for name, idx, hi in (("user_index", user_index, n_users), ("pair_prompt", pair_prompt, prompt_ids.shape[0])):
        if idx.shape != (N,) or idx.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer (N={N},) tensor; got {idx.dtype} {tuple(idx.shape)}")
        if N and (int(idx.min()) < 0 or int(idx.max()) >= hi):
            raise ValueError(f"{name} values must lie in [0, {hi}); got [{int(idx.min())}, {int(idx.max())}]")
    if init is not None and len(init) != n_users:
        raise ValueError(f"init has {len(init)} entries; expected one per user ({n_users})")
    if pair_weight is not None:
        check_pair_weight(pair_weight, N)

    names = trainable_names(encoder, mode)
    frozen = FrozenTrunk(encoder, mode).eval()
    base = PolicyEncoder(encoder, mode).eval()     # dropout off: the trunk is deterministic, so is the policy
    if sorted(n for n, _ in base.named_parameters()) != sorted(names):
        raise AssertionError("PolicyEncoder parameters drifted from trainable_names")  # a bug, not bad input
    base_state = _params_of(base)
    n_params = sum(p.numel() for p in base.parameters())

    user_index = user_index.long()
    counts = torch.bincount(user_index, minlength=n_users)
    order = torch.sort(user_index, stable=True).indices          # (user, original order)
    rank = torch.arange(N) - (torch.cumsum(counts, 0) - counts)[user_index[order]]
    post_sorted = tuple(t.detach().float()[order] for t in post)
    weight_sorted = None if pair_weight is None else pair_weight.detach().float()[order]
    prompt_sorted = pair_prompt.long()[order]
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    counts_list = counts.tolist()

    states: list[dict[str, Tensor]] = []
    for u in range(n_users):
        states.append(_check_state(init[u], base_state, u) if init is not None and init[u] is not None
                      else base_state)
    final_loss = torch.full((n_users,), float("nan"))
    final_acc = torch.full((n_users,), float("nan"))
    curve = torch.zeros(cfg.steps, dtype=torch.float64)
    active = [u for u in range(n_users) if counts_list[u]]
    n_draws = cfg.n_draws
    i = 0
    while i < len(active):
        j, total = i + 1, counts_list[active[i]]
        while j < len(active) and total + counts_list[active[j]] <= cfg.batch_pairs:
            total += counts_list[active[j]]
            j += 1
        users = active[i:j]
        rows = torch.cat([torch.arange(starts[u], starts[u] + counts_list[u]) for u in users])
        local_user = torch.cat([torch.full((counts_list[u],), k, dtype=torch.long) for k, u in enumerate(users)])
        r = rank[rows]
        c_post = tuple(t[rows] for t in post_sorted)
        c_weight = None if weight_sorted is None else weight_sorted[rows]
        # distinct prompts of the chunk -> trunk once; per user its distinct prompts and each pair's row among them
        c_prompts, c_inverse = torch.unique(prompt_sorted[rows], return_inverse=True)
        trunk = frozen.encode(prompt_ids[c_prompts], prompt_mask[c_prompts])
        per_user = []
        for k, u in enumerate(users):
            sel = local_user == k
            u_prompts, u_inverse = torch.unique(c_inverse[sel], return_inverse=True)
            per_user.append((trunk.select(u_prompts), u_inverse))
        del trunk
        policies = []
        for u in users:
            policy = copy.deepcopy(base)
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    p.copy_(states[u][name])
            policies.append(policy)
        params = [p for policy in policies for p in policy.parameters()]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        pm = max(counts_list[u] for u in users)
        pool: dict[int, PairSamples] = {}

        def latents() -> tuple[Tensor, Tensor]:
            mus, lvs = [], []
            for policy, (u_trunk, u_inverse) in zip(policies, per_user):
                mu, lv = policy(frozen, u_trunk)                                          # (P_u, D)
                mus.append(mu.index_select(0, u_inverse))
                lvs.append(lv.index_select(0, u_inverse))
            return torch.cat(mus), torch.cat(lvs)                                         # (n, D), (user, rank)

        for step in range(cfg.steps):
            k = step % n_draws
            samples = pool.get(k)
            if samples is None:
                noise = step_noise(cfg.seed, k, pm, cfg.n_samples, D, torch.device("cpu")).index_select(0, r)
                samples = draw_pair_samples(*c_post, noise, evidence_ratio=cfg.evidence_ratio)
                if n_draws < cfg.steps:
                    pool[k] = samples
            mu, logvar = latents()
            loss_sum, n_kept = pair_loss_terms(mu, logvar, samples, beta=cfg.beta, loss_type=cfg.loss_type,
                                               gamma=cfg.gamma)
            u_loss = reduce_per_user(loss_sum, n_kept, local_user, len(users), c_weight)
            opt.zero_grad(set_to_none=False)
            u_loss.sum().backward()
            opt.step()
            curve[step] += float(u_loss.detach().sum())
        del pool
        with torch.no_grad():
            mu, logvar = latents()
            noise = step_noise(cfg.seed, cfg.steps, pm, cfg.n_samples, D, torch.device("cpu")).index_select(0, r)
            terms = latent_dpo_pair_terms(mu, logvar, *c_post, n_samples=cfg.n_samples,
                                          evidence_ratio=cfg.evidence_ratio, beta=cfg.beta, loss_type=cfg.loss_type,
                                          gamma=cfg.gamma, noise=noise, with_metrics=True)
            idx = torch.tensor(users)
            final_loss[idx] = reduce_per_user(terms.loss_sum, terms.n_kept, local_user, len(users), c_weight)
            final_acc[idx] = reduce_per_user(terms.n_correct, terms.n_kept, local_user, len(users), c_weight)
        for u, policy in zip(users, policies):
            states[u] = _params_of(policy)
        i = j

    seconds = time.perf_counter() - t0
    logger.info("fit_encoder_users[%s]: %d users (%d with pairs), %d pairs, %d steps in %.2fs", mode, n_users,
                len(active), N, cfg.steps, seconds)
    loss_curve = (curve / len(active)).tolist() if active else []
    return EncoderFitResult(states, loss_curve, final_loss, final_acc, counts, n_params, seconds, cfg)


def _params_of(module: nn.Module) -> dict[str, Tensor]:
    """Parameters only (no buffers such as rotary tables): exactly the artifact's tensors."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _check_state(state: dict[str, Tensor], base: dict[str, Tensor], user: int) -> dict[str, Tensor]:
    if set(state) != set(base):
        missing, extra = sorted(set(base) - set(state)), sorted(set(state) - set(base))
        raise ValueError(f"init[{user}] does not match this mode's trainable tensors: missing {missing[:4]}, "
                         f"unexpected {extra[:4]} (a warm start must come from the same mode and CLaP)")
    bad = [k for k in base if tuple(state[k].shape) != tuple(base[k].shape)]
    if bad:
        raise ValueError(f"init[{user}] tensor shapes differ from the encoder's for {bad[:4]}")
    return {k: v.float() for k, v in state.items()}
