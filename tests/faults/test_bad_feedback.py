"""Malformed feedback through `latentpref ingest` (the public data contract: user_id, prompt, chosen,
rejected, optional created_at/weight; Parquet, CSV or JSONL).

Row-level problems never fail a file: each bad row lands in the quarantine Parquet with its reason, the good
rows are stored, the counts go to the MLflow ingest run. File-level problems (missing column, truncated,
empty, unknown format) exit with code 2 and a message naming the file, and write nothing. Feedback stored
before is never modified, and no user id ever becomes a path component.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentpref.pipelines.cli import main
from latentpref.tasks.data.validate import user_storage_key

EXPERIMENT = "faults-bad-feedback"


def _row(user: str, i: int, **kw) -> dict:
    return {"user_id": user, "prompt": f"the film {i} opens with", "chosen": f" a fine scene {i} .",
            "rejected": f" a dull scene {i} .", **kw}


# (kind, row or raw line, expected reason code); None = a valid row
PARQUET_ROWS = [
    ("valid", _row("carol", 1), None),
    ("valid", _row("carol", 2), None),
    ("valid", _row("dave", 3), None),
    ("valid: new row of a stored user", _row("alice", 9), None),
    ("duplicate of a stored row (dropped, not an error)", _row("alice", 1), None),
    ("empty strings", _row("carol", 4, chosen="   "), "empty_text"),
    ("chosen == rejected", _row("carol", 5, rejected=" a fine scene 5 ."), "same_response"),
    ("None", _row("carol", 6, prompt=None), "missing_value"),
    ("NaN weight", _row("carol", 7, weight=float("nan")), "bad_weight"),
    ("duplicate rows", _row("carol", 1), "duplicate"),
    ("oversize text", _row("carol", 8, chosen="x" * 20_001), "oversize_text"),
    ("user_id path traversal", _row("../x", 10), "bad_user_id"),
    ("user_id with slashes", _row("a/b", 11), "bad_user_id"),
    ("user_id with control chars", _row("u\x07ser", 12), "bad_user_id"),
    ("over-long user_id", _row("u" * 129, 13), "bad_user_id"),
    ("control chars in text", _row("dave", 14, chosen="nul\x00byte"), "control_chars"),
    ("lossy-decoded text (U+FFFD)", _row("dave", 15, rejected="mis\ufffddecoded"), "invalid_utf8"),
]
CSV_LINES = [
    ("header", b"user_id,prompt,chosen,rejected,weight", None),
    ("valid", b"erin,the film 20 opens with, a fine scene 20 ., a dull scene 20 .,1.0", None),
    ("invalid UTF-8", b"erin,the film 21 opens with,caf\xe9 scene, a dull scene 21 .,1.0", "invalid_utf8"),
    ("wrong number of fields", b"erin,the film 22 opens with,a,b,1.0,extra,fields", "bad_row"),
    ("weight not a number", b"erin,the film 23 opens with, a fine scene ., a dull scene .,heavy", "bad_weight"),
    ("empty user_id", b",the film 24 opens with, a fine scene ., a dull scene .,1.0", "bad_user_id"),
]
JSONL_LINES = [
    ("valid", json.dumps(_row("frank", 30)).encode(), None),
    ("wrong type (user_id number)", json.dumps(_row("frank", 31) | {"user_id": 42}).encode(), "wrong_type"),
    ("wrong type (weight list)", json.dumps(_row("frank", 32) | {"weight": [1]}).encode(), "wrong_type"),
    ("truncated line", b'{"user_id": "frank", "prompt": "the film', "bad_json"),
    ("not an object", b"[1, 2, 3]", "bad_json"),
    ("invalid UTF-8 line", b'{"user_id": "frank", "prompt": "p\xff", "chosen": "a", "rejected": "b"}', "invalid_utf8"),
]
ROW_KINDS = [k for k, _, code in PARQUET_ROWS + CSV_LINES + JSONL_LINES if code]
FILE_KINDS = ["missing column", "truncated Parquet", "empty file", "truncated gzip", "unknown format"]


def _hashes(store: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(store / "feedback"):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(store))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _ingest(path: Path, store: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["ingest", str(path), "--store", str(store), "--set", f"runtime.mlflow_experiment={EXPERIMENT}"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    f = {}
    f["stored"] = d / "stored.jsonl"
    f["stored"].write_text("\n".join(json.dumps(_row(u, i)) for u in ("alice", "bob") for i in (1, 2)) + "\n")
    rows = [r for _, r, _ in PARQUET_ROWS]
    f["parquet"] = d / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "weight": r.get("weight", 1.0)} for r in rows]), f["parquet"])
    f["csv"] = d / "rows.csv"
    f["csv"].write_bytes(b"\n".join(line for _, line, _ in CSV_LINES) + b"\n")
    f["jsonl"] = d / "rows.jsonl"
    f["jsonl"].write_bytes(b"\n".join(line for _, line, _ in JSONL_LINES) + b"\n")
    # file-level problems
    f["missing column"] = d / "no_rejected.csv"
    f["missing column"].write_text("user_id,prompt,chosen\ngina,p,a\n")
    whole = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([_row("gina", i) for i in range(50)]), whole)
    f["truncated Parquet"] = d / "truncated.parquet"
    f["truncated Parquet"].write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    f["empty file"] = d / "empty.jsonl"
    f["empty file"].write_bytes(b"")
    gz = gzip.compress(b"\n".join(json.dumps(_row("gina", i)).encode() for i in range(200)))
    f["truncated gzip"] = d / "truncated.jsonl.gz"
    f["truncated gzip"].write_bytes(gz[: len(gz) // 2])
    f["unknown format"] = d / "feedback.txt"
    f["unknown format"].write_text("user_id prompt chosen rejected\n")
    return f


def test_malformed_feedback_is_quarantined_and_nothing_stored_is_touched(tmp_path, files, capsys):
    store = tmp_path / "store"
    rc, out, err = _ingest(files["stored"], store, capsys)
    assert rc == 0, err
    before = _hashes(store)
    assert len(before) == 3   # alice, bob, batch marker

    quarantined_total = 0
    reports = {}
    for name, expected in (("parquet", PARQUET_ROWS), ("csv", CSV_LINES), ("jsonl", JSONL_LINES)):
        rc, out, err = _ingest(files[name], store, capsys)
        assert rc == 0, f"{name}: {err}"
        report = json.loads(out[out.index("{"):])
        reports[name] = report
        codes = Counter(code for _, _, code in expected if code)
        assert report["rows_quarantined"] == sum(codes.values()), report
        quarantine = pq.read_table(store / "feedback" / "_quarantine" / f"batch-{report['batch']}.parquet")
        got = Counter(r.split(":", 1)[0] for r in quarantine["reason"].to_pylist())
        assert got == codes, (name, got)
        assert all(s == str(files[name]) for s in quarantine["source"].to_pylist())
        quarantined_total += quarantine.num_rows

    # good rows were stored, per user (hashed folder), the stored duplicate was dropped
    assert reports["parquet"]["rows_accepted"] == 4 and reports["parquet"]["rows_duplicate_of_stored"] == 1
    assert reports["csv"]["rows_accepted"] == 1 and reports["jsonl"]["rows_accepted"] == 1
    for user, n in (("carol", 2), ("dave", 1), ("erin", 1), ("frank", 1)):
        folder = store / "feedback" / f"user={user_storage_key(user)}"
        assert sum(pq.read_table(p).num_rows for p in folder.glob("batch-*.parquet")) == n
    alice = store / "feedback" / f"user={user_storage_key('alice')}"
    assert sorted(pq.read_table(p).num_rows for p in alice.glob("batch-*.parquet")) == [1, 2]

    # file-level problems: exit code 2, a message naming the file, nothing written
    middle = _hashes(store)
    for kind in FILE_KINDS:
        rc, out, err = _ingest(files[kind], store, capsys)
        assert rc == 2, (kind, out, err)
        assert err.startswith("error: ") and str(files[kind]) in err, (kind, err)
    assert _hashes(store) == middle

    # stored feedback untouched (only new files were added)
    after = _hashes(store)
    assert {k: after[k] for k in before} == before

    # counts and errors in MLflow, one ingest run per file
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.flow = 'ingest'", max_results=100)
    by_batch = {r.data.params.get("batch"): r for r in runs if r.data.params.get("batch")}
    for name, report in reports.items():
        metrics = by_batch[report["batch"]].data.metrics
        assert metrics["rows_quarantined"] == report["rows_quarantined"]
        assert metrics["rows_accepted"] == report["rows_accepted"]
    errors = [r.data.tags["error"] for r in runs if "error" in r.data.tags]
    assert len(errors) == len(FILE_KINDS)

    # no user id, good or bad, became a path: the store holds only hashed user folders, nothing escaped it
    assert sorted(os.listdir(tmp_path)) == ["in", "store"]
    allowed = re.compile(r"feedback/(user=[0-9a-f]{64}/batch-[0-9a-f]{16}\.parquet|_quarantine/batch-[0-9a-f]{16}"
                         r"\.parquet|_batches/[0-9a-f]{16}\.json)|mlflow/.*")
    paths = [str(Path(d, n).relative_to(store)) for d, _, ns in os.walk(store) for n in ns]
    assert [p for p in paths if not allowed.fullmatch(p)] == []
    print(f"bad feedback: {len(ROW_KINDS) + len(FILE_KINDS)} malformed kinds tried ({len(ROW_KINDS)} row-level, "
          f"{len(FILE_KINDS)} file-level), {quarantined_total} rows quarantined, "
          f"{sum(r['rows_accepted'] for r in reports.values())} good rows stored")
