"""store_users: a chunk of users' fits written together (one sync per batch) reads back exactly as store_user's."""
import os

import torch

from latentpref.tasks.data.store import Store
from latentpref.tasks.policy.store import (HEAD_FILE, current_fit, load_user_head, store_user, store_users,
                                           user_folder)


def _fit(user: str, version: str, scale: float):
    return (user, version, HEAD_FILE, {"weight": torch.full((2, 3), scale), "bias": torch.zeros(3)},
            {"cold_start": scale == 0, "clap_version": "c1", "mode": "head-only"})


def test_store_users_matches_store_user_and_flips_pointers_last(tmp_path, monkeypatch):
    batch, one = Store(str(tmp_path / "batch")), Store(str(tmp_path / "one"))
    fits = [_fit("alice", "c1-a", 1.0), _fit("bob", "c1-b", 2.0), _fit("carol", "c1-c", 0.0)]
    writes = []
    real = Store.write_many
    monkeypatch.setattr(Store, "write_many", lambda self, items: (writes.append([p[-1] for _, p in items]),
                                                                  real(self, items))[1])
    records = store_users(batch, fits)
    assert writes == [[HEAD_FILE, "manifest.json"] * 3, ["current.json"] * 3]   # every pointer after every file
    expected = [store_user(one, *fit) for fit in fits]
    drop = lambda r: {k: v for k, v in r.items() if k != "written_at"}   # noqa: E731
    assert [drop(r) for r in records] == [drop(r) for r in expected]
    assert [r["status"] for r in records] == ["fitted", "fitted", "cold_start"]
    for (user, version, *_), record in zip(fits, records):
        assert drop(current_fit(batch, user)) == drop(current_fit(one, user)) and current_fit(batch, user) == {
            k: v for k, v in record.items() if k != "status"}
        w, b, _ = load_user_head(batch, user)
        assert torch.equal(w, load_user_head(one, user)[0]) and torch.equal(b, torch.zeros(3))
        assert not [f for f in os.listdir(os.path.join(batch.root, *user_folder(user))) if f.startswith(".tmp")]
