"""The public feedback contract: read feedback files, split rows into good and quarantined.

Feedback rows (notes/CONTRACT.md "pairs / feedback"): user_id, prompt, chosen, rejected (required
strings), created_at (timestamp, nullable), weight (float >= 0, default 1.0), prompt_id, chosen_id,
rejected_id (nullable strings), split in {train, heldout} (default train).

Policy (STYLE.md §7): file-level problems (unreadable, empty, truncated, a required column missing)
raise FeedbackFileError naming the file; bad rows never raise, they go to the quarantine table with a
`reason` "<code>: <detail>" (codes in REASONS). Nothing here writes storage.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Letters, digits, '.', '_', '-', '@' (e-mail-like ids); starts with a letter or digit; no '..';
# at most 128 chars. No '/', '\\', whitespace or control characters, so an id can never walk a path.
USER_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_USER_ID_RE2 = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"  # RE2 (pyarrow) has no look-ahead: '..' checked apart
# The one definition of a control character (feedback validation and prepare-stage cleaning): Unicode
# category Cc except tab, newline and carriage return, i.e. C0 controls, DEL and C1 controls (U+0080-U+009F).
# The same pattern is read by Python `re` and by RE2 (pyarrow), which both take \xHH as a code point.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_UNCLEAN = re.compile(CONTROL_CHARS + "|\ufffd")
# Bump when clean_text changes what it removes: prepare-stage keys include it, so stores re-clean.
CLEAN_TEXT_VERSION = 1
MIN_CREATED_AT = datetime(2000, 1, 1, tzinfo=timezone.utc)

REQUIRED = ("user_id", "prompt", "chosen", "rejected")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
OPTIONAL_STRINGS = ("prompt_id", "chosen_id", "rejected_id", "split")
SPLITS = ("train", "heldout")
FEEDBACK_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("weight", pa.float32()),
        ("prompt_id", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("split", pa.string()),
    ]
)
# Quarantine keeps every contract column as text (raw values may not fit the contract types), plus
# where the row came from and why it was refused. One fixed schema, so quarantine files concatenate.
# `row` = 0-based position in the table given to validate_feedback (null for lines that could not be
# parsed at all; their `raw` text and line number are kept instead).
QUARANTINE_SCHEMA = pa.schema(
    [("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
    + [(name, pa.string()) for name in FEEDBACK_SCHEMA.names]
)
REASONS = (
    "wrong_type",      # a value of the wrong type (e.g. user_id 42, weight "abc" in Parquet)
    "invalid_utf8",    # bytes that are not UTF-8, or U+FFFD from an earlier lossy decode
    "missing_value",   # null / absent required value
    "bad_user_id",     # fails USER_ID (path traversal, slashes, control chars, > 128 chars)
    "empty_text",      # prompt / chosen / rejected empty or whitespace only
    "control_chars",   # control characters (CONTROL_CHARS: C0 but tab / newline / CR, DEL, C1) in a text
    "oversize_text",   # text longer than max_text_chars
    "same_response",   # chosen == rejected (text or id)
    "bad_split",       # split not in SPLITS
    "bad_weight",      # NaN, infinite, negative or unparsable weight
    "bad_created_at",  # unparsable, before 2000 or in the future
    "duplicate",       # same (user_id, prompt, chosen, rejected) as an earlier row of the file
    "bad_json",        # JSONL line that is not a JSON object (read_feedback_file)
    "bad_row",         # CSV row with the wrong number of fields (read_feedback_file)
)


class FeedbackFileError(ValueError):
    """A whole feedback file is unusable (unreadable, empty, truncated, missing a column)."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri}: {problem}")
        self.uri = uri
        self.problem = problem


class InvalidUserId(ValueError):
    pass


def clean_text(text: str) -> str:
    """text without the characters validate_feedback refuses in a prompt or response: control characters
    (CONTROL_CHARS) and U+FFFD (a lossy decode, e.g. a token cut inside a multi-byte character). Removed,
    not replaced; tab, newline and carriage return are kept. Emptiness and length are not its business."""
    return _UNCLEAN.sub("", text)


