"""How a CLaP starts on a pretrained base: the anchored prefix (layout 2, after the norm), the encoder's feature
standardisation, older checkpoints still loading, and the adapter's own learning rate."""
from __future__ import annotations

import json

import pytest
import torch

from latentpref.tasks.models.clap import CLaP, CLaPConfig, load_clap, save_clap
from latentpref.tasks.models.registry import load_base_model
from latentpref.tasks.train.pretrain import PretrainJob, _param_groups


def _rows(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    p_ids = torch.randint(0, 1000, (n, 6), generator=g)
    r_ids = torch.randint(0, 1000, (n, 5), generator=g)
    return p_ids, torch.ones_like(p_ids), r_ids, torch.ones_like(r_ids)


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_feature_norm_standardises_the_calibration_rows(spec):
    base, _ = load_base_model(spec)
    clap = CLaP(base, CLaPConfig(prefix_init="anchor", feature_norm=True)).eval()
    rows = _rows(12)
    raw = clap.posterior_features(*rows)
    clap.calibrate_posterior(*rows)
    after = clap.posterior_features(*rows)
    # identity until calibrated; afterwards zero mean and unit spread per element over the calibration rows
    assert torch.allclose(after, (raw - raw.mean(0)) / raw.std(0).clamp(min=1e-3), atol=1e-4)
    assert after.mean(0).abs().max() < 1e-4
    assert torch.allclose(after.std(0), torch.ones_like(after[0]), atol=1e-3)
    # the posterior still starts at N(0, I) (zero head, spec §2.2): standardising changes no initial latent
    mu, logvar = clap.encode(*rows)
    assert mu.abs().max() == 0 and logvar.abs().max() == 0
    with pytest.raises(ValueError, match=">= 2 rows"):
        clap.calibrate_posterior(*(t[:1] for t in rows))
    plain = CLaP(base, CLaPConfig(prefix_init="anchor")).eval()
    with pytest.raises(ValueError, match="feature_norm=True"):
        plain.calibrate_posterior(*rows)


def test_feature_statistics_survive_save_and_load(tmp_path):
    base, _ = load_base_model("tiny-llama")
    clap = CLaP(base, CLaPConfig(prefix_init="anchor", feature_norm=True)).eval()
    rows = _rows(8)
    clap.calibrate_posterior(*rows)
    save_clap(clap, tmp_path / "clap")
    loaded = load_clap(tmp_path / "clap")
    assert loaded.cfg.feature_norm and loaded.cfg.anchor_normed
    assert torch.equal(loaded.posterior_features(*rows), clap.posterior_features(*rows))


def test_checkpoints_saved_before_the_new_fields_load_with_the_old_layout(tmp_path):
    """A CLaP saved before `anchor_normed` / `feature_norm` existed (layout 1: anchor before the norm, no feature
    statistics) is rebuilt with that layout, so older nights' stores still serve."""
    base, _ = load_base_model("tiny-llama")
    old = CLaP(base, CLaPConfig(prefix_init="anchor", anchor_normed=False)).eval()
    save_clap(old, tmp_path / "clap")
    meta_path = tmp_path / "clap" / "clap_config.json"
    meta = json.loads(meta_path.read_text())
    for key in ("anchor_normed", "feature_norm"):
        del meta["clap_config"][key]
    meta_path.write_text(json.dumps(meta))
    loaded = load_clap(tmp_path / "clap")
    assert not loaded.cfg.anchor_normed and not loaded.cfg.feature_norm
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    for (k1, v1), (k2, v2) in zip(old.adapter(z), loaded.adapter(z)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_anchor_prefix_starts_at_the_normalised_anchor_state():
    """Layout 2: with the z-part switched off, each layer's prefix input is the base's own BOS state entering that
    layer after the layer's pre-attention norm."""
    base, _ = load_base_model("tiny-llama")
    adapter = CLaP(base, CLaPConfig(prefix_init="anchor")).adapter
    with torch.no_grad():
        for z2h in adapter.z2h:
            z2h[2].weight.zero_()
        ids = torch.tensor([[base.config.bos_token_id or 0]])
        states = base.base_model(input_ids=ids, output_hidden_states=True).hidden_states
        prefix = adapter(torch.zeros(1, 32))
        for layer, block in enumerate(base.base_model.layers):
            h = block.input_layernorm(states[layer][0, 0])
            want = adapter.v_proj[layer](h).view(adapter.n_kv_heads, adapter.head_dim)
            assert torch.allclose(prefix[layer][1][0, :, 0], want, atol=1e-5)


def test_adapter_learning_rate_is_its_own():
    base, _ = load_base_model("tiny-llama")
    clap = CLaP(base, CLaPConfig(prefix_init="anchor"))
    job = PretrainJob(store_root="s", base_model_path="b", prompts_path=["p"], candidates_path=["c"],
                      prompt_tokens=8, response_tokens=8, lr=1e-3, adapter_lr=1e-4)
    groups = _param_groups(clap, job)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(p.numel() for p in clap.adapter.parameters())
    same = _param_groups(clap, job.model_copy(update={"adapter_lr": None}))
    assert [g["lr"] for g in same] == [1e-3, 1e-3]


def test_within_prior_bounds_the_norm_and_keeps_the_direction():
    from latentpref.tasks.models.latent import within_prior
    z = torch.tensor([[30.0, 40.0] + [0.0] * 30, [0.1] * 32])
    out = within_prior(z)
    assert torch.allclose(out[0].norm(), torch.tensor(32 ** 0.5)) and torch.allclose(out[0] / out[0].norm(), z[0] / 50)
    assert torch.equal(out[1], z[1])                   # inside the ball: unchanged
    with pytest.raises(ValueError, match="radius"):
        within_prior(z, radius=0.0)


# ------------------------------------------------------------------------------------------------ pooled view, BoW
@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_pooled_token_view_reads_every_real_token_and_ignores_pads(spec):
    base, _ = load_base_model(spec)
    torch.manual_seed(0)
    clap = CLaP(base, CLaPConfig(pool_tokens=True)).eval()
    p_ids, p_mask, r_ids, r_mask = _rows(2)
    feats = clap.posterior_features(p_ids, p_mask, r_ids, r_mask)
    # a changed *early* token moves the pooled part of every query (the spec's queries see it only through attention)
    early = p_ids.clone()
    early[:, 0] = (early[:, 0] + 1) % 1000
    assert not torch.allclose(clap.posterior_features(early, p_mask, r_ids, r_mask), feats)
    # extra left pads (masked) change nothing: pooling counts real tokens only
    pad = torch.zeros(2, 3, dtype=p_ids.dtype)
    padded = clap.posterior_features(torch.cat([pad + 7, p_ids], 1), torch.cat([pad, p_mask], 1), r_ids, r_mask)
    assert torch.allclose(padded, feats, atol=1e-5)
    plain = CLaP(base, CLaPConfig()).eval()
    assert plain.encoder.ln_pool is None


def test_bow_head_calibration_gradients_and_save_load(tmp_path):
    base, _ = load_base_model("tiny-llama")
    clap = CLaP(base, CLaPConfig(bow_head=True)).eval()
    p_ids, p_mask, r_ids, r_mask = _rows(6)
    r_mask[:, -2:] = 0                                          # right pads are not counted
    clap.calibrate_posterior(p_ids, p_mask, r_ids, r_mask)
    counts = torch.bincount(r_ids[r_mask.bool()], minlength=clap.bow.bias.shape[0]).double()
    freq = (counts + 0.01) / (counts.sum() + 0.01 * counts.numel())
    assert torch.allclose(clap.bow.bias.double(), freq.log(), atol=1e-5)
    # with z = 0 the BoW NLL is the unigram cross-entropy of each response's real tokens, known value
    z = torch.zeros(6, clap.cfg.latent_dim, requires_grad=True)
    nll = clap.bow_nll(z, r_ids, r_mask)
    expected = -(freq.log().float()[r_ids] * r_mask).sum(1)
    assert nll.shape == (6,) and torch.allclose(nll, expected, atol=1e-4)
    nll.sum().backward()
    assert z.grad.abs().sum() > 0                               # the BoW loss teaches the encoder
    save_clap(clap, tmp_path / "clap")
    loaded = load_clap(tmp_path / "clap")
    assert loaded.cfg.bow_head and torch.equal(loaded.bow.bias, clap.bow.bias)
    with pytest.raises(ValueError, match="bow_head=True"):
        CLaP(base, CLaPConfig()).bow_nll(z, r_ids, r_mask)


def test_clap_objective_adds_the_bow_term_and_the_head_gets_its_own_lr():
    from latentpref.tasks.train.loop import ClapObjective, ClapBatch
    base, _ = load_base_model("tiny-llama")
    clap = CLaP(base, CLaPConfig(bow_head=True))
    with pytest.raises(ValueError, match="bow_head=True"):
        ClapObjective(CLaP(base, CLaPConfig()), bow_weight=1.0)
    p_ids, p_mask, r_ids, r_mask = _rows(4)
    batch = ClapBatch(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids, response_mask=r_mask,
                      n_prompts=2, n_responses=2)
    g = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    loss0, m0 = ClapObjective(clap, bow_weight=0.0)(batch, 1, g())
    loss1, m1 = ClapObjective(clap, bow_weight=0.5)(batch, 1, g())
    assert m1["bow_per_token"] > 0 and m0["bow_per_token"] == 0
    bow_sum = m1["bow_per_token"] * r_mask.sum() / 4          # mean over sequences of the per-sequence sum
    assert torch.allclose(loss1 - loss0, 0.5 * bow_sum, rtol=1e-4)
    job = PretrainJob(store_root="x", base_model_path="b", prompts_path=["p"], candidates_path=["c"],
                      prompt_tokens=6, response_tokens=5, lr=1e-3, adapter_lr=1e-4, bow_weight=1.0, bow_lr=1e-2)
    groups = _param_groups(clap, job)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 1e-2]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in clap.bow.parameters()}
