"""The policy table (tasks/policy/table.py): one row per user per CLaP, staged by tasks and committed by the driver,
a tag per night, lookups at a tag, lineage across tags, compaction, and the migration of per-user folders."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from latentpref.tasks.data.store import Store, json_bytes
from latentpref.tasks.policy.store import (HEAD_FILE, POLICY_FILE, current_fit, load_user_head, load_user_policy,
                                           migrate_legacy, needs_migration, store_user, store_users, user_folder)
from latentpref.tasks.policy.table import PolicyTable, night_tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fit(user: str, data: str, scale: float, clap: str = "c1"):
    return (user, f"{clap}-{data}", HEAD_FILE, {"weight": torch.full((2, 3), scale), "bias": torch.arange(3.0)},
            {"cold_start": scale == 0, "clap_version": clap, "mode": "head-only", "data_hash": data, "n_pairs": 5})


def _drop_time(m):
    return {k: v for k, v in m.items() if k != "written_at"}


def test_store_users_reads_back_like_store_user(tmp_path):
    batch, one = Store(str(tmp_path / "batch")), Store(str(tmp_path / "one"))
    for s in (batch, one):
        s.write_json({"version": "c1"}, "models", "clap", "current.json")
    fits = [_fit(f"u{i}", f"d{i}", float(i)) for i in range(3)]
    records = store_users(batch, fits)
    expected = [store_user(one, *fit) for fit in fits]
    assert [_drop_time(r) for r in records] == [_drop_time(r) for r in expected]
    assert [r["status"] for r in records] == ["cold_start", "fitted", "fitted"]
    for user, version, _, tensors, _ in fits:
        m = current_fit(batch, user)
        assert m["version"] == version and m["artifact"] == HEAD_FILE and m["n_pairs"] == 5
        weight, bias, manifest = load_user_head(batch, user)
        assert torch.equal(weight, tensors["weight"]) and torch.equal(bias, tensors["bias"])
    assert PolicyTable(batch, "c1").count() == 3
    assert not os.path.exists(tmp_path / "batch" / "users")       # no object per user
    with pytest.raises(ValueError, match="user_id"):
        store_users(batch, [_fit("../x", "d", 1.0)])


def test_staged_chunks_commit_together_and_tags_pin_a_night(tmp_path):
    store = Store(str(tmp_path))
    table = PolicyTable(store, "c1")
    table.write([_fit(f"u{i}", "a", 1.0) for i in range(6)], night="n1")
    table.tag(night_tag("n1"))
    read = table.latest_version()
    # two tasks of the next night: u0-u2 (all of one old fragment's rows... and more) and u4
    s1, r1 = table.stage([_fit(f"u{i}", "b", 2.0) for i in range(3)], read_version=read, night="n2")
    s2, r2 = table.stage([_fit("u4", "b", 2.0), _fit("new", "b", 2.0)], read_version=read, night="n2")
    assert len(s1.replaced) == 3 and len(s2.replaced) == 1       # "new" had no row
    assert table.latest_version() == read and table.count() == 6  # staged, not committed: invisible
    version = table.commit(s1 + s2)
    assert version > read and table.count() == 7                  # one row per user
    table.tag(night_tag("n2"))
    now = table.manifests([f"u{i}" for i in range(6)] + ["new"])
    assert {u: m["version"] for u, m in now.items()} == {
        "u0": "c1-b", "u1": "c1-b", "u2": "c1-b", "u3": "c1-a", "u4": "c1-b", "u5": "c1-a", "new": "c1-b"}
    then = table.manifests(["u0", "new"], night_tag("n1"))
    assert then == {"u0": then["u0"]} and then["u0"]["version"] == "c1-a"   # the old night, as it was
    pol = table.policies(["u0"], night_tag("n1"))["u0"]
    assert torch.equal(pol.tensors["weight"], torch.full((2, 3), 1.0))
    assert [h["version"] for h in table.history("u0")] == ["c1-a", "c1-b"]
    assert [h["tag"] for h in table.history("new")] == [night_tag("n2")]
    # a fit version that is no longer the latest is still found in the tagged night that holds it
    store.write_json({"version": "c1"}, "models", "clap", "current.json")
    assert load_user_policy(store, "u0", version="c1-a").manifest["version"] == "c1-a"
    assert load_user_policy(store, "u0", version="c1-zzz") is None
    with pytest.raises(KeyError, match="no version or tag"):
        table.dataset("night-nope")


def test_upserts_across_many_fragments_keep_one_row_per_user(tmp_path):
    """Tasks stage one fragment each, so a table has many; a night replaces rows spread over all of them (and a
    fragment partly replaced twice), and every user keeps exactly one row, the newest."""
    table = PolicyTable(Store(str(tmp_path)), "c1")
    users = [f"u{i:03d}" for i in range(40)]
    staged = None
    for i in range(0, 40, 8):                     # 5 tasks -> 5 fragments
        part, _ = table.stage([_fit(u, "a", 1.0) for u in users[i:i + 8]], read_version=None)
        staged = part if staged is None else staged + part
    table.commit(staged)
    assert len(table.dataset().get_fragments()) == 5
    for night, picked in (("b", users[3::3]), ("c", users[5::4])):
        read = table.latest_version()
        staged = None
        for i in range(0, len(picked), 4):
            part, _ = table.stage([_fit(u, night, 2.0) for u in picked[i:i + 4]], read_version=read)
            staged = part if staged is None else staged + part
        table.commit(staged)
        rows = table.rows(users, columns=["user_id", "version"]).to_pylist()
        assert sorted(r["user_id"] for r in rows) == users            # nobody lost, nobody twice
    versions = {r["user_id"]: r["version"] for r in table.rows(users, columns=["user_id", "version"]).to_pylist()}
    for u in users:
        want = "c1-c" if u in users[5::4] else "c1-b" if u in users[3::3] else "c1-a"
        assert versions[u] == want, u


def test_lookup_after_commits_uses_the_user_id_index(tmp_path):
    table = PolicyTable(Store(str(tmp_path)), "c1")
    table.write([_fit(f"u{i:03d}", "a", 1.0) for i in range(50)])
    staged, _ = table.stage([_fit(f"u{i:03d}", "b", 1.0) for i in range(0, 50, 2)], read_version=table.latest_version())
    table.commit(staged)
    ds = table.dataset()
    plan = ds.scanner(filter="user_id = 'u007'", limit=1).explain_plan()
    assert "ScalarIndexQuery" in plan, plan
    stats = ds.stats.index_stats("user_id_idx")
    assert stats["num_unindexed_rows"] == 0


def test_rows_of_another_size_are_refused(tmp_path):
    table = PolicyTable(Store(str(tmp_path)), "c1")
    table.write([_fit("u1", "a", 1.0)])
    odd = ("u2", "c1-x", HEAD_FILE, {"weight": torch.zeros(5), "bias": torch.zeros(1)}, {"clap_version": "c1"})
    with pytest.raises(ValueError, match="one size"):
        table.write([odd])
    assert table.count() == 1


def test_encoder_mode_weights_live_in_a_file_the_row_names(tmp_path):
    store = Store(str(tmp_path))
    table = PolicyTable(store, "c1")
    head = _fit("h", "a", 1.0)
    enc = ("e", "c1-trunk-frozen-a", POLICY_FILE, {"layer.w": torch.randn(4, 4), "layer.b": torch.randn(4)},
           {"clap_version": "c1", "mode": "trunk-frozen", "data_hash": "a"})
    table.write([head, enc])
    row = table.rows(["e"]).to_pylist()[0]
    assert row["params"] is None and row["blob"].startswith("policies/c1.blobs/")
    got = table.policies(["e"])["e"]
    assert got.mode == "trunk-frozen" and torch.equal(got.tensors["layer.w"], enc[3]["layer.w"])


def test_compaction_keeps_the_newest_nights_and_the_served_one(tmp_path):
    store = Store(str(tmp_path))
    table = PolicyTable(store, "c1")
    for night in range(4):
        staged, _ = table.stage([_fit(f"u{i}", f"d{night}", float(night)) for i in range(night % 2, 8, 2)],
                                read_version=table.latest_version(), night=f"n{night}")
        table.commit(staged)
        table.tag(night_tag(f"n{night}"))
    before = {u: m["version"] for u, m in table.manifests([f"u{i}" for i in range(8)]).items()}
    with pytest.raises(ValueError, match="newest"):
        table.compact(keep_nights=0)
    done = table.compact(keep_nights=1, protect=[night_tag("n0")])
    assert done["tags_dropped"] == [night_tag("n1"), night_tag("n2")]
    assert set(table.tags()) == {night_tag("n0"), night_tag("n3")}
    assert done["files_after"] < done["files_before"]
    assert {u: m["version"] for u, m in table.manifests([f"u{i}" for i in range(8)]).items()} == before
    assert table.manifests(["u0"], night_tag("n0"))["u0"]["version"] == "c1-d0"   # the protected night still reads


def _legacy_user(store: Store, user: str, version: str, scale: float, written_at: float):
    """A user's fit as the code before the policy table wrote it: users/<key[:2]>/<key>/<version>/ + pointer."""
    folder = user_folder(user)
    tensors = {"weight": torch.full((2, 3), scale), "bias": torch.zeros(3)}
    store.write_bytes(st_save(tensors), *folder, version, HEAD_FILE)
    store.write_json({"user_id": user, "version": version, "artifact": HEAD_FILE, "artifact_bytes": 64,
                      "written_at": written_at, "cold_start": False, "clap_version": version.split("-")[0],
                      "mode": "head-only", "data_hash": version.split("-")[-1], "n_pairs": 7}, *folder, version,
                     "manifest.json")
    store.write_bytes(json_bytes({"version": version}), *folder, "current.json")


