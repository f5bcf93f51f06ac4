"""CLaP pretraining on Ray Train: `TorchTrainer` over N workers, DDP (gloo on CPU, nccl on GPU).

The only module under tasks/ that imports `ray.train` (STYLE.md §1). One `fit()` runs both stages
(spec §2.6): steps [0, stage1_steps) = stage 1 (base frozen, G-skip on), then stage 2 (everything trains,
contrastive on). The stage is derived from the step counter stored in every checkpoint, so a restarted
worker group resumes mid-stage-2 with stage-2 settings (spec §9.7: nothing is silently reset).

`latent_type="discrete"` (LPC, spec lpc.md §6.3) trains the code posterior, prior, codebook and pair posterior
with `DiscreteClapObjective` (plain torch, below): same stages, same adapter, discrete losses from
tasks/objectives.py, plus the LPC objective on the pooled train pairs of every user when `pairs_path` is given.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

# re-exported: the pair batches moved to loop.py (the Gaussian population preference term uses them too)
from latentpref.tasks.train.loop import (PairBatch, PreferencePair, make_pair_batch,  # noqa: F401
                                         population_pairs, sample_pair_batches)

log = logging.getLogger(__name__)

CODE_USAGE_FILE = "code_usage.json"   # in the final checkpoint of a discrete CLaP: argmax-code counts (K ints)


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
    prefix_init: Literal["random", "anchor"] = "random"
    anchor_scale: float = 0.005
    feature_norm: bool = False
    pool_tokens: bool = False         # CLaPConfig.pool_tokens
    bow_weight: float = 0.0           # > 0: CLaP gets a bag-of-words head, trained with this weight
    bow_lr: float = 1e-2
    adapter_lr: float | None = None   # None = lr
    feature_norm_batches: int = 4   # training batches whose (x, y) rows set the encoder's feature statistics
    threads_per_worker: int = 1
    stage1_steps: int = 40
    stage2_steps: int = 20
    prompts_per_batch: int = 4
    responses_per_prompt: int = 4
    lr: float = 1e-3
    kl_samples: int = 16
    kl_weight: float = 1.0
    contrastive_weight: float = 1.0
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 20
    seed: int = 0
    fail_at_step: int | None = None     # fault injection for tests: this worker process dies once at that step
    fail_marker: str | None = None      # a file; the failure fires only while it does not exist yet
    # discrete latent codes (PretrainConfig documents each); ignored for "gaussian"
    latent_type: Literal["gaussian", "discrete"] = "gaussian"
    n_codes: int = 32
    tau_start: float = 1.0
    tau_end: float = 0.5
    straight_through: bool = False
    lpc_kl_weight: float = 0.05
    lpc_pair_weight: float = 1.0
    lpc_loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"
    lpc_beta: float = 0.1
    lpc_gamma: float = 0.0
    pairs_path: list[str] | None = None   # path parts of the pairs table (train split used); None = no pairs read
    # path parts of the hidden users table: only users of group "population" are read (users.user_groups), so the
    # "holdout" and "out_of_cohort" users stay unseen by the CLaP; None = every user's pairs
    users_path: list[str] | None = None
    # Gaussian only: weight of the population preference term (ClapObjective; PretrainConfig documents it), the
    # user directions' learning rate, and the pairs per step
    preference_weight: float = 0.0
    preference_lr: float = 1e-2
    preference_pairs_per_batch: int = 16
    # Gaussian only: the population preference space carried by the posterior's first coordinates (CLaPConfig;
    # PretrainConfig documents it), fitted on the readable users' train pairs before the first step
    preference_dims: int = 0
    preference_layer: int = 8
    preference_only_share: float = 0.0   # rows trained from the space's coordinates alone (PretrainConfig)
    preference_l2: float = 1.0
    # Gaussian only: stage 3, "follow" (tasks/train/follow.py; PretrainConfig documents it), after stages 1-2
    follow_steps: int = 0
    follow_rank: int = 64
    follow_pairs_per_batch: int = 8
    follow_lr: float = 1e-4
    follow_beta: float = 0.1
    follow_nll_weight: float = 1.0
    follow_fit: dict[str, Any] | None = None   # FitConfig kwargs of the population users' head fits


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


def _load_pairs(job: PretrainJob) -> tuple[list[PreferencePair], int]:
    """Every user's train-split pairs, pooled, and the number of users they come from. LPC learns population-level
    codes from them without user ids (lpc.md §6.2); the Gaussian population preference term also reads each pair's
    user (`user_index`: the user's row among the sorted user ids) and weight."""
    if job.pairs_path is None:
        return [], 0
    import pyarrow as pa
    import pyarrow.compute as pc

    from latentpref.tasks.data.store import Store
    from latentpref.tasks.data.users import user_groups
    store = Store(job.store_root)
    pairs = store.read_table(*job.pairs_path)
    if job.users_path is not None:
        users = store.read_table(*job.users_path)
        readable = [u for u, g in zip(users["user_id"].to_pylist(), user_groups(users)) if g == "population"]
        pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(readable, pa.string())))
    train, _, n_users = population_pairs(pairs)
    return train, n_users


