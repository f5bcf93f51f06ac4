"""LM precision switch (tasks/models/precision.py): settings, autocast scope, latent math in fp32 under bf16."""
from __future__ import annotations

import pytest
import torch

from latentpref.pipelines.config import load_config
from latentpref.tasks.models import precision
from latentpref.tasks.models.clap import CLaP, CLaPConfig
from latentpref.tasks.models.registry import load_base_model


def test_settings_resolve(monkeypatch):
    assert precision.resolve("fp32") == torch.float32 and precision.resolve("bf16") == torch.bfloat16
    want = torch.bfloat16 if precision.cpu_has_native_bf16() else torch.float32
    assert precision.resolve("auto") == want
    with pytest.raises(ValueError, match="lm_dtype='fp16'"):
        precision.resolve("fp16")
    monkeypatch.setenv(precision.ENV_VAR, "half")
    with pytest.raises(ValueError, match="LATENTPREF_LM_DTYPE='half'"):
        precision.setting()
    monkeypatch.setenv(precision.ENV_VAR, "fp32")
    with precision.lm_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(precision.ENV_VAR, "bf16")
    with precision.lm_autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with precision.fp32():
            assert not torch.is_autocast_enabled("cpu")


def test_config_key_is_validated():
    assert load_config("tiny", overrides=["runtime.lm_dtype=bf16"]).runtime.lm_dtype == "bf16"
    with pytest.raises(ValueError, match="lm_dtype"):
        load_config("tiny", overrides=["runtime.lm_dtype=fp8"])


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_bf16_lm_with_fp32_latents(spec, monkeypatch):
    """Under bf16 the LM's log-probs stay close to fp32, gradients reach z, and the Gaussian head is exact fp32."""
    base, _ = load_base_model(spec)
    clap = CLaP(base, CLaPConfig(prefix_init="anchor")).eval()
    with torch.no_grad():   # a non-zero head, so the comparison is not trivially 0 == 0
        clap.encoder.h2z.weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    z = torch.randn(3, 32, generator=g)
    out = {}
    for setting in ("fp32", "bf16"):
        monkeypatch.setenv(precision.ENV_VAR, setting)
        zz = z.clone().requires_grad_(True)
        logps = clap.response_logps(zz, ids, mask, ids, mask)
        logps.sum().backward()
        features = clap.encoder.features(ids, mask)
        with precision.lm_autocast("cpu"):
            mu, logvar = clap.encoder.head(features)     # called inside an LM autocast: must still be fp32 math
        exact = torch.nn.functional.linear(features.double(), clap.encoder.h2z.weight.double(),
                                           clap.encoder.h2z.bias.double())
        k = 32 // clap.cfg.n_query
        assert logps.dtype == mu.dtype == torch.float32
        assert torch.allclose(mu.double(), exact[..., :k].reshape(3, -1), atol=1e-5)
        assert zz.grad is not None and torch.isfinite(zz.grad).all()
        out[setting] = logps.detach()
    per_token = (out["bf16"] - out["fp32"]).abs() / ids.shape[1]
    assert float(per_token.max()) < 0.05       # bf16 autocast: within 0.05 nats per token of fp32
    monkeypatch.setenv(precision.ENV_VAR, "bf16")
    new = clap.generate(z, ids, mask, max_new_tokens=4)
    assert new.shape == (3, 4)


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_anchor_init_disturbs_the_base_less_than_the_random_init(spec):
    """A random tiny base has no attention sink for the anchored prefix to copy, so only the relative claim holds
    here (the absolute one, within 0.25 nats/token of the plain LM, is checked on SmolLM2 in
    tests/integration/test_real_model.py)."""
    base, _ = load_base_model(spec)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    z = torch.randn(4, 32, generator=g)
    gaps = {}
    for init in ("random", "anchor"):
        torch.manual_seed(0)
        clap = CLaP(base, CLaPConfig(prefix_init=init)).eval()
        with torch.no_grad():
            plain = clap.response_logps(None, ids, mask, ids, mask)
            gaps[init] = float((clap.response_logps(z, ids, mask, ids, mask) - plain).abs().mean()) / ids.shape[1]
    assert gaps["anchor"] < gaps["random"], gaps
    with pytest.raises(ValueError, match="prefix_init"):
        CLaPConfig(prefix_init="zeros")
