"""tasks/data/corpus.py: loading corpora and cutting prompts (spec latent-dpo.md §4.1 step 1)."""

import gzip
import json
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import GPT2Tokenizer

from latentpref.tasks.data import corpus

GPT2_DIR = Path(corpus.__file__).resolve().parents[1] / "assets" / "gpt2"


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer.from_pretrained(str(GPT2_DIR))


@pytest.fixture(scope="module")
def docs():
    return corpus.load_documents(limit=120)


def test_vendored_corpus_loads_with_unique_ids_and_interleaved_labels():
    table = corpus.load_documents()
    assert table.schema == corpus.DOCUMENTS_SCHEMA
    assert table.num_rows == 1500
    assert Counter(table.column("label").to_pylist()) == {"1": 750, "-1": 750}
    assert len(set(table.column("doc_id").to_pylist())) == 1500
    first = corpus.load_documents(limit=10)
    assert Counter(first.column("label").to_pylist()) == {"1": 5, "-1": 5}  # limit stays balanced
    assert first.column("doc_id").to_pylist() == table.column("doc_id").to_pylist()[:10]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "jsonl.gz", "txt"])
def test_load_documents_from_files(tmp_path, fmt):
    rows = [{"doc_id": 7, "body": "first review , quite good .", "label": 1},
            {"doc_id": 8, "body": "second review , bad .", "label": 0},
            {"doc_id": 9, "body": "first review , quite good .", "label": 1}]  # duplicate text dropped
    path = tmp_path / f"docs.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        path.write_text("doc_id,body,label\n" + "".join(f'{r["doc_id"]},"{r["body"]}",{r["label"]}\n' for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    else:
        path.write_text("".join(r["body"] + "\n" for r in rows) + "\n")
    table = corpus.load_documents(str(path), text_column="body")
    assert table.schema == corpus.DOCUMENTS_SCHEMA
    assert table.column("text").to_pylist() == ["first review , quite good .", "second review , bad ."]
    if fmt == "txt":
        assert table.column("label").to_pylist() == [None, None]
        assert all(d.startswith("d") for d in table.column("doc_id").to_pylist())  # content hash
    else:
        assert table.column("doc_id").to_pylist() == ["7", "8"]
        assert table.column("label").to_pylist() == ["1", "0"]


def test_load_documents_via_fsspec_uri():
    with fsspec.open("memory://corpus/docs.jsonl", "w") as f:
        f.write(json.dumps({"text": "a review from an object store"}) + "\n")
    table = corpus.load_documents("memory://corpus/docs.jsonl")
    assert table.column("text").to_pylist() == ["a review from an object store"]


def test_missing_text_column_names_file_and_column(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("id,review\n1,hello\n")
    with pytest.raises(ValueError, match=r"docs\.csv.*'text'.*\['id', 'review'\]"):
        corpus.load_documents(str(path))


def test_prompts_split_hygiene_and_determinism(docs, tokenizer):
    prompts = corpus.make_prompts(docs, tokenizer, n_prompts=40, seed=3)
    assert prompts.schema == corpus.PROMPTS_SCHEMA
    assert Counter(prompts.column("split").to_pylist()) == {"train": 32, "val": 4, "test": 4}
    # one prompt per doc, and the doc's split is its corpus-level split (never per sentence / prompt)
    assert len(set(prompts.column("doc_id").to_pylist())) == prompts.num_rows
    doc_split = dict(zip(docs.column("doc_id").to_pylist(), corpus.assign_splits(docs.column("doc_id").to_pylist(), seed=3)))
    for row in prompts.to_pylist():
        assert row["split"] == doc_split[row["doc_id"]]
        assert row["prompt_id"] == f"{row['doc_id']}-0"
    assert corpus.make_prompts(docs, tokenizer, n_prompts=40, seed=3).equals(prompts)
    # input order does not matter; another seed gives another split
    reversed_docs = docs.take(pa.array(range(docs.num_rows - 1, -1, -1)))
    assert corpus.make_prompts(reversed_docs, tokenizer, n_prompts=40, seed=3).equals(prompts)
    other = corpus.make_prompts(docs, tokenizer, n_prompts=40, seed=4)
    assert other.column("doc_id").to_pylist() != prompts.column("doc_id").to_pylist()


def test_split_assignment_is_per_document_and_exact():
    ids = [f"doc{i}" for i in range(1000)]
    splits = corpus.assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
    assert Counter(splits) == {"train": 800, "val": 100, "test": 100}
    assert dict(zip(ids, splits)) == dict(zip(ids[::-1], corpus.assign_splits(ids[::-1], seed=0)))
    assert Counter(corpus.assign_splits(ids[:5], seed=0)) == {"train": 3, "val": 1, "test": 1}


def test_prompt_and_reference_token_budget(docs, tokenizer):
    prompts = corpus.make_prompts(docs, tokenizer, n_prompts=20, prompt_tokens=64, reference_tokens=48)
    text_of = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    for row in prompts.to_pylist():
        assert len(tokenizer(row["prompt"])["input_ids"]) <= 64
        assert len(tokenizer(row["reference"])["input_ids"]) <= 48 + 1
        # byte-level BPE decodes losslessly: prompt then reference is the document's opening
        assert text_of[row["doc_id"]].startswith(row["prompt"] + row["reference"])


def test_short_documents_are_skipped(tokenizer):
    docs = pa.table({"doc_id": ["short", "long"], "text": ["too short .", "word " * 200], "label": [None, None]})
    prompts = corpus.make_prompts(docs, tokenizer, n_prompts=None, prompt_tokens=8, reference_tokens=4, split_fractions=(1, 0, 0))
    assert prompts.column("doc_id").to_pylist() == ["long"]
    assert len(tokenizer(prompts.column("prompt")[0].as_py())["input_ids"]) == 8


def test_too_many_prompts_is_a_clear_error(docs, tokenizer):
    with pytest.raises(ValueError, match=r"n_prompts=500: split 'train' needs 400"):
        corpus.make_prompts(docs, tokenizer, n_prompts=500)
