"""personalize stage: latent cache once per CLaP version, then Ray tasks fitting chunks of users."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import console, tracking
from latentpref.pipelines.config import DataConfig, PersonalizeConfig
from latentpref.pipelines.pretrain import ClapArtifact
from latentpref.tasks.data.prepare import DataArtifacts
from latentpref.tasks.data.store import Store, json_digest, table_digest


@dataclass(frozen=True)
class PersonalizeSummary:
    records_path: tuple[str, ...]     # per-user records table in the store
    cache_path: tuple[str, ...]
    n_users: int
    n_fitted: int
    n_unchanged: int
    n_cold_start: int
    seconds: float


def training_pairs(store: Store, data: DataArtifacts) -> pa.Table:
    """The feedback every user is fitted on: simulated pairs (train split) + ingested real feedback."""
    from latentpref.tasks.data.ingest import read_feedback_store
    pairs = store.read_table(*data.pairs.path)
    pairs = pairs.filter(pc.equal(pairs["split"], "train"))
    cols = ["user_id", "prompt", "chosen", "rejected", "weight"]
    pairs = pairs.select(cols).cast(pa.schema([("user_id", pa.string()), ("prompt", pa.string()),
                                               ("chosen", pa.string()), ("rejected", pa.string()),
                                               ("weight", pa.float32())]))
    ingested = read_feedback_store(store)
    if ingested is not None and ingested.num_rows:
        pairs = pa.concat_tables([pairs, ingested.select(cols).cast(pairs.schema)])
    return pairs


def _perplexity(usage) -> float:
    """exp(entropy) of a code-usage vector: the effective number of codes (K = all used equally)."""
    import torch

    from latentpref.tasks.models.lpc import code_usage_perplexity
    return float(code_usage_perplexity(torch.as_tensor(usage, dtype=torch.float64)))


def _ensure_cache(store: Store, clap: ClapArtifact, data: DataArtifacts, pairs: pa.Table,
                  extra_prompts: list[str], data_cfg: DataConfig, logger) -> tuple[str, ...]:
    from latentpref.tasks.models.clap import load_clap
    from latentpref.tasks.models.registry import load_tokenizer
    from latentpref.tasks.policy.cache import CACHE_FORMAT, build_latent_cache
    # the cache format is part of the digest: a cache written by older code (no prompt tokens) is not reused
    texts_digest = json_digest([table_digest(pairs.select(["prompt", "chosen", "rejected"])),
                                sorted(set(extra_prompts)), CACHE_FORMAT])
    path = ("cache", clap.version, f"latents-{texts_digest}.safetensors")
    if store.exists(*path):
        logger.info("personalize: latent cache %s reused", texts_digest)
        return path
    t0 = time.perf_counter()
    model = load_clap(store.local_copy(*clap.path))
    tokenizer = load_tokenizer(store.local_copy(*data.base_model_path))
    prompts = pairs["prompt"].to_pylist()
    pr = list(zip(prompts, pairs["chosen"].to_pylist())) + list(zip(prompts, pairs["rejected"].to_pylist()))
    # discrete CLaPs also encode each train pair with the pair posterior (the mean_posterior estimator reads it)
    triples = list(zip(prompts, pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()))
    cache = build_latent_cache(model, tokenizer, prompts + extra_prompts, pr,
                               prompt_tokens=data_cfg.prompt_tokens, response_tokens=data_cfg.response_tokens,
                               pairs=triples)
    store.write_bytes(cache.to_bytes(), *path)
    logger.info("personalize: latent cache of %d prompts / %d responses built in %.1fs",
                len(cache.prompt_index), len(cache.response_index), time.perf_counter() - t0)
    return path


@task(name="personalize", cache_policy=NO_CACHE)
def personalize_stage(cfg: PersonalizeConfig, data_cfg: DataConfig, data: DataArtifacts, clap: ClapArtifact,
                      store: Store, parent_run_id: str, user_ids: list[str] | None = None) -> PersonalizeSummary:
    import mlflow
    import ray
    from tqdm.auto import tqdm

    from latentpref.tasks.data.ipc import table_to_ipc
    from latentpref.tasks.train.personalize import ChunkJob, fit_chunk
    logger = get_run_logger()
    t0 = time.perf_counter()
    with mlflow.start_run(run_name="personalize", parent_run_id=parent_run_id, nested=True):
        mlflow.set_tags({"clap_version": clap.version, "mode": cfg.mode})
        tracking.log_params(tracking.flatten("personalize", cfg))
        pairs = training_pairs(store, data)
        tracking.log_table_input(data.pairs.url(store), name="pairs", digest=data.pairs.digest, context="training",
                                 rows=data.pairs.rows)
        population = store.read_table(*data.users.path)["user_id"].to_pylist()
        everyone = list(dict.fromkeys(population + pairs["user_id"].to_pylist()))
        if user_ids is not None:
            wanted = set(user_ids)
            everyone = [u for u in everyone if u in wanted]
            pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(everyone, pa.string())))
        # chunks are runs of consecutive user ids, so after one sort each chunk's pairs are one contiguous slice
        # (a filter per chunk rescans every row: O(rows x chunks), hours at 10^6 users)
        everyone.sort()
        pairs = pairs.sort_by("user_id")
        sorted_users = pairs["user_id"].to_numpy(zero_copy_only=False)
        # prompts of the evaluation split are encoded too, so evaluation and serving find them cached
        prompts_tbl = store.read_table(*data.prompts.path)
        cache_path = _ensure_cache(store, clap, data, pairs, prompts_tbl["prompt"].to_pylist(), data_cfg, logger)

        fit = cfg.fit_settings()   # the same payload the evaluation times its refit with
        remote_fit = ray.remote(num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True)(fit_chunk)

        def jobs():
            for i in range(0, len(everyone), cfg.users_per_task):
                chunk = tuple(everyone[i:i + cfg.users_per_task])
                lo = int(np.searchsorted(sorted_users, chunk[0], side="left"))
                hi = int(np.searchsorted(sorted_users, chunk[-1], side="right"))
                # the encoder modes (trunk-frozen, faithful) load the CLaP in the worker, from the store
                yield ChunkJob(store_root=store.root, clap_version=clap.version, cache_path=cache_path,
                               user_ids=chunk, pairs_ipc=table_to_ipc(pairs.slice(lo, hi - lo)), fit=fit,
                               mode=cfg.mode, min_pairs=cfg.min_pairs, clap_path=tuple(clap.path),
                               discrete_estimator=cfg.discrete_estimator)

        # a bounded window of tasks in flight: each job carries its pairs, and submitting every chunk at once
        # would put all of them in the object store together
        in_flight = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))
        queue = jobs()
        pending = {}
        records = []
        with tqdm(total=len(everyone), desc="personalize users", unit="user") as bar:
            while True:
                for job in queue:
                    pending[remote_fit.remote(job)] = len(job.user_ids)
                    if len(pending) >= in_flight:
                        break
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    records.extend(ray.get(ref))
                    bar.update(pending.pop(ref))
                    rate = bar.format_dict.get("rate")
                    eta = f"{(len(everyone) - bar.n) / rate:.0f}s" if rate else "?"
                    logger.info("personalize: %d/%d users done, ETA %s", bar.n, len(everyone), eta)
                    console.progress("personalize", bar.n, len(everyone))
        table = pa.Table.from_pylist([{k: r.get(k) for k in ("user_id", "status", "mode", "cold_start", "n_pairs",
                                                             "fit_seconds", "train_accuracy", "final_loss",
                                                             "artifact_bytes", "version", "data_hash")}
                                      for r in records])
        seconds = time.perf_counter() - t0
        records_path = ("runs", parent_run_id, "personalize_users.parquet")
        store.write_table(table, *records_path)
        status = table["status"].to_pylist()
        summary = PersonalizeSummary(records_path, cache_path, len(records), status.count("fitted"),
                                     status.count("unchanged"), status.count("cold_start"), seconds)
        fitted_s = [r["fit_seconds"] for r in records if r.get("status") == "fitted"]
        mixtures = [r["code_mixture"] for r in records if r.get("code_mixture")]
        if mixtures:   # discrete CLaP: how many codes the users' profiles spread over (lpc.md §6.3 metrics)
            mlflow.set_tag("latent_type", "discrete")
            mlflow.log_metric("user_code_usage_perplexity", _perplexity(np.mean(mixtures, axis=0)))
        mlflow.log_metrics({"users": summary.n_users, "users_fitted": summary.n_fitted,
                            "users_unchanged": summary.n_unchanged, "users_cold_start": summary.n_cold_start,
                            "stage_seconds": seconds,
                            "mean_fit_seconds_per_user": sum(fitted_s) / len(fitted_s) if fitted_s else 0.0,
                            "mean_artifact_bytes": sum(r["artifact_bytes"] for r in records) / max(len(records), 1)})
        tracking.log_table_artifact(table, "personalize_users")
        if user_ids is None:   # every user of the night is written: servers may switch to this CLaP and its users
            from latentpref.tasks.evaluate.serve_core import publish_release
            release = publish_release(store, clap_version=clap.version, run_id=parent_run_id, mode=cfg.mode,
                                      n_users=summary.n_users, records_path=list(records_path),
                                      last_written_at=max((r.get("written_at", 0.0) for r in records), default=None))
            mlflow.set_tag("serving_release", release.release_id)
    logger.info("personalize: %d users (%d fitted, %d unchanged, %d cold start) in %.1fs", summary.n_users,
                summary.n_fitted, summary.n_unchanged, summary.n_cold_start, seconds)
    return summary
