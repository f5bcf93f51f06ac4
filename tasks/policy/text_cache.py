"""Content-keyed latent cache of one CLaP version (spec latent-dpo.md §8): one Lance row per encoded text.

The safetensors cache (tasks/policy/cache.py) is one file per *set* of texts, so one new text re-encodes them all.
Here a text is encoded once per CLaP version, whoever's feedback it is in: the table at
`<store>/cache/<clap_version>/texts.lance` is keyed by `text_key` of the text(s), a night encodes only the texts
without a row (`missing_texts`), many worker tasks encode them (`encode_texts`, plain data in and out; the flow owns
Ray) and write uncommitted fragments, and the driver commits every worker's fragments as ONE version (`commit`).
A fit chunk then reads just its rows back as a normal `LatentCache` (`load`).

Rows (`kind`, then the kind's columns; the other columns are null):
- "prompt":   key = text_key(prompt); features (Q*d, flattened), prompt_ids / prompt_mask (width, left-padded as
              `build_latent_cache` pads them); discrete CLaPs also prior_logits (K)
- "response": key = text_key(prompt, response); mu, logvar (D); discrete also code_logits (K)
- "pair":     key = text_key(prompt, chosen, rejected); pair_logits (K); discrete CLaPs only
Q, d, the prompt width, D, K (0 for Gaussian CLaPs) and the latent type are schema metadata, fixed when the first
worker creates the table.

Encoding is deterministic per CLaP version, so a duplicated row (two workers, a retried task) holds the same numbers:
`load` takes any one of them. Keys of the same text under different token budgets collide, so the budgets must be
fixed per CLaP version (the prompt width is checked on write; the response budget is not visible in the rows).
"""
from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from latentpref.tasks.data.store import Store
from latentpref.tasks.policy.cache import LatentCache, build_latent_cache, text_key

__all__ = ["TABLE_FORMAT", "EncodeJob", "EncodePlanner", "TextLatentTable", "encode_texts", "plan_encode_jobs",
           "row_schema"]

TABLE_FORMAT = "1"          # bump when the row layout changes (a new table folder would then be needed)
_META = "latentpref."       # schema-metadata prefix
_LOOKUP_BATCH = 50_000      # keys per `isin` filter: one huge literal list costs more than a few scans
_FLOAT_COLUMNS = ("features", "prior_logits", "mu", "logvar", "code_logits", "pair_logits")


def row_schema(*, feature_shape: tuple[int, int], prompt_width: int, latent_dim: int, n_codes: int,
               latent_type: str) -> pa.Schema:
    """The table's Arrow schema: every tensor column is a nullable fp32 (ids: int64) list, one row per text."""
    f32, i64 = pa.list_(pa.float32()), pa.list_(pa.int64())
    fields = [("key", pa.string()), ("kind", pa.string()), ("features", f32), ("prompt_ids", i64),
              ("prompt_mask", i64), ("prior_logits", f32), ("mu", f32), ("logvar", f32), ("code_logits", f32),
              ("pair_logits", f32)]
    meta = {"format": TABLE_FORMAT, "feature_shape": json.dumps(list(feature_shape)),
            "prompt_width": str(prompt_width), "latent_dim": str(latent_dim), "n_codes": str(n_codes),
            "latent_type": latent_type}
    return pa.schema(fields, metadata={_META + k: v for k, v in meta.items()})


def _meta(schema: pa.Schema) -> dict[str, str]:
    raw = schema.metadata or {}
    return {k.decode()[len(_META):]: v.decode() for k, v in raw.items() if k.decode().startswith(_META)}


def _uniq(items: Iterable) -> list:
    return list(dict.fromkeys(tuple(x) if isinstance(x, list) else x for x in items))


def _list_column(rows: torch.Tensor, dtype: pa.DataType) -> pa.ListArray:
    """(N, ...) tensor -> N list cells of its flattened rows, built from offsets (no per-float Python objects)."""
    n = rows.shape[0]
    width = math.prod(rows.shape[1:])
    flat = rows.reshape(n, width)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat.contiguous().numpy().reshape(-1), dtype))


