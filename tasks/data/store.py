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

Remote stores (s3://, ...) retry transient errors (connection refused/reset, timeouts, HTTP 5xx, throttling)
with bounded exponential backoff; after the last attempt `StoreUnavailable` names the URL, the attempts and the
last error. Permanent errors (missing object, access denied) are raised at once. Every retried operation is
idempotent: a PUT rewrites the whole object with the same bytes, reads and listings have no side effects.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
MANIFEST = "_manifest.json"
T = TypeVar("T")

# errors that say "this request failed", not "this request is wrong": worth another attempt
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
              ValueError, TypeError, KeyError)
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}
_URL_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


class StoreUnavailable(OSError):
    """A remote store kept failing with transient errors (connection, timeout, 5xx) on every attempt."""


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import botocore.exceptions as be
        types += [be.ConnectionError, be.HTTPClientError, be.IncompleteReadError]
    except ImportError:
        pass
    try:
        import aiohttp
        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    from fsspec.exceptions import FSTimeoutError
    types.append(FSTimeoutError)
    return tuple(types)


def is_transient(err: BaseException) -> bool:
    """True for errors another attempt may cure: connection/timeouts, HTTP 5xx and throttling from S3.

    s3fs translates botocore errors into OSError subclasses and keeps the original as the cause, so the
    whole cause chain is inspected; a not-found or access-denied anywhere on top is permanent.
    """
    if isinstance(err, (StoreUnavailable, *_PERMANENT)):
        return False
    transient = _transient_types()
    seen: BaseException | None = err
    for _ in range(8):   # cause chains are short; bound the walk anyway
        if seen is None:
            break
        if isinstance(seen, transient):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            code = (response.get("Error") or {}).get("Code", "")
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES
        seen = seen.__cause__ or seen.__context__
    return False


