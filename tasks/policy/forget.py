"""Forgetting a user: every trace of them removed from a store, and a tombstone so nothing brings them back.

`forget_user(store, user_id)` (the `latentpref forget` command and `DELETE /v1/users/{id}`), under the store's
night lock, in this order:
1. a tombstone `forgotten/<sha256(id)>.json` (the hash and the time, never the id): nights, online refits and
   servers skip a tombstoned user from then on, so a re-run of an old night does not bring them back;
2. their feedback files (feedback/user=<key>/), and their rows in quarantine files and in the prepared tables
   (simulated pairs and users under data/), rewritten without them;
3. their rows in every policy table: deleted, the data files that held them rewritten, then every version that
   still holds them removed (retention of old nights yields to a deletion: a night tag on such a version is moved
   to the rewritten version if it is the served one, dropped otherwise); encoder-mode weights files deleted;
4. the cached latents of texts only they contributed (the content-keyed latent tables), the same way;
5. their rows in every run's Parquet tables (records, evaluation, per-user tables) and every line naming them or
   their own texts in the run folders' text files (logs, JSON, HTML reports) and in MLflow's artifact folder;
   their MLflow runs (tag user_id) deleted.
Returns what was removed (counts, bytes), which the caller may log: it names no id and no text.
"""
from __future__ import annotations

import hashlib
import io
import re
import logging
import time
from typing import Any, Collection, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentpref.tasks.data.store import Store
from latentpref.tasks.data.validate import check_user_id, user_storage_key

log = logging.getLogger(__name__)

TOMBSTONES = ("forgotten",)
TEXT_SUFFIXES = (".json", ".log", ".html", ".txt", ".csv", ".md", ".yaml", ".jsonl")
SCRUBBED_FOLDERS = ("runs", "mlflow", "serving", "feedback/_batches")


def tombstone_key(user_id: str) -> str:
    return hashlib.sha256(("latentpref-forgotten\x00" + user_id).encode("utf-8")).hexdigest()


def is_forgotten(store: Store, user_id: str) -> bool:
    return store.exists(*TOMBSTONES, f"{tombstone_key(user_id)}.json")


def forgotten_keys(store: Store) -> set[str]:
    """Tombstone keys of every forgotten user (compare with `tombstone_key`)."""
    return {n.removesuffix(".json") for n in store.listdir(*TOMBSTONES) if n.endswith(".json")}


def drop_forgotten(store: Store, table: pa.Table, column: str = "user_id", *,
                   keys: Collection[str] | None = None) -> pa.Table:
    """`table` without the rows of forgotten users. `keys`: the tombstone keys (`forgotten_keys`) where the caller
    listed them once for many tables (a night reading its pairs batch by batch); default: listed now."""
    keys = forgotten_keys(store) if keys is None else keys
    if not keys or not table.num_rows:
        return table
    # one hash per distinct user, not per row
    gone = [u for u in pc.unique(table[column]).to_pylist() if u is not None and tombstone_key(u) in keys]
    if not gone:
        return table
    return table.filter(pc.invert(pc.fill_null(pc.is_in(table[column], value_set=pa.array(gone, table[column].type)),
                                               False)))


PENDING = (*TOMBSTONES, "_pending")     # ids whose purge waits for the night's lock (removed once purged)


def mark_forgotten(store: Store, user_id: str, *, pending: bool = False) -> dict[str, Any]:
    """Write the tombstone (serving and nights stop using the user at once). `pending`: also queue the id for a
    purge that could not run now (a night holds the store): `purge_pending` runs it when the night ends."""
    check_user_id(user_id)
    key = tombstone_key(user_id)
    if store.exists(*TOMBSTONES, f"{key}.json"):
        stone = store.read_json(*TOMBSTONES, f"{key}.json")
    else:
        stone = {"user_key": key, "forgotten_at": time.time()}
        store.write_json(stone, *TOMBSTONES, f"{key}.json")
    if pending:
        store.write_json({"user_id": user_id, "queued_at": time.time()}, *PENDING, f"{key}.json")
    return stone


