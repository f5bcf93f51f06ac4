"""`latentpref serve` for real: one Ray Serve app over a small store (tests/serve_store.py), reached over HTTP on
127.0.0.1: the completions contract, every bad-request kind answered 4xx while the server stays up, bearer token,
batching of different users, the stock `openai` client, feedback refitting a user within seconds (stored first,
idempotent, bad rows refused, rate-limited), and a new night picked up with no mixed responses.
"""
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/serve_store.py
import serve_store  # noqa: E402
from services import free_port  # noqa: E402

from latentpref.tasks.data.store import Store  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "test-token-not-a-secret"
USERS = [f"user-{i}" for i in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from latentpref.pipelines.serve import ServeOptions, build_app
    root = tmp_path_factory.mktemp("serve")
    store = Store(str(root / "store"))
    serve_store.night(store, "clapv1", USERS, seed=1, cold=("user-11",))
    token_file = root / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(store=store.root, max_batch_size=16, batch_wait_timeout_s=0.05, cache_users=4,
                               reload_interval_s=0.5, max_tokens_cap=24, token_file=str(token_file),
                               feedback_rate_per_s=0.5, feedback_burst=3)   # a limit sequential calls reach
        serve.run(build_app(options), name="latentpref", route_prefix="/")
        yield f"http://127.0.0.1:{port}", store
    finally:
        serve.shutdown()
        ray.shutdown()


def call(base, path, body=None, *, token=TOKEN, content_type="application/json", raw=None):
    """(status, parsed JSON) of one HTTP call."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    if content_type and data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def complete(base, **fields):
    return call(base, "/v1/completions", {"model": "latentpref", "prompt": "The film was", "max_tokens": 6,
                                          "temperature": 0, **fields})


def test_completion_contract(server):
    base, _ = server
    status, body = complete(base, user="user-0")
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "latentpref" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 3 and 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    served = body["personalization"]
    assert served["served"] == "personalized" and served["reason"] is None
    assert served["clap_version"] == "clapv1" and served["user_artifact_version"].startswith("clapv1-")
    # greedy is deterministic; another user gets another latent, so (almost surely) another text
    assert complete(base, user="user-0")[1]["choices"][0]["text"] == choice["text"]
    others = {complete(base, user=u)[1]["choices"][0]["text"] for u in USERS[1:6]}
    assert len(others | {choice["text"]}) > 1
    # unknown user, cold start, no user: the prior, flagged, never an error
    for user, reason in (("never-seen", "has no fitted encoder"), ("user-11", "cold start"),
                         (None, "no user id")):
        status, body = complete(base, **({"user": user} if user else {}))
        assert status == 200 and body["personalization"]["served"] == "prior"
        assert reason in body["personalization"]["reason"]
    status, models = call(base, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["latentpref"]
    assert models["data"][0]["clap_version"] == "clapv1"
    status, health = call(base, "/health", token=None)
    assert status == 200 and health["status"] == "ok" and health["cached_users"] <= 4   # the LRU's bound


@pytest.mark.parametrize("kind, request_kw, status", [
    ("malformed JSON", {"raw": b'{"model": "latentpref", "prompt": '}, 400),
    ("missing prompt", {"body": {"model": "latentpref"}}, 400),
    ("empty prompt", {"body": {"model": "latentpref", "prompt": ""}}, 400),
    ("prompt over the limit", {"body": {"model": "latentpref", "prompt": "x" * 4001}}, 400),
    ("max_tokens over the cap", {"body": {"model": "latentpref", "prompt": "hi", "max_tokens": 25}}, 400),
    ("negative max_tokens", {"body": {"model": "latentpref", "prompt": "hi", "max_tokens": -2}}, 400),
    ("unknown field", {"body": {"model": "latentpref", "prompt": "hi", "suffix": "!"}}, 400),
    ("best_of with greedy decoding", {"body": {"model": "latentpref", "prompt": "hi", "best_of": 2,
                                               "temperature": 0}}, 400),
    ("best_of over the cap", {"body": {"model": "latentpref", "prompt": "hi", "best_of": 9}}, 400),
    ("path in user id", {"body": {"model": "latentpref", "prompt": "hi", "user": "../../etc/passwd"}}, 400),
    ("control char in user id", {"body": {"model": "latentpref", "prompt": "hi", "user": "bob\u0007"}}, 400),
    ("wrong content type", {"body": {"model": "latentpref", "prompt": "hi"}, "content_type": "text/plain"}, 415),
    ("unknown model", {"body": {"model": "gpt-5", "prompt": "hi"}}, 404),
    ("no token", {"body": {"model": "latentpref", "prompt": "hi"}, "token": None}, 401),
    ("wrong token", {"body": {"model": "latentpref", "prompt": "hi"}, "token": "nope"}, 401),
    ("body too large", {"raw": b"{" + b" " * 70000 + b"}"}, 413),
])
def test_bad_requests_get_4xx_and_the_server_stays_up(server, kind, request_kw, status):
    base, _ = server
    got, body = call(base, "/v1/completions", **request_kw)
    assert got == status, (kind, body)
    assert body["error"]["message"], kind
    assert TOKEN not in json.dumps(body)
    assert complete(base, user="user-1")[0] == 200, f"server down after {kind}"


def test_best_of_is_a_personal_rerank(server):
    base, _ = server
    status, body = complete(base, user="user-0", temperature=1.0, seed=3, best_of=3)
    assert status == 200, body
    served = body["personalization"]
    assert served["served"] == "personalized" and served["best_of"] == 3
    assert isinstance(served["best_of_reward"], float)
    assert body["usage"]["completion_tokens"] <= 3 * 6       # every sample drawn counts, as OpenAI counts it
    again = complete(base, user="user-0", temperature=1.0, seed=3, best_of=3)[1]
    assert again["choices"][0]["text"] == body["choices"][0]["text"]     # a fixed seed is reproducible
    # the prior has no reward to rank by: one sample, the plain request's own
    status, prior = complete(base, user="never-seen", temperature=1.0, seed=3, best_of=3)
    assert status == 200 and prior["personalization"]["best_of_reward"] is None
    assert prior["choices"][0]["text"] == complete(base, user="never-seen", temperature=1.0, seed=3)[1][
        "choices"][0]["text"]
    assert complete(base, user="user-0")[1]["personalization"]["best_of"] == 1


def test_models_needs_the_token(server):
    base, _ = server
    assert call(base, "/v1/models", token=None)[0] == 401


def test_concurrent_users_are_batched_and_match_one_at_a_time(server):
    base, _ = server
    alone = {u: complete(base, user=u)[1]["choices"][0]["text"] for u in USERS[:8]}
    health = call(base, "/health", token=None)[1]
    served_before, batches_before = health["served"], health["batches"]
    results = {}

    def one(u):
        results[u] = complete(base, user=u)

    threads = [threading.Thread(target=one, args=(u,)) for u in USERS[:8]]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in results.values())
    # greedy decoding is batch-independent: a user's text is the same whoever they were batched with
    assert {u: b["choices"][0]["text"] for u, (_, b) in results.items()} == alone
    health = call(base, "/health", token=None)[1]
    assert health["served"] == served_before + 8
    assert health["batches"] - batches_before < 8         # some of the 8 shared a decode
    assert time.perf_counter() - t0 < 60


def test_stock_openai_client(server):
    openai = pytest.importorskip("openai")
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["latentpref"]
    out = client.completions.create(model="latentpref", prompt="The film was", max_tokens=5, temperature=0,
                                    user="user-2", seed=3)
    assert out.object == "text_completion" and out.choices[0].text == complete(base, user="user-2", max_tokens=5)[
        1]["choices"][0]["text"]
    assert out.usage.completion_tokens <= 5
    assert out.model_extra["personalization"]["served"] == "personalized"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="latentpref", prompt="hi", max_tokens=1000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).completions.create(
            model="latentpref", prompt="hi")


def test_feedback_refits_the_user_within_seconds(server):
    """POST /v1/feedback: stored before the 2xx, the user refitted in the replica, and the next completion for them
    names the new fit version; a new user (no fit) becomes personalized the same way."""
    base, store = server
    before = complete(base, user="user-3")[1]["personalization"]
    assert before["served"] == "personalized"
    rows = serve_store.pair_rows("user-3", 4, offset=200) + serve_store.pair_rows("newcomer-1", 3, offset=300)
    t0 = time.monotonic()
    status, body = call(base, "/v1/feedback", {"rows": rows, "idempotency_key": "req-1"})
    assert status == 200, body
    assert body["accepted"] == 7 and body["users"] == ["newcomer-1", "user-3"] and body["refit"] == "queued"
    from latentpref.tasks.data.ingest import committed_rows_for
    assert committed_rows_for(store, ["user-3"]).num_rows == 4        # durable before the answer
    deadline, after, new = time.monotonic() + 60, before, None
    while time.monotonic() < deadline:
        after = complete(base, user="user-3")[1]["personalization"]
        new = complete(base, user="newcomer-1")[1]["personalization"]
        if after["user_artifact_version"] != before["user_artifact_version"] and new["served"] == "personalized":
            break
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    assert after["user_artifact_version"] != before["user_artifact_version"], after
    assert after["refitted_online"] and not before["refitted_online"]
    assert new["served"] == "personalized" and new["user_artifact_version"].startswith("clapv1-"), new
    # the same request again (a client retry): stored once, nothing new to fit
    status, again = call(base, "/v1/feedback", {"rows": rows, "idempotency_key": "req-1"})
    assert status == 200 and again["already_stored"] and again["batch"] == body["batch"]
    assert committed_rows_for(store, ["user-3"]).num_rows == 4
    health = call(base, "/health", token=None)[1]
    assert health["feedback_requests"] == 2 and health["online_refit_errors"] == 0
    print(f"feedback to a completion naming the new fit: {seconds:.1f}s")


def test_user_status_says_what_the_next_completion_gets(server):
    """GET /v1/users/{id} and POST /v1/users/status: the policy the user's next completion is served with, without
    decoding; a feedback's refit shows there as a new online fit, then in the completion too."""
    base, _ = server
    status, st = call(base, "/v1/users/user-8")
    assert status == 200, st
    first = complete(base, user="user-8")[1]["personalization"]
    for key in ("served", "user_artifact_version", "refitted_online", "release", "clap_version"):
        assert st[key] == first[key], key
    rows = serve_store.pair_rows("user-8", 3, offset=400)
    assert call(base, "/v1/feedback", {"rows": rows, "idempotency_key": "status-1"})[0] == 200
    deadline, seen = time.monotonic() + 60, st
    while time.monotonic() < deadline:
        seen = call(base, "/v1/users/user-8")[1]
        if seen["user_artifact_version"] != st["user_artifact_version"] and not seen["refit_pending"]:
            break
        time.sleep(0.2)
    assert seen["refitted_online"] and seen["user_artifact_version"] != st["user_artifact_version"], seen
    assert complete(base, user="user-8")[1]["personalization"]["user_artifact_version"] == \
        seen["user_artifact_version"]
    status, many = call(base, "/v1/users/status", {"users": ["user-8", "nobody-9"]})
    assert status == 200 and [d["user"] for d in many["data"]] == ["user-8", "nobody-9"]
    assert many["data"][0]["user_artifact_version"] == seen["user_artifact_version"]
    assert many["data"][1]["served"] == "prior" and many["data"][1]["reason"] and not many["data"][1]["refit_pending"]
    # refused, naming the problem
    assert call(base, "/v1/users/user-8", token=None)[0] == 401
    status, err = call(base, "/v1/users/bad..id")
    assert status == 400 and err["error"]["code"] == "invalid_user_id", err
    status, err = call(base, "/v1/users/status", {"users": ["user-8", "bad..id"]})
    assert status == 400 and "users[1]" in err["error"]["message"], err
    assert call(base, "/v1/users/status", {"users": []})[0] == 400
    assert call(base, "/v1/users/status", {"ids": ["user-8"]})[0] == 400


def test_bad_feedback_is_refused_and_nothing_stored(server):
    base, store = server
    from latentpref.tasks.data.ingest import committed_rows_for
    good = serve_store.pair_rows("user-4", 2, offset=400)
    bad = {**serve_store.pair_rows("user-4", 1, offset=500)[0], "chosen": "nul\x00byte"}
    status, body = call(base, "/v1/feedback", {"rows": good + [bad]})
    assert status == 422 and body["error"]["message"].startswith("row 2: control_chars"), body
    assert committed_rows_for(store, ["user-4"]) is None
    assert call(base, "/v1/feedback", {"rows": good}, token="wrong")[0] == 401
    assert call(base, "/v1/feedback", raw=b"{not json")[0] == 400
    assert complete(base, user="user-4")[0] == 200          # the server stays up


def test_feedback_rate_limit_per_user(server):
    base, _ = server
    codes = []
    for i in range(6):   # this server: 0.5 requests per second per user, bursts of 3
        status, body = call(base, "/v1/feedback", {"rows": serve_store.pair_rows("user-5", 1, offset=600 + i)})
        codes.append(status)
    assert codes[:3] == [200] * 3 and 429 in codes[3:], codes
    assert body["error"]["type"] == "rate_limit_error" if codes[-1] == 429 else True
    req = urllib.request.Request(base + "/v1/feedback", method="POST",
                                 data=json.dumps({"rows": serve_store.pair_rows("user-5", 1, offset=700)}).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        urllib.request.urlopen(req, timeout=30)
        retry_after = None
    except urllib.error.HTTPError as err:
        assert err.code == 429
        retry_after = err.headers.get("Retry-After")
    assert retry_after is None or int(retry_after) >= 1
    assert call(base, "/v1/feedback", {"rows": serve_store.pair_rows("user-6", 1, offset=800)})[0] == 200


def test_a_new_night_is_picked_up_atomically(server):
    """Night 2 writes a new CLaP (current pointer first, as pretrain does), then its users one by one: until its
    release is published every answer is CLaP 1 with CLaP 1 fits; after, CLaP 2 with CLaP 2 fits. Requests keep
    flowing the whole time and none fails."""
    base, store = server
    stop = threading.Event()
    seen, failures = [], []

    def load():
        i = 0
        while not stop.is_set():
            status, body = complete(base, user=USERS[i % 8])
            i += 1
            if status != 200:
                failures.append((status, body))
            else:
                seen.append(body["personalization"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        clap, _ = serve_store.write_clap(store, "clapv2", seed=2)
        serve_store.write_users(store, clap, "clapv2", USERS, seed=2)   # every pointer now names a clapv2 fit
        time.sleep(1.5)                                                 # > reload_interval_s: nothing to pick up
        before = list(seen)
        assert before and all(s["clap_version"] == "clapv1" for s in before)
        from latentpref.tasks.evaluate.serve_core import publish_release
        release = publish_release(store, clap_version="clapv2", run_id="night-2")
        deadline = time.time() + 60
        while time.time() < deadline and not (seen and seen[-1]["release"] == release.release_id):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert not failures
    assert seen[-1]["release"] == release.release_id and seen[-1]["clap_version"] == "clapv2"
    for s in seen:   # never a CLaP with another CLaP's user fit
        assert s["served"] == "personalized", s
        assert s["user_artifact_version"].startswith(s["clap_version"] + "-"), s
    switched = [s["clap_version"] for s in seen]
    assert switched == sorted(switched)             # v1 ... v1 v2 ... v2: one switch, no flapping
    health = call(base, "/health", token=None)[1]
    assert health["reloads"] == 1 and health["clap_version"] == "clapv2"
