"""Forgetting a user (tasks/policy/forget.py): afterwards no file of the store holds their id or a text only they
contributed, in any kept version of any table; other users and the served night are intact; a tombstone keeps
them out of the next nights."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import serve_store  # noqa: E402

from latentpref.tasks.data import validate  # noqa: E402
from latentpref.tasks.data.ingest import committed_rows_for, store_feedback  # noqa: E402
from latentpref.tasks.data.store import Store  # noqa: E402
from latentpref.tasks.evaluate.serve_core import current_release, release_fit  # noqa: E402
from latentpref.tasks.policy.cache import build_latent_cache  # noqa: E402
from latentpref.tasks.policy.forget import drop_forgotten, forget_user, is_forgotten  # noqa: E402
from latentpref.tasks.policy.table import PolicyTable, night_tag  # noqa: E402
from latentpref.tasks.policy.text_cache import TextLatentTable  # noqa: E402

GONE = "forget-me-7f3a"
KEPT = "keep-me-2b9c"
SECRET = " a secret only forget-me wrote ."


def _bytes_left(root: Path, needles: list[str]) -> int:
    hits = 0
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += sum(data.count(n.encode()) for n in needles)
    return hits


def test_forget_leaves_no_trace_and_keeps_everyone_else(tmp_path):
    store = Store(str(tmp_path))
    users = [GONE, KEPT, "someone-else"]
    serve_store.night(store, "clapv1", users, seed=1)
    # a second night: the table has two tags holding the user
    clap, tok = serve_store.write_clap(store, "clapv1", seed=1)
    table = PolicyTable(store, "clapv1")
    table.tag(night_tag("older"))
    rows = [{"user_id": GONE, "prompt": "The movie was", "chosen": SECRET, "rejected": " plain ."},
            *serve_store.pair_rows(KEPT, 2, offset=9)]
    req = pa.Table.from_pylist(rows)
    good, bad = validate.validate_feedback(req)
    store_feedback(store, good, validate.QUARANTINE_SCHEMA.empty_table(), source="t", rows_read=3)
    from latentpref.tasks.models.registry import load_tokenizer
    tokenizer = load_tokenizer(store.local_copy(*serve_store.BASE))
    texts = TextLatentTable(store, "clapv1")
    cache = build_latent_cache(clap.eval(), tokenizer, [r["prompt"] for r in rows],
                               [(r["prompt"], r[c]) for r in rows for c in ("chosen", "rejected")],
                               prompt_tokens=8, response_tokens=8)
    texts.commit(texts.write_fragments(cache))
    run = tmp_path / "runs" / "night-1"
    run.mkdir(parents=True)
    (run / "nightly.log").write_text(f"fitted {GONE} ok\nfitted {KEPT} ok\nfitted {GONE}2 ok\nsummary line\n")
    (run / "report.html").write_text(f"<td>{GONE}</td>\n<td>{KEPT}</td>\n<p>{SECRET}</p>\n")
    store.write_table(pa.table({"user_id": users, "score": [1.0, 2.0, 3.0]}), "runs", "night-1", "per_user.parquet")
    assert _bytes_left(tmp_path, [GONE]) > 0

    pinned = PolicyTable(store, "clapv1")
    assert GONE in pinned.manifests(users, current_release(store).policy_tag)   # opened at the served tag
    report = forget_user(store, GONE)
    assert is_forgotten(store, GONE) and not is_forgotten(store, KEPT)
    assert report["policies"]["rows"] >= 1 and report["feedback"]["files_deleted"] == 1
    assert report["runs"]["rows_removed"] == 1 and report["text_files"]["lines_removed"] >= 2
    assert _bytes_left(tmp_path, [SECRET.strip()]) == 0, "the user's own text is still in the store"
    # the id nowhere but inside the other id "<GONE>2" (one log line, kept)
    assert _bytes_left(tmp_path, [GONE]) == _bytes_left(tmp_path, [GONE + "2"]) == 1, "the user's id is still there"
    # everyone else intact, the served night still serves them
    release = current_release(store)
    assert release_fit(store, KEPT, release)[0] is not None
    # a reader that opened the served tag before the forget (a server) reads the moved tag, not deleted files
    assert set(pinned.manifests(users, release.policy_tag)) == {KEPT, "someone-else"}
    assert release_fit(store, GONE, release)[0] is None
    assert set(table.manifests(users)) == {KEPT, "someone-else"}
    assert night_tag("older") not in table.tags()          # an old night holding them yields to the deletion
    assert committed_rows_for(store, [KEPT]).num_rows == 2 and committed_rows_for(store, [GONE]) is None
    # the id as a whole token: a user whose id only starts with theirs keeps their line
    assert (run / "nightly.log").read_text() == f"fitted {KEPT} ok\nfitted {GONE}2 ok\nsummary line\n"
    kept_texts = texts.load(["The movie 9 was"], [("The movie 9 was", " wonderful and warm 9 .")])
    assert kept_texts.mu.shape[0] == 1
    # the next nights skip them
    assert drop_forgotten(store, pa.table({"user_id": users}))["user_id"].to_pylist() == [KEPT, "someone-else"]
    again = forget_user(store, GONE)
    assert again["policies"]["rows"] == 0 and again["feedback"]["files_deleted"] == 0
    assert json.loads((tmp_path / "forgotten" / f"{report['tombstone']}.json").read_text())["user_key"] == \
        report["tombstone"]
    assert not any(GONE in p.name for p in tmp_path.rglob("*"))
