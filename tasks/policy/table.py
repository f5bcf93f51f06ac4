"""The policy table: every user's p_theta(z|x) of one CLaP version, one row per user, in one Lance dataset.

A night used to write ~3 objects per changed user (artifact, manifest, pointer) and serving read per-user objects;
at 10^6 users that is millions of PUTs and a per-user I/O cost above the fit itself. Here:

- Layout: <store>/policies/<clap_version>.lance, one row per user: `user_id`, the fit `version`, `mode`,
  `latent_type`, `artifact` (the file name the legacy layout used: head / codes / policy), `params` (the head or
  code offsets flattened, float32, a fixed-size list whose length is fixed by the CLaP; null for encoder-mode
  users), `shapes` (JSON: tensor names and shapes to unflatten `params`), `blob` (encoder modes, 14-113 MB a user:
  the store path of their weights file, written beside the table under <clap_version>.blobs/), `manifest` (JSON:
  everything the legacy manifest.json held: n_pairs, fit settings, data hash, accuracy, ...), `data_hash`,
  `cold_start`, `written_at`, `night` (the run that wrote the row).
- Writing: a fan-out task *stages* its users (`stage`): one uncommitted Lance fragment with the new rows, plus the
  row addresses of those users' old rows at the version the night read. The driver `commit`s many tasks' staged
  chunks in one Lance transaction (new fragments in, old rows deleted): readers see every user of the commit or
  none. A task that dies leaves at most an unreferenced fragment file, which nothing reads (compaction's cleanup
  removes it).
- Nights: the night's last commit is tagged `night-<run_id>` (`tag`), and a serving release names that tag, so
  serving, evaluation and `generate` read a pinned version while the next night commits; switching nights is a tag
  switch. Intermediate commits (a long night checkpoints every `commit_every_s`) are untagged: a killed night
  leaves the previous tag serving, and its re-run finds the users committed before the kill unchanged.
- Lookups go through a BTREE index on `user_id` (brought up to date after every commit).
- `compact` (the `latentpref policies compact` command) merges small fragments, drops tags beyond the newest
  `keep_nights` (never the served release's) and removes versions no tag holds.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from latentpref.tasks.data.store import Store
from latentpref.tasks.data.validate import user_storage_key

if TYPE_CHECKING:
    from latentpref.tasks.policy.store import UserPolicy

log = logging.getLogger(__name__)

__all__ = ["NIGHT_TAG_PREFIX", "PolicyTable", "StagedChunk", "night_tag", "policy_table_parts"]

NIGHT_TAG_PREFIX = "night-"
TABLE_DIR = "policies"
INDEX_COLUMN = "user_id"
ROW_COLUMNS = ("user_id", "version", "mode", "latent_type", "artifact", "params", "shapes", "blob", "manifest",
               "data_hash", "cold_start", "written_at", "night")


def policy_table_parts(clap_version: str) -> tuple[str, str]:
    return (TABLE_DIR, f"{clap_version}.lance")


def night_tag(run_id: str) -> str:
    """The tag of a night's last commit (Lance tags: letters, digits, '-', '_', '.')."""
    return f"{NIGHT_TAG_PREFIX}{run_id}"


def schema(n_params: int) -> pa.Schema:
    return pa.schema([
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("version", pa.string()),
        pa.field("mode", pa.string()),
        pa.field("latent_type", pa.string()),
        pa.field("artifact", pa.string()),
        pa.field("params", pa.list_(pa.float32(), n_params)),
        pa.field("shapes", pa.string()),
        pa.field("blob", pa.string()),
        pa.field("manifest", pa.string()),
        pa.field("data_hash", pa.string()),
        pa.field("cold_start", pa.bool_()),
        pa.field("written_at", pa.float64()),
        pa.field("night", pa.string()),
    ])


