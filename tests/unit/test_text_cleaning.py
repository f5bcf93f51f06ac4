"""Texts are cleaned of control characters at preparation (issue 27 item 7): validate.clean_text, and every
prompt, reference and candidate text the prepare stage makes passes the feedback validation."""

import pyarrow as pa
import pytest
import torch

from latentpref.pipelines.config import load_config
from latentpref.tasks.data import candidates as cands
from latentpref.tasks.data import corpus, validate
from latentpref.tasks.data.validate import clean_text
from latentpref.tasks.models.registry import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def refused(texts: list[str]) -> dict[str, str]:
    """{text: reason} for the texts validate_feedback refuses, each given as a prompt and as a response."""
    n = len(texts)
    table = pa.table({"user_id": [f"u{i}" for i in range(n)], "prompt": texts, "chosen": texts,
                      "rejected": ["another response, unlike any text here"] * n})
    _, bad = validate.validate_feedback(table)
    return {texts[r]: reason for r, reason in zip(bad["row"].to_pylist(), bad["reason"].to_pylist())}


@pytest.mark.parametrize("raw, clean", [
    ("red corner \x16 and", "red corner  and"),           # the vendored review's SYN
    ("nul\x00byte", "nulbyte"),
    ("del\x7f", "del"),
    ("c1 \x85 next line, \x9b csi", "c1  next line,  csi"),  # C1 controls
    ("cut inside a character \ufffd", "cut inside a character "),
    ("tab\tnewline\ncr\r", "tab\tnewline\ncr\r"),           # what validation accepts is kept
    ("café naïve déjà vu 😀 中文 \u00a0nbsp \u200bzwsp", "café naïve déjà vu 😀 中文 \u00a0nbsp \u200bzwsp"),
])
def test_clean_text_known_values(raw, clean):
    assert clean_text(raw) == clean
    assert clean_text(clean) == clean                      # idempotent


def test_clean_text_removes_exactly_what_validation_refuses():
    # one definition of a control character: the Python side (clean_text) and the RE2 side (validate_feedback)
    # agree on every code point of the first planes' interesting ranges
    points = [*range(0x0, 0x300), 0x2028, 0x2029, 0xFEFF, 0xFFFC, 0xFFFD, 0xFFFF, 0x1F600]
    texts = [f"a{chr(c)}b" for c in points]
    flagged = refused(texts)
    assert {t for t in texts if clean_text(t) != t} == set(flagged)
    assert {ord(t[1]) for t in flagged} == {*range(0x0, 0x9), 0xB, 0xC, *range(0xE, 0x20), *range(0x7F, 0xA0), 0xFFFD}
    assert {r.split(":")[0] for r in flagged.values()} == {"control_chars", "invalid_utf8"}


def test_vendored_corpus_is_clean_and_its_broken_punctuation_repaired():
    docs = corpus.load_documents()
    texts = dict(zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist()))
    assert all(clean_text(t) == t for t in texts.values())
    # seven reviews had Windows-1252 punctuation with the high bit stripped (\x12 for a right quote, ...);
    # ids are hashes of the text as read, so they did not move
    assert texts["df0a4fb9e07dd550"].startswith("i was recently told that in china their had been strong protests "
                                                "against the release of red corner - and this is")
    assert texts["d3cc4c375f9dbbba"].startswith("i won't even pretend")


def test_tiny_preset_prompts_pass_feedback_validation(tokenizer):
    cfg = load_config("tiny").data
    prompts = corpus.make_prompts(corpus.load_documents(cfg.corpus), tokenizer, n_prompts=cfg.n_prompts,
                                  prompt_tokens=cfg.prompt_tokens, reference_tokens=cfg.response_tokens, seed=cfg.seed)
    assert "df0a4fb9e07dd550-0" in prompts["prompt_id"].to_pylist()   # the review that carried \x16
    texts = prompts["prompt"].to_pylist() + prompts["reference"].to_pylist()
    assert refused(texts) == {}


def test_prompt_cut_inside_a_character_is_cleaned(tokenizer):
    # the prompt budget ends inside the emoji's bytes: the decoded cut (U+FFFD) is dropped from both sides
    text = "word " * 3 + "😀" + " word" * 40
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:n]))
    docs = pa.table({"doc_id": ["e"], "text": [text], "label": [None]}, schema=corpus.DOCUMENTS_SCHEMA)
    prompts = corpus.make_prompts(docs, tokenizer, n_prompts=None, prompt_tokens=cut, reference_tokens=4,
                                  split_fractions=(1, 0, 0))
    assert refused(prompts["prompt"].to_pylist() + prompts["reference"].to_pylist()) == {}


def test_candidate_texts_are_cleaned_before_they_are_stored(tokenizer):
    dirty = tokenizer(" good\x16 film\x85", add_special_tokens=False)["input_ids"]
    dirty += tokenizer("😀", add_special_tokens=False)["input_ids"][:1]      # a character cut at max_new_tokens
    assert tokenizer.decode(dirty) == " good\x16 film\x85\ufffd"

    def emits_control_chars(prompt_ids, attention_mask, *, max_new_tokens, generator):
        return torch.tensor([dirty] * prompt_ids.shape[0])

    prompts = pa.table({"prompt_id": ["a-0", "b-0"], "prompt": ["the movie was", "i think this"]})
    table = cands.generate_candidates(emits_control_chars, tokenizer, prompts, k=2, max_new_tokens=len(dirty))
    assert table["text"].to_pylist() == [" good film"] * 4
    assert refused(table["text"].to_pylist()) == {}
