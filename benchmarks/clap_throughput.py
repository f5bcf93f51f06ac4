"""CLaP training throughput vs a plain fine-tune of the same base, same data, same process (issue #10).

    python benchmarks/clap_throughput.py --out clap_throughput.json [--base tiny-gpt2|tiny-llama|smollm2-135m]

Three training set-ups share one base model (deep copies of it), one list of batches and one process:
- `plain_finetune`: the base LM fully fine-tuned on log p(y|x) (summed response-token NLL, logits only at the
  response positions: the cheapest honest plain fine-tune, so the ratio is not flattered);
- `clap_stage1`: CLaP stage 1 (base + adapter K/V copies frozen, G-skip on, DG-KLD), `ClapObjective`;
- `clap_stage2`: CLaP stage 2 (everything trains, contrastive over the B responses of each prompt), the prompt
  encoded once per latent and only the responses re-scored under the B swapped caches (the product's path);
- `clap_stage2_full_passes`: the same loss with B full prompt+response passes (the path before; same values).
`--lm-dtype bf16` runs every LM matmul under bf16 autocast (tasks/models/precision.py), as a night does by default
on a CPU with AVX512-BF16; `--prefix-init anchor` is what pretrained bases get.
Each step is forward + backward + grad clipping + AdamW. Tokens/s counts the real prompt + response tokens of a
batch (the same count for the three set-ups), so the ratios are ratios of step times. The set-ups run
interleaved in rounds, so machine-load drift hits them alike; the reported time per set-up is the median step.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from latentpref.tasks.data import corpus
from latentpref.tasks.models.clap import CLaP, CLaPConfig, freeze_base
from latentpref.tasks.models.registry import describe_model, load_base_model
from latentpref.tasks.train.loop import ClapBatch, ClapObjective

log = logging.getLogger("clap_throughput")
MODES = ("plain_finetune", "clap_stage1", "clap_stage2", "clap_stage2_full_passes")


def corpus_windows(tokenizer, width: int, n: int) -> list[list[int]]:
    """Consecutive, non-overlapping `width`-token windows of the vendored review corpus, at least `n` of them when
    the corpus has that many (fewer otherwise)."""
    windows = []
    for text in corpus.load_documents(None)["text"].to_pylist():
        ids = tokenizer.encode(text)
        windows += [ids[i:i + width] for i in range(0, len(ids) - width + 1, width)]
        if len(windows) >= n:
            break
    return windows


def make_batches(tokenizer, *, n_batches: int, prompts: int, responses: int, prompt_tokens: int,
                 response_tokens: int, seed: int) -> list[ClapBatch]:
    """Fixed-length batches cut from the vendored review corpus: prompt = first `prompt_tokens` of a window,
    the B responses of a prompt = the continuations of B windows (no padding, so token counts are exact)."""
    windows = corpus_windows(tokenizer, prompt_tokens + response_tokens, n_batches * prompts * responses)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        pick = rng.choice(len(windows), size=prompts * responses, replace=False).reshape(prompts, responses)
        p_ids = torch.tensor([windows[row[0]][:prompt_tokens] for row in pick for _ in range(responses)])
        r_ids = torch.tensor([windows[j][prompt_tokens:] for row in pick for j in row])
        out.append(ClapBatch(p_ids, torch.ones_like(p_ids), r_ids, torch.ones_like(r_ids), prompts, responses))
    return out


class _PlainFinetune(torch.nn.Module):
    """log p(y|x) of the plain base through the same code path as CLaP (`response_logps` with z=None)."""

    def __init__(self, clap: CLaP):
        super().__init__()
        self.clap = clap

    def forward(self, batch: ClapBatch, stage: int, generator=None):
        logps = self.clap.response_logps(None, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                         batch.response_mask)
        return -logps.mean(), {}


def build(mode: str, base, cfg: CLaPConfig, lr: float):
    if mode == "clap_stage2_full_passes":
        objective, stage, params, opt = build("clap_stage2", base, cfg, lr)
        objective.shared_prompt_cache = False
        return objective, stage, params, opt
    clap = CLaP(copy.deepcopy(base), cfg).train()
    if mode == "plain_finetune":
        # only the base trains; the CLaP parts are built (same process memory) but unused
        clap.requires_grad_(False)
        clap.base_lm.requires_grad_(True)
        objective, stage = _PlainFinetune(clap), 0
    else:
        stage = 1 if mode == "clap_stage1" else 2
        freeze_base(clap, frozen=stage == 1)
        if clap.skip is not None:
            clap.skip.requires_grad_(stage == 1)  # as in tasks/train/pretrain.py: the skip is a stage-1 device
        objective = ClapObjective(clap)
    params = [p for p in clap.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return objective, stage, params, opt


def step(objective, stage, params, opt, batch, generator) -> float:
    t0 = time.perf_counter()
    loss, _ = objective(batch, stage, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--base", default="tiny-gpt2", help="tiny-gpt2 | tiny-llama | smollm2-135m | a model folder")
    ap.add_argument("--prompts", type=int, default=4, help="P prompts per batch")
    ap.add_argument("--responses", type=int, default=4, help="B responses per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--response-tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per set-up")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per set-up")
    ap.add_argument("--rounds", type=int, default=3, help="interleaving rounds the timed steps are split into")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-dtype", choices=["fp32", "bf16"], default="fp32", help="LM precision (autocast)")
    ap.add_argument("--prefix-init", choices=["random", "anchor"], default="random")
    args = ap.parse_args(argv)
    from latentpref.tasks.models import precision
    precision.set_setting(args.lm_dtype)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = round(os.getloadavg()[0], 2)
    base, tokenizer = load_base_model(args.base, seed=args.seed)
    cfg = CLaPConfig(prefix_init=args.prefix_init)
    batches = make_batches(tokenizer, n_batches=8, prompts=args.prompts, responses=args.responses,
                           prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens, seed=args.seed)
    tokens = int(batches[0].prompt_mask.sum() + batches[0].response_mask.sum())
    setups = {}
    for mode in MODES:
        torch.manual_seed(args.seed)
        setups[mode] = build(mode, base, cfg, args.lr)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    gen = torch.Generator().manual_seed(args.seed)
    for mode in MODES:
        for i in range(args.warmup):
            step(*setups[mode], batches[i % len(batches)], gen)
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for mode in MODES:
            for i in range(per_round):
                times[mode].append(step(*setups[mode], batches[(r * per_round + i) % len(batches)], gen))
        log.info("round %d/%d: %s", r + 1, args.rounds,
                 ", ".join(f"{m} {statistics.median(t) * 1e3:.0f} ms" for m, t in times.items()))
    tps = {m: tokens / statistics.median(t) for m, t in times.items()}
    result = {
        "clap_stage1_tokens_per_s": round(tps["clap_stage1"], 1),
        "clap_stage2_tokens_per_s": round(tps["clap_stage2"], 1),
        "plain_finetune_tokens_per_s": round(tps["plain_finetune"], 1),
        "stage1_ratio": round(tps["clap_stage1"] / tps["plain_finetune"], 3),
        "stage2_ratio": round(tps["clap_stage2"] / tps["plain_finetune"], 3),
        "clap_stage2_full_passes_tokens_per_s": round(tps["clap_stage2_full_passes"], 1),
        "stage2_full_passes_ratio": round(tps["clap_stage2_full_passes"] / tps["plain_finetune"], 3),
        "stage2_speedup_shared_prompt_cache": round(tps["clap_stage2"] / tps["clap_stage2_full_passes"], 3),
        "lm_dtype": args.lm_dtype,
        "load_average_1m_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "base": args.base,
        "model": describe_model(base),
        "clap_config": cfg.__dict__,
        "batch": {"prompts": args.prompts, "responses_per_prompt": args.responses,
                  "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens,
                  "tokens_per_step": tokens},
        "steps": {"warmup": args.warmup, "timed": len(times["clap_stage1"]), "rounds": args.rounds},
        "median_step_s": {m: round(statistics.median(t), 4) for m, t in times.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s: %s", args.out, json.dumps({k: result[k] for k in list(result)[:5]}))
    return result


if __name__ == "__main__":
    main()
