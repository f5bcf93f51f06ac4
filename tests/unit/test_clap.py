"""CLaP unit tests on the tiny random bases (GPT-2 and Llama/GQA): shapes, exactness of the prefix injection,
padding invariance, batched == sequential generation, the gradient-only skip, dtypes, freezing, save/load."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from latentpref.tasks.models.clap import (
    CLaP,
    CLaPConfig,
    LatentEncoder,
    freeze_base,
    load_clap,
    load_clap_tokenizer,
    save_clap,
)
from latentpref.tasks.models.registry import load_base_model

ARCHS = ["tiny-gpt2", "tiny-llama"]
V = 50257


@functools.cache
def _base(spec: str, seed: int):
    return load_base_model(spec, seed=seed)[0]  # built once per test module (init + tokenizer cost ~0.3 s)


def _build(spec: str, seed: int = 0, **cfg) -> CLaP:
    base = copy.deepcopy(_base(spec, seed))
    torch.manual_seed(seed)
    return CLaP(base, CLaPConfig(**cfg), base_spec=spec).eval()


@pytest.fixture(scope="module", params=ARCHS)
def clap(request) -> CLaP:
    model = _build(request.param)
    with torch.no_grad():  # a non-trivial head, so encoder outputs depend on the input
        model.encoder.h2z.weight.normal_(0, 0.5)
        model.encoder.h2z.bias.normal_(0, 0.1)
    return model


def _batch(seed: int = 0):
    """Left-padded prompts of lengths 3, 5, 1 and right-padded responses of lengths 2, 4, 3."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, V, (3, 5), generator=g)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    response_ids = torch.randint(0, V, (3, 4), generator=g)
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    pad = 50256  # pads hold eos on purpose: padding must come from the masks, never from ids (spec §9.3c)
    return (prompt_ids.masked_fill(prompt_mask == 0, pad), prompt_mask,
            response_ids.masked_fill(response_mask == 0, pad), response_mask)


def _row(ids, mask, b):
    return ids[b][mask[b].bool()][None]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        CLaPConfig(latent_dim=30, n_query=4)
    with pytest.raises(ValueError, match="n_prefix"):
        CLaPConfig(n_prefix=0)


