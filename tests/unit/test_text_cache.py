"""Unit tests for tasks/policy/text_cache.py: the content-keyed Lance latent table of a CLaP version.

Real Lance on a temporary local store; a tiny Gaussian and a tiny discrete CLaP (GPT-2 vocabulary, so the worker
loads the vendored GPT-2 tokenizer from the store exactly as the flow does), shaped like the ones of
test_personalize_chunk.py / test_clap_discrete.py. Expected tensors come from `build_latent_cache` on the same texts.
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.data.store import Store
from latentpref.tasks.models.clap import CLaP, CLaPConfig, save_clap
from latentpref.tasks.models.registry import GPT2_EOS, GPT2_TOKENIZER_DIR, GPT2_VOCAB, load_tokenizer
from latentpref.tasks.policy.cache import build_latent_cache, text_key
from latentpref.tasks.policy.text_cache import (EncodeJob, EncodePlanner, TextLatentTable, encode_texts,
                                               plan_encode_jobs)

K = 5
PT, RT = 8, 6
PROMPTS = ["a prompt about the film", "another prompt on music", "", "short"]
RESPONSES = ["a good great answer", "a bad awful reply", "ok"]
PAIRS = [(p, RESPONSES[0], RESPONSES[1]) for p in PROMPTS] + [(PROMPTS[0], RESPONSES[2], RESPONSES[1])]


def _clap(discrete: bool) -> CLaP:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS))
    extra = {"latent_type": "discrete", "n_codes": K} if discrete else {}
    clap = CLaP(base, CLaPConfig(latent_dim=4, n_query=2, n_prefix=2, **extra)).eval()
    with torch.no_grad():   # non-trivial heads (a fresh pair posterior is uniform), so latents depend on the text
        heads = [clap.encoder.h2k, *clap.pair_posterior.parameters()] if discrete else [clap.encoder.h2z]
        for head in heads:
            (head.weight if isinstance(head, torch.nn.Module) else head).normal_(0, 0.5)
    return clap


@pytest.fixture(scope="module")
def claps(tmp_path_factory):
    """Both tiny CLaPs and the GPT-2 tokenizer, saved once per module (each test copies them into its store)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, discrete in (("gaussian", False), ("discrete", True)):
        clap = _clap(discrete)
        save_clap(clap, root / name)
        out[name] = clap
    shutil.copytree(GPT2_TOKENIZER_DIR, root / "tokenizer")
    return root, out, load_tokenizer(root / "tokenizer")


@pytest.fixture
def world(tmp_path, claps):
    """A fresh store holding the CLaPs + tokenizer (so `Store.local_copy` finds them as the worker would)."""
    root, models, tokenizer = claps
    store = Store(str(tmp_path / "store"))
    shutil.copytree(root, store.url("models"))
    return store, models, tokenizer


def _texts(prompts=PROMPTS, pairs=PAIRS):
    pr = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    return list(prompts), pr, list(pairs)


def _run_night(store: Store, name: str, prompts, pr, pairs, *, texts_per_job: int, **commit) -> tuple[list, int]:
    """plan + encode (in-process, as Ray workers would) + one commit; returns the job results and rows written."""
    table = TextLatentTable(store, name)
    jobs = plan_encode_jobs(table, prompts, pr, pairs, discrete=name == "discrete", texts_per_job=texts_per_job,
                            clap_path=("models", name), tokenizer_path=("models", "tokenizer"),
                            prompt_tokens=PT, response_tokens=RT)
    results = [encode_texts(job) for job in jobs]
    table.commit([f for r in results for f in r["fragments"]], **commit)
    return results, sum(r["texts"] for r in results)


def _assert_same(got, want):
    assert got.prompt_index == want.prompt_index and got.response_index == want.response_index
    assert got.pair_index == want.pair_index
    for name in ("features", "mu", "logvar", "prompt_ids", "prompt_mask", "code_logits", "prior_logits",
                 "pair_logits"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["gaussian", "discrete"])
