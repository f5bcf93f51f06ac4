"""Online serving, the parts that need neither Ray nor a model: request validation, the bounded user LRU, and
serving releases (which CLaP version and which of its users' fits a server may serve together).

Releases: a night's personalize stage ends with `publish_release`, which writes
`serving/releases/<release>/_manifest.json` (CLaP version, run id, the time its last user fit was written) and
then flips `serving/current.json` (pointer last, as for a user's current.json). A server serves one release at a
time. A user's fit belongs to a release when it was fitted against the release's CLaP version and written no later
than the release was published: so while the next night is running (new CLaP already current, users' pointers
flipping one by one) the server keeps answering with the old CLaP *and* the old fits, and switches to the new
CLaP and its users together once the new release's manifest is complete. Stores written before releases existed
are served as a "legacy" release: models/clap/current.json and each user's current fit of that CLaP version.
"""
from __future__ import annotations

import functools
import hmac
import json
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, Hashable, TypeVar

from latentpref.tasks.data.store import MANIFEST, Store, json_digest
from latentpref.tasks.data.validate import InvalidUserId, check_user_id

RELEASES = ("serving", "releases")
CURRENT = ("serving", "current.json")
TOKEN_ENV = "LATENTPREF_SERVE_TOKEN"          # bearer token value (takes precedence)
TOKEN_FILE_ENV = "LATENTPREF_SERVE_TOKEN_FILE"  # or a file holding it (a mounted Secret)

