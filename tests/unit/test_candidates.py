"""tasks/data/candidates.py: sampling K continuations per prompt, seeds, annotation."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from latentpref.tasks.data import candidates as cands
from latentpref.tasks.data import scorers

GPT2_DIR = Path(cands.__file__).resolve().parents[1] / "assets" / "gpt2"


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer.from_pretrained(str(GPT2_DIR))


@pytest.fixture(scope="module")
def word_ids(tokenizer):
    words = [" good", " bad", " film", " great", " awful", " plot", " boring", " wonderful"]
    return torch.tensor([tokenizer.encode(w)[0] for w in words])


@pytest.fixture()
def prompts():
    return pa.table({"prompt_id": ["a-0", "b-0", "c-0"], "prompt": ["the movie was", "i think this", ""]})


def dummy_generate(word_ids, calls=None):
    """Deterministic in the generator: random words; checks the left padding it is given."""

    def generate(prompt_ids, attention_mask, *, max_new_tokens, generator):
        assert prompt_ids.dtype == torch.long and prompt_ids.shape == attention_mask.shape
        assert bool(attention_mask[:, -1].all()), "left padding: last position is real text"
        lengths = attention_mask.sum(1)
        for row, n in zip(attention_mask, lengths):  # padding only on the left
            assert row[: len(row) - n].sum() == 0
        if calls is not None:
            calls.append(prompt_ids.shape[0])
        pick = torch.randint(0, len(word_ids), (prompt_ids.shape[0], max_new_tokens), generator=generator)
        return word_ids[pick]

    return generate


def test_k_rows_per_prompt_with_recorded_seeds(tokenizer, word_ids, prompts):
    table = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts, k=4, max_new_tokens=6, seed=7)
    assert table.schema == cands.CANDIDATES_SCHEMA
    assert table.num_rows == 12
    assert table.column("candidate_id").to_pylist()[:5] == ["a-0-0", "a-0-1", "a-0-2", "a-0-3", "b-0-0"]
    assert table.column("cand_idx").to_pylist() == [0, 1, 2, 3] * 3
    seeds = table.column("seed").to_pylist()
    assert seeds[:4] == [cands.derive_seed(7, "a-0", 0)] * 4 and seeds[4] == cands.derive_seed(7, "b-0", 0)
    texts = table.column("text").to_pylist()
    assert all(len(tokenizer.encode(t)) == 6 for t in texts)
    assert len(set(texts[:4])) > 1  # the k copies differ
    again = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts, k=4, max_new_tokens=6, seed=7)
    assert again.equals(table)
    other = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts, k=4, max_new_tokens=6, seed=8)
    assert other.column("text").to_pylist() != texts


def test_results_do_not_depend_on_batch_composition(tokenizer, word_ids, prompts):
    full = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts, k=4, max_new_tokens=5, seed=1)
    alone = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts.slice(1, 1), k=4, max_new_tokens=5, seed=1)
    assert alone.column("text").to_pylist() == full.column("text").to_pylist()[4:8]
    reordered = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts.take([2, 0, 1]), k=4, max_new_tokens=5, seed=1)
    assert sorted(reordered.column("text").to_pylist()) == sorted(full.column("text").to_pylist())


def test_chunks_when_k_exceeds_batch_size_and_packing(tokenizer, word_ids, prompts):
    calls = []
    table = cands.generate_candidates(dummy_generate(word_ids, calls), tokenizer, prompts, k=5, max_new_tokens=3, batch_size=2)
    assert calls == [2, 2, 1] * 3 and table.num_rows == 15
    assert table.column("seed").to_pylist()[:5] == [cands.derive_seed(0, "a-0", c) for c in (0, 0, 1, 1, 2)]
    calls.clear()
    packed = cands.generate_candidates(dummy_generate(word_ids, calls), tokenizer, prompts, k=2, max_new_tokens=3, batch_size=4, pack_prompts=True)
    assert calls == [4, 2] and packed.column("cand_idx").to_pylist() == [0, 1] * 3


def test_eos_truncates_and_bad_shapes_raise(tokenizer, prompts):
    eos = tokenizer.eos_token_id
    hello = tokenizer.encode(" hello")[0]

    def with_eos(prompt_ids, attention_mask, *, max_new_tokens, generator):
        out = torch.full((prompt_ids.shape[0], max_new_tokens), hello)
        out[:, 2:] = eos
        return out

    table = cands.generate_candidates(with_eos, tokenizer, prompts, k=1, max_new_tokens=4)
    assert table.column("text").to_pylist() == [" hello hello"] * 3

    def returns_prompt_too(prompt_ids, attention_mask, *, max_new_tokens, generator):
        return torch.cat([prompt_ids, prompt_ids[:, :1].repeat(1, max_new_tokens)], dim=1)

    with pytest.raises(ValueError, match=r"expected a LongTensor \(2, 4\) of NEW tokens"):
        cands.generate_candidates(returns_prompt_too, tokenizer, prompts, k=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="k=0"):
        cands.generate_candidates(with_eos, tokenizer, prompts, k=0, max_new_tokens=4)


def test_hf_sampling_fn_fixed_length_and_reproducible(tokenizer, prompts):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer))).eval()
    fn = cands.hf_sampling_fn(model, top_k=50)
    state = torch.random.get_rng_state()
    a = cands.generate_candidates(fn, tokenizer, prompts.slice(0, 2), k=2, max_new_tokens=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    b = cands.generate_candidates(fn, tokenizer, prompts.slice(0, 2), k=2, max_new_tokens=5, seed=3)
    assert a.equals(b) and a.num_rows == 4
    ids = torch.tensor([[tokenizer.eos_token_id, 10, 11], [12, 13, 14]])
    out = fn(ids, torch.tensor([[0, 1, 1], [1, 1, 1]]), max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5)


def test_annotate_adds_float32_feature_columns(tokenizer, word_ids, prompts):
    table = cands.generate_candidates(dummy_generate(word_ids), tokenizer, prompts, k=2, max_new_tokens=4)
    annotated = cands.annotate(table)
    assert annotated.column_names == cands.CANDIDATES_SCHEMA.names + list(scorers.FEATURES)
    for name in scorers.FEATURES:
        assert annotated.schema.field(name).type == pa.float32()
    np.testing.assert_array_equal(
        annotated.column("sentiment").to_numpy(), scorers.score_texts(table.column("text").to_pylist())["sentiment"]
    )
    assert cands.annotate(annotated).equals(annotated)  # re-annotating replaces, never duplicates


def _full_recompute_greedy(model, ids, mask, n):
    """Reference decoder: the whole sequence through the model at every step, no cache."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            token = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            out.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
    return torch.stack(out, dim=1)


