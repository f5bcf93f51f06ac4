"""Simulated users (hidden linear rewards over scorer features) and their preference pairs.

Generalises spec latent-dpo.md §4.1 steps 4-5 (positive r = +logit, negative r = -logit, neutral
r = -|logit|; pairs (rank 1, rank K-1) and (rank 2, rank K) of the K sampled responses) to a population
of many users: each belongs to a cohort (a direction in feature space), with per-user jitter, a
Bradley-Terry label-noise temperature and a heavy-tailed number of feedback pairs.

Tables (notes/CONTRACT.md):
- users (HIDDEN, evaluation only): user_id, cohort, weights_json, bt_temperature:float32, n_pairs:int32,
  group in USER_GROUPS: "population" (cohort users whose pairs the CLaP's training may read), "holdout" (cohort users
  held out from everything the CLaP's training reads) or "out_of_cohort" (cohort OUT_OF_COHORT: a random mixture of
  the scorer features with random signs, never read by the CLaP either). Tables written before the column existed
  read as all "population" (`user_groups`).
- pairs: user_id, prompt, chosen, rejected, created_at timestamp[us, UTC], weight float32, prompt_id,
  chosen_id, rejected_id, split in {train, heldout}; plus pair_kind in {top_bottom, random}
  (an extension: which rule made the pair, for analysis; validate.py drops it).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentpref.tasks.data.scorers import CLASSIFIER_FEATURE, FEATURES
from latentpref.tasks.data.validate import FEEDBACK_SCHEMA

log = logging.getLogger(__name__)

# Cohort = feature weights in units of the candidate pool's standard deviation (make_population
# divides by each feature's std), so "+1 sentiment - 1 length" trades one std for one std.
COHORTS: dict[str, dict[str, float]] = {
    "positive": {"sentiment": 1.0},                               # spec §4.1: r = +logit
    "negative": {"sentiment": -1.0},                              # spec §4.1: r = -logit
    "neutral": {"abs_sentiment": -1.0},                           # spec §4.1: r = -|logit|
    "positive_concise": {"sentiment": 1.0, "length_words": -1.0},
    "negative_formal": {"sentiment": -1.0, "long_word_rate": 1.0},
    "enthusiastic": {"exclamation_rate": 1.0, "sentiment": 1.0},
}

OUT_OF_COHORT = "out_of_cohort"
USER_GROUPS = ("population", "holdout", OUT_OF_COHORT)

USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("cohort", pa.string()),
        ("weights_json", pa.string()),
        ("bt_temperature", pa.float32()),
        ("n_pairs", pa.int32()),
        ("group", pa.string()),
    ]
)
# the public feedback contract (validate.FEEDBACK_SCHEMA) plus how the simulated pair was drawn
PAIRS_SCHEMA = FEEDBACK_SCHEMA.append(pa.field("pair_kind", pa.string()))
PAIR_KINDS = ("top_bottom", "random")
_EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


def feature_stats(candidates: pa.Table) -> dict[str, tuple[float, float]]:
    """{feature: (mean, std)} over the candidate pool for every scorer column present."""
    stats = {}
    for name in (*FEATURES, CLASSIFIER_FEATURE):
        if name in candidates.column_names:
            x = candidates.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            x = x[np.isfinite(x)]
            stats[name] = (float(x.mean()) if len(x) else 0.0, float(x.std()) if len(x) else 0.0)
    if not stats:
        raise ValueError(f"candidates has none of the feature columns {FEATURES}; run candidates.annotate() first")
    return stats


def _allocate(n: int, probs: np.ndarray) -> np.ndarray:
    counts = np.floor(probs * n).astype(np.int64)
    for i in np.argsort(-(probs * n - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def _usable_std(feature: str, std: float) -> float:
    std = float(std)
    if not math.isfinite(std) or std <= 0:
        log.warning("feature %r has std %r in the candidate pool; using 1.0 (it cannot rank candidates)", feature, std)
        return 1.0
    return std


def make_population(
    n_users: int,
    *,
    feature_stats: Mapping[str, Sequence[float]],
    cohort_mix: Mapping[str, float] | None = None,
    seed: int = 0,
    min_pairs: int = 2,
    max_pairs: int = 256,
    median_pairs: float = 40.0,
    pairs_sigma: float = 1.0,
    jitter: float = 0.1,
    temperature_range: tuple[float, float] = (0.1, 1.0),
    holdout_share: float = 0.0,
    n_out_of_cohort: int = 0,
) -> pa.Table:
    """Sample a hidden user population.

    Args:
        n_users: number of users; ids "u00000", "u00001", ...
        feature_stats: {feature: (mean, std)} of the candidate pool (`feature_stats(candidates)`).
        cohort_mix: {cohort: share} (normalised); None = equal shares of every COHORTS entry.
            Cohort sizes are exact (largest remainder), users are shuffled among cohorts.
        min_pairs, max_pairs, median_pairs, pairs_sigma: n_pairs ~ LogNormal(log median, sigma),
            rounded and clipped to [min_pairs, max_pairs] (heavy tail: a few users give most feedback).
        jitter: per-user N(0, jitter^2) added to every lexical feature's cohort weight (std units), so
            no two users are identical and ties in a cohort's features are broken.
        temperature_range: Bradley-Terry temperature ~ log-uniform on this range (reward units =
            pool stds); P(a > b) = sigmoid((r_a - r_b) / T).
        holdout_share: share of the n_users cohort users (rounded, at least one when > 0 and n_users > 1) put in
            group "holdout": users the CLaP's training never reads, so the evaluation can judge personalisation
            on users the shared model never saw. Drawn with the seed, spread over cohorts.
        n_out_of_cohort: extra users (after the n_users cohort users, same id format) in group and cohort
            "out_of_cohort": weights = random signs times a Dirichlet(1) mixture over every scorer feature present,
            unit norm in pool-std units (like a one-feature cohort), plus the same jitter.

    Returns:
        users table (USERS_SCHEMA); weights_json maps feature -> weight in raw feature units.

    Raises:
        ValueError: unknown cohort, a cohort feature missing from feature_stats, bad ranges.
    """
    if n_users < 1:
        raise ValueError(f"n_users={n_users!r} must be >= 1")
    if not 0.0 <= holdout_share < 1.0:
        raise ValueError(f"holdout_share={holdout_share!r} must be in [0, 1)")
    if n_out_of_cohort < 0:
        raise ValueError(f"n_out_of_cohort={n_out_of_cohort!r} must be >= 0")
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got min_pairs={min_pairs}, max_pairs={max_pairs}")
    lo_t, hi_t = temperature_range
    if not 0 < lo_t <= hi_t:
        raise ValueError(f"temperature_range={temperature_range!r}: need 0 < low <= high")
    mix = dict(cohort_mix) if cohort_mix is not None else {c: 1.0 for c in COHORTS}
    unknown = sorted(set(mix) - set(COHORTS))
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"cohort_mix={mix!r}: shares must be >= 0 over known cohorts {sorted(COHORTS)}")
    names = list(mix)
    for cohort in names:
        missing = [f for f in COHORTS[cohort] if f not in feature_stats]
        if missing and mix[cohort] > 0:
            raise ValueError(f"cohort {cohort!r} uses {missing} but feature_stats has only {sorted(feature_stats)}")

    rng = np.random.default_rng(seed)
    probs = np.array([mix[c] for c in names], dtype=np.float64)
    cohorts = np.repeat(np.arange(len(names)), _allocate(n_users, probs / probs.sum()))
    rng.shuffle(cohorts)

    jitter_features = [f for f in FEATURES if f in feature_stats]
    features = sorted(set(jitter_features) | {f for c in names for f in COHORTS[c]})
    stds = {f: _usable_std(f, feature_stats[f][1]) for f in features}
    base = np.array([[COHORTS[names[c]].get(f, 0.0) for f in features] for c in range(len(names))])  # (C, F)
    noise = rng.normal(0.0, jitter, size=(n_users, len(features)))
    noise[:, [f not in jitter_features for f in features]] = 0.0
    weights = (base[cohorts] + noise) / np.array([stds[f] for f in features])  # (U, F), raw units

    n_pairs = np.clip(np.rint(rng.lognormal(math.log(median_pairs), pairs_sigma, size=n_users)), min_pairs, max_pairs)
    temperature = np.exp(rng.uniform(math.log(lo_t), math.log(hi_t), size=n_users))
    cohort_names = [names[c] for c in cohorts]
    groups = np.full(n_users, "population", dtype=object)
    if holdout_share > 0 and n_users > 1:
        # its own generator: turning the holdout on leaves every user's weights, pairs count and temperature as they were
        n_hold = min(n_users - 1, max(1, int(round(holdout_share * n_users))))
        order = np.random.default_rng([seed, 1]).permutation(n_users)
        # spread over cohorts: take users round-robin by cohort in the permuted order
        by_cohort: dict[int, list[int]] = {}
        for i in order:
            by_cohort.setdefault(int(cohorts[i]), []).append(int(i))
        picked: list[int] = []
        while len(picked) < n_hold:
            for c in sorted(by_cohort):
                if by_cohort[c] and len(picked) < n_hold:
                    picked.append(by_cohort[c].pop(0))
        groups[picked] = "holdout"
    weight_rows = [dict(zip(features, map(float, row))) for row in weights]
    if n_out_of_cohort:
        # outside every cohort: a random mixture of all the scorer features present, random signs, its own generator
        ooc_rng = np.random.default_rng([seed, 2])
        # (the lexical features only: the evaluation scores generated text without the learned classifier)
        ooc_features = [f for f in FEATURES if f in feature_stats]
        shares = ooc_rng.dirichlet(np.ones(len(ooc_features)), size=n_out_of_cohort)
        signs = ooc_rng.choice([-1.0, 1.0], size=shares.shape)
        w_std = (signs * shares / np.linalg.norm(shares, axis=1, keepdims=True)
                 + ooc_rng.normal(0.0, jitter, size=shares.shape))
        ooc_stds = np.array([_usable_std(f, feature_stats[f][1]) for f in ooc_features])
        weight_rows += [dict(zip(ooc_features, map(float, row))) for row in w_std / ooc_stds]
        n_pairs = np.concatenate([n_pairs, np.clip(np.rint(ooc_rng.lognormal(math.log(median_pairs), pairs_sigma,
                                                                            size=n_out_of_cohort)), min_pairs, max_pairs)])
        temperature = np.concatenate([temperature, np.exp(ooc_rng.uniform(math.log(lo_t), math.log(hi_t),
                                                                           size=n_out_of_cohort))])
        cohort_names += [OUT_OF_COHORT] * n_out_of_cohort
        groups = np.concatenate([groups, np.full(n_out_of_cohort, OUT_OF_COHORT, dtype=object)])
    total = len(cohort_names)
    width = max(5, len(str(total - 1)))
    return pa.table(
        {
            "user_id": [f"u{i:0{width}d}" for i in range(total)],
            "cohort": cohort_names,
            "weights_json": [json.dumps(row) for row in weight_rows],
            "bt_temperature": temperature.astype(np.float32),
            "n_pairs": n_pairs.astype(np.int32),
            "group": list(groups),
        },
        schema=USERS_SCHEMA,
    )


def user_groups(users: pa.Table) -> list[str]:
    """Each user's group (USER_GROUPS); a users table written before groups existed is all "population"."""
    if "group" in users.column_names:
        return [g or "population" for g in users.column("group").to_pylist()]
    return ["population"] * users.num_rows


