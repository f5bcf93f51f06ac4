"""CLaP stage 3, "follow" (tasks/train/follow.py, issue 28 lever 2): the follow adapter is zero at z = 0 (the prior's
text never moves), only it trains in stage 3, the population heads are the night's own fit, and a few steps of the
DPO-through-the-LM objective raise the user's margin on its pairs."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from latentpref.tasks.models.clap import CLaP, CLaPConfig, FollowAdapter, load_clap, save_clap
from latentpref.tasks.models.registry import load_base_model
from latentpref.tasks.train.fit_user import FitConfig
from latentpref.tasks.train.follow import (FollowObjective, FollowSettings, PopulationHeads, fit_population_heads,
                                           head_latents)
from latentpref.tasks.train.loop import PreferencePair, make_pair_batch, set_stage

PAIRS = [PreferencePair("The movie was", " great fun", " a bore", 0),
         PreferencePair("The movie was", " wonderful", " dull", 0),
         PreferencePair("A film that", " sparkles", " drags on", 0),
         PreferencePair("The movie was", " a bore", " great fun", 1),
         PreferencePair("The movie was", " dull", " wonderful", 1),
         PreferencePair("A film that", " drags on", " sparkles", 1)]


@functools.cache
def _base(spec: str):
    return load_base_model(spec, seed=0)


def _clap(spec: str = "tiny-llama", follow_rank: int = 8, preference_dims: int = 0) -> CLaP:
    torch.manual_seed(0)
    base = copy.deepcopy(_base(spec)[0])
    model = CLaP(base, CLaPConfig(latent_dim=8, n_query=2, follow_rank=follow_rank), base_spec=spec).train()
    with torch.no_grad():  # a non-trivial posterior head (CLaP starts standardized): posteriors differ per text
        model.encoder.h2z.weight.normal_(0, 0.5)
        model.encoder.h2z.bias.normal_(0, 0.1)
    return model


def test_follow_adapter_is_zero_at_the_prior_and_reads_its_dims():
    follow = FollowAdapter(3, 4, n_layers=2, width=5)
    with torch.no_grad():
        follow.out.normal_()
        follow.inner.bias.normal_()
    z = torch.randn(6, 8)
    assert torch.equal(follow(torch.zeros(2, 8)), torch.zeros(2, 2, 5))
    assert follow(z).shape == (2, 6, 5) and follow(z).abs().sum() > 0
    moved = z.clone()
    moved[:, 3:] += 10.0       # dims past in_dims are not read
    assert torch.allclose(follow(moved), follow(z))


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_trained_follow_adapter_leaves_the_prior_text_unchanged(spec):
    clap = _clap(spec).eval()
    batch = make_pair_batch(_base(spec)[1], PAIRS, max_prompt_tokens=8, max_response_tokens=4)
    zero = torch.zeros(len(PAIRS), 8)
    z = torch.randn(len(PAIRS), 8)
    before = [clap.response_logps(v, batch.prompt_ids, batch.prompt_mask, batch.chosen_ids, batch.chosen_mask)
              for v in (zero, z)]
    with torch.no_grad():
        clap.adapter.follow.out.normal_(0, 0.5)
    after = [clap.response_logps(v, batch.prompt_ids, batch.prompt_mask, batch.chosen_ids, batch.chosen_mask)
             for v in (zero, z)]
    assert torch.allclose(after[0], before[0], atol=1e-5)       # z = 0: the prior, exactly as before
    assert not torch.allclose(after[1], before[1], atol=1e-3)   # any other z: the follow adapter acts


def test_stage_three_trains_only_the_follow_adapter_and_stages_one_two_freeze_it():
    clap = _clap()
    set_stage(clap, 3)
    trainable = {n for n, p in clap.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.follow.") for n in trainable)
    set_stage(clap, 1)
    assert not any(p.requires_grad for p in clap.adapter.follow.parameters())
    assert any(p.requires_grad for p in clap.encoder.parameters())
    with pytest.raises(ValueError, match="follow adapter"):
        set_stage(_clap(follow_rank=0), 3)
    with pytest.raises(ValueError, match="follow_rank"):
        CLaPConfig(latent_type="discrete", follow_rank=4)


def test_follow_rank_round_trips_through_save_and_load(tmp_path):
    clap = _clap()
    with torch.no_grad():
        clap.adapter.follow.out.normal_()
    save_clap(clap, tmp_path / "clap")
    again = load_clap(tmp_path / "clap")
    assert again.cfg.follow_rank == 8
    assert torch.equal(again.adapter.follow.out, clap.adapter.follow.out)


def test_population_heads_are_the_nights_fit_and_give_one_latent_per_pair():
    clap = _clap().eval()
    tokenizer = _base("tiny-llama")[1]
    cfg = FitConfig(steps=5, lr=1e-2, n_samples=4)
    heads = fit_population_heads(clap, tokenizer, PAIRS, 2, cfg, prompt_tokens=8, response_tokens=4)
    assert heads.weight.shape[0] == 2 and heads.weight.abs().sum() > 0
    batch = make_pair_batch(tokenizer, PAIRS, max_prompt_tokens=8, max_response_tokens=4)
    z = head_latents(heads, clap.encoder.features(batch.prompt_ids, batch.prompt_mask), batch.user_index)
    assert z.shape == (len(PAIRS), 8) and z.dtype == torch.float32
    # the same prompt, two users with opposite tastes: two different latents
    assert not torch.allclose(z[0], z[3])
    with pytest.raises(ValueError, match="train pairs"):
        fit_population_heads(clap, tokenizer, [], 2, cfg, prompt_tokens=8, response_tokens=4)


def test_a_few_follow_steps_raise_the_users_margin():
    clap = _clap()
    tokenizer = _base("tiny-llama")[1]
    # fixed, distinct user positions (the objective's only input from the fit)
    batch = make_pair_batch(tokenizer, PAIRS, max_prompt_tokens=8, max_response_tokens=4)
    W = torch.zeros(2, 2, clap.encoder.features(batch.prompt_ids, batch.prompt_mask).shape[-1], 8)
    b = torch.zeros(2, 2, 8)
    b[0, :, :4], b[1, :, :4] = 1.0, -1.0
    heads = PopulationHeads(W, b, 0.0)
    objective = FollowObjective(clap, heads, FollowSettings(steps=30, lr=1e-2, beta=1.0, nll_weight=0.0))
    set_stage(clap, 3)
    opt = torch.optim.Adam([p for p in clap.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(30):
        loss, metrics = objective(batch)
        first = metrics if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(metrics["follow_margin"]) > float(first["follow_margin"]) + 0.5
    assert float(metrics["follow_acc"]) > 0.5
    with pytest.raises(ValueError, match="follow adapter"):
        FollowObjective(_clap(follow_rank=0), heads, FollowSettings())