def fit_population_space(model, tokenizer, pairs: list[PreferencePair], n_users: int, job: PretrainJob,
                         batch_size: int = 32):
    """The population preference space (tasks/models/preference_space.py) of these users' train pairs, read from the
    CLaP's (frozen) base LM: each distinct (prompt, response) text is run once."""
    from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
    from latentpref.tasks.models.preference_space import fit_preference_space, pooled_states

    if not pairs:
        raise ValueError("preference_dims > 0 needs population users' train pairs; the pairs table holds none "
                         "readable by the CLaP (every user is held out or out of cohort?)")
    keys = list(dict.fromkeys((p.prompt, y) for p in pairs for y in (p.chosen, p.rejected)))
    states = []
    model.eval()
    for i in range(0, len(keys), batch_size):
        chunk = keys[i:i + batch_size]
        p_ids, p_mask = tokenize_prompts(tokenizer, [k[0] for k in chunk], job.prompt_tokens)
        r_ids, r_mask = tokenize_responses(tokenizer, [k[1] for k in chunk], job.response_tokens)
        states.append(pooled_states(model.base_lm, p_ids, p_mask, r_ids, r_mask, job.preference_layer))
    row = {k: i for i, k in enumerate(keys)}
    states_t = torch.cat(states)
    chosen = states_t[[row[(p.prompt, p.chosen)] for p in pairs]]
    rejected = states_t[[row[(p.prompt, p.rejected)] for p in pairs]]
    t0 = time.perf_counter()
    space = fit_preference_space(chosen, rejected, torch.tensor([p.user_index for p in pairs]), n_users,
                                 dims=job.preference_dims, layer=job.preference_layer,
                                 weights=torch.tensor([p.weight for p in pairs]), l2=job.preference_l2)
    log.info("population preference space: %d dims from %d pairs of %d users (%d texts), fit %.1f s",
             job.preference_dims, len(pairs), n_users, len(keys), time.perf_counter() - t0)
    return space


def _build_clap(job: PretrainJob):
    from latentpref.tasks.data.store import Store
    from latentpref.tasks.models import clap as clap_lib
    from latentpref.tasks.models.registry import load_base_model
    store = Store(job.store_root)
    base_dir = store.local_copy(job.base_model_path)
    base, tokenizer = load_base_model(base_dir, seed=job.seed)
    cfg = clap_lib.CLaPConfig(latent_dim=job.latent_dim, n_query=job.n_query, n_prefix=job.n_prefix,
                              encoder_layers=job.encoder_layers, latent_type=job.latent_type, n_codes=job.n_codes,
                              prefix_init=job.prefix_init, anchor_scale=job.anchor_scale,
                              feature_norm=job.feature_norm, pool_tokens=job.pool_tokens,
                              bow_head=job.bow_weight > 0, preference_dims=job.preference_dims,
                              preference_layer=job.preference_layer,
                              follow_rank=job.follow_rank if _follows(job) else 0)
    model = clap_lib.CLaP(base, cfg)
    return model, tokenizer


