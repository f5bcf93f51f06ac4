"""POST /v1/feedback's parts without a server (tasks/evaluate/feedback.py): the request contract (every bad-row
kind of `latentpref ingest` refused, naming the row, nothing stored), idempotent storage, the per-user rate limit,
coalesced refits, and an online refit writing exactly the row the night would (the night then finds it unchanged).
"""
from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))                 # tests/serve_store.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))      # the ingest fault test's bad rows
import serve_store  # noqa: E402
from test_bad_feedback import JSONL_LINES, PARQUET_ROWS  # noqa: E402

from latentpref.tasks.data import validate  # noqa: E402
from latentpref.tasks.data.ingest import committed_rows_for, read_feedback_store, store_feedback  # noqa: E402
from latentpref.tasks.data.store import Store  # noqa: E402
from latentpref.tasks.evaluate.feedback import (OnlineRefitter, RateLimiter, parse_feedback_request,  # noqa: E402
                                                retry_after_header)
from latentpref.tasks.evaluate.serve_core import BadRequest, current_release, release_manifest  # noqa: E402

LIMIT = 64 * 1024 * 1024


def _parse(rows, **kw):
    return parse_feedback_request(json.dumps(rows).encode(), "application/json", max_body_bytes=LIMIT, **kw)


BAD_ROWS = [(kind, row, code) for kind, row, code in PARQUET_ROWS if code and code != "duplicate"]


@pytest.mark.parametrize("kind, row, code", BAD_ROWS, ids=[k for k, _, _ in BAD_ROWS])
def test_every_bad_row_kind_is_refused_naming_the_row(kind, row, code):
    good = serve_store.pair_rows("carol", 2, offset=100)
    with pytest.raises(BadRequest) as err:
        _parse({"rows": good + [row]})
    assert 400 <= err.value.status < 500
    assert str(err.value).startswith("row 2: ") and code in str(err.value), str(err.value)


def test_json_level_problems_are_refused():
    dup = serve_store.pair_rows("carol", 1)
    with pytest.raises(BadRequest, match="row 1: duplicate"):
        _parse(dup + dup)
    for kind, line, code in JSONL_LINES:
        if code is None:
            continue
        body = b'{"rows": [' + line + b"]}"
        with pytest.raises(BadRequest) as err:
            parse_feedback_request(body, "application/json", max_body_bytes=LIMIT)
        assert 400 <= err.value.status < 500, kind
    for body, ctype, status in ((b"{}", "text/plain", 415), (b"x" * 100, "application/json", 413),
                                (b'{"rows": []}', "application/json", 400),
                                (b'{"rows": [], "extra": 1}', "application/json", 400)):
        with pytest.raises(BadRequest) as err:
            parse_feedback_request(body, ctype, max_body_bytes=50)
        assert err.value.status == status
    with pytest.raises(BadRequest, match="at most 3"):
        _parse(serve_store.pair_rows("carol", 4), max_rows=3)
    with pytest.raises(BadRequest, match="unknown field"):
        _parse([{**serve_store.pair_rows("carol", 1)[0], "colour": "red"}])


def test_rows_are_stored_once_under_an_idempotency_key(tmp_path):
    store = Store(str(tmp_path))
    rows = serve_store.pair_rows("alice", 3) + serve_store.pair_rows("bob", 1)
    req = _parse({"rows": rows, "idempotency_key": "client-42"})
    assert req.user_ids == ["alice", "bob"] and req.batch.startswith("k")
    assert _parse(rows, idempotency_key="client-42").batch == req.batch         # header or body: one batch id
    empty = validate.QUARANTINE_SCHEMA.empty_table()
    first = store_feedback(store, req.rows, empty, source="t", rows_read=4, batch=req.batch)
    again = store_feedback(store, req.rows, empty, source="t", rows_read=4, batch=req.batch)
    assert first.rows_accepted == 4 and not first.already_ingested and again.already_ingested
    assert read_feedback_store(store).num_rows == 4
    assert committed_rows_for(store, ["alice"]).num_rows == 3 and committed_rows_for(store, ["carol"]) is None
    # the same rows under another key: stored rows are never duplicated
    other = store_feedback(store, req.rows, empty, source="t", rows_read=4, batch=_parse(rows, idempotency_key="x").batch)
    assert other.rows_accepted == 0 and other.rows_duplicate_of_stored == 4 and read_feedback_store(store).num_rows == 4


