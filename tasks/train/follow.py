"""CLaP stage 3, "follow" (issue 28, lever 2): teach the LM to follow a user's latent.

Stages 1-2 teach the adapter to write text at a *posterior* position (NLL); nothing in them asks that the latent a
user's latent DPO fit lands on makes the LM *rank* that user's responses: on the default night the text moved to the
user (own vs swapped 0.69-0.79) while the LM-run held-out accuracy stayed at chance. Stage 3 trains exactly that
ranking, after P-DPO (a user embedding conditioning the LM, trained with a personalised DPO loss):

1. every population user is fitted as a new user will be at night: head-only latent DPO on the frozen encoder's
   latents of their train pairs (`fit_users`, LM-free, the personalize stage's settings) -> z_u(x);
2. only the follow adapter (`clap.FollowAdapter`, zero at z = 0) trains, with DPO through the frozen LM on the
   population's train pairs, the reference being the same CLaP at z = 0 (the prior, what the latent LM checks
   compare against):
       L = -log sigma(beta [(log p(y_w|x,z_u) - log p(y_w|x,0)) - (log p(y_l|x,z_u) - log p(y_l|x,0))])
           + nll_weight * NLL(y_w | x, z_u) per token      (RPO-style: keeps the user's text in the language)
   Because the follow adapter is zero at z = 0, the reference never moves and the prior writes what it wrote.

Plain PyTorch: no Ray, no MLflow. Latent math in fp32.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentpref.tasks import objectives
from latentpref.tasks.train.loop import PairBatch, PreferencePair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowSettings:
    steps: int = 0                 # 0 = no stage 3
    pairs_per_batch: int = 8
    # measured on the default night's CLaP (benchmarks/follow.py): at 1e-3 / 0.1 the adapter blew the prefix up
    # within 60 steps (NLL at the users' latents +8 nats per token, held-out accuracy at chance)
    lr: float = 1e-4
    beta: float = 0.1
    nll_weight: float = 1.0        # per-token NLL of the chosen response at the user's latent

    def __post_init__(self) -> None:
        if self.steps < 0 or self.pairs_per_batch < 1:
            raise ValueError(f"follow steps={self.steps} must be >= 0 and pairs_per_batch={self.pairs_per_batch} >= 1")
        if not (self.lr > 0 and self.beta > 0 and self.nll_weight >= 0):
            raise ValueError(f"follow lr={self.lr} and beta={self.beta} must be > 0, nll_weight={self.nll_weight} >= 0")


@dataclass
class PopulationHeads:
    """Every population user's head-only latent DPO fit: row u = the user of `PreferencePair.user_index` u."""
    weight: Tensor     # (U, Q, d, 2D/Q) float32
    bias: Tensor       # (U, Q, 2D/Q)
    seconds: float     # encode + fit


@torch.no_grad()
def fit_population_heads(clap, tokenizer, pairs: list[PreferencePair], n_users: int, fit_config, *,
                         prompt_tokens: int, response_tokens: int) -> PopulationHeads:
    """Fit each population user's head exactly as the personalize stage fits a user (same `FitConfig`), on the latents
    of the CLaP's own (frozen) encoder. Users without train pairs keep the zero head (the prior)."""
    from latentpref.tasks.policy.cache import build_latent_cache, text_key
    from latentpref.tasks.train.fit_user import fit_users

    if not pairs:
        raise ValueError("the follow stage needs population users' train pairs; none are readable by the CLaP")
    t0 = time.perf_counter()
    was_training = clap.training
    cache = build_latent_cache(clap, tokenizer, [p.prompt for p in pairs],
                               [(p.prompt, y) for p in pairs for y in (p.chosen, p.rejected)],
                               prompt_tokens=prompt_tokens, response_tokens=response_tokens)
    clap.train(was_training)
    p_idx = torch.tensor([cache.prompt_index[text_key(p.prompt)] for p in pairs])
    c_idx = torch.tensor([cache.response_index[text_key(p.prompt, p.chosen)] for p in pairs])
    r_idx = torch.tensor([cache.response_index[text_key(p.prompt, p.rejected)] for p in pairs])
    result = fit_users(cache.features[p_idx], cache.mu[c_idx], cache.logvar[c_idx], cache.mu[r_idx],
                       cache.logvar[r_idx], torch.tensor([p.user_index for p in pairs]), n_users, fit_config,
                       pair_weight=torch.tensor([p.weight for p in pairs], dtype=torch.float32))
    seconds = time.perf_counter() - t0
    log.info("follow stage: %d population users' heads fitted on %d pairs in %.1f s (latent accuracy %.3f)",
             n_users, len(pairs), seconds, float(result.final_accuracy.nanmean()))
    return PopulationHeads(result.weight, result.bias, seconds)