def test_migration_moves_every_legacy_fit_in_and_loses_nothing(tmp_path):
    store = Store(str(tmp_path))
    _legacy_user(store, "alice", "c1-old", 1.0, 50.0)
    _legacy_user(store, "alice", "c1-new", 2.0, 60.0)      # the pointer's version is what moves
    _legacy_user(store, "bob", "c2-x", 3.0, 70.0)          # another CLaP: its own table
    legacy_files = sorted(p for p in Path(tmp_path, "users").rglob("*") if p.is_file())
    assert needs_migration(store)
    summary = migrate_legacy(store, tag="migrated-test")
    assert summary["users"] == 2 and summary["migrated"] == 2 and set(summary["tables"]) == {"c1", "c2"}
    assert not needs_migration(store)
    alice = PolicyTable(store, "c1").policies(["alice"], "migrated-test")["alice"]
    assert alice.manifest["version"] == "c1-new" and alice.manifest["n_pairs"] == 7
    assert alice.manifest["legacy_written_at"] == 60.0 and torch.equal(alice.tensors["weight"], torch.full((2, 3), 2.0))
    assert PolicyTable(store, "c2").manifests(["bob"])["bob"]["migrated_from"].endswith("/c2-x")
    assert sorted(p for p in Path(tmp_path, "users").rglob("*") if p.is_file()) == legacy_files   # nothing deleted
    assert migrate_legacy(store)["migrated"] == 0          # again: nothing to do
    assert PolicyTable(store, "c1").count() == 1


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    import services
    work = tmp_path_factory.mktemp("moto")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    s3 = services.MotoS3(env, work / "moto.log").start()
    s3.make_bucket("policies-test")
    yield s3
    s3.stop()


