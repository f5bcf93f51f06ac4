"""Feedback ingestion into the store: good rows appended per user, bad rows quarantined, idempotent."""
import hashlib
import json
import os

import pyarrow as pa
import pytest

from latentpref.tasks.data.ingest import ingest_feedback, read_feedback_store
from latentpref.tasks.data.store import Store
from latentpref.tasks.data.validate import FeedbackFileError, user_storage_key

GOOD = [
    {"user_id": "alice", "prompt": "the film", "chosen": "was wonderful", "rejected": "was dull"},
    {"user_id": "alice", "prompt": "the plot", "chosen": "is clever", "rejected": "is thin"},
    {"user_id": "bob", "prompt": "the cast", "chosen": "shines", "rejected": "sleeps"},
]
BAD = [
    {"user_id": "../evil", "prompt": "p", "chosen": "a", "rejected": "b"},        # path traversal
    {"user_id": "carol", "prompt": "p", "chosen": "same", "rejected": "same"},    # chosen == rejected
    {"user_id": "dave", "prompt": "", "chosen": "a", "rejected": "b"},            # empty prompt
]


def _files(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_csv_and_jsonl_ingestion(tmp_path):
    store = Store(str(tmp_path / "store"))
    csv = tmp_path / "a.csv"
    import pyarrow.csv as pacsv
    pacsv.write_csv(pa.Table.from_pylist(GOOD + BAD), str(csv))
    report = ingest_feedback(str(csv), store)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (6, 3, 3)
    assert report.users == 2
    # user ids are never path components: partitions are named by the hashed key
    parts = sorted(os.listdir(tmp_path / "store" / "feedback"))
    assert f"user={user_storage_key('alice')}" in parts and not any("alice" in p or "evil" in p for p in parts)
    quarantine = store.read_table("feedback", "_quarantine", f"batch-{report.batch}.parquet")
    assert quarantine.num_rows == 3 and all(quarantine["reason"].to_pylist())

    before = _files(tmp_path / "store" / "feedback")
    # same file again: a no-op
    again = ingest_feedback(str(csv), store)
    assert again.already_ingested and again.batch == report.batch
    # a JSONL file repeating one stored row and adding one new: only the new row is added
    jsonl = tmp_path / "b.jsonl"
    rows = [GOOD[0], {"user_id": "bob", "prompt": "the score", "chosen": "soars", "rejected": "drones"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    third = ingest_feedback(str(jsonl), store)
    assert (third.rows_accepted, third.rows_duplicate_of_stored) == (1, 1)
    after = _files(tmp_path / "store" / "feedback")
    changed = [p for p in before if before[p] != after.get(p)]
    assert changed == []   # nothing already stored was modified
    stored = read_feedback_store(store)
    assert stored.num_rows == 4
    assert sorted(stored["user_id"].to_pylist()) == ["alice", "alice", "bob", "bob"]


def test_unusable_file_raises_and_writes_nothing(tmp_path):
    store = Store(str(tmp_path / "store"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(FeedbackFileError):
        ingest_feedback(str(empty), store)
    assert not os.path.exists(tmp_path / "store" / "feedback")
