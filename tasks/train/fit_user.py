"""Batched multi-user Latent-DPO fitting of per-user Gaussian heads on cached prompt features.

Head-only personalisation (spec latent-dpo.md §8): the policy encoder's transformer part is shared and frozen,
so a prompt's query features (the input of the Gaussian head, `LatentEncoder.features`) are cached once and
each user owns only a head `features -> (mu, logvar)`. Heads of all users are stacked into one tensor
(U, Q, d, 2D/Q) + (U, Q, 2D/Q) and trained by Adam. The loss is the sum over users of each user's own
latent-DPO loss (normalised over that user's pairs only), and Adam is elementwise, so every user's trajectory
is independent of who else is in the batch: fitting users together or one at a time gives the same heads
(up to float reduction order). Users are processed in chunks of about `batch_pairs` pairs, each chunk for all
its steps before the next (chunk-major: the chunk's tensors stay in cache; same result as step-major).

Randomness: the latent-DPO noise of a user's k-th pair (in input order) for noise draw t is block k of a stream
seeded by (cfg.seed, t). It depends on nothing else, so a user's fit is a pure function of its own pairs
and the config. (Common random numbers across users: different users' k-th pairs share the noise, which
only correlates MC errors between users, never couples their fits.)

Speed (spec §8: "the latent-reward math depends only on cached posteriors + RNG"): per pair and noise draw,
everything except the policy's density is parameter-free: the 3S samples z, the latent reward r(z), the
evidence mask and which sample of each kept sample pair wins. `draw_pair_samples` computes that part once;
`pair_loss_terms` then only needs R(z_k) = log pi_theta(z_k) - log N(z_k; 0, I), which for a diagonal
Gaussian is linear in [z^2, z] (one small matmul), and the preference link on the kept sample pairs (a gather,
not the dense 3S x 3S matrix). `FitConfig.noise_draws` reuses a few draws cyclically instead of drawing fresh
samples every step, so the mask (an exact quantile per pair, the costliest part) is computed a few times per
fit instead of every step. See benchmarks/README.md for measured costs.

Plain torch; no ray / prefect / mlflow here (the flow wraps this in a task).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple, get_args

import torch
from torch import Tensor

# the evidence-mask helpers are shared with `latent_dpo_loss` so the mask is the same definition, bit for bit
from latentpref.tasks.objectives import (
    LossType,
    _antisymmetric_quantile,
    _pairwise_differences,
    _sample_log_prob,
    latent_dpo_pair_terms,
    preference_loss,
)

__all__ = ["FitConfig", "FitResult", "PairSamples", "draw_pair_samples", "fit_users", "init_params",
           "pair_loss_terms", "predict_latent", "reduce_per_user", "step_noise", "user_latent"]

logger = logging.getLogger(__name__)

_RANK_BLOCK = 32  # pairs per noise draw; fixed so a rank's noise never depends on how many ranks exist


@dataclass(frozen=True)
class FitConfig:
    steps: int = 200              # full-batch Adam steps over each user's pairs
    lr: float = 1e-2              # contract range 1e-4..1e-2; heads start at zero, so 1e-2 moves fast
    beta: float = 0.1             # Latent-DPO temperature; train_lpo arg (config default 0.5), spec §2.1
    n_samples: int = 16           # per source (prior, q_w, q_l): 3 x 16 = 48 latents per pair, spec §2.1
    evidence_ratio: float = 0.5   # rho of the quantile mask, spec §3.6 (1.0 = every positive gap)
    loss_type: LossType = "dpo"   # "ipo" / "simpo" change only the link on the latent margins
    seed: int = 0                 # noise stream seed (see module docstring)
    weight_decay: float = 0.0     # Adam L2 toward the zero head, i.e. toward the prior N(0, I)
    gamma: float = 0.0            # SimPO target margin (ignored by dpo / ipo)
    batch_pairs: int = 512        # pairs per chunk (users are never split): bounds memory, not the math
    # k = k latent-sample draws per pair, step t uses draw t mod k: the parameter-free part (samples, reward,
    # evidence mask; ~60% of a step) is computed k times per fit instead of `steps` times. None = fresh samples
    # every step, as the reference (spec §3.6). 4 matched fresh noise in held-out accuracy on the tiny world
    # (benchmarks/README.md) at ~1/5 of the cost; the faithful mode keeps None.
    noise_draws: int | None = 4

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps={self.steps}; must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; must be > 0")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta}; must be > 0")
        if self.n_samples < 1:
            raise ValueError(f"n_samples={self.n_samples}; must be >= 1")
        if not 0.0 < self.evidence_ratio <= 1.0:
            raise ValueError(f"evidence_ratio={self.evidence_ratio}; must be in (0, 1]")
        if self.loss_type not in get_args(LossType):
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {get_args(LossType)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}; must be >= 0")
        if self.batch_pairs < 1:
            raise ValueError(f"batch_pairs={self.batch_pairs}; must be >= 1")
        if self.noise_draws is not None and self.noise_draws < 1:
            raise ValueError(f"noise_draws={self.noise_draws}; must be >= 1 (or None: fresh samples every step)")

    @property
    def n_draws(self) -> int:
        """Distinct noise draws a fit uses (draw t mod n_draws at step t)."""
        return self.steps if self.noise_draws is None else max(1, min(self.noise_draws, self.steps))


@dataclass
class FitResult:
    weight: Tensor            # (U, Q, d, 2D/Q) per-user head weights
    bias: Tensor              # (U, Q, 2D/Q)
    loss_curve: list[float]   # per step: mean over users with pairs of their latent-DPO loss
    final_loss: Tensor        # (U,) latent-DPO loss after the last step (fresh noise); NaN for users w/o pairs
    final_accuracy: Tensor    # (U,) share of kept latent pairs ranked correctly; NaN for users w/o pairs
    n_pairs: Tensor           # (U,) int64 pairs per user
    seconds: float            # wall time of fit_users
    config: FitConfig = field(default_factory=FitConfig)


def init_params(n_users: int, n_query: int, d: int, latent_dim: int) -> tuple[Tensor, Tensor]:
    """Zero (standardized) heads: every user's policy is exactly N(0, I) = pi_ref (spec §2.2 `standardize`).

    Returns:
        weight (n_users, n_query, d, 2 * latent_dim / n_query), bias (n_users, n_query, 2 * latent_dim / n_query),
        float32.
    Raises:
        ValueError: negative n_users, non-positive other sizes, or latent_dim not divisible by n_query.
    """
    if n_users < 0 or min(n_query, d, latent_dim) < 1:
        raise ValueError(f"sizes must be positive: n_users={n_users}, n_query={n_query}, d={d}, "
                         f"latent_dim={latent_dim}")
    if latent_dim % n_query:
        raise ValueError(f"latent_dim={latent_dim} must be divisible by n_query={n_query} "
                         "(each query emits latent_dim / n_query means and log-variances)")
    e = 2 * latent_dim // n_query
    return torch.zeros(n_users, n_query, d, e), torch.zeros(n_users, n_query, e)


def user_latent(weight: Tensor, bias: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Apply Gaussian head(s) to query features, grouping latent dims per query like `h2z` (spec §2.2).

    Query q emits out[q] = features[q] @ weight[q] + bias[q] of width 2D/Q; its first D/Q entries are means and
    the rest log-variances, so latent dims q*D/Q .. (q+1)*D/Q - 1 come from query q. (The reference `h2z` is
    one Linear shared by all queries; per-query weights generalise it, and a shared head is weight[q] equal.)

    Args:
        weight: (Q, d, 2D/Q) for one user, or stacked (U, Q, d, 2D/Q).
        bias: (Q, 2D/Q), or (U, Q, 2D/Q).
        features: (N, Q, d) (broadcast over users), or (U, N, Q, d) per user.
    Returns:
        (mu, logvar): (N, D) each, or (U, N, D); float32.
    """
    if weight.shape[-1] % 2:
        raise ValueError(f"head width {weight.shape[-1]} must be even (means + log-variances)")
    f = features.float()
    out = torch.einsum("...nqd,...qde->...nqe", f, weight) + bias.unsqueeze(-3)       # (..., N, Q, 2D/Q)
    half = weight.shape[-1] // 2
    return out[..., :half].flatten(-2), out[..., half:].flatten(-2)


