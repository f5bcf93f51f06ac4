"""Bounded load test of `latentpref serve` (Ray Serve on 127.0.0.1) over a tiny-preset store with 10,000 users,
with a new night published in the middle of it.

    python benchmarks/serve.py --out benchmarks/results/serve.json [--store DIR] [--users 10000]

Setup (also written under "setup" in the JSON):
1. a tiny store from the real nightly flow up to `personalize` (`--fitted` simulated users really fitted; this
   publishes release 1), or a copy of `--store`;
2. 10,000 stored users: the fitted heads copied under new user ids with personalize's own artifact writer
   (`_store_user`), then release 1 republished to cover them (`publish_release`, as the personalize stage does);
3. a reference run: the same app over a copy holding only 100 users (RSS after its load);
4. the measured app: one request at a time (sequential baseline), then `--requests` requests from
   `--distinct-users` users with `--concurrency` client threads. While it runs, night 2 is written the way a night
   writes it: a new CLaP version folder (the same weights under a new version: the test is about versions),
   models/clap/current.json flipped first (as pretrain does), the really-fitted users refitted by
   `personalize.fit_chunk` against it, every copied user's head rewritten for it, then the release published.
   The load continues until the new release has answered `--after-switch` requests (so the switch always
   happens under load); "requests" counts everything sent.
A response is "mixed" when its user fit belongs to another CLaP than the one that answered, or a stored user
got the prior because of a version mismatch.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
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


def _free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Client:
    """One keep-alive HTTP connection (one per client thread)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=120)

    def post(self, body: dict) -> tuple[int, dict]:
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def get(self, path: str) -> dict:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        return json.loads(resp.read())


# ---------------------------------------------------------------------------------------------------- store setup
def build_store(root: str, n_fitted: int) -> float:
    sys.path.insert(0, os.path.dirname(__file__))
    from generate import build_store as build   # the real nightly up to personalize, tiny preset, smaller still
    return build(root, n_fitted)[1]


def fitted_users(store, release) -> list[dict]:
    """Manifests of the really fitted (non cold-start) users of release 1."""
    from latentpref.tasks.evaluate.serve_core import release_fit
    users = store.read_table(*store.read_json("serving", "releases", release.release_id, "_manifest.json")
                             ["records_path"])["user_id"].to_pylist()
    out = []
    for u in users:
        m, _ = release_fit(store, u, release)
        if m is not None and not m.get("cold_start"):
            out.append(m)
    return out


def copy_users(store, sources: list[dict], n: int, clap_version: str, *, prefix: str = "bench",
               src_store=None) -> list[str]:
    """n users `<prefix>-00000`..., each a copy of a fitted head (round robin), written by `_store_user`."""
    from safetensors.torch import load as st_load

    from latentpref.tasks.train.personalize import HEAD_FILE, _store_user, fit_version, user_folder
    heads = [st_load((src_store or store).read_bytes(*user_folder(m["user_id"]), m["version"], HEAD_FILE)) for m in sources]
    ids = []
    for i in range(n):
        src, head = sources[i % len(sources)], heads[i % len(sources)]
        user_id = f"{prefix}-{i:05d}"
        data_hash = f"{src['data_hash']}x{i}"
        _store_user(store, user_id, fit_version(clap_version, "head-only", data_hash), HEAD_FILE, head,
                    {"cold_start": False, "n_pairs": src.get("n_pairs"), "data_hash": data_hash,
                     "clap_version": clap_version, "mode": "head-only", "fit_seconds": 0.0, "copied_from":
                     src["user_id"]})
        ids.append(user_id)
    return ids