def user_rewards(weights: str | Mapping[str, float], features: Mapping[str, np.ndarray]) -> np.ndarray:
    """Hidden linear reward r = sum_f w_f * features[f] (float64, shape of the feature arrays).

    Raises:
        ValueError: a weighted feature is missing from `features`.
    """
    w = json.loads(weights) if isinstance(weights, str) else dict(weights)
    missing = [f for f in w if f not in features]
    if missing:
        hint = " (pass a classifier to score_texts)" if CLASSIFIER_FEATURE in missing else ""
        raise ValueError(f"features lack {missing} used by the user's weights{hint}; have {sorted(features)}")
    total = None
    for f, wf in w.items():
        term = float(wf) * np.asarray(features[f], dtype=np.float64)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weights are empty")
    return total


def _group_candidates(candidates: pa.Table) -> tuple[list[str], np.ndarray]:
    """(prompt ids, (P, K) matrix of candidate row indices ordered by cand_idx)."""
    encoded = pc.dictionary_encode(candidates.column("prompt_id")).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    cand_idx = candidates.column("cand_idx").to_numpy(zero_copy_only=False).astype(np.int64)
    counts = np.bincount(codes)
    k = int(counts.max()) if len(counts) else 0
    if len(counts) == 0 or counts.min() != k or k < 2:
        worst = int(np.argmin(counts)) if len(counts) else None
        detail = f"prompt {encoded.dictionary[worst].as_py()!r} has {counts[worst]}" if worst is not None else "no candidates"
        raise ValueError(f"every prompt needs the same number K >= 2 of candidates (max {k}); {detail}")
    order = np.lexsort((cand_idx, codes))
    return encoded.dictionary.to_pylist(), order.reshape(len(counts), k)


