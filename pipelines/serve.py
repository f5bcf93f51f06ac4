"""`latentpref serve`: every user of a night behind one OpenAI-style completions API, on Ray Serve.

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "user", "best_of"}
    POST /v1/feedback      {"rows": [{"user_id", "prompt", "chosen", "rejected", ...}], "idempotency_key"}: stored
                           as an ingest batch before the answer; the users refitted here within seconds
    GET  /v1/users/{id}    the policy the user's next completion gets (`personalization`'s fields) and whether a refit
                           of theirs is queued or running, without decoding; POST /v1/users/status {"users": [ids]}: many at once
    DELETE /v1/users/{id}  forget the user: personalization stops at once, every trace purged (tasks/policy/forget)
    GET  /v1/models        the served model id, CLaP version and release
    GET  /health           liveness + what is served (no token needed: for probes)

Requests of different users are batched into one decode (`OnlineGenerator.complete`) by
`tasks/evaluate/batcher.ModelBatcher`, which forms a batch when the model is free (every request queued meanwhile;
`serve.batch` forms the next batch while the current one runs, a few requests wide under load). Each
replica watches `serving/current.json`; a new release is loaded beside the old one and swapped in with one
reference assignment: every batch reads the reference once, so in-flight requests finish on the old release
and no batch mixes two. Config-file deployments (infra/serve/) use `app_builder`.
A replica's decode batches and its online refits (POST /v1/feedback) take its cores in turns
(`batcher.ComputeTurns`, first come first served; a refit's encoding in pieces of a few texts), never both at once.

`best_of` = K is a personal best-of-K (`serving.complete_best_of`): K samples in the batch's one decode, the one
with the highest latent reward of the request's user returned; `personalization` says `best_of` and that reward
(`best_of_reward`, null where the population prior answered: then one sample is drawn). As OpenAI counts it,
`usage.completion_tokens` covers every sample drawn.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

from latentpref.tasks.evaluate.feedback import RateLimiter
from latentpref.tasks.evaluate.serve_core import (
    BadRequest,
    CompletionRequest,
    ServeLimits,
    check_bearer,
    current_release,
    load_token,
    parse_completion_request,
    parse_json_body,
)

log = logging.getLogger(__name__)
APP_NAME = "latentpref"
MAX_STATUS_USERS = 1000     # user ids per POST /v1/users/status


class ServeOptions(BaseModel):
    """Everything a replica needs; passed through Ray as a dict (and the `args:` of infra/serve/serve-config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    store: str
    model_name: str = "latentpref"
    num_replicas: int = 1
    cpus_per_replica: float = 1.0      # also the replica's torch threads
    max_batch_size: int = 32           # rows of one decode: a free model takes every queued request up to this,
    #                                    an idle one waits at most batch_wait_timeout_s to fill a batch
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 128    # per replica: must exceed max_batch_size or batches never fill
    cache_users: int = 1024            # user policies held per replica (LRU)
    reload_interval_s: float = 5.0     # how often a replica looks for a new release
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # auto: the project's LM precision (runtime.lm_dtype)
    max_prompt_chars: int = 4000
    max_tokens_cap: int = 64
    default_max_tokens: int = 16
    max_best_of: int = 8               # best_of's cap: a request costs up to this many rows of a decode
    token_file: str | None = None      # bearer token file; $LATENTPREF_SERVE_TOKEN wins; neither = no auth
    onednn_cache: int = 128            # oneDNN kernels a replica keeps (one per bf16 matmul shape; oneDNN's
    #                                    default 1024 lets RSS grow ~200 MB with the shapes seen: evaluate/memory.py)
    # POST /v1/feedback: rows stored as an ingest batch, the users refitted in this replica (head-only releases)
    feedback_rate_per_s: float = 10.0  # per user: requests per second (token bucket), 429 + Retry-After beyond
    feedback_burst: float = 10.0
    feedback_max_rows: int = 1000      # rows per request
    feedback_max_body_bytes: int = 4 * 1024 * 1024
    online_refit: bool = True          # refit users on their feedback (False: stored, fitted at the next night)
    online_poll_s: float = 1.0         # how often a replica looks for other replicas' online refits and tombstones
    refit_recover_after_s: float = 30.0   # a refit marker this old with no live owner is re-queued here
    refit_turns: bool = True           # refits and decode batches take the cores in turns (False: side by side,
    #                                    each with every torch thread: both slow down on a small box)
    refit_texts_per_turn: int = 64     # new texts a refit encodes per turn at most
    forget_lock_wait_s: float = 5.0    # DELETE /v1/users: wait this long for the store's night lock, else queue
    mlflow_tracking_uri: str | None = None   # where forgotten users' MLflow runs are (default: the store's sqlite)

    def limits(self) -> ServeLimits:
        return ServeLimits(max_prompt_chars=self.max_prompt_chars, max_tokens_cap=self.max_tokens_cap,
                           default_max_tokens=self.default_max_tokens, max_best_of=self.max_best_of)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


api = FastAPI(title="latentpref", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="Completions")
@serve.ingress(api)
class Completions:
    def __init__(self, options: dict):
        import torch

        from latentpref.tasks.data.store import Store
        self.opts = ServeOptions.model_validate(options)
        torch.set_num_threads(max(1, int(self.opts.cpus_per_replica)))
        self.limits = self.opts.limits()
        self.token = load_token(self.opts.token_file)
        self.store = Store(self.opts.store)
        from latentpref.tasks.evaluate.batcher import ComputeTurns, ModelBatcher
        self.turns = ComputeTurns()      # decode batches and online refits take the replica's cores in turns
        self.state = self._load(current_release(self.store))
        self.refitter = self._refitter(self.state)
        self.limiter = RateLimiter(self.opts.feedback_rate_per_s, self.opts.feedback_burst)
        self.reloads = 0
        self.served = 0
        self.feedback_requests = 0
        self.refit_seconds: list[float] = []
        self.batcher = ModelBatcher(self._complete_batch, max_batch_size=self.opts.max_batch_size,
                                    wait_s=self.opts.batch_wait_timeout_s)
        self._stop = threading.Event()
        threading.Thread(target=self._watch_releases, name="release-watcher", daemon=True).start()

    def _load(self, release):
        from latentpref.tasks.evaluate.online import OnlineGenerator
        t0 = time.perf_counter()
        state = OnlineGenerator.from_release(self.store, release, cache_users=self.opts.cache_users,
                                             dtype=self.opts.dtype)
        limit, P = state.clap.max_positions, state.clap.cfg.n_prefix
        if limit is not None and P + state.prompt_tokens + self.opts.max_tokens_cap > limit:
            raise ValueError(f"max_tokens_cap={self.opts.max_tokens_cap} with {P} prefix slots and "
                             f"{state.prompt_tokens} prompt tokens exceeds the base LM's {limit} positions: "
                             f"lower it to {limit - P - state.prompt_tokens}")
        log.info("serving release %s (CLaP %s), loaded in %.1fs", release.release_id, release.clap_version,
                 time.perf_counter() - t0)
        return state

    def _refitter(self, state):
        """The online refitter of a release (its fit settings, its CLaP), or None when refits are off."""
        if not self.opts.online_refit:
            return None
        from latentpref.tasks.evaluate.feedback import OnlineRefitter
        from latentpref.tasks.evaluate.serve_core import release_manifest
        manifest = {**release_manifest(self.store, state.release), "release": state.release.release_id}
        clap_manifest = self.store.read_json("models", "clap", state.release.clap_version, "_manifest.json")
        refitter = OnlineRefitter(self.store, manifest, state.clap, state.tokenizer,
                                  on_refit=lambda result, s=state: self._refitted(s, result),
                                  prompt_tokens=int(clap_manifest.get("prompt_tokens", 64)),
                                  response_tokens=int(clap_manifest.get("response_tokens") or 64),
                                  turns=self.turns if self.opts.refit_turns else None,
                                  encode_texts_per_turn=self.opts.refit_texts_per_turn)
        if not refitter.available:
            refitter.close()
            return None
        refitter.recover()          # refits a replica that died (or this one, before a restart) still owed
        return refitter

    def _refitted(self, state, result) -> None:
        state.put_refit(result.policies)   # this replica answers with them from its next batch on
        self.refit_seconds = (self.refit_seconds + [result.seconds])[-1000:]
        log.info("online refit: %d users in %.2fs (%d texts encoded)", len(result.user_ids), result.seconds,
                 result.encoded_texts)

    def _watch_releases(self) -> None:
        from latentpref.tasks.evaluate.memory import trim_memory
        last_release_check = time.monotonic()
        while not self._stop.wait(min(self.opts.online_poll_s, self.opts.reload_interval_s)):
            try:
                self.state.refresh_forgotten()   # deletion requests (other replicas, `latentpref forget`)
                self.state.refresh_online()      # other replicas' online refits
                if self.refitter is not None:    # markers a dead replica left (older than any live refit takes)
                    self.refitter.recover(older_than_s=self.opts.refit_recover_after_s)
            except Exception:
                log.exception("reading online refits / tombstones failed; retrying")
            if time.monotonic() - last_release_check < self.opts.reload_interval_s:
                continue
            last_release_check = time.monotonic()
            trim_memory()      # freed batch tensors and replaced releases back to the OS: RSS stays flat
            try:
                release = current_release(self.store)
                if release.release_id != self.state.release.release_id:
                    new = self._load(release)
                    old_refitter, self.refitter = self.refitter, self._refitter(new)
                    self.state = new           # one assignment: batches already running keep the old one
                    if old_refitter is not None:
                        old_refitter.close()
                    self.reloads += 1
            except Exception:   # a store hiccup must not kill the watcher: keep serving, retry next tick
                log.exception("looking for a new serving release failed; still serving %s",
                              self.state.release.release_id)

    def __del__(self):
        self._stop.set()

    def _complete_batch(self, requests: list[CompletionRequest]):   # runs in the batcher's worker thread
        from latentpref.tasks.evaluate.serving import complete_best_of
        state = self.state               # read once: the whole batch is served by one release
        with self.turns.turn():
            results = complete_best_of(state, requests)
        self.served += len(requests)
        return [(state, r) for r in results]

    def _refuse(self, err: BadRequest) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            check_bearer(request.headers.get("authorization"), self.token)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
                raise BadRequest(f"request body of {length} bytes exceeds {self.limits.max_body_bytes}",
                                 status=413, code="body_too_large")
            req = parse_completion_request(await request.body(), request.headers.get("content-type"),
                                           self.limits, model=self.opts.model_name)
        except BadRequest as err:
            return self._refuse(err)
        if req.user is not None:   # load the user's policy into the LRU here, concurrently, not in the model's
            await asyncio.to_thread(self.state.served_user, req.user)   # thread between two decodes
        state, chosen = await self.batcher.submit(req)
        c, release = chosen.completion, state.release
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.opts.model_name,
            "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": chosen.completion_tokens,
                      "total_tokens": c.prompt_tokens + chosen.completion_tokens},
            "personalization": {"served": "personalized" if c.personalized else "prior", "reason": c.reason,
                                "user": req.user, "clap_version": release.clap_version,
                                "user_artifact_version": c.user_artifact_version,
                                "refitted_online": c.refitted_online, "release": release.release_id,
                                "best_of": chosen.best_of, "best_of_reward": chosen.reward},
        }

    @api.post("/v1/feedback")
    async def feedback(self, request: Request):
        """Store feedback rows (the ingest contract) durably, then refit their users in this replica."""
        from latentpref.tasks.data import validate
        from latentpref.tasks.data.ingest import store_feedback
        from latentpref.tasks.evaluate.feedback import parse_feedback_request, retry_after_header
        try:
            check_bearer(request.headers.get("authorization"), self.token)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.opts.feedback_max_body_bytes:
                raise BadRequest(f"request body of {length} bytes exceeds {self.opts.feedback_max_body_bytes}",
                                 status=413, code="body_too_large")
            req = parse_feedback_request(await request.body(), request.headers.get("content-type"),
                                         max_body_bytes=self.opts.feedback_max_body_bytes,
                                         max_rows=self.opts.feedback_max_rows,
                                         idempotency_key=request.headers.get("idempotency-key"))
            wait = self.limiter.take(req.user_ids)
            if wait > 0:
                raise BadRequest(f"feedback rate limit of {self.opts.feedback_rate_per_s:g} requests per second per "
                                 f"user reached; retry in {wait:.2f}s", status=429, code="rate_limited")
        except BadRequest as err:
            response = self._refuse(err)
            if err.status == 429:
                response.headers["Retry-After"] = retry_after_header(wait)
            return response
        # durable before the answer: the batch's files, then its commit marker (what the night reads)
        report = await asyncio.to_thread(store_feedback, self.store, req.rows,
                                         validate.QUARANTINE_SCHEMA.empty_table(), source="POST /v1/feedback",
                                         rows_read=req.rows.num_rows, batch=req.batch or None)
        self.feedback_requests += 1
        refitter = self.refitter
        if refitter is not None:   # a durable marker first: a replica dying before the refit does not lose it
            await asyncio.to_thread(refitter.mark_pending, req.user_ids, report.batch)
            refitter.request(req.user_ids, report.batch)
        return {"object": "feedback", "batch": report.batch, "rows": req.rows.num_rows,
                "accepted": report.rows_accepted, "duplicate_of_stored": report.rows_duplicate_of_stored,
                "already_stored": report.already_ingested, "users": req.user_ids,
                "refit": "queued" if refitter is not None else "next night",
                "release": self.state.release.release_id}

    def _check_user_request(self, request: Request, user_id: str) -> JSONResponse | None:
        """The refusal of a /v1/users/{user_id} request (wrong token 401, malformed id 400), or None."""
        from latentpref.tasks.data.validate import InvalidUserId, check_user_id
        try:
            check_bearer(request.headers.get("authorization"), self.token)
            try:
                check_user_id(user_id)
            except InvalidUserId as err:
                raise BadRequest(str(err), param="user_id", code="invalid_user_id") from None
        except BadRequest as err:
            return self._refuse(err)
        return None

    def _user_status(self, user_id: str) -> dict:
        """What this replica would answer the user's next completion with, without decoding anything."""
        state, refitter = self.state, self.refitter
        entry = state.served_user(user_id)
        return {"object": "user", "user": user_id, "served": "personalized" if entry.reason is None else "prior",
                "reason": entry.reason, "user_artifact_version": entry.artifact_version,
                "refitted_online": entry.refitted_online,
                "refit_pending": refitter is not None and refitter.is_pending(user_id),
                "release": state.release.release_id, "clap_version": state.release.clap_version}

    @api.get("/v1/users/{user_id}")
    async def user_status(self, user_id: str, request: Request):
        """The policy the user's next completion gets here (`personalization`'s fields) and whether a refit of
        theirs is queued or running: a client sees its feedback take effect without spending a decode."""
        refused = self._check_user_request(request, user_id)
        if refused is not None:
            return refused
        return await asyncio.to_thread(self._user_status, user_id)

    @api.post("/v1/users/status")
    async def users_status(self, request: Request):
        """`GET /v1/users/{id}` for many users in one request: {"users": [ids]} -> {"data": [status, ...]}."""
        from latentpref.tasks.data.validate import InvalidUserId, check_user_id
        try:
            check_bearer(request.headers.get("authorization"), self.token)
            body = parse_json_body(await request.body(), request.headers.get("content-type"),
                                   self.limits.max_body_bytes)
            users = body.get("users") if isinstance(body, dict) else None
            if not isinstance(users, list) or not users or len(users) > MAX_STATUS_USERS:
                raise BadRequest(f'body must be {{"users": [user ids]}} with 1 to {MAX_STATUS_USERS} ids',
                                 param="users", code="invalid_users")
            for i, user_id in enumerate(users):
                try:
                    check_user_id(user_id)
                except InvalidUserId as err:
                    raise BadRequest(f"users[{i}]: {err}", param="users", code="invalid_user_id") from None
        except BadRequest as err:
            return self._refuse(err)
        return {"object": "list", "data": await asyncio.to_thread(lambda: [self._user_status(u) for u in users])}

    @api.delete("/v1/users/{user_id}")
    async def forget_user(self, user_id: str, request: Request):
        """Forget a user: personalization stops at once (tombstone, this replica's cache; the others within
        online_poll_s), then every trace is purged from the store and MLflow, now or, while a night holds the
        store, when that night ends (202)."""
        from latentpref.pipelines.config import RuntimeConfig
        from latentpref.pipelines.runtime import mlflow_uris
        from latentpref.tasks.data.locks import StoreLocked, store_lock
        from latentpref.tasks.policy.forget import forget_in_mlflow, forget_user, mark_forgotten
        refused = self._check_user_request(request, user_id)
        if refused is not None:
            return refused
        stone = await asyncio.to_thread(mark_forgotten, self.store, user_id)
        self.state.forget(user_id)

        def purge():
            try:
                with store_lock(self.store, "nightly", wait_s=float(self.opts.forget_lock_wait_s)):
                    report = forget_user(self.store, user_id)
                    uri = self.opts.mlflow_tracking_uri or mlflow_uris(RuntimeConfig(store=self.opts.store),
                                                                       self.store)[0]
                    try:
                        report["mlflow"] = forget_in_mlflow(uri, user_id)
                    except Exception as err:   # the store is purged; say what is left instead of a bare 500
                        return 500, {**report, "mlflow": {"error": str(err)[:500]},
                                     "purge": "store done, MLflow incomplete: DELETE again or `latentpref forget`"}
                    return 200, report
            except StoreLocked:
                mark_forgotten(self.store, user_id, pending=True)
                return 202, {"tombstone": stone["user_key"], "purge": "queued until the running night ends"}
        status, report = await asyncio.to_thread(purge)
        return JSONResponse({"object": "user.deleted", "deleted": True, **report}, status_code=status)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            check_bearer(request.headers.get("authorization"), self.token)
        except BadRequest as err:
            return self._refuse(err)
        release = self.state.release
        return {"object": "list", "data": [{"id": self.opts.model_name, "object": "model",
                                            "created": int(release.published_at or 0), "owned_by": "latentpref",
                                            "clap_version": release.clap_version, "release": release.release_id}]}

    @api.get("/health")
    async def health(self):
        state = self.state
        return {"status": "ok", "release": state.release.release_id, "clap_version": state.release.clap_version,
                "reloads": self.reloads, "served": self.served, "batches": self.batcher.batches,
                "mean_batch_size": round(self.batcher.items / max(self.batcher.batches, 1), 2),
                "cached_users": len(state.users), "feedback_requests": self.feedback_requests,
                "online_refits": 0 if self.refitter is None else self.refitter.refits,
                "online_refit_pending": 0 if self.refitter is None else self.refitter.pending(),
                "online_refit_errors": 0 if self.refitter is None else self.refitter.errors,
                "online_refit_seconds_p50": _quantile(self.refit_seconds, 0.5),
                "online_refit_seconds_p99": _quantile(self.refit_seconds, 0.99),
                "cache_capacity": state.users.capacity, "pid": os.getpid(), "rss_mb": round(_rss_mb(), 1)}


