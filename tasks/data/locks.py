"""A run lock in the store, so two nightly runs on the same store never interleave their writes.

Acquiring is one create-if-absent write of a token: locally O_CREAT|O_EXCL, on S3 a conditional PUT
(If-None-Match: *), both atomic, so of two runs starting together exactly one gets the lock. On object stores
the token is read back as well: it settles a retried PUT whose first attempt had landed, and protects against
S3-compatible stores that ignore the condition (the later writer wins there, and the earlier one sees it).
A lock left behind by a dead process on this host is taken over; one held from another host is never guessed
dead, the message says how to remove it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager

from latentpref.tasks.data.store import Store, redact_url

log = logging.getLogger(__name__)


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
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _read_holder(store: Store, parts: tuple[str, ...]) -> dict | None:
    try:
        return store.read_json(*parts)
    except (FileNotFoundError, json.JSONDecodeError):   # released meanwhile (or caught mid-write locally)
        return None


@contextmanager
def store_lock(store: Store, name: str, *, wait_s: float = 0.0, poll_s: float = 1.0):
    """Hold `locks/<name>.lock` for the duration of the block.

    Raises:
        StoreLocked: the lock is held by a live run and did not come free within `wait_s` seconds.
    """
    token = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex, "since": time.time()}
    parts = ("locks", f"{name}.lock")
    deadline = time.monotonic() + wait_s
    unreadable = 0
    while True:
        if _try_acquire(store, parts, token):
            break
        holder = _read_holder(store, parts)
        if holder is None and unreadable < 10:   # released between our attempt and the read: try again
            unreadable += 1
            time.sleep(0.05)
            continue
        holder = holder or {"pid": "?", "host": "? (unreadable lock file)"}
        if _holder_is_dead(holder):
            # re-read just before deleting, so a lock another run has just taken over is left alone
            again = _read_holder(store, parts)
            if again is not None and again.get("token") == holder.get("token"):
                log.warning("taking over the '%s' lock of dead process %s on %s", name, holder.get("pid"),
                            holder.get("host"))
                store.delete(*parts)
            continue
        if time.monotonic() >= deadline:
            since = time.ctime(holder["since"]) if holder.get("since") else "?"
            raise StoreLocked(
                f"store {redact_url(store.url())} is locked by another '{name}' run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {since}); wait for it to finish, "
                f"or delete {redact_url(store.url(*parts))} if that run is gone")
        time.sleep(poll_s)
    try:
        yield token
    finally:
        try:
            holder = _read_holder(store, parts)
            if holder is not None and holder.get("token") == token["token"]:
                store.delete(*parts)
        except Exception:   # e.g. the store is unreachable: the work is done, a stale lock is recoverable
            log.exception("could not release the '%s' lock %s; the next run on this host takes it over, "
                          "elsewhere delete it by hand", name, redact_url(store.url(*parts)))


def _try_acquire(store: Store, parts: tuple[str, ...], token: dict) -> bool:
    blob = json.dumps(token).encode()
    created = store.create_bytes(blob, *parts)
    if store.is_local:
        return created
    if created:
        time.sleep(0.2)   # a store that ignored the condition: let a racing PUT land, then see who won
    holder = _read_holder(store, parts)
    return holder is not None and holder.get("token") == token["token"]
