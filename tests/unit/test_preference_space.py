"""The population preference space (tasks/models/preference_space.py) and the CLaP posterior that carries it."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from latentpref.tasks.models.clap import CLaP, CLaPConfig, load_clap, save_clap
from latentpref.tasks.models.preference_space import PreferenceSpace, fit_preference_space, pooled_states
from latentpref.tasks.models.registry import load_base_model


def _population(n_users=40, pairs_per_user=30, d=24, seed=0):
    """Users whose hidden read-out is +-1 x a shared direction `a` plus a little of a second one `b`: the space
    must find `a` first, then `b`."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], b[1] = 1.0, 1.0
    sign = torch.where(torch.rand(n_users, generator=g) < 0.5, -1.0, 1.0)
    w = sign[:, None] * a * 3 + torch.randn(n_users, 1, generator=g) * b * 1.0
    users = torch.arange(n_users).repeat_interleave(pairs_per_user)
    x1, x2 = torch.randn(len(users), d, generator=g), torch.randn(len(users), d, generator=g)
    first_wins = ((x1 - x2) * w[users]).sum(-1) > 0
    chosen = torch.where(first_wins[:, None], x1, x2)
    rejected = torch.where(first_wins[:, None], x2, x1)
    return chosen, rejected, users, n_users, a, b


def test_space_finds_the_directions_users_differ_in():
    chosen, rejected, users, n, a, b = _population()
    space = fit_preference_space(chosen, rejected, users, n, dims=2, layer=3)
    assert space.directions.shape == (2, 24)
    assert torch.allclose(space.directions @ space.directions.T, torch.eye(2), atol=1e-4)   # orthonormal
    assert abs(float(space.directions[0] @ a)) > 0.9          # the main axis of disagreement first
    assert abs(float(space.directions[1] @ b)) > 0.6
    coords = space.coords(torch.cat([chosen, rejected]))
    assert torch.allclose(coords.std(0), torch.ones(2), atol=1e-3)   # unit spread over the fitted texts
    # five pairs place a user on the main axis (which side), and that predicts their other choices
    acc = []
    for u in range(n):
        sel = users == u
        diff = (space.coords(chosen[sel]) - space.coords(rejected[sel]))[:, 0]
        side = torch.sign(diff[:5].sum())
        acc.append(float((side * diff[5:] > 0).float().mean()))
    assert sum(acc) / n > 0.75


def test_space_refuses_bad_inputs():
    chosen, rejected, users, n, *_ = _population(n_users=4, pairs_per_user=3)
    with pytest.raises(ValueError, match="dims"):
        fit_preference_space(chosen, rejected, users, n, dims=5, layer=1)
    with pytest.raises(ValueError, match="differ"):
        fit_preference_space(chosen, rejected[:-1], users, n, dims=1, layer=1)
    with pytest.raises(ValueError, match="no pairs"):
        fit_preference_space(chosen[:0], rejected[:0], users[:0], n, dims=1, layer=1)


@functools.cache
def _base(spec: str):
    return load_base_model(spec, seed=0)[0]


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_pooled_states_match_the_full_run_and_ignore_padding(spec):
    base = _base(spec)
    g = torch.Generator().manual_seed(0)
    p_ids, r_ids = torch.randint(0, 1000, (2, 4), generator=g), torch.randint(0, 1000, (2, 3), generator=g)
    p_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])     # left-padded prompt
    r_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])           # right-padded response
    got = pooled_states(base, p_ids, p_mask, r_ids, r_mask, layer=1)
    # reference: the full model's hidden_states[1], one row alone without pads
    ids = torch.cat([p_ids[0, 1:], r_ids[0, :2]])[None]
    with torch.no_grad():
        ref = base.base_model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, 3:].float().mean(0)
    assert torch.allclose(got[0], ref, atol=1e-4)
    with pytest.raises(ValueError, match="preference layer"):
        pooled_states(base, p_ids, p_mask, r_ids, r_mask, layer=99)


def test_clap_posterior_carries_the_space_and_saves_it(tmp_path):
    base = copy.deepcopy(_base("tiny-gpt2"))
    d = base.config.hidden_size
    clap = CLaP(base, CLaPConfig(preference_dims=2, preference_layer=1, preference_std=0.1)).eval()
    g = torch.Generator().manual_seed(1)
    space = PreferenceSpace(torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T.contiguous(),
                            torch.randn(d, generator=g), torch.tensor([2.0, 0.5]), layer=1)
    clap.set_preference_space(space)
    p_ids, p_mask = torch.randint(0, 1000, (3, 4), generator=g), torch.ones(3, 4, dtype=torch.long)
    r_ids, r_mask = torch.randint(0, 1000, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.long)
    mu, logvar = clap.encode(p_ids, p_mask, r_ids, r_mask)
    want = space.coords(pooled_states(base, p_ids, p_mask, r_ids, r_mask, layer=1))
    assert torch.allclose(mu[:, :2], want, atol=1e-5)
    assert torch.allclose(logvar[:, :2], torch.full((3, 2), 2 * math.log(0.1)))
    assert mu.shape == (3, 32) and mu.dtype == torch.float32
    save_clap(clap, tmp_path / "c")
    again = load_clap(tmp_path / "c").eval()
    assert torch.allclose(again.encode(p_ids, p_mask, r_ids, r_mask)[0], mu, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        clap.set_preference_space(PreferenceSpace(space.directions, space.mean, space.scale, layer=2))
    with pytest.raises(ValueError, match="preference_dims"):
        CLaPConfig(preference_dims=40)
