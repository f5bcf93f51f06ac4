"""Evaluation of one night: personalised generation scored by each user's hidden reward, side by side with
the un-personalised models and the baselines fitted on exactly the same pairs (spec latent-dpo.md §6).

Methods (rows of the result):
    base_lm       the (SFT'd) base LM alone, no latent prefix
    oracle_best_of_k  ceiling: per prompt, the best under the user's hidden reward of K samples of the
                  un-personalised model (clap_prior); no method that samples once can beat it on average. Its
                  `reward_spread` (mean over prompts of max - min reward among the K samples) says whether the
                  LM's own samples differ at all in what the user cares about: near 0, nothing can personalise
    clap_prior    CLaP with z = mean of the population prior N(0, I): the un-personalised latent model
                  (discrete CLaPs: the expected code under the population prior p(k|x), lpc.md §6.3)
    latent_dpo    CLaP with z = mean of the user's fitted p_θ(z|x) (spec §4.1.9: z = μ_θ(x))
    lora_dpo / full_dpo / ptuning_dpo   baselines (tasks/evaluate/baselines.py)
Generation uses the same prompts and the same sampling seed for every method, so differences come from
the method alone. Headline: `win_rate_vs_prior`, the share of prompts where a method's text beats the
un-personalised model's (clap_prior, same prompt, same seed) under the user's hidden reward (ties half);
`win_rate_vs_base` the same against the plain LM (base_lm); `win_rate` compares against the prompt's real
continuation. Whether it is *personal* is `own_vs_swapped` (`add_personal_measures`, over all evaluated users): the
user's text against the text written under the policy of the evaluated user with the least similar hidden reward,
same prompt and seed, judged by the user's reward; a fit that only learnt what most users share scores 0.5 there.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from latentpref.tasks.data import scorers, users as users_lib
from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.evaluate import baselines, metrics
from latentpref.tasks.models import latent
from latentpref.tasks.policy.refit import time_user_refit
from latentpref.tasks.policy.settings import FitSettings
from latentpref.tasks.policy.store import is_discrete, prior_latent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    prompts_per_user: int
    max_new_tokens: int
    prompt_tokens: int
    response_tokens: int
    baselines: tuple[str, ...]
    baseline_steps: int
    baseline_lr: dict[str, float]    # per method (spec §5: LoRA 1e-5, full 1e-6, P-Tuning 1e-4)
    baseline_beta: dict[str, float]  # per method (spec §5: 0.1; P-Tuning 0.5)
    baseline_batch_size: int
    latent_fit: FitSettings          # the night's fit settings, to time a one-user latent fit like-for-like
    seed: int = 0
    oracle_k: int = 4                # samples per prompt of the un-personalised model for oracle_best_of_k
    best_of_k: int = 0               # > 1: latent_dpo_best_of_k, serving's personal best-of-K (0 = off)
    # the night's P-Tuning-SFT prefix (baselines.fit_prefix_sft): init and reference of every P-Tuning-DPO fit
    ptuning_prefix: dict[str, torch.Tensor] | None = None
    # users the baselines are fitted for (a subset of the evaluated users: a fit through the LM costs ~100x a latent
    # user's evaluation); None = every evaluated user
    baseline_user_ids: tuple[str, ...] | None = None


def _user_reward(weights_json: str, texts: list[str]) -> np.ndarray:
    feats = scorers.score_texts(texts)
    return users_lib.user_rewards(weights_json, feats)


def _features_json(features: dict[str, np.ndarray]) -> str:
    """Per-prompt scorer features of a method's texts, so any user's hidden reward of them can be computed after the
    fan-out (rewards are linear in the features): {feature: [value per prompt]}."""
    return json.dumps({f: [float(x) for x in v] for f, v in features.items()})


GENERATION_ROWS = 64   # rows of one batched CLaP decode (many users' rows together: ~10x the tokens/s of one user's)


def _row_generator(seed: int, sample: int, prompt_index: int) -> torch.Generator:
    """The sampling stream of one (sample, prompt) row: every user's text for a prompt draws the same noise, whatever
    batch it is decoded in, so two methods' (or two users') texts differ by their latents alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sample) * 1_000_003 + prompt_index)