def predict_latent(weight: Tensor, bias: Tensor, features: Tensor) -> Tensor:
    """Serving latent z = mean of p_theta(z|x) (spec §9.12: generation uses mu, sigma ignored); shapes as
    `user_latent`, returns mu only."""
    return user_latent(weight, bias, features)[0]


# ---------------------------------------------------------------------------------------------------------------
# Latent-DPO in two halves: parameter-free samples + mask, then the policy's part
# ---------------------------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def step_noise(seed: int, step: int, n_rank: int, n_samples: int, latent_dim: int,
               device: torch.device) -> Tensor:
    """(n_rank, 3, S, D) standard normal; row k depends only on (seed, step, k)."""
    g = torch.Generator(device=device)
    g.manual_seed(_splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ step) >> 1)
    n_blocks = max(1, math.ceil(n_rank / _RANK_BLOCK))
    # equal-shape draws in sequence: block b is the same whatever the number of blocks drawn after it
    blocks = [torch.randn((_RANK_BLOCK, 3, n_samples, latent_dim), generator=g, device=device)
              for _ in range(n_blocks)]
    return torch.cat(blocks)[:n_rank]


_step_noise = step_noise   # old private name (tests, callers)


class PairSamples(NamedTuple):
    """The parameter-free half of latent DPO for n preference pairs at one noise draw (spec §3.6)."""

    phi: Tensor    # (n, K, 2D) [z^2, z] of the K = 3S samples: R(z) is linear in these
    win: Tensor    # (n, M) int64 sample index of the winner of each kept ordered sample pair
    lose: Tensor   # (n, M) int64 index of the loser
    keep: Tensor   # (n, M) float32 1 = kept, 0 = padding (pairs keep different numbers of sample pairs)


