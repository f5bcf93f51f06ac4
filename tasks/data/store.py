"""The store: one root (local folder or s3://) holding every artifact, written atomically.

Layout (all paths relative to the root):
    data/<stage>/<digest>/<name>.parquet + _manifest.json   versioned stage outputs
    feedback/user=<key>/...                                   ingested feedback, partitioned by user key
    models/<kind>/<version>/...                               base LM, CLaP versions
    users/<key[:2]>/<key>/...                                 per-user artifacts
    runs/<run_id>/...                                         per-night reports
Atomic writes: locally temp file + rename (POSIX rename is atomic on one filesystem); on S3 a single PUT of
the whole object (S3 never shows a partially written object). A folder is "done" when its manifest exists;
manifests are written last, so a reader never trusts a half-written folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"


def table_digest(table: pa.Table) -> str:
    """Content digest of a table: sha256 of its Arrow IPC stream (schema + data), first 16 hex chars."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def json_digest(obj: Any) -> str:
    """Digest of a JSON-able object (configs, lists of input digests), key-order independent."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Store:
    """A root URL plus atomic read/write helpers. Picklable, so Ray tasks can receive it."""

    root: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.root)
        return fs

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def url(self, *parts: str) -> str:
        """Full URL of a path under the root (what MLflow and users see)."""
        root = self.root.rstrip("/")
        if self.is_local:
            root = os.path.abspath(root.removeprefix("file://"))
        return posixpath.join(root, *parts) if parts else root

    def _path(self, *parts: str) -> str:
        _, path = fsspec.core.url_to_fs(self.url(*parts))
        return path

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        path = self._path(*parts)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    # -- atomic writes -------------------------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> str:
        path = self._path(*parts)
        fs = self.fs
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
        return self.url(*parts)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self._path(*parts))

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(buf.getvalue(), *parts)

    def read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(*parts)))

    def delete(self, *parts: str) -> None:
        path = self._path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- local staging for libraries that want a folder (save_pretrained, Ray checkpoints) -----------
    def upload_folder(self, local_dir: str, *parts: str) -> str:
        """Copy a local folder under the root file by file (each file atomically), manifest last."""
        names = []
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                if rel == MANIFEST:
                    continue
                with open(full, "rb") as fh:
                    self.write_bytes(fh.read(), *parts, rel)
                names.append(rel)
        manifest_path = os.path.join(local_dir, MANIFEST)
        if os.path.exists(manifest_path):
            with open(manifest_path, "rb") as fh:
                self.write_bytes(fh.read(), *parts, MANIFEST)
        return self.url(*parts)

    def download_folder(self, local_dir: str, *parts: str) -> str:
        if self.is_local:
            return self._path(*parts)
        self.fs.get(self._path(*parts).rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
        return local_dir

    def local_copy(self, *parts: str) -> str:
        """A local folder holding this store folder (itself when the store is local)."""
        if self.is_local:
            return self._path(*parts)
        target = os.path.join(tempfile.gettempdir(), "latentpref-cache", json_digest([self.root, parts]))
        if not os.path.exists(os.path.join(target, MANIFEST)):
            tmp = target + f".{uuid.uuid4().hex[:8]}"
            self.download_folder(tmp, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                import shutil
                shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        return target


def stage_done(store: Store, *parts: str) -> dict[str, Any] | None:
    """The manifest of a finished stage folder, or None when the stage has not completed there."""
    if store.exists(*parts, MANIFEST):
        return store.read_json(*parts, MANIFEST)
    return None
