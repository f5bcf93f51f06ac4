"""Per-user personalisation benchmark (issue #5): users/hour per mode, seconds/user of faithful Latent DPO vs
LoRA-DPO on the same pairs, held-out preference accuracy per mode, and a 10k-user fan-out run.

    python benchmarks/personalize.py --out personalize.json [--store DIR] [--preset tiny] [--head-users 2000]
                                     [--workers 2] [--scale-users 10000] [--product-users 3] [--carry OLD.json]

Settings: every fit runs with what a night of `--preset` uses, read from pipelines/config.py (`load_config(preset)`
with personalize.mode set per mode: MODE_STEPS / MODE_LR / MODE_NOISE_DRAWS where the preset leaves them unset;
LoRA-DPO: the preset's evaluate.baseline_steps / baseline_lr / baseline_batch_size), recorded under `settings`
(`settings.product_settings` false when --steps / --noise-draws override them).

World: the preset's CLaP + simulated users from the real pipeline. With `--store DIR` holding a finished run of
the preset (models/clap/current.json, data/population/*/pairs.parquet) it is reused; otherwise `latentpref pretrain
--preset PRESET` (prepare + pretrain: minutes on 2 cores for tiny, about 10 for small) builds one in a temporary
folder first.

Sections (all in one process tree, one run, this machine):
- `heldout_accuracy`: every simulated user with >= 4 train pairs is fitted on its train split in each mode;
  accuracy = share of its held-out pairs whose chosen response has the larger implicit latent reward
  R(z) = log p_theta(z|x) - log N(z; 0, I) at the response's posterior mean (as `tasks/evaluate`), ties half.
- `users_per_hour`: users of 64 pairs (2 pairs per prompt, drawn from the world's cached train triples) fitted
  with the product settings (`settings`) by `--workers` processes of one
  thread each, each process fitting its share in one batched call; users/hour = users / slowest worker's fit
  wall time (process start and data loading excluded: that is fan-out overhead, measured by `scale_run`).
  Head-only runs `--head-users` users; the encoder modes run `--encoder-users` and are extrapolated.
- `seconds_per_user`: one user's 64 pairs, the same for every method, trained for the same number of passes
  over them (`--epochs`): the latent modes take `epochs` full-batch steps, LoRA-DPO `epochs * 64 / 8` steps of
  8 pairs (`tasks/evaluate/baselines.fit_baseline`, r = 8 on the world's base LM). User-independent work is cached
  for both and not timed: CLaP posteriors / prompt tokens (latent) and reference log-probs (LoRA, spec §8.6).
- `product` (issue #15 item 1): real users of the world, each fitted alone by every method at the product settings,
  seconds with and without the user's own encoding, LM-based held-out accuracy, speedups vs LoRA-DPO, and
  `product.quality`: time to a stated held-out accuracy (see `product_and_quality`). `users_per_hour_with_encoding`:
  the batched throughput above plus each user's own encoding.
- `scale_run`: `--scale-users` simulated head-only users through the real fan-out (`ray.remote(fit_chunk)` over
  chunks of 256 users, artifacts written to a local store), on synthetic cached features/posteriors of the world
  CLaP's shapes; measured wall time vs the capacity model's prediction (benchmarks/README.md).
The machine is shared: the JSON records load averages and CPU time next to every wall time.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

log = logging.getLogger("personalize_bench")
MODES = ("head-only", "trunk-frozen", "faithful")
PAIRS_PER_USER = 64


PRESET = "tiny"    # the preset whose night is timed (`--preset`); worker processes get it in their args


def product_config(mode: str):
    """The personalize settings a night of PRESET runs in `mode` (pipelines/config.py: the preset's section with
    that mode; unset steps / lr / noise draws take MODE_STEPS / MODE_LR / MODE_NOISE_DRAWS of the mode)."""
    from latentpref.pipelines.config import load_config
    return load_config(PRESET, overrides=[f"personalize.mode={mode}"]).personalize


def mode_lr(mode: str) -> float:
    """The product's learning rate of a mode (MODE_LR unless the preset sets it; faithful = spec §4.1.8)."""
    return product_config(mode).lr


@dataclass
class World:
    store: str
    clap_dir: str
    clap_version: str
    base_dir: str
    prompt_tokens: int
    response_tokens: int
    pairs_path: str


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


# ------------------------------------------------------------------------------------------------ the world
def ensure_world(store_dir: str | None) -> World:
    """A finished run of PRESET (CLaP + simulated users), reused from `store_dir` or built with the CLI."""
    if store_dir is None or not os.path.exists(os.path.join(store_dir, "models", "clap", "current.json")):
        store_dir = store_dir or tempfile.mkdtemp(prefix="lp-bench-store-")
        log.info("building a %s world in %s (latentpref pretrain --preset %s)", PRESET, store_dir, PRESET)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "latentpref.pipelines.cli", "pretrain", "--preset", PRESET,
                        "--store", store_dir], check=True)   # the CLI's own process: its Ray/Prefect/MLflow end
        log.info("world built in %.0fs", time.perf_counter() - t0)
    version = json.loads(Path(store_dir, "models", "clap", "current.json").read_text())["version"]
    clap_dir = os.path.join(store_dir, "models", "clap", version)
    manifest = json.loads(Path(clap_dir, "_manifest.json").read_text())
    pairs = max(glob.glob(os.path.join(store_dir, "data", "population", "*", "pairs.parquet")), key=os.path.getmtime)
    return World(store_dir, clap_dir, version, os.path.join(store_dir, *manifest["base_model_path"]),
                 int(manifest.get("prompt_tokens", 32)), int(manifest.get("response_tokens", 24)), pairs)


