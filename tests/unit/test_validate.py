"""tasks/data/validate.py: the public feedback contract (STYLE.md §7: bad rows -> quarantine + reason)."""

import gzip
import io
import json
from datetime import datetime, timezone

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentpref.tasks.data import validate as v

NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)
GOOD = {
    "user_id": "u00042",
    "prompt": "this film opens with",
    "chosen": " a wonderful scene .",
    "rejected": " a dull scene .",
    "created_at": "2025-05-01T12:00:00Z",
    "weight": 1.0,
}


def run(rows, **kw):
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist alone takes the first row's keys
    return v.validate_feedback(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), now=NOW, **kw)


def ingest(uri: str, existing=None):
    """read + validate + dedupe, unparsable lines first in the quarantine (what a caller does)."""
    table, problems = v.read_feedback_file(uri)
    good, quarantined = v.validate_feedback(table, source=uri, now=NOW)
    return v.dedupe_against(good, existing), pa.concat_tables([v.problems_table(problems, uri), quarantined])


def only_reason(rows, **kw) -> str:
    """Validate [GOOD, *rows]: GOOD must pass, every other row must be quarantined; return the reason."""
    good, quarantined = run([GOOD, *rows], **kw)
    assert good.num_rows == 1, quarantined.to_pylist()
    assert quarantined.column("row").to_pylist() == list(range(1, len(rows) + 1))
    reasons = quarantined.column("reason").to_pylist()
    assert len(set(r.split(":")[0] for r in reasons)) == 1, reasons
    return reasons[0]


# ---- user ids ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("user_id", ["u00042", "alice", "a.b@example.com", "A_b-9", "x" * 128])
def test_valid_user_ids_get_a_hashed_storage_key(user_id):
    key = v.user_storage_key(user_id)
    assert len(key) == 64 and set(key) <= set("0123456789abcdef")
    assert user_id not in key and key == v.user_storage_key(user_id)


@pytest.mark.parametrize("user_id", ["../x", "a/b", "a\\b", "..", "a..b", ".hidden", "", "a b", "a\x00b", "a\nb", "x" * 129, "é"])
def test_bad_user_ids_raise_naming_the_id(user_id):
    with pytest.raises(v.InvalidUserId, match="must match"):
        v.user_storage_key(user_id)


# ---- one test per bad-row kind ------------------------------------------------------------------------

def test_wrong_type():
    table = pa.table({"user_id": [42], "prompt": ["p"], "chosen": ["a"], "rejected": ["b"]})
    good, quarantined = v.validate_feedback(table, now=NOW)
    assert good.num_rows == 0
    assert quarantined.column("reason")[0].as_py() == "wrong_type: user_id has type int64, expected string"
    assert quarantined.column("user_id")[0].as_py() == "42"  # raw value kept as text


def test_invalid_utf8_bytes():
    table = pa.table({"user_id": ["u1", "u1"], "prompt": [b"p", b"p"], "chosen": [b"caf\xc3\xa9", b"caf\xe9"], "rejected": [b"b", b"b"]})
    good, quarantined = v.validate_feedback(table, now=NOW)
    assert good.column("chosen").to_pylist() == ["café"]
    assert quarantined.column("reason").to_pylist() == ["invalid_utf8: chosen is not valid UTF-8"]
    assert quarantined.column("chosen")[0].as_py() == "caf\\xe9"


def test_replacement_character():
    assert only_reason([{**GOOD, "rejected": "mis\ufffddecoded"}]).startswith("invalid_utf8: rejected contains U+FFFD")


@pytest.mark.parametrize("column", ["user_id", "prompt", "chosen", "rejected"])
def test_missing_value(column):
    assert only_reason([{**GOOD, column: None}]) == f"missing_value: {column} is null"


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text(text):
    assert only_reason([{**GOOD, "chosen": text}]) == "empty_text: chosen is empty"


def test_chosen_equals_rejected():
    assert only_reason([{**GOOD, "rejected": GOOD["chosen"]}]).startswith("same_response")
    assert only_reason([{**GOOD, "rejected": GOOD["chosen"] + "  "}]).startswith("same_response")
    ids = {"prompt_id": "p1", "chosen_id": "p1-3", "rejected_id": "p1-3"}
    assert only_reason([{**GOOD, **ids}]) == "same_response: chosen_id == rejected_id"


def test_duplicate_rows_keep_the_first():
    reason = only_reason([{**GOOD, "weight": 2.0}, dict(GOOD)])
    assert reason == "duplicate: same user_id, prompt, chosen, rejected as row 0"


def test_oversize_text():
    assert only_reason([{**GOOD, "prompt": "x" * 101}], max_text_chars=100) == "oversize_text: prompt has 101 chars > max_text_chars=100"


@pytest.mark.parametrize("user_id", ["../etc/passwd", "a/b", "u\x07", "x" * 129, "a..b", "-u"])
def test_bad_user_id(user_id):
    assert only_reason([{**GOOD, "user_id": user_id}]).startswith("bad_user_id")


