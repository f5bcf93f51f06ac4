"""Unit tests for tasks/train/fit_encoder.py: faithful and trunk-frozen per-user Latent DPO on a copy of the
CLaP latent encoder (tiny GPT-2 and Llama bases built from small configs, a few steps each)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from latentpref.tasks.models.clap import CLaP, CLaPConfig
from latentpref.tasks.train.fit_encoder import (
    FrozenTrunk,
    PolicyEncoder,
    fit_encoder_users,
    policy_latent,
    trainable_names,
)
from latentpref.tasks.train.fit_user import FitConfig



MODES = ["faithful", "trunk-frozen"]
V, D = 97, 4


@functools.cache
def _encoder(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0))
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    enc = CLaP(base, CLaPConfig(latent_dim=D, n_query=2, n_prefix=2)).encoder.eval()
    with torch.no_grad():   # a trained CLaP's head is not zero: make the encoder's outputs depend on the input
        enc.h2z.weight.normal_(0, 0.3)
        enc.h2z.bias.normal_(0, 0.1)
    enc.requires_grad_(False)
    return enc


def _prompts(n: int, T: int = 6, seed: int = 0):
    """n prompts with mixed padding: left pads, right pads and an interior pad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0::3, :2] = 0
    mask[1::3, T - 1:] = 0
    mask[2::3, 2] = 0
    return ids, mask


def _user(n_pairs: int, n_prompts: int, sign: float, seed: int, dims=(0, 1)):
    """A user whose chosen posteriors sit at sign * 2 and rejected at -sign * 2 in `dims` (a clear preference)."""
    g = torch.Generator().manual_seed(seed)
    pair_prompt = torch.randint(0, n_prompts, (n_pairs,), generator=g)
    cm, rm = torch.zeros(n_pairs, D), torch.zeros(n_pairs, D)
    cm[:, list(dims)], rm[:, list(dims)] = 2.0 * sign, -2.0 * sign
    cm += 0.3 * torch.randn(n_pairs, D, generator=g)
    rm += 0.3 * torch.randn(n_pairs, D, generator=g)
    lv = torch.full((n_pairs, D), -1.0)
    return pair_prompt, cm, lv.clone(), rm, lv.clone()


