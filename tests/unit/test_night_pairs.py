"""The night's pairs streamed and sorted into run-scoped chunk files (tasks/train/night_pairs.py, driven by
pipelines/personalize.plan_night_pairs and chunk_jobs), against the in-memory driver it replaced (issue 29 item 3):
the same users in the same chunks, the same pairs per user in the same order (so the same data hashes and fits),
the same encode plan; ChunkJob's two pair forms; bad input named; and memory that does not follow the table's size.

Real Parquet and Lance on a temporary local store; record batches, buckets and the splitting fan-out are patched
tiny so one small table crosses many batches, many bucket files and a recursive split.
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from latentpref.pipelines.personalize import chunk_jobs, plan_night_pairs, training_pairs
from latentpref.tasks.data import validate
from latentpref.tasks.data.ingest import read_feedback_store, store_feedback
from latentpref.tasks.data.ipc import table_to_ipc
from latentpref.tasks.data.store import Store
from latentpref.tasks.policy.forget import drop_forgotten, mark_forgotten
from latentpref.tasks.policy.store import user_data_hash
from latentpref.tasks.policy.text_cache import EncodePlanner, TextLatentTable
from latentpref.tasks.train import night_pairs
from latentpref.tasks.train.night_pairs import PAIRS_SCHEMA
from latentpref.tasks.train.personalize import ChunkJob

PAIRS_PATH = ("data", "users", "d1", "pairs.parquet")
USERS_PATH = ("data", "users", "d1", "users.parquet")
FOLDER = ("runs", "night-1", "personalize_pairs")
JOB_FIELDS = {"store_root": "", "clap_version": "v1", "fit": {"steps": 1}, "mode": "head-only", "min_pairs": 1}


def _sim_pairs(users: list[str], rng: random.Random, *, per_user, prompts: int = 6, responses: int = 4,
               text_words: int = 3) -> pa.Table:
    """Prepared-style pairs (extra columns, a heldout split), rows in shuffled order (not grouped by user)."""
    words = [f"w{i}" for i in range(50)]
    p_text = [f"prompt {i}: " + " ".join(rng.choices(words, k=text_words)) for i in range(prompts)]
    r_text = [[f"resp {i}.{j}: " + " ".join(rng.choices(words, k=text_words)) for j in range(responses)]
              for i in range(prompts)]
    rows = []
    for u in users:
        for _ in range(per_user(u)):
            p = rng.randrange(prompts)
            c, r = rng.sample(range(responses), 2)
            rows.append({"user_id": u, "prompt": p_text[p], "chosen": r_text[p][c], "rejected": r_text[p][r],
                         "weight": 1.0, "pair_kind": "sim", "split": "train" if rng.random() < 0.8 else "heldout"})
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=pa.schema([*PAIRS_SCHEMA, ("pair_kind", pa.string()),
                                                        ("split", pa.string())]))


def _write(store: Store, table: pa.Table, parts: tuple[str, ...], row_group_size: int | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    store.write_bytes(buf.getvalue(), *parts)


def _ingest(store: Store, rows: list[dict]) -> None:
    good, bad = validate.validate_feedback(pa.Table.from_pylist(rows))
    assert bad.num_rows == 0
    store_feedback(store, good, validate.QUARANTINE_SCHEMA.empty_table(), source="test", rows_read=len(rows))


def _fill(store: Store) -> tuple[Store, SimpleNamespace]:
    """Population u00..u29 (u22..u29 without any pair), simulated pairs in small row groups, two feedback batches
    (population users and feedback-only users, some weights != 1), two forgotten users."""
    rng = random.Random(3)
    population = [f"u{i:02d}" for i in range(30)]
    _write(store, pa.table({"user_id": population, "weights_json": ["{}"] * 30}), USERS_PATH, row_group_size=7)
    sim = _sim_pairs(population, rng, per_user=lambda u: 0 if u >= "u22" else rng.randrange(0, 7))
    _write(store, sim, PAIRS_PATH, row_group_size=13)
    for batch in range(2):
        rows = [{"user_id": u, "prompt": f"fed prompt {batch}.{k}", "chosen": f"yes {u} {k}", "rejected": f"no {k}",
                 "weight": 0.5 + k} for u in ("u01", "u05", "a-fed-only", "zz-fed-only", "u04") for k in range(2)]
        _ingest(store, rows)
    mark_forgotten(store, "u04")
    mark_forgotten(store, "zz-fed-only")
    data = SimpleNamespace(pairs=SimpleNamespace(path=PAIRS_PATH), users=SimpleNamespace(path=USERS_PATH))
    return store, data


@pytest.fixture
def night_store(tmp_path):
    return _fill(Store(str(tmp_path / "store")))


def _old_driver(store: Store, user_ids, users_per_task: int) -> tuple[list[str], list[pa.Table], pa.Table]:
    """The in-memory driver this replaced, verbatim: the whole table, sorted, sliced per chunk."""
    pairs = store.read_table(*PAIRS_PATH)
    pairs = pairs.filter(pc.equal(pairs["split"], "train")).select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA)
    ingested = read_feedback_store(store)
    if ingested is not None and ingested.num_rows:
        pairs = pa.concat_tables([pairs, ingested.select(PAIRS_SCHEMA.names).cast(pairs.schema)])
    pairs = drop_forgotten(store, pairs)
    unsorted = pairs
    population = drop_forgotten(store, store.read_table(*USERS_PATH))["user_id"].to_pylist()
    everyone = list(dict.fromkeys(population + pairs["user_id"].to_pylist()))
    if user_ids is not None:
        wanted = set(user_ids)
        everyone = [u for u in everyone if u in wanted]
        pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(everyone, pa.string())))
        unsorted = pairs
    everyone.sort()
    pairs = pairs.sort_by("user_id")
    sorted_users = pairs["user_id"].to_numpy(zero_copy_only=False)
    chunks = []
    for i in range(0, len(everyone), users_per_task):
        chunk = everyone[i:i + users_per_task]
        lo = int(np.searchsorted(sorted_users, chunk[0], side="left"))
        hi = int(np.searchsorted(sorted_users, chunk[-1], side="right"))
        chunks.append(pairs.slice(lo, hi - lo))
    return everyone, chunks, unsorted


@pytest.mark.parametrize("user_ids", [None, ["u01", "u04", "u07", "u09", "u10", "u11", "u12", "u13", "u23",
                                             "a-fed-only", "zz-fed-only", "nobody"]],
                         ids=["everyone", "restricted"])
def test_streamed_chunks_equal_the_in_memory_slices(night_store, monkeypatch, user_ids):
    store, data = night_store
    monkeypatch.setattr(night_pairs, "SCAN_BATCH_ROWS", 5)
    monkeypatch.setattr(night_pairs, "BUCKET_ROWS", 12)
    monkeypatch.setattr(night_pairs, "FAN_OUT", 2)        # more buckets than that: the split recurses
    reads = []
    iter_batches = Store.iter_batches

    def counted(self, *parts, **kw):
        for batch in iter_batches(self, *parts, **kw):
            reads.append(batch.num_rows)
            yield batch
    monkeypatch.setattr(Store, "iter_batches", counted)
    U = 4
    planner = EncodePlanner(TextLatentTable(store, "v1"), discrete=True)
    everyone, placement = plan_night_pairs(store, data, planner=planner, user_ids=user_ids, users_per_task=U,
                                           folder=FOLDER)
    want_everyone, want_chunks, whole = _old_driver(store, user_ids, U)

    assert everyone == want_everyone and "u04" not in everyone and "zz-fed-only" not in everyone
    assert len(reads) > 10 and max(reads) <= 5                 # many batches, none larger than asked
    jobs = list(chunk_jobs(everyone, placement, users_per_task=U, parts_dir=("runs", "night-1", "parts"),
                           **{**JOB_FIELDS, "store_root": store.root}))
    assert [j.user_ids for j in jobs] == [tuple(everyone[i:i + U]) for i in range(0, len(everyone), U)]
    assert len(jobs) == len(want_chunks)
    for job, want in zip(jobs, want_chunks):
        got = job.read_pairs(store)
        assert got.schema == want.schema
        assert got.to_pylist() == want.to_pylist(), job.user_ids          # same rows, same order
        for u in job.user_ids:                                             # so the same data hashes
            mine = got.filter(pc.equal(got["user_id"], u))
            assert user_data_hash(mine) == user_data_hash(want.filter(pc.equal(want["user_id"], u)))
        assert (job.pairs_ipc is None) == (want.num_rows > 0)             # only empty chunks carry bytes
    files = store.listdir(*FOLDER)
    assert len(files) >= 2 and all(n.endswith(".parquet") for n in files)
    if user_ids is None:
        assert len(files) > 2                           # more buckets than FAN_OUT: the split ran recursively
        assert any(want.num_rows == 0 for want in want_chunks)            # a chunk of users without pairs
    assert training_pairs(store, data, user_ids).to_pylist() == whole.to_pylist()   # the one-table form: same rule

    # the encode plan from the stream = the one plan over the whole table's lists
    prompts, chosen, rejected = (whole[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
    extra = ["an evaluation prompt", prompts[0]]
    planner.add("prompt", extra, group=1)
    assert planner.missing() == TextLatentTable(store, "v1").missing_texts(
        prompts + extra, list(zip(prompts, chosen)) + list(zip(prompts, rejected)),
        list(zip(prompts, chosen, rejected)), discrete=True)


@pytest.fixture
def s3_store(monkeypatch):
    """An empty bucket on an in-process moto S3 server (the store's s3:// path: fsspec reads, ranged)."""
    import logging
    import urllib.request

    from moto.server import ThreadedMotoServer
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import services
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = services.free_port()
    server = ThreadedMotoServer(ip_address=services.HOST, port=port, verbose=False)
    server.start()
    services.wait_for(lambda: services.port_open(port), timeout_s=10, what="moto (in-process)")
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (("AWS_ENDPOINT_URL_S3", f"http://{services.HOST}:{port}"), ("AWS_ACCESS_KEY_ID", "testing"),
                       ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1"),
                       ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(key, value)
    store = Store("s3://lp-night-pairs")
    store.fs.mkdir("lp-night-pairs")
    try:
        yield store
    finally:
        urllib.request.urlopen(urllib.request.Request(f"http://{services.HOST}:{port}/moto-api/reset",
                                                      method="POST"), timeout=10)
        server.stop()


def test_s3_store_streams_and_reads_row_groups(s3_store, monkeypatch):
    store, data = _fill(s3_store)
    monkeypatch.setattr(night_pairs, "SCAN_BATCH_ROWS", 5)
    monkeypatch.setattr(night_pairs, "BUCKET_ROWS", 12)
    everyone, placement = plan_night_pairs(store, data, planner=EncodePlanner(TextLatentTable(store, "v1"),
                                                                              discrete=False),
                                           user_ids=None, users_per_task=4, folder=FOLDER)
    want_everyone, want_chunks, _ = _old_driver(store, None, 4)
    assert everyone == want_everyone
    jobs = chunk_jobs(everyone, placement, users_per_task=4, parts_dir=("parts",),
                      **{**JOB_FIELDS, "store_root": store.root})
    for job, want in zip(jobs, want_chunks, strict=True):
        assert job.read_pairs(store).to_pylist() == want.to_pylist()
    assert len(store.listdir(*FOLDER)) > 1


def test_chunk_job_takes_exactly_one_pairs_form(night_store):
    store, data = night_store
    ipc = table_to_ipc(PAIRS_SCHEMA.empty_table())
    with pytest.raises(ValueError, match="exactly one of pairs_ipc"):
        ChunkJob(**JOB_FIELDS, user_ids=("a",))
    with pytest.raises(ValueError, match="exactly one of pairs_ipc"):
        ChunkJob(**JOB_FIELDS, user_ids=("a",), pairs_ipc=ipc, pairs_path=FOLDER)
    with pytest.raises(ValueError, match="needs pairs_row_groups"):
        ChunkJob(**JOB_FIELDS, user_ids=("a",), pairs_path=(*FOLDER, "x.parquet"))
    assert ChunkJob(**JOB_FIELDS, user_ids=("a",), pairs_ipc=ipc).read_pairs(store).num_rows == 0

    everyone, placement = plan_night_pairs(store, data, planner=EncodePlanner(TextLatentTable(store, "v1"),
                                                                              discrete=False),
                                           user_ids=None, users_per_task=4, folder=FOLDER)
    where = next(p for p in placement if p.rows)
    job = ChunkJob(**{**JOB_FIELDS, "store_root": store.root}, user_ids=("someone-else",), pairs_path=where.path,
                   pairs_row_groups=(where.row_group,))
    with pytest.raises(ValueError, match="users outside this chunk"):
        job.read_pairs(store)                                   # a file that is not the one the job was made on
    job = ChunkJob(**{**JOB_FIELDS, "store_root": store.root}, user_ids=("u00",), pairs_path=where.path,
                   pairs_row_groups=(99,))
    with pytest.raises(ValueError, match="row groups; asked for \\[99\\]"):
        job.read_pairs(store)


def test_bad_pairs_tables_are_named(night_store):
    store, data = night_store
    planner = EncodePlanner(TextLatentTable(store, "v1"), discrete=False)
    sim = store.read_table(*PAIRS_PATH)
    _write(store, sim.drop_columns(["chosen"]), PAIRS_PATH)
    with pytest.raises(ValueError, match=r"pairs table .*pairs.parquet lacks the columns \['chosen'\]"):
        plan_night_pairs(store, data, planner=planner, user_ids=None, users_per_task=4, folder=FOLDER)
    _write(store, sim.drop_columns(["split"]), PAIRS_PATH)
    with pytest.raises(ValueError, match="has no 'split' column"):
        plan_night_pairs(store, data, planner=planner, user_ids=None, users_per_task=4, folder=FOLDER)
    nulls = sim.set_column(0, "user_id", pa.array([None] + sim["user_id"].to_pylist()[1:], pa.string()))
    _write(store, nulls.filter(pc.equal(nulls["split"], "train")), PAIRS_PATH)
    with pytest.raises(ValueError, match="1 rows without a user_id"):
        plan_night_pairs(store, data, planner=planner, user_ids=None, users_per_task=4, folder=FOLDER)
    with pytest.raises(ValueError, match="sorted and distinct"):
        night_pairs.write_chunk_pairs(store, "unused", ["b", "a"], {}, users_per_task=1, folder=FOLDER, scratch="x")


_POOLS: list = []     # measuring pools are never freed: an Arrow buffer outliving its pool crashes the process


def _driver_peak(root: str, n_users: int) -> tuple[int, int, int]:
    """(Arrow peak bytes, Python peak bytes, the whole train table's Arrow bytes) of plan_night_pairs + every
    chunk job made, on `n_users` users of 24 pairs each. Run in a child process (`_measure_child`): it swaps the
    process's Arrow memory pool for a counting one."""
    store = Store(f"{root}/store-{n_users}")
    users = [f"user-{i:06d}" for i in range(n_users)]
    _write(store, pa.table({"user_id": users}), USERS_PATH)
    sim = _sim_pairs(users, random.Random(n_users), per_user=lambda u: 24, prompts=40, responses=6, text_words=40)
    whole = sim.filter(pc.equal(sim["split"], "train")).nbytes
    _write(store, sim, PAIRS_PATH, row_group_size=4096)
    del sim
    data = SimpleNamespace(pairs=SimpleNamespace(path=PAIRS_PATH), users=SimpleNamespace(path=USERS_PATH))
    _POOLS.append(pa.proxy_memory_pool(pa.default_memory_pool()))
    pa.set_memory_pool(_POOLS[-1])
    tracemalloc.start()
    planner = EncodePlanner(TextLatentTable(store, "v1"), discrete=False)
    everyone, placement = plan_night_pairs(store, data, planner=planner, user_ids=None, users_per_task=64,
                                           folder=FOLDER)
    for _ in chunk_jobs(everyone, placement, users_per_task=64, parts_dir=("parts",),
                        **{**JOB_FIELDS, "store_root": store.root}):
        pass
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return _POOLS[-1].max_memory(), py_peak, whole


def _measure_child(root: str) -> None:
    """The child process of the memory test: both sizes, JSON on stdout, then exit without finalizers."""
    night_pairs.SCAN_BATCH_ROWS, night_pairs.BUCKET_ROWS = 512, 2048
    out = {n: _driver_peak(root, n) for n in (200, 2000)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


def test_driver_memory_does_not_follow_the_table(tmp_path):
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import test_night_pairs as t; "
            f"t._measure_child({str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (arrow_small, py_small, whole_small), (arrow_big, py_big, whole_big) = out["200"], out["2000"]
    assert whole_big > 8 * whole_small                  # 10x the pairs ...
    assert arrow_big < 0.25 * whole_big                 # ... never held whole (a bucket + a batch at a time)
    assert arrow_big < 2.5 * arrow_small                # ... and the peak hardly moves
    # Python objects: the ids and per-user counts (10x users), the planned new texts (a fixed pool here), one
    # batch's lists; not every pair's texts (~whole_big bytes as Python strings)
    assert py_big < 0.25 * whole_big, (py_small, py_big, whole_big)