def world_cache(world: World, clap, tokenizer):
    from latentpref.tasks.policy.cache import build_latent_cache
    pairs = pq.read_table(world.pairs_path)
    prompts = pairs["prompt"].to_pylist()
    pr = list(zip(prompts, pairs["chosen"].to_pylist())) + list(zip(prompts, pairs["rejected"].to_pylist()))
    return build_latent_cache(clap, tokenizer, prompts, pr, prompt_tokens=world.prompt_tokens,
                              response_tokens=world.response_tokens), pairs


def _indices(cache, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from latentpref.tasks.policy.cache import text_key
    p = table["prompt"].to_pylist()
    return (torch.tensor([cache.prompt_index[text_key(x)] for x in p]),
            torch.tensor([cache.response_index[text_key(x, c)] for x, c in zip(p, table["chosen"].to_pylist())]),
            torch.tensor([cache.response_index[text_key(x, r)] for x, r in zip(p, table["rejected"].to_pylist())]))


def fit_config(mode: str, steps: int, noise_draws: dict[str, int | None], **kw):
    """The product's fit settings (PersonalizeConfig defaults) with this benchmark's lr and noise draws per mode."""
    from latentpref.tasks.train.fit_user import FitConfig
    pc_ = product_config(mode)
    return FitConfig(steps=steps, lr=pc_.lr, beta=pc_.beta, n_samples=pc_.n_samples,
                     evidence_ratio=pc_.evidence_ratio, loss_type=pc_.loss_type, seed=pc_.seed,
                     noise_draws=noise_draws[mode], **kw)


def fit_mode(mode: str, encoder, cache, p_idx, c_idx, r_idx, user_index, n_users, cfg):
    """Fit users in `mode`; returns a function (prompt rows) -> (mu, logvar) per user."""
    from latentpref.tasks.models.policy import policy_latent, user_latent
    from latentpref.tasks.train.fit_encoder import fit_encoder_users
    from latentpref.tasks.train.fit_user import fit_users
    post = (cache.mu[c_idx], cache.logvar[c_idx], cache.mu[r_idx], cache.logvar[r_idx])
    if mode == "head-only":
        res = fit_users(cache.features[p_idx], *post, user_index, n_users, cfg)
        return lambda u, rows: user_latent(res.weight[u], res.bias[u], cache.features[rows])
    used, pair_prompt = torch.unique(p_idx, return_inverse=True)
    res = fit_encoder_users(encoder, mode, cache.prompt_ids[used], cache.prompt_mask[used], pair_prompt, *post,
                            user_index, n_users, cfg)
    return lambda u, rows: policy_latent(encoder, res.states[u], cache.prompt_ids[rows], cache.prompt_mask[rows])


def heldout_accuracy(world: World, encoder, cache, pairs: pa.Table, steps: dict[str, int], noise_draws: dict[str, int | None],
                     modes=MODES, min_pairs: int = 4) -> dict:
    from latentpref.tasks.evaluate.metrics import preference_accuracy
    from latentpref.tasks.models.latent import gaussian_log_prob, standard_normal_log_prob
    train = pairs.filter(pc.equal(pairs["split"], "train"))
    held = pairs.filter(pc.equal(pairs["split"], "heldout"))
    counts = {u: n for u, n in zip(*np.unique(train["user_id"].to_numpy(zero_copy_only=False), return_counts=True))}
    users = sorted(u for u, n in counts.items() if n >= min_pairs and u in set(held["user_id"].to_pylist()))
    train = train.filter(pc.is_in(train["user_id"], value_set=pa.array(users)))
    held = held.filter(pc.is_in(held["user_id"], value_set=pa.array(users)))
    uid = {u: i for i, u in enumerate(users)}
    p_idx, c_idx, r_idx = _indices(cache, train)
    user_index = torch.tensor([uid[u] for u in train["user_id"].to_pylist()])
    hp, hc, hr = _indices(cache, held)
    h_user = [uid[u] for u in held["user_id"].to_pylist()]
    out = {"users": len(users), "heldout_pairs": held.num_rows, "steps": steps, "lr": {}, "by_mode": {}}
    for mode in modes:
        cfg = fit_config(mode, steps[mode], noise_draws)
        t0 = time.perf_counter()
        latent = fit_mode(mode, encoder, cache, p_idx, c_idx, r_idx, user_index, len(users), cfg)
        chosen, rejected = [], []
        with torch.no_grad():
            for u in range(len(users)):
                rows = [i for i, x in enumerate(h_user) if x == u]
                mu, lv = latent(u, hp[rows])
                for score, resp in ((chosen, hc[rows]), (rejected, hr[rows])):
                    y = cache.mu[resp]
                    score.extend((gaussian_log_prob(y, mu, lv) - standard_normal_log_prob(y)).tolist())
        acc = preference_accuracy(np.array(chosen), np.array(rejected))
        out["by_mode"][mode] = acc
        out["lr"][mode] = cfg.lr
        log.info("heldout accuracy %s: %.3f (%d users, %.0fs)", mode, acc, len(users), time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------ throughput
def synthetic_users(pairs: pa.Table, cache, n_users: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(p_idx, c_idx, r_idx, user_index) of n_users x 64 pairs: 32 prompts per user, 2 cached train triples each
    (drawn with replacement), like the spec's 2 pairs per prompt (§4.1.5)."""
    train = pairs.filter(pc.equal(pairs["split"], "train"))
    p_idx, c_idx, r_idx = _indices(cache, train)
    by_prompt: dict[int, list[int]] = {}
    for i, p in enumerate(p_idx.tolist()):
        by_prompt.setdefault(p, []).append(i)
    keys = sorted(by_prompt)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_users):
        for p in rng.choice(len(keys), size=PAIRS_PER_USER // 2, replace=len(keys) < PAIRS_PER_USER // 2):
            rows.extend(rng.choice(by_prompt[keys[p]], size=2))
    rows = torch.tensor(rows)
    return p_idx[rows], c_idx[rows], r_idx[rows], torch.arange(n_users).repeat_interleave(PAIRS_PER_USER)


def _throughput_worker(args: dict, barrier, queue) -> None:
    global PRESET
    torch.set_num_threads(1)
    PRESET = args["preset"]
    from latentpref.tasks.policy.cache import LatentCache
    if args.get("synthetic"):   # the scale run's data: random cache of the same shapes, random pairs
        cache = synthetic_cache(SCALE_PROMPTS, SCALE_RESPONSES, *args["synthetic"], seed=0)
        rng = np.random.default_rng(args["seed"])
        p = torch.from_numpy(rng.integers(0, SCALE_PROMPTS, size=args["n_users"] * PAIRS_PER_USER))
        resp = torch.from_numpy(np.argsort(rng.random((len(p), SCALE_RESPONSES)), axis=1)[:, :2])
        c, r = p * SCALE_RESPONSES + resp[:, 0], p * SCALE_RESPONSES + resp[:, 1]
        ui = torch.arange(args["n_users"]).repeat_interleave(PAIRS_PER_USER)
    else:
        cache = LatentCache.from_bytes(Path(args["cache_file"]).read_bytes())
        p, c, r, ui = synthetic_users(pq.read_table(args["pairs_path"]), cache, args["n_users"], args["seed"])
    encoder = None
    if args["mode"] != "head-only":
        from latentpref.tasks.models.clap import load_clap
        encoder = load_clap(args["clap_dir"]).encoder.eval().requires_grad_(False)
    cfg = fit_config(args["mode"], args["steps"], args["noise_draws"])
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    fit_mode(args["mode"], encoder, cache, p, c, r, ui, args["n_users"], cfg)
    queue.put({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "users": args["n_users"]})


def users_per_hour(world: World, cache_file: str, mode: str, n_users: int, workers: int, steps: int,
                   noise_draws: dict[str, int | None], synthetic: tuple[int, int, int] | None = None) -> dict:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    share = [n_users // workers + (w < n_users % workers) for w in range(workers)]
    procs = [ctx.Process(target=_throughput_worker, args=({
        "cache_file": cache_file, "pairs_path": world.pairs_path, "clap_dir": world.clap_dir, "mode": mode,
        "n_users": share[w], "seed": 1000 + w, "steps": steps, "noise_draws": noise_draws, "synthetic": synthetic,
        "preset": PRESET},
        barrier, queue))
        for w in range(workers)]
    load0 = _load()
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    wall = max(r["wall_s"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    out = {"users": n_users, "workers": workers, "steps": steps, "wall_s": wall, "cpu_s": cpu,
           "users_per_hour": 3600 * n_users / wall, "cpu_s_per_user": cpu / n_users,
           "users_per_hour_cpu_basis": 3600 * n_users * workers / cpu, "load_avg_before": load0,
           "load_avg_after": _load()}
    log.info("users/hour %s: %.0f (%d users, %d workers, wall %.1fs, %.3f cpu-s/user, load %s)", mode,
             out["users_per_hour"], n_users, workers, wall, out["cpu_s_per_user"], out["load_avg_after"])
    return out


# ------------------------------------------------------------------------------------------------ vs LoRA-DPO
def seconds_vs_lora(world: World, clap, tokenizer, cache, pairs: pa.Table, epochs: int, n_users: int,
                    noise_draws: dict[str, int | None]) -> dict:
    from latentpref.tasks.evaluate.baselines import BaselineConfig, fit_baseline, reference_logps_cache
    from latentpref.tasks.models.registry import load_base_model
    train = pairs.filter(pc.equal(pairs["split"], "train"))
    texts = list(zip(train["prompt"].to_pylist(), train["chosen"].to_pylist(), train["rejected"].to_pylist()))
    base, base_tok = load_base_model(world.base_dir)
    base.eval()
    from latentpref.pipelines.config import load_config
    bcfg = BaselineConfig(method="lora_dpo", lr=load_config(PRESET).evaluate.lr_by_method()["lora_dpo"], steps=epochs * PAIRS_PER_USER // 8, batch_size=8,
                          max_prompt_tokens=world.prompt_tokens, max_response_tokens=world.response_tokens)
    times: dict[str, list[float]] = {m: [] for m in (*MODES, "lora_dpo")}
    cpu: dict[str, list[float]] = {m: [] for m in times}
    encoder = clap.encoder.eval().requires_grad_(False)
    # cache rows -> texts, so LoRA-DPO trains on exactly the user's 64 (prompt, chosen, rejected)
    by_key = {(cache.prompt_index[_tk(a)], cache.response_index[_tk(a, b)], cache.response_index[_tk(a, d)]):
              (a, b, d) for a, b, d in texts}
    for u in range(n_users):
        p, c, r, ui = synthetic_users(pairs, cache, 1, seed=5000 + u)
        triples = [by_key[(pi, ci, ri)] for pi, ci, ri in zip(p.tolist(), c.tolist(), r.tolist())]
        ref = reference_logps_cache(base, base_tok, [(a, b) for a, b, _ in triples] + [(a, d) for a, _, d in triples],
                                    max_prompt_tokens=world.prompt_tokens, max_response_tokens=world.response_tokens)
        for method in (*MODES, "lora_dpo"):   # interleaved per user: load drift hits every method alike
            t0, c0 = time.perf_counter(), time.process_time()
            if method == "lora_dpo":
                fit_baseline(base, base_tok, triples, bcfg, ref_logps=ref)
            else:
                fit_mode(method, encoder, cache, p, c, r, ui, 1, fit_config(method, epochs, noise_draws))
            times[method].append(time.perf_counter() - t0)
            cpu[method].append(time.process_time() - c0)
            log.info("user %d %s: %.2fs", u, method, times[method][-1])
    sec = {m: float(np.mean(v)) for m, v in times.items()}
    return {"epochs": epochs, "users": n_users, "lora_steps": bcfg.steps, "lora_batch_pairs": 8,
            "latent_steps": epochs, "seconds_per_user": sec, "cpu_seconds_per_user": {m: float(np.mean(v))
                                                                                      for m, v in cpu.items()},
            "speedup_vs_lora_dpo": {m: sec["lora_dpo"] / sec[m] for m in MODES}, "load_avg": _load()}


def _per_slot(detail: dict) -> float:
    """Fit wall seconds per user per worker slot of a throughput measurement."""
    return detail["wall_s"] * detail["workers"] / detail["users"]


def _tk(*texts):
    from latentpref.tasks.policy.cache import text_key
    return text_key(*texts)


# ------------------------------------------------------------------------------------------------ product settings
QUALITY_FACTORS = {"latent": (0.1, 0.25, 0.5, 1.0, 2.0), "lora_dpo": (0.5, 1.0, 2.0)}


def product_and_quality(world: World, n_users: int, epochs_factors: dict | None = None,
                        quality_target: float | None = None) -> dict:
    """Each method at the settings a night of PRESET uses, one real user of the world fitted alone, and its
    time to a held-out accuracy (issue #15 item 1).

    Users: the first `n_users` (sorted ids) of the world with held-out pairs, each on all its train pairs (the same
    pairs for every method). Per user and method, one fit alone per step count of a grid: the product's steps
    times QUALITY_FACTORS (latent modes: PersonalizeConfig of the mode; LoRA-DPO: evaluate.baseline_steps /
    baseline_lr / baseline_batch_size of the preset, spec r = 8); the factor-1 point is the product setting.
    - encode_s: the user's own texts through the model before any fit: latent = the CLaP encoding of the user's
      pairs (prompt features, posteriors of chosen and rejected: `build_latent_cache`, the personalize stage's
      cache); LoRA-DPO = the base LM's reference log-probs of the same responses.
    - fit_s: the fit alone (`fit_users` / `fit_encoder_users` / `fit_baseline`).
    - heldout_accuracy: the evaluation's LM-based measure on the user's held-out pairs (latent: LM with the
      user's z vs the prior's z; LoRA-DPO: vs the base LM), mean over users.
    Time to quality: target = `quality_target`, or by default the highest held-out accuracy that every method
    reaches somewhere on its grid (min over methods of its best grid point); a method's seconds_to_target is
    encode_s + fit_s (mean over users) at its first grid point whose mean accuracy >= target.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/fewshot.py: the one-user helpers
    from fewshot import (baseline_heldout_accuracy, fit_latent_alone, latent_heldout_accuracy, load_night,
                         pick_users, reference_logps, triples_of, weights_of)
    from latentpref.pipelines.config import load_config
    from latentpref.tasks.evaluate.baselines import BaselineConfig, fit_baseline
    cfg = load_config(PRESET)
    night = load_night(world.store, seed=cfg.data.seed)
    users = pick_users(night, n_users)
    e = cfg.evaluate
    lora_base = dict(method="lora_dpo", lr=e.lr_by_method()["lora_dpo"], beta=e.beta_by_method()["lora_dpo"],
                     batch_size=e.baseline_batch_size, seed=e.seed, max_prompt_tokens=world.prompt_tokens,
                     max_response_tokens=world.response_tokens)
    grid: dict[str, list[int]] = {}
    for m in MODES:
        product = product_config(m).steps
        grid[m] = sorted({max(1, round(product * f)) for f in QUALITY_FACTORS["latent"]})
    grid["lora_dpo"] = sorted({max(1, round(e.baseline_steps * f)) for f in QUALITY_FACTORS["lora_dpo"]})
    raw = {m: {k: {"fit_s": [], "cpu_s": [], "acc": []} for k in grid[m]} for m in grid}
    lora_applied: dict = {}   # what peft trained: read off a fitted policy, not recomputed
    encode = {m: [] for m in grid}
    n_pairs = []
    for u in users:
        train = night.train.filter(pc.equal(night.train["user_id"], u))
        triples, weights = triples_of(train), weights_of(train)
        held = triples_of(night.heldout.filter(pc.equal(night.heldout["user_id"], u)))
        n_pairs.append(len(triples))
        for m in MODES:   # interleaved per user: load drift hits every method alike
            for k in grid[m]:
                fit = product_config(m).fit_settings()
                fit = type(fit)(**{**fit.as_dict(), "steps": k})
                c0 = time.process_time()
                policy, enc_s, fit_s = fit_latent_alone(night, m, triples, weights, fit)
                raw[m][k]["cpu_s"].append(time.process_time() - c0)
                raw[m][k]["fit_s"].append(fit_s)
                raw[m][k]["acc"].append(latent_heldout_accuracy(night, policy, held))
                if k == grid[m][0]:
                    encode[m].append(enc_s)
        ref, ref_s = reference_logps(night, triples + held)
        encode["lora_dpo"].append(reference_logps(night, triples)[1])   # the user's train responses only
        for k in grid["lora_dpo"]:
            c0 = time.process_time()
            res = fit_baseline(night.base_model, night.base_tokenizer, triples, BaselineConfig(**lora_base, steps=k),
                               ref_logps=ref, weights=weights)
            raw["lora_dpo"][k]["cpu_s"].append(time.process_time() - c0)
            raw["lora_dpo"][k]["fit_s"].append(res.seconds)
            raw["lora_dpo"][k]["acc"].append(baseline_heldout_accuracy(night, res.model, held, ref))
            lora_applied = {"target_modules": sorted(res.model.active_peft_config.target_modules),
                            "trainable_params": res.trainable_params}
            del res
        log.info("product settings, user %s done (%d pairs)", u, len(triples))
    methods = [*MODES, "lora_dpo"]
    product_steps = {m: product_config(m).steps for m in MODES} | {"lora_dpo": e.baseline_steps}
    curves = {m: [{"steps": k, "fit_s": float(np.mean(raw[m][k]["fit_s"])),
                   "cpu_s": float(np.mean(raw[m][k]["cpu_s"])),
                   "seconds_with_encoding": float(np.mean(raw[m][k]["fit_s"]) + np.mean(encode[m])),
                   "heldout_accuracy": float(np.mean(raw[m][k]["acc"])),
                   "heldout_accuracy_per_user": raw[m][k]["acc"]} for k in grid[m]] for m in methods}
    at = {m: next(p for p in curves[m] if p["steps"] == product_steps[m]) for m in methods}
    enc = {m: float(np.mean(encode[m])) for m in methods}
    fit_s = {m: at[m]["fit_s"] for m in methods}
    total = {m: fit_s[m] + enc[m] for m in methods}
    target = quality_target
    if target is None:
        target = min(max(p["heldout_accuracy"] for p in curves[m]) for m in methods)
    reach = {}
    for m in methods:
        hit = next((p for p in curves[m] if p["heldout_accuracy"] >= target - 1e-9), None)
        reach[m] = None if hit is None else {"steps": hit["steps"], "seconds": hit["seconds_with_encoding"],
                                             "heldout_accuracy": hit["heldout_accuracy"]}
    lora_reach = reach["lora_dpo"]
    return {
        "users": len(users), "user_ids": users, "train_pairs_per_user": n_pairs,
        "heldout_pairs": sum(night.heldout.filter(pc.equal(night.heldout["user_id"], u)).num_rows for u in users),
        "steps": product_steps, "lora_settings": {k: v for k, v in lora_base.items() if k != "method"},
        "lora_applied": lora_applied,
        "fit_seconds_per_user": fit_s, "cpu_seconds_per_user": {m: at[m]["cpu_s"] for m in methods},
        "encode_seconds_per_user": enc, "seconds_per_user_with_encoding": total,
        "users_per_hour_one_process": {m: 3600 / total[m] for m in methods},
        "speedup_vs_lora_dpo": {m: total["lora_dpo"] / total[m] for m in MODES},
        "speedup_vs_lora_dpo_fit_only": {m: fit_s["lora_dpo"] / fit_s[m] for m in MODES},
        "speedup_vs_lora_dpo_cpu_fit_only": {m: at["lora_dpo"]["cpu_s"] / at[m]["cpu_s"] for m in MODES},
        "heldout_accuracy": {m: at[m]["heldout_accuracy"] for m in methods},
        "quality": {"target_heldout_accuracy": target,
                    "target_rule": "given" if quality_target is not None else
                    "highest held-out accuracy every method reaches on its grid (min over methods of its best)",
                    "grid_factors": QUALITY_FACTORS, "curves": curves, "reached": reach,
                    "speedup_vs_lora_dpo": {m: (lora_reach["seconds"] / reach[m]["seconds"]
                                                if lora_reach and reach[m] else None) for m in MODES}},
        "load_avg": _load(),
    }


# ------------------------------------------------------------------------------------------------ scale run
def synthetic_cache(n_prompts: int, n_responses_per_prompt: int, Q: int, d: int, D: int, seed: int):
    """A LatentCache of the world CLaP's shapes with random features / posteriors (timing only)."""
    from latentpref.tasks.policy.cache import LatentCache, text_key
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.layer_norm(torch.randn(n_prompts, Q, d, generator=g), (d,))
    R = n_prompts * n_responses_per_prompt
    mu = torch.randn(R, D, generator=g)
    logvar = -1.0 + 0.3 * torch.randn(R, D, generator=g)
    return LatentCache({text_key(f"p{i}"): i for i in range(n_prompts)}, feats,
                       {text_key(f"p{i}", f"r{j}"): i * n_responses_per_prompt + j
                        for i in range(n_prompts) for j in range(n_responses_per_prompt)}, mu, logvar)


def _scale_jobs(root: str, n_users: int, users_per_task: int, steps: int, noise_draws: int | None, seed: int,
                prefix: str = "s") -> list:
    """ChunkJobs of n_users synthetic users (64 pairs, 2 distinct responses of a random prompt each)."""
    from latentpref.tasks.data.ipc import table_to_ipc
    from latentpref.tasks.train.personalize import ChunkJob
    rng = np.random.default_rng(seed)
    schema = pa.schema([("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("weight", pa.float32())])
    fit = {"steps": steps, "lr": mode_lr("head-only"), "seed": 0, "noise_draws": noise_draws}
    jobs = []
    for s in range(0, n_users, users_per_task):
        ids = [f"{prefix}{u:06d}" for u in range(s, min(s + users_per_task, n_users))]
        prompts = rng.integers(0, SCALE_PROMPTS, size=len(ids) * PAIRS_PER_USER)
        resp = np.argsort(rng.random((len(prompts), SCALE_RESPONSES)), axis=1)[:, :2]
        table = pa.table({"user_id": np.repeat(ids, PAIRS_PER_USER), "prompt": [f"p{p}" for p in prompts],
                          "chosen": [f"r{r}" for r in resp[:, 0]], "rejected": [f"r{r}" for r in resp[:, 1]],
                          "weight": np.ones(len(prompts), dtype=np.float32)}, schema=schema)
        jobs.append(ChunkJob(store_root=root, clap_version="synthetic", user_ids=tuple(ids), fit=fit,
                             cache_path=("cache", "synthetic", "latents.safetensors"), pairs_ipc=table_to_ipc(table),
                             mode="head-only", min_pairs=4))
    return jobs


SCALE_PROMPTS, SCALE_RESPONSES = 200, 8


def _timed_fit_chunk(job):
    """fit_chunk plus the CPU seconds the task used (for the load picture of the fan-out)."""
    from latentpref.tasks.train.personalize import fit_chunk
    c0 = time.process_time()
    records = fit_chunk(job)
    return records, time.process_time() - c0


def _warm_worker() -> float:
    t0 = time.perf_counter()
    import latentpref.tasks.train.fit_user  # noqa: F401  (what a fresh Ray worker imports for its first chunk)
    import latentpref.tasks.train.personalize  # noqa: F401
    return time.perf_counter() - t0


def _predict(task_users: list[int], slots: int, per_user_s: float, fixed_s: float) -> float:
    """List scheduling of the tasks in submission order on `slots` workers (what Ray does with equal tasks)."""
    free = [0.0] * slots
    for n in task_users:
        i = free.index(min(free))
        free[i] += n * per_user_s
    return fixed_s + max(free)


def scale_run(n_users: int, workers: int, steps: int, users_per_task: int, fit_s_per_user_slot: float,
              Q: int, d: int, D: int, noise_draws: dict[str, int | None]) -> dict:
    """n_users simulated head-only users (64 pairs) through ray.remote(fit_chunk); measured vs predicted.

    Capacity model (benchmarks/README.md): T = T_ray_start + T_worker_warmup + makespan of the chunk tasks on the
    slots, a task costing users * (t_fit + t_nonfit). t_fit comes from the throughput probe at the same steps,
    t_nonfit (hash, lookup, artifact + manifest + pointer writes) from fit_chunk with steps=0 in-process; the two
    fixed costs are measured in this run.
    """
    import ray

    from latentpref.tasks.data.store import Store
    from latentpref.tasks.train.personalize import fit_chunk
    root = tempfile.mkdtemp(prefix="lp-bench-scale-")
    cache = synthetic_cache(SCALE_PROMPTS, SCALE_RESPONSES, Q, d, D, seed=0)
    Store(root).write_bytes(cache.to_bytes(), "cache", "synthetic", "latents.safetensors")
    # t_nonfit: the per-user path of fit_chunk other than the fit itself (steps=0 leaves only the final eval)
    probe = _scale_jobs(root, users_per_task, users_per_task, 0, noise_draws["head-only"], seed=1, prefix="io")[0]
    t0 = time.perf_counter()
    fit_chunk(probe)
    nonfit_s = (time.perf_counter() - t0) / users_per_task
    jobs = _scale_jobs(root, n_users, users_per_task, steps, noise_draws["head-only"], seed=0)
    load0 = _load()
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2 ** 20)
    ray_start_s = time.perf_counter() - t0
    warm = ray.get([ray.remote(num_cpus=1)(_warm_worker).remote() for _ in range(workers)])
    warm_s = time.perf_counter() - t0 - ray_start_s
    remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=True)(_timed_fit_chunk)
    t1 = time.perf_counter()
    out_refs = [remote.remote(job) for job in jobs]
    results = [ray.get(ref) for ref in out_refs]
    fanout_s = time.perf_counter() - t1
    ray.shutdown()
    wall = time.perf_counter() - t0
    records = [r for recs, _ in results for r in recs]
    task_cpu = sum(c for _, c in results)
    fitted = [r for r in records if r["status"] == "fitted"]
    task_users = [len(job.user_ids) for job in jobs]
    fixed = ray_start_s + warm_s
    predicted = _predict(task_users, workers, fit_s_per_user_slot + nonfit_s, fixed)
    out = {"users": n_users, "fitted": len(fitted), "tasks": len(jobs), "users_per_task": users_per_task,
           "workers": workers, "steps": steps, "wall_s": wall, "fanout_s": fanout_s,
           "fixed_s": {"ray_start": ray_start_s, "worker_warmup": warm_s, "worker_import_s": warm},
           "model_inputs": {"fit_s_per_user_slot": fit_s_per_user_slot, "nonfit_s_per_user": nonfit_s},
           "predicted_wall_s": predicted, "measured_over_predicted": wall / predicted,
           "task_cpu_s": task_cpu, "cpu_share_during_fanout": task_cpu / (fanout_s * workers),
           "sum_fit_wall_s_in_tasks": sum(r["fit_seconds"] for r in fitted),
           "users_per_hour_end_to_end": 3600 * n_users / wall,
           "artifact_bytes_head_only": fitted[0]["artifact_bytes"],
           "load_avg_before": load0, "load_avg_after": _load()}
    shutil.rmtree(root, ignore_errors=True)
    log.info("scale run: %d users in %.0fs (predicted %.0fs)", n_users, wall, predicted)
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default=None, help="a finished run of --preset to reuse (else one is built)")
    ap.add_argument("--workers", type=int, default=2, help="processes (one thread each) = cores used")
    ap.add_argument("--head-users", type=int, default=2000)
    ap.add_argument("--encoder-users", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None,
                    help="every mode's steps; default: PersonalizeConfig's per mode (head-only 50, others 100)")
    ap.add_argument("--noise-draws", default="default",
                    help="FitConfig.noise_draws: 'default' (PersonalizeConfig's per mode: fresh for faithful), "
                         "'none' (fresh every step) or an int")
    ap.add_argument("--epochs", type=int, default=8, help="passes over the 64 pairs for the LoRA comparison")
    ap.add_argument("--lora-users", type=int, default=2)
    ap.add_argument("--scale-users", type=int, default=10000, help="0 skips the fan-out run")
    ap.add_argument("--scale-steps", type=int, default=20, help="fit steps per user in the fan-out run")
    ap.add_argument("--scale-probe-users", type=int, default=400, help="users of the probe that feeds the model")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: heldout,throughput,lora,scale,"
                                               "product")
    ap.add_argument("--preset", default="tiny", help="the preset whose night's settings are timed (pipelines/config.py)")
    ap.add_argument("--product-users", type=int, default=3,
                    help="real users of the world fitted alone at product settings and on the time-to-quality grid")
    ap.add_argument("--quality-target", type=float, default=None,
                    help="held-out accuracy for time-to-quality (default: the best level every method reaches)")
    ap.add_argument("--carry", default=None, metavar="OLD_JSON",
                    help="copy the sections skipped here from an earlier result (noted in `carried`)")
    args = ap.parse_args(argv)
    global PRESET
    PRESET = args.preset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    from latentpref.pipelines.config import load_config
    from latentpref.tasks.models.clap import load_clap, load_clap_tokenizer
    night_cfg = load_config(PRESET)
    pcfg = {m: product_config(m) for m in MODES}
    steps = {m: args.steps or pcfg[m].steps for m in MODES}   # the product's, per mode
    if args.noise_draws == "default":    # as the product: the preset's per-mode value (faithful: fresh)
        noise_draws = {m: pcfg[m].fit_noise_draws() for m in MODES}
    else:
        noise_draws = dict.fromkeys(MODES, None if args.noise_draws == "none" else int(args.noise_draws))
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    world = ensure_world(args.store)
    clap = load_clap(world.clap_dir)
    tokenizer = load_clap_tokenizer(world.clap_dir)
    cache, pairs = world_cache(world, clap, tokenizer)
    work = tempfile.mkdtemp(prefix="lp-bench-")
    cache_file = os.path.join(work, "cache.safetensors")
    Path(cache_file).write_bytes(cache.to_bytes())
    Q, d = cache.features.shape[1:]
    D = cache.mu.shape[1]
    result: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads_per_worker": 1, "load_avg_at_start": _load()},
        "world": {**asdict(world), "latent_dim": D, "n_query": Q, "d": d,
                  "trainable_params": {}, "artifact_bytes": {}},
        "settings": {"pairs_per_user": PAIRS_PER_USER, "steps": steps, "noise_draws": noise_draws,
                     "lr": {m: pcfg[m].lr for m in MODES}, "beta": pcfg["head-only"].beta,
                     "n_samples": pcfg["head-only"].n_samples, "evidence_ratio": pcfg["head-only"].evidence_ratio,
                     "loss_type": pcfg["head-only"].loss_type, "preset": PRESET,
                     "product_settings": args.steps is None and args.noise_draws == "default",
                     "source": f"pipelines/config.py load_config({PRESET!r}) with personalize.mode per mode "
                               "(MODE_STEPS / MODE_LR / MODE_NOISE_DRAWS where the preset leaves them unset) and "
                               "its evaluate.baseline_* for LoRA-DPO",
                     "lora_dpo": {"steps": night_cfg.evaluate.baseline_steps,
                                  "lr": night_cfg.evaluate.lr_by_method()["lora_dpo"],
                                  "beta": night_cfg.evaluate.beta_by_method()["lora_dpo"],
                                  "batch_size": night_cfg.evaluate.baseline_batch_size, "r": 8}},
        "notes": [],
    }
    from latentpref.tasks.train.fit_encoder import trainable_names
    for mode in ("trunk-frozen", "faithful"):
        params = dict(clap.encoder.named_parameters())
        n = sum(params[k].numel() for k in trainable_names(clap.encoder, mode))
        result["world"]["trainable_params"][mode] = n
        result["world"]["artifact_bytes"][mode] = 4 * n
    result["world"]["trainable_params"]["head-only"] = Q * d * 2 * D // Q + 2 * D
    result["world"]["artifact_bytes"]["head-only"] = 4 * result["world"]["trainable_params"]["head-only"]

    if "heldout" not in skip:
        ho = heldout_accuracy(world, clap.encoder.eval().requires_grad_(False), cache, pairs, steps, noise_draws)
        result["heldout_accuracy"] = ho.pop("by_mode")
        result["heldout_detail"] = ho
        result["heldout_accuracy"]["prior"] = 0.5   # N(0, I) for everyone: every pair ties
    if "throughput" not in skip:
        result["users_per_hour"], result["throughput_detail"] = {}, {}
        for mode in MODES:
            n = args.head_users if mode == "head-only" else args.encoder_users
            detail = users_per_hour(world, cache_file, mode, n, args.workers, steps[mode], noise_draws)
            detail["extrapolated"] = mode != "head-only"
            result["users_per_hour"][mode] = detail["users_per_hour"]
            result["throughput_detail"][mode] = detail
        result["notes"].append(
            f"users_per_hour: head-only measured on {args.head_users} users; trunk-frozen and faithful measured on "
            f"{args.encoder_users} users each and extrapolated linearly to an hour (their cost is per user, "
            "compute-bound). Fit wall time of the slowest of the worker processes; process start, data loading and "
            "artifact writes excluded (see scale_run for the end-to-end fan-out).")
    if "lora" not in skip:
        lora = seconds_vs_lora(world, clap, tokenizer, cache, pairs, args.epochs, args.lora_users, noise_draws)
        result["seconds_per_user"] = lora.pop("seconds_per_user")
        result["speedup_vs_lora_dpo"] = lora.pop("speedup_vs_lora_dpo")
        result["lora_detail"] = lora
        result["notes"].append(
            f"seconds_per_user / speedup_vs_lora_dpo: the same 64 pairs per user, {args.epochs} passes over them for "
            f"every method (latent modes: {args.epochs} full-batch steps; LoRA-DPO r=8: {lora['lora_steps']} steps "
            "of 8 pairs); mean over users; cached user-independent inputs not timed (posteriors; reference log-probs).")
    if "product" not in skip:
        prod = product_and_quality(world, args.product_users, quality_target=args.quality_target)
        result["product"] = prod
        result["settings"]["lora_dpo"].update(prod["lora_applied"])
        if "throughput_detail" in result:   # the batched figure with each user's own texts encoded too
            per_pair = {m: prod["encode_seconds_per_user"][m] / np.mean(prod["train_pairs_per_user"]) for m in MODES}
            result["users_per_hour_with_encoding"] = {
                m: 3600 / (_per_slot(result["throughput_detail"][m]) / args.workers + per_pair[m] * PAIRS_PER_USER
                           / args.workers) for m in MODES}
        result["notes"].append(
            f"product: {prod['users']} real users of the world (their own train pairs), each fitted alone by every "
            "method at the preset's settings (settings.steps / settings.lr / settings.lora_dpo); seconds include "
            "the user's own encoding (latent: CLaP cache of the user's pairs; LoRA-DPO: reference log-probs); "
            "product.quality: time to the stated LM-based held-out accuracy on a grid of step counts. "
            "users_per_hour_with_encoding: the batched throughput (throughput_detail, fit wall per worker slot) "
            "plus each user's own encoding (product's encode seconds per pair x 64 pairs), on the same workers.")
    if "scale" not in skip and args.scale_users > 0:
        # the model's fit cost: probes at the scale run's steps just before and just after it (the box's load drifts)
        probes = [users_per_hour(world, cache_file, "head-only", args.scale_probe_users, args.workers,
                                 args.scale_steps, noise_draws, synthetic=(Q, d, D))]
        fit_s = probes[0]["wall_s"] * args.workers / probes[0]["users"]
        run = scale_run(args.scale_users, args.workers, args.scale_steps, pcfg['head-only'].users_per_task,
                        fit_s, Q, d, D, noise_draws)
        probes.append(users_per_hour(world, cache_file, "head-only", args.scale_probe_users, args.workers,
                                     args.scale_steps, noise_draws, synthetic=(Q, d, D)))
        fit_after = probes[1]["wall_s"] * args.workers / probes[1]["users"]
        tasks = [min(pcfg['head-only'].users_per_task, args.scale_users - s)
                 for s in range(0, args.scale_users, pcfg['head-only'].users_per_task)]
        fixed = run["fixed_s"]["ray_start"] + run["fixed_s"]["worker_warmup"]
        nonfit = run["model_inputs"]["nonfit_s_per_user"]
        run["predicted_wall_s_probe_after"] = _predict(tasks, args.workers, fit_after + nonfit, fixed)
        run["predicted_wall_s_probe_mean"] = _predict(tasks, args.workers, (fit_s + fit_after) / 2 + nonfit, fixed)
        run["predicted_wall_s_idle_box"] = _predict(
            tasks, args.workers, (probes[0]["cpu_s_per_user"] + probes[1]["cpu_s_per_user"]) / 2 + nonfit, fixed)
        run["probes"] = probes
        result["scale_run"] = run
        result["notes"].append(
            f"scale_run: {args.scale_users} simulated users through the real fan-out (ray.remote(fit_chunk), chunks of "
            f"{pcfg['head-only'].users_per_task} users, artifacts to a local store) at {args.scale_steps} steps per "
            "user (not 100: keeps the check to minutes on the shared box; fit cost is linear in steps), on synthetic "
            "cached features/posteriors of the world CLaP's shapes. predicted_wall_s = Ray start + worker warm-up "
            "(both measured in the run) + makespan of the chunk tasks on the workers, a user costing the fit wall "
            f"time per worker slot of a {args.scale_probe_users}-user probe on the same synthetic data and steps "
            "(just before; another just after) + fit_chunk's non-fit per-user cost (steps=0). "
            "predicted_wall_s_idle_box uses the "
            "probes' CPU seconds instead of wall (what an unshared box would give).")
    if args.carry:
        old = json.loads(Path(args.carry).read_text())
        sections = {"heldout": ("heldout_accuracy", "heldout_detail"), "throughput": ("users_per_hour", "throughput_detail"),
                    "lora": ("seconds_per_user", "speedup_vs_lora_dpo", "lora_detail"), "scale": ("scale_run",)}
        carried = [k for sec in skip for k in sections.get(sec, ()) if k in old and k not in result]
        for k in carried:
            result[k] = old[k]
        result["carried"] = {"from": args.carry, "keys": carried,
                             "from_machine": old.get("machine", {}), "from_settings": old.get("settings", {})}
        if carried:
            result["notes"].append(f"carried over unchanged from an earlier run ({args.carry}, its own settings in "
                                   f"carried.from_settings): {', '.join(carried)}")
    if "heldout" in skip and "heldout_accuracy" not in result:
        result["notes"].append("heldout_accuracy (the latent-space measure): not measured in this run (--skip "
                               "heldout); product.heldout_accuracy is the LM-run measure")
    result["machine"]["load_avg_at_end"] = _load()
    result["machine"]["total_seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