def test_the_table_on_s3(moto, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL_S3": moto.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    store = Store("s3://policies-test/store")
    table = PolicyTable(store, "c1")
    table.write([_fit(f"u{i}", "a", 1.0) for i in range(4)], night="n1")
    table.tag(night_tag("n1"))
    staged, _ = table.stage([_fit("u1", "b", 2.0)], read_version=table.latest_version(), night="n2")
    table.commit(staged)
    assert table.manifests(["u1"])["u1"]["version"] == "c1-b"
    assert table.manifests(["u1"], night_tag("n1"))["u1"]["version"] == "c1-a"
    assert table.count() == 4 and moto.fs().exists("policies-test/store/policies/c1.lance/_versions")


def test_merging_fragments_keeps_every_row_and_every_tag(tmp_path):
    store = Store(str(tmp_path))
    table = PolicyTable(store, "c1")
    for night in range(5):        # five nights of one small task each: one fragment per commit
        table.write([_fit(f"u{night}-{i}", f"n{night}", float(night)) for i in range(3)] +
                    ([_fit("u0-0", f"n{night}", float(night))] if night else []), night=f"n{night}")
        table.tag(night_tag(f"n{night}"))
    before = {u: m["version"] for u, m in table.manifests([f"u{n}-{i}" for n in range(5) for i in range(3)]).items()}
    tags_before = table.tags()
    assert table.fragment_count() >= 5
    merged = table.merge_fragments(target_rows_per_fragment=1024)
    assert merged["fragments_before"] >= 5 and merged["fragments_after"] == 1 == table.fragment_count()
    assert table.count() == 15                                            # the same rows, one per user
    assert {u: m["version"] for u, m in table.manifests(list(before)).items()} == before
    assert table.manifests(["u0-0"])["u0-0"]["version"] == "c1-n4"        # the upserted row is the newest
    assert all(table.tags()[t] == v for t, v in tags_before.items())     # no tag moved or dropped
    assert table.manifests(["u0-0"], night_tag("n0"))["u0-0"]["version"] == "c1-n0"   # old nights still read
    assert table.rows(["u3-1"]).num_rows == 1                             # the user_id index still answers
    assert PolicyTable(store, "none").merge_fragments() == {"exists": False}
