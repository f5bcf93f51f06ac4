"""S3 unavailable for a while: the store retries with bounded exponential backoff, then succeeds or fails
cleanly (StoreUnavailable naming the URL), and never leaves a partial object.

The S3 here is moto's server run in this process (ThreadedMotoServer): stopping it closes its port, so every
request is refused exactly as during a real outage, and restarting it on the same port keeps its buckets
(its state lives in this process). A `moto_server` subprocess would come back empty, which would test moto's
amnesia rather than our retries.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
import uuid

import pyarrow as pa
import pytest

import services
from latentpref.tasks.data.ingest import ingest_feedback, read_feedback_store
from latentpref.tasks.data.store import Store, StoreUnavailable



class FlakyS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = services.free_port()
        self.bucket = f"lp-outage-{uuid.uuid4().hex[:8]}"
        self._server_cls = ThreadedMotoServer
        self.server = None
        self.downs = 0

    def up(self) -> None:
        self.server = self._server_cls(ip_address=services.HOST, port=self.port, verbose=False)
        self.server.start()
        services.wait_for(lambda: services.port_open(self.port), timeout_s=10, what="moto (in-process)")

    def down(self) -> None:
        self.server.stop()
        self.server = None
        self.downs += 1

    def down_for(self, seconds: float) -> threading.Timer:
        """Stop now, start again on the same port after `seconds`."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.start()
        return timer


