"""The forward of a user's policy p_theta(z|x), one function per stored form (plain torch, fp32 latent math).

    head       a Gaussian head on the CLaP encoder's query features (head-only fits and cold starts;
               spec latent-dpo.md §8): `user_latent` / `predict_latent`
    encoder    the CLaP's latent encoder with the user's trained tensors swapped in (trunk-frozen / faithful):
               `policy_latent`
    codes      K code offsets delta on the CLaP's prior p(k|x) (discrete CLaPs, spec lpc.md §6.3): `user_code_probs`

Which form a stored policy has, and so which function serves it, is decided in one place:
`tasks/policy/store.py` (`latents`). The fitting code (tasks/train/fit_*.py) re-exports these names.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["policy_latent", "predict_latent", "user_code_probs", "user_latent"]


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


def policy_latent(encoder: nn.Module, state: dict[str, Tensor], input_ids: Tensor,
                  attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Serve a stored faithful / trunk-frozen policy: the CLaP encoder with the user's trained tensors swapped
    in (functional, no copy of the encoder). Returns (mu, logvar) (B, latent_dim) float32."""
    from torch.func import functional_call
    params = {k: v.to(dtype=next(encoder.parameters()).dtype) for k, v in state.items()}
    with torch.no_grad():
        return functional_call(encoder, params, (input_ids, attention_mask), strict=False)


def user_code_probs(delta: Tensor, prior_logits: Tensor) -> Tensor:
    """p_u(k|x) = softmax(log p_ref(k|x) + delta_u) in fp32 (lpc.md §6.3; delta = 0 is the population prior).

    Args:
        delta: (K,) one user, or (B, K) one row per prompt.
        prior_logits: (B, K) population prior logits of the prompts.
    Returns:
        (B, K) float32 probabilities.
    """
    return torch.softmax(torch.log_softmax(prior_logits.float(), -1) + delta.float(), dim=-1)