def _fit(enc, mode, users, n_prompts, cfg, **kw):
    """Stack users' pairs (rows interleaved round-robin, each user's own order kept) and fit them together."""
    queues = [list(range(len(u[0]))) for u in users]
    rows = []
    while any(queues):
        rows += [(u, q.pop(0)) for u, q in enumerate(queues) if q]
    cols = [torch.stack([users[u][t][r] for u, r in rows]) for t in range(5)]
    ids, mask = _prompts(n_prompts)
    user_index = torch.tensor([u for u, _ in rows])
    return fit_encoder_users(enc, mode, ids, mask, cols[0], *cols[1:], user_index, len(users), cfg, **kw)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_policy_is_the_encoder_until_trained(kind, mode):
    """Unstandardized, frozen trunk + trainable part reproduce LatentEncoder exactly (any padding); standardized,
    the policy is N(0, I); a state dict of the policy served through the CLaP encoder gives the same latents."""
    enc = _encoder(kind)
    ids, mask = _prompts(5)
    expected = enc(ids, mask)
    frozen = FrozenTrunk(enc, mode)
    policy = PolicyEncoder(enc, mode, standardize=False).eval()
    trunk = frozen.encode(ids, mask)
    got = policy(frozen, trunk)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    state = {k: v.detach() for k, v in policy.named_parameters()}
    for a, b in zip(policy_latent(enc, state, ids, mask), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mu, logvar = PolicyEncoder(enc, mode)(frozen, trunk)
    assert (mu == 0).all() and (logvar == 0).all()


def test_trainable_names():
    enc = _encoder("gpt2")
    faithful, trunk = set(trainable_names(enc, "faithful")), set(trainable_names(enc, "trunk-frozen"))
    assert not any(n.startswith(("wte", "wpe")) for n in faithful)        # spec §9.14: embedding copy frozen
    assert {"queries", "ln_in.weight", "h2z.weight"} <= faithful and any(n.startswith("blocks.0.") for n in faithful)
    assert {"queries", "h2z.weight", "ln_out.bias"} <= trunk
    assert not any(n.startswith(("blocks.0.", "ln_in.", "wte", "wpe")) for n in trunk)
    assert any(n.startswith("blocks.1.") for n in trunk) and trunk < faithful
    with pytest.raises(ValueError, match="mode='head-only'"):
        trainable_names(enc, "head-only")


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parts_receive_no_gradient(mode):
    """One backward: every trainable tensor gets a gradient (trunk-frozen queries through the frozen lower block),
    no frozen tensor does (grad None, requires_grad False); a whole fit leaves the CLaP encoder untouched."""
    enc = _encoder("gpt2")
    before = copy.deepcopy(enc.state_dict())
    frozen = FrozenTrunk(enc, mode)
    policy = PolicyEncoder(enc, mode, standardize=False)
    mu, logvar = policy(frozen, frozen.encode(*_prompts(4)))
    (mu.square().sum() + logvar.sum()).backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in list(frozen.named_parameters()) + list(enc.named_parameters()):
        assert not p.requires_grad and p.grad is None, name
    _fit(enc, mode, [_user(6, 4, +1.0, seed=1)], 4, FitConfig(steps=3, lr=1e-2, n_samples=4))
    for name, value in enc.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert dict(enc.named_parameters()).get(name) is None or dict(enc.named_parameters())[name].grad is None


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("mode", MODES)
def test_learns_clear_preference(mode, loss_type):
    """Chosen at +2, rejected at -2 in dims 0-1: standardized start at ln 2 (DPO), loss falls, the policy's mean
    moves toward +2 there and held-out-free train accuracy is high."""
    enc = _encoder("gpt2")
    cfg = FitConfig(steps=25, lr=1e-2, n_samples=6, loss_type=loss_type)
    res = _fit(enc, mode, [_user(10, 5, +1.0, seed=2)], 5, cfg)
    if loss_type == "dpo":
        assert res.loss_curve[0] == pytest.approx(math.log(2), abs=1e-6)
    assert res.loss_curve[-1] < 0.7 * res.loss_curve[0], res.loss_curve
    assert res.final_accuracy[0] > 0.8
    ids, mask = _prompts(5)
    mu, _ = policy_latent(enc, res.states[0], ids, mask)
    assert (mu[:, :2].mean(0) > 0.2).all(), mu.mean(0)


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_separate(mode):
    """Three users (different data and pair counts, rows interleaved, split over several chunks) fitted together
    give the same tensors as three one-user fits."""
    enc = _encoder("gpt2")
    users = [_user(5, 6, +1.0, seed=3), _user(7, 6, -1.0, seed=4, dims=(2,)), _user(3, 6, +1.0, seed=5, dims=(1, 3))]
    cfg = FitConfig(steps=6, lr=1e-2, n_samples=4, batch_pairs=8)
    both = _fit(enc, mode, users, 6, cfg)
    for u, data in enumerate(users):
        alone = _fit(enc, mode, [data], 6, cfg)
        for name, value in alone.states[0].items():
            torch.testing.assert_close(both.states[u][name], value, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(both.final_loss[u], alone.final_loss[0], atol=1e-5, rtol=1e-4)


def test_noise_pool_and_warm_start():
    """noise_draws >= steps is the fresh-noise fit; users without pairs keep their init exactly (standardized copy
    by default, the given state under a warm start); a warm start of the wrong mode is refused."""
    enc = _encoder("llama")
    data = [_user(4, 3, +1.0, seed=6)]
    fresh = _fit(enc, "trunk-frozen", data, 3, FitConfig(steps=3, n_samples=4, noise_draws=None))
    pooled = _fit(enc, "trunk-frozen", data, 3, FitConfig(steps=3, n_samples=4, noise_draws=5))
    for k in fresh.states[0]:
        assert torch.equal(fresh.states[0][k], pooled.states[0][k]), k
    ids, mask = _prompts(3)
    user_index = torch.zeros(4, dtype=torch.long)
    res = fit_encoder_users(enc, "trunk-frozen", ids, mask, *data[0], user_index, 2,
                            FitConfig(steps=2, n_samples=4), init=[None, fresh.states[0]])
    assert torch.equal(res.states[1]["h2z.weight"], fresh.states[0]["h2z.weight"])
    assert math.isnan(res.final_loss[1]) and res.n_pairs.tolist() == [4, 0]
    assert res.trainable_params == sum(v.numel() for v in res.states[0].values())
    untouched = fit_encoder_users(enc, "faithful", ids, mask, *data[0], user_index, 2, FitConfig(steps=1, n_samples=4))
    assert (untouched.states[1]["h2z.weight"] == 0).all()
    with pytest.raises(ValueError, match="does not match this mode"):
        fit_encoder_users(enc, "faithful", ids, mask, *data[0], user_index, 1, FitConfig(steps=1),
                          init=[fresh.states[0]])


def test_bad_inputs():
    enc = _encoder("gpt2")
    ids, mask = _prompts(3)
    pp, cm, cl, rm, rl = _user(4, 3, +1.0, seed=7)
    idx = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="pair_prompt values must lie in"):
        fit_encoder_users(enc, "faithful", ids, mask, pp + 3, cm, cl, rm, rl, idx, 1)
    with pytest.raises(ValueError, match="posteriors must all be"):
        fit_encoder_users(enc, "faithful", ids, mask, pp, cm[:, :2], cl, rm, rl, idx, 1)
    with pytest.raises(ValueError, match="mode='full'"):
        fit_encoder_users(enc, "full", ids, mask, pp, cm, cl, rm, rl, idx, 1)
    with pytest.raises(ValueError, match=r"pair_weight shape \(3,\); expected \(4,\)"):
        fit_encoder_users(enc, "faithful", ids, mask, pp, cm, cl, rm, rl, idx, 1, pair_weight=torch.ones(3))
    with pytest.raises(ValueError, match="pair_weight must be >= 0"):
        fit_encoder_users(enc, "faithful", ids, mask, pp, cm, cl, rm, rl, idx, 1,
                          pair_weight=torch.tensor([1.0, -0.5, 1.0, 1.0]))
