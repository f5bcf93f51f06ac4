"""One fan-out unit of the evaluation stage: a few users evaluated against every method in one worker.

Plain data in, Arrow IPC bytes out, so the orchestration layer can run it as a Ray task (with retries) or
inline; nothing here imports Ray, Prefect or MLflow. Each worker process loads the CLaP and the base LM once
(`functools.lru_cache`) and reuses them for every chunk it is given.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pyarrow as pa

from latentpref.tasks.data.store import Store
from latentpref.tasks.data.ipc import table_from_ipc, table_to_ipc  # noqa: F401  (re-exported for the flow)


@dataclass(frozen=True)
class EvalChunkJob:
    store_root: str
    clap_path: tuple[str, ...]
    base_model_path: tuple[str, ...]
    base_seed: int
    user_ids: tuple[str, ...]
    users_ipc: bytes            # hidden user table (evaluation only), the chunk's users
    train_ipc: bytes            # the chunk's train pairs
    heldout_ipc: bytes          # the chunk's held-out pairs
    test_prompts: tuple[str, ...]
    references: tuple[str, ...]
    settings: object            # tasks.evaluate.evaluate.EvalSettings (kept untyped here to stay import-light)
    threads: int = 1            # torch threads: the CPUs the task was given
    clap_version: str | None = None   # the policy table to read (None: the store's current CLaP)
    policy_at: str | int | None = None  # its tag / version: the night's (None: the latest)


@functools.lru_cache(maxsize=1)
def _models(store_root: str, clap_path: tuple[str, ...], base_model_path: tuple[str, ...], base_seed: int):
    from latentpref.tasks.models.clap import load_clap
    from latentpref.tasks.models.registry import load_base_model

    store = Store(store_root)
    clap = load_clap(store.local_copy(*clap_path)).eval()
    base_model, tokenizer = load_base_model(store.local_copy(*base_model_path), seed=base_seed)
    return clap, base_model.eval(), tokenizer


def evaluate_chunk(job: EvalChunkJob) -> bytes:
    """Evaluate `job.user_ids` (their stored latent policies and the configured baselines); per-user rows as IPC."""
    from latentpref.tasks.evaluate.evaluate import evaluate_users
    from latentpref.tasks.policy.store import policy_table

    import torch
    torch.set_num_threads(job.threads)   # Ray sets OMP_NUM_THREADS=1; the task owns this many CPUs
    store = Store(job.store_root)
    clap, base_model, tokenizer = _models(job.store_root, job.clap_path, job.base_model_path, job.base_seed)
    table = policy_table(store, job.clap_version)
    found = table.policies(job.user_ids, job.policy_at) if table is not None else {}
    policies = {u: found.get(u) for u in job.user_ids}
    missing = [u for u, p in policies.items() if p is None]
    if missing:
        raise ValueError(f"users {missing[:5]} have no stored fit; run personalize before evaluate")
    per_user = evaluate_users(
        clap=clap, base_model=base_model, tokenizer=tokenizer, users_table=table_from_ipc(job.users_ipc),
        user_ids=list(job.user_ids), test_prompts=list(job.test_prompts), references=list(job.references),
        train_pairs=table_from_ipc(job.train_ipc), heldout_pairs=table_from_ipc(job.heldout_ipc),
        user_policies=policies, settings=job.settings)
    return table_to_ipc(per_user)
