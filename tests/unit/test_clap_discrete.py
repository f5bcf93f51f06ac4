"""CLaP with discrete latent codes (latent_type="discrete", spec lpc.md §6.3): config checks, forward/backward
through codebook + adapter, save/load round trip (and old Gaussian checkpoints), per-row generation, and the
discrete pretraining objective (tasks/train/pretrain.py `DiscreteClapObjective`) in both stages."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from latentpref.tasks.models.clap import CONFIG_FILE, CLaP, CLaPConfig, load_clap, save_clap
from latentpref.tasks.train.loop import ClapBatch, set_stage
from latentpref.tasks.train.pretrain import DiscreteClapObjective, PairBatch, code_usage_counts

V = 97
K = 6




def _base(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def _clap(**cfg) -> CLaP:
    torch.manual_seed(1)
    model = CLaP(_base(), CLaPConfig(latent_dim=8, n_query=2, n_prefix=2, latent_type="discrete", n_codes=K, **cfg))
    with torch.no_grad():   # a non-trivial code head (a fresh CLaP starts uniform)
        model.encoder.h2k.weight.normal_(0, 1.0)
    return model.eval()


def _batch(rows: int = 3, seed: int = 0):
    """Left-padded prompts and right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    p_ids, r_ids = torch.randint(1, V, (rows, 5), generator=g), torch.randint(1, V, (rows, 4), generator=g)
    p_mask = torch.ones(rows, 5, dtype=torch.long)
    r_mask = torch.ones(rows, 4, dtype=torch.long)
    p_mask[0, :2] = 0
    r_mask[-1, 2:] = 0
    return p_ids.masked_fill(p_mask == 0, 0), p_mask, r_ids.masked_fill(r_mask == 0, 0), r_mask


def test_config_validation_and_defaults():
    assert CLaPConfig().latent_type == "gaussian" and CLaPConfig().n_codes == 32
    with pytest.raises(ValueError, match="latent_type='vq'"):
        CLaPConfig(latent_type="vq")
    with pytest.raises(ValueError, match="n_codes=1"):
        CLaPConfig(latent_type="discrete", n_codes=1)


def test_discrete_heads_shapes_and_gradients():
    clap = _clap()
    p_ids, p_mask, r_ids, r_mask = _batch()
    assert not hasattr(clap.encoder, "h2z") and clap.encoder.codebook.shape == (K, 8)
    with pytest.raises(ValueError, match="encode_logits"):
        clap.encode(p_ids, p_mask, r_ids, r_mask)
    post = clap.encode_logits(p_ids, p_mask, r_ids, r_mask)
    prior = clap.prior_logits(p_ids, p_mask)
    pair = clap.pair_logits(p_ids, p_mask, r_ids, r_mask, r_ids.flip(0), r_mask.flip(0))
    assert post.shape == prior.shape == pair.shape == (3, K) and post.dtype == torch.float32
    torch.testing.assert_close(pair, torch.zeros(3, K))                        # pair posterior starts uniform
    z = clap.encoder.code_latent(torch.softmax(post, -1))                      # expected code vector
    assert z.shape == (3, 8)
    clap.train()
    clap.response_logps(z, p_ids, p_mask, r_ids, r_mask).sum().backward()
    for name in ("encoder.h2k.weight", "encoder.codebook", "adapter.z2h.0.0.weight"):
        assert dict(clap.named_parameters())[name].grad.abs().sum() > 0, name
    # the population-prior latent is the expected prior code, and cold start serves it
    torch.testing.assert_close(clap.prior_latent(p_ids, p_mask), clap.encoder.code_latent(torch.softmax(prior, -1)))


def test_save_load_round_trip_and_old_gaussian_checkpoints(tmp_path):
    clap = _clap()
    p_ids, p_mask, r_ids, r_mask = _batch()
    save_clap(clap, tmp_path / "d")
    again = load_clap(tmp_path / "d")
    assert again.cfg == clap.cfg and again.discrete
    torch.testing.assert_close(again.encode_logits(p_ids, p_mask, r_ids, r_mask),
                               clap.encode_logits(p_ids, p_mask, r_ids, r_mask))
    torch.testing.assert_close(again.encoder.codebook, clap.encoder.codebook)
    # a Gaussian checkpoint written before latent_type existed still loads (as Gaussian)
    torch.manual_seed(0)
    gauss = CLaP(_base(), CLaPConfig(latent_dim=8, n_query=2, n_prefix=2))
    save_clap(gauss, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / CONFIG_FILE).read_text())
    for key in ("latent_type", "n_codes"):
        del meta["clap_config"][key]
    (tmp_path / "g" / CONFIG_FILE).write_text(json.dumps(meta))
    old = load_clap(tmp_path / "g")
    assert old.cfg.latent_type == "gaussian" and not old.discrete and old.pair_posterior is None