def check_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not USER_ID.fullmatch(user_id):
        raise InvalidUserId(
            f"user_id {user_id!r} must match {USER_ID.pattern} (letters, digits, '.', '_', '-', '@'; "
            f"starts with a letter or digit; no '..'; at most 128 chars)"
        )
    return user_id


def user_storage_key(user_id: str) -> str:
    """Storage key for a user's artifacts: sha256 hex of the id, never the raw id (so no id can
    form a path, collide by case folding on some stores, or leak into object names).

    Raises:
        InvalidUserId: user_id fails USER_ID.
    """
    return hashlib.sha256(check_user_id(user_id).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading files


def _format_of(uri: str) -> str:
    name = uri.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for fmt, suffixes in (("parquet", (".parquet", ".pq")), ("csv", (".csv",)), ("jsonl", (".jsonl", ".ndjson", ".json"))):
        if name.endswith(suffixes):
            return fmt
    raise FeedbackFileError(uri, "unknown format: expected a .parquet, .csv or .jsonl file (optionally .gz)")


def _require_columns(columns: Iterable[str], uri: str) -> None:
    columns = list(columns)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise FeedbackFileError(uri, f"missing required column(s) {missing}; the file has {columns}")


def _read_csv(data: bytes, uri: str) -> tuple[pa.Table, list[dict]]:
    problems: list[dict] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        problems.append(
            {
                "line": row.number,
                "reason": f"bad_row: line {row.number}: expected {row.expected_columns} fields, got {row.actual_columns}",
                "raw": row.text[:2000],
            }
        )
        return "skip"

    # Every contract column is read as bytes: UTF-8 and number/date parsing happen per row in
    # validate_feedback, so one bad cell quarantines its row instead of failing the file.
    convert = pacsv.ConvertOptions(
        column_types={name: pa.binary() for name in FEEDBACK_SCHEMA.names},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(use_threads=False),  # row numbers for invalid rows
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=convert,
    )
    return table, problems


def _read_jsonl(data: bytes, uri: str) -> tuple[pa.Table, list[dict]]:
    problems: list[dict] = []
    records: list[dict] = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        snippet = raw[:2000].decode("utf-8", "backslashreplace")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append({"line": number, "reason": f"invalid_utf8: line {number} is not UTF-8 ({e.reason})", "raw": snippet})
            continue
        except json.JSONDecodeError as e:
            problems.append({"line": number, "reason": f"bad_json: line {number}: {e.msg} (truncated line?)", "raw": snippet})
            continue
        if not isinstance(obj, dict):
            problems.append({"line": number, "reason": f"bad_json: line {number} is a {type(obj).__name__}, not an object", "raw": snippet})
            continue
        type_error = _jsonl_type_error(obj)
        if type_error:
            problems.append({"line": number, "reason": f"wrong_type: line {number}: {type_error}", "raw": snippet})
            continue
        records.append(obj)
    if not records and problems:
        raise FeedbackFileError(uri, f"no decodable JSON lines ({len(problems)} bad); first: {problems[0]['reason']}")
    columns = [c for c in FEEDBACK_SCHEMA.names if any(c in r for r in records)]
    arrays = {}
    for c in columns:
        values = [r.get(c) for r in records]
        if c == "weight" and any(isinstance(v, str) for v in values):
            values = [v if v is None or isinstance(v, str) else repr(float(v)) for v in values]
            arrays[c] = pa.array(values, pa.string())
        elif c == "weight":
            arrays[c] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        else:
            arrays[c] = pa.array(values, pa.string())
    return pa.table(arrays) if arrays else pa.table({}), problems


def _jsonl_type_error(obj: dict) -> str | None:
    for c in (*REQUIRED, *OPTIONAL_STRINGS, "created_at"):
        v = obj.get(c)
        if v is not None and not isinstance(v, str):
            return f"{c} is {type(v).__name__} {v!r:.40}, expected a string"
    w = obj.get("weight")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float, str))):
        return f"weight is {type(w).__name__} {w!r:.40}, expected a number"
    return None


