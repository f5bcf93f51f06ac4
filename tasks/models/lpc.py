"""Discrete latent codes (LPC) math: Gumbel-softmax, schedules, categorical KLs, code usage, pair posterior.

Spec: shared/spec/lpc.md (Latent Preference Coding, Gong et al., ICML 2025, https://arxiv.org/abs/2505.04993),
§6.3 for how a K-code latent sits next to CLaP's Gaussian one. A latent is a distribution over K learned codes
e_k (rows of a codebook E (K, latent_dim)); the vector fed to the shared latent adapter is the weighted code
sum z = w @ E, with w a Gumbel-softmax sample in training and the expected weights softmax(logits) at serving.

Every function upcasts to at least float32 (like `latent.py`, spec latent-dpo.md §9.5); float64 stays float64
(for `gradcheck`). Plain torch: no ray / prefect / mlflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentpref.tasks.models.latent import to_latent_dtype

__all__ = [
    "PairPosterior",
    "aggregated_kl_to_uniform",
    "categorical_kl",
    "code_usage_perplexity",
    "gumbel_softmax",
    "mean_pair_posterior",
    "mixing_weight",
    "temperature",
]


def gumbel_softmax(logits: Tensor, tau: float, *, hard: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """A relaxed categorical sample w = softmax((logits + g) / tau), g ~ Gumbel(0, 1) (lpc.md §2.3).

    Jang et al. 2017, https://arxiv.org/abs/1611.01144 ; Maddison et al. 2017, https://arxiv.org/abs/1611.00712.
    `hard=True` is the straight-through estimator: the value is the one-hot argmax of the relaxed sample, the
    gradient is that of the soft sample (one_hot - w.detach() + w).

    Args:
        logits: (..., K) unnormalised log-probabilities, any float dtype.
        tau: temperature > 0; small tau -> near one-hot samples (and high-variance gradients).
        hard: straight-through one-hot samples.
        generator: for the Gumbel noise.
    Returns:
        (..., K) float32 (float64 for float64 logits) weights on the simplex.
    Raises:
        ValueError: tau <= 0.
    """
    if not tau > 0:
        raise ValueError(f"tau={tau!r}; the Gumbel-softmax temperature must be > 0")
    logits = to_latent_dtype(logits)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    # clamp both ends: u = 0 gives -log(0) = inf, u -> 1 gives log(-log 1) = -inf
    tiny = torch.finfo(logits.dtype).tiny
    g = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))
    w = torch.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return w
    one_hot = F.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
    return one_hot - w.detach() + w


def temperature(step: int, total: int, tau_start: float = 1.0, tau_end: float = 0.1) -> float:
    """Exponentially annealed Gumbel-softmax temperature: tau_start at step 0, tau_end at step total - 1 (and
    after). lpc.md §2.3 leaves tau and its schedule unstated; exponential decay is the usual choice (Jang et al.)
    because the sample sharpness depends on log tau.

    Raises:
        ValueError: non-positive temperatures or total < 1.
    """
    if not (tau_start > 0 and tau_end > 0):
        raise ValueError(f"tau_start={tau_start!r}, tau_end={tau_end!r}; both must be > 0")
    if total < 1:
        raise ValueError(f"total={total!r} steps; need >= 1")
    frac = min(max(step, 0) / max(total - 1, 1), 1.0)
    return float(tau_start * (tau_end / tau_start) ** frac)


def mixing_weight(step: int, total: int) -> float:
    """Prior/posterior mixing weight g, linear from 0 at step 0 to 1 at step total - 1 (lpc.md §3.3).

    The training latent is z = g * z_prior + (1 - g) * z_post: early on the policy learns from the posterior
    (which sees the response), at the end only from the prior, the one that exists at serving time.

    Raises:
        ValueError: total < 1.
    """
    if total < 1:
        raise ValueError(f"total={total!r} steps; need >= 1")
    return float(min(max(step, 0) / max(total - 1, 1), 1.0))


def categorical_kl(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """Exact KL(q || p) = sum_k q_k (log q_k - log p_k) between categoricals given by logits (lpc.md §3.2).

    Args:
        q_logits, p_logits: broadcastable (..., K).
    Returns:
        (...,) float32 (float64 for float64 inputs); >= 0 up to rounding.
    """
    log_q = F.log_softmax(to_latent_dtype(q_logits), dim=-1)
    log_p = F.log_softmax(to_latent_dtype(p_logits), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _usage(probs: Tensor) -> Tensor:
    """Mean code usage (K,) of probabilities (..., K) (rows are normalised first, so counts work too)."""
    p = to_latent_dtype(probs)
    if p.ndim == 0 or p.shape[-1] < 1:
        raise ValueError(f"probs must be (..., K) with K >= 1; got {tuple(probs.shape)}")
    p = p.reshape(-1, p.shape[-1])
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return p.mean(0)


def aggregated_kl_to_uniform(probs: Tensor) -> Tensor:
    """KL( mean_b q(.|x_b, y_b) || Uniform_K ) of the batch's aggregated code posterior (lpc.md §6.3).

    The categorical counterpart of DG-KLD (latent-dpo.md §3.2): it is zero when the codes are used equally
    often across the batch, whatever each individual posterior looks like, so it fights code collapse without
    flattening the per-response posteriors. Exact (no Monte Carlo).

    Args:
        probs: (..., K) probabilities; all leading dims form the batch.
    Returns:
        Scalar float32 (float64 for float64 input) in [0, log K].
    """
    mean = _usage(probs)
    K = mean.shape[-1]
    return torch.xlogy(mean, mean).sum() + math.log(K)


def code_usage_perplexity(probs: Tensor) -> Tensor:
    """exp(entropy) of the mean code usage: the effective number of codes in use (K uniform, 1 collapsed).

    Args:
        probs: (..., K) probabilities, or (K,) counts / one usage vector.
    Returns:
        Scalar float32 (float64 for float64 input) in [1, K].
    """
    mean = _usage(probs)
    return torch.exp(-torch.xlogy(mean, mean).sum())


def mean_pair_posterior(pair_probs: Tensor, alpha: float = 1.0, *, user_index: Tensor | None = None,
                        n_users: int | None = None, weight: Tensor | None = None) -> Tensor:
    """Zero-training user profile: the Dirichlet(alpha)-smoothed mean pair posterior (lpc.md §6.3, option 1).

    pi_u = (alpha * 1 + sum_n w_n q(.|x_n, y_w,n > y_l,n)) / (K alpha + sum_n w_n). With no pairs it is uniform.

    Args:
        pair_probs: (N, K) pair posteriors q(k|x, y_w > y_l) of the user's pairs.
        alpha: Dirichlet pseudo-count per code, >= 0 (0 = plain mean; a user without pairs then gets uniform).
        user_index: optional (N,) int user 0..n_users-1 of each pair: one profile per user.
        n_users: number of users U (required with user_index).
        weight: optional (N,) non-negative pair weights (feedback `weight` column).
    Returns:
        (K,) or (U, K) float32 probabilities.
    Raises:
        ValueError: bad shapes, alpha < 0, negative weights, user_index without n_users.
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha!r}; the Dirichlet pseudo-count must be >= 0")
    q = to_latent_dtype(pair_probs)
    if q.ndim != 2:
        raise ValueError(f"pair_probs must be (N, K); got {tuple(pair_probs.shape)}")
    N, K = q.shape
    w = torch.ones(N, dtype=q.dtype, device=q.device) if weight is None else to_latent_dtype(weight).to(q.device)
    if w.shape != (N,):
        raise ValueError(f"weight shape {tuple(w.shape)}; expected ({N},)")
    if N and bool((w < 0).any()):
        raise ValueError(f"weight must be >= 0; min is {w.min().item()}")
    if user_index is None:
        return mean_pair_posterior(q, alpha, user_index=torch.zeros(N, dtype=torch.long, device=q.device),
                                   n_users=1, weight=w)[0]
    if n_users is None:
        raise ValueError("user_index given without n_users")
    if user_index.shape != (N,):
        raise ValueError(f"user_index shape {tuple(user_index.shape)}; expected ({N},)")
    num = q.new_full((n_users, K), float(alpha)).index_add(0, user_index.long(), q * w[:, None])   # (U, K)
    # row sums are K alpha + sum_n w_n (each q row sums to 1); zero only for alpha = 0 and no pairs -> uniform
    den = num.sum(-1, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, 1.0 / K))