@torch.no_grad()
def _clap_generate_rows(clap, tokenizer, prompts: list[str], prompt_index: list[int], z: torch.Tensor | None,
                        s: EvalSettings, samples: list[int] | None = None) -> list[str]:
    """One text per row (prompt, latent row of z or the plain base when z is None), decoded GENERATION_ROWS rows at a
    time, each row from its own stream (`_row_generator`; `samples` picks the stream of repeated samples)."""
    samples = samples or [0] * len(prompts)
    texts: list[str] = []
    for start in range(0, len(prompts), GENERATION_ROWS):
        end = start + GENERATION_ROWS
        ids, mask = tokenize_prompts(tokenizer, prompts[start:end], s.prompt_tokens)
        gens = [_row_generator(s.seed, k, i) for k, i in zip(samples[start:end], prompt_index[start:end])]
        out = clap.generate(None if z is None else z[start:end], ids, mask, max_new_tokens=s.max_new_tokens,
                            do_sample=True, top_k=50, generator=gens)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts


BEST_OF_METHOD = "latent_dpo_best_of_k"


def _best_of_texts(clap, tokenizer, prompts: list[str], user_ids: list[str], user_policies: dict[str, Any],
                   serving_z: dict[str, torch.Tensor], first: dict[str, list[str]],
                   s: EvalSettings) -> dict[str, tuple[list[str], np.ndarray]]:
    """Serving's personal best-of-K for every user (`s.best_of_k` > 1; else {}): K samples per prompt under the
    user's serving latent, sample 0 being `first` (latent_dpo's own text, on the prompt's stream 0) and sample j on
    the prompt's stream j (the streams the oracle's pool of the prior draws from), every user's extra samples decoded
    together; the sample with the highest latent reward of the user (`serving.latent_rewards`, LM-free, as
    `best_of` in /v1/completions) is kept. Returns {user: (chosen texts per prompt, (K, prompts) latent rewards)}."""
    k = s.best_of_k
    if k <= 1:
        return {}
    from latentpref.tasks.evaluate.serving import latent_rewards
    n, extra = len(prompts), k - 1
    rows_z = torch.cat([serving_z[u].repeat(extra, 1) for u in user_ids])
    samples = [j for _ in user_ids for j in range(1, k) for _ in range(n)]
    decoded = _clap_generate_rows(clap, tokenizer, prompts * (extra * len(user_ids)),
                                  list(range(n)) * (extra * len(user_ids)), rows_z, s, samples=samples)
    out = {}
    for i, u in enumerate(user_ids):
        mine = decoded[i * extra * n:(i + 1) * extra * n]
        pool = [first[u]] + [mine[j * n:(j + 1) * n] for j in range(extra)]                  # K x prompts
        rewards = latent_rewards(clap, tokenizer, user_policies[u], prompts * k, [t for texts in pool for t in texts],
                                 prompt_tokens=s.prompt_tokens, response_tokens=s.response_tokens).reshape(k, n)
        best = rewards.argmax(0)                                    # ties: the first (latent_dpo's own text)
        out[u] = ([pool[b][i_p] for i_p, b in enumerate(best)], rewards)
    return out


def latent_implicit_reward(mu_p, logvar_p, mu_y) -> torch.Tensor:
    """R_θ(z) = log p_θ(z|x) − log N(z; 0, I) at the response's posterior mean (spec §3.6)."""
    return latent.gaussian_log_prob(mu_y, mu_p, logvar_p) - latent.standard_normal_log_prob(mu_y)


