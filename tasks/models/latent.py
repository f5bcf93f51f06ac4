"""Diagonal-Gaussian latent math: log-densities, reparameterised samples, KL to N(0, I).

Every function upcasts its inputs to at least float32 before doing any arithmetic, so fp16/bf16 model outputs
never overflow here (spec latent-dpo.md §9.5: under DeepSpeed fp16, `(z - mu)^2 / (2 sigma^2)` of a sample
scored under a *different* posterior exceeds 65504). float64 inputs stay float64 (for `gradcheck`).

The log-density is exact: the reference `log_pdf` adds 1e-4 to `2 sigma^2`, which biases small-variance
densities (spec §3 notation, §9.5); we do not copy it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOG_2PI",
    "gaussian_log_prob",
    "gaussian_log_prob_dims",
    "POLICY_LOGVAR_BOUND",
    "bounded_logvar",
    "kl_to_standard",
    "sample",
    "standard_normal_log_prob",
    "standard_normal_log_prob_dims",
    "to_latent_dtype",
    "within_prior",
]

LOG_2PI = math.log(2.0 * math.pi)
# A fitted user policy's log-variance lives in [-10, 10] (sigma 0.0067..148). Latent DPO rewards a policy variance
# that shrinks around the winners' side (the margin grows like e^-logvar), and nothing else holds it: on SmolLM2
# (standardised encoder features, a 2,304-input head at lr 1e-2) one pair drove logvar to +-80 in 30 steps and
# e^-logvar overflowed to NaN weights at step ~40. Outside the bound the fit gets no gradient along logvar.
POLICY_LOGVAR_BOUND = 10.0


def bounded_logvar(logvar: Tensor) -> Tensor:
    """A policy's effective log-variance: `logvar` clamped to +-POLICY_LOGVAR_BOUND (zero gradient outside)."""
    return logvar.clamp(-POLICY_LOGVAR_BOUND, POLICY_LOGVAR_BOUND)


def to_latent_dtype(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 (and integer) tensors to float32; float32/float64 pass through unchanged."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def gaussian_log_prob_dims(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-dimension log N(z; mu, exp(logvar)), broadcasting z, mu and logvar.

    Args:
        z, mu, logvar: broadcastable tensors (..., D), any float dtype.
    Returns:
        (..., D) log-densities, float32 (float64 if any input is float64).
    """
    z, mu, logvar = to_latent_dtype(z), to_latent_dtype(mu), to_latent_dtype(logvar)
    # exp(-logvar) instead of / exp(logvar): one exp, and no 1e-4 fudge (spec §9.5)
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar))


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Joint log-density of a diagonal Gaussian, summed over the last (latent) dimension.

    Args:
        z, mu, logvar: broadcastable tensors (..., D).
    Returns:
        (...,) float32 (float64 for float64 inputs).
    """
    return gaussian_log_prob_dims(z, mu, logvar).sum(-1)


def standard_normal_log_prob_dims(z: Tensor) -> Tensor:
    """Per-dimension log N(z; 0, 1), (..., D) -> (..., D) in float32 (or float64)."""
    z = to_latent_dtype(z)
    return -0.5 * (LOG_2PI + z.square())


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension, (..., D) -> (...,); the Latent-DPO reference (spec §3.6)."""
    return standard_normal_log_prob_dims(z).sum(-1)


def kl_to_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic KL( N(mu, exp(logvar)) || N(0, I) ) summed over the last dim: (..., D) -> (...,).

    This is the plain ELBO prior term, used by the `without_dg_kld` ablation (spec §3.1).
    """
    mu, logvar = to_latent_dtype(mu), to_latent_dtype(logvar)
    return 0.5 * (mu.square() + torch.exp(logvar) - logvar - 1.0).sum(-1)


def sample(mu: Tensor, logvar: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw `n` reparameterised samples z = mu + exp(logvar / 2) * eps, eps ~ N(0, I).

    Gradients flow to mu and logvar (callers `.detach()` when the spec says "no gradient through samples").

    Args:
        mu, logvar: broadcastable (..., D).
        n: number of samples per distribution, >= 1.
        generator: optional torch.Generator on mu's device, for reproducible draws.
    Returns:
        (n, ..., D) float32 (float64 for float64 inputs).
    Raises:
        ValueError: if n < 1.
    """
    if n < 1:
        raise ValueError(f"n={n} samples; need n >= 1")
    mu, logvar = to_latent_dtype(mu), to_latent_dtype(logvar)
    shape = torch.broadcast_shapes(mu.shape, logvar.shape)
    dtype = torch.promote_types(mu.dtype, logvar.dtype)
    eps = torch.randn((n, *shape), generator=generator, device=mu.device, dtype=dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def within_prior(z: Tensor, radius: float | None = None) -> Tensor:
    """Serving latent of a fitted Gaussian policy: z scaled back onto the ball ||z|| <= radius (default sqrt(D), the
    typical norm of an N(0, I) draw, which DG-KLD keeps the aggregate posterior near), direction kept.

    Why: latent DPO's loss keeps falling as mu_theta(x) moves along the winners-minus-losers direction (the log-ratio
    of two Gaussians is linear in the policy mean), so fits end far outside what the adapter was trained on
    (SmolLM2 default night: ||mu|| 67-73 for D = 32) and the LM writes worse text there (perplexity 56 vs 40).
    Args: z (..., D). Returns the same shape, float32.
    """
    z = to_latent_dtype(z)
    r = math.sqrt(z.shape[-1]) if radius is None else float(radius)
    if not r > 0:
        raise ValueError(f"radius={radius} must be > 0")
    norm = z.norm(dim=-1, keepdim=True)
    return z * torch.clamp(r / norm.clamp(min=1e-12), max=1.0)
