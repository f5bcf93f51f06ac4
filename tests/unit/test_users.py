"""tasks/data/users.py: hidden user population and preference pairs (spec latent-dpo.md §4.1 steps 4-5)."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from latentpref.tasks.data import scorers, users

K = 8


def make_pool(n_prompts: int = 200, k: int = K, seed: int = 0):
    """Prompts (80 % train, 10 % val, 10 % test) and k candidates each with random features."""
    rng = np.random.default_rng(seed)
    pids = [f"p{i:04d}" for i in range(n_prompts)]
    split = ["train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test") for i in range(n_prompts)]
    prompts = pa.table({"prompt_id": pids, "doc_id": pids, "split": split,
                        "prompt": [f"prompt {i}" for i in range(n_prompts)], "reference": ["ref"] * n_prompts})
    cols = {
        "candidate_id": [f"{p}-{j}" for p in pids for j in range(k)],
        "prompt_id": [p for p in pids for _ in range(k)],
        "cand_idx": pa.array(np.tile(np.arange(k), n_prompts), pa.int32()),
        "text": [f"text {i}" for i in range(n_prompts * k)],
        "seed": pa.array(np.zeros(n_prompts * k, np.int64)),
    }
    for f in scorers.FEATURES:
        cols[f] = pa.array((rng.normal(size=n_prompts * k) * (3.0 if f == "length_words" else 0.5)).astype(np.float32))
    return prompts, pa.table(cols)


@pytest.fixture(scope="module")
def pool():
    return make_pool()


@pytest.fixture(scope="module")
def population(pool):
    return users.make_population(600, feature_stats=users.feature_stats(pool[1]), seed=1)


def hidden_rewards(pairs: pa.Table, users_table: pa.Table, candidates: pa.Table):
    """(reward of chosen, reward of rejected) per pair, recomputed with user_rewards."""
    weights = {u: json.loads(w) for u, w in zip(users_table.column("user_id").to_pylist(), users_table.column("weights_json").to_pylist())}
    row = {c: i for i, c in enumerate(candidates.column("candidate_id").to_pylist())}
    feats = {f: candidates.column(f).to_numpy() for f in scorers.FEATURES}
    user_ids = np.array(pairs.column("user_id").to_pylist())
    chosen = np.array([row[c] for c in pairs.column("chosen_id").to_pylist()])
    rejected = np.array([row[c] for c in pairs.column("rejected_id").to_pylist()])
    r_ch, r_rj = np.zeros(len(user_ids)), np.zeros(len(user_ids))
    for u in np.unique(user_ids):
        m = user_ids == u
        r_ch[m] = users.user_rewards(weights[u], {f: x[chosen[m]] for f, x in feats.items()})
        r_rj[m] = users.user_rewards(weights[u], {f: x[rejected[m]] for f, x in feats.items()})
    return r_ch, r_rj


def test_population_schema_cohorts_and_heavy_tail(population):
    assert population.schema == users.USERS_SCHEMA
    assert population.column("user_id").to_pylist()[:2] == ["u00000", "u00001"]
    shares = Counter(population.column("cohort").to_pylist())
    assert shares == {c: 100 for c in users.COHORTS}  # exact equal shares by default
    n_pairs = population.column("n_pairs").to_numpy()
    assert n_pairs.min() >= 2 and n_pairs.max() <= 256
    assert n_pairs.max() >= 4 * np.median(n_pairs)  # heavy tail
    t = population.column("bt_temperature").to_numpy()
    assert t.min() >= 0.1 - 1e-6 and t.max() <= 1.0 + 1e-6


def test_cohort_mix_and_determinism(pool):
    stats = users.feature_stats(pool[1])
    a = users.make_population(50, feature_stats=stats, cohort_mix={"positive": 3, "negative": 1}, seed=5)
    assert Counter(a.column("cohort").to_pylist()) == {"positive": 38, "negative": 12}
    assert users.make_population(50, feature_stats=stats, cohort_mix={"positive": 3, "negative": 1}, seed=5).equals(a)
    assert not users.make_population(50, feature_stats=stats, cohort_mix={"positive": 3, "negative": 1}, seed=6).equals(a)


def test_weights_are_cohort_direction_over_pool_std(pool, population):
    stats = users.feature_stats(pool[1])
    for cohort, weights_json in zip(population.column("cohort").to_pylist(), population.column("weights_json").to_pylist()):
        w = json.loads(weights_json)
        for feature, direction in users.COHORTS[cohort].items():
            scaled = w[feature] * stats[feature][1]  # back to std units
            assert abs(scaled - direction) < 0.5, (cohort, feature, scaled)


def test_population_errors_name_the_problem(pool):
    stats = users.feature_stats(pool[1])
    with pytest.raises(ValueError, match="'optimistic'"):
        users.make_population(5, feature_stats=stats, cohort_mix={"optimistic": 1.0})
    with pytest.raises(ValueError, match=r"cohort 'enthusiastic' uses \['exclamation_rate'\]"):
        users.make_population(5, feature_stats={"sentiment": (0.0, 1.0)}, cohort_mix={"enthusiastic": 1.0})


def test_user_rewards_linear_and_missing_feature():
    features = {"sentiment": np.array([0.5, -1.0]), "length_words": np.array([10.0, 20.0])}
    w = {"sentiment": 2.0, "length_words": -0.1}
    np.testing.assert_allclose(users.user_rewards(w, features), [2 * 0.5 - 1.0, -2.0 - 2.0])
    np.testing.assert_allclose(users.user_rewards(json.dumps(w), features), users.user_rewards(w, features))
    with pytest.raises(ValueError, match="sentiment_clf.*pass a classifier"):
        users.user_rewards({"sentiment_clf": 1.0}, features)


def test_pairs_schema_counts_and_splits(pool, population):
    prompts, candidates = pool
    pairs = users.make_pairs(population, prompts, candidates, heldout_pairs_per_user=8, seed=0)
    assert pairs.schema == users.PAIRS_SCHEMA
    split_of = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("split").to_pylist()))
    for split, prompt_split in (("train", "train"), ("heldout", "val")):
        sub = pairs.filter(pc.equal(pairs.column("split"), split))
        assert {split_of[p] for p in sub.column("prompt_id").to_pylist()} == {prompt_split}
    train = pairs.filter(pc.equal(pairs.column("split"), "train"))
    per_user = Counter(train.column("user_id").to_pylist())
    n_pairs = dict(zip(population.column("user_id").to_pylist(), population.column("n_pairs").to_pylist()))
    # at most n_pairs each; fewer only when top_bottom ties / duplicate draws are dropped
    assert all(per_user[u] <= n for u, n in n_pairs.items())
    assert sum(per_user.values()) >= 0.97 * sum(n for n in n_pairs.values())
    heldout = Counter(pairs.filter(pc.equal(pairs.column("split"), "heldout")).column("user_id").to_pylist())
    assert set(heldout.values()) == {8}
    kinds = Counter(train.column("pair_kind").to_pylist())
    assert abs(kinds["top_bottom"] / train.num_rows - 0.5) < 0.05
    assert pc.all(pc.equal(pairs.column("weight"), 1.0)).as_py()
    assert pairs.column("created_at").null_count == 0
    # ids and texts agree
    assert pairs.column("chosen").to_pylist()[:50] == [f"text {int(c.split('-')[0][1:]) * K + int(c.split('-')[1])}" for c in pairs.column("chosen_id").to_pylist()[:50]]
    assert users.make_pairs(population, prompts, candidates, seed=0).equals(pairs)


def test_top_bottom_and_heldout_pairs_prefer_higher_hidden_reward(pool, population):
    prompts, candidates = pool
    pairs = users.make_pairs(population.slice(0, 120), prompts, candidates, seed=2)
    exact = pairs.filter(pc.or_(pc.equal(pairs.column("pair_kind"), "top_bottom"), pc.equal(pairs.column("split"), "heldout")))
    r_ch, r_rj = hidden_rewards(exact, population, candidates)
    assert len(r_ch) > 1000 and (r_ch > r_rj).all()
    # top_bottom pairs are (rank 1, rank K-1) and (rank 2, rank K) of the user's ranking
    tb = pairs.filter(pc.and_(pc.equal(pairs.column("pair_kind"), "top_bottom"), pc.equal(pairs.column("split"), "train")))
    weights = dict(zip(population.column("user_id").to_pylist(), population.column("weights_json").to_pylist()))
    for row in tb.slice(0, 40).to_pylist():
        group = candidates.filter(pc.equal(candidates.column("prompt_id"), row["prompt_id"]))
        r = users.user_rewards(weights[row["user_id"]], {f: group.column(f).to_numpy() for f in scorers.FEATURES})
        ranked = [group.column("candidate_id")[int(i)].as_py() for i in np.argsort(-r)]
        assert (row["chosen_id"], row["rejected_id"]) in {(ranked[0], ranked[K - 2]), (ranked[1], ranked[K - 1])}


def test_bradley_terry_noise_rate_matches_temperature(pool):
    prompts, candidates = pool
    stats = users.feature_stats(candidates)
    pop = users.make_population(400, feature_stats=stats, seed=3, min_pairs=64, max_pairs=64, temperature_range=(0.5, 0.5))
    pairs = users.make_pairs(pop, prompts, candidates, top_bottom_fraction=0.0, heldout_pairs_per_user=0, seed=3)
    r_ch, r_rj = hidden_rewards(pairs, pop, candidates)
    flipped = np.mean(r_ch < r_rj)
    expected = np.mean(1.0 / (1.0 + np.exp(np.abs(r_ch - r_rj) / 0.5)))  # P(label flip) = sigmoid(-|dr| / T)
    assert 0.05 < flipped < 0.45
    assert abs(flipped - expected) < 0.015, (flipped, expected)
    colder = users.make_population(400, feature_stats=stats, seed=3, min_pairs=64, max_pairs=64, temperature_range=(0.05, 0.05))
    cold_pairs = users.make_pairs(colder, prompts, candidates, top_bottom_fraction=0.0, heldout_pairs_per_user=0, seed=3)
    r_ch, r_rj = hidden_rewards(cold_pairs, colder, candidates)
    assert np.mean(r_ch < r_rj) < flipped / 2


def test_pairs_errors(pool, population):
    prompts, candidates = pool
    no_val = prompts.set_column(2, "split", pa.array(["train"] * prompts.num_rows))
    with pytest.raises(ValueError, match="no 'val'-split prompts.*heldout_pairs_per_user=0"):
        users.make_pairs(population, no_val, candidates)
    ragged = candidates.slice(1)
    with pytest.raises(ValueError, match="same number K"):
        users.make_pairs(population, prompts, ragged)
    with pytest.raises(ValueError, match="lack feature columns"):
        users.make_pairs(population, prompts, candidates.drop_columns(["sentiment"]))


def test_pairs_for_a_large_population():
    # correctness at scale only; speed (10,000 users in ~1.3 s idle) is a benchmark's job, not a test's
    prompts, candidates = make_pool(n_prompts=500, k=32, seed=4)
    pop = users.make_population(2_000, feature_stats=users.feature_stats(candidates), seed=4)
    assert 50 < pop.column("n_pairs").to_numpy().mean() < 80
    pairs = users.make_pairs(pop, prompts, candidates, seed=4)
    assert pairs.num_rows > 100_000
    assert set(pairs["user_id"].to_pylist()) <= set(pop["user_id"].to_pylist())
