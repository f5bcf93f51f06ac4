"""Batched multi-user generation vs one user at a time, on the same concurrent (user, prompt) requests.

    python benchmarks/generate.py --out generate.json [--store DIR] [--users 64] [--max-new-tokens 32]

Both modes go through `PersonalizedGenerator.generate` (latents from each user's stored head, left-padded
prompts, greedy decoding with a per-row latent prefix): batched = all requests in one call (one forward pass
per token for every user), sequential = one call per request. Each mode is timed `--repeats` times, interleaved,
and the best time counts (the box is shared: the minimum is the least disturbed run); all times are in the JSON.

Without --store, a tiny store is built first by the real nightly flow up to `personalize` (tiny preset, smaller
still, `--users` simulated users) in a temporary folder. Writes JSON with batched_tokens_per_s,
sequential_tokens_per_s, speedup and outputs_match (greedy outputs of the two modes are token-identical).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

log = logging.getLogger("benchmarks.generate")

TARGET_SPEEDUP = 8.0
# the tiny preset, smaller still: a store in a few minutes on 2 cores (the model is what matters here)
STORE_OVERRIDES = ["data.n_prompts=80", "data.sft_steps=0", "data.n_candidates=4", "pretrain.stage1_steps=6",
                   "pretrain.stage2_steps=4", "pretrain.checkpoint_every=5", "personalize.steps=30",
                   "runtime.ray_num_cpus=2", "runtime.mlflow_experiment=bench-generate"]


def build_store(root: str, n_users: int) -> tuple[str, float]:
    from latentpref.pipelines.config import load_config
    from latentpref.pipelines.nightly import nightly
    t0 = time.perf_counter()
    cfg = load_config("tiny", overrides=[f"runtime.store={root}", f"data.n_users={n_users}", *STORE_OVERRIDES])
    nightly(cfg, until="personalize")
    return root, time.perf_counter() - t0


def make_requests(store, n: int) -> list[tuple[str, str]]:
    """n requests: n different users of the simulated population (cycled if fewer), each with its own prompt."""
    users: set[str] = set()
    for d in store.listdir("data", "population"):
        if store.exists("data", "population", d, "users.parquet"):
            users.update(store.read_table("data", "population", d, "users.parquet")["user_id"].to_pylist())
    users = sorted(users)
    prompt_dirs = store.listdir("data", "prompts")
    if not users or not prompt_dirs:
        raise FileNotFoundError(f"store {store.url()} has no users or prompts: run the nightly flow first")
    prompts = store.read_table("data", "prompts", prompt_dirs[0], "prompts.parquet")["prompt"].to_pylist()
    return [(users[i % len(users)], prompts[i % len(prompts)]) for i in range(n)]


def run(args) -> dict:
    import torch

    from latentpref.tasks.data.store import Store

    torch.set_num_threads(args.threads)
    if args.store is not None:
        return measure(args, Store(args.store), None)
    tmp = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        root, store_seconds = build_store(os.path.join(tmp, "store"), args.users)
        return measure(args, Store(root), store_seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, store, store_seconds: float | None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from latentpref.tasks.evaluate.serving import PersonalizedGenerator
    gen = PersonalizedGenerator.from_store(store)
    requests = make_requests(store, args.users)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    gen.generate(requests[:2], **kw)          # warm-up (lazy inits)
    gen.latents([u for u, _ in requests], [p for _, p in requests])   # heads are read once, outside the timings

    batched_s, sequential_s = [], []
    batched = sequential = None
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        batched = gen.generate(requests, batch_size=len(requests), **kw)
        batched_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sequential = [gen.generate([r], **kw)[0]
                      for r in tqdm(requests, desc=f"one user at a time ({rep + 1}/{args.repeats})", unit="req",
                                    leave=False)]
        sequential_s.append(time.perf_counter() - t0)
        log.info("repeat %d: batched %.2fs, sequential %.2fs", rep + 1, batched_s[-1], sequential_s[-1])

    n_tokens = len(requests) * args.max_new_tokens
    best_b, best_s = min(batched_s), min(sequential_s)
    match = [b.token_ids for b in batched] == [s.token_ids for s in sequential]
    return {
        "batched_tokens_per_s": n_tokens / best_b,
        "sequential_tokens_per_s": n_tokens / best_s,
        "speedup": best_s / best_b,
        "outputs_match": bool(match),
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": best_s / best_b >= TARGET_SPEEDUP,
        "requests": len(requests),
        "distinct_users": len({u for u, _ in requests}),
        "personalized_requests": sum(r.personalized for r in batched),
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "batched_seconds": batched_s,
        "sequential_seconds": sequential_s,
        "timing": f"best of {args.repeats} interleaved repeats",
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "clap_version": gen.clap_version,
        "store": store.url() if store_seconds is None else "temporary (built by this benchmark, then deleted)",
        "store_build_seconds": store_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--store", help="existing store with a trained CLaP and user fits (default: build a tiny one)")
    p.add_argument("--users", type=int, default=64, help="concurrent requests, one per user")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: stable on a shared box, and the conservative case for batching)")
    args = p.parse_args(argv)
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"), ("RAY_DEDUP_LOGS", "1")):
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.users < 1 or args.repeats < 1 or args.max_new_tokens < 1 or args.threads < 1:
        p.error("--users, --repeats, --max-new-tokens and --threads must be >= 1")
    result = run(args)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("batched_tokens_per_s", "sequential_tokens_per_s", "speedup",
                                             "outputs_match")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
