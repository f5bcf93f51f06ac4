"""Feedback between nights: `POST /v1/feedback` rows validated as `latentpref ingest` validates a file, stored
durably as one feedback batch before the answer, and the users refitted in the serving process within seconds.

A head-only refit costs well under a second for one user once their texts are encoded, so a user's feedback can
change their policy the moment it arrives instead of the next night. The refit is the night's own code on the
night's own inputs for those users (their simulated train pairs + every committed feedback row, the release's fit
settings, `personalize.fit_chunk`), so it writes the row the night would write: same fit version. The next night
reads the same feedback and finds the user "unchanged": the feedback counts exactly once.

- `parse_feedback_request`: JSON body -> validated rows (all or nothing: a bad row is a `BadRequest` naming the row
  and the reason, and nothing of the request is stored); `idempotency_key` (body or `Idempotency-Key` header) names
  the stored batch, so a retried request is stored once.
- `RateLimiter`: a token bucket per user (429 with Retry-After), bounded in memory.
- `OnlineRefitter`: a background thread that coalesces refits (a burst of rows for one user, or many users, is one
  batched refit), encodes the users' new texts with the served CLaP into the content-keyed latent table, fits,
  commits their rows to the policy table (night `online-<release>`) and hands the new policies to the server.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from latentpref.tasks.data import validate
from latentpref.tasks.data.store import Store, json_digest
from latentpref.tasks.evaluate.serve_core import BadRequest, parse_json_body

log = logging.getLogger(__name__)

ONLINE_NIGHT_PREFIX = "online-"
MAX_KEY_CHARS = 200


# ------------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class FeedbackRequest:
    rows: pa.Table            # validated rows (FEEDBACK_SCHEMA)
    batch: str                # the feedback batch id the rows are stored under
    idempotency_key: str | None

    @property
    def user_ids(self) -> list[str]:
        return sorted(set(self.rows["user_id"].to_pylist()))


def parse_feedback_request(body: bytes, content_type: str | None, *, max_body_bytes: int, max_rows: int = 1000,
                           max_text_chars: int = 20_000, idempotency_key: str | None = None) -> FeedbackRequest:
    """Validate a POST /v1/feedback body: `{"rows": [row, ...], "idempotency_key": "..."}`, a list of rows, or one
    row object; a row has the feedback contract's columns (user_id, prompt, chosen, rejected[, created_at, weight,
    prompt_id, chosen_id, rejected_id, split]).

    Raises:
        BadRequest: 415 wrong content type, 413 too large, 400 malformed JSON / no rows / too many rows / a bad
            idempotency key, 422 a row the feedback contract refuses (the message names the row and the reason,
            as `latentpref ingest` quarantines it).
    """
    parsed = parse_json_body(body, content_type, max_body_bytes)
    key = idempotency_key
    if isinstance(parsed, dict) and "rows" in parsed:
        unknown = sorted(set(parsed) - {"rows", "idempotency_key"})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; accepted: ['rows', 'idempotency_key']", param=unknown[0],
                             code="unknown_field")
        key = parsed.get("idempotency_key", key)
        rows = parsed["rows"]
    else:
        rows = parsed if isinstance(parsed, list) else [parsed]
    if key is not None and (not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_CHARS):
        raise BadRequest(f"idempotency_key must be a non-empty string of at most {MAX_KEY_CHARS} characters",
                         param="idempotency_key")
    if not isinstance(rows, list) or not rows:
        raise BadRequest("rows must be a non-empty list of feedback rows", param="rows")
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows in one request; at most {max_rows}", param="rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"row {i}: bad_json: a {type(row).__name__}, not an object", status=422, param="rows",
                             code="bad_row")
        unknown = sorted(set(row) - set(validate.FEEDBACK_SCHEMA.names))
        if unknown:
            raise BadRequest(f"row {i}: unknown field(s) {unknown}; accepted: {validate.FEEDBACK_SCHEMA.names}",
                             status=422, param="rows", code="bad_row")
    # exactly the reader and the checks `latentpref ingest` applies to a JSONL file
    jsonl = b"\n".join(json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass") for r in rows)
    try:
        table, problems = validate._read_jsonl(jsonl, "request")
    except validate.FeedbackFileError as err:
        raise BadRequest(f"row 0: {err.problem}", status=422, param="rows", code="bad_row") from None
    if problems:
        p = problems[0]
        raise BadRequest(f"row {p['line'] - 1}: {p['reason']}", status=422, param="rows", code="bad_row")
    missing = [c for c in validate.REQUIRED if c not in table.column_names]
    if missing:
        raise BadRequest(f"row 0: missing_value: {missing[0]} is absent", status=422, param="rows", code="bad_row")
    good, bad = validate.validate_feedback(table, max_text_chars=max_text_chars, source="request")
    if bad.num_rows:
        first = bad.sort_by("row").slice(0, 1).to_pylist()[0]
        raise BadRequest(f"row {first['row']}: {first['reason']} ({bad.num_rows} of {len(rows)} rows refused; "
                         "nothing was stored)", status=422, param="rows", code="bad_row")
    batch = (f"k{json_digest(['feedback-key', key])[:24]}" if key is not None else None)
    return FeedbackRequest(good, batch or "", key)


# ------------------------------------------------------------------------------------------------ rate limit
class RateLimiter:
    """Token buckets per key (a user): `rate` requests per second, bursts of `burst`; at most `capacity` buckets
    (the least recently used is dropped: a dropped bucket restarts full, which only ever allows more)."""

    def __init__(self, rate: float, burst: float | None = None, capacity: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"rate={rate}: must be > 0 requests per second")
        self.rate, self.burst = float(rate), float(burst if burst is not None else max(rate, 1.0))
        self.capacity = capacity
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, keys: list[str]) -> float:
        """Take one token from each key's bucket: 0.0 when allowed (tokens taken), else the seconds to wait before
        every key has one (nothing taken)."""
        now = self.clock()
        with self._lock:
            levels = {}
            for k in keys:
                tokens, at = self._buckets.get(k, (self.burst, now))
                levels[k] = min(self.burst, tokens + (now - at) * self.rate)
            short = [1.0 - t for t in levels.values() if t < 1.0]
            if short:
                return max(short) / self.rate
            for k, t in levels.items():
                self._buckets[k] = (t - 1.0, now)
                self._buckets.move_to_end(k)
            while len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
            return 0.0


# ------------------------------------------------------------------------------------------------ refits
@dataclass
class RefitResult:
    user_ids: list[str]
    policies: dict[str, Any]           # user_id -> UserPolicy (latest row)
    records: list[dict[str, Any]]
    encoded_texts: int
    seconds: float
    requested_at: dict[str, float] = field(default_factory=dict)   # user -> first pending request's time


class OnlineRefitter:
    """Refits users of one serving release in a background thread, coalescing requests.

    Args:
        store: the store. release_manifest: the serving release's manifest (clap_version, pairs_path, fit, mode,
            min_pairs, discrete_estimator: written by the personalize stage). clap, tokenizer: the served CLaP.
        on_refit: called with each `RefitResult` (from the refit thread).
        prompt_tokens / response_tokens: the CLaP's token budgets (its manifest).
        turns: the replica's `batcher.ComputeTurns`, shared with its decode batches: the refit's CPU work (each
            piece of its encoding, then the fit) runs in turns with them instead of beside them. None: no turns.
        encode_texts_per_turn: texts encoded per turn at most (a decode batch waits at most for one such piece).
    """

    def __init__(self, store: Store, release_manifest: dict[str, Any], clap, tokenizer, *,
                 on_refit: Callable[[RefitResult], None], prompt_tokens: int, response_tokens: int,
                 max_users_per_refit: int = 256, turns=None, encode_texts_per_turn: int = 64):
        if encode_texts_per_turn < 1:
            raise ValueError(f"encode_texts_per_turn={encode_texts_per_turn} must be >= 1")
        self.turns = turns
        self.encode_texts_per_turn = encode_texts_per_turn
        self.store = store
        self.manifest = release_manifest
        self.clap, self.tokenizer = clap, tokenizer
        self.on_refit = on_refit
        self.prompt_tokens, self.response_tokens = prompt_tokens, response_tokens
        self.max_users = max_users_per_refit
        self._pending: dict[str, float] = {}
        self._markers: dict[str, set[str]] = {}     # durable marker (feedback batch) -> its users
        self._running: set[str] = set()             # users of the refit in progress
        self._cv = threading.Condition()
        self._stop = False
        self._pairs: pa.Table | None = None
        self.refits = 0
        self.users_refitted = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="online-refit", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        """Whether the release says how its users were fitted (releases from before online refits do not)."""
        return self.manifest.get("mode") == "head-only" and self.manifest.get("fit") is not None

    def request(self, user_ids: list[str], batch: str | None = None) -> None:
        """Queue refits of these users; `batch` names a durable marker (`mark_pending`) removed once every user of
        it is refitted, so refits a dying replica still owed are picked up by `recover`."""
        now = time.time()
        with self._cv:
            for u in user_ids:
                self._pending.setdefault(u, now)
            if batch is not None:
                self._markers[batch] = set(user_ids)
            self._cv.notify()

    # durable markers: serving/refits/<release>/<batch>.json {users, at}, written before the feedback's 2xx
    def _marker_dir(self) -> tuple[str, ...]:
        return ("serving", "refits", str(self.manifest.get("release", "")))

    def mark_pending(self, user_ids: list[str], batch: str) -> None:
        from latentpref.tasks.data.store import json_bytes
        self.store.write_bytes(json_bytes({"users": sorted(user_ids), "at": time.time()}),
                               *self._marker_dir(), f"{batch}.json")

    def recover(self, older_than_s: float = 0.0) -> int:
        """Re-queue the refits of markers no replica cleared (a replica died with them queued). Returns how many
        markers were re-queued. A refit done twice writes the same row: harmless."""
        now, n = time.time(), 0
        with self._cv:
            owned = set(self._markers)
        for name in self.store.listdir(*self._marker_dir()):
            batch = name.removesuffix(".json")
            if not name.endswith(".json") or batch in owned:
                continue
            try:
                marker = self.store.read_json(*self._marker_dir(), name)
            except (OSError, ValueError):
                continue
            if now - float(marker.get("at", now)) >= older_than_s:
                self.request(list(marker["users"]), batch)
                n += 1
        return n

    def _clear_markers(self, refitted: set[str]) -> None:
        with self._cv:
            waiting = set(self._pending)
            done = [b for b, users in self._markers.items() if users <= refitted and not users & waiting]
            for b in done:
                del self._markers[b]
        for b in done:
            try:
                self.store.delete(*self._marker_dir(), f"{b}.json")
            except OSError:
                log.warning("could not remove refit marker %s; it is re-queued later (harmless)", b)

    def _turn(self):
        return self.turns.turn() if self.turns is not None else contextlib.nullcontext()

    def is_pending(self, user_id: str) -> bool:
        """Whether a refit of this user is queued or running here."""
        with self._cv:
            return user_id in self._pending or user_id in self._running

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                users = sorted(self._pending, key=self._pending.get)[:self.max_users]
                requested = {u: self._pending.pop(u) for u in users}
                self._running = set(users)
            try:
                result = self.refit(users, requested)
                self.on_refit(result)
                self._clear_markers(set(users))   # forgotten users (skipped) count as done too
            except Exception:    # the feedback is stored: the next request or the night fits it
                self.errors += 1
                log.exception("online refit of %d users failed; their feedback is stored and the night fits it",
                              len(users))
            finally:
                with self._cv:
                    self._running = set()

    # the work ---------------------------------------------------------------------------------------------
    def simulated_pairs(self) -> pa.Table | None:
        """The night's simulated train pairs (the release's pairs table), read once per release."""
        if self._pairs is None and self.manifest.get("pairs_path"):
            pairs = self.store.read_table(*self.manifest["pairs_path"])
            self._pairs = pairs.filter(pc.equal(pairs["split"], "train"))
        return self._pairs

    def user_pairs(self, user_ids: list[str]) -> pa.Table:
        """Exactly the rows the night fits these users on (pipelines.personalize.training_pairs, for them)."""
        from latentpref.tasks.data.ingest import committed_rows_for
        cols = ["user_id", "prompt", "chosen", "rejected", "weight"]
        schema = pa.schema([("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                            ("rejected", pa.string()), ("weight", pa.float32())])
        parts = []
        sim = self.simulated_pairs()
        if sim is not None:
            parts.append(sim.filter(pc.is_in(sim["user_id"], value_set=pa.array(user_ids, pa.string())))
                         .select(cols).cast(schema))
        fed = committed_rows_for(self.store, user_ids)
        if fed is not None and fed.num_rows:
            parts.append(fed.select(cols).cast(schema))
        return pa.concat_tables(parts).sort_by("user_id") if parts else schema.empty_table()

    def refit(self, user_ids: list[str], requested: dict[str, float] | None = None) -> RefitResult:
        from latentpref.tasks.data.ipc import table_to_ipc
        from latentpref.tasks.policy.cache import build_latent_cache
        from latentpref.tasks.policy.table import PolicyTable
        from latentpref.tasks.policy.text_cache import TextLatentTable
        from latentpref.tasks.train.personalize import ChunkJob, fit_chunk
        from latentpref.tasks.policy.forget import is_forgotten
        t0 = time.perf_counter()
        user_ids = [u for u in user_ids if not is_forgotten(self.store, u)]    # a deletion beats a late refit
        clap_version = self.manifest["clap_version"]
        if not user_ids:
            return RefitResult([], {}, [], 0, time.perf_counter() - t0, requested or {})
        pairs = self.user_pairs(user_ids)
        prompts, chosen, rejected = (pairs[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
        texts = TextLatentTable(self.store, clap_version)
        m_prompts, m_pr, _ = texts.missing_texts(
            prompts, list(zip(prompts, chosen)) + list(zip(prompts, rejected)),
            list(zip(prompts, chosen, rejected)), discrete=False)
        encoded = len(m_prompts) + len(m_pr)
        release_id = self.manifest.get("release", "")
        job = ChunkJob(store_root=self.store.root, clap_version=clap_version, user_ids=tuple(sorted(user_ids)),
                       pairs_ipc=table_to_ipc(pairs), fit=self.manifest["fit"], mode="head-only",
                       min_pairs=int(self.manifest.get("min_pairs", 1)),
                       discrete_estimator=self.manifest.get("discrete_estimator") or "dpo",
                       night=f"{ONLINE_NIGHT_PREFIX}{release_id}")
        # the served CLaP encodes the new texts here, in the serving process (no LM decoding involved), at most
        # `encode_texts_per_turn` per turn between decode batches; the last piece, the one commit of all of them and
        # the fit share a turn (a usual refit is one turn: a decode waits for it once)
        k = self.encode_texts_per_turn
        pieces = ([(m_prompts[i:i + k], []) for i in range(0, len(m_prompts), k)]
                  + [([], m_pr[i:i + k]) for i in range(0, len(m_pr), k)])
        fragments: list[str] = []

        def encode(piece_prompts, piece_pr) -> list[str]:
            cache = build_latent_cache(self.clap, self.tokenizer, piece_prompts, piece_pr,
                                       prompt_tokens=self.prompt_tokens, response_tokens=self.response_tokens)
            return texts.write_fragments(cache)

        for piece in pieces[:-1]:
            with self._turn():
                fragments += encode(*piece)
        import torch
        threads = torch.get_num_threads()
        with self._turn():
            if pieces:
                fragments += encode(*pieces[-1])
            if fragments:
                texts.commit(fragments)
            try:
                records = fit_chunk(job)     # (a fit chunk runs on one thread: give the replica its threads back)
            finally:
                torch.set_num_threads(threads)
        policies = PolicyTable(self.store, clap_version).policies(user_ids)
        self.refits += 1
        self.users_refitted += len(user_ids)
        return RefitResult(list(user_ids), policies, records, encoded, time.perf_counter() - t0, requested or {})


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