def _follows(job: PretrainJob) -> bool:
    return job.latent_type == "gaussian" and job.follow_steps > 0


def _start_follow(model, tokenizer, job: PretrainJob, rank: int, world: int, start_step: int):
    """Stage 3's objective and pair batches: every population user's head fitted on the (now frozen) encoder, the
    same on every rank (deterministic), pairs sharded by rank. A run resumed inside stage 3 refits the same heads:
    stage 3 changes only the follow adapter, never the encoder the heads read."""
    from latentpref.tasks.train.fit_user import FitConfig
    from latentpref.tasks.train.follow import FollowObjective, FollowSettings, fit_population_heads

    pairs, n_users = _load_pairs(job)
    if len(pairs) < world:
        raise ValueError(f"the follow stage needs population users' train pairs on every worker; {len(pairs)} pairs "
                         f"for {world} workers")
    heads = fit_population_heads(model, tokenizer, pairs, n_users, FitConfig(**(job.follow_fit or {})),
                                 prompt_tokens=job.prompt_tokens, response_tokens=job.response_tokens)
    settings = FollowSettings(steps=job.follow_steps, pairs_per_batch=job.follow_pairs_per_batch, lr=job.follow_lr,
                              beta=job.follow_beta, nll_weight=job.follow_nll_weight)
    batches = sample_pair_batches(tokenizer, pairs[rank::world], pairs_per_batch=job.follow_pairs_per_batch,
                                  max_prompt_tokens=job.prompt_tokens, max_response_tokens=job.response_tokens,
                                  seed=job.seed * 1000 + rank + 7919 * start_step + 2)
    return FollowObjective(model, heads, settings), batches


