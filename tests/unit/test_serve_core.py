"""Serving without Ray: request validation (every bad-request kind), bearer tokens, the bounded LRU, releases
(a server never pairs a CLaP with another CLaP's user fits, nor with fits of a night it has not been published),
and per-row sampling."""
import json

import pytest
import torch

from latentpref.tasks.data.store import Store
from latentpref.tasks.evaluate.online import pick_tokens
from latentpref.tasks.evaluate.serve_core import (
    BadRequest,
    BoundedLRU,
    CompletionRequest,
    Release,
    ServeLimits,
    check_bearer,
    current_release,
    load_token,
    parse_completion_request,
    publish_release,
    release_fit,
)
from latentpref.tasks.policy.store import HEAD_FILE, fit_version
from latentpref.tasks.policy.store import store_user as _store_user
from latentpref.tasks.policy.table import PolicyTable, night_tag

LIMITS = ServeLimits(max_prompt_chars=100, max_tokens_cap=20, default_max_tokens=16, max_body_bytes=2000)
JSON = "application/json"


def parse(body, content_type=JSON):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_completion_request(raw, content_type, LIMITS, model="latentpref")


def test_a_full_request_parses_and_defaults_apply():
    req = parse({"model": "latentpref", "prompt": "The film", "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                 "seed": 7, "user": "alice@example.com"})
    assert req == CompletionRequest("The film", 5, 0.0, 0.5, 7, "alice@example.com", "latentpref")
    req = parse({"model": "latentpref", "prompt": ["only one"], "n": 1, "stream": False})
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.user) == \
        ("only one", 16, 1.0, 1.0, None, None)


def test_best_of_parses_within_its_cap():
    base = {"model": "latentpref", "prompt": "hi"}
    assert parse(base).best_of == 1 and parse({**base, "best_of": None}).best_of == 1
    assert parse({**base, "best_of": 8, "n": 1}).best_of == 8
    assert parse({**base, "best_of": 1, "temperature": 0}).best_of == 1      # greedy with one sample is fine
    assert parse({**base, "best_of": 2, "temperature": 0.7, "seed": 3}) == \
        CompletionRequest("hi", 16, 0.7, 1.0, 3, None, "latentpref", best_of=2)
    raw = json.dumps({**base, "best_of": 3}).encode()
    with pytest.raises(BadRequest, match="best_of=3 must be between 1 and 2"):
        parse_completion_request(raw, JSON, ServeLimits(max_best_of=2), model="latentpref")


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"\xff\xfe", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "latentpref"}, 400, "prompt", "prompt is required"),
    ({"model": "latentpref", "prompt": "   "}, 400, "prompt", "empty"),
    ({"model": "latentpref", "prompt": ["a", "b"]}, 400, "prompt", "exactly one"),
    ({"model": "latentpref", "prompt": "x" * 101}, 400, "prompt", "101 characters; the limit is 100"),
    ({"model": "latentpref", "prompt": "hi", "max_tokens": 21}, 400, "max_tokens", "between 1 and 20"),
    ({"model": "latentpref", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "between 1 and 20"),
    ({"model": "latentpref", "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ({"model": "latentpref", "prompt": "hi", "max_tokens": True}, 400, "max_tokens", "integer"),
    ({"model": "latentpref", "prompt": "hi", "temperature": 3}, 400, "temperature", "[0.0, 2.0]"),
    ({"model": "latentpref", "prompt": "hi", "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ({"model": "latentpref", "prompt": "hi", "seed": -3}, 400, "seed", "between 0"),
    ({"model": "latentpref", "prompt": "hi", "logit_bias": {}}, 400, "logit_bias", "unknown field"),
    ({"model": "latentpref", "prompt": "hi", "n": 2}, 400, "n", "n=1"),
    ({"model": "latentpref", "prompt": "hi", "n": 2, "best_of": 3}, 400, "n", "n=1"),
    ({"model": "latentpref", "prompt": "hi", "best_of": 0}, 400, "best_of", "between 1 and 8"),
    ({"model": "latentpref", "prompt": "hi", "best_of": 9}, 400, "best_of", "between 1 and 8"),
    ({"model": "latentpref", "prompt": "hi", "best_of": 2.0}, 400, "best_of", "integer"),
    ({"model": "latentpref", "prompt": "hi", "best_of": "2"}, 400, "best_of", "integer"),
    ({"model": "latentpref", "prompt": "hi", "best_of": 2, "temperature": 0}, 400, "best_of", "temperature=0"),
    ({"model": "latentpref", "prompt": "hi", "stream": True}, 400, "stream", "stream"),
    ({"model": "latentpref", "prompt": "hi", "user": "../../etc/passwd"}, 400, "user", "user_id"),
    ({"model": "latentpref", "prompt": "hi", "user": "a/b"}, 400, "user", "user_id"),
    ({"model": "latentpref", "prompt": "hi", "user": "bob\x00"}, 400, "user", "user_id"),
    ({"model": "latentpref", "prompt": "hi", "user": "bob\n"}, 400, "user", "user_id"),
    ({"model": "latentpref", "prompt": "hi", "user": 12}, 400, "user", "user_id"),
    ({"prompt": "hi"}, 400, "model", "model is required"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "does not exist"),
])
def test_bad_requests_say_what_is_wrong(body, status, param, words):
    with pytest.raises(BadRequest) as err:
        parse(body)
    assert err.value.status == status and err.value.param == param
    assert words in str(err.value)
    error = err.value.body()["error"]
    assert error["message"] == str(err.value) and error["type"] in ("invalid_request_error", "not_found_error")


def test_content_type_and_body_size():
    for ct in (None, "text/plain", "application/x-www-form-urlencoded"):
        with pytest.raises(BadRequest, match="Content-Type") as err:
            parse({"model": "latentpref", "prompt": "hi"}, ct)
        assert err.value.status == 415
    assert parse({"model": "latentpref", "prompt": "hi"}, "application/json; charset=utf-8").prompt == "hi"
    with pytest.raises(BadRequest) as err:
        parse(b" " * 2001)
    assert err.value.status == 413


def test_bearer_token(tmp_path, monkeypatch):
    check_bearer(None, None)                          # no token configured: open
    check_bearer("Bearer s3cret", "s3cret")
    for header in (None, "Bearer wrong", "s3cret", "Basic s3cret"):
        with pytest.raises(BadRequest) as err:
            check_bearer(header, "s3cret")
        assert err.value.status == 401 and "s3cret" not in str(err.value)
    monkeypatch.delenv("LATENTPREF_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("LATENTPREF_SERVE_TOKEN_FILE", raising=False)
    assert load_token() is None
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert load_token(str(path)) == "from-file"
    monkeypatch.setenv("LATENTPREF_SERVE_TOKEN", "from-env")
    assert load_token(str(path)) == "from-env"
    monkeypatch.delenv("LATENTPREF_SERVE_TOKEN")
    path.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_token(str(path))


def test_lru_is_bounded_and_keeps_the_recently_used():
    lru = BoundedLRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1          # a is now the most recent
    lru.put("c", 3)                   # evicts b
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    assert len(lru) == 2 and lru.evictions == 1 and (lru.hits, lru.misses) == (3, 1)
    for i in range(1000):
        lru.put(i, i)
    assert len(lru) == 2
    with pytest.raises(ValueError):
        BoundedLRU(0)


def _fit(store, user, clap_version, tag):
    record = _store_user(store, user, fit_version(clap_version, "head-only", tag), HEAD_FILE,
                         {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)},
                         {"cold_start": False, "clap_version": clap_version, "mode": "head-only", "data_hash": tag})
    return record["version"]


def _night(store, clap_version, run_id):
    """What a night's personalize stage ends with: the table's tag, then the release naming it."""
    tag = night_tag(run_id)
    PolicyTable(store, clap_version).tag(tag)
    return publish_release(store, clap_version=clap_version, run_id=run_id, policy_tag=tag)


def test_releases_bind_the_clap_to_its_own_users_fits(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nightly"):
        current_release(store)
    store.write_json({"version": "v1"}, "models", "clap", "current.json")
    legacy = current_release(store)                     # a store from before releases: CLaP pointer, no time bound
    assert (legacy.clap_version, legacy.published_at, legacy.policy_tag) == ("v1", None, None)

    old = _fit(store, "alice", "v1", "d1")
    r1 = _night(store, "v1", "n1")
    assert current_release(store) == r1 and r1.policy_tag == "night-n1"
    policy, why = release_fit(store, "alice", r1)
    assert why is None and policy.manifest["version"] == old and policy.tensors["bias"].shape == (2,)
    # the next night is running: new CLaP current, alice's v2 row committed but not tagged nor released
    store.write_json({"version": "v2"}, "models", "clap", "current.json")
    new = _fit(store, "alice", "v2", "d2")
    assert current_release(store) == r1                 # not published yet: still release 1
    assert release_fit(store, "alice", r1)[0].manifest["version"] == old   # release 1 keeps serving her v1 fit
    # same CLaP again the night after, new data: a row committed after the tag is not the release's
    later = _fit(store, "alice", "v1", "d3")
    assert release_fit(store, "alice", r1)[0].manifest["version"] == old
    assert PolicyTable(store, "v1").manifests(["alice"])["alice"]["version"] == later     # the latest row
    r2 = _night(store, "v2", "n2")
    assert current_release(store) == r2
    assert release_fit(store, "alice", r2)[0].manifest["version"] == new   # switched together
    # no fit of the served CLaP / never fitted: the prior, with the reason
    _fit(store, "bob", "v9", "d4")
    assert release_fit(store, "bob", r2) == (None, "has no fitted encoder")
    assert release_fit(store, "carol", r2) == (None, "has no fitted encoder")
    with pytest.raises(ValueError, match="user_id"):
        release_fit(store, "../x", r2)
    # releases published before the policy table (no tag) admit rows by time
    assert Release("r", "v2", 10.0).admits({"clap_version": "v2", "written_at": 10.0})
    assert not Release("r", "v2", 10.0).admits({"clap_version": "v2", "written_at": 10.5})
    assert Release("r", "v2", 10.0).admits({"clap_version": "v2", "written_at": 99.0, "legacy_written_at": 9.0})


def test_pick_tokens_greedy_rows_and_own_streams():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    temperature = torch.tensor([0.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1.0, 1e-6])              # row 2: the nucleus is the single best token
    gens = [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    out = pick_tokens(logits, temperature, top_p, gens)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    # row 1 depends on its own generator only: alone, with the same seed, it draws the same token
    alone = pick_tokens(logits[1:2], temperature[1:2], top_p[1:2], [torch.Generator().manual_seed(5)])
    assert alone[0] == out[1]
    draws = {int(pick_tokens(logits[1:2], temperature[1:2], top_p[1:2], [torch.Generator().manual_seed(s)])[0])
             for s in range(40)}
    assert len(draws) > 5 and draws <= set(logits[1].topk(50).indices.tolist())