def test_round_trip_matches_build_latent_cache(world, name):
    store, models, tokenizer = world
    prompts, pr, pairs = _texts()
    n_texts = len(set(prompts)) + len(set(pr)) + (len(set(pairs)) if name == "discrete" else 0)
    table = TextLatentTable(store, name)
    assert table.known([text_key(p) for p in prompts]) == set()        # absent table
    jobs = plan_encode_jobs(table, prompts, pr, pairs, discrete=name == "discrete",
                            texts_per_job=(n_texts + 1) // 2, clap_path=("models", name),
                            tokenizer_path=("models", "tokenizer"), prompt_tokens=PT, response_tokens=RT)
    assert len(jobs) == 2 and sum(j.n_texts for j in jobs) == n_texts
    results = [encode_texts(job) for job in jobs]
    assert sum(r["texts"] for r in results) == n_texts
    version = table.commit([f for r in results for f in r["fragments"]])
    assert version is not None and table.commit([]) is None

    want = build_latent_cache(models[name], tokenizer, prompts, pr, prompt_tokens=PT, response_tokens=RT,
                              pairs=pairs)
    _assert_same(table.load(prompts, pr, pairs), want)
    # a chunk's subset, in its own order
    sub = table.load(prompts[2:0:-1], pr[3:5], pairs[1:2])
    assert list(sub.prompt_index) == [text_key(p) for p in prompts[2:0:-1]]
    i = want.prompt_index[text_key(prompts[1])]
    torch.testing.assert_close(sub.features[1], want.features[i], atol=1e-6, rtol=0)

    # tokens: the real (unpadded) tokens the encoder saw, summed over both jobs
    p_mask = tokenize_prompts(tokenizer, list(dict.fromkeys(prompts)), PT)[1]
    upr = list(dict.fromkeys(pr))
    expect = int(p_mask.sum()) + int(tokenize_prompts(tokenizer, [p for p, _ in upr], PT)[1].sum()) \
        + int(tokenize_responses(tokenizer, [r for _, r in upr], RT)[1].sum())
    if name == "discrete":
        up = list(dict.fromkeys(pairs))
        expect += int(tokenize_prompts(tokenizer, [p for p, _, _ in up], PT)[1].sum()) \
            + sum(int(tokenize_responses(tokenizer, [t[j] for t in up], RT)[1].sum()) for j in (1, 2))
    assert sum(r["tokens"] for r in results) == expect


@pytest.mark.parametrize("name", ["gaussian", "discrete"])
def test_content_keying_encodes_only_new_texts(world, name):
    store, models, tokenizer = world
    discrete = name == "discrete"
    a_prompts, a_pr, a_pairs = _texts(PROMPTS[:2], PAIRS[:2])
    _, written = _run_night(store, name, a_prompts, a_pr, a_pairs, texts_per_job=3)
    table = TextLatentTable(store, name)
    rows_a = table._open().count_rows()
    assert written == rows_a

    b_prompts, b_pr, b_pairs = _texts(PROMPTS, PAIRS)
    new_p, new_pr, new_pairs = table.missing_texts(a_prompts + b_prompts, a_pr + b_pr, a_pairs + b_pairs,
                                                   discrete=discrete)
    assert new_p == [p for p in dict.fromkeys(b_prompts) if p not in a_prompts]
    assert new_pr == [t for t in dict.fromkeys(b_pr) if t not in a_pr]
    assert new_pairs == ([t for t in dict.fromkeys(b_pairs) if t not in a_pairs] if discrete else [])

    # a later night: one user's one new pair (a new response to a known prompt) -> exactly its new texts
    extra = (PROMPTS[0], "a brand new answer", RESPONSES[1])
    n_prompts, n_pr, n_pairs = _texts(PROMPTS[:2], PAIRS[:2] + [extra])
    assert table.missing_texts(n_prompts, n_pr, n_pairs, discrete=discrete) == (
        [], [(PROMPTS[0], "a brand new answer")], [extra] if discrete else [])
    _, written = _run_night(store, name, n_prompts, n_pr, n_pairs, texts_per_job=100, compact_over=1)
    assert written == (2 if discrete else 1)
    assert table._open().count_rows() == rows_a + written
    assert len(table._open().get_fragments()) == 1                     # compacted past compact_over
    want = build_latent_cache(models[name], tokenizer, n_prompts, n_pr, prompt_tokens=PT, response_tokens=RT,
                              pairs=n_pairs)
    _assert_same(table.load(n_prompts, n_pr, n_pairs), want)
    assert plan_encode_jobs(table, n_prompts, n_pr, n_pairs, discrete=discrete, texts_per_job=4,
                            clap_path=(), tokenizer_path=(), prompt_tokens=PT, response_tokens=RT) == []