def _padded_batch(pad_id):
    """5 left-padded rows of 3 prompts; rows 0-1 and 2-3 repeat (the k copies that share one prefill)."""
    real = [[10, 11, 12], [10, 11, 12], [20, 21, 22, 23, 24], [20, 21, 22, 23, 24], [7, 8]]
    return cands._left_pad(real, pad_id)


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_cached_decoder_matches_full_recompute_greedy(spec):
    from latentpref.tasks.models.registry import load_base_model

    model, tok = load_base_model(spec, seed=0)
    ids, mask = _padded_batch(tok.pad_token_id)
    cached = cands.sample_fixed_length(model, ids, mask, max_new_tokens=10, do_sample=False)
    assert cached.shape == (5, 10) and cached.dtype == torch.long
    torch.testing.assert_close(cached, _full_recompute_greedy(model, ids, mask, 10), rtol=0, atol=0)
    # a shared prefill changes nothing: the repeated rows decode like their original
    assert torch.equal(cached[0], cached[1]) and torch.equal(cached[2], cached[3])


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_cached_sampling_agrees_with_the_clap_decoder(spec):
    from latentpref.tasks.models.clap import decode
    from latentpref.tasks.models.registry import load_base_model

    model, tok = load_base_model(spec, seed=0)
    ids, mask = _padded_batch(tok.pad_token_id)
    ours = cands.sample_fixed_length(model, ids, mask, max_new_tokens=8, top_k=50,
                                     generator=torch.Generator().manual_seed(3))
    theirs = decode(model, ids, mask, max_new_tokens=8, do_sample=True, top_k=50,
                    generator=torch.Generator().manual_seed(3))   # one prefill per row, same draws
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[0], ours[1])   # copies of one prompt still sample independently


def test_lm_sampling_fn_reports_progress_and_is_reproducible(tokenizer, prompts):
    from latentpref.tasks.models.registry import load_base_model

    model, _ = load_base_model("tiny-gpt2", seed=0)
    fn = cands.lm_sampling_fn(model, top_k=50)
    seen = []
    state = torch.random.get_rng_state()
    a = cands.generate_candidates(fn, tokenizer, prompts, k=3, max_new_tokens=4, batch_size=6, seed=1,
                                  pack_prompts=True, progress=lambda done, total: seen.append((done, total)))
    assert torch.equal(torch.random.get_rng_state(), state)   # the global RNG is not used
    assert seen == [(0, 2), (1, 2), (2, 2)]                  # 2 prompts per call: 2 calls for 3 prompts
    b = cands.generate_candidates(fn, tokenizer, prompts, k=3, max_new_tokens=4, batch_size=6, seed=1,
                                  pack_prompts=True)
    assert a.equals(b) and a.num_rows == 9
    with pytest.raises(ValueError, match="top_k"):
        cands.lm_sampling_fn(model, top_k=-1)
    with pytest.raises(ValueError, match="left-padded"):
        fn(torch.tensor([[5, 6]]), torch.tensor([[1, 0]]), max_new_tokens=2)
