"""personalize stage: latent cache once per CLaP version, then Ray tasks fitting chunks of users."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import console, tracking
from latentpref.pipelines.config import DataConfig, PersonalizeConfig
from latentpref.pipelines.pretrain import ClapArtifact
from latentpref.tasks.data.prepare import DataArtifacts
from latentpref.tasks.data.store import Store


@dataclass(frozen=True)
class PersonalizeSummary:
    records_path: tuple[str, ...]     # per-user records table in the store
    cache_path: tuple[str, ...]       # the CLaP version's content-keyed latent table
    n_users: int
    n_fitted: int
    n_unchanged: int
    n_cold_start: int
    seconds: float
    policy_tag: str | None = None     # the night's tag in the CLaP's policy table (evaluation reads it)
    encoded_texts: int = 0            # texts the night encoded (the rest were in the latent table already)


def training_pairs(store: Store, data: DataArtifacts, user_ids: list[str] | None = None) -> pa.Table:
    """The feedback every user (or only `user_ids`) is fitted on: simulated pairs (train split) + ingested real
    feedback, forgotten users dropped, as ONE table (evaluation, tools). The night itself streams the same rows
    (`iter_training_pairs`) and never holds them whole."""
    from latentpref.tasks.train.night_pairs import PAIRS_SCHEMA, PairSources, iter_training_pairs
    batches = list(iter_training_pairs(store, PairSources.of(store, data.pairs.path), user_ids=user_ids))
    return pa.concat_tables(batches) if batches else PAIRS_SCHEMA.empty_table()


@dataclass
class NightTotals:
    """What the driver keeps of the night's tasks: counts and sums, not per-user records (those stream to Parquet
    from the tasks), so its memory does not grow with the number of users."""

    users: int = 0
    fitted: int = 0
    unchanged: int = 0
    cold_start: int = 0
    fit_seconds_sum: float = 0.0
    artifact_bytes_sum: float = 0.0
    mixture_sum: list[float] | None = None
    mixture_n: int = 0
    last_written_at: float = 0.0

    def add(self, result: dict) -> None:
        for k in ("users", "fitted", "unchanged", "cold_start", "mixture_n"):
            setattr(self, k, getattr(self, k) + int(result[k]))
        self.fit_seconds_sum += result["fit_seconds_sum"]
        self.artifact_bytes_sum += result["artifact_bytes_sum"]
        self.last_written_at = max(self.last_written_at, result["last_written_at"])
        if result["mixture_sum"] is not None:
            self.mixture_sum = (list(result["mixture_sum"]) if self.mixture_sum is None
                                else [a + b for a, b in zip(self.mixture_sum, result["mixture_sum"])])


def fan_out_fits(table, jobs: Iterable, n_users: int, *, run_id: str, read_version: int | None, max_retries: int,
                 commit_every_s: float, compact_fragments: int = 0, compact_target_rows: int = 65_536,
                 logger=None) -> tuple[NightTotals, int | None]:
    """The night's fan-out: one Ray task per chunk of users (`run_chunk`: fit, stage rows, write records), a bounded
    window in flight, the staged rows committed by this driver at most every `commit_every_s` and once at the end,
    the table's small fragments merged when it holds more than `compact_fragments` (0 = never), then the night
    tagged `night-<run_id>`. `read_version`: the table version the jobs read (their replaced rows'
    addresses are of it). Keeps counts, not per-user records. Returns (totals, tagged version; None when the table
    is still empty)."""
    import ray
    from tqdm.auto import tqdm

    from latentpref.tasks.policy.table import StagedChunk, night_tag
    from latentpref.tasks.train.personalize import run_chunk
    log_ = logger or logging.getLogger(__name__)
    remote_fit = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(run_chunk)
    # a bounded window of tasks in flight: a job may carry its pairs (IPC; the night's name a file and a row group
    # instead), and submitting every chunk at once would put all of them in the object store together
    in_flight = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))
    queue = iter(jobs)
    pending = {}
    totals = NightTotals()
    to_commit = StagedChunk(read_version=read_version)
    last_commit = time.monotonic()
    with tqdm(total=n_users, desc="personalize users", unit="user") as bar:
        while True:
            for job in queue:
                pending[remote_fit.remote(job)] = len(job.user_ids)
                if len(pending) >= in_flight:
                    break
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                result = ray.get(ref)
                totals.add(result)
                to_commit = to_commit + result["staged"]
                bar.update(pending.pop(ref))
                rate = bar.format_dict.get("rate")
                eta = f"{(n_users - bar.n) / rate:.0f}s" if rate else "?"
                log_.info("personalize: %d/%d users done, ETA %s", bar.n, n_users, eta)
                console.progress("personalize", bar.n, n_users)
            if to_commit.fragments and time.monotonic() - last_commit >= commit_every_s:
                table.commit(to_commit, message=f"night {run_id}: {to_commit.users} users")
                to_commit, last_commit = StagedChunk(read_version=read_version), time.monotonic()
    table.commit(to_commit, message=f"night {run_id}: {to_commit.users} users")
    if compact_fragments and table.fragment_count() > compact_fragments:
        try:
            merged = table.merge_fragments(target_rows_per_fragment=compact_target_rows)
            log_.info("personalize: policy table fragments merged %d -> %d in %.1fs", merged["fragments_before"],
                      merged["fragments_after"], merged["seconds"])
        except Exception as err:   # a concurrent online refit's commit can conflict: the rows are all committed
            log_.warning("personalize: merging the policy table's fragments failed (%s: %s); tagging it as it is",
                         type(err).__name__, str(err)[:300])
    return totals, (table.tag(night_tag(run_id)) if table.exists() else None)


def merge_record_parts(store: Store, parts_dir: tuple[str, ...], records_path: tuple[str, ...]) -> str:
    """The tasks' per-user record files -> one Parquet table at `records_path`, one part in memory at a time; the
    parts are removed after. Returns the merged file's local copy (for MLflow; the caller removes it)."""
    import tempfile

    import pyarrow.parquet as pq

    from latentpref.tasks.train.personalize import records_table
    local = os.path.join(tempfile.mkdtemp(prefix="latentpref-records-"), records_path[-1])
    names = [n for n in store.listdir(*parts_dir) if n.endswith(".parquet")]
    schema = records_table([]).schema
    with pq.ParquetWriter(local, schema, compression="zstd") as writer:
        for name in names:
            writer.write_table(store.read_table(*parts_dir, name).cast(schema))
    store.put_file(local, *records_path)
    for name in names:
        store.delete(*parts_dir, name)
    return local


