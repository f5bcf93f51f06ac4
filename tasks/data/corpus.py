"""Document corpus -> prompts table (spec latent-dpo.md §4.1 step 1, adapted to the vendored corpus).

The paper uses IMDB (not reachable offline); the vendored stand-in is the Pang & Lee polarity v2.0
sample (1,500 full movie reviews, lower-cased and tokenized; see tasks/assets/corpora/README-*).

Tables (column names are the contract, notes/CONTRACT.md):
- documents: doc_id:str, text:str, label:str (nullable)
- prompts:   prompt_id:str, doc_id:str, split:str in {train,val,test}, prompt:str, reference:str

Texts are cleaned (validate.clean_text: control characters and U+FFFD removed) as documents are loaded and
again on every decoded prompt / reference, so each one passes the feedback validation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from latentpref.tasks.data.validate import clean_text

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_CORPUS = ASSETS / "corpora" / "pang_lee_reviews.csv.gz"
SPLITS = ("train", "val", "test")

DOCUMENTS_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("label", pa.string())])
PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("doc_id", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
    ]
)
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# Seven vendored reviews carry Windows-1252 punctuation with its high bit stripped (0x92 -> 0x12): put
# back the corpus's own ASCII spelling (don't, "quoted", " - ", ". . .") before the generic cleaning.
_VENDORED_PUNCT = str.maketrans({"\x12": "'", "\x13": '"', "\x14": '"', "\x16": "-", "\x05": ". . ."})


def _format_of(source: str) -> str:
    """File format from the name, ignoring a compression suffix: parquet | csv | jsonl | text."""
    name = source.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "text"


def _read_bytes(source: str) -> bytes:
    # compression="infer" makes `reviews.csv.gz` and `s3://bucket/x.jsonl.gz` work alike.
    with fsspec.open(source, "rb", compression="infer") as f:
        return f.read()


def _read_table(source: str, fmt: str) -> pa.Table:
    data = _read_bytes(source)
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt == "csv":
        delimiter = "\t" if ".tsv" in source.lower() else ","
        return pacsv.read_csv(
            io.BytesIO(data),
            # reviews span several lines inside one quoted field
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        )
    if fmt == "jsonl":
        try:
            return pajson.read_json(io.BytesIO(data))
        except pa.ArrowInvalid:
            # a top-level JSON array (`[{...}, ...]`) rather than one object per line
            return pa.Table.from_pylist(json.loads(data.decode("utf-8-sig")))
    lines = data.decode("utf-8-sig").splitlines()
    return pa.table({"text": pa.array([ln for ln in lines if ln.strip()], pa.string())})


def _read_vendored() -> pa.Table:
    # The vendored CSV has no header and starts with a UTF-8 BOM (pyarrow skips the BOM).
    table = pacsv.read_csv(
        str(DEFAULT_CORPUS),
        read_options=pacsv.ReadOptions(column_names=["label", "text"]),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={"label": pa.string(), "text": pa.string()}),
    )
    # Rows are sorted by label (750 positive, then 750 negative): interleave them so that
    # `limit=n` keeps both polarities.
    labels = np.asarray(table.column("label").to_pylist())
    pos, neg = np.flatnonzero(labels == "1"), np.flatnonzero(labels != "1")
    order = np.empty(len(labels), dtype=np.int64)
    m = min(len(pos), len(neg))
    order[0 : 2 * m : 2], order[1 : 2 * m : 2] = pos[:m], neg[:m]
    order[2 * m :] = np.concatenate([pos[m:], neg[m:]])
    return table.take(pa.array(order))


def _content_id(text: str) -> str:
    return "d" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:15]


def load_documents(source: str | None = None, *, text_column: str = "text", limit: int | None = None) -> pa.Table:
    """Load a corpus as a documents table (doc_id, text, label).

    Args:
        source: None for the vendored Pang & Lee reviews; otherwise a local path or fsspec URI
            (s3://...) of a Parquet, CSV (with header), JSONL or plain-text file (one document per
            line), optionally compressed (.gz, .bz2, ...). The format follows the file name.
        text_column: column holding the text (ignored for plain text). A `doc_id` column is used
            as the id when present (else a content hash, so ids survive re-ordering); a `label`
            column is kept as a string.
        limit: keep only the first `limit` documents (after dropping empty and duplicate texts).

    Returns:
        Table with DOCUMENTS_SCHEMA, texts cleaned (`clean_text`), unique and non-empty.

    Raises:
        ValueError: the file lacks `text_column`, or `limit` < 1.
        FileNotFoundError: the file does not exist.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be a positive integer or None")
    if source is None:
        table, name, column = _read_vendored(), str(DEFAULT_CORPUS), "text"
    else:
        fmt = _format_of(source)
        table, name = _read_table(source, fmt), source
        column = "text" if fmt == "text" else text_column
    if column not in table.column_names:
        raise ValueError(
            f"{name}: no text column {column!r}; columns are {table.column_names}. "
            f"Pass text_column=<one of them>."
        )

    raw = [t if isinstance(t, str) else None for t in table.column(column).to_pylist()]
    repair = (lambda t: t.translate(_VENDORED_PUNCT)) if source is None else (lambda t: t)
    texts = [None if t is None else clean_text(repair(t)) for t in raw]
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(texts)
    given_ids = table.column("doc_id").to_pylist() if "doc_id" in table.column_names else None

    rows: dict[str, list[Any]] = {"doc_id": [], "text": [], "label": []}
    seen_text: set[str] = set()
    seen_id: set[str] = set()
    dropped = 0
    for i, text in enumerate(texts):
        if text is None or not text.strip() or text in seen_text:
            dropped += 1
            continue
        # the hash is of the text as read, so cleaning leaves ids (hence splits and prompt choice) unchanged
        doc_id = str(given_ids[i]) if given_ids is not None and given_ids[i] is not None else _content_id(raw[i])
        if doc_id in seen_id:
            raise ValueError(f"{name}: doc_id {doc_id!r} occurs twice (row {i}); doc ids must be unique")
        seen_text.add(text)
        seen_id.add(doc_id)
        rows["doc_id"].append(doc_id)
        rows["text"].append(text)
        rows["label"].append(None if labels[i] is None else str(labels[i]))
        if limit is not None and len(rows["text"]) >= limit:
            break
    if dropped:
        log.info("%s: dropped %d empty or duplicate documents", name, dropped)
    return pa.table(rows, schema=DOCUMENTS_SCHEMA)