def test_duplicate_rows_are_tolerated(world):
    store, models, tokenizer = world
    prompts, pr, pairs = _texts()
    table = TextLatentTable(store, "discrete")
    job = EncodeJob(store_root=store.root, clap_version="discrete", clap_path=("models", "discrete"),
                    tokenizer_path=("models", "tokenizer"), prompts=tuple(prompts), prompt_response=tuple(pr),
                    pairs=tuple(pairs), prompt_tokens=PT, response_tokens=RT)
    first, retried = encode_texts(job), encode_texts(job)          # e.g. a retried task, or two workers
    table.commit(first["fragments"])
    table.commit(retried["fragments"])
    table.commit(encode_texts(job)["fragments"])                   # and another night re-encoding them all
    assert table._open().count_rows() == 3 * first["texts"]
    want = build_latent_cache(models["discrete"], tokenizer, prompts, pr, prompt_tokens=PT, response_tokens=RT,
                              pairs=pairs)
    _assert_same(table.load(prompts, pr, pairs), want)
    assert table.known([text_key(PROMPTS[0]), text_key("never seen")]) == {text_key(PROMPTS[0])}


def test_missing_text_raises_key_error(world):
    store, _, _ = world
    table = TextLatentTable(store, "gaussian")
    with pytest.raises(KeyError, match="does not exist"):
        table.load(PROMPTS, [])
    prompts, pr, pairs = _texts(PROMPTS[:2], PAIRS[:2])
    _run_night(store, "gaussian", prompts, pr, pairs, texts_per_job=100)
    with pytest.raises(KeyError, match=f"1 of 4 texts have no row .*prompt key {text_key('unseen prompt')}"):
        table.load(prompts + ["unseen prompt"], pr[:1])


def test_settings_mismatch_and_concurrent_creation(world, monkeypatch):
    store, models, tokenizer = world
    table = TextLatentTable(store, "gaussian")
    cache = build_latent_cache(models["gaussian"], tokenizer, PROMPTS[:1], [], prompt_tokens=PT, response_tokens=RT)
    table.write_fragments(cache)                                    # creates the (empty) table
    # another worker that also saw no table: its create meets "already exists" and goes on
    real_open, calls = TextLatentTable._open, []

    def open_missing_once(self):
        calls.append(1)
        return None if len(calls) == 1 else real_open(self)

    monkeypatch.setattr(TextLatentTable, "_open", open_missing_once)
    assert len(table.write_fragments(cache)) == 1 and len(calls) == 2
    monkeypatch.undo()
    wider = build_latent_cache(models["gaussian"], tokenizer, PROMPTS[:1], [], prompt_tokens=PT + 4,
                               response_tokens=RT)
    with pytest.raises(ValueError, match="fixed per CLaP version"):
        table.write_fragments(wider)


@pytest.mark.parametrize("name", ["gaussian", "discrete"])
def test_encode_planner_over_batches_plans_what_one_call_plans(world, name):
    """The night plans from its pairs batch by batch (EncodePlanner): the same jobs as plan_encode_jobs over the
    whole lists (every chosen before every rejected, the evaluation prompts last), holding only the new texts."""
    store, models, tokenizer = world
    discrete = name == "discrete"
    _run_night(store, name, *_texts(PROMPTS[:2], PAIRS[:2]), texts_per_job=3)      # some texts are held already
    responses = RESPONSES + ["a brand new answer", "yet another"]
    rng = random.Random(0)
    rows = [(rng.choice(PROMPTS + ["a new prompt"]), *rng.sample(responses, 2)) for _ in range(40)]
    prompts, chosen, rejected = ([r[i] for r in rows] for i in range(3))
    extra = ["an evaluation prompt", PROMPTS[0]]
    table = TextLatentTable(store, name)
    fields = {"clap_path": ("models", name), "tokenizer_path": ("models", "tokenizer"), "prompt_tokens": PT,
              "response_tokens": RT}
    want = plan_encode_jobs(table, prompts + extra, list(zip(prompts, chosen)) + list(zip(prompts, rejected)),
                            rows, discrete=discrete, texts_per_job=3, **fields)
    planner = EncodePlanner(table, discrete=discrete, recent_keys=4)      # a tiny memory of held keys: forgets
    for lo in range(0, len(rows), 7):
        p, c, r = prompts[lo:lo + 7], chosen[lo:lo + 7], rejected[lo:lo + 7]
        planner.add("prompt", p)
        planner.add("response", zip(p, c), group=0)
        planner.add("response", zip(p, r), group=1)
        planner.add("pair", zip(p, c, r))
    planner.add("prompt", extra, group=1)
    assert want and planner.jobs(texts_per_job=3, **fields) == want
    held = {text_key(p) for p in PROMPTS[:2]}
    assert not any(text_key(p) in held for p in planner.missing()[0])    # only texts without a row are kept
    with pytest.raises(ValueError, match="kind='answer'"):
        planner.add("answer", ["x"])
    with pytest.raises(ValueError, match="texts_per_job=0"):
        planner.jobs(texts_per_job=0, **fields)