def read_feedback_file(uri: str) -> tuple[pa.Table, list[dict]]:
    """Read one feedback file (Parquet, CSV with header, or JSONL; optionally compressed; local or
    any fsspec URI such as s3://).

    Returns:
        (table, problems): the parsed rows (types as found; validate_feedback checks them) and the
        rows that could not be parsed at all, as dicts {"line", "reason", "raw"}.

    Raises:
        FeedbackFileError: missing, empty, truncated or undecodable file, unknown extension, or a
            required column missing.
    """
    fmt = _format_of(uri)
    try:
        with fsspec.open(uri, "rb", compression="infer") as f:
            data = f.read()
    except FileNotFoundError:
        raise FeedbackFileError(uri, "file not found") from None
    except (EOFError, OSError, ValueError) as e:  # truncated gzip, permission, ...
        raise FeedbackFileError(uri, f"cannot read the file ({type(e).__name__}: {e}); truncated or corrupt?") from e
    if not data.strip():
        raise FeedbackFileError(uri, f"file is empty ({len(data)} bytes)")
    try:
        if fmt == "parquet":
            table, problems = pq.read_table(io.BytesIO(data)), []
        elif fmt == "csv":
            table, problems = _read_csv(data, uri)
        else:
            table, problems = _read_jsonl(data, uri)
    except FeedbackFileError:
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError) as e:
        raise FeedbackFileError(
            uri, f"not a readable {fmt} file ({type(e).__name__}: {str(e)[:300]}); truncated or corrupt?"
        ) from e
    _require_columns(table.column_names, uri)
    if problems:
        log.warning("%s: %d unparsable rows", uri, len(problems))
    return table, problems


