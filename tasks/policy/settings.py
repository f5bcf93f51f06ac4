"""The settings of a per-user latent fit, as they cross the Ray boundary: one typed payload, built once from the
config (`PersonalizeConfig.fit_settings()`) by the personalize stage (ChunkJob.fit) and the evaluate stage
(EvalSettings.latent_fit, for its like-for-like timing refit), so both fit with the same settings.

Importable without torch (pipelines/config.py builds it). The fields are part of every fit's version
(`store.fit_version`), so `as_dict()` must stay the dict the stage has always recorded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

LossType = Literal["dpo", "ipo", "simpo"]


@dataclass(frozen=True)
class FitSettings:
    steps: int = 200
    lr: float = 1e-2
    beta: float = 0.1
    n_samples: int = 16
    evidence_ratio: float = 0.5          # Gaussian latents (latent-dpo.md §3.6)
    loss_type: LossType = "dpo"
    seed: int = 0
    noise_draws: int | None = 4          # None = fresh latent samples every step (the reference estimator)
    code_evidence_ratio: float = 1.0     # discrete code fits: lpc.md §6.3 keeps every positive gap
    # head-only Gaussian fits, after the fit (personalize.preference_only): keep the first `project_dims` latent
    # coordinates (the CLaP's preference space) with their means times `project_scale`, the rest at the prior's
    # N(0, 1) (`fit_user.project_heads`). 0 = off; left out of `as_dict` when off, so older fits keep their versions
    project_dims: int = 0
    project_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.project_dims < 0 or not self.project_scale > 0:
            raise ValueError(f"project_dims={self.project_dims} must be >= 0 and project_scale={self.project_scale} > 0")

    @classmethod
    def of(cls, fit: "FitSettings | Mapping[str, Any]", *, fresh_noise: bool = False) -> "FitSettings":
        """A payload from itself or a (partial) mapping of its fields; `fresh_noise`: an unset noise_draws means
        fresh samples (the faithful mode's reference estimator) instead of the default."""
        if isinstance(fit, FitSettings):
            return fit
        unknown = set(fit) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown fit settings {sorted(unknown)}; expected fields of FitSettings")
        if fresh_noise and "noise_draws" not in fit:
            fit = {**fit, "noise_draws": None}
        return cls(**fit)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.project_dims:
            del out["project_dims"], out["project_scale"]
        return out

    def gaussian(self) -> dict[str, Any]:
        """Keyword arguments of `fit_user.FitConfig` (head-only and the encoder modes)."""
        return {k: v for k, v in self.as_dict().items()
                if k not in ("code_evidence_ratio", "project_dims", "project_scale")}

    def codes(self) -> dict[str, Any]:
        """Keyword arguments of `fit_codes.CodeFitConfig` besides the estimator (discrete CLaPs): the code fits
        have their own evidence ratio (lpc.md §6.3 keeps every positive gap; latent-dpo.md's 0.5 does not carry
        over)."""
        return {"steps": self.steps, "lr": self.lr, "beta": self.beta, "loss_type": self.loss_type,
                "evidence_ratio": self.code_evidence_ratio}