def _tensor(column: pa.ChunkedArray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """N list cells -> (N, *shape) tensor (a copy: Arrow buffers are read-only)."""
    arr = np.array(column.combine_chunks().flatten().to_numpy(zero_copy_only=False), copy=True)
    return torch.from_numpy(arr).to(dtype).reshape(len(column), *shape)


class TextLatentTable:
    """Content-keyed latents of one CLaP version: Lance table at <store>/cache/<clap_version>/texts.lance."""

    def __init__(self, store: Store, clap_version: str):
        self.store = store
        self.clap_version = clap_version
        self.uri = store.lance_uri("cache", clap_version, "texts.lance")
        self._options = store.lance_options()

    def __repr__(self) -> str:
        return f"TextLatentTable({self.uri!r})"

    # --- reading ---------------------------------------------------------------------------------------------
    def _open(self):
        """The dataset at its latest version, or None where it does not exist yet (any other error propagates)."""
        import lance
        try:
            return lance.dataset(self.uri, storage_options=self._options)
        except ValueError as err:       # Lance reports an absent dataset as ValueError "... was not found"
            if "not found" in str(err).lower():
                return None
            raise

    def _rows(self, ds, keys: Sequence[str], columns: list[str]) -> pa.Table:
        """Every row (duplicates included) whose key is one of `keys`."""
        parts = [ds.to_table(columns=columns, filter=pc.field("key").isin(list(keys[i:i + _LOOKUP_BATCH])))
                 for i in range(0, len(keys), _LOOKUP_BATCH)]
        return pa.concat_tables(parts) if parts else ds.schema.empty_table().select(columns)

    def _present(self, keys: Sequence[str], ds=None) -> set[tuple[str, str]]:
        """(kind, key) of every row among `keys` (in `ds`, an opened version of the table; default: the latest)."""
        ds = ds if ds is not None else self._open()
        if ds is None or not keys:
            return set()
        rows = self._rows(ds, _uniq(keys), ["key", "kind"])
        return set(zip(rows["kind"].to_pylist(), rows["key"].to_pylist()))

    def known(self, keys: Iterable[str]) -> set[str]:
        """The keys among `keys` that have a row (set() where the table does not exist yet)."""
        return {k for _, k in self._present(list(keys))}

    def missing_texts(self, prompts: Iterable[str], prompt_response: Iterable[tuple[str, str]],
                      pairs: Iterable[tuple[str, str, str]] = (), *, discrete: bool
                      ) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str, str]]]:
        """The distinct prompts / (prompt, response) / (prompt, chosen, rejected) without a row, in first-seen order.

        Pairs matter only to discrete CLaPs (their pair posterior); for Gaussian ones the third list is []."""
        wanted = {"prompt": _uniq(prompts), "response": _uniq(prompt_response),
                  "pair": _uniq(pairs) if discrete else []}
        keyed = {kind: [(text_key(*t) if isinstance(t, tuple) else text_key(t), t) for t in texts]
                 for kind, texts in wanted.items()}
        present = self._present([k for rows in keyed.values() for k, _ in rows])
        missing = {kind: [t for k, t in rows if (kind, k) not in present] for kind, rows in keyed.items()}
        return missing["prompt"], missing["response"], missing["pair"]

    def load(self, prompts: Iterable[str], prompt_response: Iterable[tuple[str, str]],
             pairs: Iterable[tuple[str, str, str]] = ()) -> LatentCache:
        """The rows of exactly these texts as a `LatentCache` (the fields, shapes and dtypes `build_latent_cache`
        gives; indices follow the first-seen order of the texts). Pairs are read for discrete CLaPs only.

        Raises:
            KeyError: some text has no row (the message says how many and names one key).
        """
        uniq = {"prompt": [text_key(p) for p in _uniq(prompts)],
                "response": [text_key(*t) for t in _uniq(prompt_response)],
                "pair": [text_key(*t) for t in _uniq(pairs)]}
        ds = self._open()
        if ds is None:
            n = sum(map(len, uniq.values()))
            raise KeyError(f"latent table {self.uri} does not exist: all {n} texts are missing; encode them first "
                           "(missing_texts / encode_texts, then commit)")
        meta = _meta(ds.schema)
        discrete = meta["latent_type"] == "discrete"
        if not discrete:
            uniq["pair"] = []
        rows = self._rows(ds, [k for keys in uniq.values() for k in keys], ds.schema.names)
        first: dict[tuple[str, str], int] = {}
        for i, kk in enumerate(zip(rows["kind"].to_pylist(), rows["key"].to_pylist())):
            first.setdefault(kk, i)     # duplicates hold identical numbers: any one will do
        absent = [(kind, k) for kind, keys in uniq.items() for k in keys if (kind, k) not in first]
        if absent:
            total = sum(map(len, uniq.values()))
            kind, key = absent[0]
            raise KeyError(f"{len(absent)} of {total} texts have no row in {self.uri} (e.g. {kind} key {key}); "
                           "encode them first (missing_texts / encode_texts, then commit)")
        part = {kind: rows.take(pa.array([first[(kind, k)] for k in keys], pa.int64()))
                for kind, keys in uniq.items()}
        Q, d = json.loads(meta["feature_shape"])
        width = int(meta["prompt_width"])
        D, K = int(meta["latent_dim"]), int(meta["n_codes"])
        p, r, q = part["prompt"], part["response"], part["pair"]
        mu = _tensor(r["mu"], (D,), torch.float32)
        return LatentCache(
            {k: i for i, k in enumerate(uniq["prompt"])}, _tensor(p["features"], (Q, d), torch.float32),
            {k: i for i, k in enumerate(uniq["response"])}, mu, _tensor(r["logvar"], (D,), torch.float32),
            _tensor(p["prompt_ids"], (width,), torch.int64), _tensor(p["prompt_mask"], (width,), torch.int64),
            _tensor(r["code_logits"], (K,), torch.float32) if discrete else None,
            _tensor(p["prior_logits"], (K,), torch.float32) if discrete else None,
            {k: i for i, k in enumerate(uniq["pair"])} if discrete else None,
            _tensor(q["pair_logits"], (K,), torch.float32) if discrete else None,
        )

    # --- writing ---------------------------------------------------------------------------------------------
    def _ensure(self, schema: pa.Schema):
        """The dataset, created empty with `schema` where absent (a concurrent creator winning is fine); its
        metadata must match `schema`'s, or rows of different encodings would mix."""
        import lance
        ds = self._open()
        if ds is None:
            try:
                lance.write_dataset(schema.empty_table(), self.uri, mode="create", storage_options=self._options)
            except OSError as err:          # another worker created it between our check and our write
                if "already exists" not in str(err):
                    raise
            ds = self._open()
        have, want = _meta(ds.schema), _meta(schema)
        if have != want:
            raise ValueError(f"latent table {self.uri} holds {have}, this encoding is {want}: encoding settings "
                             "(prompt_tokens, latent type) must be fixed per CLaP version")
        return ds

    def write_fragments(self, cache: LatentCache) -> list[str]:
        """The rows of an encoded cache as uncommitted Lance fragments (worker side); [] for an empty cache.

        Returns the fragments' JSON (plain strings, so they travel through Ray and logs); `commit` takes them."""
        import lance
        discrete = cache.discrete
        schema = row_schema(feature_shape=tuple(cache.features.shape[1:]), prompt_width=cache.prompt_ids.shape[1],
                            latent_dim=cache.mu.shape[1], n_codes=cache.code_logits.shape[1] if discrete else 0,
                            latent_type="discrete" if discrete else "gaussian")
        parts = []
        prompt_cols = {"features": cache.features, "prompt_ids": cache.prompt_ids, "prompt_mask": cache.prompt_mask}
        if discrete:
            prompt_cols["prior_logits"] = cache.prior_logits
        parts.append(self._part(schema, "prompt", cache.prompt_index, prompt_cols))
        response_cols = {"mu": cache.mu, "logvar": cache.logvar}
        if discrete:
            response_cols["code_logits"] = cache.code_logits
        parts.append(self._part(schema, "response", cache.response_index, response_cols))
        if discrete and cache.pair_index:
            parts.append(self._part(schema, "pair", cache.pair_index, {"pair_logits": cache.pair_logits}))
        table = pa.concat_tables(parts)
        if table.num_rows == 0:
            return []
        self._ensure(schema)
        frags = lance.fragment.write_fragments(table, self.uri, schema=schema, storage_options=self._options)
        return [json.dumps(f.to_json()) for f in frags]

    @staticmethod
    def _part(schema: pa.Schema, kind: str, index: dict[str, int], columns: dict[str, torch.Tensor]) -> pa.Table:
        keys = sorted(index, key=index.__getitem__)
        order = torch.tensor([index[k] for k in keys], dtype=torch.long)
        arrays = []
        for f in schema:
            if f.name == "key":
                arrays.append(pa.array(keys, pa.string()))
            elif f.name == "kind":
                arrays.append(pa.array([kind] * len(keys), pa.string()))
            elif f.name in columns:
                dtype = pa.float32() if f.name in _FLOAT_COLUMNS else pa.int64()
                t = columns[f.name][order]
                arrays.append(_list_column(t.float() if dtype == pa.float32() else t.long(), dtype))
            else:
                arrays.append(pa.nulls(len(keys), f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def commit(self, fragments: Sequence, *, compact_over: int = 256) -> int | None:
        """Driver side: ONE Append commit of every worker's fragments, then the BTREE index on `key` brought up to
        date (created at the first commit); returns the table's version, None where there was nothing to commit.

        Each night adds about one fragment per encode job, and lookups scan every fragment's index segment: past
        `compact_over` fragments the files are compacted first."""
        import lance
        from lance.fragment import FragmentMetadata
        frags = [f if isinstance(f, FragmentMetadata)
                 else FragmentMetadata.from_json(f if isinstance(f, str) else json.dumps(f)) for f in fragments]
        if not frags:
            return None
        ds = self._open()
        if ds is None:
            raise FileNotFoundError(f"latent table {self.uri} does not exist, yet fragments were written to it")
        ds = lance.LanceDataset.commit(self.uri, lance.LanceOperation.Append(frags), read_version=ds.version,
                                       storage_options=self._options)
        if any(ix.field_names == ["key"] for ix in ds.describe_indices()):
            ds.optimize.optimize_indices()      # rows appended since the last commit are unindexed until this
        else:
            ds.create_scalar_index("key", index_type="BTREE")
        # after indexing: Lance does not merge indexed with unindexed fragments, and compaction remaps the index
        if len(ds.get_fragments()) > compact_over:
            ds.optimize.compact_files()
            ds.optimize.optimize_indices()
        return self._open().version


# --- worker side: one Ray task's worth of texts --------------------------------------------------------------

@dataclass(frozen=True)
class EncodeJob:
    """Texts for one encoding task (plain data, picklable). Paths are store folders of the CLaP and tokenizer."""

    store_root: str
    clap_version: str
    clap_path: tuple[str, ...]
    tokenizer_path: tuple[str, ...]
    prompts: tuple[str, ...]
    prompt_response: tuple[tuple[str, str], ...]
    pairs: tuple[tuple[str, str, str], ...]
    prompt_tokens: int
    response_tokens: int
    threads: int = 1
    batch_size: int = 64

    @property
    def n_texts(self) -> int:
        return len(self.prompts) + len(self.prompt_response) + len(self.pairs)


@functools.lru_cache(maxsize=1)
def _load_clap_and_tokenizer(store_root: str, clap_path: tuple[str, ...], tokenizer_path: tuple[str, ...]):
    """The CLaP (eval, frozen) and its tokenizer, loaded once per worker process (Ray reuses workers)."""
    from latentpref.tasks.models.clap import load_clap
    from latentpref.tasks.models.registry import load_tokenizer
    store = Store(store_root)
    clap = load_clap(store.local_copy(*clap_path)).eval()
    clap.requires_grad_(False)
    return clap, load_tokenizer(store.local_copy(*tokenizer_path))


def _n_tokens(tokenizer, text: str, max_tokens: int, *, prompt: bool) -> int:
    """Real tokens the encoder sees for one text (the truncation rules of tokenize_prompts/responses)."""
    ids = tokenizer.encode(text)
    if prompt:
        ids = ids[-max_tokens:] if max_tokens else ids
    else:
        ids = ids[:max_tokens]
    return max(len(ids), 1)     # an empty text still gets one token


def encode_texts(job: EncodeJob) -> dict:
    """Encode the job's texts with the frozen CLaP and write them as uncommitted fragments (no commit: the driver
    commits every job's fragments at once, so a night is one table version).

    Returns {"fragments": [json, ...], "texts": rows written, "tokens": real tokens encoded, "seconds": float}."""
    from latentpref.tasks.policy.store import is_discrete
    t0 = time.perf_counter()
    torch.set_num_threads(job.threads)
    clap, tokenizer = _load_clap_and_tokenizer(job.store_root, tuple(job.clap_path), tuple(job.tokenizer_path))
    discrete = is_discrete(clap)
    pairs = list(job.pairs) if discrete else []
    cache = build_latent_cache(clap, tokenizer, list(job.prompts), list(job.prompt_response),
                               prompt_tokens=job.prompt_tokens, response_tokens=job.response_tokens,
                               batch_size=job.batch_size, pairs=pairs)
    fragments = TextLatentTable(Store(job.store_root), job.clap_version).write_fragments(cache)
    pt, rt = job.prompt_tokens, job.response_tokens

    def prompt_len(p: str) -> int:
        return _n_tokens(tokenizer, p, pt, prompt=True)

    def response_len(r: str) -> int:
        return _n_tokens(tokenizer, r, rt, prompt=False)

    tokens = int(cache.prompt_mask.sum())
    tokens += sum(prompt_len(p) + response_len(r) for p, r in _uniq(job.prompt_response))
    tokens += sum(prompt_len(p) + response_len(c) + response_len(r) for p, c, r in _uniq(pairs))
    n_texts = len(cache.prompt_index) + len(cache.response_index) + len(cache.pair_index or {})
    return {"fragments": fragments, "texts": n_texts, "tokens": tokens, "seconds": time.perf_counter() - t0}


def plan_encode_jobs(table: TextLatentTable, prompts: Iterable[str], prompt_response: Iterable[tuple[str, str]],
                     pairs: Iterable[tuple[str, str, str]] = (), *, discrete: bool, texts_per_job: int,
                     **job_fields) -> list[EncodeJob]:
    """The texts without a row, split into jobs of about `texts_per_job` texts each ([] when nothing is missing).

    `job_fields` are the remaining `EncodeJob` fields (clap_path, tokenizer_path, prompt_tokens, response_tokens,
    threads, ...); store_root and clap_version default to the table's. Texts that arrive in batches (a night's
    pairs, streamed): `EncodePlanner`, which gives the same jobs."""
    _check_texts_per_job(texts_per_job)
    missing = table.missing_texts(prompts, prompt_response, pairs, discrete=discrete)
    return _split_jobs(table, missing, texts_per_job, job_fields)


def _check_texts_per_job(texts_per_job: int) -> None:
    if texts_per_job < 1:
        raise ValueError(f"texts_per_job={texts_per_job}; expected >= 1")


def _split_jobs(table: TextLatentTable, missing: tuple[list, list, list], texts_per_job: int,
                job_fields: dict) -> list[EncodeJob]:
    """Missing (prompts, prompt-responses, pairs) -> EncodeJobs of about `texts_per_job` texts each."""
    job_fields.setdefault("store_root", table.store.root)
    job_fields.setdefault("clap_version", table.clap_version)
    m_prompts, m_pr, m_pairs = missing
    # one sequence, so each job's texts are mostly of one kind (batches of one shape) and sizes are even
    items = [("p", t) for t in m_prompts] + [("r", t) for t in m_pr] + [("q", t) for t in m_pairs]
    if not items:
        return []
    n_jobs = math.ceil(len(items) / texts_per_job)
    bounds = [round(i * len(items) / n_jobs) for i in range(n_jobs + 1)]
    jobs = []
    for lo, hi in zip(bounds, bounds[1:]):
        chunk = items[lo:hi]
        jobs.append(EncodeJob(prompts=tuple(t for k, t in chunk if k == "p"),
                              prompt_response=tuple(t for k, t in chunk if k == "r"),
                              pairs=tuple(t for k, t in chunk if k == "q"), **job_fields))
    return jobs


TextKind = Literal["prompt", "response", "pair"]


class EncodePlanner:
    """`plan_encode_jobs` for texts that arrive in batches (the night streams its pairs: issue 29): each `add` looks
    its texts up in the table at once and keeps only those without a row, so what is held is the night's new texts,
    never every pair's. Texts already found in the table are remembered up to `recent_keys` keys (then forgotten
    all at once: memory stays bounded, a text seen again costs one more lookup, never a wrong plan).

    Order: texts of a lower `group` come first in the plan whatever the order of the calls, and each group keeps
    first-seen order; so a night that adds each batch's (prompt, chosen) to group 0 and (prompt, rejected) to group
    1 gets exactly the jobs of one `plan_encode_jobs` call over the whole lists (every chosen before every
    rejected). The table is read at its version when the planner was made."""

    def __init__(self, table: TextLatentTable, *, discrete: bool, recent_keys: int = 1 << 20):
        self.table = table
        self.discrete = discrete
        self.recent_keys = recent_keys
        self._ds = table._open()     # None: no table yet, every text is new
        # kind -> group -> {key: text}, first-seen order (dicts keep insertion order)
        self._missing: dict[str, dict[int, dict[str, Any]]] = {"prompt": {}, "response": {}, "pair": {}}
        self._missing_keys: dict[str, set[str]] = {"prompt": set(), "response": set(), "pair": set()}
        self._held: set[tuple[str, str]] = set()    # (kind, key) found in the table lately

    def add(self, kind: TextKind, texts: Iterable, *, group: int = 0) -> None:
        """Note texts of one kind: prompts (str), (prompt, response) or (prompt, chosen, rejected) tuples; pairs
        count for discrete CLaPs only (their pair posterior), as in `missing_texts`."""
        if kind not in self._missing:
            raise ValueError(f"kind={kind!r}; expected one of {get_args(TextKind)}")
        if kind == "pair" and not self.discrete:
            return
        keyed = {}      # key -> text, first-seen; texts repeat a lot, so they are hashed once per call
        for t in _uniq(texts):
            keyed.setdefault(text_key(*t) if isinstance(t, tuple) else text_key(t), t)
        known = self._missing_keys[kind]
        ask = [k for k in keyed if k not in known and (kind, k) not in self._held]
        found = self.table._present(ask, self._ds) if ask and self._ds is not None else set()
        if len(self._held) + len(found) > self.recent_keys:
            self._held.clear()
        self._held |= found
        asked = set(ask)
        into = self._missing[kind].setdefault(group, {})
        for k, t in keyed.items():     # in the call's order: a group keeps first-seen order
            if k in known or (k in asked and (kind, k) not in found):
                into.setdefault(k, t)
                known.add(k)

    def missing(self) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str, str]]]:
        """The distinct texts without a row, as `TextLatentTable.missing_texts` lists them."""
        out = []
        for kind in ("prompt", "response", "pair"):
            merged: dict[str, Any] = {}
            for group in sorted(self._missing[kind]):
                for k, t in self._missing[kind][group].items():
                    merged.setdefault(k, t)
            out.append(list(merged.values()))
        return out[0], out[1], out[2]

    def jobs(self, *, texts_per_job: int, **job_fields) -> list[EncodeJob]:
        """The plan: the missing texts split into `EncodeJob`s as `plan_encode_jobs` splits them."""
        _check_texts_per_job(texts_per_job)
        return _split_jobs(self.table, self.missing(), texts_per_job, job_fields)
