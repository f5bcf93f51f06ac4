"""Issue 27's personal measures (tasks/evaluate/personal.py) on hand-made per-user rows: known values."""
import json

import numpy as np
import pyarrow as pa
import pytest

from latentpref.tasks.data import users as users_lib
from latentpref.tasks.evaluate import personal
from latentpref.tasks.evaluate.evaluate import summarise, summarise_by_group


def _users(weights: dict[str, dict[str, float]], cohorts: dict[str, str]) -> pa.Table:
    ids = sorted(weights)
    return pa.table({"user_id": ids, "cohort": [cohorts[u] for u in ids],
                     "weights_json": [json.dumps(weights[u]) for u in ids]})


def _row(user, method, sentiment, group="unseen", cohort="c"):
    feats = {"sentiment": list(map(float, sentiment)), "length_words": [10.0] * len(sentiment)}
    return {"user_id": user, "method": method, "cohort": cohort, "group": group,
            "win_rate_vs_prior": 0.5, "text_features_json": json.dumps(feats),
            "trainable_params": 0, "artifact_bytes": 0}


# pos likes sentiment, neg dislikes it, pos2 is pos's twin: pos's least similar user is neg and vice versa
WEIGHTS = {"pos": {"sentiment": 1.0}, "neg": {"sentiment": -1.0}, "pos2": {"sentiment": 0.9, "length_words": 0.01}}
COHORTS = {"pos": "positive", "neg": "negative", "pos2": "positive"}


def test_least_similar_picks_the_opposite_taste():
    partners = personal.least_similar(WEIGHTS, {"sentiment": 1.0, "length_words": 1.0})
    assert partners == {"pos": "neg", "neg": "pos", "pos2": "neg"}
    assert personal.least_similar({"a": {"x": 1.0}}, {}) == {}


def test_own_vs_swapped_known_values():
    # personal policy: pos writes positive text, neg negative; each judged by their own reward beats the partner's
    rows = [_row("pos", "latent_dpo", [1, 1, 1, 1]), _row("neg", "latent_dpo", [-1, -1, -1, -1]),
            _row("pos2", "latent_dpo", [1, -1, 1, -1]),
            # a population policy: everyone writes the same text -> 0.5 for everyone
            _row("pos", "lora_dpo", [1, 0, 1, 0]), _row("neg", "lora_dpo", [1, 0, 1, 0]),
            _row("pos", "clap_prior", [0, 0, 0, 0]), _row("neg", "clap_prior", [0, 0, 0, 0])]
    out = personal.add_personal_measures(pa.Table.from_pylist(rows), _users(WEIGHTS, COHORTS)).to_pylist()
    got = {(r["user_id"], r["method"]): (r["own_vs_swapped"], r["swap_partner"]) for r in out}
    assert got["pos", "latent_dpo"] == (1.0, "neg")
    assert got["neg", "latent_dpo"] == (1.0, "pos")
    assert got["pos2", "latent_dpo"] == (0.75, "neg")   # wins 2 prompts, ties 2 (counted half)
    assert got["pos", "lora_dpo"] == (0.5, "neg") and got["neg", "lora_dpo"] == (0.5, "pos")
    assert got["pos", "clap_prior"] == (None, None)


def test_own_vs_swapped_refuses_rows_without_features_or_users():
    table = pa.Table.from_pylist([_row("pos", "latent_dpo", [1])]).drop_columns(["text_features_json"])
    with pytest.raises(ValueError, match="text_features_json"):
        personal.add_personal_measures(table, _users(WEIGHTS, COHORTS))
    with pytest.raises(ValueError, match="not in the hidden users"):
        personal.add_personal_measures(pa.Table.from_pylist([_row("ghost", "latent_dpo", [1])]),
                                       _users(WEIGHTS, COHORTS))


