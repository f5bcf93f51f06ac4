"""CLaP pretraining at the spec's sizes, in one process: the GPU run of issue #14, and its diagnosis.

    python benchmarks/clap_spec.py --out clap_spec.json [--base smollm2-135m] [--device auto]
        [--stage1-seconds 180] [--stage2-seconds 60]

What a night's prepare and pretrain stages do, at spec latent-dpo.md §4.1 sizes (64-token prompts, K = 32
candidates of 48 tokens, top_k 50; CLaP batches of 8 prompts x 32 responses, spec §4.1 items 6-7), with the
product's own code (corpus.make_prompts, candidates.generate_candidates with the cached sampler, CLaP,
ClapObjective, set_stage) and the product's CLaP settings for a pretrained base (anchored prefix, standardised
encoder features, lr 1e-3 / adapter 1e-4), but without Ray, Prefect or MLflow: a GPU machine lent here has
none of them, and what is timed is the model work. Each stage runs to its step count or its time box,
whichever comes first; the JSON projects the spec's 3,125 steps per stage from the median step time.

The diagnosis (issue #14 item 5): does the posterior carry what users prefer? Every `--probe-every` steps a
ridge probe (tasks/evaluate/metrics.ridge_probe_correlation) predicts each held-out candidate's VADER sentiment,
within its prompt, from the posterior mean; the reference is the same probe on the frozen LM's mean-pooled
hidden states (what the LM itself knows). On the CPU-sized small night (300 steps of 4 x 4 sequences of 64
tokens) the posterior reached 0.17 against the LM's 0.38-0.48.

Variants for the diagnosis: `--kl-weight`, `--encoder-layers`, `--pool-tokens`, `--bow-weight`; `--candidates-cache`
runs them on the same candidates.

Stage micro-batches: a step's loss is accumulated over micro-batches of whole prompts (DG-KLD and the
contrastive term group rows by prompt, so this is the same loss); on an out-of-memory error the micro-batch
halves and the step is redone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from latentpref.tasks.data import candidates as candidates_lib
from latentpref.tasks.data import corpus
from latentpref.tasks.data.scorers import score_texts
from latentpref.tasks.evaluate.metrics import linear_pair_accuracy, ridge_probe_correlation
from latentpref.tasks.models import precision
from latentpref.tasks.models.clap import CLaP, CLaPConfig
from latentpref.tasks.models.registry import TINY_SPECS, describe_model, load_base_model, load_tokenizer
from latentpref.tasks.train.loop import (ClapBatch, ClapObjective, PairBatch, PreferencePair, UserDirections,
                                         clap_param_groups, make_clap_batch, make_pair_batch, population_pairs,
                                         sample_clap_batches, sample_pair_batches, set_stage)

log = logging.getLogger("clap_spec")
SPEC_STEPS_PER_STAGE = 3125    # spec §4.1 item 6: 25,000 train prompts / 8 prompts per step, 1 epoch
SPEC_TRAIN_PROMPTS = 25_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _micro_batches(batch: ClapBatch, prompts_per_micro: int):
    B = batch.n_responses
    for start in range(0, batch.n_prompts, prompts_per_micro):
        p = min(prompts_per_micro, batch.n_prompts - start)
        rows = slice(start * B, (start + p) * B)
        yield ClapBatch(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.response_ids[rows],
                        batch.response_mask[rows], p, B), p


def train_step(objective: ClapObjective, opt, batch: ClapBatch, stage: int, generator, micro: int,
               max_grad_norm: float, pairs=None) -> tuple[dict[str, float], int]:
    """One optimiser step over `batch`, accumulated over micro-batches of `micro` prompts; halves `micro` and
    redoes the step on CUDA out-of-memory. Returns prompt-weighted mean metrics and the micro size used."""
    while True:
        try:
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for part, p in _micro_batches(batch, micro):
                # the pair term rides along in every micro-batch at the micro-batch's share: summed once per step
                loss, metrics = objective(part, stage, generator, pairs=pairs)
                (loss * (p / batch.n_prompts)).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k == "tokens" else p / batch.n_prompts)
            torch.nn.utils.clip_grad_norm_([q for q in objective.parameters() if q.requires_grad], max_grad_norm)
            opt.step()
            return sums, micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            micro = max(1, micro // 2)
            log.warning("out of memory: stage %d micro-batch now %d prompts", stage, micro)


def probe_batches(tokenizer, prompts: list[str], cands: list[list[str]], *, prompt_tokens: int,
                  response_tokens: int, device, rows_per_call: int) -> list[ClapBatch]:
    """The probe set as ClapBatches on `device`, prompt-major, tokenized once for every probe of the run."""
    per_call = max(1, rows_per_call // len(cands[0]))
    return [make_clap_batch(tokenizer, prompts[i:i + per_call], cands[i:i + per_call], max_prompt_tokens=prompt_tokens,
                            max_response_tokens=response_tokens).to(device)
            for i in range(0, len(prompts), per_call)]


@torch.no_grad()
def _mean(clap: CLaP, device, prompt_ids, prompt_mask, response_ids, response_mask) -> np.ndarray:
    with precision.lm_autocast(device):
        mu, _ = clap.encode(prompt_ids, prompt_mask, response_ids, response_mask)
    return mu.float().cpu().numpy()


def posterior_means(clap: CLaP, batches: list[ClapBatch], device) -> np.ndarray:
    """Posterior means (N, D) of every (prompt, candidate) row of `batches`."""
    return np.concatenate([_mean(clap, device, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
                           for b in batches])


def pair_mean_differences(clap: CLaP, batches: list[PairBatch], device) -> np.ndarray:
    """Posterior mean of each pair's chosen response minus its rejected one's (N, D)."""
    return np.concatenate([_mean(clap, device, b.prompt_ids, b.prompt_mask, b.chosen_ids, b.chosen_mask)
                           - _mean(clap, device, b.prompt_ids, b.prompt_mask, b.rejected_ids, b.rejected_mask)
                           for b in batches])


@torch.no_grad()
def lm_pooled_states(base, batches: list[ClapBatch], *, layer: int, device) -> np.ndarray:
    """The frozen LM's hidden state after `layer` blocks, mean-pooled over each response's real tokens, reading
    [prompt; response] (N, d): what the LM itself knows about a candidate."""
    out = []
    for b in batches:
        ids = torch.cat([b.prompt_ids, b.response_ids], 1)
        mask = torch.cat([b.prompt_mask, b.response_mask], 1)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with precision.lm_autocast(device):
            hidden = base.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                     output_hidden_states=True).hidden_states
        hidden = hidden[min(layer, len(hidden) - 1)]
        resp = torch.zeros_like(mask)
        resp[:, b.prompt_ids.shape[1]:] = b.response_mask
        w = resp.unsqueeze(-1).float()
        out.append(((hidden.float() * w).sum(1) / w.sum(1).clamp(min=1)).cpu().numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--device", default="auto", help="auto = cuda when present, else cpu")
    ap.add_argument("--prompts", type=int, default=0, help="0 = every long-enough review of the corpus")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--response-tokens", type=int, default=48)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--generation-rows", type=int, default=2048, help="rows per sampling call")
    ap.add_argument("--prompts-per-batch", type=int, default=8)
    ap.add_argument("--responses-per-prompt", type=int, default=32)
    ap.add_argument("--micro-prompts", type=int, default=8, help="stage-1 prompts per micro-batch (halves on OOM)")
    ap.add_argument("--stage2-micro-prompts", type=int, default=1,
                    help="stage 2 scores every response under all B latents: spec §4.1 runs 1 prompt per micro-batch")
    ap.add_argument("--stage1-steps", type=int, default=SPEC_STEPS_PER_STAGE)
    ap.add_argument("--stage2-steps", type=int, default=SPEC_STEPS_PER_STAGE)
    ap.add_argument("--stage1-seconds", type=float, default=180.0)
    ap.add_argument("--stage2-seconds", type=float, default=60.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--adapter-lr", type=float, default=1e-4)
    ap.add_argument("--stage2-lr", type=float, default=1e-4, help="spec §4.1 item 7: 1e-4 on the whole model")
    ap.add_argument("--kl-weight", type=float, default=1.0, help="DG-KLD weight (pretrain.kl_weight)")
    ap.add_argument("--encoder-layers", type=int, default=2, help="base blocks copied into the encoder (spec: 2)")
    ap.add_argument("--candidates-cache", default=None,
                    help="Parquet file: candidates are read from it when it exists, else sampled and written there "
                         "(runs that compare CLaP settings on the same candidates)")
    ap.add_argument("--pool-tokens", action="store_true", help="CLaPConfig.pool_tokens (opt-in encoder view)")
    ap.add_argument("--bow-weight", type=float, default=0.0, help="> 0: bag-of-words CLaP term (opt-in)")
    ap.add_argument("--bow-lr", type=float, default=1e-2)
    ap.add_argument("--probe-prompts", type=int, default=200, help="held-out (val + test) prompts probed")
    ap.add_argument("--probe-every", type=int, default=0, help="0 = at steps 0, 50, 150, 300, 600, 1200, ...")
    ap.add_argument("--probe-layer", type=int, default=8)
    ap.add_argument("--population", default=None,
                    help="folder with a night's prompts.parquet, candidates.parquet and pairs.parquet (from its store): "
                         "train on those prompts and candidates instead of sampling, and probe the users' pairs")
    ap.add_argument("--preference-weight", type=float, default=0.0,
                    help="> 0: the population preference term (pretrain.preference_weight; needs --population)")
    ap.add_argument("--preference-lr", type=float, default=1e-2)
    ap.add_argument("--preference-pairs", type=int, default=16, help="pairs per step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    population = Path(args.population) if args.population else None
    if args.preference_weight > 0 and population is None:
        raise ValueError("--preference-weight needs --population (the users' pairs it ranks)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    result: dict = {"benchmark": "clap_spec", "device": str(device),
                    "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "lm_dtype": str(precision.lm_dtype(device.type)),
                    "settings": {k: Path(v).name if k in ("candidates_cache", "population") and v else v   # no local paths
                                 for k, v in vars(args).items() if k != "out"}, "timings_s": {},
                    "load_average_1m_start_end": [os.getloadavg()[0]]}
    out_path = Path(args.out)

    def write() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))

    # ---- data: prompts (GPT-2 token counts, as prepare), K candidates sampled by the base
    t0 = time.perf_counter()
    base, tokenizer = load_base_model(args.base, seed=args.seed)
    base.to(device).eval()
    result["model"] = describe_model(base)
    result["timings_s"]["load_model"] = time.perf_counter() - t0
    pairs_table = None
    t0 = time.perf_counter()
    if population is not None:
        import pyarrow.parquet as pq
        prompts = pq.read_table(population / "prompts.parquet")
        cands = pq.read_table(population / "candidates.parquet")
        pairs_table = pq.read_table(population / "pairs.parquet")
        result["sampling_read_from"] = population.name
    else:
        docs = corpus.load_documents(None)
        prompts = corpus.make_prompts(docs, load_tokenizer(), n_prompts=args.prompts or None,
                                      prompt_tokens=args.prompt_tokens, reference_tokens=args.response_tokens,
                                      seed=args.seed)
        t0 = time.perf_counter()
        cache = Path(args.candidates_cache) if args.candidates_cache else None
        if cache is not None and cache.is_file():
            import pyarrow.parquet as pq
            cands = pq.read_table(cache)
            if set(cands["prompt_id"].to_pylist()) != set(prompts["prompt_id"].to_pylist()):
                raise ValueError(f"--candidates-cache {str(cache)!r} holds other prompts than --prompts "
                                 f"{args.prompts} with seed {args.seed}; delete it or pass another path")
            result["sampling_read_from"] = cache.name
        else:
            sampler = candidates_lib.lm_sampling_fn(base, top_k=50)
            with precision.lm_autocast(device):
                cands = candidates_lib.generate_candidates(sampler, tokenizer, prompts, k=args.candidates,
                                                           max_new_tokens=args.response_tokens,
                                                           batch_size=args.generation_rows, seed=args.seed,
                                                           device=device, pack_prompts=True)
            if cache is not None:
                import pyarrow.parquet as pq
                cache.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(cands, cache)
    _sync(device)
    sample_s = time.perf_counter() - t0
    n_new = cands.num_rows * args.response_tokens
    result["timings_s"]["sample_candidates"] = sample_s
    sampled = "sampling_read_from" not in result
    result["sampling"] = {"prompts": prompts.num_rows, "candidates": cands.num_rows, "new_tokens": n_new,
                          "new_tokens_per_s": n_new / sample_s if sampled else None,
                          "projected_spec_s": SPEC_TRAIN_PROMPTS * args.candidates * args.response_tokens
                          * sample_s / n_new if sampled else None}
    log.info("%s %d candidates in %.1f s", "sampled" if sampled else "read", cands.num_rows, sample_s)

    by_prompt: dict[str, list[str]] = {}
    for pid, text in zip(cands["prompt_id"].to_pylist(), cands["text"].to_pylist()):
        by_prompt.setdefault(pid, []).append(text)
    text_of = dict(zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()))
    split_of = dict(zip(prompts["prompt_id"].to_pylist(), prompts["split"].to_pylist()))
    train_ids = [p for p in by_prompt if split_of[p] == "train"]
    probe_ids = [p for p in by_prompt if split_of[p] != "train"][:args.probe_prompts]
    probe_prompts, probe_cands = [text_of[p] for p in probe_ids], [by_prompt[p] for p in probe_ids]
    t0 = time.perf_counter()
    probe_target = score_texts([c for cs in probe_cands for c in cs])["sentiment"]
    sizes = [len(c) for c in probe_cands]
    probe_groups = np.repeat(np.arange(len(probe_ids)), sizes)
    bounds = np.cumsum([0, *sizes])
    spread = [float(np.ptp(probe_target[bounds[i]:bounds[i + 1]])) for i in range(len(probe_ids))]
    result["timings_s"]["score_probe_set"] = time.perf_counter() - t0
    probe_set = probe_batches(tokenizer, probe_prompts, probe_cands, prompt_tokens=args.prompt_tokens,
                              response_tokens=args.response_tokens, device=device,
                              rows_per_call=1024 if device.type == "cuda" else 64)
    lm_features = lm_pooled_states(base, probe_set, layer=args.probe_layer, device=device)
    result["probe"] = {"target": "VADER compound of the candidate, centred within its prompt",
                       "prompts": len(probe_ids), "rows": int(probe_target.size),
                       "mean_within_prompt_range": float(np.mean(spread)),
                       f"lm_layer{args.probe_layer}_mean_pooled": ridge_probe_correlation(
                           lm_features, probe_target, probe_groups),
                       "posterior_mean": []}
    write()

    # ---- the users' pairs (--population): train split for the preference term, held-out split for the pair probe
    train_pairs: list[PreferencePair] = []
    heldout_pairs: list[PreferencePair] = []
    n_users = 0
    if pairs_table is not None:
        train_pairs, heldout_pairs, n_users = population_pairs(pairs_table)
        result["probe"]["pairs"] = {"users": n_users, "train": len(train_pairs), "heldout": len(heldout_pairs),
                                    "definition": "linear_pair_accuracy: per user, logistic fit on posterior-mean "
                                                  "differences of its train pairs, accuracy on its held-out pairs"}
    pair_sets = {name: [b.to(device) for b in (make_pair_batch(tokenizer, ps[i:i + 256], max_prompt_tokens=args.prompt_tokens,
                                                               max_response_tokens=args.response_tokens)
                                               for i in range(0, len(ps), 256))]
                 for name, ps in (("train", train_pairs), ("heldout", heldout_pairs)) if ps}

    # ---- CLaP, the product's settings for a pretrained base
    anchored = args.base not in TINY_SPECS
    clap = CLaP(base, CLaPConfig(prefix_init="anchor" if anchored else "random", feature_norm=anchored,
                                 encoder_layers=args.encoder_layers,
                                 pool_tokens=args.pool_tokens, bow_head=args.bow_weight > 0),
                base_spec=args.base).to(device)
    train_prompts, train_cands = [text_of[p] for p in train_ids], [by_prompt[p] for p in train_ids]
    stream = (b.to(device) for b in sample_clap_batches(
        tokenizer, train_prompts, train_cands, prompts_per_batch=args.prompts_per_batch,
        responses_per_prompt=args.responses_per_prompt, max_prompt_tokens=args.prompt_tokens,
        max_response_tokens=args.response_tokens, seed=args.seed))
    if anchored or args.bow_weight > 0:
        calib = next(stream)
        clap.calibrate_posterior(calib.prompt_ids, calib.prompt_mask, calib.response_ids, calib.response_mask)

    def probe(stage: int, step: int) -> None:
        mu = posterior_means(clap, probe_set, device)
        corr = ridge_probe_correlation(mu, probe_target, probe_groups)
        row = {"stage": stage, "step": step, "corr": corr, "active_units": int((mu.var(0) > 0.01).sum())}
        if len(pair_sets) == 2:
            diffs = {name: pair_mean_differences(clap, batches, device) for name, batches in pair_sets.items()}
            users = {name: [p.user_index for p in ps] for name, ps in (("train", train_pairs), ("heldout", heldout_pairs))}
            row["pair_heldout_accuracy"] = linear_pair_accuracy(diffs["train"], users["train"], diffs["heldout"],
                                                                users["heldout"])
            if directions is not None:   # the pretraining directions themselves, on the held-out pairs
                with torch.no_grad():
                    v = directions.weight.float().cpu().numpy()[users["heldout"]]
                margin = (v * diffs["heldout"]).sum(-1)
                row["direction_heldout_accuracy"] = float(np.mean((margin > 0) + 0.5 * (margin == 0)))
        result["probe"]["posterior_mean"].append(row)
        log.info("probe stage %d step %d: %s", stage, step, {k: round(v, 3) for k, v in row.items()})
        write()

    def due(step: int) -> bool:
        if args.probe_every:
            return step % args.probe_every == 0
        # 0, 50, 150, then 300 times a power of two (300, 600, 1200, 2400, ...)
        return step in (0, 50, 150) or (step > 0 and step % 300 == 0 and (step // 300).bit_count() == 1)

    directions = UserDirections(n_users, clap.cfg.latent_dim, seed=args.seed).to(device) \
        if args.preference_weight > 0 else None
    pair_stream = (b.to(device) for b in sample_pair_batches(
        tokenizer, train_pairs, pairs_per_batch=args.preference_pairs, max_prompt_tokens=args.prompt_tokens,
        max_response_tokens=args.response_tokens, seed=args.seed + 1)) if directions is not None else None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for stage, steps, seconds in ((1, args.stage1_steps, args.stage1_seconds),
                                  (2, args.stage2_steps, args.stage2_seconds)):
        if steps <= 0 or seconds <= 0:
            continue
        set_stage(clap, stage)
        clap.train()
        objective = ClapObjective(clap, kl_samples=16, kl_weight=args.kl_weight, contrastive_weight=1.0,
                                  bow_weight=args.bow_weight, user_directions=directions,
                                  preference_weight=args.preference_weight)
        if stage == 1:
            groups = clap_param_groups(clap, lr=args.lr, adapter_lr=args.adapter_lr, bow_lr=args.bow_lr)
        else:
            groups = [{"params": [p for p in clap.parameters() if p.requires_grad], "lr": args.stage2_lr}]
        if directions is not None:
            groups.append({"params": list(directions.parameters()), "lr": args.preference_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        history, times = [], []
        micro = args.micro_prompts if stage == 1 else args.stage2_micro_prompts
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step = 0
        while step < steps and time.perf_counter() - start < seconds:
            if stage == 1 and due(step):
                clap.eval()
                probe(stage, step)
                clap.train()
            batch = next(stream)
            _sync(device)
            t0 = time.perf_counter()
            metrics, micro = train_step(objective, opt, batch, stage, generator, micro, max_grad_norm=1.0,
                                        pairs=next(pair_stream) if pair_stream is not None else None)
            _sync(device)
            times.append(time.perf_counter() - t0)
            step += 1
            history.append({"step": step, **{k: round(v, 4) for k, v in metrics.items()}})
            if step % 25 == 0 or step == 1:
                log.info("stage %d step %d: nll/token %.3f kl %.2f active %d contrastive %.3f (%.3f s/step)",
                         stage, step, metrics["nll_per_token"], metrics["kl"], metrics["active_units"],
                         metrics["contrastive"], times[-1])
        clap.eval()
        probe(stage, step)
        median = statistics.median(times[1:] or times)
        tokens = statistics.median(h["tokens"] for h in history) + args.prompt_tokens * args.prompts_per_batch \
            * args.responses_per_prompt
        result[f"stage{stage}"] = {
            "steps": step, "wall_s": time.perf_counter() - start, "median_step_s": median,
            "tokens_per_step_approx": tokens, "tokens_per_s": tokens / median, "micro_prompts": micro,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "projected_spec_stage_s": SPEC_STEPS_PER_STAGE * median,
            "final": history[-1], "history": history[::max(1, len(history) // 60)]}
        write()
    result["load_average_1m_start_end"].append(os.getloadavg()[0])
    result["projected_spec_pretrain_s"] = sum(result.get(f"stage{s}", {}).get("projected_spec_stage_s", 0.0)
                                              for s in (1, 2))
    write()
    log.info("wrote %s", out_path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
