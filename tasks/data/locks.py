"""A run lock in the store, so two nightly runs on the same store never interleave their writes.

Local stores use an exclusively created lock file (O_CREAT|O_EXCL is atomic on POSIX). Object stores use
create-if-absent followed by a read-back of our own token: S3 has no rename, and the read-back catches a
concurrent writer that won the race. A lock left behind by a dead process on this host is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager

from latentpref.tasks.data.store import Store


class StoreLocked(RuntimeError):
    """Another run holds the lock on this store."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_is_dead(info: dict) -> bool:
    return info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))


@contextmanager
def store_lock(store: Store, name: str, *, wait_s: float = 0.0, poll_s: float = 1.0):
    """Hold `locks/<name>.lock` for the duration of the block.

    Raises:
        StoreLocked: the lock is held by a live run and did not come free within `wait_s` seconds.
    """
    token = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex, "since": time.time()}
    parts = ("locks", f"{name}.lock")
    deadline = time.monotonic() + wait_s
    while True:
        if _try_acquire(store, parts, token):
            break
        try:
            holder = store.read_json(*parts)
        except Exception:   # vanished between our attempt and the read: try again
            holder = {}
        if holder and _holder_is_dead(holder):
            store.delete(*parts)
            continue
        if time.monotonic() >= deadline:
            raise StoreLocked(
                f"store {store.url()} is locked by another '{name}' run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {time.ctime(holder.get('since', 0))}); wait for it to finish, "
                f"or delete {store.url(*parts)} if that run is gone")
        time.sleep(poll_s)
    try:
        yield token
    finally:
        try:
            if store.read_json(*parts).get("token") == token["token"]:
                store.delete(*parts)
        except FileNotFoundError:
            pass


def _try_acquire(store: Store, parts: tuple[str, ...], token: dict) -> bool:
    blob = json.dumps(token).encode()
    if store.is_local:
        path = store.url(*parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        return True
    if store.exists(*parts):
        return False
    store.write_bytes(blob, *parts)
    time.sleep(0.2)  # let a racing writer's PUT land, then check who won
    return store.read_json(*parts).get("token") == token["token"]