def test_cohort_matrix_rows_judge_columns_write():
    rows = [_row("pos", "latent_dpo", [1, 1]), _row("neg", "latent_dpo", [-1, -1]), _row("pos2", "latent_dpo", [0, 0])]
    m = personal.cohort_reward_matrix(pa.Table.from_pylist(rows), _users(WEIGHTS, COHORTS), "latent_dpo")
    assert m["judges"] == ["negative", "positive"] == m["writers"]
    r = np.array(m["mean_reward"])
    # negative judge (neg: -sentiment): negative writers' text scores +1, positive writers' (pos 1, pos2 0) -0.5
    assert r[0, 0] == pytest.approx(1.0) and r[0, 1] == pytest.approx(-0.5)
    # positive judges (pos: sentiment; pos2: 0.9 sentiment + 0.01 length): on positive writers' texts
    assert r[1, 1] == pytest.approx(np.mean([1.0, 0.0, 0.9 + 0.1, 0.0 + 0.1]))
    assert np.argmax(r[0]) == 0 and np.argmax(r[1]) == 1   # personal: each row peaks on its diagonal
    assert m["users"] == {"negative": 1, "positive": 2}
    assert personal.cohort_reward_matrix(pa.Table.from_pylist(rows), _users(WEIGHTS, COHORTS), "lora_dpo") is None


def test_evaluation_group():
    assert personal.evaluation_group("population", clap_read_pairs=True) == "seen"
    assert personal.evaluation_group("population", clap_read_pairs=False) == "unseen"
    assert personal.evaluation_group("holdout", clap_read_pairs=True) == "unseen"
    assert personal.evaluation_group(users_lib.OUT_OF_COHORT, clap_read_pairs=True) == "out_of_cohort"


def test_summarise_by_group_keeps_groups_apart():
    rows = [dict(_row(u, "latent_dpo", [1], group=g), win_rate_vs_prior=w)
            for u, g, w in (("a", "unseen", 1.0), ("b", "unseen", 0.0), ("c", "out_of_cohort", 1.0))]
    table = pa.Table.from_pylist(rows)
    by_group = {r["group"]: r for r in summarise_by_group(table).to_pylist()}
    assert by_group["unseen"]["users"] == 2 and by_group["unseen"]["win_rate_vs_prior"] == 0.5
    assert by_group["out_of_cohort"]["win_rate_vs_prior"] == 1.0
    assert summarise(table).to_pylist()[0]["win_rate_vs_prior"] == pytest.approx(2 / 3)


def test_population_groups_and_out_of_cohort_users():
    stats = {f: (0.0, 1.0) for f in ("sentiment", "abs_sentiment", "length_words", "exclamation_rate",
                                     "question_rate", "long_word_rate", "first_person_rate", "unique_word_rate")}
    plain = users_lib.make_population(24, feature_stats=stats, seed=3)
    grouped = users_lib.make_population(24, feature_stats=stats, seed=3, holdout_share=0.25, n_out_of_cohort=5)
    assert grouped.num_rows == 29
    # turning the groups on leaves the cohort users as they were
    for col in ("user_id", "cohort", "weights_json", "n_pairs"):
        assert grouped[col].to_pylist()[:24] == plain[col].to_pylist()
    groups = users_lib.user_groups(grouped)
    assert groups.count("holdout") == 6 and groups.count("out_of_cohort") == 5
    held = [c for c, g in zip(grouped["cohort"].to_pylist(), groups) if g == "holdout"]
    assert len(set(held)) == 6                          # spread over the six cohorts
    ooc = [json.loads(w) for w, g in zip(grouped["weights_json"].to_pylist(), groups) if g == "out_of_cohort"]
    assert all(len(w) == len(stats) for w in ooc)       # a mixture of every feature
    signs = np.sign([[w[f] for f in sorted(stats)] for w in ooc])
    assert (signs > 0).any() and (signs < 0).any()      # random signs
    assert set(grouped["cohort"].to_pylist()[24:]) == {users_lib.OUT_OF_COHORT}
    assert users_lib.user_groups(plain.drop_columns(["group"])) == ["population"] * 24
    with pytest.raises(ValueError, match="holdout_share"):
        users_lib.make_population(4, feature_stats=stats, holdout_share=1.0)


def test_summary_fit_seconds_counts_the_users_timed_alone():
    """Latent users timed alone (like-for-like with the baselines) make the summary's fit_seconds; the others carry
    the night's batched per-user seconds, which would mix two costs."""
    rows = [dict(_row(u, "latent_dpo", [1]), fit_seconds=s, fit_timed_alone=a)
            for u, s, a in (("a", 2.0, True), ("b", 4.0, True), ("c", 0.01, False))]
    assert summarise(pa.Table.from_pylist(rows)).to_pylist()[0]["fit_seconds"] == 3.0
    untimed = [dict(r, fit_timed_alone=None) for r in rows]
    assert summarise(pa.Table.from_pylist(untimed)).to_pylist()[0]["fit_seconds"] == pytest.approx(6.01 / 3)
