"""Feedback ingestion: validate a feedback file, append good rows to the per-user feedback store,
quarantine bad rows with their reason. Nothing already stored is modified.

Layout under the store:
    feedback/user=<key>/batch-<digest>.parquet    good rows of one ingested batch, one file per user
    feedback/_quarantine/batch-<digest>.parquet   bad rows + `reason`
    feedback/_batches/<digest>.json               batch manifest, written last (the commit marker)
The batch digest is the digest of the validated input, so ingesting the same file twice is a no-op.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from latentpref.tasks.data import validate
from latentpref.tasks.data.store import Store, table_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestReport:
    source: str
    batch: str
    rows_read: int
    rows_accepted: int
    rows_quarantined: int
    rows_duplicate_of_stored: int
    users: int
    already_ingested: bool
    quarantine_url: str | None
    reasons: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def committed_feedback_files(store: Store) -> list[tuple[str, ...]]:
    """The store paths of every committed feedback batch file (all users), in the order `read_feedback_store`
    concatenates them. Only batches whose commit marker exists count: a batch cut off mid-way (crash, store outage)
    stays invisible until it is ingested again."""
    committed = {n[: -len(".json")] for n in store.listdir("feedback", "_batches") if n.endswith(".json")}
    files = []
    for part in store.listdir("feedback"):
        if not part.startswith("user="):
            continue
        for name in store.listdir("feedback", part):
            if name.startswith("batch-") and name.endswith(".parquet") and name[6:-8] in committed:
                files.append(("feedback", part, name))
    return files


def read_feedback_store(store: Store) -> pa.Table | None:
    """Every stored good feedback row (all users) as one table, or None when nothing was ingested yet: the files of
    `committed_feedback_files`, in order (reading them one at a time, as the night does, holds less)."""
    tables = [store.read_table(*parts) for parts in committed_feedback_files(store)]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def _stored_rows_for(store: Store, user_keys: set[str]) -> pa.Table | None:
    tables = []
    for key in user_keys:
        for name in store.listdir("feedback", f"user={key}"):
            if name.endswith(".parquet") and not name.startswith("."):
                tables.append(store.read_table("feedback", f"user={key}", name))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def ingest_feedback(uri: str, store: Store, *, max_text_chars: int = 20000) -> IngestReport:
    """Validate `uri` (Parquet, CSV or JSONL; local or s3://) and append its good rows to the store.

    Raises:
        validate.FeedbackFileError: the file as a whole is unusable (missing, empty, truncated, a required
            column missing); nothing is written in that case.
    """
    table, problems = validate.read_feedback_file(uri)
    good, bad = validate.validate_feedback(table, max_text_chars=max_text_chars, source=uri)
    if problems:   # rows the reader could not even parse go to quarantine too, with their reason
        bad = pa.concat_tables([bad, validate.problems_table(problems, uri)], promote_options="permissive")
    return store_feedback(store, good, bad, source=uri, rows_read=table.num_rows + len(problems))


def store_feedback(store: Store, good: pa.Table, bad: pa.Table, *, source: str, rows_read: int,
                   batch: str | None = None) -> IngestReport:
    """Append validated rows to the feedback store as one batch (per-user files, quarantine, then the commit
    marker last). `batch` (default: the digest of the rows) names it: a batch already committed is a no-op, so a
    re-sent file, or a request re-sent under the same idempotency key, is stored once."""
    batch = batch or (table_digest(good) if good.num_rows else table_digest(bad))
    if store.exists("feedback", "_batches", f"{batch}.json"):
        prev = store.read_json("feedback", "_batches", f"{batch}.json")
        log.info("feedback batch %s from %s was already ingested", batch, source)
        return IngestReport(**{**prev, "already_ingested": True})

    keys = {u: validate.user_storage_key(u) for u in set(good["user_id"].to_pylist())}
    existing = _stored_rows_for(store, set(keys.values()))
    before = good.num_rows
    if existing is not None and good.num_rows:
        good = validate.dedupe_against(good, existing)
    dup_stored = before - good.num_rows

    for user_id, key in sorted(keys.items()):
        rows = good.filter(pc.equal(good["user_id"], user_id))
        if rows.num_rows:
            store.write_table(rows, "feedback", f"user={key}", f"batch-{batch}.parquet")
    quarantine_url = None
    if bad.num_rows:
        quarantine_url = store.write_table(bad, "feedback", "_quarantine", f"batch-{batch}.parquet")
    reasons: dict[str, int] = {}
    for r in bad["reason"].to_pylist() if bad.num_rows else []:
        reasons[r] = reasons.get(r, 0) + 1
    report = IngestReport(source=source, batch=batch, rows_read=rows_read, rows_accepted=good.num_rows,
                          rows_quarantined=bad.num_rows, rows_duplicate_of_stored=dup_stored, users=len(keys),
                          already_ingested=False, quarantine_url=quarantine_url, reasons=reasons)
    store.write_json(report.to_dict(), "feedback", "_batches", f"{batch}.json")   # commit marker, last
    return report


def committed_rows_for(store: Store, user_ids: list[str]) -> pa.Table | None:
    """The committed feedback rows of these users (what the night reads for them), or None."""
    committed = {n[: -len(".json")] for n in store.listdir("feedback", "_batches") if n.endswith(".json")}
    tables = []
    for user_id in user_ids:
        key = validate.user_storage_key(user_id)
        for name in store.listdir("feedback", f"user={key}"):
            if name.startswith("batch-") and name.endswith(".parquet") and name[6:-8] in committed:
                tables.append(store.read_table("feedback", f"user={key}", name))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None
