"""Per-user DPO baselines (tasks/evaluate/baselines.py) on tiny random GPT-2 / Llama models."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as safetensors_load

from latentpref.tasks.evaluate import baselines as bl
from latentpref.tasks.models.registry import load_base_model

# peft 0.21 calls a transformers 5.24 API deprecated in favour of is_activation_checkpointing
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PROMPTS = ["The movie was", "I think", "Honestly, the acting in this film was", ""]
RESPONSES = [" great fun", " that it is a long and boring story", " ok.", " hello"]
# A clear preference: the same positive phrase always beats the same other phrase.
PAIRS = [(p, " great great great", " awful awful awful") for p in ["A:", "The film", "Review:", "I saw it and"]]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def base(request):
    return load_base_model(request.param, seed=0)


@pytest.fixture(scope="module")
def gpt2():
    return load_base_model("tiny-gpt2", seed=0)


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [n for n, _ in model.named_modules()],
        "training": model.training,
    }


def _assert_unchanged(model, snap):
    assert [n for n, _ in model.named_modules()] == snap["modules"]  # no LoRA / prefix modules injected
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap["requires_grad"]
    assert model.training == snap["training"]
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def _manual_logp(model, tok, prompt, response):
    """Unpadded, unbatched reference: plain forward on prompt + response, default positions."""
    p = tok(prompt)["input_ids"] or [tok.eos_token_id]
    r = tok(response)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(p) - 1 :].sum()


def test_collate_left_pads_prompts_and_right_pads_responses():
    batch = bl.collate([[5], [1, 2, 3]], [[7, 8], [9]], pad_id=0)
    assert batch.prompt_len == 3
    torch.testing.assert_close(batch.input_ids, torch.tensor([[0, 0, 5, 7, 8], [1, 2, 3, 9, 0]]))
    torch.testing.assert_close(batch.attention_mask, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]))
    torch.testing.assert_close(batch.position_ids, torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]))
    assert batch.response_mask.tolist() == [[False] * 3 + [True, True], [False] * 3 + [True, False]]


def test_prompt_truncation_keeps_the_end(gpt2):
    _, tok = gpt2
    ids = bl.encode_prompts(tok, ["one two three four five", ""], max_prompt_tokens=2)
    assert ids[0] == tok(" four five")["input_ids"]
    assert ids[1] == [tok.eos_token_id]  # empty prompt -> [bos]


def test_sequence_logps_matches_unpadded_manual(base):
    model, tok = base
    batched, lengths = bl.sequence_logps(model, tok, PROMPTS, RESPONSES, batch_size=4)
    one_by_one = torch.cat(
        [bl.sequence_logps(model, tok, [p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)]
    )
    manual = torch.stack([_manual_logp(model, tok, p, r) for p, r in zip(PROMPTS, RESPONSES)])
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, manual, rtol=0, atol=1e-4)
    torch.testing.assert_close(one_by_one, manual, rtol=0, atol=1e-4)
    assert lengths.tolist() == [len(tok(r)["input_ids"]) for r in RESPONSES]
    # truncation to the first response token
    first, n1 = bl.sequence_logps(model, tok, PROMPTS[:1], RESPONSES[:1], max_response_tokens=1)
    assert n1.tolist() == [1] and first[0] > batched[0]


def test_sequence_logps_grad_flag(gpt2):
    model, tok = gpt2
    logps, _ = bl.sequence_logps(model, tok, PROMPTS[:2], RESPONSES[:2])
    assert not logps.requires_grad
    logps, _ = bl.sequence_logps(model, tok, PROMPTS[:2], RESPONSES[:2], batch_size=1, requires_grad=True)
    logps.sum().backward()
    assert model.transformer.wte.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_reference_cache_dedups_and_restores_mode(gpt2):
    model, tok = gpt2
    model.train()
    texts = [(PROMPTS[0], RESPONSES[0]), (PROMPTS[1], RESPONSES[1]), (PROMPTS[0], RESPONSES[0])]
    table = bl.reference_logps_cache(model, tok, texts)
    assert model.training
    model.eval()
    assert list(table) == texts[:2]
    expected, _ = bl.sequence_logps(model, tok, PROMPTS[:2], RESPONSES[:2])
    torch.testing.assert_close(torch.tensor(list(table.values())), expected, rtol=0, atol=1e-5)


def _margins(result, base_model, tok, pairs):
    """Implicit reward margins (log-ratio_w - log-ratio_l) recomputed from scratch, independent of fit."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    pol, _ = bl.sequence_logps(result.model, tok, prompts, responses)
    ref, _ = bl.sequence_logps(base_model, tok, prompts, responses)
    ratio = pol - ref
    n = len(pairs)
    return ratio[:n] - ratio[n:]