@pytest.fixture
def s3(monkeypatch):
    flaky = FlakyS3()
    flaky.up()
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{services.HOST}:{flaky.port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    Store(f"s3://{flaky.bucket}").fs.mkdir(flaky.bucket)
    yield flaky
    if flaky.server is None:
        flaky.up()
    # moto keeps its state in this process: drop it with the server
    urllib.request.urlopen(urllib.request.Request(f"http://{services.HOST}:{flaky.port}/moto-api/reset",
                                                  method="POST"), timeout=10)
    flaky.down()


def _keys(store: Store) -> list[str]:
    root = store.root.removeprefix("s3://")
    return sorted(k.removeprefix(root + "/") for k in store.fs.find(root))


def _retries_logged(caplog) -> int:
    return sum("retrying in" in r.getMessage() for r in caplog.records if r.name.endswith("store"))


def test_writes_and_reads_during_an_outage_are_retried_until_s3_is_back(s3, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(f"s3://{s3.bucket}/night", retries=8, backoff_s=0.25, max_backoff_s=2.0)
    store.write_json({"v": 1}, "data", "a.json")

    timer = s3.down_for(3.0)
    t0 = time.monotonic()
    store.write_bytes(b"x" * 4096, "data", "b.bin")           # lands once S3 is back
    write_s = time.monotonic() - t0
    timer.join()
    assert write_s >= 2.0 and 1 <= _retries_logged(caplog) < 8

    timer = s3.down_for(3.0)
    t0 = time.monotonic()
    assert store.read_json("data", "a.json") == {"v": 1}       # reads wait for S3 too
    read_s = time.monotonic() - t0
    assert store.exists("data", "b.bin") and store.listdir("data") == ["a.json", "b.bin"]
    timer.join()
    assert read_s >= 2.0 and _retries_logged(caplog) >= 2
    assert store.read_bytes("data", "b.bin") == b"x" * 4096    # whole, not partial
    assert _keys(store) == ["data/a.json", "data/b.bin"]        # nothing duplicated


def test_an_outage_longer_than_the_retry_budget_fails_cleanly(s3, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(f"s3://{s3.bucket}/night", retries=3, backoff_s=0.2, max_backoff_s=1.0)
    store.write_json({"v": 1}, "data", "a.json")
    s3.down()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        store.write_json({"v": 2}, "data", "a.json")
    assert time.monotonic() - t0 < 30                           # bounded
    message = str(err.value)
    assert f"s3://{s3.bucket}/night/data/a.json" in message and "failed 3 times" in message
    assert "reachable" in message and _retries_logged(caplog) == 2
    with pytest.raises(StoreUnavailable, match="store exists"):
        store.exists("data", "a.json")
    s3.up()
    assert store.read_json("data", "a.json") == {"v": 1}       # the old version, intact: no partial object
    assert _keys(store) == ["data/a.json"]


def test_permanent_errors_are_not_retried(s3, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(f"s3://{s3.bucket}/night", retries=5, backoff_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.bin")
    assert time.monotonic() - t0 < 5 and _retries_logged(caplog) == 0


def _feedback_file(tmp_path, n_users: int = 4, per_user: int = 3) -> str:
    rows = [{"user_id": f"user{u}", "prompt": f"prompt {u}-{i}", "chosen": f"a good answer {i}",
             "rejected": f"a bad answer {i}"} for u in range(n_users) for i in range(per_user)]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _outage_after_first_write(monkeypatch, s3, restart_after_s: float | None):
    """S3 goes down right after the first object of an ingest has landed (optionally coming back)."""
    original = Store.write_bytes
    state = {"writes": 0, "original": original}

    def write_bytes(self, data, *parts):
        url = original(self, data, *parts)
        state["writes"] += 1
        if state["writes"] == 1:
            if restart_after_s is None:
                s3.down()
            else:
                s3.down_for(restart_after_s)
        return url
    monkeypatch.setattr(Store, "write_bytes", write_bytes)
    return state


def test_ingest_rides_out_a_short_outage(s3, monkeypatch, tmp_path):
    store = Store(f"s3://{s3.bucket}/ingest-ok", backoff_s=0.25)
    _outage_after_first_write(monkeypatch, s3, restart_after_s=1.5)
    report = ingest_feedback(_feedback_file(tmp_path), store)
    assert s3.downs == 1 and report.rows_accepted == 12 and report.rows_quarantined == 0
    stored = read_feedback_store(store)
    assert stored.num_rows == 12 and len(set(zip(stored["user_id"].to_pylist(), stored["prompt"].to_pylist()))) == 12
    assert store.exists("feedback", "_batches", f"{report.batch}.json")


def test_ingest_failed_by_an_outage_reruns_without_loss_or_duplicates(s3, monkeypatch, tmp_path):
    store = Store(f"s3://{s3.bucket}/ingest-fail", retries=2, backoff_s=0.1)
    source = _feedback_file(tmp_path)
    state = _outage_after_first_write(monkeypatch, s3, restart_after_s=None)
    with pytest.raises(StoreUnavailable, match=f"s3://{s3.bucket}/ingest-fail/feedback/"):
        ingest_feedback(source, store)
    assert state["writes"] == 1
    s3.up()
    keys = _keys(store)
    assert len(keys) == 1 and keys[0].startswith("feedback/user=")       # one user's complete file, no marker
    assert store.read_table(*keys[0].split("/")).num_rows == 3           # whole, not partial
    monkeypatch.setattr(Store, "write_bytes", state["original"])
    report = ingest_feedback(source, store)                              # the re-run completes the batch
    assert report.rows_duplicate_of_stored == 3 and report.rows_accepted == 9
    stored = read_feedback_store(store)
    pairs = list(zip(stored["user_id"].to_pylist(), stored["prompt"].to_pylist()))
    assert len(pairs) == 12 == len(set(pairs))                          # nothing lost, nothing duplicated
    assert isinstance(stored, pa.Table) and store.exists("feedback", "_batches", f"{report.batch}.json")


def test_transient_errors_are_told_apart_from_permanent_ones():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
    from s3fs.errors import translate_boto_error

    from latentpref.tasks.data.store import is_transient

    def client_error(code: str, status: int) -> OSError:
        err = ClientError({"Error": {"Code": code, "Message": code},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        try:   # how s3fs raises it: translated, with the botocore error as the cause
            raise translate_boto_error(err) from err
        except Exception as translated:
            return translated
    assert is_transient(EndpointConnectionError(endpoint_url="http://s3"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://s3"))
    assert is_transient(ConnectionResetError())
    for code, status in (("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503)):
        assert is_transient(client_error(code, status)), code
    for code, status in (("NoSuchKey", 404), ("AccessDenied", 403), ("NoSuchBucket", 404)):
        assert not is_transient(client_error(code, status)), code
    assert not is_transient(StoreUnavailable("gave up already"))   # never retried twice over
