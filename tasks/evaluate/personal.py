"""Is personalisation personal? Measures over all evaluated users of a night, computed after the fan-out from the
per-user rows of `evaluate.evaluate_users` (each row carries the per-prompt scorer features of its texts, and every
user's texts answer the same prompts with the same sampling seed, so texts of different users compare prompt by
prompt). Pure numpy/pyarrow: no model runs here.

- `own_vs_swapped`: a user's text against the text written under the policy of the evaluated user whose hidden
  reward is least similar (lowest cosine of the weights), judged by the user's own reward. A method that only learnt
  what most users share writes the same for both and scores 0.5; a personal one scores above.
- the cohort x cohort picture: mean hidden reward of the texts of each writer cohort's policies under each judge
  cohort's rewards. Personal = each row peaks on the diagonal.
- the user groups the figures are reported for: "seen" (users whose pairs the CLaP's training read), "unseen" (cohort
  users the CLaP's training never read), "out_of_cohort" (users outside every cohort, never read by the CLaP).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from latentpref.tasks.data import users as users_lib
from latentpref.tasks.evaluate import metrics

# rows that are not a user's policy: the same text for everyone (base_lm, clap_prior) or a ceiling drawn with the
# user's hidden reward (oracle_best_of_k); own_vs_swapped is not defined for them
NON_POLICY_METHODS = frozenset({"base_lm", "clap_prior", "oracle_best_of_k"})
GROUPS = ("seen", "unseen", "out_of_cohort")


def evaluation_group(stored_group: str, clap_read_pairs: bool) -> str:
    """The evaluation group of a user from its population group (users.USER_GROUPS) and whether the night's CLaP
    trained on population pairs: a "population" user counts as seen only when the CLaP actually read its pairs."""
    if stored_group == users_lib.OUT_OF_COHORT:
        return "out_of_cohort"
    if stored_group == "population" and clap_read_pairs:
        return "seen"
    return "unseen"


def _features(row_json: str) -> dict[str, np.ndarray]:
    return {f: np.asarray(v, dtype=np.float64) for f, v in json.loads(row_json).items()}


def feature_scale(per_user: pa.Table) -> dict[str, float]:
    """Std of each scorer feature over every text of the evaluation (1.0 where constant): the units in which users'
    weights are compared, so a feature's raw scale does not decide who is alike."""
    pooled: dict[str, list[np.ndarray]] = {}
    for js in per_user["text_features_json"].to_pylist():
        if js:
            for f, v in _features(js).items():
                pooled.setdefault(f, []).append(v)
    out = {}
    for f, parts in pooled.items():
        std = float(np.concatenate(parts).std())
        out[f] = std if np.isfinite(std) and std > 0 else 1.0
    return out


def least_similar(weights: dict[str, dict[str, float]], scale: dict[str, float]) -> dict[str, str]:
    """For each user, the other user whose weights (times each feature's scale) have the lowest cosine with theirs;
    ties go to the first in sorted id order. Needs at least two users."""
    ids = sorted(weights)
    if len(ids) < 2:
        return {}
    feats = sorted({f for w in weights.values() for f in w})
    mat = np.array([[weights[u].get(f, 0.0) * scale.get(f, 1.0) for f in feats] for u in ids])
    norm = np.linalg.norm(mat, axis=1, keepdims=True)
    unit = mat / np.where(norm > 0, norm, 1.0)
    cos = unit @ unit.T
    np.fill_diagonal(cos, np.inf)
    return {u: ids[int(np.argmin(cos[i]))] for i, u in enumerate(ids)}


def add_personal_measures(per_user: pa.Table, users_table: pa.Table) -> pa.Table:
    """`per_user` with `own_vs_swapped` and `swap_partner` (null for NON_POLICY_METHODS and for a method evaluated on
    fewer than two users). Partners are drawn among the users evaluated with the same method (baselines may run on a
    subset). Raises ValueError when a row lacks its text features or a user its hidden weights."""
    if "text_features_json" not in per_user.column_names:
        raise ValueError("per-user rows lack text_features_json (evaluate_users writes it); cannot swap texts")
    hidden = dict(zip(users_table["user_id"].to_pylist(), users_table["weights_json"].to_pylist()))
    rows = per_user.to_pylist()
    missing = sorted({r["user_id"] for r in rows} - set(hidden))
    if missing:
        raise ValueError(f"users {missing[:5]} are not in the hidden users table")
    scale = feature_scale(per_user)
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["method"] not in NON_POLICY_METHODS:
            by_method.setdefault(r["method"], {})[r["user_id"]] = r
    own: list[float | None] = [None] * len(rows)
    partner_of: list[str | None] = [None] * len(rows)
    index = {(r["user_id"], r["method"]): i for i, r in enumerate(rows)}
    for method, mine in by_method.items():
        partners = least_similar({u: json.loads(hidden[u]) for u in mine}, scale)
        for user, partner in partners.items():
            judge = hidden[user]
            r_own = users_lib.user_rewards(judge, _features(mine[user]["text_features_json"]))
            r_swap = users_lib.user_rewards(judge, _features(mine[partner]["text_features_json"]))
            i = index[(user, method)]
            own[i], partner_of[i] = metrics.win_rate(r_own, r_swap), partner
    return (per_user.append_column("own_vs_swapped", pa.array(own, pa.float64()))
            .append_column("swap_partner", pa.array(partner_of, pa.string())))


def cohort_reward_matrix(per_user: pa.Table, users_table: pa.Table, method: str) -> dict[str, Any] | None:
    """Rows = whose reward judges (cohort), columns = whose policies wrote (cohort): the mean over judge users of the
    row's cohort and writer users of the column's cohort of the judge's mean hidden reward of the writer's texts under
    `method`. None when the method has no rows. Users outside the cohorts form the cohort "out_of_cohort" (each with a
    taste of its own, so its diagonal is no "own taste" cell)."""
    hidden = {u: (c, w) for u, c, w in zip(users_table["user_id"].to_pylist(), users_table["cohort"].to_pylist(),
                                            users_table["weights_json"].to_pylist())}
    writers = [(r["user_id"], _features(r["text_features_json"]))
               for r in per_user.to_pylist() if r["method"] == method and r.get("text_features_json")]
    if not writers:
        return None
    # judges: every evaluated user (whatever methods ran for them), so the rows are the same for every method
    judge_ids = sorted(set(per_user["user_id"].to_pylist()))
    cohorts = sorted({hidden[u][0] for u in judge_ids} | {hidden[u][0] for u, _ in writers},
                     key=lambda c: (c == users_lib.OUT_OF_COHORT, c))
    total = np.zeros((len(cohorts), len(cohorts)))
    count = np.zeros_like(total)
    at = {c: k for k, c in enumerate(cohorts)}
    for j in judge_ids:
        cj, wj = hidden[j]
        for w, feats in writers:
            total[at[cj], at[hidden[w][0]]] += float(users_lib.user_rewards(wj, feats).mean())
            count[at[cj], at[hidden[w][0]]] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return {"judges": cohorts, "writers": cohorts,
            "mean_reward": [[None if not np.isfinite(v) else float(v) for v in row] for row in mean],
            "users": {c: sum(1 for u, _ in writers if hidden[u][0] == c) for c in cohorts}}