def _perplexity(usage) -> float:
    """exp(entropy) of a code-usage vector: the effective number of codes (K = all used equally)."""
    import torch

    from latentpref.tasks.models.lpc import code_usage_perplexity
    return float(code_usage_perplexity(torch.as_tensor(usage, dtype=torch.float64)))


def _plan_pair_texts(planner):
    """An observer of the night's pair batches for the encode plan: every pair's prompt, (prompt, chosen) before
    (prompt, rejected) (groups 0 / 1: the order one plan over the whole table's lists gives) and, for discrete
    CLaPs, the pair itself; only the texts the latent table lacks are kept."""
    def observe(batch: pa.Table) -> None:
        prompts, chosen, rejected = (batch[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
        planner.add("prompt", prompts)
        planner.add("response", zip(prompts, chosen), group=0)
        planner.add("response", zip(prompts, rejected), group=1)
        planner.add("pair", zip(prompts, chosen, rejected))
    return observe


def _encode_new_texts(table, jobs: list, cfg: PersonalizeConfig, logger) -> dict:
    """Encode, in Ray tasks, the planned texts (tonight's pairs' and the evaluation prompts' texts that the CLaP
    version's content-keyed latent table does not hold yet: `EncodePlanner`); the driver commits once. A text is
    encoded once per CLaP version, whoever's feedback it is in (tasks/policy/text_cache.py)."""
    import ray
    from tqdm.auto import tqdm

    from latentpref.tasks.policy.text_cache import encode_texts
    t0 = time.perf_counter()
    remote = ray.remote(num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True)(encode_texts)
    fragments, texts, tokens = [], 0, 0
    n_texts = sum(j.n_texts for j in jobs)
    pending = {remote.remote(j): j.n_texts for j in jobs}
    with tqdm(total=n_texts, desc="encode new texts", unit="text", disable=not jobs) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                result = ray.get(ref)
                fragments += result["fragments"]
                texts += result["texts"]
                tokens += result["tokens"]
                bar.update(pending.pop(ref))
                console.progress("encode", bar.n, n_texts)
    table.commit(fragments)
    seconds = time.perf_counter() - t0
    logger.info("personalize: %d new texts (%d tokens) encoded by %d tasks in %.1fs", texts, tokens, len(jobs), seconds)
    return {"encoded_texts": texts, "encoded_tokens": tokens, "encode_tasks": len(jobs), "encode_seconds": seconds}


def plan_night_pairs(store: Store, data: DataArtifacts, *, planner, user_ids: list[str] | None,
                     users_per_task: int, folder: tuple[str, ...]) -> tuple[list[str], list]:
    """The night's users and where each chunk's pairs are, in memory bounded whatever the number of users or pairs
    (tasks/train/night_pairs.py): one streamed read of the pairs (counted per user, their new texts planned by
    `planner`), then the pairs written under `folder` of the store sorted by user, one row group per chunk.

    Returns (everyone: the sorted user ids, chunk k = everyone[k*users_per_task : (k+1)*users_per_task];
    the `ChunkPairs` of each chunk). Local scratch files (about twice the compressed pairs) are removed."""
    from latentpref.tasks.train.night_pairs import (PairSources, iter_training_pairs, population_ids, spill_pairs,
                                                    write_chunk_pairs)
    sources = PairSources.of(store, data.pairs.path)
    scratch = tempfile.mkdtemp(prefix="latentpref-night-pairs-")   # a fresh folder per attempt: never read twice
    try:
        spill = os.path.join(scratch, "pairs.arrow")
        counts = spill_pairs(iter_training_pairs(store, sources, user_ids=user_ids), spill,
                             observe=_plan_pair_texts(planner))
        population = population_ids(store, data.users.path, sources.forgotten)
        if user_ids is not None:
            wanted = set(user_ids)
            population = [u for u in population if u in wanted]
        everyone = sorted(set(population).union(counts))
        del population
        placement = write_chunk_pairs(store, spill, everyone, counts, users_per_task=users_per_task, folder=folder,
                                      scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return everyone, placement


def chunk_jobs(everyone: list[str], placement: list, *, users_per_task: int, parts_dir: tuple[str, ...],
               **fields) -> Iterator:
    """The night's ChunkJobs, one at a time: chunk k = everyone[k*users_per_task : (k+1)*users_per_task], its pairs
    named by file and row group (`placement[k]`, from `plan_night_pairs`; a chunk without pairs carries the empty
    table), its records written to `parts_dir`. `fields`: the ChunkJob fields every chunk shares."""
    from latentpref.tasks.train.night_pairs import empty_pairs_ipc
    from latentpref.tasks.train.personalize import ChunkJob
    no_pairs = empty_pairs_ipc()
    for k, i in enumerate(range(0, len(everyone), users_per_task)):
        where = placement[k]
        pairs = ({"pairs_path": where.path, "pairs_row_groups": (where.row_group,)} if where.rows
                 else {"pairs_ipc": no_pairs})
        # the encoder modes (trunk-frozen, faithful) load the CLaP in the worker, from the store
        yield ChunkJob(user_ids=tuple(everyone[i:i + users_per_task]), **pairs, **fields,
                       records_path=(*parts_dir, f"part-{k:07d}.parquet"))


@task(name="personalize", cache_policy=NO_CACHE)
def personalize_stage(cfg: PersonalizeConfig, data_cfg: DataConfig, data: DataArtifacts, clap: ClapArtifact,
                      store: Store, parent_run_id: str, user_ids: list[str] | None = None) -> PersonalizeSummary:
    import mlflow

    from latentpref.tasks.models.clap import CONFIG_FILE
    from latentpref.tasks.policy.table import PolicyTable, night_tag
    from latentpref.tasks.policy.text_cache import EncodePlanner, TextLatentTable
    logger = get_run_logger()
    t0 = time.perf_counter()
    with mlflow.start_run(run_name="personalize", parent_run_id=parent_run_id, nested=True):
        mlflow.set_tags({"clap_version": clap.version, "mode": cfg.mode})
        tracking.log_params(tracking.flatten("personalize", cfg))
        from latentpref.tasks.policy.store import migrate_legacy, needs_migration
        if needs_migration(store):   # a store from before the policy table: its users' fits are copied in once
            moved = migrate_legacy(store)
            logger.info("personalize: %d users' fits migrated from per-user folders into the policy table",
                        moved["migrated"])
        tracking.log_table_input(data.pairs.url(store), name="pairs", digest=data.pairs.digest, context="training",
                                 rows=data.pairs.rows)
        # the CLaP's saved CLaPConfig: its latent type (encoding) and preference space (preference_only)
        clap_config = store.read_json(*clap.path, CONFIG_FILE)["clap_config"]
        texts = TextLatentTable(store, clap.version)
        fit = cfg.fit_settings()   # the same payload the evaluation times its refit with
        if cfg.preference_only:
            fit = _preference_projection(clap_config, clap.version, cfg, fit)
        table = PolicyTable(store, clap.version)
        parts_dir = ("runs", parent_run_id, "personalize_users")
        # the night's pairs, sorted by user into a run-scoped table (one row group per chunk), so neither the driver
        # nor a job holds the whole night's pairs; removed when the fits are done. Files a killed earlier attempt of
        # this run left there are removed first: jobs name only what this attempt wrote.
        pairs_dir = ("runs", parent_run_id, "personalize_pairs")
        store.delete(*pairs_dir)
        try:
            planner = EncodePlanner(texts, discrete=clap_config.get("latent_type") == "discrete")
            everyone, placement = plan_night_pairs(store, data, planner=planner, user_ids=user_ids,
                                                   users_per_task=cfg.users_per_task, folder=pairs_dir)
            # prompts of the evaluation split are encoded too, so evaluation and serving find them cached
            planner.add("prompt", store.read_table(*data.prompts.path)["prompt"].to_pylist(), group=1)
            encode_jobs = planner.jobs(texts_per_job=cfg.texts_per_encode_task, clap_path=tuple(clap.path),
                                       tokenizer_path=tuple(data.base_model_path),
                                       prompt_tokens=data_cfg.prompt_tokens, response_tokens=data_cfg.response_tokens,
                                       threads=1)
            del planner
            encoded = _encode_new_texts(texts, encode_jobs, cfg, logger)
            del encode_jobs
            mlflow.log_metrics({k: float(v) for k, v in encoded.items()})
            read_version = table.latest_version()   # every task reads the users' rows of this version
            jobs = chunk_jobs(everyone, placement, users_per_task=cfg.users_per_task, parts_dir=parts_dir,
                              store_root=store.root, clap_version=clap.version, fit=fit, mode=cfg.mode,
                              min_pairs=cfg.min_pairs, clap_path=tuple(clap.path),
                              discrete_estimator=cfg.discrete_estimator, read_version=read_version,
                              night=parent_run_id)
            totals, policy_version = fan_out_fits(table, jobs, len(everyone), run_id=parent_run_id,
                                                  read_version=read_version, max_retries=cfg.max_retries,
                                                  commit_every_s=cfg.commit_every_s,
                                                  compact_fragments=cfg.compact_fragments,
                                                  compact_target_rows=cfg.compact_target_rows, logger=logger)
        finally:   # the pairs are in the prepared tables and the feedback store: this copy served its night
            store.delete(*pairs_dir)
        cache_path = ("cache", clap.version, "texts.lance")
        tag = night_tag(parent_run_id)
        records_path = ("runs", parent_run_id, "personalize_users.parquet")
        local_records = merge_record_parts(store, parts_dir, records_path)
        seconds = time.perf_counter() - t0
        summary = PersonalizeSummary(records_path, cache_path, totals.users, totals.fitted, totals.unchanged,
                                     totals.cold_start, seconds, tag if policy_version is not None else None,
                                     encoded["encoded_texts"])
        if totals.mixture_n:   # discrete CLaP: how many codes the users' profiles spread over (lpc.md §6.3)
            mlflow.set_tag("latent_type", "discrete")
            mlflow.log_metric("user_code_usage_perplexity",
                              _perplexity(np.asarray(totals.mixture_sum) / totals.mixture_n))
        mlflow.log_metrics({"users": summary.n_users, "users_fitted": summary.n_fitted,
                            "users_unchanged": summary.n_unchanged, "users_cold_start": summary.n_cold_start,
                            "stage_seconds": seconds,
                            "mean_fit_seconds_per_user": totals.fit_seconds_sum / max(totals.fitted, 1),
                            "mean_artifact_bytes": totals.artifact_bytes_sum / max(totals.users, 1)})
        mlflow.set_tags({"policy_table": table.uri, "policy_tag": tag, "policy_version": str(policy_version)})
        mlflow.log_artifact(local_records)
        shutil.rmtree(os.path.dirname(local_records), ignore_errors=True)
        if user_ids is None:   # every user of the night is written: servers may switch to this CLaP and its users
            from latentpref.tasks.evaluate.serve_core import publish_release
            release = publish_release(store, clap_version=clap.version, run_id=parent_run_id, mode=cfg.mode,
                                      n_users=summary.n_users, records_path=list(records_path),
                                      last_written_at=totals.last_written_at or None, policy_tag=tag,
                                      policy_version=policy_version,
                                      # what an online refit (POST /v1/feedback) needs to write the night's row
                                      pairs_path=list(data.pairs.path), fit=fit.as_dict(),
                                      min_pairs=cfg.min_pairs, discrete_estimator=cfg.discrete_estimator)
            mlflow.set_tag("serving_release", release.release_id)
    logger.info("personalize: %d users (%d fitted, %d unchanged, %d cold start) in %.1fs", summary.n_users,
                summary.n_fitted, summary.n_unchanged, summary.n_cold_start, seconds)
    return summary


def _preference_projection(saved: dict, clap_version: str, cfg: PersonalizeConfig, fit):
    """`personalize.preference_only`: the fit settings that project every head-only fit onto the CLaP's preference
    space (its `preference_dims` first coordinates); `saved` is the CLaP's saved CLaPConfig."""
    import dataclasses
    dims = int(saved.get("preference_dims", 0))
    if not dims or saved.get("latent_type", "gaussian") != "gaussian" or cfg.mode != "head-only":
        raise ValueError(f"personalize.preference_only needs head-only fits of a Gaussian CLaP with a preference "
                         f"space (pretrain.preference_dims > 0); CLaP {clap_version} has preference_dims={dims}, "
                         f"latent_type={saved.get('latent_type', 'gaussian')!r}, mode={cfg.mode!r}")
    return dataclasses.replace(fit, project_dims=dims, project_scale=cfg.preference_scale)