def purge_pending(store: Store, tracking_uri: str | None = None) -> int:
    """Run the purges queued by `mark_forgotten(pending=True)` (call with the night lock held). Returns how many."""
    done = 0
    for name in store.listdir(*PENDING):
        if name.endswith(".json"):
            user_id = store.read_json(*PENDING, name)["user_id"]
            forget_user(store, user_id)
            if tracking_uri:
                forget_in_mlflow(tracking_uri, user_id)
            store.delete(*PENDING, name)
            done += 1
    return done


def forget_user(store: Store, user_id: str) -> dict[str, Any]:
    """Remove `user_id` from `store` (see the module docstring). Idempotent: forgetting twice finds nothing more.
    Call with the store's night lock held.

    Raises:
        InvalidUserId: a malformed id.
    """
    t0 = time.time()
    stone = mark_forgotten(store, user_id)                                  # first: nothing re-admits them
    report: dict[str, Any] = {"tombstone": stone["user_key"]}
    texts = _own_texts(store, user_id)
    report["feedback"] = _forget_feedback(store, user_id)
    report["legacy_files"] = _forget_legacy_folder(store, user_id)
    report["data"] = _rewrite_parquet_under(store, ("data",), user_id)
    report["policies"] = _forget_policies(store, user_id)
    report["latents"] = _forget_texts(store, texts)
    report["runs"] = _rewrite_parquet_under(store, ("runs",), user_id)
    report["mlflow_artifacts"] = _rewrite_parquet_under(store, ("mlflow",), user_id)
    report["text_files"] = _scrub_text_files(store, user_id, sorted(texts["own"]))
    if store.exists(*PENDING, f"{stone['user_key']}.json"):
        store.delete(*PENDING, f"{stone['user_key']}.json")
    report["seconds"] = round(time.time() - t0, 3)
    return report


# -------------------------------------------------------------------------------------------------- pieces
def _pairs_files(store: Store) -> list[tuple[str, ...]]:
    return [p for p in _files_under(store, ("data",)) if p[-1] == "pairs.parquet"]


def _own_texts(store: Store, user_id: str) -> dict[str, set]:
    """The user's texts (prompts and responses of their pairs) and which of them no other user has ("own")."""
    from latentpref.tasks.data.ingest import read_feedback_store
    tables = [store.read_table(*p) for p in _pairs_files(store)]
    fed = read_feedback_store(store)
    if fed is not None:
        tables.append(fed)
    mine, others = set(), set()
    for t in tables:
        if not {"user_id", "prompt", "chosen", "rejected"} <= set(t.column_names):
            continue
        is_me = pc.equal(t["user_id"], user_id)
        for part, bucket in ((t.filter(is_me), mine), (t.filter(pc.invert(is_me)), others)):
            for c in ("prompt", "chosen", "rejected"):
                bucket.update(part[c].to_pylist())
            prompts = part["prompt"].to_pylist()
            for c in ("chosen", "rejected"):
                bucket.update(("pr", p, r) for p, r in zip(prompts, part[c].to_pylist()))
            bucket.update(("prc", p, c, r) for p, c, r in zip(prompts, part["chosen"].to_pylist(),
                                                               part["rejected"].to_pylist()))
    own = {t for t in mine - others if isinstance(t, str) and t.strip()}
    return {"own": own, "keys": {t for t in mine - others if isinstance(t, tuple)} |
            {("p", t) for t in own}}


def _forget_legacy_folder(store: Store, user_id: str) -> int:
    """The per-user folder of a store from before the policy table (kept by the migration): deleted."""
    from latentpref.tasks.policy.store import user_folder
    files = _files_under(store, user_folder(user_id))
    for path in files:
        store.delete(*path)
    return len(files)


def _forget_feedback(store: Store, user_id: str) -> dict[str, int]:
    folder = ("feedback", f"user={user_storage_key(user_id)}")
    names = store.listdir(*folder)
    for name in names:
        store.delete(*folder, name)
    quarantined = _rewrite_parquet_under(store, ("feedback", "_quarantine"), user_id)
    return {"files_deleted": len(names), **{f"quarantine_{k}": v for k, v in quarantined.items()}}


def _files_under(store: Store, parts: tuple[str, ...]) -> list[tuple[str, ...]]:
    fs, root = store.fs, store._path(*parts)
    if not fs.exists(root):
        return []
    base = store._path()
    return [tuple(p[len(base):].strip("/").split("/")) for p in sorted(fs.find(root))]


