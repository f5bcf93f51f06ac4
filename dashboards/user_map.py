"""2-D map of users: each user's mean latent over a fixed prompt set, projected on its first two principal axes.

A user's serving latent for prompt x is μ_θ(x) (spec latent-dpo.md §9.12); averaging it over the same prompts for
every user gives one point per user that depends only on their head, so distances between points compare users.
Plain torch + numpy (no MLflow, no store): pipelines/report.py gathers the heads and prompt features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class UserMap:
    user_ids: list[str]
    cohorts: list[str]
    cold_start: list[bool]
    evaluated: list[bool]
    coords: np.ndarray            # (U, 2) principal-component scores
    explained: tuple[float, float]  # share of variance on PC1, PC2 (NaN when every user sits on one point)
    n_prompts: int
    latents: np.ndarray | None = None          # (U, D) the mean latents themselves (drift between nights)
    versions: list[str] | None = None          # each user's artifact version on the map
    warm_start: list[bool | None] | None = None  # whether that version's fit started from the previous one


@torch.no_grad()
def mean_user_latents(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of each user's μ_θ(x).

    Args:
        weight: (U, Q, d, 2D/Q) stacked user heads; bias: (U, Q, 2D/Q).
        features: (N, Q, d) query features of the fixed prompts (shared by all users).
    Returns:
        (U, D) float32.
    """
    from latentpref.tasks.models.policy import predict_latent
    if weight.shape[0] == 0:
        return torch.zeros(0, features.shape[1] * weight.shape[-1] // 2)
    mu = predict_latent(weight.float(), bias.float(), features.float())   # (U, N, D): features broadcast
    return mu.mean(dim=1)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Scores of the rows of x (U, D) on the first two principal axes (zeros if fewer exist).

    Returns:
        coords (U, 2) and the share of the total variance each axis carries.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((x.shape[0], 2))
    if x.shape[0] < 2:
        return out, (float("nan"), float("nan"))
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    total = float((s ** 2).sum())
    if total <= 0.0:
        return out, (float("nan"), float("nan"))
    k = min(2, vt.shape[0])
    out[:, :k] = centred @ vt[:k].T
    share = [float(s[i] ** 2 / total) if i < k else 0.0 for i in range(2)]
    return out, (share[0], share[1])