def _sample_groups(rng: np.random.Generator, per_user: np.ndarray, n_groups: int) -> np.ndarray:
    """Concatenated per-user draws of distinct group indices (with replacement only when a user
    needs more groups than exist)."""
    parts = [rng.choice(n_groups, size=int(m), replace=bool(m > n_groups)) for m in per_user]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def make_pairs(
    users: pa.Table,
    prompts: pa.Table,
    candidates: pa.Table,
    *,
    heldout_pairs_per_user: int = 8,
    top_bottom_fraction: float = 0.5,
    seed: int = 0,
    start_time: datetime = _EPOCH,
    span_days: float = 30.0,
) -> pa.Table:
    """Preference pairs of every user over the candidate pool (spec latent-dpo.md §4.1 step 5).

    Per user, `n_pairs` train pairs from distinct train-split prompts: round(n_pairs *
    top_bottom_fraction) "top_bottom" pairs — the K candidates ranked by the user's hidden reward
    give (rank 1, rank K-1) and (rank 2, rank K) — and the rest "random" pairs of two candidates
    labelled by a Bradley-Terry draw at the user's temperature (label noise). Plus
    `heldout_pairs_per_user` held-out pairs from val-split prompts, same mix, labelled by the
    noiseless reward. Pairs with tied rewards (held-out, top_bottom) or identical texts are dropped,
    as are exact duplicates. Vectorised over users (10k users x 64 pairs: about a second).

    Returns:
        pairs table (PAIRS_SCHEMA) ordered by user, split (train first), created_at.

    Raises:
        ValueError: missing columns/features, unequal K per prompt, no train (or val) prompts.
    """
    if not 0.0 <= top_bottom_fraction <= 1.0:
        raise ValueError(f"top_bottom_fraction={top_bottom_fraction!r} must be in [0, 1]")
    if heldout_pairs_per_user < 0:
        raise ValueError(f"heldout_pairs_per_user={heldout_pairs_per_user!r} must be >= 0")
    for name, table, cols in (
        ("users", users, USERS_SCHEMA.names),
        ("prompts", prompts, ("prompt_id", "split", "prompt")),
        ("candidates", candidates, ("candidate_id", "prompt_id", "cand_idx", "text")),
    ):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{name} table lacks columns {missing}; has {table.column_names}")

    rng = np.random.default_rng(seed)
    group_prompt_ids, cand_matrix = _group_candidates(candidates)  # (P, K)
    n_groups, k = cand_matrix.shape
    prompt_row = {pid: i for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
    orphans = [p for p in group_prompt_ids if p not in prompt_row]
    if orphans:
        raise ValueError(f"{len(orphans)} candidate prompt_ids are not in prompts, e.g. {orphans[:3]}")
    group_row = np.array([prompt_row[p] for p in group_prompt_ids], dtype=np.int64)  # (P,)
    prompt_split = np.asarray(prompts.column("split").to_pylist(), dtype=object)
    group_split = prompt_split[group_row]

    weight_dicts = [json.loads(w) for w in users.column("weights_json").to_pylist()]
    feats = sorted({f for w in weight_dicts for f in w})
    missing = [f for f in feats if f not in candidates.column_names]
    if missing:
        raise ValueError(f"candidates lack feature columns {missing} used by user weights; run candidates.annotate()")
    W = np.array([[w.get(f, 0.0) for f in feats] for w in weight_dicts], dtype=np.float64).reshape(len(weight_dicts), len(feats))
    F = [candidates.column(f).to_numpy(zero_copy_only=False).astype(np.float64)[cand_matrix] for f in feats]  # F x (P, K)
    temperature = users.column("bt_temperature").to_numpy(zero_copy_only=False).astype(np.float64)
    n_train = users.column("n_pairs").to_numpy(zero_copy_only=False).astype(np.int64)
    n_users = users.num_rows

    def rewards(user: np.ndarray, group: np.ndarray, col: np.ndarray | None = None) -> np.ndarray:
        """r[s, :] for all K candidates (col None) or r[s] of candidate col[s]; float64."""
        out = np.zeros((len(user), k) if col is None else len(user))
        for j in range(len(feats)):
            x = F[j][group] if col is None else F[j][group, col]
            out += (W[user, j][:, None] if col is None else W[user, j]) * x
        return out

    pieces = []
    pairs_per_prompt = 1 if k == 2 else 2
    for split, per_user, source_split, noisy in (
        ("train", n_train, "train", True),
        ("heldout", np.full(n_users, heldout_pairs_per_user, dtype=np.int64), "val", False),
    ):
        pool = np.flatnonzero(group_split == source_split)
        if per_user.sum() == 0:
            continue
        if len(pool) == 0:
            raise ValueError(
                f"no {source_split!r}-split prompts with candidates for the {split} pairs; "
                + ("pass heldout_pairs_per_user=0 or " if split == "heldout" else "")
                + "generate candidates for those prompts"
            )
        n_tb = np.rint(per_user * top_bottom_fraction).astype(np.int64)
        tb_prompts = -(-n_tb // pairs_per_prompt)  # ceil
        n_rand = per_user - n_tb
        drawn = tb_prompts + n_rand
        groups = pool[_sample_groups(rng, drawn, len(pool))]
        user_of = np.repeat(np.arange(n_users), drawn)
        # Within each user's draw: the first tb_prompts groups are top_bottom, the rest random.
        offset = np.arange(len(user_of)) - np.repeat(np.cumsum(drawn) - drawn, drawn)
        is_tb = offset < tb_prompts[user_of]

        # top_bottom: rank the K candidates by the user's reward (stable: ties by cand_idx).
        u_tb, g_tb = user_of[is_tb], groups[is_tb]
        r_all = rewards(u_tb, g_tb)  # (S, K)
        rank = np.argsort(-r_all, axis=1, kind="stable")
        rows = np.arange(len(u_tb))
        if k == 2:
            ch, rj = rank[:, :1], rank[:, 1:]
        else:  # (rank 1, rank K-1), (rank 2, rank K): spec §4.1 step 5
            ch, rj = rank[:, [0, 1]], rank[:, [k - 2, k - 1]]
        tb_user = np.repeat(u_tb, pairs_per_prompt)
        tb_group = np.repeat(g_tb, pairs_per_prompt)
        tb_ch, tb_rj = ch.reshape(-1), rj.reshape(-1)
        r_ch = r_all[np.repeat(rows, pairs_per_prompt), tb_ch]
        r_rj = r_all[np.repeat(rows, pairs_per_prompt), tb_rj]
        # keep the first n_tb pairs of each user (an odd count uses one pair of the last prompt)
        tb_slots = tb_prompts * pairs_per_prompt
        within = np.arange(len(tb_user)) - np.repeat(np.cumsum(tb_slots) - tb_slots, tb_slots)
        keep_tb = (within < n_tb[tb_user]) & (r_ch > r_rj)

        # random: two distinct candidates, labelled by a BT draw (train) or the true reward (heldout)
        u_r, g_r = user_of[~is_tb], groups[~is_tb]
        a = rng.integers(0, k, size=len(u_r))
        b = (a + rng.integers(1, k, size=len(u_r))) % k
        r_a, r_b = rewards(u_r, g_r, a), rewards(u_r, g_r, b)
        if noisy:
            p_a = 1.0 / (1.0 + np.exp(-(r_a - r_b) / temperature[u_r]))
            a_wins = rng.random(len(u_r)) < p_a
            keep_r = np.ones(len(u_r), dtype=bool)
        else:
            a_wins = r_a > r_b
            keep_r = r_a != r_b
        r_ch_idx = np.where(a_wins, a, b)
        r_rj_idx = np.where(a_wins, b, a)

        user = np.concatenate([tb_user[keep_tb], u_r[keep_r]])
        group = np.concatenate([tb_group[keep_tb], g_r[keep_r]])
        chosen = cand_matrix[group, np.concatenate([tb_ch[keep_tb], r_ch_idx[keep_r]])]
        rejected = cand_matrix[group, np.concatenate([tb_rj[keep_tb], r_rj_idx[keep_r]])]
        kind = np.concatenate([np.zeros(keep_tb.sum(), np.int8), np.ones(keep_r.sum(), np.int8)])
        split_code = np.full(len(user), 0 if split == "train" else 1, dtype=np.int8)
        pieces.append((user, group, chosen, rejected, kind, split_code))

    if not pieces:
        return PAIRS_SCHEMA.empty_table()
    user, group, chosen, rejected, kind, split_code = (np.concatenate(x) for x in zip(*pieces))

    # exact duplicates (a prompt drawn twice when a user needs more prompts than the pool has)
    _, first = np.unique(np.stack([user, chosen, rejected, split_code.astype(np.int64)], axis=1), axis=0, return_index=True)
    keep = np.zeros(len(user), dtype=bool)
    keep[first] = True
    text = candidates.column("text")
    same_text = pc.equal(text.take(pa.array(chosen)), text.take(pa.array(rejected))).to_numpy(zero_copy_only=False)
    keep &= ~np.asarray(same_text, dtype=bool)
    if (~keep).sum():
        log.info("make_pairs: dropped %d duplicate or identical-text pairs", int((~keep).sum()))
    user, group, chosen, rejected, kind, split_code = (x[keep] for x in (user, group, chosen, rejected, kind, split_code))

    span_us = int(span_days * 86400 * 1e6)
    created_us = int(start_time.timestamp() * 1e6) + rng.integers(0, max(span_us, 1), size=len(user))
    order = np.lexsort((created_us, split_code, user))
    user, group, chosen, rejected, kind, split_code, created_us = (
        x[order] for x in (user, group, chosen, rejected, kind, split_code, created_us)
    )
    cand_ids = candidates.column("candidate_id")
    idx = lambda x: pa.array(x, type=pa.int64())  # noqa: E731
    table = pa.table(
        {
            "user_id": users.column("user_id").take(idx(user)),
            "prompt": prompts.column("prompt").take(idx(group_row[group])),
            "chosen": text.take(idx(chosen)),
            "rejected": text.take(idx(rejected)),
            "created_at": pa.array(created_us, pa.timestamp("us", tz="UTC")),
            "weight": pa.array(np.ones(len(user), np.float32)),
            "prompt_id": prompts.column("prompt_id").take(idx(group_row[group])),
            "chosen_id": cand_ids.take(idx(chosen)),
            "rejected_id": cand_ids.take(idx(rejected)),
            "split": pa.DictionaryArray.from_arrays(pa.array(split_code), ["train", "heldout"]).cast(pa.string()),
            "pair_kind": pa.DictionaryArray.from_arrays(pa.array(kind), list(PAIR_KINDS)).cast(pa.string()),
        }
    )
    return table.cast(PAIRS_SCHEMA)