def _rewrite_parquet_under(store: Store, parts: tuple[str, ...], user_id: str) -> dict[str, int]:
    """Rewrite every Parquet file under `parts` that has rows of the user (a `user_id` column), without them."""
    files = rows = 0
    for path in _files_under(store, parts):
        if path[-1] != "_manifest.json" and path[-1].endswith(".parquet") and ".lance" not in "/".join(path):
            try:
                table = pq.read_table(io.BytesIO(store.read_bytes(*path)))
            except Exception:       # not a table we can read: the text scrub still sees its bytes
                continue
            kept = table
            if "user_id" in table.column_names:
                kept = table.filter(pc.invert(pc.fill_null(pc.equal(table["user_id"], user_id), False)))
            kept, mentions = _null_mentions(kept, user_id)
            if kept.num_rows != table.num_rows or mentions:
                store.write_table(kept, *path)
                files += 1
                rows += table.num_rows - kept.num_rows
    return {"files_rewritten": files, "rows_removed": rows}


def _null_mentions(table: pa.Table, user_id: str) -> tuple[pa.Table, int]:
    """Null every string cell of other rows that names the user (e.g. another user's `swap_partner`)."""
    mentions = 0
    for i, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        # the id as a whole token (ids are [A-Za-z0-9._@-]): forgetting "u1" leaves "u12" alone
        pattern = f"(^|[^A-Za-z0-9._@-]){re.escape(user_id)}($|[^A-Za-z0-9._@-])"
        hit = pc.fill_null(pc.match_substring_regex(table.column(i), pattern), False)
        n = pc.sum(hit).as_py() or 0
        if n:
            mentions += n
            table = table.set_column(i, field, pc.if_else(hit, pa.scalar(None, field.type), table.column(i)))
    return table, mentions


def _lance_tables(store: Store, folder: tuple[str, ...]) -> list[tuple[str, ...]]:
    found = []
    for path in _files_under(store, folder):
        for i, part in enumerate(path):
            if part.endswith(".lance") and path[i + 1:i + 2] == ("_versions",):
                found.append(path[:i + 1])
    return sorted(set(found))


def _purge(ds, predicate: str, *, served_tags: set[str], options: dict | None,
           index_column: str | None = None) -> dict[str, Any]:
    """Delete rows matching `predicate` from a Lance dataset so no kept version holds them: delete, rewrite the
    data files with deletions, move served tags to that version and drop the other tags of versions that still
    held them, then remove every unreferenced version and file."""
    from datetime import timedelta
    holding = []
    for tag, info in ds.tags.list().items():
        version = int(info["version"])
        import lance
        old = lance.dataset(ds.uri, version=version, storage_options=options)
        if old.count_rows(filter=predicate):
            holding.append(tag)
    before = ds.count_rows(filter=predicate)
    if before:
        ds.delete(predicate)
    ds.optimize.compact_files(materialize_deletions=True, materialize_deletions_threshold=0.0)
    import lance
    ds = lance.dataset(ds.uri, storage_options=options)
    if index_column is not None and ds.count_rows():
        # the index's own files hold the keys it was built on: rebuild it from the rows that are left
        ds.create_scalar_index(index_column, index_type="BTREE", replace=True)
        ds = lance.dataset(ds.uri, storage_options=options)
    new_version = ds.version
    moved, dropped = [], []
    for tag in holding:
        if tag in served_tags:
            ds.tags.update(tag, new_version)
            moved.append(tag)
        else:
            ds.tags.delete(tag)
            dropped.append(tag)
    ds = lance.dataset(ds.uri, storage_options=options)
    ds.cleanup_old_versions(older_than=timedelta(seconds=0), delete_unverified=True,
                            error_if_tagged_old_versions=False)
    return {"rows": before, "tags_moved": moved, "tags_dropped": dropped}


def _served_tags(store: Store) -> set[str]:
    from latentpref.tasks.evaluate.serve_core import current_release
    try:
        tag = current_release(store).policy_tag
    except FileNotFoundError:
        return set()
    return {tag} if tag else set()