def test_shapes(clap):
    p_ids, p_mask, r_ids, r_mask = _batch()
    c, cfg = clap.base_lm.config, clap.cfg
    feats = clap.encoder.features(p_ids, p_mask)
    assert feats.shape == (3, cfg.n_query, c.hidden_size) and feats.dtype == torch.float32
    mu, logvar = clap.encode(p_ids, p_mask, r_ids, r_mask)
    assert mu.shape == logvar.shape == (3, cfg.latent_dim) and mu.dtype == logvar.dtype == torch.float32
    prefix = clap.adapter(torch.randn(3, cfg.latent_dim))
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    assert len(prefix) == c.num_hidden_layers
    for k, v in prefix:
        assert k.shape == v.shape == (3, kv_heads, cfg.n_prefix, c.hidden_size // c.num_attention_heads)
    if c.model_type == "llama":
        assert kv_heads == 2  # GQA: fewer KV heads than query heads
    logps = clap.response_logps(mu, p_ids, p_mask, r_ids, r_mask)
    assert logps.shape == (3,) and logps.dtype == torch.float32 and bool((logps < 0).all())


def test_standardize_gives_standard_normal():
    model = _build("tiny-gpt2")
    p_ids, p_mask, r_ids, r_mask = _batch()
    mu, logvar = model.encode(p_ids, p_mask, r_ids, r_mask)  # CLaP init standardizes (spec §2.2)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(logvar, torch.zeros_like(logvar))
    enc = LatentEncoder(model.base_lm, model.cfg)
    assert enc(p_ids, p_mask)[0].abs().sum() > 0
    enc.standardize()
    mu, logvar = enc(p_ids, p_mask)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(logvar, torch.zeros_like(logvar))


def test_encoder_positions_come_from_the_mask(clap):
    """Left / right / interior padding of the same tokens encode identically (spec §9.3, §9.4)."""
    p_ids, p_mask, r_ids, r_mask = _batch()
    mu, logvar = clap.encode(p_ids, p_mask, r_ids, r_mask)  # interior pads: [left-padded x ; right-padded y]
    for b in range(3):
        seq = torch.cat([_row(p_ids, p_mask, b), _row(r_ids, r_mask, b)], dim=1)
        n = seq.shape[1]
        left = torch.cat([torch.full((1, 3), 50256), seq], dim=1)
        right = torch.cat([seq, torch.full((1, 3), 50256)], dim=1)
        lmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], dim=1)
        for ids, mask in ((seq, torch.ones(1, n, dtype=torch.long)), (left, lmask), (right, lmask.flip(1))):
            mu_b, logvar_b = clap.encoder(ids, mask)
            torch.testing.assert_close(mu_b[0], mu[b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logvar_b[0], logvar[b], atol=1e-5, rtol=1e-5)


def test_masked_prefix_is_exactly_the_plain_lm(clap):
    """Prefix slots masked out + the plain LM's positions -> the base's logits; an active prefix changes them."""
    p_ids, p_mask, r_ids, r_mask = _batch()
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    z = torch.randn(3, clap.cfg.latent_dim)
    with torch.no_grad():
        plain = clap.base_lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        masked = clap(z, ids, mask, position_ids=pos, prefix_mask=torch.zeros(3, clap.cfg.n_prefix))
        active = clap(z, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(masked[real], plain[real], atol=1e-5, rtol=1e-5)
    assert (active[real] - plain[real]).abs().max() > 1e-3

    clap.zero_grad(set_to_none=True)
    clap(z, ids, mask)[real].logsumexp(-1).sum().backward()
    grads = [p.grad for p in clap.adapter.z2h.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    clap.zero_grad(set_to_none=True)


def test_response_logps_batched_equals_rows(clap):
    """Padded batch == each row alone without padding; z=None == the base LM scored by hand."""
    p_ids, p_mask, r_ids, r_mask = _batch()
    z = torch.randn(3, clap.cfg.latent_dim)
    with torch.no_grad():
        batched = clap.response_logps(z, p_ids, p_mask, r_ids, r_mask)
        plain = clap.response_logps(None, p_ids, p_mask, r_ids, r_mask)
        for b in range(3):
            x, y = _row(p_ids, p_mask, b), _row(r_ids, r_mask, b)
            alone = clap.response_logps(z[b : b + 1], x, torch.ones_like(x), y, torch.ones_like(y))
            torch.testing.assert_close(alone[0], batched[b], atol=1e-4, rtol=1e-5)
            seq = torch.cat([x, y], 1)
            logp = clap.base_lm(seq).logits.float().log_softmax(-1)[0, x.shape[1] - 1 : -1]
            by_hand = logp.gather(-1, y[0, :, None]).sum()
            torch.testing.assert_close(plain[b], by_hand, atol=1e-4, rtol=1e-5)
    assert (batched - plain).abs().max() > 1e-3


def test_generate_batched_equals_sequential(clap):
    p_ids, p_mask, _, _ = _batch(seed=1)
    z = torch.randn(3, clap.cfg.latent_dim) * 3
    for zz in (z, None):
        batched = clap.generate(zz, p_ids, p_mask, max_new_tokens=5)
        assert batched.shape == (3, 5) and batched.dtype == torch.long
        for b in range(3):
            x = _row(p_ids, p_mask, b)
            alone = clap.generate(None if zz is None else zz[b : b + 1], x, torch.ones_like(x), max_new_tokens=5)
            assert torch.equal(alone[0], batched[b]), (b, alone, batched)
    prefixed = clap.generate(z, p_ids, p_mask, max_new_tokens=5)
    assert not torch.equal(prefixed, clap.generate(None, p_ids, p_mask, max_new_tokens=5))


def test_generate_agrees_with_full_forward(clap):
    """Incremental decoding over the cache == argmax of a full forward over [prompt; generated]."""
    p_ids, p_mask, _, _ = _batch(seed=2)
    z = torch.randn(3, clap.cfg.latent_dim)
    out = clap.generate(z, p_ids, p_mask, max_new_tokens=4)
    ids = torch.cat([p_ids, out], 1)
    mask = torch.cat([p_mask, torch.ones_like(out)], 1)
    with torch.no_grad():
        logits = clap(z, ids, mask)
    assert torch.equal(logits[:, p_ids.shape[1] - 1 : -1].argmax(-1), out)


def test_generate_sampling_is_seeded(clap):
    p_ids, p_mask, _, _ = _batch()
    z = torch.randn(3, clap.cfg.latent_dim)
    kw = dict(max_new_tokens=4, do_sample=True, temperature=0.8, top_k=20)
    a = clap.generate(z, p_ids, p_mask, generator=torch.Generator().manual_seed(7), **kw)
    b = clap.generate(z, p_ids, p_mask, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b) and a.shape == (3, 4)
    assert clap.generate(z, p_ids, p_mask, max_new_tokens=0).shape == (3, 0)


def test_skip_connection_moves_gradients_not_values():
    """G-Skip (spec §3.4): identical log-probs; only with skip_z does the encoder get a gradient."""
    model = _build("tiny-gpt2")
    with torch.no_grad():
        model.encoder.h2z.weight.normal_(0, 0.5)
    p_ids, p_mask, r_ids, r_mask = _batch()
    z = torch.randn(3, model.cfg.latent_dim)  # prefix latent without a path to the encoder

    def run(with_skip: bool):
        model.zero_grad(set_to_none=True)
        mu, logvar = model.encode(p_ids, p_mask, r_ids, r_mask)
        eps = torch.randn(3, r_ids.shape[1], mu.shape[-1], generator=torch.Generator().manual_seed(0))
        skip_z = mu[:, None] + (0.5 * logvar).exp()[:, None] * eps  # one sample per response position
        logps = model.response_logps(z, p_ids, p_mask, r_ids, r_mask, skip_z=skip_z if with_skip else None)
        logps.sum().backward()
        return logps.detach(), model.encoder.h2z.weight.grad, model.encoder.blocks[0].mlp.c_fc.weight.grad

    plain, g_head, g_block = run(False)
    assert g_head is None and g_block is None
    skipped, g_head, g_block = run(True)
    assert torch.equal(plain, skipped)
    assert g_head.abs().sum() > 0 and g_block.abs().sum() > 0
    assert model.skip.net[0].weight.grad.abs().sum() > 0
    no_skip = _build("tiny-gpt2", skip_connection=False)
    assert no_skip.skip is None
    with pytest.raises(ValueError, match="skip_connection"):
        no_skip.response_logps(z, p_ids, p_mask, r_ids, r_mask, skip_z=torch.zeros(3, 4, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ARCHS)
def test_half_precision_base_gives_fp32_latents(spec, dtype):
    model = _build(spec).to(dtype)
    p_ids, p_mask, r_ids, r_mask = _batch()
    with torch.no_grad():
        model.encoder.h2z.weight.normal_(0, 0.5)
        mu, logvar = model.encode(p_ids, p_mask, r_ids, r_mask)
        logps = model.response_logps(mu, p_ids, p_mask, r_ids, r_mask)
    assert mu.dtype == logvar.dtype == logps.dtype == torch.float32
    assert torch.isfinite(mu).all() and torch.isfinite(logps).all()
    assert model.generate(mu, p_ids, p_mask, max_new_tokens=2).shape == (3, 2)


def test_freeze_base():
    model = _build("tiny-llama")
    freeze_base(model, True)
    assert not any(p.requires_grad for p in model.base_lm.parameters())
    for m in model.adapter.attention_copies():
        assert not any(p.requires_grad for p in m.parameters())
    for m in (model.encoder, model.adapter.z2h, model.adapter.ln, model.skip):
        assert all(p.requires_grad for p in m.parameters())
    freeze_base(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_posterior_can_ignore_the_prompt():
    model = _build("tiny-gpt2", posterior_reads_prompt=False)
    with torch.no_grad():
        model.encoder.h2z.weight.normal_(0, 0.5)
    p_ids, p_mask, r_ids, r_mask = _batch()
    mu, _ = model.encode(p_ids, p_mask, r_ids, r_mask)
    torch.testing.assert_close(mu, model.encoder(r_ids, r_mask)[0], atol=0, rtol=0)


def test_gradient_checkpointing_would_drop_the_prefix():
    model = _build("tiny-llama").train()
    model.base_lm.activation_checkpointing_enable()
    p_ids, p_mask, r_ids, r_mask = _batch()
    with pytest.raises(RuntimeError, match="checkpointing"):
        model.response_logps(torch.zeros(3, 32), p_ids, p_mask, r_ids, r_mask)


def test_bad_inputs_raise_clear_errors():
    model = _build("tiny-gpt2")
    p_ids, p_mask, r_ids, r_mask = _batch()
    z = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="left-padded"):
        model.response_logps(z, p_ids, p_mask.flip(1), r_ids, r_mask)
    with pytest.raises(ValueError, match="right-padded"):
        model.response_logps(z, p_ids, p_mask, r_ids, r_mask.flip(1))
    with pytest.raises(ValueError, match=r"expected \(3, 32\)"):
        model.generate(torch.zeros(2, 32), p_ids, p_mask, max_new_tokens=1)
    with pytest.raises(ValueError, match="positions"):
        model.generate(z, p_ids, p_mask, max_new_tokens=600)
    base = copy.deepcopy(_base("tiny-gpt2", 0))
    base.config.model_type = "bert"
    with pytest.raises(ValueError, match="'bert'"):
        CLaP(base)


@pytest.mark.parametrize("spec", ARCHS)
def test_save_load_roundtrip(spec, tmp_path):
    model = _build(spec, seed=3)
    with torch.no_grad():
        model.encoder.h2z.weight.normal_(0, 0.5)
        model.adapter.z2h[0][0].weight.add_(1.0)
    save_clap(model, tmp_path / "clap")
    loaded = load_clap(tmp_path / "clap")  # rebuilt from the saved config: no base weights file needed
    assert loaded.cfg == model.cfg and loaded.base_spec == spec
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    lm = loaded.base_lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied
    p_ids, p_mask, r_ids, r_mask = _batch()
    with torch.no_grad():
        mu, _ = model.encode(p_ids, p_mask, r_ids, r_mask)
        torch.testing.assert_close(loaded.encode(p_ids, p_mask, r_ids, r_mask)[0], mu, atol=0, rtol=0)
        torch.testing.assert_close(
            loaded.response_logps(mu, p_ids, p_mask, r_ids, r_mask),
            model.response_logps(mu, p_ids, p_mask, r_ids, r_mask), atol=0, rtol=0,
        )
    assert len(load_clap_tokenizer(tmp_path / "clap")) == V
    again = load_clap(tmp_path / "clap", base_spec=spec)  # base from the registry, weights from the folder
    assert torch.equal(again.adapter.z2h[0][0].weight, model.adapter.z2h[0][0].weight)
    other = "tiny-llama" if spec == "tiny-gpt2" else "tiny-gpt2"
    with pytest.raises(ValueError, match="architecture"):
        load_clap(tmp_path / "clap", base_spec=other)


@pytest.mark.parametrize("top_k", [0, 5])
def test_generate_with_a_stream_per_row_does_not_depend_on_the_batch(clap, top_k):
    """A list of generators gives each row its own stream: a row's sample is the same alone or batched with others
    (the evaluation decodes many users' rows of one prompt together, and they must draw the same noise)."""
    prompt_ids, prompt_mask, *_ = _batch()
    z = torch.randn(3, clap.cfg.latent_dim, generator=torch.Generator().manual_seed(5))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = clap.generate(z, prompt_ids, prompt_mask, max_new_tokens=6, do_sample=True, top_k=top_k,
                             generator=gens([11, 12, 13]))
    for r, seed in enumerate([11, 12, 13]):
        alone = clap.generate(z[r:r + 1], prompt_ids[r:r + 1, -int(prompt_mask[r].sum()):],
                              prompt_mask[r:r + 1, -int(prompt_mask[r].sum()):], max_new_tokens=6, do_sample=True,
                              top_k=top_k, generator=gens([seed]))
        assert torch.equal(together[r], alone[0])
    with pytest.raises(ValueError, match="generators for"):
        clap.generate(z, prompt_ids, prompt_mask, max_new_tokens=2, do_sample=True, generator=gens([1]))
