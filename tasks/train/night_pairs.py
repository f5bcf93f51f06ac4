"""The night's training pairs without holding them (issue 29 item 3): read in record batches, counted per user, and
written once to the store sorted by user, one Parquet row group per fit chunk, so the personalize driver's memory
does not grow with the number of users or pairs, and each fit task reads its own chunk's row group and nothing else.

Which rows (`iter_training_pairs`; `pipelines.personalize.training_pairs` is the same stream gathered): the train
split of the prepared pairs table, then every committed ingested feedback file, forgotten users dropped, optionally
only some users. A chunk gets exactly the rows that the whole stream sorted (stably) by user would give for its
users, in that order: the same rows as the night's old in-memory slices, so fits and data hashes do not change.

How, in bounded memory:
1. `spill_pairs`: ONE read of the sources into a local scratch file (Arrow IPC, zstd), counting rows per user (ids
   and counts: what the night's user list is made of) and showing each batch to an observer (the encode planner).
   The sources are listed once (`PairSources`) and read once, so feedback committed mid-night is in every later
   step or in none.
2. `write_chunk_pairs`: a distribution sort. Chunks are runs of `users_per_task` consecutive sorted user ids; the
   rows of consecutive chunks are grouped into buckets of at most `bucket_rows` rows (known from the counts; a
   chunk larger than that is a bucket alone); the scratch file is split by bucket range (at most `fan_out` files
   open at once; more buckets: each part is split again), then each bucket is read alone, sorted stably by user and
   written as one Parquet file of the store, one row group per chunk (`ChunkPairs` says where). Memory: a record
   batch while splitting, one bucket (+ its sort order + one chunk) while writing. Local disk: about twice the
   compressed pairs, in the caller's scratch folder.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentpref.tasks.data.ipc import table_to_ipc
from latentpref.tasks.data.store import Store, redact_url
from latentpref.tasks.policy.forget import drop_forgotten, forgotten_keys

__all__ = ["PAIRS_SCHEMA", "ChunkPairs", "PairSources", "empty_pairs_ipc", "iter_training_pairs", "population_ids",
           "spill_pairs", "write_chunk_pairs"]

# what a fit reads of a pair; weight null = 1.0 (tasks/train/personalize._pair_weights)
PAIRS_SCHEMA = pa.schema([("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                          ("rejected", pa.string()), ("weight", pa.float32())])
_REQUIRED = ("user_id", "prompt", "chosen", "rejected")
SCAN_BATCH_ROWS = 1 << 15     # rows per record batch read from a source (its texts also become Python lists)
BUCKET_ROWS = 1 << 17         # rows sorted in memory at once (~60 MB of pair texts at the presets' lengths)
FAN_OUT = 64                  # files one splitting pass writes at once (open file handles)
_SCRATCH_IPC = pa.ipc.IpcWriteOptions(compression="zstd")   # texts repeat a lot: several times smaller on disk


@dataclass(frozen=True)
class PairSources:
    """What a night reads, listed once so every pass reads the same rows."""

    pairs_path: tuple[str, ...]                      # the prepared pairs table (its train split is read)
    feedback_files: tuple[tuple[str, ...], ...]      # committed ingested feedback batches, in read order
    forgotten: frozenset[str]                        # tombstone keys (tasks/policy/forget.py)

    @classmethod
    def of(cls, store: Store, pairs_path: Iterable[str]) -> "PairSources":
        from latentpref.tasks.data.ingest import committed_feedback_files
        return cls(tuple(pairs_path), tuple(committed_feedback_files(store)), frozenset(forgotten_keys(store)))


def _as_pairs(batch: pa.RecordBatch | pa.Table, where: str) -> pa.Table:
    """A batch of a source -> PAIRS_SCHEMA columns (weight absent: null, as a permissive concat gave).

    Raises:
        ValueError: a required column missing, a column of a type that does not cast, or rows without a user id;
            the message names the source.
    """
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    missing = [c for c in _REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{where} lacks the columns {missing} a training pair needs (has {table.column_names})")
    if "weight" not in table.column_names:
        table = table.append_column("weight", pa.nulls(table.num_rows, pa.float32()))
    try:
        table = table.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"{where}: columns do not cast to the training pairs' schema {PAIRS_SCHEMA}: {err}") from err
    nulls = table["user_id"].null_count
    if nulls:
        raise ValueError(f"{where} has {nulls} rows without a user_id")
    return table


def iter_training_pairs(store: Store, sources: PairSources, *, user_ids: Collection[str] | None = None,
                        batch_rows: int | None = None) -> Iterator[pa.Table]:
    """The night's training rows (PAIRS_SCHEMA), batch by batch, in the order of the whole table the night used to
    build: the pairs table's train split in file order, then the feedback files in `sources` order, forgotten users
    dropped; only `user_ids` where given. Empty batches are skipped.

    Raises:
        ValueError: a source lacks a column, has rows without a user id or of an uncastable type (see `_as_pairs`).
    """
    batch_rows = batch_rows or SCAN_BATCH_ROWS
    wanted = None if user_ids is None else pa.array(sorted(set(user_ids)), pa.string())

    def keep(table: pa.Table) -> pa.Table:
        table = drop_forgotten(store, table, keys=sources.forgotten)
        if wanted is not None and table.num_rows:
            table = table.filter(pc.is_in(table["user_id"], value_set=wanted))
        return table

    pairs_url = redact_url(store.url(*sources.pairs_path))
    for batch in store.iter_batches(*sources.pairs_path, columns=[*PAIRS_SCHEMA.names, "split"],
                                    batch_rows=batch_rows):
        if "split" not in batch.schema.names:
            raise ValueError(f"pairs table {pairs_url} has no 'split' column (train / heldout)")
        train = pa.Table.from_batches([batch]).filter(pc.equal(batch.column("split"), "train"))
        rows = keep(_as_pairs(train, f"pairs table {pairs_url}"))
        if rows.num_rows:
            yield rows
    for parts in sources.feedback_files:
        where = f"feedback file {redact_url(store.url(*parts))}"
        for batch in store.iter_batches(*parts, columns=PAIRS_SCHEMA.names, batch_rows=batch_rows):
            rows = keep(_as_pairs(batch, where))
            if rows.num_rows:
                yield rows


def population_ids(store: Store, users_path: Iterable[str], forgotten: Collection[str]) -> list[str]:
    """The user ids of the prepared users table (its id column only, read in batches), forgotten users dropped."""
    ids: list[str] = []
    for batch in store.iter_batches(*users_path, columns=["user_id"], batch_rows=SCAN_BATCH_ROWS):
        if "user_id" not in batch.schema.names:
            raise ValueError(f"users table {redact_url(store.url(*users_path))} has no 'user_id' column")
        table = drop_forgotten(store, pa.Table.from_batches([batch]), keys=forgotten)
        ids.extend(table["user_id"].to_pylist())
    return ids


def spill_pairs(batches: Iterable[pa.Table], path: str,
                observe: Callable[[pa.Table], None] | None = None) -> dict[str, int]:
    """Write `batches` (PAIRS_SCHEMA) in order to a local scratch file at `path` (Arrow IPC stream, zstd), calling
    `observe` on each; returns the rows per user (what `write_chunk_pairs` groups the chunks by)."""
    counts: dict[str, int] = {}
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, PAIRS_SCHEMA, options=_SCRATCH_IPC) as writer:
        for batch in batches:
            if not batch.num_rows:
                continue
            writer.write_table(batch)
            per_user = pc.value_counts(batch["user_id"])
            for user, n in zip(per_user.field("values").to_pylist(), per_user.field("counts").to_pylist()):
                counts[user] = counts.get(user, 0) + n
            if observe is not None:
                observe(batch)
    return counts


def _read_scratch(path: str) -> Iterator[pa.RecordBatch]:
    # plain reads, not a memory map: mapped pages of a big file would count in the driver's RSS
    with pa.OSFile(path, "rb") as source:
        yield from pa.ipc.open_stream(source)


@dataclass(frozen=True)
class ChunkPairs:
    """Where one chunk's pairs are: a Parquet file of the store and its row group; path None when it has none."""

    path: tuple[str, ...] | None
    row_group: int | None
    rows: int