def test_rate_limit_per_user():
    now = [0.0]
    limiter = RateLimiter(10.0, 10.0, clock=lambda: now[0])
    assert all(limiter.take(["a"]) == 0.0 for _ in range(10))
    wait = limiter.take(["a"])
    assert wait == pytest.approx(0.1) and retry_after_header(wait) == "1"
    assert limiter.take(["b"]) == 0.0                          # another user is not limited
    assert limiter.take(["a", "b"]) > 0 and limiter.take(["b"]) == 0.0   # refused: nothing taken from b
    now[0] += 0.25
    assert limiter.take(["a"]) == 0.0 and limiter.take(["a"]) == 0.0 and limiter.take(["a"]) > 0
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_refits_coalesce(tmp_path):
    calls: list[list[str]] = []
    gate = threading.Event()
    refitter = OnlineRefitter.__new__(OnlineRefitter)

    def slow_refit(users, requested=None):
        calls.append(list(users))
        gate.wait(5)
        from latentpref.tasks.evaluate.feedback import RefitResult
        return RefitResult(list(users), {}, [], 0, 0.0)
    done = []
    OnlineRefitter.__init__(refitter, Store(str(tmp_path)), {"clap_version": "v"}, None, None,
                            on_refit=done.append, prompt_tokens=8, response_tokens=8)
    refitter.refit = slow_refit
    refitter.request(["u1"])
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(10):                      # a burst for u1 (and u2) while the first refit runs
        refitter.request(["u1", "u2"])
    gate.set()
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refitter.close()
    assert calls == [["u1"], ["u1", "u2"]]   # 21 requests, 2 refits


def test_an_online_refit_writes_the_row_the_night_would(tmp_path):
    from latentpref.pipelines.personalize import training_pairs  # noqa: F401  (the night's rule, mirrored)
    from latentpref.tasks.data.ipc import table_to_ipc
    from latentpref.tasks.models.registry import load_tokenizer
    from latentpref.tasks.policy.table import PolicyTable
    from latentpref.tasks.train.personalize import ChunkJob, fit_chunk
    store = Store(str(tmp_path))
    users = ["user-0", "user-1"]
    serve_store.night(store, "clapv1", users, seed=1)
    release = current_release(store)
    clap, _ = serve_store.write_clap(store, "clapv1", seed=1)
    tokenizer = load_tokenizer(store.local_copy(*serve_store.BASE))
    manifest = {**release_manifest(store, release), "release": release.release_id}
    refitter = OnlineRefitter(store, manifest, clap.eval(), tokenizer, on_refit=lambda r: None, prompt_tokens=32,
                              response_tokens=16)
    assert refitter.available
    rows = serve_store.pair_rows("user-1", 3, offset=50) + serve_store.pair_rows("newbie", 2)
    store_feedback(store, _parse(rows).rows, validate.QUARANTINE_SCHEMA.empty_table(), source="t", rows_read=5)
    result = refitter.refit(["user-1", "newbie"])
    refitter.close()
    assert result.encoded_texts > 0
    table = PolicyTable(store, "clapv1")
    latest = table.manifests(["user-1", "newbie"])
    assert latest["user-1"]["n_pairs"] == 6 and latest["newbie"]["n_pairs"] == 2     # 3 simulated + 3 new; 2 new
    assert latest["user-1"]["version"] != table.manifests(["user-1"], release.policy_tag)["user-1"]["version"]
    row = table.rows(["user-1"], columns=["night"]).to_pylist()[0]
    assert row["night"] == f"online-{release.release_id}"
    # the night: the same pairs for these users, the release's settings -> nothing to do
    pairs = refitter.user_pairs(["newbie", "user-1"])
    night = fit_chunk(ChunkJob(store_root=store.root, clap_version="clapv1", user_ids=("newbie", "user-1"),
                               pairs_ipc=table_to_ipc(pairs), fit=serve_store.FIT, mode="head-only",
                               min_pairs=serve_store.MIN_PAIRS))
    assert {r["status"] for r in night} == {"unchanged"}