def draw_pair_samples(chosen_mu: Tensor, chosen_logvar: Tensor, rejected_mu: Tensor, rejected_logvar: Tensor,
                      noise: Tensor, *, evidence_ratio: float) -> PairSamples:
    """Samples, latent reward and evidence mask of `latent_dpo_pair_terms`, compacted to the kept sample pairs.

    Same definitions as `objectives.latent_dpo_pair_terms` (same helpers): Z = S prior samples + S from each
    posterior, r = sigmoid(log q_w - log q_l), gap C_ij = r_i - r_j kept when |C| >= tau (per-pair (1 - rho/2)
    quantile of the off-diagonal C) and C != 0; the sample with the larger r wins.

    Args:
        chosen_mu, chosen_logvar, rejected_mu, rejected_logvar: (n, D) frozen posteriors.
        noise: (n, 3, S, D) standard normal ([:, 0] prior samples, [:, 1] / [:, 2] reparameterisation noise).
        evidence_ratio: rho in (0, 1].
    Returns:
        PairSamples with M = the largest kept count of the n pairs.
    """
    w_mu, w_lv, l_mu, l_lv = (t.detach().float() for t in (chosen_mu, chosen_logvar, rejected_mu, rejected_logvar))
    n, D = w_mu.shape
    with torch.no_grad():
        noise = noise.float()
        z = torch.cat([noise[:, 0],
                       w_mu[:, None] + torch.exp(0.5 * w_lv)[:, None] * noise[:, 1],
                       l_mu[:, None] + torch.exp(0.5 * l_lv)[:, None] * noise[:, 2]], dim=1)      # (n, K, D)
        K = z.shape[1]
        r = torch.sigmoid(_sample_log_prob(z, w_mu, w_lv) - _sample_log_prob(z, l_mu, l_lv))      # (n, K)
        c = _pairwise_differences(r)                                                             # (n, M0)
        gap = c.abs()
        tau = _antisymmetric_quantile(gap, 1.0 - evidence_ratio / 2.0).unsqueeze(-1)
        keep = (gap >= tau) & (gap > 0)                                                          # (n, M0)
        # compact the kept entries of each row to its front (index_select: far cheaper than advanced indexing)
        M0 = c.shape[1]
        iu, ju = torch.triu_indices(K, K, offset=1, device=z.device)
        counts = keep.sum(-1)
        m = int(counts.max()) if n else 0
        flat = keep.flatten().nonzero().squeeze(1)                                               # row-major
        rows, cols = flat // M0, flat % M0
        slot = torch.arange(flat.numel(), device=z.device) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
        target = rows * m + slot
        pos = c.flatten().index_select(0, flat) > 0              # i wins when C_ij > 0, else j wins
        i_c, j_c = iu.index_select(0, cols), ju.index_select(0, cols)
        win = torch.zeros(n * m, dtype=torch.long, device=z.device)   # padding points at sample 0, weight 0
        lose = torch.zeros(n * m, dtype=torch.long, device=z.device)
        compact = torch.zeros(n * m, device=z.device)
        win.index_copy_(0, target, torch.where(pos, i_c, j_c))
        lose.index_copy_(0, target, torch.where(pos, j_c, i_c))
        compact.index_fill_(0, target, 1.0)
        win, lose, compact = win.view(n, m), lose.view(n, m), compact.view(n, m)
        phi = torch.cat([z.square(), z], dim=-1)                                                 # (n, K, 2D)
    return PairSamples(phi, win, lose, compact)


