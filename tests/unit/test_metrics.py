"""Evaluation metrics (tasks/evaluate/metrics.py): hand-computed values, CI behaviour, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from latentpref.tasks.evaluate import metrics as m
from latentpref.tasks.models.registry import load_base_model



def test_win_rate_counts_ties_half():
    # wins: 3 > 1, tie 2 == 2 (0.5), loss 0 < 5, win 4 > 3 -> (1 + 0.5 + 0 + 1) / 4
    assert m.win_rate([3, 2, 0, 4], [1, 2, 5, 3]) == pytest.approx(2.5 / 4)
    assert m.win_rate(torch.tensor([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # identical -> 0.5


def test_preference_accuracy_and_mean_reward():
    # chosen > rejected in 2 of 4, one tie -> (2 + 0.5) / 4
    assert m.preference_accuracy([0.9, 0.2, 0.5, 0.1], [0.1, 0.3, 0.5, 0.0]) == pytest.approx(0.75 - 0.125)
    assert m.mean_reward([1.0, 2.0, 6.0]) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: m.win_rate([1, 2], [1]), "rewards has 2 values but reference_rewards has 1"),
        (lambda: m.mean_reward([]), "rewards is empty"),
        (lambda: m.mean_reward([1.0, float("nan")]), r"non-finite values at positions \[1\]"),
        (lambda: m.preference_accuracy([[1.0]], [[0.0]]), "must be 1-D"),
        (lambda: m.bootstrap_ci([1.0], alpha=1.5), "alpha=1.5"),
    ],
)
def test_bad_inputs_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    mean, low, high = m.bootstrap_ci(values, n_boot=500, seed=7)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    # normal-theory half width 1.96 * sd / sqrt(n) ~ 0.14; the bootstrap should be close
    assert (high - low) / 2 == pytest.approx(1.96 * values.std() / math.sqrt(200), rel=0.2)
    assert m.bootstrap_ci(values, n_boot=500, seed=7) == (mean, low, high)
    assert m.bootstrap_ci(values, n_boot=500, seed=8) != (mean, low, high)
    assert m.bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
    narrow = m.bootstrap_ci(values, n_boot=500, alpha=0.5, seed=7)
    assert low < narrow[1] < narrow[2] < high


def test_summarise_groups_and_cis():
    rows = [
        {"user_id": "u1", "method": "lora", "win": 1.0, "acc": 0.5},
        {"user_id": "u2", "method": "lora", "win": 0.0, "acc": 0.7},
        {"user_id": "u1", "method": "latent", "win": 1.0, "acc": None},
        {"user_id": "u2", "method": "latent", "win": 1.0, "acc": 0.9},
        {"user_id": "u3", "method": "latent", "win": 0.5, "acc": float("nan")},
    ]
    out = m.summarise(rows, group="method", columns=["win", "acc"], n_boot=200)
    assert out.column_names == ["method", "n", "win_mean", "win_low", "win_high", "acc_mean", "acc_low", "acc_high"]
    got = out.to_pylist()
    assert [r["method"] for r in got] == ["latent", "lora"]
    assert [r["n"] for r in got] == [3, 2]
    assert got[0]["win_mean"] == pytest.approx(2.5 / 3) and got[1]["win_mean"] == pytest.approx(0.5)
    assert got[0]["acc_mean"] == pytest.approx(0.9)  # None and NaN skipped
    assert got[0]["acc_low"] == got[0]["acc_high"] == pytest.approx(0.9)
    for r in got:
        assert r["win_low"] <= r["win_mean"] <= r["win_high"]
    # default columns = numeric ones; pyarrow and pandas inputs give the same table; group by two keys
    table = pa.Table.from_pylist(rows)
    assert m.summarise(table, n_boot=200).to_pylist() == m.summarise(table.to_pandas(), n_boot=200).to_pylist()
    two = m.summarise(table, group=["method", "user_id"], columns=["win"], n_boot=10)
    assert two.num_rows == 5 and two.column_names[:3] == ["method", "user_id", "n"]
    with pytest.raises(ValueError, match="group column 'cohort'"):
        m.summarise(table, group="cohort")


@pytest.fixture(scope="module")
def gpt2():
    return load_base_model("tiny-gpt2", seed=0)


def test_perplexity_matches_hf_loss_and_ignores_padding(gpt2):
    model, tok = gpt2
    texts = ["The movie was great fun and I loved it.", "Bad.", "x"]  # "x" is one token: nothing to score
    ids = [torch.tensor([tok(t)["input_ids"]]) for t in texts[:2]]
    with torch.no_grad():
        # HF mean NLL over the n-1 predicted tokens of each text; pool by token counts
        nll = [float(model(input_ids=i, labels=i).loss) * (i.shape[1] - 1) for i in ids]
    expected = math.exp(sum(nll) / sum(i.shape[1] - 1 for i in ids))
    assert m.perplexity(model, tok, texts, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert m.perplexity(model, tok, texts, batch_size=1) == pytest.approx(expected, rel=1e-5)
    # a random tiny model is close to uniform over the 50257-token vocabulary
    assert 1e3 < expected < 1e6
    with pytest.raises(ValueError, match="none of the 1 texts"):
        m.perplexity(model, tok, ["x"])
    assert not model.training


def test_ridge_probe_finds_a_linear_signal_within_groups_and_ignores_group_offsets():
    from latentpref.tasks.evaluate.metrics import ridge_probe_correlation
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 8)
    x = rng.normal(size=(320, 6))
    offsets = rng.normal(scale=10.0, size=40)[groups]       # a per-prompt shift the probe must not count
    y = x[:, 2] + 0.1 * rng.normal(size=320) + offsets
    assert ridge_probe_correlation(x, y, groups) > 0.95
    # features that only know the prompt carry nothing within it
    prompt_only = np.stack([offsets, offsets ** 2], axis=1)
    assert abs(ridge_probe_correlation(prompt_only, y, groups)) < 0.2
    noise = rng.normal(size=(320, 6))
    assert abs(ridge_probe_correlation(noise, y, groups)) < 0.25


def test_ridge_probe_rejects_bad_input():
    from latentpref.tasks.evaluate.metrics import ridge_probe_correlation
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="share their rows"):
        ridge_probe_correlation(x, [1.0, 2.0, 3.0], ["a", "a", "b"])
    with pytest.raises(ValueError, match="groups for 2 folds"):
        ridge_probe_correlation(x, [1.0, 2.0, 3.0, 4.0], ["a"] * 4)
    with pytest.raises(ValueError, match="constant"):
        ridge_probe_correlation(np.ones((4, 2)), [1.0, 1.0, 2.0, 2.0], ["a", "a", "b", "b"])


def test_linear_pair_accuracy_per_user_directions():
    """Two users with opposite linear tastes in the first feature, noise elsewhere: per-user fits rank each user's
    held-out pairs right; one shared model could not (it would get half)."""
    from latentpref.tasks.evaluate.metrics import linear_pair_accuracy
    rng = np.random.default_rng(0)

    def pairs(n):
        d = rng.normal(size=(n, 4))
        users = np.array(["a", "b"] * (n // 2))
        sign = np.where(users == "a", 1.0, -1.0)
        d[:, 0] = sign * np.abs(d[:, 0]) + 0.1 * sign   # chosen - rejected along each user's direction
        return d, users

    tr, utr = pairs(80)
    te, ute = pairs(40)
    assert linear_pair_accuracy(tr, utr, te, ute) > 0.95
    # features that carry nothing: near chance
    assert abs(linear_pair_accuracy(rng.normal(size=(80, 4)), utr, rng.normal(size=(400, 4)),
                                    np.array(["a", "b"] * 200)) - 0.5) < 0.1
    with pytest.raises(ValueError, match="row for row"):
        linear_pair_accuracy(tr, utr[:3], te, ute)
