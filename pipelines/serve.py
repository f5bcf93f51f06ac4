"""`latentpref serve`: every user of a night behind one OpenAI-style completions API, on Ray Serve.

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "user", "best_of"}
    GET  /v1/models        the served model id, CLaP version and release
    GET  /health           liveness + what is served (no token needed: for probes)

Requests of different users are batched into one decode (`OnlineGenerator.complete`) by
`tasks/evaluate/batcher.ModelBatcher`, which forms a batch when the model is free (every request queued meanwhile;
`serve.batch` forms the next batch while the current one runs, a few requests wide under load). Each
replica watches `serving/current.json`; a new release is loaded beside the old one and swapped in with one
reference assignment: every batch reads the reference once, so in-flight requests finish on the old release
and no batch mixes two. Config-file deployments (infra/serve/) use `app_builder`.

`best_of` = K is a personal best-of-K (`serving.complete_best_of`): K samples in the batch's one decode, the one
with the highest latent reward of the request's user returned; `personalization` says `best_of` and that reward
(`best_of_reward`, null where the population prior answered: then one sample is drawn). As OpenAI counts it,
`usage.completion_tokens` covers every sample drawn.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime

import asyncio
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

from latentpref.tasks.evaluate.serve_core import (
    BadRequest,
    CompletionRequest,
    ServeLimits,
    check_bearer,
    current_release,
    load_token,
    parse_completion_request,
)

log = logging.getLogger(__name__)
APP_NAME = "latentpref"


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

    def limits(self) -> ServeLimits:
        return ServeLimits(max_prompt_chars=self.max_prompt_chars, max_tokens_cap=self.max_tokens_cap,
                           default_max_tokens=self.default_max_tokens, max_best_of=self.max_best_of)


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
        self.state = self._load(current_release(self.store))
        self.reloads = 0
        self.served = 0
        from latentpref.tasks.evaluate.batcher import ModelBatcher
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

    def _watch_releases(self) -> None:
        from latentpref.tasks.evaluate.memory import trim_memory
        while not self._stop.wait(self.opts.reload_interval_s):
            trim_memory()      # freed batch tensors and replaced releases back to the OS: RSS stays flat
            try:
                release = current_release(self.store)
                if release.release_id != self.state.release.release_id:
                    new = self._load(release)
                    self.state = new           # one assignment: batches already running keep the old one
                    self.reloads += 1
            except Exception:   # a store hiccup must not kill the watcher: keep serving, retry next tick
                log.exception("looking for a new serving release failed; still serving %s",
                              self.state.release.release_id)

    def __del__(self):
        self._stop.set()

    def _complete_batch(self, requests: list[CompletionRequest]):   # runs in the batcher's worker thread
        from latentpref.tasks.evaluate.serving import complete_best_of
        state = self.state               # read once: the whole batch is served by one release
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
                                "user_artifact_version": c.user_artifact_version, "release": release.release_id,
                                "best_of": chosen.best_of, "best_of_reward": chosen.reward},
        }

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
                "cached_users": len(state.users),
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


def run(options: ServeOptions, *, host: str, port: int, ray_address: str | None = None, num_cpus: int = 2,
        object_store_mb: int = 512, blocking: bool = True) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the app; block until Ctrl-C."""
    import ray
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb * 1024 * 1024,
                     include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
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