def _split_rank(doc_ids: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random order of documents that depends only on (seed, doc_id)."""
    keys = [hashlib.sha256(f"{seed}\x1f{d}".encode()).digest()[:8] for d in doc_ids]
    return np.argsort(np.array([int.from_bytes(k, "big") for k in keys], dtype=np.uint64), kind="stable")


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n into integer counts proportional to fractions (largest remainder); every split with a
    positive fraction gets at least one item when n allows it."""
    f = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    counts = np.floor(f * n).astype(int)
    for i in np.argsort(-(f * n - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i in range(len(f)):
        if f[i] > 0 and counts[i] == 0 and n >= int((f > 0).sum()):
            counts[i] = 1
            counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def assign_splits(doc_ids: Sequence[str], split_fractions: Sequence[float] = (0.8, 0.1, 0.1), *, seed: int = 0) -> list[str]:
    """Split per document (never per sentence or prompt): documents are ordered by a seeded hash
    of their id and cut into contiguous blocks of exact sizes. Input order does not matter."""
    if len(split_fractions) != len(SPLITS) or min(split_fractions) < 0 or sum(split_fractions) <= 0:
        raise ValueError(f"split_fractions={tuple(split_fractions)!r}: need 3 non-negative fractions for {SPLITS}")
    order = _split_rank(doc_ids, seed)
    counts = _allocate(len(doc_ids), split_fractions)
    splits = np.empty(len(doc_ids), dtype=object)
    start = 0
    for name, count in zip(SPLITS, counts):
        splits[order[start : start + count]] = name
        start += count
    return splits.tolist()


def _leading_tokens(tokenizer, text: str, n_tokens: int) -> list[int]:
    """Token ids of the first n_tokens of text, without tokenizing the whole (long) document.

    GPT-2 BPE never merges across a whitespace->non-whitespace boundary, so tokenizing a prefix
    that is cut just before a whitespace run gives the same leading ids as the full text."""
    budget = 8 * n_tokens + 64
    while budget < len(text):
        cut = budget
        while cut < len(text) and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut += 1
        ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        budget *= 2
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]


def make_prompts(
    docs: pa.Table,
    tokenizer,
    *,
    n_prompts: int | None,
    prompt_tokens: int = 64,
    reference_tokens: int = 48,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pa.Table:
    """One prompt per document: its first `prompt_tokens` tokens, plus the next `reference_tokens`
    tokens as the reference continuation (spec latent-dpo.md §4.1: prompts 64 tokens, responses 48).

    Splits are assigned per document (`assign_splits`) over the whole corpus, before filtering, so a
    document's split does not change with the tokenizer or `n_prompts`. Documents shorter than
    prompt_tokens + reference_tokens tokens are skipped. The `n_prompts` prompts are divided among
    splits by `split_fractions` and taken in seeded hash order; prompt_id = f"{doc_id}-0".

    Args:
        docs: documents table (doc_id, text, ...).
        tokenizer: a Hugging Face tokenizer (GPT-2 BPE in this project).
        n_prompts: total number of prompts, or None for every long-enough document.

    Returns:
        Table with PROMPTS_SCHEMA ordered train, val, test. Re-tokenizing a prompt gives at most
        `prompt_tokens` tokens.

    Raises:
        ValueError: too few long-enough documents in some split for `n_prompts`.
    """
    for col in ("doc_id", "text"):
        if col not in docs.column_names:
            raise ValueError(f"docs has no column {col!r}; columns are {docs.column_names}")
    if prompt_tokens < 1 or reference_tokens < 1:
        raise ValueError(f"prompt_tokens={prompt_tokens}, reference_tokens={reference_tokens}: both must be >= 1")
    doc_ids = [str(d) for d in docs.column("doc_id").to_pylist()]
    texts = docs.column("text").to_pylist()
    splits = assign_splits(doc_ids, split_fractions, seed=seed)
    order = _split_rank(doc_ids, seed + 1)  # selection order, independent of the split cut

    quotas: dict[str, int | None]
    if n_prompts is None:
        quotas = {s: None for s in SPLITS}
    else:
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts!r} must be >= 1 or None")
        quotas = dict(zip(SPLITS, _allocate(n_prompts, split_fractions)))

    need = prompt_tokens + reference_tokens
    chosen: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    short = 0
    for i in order:
        split = splits[i]
        quota = quotas[split]
        if quota is not None and len(chosen[split]) >= quota:
            if all(q is not None and len(chosen[s]) >= q for s, q in quotas.items()):
                break
            continue
        ids = _leading_tokens(tokenizer, texts[i], need)
        if len(ids) < need:
            short += 1
            continue
        prompt_ids = ids[:prompt_tokens]
        # clean_text: a cut inside a multi-byte character decodes to U+FFFD, which validation refuses
        prompt = clean_text(tokenizer.decode(prompt_ids))
        # Decode/encode is not always an exact round trip (a cut inside a multi-byte character,
        # a word cut between BPE pieces); drop tokens until the prompt re-encodes within budget.
        while len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > prompt_tokens:
            prompt_ids = prompt_ids[:-1]
            prompt = clean_text(tokenizer.decode(prompt_ids))
        chosen[split].append(
            {
                "prompt_id": f"{doc_ids[i]}-0",
                "doc_id": doc_ids[i],
                "split": split,
                "prompt": prompt,
                "reference": clean_text(tokenizer.decode(ids[prompt_tokens:need])),
            }
        )
    for split, quota in quotas.items():
        if quota is not None and len(chosen[split]) < quota:
            raise ValueError(
                f"n_prompts={n_prompts}: split {split!r} needs {quota} documents with >= {need} tokens "
                f"but has {len(chosen[split])} (of {splits.count(split)}; {short} documents too short "
                f"overall). Lower n_prompts or load a larger corpus."
            )
    if short:
        log.info("make_prompts: skipped %d documents shorter than %d tokens", short, need)
    rows = [r for s in SPLITS for r in chosen[s]]
    return pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)