# ------------------------------------------------------------------------------------------------ discrete (LPC)
class DiscreteClapObjective(nn.Module):
    """CLaP loss for discrete latent codes (spec lpc.md §6.3), the counterpart of `loop.ClapObjective`.

    L = L_lm + w_kl * KL(mean q || U_K) + lambda * KL(q(k|x,y) || p(k|x)) (+ w_con * contrastive in stage 2)
        (+ w_pair * LPC objective on preference pairs, lpc.md §3.2-3.4).
    The LM latent is z = g * (w_prior @ E) + (1 - g) * (w_post @ E) with Gumbel-softmax weights w at the
    annealed temperature tau(step) and g rising 0 -> 1 (lpc.md §3.3). Stages as in the Gaussian path (spec
    latent-dpo.md §2.6): stage 1 has the G-skip (fresh posterior code samples per response position), stage 2
    the contrastive loss. The contrastive loss uses posterior latents only: as g -> 1 the mixed z is almost the
    prompt's prior and could no longer tell the responses of one prompt apart.
    """

    def __init__(self, clap: nn.Module, *, total_steps: int, kl_weight: float = 1.0,
                 contrastive_weight: float = 1.0, tau_start: float = 1.0, tau_end: float = 0.5,
                 straight_through: bool = False, lpc_kl_weight: float = 0.05, lpc_pair_weight: float = 1.0,
                 lpc_loss_type: str = "dpo", lpc_beta: float = 0.1, lpc_gamma: float = 0.0):
        super().__init__()
        if not clap.discrete:
            raise ValueError("DiscreteClapObjective needs a CLaP with latent_type='discrete'")
        self.clap = clap
        self.total_steps = total_steps
        self.kl_weight, self.contrastive_weight = kl_weight, contrastive_weight
        self.tau_start, self.tau_end, self.straight_through = tau_start, tau_end, straight_through
        self.lpc_kl_weight, self.lpc_pair_weight = lpc_kl_weight, lpc_pair_weight
        self.lpc_loss_type, self.lpc_beta, self.lpc_gamma = lpc_loss_type, lpc_beta, lpc_gamma

    def _sample(self, logits: torch.Tensor, tau: float, generator) -> torch.Tensor:
        from latentpref.tasks.models.lpc import gumbel_softmax
        return self.clap.encoder.code_latent(gumbel_softmax(logits, tau, hard=self.straight_through,
                                                            generator=generator))

    def forward(self, batch, stage: int, generator: torch.Generator | None = None, *, step: int,
                pairs: PairBatch | None = None):
        """One step's loss (scalar, with grad) and detached metrics; `batch` is a loop.ClapBatch (P x B rows).

        `generator` draws, in this order, the posterior and prior Gumbel noise, the G-skip noise (stage 1) and
        the pair noise. `pairs` = None (or lpc_pair_weight = 0) skips the LPC pair term.
        """
        from latentpref.tasks import objectives
        from latentpref.tasks.models.lpc import code_usage_perplexity, mixing_weight, temperature
        from latentpref.tasks.train.loop import check_step

        P, B = batch.n_prompts, batch.n_responses
        check_step(batch, stage)
        clap = self.clap
        tau = temperature(step, self.total_steps, self.tau_start, self.tau_end)
        g = mixing_weight(step, self.total_steps)
        post = clap.encode_logits(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        # rows are prompt-major, so every B-th row is one prompt: the prior runs once per prompt
        prior = clap.prior_logits(batch.prompt_ids[::B], batch.prompt_mask[::B]).repeat_interleave(B, 0)  # (PB, K)
        z_post = self._sample(post, tau, generator)                                    # (P*B, D)
        z = g * self._sample(prior, tau, generator) + (1.0 - g) * z_post               # lpc.md §3.3
        skip_z = None
        if stage == 1 and clap.skip is not None:
            T = batch.response_ids.shape[1]
            skip_z = self._sample(post[:, None].expand(-1, T, -1), tau, generator)    # (P*B, T, D), spec §2.4
        logps = clap.response_logps(z, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                    batch.response_mask, skip_z=skip_z)               # (P*B,)
        n_tokens = batch.response_mask.sum()
        nll = -logps.mean()
        usage_kl = objectives.code_collapse_kl(post)
        kl_qp = objectives.lpc_kl(post, prior)
        loss = nll + self.kl_weight * usage_kl + self.lpc_kl_weight * kl_qp
        zero = torch.zeros((), device=nll.device)
        contrastive, contrastive_acc = zero, zero
        if stage == 2 and B > 1 and self.contrastive_weight > 0:
            own = logps if g == 0.0 else clap.response_logps(z_post, batch.prompt_ids, batch.prompt_mask,
                                                                batch.response_ids, batch.response_mask)
            rows = [-own.view(P, B)]
            zg = z_post.view(P, B, -1)
            for k in range(1, B):
                z_k = torch.roll(zg, shifts=k, dims=1).reshape(P * B, -1)
                rows.append(-clap.response_logps(z_k, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                                 batch.response_mask).view(P, B))
            nll_matrix = torch.stack(rows, dim=1)                                      # (P, B_shift, B)
            contrastive = objectives.contrastive_loss(nll_matrix)
            contrastive_acc = (nll_matrix.argmin(dim=1) == 0).float().mean()
            loss = loss + self.contrastive_weight * contrastive
        pair_loss, pair_acc, pair_kl = zero, zero, zero
        if pairs is not None and self.lpc_pair_weight > 0:
            pair_loss, pm = self._pair_loss(pairs, tau, g, generator)
            pair_acc, pair_kl = pm["accuracy"], pm["kl"]
            loss = loss + self.lpc_pair_weight * pair_loss
        with torch.no_grad():
            probs = torch.softmax(post, dim=-1)
            metrics = {"loss": loss.detach(), "nll_per_token": (-logps.sum() / n_tokens).detach(),
                       "kl": usage_kl.detach(), "lpc_kl": kl_qp.detach(), "contrastive": contrastive.detach(),
                       "contrastive_acc": contrastive_acc,
                       # collapse detector: effective number of codes the batch's posteriors use (K = all)
                       "code_usage_perplexity": code_usage_perplexity(probs),
                       "prior_code_perplexity": code_usage_perplexity(torch.softmax(prior, dim=-1)),
                       "lpc_pair_loss": pair_loss.detach(), "lpc_pair_accuracy": pair_acc, "lpc_pair_kl": pair_kl,
                       "tau": torch.tensor(tau), "mixing_g": torch.tensor(g), "tokens": n_tokens.detach().float()}
        return loss, metrics

    def _pair_loss(self, pairs: PairBatch, tau: float, g: float, generator):
        """LPC objective (lpc.md §3.5 steps 2-6): z from the pair posterior mixed with the prior by g; the
        reference is the same LM without a prefix, so the margin measures what the code adds (lpc.md §2.6: the
        reference is not z-conditioned). In stage 2 the base trains, so this reference moves with it."""
        from latentpref.tasks import objectives

        clap = self.clap
        pair_logits = clap.pair_logits(pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids, pairs.chosen_mask,
                                       pairs.rejected_ids, pairs.rejected_mask)       # (N, K)
        prior = clap.prior_logits(pairs.prompt_ids, pairs.prompt_mask)
        z = g * self._sample(prior, tau, generator) + (1.0 - g) * self._sample(pair_logits, tau, generator)
        pol_c = clap.response_logps(z, pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids, pairs.chosen_mask)
        pol_r = clap.response_logps(z, pairs.prompt_ids, pairs.prompt_mask, pairs.rejected_ids,
                                    pairs.rejected_mask)
        ref_c = ref_r = None
        if self.lpc_loss_type != "simpo":   # SimPO is reference-free
            with torch.no_grad():
                ref_c = clap.response_logps(None, pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids,
                                            pairs.chosen_mask)
                ref_r = clap.response_logps(None, pairs.prompt_ids, pairs.prompt_mask, pairs.rejected_ids,
                                            pairs.rejected_mask)
        return objectives.lpc_pair_loss(pol_c, pol_r, ref_c, ref_r, pair_logits, prior,
                                        loss_type=self.lpc_loss_type, beta=self.lpc_beta, gamma=self.lpc_gamma,
                                        kl_weight=self.lpc_kl_weight,
                                        chosen_lengths=pairs.chosen_mask.sum(-1).float(),
                                        rejected_lengths=pairs.rejected_mask.sum(-1).float())


class CodeUsage(NamedTuple):
    argmax: list[int]      # how often each code is the argmax of q(k|x,y): the manifest's `code_usage`
    expected: list[float]  # sum of q(k|x,y) over the texts: the soft usage the serving latent (expected code) sees


@torch.no_grad()
def code_usage_counts(clap, tokenizer, prompts: list[str], candidates: list[list[str]], *, max_prompt_tokens: int,
                      max_response_tokens: int, batch_size: int = 64, max_texts: int = 4096) -> CodeUsage:
    """Code usage of q(k|x,y) over the training candidates (at most `max_texts`, taken in order), for the CLaP
    manifest (`code_usage`, read by the report's code-usage section, and `code_usage_expected`).

    Both are reported because they disagree while posteriors are flat: near-uniform posteriors spread the
    expected usage over every code, yet their argmax can all land on one code (a bias-dominated tie).

    Returns:
        CodeUsage: K argmax counts summing to the number of texts encoded, and K expected counts (same sum).
    """
    from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
    was_training = clap.training
    clap.eval()
    device = next(clap.parameters()).device
    texts = [(p, c) for p, cands in zip(prompts, candidates) for c in cands][:max_texts]
    counts = torch.zeros(clap.cfg.n_codes, dtype=torch.long)
    expected = torch.zeros(clap.cfg.n_codes, dtype=torch.float64)
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        p_ids, p_mask = tokenize_prompts(tokenizer, [p for p, _ in chunk], max_prompt_tokens)
        r_ids, r_mask = tokenize_responses(tokenizer, [r for _, r in chunk], max_response_tokens)
        logits = clap.encode_logits(p_ids.to(device), p_mask.to(device), r_ids.to(device), r_mask.to(device))
        counts += torch.bincount(logits.argmax(-1).cpu(), minlength=clap.cfg.n_codes)
        expected += torch.softmax(logits, -1).sum(0).cpu().double()
    clap.train(was_training)
    return CodeUsage(counts.tolist(), expected.tolist())


def _param_groups(model: nn.Module, job: PretrainJob) -> list[dict[str, Any]]:
    """The job's optimiser groups (`clap_param_groups`): adapter at `adapter_lr` (None = lr), BoW head at `bow_lr`."""
    from latentpref.tasks.train.loop import clap_param_groups
    return clap_param_groups(model, lr=job.lr, adapter_lr=job.adapter_lr if job.adapter_lr is not None else job.lr,
                             bow_lr=job.bow_lr)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from latentpref.tasks.models.clap import load_clap, save_clap
    from latentpref.tasks.train.loop import ClapObjective, UserDirections, sample_clap_batches, set_stage

    job = PretrainJob.model_validate(config)
    torch.set_num_threads(job.threads_per_worker)   # Ray sets OMP_NUM_THREADS=1; the worker owns this many CPUs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)
    model, tokenizer = _build_clap(job)

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    opt_state, directions_state = None, None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_clap(os.path.join(d, "clap")).state_dict())
            state = torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False)
            start_step, history, opt_state = state["step"], state["history"], state["optimizer"]
            directions_state = state.get("user_directions")
        log.info("rank %d resumed from step %d", rank, start_step)

    all_prompts, all_candidates = _load_training_data(job)
    # shard prompts across workers (each rank sees a disjoint subset)
    prompts, candidates = all_prompts[rank::world], all_candidates[rank::world]
    discrete = job.latent_type == "discrete"
    preference = not discrete and job.preference_weight > 0
    pair_batches, user_directions = None, None
    if (discrete and job.lpc_pair_weight > 0) or preference:
        pairs, n_users = _load_pairs(job)
        # every rank must run the pair term (DDP expects the same trainable parameters to get gradients on all
        # ranks), so it is on only if each rank's shard holds a pair
        if len(pairs) >= world:
            pair_batches = sample_pair_batches(
                tokenizer, pairs[rank::world],
                pairs_per_batch=job.preference_pairs_per_batch if preference else job.prompts_per_batch,
                max_prompt_tokens=job.prompt_tokens, max_response_tokens=job.response_tokens,
                seed=job.seed * 1000 + rank + 7919 * start_step + 1)
            if preference:
                user_directions = UserDirections(n_users, job.latent_dim, seed=job.seed)
                if directions_state is not None:
                    user_directions.load_state_dict(directions_state)
        else:
            log.warning("%s term off: %d train pairs for %d workers", "LPC pair" if discrete else
                        "population preference", len(pairs), world)
    batches = sample_clap_batches(tokenizer, prompts, candidates, prompts_per_batch=job.prompts_per_batch,
                                  responses_per_prompt=job.responses_per_prompt,
                                  max_prompt_tokens=job.prompt_tokens, max_response_tokens=job.response_tokens,
                                  seed=job.seed * 1000 + rank + 7919 * start_step)
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank + start_step)
    if (job.feature_norm or job.bow_weight > 0) and start_step == 0:
        # own sampler: the training batches (and so runs without feature_norm) keep their order; a resumed run has
        # the statistics in its checkpoint. DDP broadcasts rank 0's buffers, so every rank uses the same ones
        n_prompts = min(len(prompts), job.prompts_per_batch * max(1, job.feature_norm_batches))
        calib = next(sample_clap_batches(tokenizer, prompts, candidates, prompts_per_batch=n_prompts,
                                         responses_per_prompt=job.responses_per_prompt,
                                         max_prompt_tokens=job.prompt_tokens, max_response_tokens=job.response_tokens,
                                         seed=job.seed * 1000 + rank + 104729))
        model.calibrate_posterior(calib.prompt_ids, calib.prompt_mask, calib.response_ids, calib.response_mask)
    if job.preference_dims and start_step == 0:
        # every rank fits the same space from the same pairs (deterministic); DDP broadcasts rank 0's buffers anyway
        space_pairs, n_space_users = _load_pairs(job)
        model.set_preference_space(fit_population_space(model, tokenizer, space_pairs, n_space_users, job))
    total = job.stage1_steps + job.stage2_steps + (job.follow_steps if _follows(job) else 0)
    device = ray.train.torch.get_device()
    follow_batches = None

    stage, wrapped, opt = None, None, None
    tokens, t0 = 0.0, time.perf_counter()
    for step in range(start_step, total):
        want = 1 if step < job.stage1_steps else 2 if step < job.stage1_steps + job.stage2_steps else 3
        if want != stage:
            stage = want
            set_stage(model, stage)
            if stage == 3:
                objective, follow_batches = _start_follow(model, tokenizer, job, rank, world, start_step)
            elif discrete:
                # without pair batches the pair posterior gets no gradient: freeze it, or DDP waits for one
                model.pair_posterior.requires_grad_(pair_batches is not None)
                objective = DiscreteClapObjective(
                    model, total_steps=total, kl_weight=job.kl_weight, contrastive_weight=job.contrastive_weight,
                    tau_start=job.tau_start, tau_end=job.tau_end, straight_through=job.straight_through,
                    lpc_kl_weight=job.lpc_kl_weight, lpc_pair_weight=job.lpc_pair_weight,
                    lpc_loss_type=job.lpc_loss_type, lpc_beta=job.lpc_beta, lpc_gamma=job.lpc_gamma)
            else:
                objective = ClapObjective(model, kl_samples=job.kl_samples, kl_weight=job.kl_weight,
                                          contrastive_weight=job.contrastive_weight, bow_weight=job.bow_weight,
                                          user_directions=user_directions,
                                          preference_weight=job.preference_weight if user_directions is not None
                                          else 0.0, preference_only_share=job.preference_only_share)
            # re-wrap on a stage switch: DDP registers hooks only for parameters trainable at wrap time
            wrapped = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": False})
            groups = (_param_groups(model, job) if stage < 3
                      else [{"params": list(model.adapter.follow.parameters()), "lr": job.follow_lr}])
            if user_directions is not None and stage < 3:
                groups.append({"params": list(user_directions.parameters()), "lr": job.preference_lr})
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            if opt_state is not None and opt_state.get("stage") == stage:
                opt.load_state_dict(opt_state["state"])
            opt_state = None
        if stage == 3:
            loss, metrics = wrapped(next(follow_batches).to(device))
        else:
            batch = next(batches).to(device)
            # pair batches exist exactly when the LPC pair term or the population preference term is on
            pair_batch = next(pair_batches).to(device) if pair_batches is not None else None
            if discrete:
                loss, metrics = wrapped(batch, stage, generator, step=step, pairs=pair_batch)
            else:
                loss, metrics = wrapped(batch, stage, generator, pairs=pair_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if job.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], job.max_grad_norm)
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
                                "optimizer": {"stage": stage, "state": opt.state_dict()},
                                "user_directions": None if user_directions is None
                                else user_directions.state_dict()},
                               os.path.join(d, "trainer_state.pt"))
                    with open(os.path.join(d, "history.json"), "w") as fh:
                        json.dump(history, fh)
                    if discrete and last:
                        # code usage of the final CLaP over every training candidate (all shards), for the
                        # CLaP manifest (`code_usage`, read by the report)
                        usage = code_usage_counts(model, tokenizer, all_prompts, all_candidates,
                                                  max_prompt_tokens=job.prompt_tokens,
                                                  max_response_tokens=job.response_tokens)
                        with open(os.path.join(d, CODE_USAGE_FILE), "w") as fh:
                            json.dump(usage._asdict(), fh)
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
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": job.threads_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()