@torch.no_grad()
def _latent_heldout_accuracy(clap, tokenizer, policy, held: list[tuple[str, str, str]], s: EvalSettings) -> float:
    """Held-out preference accuracy of a latent policy in latent space (no LM pass).

    Gaussian: a response's score is R_theta at its posterior mean (spec §3.6). Discrete: its expected implicit code
    reward under its CLaP posterior, sum_k q(k|x,y) (log p_u(k|x) - log p(k|x)) (the categorical analogue); the pair
    counts as correct when the chosen response scores higher.
    """
    p_ids, p_mask = tokenize_prompts(tokenizer, [h[0] for h in held], s.prompt_tokens)
    c_ids, c_mask = tokenize_responses(tokenizer, [h[1] for h in held], s.response_tokens)
    r_ids, r_mask = tokenize_responses(tokenizer, [h[2] for h in held], s.response_tokens)
    if is_discrete(clap):
        prior = clap.prior_logits(p_ids, p_mask)
        q_c, q_r = clap.encode_logits(p_ids, p_mask, c_ids, c_mask), clap.encode_logits(p_ids, p_mask, r_ids, r_mask)
        reward = torch.log(policy.code_probs(clap.encoder, p_ids, p_mask)) - torch.log_softmax(prior, -1)   # (N, K)
        return metrics.preference_accuracy((torch.softmax(q_c, -1) * reward).sum(-1).numpy(),
                                           (torch.softmax(q_r, -1) * reward).sum(-1).numpy())
    mu_h, logvar_h = policy.latent(clap.encoder, p_ids, p_mask)
    mu_c, _ = clap.encode(p_ids, p_mask, c_ids, c_mask)
    mu_r, _ = clap.encode(p_ids, p_mask, r_ids, r_mask)
    return metrics.preference_accuracy(latent_implicit_reward(mu_h, logvar_h, mu_c).numpy(),
                                       latent_implicit_reward(mu_h, logvar_h, mu_r).numpy())


@torch.no_grad()
def _latent_lm_checks(clap, tokenizer, policy, held: list[tuple[str, str, str]], s: EvalSettings) -> dict[str, float]:
    """Held-out checks of a latent policy with the LM actually run (the same measure as the baselines'):

    heldout_accuracy: share of held-out pairs with [log p(y_w|x, z_u) - log p(y_w|x, z_0)] >
        [log p(y_l|x, z_u) - log p(y_l|x, z_0)], z_u = the user's latent (mu_theta(x); the expected code for
        discrete policies), z_0 = the population prior's (the reference, as the CLaP prior is the latent model's
        un-personalised policy).
    z_sensitivity_nats: mean |log p(y|x, z_u) - log p(y|x, z_0)| per held-out response (nats per sequence): how
        much the user's latent moves the LM at all; near 0, no latent fit can change what the LM writes.
    """
    p_ids, p_mask = tokenize_prompts(tokenizer, [h[0] for h in held], s.prompt_tokens)
    c_ids, c_mask = tokenize_responses(tokenizer, [h[1] for h in held], s.response_tokens)
    r_ids, r_mask = tokenize_responses(tokenizer, [h[2] for h in held], s.response_tokens)
    z_user = policy.serving_latent(clap.encoder, p_ids, p_mask).float()
    z_prior = prior_latent(clap, p_ids, p_mask)
    logp = {(who, side): clap.response_logps(z, p_ids, p_mask, ids, mask)
            for who, z in (("user", z_user), ("prior", z_prior))
            for side, ids, mask in (("chosen", c_ids, c_mask), ("rejected", r_ids, r_mask))}
    chosen = (logp["user", "chosen"] - logp["prior", "chosen"]).numpy()
    rejected = (logp["user", "rejected"] - logp["prior", "rejected"]).numpy()
    return {"heldout_accuracy": metrics.preference_accuracy(chosen, rejected),
            "z_sensitivity_nats": float(np.abs(np.concatenate([chosen, rejected])).mean())}