def empty_pairs_ipc() -> bytes:
    """A chunk without pairs (all its users cold-start on the prior): the empty table, as IPC."""
    return table_to_ipc(PAIRS_SCHEMA.empty_table())


@dataclass(frozen=True)
class _Sort:
    """One `write_chunk_pairs` call's fixed inputs (what the recursive passes share)."""

    store: Store
    everyone: list[str]
    users_per_task: int
    chunk_rows: list[int]
    folder: tuple[str, ...]
    scratch: str
    fan_out: int

    def first_user(self, chunk: int) -> str:
        return self.everyone[chunk * self.users_per_task]

    def last_user(self, chunk: int) -> str:
        return self.everyone[min((chunk + 1) * self.users_per_task, len(self.everyone)) - 1]


def write_chunk_pairs(store: Store, spill_path: str, everyone: list[str], counts: dict[str, int], *,
                      users_per_task: int, folder: tuple[str, ...], scratch: str, bucket_rows: int | None = None,
                      fan_out: int | None = None) -> list[ChunkPairs]:
    """The spilled pairs (`spill_pairs`) written under `folder` of the store sorted by user, one Parquet row group
    per chunk (chunk k = everyone[k*users_per_task : (k+1)*users_per_task], `everyone` sorted), in buckets of at
    most `bucket_rows` rows per file; returns where each chunk's pairs are, in chunk order. `spill_path` is
    consumed (removed); the scratch files go under `scratch`.

    Raises:
        ValueError: `everyone` not sorted / not distinct, users_per_task < 1, or a user with pairs not in it.
    """
    bucket_rows, fan_out = bucket_rows or BUCKET_ROWS, fan_out or FAN_OUT
    if users_per_task < 1 or bucket_rows < 1 or fan_out < 2:
        raise ValueError(f"users_per_task={users_per_task}, bucket_rows={bucket_rows}, fan_out={fan_out}: expected "
                         ">= 1, >= 1, >= 2")
    if any(a >= b for a, b in zip(everyone, everyone[1:])):
        raise ValueError("write_chunk_pairs: `everyone` must be sorted and distinct (chunks are runs of sorted ids)")
    n_chunks = math.ceil(len(everyone) / users_per_task)
    chunk_rows = [sum(counts.get(u, 0) for u in everyone[i:i + users_per_task])
                  for i in range(0, len(everyone), users_per_task)]
    if sum(chunk_rows) != sum(counts.values()):
        listed = set(everyone)
        stray = next(u for u in counts if u not in listed)
        raise ValueError(f"user {stray!r} has pairs but is not among the night's users: every user with pairs must "
                         "be in `everyone`")
    sort = _Sort(store, everyone, users_per_task, chunk_rows, tuple(folder), scratch, fan_out)
    placement: list[ChunkPairs | None] = [None] * n_chunks
    _place(sort, spill_path, _buckets(chunk_rows, bucket_rows), placement)
    return placement      # every chunk placed: _place covers every bucket, a bucket every chunk of its range