def test_a_refit_owed_by_a_dead_replica_is_recovered(tmp_path):
    """The marker written before the feedback's 2xx outlives the replica: a new refitter re-queues it, and the
    marker goes once the refit is done."""
    from latentpref.tasks.evaluate.feedback import RefitResult
    store = Store(str(tmp_path))
    manifest = {"clap_version": "v", "release": "r1"}
    dead = OnlineRefitter(store, manifest, None, None, on_refit=lambda r: None, prompt_tokens=8, response_tokens=8)
    dead.close()                                   # dies before refitting
    dead.mark_pending(["u1", "u2"], "batch-1")
    done = []
    live = OnlineRefitter.__new__(OnlineRefitter)
    OnlineRefitter.__init__(live, store, manifest, None, None, on_refit=done.append, prompt_tokens=8,
                            response_tokens=8)
    live.refit = lambda users, requested=None: RefitResult(list(users), {}, [], 0, 0.0)
    assert live.recover(older_than_s=0.0) == 1
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    while store.listdir("serving", "refits", "r1") and time.monotonic() < deadline:
        time.sleep(0.01)
    live.close()
    assert done and sorted(done[0].user_ids) == ["u1", "u2"]
    assert store.listdir("serving", "refits", "r1") == []


def _refit_once(root, turns=None, **kw):
    from latentpref.tasks.models.registry import load_tokenizer
    from latentpref.tasks.policy.table import PolicyTable
    store = Store(str(root))
    serve_store.night(store, "clapv1", ["user-0", "user-1"], seed=1)
    release = current_release(store)
    clap, _ = serve_store.write_clap(store, "clapv1", seed=1)
    tokenizer = load_tokenizer(store.local_copy(*serve_store.BASE))
    manifest = {**release_manifest(store, release), "release": release.release_id}
    refitter = OnlineRefitter(store, manifest, clap.eval(), tokenizer, on_refit=lambda r: None, prompt_tokens=32,
                              response_tokens=16, turns=turns, **kw)
    rows = serve_store.pair_rows("user-1", 3, offset=50) + serve_store.pair_rows("newbie", 2)
    store_feedback(store, _parse(rows).rows, validate.QUARANTINE_SCHEMA.empty_table(), source="t", rows_read=5)
    return refitter, lambda: PolicyTable(store, "clapv1").rows(["newbie", "user-1"],
                                                              columns=["user_id", "params"]).sort_by("user_id")


def test_a_refit_takes_turns_with_decoding_and_writes_the_same_rows(tmp_path):
    """With the replica's turns, a refit waits for the decode holding the cores, encodes a few texts per turn, and
    writes exactly the rows of a refit without turns."""
    from latentpref.tasks.evaluate.batcher import ComputeTurns
    plain, read_plain = _refit_once(tmp_path / "plain")
    plain.refit(["user-1", "newbie"])
    plain.close()
    expected = read_plain()

    turns = ComputeTurns()
    refitter, read = _refit_once(tmp_path / "turns", turns, encode_texts_per_turn=2)
    done = []
    with turns.turn():                                  # a decode batch holds the cores
        worker = threading.Thread(target=lambda: done.append(refitter.refit(["user-1", "newbie"])))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not done           # the refit waits for its turn
    worker.join(60)
    refitter.close()
    result = done[0]
    assert result.encoded_texts > 2
    assert turns.turns >= 1 + math.ceil(result.encoded_texts / 2)   # the decode + a turn per piece (the fit in the last)
    got = read()
    assert got["user_id"].to_pylist() == expected["user_id"].to_pylist()
    for a, b in zip(got["params"].to_pylist(), expected["params"].to_pylist()):
        assert np.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="encode_texts_per_turn"):
        OnlineRefitter(Store(str(tmp_path / "x")), {}, None, None, on_refit=lambda r: None, prompt_tokens=8,
                       response_tokens=8, encode_texts_per_turn=0)
