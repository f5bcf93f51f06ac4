"""Bounded load test of `latentpref serve` (Ray Serve on 127.0.0.1) over a tiny-preset store with 10,000 users,
with a new night published in the middle of it; or (`--store`) a small load over a finished night's store.

    python benchmarks/serve.py --out benchmarks/results/serve.json
    python benchmarks/serve.py --out benchmarks/results/serve_smollm2.json --store ./latentpref-store   (a default night's store)

Tiny mode (the default; also written under "setup" in the JSON, with the time of every phase):
1. a tiny store from the real nightly flow up to `personalize` (`--fitted` simulated users really fitted; this
   publishes release 1);
2. 10,000 stored users (`--users`): the fitted heads copied under new user ids with the personalize stage's own
   policy-table writer (`PolicyTable.stage` per chunk of `--chunk` users as a night's Ray tasks write them, one
   `commit` and a night tag as the driver does), then release 1 republished at that tag (`publish_release`);
3. a reference run: the night's store with 100 users (`--reference-users`: its really fitted users plus copies),
   put through exactly the procedure of step 4 (same requests, concurrency, warm-up, baseline and a night 2
   published under load), so its RSS at the end differs from step 4's only by the number of stored users;
4. the measured app: one request at a time (sequential baseline, `--sequential` requests before the load and as
   many after it: the box is shared and its load drifts, so "sequential_tokens_per_s" is the mean of the two and
   both are in the JSON), then `--requests` requests from `--distinct-users` users with `--concurrency` client
   threads. When request `--switch-at` is taken, night 2 starts in its own process (a batch job beside the
   server, on the same 2 cores: niceness +`--night-nice`, as one would run it) and writes what a night writes: a
   new CLaP version folder (the same weights under a new version: the test is about versions),
   models/clap/current.json flipped first (as pretrain does), the really-fitted users refitted by
   `personalize.fit_chunk` against it with night 1's fit settings, every copied user's head rewritten for it
   (staged per chunk of `--chunk`, one commit, the night's tag), the night's user records
   (runs/<run>/personalize_users.parquet), then the release published at that tag: the switch is a tag switch. The load continues until the new release has answered `--after-switch` requests (so the
   switch always happens under load); "requests" counts everything sent. "tokens_per_s_around_night2" splits the
   load's tokens/s into before night 2 started, while it was written and after its release was published.
The server runs as shipped (`ServeOptions` defaults: batch_wait_timeout_s 0.01, so a lone request of the
sequential baseline waits 10 ms for company) with max_batch_size = concurrency and one CPU (torch thread) per
replica; the client threads run in this process, on the same 2 cores. The JSON is written before the temporary
stores are deleted (about a minute for 60,000 files on this box).
A response is "mixed" when its user fit belongs to another CLaP than the one that answered, or a stored user got
the prior because of a version mismatch.

`--store DIR` mode (e.g. a default night on SmolLM2-135M): DIR is linked file by file into a temporary folder
(never modified: every store write replaces a file), no users are added (`--users 0`), no reference run and no
night switch unless asked for (`--switch`), and the load is small: 64 requests from the store's users, 8
concurrent, 16 tokens, a replica with 2 CPUs.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time

log = logging.getLogger("benchmarks.serve")
HOST = "127.0.0.1"
TARGET_SPEEDUP = 5.0
PROMPTS = ["The movie was", "I thought the acting", "This film is a", "The plot of this story", "Honestly, the ending",
           "What I liked most", "The director clearly", "Two hours of"]
KEYS = ("requests", "errors", "tokens_per_s", "sequential_tokens_per_s", "speedup", "p50_ms", "p99_ms",
        "rss_mb_start", "rss_mb_end", "reloads", "mixed_version_responses")


def _free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Client:
    """One keep-alive HTTP connection (one per client thread)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=300)

    def post(self, body: dict) -> tuple[int, dict]:
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def get(self, path: str) -> dict:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        return json.loads(resp.read())