def _forget_policies(store: Store, user_id: str) -> dict[str, Any]:
    import lance
    out = {"tables": 0, "rows": 0, "blobs_deleted": 0, "tags_dropped": 0, "tags_moved": 0}
    served = _served_tags(store)
    key = user_storage_key(user_id)
    for parts in _lance_tables(store, ("policies",)):
        ds = lance.dataset(store.lance_uri(*parts), storage_options=store.lance_options())
        quoted = user_id.replace("'", "''")
        done = _purge(ds, f"user_id = '{quoted}'", served_tags=served, options=store.lance_options(),
                      index_column="user_id")
        out["tables"] += 1
        out["rows"] += done["rows"]
        out["tags_dropped"] += len(done["tags_dropped"])
        out["tags_moved"] += len(done["tags_moved"])
        blobs = (*parts[:-1], parts[-1].removesuffix(".lance") + ".blobs", key[:2], key)
        for name in store.listdir(*blobs):
            store.delete(*blobs, name)
            out["blobs_deleted"] += 1
    return out


def _forget_texts(store: Store, texts: dict[str, set]) -> dict[str, Any]:
    """Rows of the content-keyed latent tables whose text only the user contributed."""
    import lance

    from latentpref.tasks.policy.cache import text_key
    keys = set()
    for item in texts["keys"]:
        kind, *parts = item
        keys.add(text_key(*parts))
    out = {"tables": 0, "rows": 0}
    if not keys:
        return out
    served: set[str] = set()
    for parts in _lance_tables(store, ("cache",)):
        ds = lance.dataset(store.lance_uri(*parts), storage_options=store.lance_options())
        listed = ", ".join(f"'{k}'" for k in sorted(keys))
        done = _purge(ds, f"key IN ({listed})", served_tags=served, options=store.lance_options(),
                      index_column="key")
        out["tables"] += 1
        out["rows"] += done["rows"]
    return out


def _scrub_text_files(store: Store, user_id: str, texts: Iterable[str]) -> dict[str, int]:
    """Drop every line naming the user (the id as a whole token, as in the Parquet files: forgetting "u1" keeps the
    lines of "u12") or holding one of their own texts, from the text files of run folders, MLflow's artifacts and
    serving manifests."""
    alternatives = [f"(?:^|[^A-Za-z0-9._@-]){re.escape(user_id)}(?:$|[^A-Za-z0-9._@-])"]
    alternatives += [re.escape(t) for t in texts if t and len(t) >= 3]
    pattern = re.compile("|".join(alternatives), re.MULTILINE)
    files = lines = 0
    for folder in SCRUBBED_FOLDERS:
        for path in _files_under(store, tuple(folder.split("/"))):
            if not path[-1].endswith(TEXT_SUFFIXES):
                continue
            try:
                text = store.read_bytes(*path).decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not pattern.search(text):
                continue
            kept, dropped = [], 0
            for line in text.splitlines(keepends=True):
                if pattern.search(line):
                    dropped += 1
                else:
                    kept.append(line)
            store.write_bytes("".join(kept).encode("utf-8"), *path)
            files += 1
            lines += dropped
    return {"files_rewritten": files, "lines_removed": lines}


def forget_in_mlflow(tracking_uri: str, user_id: str) -> dict[str, int]:
    """Delete the MLflow runs tagged with the user (per-user evaluation runs) for good: deleted, garbage-collected
    (`mlflow gc`: rows and artifacts), and for a local sqlite backend the file vacuumed so no freed page keeps their
    id. A tracking server collects its deleted runs with its own `mlflow gc`."""
    import subprocess
    import sys

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if "'" in user_id or "\\" in user_id:
        return {"runs_deleted": 0}
    from mlflow.entities import ViewType
    ids = []
    for exp in client.search_experiments(view_type=ViewType.ALL):
        # deleted runs too: a purge interrupted after delete_run finishes on the next try
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.user_id = '{user_id}'",
                                      run_view_type=ViewType.ALL, max_results=10_000):
            if run.info.lifecycle_stage != "deleted":
                client.delete_run(run.info.run_id)
            ids.append(run.info.run_id)
    vacuumed = 0
    if tracking_uri.startswith("sqlite:///"):
        if ids:
            done = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", tracking_uri,
                                   "--tracking-uri", tracking_uri, "--run-ids", ",".join(ids)],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"mlflow gc of the user's {len(ids)} runs failed: "
                                   f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        import sqlite3
        with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as db:
            db.execute("VACUUM")
        vacuumed = 1
    return {"runs_deleted": len(ids), "sqlite_vacuumed": vacuumed}