def test_generation_with_per_row_codes_is_batch_independent():
    clap = _clap()
    p_ids, p_mask, _, _ = _batch()
    probs = torch.softmax(torch.randn(3, K, generator=torch.Generator().manual_seed(2)), -1)
    z = clap.encoder.code_latent(probs)
    batched = clap.generate(z, p_ids, p_mask, max_new_tokens=5)
    rows = []
    for b in range(3):
        keep = p_mask[b].bool()
        rows.append(clap.generate(z[b:b + 1], p_ids[b:b + 1, keep], p_mask[b:b + 1, keep], max_new_tokens=5))
    torch.testing.assert_close(batched, torch.cat(rows))
    # different codes steer the LM differently (the codebook reaches the prefix)
    one_hot = clap.encoder.code_latent(torch.eye(K)[:3])
    assert not torch.equal(clap.generate(one_hot, p_ids, p_mask, max_new_tokens=5)[0],
                           clap.generate(one_hot.roll(1, 0), p_ids, p_mask, max_new_tokens=5)[0])


def _clap_batch(P: int = 2, B: int = 3) -> ClapBatch:
    p_ids, p_mask, r_ids, r_mask = _batch(P * B, seed=4)
    p_ids, p_mask = p_ids[::B].repeat_interleave(B, 0), p_mask[::B].repeat_interleave(B, 0)   # prompt-major
    return ClapBatch(p_ids, p_mask, r_ids, r_mask, P, B)


@pytest.mark.parametrize("loss_type, straight_through", [("dpo", False), ("ipo", True), ("simpo", False)])
def test_discrete_objective_trains_every_part_in_both_stages(loss_type, straight_through):
    clap = copy.deepcopy(_clap()).train()
    p_ids, p_mask, c_ids, c_mask = _batch(4, seed=5)
    pairs = PairBatch(p_ids, p_mask, c_ids, c_mask, c_ids.flip(1), c_mask)
    objective = DiscreteClapObjective(clap, total_steps=10, lpc_loss_type=loss_type,
                                      straight_through=straight_through)
    g = torch.Generator().manual_seed(0)
    for stage, step in ((1, 0), (2, 9)):
        set_stage(clap, stage)
        clap.zero_grad(set_to_none=True)
        loss, m = objective(_clap_batch(), stage, g, step=step, pairs=pairs)
        loss.backward()
        no_grad = [n for n, p in clap.named_parameters() if p.requires_grad and p.grad is None]
        assert no_grad == []                    # DDP (find_unused_parameters=False) needs every one
        assert torch.isfinite(loss) and 1.0 <= m["code_usage_perplexity"] <= K
        assert m["mixing_g"] == (0.0 if step == 0 else 1.0)
        assert m["tau"] == pytest.approx(1.0 if step == 0 else 0.5)
        assert (m["contrastive"] > 0) == (stage == 2) and m["lpc_pair_loss"] > 0
    # without pairs the pair term is skipped cleanly (and the pair posterior gets no gradient)
    clap.zero_grad(set_to_none=True)
    loss, m = objective(_clap_batch(), 1, g, step=3)
    loss.backward()
    assert m["lpc_pair_loss"] == 0 and clap.pair_posterior.net[0].weight.grad is None


def test_code_usage_counts():
    class Tok:
        pad_token_id = eos_token_id = 0

        def encode(self, text):
            return [1 + sum(map(ord, w)) % (V - 1) for w in text.split()]

    usage = code_usage_counts(_clap(), Tok(), ["a film", "a book"], [["good", "bad", "fine"], ["dull"]],
                              max_prompt_tokens=4, max_response_tokens=4)
    assert len(usage.argmax) == len(usage.expected) == K
    assert sum(usage.argmax) == 4 and sum(usage.expected) == pytest.approx(4.0)