def test_control_characters():
    assert only_reason([{**GOOD, "chosen": "nul\x00byte"}]) == "control_chars: chosen contains a control character"
    good, _ = run([{**GOOD, "chosen": "tabs\tand\nnewlines\r\nare fine"}])
    assert good.num_rows == 1


@pytest.mark.parametrize("created_at", ["yesterday", "2025-13-01", "1999-12-31T00:00:00Z", "2031-01-01T00:00:00Z"])
def test_bad_created_at(created_at):
    assert only_reason([{**GOOD, "created_at": created_at}]).startswith("bad_created_at")


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_bad_weight(weight):
    assert only_reason([{**GOOD, "weight": weight}]).startswith("bad_weight")


def test_bad_weight_string():
    table = pa.table({**{k: [GOOD[k]] * 2 for k in v.REQUIRED}, "weight": ["0.5", "heavy"]})
    table = table.set_column(3, "rejected", pa.array(["r1", "r2"]))
    good, quarantined = v.validate_feedback(table, now=NOW)
    assert good.column("weight").to_pylist() == [0.5]
    assert quarantined.column("reason").to_pylist() == ["bad_weight: weight 'heavy' is not a number"]


def test_bad_split():
    assert only_reason([{**GOOD, "split": "test"}]) == "bad_split: split 'test' not in ('train', 'heldout')"


def test_missing_required_column_is_a_file_level_error():
    table = pa.table({"user_id": ["u1"], "prompt": ["p"], "chosen": ["a"]})
    with pytest.raises(v.FeedbackFileError, match=r"feedback\.csv: missing required column\(s\) \['rejected'\]"):
        v.validate_feedback(table, source="feedback.csv")


# ---- normalisation and dedupe -------------------------------------------------------------------------

def test_good_rows_are_normalised_to_the_contract():
    rows = [
        {**GOOD, "created_at": "2025-05-01T14:00:00+02:00", "weight": None, "split": None, "prompt_id": ""},
        {**GOOD, "chosen": "other", "created_at": "2025-05-01 12:00:00", "weight": 3, "split": "heldout", "prompt_id": "p7"},
        {**GOOD, "chosen": "third", "created_at": None, "extra": "dropped"},
    ]
    good, quarantined = run(rows)
    assert quarantined.num_rows == 0 and quarantined.schema == v.QUARANTINE_SCHEMA
    assert good.schema == v.FEEDBACK_SCHEMA
    noon = datetime(2025, 5, 1, 12, tzinfo=timezone.utc)
    assert good.column("created_at").to_pylist() == [noon, noon, None]
    assert good.column("weight").to_pylist() == [1.0, 3.0, 1.0]
    assert good.column("split").to_pylist() == ["train", "heldout", "train"]
    assert good.column("prompt_id").to_pylist() == [None, "p7", None]


def test_timestamp_columns_of_any_unit_become_utc_microseconds():
    table = pa.table({**{k: [GOOD[k]] for k in v.REQUIRED},
                      "created_at": pa.array([np.datetime64("2025-05-01T12:00:00.123456789")], pa.timestamp("ns")),
                      "weight": pa.array([2], pa.int8())})
    good, _ = v.validate_feedback(table, now=NOW)
    assert good.column("created_at").type == pa.timestamp("us", tz="UTC")
    assert good.column("created_at")[0].as_py() == datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    assert good.column("weight").to_pylist() == [2.0]


def test_dedupe_against_stored_rows():
    good, _ = run([GOOD, {**GOOD, "chosen": "new text"}])
    stored, _ = run([GOOD])
    fresh = v.dedupe_against(good, stored)
    assert fresh.column("chosen").to_pylist() == ["new text"]
    assert v.dedupe_against(good, None).equals(good)
    assert v.dedupe_against(good, good).num_rows == 0


# ---- files ----------------------------------------------------------------------------------------------

def test_csv_file_with_invalid_rows(tmp_path):
    path = tmp_path / "feedback.csv"
    path.write_bytes(
        b"\xef\xbb\xbfuser_id,prompt,chosen,rejected,created_at,weight\n"
        b'u1,"a prompt, with comma","good, multi\nline",bad,2025-05-01T00:00:00Z,1\n'
        b"u2,p,c,r,,\n"                     # empty created_at / weight -> null / 1.0
        b"u3,p,c,r,2025-05-01,-2\n"         # bad_weight
        b"u4,p,,r,2025-05-01,1\n"           # empty_text
        b"../u5,p,c,r,2025-05-01,1\n"       # bad_user_id
        b"u6,p,c\xff,r,2025-05-01,1\n"      # invalid_utf8
        b"u7,p,c,r,2025-05-01,1,extra\n"    # bad_row (too many fields)
    )
    good, quarantined = ingest(str(path))
    assert good.column("user_id").to_pylist() == ["u1", "u2"]
    assert good.column("chosen")[0].as_py() == "good, multi\nline"
    assert good.column("weight").to_pylist() == [1.0, 1.0]
    codes = [r.split(":")[0] for r in quarantined.column("reason").to_pylist()]
    assert codes == ["bad_row", "bad_weight", "empty_text", "bad_user_id", "invalid_utf8"]
    assert quarantined.column("raw")[0].as_py().startswith("u7,")
    assert set(quarantined.column("source").to_pylist()) == {str(path)}