def link_tree(src: str, dst: str, ignore=None) -> None:
    """Copy a folder by hard links where possible: store writes replace files (temp + rename), never edit them, so
    the source is never modified."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, ignore=ignore, copy_function=link)


# ---------------------------------------------------------------------------------------------------- store setup
def build_store(root: str, n_fitted: int) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generate import build_store as build   # the real nightly up to personalize, tiny preset, smaller still
    return build(root, n_fitted)[1]


def release_users(store, release) -> list[str]:
    manifest = store.read_json("serving", "releases", release.release_id, "_manifest.json")
    return store.read_table(*manifest["records_path"])["user_id"].to_pylist()


def fitted_users(store, release) -> list:
    """The really fitted (non cold-start) users' policies (`UserPolicy`: manifest + head) of a release published by
    the personalize stage."""
    from latentpref.tasks.evaluate.serve_core import release_fit
    out = []
    for u in release_users(store, release):
        policy, _ = release_fit(store, u, release)
        if policy is not None and not policy.cold_start:
            out.append(policy)
    return out


def copy_users(store, sources: list, n: int, clap_version: str, *, prefix: str = "bench", chunk: int = 256,
               night: str = "") -> tuple[list[str], list[dict]]:
    """n users `<prefix>-00000`..., each a copy of a fitted head (round robin), written as a night writes them: the
    policy table's `stage` per chunk of `chunk` users (what each Ray task does), then one `commit` and the night's tag
    (what the driver does). Returns (user ids, records)."""
    from latentpref.tasks.policy.store import HEAD_FILE, fit_version
    from latentpref.tasks.policy.table import PolicyTable, StagedChunk, night_tag
    table = PolicyTable(store, clap_version)
    read_version = table.latest_version()
    staged = StagedChunk(read_version=read_version)
    ids, fits, records = [], [], []
    for i in range(n):
        src = sources[i % len(sources)]
        m = src.manifest
        user_id = f"{prefix}-{i:05d}"
        data_hash = f"{m['data_hash']}x{i}"
        fits.append((user_id, fit_version(clap_version, "head-only", data_hash, m.get("fit_settings")), HEAD_FILE,
                     src.tensors, {"cold_start": False, "n_pairs": m.get("n_pairs"), "data_hash": data_hash,
                                   "clap_version": clap_version, "mode": "head-only", "fit_seconds": 0.0,
                                   "fit_settings": m.get("fit_settings"), "copied_from": m["user_id"]}))
        ids.append(user_id)
        if len(fits) == chunk or i == n - 1:
            part, recs = table.stage(fits, read_version=read_version, night=night)
            staged, records, fits = staged + part, records + recs, []
    table.commit(staged, message=f"benchmark copies: {len(ids)} users")
    if night:
        table.tag(night_tag(night))
    return ids, records


def _records_table(records: list[dict]):
    import pyarrow as pa
    return pa.Table.from_pylist([{k: r.get(k) for k in ("user_id", "status", "mode", "cold_start", "n_pairs",
                                                        "fit_seconds", "artifact_bytes", "version", "data_hash")}
                                 for r in records])


def night_two(root: str, clap_v1: str, sources: list[dict], n_copies: int, chunk: int, niceness: int, queue) -> None:
    """Night 2 in its own process (see the module docstring); puts its phase timings on `queue`, the release last.
    `niceness` is added to this process's (a batch job beside a latency-bound server)."""
    logging.basicConfig(level=logging.WARNING)
    os.nice(niceness)
    import pyarrow as pa
    import pyarrow.compute as pc

    from latentpref.tasks.data.ipc import table_to_ipc
    from latentpref.tasks.data.store import Store
    from latentpref.tasks.evaluate.serve_core import publish_release
    from latentpref.tasks.train.personalize import ChunkJob, fit_chunk
    try:
        done: dict = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
        t0 = time.perf_counter()
        store = Store(root)
        v2 = f"{clap_v1[:8]}n2{int(time.time()) % 100000:05d}"
        link_tree(store.url("models", "clap", clap_v1), store.url("models", "clap", v2))
        manifest = {**store.read_json("models", "clap", clap_v1, "_manifest.json"), "version": v2}
        store.write_json(manifest, "models", "clap", v2, "_manifest.json")
        store.write_json({"version": v2}, "models", "clap", "current.json")        # pretrain flips it before users
        link_tree(store.url("cache", clap_v1), store.url("cache", v2))   # the content-keyed latent table
        pop = [d for d in store.listdir("data", "population") if store.exists("data", "population", d, "pairs.parquet")]
        pairs = store.read_table("data", "population", pop[0], "pairs.parquet")
        pairs = pairs.filter(pc.equal(pairs["split"], "train"))
        real = sorted(p.manifest["user_id"] for p in sources)
        pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(real))).sort_by("user_id")
        pairs = pairs.select(["user_id", "prompt", "chosen", "rejected", "weight"]).cast(pa.schema([
            ("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
            ("weight", pa.float32())]))
        import dataclasses

        from latentpref.tasks.policy.settings import FitSettings
        night1 = sources[0].manifest.get("fit_settings") or {"steps": 30, "min_pairs": 1}   # night 1's settings
        settings = {f.name: night1[f.name] for f in dataclasses.fields(FitSettings) if f.name in night1}
        min_pairs = int(night1.get("min_pairs", 1))
        estimator = night1.get("discrete_estimator") or "dpo"
        records = fit_chunk(ChunkJob(store_root=store.root, clap_version=v2, user_ids=tuple(real),
                                     pairs_ipc=table_to_ipc(pairs), fit=settings, mode="head-only",
                                     min_pairs=min_pairs, discrete_estimator=estimator, night="bench-night-2"))
        done["fit_s"] = round(time.perf_counter() - t0, 2)
        from latentpref.tasks.policy.table import PolicyTable
        refitted = PolicyTable(store, v2).policies(real)
        t1 = time.perf_counter()
        _, copied = copy_users(store, [refitted[p.manifest["user_id"]] for p in sources], n_copies, v2, chunk=chunk,
                               night="bench-night-2")
        done["users_written"] = len(copied) + len(records)
        done["users_write_s"] = round(time.perf_counter() - t1, 2)
        records += copied
        records_path = ("runs", "bench-night-2", "personalize_users.parquet")
        store.write_table(_records_table(records), *records_path)
        release = publish_release(store, clap_version=v2, run_id="bench-night-2", mode="head-only",
                                  n_users=len(records), records_path=list(records_path),
                                  last_written_at=max(r["written_at"] for r in records),
                                  policy_tag="night-bench-night-2")
        done.update(release=release.release_id, clap_version=v2, published_s=round(time.perf_counter() - t0, 2),
                    published_at=time.time(), load_average_1m_at_publish=round(os.getloadavg()[0], 2))
        queue.put(done)
    except BaseException as err:   # the parent reports it (and stops waiting for the switch)
        queue.put({"error": repr(err)})
        raise


# ---------------------------------------------------------------------------------------------------- load
def sequential(port: int, users: list[str], n: int, max_tokens: int) -> tuple[float, int, float]:
    client = Client(port)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(n):
        status, body = client.post({"model": "latentpref", "prompt": PROMPTS[i % len(PROMPTS)],
                                    "max_tokens": max_tokens, "temperature": 0, "user": users[i % len(users)]})
        if status != 200:
            raise RuntimeError(f"sequential request failed: {status} {body}")
        tokens += body["usage"]["completion_tokens"]
    seconds = time.perf_counter() - t0
    return tokens / seconds, tokens, seconds


def load(port: int, users: list[str], *, n_requests: int, concurrency: int, max_tokens: int,
         on_progress=None, on_response=None, until=None, max_requests: int | None = None) -> dict:
    """`n_requests` requests (user i % len(users)) from `concurrency` threads; keeps going past n_requests while
    `until()` is False (at most max_requests)."""
    lock = threading.Lock()
    state = {"next": 0}
    latencies, errors, responses = [], [], []
    tokens = [0]

    def take() -> int | None:
        with lock:
            i = state["next"]
            if i >= (max_requests or n_requests) or (i >= n_requests and (until is None or until())):
                return None
            state["next"] = i + 1
            return i

    def worker():
        client = Client(port)
        while (i := take()) is not None:
            if on_progress is not None:
                on_progress(i)
            body = {"model": "latentpref", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "user": users[i % len(users)]}
            t0 = time.perf_counter()
            try:
                status, out = client.post(body)
            except Exception as err:   # a dropped connection is an error of the server
                status, out = 0, {"error": repr(err)}
                client = Client(port)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if status != 200:
                    errors.append((status, out))
                else:
                    if on_response is not None:
                        on_response(out)
                    tokens[0] += out["usage"]["completion_tokens"]
                    responses.append((time.time(), body["user"], out["personalization"],
                                      out["usage"]["completion_tokens"]))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors, "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "responses": responses}


def _windows(responses, night: dict) -> dict | None:
    """Tokens/s of the load before night 2 started, while it was written, and after its release was published."""
    if "published_at" not in night:
        return None
    start, end = night["started_at"], night["published_at"]
    t0, t1 = min(r[0] for r in responses), max(r[0] for r in responses)
    out = {}
    for name, lo, hi in (("before", t0, start), ("during", start, end), ("after", end, t1)):
        tokens = sum(r[3] for r in responses if lo <= r[0] < hi or (name == "after" and r[0] == hi))
        out[name] = {"seconds": round(hi - lo, 1), "tokens_per_s": round(tokens / (hi - lo), 1) if hi > lo else None}
    return out


def mixed(responses, stored: set[str]) -> int:
    bad = 0
    for _, user, p, _ in responses:
        if p["served"] == "personalized" and not (p["user_artifact_version"] or "").startswith(p["clap_version"] + "-"):
            bad += 1
        elif p["served"] == "prior" and user in stored and "cold start" not in (p["reason"] or ""):
            bad += 1    # every stored user has a fit of both CLaPs: the prior means a version mismatch
    return bad


def deploy(store_root: str, args) -> None:
    from ray import serve

    from latentpref.pipelines.serve import ServeOptions, build_app
    options = ServeOptions(store=store_root, max_batch_size=args.concurrency, batch_wait_timeout_s=args.batch_wait,
                           max_ongoing_requests=max(128, 4 * args.concurrency), cache_users=args.cache_users,
                           reload_interval_s=1.0, max_tokens_cap=max(64, args.max_tokens),
                           cpus_per_replica=args.replica_cpus)
    serve.run(build_app(options), name="latentpref", route_prefix="/")


class Phases:
    """Wall seconds and load average of each setup phase (the box is shared: both go in the JSON)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.out: dict = {}

    def __call__(self, name: str):
        phases = self

        class Phase:
            def __enter__(self):
                self.t = time.perf_counter()
                log.info("%s ...", name)

            def __exit__(self, *exc):
                phases.out[name] = {"seconds": round(time.perf_counter() - self.t, 2),
                                    "load_average_1m_after": round(os.getloadavg()[0], 2)}
                log.info("%s: %.1fs", name, phases.out[name]["seconds"])
        return Phase()


def measured_run(port: int, root: str, users: list[str], warm: list[str], args, *, sources: list[dict],
                 clap_v1: str, n_copies: int, phase, prefix: str) -> dict:
    """Deploy the app over `root`, warm it up, the sequential baseline, then the load with night 2 published
    under it (`--switch`); the same procedure for the reference store and the measured one."""
    from ray import serve
    with phase(f"{prefix}deploy_and_warm_up"):
        deploy(root, args)
        load(port, warm, n_requests=args.warmup, concurrency=args.concurrency, max_tokens=args.max_tokens)
        rss_start = Client(port).get("/health")["rss_mb"]
    with phase(f"{prefix}sequential_baseline"):
        seq_tps, _, seq_s = sequential(port, warm, args.sequential, args.max_tokens)
    night: dict = {}
    proc = None
    if not args.switch:
        progress = None
    else:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        started = threading.Event()

        def receive():
            night.update(queue.get())

        def progress(i):
            nonlocal proc
            if i >= args.switch_at and not started.is_set():
                started.set()
                night["started_at_request"] = i
                night["started_at"] = time.time()
                proc = ctx.Process(target=night_two, args=(root, clap_v1, sources, n_copies, args.chunk,
                                                           args.night_nice, queue), daemon=True)
                proc.start()
                threading.Thread(target=receive, daemon=True).start()
    samples: list[float] = []
    sampling = threading.Event()

    def sample_load():   # the box is shared: the load average while this run's load is on
        while not sampling.wait(2.0):
            samples.append(os.getloadavg()[0])
    threading.Thread(target=sample_load, daemon=True).start()
    with phase(f"{prefix}load"):
        res = _load_until_switched(port, users, args, progress, night)
    sampling.set()
    if proc is not None:
        proc.join(timeout=60)
    with phase(f"{prefix}sequential_baseline_after"):   # again after the load: the box's load drifts
        seq_tps_after, _, seq_s_after = sequential(port, warm, args.sequential, args.max_tokens)
    night_windows = _windows(res["responses"], night)
    health = Client(port).get("/health")
    serve.delete("latentpref")
    return {"res": res, "health": health, "rss_start": rss_start, "seq_tps": (seq_tps + seq_tps_after) / 2,
            "seq_tps_before_after": [round(seq_tps, 1), round(seq_tps_after, 1)], "seq_s": seq_s + seq_s_after,
            "night_windows": night_windows,
            "night": night, "load_average_1m": {"mean": round(sum(samples) / max(len(samples), 1), 2),
                                                "max": round(max(samples, default=0.0), 2)}}


def run(args, write) -> dict:
    """The whole benchmark; `write(result)` is called before the temporary stores are cleaned up."""
    import ray
    from ray import serve

    from latentpref.tasks.data.store import Store
    from latentpref.tasks.evaluate.serve_core import current_release, publish_release
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    setup: dict = {"load_average_1m_at_start": round(os.getloadavg()[0], 2), "started_at": time.strftime(
        "%Y-%m-%dT%H:%M:%S")}
    phase = Phases()
    try:
        root = os.path.join(tmp, "store")
        if args.store:
            with phase("store_link_copy"):
                link_tree(args.store, root, ignore=shutil.ignore_patterns("mlflow", "runs_local", "ray_train", "locks"))
            setup["store"] = f"{args.store} (linked file by file into a temporary folder)"
        else:
            with phase("store_build"):
                build_store(root, args.fitted)
            setup["store"] = f"real nightly flow up to personalize, tiny preset, {args.fitted} simulated users"
        store = Store(root)
        release1 = current_release(store)
        sources = fitted_users(store, release1)
        if not sources:
            raise RuntimeError("the store has no fitted (non cold-start) user to copy")
        own_users = release_users(store, release1)
        ref_root = os.path.join(tmp, "store-ref")
        if args.reference_users:   # the night's store as it is (its own users), before the copies are added
            link_tree(root, ref_root, ignore=shutil.ignore_patterns("mlflow", "ray_train", "locks"))

        def add_copies(target, n: int, tag: str) -> list[str]:
            copies, records = copy_users(target, sources, n, release1.clap_version, chunk=args.chunk,
                                         night=f"bench-night-1-{tag}")
            records_path = ("runs", f"bench-night-1-{tag}", "personalize_users.parquet")
            target.write_table(_records_table(records), *records_path)
            publish_release(target, clap_version=release1.clap_version, run_id=f"bench-night-1-{tag}",
                            mode="head-only", n_users=len(copies) + len(own_users), records_path=list(records_path),
                            policy_tag=f"night-bench-night-1-{tag}")
            return copies

        copies: list[str] = []
        if args.users:
            with phase("copy_users_and_publish"):
                copies = add_copies(store, args.users, "main")
            setup["copies"] = ("fitted heads copied under new ids with the night's policy-table writer "
                               f"(PolicyTable.stage per chunk of {args.chunk}, one commit, a night tag: same bytes, "
                               "own manifest and version); release republished at that tag")
        setup.update(really_fitted_users=len(sources), store_users=len(own_users), copied_users=len(copies))

        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        port = _free_port()
        serve.start(http_options={"host": HOST, "port": port})

        ref = None
        if args.reference_users:   # the same procedure over a store with 100 users
            ref_copies = add_copies(Store(ref_root), max(0, args.reference_users - len(own_users)), "ref")
            ref_users = own_users + ref_copies
            ref = measured_run(port, ref_root, ref_users, ref_users[-64:], args, sources=sources,
                               clap_v1=release1.clap_version, n_copies=len(ref_copies), phase=phase,
                               prefix="reference_")
            ref["stored_users"] = len(ref_users)
            shutil.rmtree(ref_root, ignore_errors=True)

        users = (copies or own_users)[:args.distinct_users]
        warm = [f"bench-{i:05d}" for i in range(args.users - 64, args.users)] if copies else users
        main_run = measured_run(port, root, users, warm, args, sources=sources, clap_v1=release1.clap_version,
                                n_copies=len(copies), phase=phase, prefix="")
        res, health, night = main_run["res"], main_run["health"], main_run["night"]
        rss_end = health["rss_mb"]
        rss_ref = None if ref is None else ref["health"]["rss_mb"]
        responses = res["responses"]
        after = [r for r in responses if r[2]["release"] == night.get("release")]
        speedup = res["tokens_per_s"] / main_run["seq_tps"]
        stored = set(copies) | set(own_users)
        result = {
            "requests": res["requests"],
            "errors": len(res["errors"]),
            "tokens_per_s": round(res["tokens_per_s"], 1),
            "sequential_tokens_per_s": round(main_run["seq_tps"], 1),
            "speedup": round(speedup, 2),
            "p50_ms": round(res["p50_ms"], 1),
            "p99_ms": round(res["p99_ms"], 1),
            "rss_mb_start": main_run["rss_start"],
            "rss_mb_end": rss_end,
            "reloads": health["reloads"],
            "mixed_version_responses": mixed(responses, stored),
            "rss_mb_end_100_users": rss_ref,
            "rss_end_vs_100_users": None if rss_ref is None else round(rss_end / rss_ref, 4),
            "meets_target": {"speedup": speedup >= TARGET_SPEEDUP, "errors": not res["errors"],
                             "switch": (health["reloads"] == 1 and bool(after)) if args.switch else None,
                             "rss_within_10pct": None if rss_ref is None else abs(rss_end / rss_ref - 1) <= 0.10},
            "error_samples": [str(e)[:300] for e in res["errors"][:5]],
            "stored_users": len(stored),
            "distinct_users": len(set(users)),
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "decoding": "greedy",
            "cache_users": args.cache_users,
            "replica_cpus": args.replica_cpus,
            "batch_wait_s": args.batch_wait,
            "batches": health["batches"],
            "mean_batch_size": health["mean_batch_size"],
            "responses_after_switch": len(after),
            "responses_by_clap": {v: sum(1 for r in responses if r[2]["clap_version"] == v)
                                  for v in sorted({r[2]["clap_version"] for r in responses})},
            "prior_responses": sum(1 for r in responses if r[2]["served"] == "prior"),
            "night2": night or None,
            "reference_100_users": None if ref is None else _summary(ref, ref["stored_users"]),
            "load_seconds": round(res["seconds"], 1),
            "tokens_per_s_around_night2": main_run["night_windows"],
            "sequential_requests": args.sequential,
            "sequential_tokens_per_s_before_after_load": main_run["seq_tps_before_after"],
            "sequential_seconds": round(main_run["seq_s"], 1),
            "setup": {**setup, "phases": phase.out, "total_seconds": round(time.perf_counter() - phase.t0, 1),
                      "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                      "command": " ".join(sys.argv)},
            "cpu_count": os.cpu_count(),
            "load_average_1m": main_run["load_average_1m"]["mean"],
            "load_average_1m_during_load": main_run["load_average_1m"],
            "machine": platform.machine(),
        }
        write(result)
        return result
    finally:
        t0 = time.perf_counter()
        try:
            ray.shutdown()        # ends Serve's actors too (serve.shutdown() waits on their graceful shutdown)
        except Exception:
            pass
        t1 = time.perf_counter()
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("cleanup: ray %.1fs, temporary stores %.1fs", t1 - t0, time.perf_counter() - t1)


def _summary(run_: dict, n_users: int) -> dict:
    res, health = run_["res"], run_["health"]
    return {"stored_users": n_users, "requests": res["requests"], "errors": len(res["errors"]),
            "tokens_per_s": round(res["tokens_per_s"], 1), "sequential_tokens_per_s": round(run_["seq_tps"], 1),
            "speedup": round(res["tokens_per_s"] / run_["seq_tps"], 2), "p50_ms": round(res["p50_ms"], 1),
            "p99_ms": round(res["p99_ms"], 1), "rss_mb_start": run_["rss_start"], "rss_mb_end": health["rss_mb"],
            "reloads": health["reloads"], "mean_batch_size": health["mean_batch_size"],
            "mixed_version_responses": mixed(res["responses"], {r[1] for r in res["responses"]}),
            "night2_users_written": (run_["night"] or {}).get("users_written"),
            "sequential_tokens_per_s_before_after_load": run_["seq_tps_before_after"],
            "tokens_per_s_around_night2": run_["night_windows"],
            "load_average_1m_during_load": run_["load_average_1m"]}


def _load_until_switched(port, users, args, progress, night) -> dict:
    """`load` that keeps going past --requests until night 2's release has answered --after-switch requests (or
    night 2 failed)."""
    after = [0]

    def seen(out):
        if "release" in night and out["personalization"]["release"] == night["release"]:
            after[0] += 1

    def until():
        return not args.switch or "error" in night or ("release" in night and after[0] >= args.after_switch)

    return load(port, users, n_requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                on_progress=progress, on_response=seen, max_requests=args.max_requests, until=until)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--store", help="serve a finished night's store (linked into a temporary folder; never modified)")
    p.add_argument("--fitted", type=int, default=20, help="users really fitted by the nightly flow (tiny mode)")
    p.add_argument("--users", type=int, help="users added as copies of the fitted ones (default 10,000; --store: 0)")
    p.add_argument("--chunk", type=int, default=256, help="users written together (PersonalizeConfig.users_per_task)")
    p.add_argument("--requests", type=int, help="default 2,000 (--store: 64)")
    p.add_argument("--max-requests", type=int, default=8000, help="bound when waiting for the switch")
    p.add_argument("--distinct-users", type=int, default=1000)
    p.add_argument("--concurrency", type=int, help="default 32 (--store: 8)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sequential", type=int,
                   help="one-at-a-time requests before the load and again after it (default 64; --store: 8)")
    p.add_argument("--warmup", type=int, help="requests before measuring (default 64; --store: 8)")
    p.add_argument("--cache-users", type=int, default=256, help="server LRU (smaller than distinct users)")
    p.add_argument("--replica-cpus", type=float, help="CPUs (= torch threads) of the replica (default 1; --store: 2)")
    p.add_argument("--reference-users", type=int, help="users of the RSS reference run (default 100; --store: 0)")
    p.add_argument("--batch-wait", type=float, default=0.01,
                   help="batch_wait_timeout_s: how long a batch on an idle model waits to fill (product default)")
    p.add_argument("--switch", action=argparse.BooleanOptionalAction, default=None,
                   help="publish night 2 under load (default on; --store: off)")
    p.add_argument("--switch-at", type=int, default=300, help="request index at which night 2 starts")
    p.add_argument("--after-switch", type=int, default=200)
    p.add_argument("--night-nice", type=int, default=19,
                   help="niceness added to night 2's process (a batch job beside the server on the same cores)")
    args = p.parse_args()
    real = args.store is not None
    for name, tiny, store in (("users", 10_000, 0), ("requests", 2000, 64), ("concurrency", 32, 8),
                              ("sequential", 64, 8), ("warmup", 64, 8), ("replica_cpus", 1.0, 2.0),
                              ("reference_users", 100, 0), ("switch", True, False)):
        if getattr(args, name) is None:
            setattr(args, name, store if real else tiny)
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"), ("RAY_DEDUP_LOGS", "1")):
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    torch.set_num_threads(1)
    def write(result: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)

    result = run(args, write)
    print(json.dumps({k: result[k] for k in KEYS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