def test_lora_dpo_learns_the_preference_and_leaves_base_alone(base):
    from peft import PeftModel

    model, tok = base
    snap = _snapshot(model)
    cfg = bl.BaselineConfig(method="lora_dpo", lr=2e-2, beta=0.5, steps=20, batch_size=4)
    res = bl.fit_baseline(model, tok, PAIRS, cfg)
    _assert_unchanged(model, snap)

    assert isinstance(res.model, PeftModel)
    assert res.loss_curve[0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy == reference
    assert res.loss_curve[-1] < 0.5 * res.loss_curve[0]
    assert res.margin_curve[-1] > 0 and res.accuracy_curve[-1] == 1.0
    margins = _margins(res, model, tok, PAIRS)
    assert (margins > 0).all(), margins

    # trainable params: peft's count and the hand count (spec §5 formula, r = 8)
    assert res.trainable_params == res.model.get_nb_trainable_parameters()[0]
    d, r, layers = 64, 8, 2
    if model.config.model_type == "gpt2":  # c_attn: d -> 3d
        expected = layers * (d * r + r * 3 * d)
    else:  # q_proj d -> d, v_proj d -> 2 kv heads * 16
        expected = layers * ((d * r + r * d) + (d * r + r * 32))
    assert res.trainable_params == expected
    assert set(res.artifact_state) and all("lora_" in k for k in res.artifact_state)
    assert sum(t.numel() for t in res.artifact_state.values()) == expected
    assert res.artifact_bytes >= 4 * expected
    assert res.seconds > 0 and res.peak_rss_bytes > 0 and res.flops > 0 and res.tokens > 0
    assert res.peak_rss_scope in ("fit", "process")


def test_lora_trainable_count_matches_peft(gpt2):
    from peft import LoraConfig, get_peft_model

    model, _ = gpt2
    policy = bl.build_policy(model, bl.BaselineConfig(method="lora_dpo"))
    ours = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    reference = get_peft_model(
        bl._frozen_view(model), LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    assert ours == reference.get_nb_trainable_parameters()[0] == 4096


@pytest.mark.parametrize(
    "method,lr,expected_trainable", [("full_dpo", 1e-3, None), ("ptuning_dpo", 1e-2, 4 * 2 * 2 * 64)]
)
def test_full_and_ptuning_dpo_run(gpt2, method, lr, expected_trainable):
    model, tok = gpt2
    snap = _snapshot(model)
    ref = bl.reference_logps_cache(model, tok, [(p, x) for p, c, r in PAIRS for x in (c, r)])
    cfg = bl.BaselineConfig(method=method, lr=lr, steps=3, batch_size=2)
    res = bl.fit_baseline(model, tok, PAIRS, cfg, ref_logps=ref)
    _assert_unchanged(model, snap)
    assert len(res.loss_curve) == 3 and all(math.isfinite(x) for x in res.loss_curve)
    total = sum(p.numel() for p in model.parameters())
    assert res.trainable_params == (expected_trainable or total)
    assert sum(t.numel() for t in res.artifact_state.values()) == res.trainable_params
    blob = bl.artifact_to_bytes(res.artifact_state)
    assert res.artifact_bytes == len(blob)
    loaded = safetensors_load(blob)
    assert loaded.keys() == res.artifact_state.keys()
    for k, v in loaded.items():
        torch.testing.assert_close(v, res.artifact_state[k])
    if method == "full_dpo":
        assert res.model.transformer.wte.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    # the policy changed, the base did not: log-probs now differ
    pol, _ = bl.sequence_logps(res.model, tok, PROMPTS, RESPONSES)
    ref_lp, _ = bl.sequence_logps(model, tok, PROMPTS, RESPONSES)
    assert not torch.allclose(pol, ref_lp)


def test_ptuning_on_llama_and_simpo_without_reference(monkeypatch):
    model, tok = load_base_model("tiny-llama", seed=1)
    monkeypatch.setattr(bl, "reference_logps_cache", lambda *a, **k: pytest.fail("SimPO needs no reference"))
    cfg = bl.BaselineConfig(method="ptuning_dpo", loss_type="simpo", lr=1e-2, steps=2, batch_size=4)
    res = bl.fit_baseline(model, tok, PAIRS, cfg)
    assert res.trainable_params == 4 * 2 * 2 * 32  # GQA: 2 KV heads * head_dim 16 per K and V
    assert all(math.isfinite(x) for x in res.loss_curve)


def test_cached_reference_is_used(gpt2, monkeypatch):
    model, tok = gpt2
    ref = bl.reference_logps_cache(model, tok, [(p, x) for p, c, r in PAIRS for x in (c, r)])
    monkeypatch.setattr(bl, "reference_logps_cache", lambda *a, **k: pytest.fail("cache hit expected"))
    res = bl.fit_baseline(model, tok, PAIRS, bl.BaselineConfig(steps=1, batch_size=4), ref_logps=ref)
    assert res.loss_curve[0] == pytest.approx(math.log(2), abs=1e-5)   # policy == cached reference at step 0


def test_epochs_set_the_step_count(gpt2):
    model, tok = gpt2
    res = bl.fit_baseline(model, tok, PAIRS[:3], bl.BaselineConfig(epochs=2, batch_size=2))
    assert len(res.loss_curve) == 4  # 2 epochs * ceil(3 / 2)


@pytest.mark.parametrize(
    "spec,method",
    [("tiny-gpt2", None), ("tiny-llama", "lora_dpo"), ("tiny-llama", "ptuning_dpo"), ("tiny-gpt2", "ptuning_dpo")],
)
def test_generation_is_greedy_under_the_scoring_forward(spec, method):
    """Each cached-decoding token is the argmax of a fresh full forward on [left-padded prompt | generated]:
    generation and `batch_logps` agree on masks, positions and the prefix."""
    model, tok = load_base_model(spec, seed=0)
    if method is not None:
        model = bl.build_policy(model, bl.BaselineConfig(method=method))
    p_ids = bl.encode_prompts(tok, PROMPTS, max_prompt_tokens=64)
    gen = bl.generate_ids(model, p_ids, pad_id=tok.eos_token_id, eos_id=tok.eos_token_id, max_new_tokens=4)
    assert gen.shape == (len(PROMPTS), 4)
    for t in range(4):
        batch = bl.collate(p_ids, [g[:t] for g in gen.tolist()], pad_id=tok.eos_token_id)
        with torch.no_grad():
            logits = bl.lm_forward(model, batch.input_ids, batch.attention_mask, batch.position_ids).logits
        next_logits = logits[:, batch.prompt_len + t - 1].clone()  # every row has t response tokens
        next_logits[:, tok.eos_token_id] = -math.inf  # generation suppresses EOS
        torch.testing.assert_close(next_logits.argmax(-1), gen[:, t])


def test_generate_texts_batching_and_seeded_sampling(gpt2):
    model, tok = gpt2
    batched = bl.generate_texts(model, tok, PROMPTS, max_new_tokens=5, batch_size=4)
    single = [bl.generate_texts(model, tok, [p], max_new_tokens=5)[0] for p in PROMPTS]
    assert batched == single
    state = torch.random.get_rng_state()
    a = bl.generate_texts(model, tok, PROMPTS, max_new_tokens=5, do_sample=True, top_k=20, seed=3)
    b = bl.generate_texts(model, tok, PROMPTS, max_new_tokens=5, do_sample=True, top_k=20, seed=3)
    assert a == b
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert not model.training


def test_estimate_flops_hand_values():
    # full fine-tune: 6 N D; PEFT: (4 N + 2 n) D; reference forward 2 N per token
    assert bl.estimate_flops(10, 10, 3) == 6 * 10 * 3
    assert bl.estimate_flops(1, 10, 3) == (40 + 2) * 3
    assert bl.estimate_flops(1, 10, 3, reference_tokens=5) == (40 + 2) * 3 + 2 * 10 * 5
    with pytest.raises(ValueError, match="n_params_trained=11"):
        bl.estimate_flops(11, 10, 3)


def test_config_validation_and_spec_defaults():
    cfg = bl.BaselineConfig.for_method("ptuning_dpo")
    assert (cfg.lr, cfg.beta) == (1e-4, 0.5)
    assert bl.BaselineConfig.for_method("full_dpo", lr=0.1).lr == 0.1
    assert bl.BaselineConfig(target_modules="c_attn").target_modules == ("c_attn",)
    with pytest.raises(ValueError, match="method='qlora'"):
        bl.BaselineConfig(method="qlora")
    with pytest.raises(ValueError, match="loss_type='kto'"):
        bl.BaselineConfig(loss_type="kto")
    assert bl.BaselineConfig(steps=5, epochs=3).n_steps(100) == 5  # steps wins
    assert bl.BaselineConfig(epochs=3, batch_size=8).n_steps(20) == 9
    with pytest.raises(ValueError, match="steps=0"):
        bl.BaselineConfig(steps=0)
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        bl.fit_baseline(None, None, [("a", "b")], bl.BaselineConfig())


def test_prefix_sft_then_ptuning_dpo_starts_at_its_reference(gpt2):
    """P-Tuning-SFT lowers the NLL of its texts; P-Tuning-DPO initialised from it has the PT-SFT model as its
    reference (spec §5), so the first DPO step sees a zero margin: loss exactly log 2."""
    model, tok = gpt2
    snap = _snapshot(model)
    texts = [(p, c) for p, c, _ in PAIRS] * 2
    sft = bl.fit_prefix_sft(model, tok, texts, steps=12, lr=5e-2, batch_size=4)
    _assert_unchanged(model, snap)
    assert sft.loss_curve[-1] < sft.loss_curve[0]
    assert sum(t.numel() for t in sft.state.values()) == 4 * 2 * 2 * 64
    reference = bl.prefix_reference_model(model, sft.state, bl.BaselineConfig(method="ptuning_dpo"))
    ref = bl.reference_logps_cache(reference, tok, [(p, x) for p, c, r in PAIRS for x in (c, r)])
    base_ref = bl.reference_logps_cache(model, tok, [(p, x) for p, c, r in PAIRS for x in (c, r)])
    assert any(abs(ref[k] - base_ref[k]) > 1e-3 for k in ref)  # the prefix really is in the reference
    cfg = bl.BaselineConfig(method="ptuning_dpo", lr=1e-2, steps=3, batch_size=4)
    res = bl.fit_baseline(model, tok, PAIRS, cfg, ref_logps=ref, init_adapter=sft.state)
    assert res.loss_curve[0] == pytest.approx(math.log(2), abs=1e-4)
    assert res.loss_curve[-1] < res.loss_curve[0]
    _assert_unchanged(model, snap)


def test_init_adapter_only_for_ptuning(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="only applies to ptuning_dpo"):
        bl.fit_baseline(model, tok, PAIRS, bl.BaselineConfig(method="lora_dpo", steps=1), init_adapter={})


def test_pair_weights_weigh_the_dpo_loss():
    """Feedback weights reach the baseline loss as the latent fits apply them: weight 0 drops a pair, equal weights
    change nothing, and malformed weights are refused naming the problem."""
    from latentpref.tasks.evaluate.baselines import BaselineConfig, fit_baseline
    from latentpref.tasks.models.registry import load_base_model
    base, tok = load_base_model("tiny-gpt2")
    pairs = [("the movie was", " great fun", " a bore"), ("i think it", " is lovely", " is awful")]
    cfg = BaselineConfig.for_method("lora_dpo", steps=3, batch_size=2, lr=1e-2)
    plain = fit_baseline(base, tok, pairs, cfg)
    equal = fit_baseline(base, tok, pairs, cfg, weights=[2.0, 2.0])
    only_first = fit_baseline(base, tok, pairs, cfg, weights=[1.0, 0.0])
    alone = fit_baseline(base, tok, pairs[:1] * 2, cfg)
    assert plain.loss_curve == pytest.approx(equal.loss_curve, rel=1e-5)
    assert only_first.loss_curve[1] == pytest.approx(alone.loss_curve[1], rel=1e-5)   # step 0: ln 2 for all
    assert only_first.loss_curve[1] != pytest.approx(plain.loss_curve[1], rel=1e-5)
    with pytest.raises(ValueError, match="weights must be 2 finite numbers"):
        fit_baseline(base, tok, pairs, cfg, weights=[1.0, -1.0])