def night_two(store, release1, sources: list[dict], copies: list[str], done: dict) -> None:
    """Write and publish night 2 (see the module docstring); records timings in `done`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from latentpref.tasks.evaluate.serve_core import publish_release
    from latentpref.tasks.train.personalize import ChunkJob, fit_chunk, table_to_ipc
    t0 = time.perf_counter()
    v1 = release1.clap_version
    v2 = f"{v1[:8]}n2{int(time.time()) % 100000:05d}"
    shutil.copytree(store.url("models", "clap", v1), store.url("models", "clap", v2))
    manifest = {**store.read_json("models", "clap", v1, "_manifest.json"), "version": v2}
    store.write_json(manifest, "models", "clap", v2, "_manifest.json")
    store.write_json({"version": v2}, "models", "clap", "current.json")        # pretrain flips it before users
    (cache_name,) = [n for n in store.listdir("cache", v1) if n.startswith("latents-")]
    store.write_bytes(store.read_bytes("cache", v1, cache_name), "cache", v2, cache_name)
    pop = [d for d in store.listdir("data", "population") if store.exists("data", "population", d, "pairs.parquet")]
    pairs = store.read_table("data", "population", pop[0], "pairs.parquet")
    pairs = pairs.filter(pc.equal(pairs["split"], "train"))
    real = sorted(m["user_id"] for m in sources)
    pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(real))).sort_by("user_id")
    pairs = pairs.select(["user_id", "prompt", "chosen", "rejected", "weight"]).cast(pa.schema([
        ("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("weight", pa.float32())]))
    records = fit_chunk(ChunkJob(store_root=store.root, clap_version=v2, cache_path=("cache", v2, cache_name),
                                 user_ids=tuple(real), pairs_ipc=table_to_ipc(pairs), fit={"steps": 30},
                                 mode="head-only", min_pairs=1))
    fitted = {r["user_id"]: r for r in records}
    done["fit_s"] = time.perf_counter() - t0
    new_sources = [fitted[m["user_id"]] for m in sources]
    copy_users(store, new_sources, len(copies), v2)
    done["users_written_s"] = time.perf_counter() - t0
    release = publish_release(store, clap_version=v2, run_id="bench-night-2", mode="head-only",
                              n_users=len(copies) + len(real))
    done.update(release=release.release_id, clap_version=v2, published_s=time.perf_counter() - t0,
                published_at=time.time())


# ---------------------------------------------------------------------------------------------------- load
def sequential(port: int, users: list[str], n: int, max_tokens: int) -> tuple[float, int]:
    client = Client(port)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(n):
        status, body = client.post({"model": "latentpref", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                                    "temperature": 0, "user": users[i % len(users)]})
        if status != 200:
            raise RuntimeError(f"sequential request failed: {status} {body}")
        tokens += body["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - t0), tokens


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
                    responses.append((time.time(), body["user"], out["personalization"]))

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


def mixed(responses) -> int:
    bad = 0
    for _, user, p in responses:
        if p["served"] == "personalized" and not (p["user_artifact_version"] or "").startswith(p["clap_version"] + "-"):
            bad += 1
        elif p["served"] == "prior" and user.startswith("bench-"):   # every stored user has a fit of both CLaPs
            bad += 1
    return bad


def deploy(store_root: str, args) -> None:
    from ray import serve

    from latentpref.pipelines.serve import ServeOptions, build_app
    options = ServeOptions(store=store_root, max_batch_size=args.concurrency, batch_wait_timeout_s=0.02,
                           cache_users=args.cache_users, reload_interval_s=1.0, max_tokens_cap=max(64, args.max_tokens))
    serve.run(build_app(options), name="latentpref", route_prefix="/")


def run(args) -> dict:
    import ray
    from ray import serve

    from latentpref.tasks.data.store import Store
    from latentpref.tasks.evaluate.serve_core import current_release, publish_release
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    setup: dict = {}
    try:
        root = os.path.join(tmp, "store")
        if args.store:
            shutil.copytree(args.store, root, ignore=shutil.ignore_patterns("mlflow", "runs_local"))
            setup["store"] = f"copy of {args.store}"
        else:
            setup["store_build_seconds"] = build_store(root, args.fitted)
            setup["store"] = f"real nightly flow up to personalize, tiny preset, {args.fitted} simulated users"
        store = Store(root)
        release1 = current_release(store)
        sources = fitted_users(store, release1)
        if not sources:
            raise RuntimeError("the store has no fitted (non cold-start) user to copy")
        t0 = time.perf_counter()
        copies = copy_users(store, sources, args.users, release1.clap_version)
        setup["copy_seconds"] = time.perf_counter() - t0
        release1 = publish_release(store, clap_version=release1.clap_version, run_id="bench-night-1",
                                   mode="head-only", n_users=len(copies) + len(sources))
        setup.update(really_fitted_users=len(sources), copied_users=len(copies),
                     copies="fitted heads copied under new ids with personalize._store_user (same bytes, own "
                            "manifest and version); release republished with serve_core.publish_release")
        # the 100-user reference store: same models, 100 of the copies
        ref_root = os.path.join(tmp, "store-100")
        for part in ("models", "serving"):
            shutil.copytree(store.url(part), os.path.join(ref_root, part))
        ref = Store(ref_root)
        ref_users = copy_users(ref, sources, 100, release1.clap_version, src_store=store)
        publish_release(ref, clap_version=release1.clap_version, run_id="bench-ref", mode="head-only", n_users=100)

        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        port = _free_port()
        serve.start(http_options={"host": HOST, "port": port})

        # reference run: 100 stored users
        deploy(ref_root, args)
        client = Client(port)
        load(port, ref_users, n_requests=64, concurrency=args.concurrency, max_tokens=args.max_tokens)   # warm-up
        ref_load = load(port, ref_users, n_requests=args.requests // 2, concurrency=args.concurrency,
                        max_tokens=args.max_tokens)
        rss_ref = Client(port).get("/health")["rss_mb"]
        serve.delete("latentpref")

        # the measured app: 10,000 stored users
        deploy(root, args)
        client = Client(port)
        warm = [f"bench-{i:05d}" for i in range(args.users - 64, args.users)]   # not among the load's users
        load(port, warm, n_requests=64, concurrency=args.concurrency, max_tokens=args.max_tokens)
        rss_start = Client(port).get("/health")["rss_mb"]
        seq_tps, _ = sequential(port, warm, args.sequential, args.max_tokens)

        users = copies[:args.distinct_users]
        night = {}
        started = threading.Event()

        def progress(i):
            if i >= args.switch_at and not started.is_set():
                started.set()
                threading.Thread(target=night_two, args=(store, release1, sources, copies, night), daemon=True).start()

        res = _load_until_switched(port, users, args, progress, night)
        health = Client(port).get("/health")
        rss_end = health["rss_mb"]
        responses = res["responses"]
        after = [r for r in responses if r[2]["release"] == night.get("release")]
        result = {
            "requests": res["requests"],
            "errors": len(res["errors"]),
            "tokens_per_s": res["tokens_per_s"],
            "sequential_tokens_per_s": seq_tps,
            "speedup": res["tokens_per_s"] / seq_tps,
            "p50_ms": res["p50_ms"],
            "p99_ms": res["p99_ms"],
            "rss_mb_start": rss_start,
            "rss_mb_end": rss_end,
            "reloads": health["reloads"],
            "mixed_version_responses": mixed(responses),
            "rss_mb_100_users": rss_ref,
            "rss_end_vs_100_users": rss_end / rss_ref,
            "meets_target": {"speedup": res["tokens_per_s"] / seq_tps >= TARGET_SPEEDUP, "errors": not res["errors"],
                             "switch": health["reloads"] == 1 and bool(after),
                             "rss_within_10pct": abs(rss_end / rss_ref - 1) <= 0.10},
            "error_samples": [str(e)[:300] for e in res["errors"][:5]],
            "stored_users": len(copies) + len(sources),
            "distinct_users": len(set(users)),
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "decoding": "greedy",
            "cache_users": args.cache_users,
            "responses_after_switch": len(after),
            "responses_by_clap": {v: sum(1 for r in responses if r[2]["clap_version"] == v)
                                  for v in sorted({r[2]["clap_version"] for r in responses})},
            "prior_responses": sum(1 for r in responses if r[2]["served"] == "prior"),
            "night2": night,
            "reference_100_users": {k: ref_load[k] for k in ("requests", "tokens_per_s", "p50_ms", "p99_ms")},
            "load_seconds": res["seconds"],
            "sequential_requests": args.sequential,
            "setup": setup,
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "machine": platform.machine(),
        }
        return result
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        except Exception:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def _load_until_switched(port, users, args, progress, night) -> dict:
    """`load` that keeps going past --requests until night 2's release has answered --after-switch requests."""
    after = [0]

    def seen(out):
        if "release" in night and out["personalization"]["release"] == night["release"]:
            after[0] += 1

    return load(port, users, n_requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                on_progress=progress, on_response=seen, max_requests=args.max_requests,
                until=lambda: "release" in night and after[0] >= args.after_switch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--store", help="reuse a store built by the nightly flow (copied; never modified)")
    p.add_argument("--fitted", type=int, default=20, help="users really fitted by the nightly flow")
    p.add_argument("--users", type=int, default=10_000, help="stored users (copies of the fitted ones)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--max-requests", type=int, default=8000, help="bound when waiting for the switch")
    p.add_argument("--distinct-users", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sequential", type=int, default=48, help="requests of the one-at-a-time baseline")
    p.add_argument("--cache-users", type=int, default=256, help="server LRU (smaller than distinct users)")
    p.add_argument("--switch-at", type=int, default=300, help="request index at which night 2 starts")
    p.add_argument("--after-switch", type=int, default=200)
    args = p.parse_args()
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"), ("RAY_DEDUP_LOGS", "1")):
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    torch.set_num_threads(1)
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("requests", "errors", "tokens_per_s", "sequential_tokens_per_s",
                                             "speedup", "p50_ms", "p99_ms", "rss_mb_start", "rss_mb_end",
                                             "reloads", "mixed_version_responses")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
