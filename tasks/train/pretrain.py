"""CLaP pretraining on Ray Train: `TorchTrainer` over N workers, DDP (gloo on CPU, nccl on GPU).

The only module under tasks/ that imports `ray.train` (STYLE.md §1). One `fit()` runs both stages
(spec §2.6): steps [0, stage1_steps) = stage 1 (base frozen, G-skip on), then stage 2 (everything trains,
contrastive on). The stage is derived from the step counter stored in every checkpoint, so a restarted
worker group resumes mid-stage-2 with stage-2 settings (spec §9.7: nothing is silently reset).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)


class PretrainJob(BaseModel):
    """Everything a worker needs, as plain data (Ray hands the loop a dict; we re-validate it)."""

    model_config = ConfigDict(extra="forbid")

    store_root: str
    base_model_path: str            # path under the store of the (SFT'd) base model folder
    prompts_path: list[str]         # path parts of the prompts table under the store
    candidates_path: list[str]
    prompt_tokens: int
    response_tokens: int
    latent_dim: int = 32
    n_query: int = 4
    n_prefix: int = 4
    encoder_layers: int = 2
    stage1_steps: int = 40
    stage2_steps: int = 20
    prompts_per_batch: int = 4
    responses_per_prompt: int = 4
    lr: float = 1e-3
    kl_samples: int = 16
    kl_weight: float = 1.0
    contrastive_weight: float = 1.0
    checkpoint_every: int = 20
    seed: int = 0
    fail_at_step: int | None = None     # fault injection for tests: this worker process dies once at that step
    fail_marker: str | None = None      # a file; the failure fires only while it does not exist yet


def _load_training_data(job: PretrainJob):
    from latentpref.tasks.data.store import Store
    store = Store(job.store_root)
    prompts = store.read_table(*job.prompts_path)
    candidates = store.read_table(*job.candidates_path)
    train_ids = [pid for pid, split in zip(prompts["prompt_id"].to_pylist(), prompts["split"].to_pylist())
                 if split == "train"]
    text_of = dict(zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()))
    by_prompt: dict[str, list[str]] = {}
    for pid, text in zip(candidates["prompt_id"].to_pylist(), candidates["text"].to_pylist()):
        by_prompt.setdefault(pid, []).append(text)
    train_ids = [p for p in train_ids if by_prompt.get(p)]
    return [text_of[p] for p in train_ids], [by_prompt[p] for p in train_ids]


def _build_clap(job: PretrainJob):
    from latentpref.tasks.data.store import Store
    from latentpref.tasks.models import clap as clap_lib
    from latentpref.tasks.models.registry import load_base_model
    store = Store(job.store_root)
    base_dir = store.local_copy(job.base_model_path)
    base, tokenizer = load_base_model(base_dir, seed=job.seed)
    cfg = clap_lib.CLaPConfig(latent_dim=job.latent_dim, n_query=job.n_query, n_prefix=job.n_prefix,
                              encoder_layers=job.encoder_layers)
    model = clap_lib.CLaP(base, cfg)
    return model, tokenizer


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from latentpref.tasks.models.clap import load_clap, save_clap
    from latentpref.tasks.train.loop import ClapObjective, sample_clap_batches, set_stage

    job = PretrainJob.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)
    model, tokenizer = _build_clap(job)

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    opt_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_clap(os.path.join(d, "clap")).state_dict())
            state = torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False)
            start_step, history, opt_state = state["step"], state["history"], state["optimizer"]
        log.info("rank %d resumed from step %d", rank, start_step)

    prompts, candidates = _load_training_data(job)
    # shard prompts across workers (each rank sees a disjoint subset)
    prompts, candidates = prompts[rank::world], candidates[rank::world]
    batches = sample_clap_batches(tokenizer, prompts, candidates, prompts_per_batch=job.prompts_per_batch,
                                  responses_per_prompt=job.responses_per_prompt,
                                  max_prompt_tokens=job.prompt_tokens, max_response_tokens=job.response_tokens,
                                  seed=job.seed * 1000 + rank + 7919 * start_step)
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank + start_step)
    total = job.stage1_steps + job.stage2_steps
    device = ray.train.torch.get_device()

    stage, wrapped, opt = None, None, None
    tokens, t0 = 0.0, time.perf_counter()
    for step in range(start_step, total):
        want = 1 if step < job.stage1_steps else 2
        if want != stage:
            stage = want
            set_stage(model, stage)
            objective = ClapObjective(model, kl_samples=job.kl_samples, kl_weight=job.kl_weight,
                                      contrastive_weight=job.contrastive_weight)
            # re-wrap on a stage switch: DDP registers hooks only for parameters trainable at wrap time
            wrapped = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": False})
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
            if opt_state is not None and opt_state.get("stage") == stage:
                opt.load_state_dict(opt_state["state"])
            opt_state = None
        batch = next(batches).to(device)
        loss, metrics = wrapped(batch, stage, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        tokens += float(metrics["tokens"])
        row = {k: float(v) for k, v in metrics.items()}
        # tokens/s of all workers (each rank trains an equal share); resumed_from_step = the checkpoint step this
        # worker group started from (0 = fresh), so a history shows where a restart picked up
        row.update(step=step + 1, stage=stage, tokens_per_s=tokens * world / max(time.perf_counter() - t0, 1e-9),
                   resumed_from_step=start_step)
        history.append(row)

        if job.fail_at_step is not None and step + 1 == job.fail_at_step and rank == world - 1 \
                and job.fail_marker and not os.path.exists(job.fail_marker):
            open(job.fail_marker, "w").close()
            log.warning("fault injection: worker rank %d exits at step %d", rank, step + 1)
            os._exit(1)

        last = step + 1 == total
        if (step + 1) % job.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    save_clap(model, os.path.join(d, "clap"), tokenizer=tokenizer)
                    torch.save({"step": step + 1, "history": history,
                                "optimizer": {"stage": stage, "state": opt.state_dict()}},
                               os.path.join(d, "trainer_state.pt"))
                    with open(os.path.join(d, "history.json"), "w") as fh:
                        json.dump(history, fh)
                    ckpt = Checkpoint.from_directory(d)
                # every rank reports equally often: report is a barrier (STYLE.md §4)
                ray.train.report(row, checkpoint=ckpt)
            if not last:
                # Commit the checkpoint before training on. Ray Train V2 registers a checkpoint only when its
                # controller has polled that report from EVERY worker (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
                # 2 s); a worker that dies before that poll takes the report with it, and the restarted group
                # gets the previous checkpoint (seen in tests/integration/test_pretrain_ray.py). Each worker's
                # result queue holds one report, so this second report returns only once the first was
                # collected: at most one poll interval per checkpoint.
                ray.train.report(row)


def run_pretrain(job: PretrainJob, *, storage_path: str, name: str, num_workers: int, use_gpu: bool,
                 max_failures: int):
    """Run the TorchTrainer; returns the Ray Train `Result` (checkpoint = last reported)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()