def evaluate_users(*, clap, base_model, tokenizer, users_table: pa.Table, user_ids: list[str],
                   test_prompts: list[str], references: list[str], train_pairs: pa.Table, heldout_pairs: pa.Table,
                   user_policies: dict[str, Any], settings: EvalSettings,
                   progress: Callable[[int, int], None] | None = None) -> pa.Table:
    """One row per (user, method) with mean_reward, win_rate, heldout_accuracy, perplexity, fit_seconds,
    trainable_params, artifact_bytes, n_train_pairs."""
    torch.manual_seed(settings.seed)
    clap.eval()
    base_model.eval()
    hidden = {u: (c, w) for u, c, w in zip(users_table["user_id"].to_pylist(), users_table["cohort"].to_pylist(),
                                            users_table["weights_json"].to_pylist())}
    prompts = test_prompts[: settings.prompts_per_user]
    refs = references[: settings.prompts_per_user]
    p_ids, p_mask = tokenize_prompts(tokenizer, prompts, settings.prompt_tokens)

    # user-independent generations, shared by every user (same prompts, same seed)
    prior_z = prior_latent(clap, p_ids, p_mask)   # computed once: a discrete CLaP runs its encoder for it
    # K samples per prompt of the un-personalised model, decoded together (sample 0 is clap_prior's own text, on
    # the streams every user's text uses): the oracle's pool
    n, k = len(prompts), settings.oracle_k
    pool = _clap_generate_rows(clap, tokenizer, prompts * k, list(range(n)) * k, prior_z.repeat(k, 1), settings,
                               samples=[j for j in range(k) for _ in range(n)])
    prior_samples = [pool[j * n:(j + 1) * n] for j in range(k)]
    shared = {"base_lm": baselines.generate_texts(base_model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                                  do_sample=True, top_k=50, seed=settings.seed,
                                                  max_prompt_tokens=settings.prompt_tokens),
              "clap_prior": prior_samples[0]}
    ppl_cache: dict[str, float] = {}

    def ppl(method_texts: list[str]) -> float:
        key = "\x00".join(method_texts)
        if key not in ppl_cache:
            ppl_cache[key] = metrics.perplexity(base_model, tokenizer, [p + t for p, t in zip(prompts, method_texts)])
        return ppl_cache[key]

    # reference log-probs are user-independent: one table for every user's baseline fit and held-out check
    # (spec §8.6; the reference code recomputed them online, spec §3.9)
    sel = pa.compute.is_in(train_pairs["user_id"], value_set=pa.array(user_ids, pa.string()))
    sel_h = pa.compute.is_in(heldout_pairs["user_id"], value_set=pa.array(user_ids, pa.string()))
    texts: list[tuple[str, str]] = []
    for table in (train_pairs.filter(sel), heldout_pairs.filter(sel_h)):
        for p, c, r in zip(table["prompt"].to_pylist(), table["chosen"].to_pylist(), table["rejected"].to_pylist()):
            texts += [(p, c), (p, r)]
    lengths = dict(max_prompt_tokens=settings.prompt_tokens, max_response_tokens=settings.response_tokens)
    ref_cache = baselines.reference_logps_cache(base_model, tokenizer, texts, **lengths) if settings.baselines else {}
    ref_caches = {method: ref_cache for method in settings.baselines}
    if "ptuning_dpo" in settings.baselines and settings.ptuning_prefix is not None:
        # P-Tuning-DPO's reference is the PT-SFT model (spec §5); still user-independent, so cached once too
        pt_ref = baselines.prefix_reference_model(base_model, settings.ptuning_prefix,
                                                  baselines.BaselineConfig(method="ptuning_dpo"))
        ref_caches["ptuning_dpo"] = baselines.reference_logps_cache(pt_ref, tokenizer, texts, **lengths)
        del pt_ref

    # every user's latent DPO text, decoded together (a batch of many users' rows of the same prompts); each row's
    # stream is its prompt's, as for clap_prior's text, so a user's text and the prior's differ by the latent alone
    serving_z = {u: user_policies[u].serving_latent(clap.encoder, p_ids, p_mask).float() for u in user_ids}
    all_texts = _clap_generate_rows(clap, tokenizer, prompts * len(user_ids), list(range(len(prompts))) * len(user_ids),
                                    torch.cat([serving_z[u] for u in user_ids]), settings)
    latent_texts = {u: all_texts[k * len(prompts):(k + 1) * len(prompts)] for k, u in enumerate(user_ids)}
    best_of = _best_of_texts(clap, tokenizer, prompts, user_ids, user_policies, serving_z, latent_texts, settings)

    rows: list[dict[str, Any]] = []
    for n_done, user_id in enumerate(user_ids):
        cohort, weights_json = hidden[user_id]
        ref_reward = _user_reward(weights_json, refs)
        u_train = train_pairs.filter(pa.compute.equal(train_pairs["user_id"], user_id))
        u_held = heldout_pairs.filter(pa.compute.equal(heldout_pairs["user_id"], user_id))
        triples = list(zip(u_train["prompt"].to_pylist(), u_train["chosen"].to_pylist(), u_train["rejected"].to_pylist()))
        # the feedback weight of each pair: the latent fits weigh by it, so the baselines do too (same pairs)
        pair_weights = ([1.0 if w is None else float(w) for w in u_train["weight"].to_pylist()]
                        if "weight" in u_train.column_names else None)
        held = list(zip(u_held["prompt"].to_pylist(), u_held["chosen"].to_pylist(), u_held["rejected"].to_pylist()))

        pool_reward = np.stack([_user_reward(weights_json, t) for t in prior_samples])   # (K, prompts)
        prior_reward = pool_reward[0]

        base_reward = _user_reward(weights_json, shared["base_lm"])

        def row(method: str, texts: list[str], reward: np.ndarray | None = None, **extra) -> dict[str, Any]:
            features = scorers.score_texts(texts)
            reward = users_lib.user_rewards(weights_json, features) if reward is None else reward
            return {"user_id": user_id, "cohort": cohort, "method": method, "n_train_pairs": len(triples),
                    "mean_reward": float(reward.mean()), "win_rate": metrics.win_rate(reward, ref_reward),
                    "win_rate_vs_prior": metrics.win_rate(reward, prior_reward),
                    "win_rate_vs_base": metrics.win_rate(reward, base_reward),
                    "perplexity": ppl(texts), "sample_prompt": prompts[0][-200:], "sample": texts[0][:200],
                    "sample_reward": float(reward[0]), "text_features_json": _features_json(features), **extra}

        for method, texts in shared.items():
            rows.append(row(method, texts, heldout_accuracy=None, fit_seconds=0.0, trainable_params=0,
                            artifact_bytes=0))
        best = pool_reward.argmax(0)                                                           # (prompts,)
        rows.append(row("oracle_best_of_k", [prior_samples[k][i] for i, k in enumerate(best)],
                        reward=pool_reward.max(0), heldout_accuracy=None, fit_seconds=0.0, trainable_params=0,
                        artifact_bytes=0,
                        reward_spread=float((pool_reward.max(0) - pool_reward.min(0)).mean())))

        # latent DPO: the user's stored policy from the nightly fit (any mode: head-only, trunk-frozen, faithful)
        policy = user_policies[user_id]
        manifest = policy.manifest
        mu_p, _ = policy.latent(clap.encoder, p_ids, p_mask)        # the fit itself (latent_shift below)
        texts = latent_texts[user_id]
        latent_acc = None
        lm_checks: dict[str, float | None] = {"heldout_accuracy": None, "z_sensitivity_nats": None}
        if held:
            lm_checks = _latent_lm_checks(clap, tokenizer, policy, held, settings)
            latent_acc = _latent_heldout_accuracy(clap, tokenizer, policy, held, settings)
        # like-for-like timing: one user fitted alone from the cache, own encoding counted (the nightly batched cost
        # is lower), on the users the baselines are fitted for (the comparison's users; the others keep the
        # night's batched per-user seconds and are left out of the summary's fit_seconds)
        timed = settings.baseline_user_ids is None or user_id in settings.baseline_user_ids
        refit_s = time_user_refit(clap, tokenizer, policy, triples, settings.latent_fit,
                                  prompt_tokens=settings.prompt_tokens,
                                  response_tokens=settings.response_tokens) if timed else None
        fit_s = manifest.get("fit_seconds", 0.0) if refit_s is None else refit_s
        # the user's fit: what latent_dpo and its best-of-K rows both cost
        fit_costs = {"fit_seconds": fit_s, "fit_timed_alone": refit_s is not None,
                     "trainable_params": int(manifest.get("trainable_params")
                                             or sum(t.numel() for t in policy.tensors.values())),
                     "artifact_bytes": int(manifest.get("artifact_bytes", 0))}
        rows.append(row("latent_dpo", texts, **lm_checks, latent_heldout_accuracy=latent_acc,
                        latent_shift=float(mu_p.float().norm(dim=-1).mean()), **fit_costs,
                        cold_start=bool(manifest.get("cold_start", False))))

        if user_id in best_of:
            bo_texts, bo_rewards = best_of[user_id]
            rows.append(row(BEST_OF_METHOD, bo_texts, heldout_accuracy=None, **fit_costs,
                            # how far the chosen sample's latent reward is above latent_dpo's own text's
                            latent_reward_gain=float(bo_rewards.max(0).mean() - bo_rewards[0].mean())))

        # baselines on exactly the same pairs
        for method in settings.baselines:
            if not triples or (settings.baseline_user_ids is not None and user_id not in settings.baseline_user_ids):
                continue
            cfg = baselines.BaselineConfig(method=method, beta=settings.baseline_beta[method],
                                           lr=settings.baseline_lr[method], steps=settings.baseline_steps,
                                           batch_size=settings.baseline_batch_size, seed=settings.seed, **lengths)
            init = settings.ptuning_prefix if method == "ptuning_dpo" else None
            result = baselines.fit_baseline(base_model, tokenizer, triples, cfg, ref_logps=ref_caches[method],
                                            init_adapter=init, weights=pair_weights)
            b_texts = baselines.generate_texts(result.model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                               do_sample=True, top_k=50, seed=settings.seed,
                                                  max_prompt_tokens=settings.prompt_tokens)
            b_held = None
            if held:
                hp = [h[0] for h in held]
                lc_, _ = baselines.sequence_logps(result.model, tokenizer, hp, [h[1] for h in held], **lengths)
                lr2, _ = baselines.sequence_logps(result.model, tokenizer, hp, [h[2] for h in held], **lengths)
                rc = np.array([ref_caches[method][(h[0], h[1])] for h in held])
                rr = np.array([ref_caches[method][(h[0], h[2])] for h in held])
                b_held = metrics.preference_accuracy(lc_.numpy() - rc, lr2.numpy() - rr)
            rows.append(row(method, b_texts, heldout_accuracy=b_held, fit_seconds=result.seconds,
                            trainable_params=int(result.trainable_params), artifact_bytes=int(result.artifact_bytes),
                            fit_flops=float(result.flops), peak_rss_bytes=int(result.peak_rss_bytes)))
            del result
        if progress is not None:
            progress(n_done + 1, len(user_ids))
    # from_pylist takes its columns from the first row: give every row every key (baseline-only costs are null)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])