# ------------------------------------------------------------------------------------------------ requests
# OpenAI completions fields we accept; `n` and `stream` only with the values we implement (1, false). `best_of`: K
# samples, the one with the highest latent reward of the request's user returned (serving.complete_best_of)
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "user", "n", "stream", "best_of")


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status` and an OpenAI-style error body naming the field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeLimits:
    max_prompt_chars: int = 4000    # hard limit; prompts are then cut to their last prompt_tokens (spec §9.10)
    max_tokens_cap: int = 64        # new tokens per request (the tiny GPT-2 has 128 positions)
    default_max_tokens: int = 16    # OpenAI's default
    max_body_bytes: int = 64 * 1024
    max_best_of: int = 8            # samples per request for best_of: a request costs up to this many decode rows


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    max_tokens: int
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    user: str | None = None         # end-user id whose latent is applied; None = the population prior
    model: str = ""
    best_of: int = 1                # K samples, the best under the user's latent reward returned (1 = one sample)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}={value} must be between {lo} and {hi}", param=name)
    return value


def _float(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value!r}", param=name)
    if not ((lo < value) if lo_open else (lo <= value)) or value > hi:
        raise BadRequest(f"{name}={value} must be in {'(' if lo_open else '['}{lo}, {hi}]", param=name)
    return float(value)


def parse_json_body(body: bytes, content_type: str | None, max_body_bytes: int) -> Any:
    """The JSON value of a request body.

    Raises:
        BadRequest: 415 not application/json, 413 larger than `max_body_bytes`, 400 not UTF-8 JSON.
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {content_type!r}", status=415,
                         code="unsupported_media_type")
    if len(body) > max_body_bytes:
        raise BadRequest(f"request body of {len(body)} bytes exceeds {max_body_bytes}", status=413,
                         code="body_too_large")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}", code="invalid_json") from None


def parse_completion_request(body: bytes, content_type: str | None, limits: ServeLimits, *,
                             model: str) -> CompletionRequest:
    """Validate a POST /v1/completions body (OpenAI completions shape) into a `CompletionRequest`.

    Raises:
        BadRequest: 415 wrong content type; 413 body too large; 404 unknown model; 400 anything else (malformed
            JSON, unknown field, missing/empty/oversize prompt, max_tokens or best_of out of range, best_of > 1 with
            temperature 0, bad user id, ...).
    """
    parsed = parse_json_body(body, content_type, limits.max_body_bytes)
    if not isinstance(parsed, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(parsed).__name__}", code="invalid_json")
    unknown = sorted(set(parsed) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; accepted: {list(FIELDS)}", param=unknown[0],
                         code="unknown_field")
    if parsed.get("model") is None or not isinstance(parsed["model"], str):
        raise BadRequest("model is required (a string; GET /v1/models lists it)", param="model")
    if parsed["model"] != model:
        raise BadRequest(f"model {parsed['model']!r} does not exist; this server serves {model!r}", status=404,
                         param="model", code="model_not_found")
    prompt = parsed.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:     # the OpenAI client's one-prompt list form
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt is required and must be a string (or a list of exactly one string)",
                         param="prompt")
    if not prompt.strip():
        raise BadRequest("prompt is empty", param="prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise BadRequest(f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                         param="prompt", code="prompt_too_long")
    if parsed.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported (best_of=K returns the best of K samples)", param="n")
    if parsed.get("stream", False) not in (False, None):
        raise BadRequest("streaming is not supported (stream must be false)", param="stream")
    max_tokens = _int(parsed, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens_cap)
    temperature = _float(parsed, "temperature", 1.0, 0.0, 2.0)
    best_of = _int(parsed, "best_of", 1, 1, limits.max_best_of) or 1    # OpenAI: best_of >= n, and n is 1
    if best_of > 1 and temperature == 0:
        raise BadRequest(f"best_of={best_of} needs sampling: with temperature=0 every sample is the same greedy "
                         "text; set temperature > 0 or best_of=1", param="best_of")
    user = parsed.get("user")
    if user is not None:
        try:
            check_user_id(user)
        except InvalidUserId as err:
            raise BadRequest(str(err), param="user", code="invalid_user") from None
    return CompletionRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                             top_p=_float(parsed, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                             seed=_int(parsed, "seed", None, 0, 2**63 - 1), user=user, model=model, best_of=best_of)


def load_token(token_file: str | None = None) -> str | None:
    """The bearer token clients must send: $LATENTPREF_SERVE_TOKEN, else the file `token_file` (or
    $LATENTPREF_SERVE_TOKEN_FILE); None = no authentication (behind a gateway).

    Raises:
        ValueError: a token file that is empty.
    """
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    with open(path) as fh:
        token = fh.read().strip()
    if not token:
        raise ValueError(f"token file {path!r} is empty: write the token into it, or unset it to serve without one")
    return token


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Raises BadRequest(401) unless no token is configured or the header is `Bearer <token>`."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise BadRequest("missing or wrong bearer token (Authorization: Bearer <token>)", status=401,
                         code="invalid_api_key")


# ------------------------------------------------------------------------------------------------ LRU
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """A thread-safe least-recently-used map holding at most `capacity` entries (memory independent of how many
    users are stored)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
                self.evictions += 1

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._data)

    def pop(self, key: K) -> V | None:
        """Drop `key` (a stale entry); returns what it held."""
        with self._lock:
            return self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


# ------------------------------------------------------------------------------------------------ releases
@dataclass(frozen=True)
class Release:
    release_id: str
    clap_version: str
    published_at: float | None     # None: legacy release (no time bound on the users' fits)
    run_id: str | None = None
    policy_tag: str | None = None   # the night's tag in the CLaP's policy table (None: a release from before it)

    def admits(self, manifest: dict[str, Any]) -> bool:
        """Whether a user's fit manifest belongs to this release (its CLaP, written before publication); only asked
        of releases without a policy tag (a tag pins exactly the night's rows)."""
        if manifest.get("clap_version") != self.clap_version:
            return False
        written = manifest.get("legacy_written_at") or manifest.get("written_at", 0.0)   # migrated: first write
        return self.published_at is None or float(written) <= self.published_at


def publish_release(store: Store, *, clap_version: str, run_id: str, last_written_at: float | None = None,
                    **info: Any) -> Release:
    """Publish a night's serving release: manifest first, then the `serving/current.json` pointer.

    Call once every user of the night has been written. `last_written_at` (the newest user manifest's
    `written_at`) guards against a worker clock ahead of this one: the release covers every fit of the night.
    """
    published_at = max(time.time(), last_written_at or 0.0)
    release_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(published_at))}-" \
                 f"{json_digest([clap_version, run_id, published_at])[:8]}"
    manifest = {"release": release_id, "clap_version": clap_version, "run_id": run_id,
                "published_at": published_at, **info}
    store.write_json(manifest, *RELEASES, release_id, MANIFEST)
    store.write_json({"release": release_id}, *CURRENT)
    return Release(release_id, clap_version, published_at, run_id, info.get("policy_tag"))


def current_release(store: Store) -> Release:
    """The release a server should serve now.

    Raises:
        FileNotFoundError: the store has neither a release nor a trained CLaP (run `latentpref nightly` first).
    """
    if store.exists(*CURRENT):
        release_id = store.read_json(*CURRENT)["release"]
        m = store.read_json(*RELEASES, release_id, MANIFEST)
        return Release(release_id, m["clap_version"], float(m["published_at"]), m.get("run_id"), m.get("policy_tag"))
    if store.exists("models", "clap", "current.json"):
        version = store.read_json("models", "clap", "current.json")["version"]
        return Release(f"legacy-{version}", version, None)
    raise FileNotFoundError(f"no serving release and no trained CLaP in store {store.url()}: "
                            "run `latentpref nightly` first")


def release_manifest(store: Store, release: Release) -> dict[str, Any]:
    """The release's manifest (what the personalize stage published: fit settings, pairs, policy tag, ...); {} for a
    legacy release."""
    if not store.exists(*RELEASES, release.release_id, MANIFEST):
        return {"release": release.release_id, "clap_version": release.clap_version}
    return store.read_json(*RELEASES, release.release_id, MANIFEST)


def release_fit(store: Store, user_id: str, release: Release):
    """(the user's `UserPolicy` in `release`, None) or (None, why there is none).

    A release with a policy tag reads the CLaP's policy table at that tag (exactly the night's rows, whatever the
    next night has committed since); an older release reads the latest rows and admits those written before it.

    Raises:
        InvalidUserId: a malformed user id.
    """
    check_user_id(user_id)
    table = _policy_table(store.root, release.clap_version)
    try:
        found = table.policies([user_id], release.policy_tag).get(user_id)
    except KeyError:      # the tag was removed (compaction keeps the served one; a hand-deleted tag lands here)
        return None, f"has no fit: tag {release.policy_tag!r} of the served release is gone from the policy table"
    if found is None:
        return None, "has no fitted encoder"
    if release.policy_tag is None and not release.admits(found.manifest):
        return None, (f"has no fit of the served release {release.release_id!r} (their row is newer or of "
                      f"another CLaP)")
    return found, None


@functools.lru_cache(maxsize=8)
def _policy_table(store_root: str, clap_version: str):
    """One PolicyTable per served CLaP and process, so its datasets opened at tags are reused across requests."""
    from latentpref.tasks.policy.table import PolicyTable
    return PolicyTable(Store(store_root), clap_version)