def pair_loss_terms(mu: Tensor, logvar: Tensor, samples: PairSamples, *, beta: float, loss_type: LossType,
                    gamma: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair latent-DPO loss sums over the kept sample pairs, given the policy's (mu, logvar) (spec §3.6).

    R(z) = log N(z; mu, e^lv) - log N(z; 0, I) = sum_d A_d z_d^2 + B_d z_d + const with A = (1 - e^-lv) / 2,
    B = mu e^-lv; the per-pair constant cancels in every margin R(z_win) - R(z_lose), so it is dropped. (This
    expanded form is exact in real arithmetic; in fp32 it loses ~e^-lv * 1e-7 absolute, harmless unless a
    policy variance collapses below ~1e-4.)

    Args:
        mu, logvar: (n, D) policy Gaussian of each pair's prompt (carry the gradient).
        samples: `draw_pair_samples` for the same n pairs.
        beta, loss_type, gamma: see `objectives.preference_loss`.
    Returns:
        (loss_sum (n,), n_kept (n,) float): sum_kept loss and the number of kept sample pairs, as
        `objectives.PairTerms.loss_sum` / `n_kept`.
    """
    prec = torch.exp(-logvar.float())
    theta = torch.cat([0.5 * (1.0 - prec), mu.float() * prec], dim=-1)                          # (n, 2D)
    # broadcast-multiply + sum: 2x faster than a batched matvec (bmm of (K, 2D) @ (2D, 1)) on CPU
    R = (samples.phi * theta.unsqueeze(1)).sum(-1)                                               # (n, K)
    margin = R.gather(1, samples.win) - R.gather(1, samples.lose)                                # (n, M)
    keep = samples.keep
    losses = preference_loss(margin, torch.zeros((), dtype=R.dtype, device=R.device), loss_type=loss_type,
                             beta=beta, gamma=gamma)
    return (losses * keep).sum(-1), keep.sum(-1)


def reduce_per_user(loss_sum: Tensor, n_kept: Tensor, local_user: Tensor, n_users: int,
                    weight: Tensor | None = None) -> Tensor:
    """Each user's latent-DPO loss with its own global normaliser (spec §3.6): sum of its pairs' kept losses
    over the sum of its kept counts (weighted by the feedback `weight`). (n,) pair terms -> (n_users,)."""
    w = weight if weight is not None else 1.0
    zeros = loss_sum.new_zeros(n_users)
    u_loss = zeros.index_add(0, local_user, loss_sum * w)
    u_kept = zeros.index_add(0, local_user, n_kept * w).clamp_min(1e-12)
    return u_loss / u_kept


# ---------------------------------------------------------------------------------------------------------------
# fit_users
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    start: int             # slice of the (count-sorted) active-user stack
    stop: int
    feats: Tensor          # (Uc, Pm, Q, d) padded features
    valid: Tensor          # (Uc, Pm) bool
    local_user: Tensor     # (n,) user within chunk of each valid pair, (user, rank) order
    rank: Tensor           # (n,)
    post: tuple[Tensor, Tensor, Tensor, Tensor]  # chosen_mu, chosen_logvar, rejected_mu, rejected_logvar (n, D)
    weight: Tensor | None  # (n,)


def _metric_terms(chunk: _Chunk, W: Tensor, Bb: Tensor, noise: Tensor, cfg: FitConfig) -> tuple[Tensor, Tensor]:
    """Per-user final loss and accuracy (Uc,) through `objectives.latent_dpo_pair_terms` itself."""
    mu, logvar = user_latent(W, Bb, chunk.feats)
    mu, logvar = mu[chunk.valid], logvar[chunk.valid]
    terms = latent_dpo_pair_terms(mu, logvar, *chunk.post, n_samples=cfg.n_samples,
                                  evidence_ratio=cfg.evidence_ratio, beta=cfg.beta, loss_type=cfg.loss_type,
                                  gamma=cfg.gamma, noise=noise.index_select(0, chunk.rank), with_metrics=True)
    n_users = chunk.stop - chunk.start
    u_loss = reduce_per_user(terms.loss_sum, terms.n_kept, chunk.local_user, n_users, chunk.weight)
    u_acc = reduce_per_user(terms.n_correct, terms.n_kept, chunk.local_user, n_users, chunk.weight)
    return u_loss, u_acc


def _fused_adam(device: torch.device) -> bool | None:
    """The fused (single-kernel) Adam where torch has one: same update, fewer passes over the parameters."""
    return True if device.type in ("cpu", "cuda") else None


def fit_users(features: Tensor, chosen_mu: Tensor, chosen_logvar: Tensor, rejected_mu: Tensor,
              rejected_logvar: Tensor, user_index: Tensor, n_users: int, cfg: FitConfig = FitConfig(), *,
              init: tuple[Tensor, Tensor] | None = None, pair_weight: Tensor | None = None) -> FitResult:
    """Fit every user's Gaussian head by Latent DPO on cached features and posteriors (spec §3.6, §8).

    Args:
        features: (N, Q, d) cached query features of each pair's prompt (policy encoder without its head).
        chosen_mu, chosen_logvar, rejected_mu, rejected_logvar: (N, D) frozen CLaP posteriors of y_w / y_l.
        user_index: (N,) int, user 0..n_users-1 of each pair.
        n_users: U; users without pairs keep their initial head exactly (zero -> the prior N(0, I)).
        cfg: FitConfig.
        init: optional warm start (weight (U, Q, d, 2D/Q), bias (U, Q, 2D/Q)), e.g. yesterday's heads.
        pair_weight: optional (N,) non-negative weights (feedback `weight` column).
    Returns:
        FitResult with float32 heads on features' device.
    Raises:
        ValueError: inconsistent shapes, user ids out of range, bad init, negative weights.
    """
    t0 = time.perf_counter()
    if features.ndim != 3:
        raise ValueError(f"features must be (N, n_query, d); got {tuple(features.shape)}")
    N, Q, d = features.shape
    post = (chosen_mu, chosen_logvar, rejected_mu, rejected_logvar)
    shapes = [tuple(t.shape) for t in post]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2 or shapes[0][0] != N:
        raise ValueError(f"posteriors must all be (N={N}, D); got {shapes}")
    D = shapes[0][1]
    if user_index.shape != (N,) or user_index.dtype.is_floating_point:
        raise ValueError(f"user_index must be an integer (N={N},) tensor; got {user_index.dtype} "
                         f"{tuple(user_index.shape)}")
    if N and (int(user_index.min()) < 0 or int(user_index.max()) >= n_users):
        raise ValueError(f"user_index values must lie in [0, n_users={n_users}); got range "
                         f"[{int(user_index.min())}, {int(user_index.max())}]")
    device = features.device
    w0, b0 = init if init is not None else init_params(n_users, Q, d, D)
    w0, b0 = w0.to(device=device, dtype=torch.float32), b0.to(device=device, dtype=torch.float32)
    E = 2 * D // Q
    if D % Q or w0.shape != (n_users, Q, d, E) or b0.shape != (n_users, Q, E):
        raise ValueError(f"init weight {tuple(w0.shape)} / bias {tuple(b0.shape)}; expected "
                         f"({n_users}, {Q}, {d}, {E}) / ({n_users}, {Q}, {E}) with D={D} divisible by Q={Q}")
    if pair_weight is not None:
        if pair_weight.shape != (N,):
            raise ValueError(f"pair_weight shape {tuple(pair_weight.shape)}; expected ({N},)")
        if N and bool((pair_weight < 0).any()):
            raise ValueError(f"pair_weight must be >= 0; min is {pair_weight.min().item()}")

    user_index = user_index.to(device=device, dtype=torch.long)
    counts = torch.bincount(user_index, minlength=n_users)                                    # (U,)
    # active users sorted by pair count (descending) so each chunk pads to similar lengths
    active = torch.nonzero(counts > 0).squeeze(-1)
    active = active[torch.sort(counts[active], descending=True, stable=True).indices]        # (A,)
    pos_of_user = torch.full((n_users,), -1, dtype=torch.long, device=device)
    pos_of_user[active] = torch.arange(active.numel(), device=device)
    # order pairs by (position of user, original order); rank = index of the pair among its user's pairs
    order = torch.sort(pos_of_user[user_index], stable=True).indices
    pos_sorted = pos_of_user[user_index[order]]
    act_counts = counts[active]
    starts = torch.cumsum(act_counts, 0) - act_counts
    rank = torch.arange(N, device=device) - starts[pos_sorted]

    feats = features.detach().float()[order]
    post_sorted = tuple(t.detach().float()[order] for t in post)
    weight_sorted = None if pair_weight is None else pair_weight.detach().float().to(device)[order]
    counts_list = act_counts.tolist()

    weight, bias = w0.clone(), b0.clone()
    final_loss = torch.full((n_users,), float("nan"), device=device)
    final_acc = torch.full((n_users,), float("nan"), device=device)
    curve = torch.zeros(cfg.steps, dtype=torch.float64, device=device)
    n_draws = cfg.n_draws
    a = 0
    pair_start = 0
    while a < len(counts_list):
        pm = counts_list[a]                     # largest count in this chunk (sorted descending)
        b = a + 1
        while b < len(counts_list) and (b + 1 - a) * pm <= cfg.batch_pairs:
            b += 1
        n_chunk = sum(counts_list[a:b])
        sl = slice(pair_start, pair_start + n_chunk)
        local_user = pos_sorted[sl] - a
        r = rank[sl]
        valid = torch.zeros(b - a, pm, dtype=torch.bool, device=device)
        valid[local_user, r] = True
        padded = feats.new_zeros(b - a, pm, Q, d)
        padded[local_user, r] = feats[sl]
        chunk = _Chunk(a, b, padded, valid, local_user, r, tuple(t[sl] for t in post_sorted),
                       None if weight_sorted is None else weight_sorted[sl])
        users = active[a:b]
        flat = local_user * pm + r             # row of each valid pair in the flattened (Uc * Pm) layout
        W = w0[users].clone().requires_grad_(True)                                            # (Uc, Q, d, E)
        Bb = b0[users].clone().requires_grad_(True)                                           # (Uc, Q, E)
        # Adam is elementwise and each user's loss touches only its own head: one Adam per chunk is the same
        # as one over everyone
        opt = torch.optim.Adam([W, Bb], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fused_adam(device))
        pool: dict[int, PairSamples] = {}
        for step in range(cfg.steps):
            k = step % n_draws
            samples = pool.get(k)
            if samples is None:
                noise = step_noise(cfg.seed, k, pm, cfg.n_samples, D, device).index_select(0, r)
                samples = draw_pair_samples(*chunk.post, noise, evidence_ratio=cfg.evidence_ratio)
                if n_draws < cfg.steps:
                    pool[k] = samples
            mu, logvar = user_latent(W, Bb, padded)                                          # (Uc, Pm, D)
            mu, logvar = mu.reshape(-1, D).index_select(0, flat), logvar.reshape(-1, D).index_select(0, flat)
            loss_sum, n_kept = pair_loss_terms(mu, logvar, samples, beta=cfg.beta,
                                               loss_type=cfg.loss_type, gamma=cfg.gamma)
            u_loss = reduce_per_user(loss_sum, n_kept, local_user, b - a, chunk.weight)
            opt.zero_grad(set_to_none=False)
            u_loss.sum().backward()          # users are independent: sum == per-user losses side by side
            opt.step()
            curve[step] += u_loss.detach().sum()
        del pool
        with torch.no_grad():
            noise = step_noise(cfg.seed, cfg.steps, pm, cfg.n_samples, D, device)
            final_loss[users], final_acc[users] = _metric_terms(chunk, W, Bb, noise, cfg)
            weight[users], bias[users] = W.detach(), Bb.detach()
        pair_start += n_chunk
        a = b

    loss_curve = (curve / max(active.numel(), 1)).tolist() if active.numel() else []
    seconds = time.perf_counter() - t0
    logger.info("fit_users: %d users (%d with pairs), %d pairs, %d steps in %.2fs", n_users, active.numel(), N,
                cfg.steps, seconds)
    return FitResult(weight, bias, loss_curve, final_loss, final_acc, counts, seconds, cfg)