def head_latents(heads: PopulationHeads, features: Tensor, user_index: Tensor) -> Tensor:
    """z_u(x) = mean of user u's p_theta(z|x) (the serving latent), one row per (features row, user) pair: (N, D)."""
    from latentpref.tasks.models.policy import predict_latent
    W, b = heads.weight.to(features.device)[user_index], heads.bias.to(features.device)[user_index]
    return predict_latent(W, b, features.float()[:, None]).squeeze(1)


class FollowObjective(nn.Module):
    """Stage 3's loss on a PairBatch of population pairs (module docstring). Only `clap.adapter.follow` should be
    trainable; the user latents and the z = 0 reference are computed without gradients."""

    def __init__(self, clap: nn.Module, heads: PopulationHeads, settings: FollowSettings):
        super().__init__()
        if getattr(clap.adapter, "follow", None) is None:
            raise ValueError("FollowObjective needs a CLaP with a follow adapter (CLaPConfig.follow_rank > 0)")
        self.clap, self.heads, self.settings = clap, heads, settings

    def user_latent(self, pairs: PairBatch) -> Tensor:
        """The latent each pair's user is served at (their head's mean at the pair's prompt)."""
        return head_latents(self.heads, self.clap.encoder.features(pairs.prompt_ids, pairs.prompt_mask),
                            pairs.user_index)

    def forward(self, pairs: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if pairs.user_index is None:
            raise ValueError("the follow stage needs each pair's population user (PairBatch.user_index)")
        clap, s = self.clap, self.settings
        with torch.no_grad():
            z_user = self.user_latent(pairs)
            z_prior = torch.zeros_like(z_user)
            ref_c = clap.response_logps(z_prior, pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids,
                                        pairs.chosen_mask)
            ref_r = clap.response_logps(z_prior, pairs.prompt_ids, pairs.prompt_mask, pairs.rejected_ids,
                                        pairs.rejected_mask)
        pol_c = clap.response_logps(z_user, pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids, pairs.chosen_mask)
        pol_r = clap.response_logps(z_user, pairs.prompt_ids, pairs.prompt_mask, pairs.rejected_ids,
                                    pairs.rejected_mask)
        out = objectives.sequence_dpo_loss(pol_c, pol_r, ref_c, ref_r, loss_type="dpo", beta=s.beta)
        weight = pairs.weight if pairs.weight is not None else torch.ones_like(out.losses)
        weight = weight.to(out.losses.dtype)
        dpo = (out.losses * weight).sum() / weight.sum().clamp(min=1e-9)
        n_tokens = pairs.chosen_mask.sum()
        nll = -pol_c.sum() / n_tokens.clamp(min=1)
        loss = dpo + s.nll_weight * nll
        with torch.no_grad():
            margin = (pol_c - ref_c) - (pol_r - ref_r)
            metrics = {"loss": loss.detach(), "follow_dpo": dpo.detach(), "follow_nll_per_token": nll.detach(),
                       "follow_acc": (margin > 0).float().mean(), "follow_margin": margin.mean(),
                       "z_norm": z_user.norm(dim=-1).mean(), "tokens": n_tokens.detach().float() * 2}
        return loss, metrics
