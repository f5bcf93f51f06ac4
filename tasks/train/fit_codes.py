"""Batched per-user fitting for discrete-code CLaPs (LPC latents, spec lpc.md §6.3 "per-user fitting options").

A user is K numbers delta_u: their policy over codes is p_u(k|x) = softmax(log p_ref(k|x) + delta_u), with p_ref the
CLaP's population prior p(k|x) on the pair's prompt (cached, user-independent). delta = 0 is exactly the population
prior, which is also every cold-start user's policy. The serving latent is the expected code vector
z_u(x) = p_u(.|x) @ codebook (lpc.md §6.3 "Representation").

Two estimators (`CodeFitConfig.estimator`):
    "dpo"             categorical latent DPO by exact enumeration over the K codes (lpc.md §6.3 option 3;
                      `objectives.categorical_latent_dpo_pair_terms`): reward r(k) = q_w(k) / (q_w(k) + q_l(k))
                      from the frozen CLaP posteriors of the chosen and rejected responses, implicit reward
                      R(k) = log p_u(k|x) - log p_ref(k|x) = delta_u[k] - logsumexp term. Adam on delta.
    "mean_posterior"  zero training (option 1): pi_u = Dirichlet(alpha)-smoothed mean of the pair posteriors
                      q(k|x_n, y_w,n > y_l,n), delta_u = log pi_u (centred; softmax ignores constants), so
                      p_u(k|x) ∝ p_ref(k|x) * pi_u(k): the population prior reweighted by the user's code mixture
                      (a product of experts). A user whose pairs carry no code information (pi_u uniform) gets the
                      prior exactly.

Batching: deltas of all users are one (U, K) tensor under one Adam; each user's loss is normalised over its own
pairs only (`fit_user.reduce_per_user`) and Adam is elementwise, so fitting users together == one at a time.
Everything is exact (no sampling), so a fit is a pure function of the user's pairs and the config.

Plain torch; no ray / prefect / mlflow here (the flow wraps this in a task).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

import torch.nn.functional as F

from latentpref.tasks.models.lpc import mean_pair_posterior
from latentpref.tasks.models.policy import user_code_probs
# the mask helpers of `categorical_latent_dpo_pair_terms`, so the training loss is the same definition exactly
from latentpref.tasks.objectives import (
    LossType,
    check_pair_weight,
    _pairwise_differences,
    categorical_latent_dpo_pair_terms,
    evidence_mask,
    preference_loss,
)
from latentpref.tasks.train.fit_user import reduce_per_user

__all__ = ["CodeFitConfig", "CodeFitResult", "Estimator", "fit_code_users", "mean_posterior_delta",
           "user_code_probs"]

log = logging.getLogger(__name__)

Estimator = Literal["dpo", "mean_posterior"]


@dataclass(frozen=True)
class CodeFitConfig:
    estimator: Estimator = "dpo"
    steps: int = 100              # full-batch Adam steps ("dpo" only)
    lr: float = 1e-2              # on delta, in nats of code log-odds per step (Adam)
    beta: float = 0.1             # latent-DPO temperature (as the Gaussian fit, latent-dpo.md §3.6)
    evidence_ratio: float = 1.0   # rho of the code-pair mask; 1 = every pair with r_i > r_j (lpc.md §6.3)
    loss_type: LossType = "dpo"
    gamma: float = 0.0            # SimPO target margin
    alpha: float = 1.0            # "mean_posterior": Dirichlet pseudo-count per code
    weight_decay: float = 0.0     # Adam L2 toward delta = 0, i.e. toward the population prior

    def __post_init__(self) -> None:
        if self.estimator not in get_args(Estimator):
            raise ValueError(f"estimator={self.estimator!r}; expected one of {get_args(Estimator)}")
        if self.steps < 0:
            raise ValueError(f"steps={self.steps}; must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; must be > 0")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta}; must be > 0")
        if not 0.0 < self.evidence_ratio <= 1.0:
            raise ValueError(f"evidence_ratio={self.evidence_ratio}; must be in (0, 1]")
        if self.loss_type not in get_args(LossType):
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {get_args(LossType)}")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha}; must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}; must be >= 0")


@dataclass
class CodeFitResult:
    delta: Tensor             # (U, K) per-user code log-odds offsets (the artifact); 0 = population prior
    mixture: Tensor           # (U, K) mean over the user's pair prompts of p_u(k|x); NaN rows for users w/o pairs
    loss_curve: list[float]   # per step: mean over users with pairs of their loss ("dpo"; [] otherwise)
    final_loss: Tensor        # (U,) categorical latent-DPO loss at the fitted delta; NaN for users w/o pairs
    final_accuracy: Tensor    # (U,) share of kept code pairs ranked correctly; NaN for users w/o pairs
    n_pairs: Tensor           # (U,) int64
    seconds: float
    config: CodeFitConfig = field(default_factory=CodeFitConfig)


def mean_posterior_delta(pair_logits: Tensor, user_index: Tensor, n_users: int, *, alpha: float = 1.0,
                         pair_weight: Tensor | None = None) -> Tensor:
    """Zero-training deltas (lpc.md §6.3 option 1): delta_u = log pi_u - mean_k log pi_u, with pi_u the
    Dirichlet(alpha)-smoothed mean pair posterior. Users without pairs (and alpha > 0) get delta = 0.

    Args:
        pair_logits: (N, K) pair posterior logits q(k|x, y_w > y_l).
        user_index: (N,) int user of each pair; n_users: U.
    Returns:
        (U, K) float32.
    """
    pi = mean_pair_posterior(torch.softmax(pair_logits.float(), -1), alpha, user_index=user_index,
                             n_users=n_users, weight=pair_weight)
    log_pi = pi.clamp_min(1e-30).log()      # alpha = 0 may leave exact zeros: a very negative (finite) offset
    return log_pi - log_pi.mean(-1, keepdim=True)


def _code_pair_mask(chosen: Tensor, rejected: Tensor, evidence_ratio: float) -> tuple[Tensor, Tensor]:
    """The parameter-free half of categorical latent DPO, computed once per fit: for every strict-upper-triangle
    code pair (i < j) of each preference pair, the winner's sign (+1: i wins) and the evidence mask, exactly as
    `objectives._evidence_pair_terms` (reward r = q_w / (q_w + q_l); kept when |r_i - r_j| >= tau and > 0).
    Returns sign, keep: (N, K (K - 1) / 2) float32."""
    with torch.no_grad():
        r = torch.sigmoid(F.log_softmax(chosen, -1) - F.log_softmax(rejected, -1))
        c, keep = evidence_mask(r, evidence_ratio)
        return torch.sign(c), keep.float()


def _per_user_terms(delta: Tensor, prior: Tensor, chosen: Tensor, rejected: Tensor, user_index: Tensor,
                    n_users: int, cfg: CodeFitConfig, weight: Tensor | None, with_metrics: bool):
    terms = categorical_latent_dpo_pair_terms(prior + delta.index_select(0, user_index), chosen, rejected,
                                              ref_logits=prior, evidence_ratio=cfg.evidence_ratio, beta=cfg.beta,
                                              loss_type=cfg.loss_type, gamma=cfg.gamma, with_metrics=with_metrics)
    u_loss = reduce_per_user(terms.loss_sum, terms.n_kept, user_index, n_users, weight)
    u_acc = reduce_per_user(terms.n_correct, terms.n_kept, user_index, n_users, weight) if with_metrics else None
    return u_loss, u_acc


def fit_code_users(prior_logits: Tensor, chosen_logits: Tensor, rejected_logits: Tensor, user_index: Tensor,
                   n_users: int, cfg: CodeFitConfig = CodeFitConfig(), *, pair_logits: Tensor | None = None,
                   init: Tensor | None = None, pair_weight: Tensor | None = None) -> CodeFitResult:
    """Fit every user's code offsets delta_u from their preference pairs (module docstring).

    Args:
        prior_logits: (N, K) CLaP prior p(k|x) logits of each pair's prompt (p_ref).
        chosen_logits, rejected_logits: (N, K) frozen CLaP code posteriors q(k|x,y) of y_w and y_l.
        user_index: (N,) int user 0..n_users-1 of each pair.
        n_users: U; users without pairs keep their initial delta (zero -> the population prior).
        cfg: CodeFitConfig.
        pair_logits: (N, K) pair posterior q(k|x, y_w > y_l) logits; required by estimator "mean_posterior".
        init: optional (U, K) warm start for "dpo" (e.g. yesterday's deltas).
        pair_weight: optional (N,) non-negative weights (feedback `weight` column).
    Returns:
        CodeFitResult (float32, on prior_logits' device).
    Raises:
        ValueError: inconsistent shapes, user ids out of range, bad init, negative weights, missing pair_logits.
    """
    t0 = time.perf_counter()
    if prior_logits.ndim != 2:
        raise ValueError(f"prior_logits must be (N, K); got {tuple(prior_logits.shape)}")
    N, K = prior_logits.shape
    shapes = {"chosen_logits": tuple(chosen_logits.shape), "rejected_logits": tuple(rejected_logits.shape)}
    if pair_logits is not None:
        shapes["pair_logits"] = tuple(pair_logits.shape)
    if any(s != (N, K) for s in shapes.values()):
        raise ValueError(f"every logits tensor must be (N={N}, K={K}) like prior_logits; got {shapes}")
    if user_index.shape != (N,) or user_index.dtype.is_floating_point:
        raise ValueError(f"user_index must be an integer (N={N},) tensor; got {user_index.dtype} "
                         f"{tuple(user_index.shape)}")
    if N and (int(user_index.min()) < 0 or int(user_index.max()) >= n_users):
        raise ValueError(f"user_index values must lie in [0, n_users={n_users}); got range "
                         f"[{int(user_index.min())}, {int(user_index.max())}]")
    if pair_weight is not None:
        check_pair_weight(pair_weight, N)
    if cfg.estimator == "mean_posterior" and pair_logits is None:
        raise ValueError("estimator='mean_posterior' needs pair_logits (the CLaP pair posterior of each pair)")
    device = prior_logits.device
    if init is not None and tuple(init.shape) != (n_users, K):
        raise ValueError(f"init shape {tuple(init.shape)}; expected (n_users={n_users}, K={K})")
    user_index = user_index.to(device=device, dtype=torch.long)
    prior = prior_logits.detach().float()
    chosen, rejected = chosen_logits.detach().float(), rejected_logits.detach().float()
    weight = None if pair_weight is None else pair_weight.detach().float().to(device)
    counts = torch.bincount(user_index, minlength=n_users)
    has = counts > 0
    delta0 = torch.zeros(n_users, K, device=device) if init is None else init.detach().float().to(device).clone()

    curve: list[float] = []
    if cfg.estimator == "mean_posterior":
        delta = torch.where(has[:, None], mean_posterior_delta(pair_logits.detach().to(device), user_index, n_users,
                                                               alpha=cfg.alpha, pair_weight=weight), delta0)
    elif N == 0 or cfg.steps == 0 or K < 2:
        delta = delta0
    else:
        d = delta0.clone().requires_grad_(True)
        # Adam is elementwise and each user's loss touches only its own row: one Adam == one per user
        opt = torch.optim.Adam([d], lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_active = max(int(has.sum()), 1)
        # rewards and masks do not depend on delta: once per fit (the quantile is the costly part), then each step
        # is R(k) = log p_u(k|x) - log p_ref(k|x), its pairwise margins and the link
        sign, keep = _code_pair_mask(chosen, rejected, cfg.evidence_ratio)
        log_ref = F.log_softmax(prior, -1)
        n_kept = keep.sum(-1)
        zero = torch.zeros((), device=device)
        for _ in range(cfg.steps):
            R = F.log_softmax(prior + d.index_select(0, user_index), -1) - log_ref                 # (N, K)
            losses = preference_loss(sign * _pairwise_differences(R), zero, loss_type=cfg.loss_type, beta=cfg.beta,
                                     gamma=cfg.gamma)
            u_loss = reduce_per_user((losses * keep).sum(-1), n_kept, user_index, n_users, weight)
            opt.zero_grad(set_to_none=False)
            u_loss.sum().backward()
            opt.step()
            curve.append(float(u_loss.detach().sum()) / n_active)
        delta = d.detach()

    nan = torch.full((n_users,), math.nan, device=device)
    final_loss, final_acc = nan.clone(), nan.clone()
    mixture = torch.full((n_users, K), math.nan, device=device)
    if N:
        with torch.no_grad():
            u_loss, u_acc = _per_user_terms(delta, prior, chosen, rejected, user_index, n_users, cfg, weight, True)
            final_loss = torch.where(has, u_loss, nan)
            final_acc = torch.where(has, u_acc, nan)
            probs = user_code_probs(delta.index_select(0, user_index), prior)                     # (N, K)
            sums = torch.zeros(n_users, K, device=device).index_add(0, user_index, probs)
            mixture = torch.where(has[:, None], sums / counts.clamp_min(1)[:, None].float(), mixture)
    seconds = time.perf_counter() - t0
    log.info("fit_code_users: %d users (%d with pairs), %d pairs, K=%d, estimator %s in %.2fs", n_users,
             int(has.sum()), N, K, cfg.estimator, seconds)
    return CodeFitResult(delta, mixture, curve, final_loss, final_acc, counts, seconds, cfg)