def test_truncated_csv_keeps_complete_rows(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_bytes(b"user_id,prompt,chosen,rejected\nu1,p,a,b\nu2,p,a,b\nu3,p,\"half a quot")
    good, quarantined = ingest(str(path))
    assert good.column("user_id").to_pylist() == ["u1", "u2"]
    assert quarantined.column("reason").to_pylist() == ["bad_row: line 4: expected 4 fields, got 3"]


def test_jsonl_file_with_invalid_rows(tmp_path):
    lines = [
        json.dumps(GOOD).encode(),
        json.dumps({**GOOD, "chosen": "another", "weight": "2.5"}).encode(),
        json.dumps({**GOOD, "chosen": 7}).encode(),            # wrong_type
        b'{"user_id": "u1", "prompt": "p", "cho',              # truncated -> bad_json
        b"[1, 2]",                                             # not an object -> bad_json
        json.dumps({**GOOD, "chosen": "x"}).encode()[:-2] + b'\xff"}',  # invalid_utf8
        json.dumps({**GOOD, "chosen": "third", "split": "dev"}).encode(),  # bad_split
        b"",
    ]
    path = tmp_path / "feedback.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    table, problems = v.read_feedback_file(str(path))
    assert table.num_rows == 3
    assert [p["reason"].split(":")[0] for p in problems] == ["wrong_type", "bad_json", "bad_json", "invalid_utf8"]
    assert [p["line"] for p in problems] == [3, 4, 5, 6]
    good, quarantined = ingest(str(path))
    assert good.column("weight").to_pylist() == [1.0, 2.5]
    assert quarantined.num_rows == 5 and quarantined.column("reason")[4].as_py().startswith("bad_split")


def test_parquet_roundtrip_and_truncated_parquet(tmp_path):
    good, _ = run([GOOD, {**GOOD, "chosen": "second"}])
    buf = io.BytesIO()
    pq.write_table(good, buf)
    (tmp_path / "ok.parquet").write_bytes(buf.getvalue())
    again, quarantined = ingest(str(tmp_path / "ok.parquet"), existing=good.slice(0, 1))
    assert again.column("chosen").to_pylist() == ["second"]
    assert quarantined.num_rows == 0
    (tmp_path / "cut.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(v.FeedbackFileError, match=r"cut\.parquet: not a readable parquet file"):
        v.read_feedback_file(str(tmp_path / "cut.parquet"))


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.jsonl", b"", r"empty\.jsonl: file is empty \(0 bytes\)"),
        ("blank.csv", b"\n\n", r"file is empty"),
        ("garbage.jsonl", b"\x00\x01\x02\xff\xfe", r"no decodable JSON lines"),
        ("cut.csv.gz", gzip.compress(b"user_id,prompt,chosen,rejected\n" * 50)[:30], r"cut\.csv\.gz: cannot read the file"),
        ("cols.csv", b"user,text\nu1,hi\n", r"missing required column\(s\) \['user_id', 'prompt', 'chosen', 'rejected'\]"),
        ("notes.txt", b"hello", r"unknown format"),
    ],
)
def test_unusable_files_raise_feedback_file_error(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(v.FeedbackFileError, match=message) as info:
        v.read_feedback_file(str(tmp_path / name))
    assert info.value.uri == str(tmp_path / name)


def test_missing_file_and_fsspec_uri():
    with pytest.raises(v.FeedbackFileError, match="file not found"):
        v.read_feedback_file("memory://feedback/none.jsonl")
    with fsspec.open("memory://feedback/day1.jsonl", "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
    good, quarantined = ingest("memory://feedback/day1.jsonl")
    assert good.num_rows == 1 and quarantined.num_rows == 0


def test_simulated_pairs_pass_validation():
    from latentpref.tasks.data import users

    table = pa.table({
        "user_id": ["u00001"] * 2, "prompt": ["p"] * 2, "chosen": ["a", "b"], "rejected": ["b", "a"],
        "created_at": pa.array([datetime(2025, 1, 2, tzinfo=timezone.utc)] * 2, pa.timestamp("us", tz="UTC")),
        "weight": pa.array([1.0, 1.0], pa.float32()), "prompt_id": ["p0"] * 2, "chosen_id": ["p0-0", "p0-1"],
        "rejected_id": ["p0-1", "p0-0"], "split": ["train", "heldout"], "pair_kind": ["top_bottom", "random"],
    }).cast(users.PAIRS_SCHEMA)
    good, quarantined = v.validate_feedback(table, now=NOW)
    assert quarantined.num_rows == 0
    assert good.equals(table.drop_columns(["pair_kind"]).cast(v.FEEDBACK_SCHEMA))