def _buckets(chunk_rows: list[int], bucket_rows: int) -> list[tuple[int, int]]:
    """Consecutive chunks grouped into (lo, hi) ranges of at most `bucket_rows` rows (a bigger chunk: alone)."""
    out, lo, rows = [], 0, 0
    for c, n in enumerate(chunk_rows):
        if c > lo and rows + n > bucket_rows:
            out.append((lo, c))
            lo, rows = c, 0
        rows += n
    if chunk_rows:
        out.append((lo, len(chunk_rows)))
    return out


def _place(sort: _Sort, source: str, buckets: list[tuple[int, int]], placement: list) -> None:
    """Write the buckets whose rows are in the scratch file `source` (and only those), removing it."""
    if not buckets:            # a night without users
        os.unlink(source)
        return
    if len(buckets) == 1:
        _write_bucket(sort, source, buckets[0], placement)
        return
    n_parts = min(len(buckets), sort.fan_out)
    bounds = [round(i * len(buckets) / n_parts) for i in range(n_parts + 1)]
    parts = [buckets[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    files = _split(sort, source, [sort.first_user(part[0][0]) for part in parts])
    for part, path in zip(parts, files):
        _place(sort, path, part, placement)


def _split(sort: _Sort, source: str, starts: list[str]) -> list[str]:
    """Split a scratch file into one file per range of users (range i: starts[i] <= user < starts[i+1]), each
    keeping the source's row order; the source is removed."""
    bounds = np.asarray(starts, dtype=object)
    paths = [os.path.join(sort.scratch, f"part-{os.path.basename(source)}-{i:03d}.arrow") for i in range(len(starts))]
    sinks = [pa.OSFile(p, "wb") for p in paths]
    writers = [pa.ipc.new_stream(s, PAIRS_SCHEMA, options=_SCRATCH_IPC) for s in sinks]
    try:
        for batch in _read_scratch(source):
            users = batch.column("user_id").to_numpy(zero_copy_only=False)
            part = np.searchsorted(bounds, users, side="right") - 1
            if part.min() < 0:
                raise RuntimeError(f"chunk pairs: user {users[part.argmin()]!r} sorts before {starts[0]!r}, the "
                                   "first user of this part")
            if part[0] == part[-1] and (part == part[0]).all():     # the usual case: a batch within one range
                writers[part[0]].write_batch(batch)
                continue
            order = np.argsort(part, kind="stable")                  # stable: each range keeps the source order
            ranges, firsts = np.unique(part[order], return_index=True)
            for p, lo, hi in zip(ranges, firsts, [*firsts[1:], len(order)]):
                writers[p].write_batch(batch.take(pa.array(order[lo:hi])))
    finally:
        for w in writers:
            w.close()
        for s in sinks:
            s.close()
    os.unlink(source)
    return paths


def _write_bucket(sort: _Sort, source: str, bucket: tuple[int, int], placement: list) -> None:
    """One bucket: its scratch file read whole, sorted stably by user (within a user the source order: the rows'
    order in the whole stream), written to the store as one Parquet file with one row group per non-empty chunk."""
    lo, hi = bucket
    table = pa.Table.from_batches(list(_read_scratch(source)), schema=PAIRS_SCHEMA)
    os.unlink(source)
    expected = sum(sort.chunk_rows[lo:hi])
    if table.num_rows != expected:   # the counts and the rows come from the same single read: a bug if they differ
        raise RuntimeError(f"chunk pairs: bucket of chunks {lo}..{hi - 1} has {table.num_rows} rows, the counts say "
                           f"{expected}")
    # stable (Arrow's sort is): within a user, the stream's order; taken chunk by chunk, so a sorted copy of the
    # whole bucket is never held beside it
    order = pc.sort_indices(table, sort_keys=[("user_id", "ascending")])
    name = f"pairs-{lo:07d}.parquet"
    local = os.path.join(sort.scratch, name)
    row_group, offset = 0, 0
    with pq.ParquetWriter(local, PAIRS_SCHEMA, compression="zstd") as writer:
        for c in range(lo, hi):
            n = sort.chunk_rows[c]
            if n == 0:
                placement[c] = ChunkPairs(None, None, 0)
                continue
            rows = table.take(order.slice(offset, n))
            offset += n
            first, last = rows["user_id"][0].as_py(), rows["user_id"][-1].as_py()
            if first < sort.first_user(c) or last > sort.last_user(c):
                raise RuntimeError(f"chunk pairs: chunk {c} holds users {first!r}..{last!r}, outside its range "
                                   f"{sort.first_user(c)!r}..{sort.last_user(c)!r} (Arrow and Python orders differ?)")
            writer.write_table(rows, row_group_size=n)       # exactly one row group per chunk
            placement[c] = ChunkPairs((*sort.folder, name), row_group, n)
            row_group += 1
    del table, order
    if row_group:
        if pq.ParquetFile(local).num_row_groups != row_group:
            raise RuntimeError(f"chunk pairs: {local} has {pq.ParquetFile(local).num_row_groups} row groups, "
                               f"{row_group} were written")
        sort.store.put_file(local, *sort.folder, name)
    os.unlink(local)