SUMMARY_COLUMNS = ("mean_reward", "win_rate", "win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped",
                   "heldout_accuracy", "latent_heldout_accuracy", "z_sensitivity_nats", "latent_shift", "perplexity",
                   "fit_seconds", "reward_spread", "latent_reward_gain")


def summarise(per_user: pa.Table, *, seed: int = 0) -> pa.Table:
    """Per method: mean and 95% bootstrap interval over users of each metric."""
    out = []
    methods = list(dict.fromkeys(per_user["method"].to_pylist()))
    for method in methods:
        sub = per_user.filter(pa.compute.equal(per_user["method"], method))
        entry: dict[str, Any] = {"method": method, "users": sub.num_rows}
        # a latent user's fit_seconds is like-for-like (one user alone) only where fit_timed_alone says so
        alone = (sub["fit_timed_alone"].to_pylist() if "fit_timed_alone" in sub.column_names else [None] * sub.num_rows)
        for col in SUMMARY_COLUMNS:
            if col not in sub.column_names:
                continue
            values = sub[col].to_pylist()
            if col == "fit_seconds" and any(a is True for a in alone):
                values = [v for v, a in zip(values, alone) if a is not False]
            vals = np.array([v for v in values if v is not None], dtype=float)
            if len(vals):
                m, lo, hi = metrics.bootstrap_ci(vals, seed=seed)
                entry.update({col: m, f"{col}_lo": lo, f"{col}_hi": hi})
            else:
                entry.update({col: None, f"{col}_lo": None, f"{col}_hi": None})
        entry["trainable_params"] = int(np.median(sub["trainable_params"].to_numpy()))
        entry["artifact_bytes"] = int(np.median(sub["artifact_bytes"].to_numpy()))
        for col in ("fit_flops", "peak_rss_bytes"):     # baselines only (per-user cost of a fit through the LM)
            vals = [v for v in (sub[col].to_pylist() if col in sub.column_names else []) if v is not None]
            entry[col] = float(np.median(vals)) if vals else None
        out.append(entry)
    return pa.Table.from_pylist(out)


def summarise_by_group(per_user: pa.Table, *, seed: int = 0) -> pa.Table:
    """`summarise` within each user group (the per-user column `group`: seen / unseen / out_of_cohort), one row per
    (group, method) for the groups that have users, with a `group` column first."""
    parts = []
    for group in dict.fromkeys(per_user["group"].to_pylist()):
        sub = summarise(per_user.filter(pa.compute.equal(per_user["group"], group)), seed=seed)
        parts.append(sub.add_column(0, "group", pa.array([group] * sub.num_rows, pa.string())))
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({"group": pa.array([], pa.string())})