def build_app(options: ServeOptions):
    """The Serve application (bind the deployment with its options)."""
    return Completions.options(
        num_replicas=options.num_replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "runtime_env": {"env_vars": {
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(options.onednn_cache)}}},   # read when the replica starts
    ).bind(options.model_dump())


def app_builder(args: dict):
    """Entry point for Serve config files: `import_path: latentpref.pipelines.serve:app_builder`, `args:` = the
    ServeOptions fields (validated: a typo fails the deploy, naming the key)."""
    return build_app(ServeOptions.model_validate(args))


class ServeStartFailed(RuntimeError):
    """`latentpref serve` could not start within its budget (the CLI prints this one line, no traceback)."""


# Ray Serve's own readiness checks are sized for an idle machine (the proxy must answer within 5 s, three times):
# beside a night's CPU-bound processes on a small box it is killed before it is up. A serving process gives them a
# budget that survives a busy box; set the variables to override (a local Ray started here inherits this process's
# environment; on a cluster, set them on the nodes).
SERVE_READINESS_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                       "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                       "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "10"}


def run(options: ServeOptions, *, host: str, port: int, ray_address: str | None = None, num_cpus: int = 2,
        object_store_mb: int = 512, blocking: bool = True, start_budget_s: float = 600.0) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the app; block until Ctrl-C.

    A start that fails (a busy box: the proxy or a replica not ready in time) is retried with backoff until
    `start_budget_s` has passed.

    Raises:
        ServeStartFailed: the app could not be started within the budget; the message says why in one line.
    """
    import ray
    for key, value in SERVE_READINESS_ENV.items():
        os.environ.setdefault(key, value)   # inherited by the Serve controller and proxy this process starts
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb * 1024 * 1024,
                     include_dashboard=False, logging_level=logging.WARNING)
    deadline = time.monotonic() + start_budget_s
    attempt, wait = 0, 2.0
    while True:
        attempt += 1
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(options), name=APP_NAME, route_prefix="/")
            break
        except Exception as err:   # Ray raises several kinds (ActorDiedError, RuntimeError, TimeoutError, ...)
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
            if time.monotonic() + wait > deadline:
                with contextlib.suppress(Exception):
                    serve.shutdown()
                raise ServeStartFailed(f"serve could not start in {start_budget_s:.0f}s ({attempt} attempts; the "
                                       f"box may be too busy, or see the Ray logs): last error {why}") from None
            log.warning("serve start attempt %d failed (%s); retrying in %.0fs", attempt, why, wait)
            with contextlib.suppress(Exception):
                serve.shutdown()
            time.sleep(wait)
            wait = min(wait * 2, 30.0)
    log.info("serving %s on http://%s:%d/v1 (store %s)", options.model_name, host, port, options.store)
    if not blocking:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
