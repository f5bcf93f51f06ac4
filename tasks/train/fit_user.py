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
evidence mask, which sample of each kept sample pair wins, and each user's normaliser (its kept count).
`draw_pair_samples` computes that part once per draw; `FitConfig.noise_draws` reuses a few draws cyclically, so
the mask (an exact quantile per pair, the costliest part) is computed a few times per fit, not every step. Per
step only R(z_k) = log pi_theta(z_k) - log N(z_k; 0, I) is needed, which for a diagonal Gaussian is linear in
[z^2, z] (a batched matvec), then the preference link on the kept sample pairs (a gather, not the dense
3S x 3S matrix). The head-only step computes that loss and its gradient by hand (`_head_loss_grad`, checked
against autograd in the tests): no graph, no autograd bookkeeping, one fused Adam kernel on a flat buffer;
1.75-2x faster per pair-step than autograd through `pair_loss_terms` (benchmarks/README.md), which the encoder modes
(fit_encoder.py) still use. Final metrics use the same compacted terms on a fresh draw.

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
from latentpref.tasks.models.latent import LOG_2PI, POLICY_LOGVAR_BOUND, bounded_logvar
from latentpref.tasks.models.policy import predict_latent, user_latent  # noqa: F401  (the head's forward)
from latentpref.tasks.objectives import (
    LossType,
    check_pair_weight,
    evidence_mask,
    link_scale,
    preference_loss,
    preference_loss_grad,
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


def project_heads(weight: Tensor, bias: Tensor, dims: int, scale: float) -> tuple[Tensor, Tensor]:
    """Heads that keep only latent coordinates 0..dims-1 (the CLaP's preference space), their means times `scale`;
    every other coordinate is the prior's N(0, 1) for any prompt (mean and log-variance columns zeroed).

    The layout is `policy.user_latent`'s: query q emits latent dims q*D/Q .. (q+1)*D/Q - 1, its first D/Q columns
    means and the rest log-variances. Shapes (..., Q, d, 2D/Q) and (..., Q, 2D/Q); returns new tensors.
    """
    Q, E = weight.shape[-3], weight.shape[-1]
    half = E // 2
    D = Q * half
    if not 0 < dims <= D:
        raise ValueError(f"project dims={dims} must be in 1..{D} (the latent's dimensions)")
    mean_scale = torch.zeros(Q, E, dtype=weight.dtype, device=weight.device)
    logvar_keep = torch.zeros(Q, E, dtype=weight.dtype, device=weight.device)
    for j in range(dims):
        mean_scale[j // half, j % half] = scale
        logvar_keep[j // half, half + j % half] = 1.0
    factor = mean_scale + logvar_keep                                      # (Q, E)
    return weight * factor[:, None, :], bias * factor


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
        # r = sigmoid(log q_w - log q_l): `_sample_log_prob`'s exact ops for both posteriors in one pass (same
        # bits, half the kernel launches)
        mus, lvs = torch.stack([w_mu, l_mu], 1), torch.stack([w_lv, l_lv], 1)                      # (n, 2, D)
        quad = (z.unsqueeze(1) - mus.unsqueeze(2)).square_().mul_(torch.exp(-lvs).unsqueeze(2)).sum(-1)
        log_q = -0.5 * (quad + lvs.sum(-1, keepdim=True) + D * LOG_2PI)                           # (n, 2, K)
        r = torch.sigmoid(log_q[:, 0] - log_q[:, 1])                                             # (n, K)
        c, keep = evidence_mask(r, evidence_ratio)                                              # (n, M0)
        # compact the kept entries of each row to its front, in row order: a kept entry's place is the running
        # count of kept entries before it; the others are scattered into a spare last column and cut off
        iu, ju = torch.triu_indices(K, K, offset=1, device=z.device)
        counts = keep.sum(-1)
        m = int(counts.max()) if n else 0
        slot = torch.cumsum(keep, -1).sub_(1).masked_fill_(~keep, m)                             # (n, M0)
        # i wins when C_ij > 0, else j wins: one scatter of code = win * K + lose (arithmetic select: torch.where
        # on int64 is 2x slower on CPU)
        code_i, code_j = iu * K + ju, ju * K + iu
        code = code_j + (code_i - code_j) * (c > 0)
        code = torch.zeros(n, m + 1, dtype=torch.long, device=z.device).scatter_(1, slot, code)[:, :m]
        win, lose = code.div(K, rounding_mode="floor"), code.remainder(K)
        compact = (torch.arange(m, device=z.device) < counts.unsqueeze(-1)).float()   # padding: sample 0, weight 0
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
    prec = torch.exp(-bounded_logvar(logvar.float()))
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
# Head-only fast path: the same loss with a hand-written gradient (no autograd graph)
# ---------------------------------------------------------------------------------------------------------------


class _Draw(NamedTuple):
    """One noise draw of a chunk with every parameter-free term folded in (constant while the draw is reused)."""

    phi: Tensor     # (n, K, 2D) [z^2, z], as PairSamples
    phi_t: Tensor   # (n, 2D, K) the same, transposed: both batched matvecs then read memory contiguously (-30%)
    index: Tensor   # (n, 2M) [lose | win] sample indices (one gather instead of two)
    win: Tensor     # (n, M) as PairSamples
    lose: Tensor    # (n, M)
    keepw: Tensor   # (n, M) keep * pair weight / the user's weighted kept total: the per-user normaliser of
    #                 `reduce_per_user` depends only on the mask, so it is a constant of the draw


def _fold_draw(samples: PairSamples, local_user: Tensor, n_users: int, weight: Tensor | None) -> _Draw:
    w = samples.keep.new_ones(samples.keep.shape[0]) if weight is None else weight
    u_kept = samples.keep.new_zeros(n_users).index_add_(0, local_user, samples.keep.sum(-1) * w).clamp_min(1e-12)
    return _Draw(samples.phi, samples.phi.transpose(1, 2).contiguous(), torch.cat([samples.lose, samples.win], 1),
                 samples.win, samples.lose, samples.keep * (w / u_kept.index_select(0, local_user)).unsqueeze(-1))


_link_scale = link_scale   # the factor folded into theta (objectives.link_scale)


def _policy_theta(mu: Tensor, logvar: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """scale * theta (n, 2D) with R(z) = [z^2, z] . theta + const (see `pair_loss_terms`), prec = e^-lv of the
    bounded log-variance, and where logvar lies inside the bound (where it gets a gradient)."""
    prec = torch.exp(-bounded_logvar(logvar))
    inside = logvar.abs() <= POLICY_LOGVAR_BOUND
    return torch.cat([(0.5 * scale) * (1.0 - prec), (scale * mu) * prec], dim=-1), prec, inside


def _policy_theta_backward(g_theta: Tensor, theta: Tensor, prec: Tensor, inside: Tensor,
                           scale: float) -> tuple[Tensor, Tensor]:
    """(d/d mu, d/d logvar) (n, D) from d/d(scale * theta): d theta_A/d lv = prec / 2, d theta_B/d mu = prec,
    d theta_B/d lv = -theta_B; zero along logvar outside the bound (as autograd through the clamp)."""
    D = prec.shape[-1]
    g_a, g_b = g_theta[:, :D], g_theta[:, D:]
    g_mu = (scale * g_b) * prec
    g_lv = ((0.5 * scale) * g_a * prec - g_b * theta[:, D:]) * inside
    return g_mu, g_lv


def _kept_pair_loss_grad(theta: Tensor, draw: _Draw, *, beta: float, loss_type: LossType,
                         gamma: float) -> tuple[Tensor, Tensor]:
    """Weighted per-pair latent-DPO loss sums and their gradient, by hand (spec §3.6; same value as
    `pair_loss_terms` + `reduce_per_user`, per pair).

    Args:
        theta: (n, 2D) `_policy_theta` (scaled by `_link_scale`), so R = phi . theta is the link's input scale.
        draw: `_fold_draw` of the same n pairs.
    Returns:
        (loss (n,): sum_m keepw * loss_m, g_theta (n, 2D): d sum(loss) / d theta).
    """
    # R (n, K): row-vector bmms against a transposed view are the fastest CPU form (a (K, 2D) x (2D, 1) matvec
    # bmm is 4x slower, broadcast-multiply + sum 1.5x)
    R = torch.bmm(theta.unsqueeze(1), draw.phi.transpose(1, 2)).squeeze(1)
    M = draw.win.shape[1]
    r_lw = R.gather(1, draw.index)                                                             # (n, 2M)
    # s = scale * (R_win - R_lose); the link's value and derivative come from objectives (one definition)
    losses, g = preference_loss_grad(r_lw[:, M:] - r_lw[:, :M], loss_type=loss_type, beta=beta, gamma=gamma)
    loss = torch.linalg.vecdot(losses, draw.keepw)
    g = g.mul_(draw.keepw)                      # dL/dR_win = +g, dL/dR_lose = -g
    g_R = torch.zeros_like(R).scatter_add_(1, draw.win, g)
    g_R.sub_(torch.zeros_like(R).scatter_add_(1, draw.lose, g))
    return loss, torch.bmm(g_R.unsqueeze(1), draw.phi_t.transpose(1, 2)).squeeze(1)


def _kept_pair_metrics(theta: Tensor, draw: _Draw, *, beta: float, loss_type: LossType,
                       gamma: float) -> tuple[Tensor, Tensor]:
    """Weighted per-pair loss and share of kept sample pairs ranked correctly (margin > 0), as
    `objectives.latent_dpo_pair_terms`' loss_sum / n_correct reduced by `reduce_per_user`. (n,) each."""
    R = torch.bmm(theta.unsqueeze(1), draw.phi.transpose(1, 2)).squeeze(1)
    margin = R.gather(1, draw.win) - R.gather(1, draw.lose)    # scale > 0: the sign of the raw margin
    losses, _ = preference_loss_grad(margin, loss_type=loss_type, beta=beta, gamma=gamma)
    return torch.linalg.vecdot(losses, draw.keepw), torch.linalg.vecdot((margin > 0).float(), draw.keepw)


def _head_latent(W: Tensor, Bb: Tensor, feats_q: Tensor, flat: Tensor | None) -> tuple[Tensor, Tensor]:
    """`user_latent` of a chunk's heads (Uc, Q, d, E) / (Uc, Q, E) on its features laid out per (user, query),
    feats_q (Uc*Q, Pm, d): one bmm. Returns (mu, logvar) (n, D) of the valid pairs (rows `flat` of the padded
    (Uc*Pm) layout; None = no padding)."""
    uc, Q, d, E = W.shape
    pm = feats_q.shape[1]
    out = torch.baddbmm(Bb.view(uc * Q, 1, E), feats_q, W.view(uc * Q, d, E))               # (Uc*Q, Pm, E)
    out = out.view(uc, Q, pm, E).transpose(1, 2)                                            # (Uc, Pm, Q, E)
    mu, logvar = out[..., :E // 2].reshape(uc * pm, -1), out[..., E // 2:].reshape(uc * pm, -1)
    if flat is not None:
        mu, logvar = mu.index_select(0, flat), logvar.index_select(0, flat)
    return mu, logvar


def _head_loss_grad(W: Tensor, Bb: Tensor, feats_q: Tensor, rows: Tensor | None, draw: _Draw, *, scale: float,
                    beta: float, loss_type: LossType, gamma: float,
                    out: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One head-only step's loss and gradient, by hand: the value and gradient of `pair_loss_terms` +
    `reduce_per_user` summed over users, w.r.t. the chunk's heads (tests/unit/test_fit_user.py checks both
    against autograd). Writes d/dW, d/dBb into `out` (else W.grad / Bb.grad, allocated). Returns loss (n,)."""
    uc, Q, d, E = W.shape
    pm = feats_q.shape[1]
    mu, logvar = _head_latent(W, Bb, feats_q, rows)                                         # (n, D)
    theta, prec, inside = _policy_theta(mu, logvar, scale)
    loss, g_theta = _kept_pair_loss_grad(theta, draw, beta=beta, loss_type=loss_type, gamma=gamma)
    # backward: theta -> (mu, logvar) -> head, undoing the forward's layout changes
    g_mu, g_lv = _policy_theta_backward(g_theta, theta, prec, inside, scale)
    if rows is not None:                  # padding rows get zero gradient
        g_mu = g_mu.new_zeros(uc * pm, g_mu.shape[1]).index_copy_(0, rows, g_mu)
        g_lv = g_lv.new_zeros(uc * pm, g_lv.shape[1]).index_copy_(0, rows, g_lv)
    g_out = torch.cat([g_mu.view(uc, pm, Q, E // 2), g_lv.view(uc, pm, Q, E // 2)], dim=-1)  # (Uc, Pm, Q, E)
    g_out = g_out.transpose(1, 2).reshape(uc * Q, pm, E)
    g_w, g_b = out if out is not None else (torch.empty_like(W), torch.empty_like(Bb))
    torch.bmm(feats_q.transpose(1, 2), g_out, out=g_w.view(uc * Q, d, E))
    torch.sum(g_out, dim=1, out=g_b.view(uc * Q, E))
    if out is None:
        W.grad, Bb.grad = g_w, g_b
    return loss


# ---------------------------------------------------------------------------------------------------------------
# fit_users
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    start: int             # slice of the (count-sorted) active-user stack
    stop: int
    feats: Tensor          # (Uc, Pm, Q, d) padded features
    local_user: Tensor     # (n,) user within chunk of each valid pair, (user, rank) order
    rank: Tensor           # (n,)
    post: tuple[Tensor, Tensor, Tensor, Tensor]  # chosen_mu, chosen_logvar, rejected_mu, rejected_logvar (n, D)
    weight: Tensor | None  # (n,)


class _Adam:
    """Adam (torch.optim.Adam's update, L2 weight decay, no amsgrad) on one flat fp32 parameter buffer.

    One fused kernel per step where torch has it (CPU, CUDA), else the same update in plain ops. Not
    torch.optim.Adam: its first construction in a process imports torch._dynamo (~1.2 s CPU, ~2 s wall: a
    Ray worker's whole first chunk of head-only users), and its per-step Python costs ~3x the kernel."""

    def __init__(self, params: Tensor, grad: Tensor, *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.p, self.g, self.lr, self.wd, self.betas, self.eps = params, grad, lr, weight_decay, betas, eps
        self.m, self.v = torch.zeros_like(params), torch.zeros_like(params)
        self.t = torch.zeros((), dtype=torch.float32, device=params.device)
        self.fused = params.device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adam_")

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        if self.fused:
            torch._fused_adam_([self.p], [self.g], [self.m], [self.v], [], [self.t], lr=self.lr, beta1=b1, beta2=b2,
                               weight_decay=self.wd, eps=self.eps, amsgrad=False, maximize=False)
            return
        t = float(self.t)
        g = self.g + self.wd * self.p if self.wd else self.g
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** t)).add_(self.eps)
        self.p.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** t))


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
        check_pair_weight(pair_weight, N)

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
        padded = feats.new_zeros(b - a, pm, Q, d)
        padded[local_user, r] = feats[sl]
        chunk = _Chunk(a, b, padded, local_user, r, tuple(t[sl] for t in post_sorted),
                       None if weight_sorted is None else weight_sorted[sl])
        users = active[a:b]
        uc = b - a
        flat = local_user * pm + r             # row of each valid pair in the flattened (Uc * Pm) layout
        rows = None if n_chunk == uc * pm else flat    # None: no padding, no gathers / scatters of head rows
        # head as one bmm per (user, query): features (Uc*Q, Pm, d) @ weight (Uc*Q, d, E)
        feats_q = padded.transpose(1, 2).reshape(uc * Q, pm, d)
        # the chunk's heads (Uc, Q, d, E) + (Uc, Q, E) as views of one flat buffer, and their gradients likewise
        n_w = uc * Q * d * E
        flat_p, flat_g = feats.new_empty(n_w + uc * Q * E), feats.new_zeros(n_w + uc * Q * E)
        W, Bb = flat_p[:n_w].view(uc, Q, d, E), flat_p[n_w:].view(uc, Q, E)
        W.copy_(w0[users]), Bb.copy_(b0[users])
        grads = flat_g[:n_w].view(uc, Q, d, E), flat_g[n_w:].view(uc, Q, E)
        # Adam is elementwise and each user's loss touches only its own head: one Adam per chunk is the same
        # as one over everyone
        opt = _Adam(flat_p, flat_g, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scale = _link_scale(cfg.loss_type, cfg.beta)
        pool: dict[int, _Draw] = {}
        for step in range(cfg.steps):
            k = step % n_draws
            draw = pool.get(k)
            if draw is None:
                noise = step_noise(cfg.seed, k, pm, cfg.n_samples, D, device).index_select(0, r)
                draw = _fold_draw(draw_pair_samples(*chunk.post, noise, evidence_ratio=cfg.evidence_ratio),
                                  local_user, uc, chunk.weight)
                if n_draws < cfg.steps:
                    pool[k] = draw
            loss = _head_loss_grad(W, Bb, feats_q, rows, draw, scale=scale, beta=cfg.beta,
                                   loss_type=cfg.loss_type, gamma=cfg.gamma, out=grads)
            opt.step()
            curve[step] += loss.sum()       # = the sum over the chunk's users of their latent-DPO losses
        del pool
        # final metrics on a fresh draw (index cfg.steps: never one of the training draws)
        noise = step_noise(cfg.seed, cfg.steps, pm, cfg.n_samples, D, device).index_select(0, r)
        draw = _fold_draw(draw_pair_samples(*chunk.post, noise, evidence_ratio=cfg.evidence_ratio), local_user,
                          uc, chunk.weight)
        theta, _, _ = _policy_theta(*_head_latent(W, Bb, feats_q, rows), scale)
        loss, correct = _kept_pair_metrics(theta, draw, beta=cfg.beta, loss_type=cfg.loss_type, gamma=cfg.gamma)
        final_loss[users] = loss.new_zeros(uc).index_add_(0, local_user, loss)
        final_acc[users] = loss.new_zeros(uc).index_add_(0, local_user, correct)
        weight[users], bias[users] = W, Bb
        pair_start += n_chunk
        a = b

    loss_curve = (curve / max(active.numel(), 1)).tolist() if active.numel() else []
    seconds = time.perf_counter() - t0
    logger.info("fit_users: %d users (%d with pairs), %d pairs, %d steps in %.2fs", n_users, active.numel(), N,
                cfg.steps, seconds)
    return FitResult(weight, bias, loss_curve, final_loss, final_acc, counts, seconds, cfg)