class PairPosterior(nn.Module):
    """q(k | x, y_w > y_l): an MLP over [f(x, y_w); f(x, y_l)] -> K logits (lpc.md §2.4, §6.3).

    f is the pooled (mean over queries) CLaP encoder feature of [prompt; response]. Concatenation (not a
    difference or a sum) keeps it order-sensitive: swapping chosen and rejected is a different input, as the
    posterior must condition on the preference direction (lpc.md §2.4 [est]). The last layer starts at zero,
    so the initial pair posterior is uniform (like `LatentEncoder.standardize`).
    """

    def __init__(self, d: int, n_codes: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or d
        self.net = nn.Sequential(nn.Linear(2 * d, hidden), nn.GELU(), nn.Linear(hidden, n_codes))
        with torch.no_grad():
            self.net[2].weight.zero_()
            self.net[2].bias.zero_()

    def forward(self, chosen_features: Tensor, rejected_features: Tensor) -> Tensor:
        """Args: chosen_features, rejected_features (B, d) pooled features. Returns (B, K) logits, float32."""
        if chosen_features.shape != rejected_features.shape or chosen_features.ndim != 2:
            raise ValueError(f"chosen {tuple(chosen_features.shape)} and rejected {tuple(rejected_features.shape)} "
                             "features must both be (B, d)")
        x = torch.cat([chosen_features, rejected_features], dim=-1).float()
        first, last = self.net[0], self.net[2]
        h = F.gelu(F.linear(x, first.weight.float(), first.bias.float()))      # fp32 whatever the module dtype
        return F.linear(h, last.weight.float(), last.bias.float())