def problems_table(problems: list[dict], source: str) -> pa.Table:
    """Unparsable rows from read_feedback_file in the QUARANTINE_SCHEMA layout."""
    n = len(problems)
    cols: dict[str, Any] = {
        "source": [source] * n,
        "row": [None] * n,
        "reason": [p["reason"] for p in problems],
        "raw": [p.get("raw") for p in problems],
    }
    cols.update({name: [None] * n for name in FEEDBACK_SCHEMA.names})
    return pa.table(cols, schema=QUARANTINE_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Row validation


class _Reasons:
    """First failing reason per row; later checks never overwrite an earlier reason."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)

    @property
    def bad(self) -> np.ndarray:
        return self.reason != None  # noqa: E711 (element-wise)

    def flag(self, mask: np.ndarray, reason: str | np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool) & ~self.bad
        if isinstance(reason, str):
            self.reason[mask] = reason
        else:
            self.reason[mask] = reason[mask]


def _flag_each(reasons: _Reasons, mask: np.ndarray, values: pa.Array | np.ndarray, fmt: Callable[[Any], str]) -> None:
    """Flag rows in mask with a per-row message fmt(value), formatting only the rows flagged."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool) & ~reasons.bad)
    if len(idx) == 0:
        return
    picked = values.take(pa.array(idx)).to_pylist() if isinstance(values, (pa.Array, pa.ChunkedArray)) else values[idx]
    reasons.reason[idx] = [fmt(x) for x in picked]


def _np_bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _combined(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    return col


def _strings(col: pa.Array, name: str, reasons: _Reasons) -> pa.Array:
    """Column as a string array; undecodable / wrongly typed values are flagged and nulled."""
    n = len(col)
    t = col.type
    if pa.types.is_dictionary(t):
        return _strings(col.cast(t.value_type), name, reasons)
    if pa.types.is_null(t):
        return pa.nulls(n, pa.string())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        try:
            return col.cast(pa.string())  # validates UTF-8 for the whole column at once
        except pa.ArrowInvalid:
            values, bad = [], np.zeros(n, dtype=bool)
            for i, v in enumerate(col.to_pylist()):
                try:
                    values.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError:
                    values.append(None)
                    bad[i] = True
            reasons.flag(bad, f"invalid_utf8: {name} is not valid UTF-8")
            return pa.array(values, pa.string())
    reasons.flag(~_np_bool(pc.is_null(col)), f"wrong_type: {name} has type {t}, expected string")
    return pa.nulls(n, pa.string())


def _weights(col: pa.Array, reasons: _Reasons) -> np.ndarray:
    """float64 weights, NaN where null (filled with 1.0 later); bad values flagged."""
    t = col.type
    n = len(col)
    if pa.types.is_null(t):
        return np.full(n, np.nan)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        null = _np_bool(pc.is_null(col))
        w = pc.fill_null(col.cast(pa.float64()), 1.0).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~null & ~(np.isfinite(w) & (w >= 0))
        _flag_each(reasons, bad, w, lambda x: f"bad_weight: weight={float(x)!r} must be a finite number >= 0")
        w[null] = np.nan
        return w
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        text = _strings(col, "weight", reasons).to_pylist()
        w = np.full(n, np.nan)
        detail = np.full(n, None, dtype=object)
        for i, v in enumerate(text):
            if v is None or not v.strip():
                continue
            try:
                x = float(v)
            except ValueError:
                detail[i] = f"bad_weight: weight {v[:40]!r} is not a number"
                continue
            if not (math.isfinite(x) and x >= 0):
                detail[i] = f"bad_weight: weight={x!r} must be a finite number >= 0"
            w[i] = x
        reasons.flag(detail != None, detail)  # noqa: E711
        return w
    reasons.flag(~_np_bool(pc.is_null(col)), f"wrong_type: weight has type {t}, expected a number")
    return np.full(n, np.nan)


def _parse_time(v: str) -> datetime | None:
    try:
        dt = datetime.fromisoformat(v.strip())  # ISO 8601, 'Z' and offsets (Python >= 3.11)
    except ValueError:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _created_at(col: pa.Array, reasons: _Reasons, now: datetime) -> pa.Array:
    """timestamp[us, UTC] array (naive times are taken as UTC); bad values flagged and nulled."""
    t = col.type
    n = len(col)
    target = pa.timestamp("us", tz="UTC")
    if pa.types.is_null(t):
        return pa.nulls(n, target)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        try:
            ts = pc.cast(col, target, safe=False)
        except pa.ArrowInvalid as e:
            reasons.flag(np.ones(n, dtype=bool), f"bad_created_at: cannot convert {t} ({e})")
            return pa.nulls(n, target)
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        text = _strings(col, "created_at", reasons).to_pylist()
        values: list[datetime | None] = []
        detail = np.full(n, None, dtype=object)
        for i, v in enumerate(text):
            if v is None or not v.strip():
                values.append(None)
                continue
            dt = _parse_time(v)
            if dt is None:
                detail[i] = f"bad_created_at: {v[:40]!r} is not an ISO-8601 timestamp"
            values.append(dt)
        reasons.flag(detail != None, detail)  # noqa: E711
        ts = pa.array(values, target)
    else:
        reasons.flag(~_np_bool(pc.is_null(col)), f"bad_created_at: created_at has type {t}, expected a timestamp or ISO-8601 string")
        return pa.nulls(n, target)
    lo = pa.scalar(MIN_CREATED_AT, target)
    hi = pa.scalar(now + timedelta(days=1), target)
    out_of_range = _np_bool(pc.or_(pc.less(ts, lo), pc.greater(ts, hi)))
    _flag_each(reasons, out_of_range, ts, lambda t: f"bad_created_at: {t.isoformat()} is before 2000 or in the future")
    return ts


def _render(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float):
        return repr(v)
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return repr(v)


def _key(table: pa.Table) -> pa.Array:
    # \x1f never occurs in valid rows (control characters are quarantined), so the join is unambiguous
    # for texts; user ids cannot contain it either.
    cols = [_combined(table.column(c)).cast(pa.large_string()) for c in REQUIRED]
    return pc.binary_join_element_wise(*cols, pa.scalar("\x1f", pa.large_string()))


def validate_feedback(
    table: pa.Table,
    *,
    max_text_chars: int = 20_000,
    source: str = "<table>",
    now: datetime | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split feedback rows into good rows (FEEDBACK_SCHEMA) and quarantined rows (QUARANTINE_SCHEMA).

    Each bad row gets the first failing reason among REASONS ("<code>: <detail>"); among otherwise
    good rows, repeats of (user_id, prompt, chosen, rejected) after the first are "duplicate".
    Good rows: created_at as timestamp[us, UTC] (naive = UTC; null kept), weight float32 (null ->
    1.0), empty optional ids -> null, split null -> "train". Unknown columns are dropped.

    Args:
        table: rows as read by read_feedback_file (or any Arrow table with the contract columns).
        max_text_chars: longest accepted prompt / chosen / rejected, in characters.
        source: the file name, for errors and the quarantine `source` column.
        now: upper bound for created_at is now + 1 day (default: the current time).

    Raises:
        FeedbackFileError: a required column is missing.
    """
    _require_columns(table.column_names, source)
    now = now or datetime.now(timezone.utc)
    n = table.num_rows
    reasons = _Reasons(n)
    col = {name: _combined(table.column(name)) for name in FEEDBACK_SCHEMA.names if name in table.column_names}

    strings = {name: _strings(col[name], name, reasons) for name in (*REQUIRED, *OPTIONAL_STRINGS) if name in col}
    for name in REQUIRED:
        reasons.flag(_np_bool(pc.is_null(strings[name])), f"missing_value: {name} is null")

    uid = strings["user_id"]
    uid_ok = _np_bool(pc.match_substring_regex(uid, _USER_ID_RE2)) & ~_np_bool(pc.match_substring(uid, ".."))
    _flag_each(reasons, ~uid_ok, uid, lambda u: f"bad_user_id: {u!r:.60} must match {USER_ID.pattern}")

    for name in TEXT_COLUMNS:
        s = strings[name]
        reasons.flag(_np_bool(pc.equal(pc.utf8_trim_whitespace(s), "")), f"empty_text: {name} is empty")
        reasons.flag(_np_bool(pc.match_substring(s, "\ufffd")), f"invalid_utf8: {name} contains U+FFFD (lossy decode upstream)")
        reasons.flag(_np_bool(pc.match_substring_regex(s, CONTROL_CHARS)), f"control_chars: {name} contains a control character")
        length = pc.fill_null(pc.utf8_length(s), 0).to_numpy(zero_copy_only=False)
        _flag_each(reasons, length > max_text_chars, length,
                   lambda k, name=name: f"oversize_text: {name} has {k} chars > max_text_chars={max_text_chars}")

    # optional id / split columns: "" means absent
    for name in OPTIONAL_STRINGS:
        if name in strings:
            s = strings[name]
            strings[name] = pc.if_else(pc.equal(pc.utf8_trim_whitespace(s), ""), pa.scalar(None, pa.string()), s)
            if name != "split":
                reasons.flag(_np_bool(pc.match_substring_regex(strings[name], CONTROL_CHARS)), f"control_chars: {name} contains a control character")

    reasons.flag(
        _np_bool(pc.equal(pc.utf8_trim_whitespace(strings["chosen"]), pc.utf8_trim_whitespace(strings["rejected"]))),
        "same_response: chosen and rejected are the same text",
    )
    if "chosen_id" in strings and "rejected_id" in strings:
        reasons.flag(_np_bool(pc.equal(strings["chosen_id"], strings["rejected_id"])), "same_response: chosen_id == rejected_id")

    if "split" in strings:
        split = strings["split"]
        bad_split = ~_np_bool(pc.is_in(split, pa.array(SPLITS))) & ~_np_bool(pc.is_null(split))
        _flag_each(reasons, bad_split, split, lambda x: f"bad_split: split {x!r:.40} not in {SPLITS}")

    weight = _weights(col["weight"], reasons) if "weight" in col else np.full(n, np.nan)
    created_at = _created_at(col["created_at"], reasons, now) if "created_at" in col else pa.nulls(n, pa.timestamp("us", tz="UTC"))

    # within-file duplicates among rows that are otherwise good: keep the first occurrence
    good_idx = np.flatnonzero(~reasons.bad)
    if len(good_idx):
        key = _key(pa.table({c: strings[c] for c in REQUIRED}).take(pa.array(good_idx)))
        codes = pc.dictionary_encode(key).indices.to_numpy(zero_copy_only=False)
        _, first = np.unique(codes, return_index=True)
        is_dup = np.ones(len(good_idx), dtype=bool)
        is_dup[first] = False
        if is_dup.any():
            first_row = np.zeros(n, dtype=np.int64)
            first_row[good_idx] = good_idx[first][np.searchsorted(np.unique(codes), codes)]
            dup = np.zeros(n, dtype=bool)
            dup[good_idx[is_dup]] = True
            _flag_each(reasons, dup, first_row, lambda r: f"duplicate: same user_id, prompt, chosen, rejected as row {r}")

    bad = reasons.bad
    keep = pa.array(~bad)
    w = np.where(np.isnan(weight), 1.0, weight).astype(np.float32)
    good = pa.table(
        {
            **{c: strings[c] for c in REQUIRED},
            "created_at": created_at,
            "weight": pa.array(w),
            **{c: strings.get(c, pa.nulls(n, pa.string())) for c in OPTIONAL_STRINGS},
        }
    ).filter(keep)
    good = good.set_column(
        good.schema.get_field_index("split"), "split", pc.fill_null(good.column("split"), "train")
    ).cast(FEEDBACK_SCHEMA)

    bad_idx = np.flatnonzero(bad)
    quarantined = _quarantine(table, bad_idx, reasons.reason[bad_idx], source)
    if len(bad_idx):
        counts: dict[str, int] = {}
        for r in reasons.reason[bad_idx]:
            code = r.split(":", 1)[0]
            counts[code] = counts.get(code, 0) + 1
        log.warning("%s: quarantined %d of %d rows %s", source, len(bad_idx), n, counts)
    return good, quarantined


def _quarantine(table: pa.Table, rows: np.ndarray, reasons: np.ndarray, source: str) -> pa.Table:
    sub = table.take(pa.array(rows, pa.int64()))
    cols: dict[str, Any] = {
        "source": [source] * len(rows),
        "row": rows.astype(np.int64),
        "reason": list(reasons),
        "raw": [None] * len(rows),
    }
    for name in FEEDBACK_SCHEMA.names:
        values = sub.column(name).to_pylist() if name in sub.column_names else [None] * len(rows)
        cols[name] = [_render(v) for v in values]
    return pa.table(cols, schema=QUARANTINE_SCHEMA)


def dedupe_against(good: pa.Table, existing: pa.Table | None) -> pa.Table:
    """Drop rows whose (user_id, prompt, chosen, rejected) is already stored.

    A re-sent file is then a no-op and stored rows are never overwritten. The dropped rows are not
    errors, so they are not quarantined; callers count them as good.num_rows - result.num_rows.
    """
    if existing is None or existing.num_rows == 0 or good.num_rows == 0:
        return good
    _require_columns(existing.column_names, "<existing>")
    stored = _np_bool(pc.is_in(_key(good), value_set=_key(existing).unique()))
    return good.filter(pa.array(~stored))
