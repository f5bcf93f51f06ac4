"""Batched multi-user Latent-DPO fitting of per-user Gaussian heads on cached prompt features.

Head-only personalisation (spec latent-dpo.md §8): the policy encoder's transformer part is shared and frozen,
so a prompt's query features (the input of the Gaussian head, `LatentEncoder.features`) are cached once and
each user owns only a head `features -> (mu, logvar)`. Heads of all users are stacked into one tensor
(U, Q, d, 2D/Q) + (U, Q, 2D/Q) and trained by one Adam. The loss is the sum over users of each user's own
latent-DPO loss (normalised over that user's pairs only), and Adam is elementwise, so every user's trajectory
is independent of who else is in the batch: fitting users together or one at a time gives the same heads
(up to float reduction order).

Randomness: the latent-DPO noise of a user's k-th pair (in input order) at step t is block k of a stream
seeded by (cfg.seed, t). It depends on nothing else, so a user's fit is a pure function of its own pairs
and the config. (Common random numbers across users: different users' k-th pairs share the noise, which
only correlates MC errors between users, never couples their fits.)

Plain torch; no ray / prefect / mlflow here (the flow wraps this in a task).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import get_args

import torch
from torch import Tensor

from latentpref.tasks.objectives import LossType, latent_dpo_pair_terms

__all__ = ["FitConfig", "FitResult", "fit_users", "init_params", "predict_latent", "user_latent"]

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
    batch_pairs: int = 4096       # padded pair slots per forward/backward chunk: bounds memory, not the math

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


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _step_noise(seed: int, step: int, n_rank: int, n_samples: int, latent_dim: int,
                device: torch.device) -> Tensor:
    """(n_rank, 3, S, D) standard normal; row k depends only on (seed, step, k)."""
    g = torch.Generator(device=device)
    g.manual_seed(_splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ step) >> 1)
    n_blocks = max(1, math.ceil(n_rank / _RANK_BLOCK))
    # equal-shape draws in sequence: block b is the same whatever the number of blocks drawn after it
    blocks = [torch.randn((_RANK_BLOCK, 3, n_samples, latent_dim), generator=g, device=device)
              for _ in range(n_blocks)]
    return torch.cat(blocks)[:n_rank]


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


def _user_terms(chunk: _Chunk, W: Tensor, Bb: Tensor, noise: Tensor, cfg: FitConfig,
                with_metrics: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-user latent-DPO loss (Uc,) and, if asked, accuracy (Uc,) of one chunk."""
    mu, logvar = user_latent(W[chunk.start:chunk.stop], Bb[chunk.start:chunk.stop], chunk.feats)  # (Uc, Pm, D)
    mu, logvar = mu[chunk.valid], logvar[chunk.valid]                                              # (n, D)
    terms = latent_dpo_pair_terms(mu, logvar, *chunk.post, n_samples=cfg.n_samples,
                                  evidence_ratio=cfg.evidence_ratio, beta=cfg.beta, loss_type=cfg.loss_type,
                                  gamma=cfg.gamma, noise=noise.index_select(0, chunk.rank),
                                  with_metrics=with_metrics)
    w = chunk.weight if chunk.weight is not None else 1.0
    zeros = terms.loss_sum.new_zeros(chunk.stop - chunk.start)
    u_loss = zeros.index_add(0, chunk.local_user, terms.loss_sum * w)
    u_kept = zeros.index_add(0, chunk.local_user, terms.n_kept * w).clamp_min(1e-12)
    u_acc = None
    if with_metrics:
        u_acc = zeros.index_add(0, chunk.local_user, terms.n_correct * w) / u_kept
    # each user's own global normaliser (spec §3.6) -> its loss equals latent_dpo_loss on its pairs alone
    return u_loss / u_kept, u_acc


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
    chunks: list[_Chunk] = []
    counts_list = act_counts.tolist()
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
        chunks.append(_Chunk(a, b, padded, valid, local_user, r, tuple(t[sl] for t in post_sorted),
                             None if weight_sorted is None else weight_sorted[sl]))
        pair_start += n_chunk
        a = b

    W = w0[active].clone().requires_grad_(True)                                               # (A, Q, d, E)
    Bb = b0[active].clone().requires_grad_(True)                                              # (A, Q, E)
    n_rank = max(counts_list, default=0)
    loss_curve: list[float] = []
    if active.numel():
        opt = torch.optim.Adam([W, Bb], lr=cfg.lr, weight_decay=cfg.weight_decay)
        for step in range(cfg.steps):
            noise = _step_noise(cfg.seed, step, n_rank, cfg.n_samples, D, device)
            opt.zero_grad(set_to_none=False)
            total = W.new_zeros(())
            for chunk in chunks:
                u_loss, _ = _user_terms(chunk, W, Bb, noise, cfg)
                u_loss.sum().backward()       # users are independent: sum == per-user losses side by side
                total += u_loss.detach().sum()
            opt.step()
            loss_curve.append(float(total) / active.numel())   # one host sync per step

    final_loss = torch.full((n_users,), float("nan"), device=device)
    final_acc = torch.full((n_users,), float("nan"), device=device)
    if active.numel():
        with torch.no_grad():
            noise = _step_noise(cfg.seed, cfg.steps, n_rank, cfg.n_samples, D, device)
            for chunk in chunks:
                u_loss, u_acc = _user_terms(chunk, W, Bb, noise, cfg, with_metrics=True)
                users = active[chunk.start:chunk.stop]
                final_loss[users], final_acc[users] = u_loss, u_acc

    weight, bias = w0.clone(), b0.clone()
    weight[active], bias[active] = W.detach(), Bb.detach()
    seconds = time.perf_counter() - t0
    logger.info("fit_users: %d users (%d with pairs), %d pairs, %d steps in %.2fs", n_users, active.numel(), N,
                cfg.steps, seconds)
    return FitResult(weight, bias, loss_curve, final_loss, final_acc, counts, seconds, cfg)