def redact_url(url: str) -> str:
    """A URL safe for logs and error messages: credentials in the userinfo part replaced by ***."""
    return _URL_USERINFO.sub(r"\1***@", url)


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
    """A root URL plus atomic read/write helpers. Picklable, so Ray tasks can receive it.

    `retries` attempts per remote operation, waiting about backoff_s * 2**k (k = 0, 1, ...; jittered down to
    half, at most max_backoff_s) between them: with the defaults (waits of ~1, 2, 4, 8, 16 s) an object store
    may be unreachable for 15-30 s without failing a run, and a longer outage fails it in under a minute.
    """

    root: str
    retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 16.0

    def __post_init__(self) -> None:
        # a relative local root means "relative to where the command ran": resolve it now, because Ray workers
        # (Train workers, fan-out tasks) receive this object and run in their own working directories
        if "://" not in self.root or self.root.startswith("file://"):
            object.__setattr__(self, "root", os.path.abspath(self.root.removeprefix("file://")))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.root, **self._storage_options())
        return fs

    def _storage_options(self) -> dict[str, Any]:
        if not self.root.startswith(("s3://", "s3a://")):
            return {}
        # Listings are not cached: Ray workers and other runs write to the same store, and a stale listing
        # would hide their objects. botocore retries once inside; the bounded backoff above is the policy.
        # The endpoint is part of the options so that the fsspec instance cache never hands out a
        # filesystem built for another endpoint (credentials stay with botocore's env/IAM lookup).
        opts: dict[str, Any] = {"use_listings_cache": False,
                                "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                                                  "connect_timeout": 10, "read_timeout": 120}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts

    def lance_uri(self, *parts: str) -> str:
        """URI of a Lance dataset under the root (a local path, or s3://bucket/...)."""
        url = self.url(*parts)
        return url.replace("s3a://", "s3://", 1)

    def lance_options(self) -> dict[str, str] | None:
        """Lance's `storage_options` for this store: the same endpoint as `fs` (AWS_ENDPOINT_URL[_S3]); credentials
        and region from the standard AWS variables when set (else Lance's own env/IAM lookup)."""
        if not self.root.startswith(("s3://", "s3a://")):
            return None
        opts: dict[str, str] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["aws_endpoint"] = endpoint
            if endpoint.startswith("http://"):
                opts["allow_http"] = "true"
        for env, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"), ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                         ("AWS_SESSION_TOKEN", "aws_session_token")):
            if os.environ.get(env):
                opts[key] = os.environ[env]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["aws_region"] = region
        return opts

    def _retry(self, what: str, parts: tuple[str, ...], call: Callable[[], T]) -> T:
        """Run one idempotent remote operation with bounded exponential backoff on transient errors."""
        if self.is_local:
            return call()
        t0 = time.monotonic()
        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except Exception as err:
                if not is_transient(err):
                    raise
                url = redact_url(self.url(*parts))
                if attempt >= self.retries:
                    raise StoreUnavailable(
                        f"store {what} {url} failed {attempt} times over {time.monotonic() - t0:.1f}s with "
                        f"transient errors (last: {type(err).__name__}: {str(err)[:300]}); is the object store "
                        f"reachable (endpoint, network)? Re-run when it is: finished work is kept") from err
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("store %s %s: %s: %s; attempt %d/%d, retrying in %.1fs", what, url,
                            type(err).__name__, str(err)[:200], attempt, self.retries, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")   # the loop returns or raises

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
        return self._retry("exists", parts, lambda: self.fs.exists(self._path(*parts)))

    def listdir(self, *parts: str) -> list[str]:
        path = self._path(*parts)

        def ls() -> list[str]:
            fs = self.fs
            if not fs.exists(path):
                return []
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        return self._retry("list", parts, ls)

    # -- atomic writes -------------------------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> str:
        path = self._path(*parts)
        fs = self.fs
        if self.is_local:
            _replace_atomically(path, lambda fh: fh.write(data))
        else:   # one PUT: the object appears whole or not at all, so a retry can only rewrite the same bytes
            self._retry("write", parts, lambda: fs.pipe_file(path, data))
        return self.url(*parts)

    def put_file(self, local_path: str, *parts: str) -> str:
        """Copy a local file to `parts` atomically (local: temp file + rename; S3: one upload), without reading it
        into memory: for outputs that grow with the number of users."""
        path = self._path(*parts)
        if self.is_local:
            def copy(fh) -> None:
                with open(local_path, "rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 20)
            _replace_atomically(path, copy)
        else:
            self._retry("write", parts, lambda: self.fs.put_file(local_path, path))
        return self.url(*parts)

    def write_many(self, items: Sequence[tuple[bytes, Sequence[str]]]) -> list[str]:
        """Write several objects (data, path parts), each atomically as `write_bytes` does, visible in `items` order.

        Locally every object is first written to a temp file beside its target, then one flush of the filesystem
        (`sync_files`: syncfs(2) on Linux) makes all of them durable, then each is renamed into place: the same
        guarantee as `write_bytes` (a target holds its old or its whole new bytes, never part) for one sync
        instead of one fsync per file, which is what bounded a night writing 10^4 users' heads, manifests and
        pointers (3 x 10^4 fsyncs, ~2-4 ms each). On a failure no temp file is left and targets not yet renamed
        keep their old bytes. Remote stores: one whole-object PUT each, in order, with `write_bytes`' retries.
        """
        if not self.is_local:
            return [self.write_bytes(data, *parts) for data, parts in items]
        root = self._path()
        staged: list[tuple[str, str]] = []
        made: set[str] = set()
        try:
            for data, parts in items:
                path = os.path.join(root, *parts)
                folder = os.path.dirname(path)
                if folder not in made:
                    if not os.path.isdir(folder):   # a stat: far cheaper than a mkdir refused with EEXIST
                        os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            sync_files([tmp for tmp, _ in staged], root)
            for tmp, path in staged:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            raise
        return [self.url(*parts) for _, parts in items]

    def create_bytes(self, data: bytes, *parts: str) -> bool:
        """Write only if absent; False when the object already exists (locks, commit markers).

        Locally O_CREAT|O_EXCL; on S3 a conditional PUT (If-None-Match: *), which S3 and moto honour. A
        store that ignores the condition overwrites instead, so callers that need exclusivity read back.
        """
        path = self._path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        fs = self.fs
        try:
            self._retry("create", parts, lambda: fs.pipe_file(path, data, mode="create"))
        except FileExistsError:   # also the answer when a retried PUT of ours had landed: callers read back
            return False
        return True

    def read_bytes(self, *parts: str) -> bytes:
        return self._retry("read", parts, lambda: self.fs.cat_file(self._path(*parts)))

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json_bytes(obj), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(buf.getvalue(), *parts)

    def read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(*parts)))

    @contextlib.contextmanager
    def _parquet_file(self, *parts: str) -> Iterator[pq.ParquetFile]:
        """An open Parquet file of the store: locally by path, remotely through fsspec (ranged reads: only the
        footer and the column chunks asked for are fetched), closed on leaving."""
        path = self._path(*parts)
        source = path if self.is_local else self._retry("open", parts, lambda: self.fs.open(path, "rb"))
        try:
            pf = pq.ParquetFile(source)
            try:
                yield pf
            finally:
                pf.close()
        finally:
            if not self.is_local:
                source.close()

    def iter_batches(self, *parts: str, columns: Sequence[str] | None = None,
                     batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """A Parquet table of the store in record batches of at most `batch_rows` rows (`columns` only), in file
        order: for tables that grow with the number of users, read without holding them whole (memory: about one
        row group's column chunks). A transient error part-way is not retried here (the caller would see batches
        twice): the caller re-runs its reading."""
        with self._parquet_file(*parts) as pf:
            yield from pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None)

    def read_row_groups(self, *parts: str, row_groups: Sequence[int],
                        columns: Sequence[str] | None = None) -> pa.Table:
        """Only these row groups of a Parquet table of the store (one chunk of a table written row group by row
        group), with `read_bytes`' retries.

        Raises:
            ValueError: a row group the file does not have (the message names the file and its count).
        """
        def read() -> pa.Table:
            with self._parquet_file(*parts) as pf:
                n = pf.num_row_groups
                bad = [g for g in row_groups if not 0 <= g < n]
                if bad:
                    raise ValueError(f"{redact_url(self.url(*parts))} has {n} row groups; asked for {bad}")
                return pf.read_row_groups(list(row_groups), columns=list(columns) if columns else None)
        return self._retry("read", parts, read)

    def delete(self, *parts: str) -> None:
        path = self._path(*parts)

        def rm() -> None:
            fs = self.fs
            if fs.exists(path):
                try:
                    fs.rm(path, recursive=True)
                except FileNotFoundError:   # a retried delete whose first attempt had landed
                    pass
        self._retry("delete", parts, rm)

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
        src, dst = self._path(*parts).rstrip("/") + "/", local_dir.rstrip("/") + "/"
        self._retry("download", parts, lambda: self.fs.get(src, dst, recursive=True))
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


def _replace_atomically(path: str, write: Callable[[Any], Any]) -> None:
    """Write a local file through a temp file in the same folder (written, fsynced, renamed): readers see the old
    file or the whole new one, never a part."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_bytes(obj: Any) -> bytes:
    """The bytes `Store.write_json` writes for `obj` (for `Store.write_many`)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):   # not Linux / no syncfs in the C library
        return None


def sync_files(paths: Sequence[str], root: str) -> None:
    """Make the data of `paths` (files on the local filesystem holding `root`) durable: one syncfs(2) of that
    filesystem where the C library has it (Linux; it reports writeback errors since 5.8), else an fsync per file.

    Raises:
        OSError: the sync failed.
    """
    if not paths:
        return
    syncfs = _libc_syncfs()
    if syncfs is not None:
        import ctypes
        import errno
        fd = os.open(root, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
            err = ctypes.get_errno()
        finally:
            os.close(fd)
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EACCES):   # those: no syncfs here
            raise OSError(err, f"syncfs of {root}: {os.strerror(err)}")
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stage_done(store: Store, *parts: str) -> dict[str, Any] | None:
    """The manifest of a finished stage folder, or None when the stage has not completed there."""
    if store.exists(*parts, MANIFEST):
        return store.read_json(*parts, MANIFEST)
    return None
