"""Like-for-like cost of one user's latent fit: the user's train pairs encoded with the CLaP, then fitted alone with
the night's settings (the evaluation's `fit_seconds` of latent DPO, next to the baselines' per-user fits; the
nightly batched cost per user is lower). Both latent types; the fit itself is tasks/train/fit_user.py or
fit_codes.py, so the evaluation does not import tasks/train.
"""
from __future__ import annotations

import time

import torch

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.policy.settings import FitSettings
from latentpref.tasks.policy.store import UserPolicy, is_discrete

__all__ = ["time_user_refit"]


def time_user_refit(clap, tokenizer, policy: UserPolicy, triples: list[tuple[str, str, str]], fit: FitSettings, *,
                    prompt_tokens: int, response_tokens: int) -> float | None:
    """Seconds to refit `policy`'s user alone on `triples` (prompt, chosen, rejected) with `fit`, encoding excluded;
    None when it is not timed here (no pairs, a discrete cold start, or an encoder-mode policy: the manifest's
    `fit_seconds` of the night stands)."""
    if not triples or (policy.cold_start if policy.discrete else policy.mode != "head-only"):
        return None
    p_ids, p_mask = tokenize_prompts(tokenizer, [t[0] for t in triples], prompt_tokens)
    c_ids, c_mask = tokenize_responses(tokenizer, [t[1] for t in triples], response_tokens)
    r_ids, r_mask = tokenize_responses(tokenizer, [t[2] for t in triples], response_tokens)
    one_user = torch.zeros(len(triples), dtype=torch.long)
    if is_discrete(clap):
        from latentpref.tasks.train.fit_codes import CodeFitConfig, fit_code_users
        estimator = policy.manifest.get("estimator", "dpo")
        with torch.no_grad():
            prior = clap.prior_logits(p_ids, p_mask)
            q_c = clap.encode_logits(p_ids, p_mask, c_ids, c_mask)
            q_r = clap.encode_logits(p_ids, p_mask, r_ids, r_mask)
            pair_logits = (clap.pair_logits(p_ids, p_mask, c_ids, c_mask, r_ids, r_mask)
                           if estimator == "mean_posterior" else None)
        t0 = time.perf_counter()
        fit_code_users(prior, q_c, q_r, one_user, 1, CodeFitConfig(estimator=estimator, **fit.codes()),
                       pair_logits=pair_logits)
        return time.perf_counter() - t0
    from latentpref.tasks.train.fit_user import FitConfig, fit_users
    with torch.no_grad():
        features = clap.encoder.features(p_ids, p_mask).float()
        mc, lc = clap.encode(p_ids, p_mask, c_ids, c_mask)
        mr, lr = clap.encode(p_ids, p_mask, r_ids, r_mask)
    t0 = time.perf_counter()
    fit_users(features, mc.float(), lc.float(), mr.float(), lr.float(), one_user, 1, FitConfig(**fit.gaussian()))
    return time.perf_counter() - t0
