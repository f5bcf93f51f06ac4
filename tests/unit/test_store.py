import os
import threading

import pyarrow as pa
import pytest

from latentpref.tasks.data.locks import StoreLocked, store_lock
from latentpref.tasks.data.store import Store, json_digest, stage_done, table_digest


def test_table_digest_is_content_based():
    a = pa.table({"x": [1, 2, 3]})
    assert table_digest(a) == table_digest(pa.table({"x": [1, 2, 3]}))
    assert table_digest(a) != table_digest(pa.table({"x": [1, 2, 4]}))
    assert json_digest({"a": 1, "b": 2}) == json_digest({"b": 2, "a": 1})


def test_roundtrip_and_atomic_write_leaves_no_temp_files(tmp_path):
    store = Store(str(tmp_path / "s"))
    t = pa.table({"user_id": ["a", "b"], "v": [1.0, 2.0]})
    store.write_table(t, "data", "x", "t.parquet")
    assert store.read_table("data", "x", "t.parquet").equals(t)
    store.write_json({"k": 1}, "data", "x", "_manifest.json")
    assert stage_done(store, "data", "x") == {"k": 1}
    assert stage_done(store, "data", "y") is None
    assert not [f for f in os.listdir(tmp_path / "s" / "data" / "x") if f.startswith(".tmp")]


def test_failed_write_keeps_previous_version(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.write_bytes(b"old", "a.bin")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        store.write_bytes(b"new", "a.bin")
    assert store.read_bytes("a.bin") == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_write_many_writes_every_object_with_one_sync(tmp_path, monkeypatch):
    import latentpref.tasks.data.store as store_mod
    store = Store(str(tmp_path / "s"))
    store.write_bytes(b"old", "u", "a", "current.json")
    calls = []
    real = store_mod.sync_files
    monkeypatch.setattr(store_mod, "sync_files", lambda paths, root: (calls.append(len(paths)), real(paths, root)))
    urls = store.write_many([(b"head", ("u", "a", "v1", "head.bin")), (b'{"k": 1}', ("u", "a", "v1", "m.json")),
                             (b"new", ("u", "a", "current.json"))])
    assert calls == [3] and urls == [store.url("u", "a", "v1", "head.bin"), store.url("u", "a", "v1", "m.json"),
                                     store.url("u", "a", "current.json")]
    assert store.read_bytes("u", "a", "current.json") == b"new"
    assert store.read_json("u", "a", "v1", "m.json") == {"k": 1}
    assert sorted(os.listdir(tmp_path / "s" / "u" / "a")) == ["current.json", "v1"]     # no temp files


def test_write_many_that_fails_keeps_every_previous_version(tmp_path, monkeypatch):
    import latentpref.tasks.data.store as store_mod
    store = Store(str(tmp_path / "s"))
    store.write_bytes(b"old", "a.bin")

    def boom(paths, root):
        raise OSError("disk full")
    monkeypatch.setattr(store_mod, "sync_files", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_many([(b"new", ("a.bin",)), (b"x", ("d", "b.bin"))])
    assert store.read_bytes("a.bin") == b"old" and not store.exists("d", "b.bin")
    assert os.listdir(tmp_path / "s" / "d") == [] and sorted(os.listdir(tmp_path / "s")) == ["a.bin", "d"]


def test_sync_files_falls_back_to_fsync_without_syncfs(tmp_path, monkeypatch):
    import latentpref.tasks.data.store as store_mod
    monkeypatch.setattr(store_mod, "_libc_syncfs", lambda: None)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    Store(str(tmp_path)).write_many([(b"1", ("a",)), (b"2", ("b",))])
    assert len(synced) == 2 and (tmp_path / "b").read_bytes() == b"2"


def test_lock_refuses_a_second_holder_with_a_clear_message(tmp_path):
    store = Store(str(tmp_path))
    with store_lock(store, "nightly"):
        with pytest.raises(StoreLocked, match="locked by another 'nightly' run"):
            with store_lock(store, "nightly"):
                pass
    with store_lock(store, "nightly"):   # released afterwards
        pass


def test_lock_waits_for_release(tmp_path):
    store = Store(str(tmp_path))
    release = threading.Event()

    def holder():
        with store_lock(store, "n"):
            release.wait(5)
    t = threading.Thread(target=holder)
    t.start()
    while not store.exists("locks", "n.lock"):
        pass
    threading.Timer(0.5, release.set).start()
    with store_lock(store, "n", wait_s=10, poll_s=0.1):
        pass
    t.join()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    import socket
    store = Store(str(tmp_path))
    store.write_json({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "token": "x", "since": 0},
                     "locks", "n.lock")
    with store_lock(store, "n"):
        pass


def test_relative_local_root_is_resolved_where_the_store_is_made(tmp_path, monkeypatch):
    """Ray workers run in their own working directories: a pickled Store must still point at the caller's folder."""
    import os
    import pickle

    monkeypatch.chdir(tmp_path)
    store = Store("./latentpref-store")
    assert store.root == str(tmp_path / "latentpref-store")
    store.write_bytes(b"x", "a", "b.bin")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert pickle.loads(pickle.dumps(store)).read_bytes("a", "b.bin") == b"x"
    assert os.path.isfile(tmp_path / "latentpref-store" / "a" / "b.bin")