@dataclass
class StagedChunk:
    """What a task hands the driver: its uncommitted fragments and the rows they replace (plain, picklable)."""

    fragments: list = field(default_factory=list)          # lance FragmentMetadata
    replaced: list[int] = field(default_factory=list)     # row addresses (fragment id << 32 | offset) at read_version
    read_version: int | None = None
    users: int = 0

    def __add__(self, other: "StagedChunk") -> "StagedChunk":
        return StagedChunk(self.fragments + other.fragments, self.replaced + other.replaced,
                           self.read_version if self.read_version is not None else other.read_version,
                           self.users + other.users)


class PolicyTable:
    """One CLaP version's policy table in a store (see the module docstring). Cheap to construct; picklable."""

    def __init__(self, store: Store, clap_version: str):
        self.store = store
        self.clap_version = clap_version
        self.parts = policy_table_parts(clap_version)
        self._pinned: dict[str | int, Any] = {}     # opened datasets at tags / versions (serving reads them often)

    def __getstate__(self):
        return {"store": self.store, "clap_version": self.clap_version}

    def __setstate__(self, state):
        self.__init__(state["store"], state["clap_version"])

    # ------------------------------------------------------------------------------------------ opening
    @property
    def uri(self) -> str:
        return self.store.lance_uri(*self.parts)

    def dataset(self, at: str | int | None = None):
        """The Lance dataset at a version number or tag (None = latest), or None when the table does not exist.

        Raises:
            KeyError: `at` names a tag or version the table does not have.
        """
        import lance
        if at is not None and at in self._pinned:      # a tag or version never changes what it holds: reuse
            return self._pinned[at]
        if not self.exists():
            return None
        try:
            ds = lance.dataset(self.uri, version=at, storage_options=self.store.lance_options())
            if at is not None:
                self._pinned[at] = ds
            return ds
        except (ValueError, OSError) as err:
            if at is None:
                raise
            raise KeyError(f"policy table {self.store.url(*self.parts)} has no version or tag {at!r} "
                           f"({type(err).__name__}: {str(err)[:200]})") from None

    def exists(self) -> bool:
        return self.store.exists(*self.parts, "_versions")

    def latest_version(self) -> int | None:
        ds = self.dataset()
        return None if ds is None else ds.version

    def tags(self) -> dict[str, int]:
        """tag -> version, oldest version first."""
        ds = self.dataset()
        if ds is None:
            return {}
        listed = ds.tags.list()
        return dict(sorted(((t, int(v["version"])) for t, v in listed.items()), key=lambda kv: kv[1]))

    # ------------------------------------------------------------------------------------------ reading
    def rows(self, user_ids: Iterable[str], at: str | int | None = None, *,
             columns: Sequence[str] | None = None, with_address: bool = False) -> pa.Table:
        """The rows of these users at `at` (a user has at most one row per version); an empty table if none."""
        ids = list(dict.fromkeys(user_ids))
        ds = self.dataset(at)
        if ds is None or not ids:
            return pa.table({"user_id": pa.array([], pa.string())})
        query = {"columns": list(columns) if columns is not None else None,
                 "filter": pc.field(INDEX_COLUMN).isin(ids), "with_row_address": with_address}
        try:
            return ds.to_table(**query)
        except (OSError, ValueError):
            if at is None or self._pinned.pop(at, None) is None:
                raise
            # a tag opened earlier was moved and its old version cleaned up (a user forgotten): reopen it
            return self.dataset(at).to_table(**query)

    def manifests(self, user_ids: Iterable[str], at: str | int | None = None) -> dict[str, dict[str, Any]]:
        """user_id -> manifest (as the legacy manifest.json: version, mode, artifact, ...), for users with a row."""
        tbl = self.rows(user_ids, at, columns=["user_id", "manifest"])
        if "manifest" not in tbl.column_names:
            return {}
        return {u: json.loads(m) for u, m in zip(tbl["user_id"].to_pylist(), tbl["manifest"].to_pylist())}

    def policies(self, user_ids: Iterable[str], at: str | int | None = None) -> dict[str, "UserPolicy"]:
        """user_id -> UserPolicy (tensors and manifest) for users with a row at `at`."""
        return self.policies_from_rows(self.rows(user_ids, at))

    def policies_from_rows(self, tbl: pa.Table) -> dict[str, "UserPolicy"]:
        """user_id -> UserPolicy of rows read from this table (all columns)."""
        from latentpref.tasks.policy.store import UserPolicy
        out = {}
        for row in tbl.to_pylist():
            manifest = json.loads(row["manifest"])
            out[row["user_id"]] = UserPolicy(manifest.get("mode", "head-only"), self._tensors(row), manifest)
        return out

    def _tensors(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        if row.get("blob"):
            return st_load(self.store.read_bytes(*row["blob"].split("/")))
        flat = torch.tensor(np.asarray(row["params"], dtype=np.float32))
        tensors, start = {}, 0
        for name, shape in json.loads(row["shapes"]):
            n = int(np.prod(shape)) if shape else 1
            tensors[name] = flat[start:start + n].reshape(shape).clone()
            start += n
        return tensors

    def history(self, user_id: str) -> list[dict[str, Any]]:
        """The user's row in every tagged version (lineage across nights): [{tag, table_version, version,
        written_at, n_pairs, cold_start}], oldest first; a tag without the user is left out."""
        out = []
        for tag, version in self.tags().items():
            m = self.manifests([user_id], version).get(user_id)
            if m is not None:
                out.append({"tag": tag, "table_version": version, "version": m["version"],
                            "written_at": m.get("written_at"), "n_pairs": m.get("n_pairs"),
                            "cold_start": bool(m.get("cold_start"))})
        return out

    def count(self, at: str | int | None = None) -> int:
        ds = self.dataset(at)
        return 0 if ds is None else ds.count_rows()

    # ------------------------------------------------------------------------------------------ writing
    def stage(self, fits: Sequence[tuple[str, str, str, dict[str, torch.Tensor], dict[str, Any]]], *,
              read_version: int | None, night: str = "", n_params: int | None = None
              ) -> tuple[StagedChunk, list[dict[str, Any]]]:
        """Write the rows of `fits` (user_id, version, artifact, tensors, info) as one uncommitted fragment and find
        the rows they replace at `read_version`. Returns (the staged chunk, the records: manifest + `status`).

        Encoder-mode tensors (not the head / code offsets) go to a weights file referenced from the row.
        `n_params`: the CLaP's head (or code-offset) size, for a table created by rows that carry none (a chunk of
        encoder-mode users); otherwise read from the rows or the table.
        """
        from lance.fragment import write_fragments

        from latentpref.tasks.policy.store import HEAD_FILE, CODES_FILE
        if not fits:
            return StagedChunk(read_version=read_version), []
        rows, records = [], []
        for user_id, version, artifact, tensors, info in fits:
            flat_names = [(k, list(v.shape)) for k, v in tensors.items()]
            now = time.time()
            blob = None
            params = None
            if artifact in (HEAD_FILE, CODES_FILE):
                params = np.concatenate([v.detach().float().reshape(-1).cpu().numpy() for v in tensors.values()])
                nbytes = int(params.nbytes)
            else:
                data = st_save({k: v.detach().float().contiguous() for k, v in tensors.items()},
                               metadata={"user_id": user_id, "version": version})
                key = user_storage_key(user_id)
                blob_parts = (TABLE_DIR, f"{self.clap_version}.blobs", key[:2], key, f"{version}-{artifact}")
                self.store.write_bytes(data, *blob_parts)
                blob, nbytes = "/".join(blob_parts), len(data)
            manifest = {"user_id": user_id, "version": version, "artifact": artifact, "artifact_bytes": nbytes,
                        "written_at": now, "night": night, **info}
            rows.append({"user_id": user_id, "version": version, "mode": manifest.get("mode", "head-only"),
                         "latent_type": manifest.get("latent_type", "gaussian"), "artifact": artifact,
                         "params": params, "shapes": json.dumps(flat_names), "blob": blob,
                         "manifest": json.dumps(manifest, default=float), "data_hash": info.get("data_hash"),
                         "cold_start": bool(info.get("cold_start")), "written_at": now, "night": night})
            records.append({**manifest, "status": "cold_start" if info.get("cold_start") else "fitted"})
        n_params = self._n_params(rows, n_params)
        table = pa.Table.from_pylist(rows, schema=schema(n_params))
        self._ensure(n_params)
        fragments = write_fragments(table, self.uri, schema=table.schema,
                                    storage_options=self.store.lance_options())
        replaced = []
        if read_version is not None:
            old = self.rows([r["user_id"] for r in rows], read_version, columns=["user_id"], with_address=True)
            if "_rowaddr" in old.column_names:
                replaced = [int(a) for a in old["_rowaddr"].to_pylist()]
        return StagedChunk(list(fragments), replaced, read_version, len(rows)), records

    def _n_params(self, rows: list[dict[str, Any]], declared: int | None = None) -> int:
        sizes = {len(r["params"]) for r in rows if r["params"] is not None}
        if declared:
            sizes.add(int(declared))
        ds = self.dataset()
        if ds is not None:
            sizes.add(ds.schema.field("params").type.list_size)
        if len(sizes) > 1:
            raise ValueError(f"policy table {self.store.url(*self.parts)}: rows of {sorted(sizes)} parameters; a "
                             "CLaP version's heads (or code offsets) all have one size")
        if not sizes:
            raise ValueError(f"policy table {self.store.url(*self.parts)}: no row carries parameters and no n_params "
                             "was given: the head size of the CLaP cannot be known")
        return sizes.pop()

    def _ensure(self, n_params: int) -> None:
        """Create the (empty) table so fragments can be written into it; two creators racing is fine."""
        import lance
        if self.exists():
            return
        try:
            lance.write_dataset(schema(n_params).empty_table(), self.uri, mode="create",
                                storage_options=self.store.lance_options())
        except (OSError, ValueError) as err:
            if not self.exists():
                raise
            log.debug("policy table created by another writer: %s", err)

    def commit(self, staged: StagedChunk, *, message: str = "") -> int | None:
        """One transaction: the staged fragments in, the rows they replace out. Returns the new version (None when
        nothing was staged). Call from one process (the night's driver) at a time."""
        import lance
        if not staged.fragments:
            return None
        ds = self.dataset()
        by_fragment: dict[int, list[int]] = {}
        for addr in staged.replaced:
            by_fragment.setdefault(addr >> 32, []).append(addr & 0xFFFFFFFF)
        removed, updated = [], []
        for frag_id, offsets in by_fragment.items():
            frag = ds.get_fragment(frag_id)
            if frag is None:
                raise RuntimeError(f"policy table {self.uri}: fragment {frag_id} of the night's read version is gone "
                                   "(compacted while the night ran?); re-run the night")
            live = frag.count_rows()
            if len(offsets) >= live:
                removed.append(frag_id)
                continue
            # full row addresses: Lance 14 matches `_rowoffset` only in fragment 0
            addresses = ",".join(str((frag_id << 32) | o) for o in sorted(offsets))
            deleted_before = frag.metadata.deletion_file.num_deleted_rows if frag.metadata.deletion_file else 0
            meta = frag.delete(f"_rowaddr IN ({addresses})")
            deleted_now = 0 if meta is None or meta.deletion_file is None else meta.deletion_file.num_deleted_rows
            if meta is None or deleted_now != deleted_before + len(offsets):
                # never commit a transaction that would keep a replaced row or drop a kept one
                raise RuntimeError(f"policy table {self.uri}: deleting {len(offsets)} replaced rows of fragment "
                                   f"{frag_id} ({live} live rows) deleted {deleted_now - deleted_before}; "
                                   "nothing committed")
            updated.append(meta)
        op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                         new_fragments=list(staged.fragments))
        new = lance.LanceDataset.commit(self.uri, op, read_version=ds.version,
                                        storage_options=self.store.lance_options(),
                                        commit_message=message or None)
        self._index(new)
        return self.latest_version()

    def _index(self, ds) -> None:
        if any(i.name == f"{INDEX_COLUMN}_idx" for i in ds.describe_indices()):
            ds.optimize.optimize_indices()
        elif ds.count_rows():
            ds.create_scalar_index(INDEX_COLUMN, index_type="BTREE")

    def write(self, fits: Sequence[tuple[str, str, str, dict[str, torch.Tensor], dict[str, Any]]], *,
              night: str = "") -> list[dict[str, Any]]:
        """Stage and commit at once (tools, tests, one-off writes); returns the records."""
        staged, records = self.stage(fits, read_version=self.latest_version(), night=night)
        self.commit(staged, message=f"write {len(records)} users")
        return records

    def tag(self, name: str, version: int | None = None) -> int:
        """Point tag `name` at `version` (default: the latest); an existing tag of that name moves."""
        ds = self.dataset()
        if ds is None:
            raise FileNotFoundError(f"policy table {self.store.url(*self.parts)} does not exist")
        version = ds.version if version is None else version
        if name in ds.tags.list():
            ds.tags.update(name, version)
        else:
            ds.tags.create(name, version)
        return version

    # ------------------------------------------------------------------------------------------ upkeep
    def fragment_count(self, at: str | int | None = None) -> int:
        ds = self.dataset(at)
        return 0 if ds is None else len(ds.get_fragments())

    def merge_fragments(self, *, target_rows_per_fragment: int = 65_536) -> dict[str, Any]:
        """Merge small fragments into fragments of up to `target_rows_per_fragment` rows (a new version holding the
        same rows; no tag or old version is touched, unlike `compact`). A lookup costs CPU per fragment and every
        night task adds one, so a night past a fragment count merges before it tags (`fan_out_fits`)."""
        ds = self.dataset()
        if ds is None:
            return {"exists": False}
        before, t0 = len(ds.get_fragments()), time.perf_counter()
        ds.optimize.compact_files(target_rows_per_fragment=target_rows_per_fragment)
        ds = self.dataset()
        self._index(ds)
        return {"exists": True, "fragments_before": before, "fragments_after": len(ds.get_fragments()),
                "version": ds.version, "seconds": time.perf_counter() - t0}

    def compact(self, *, keep_nights: int = 7, protect: Iterable[str] = ()) -> dict[str, Any]:
        """Merge small fragments, keep the newest `keep_nights` night tags (and every tag in `protect`: the served
        release's), delete the other night tags, then remove the versions no tag holds (and files nothing
        references). Returns what was done."""
        from datetime import timedelta
        if keep_nights < 1:
            raise ValueError(f"keep_nights={keep_nights}: at least the newest night must be kept")
        ds = self.dataset()
        if ds is None:
            return {"table": self.store.url(*self.parts), "exists": False}
        files_before = self._file_count()
        ds.optimize.compact_files()
        ds = self.dataset()
        self._index(ds)
        nights = [t for t in self.tags() if t.startswith(NIGHT_TAG_PREFIX)]
        keep = set(nights[-keep_nights:]) | set(protect)
        dropped = [t for t in nights if t not in keep]
        ds = self.dataset()
        for t in dropped:
            ds.tags.delete(t)
        stats = ds.cleanup_old_versions(older_than=timedelta(seconds=0), delete_unverified=True,
                                        error_if_tagged_old_versions=False)   # tagged versions are kept
        return {"table": self.store.url(*self.parts), "exists": True, "tags_dropped": dropped,
                "tags_kept": sorted(set(self.tags())), "versions_removed": int(getattr(stats, "old_versions", 0)),
                "bytes_removed": int(getattr(stats, "bytes_removed", 0)), "files_before": files_before,
                "files_after": self._file_count(), "rows": self.count()}

    def _file_count(self) -> int:
        fs, root = self.store.fs, self.store._path(*self.parts)
        return len(fs.find(root)) if fs.exists(root) else 0
