"""Issue 28, lever 2 ("an LM that follows the latent"): the follow stage on a night's CLaP, on and off.

    python benchmarks/follow.py --store STORE --out benchmarks/results/follow-default.json \\
        [--clap VERSION] [--data DIGEST] [--steps 60] [--lr 1e-4] [--beta 0.1] [--nll-weight 1.0] [--pairs-per-batch 8] \\
        [--rank 64] [--eval-pairs 128] [--eval-at 0,30,60] [--latent served|preference] [--scale 1.0]
    python benchmarks/follow.py --store STORE --out OUT --steps 0 --latent preference --scales 0.125,0.25,0.5,1

It takes a night's store (its CLaP and data, e.g. the README command's default night) and shares that CLaP's
stages 1-2 between "off" and "on" (the issue allows ablations to share a stage-1 checkpoint): a follow adapter
(`clap.FollowAdapter`, zero at z = 0) is attached, every user of every group is fitted as the night fits a user
(head-only latent DPO with the preset's personalize settings, `follow.fit_population_heads`), and the adapter is
trained with the product's `FollowObjective` on the population users' train pairs. At each `--eval-at` step it
reports, per group (population = seen, holdout = unseen, out_of_cohort), the LM-run held-out accuracy exactly as the
night measures it ([log p(y_w|x,z_u) - log p(y_w|x,0)] > [same for y_l], on `--eval-pairs` held-out pairs of the
group, a fixed sample), the mean |margin| and the NLL change per token of the held-out responses at the user's
latent against z = 0; and, on a fixed sample of the population's *train* pairs, the same accuracy (what the stage
fits). Step 0 is "off". `--latent preference` (a diagnostic) keeps only the preference-space coordinates of the
user's latent (times `--scale`), the rest at the prior's 0.
`--scales` (with `--steps 0`) evaluates several scales on the same fits and pairs: what the night's
`personalize.preference_scale` does to the LM-run held-out accuracy, without a night per value.
`--position readout` (with `--steps 0 --latent preference`) places each user at one prompt-independent point instead
of their fitted head: PReF's per-user fit, an L2-logistic read-out of their train pairs' preference-coordinate
differences (= latent DPO with a prompt-independent N(mu_u, I) on those coordinates), scaled as `_readout` says.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clap", default=None, help="CLaP version (default: the store's current one)")
    ap.add_argument("--data", default=None, help="population dataset digest (data/population/<digest>)")
    ap.add_argument("--preset", default="default", help="whose personalize settings fit the users")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--nll-weight", type=float, default=1.0)
    ap.add_argument("--pairs-per-batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--eval-pairs", type=int, default=128)
    ap.add_argument("--eval-at", default="0,30,60")
    ap.add_argument("--latent", choices=("served", "preference"), default="served")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--fit-share", type=float, default=1.0,
                    help="< 1 (a diagnostic): fit each user on this share of their train pairs and also evaluate the "
                         "rest (train prompts, pairs their fit never read)")
    ap.add_argument("--position", choices=("per-prompt", "user-mean", "readout"), default="per-prompt",
                    help="user-mean (a diagnostic): every prompt gets the mean of the user's latents over their own "
                         "train prompts, a prompt-independent position")
    ap.add_argument("--readout-l2", type=float, default=1.0,
                    help="--position readout: the L2 weight of each user's logistic read-out of the preference "
                         "coordinates (PReF's per-user fit)")
    ap.add_argument("--scales", default=None,
                    help="with --steps 0: comma-separated scales evaluated on the same fits and pairs (a sweep of "
                         "personalize.preference_scale; written under scale_sweep)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.scales and args.steps:
        ap.error("--scales is a sweep of the un-trained CLaP: use it with --steps 0")
    if args.position == "readout" and (args.steps or args.latent != "preference"):
        ap.error("--position readout is a diagnostic of the preference coordinates: --steps 0 --latent preference")

    import pyarrow as pa
    import pyarrow.compute as pc

    from latentpref.pipelines.config import load_config
    from latentpref.tasks.data.store import Store
    from latentpref.tasks.models.clap import FollowAdapter, load_clap, load_clap_tokenizer
    from latentpref.tasks.policy.store import current_clap_version
    from latentpref.tasks.train.fit_user import FitConfig
    from latentpref.tasks.train.follow import (FollowObjective, FollowSettings, fit_population_heads,
                                               head_latents)
    from latentpref.tasks.train.loop import make_pair_batch, population_pairs, sample_pair_batches, set_stage

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nights import _cpu, night_population   # the CPU model name as the nights' JSONs record it; the data

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    store = Store(args.store)
    version = args.clap or current_clap_version(store)
    manifest = store.read_json("models", "clap", version, "_manifest.json")
    folder = store.local_copy("models", "clap", version)
    clap, tokenizer = load_clap(folder), load_clap_tokenizer(folder)
    cfg = clap.cfg
    d = clap.base_lm.config.hidden_size
    n_layers = len(clap.adapter.z2h)
    clap.adapter.follow = FollowAdapter(cfg.preference_dims or cfg.latent_dim, args.rank, n_layers, cfg.n_prefix * d)
    pt, rt = manifest["prompt_tokens"], manifest["response_tokens"]

    # the night's pairs and users tables (data/population/<digest>/): --data, or the store's only one
    data_dir, pairs, users, groups = night_population(store, args.data)
    fit = FitConfig(**load_config(args.preset).personalize.fit_settings().gaussian())

    @torch.no_grad()
    def _user_means(heads, train, n):
        sums, counts = torch.zeros(n, cfg.latent_dim), torch.zeros(n)
        for i in range(0, len(train), 64):
            b = make_pair_batch(tokenizer, train[i:i + 64], max_prompt_tokens=pt, max_response_tokens=rt)
            z = head_latents(heads, clap.encoder.features(b.prompt_ids, b.prompt_mask), b.user_index)
            sums.index_add_(0, b.user_index, z)
            counts.index_add_(0, b.user_index, torch.ones(len(z)))
        return sums / counts.clamp(min=1)[:, None]

    r_dims = cfg.preference_dims

    def _readout(train, n):
        """Per user, PReF's fit on the shared directions: an L2-logistic read-out w_u of the preference coordinates'
        differences (chosen - rejected posterior means, from the night's latent table), prompt-independent; served
        as z = scale * rms * w_u / |w_u| (rms: the root-mean-square norm of the texts' coordinates)."""
        from latentpref.tasks.policy.text_cache import TextLatentTable, text_key
        cache = TextLatentTable(store, version).load([], [(p.prompt, p.chosen) for p in train]
                                                     + [(p.prompt, p.rejected) for p in train])
        mu = cache.mu[:, :r_dims]
        at = lambda p, y: cache.response_index[text_key(p, y)]   # noqa: E731
        diff = torch.stack([mu[at(p.prompt, p.chosen)] - mu[at(p.prompt, p.rejected)] for p in train])
        who = torch.tensor([p.user_index for p in train])
        w = torch.zeros(n, r_dims, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")
        counts = torch.zeros(n).index_add_(0, who, torch.ones(len(train))).clamp(min=1)

        def closure():
            opt.zero_grad()
            per_pair = torch.nn.functional.softplus(-(w[who] * diff).sum(-1))
            loss = (torch.zeros(n).index_add(0, who, per_pair) / counts).sum() + args.readout_l2 * (w ** 2).sum() / 2
            loss.backward()
            return loss
        opt.step(closure)
        rms = float(mu.norm(dim=-1).pow(2).mean().sqrt())
        unit = w.detach() / w.detach().norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return SimpleNamespace(direction=unit * rms, rms=rms)

    rng = np.random.default_rng(0)
    data, extra = {}, {}
    for group in ("population", "holdout", "out_of_cohort"):
        ids = [u for u, g in groups.items() if g == group]
        if not ids:
            continue
        train, held, n = population_pairs(pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(ids, pa.string()))))
        if args.fit_share < 1.0:
            # each user's train pairs split in two: the fit reads the first share; the rest (train prompts, pairs
            # the user's fit never read) is evaluated as "<group>_unfitted_train_pairs"
            seen_count: dict[int, int] = {}
            total = {u: sum(p.user_index == u for p in train) for u in range(n)}
            fitted, unfitted = [], []
            for p in train:
                k = seen_count.get(p.user_index, 0)
                seen_count[p.user_index] = k + 1
                (fitted if k < round(args.fit_share * total[p.user_index]) else unfitted).append(p)
            train = fitted
            pick = rng.choice(len(unfitted), min(args.eval_pairs, len(unfitted)), replace=False)
            extra[f"{group}_unfitted_train_pairs"] = [unfitted[i] for i in pick]
        if args.position == "readout":
            heads = _readout(train, n)
            data[group] = (train, [held[i] for i in rng.choice(len(held), min(args.eval_pairs, len(held)),
                                                               replace=False)], heads)
            continue
        heads = fit_population_heads(clap, tokenizer, train, n, fit, prompt_tokens=pt, response_tokens=rt)
        if args.position == "user-mean":
            heads.user_mean = _user_means(heads, train, n)
        sample = [held[i] for i in rng.choice(len(held), min(args.eval_pairs, len(held)), replace=False)]
        data[group] = (train, sample, heads)
    pop_train, _, pop_heads = data["population"]
    train_sample = [pop_train[i] for i in rng.choice(len(pop_train), min(args.eval_pairs, len(pop_train)),
                                                     replace=False)]

    def user_latent(heads, batch):
        if args.position == "readout":
            z = torch.zeros(len(batch.user_index), cfg.latent_dim)
            z[:, :r_dims] = heads.direction[batch.user_index] * args.scale
            return z
        if args.position == "user-mean":
            z = heads.user_mean[batch.user_index]
        else:
            z = head_latents(heads, clap.encoder.features(batch.prompt_ids, batch.prompt_mask), batch.user_index)
        if args.latent == "preference":
            kept = torch.zeros_like(z)
            kept[:, :cfg.preference_dims] = z[:, :cfg.preference_dims] * args.scale
            return kept
        return z * args.scale

    reference: dict = {}

    @torch.no_grad()
    def held_out(tag, heads, sample):
        clap.eval()
        rows = []
        for i in range(0, len(sample), 32):
            b = make_pair_batch(tokenizer, sample[i:i + 32], max_prompt_tokens=pt, max_response_tokens=rt)
            logp = lambda z, ids, mask: clap.response_logps(z, b.prompt_ids, b.prompt_mask, ids, mask)  # noqa: E731
            z = user_latent(heads, b)
            if (tag, i) not in reference:   # z = 0 never changes (the follow adapter is zero there)
                zero = torch.zeros_like(z)
                reference[tag, i] = (logp(zero, b.chosen_ids, b.chosen_mask), logp(zero, b.rejected_ids, b.rejected_mask))
            ref_c, ref_r = reference[tag, i]
            pol_c, pol_r = logp(z, b.chosen_ids, b.chosen_mask), logp(z, b.rejected_ids, b.rejected_mask)
            tokens = b.chosen_mask.sum(-1) + b.rejected_mask.sum(-1)
            rows.append(torch.stack([(pol_c - ref_c) - (pol_r - ref_r),
                                     -((pol_c - ref_c) + (pol_r - ref_r)) / tokens, z.norm(dim=-1)], 1))
        clap.train()
        m = torch.cat(rows)
        return {"heldout_accuracy": round(float((m[:, 0] > 0).float().mean()), 4),
                "mean_abs_margin_nats": round(float(m[:, 0].abs().mean()), 3),
                "nll_change_per_token": round(float(m[:, 1].mean()), 4),
                "user_latent_norm": round(float(m[:, 2].mean()), 3), "pairs": len(sample)}

    def evaluate(step):
        row = {"step": step, **{g: held_out(g, h, s) for g, (_, s, h) in data.items()},
               "population_train_pairs": held_out("train", pop_heads, train_sample),
               **{name: held_out(name, data[name.split("_unfitted")[0]][2], sample) for name, sample in extra.items()}}
        print(json.dumps(row), flush=True)
        return row

    eval_at = sorted({int(s) for s in args.eval_at.split(",")} | {args.steps})
    settings = FollowSettings(steps=args.steps, pairs_per_batch=args.pairs_per_batch, lr=args.lr, beta=args.beta,
                              nll_weight=args.nll_weight)
    objective = None if args.position == "readout" else FollowObjective(clap, pop_heads, settings)
    if objective is not None and (args.latent == "preference" or args.position == "user-mean"):
        objective.user_latent = lambda batch: user_latent(pop_heads, batch)   # diagnostics train where they evaluate
    set_stage(clap, 3)
    params = [p for p in clap.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = sample_pair_batches(tokenizer, pop_train, pairs_per_batch=args.pairs_per_batch,
                                  max_prompt_tokens=pt, max_response_tokens=rt, seed=1)
    evals, history, t0, train_s = [], [], time.perf_counter(), 0.0
    sweep = []
    for scale in ([float(x) for x in args.scales.split(",")] if args.scales else []):
        args.scale = scale
        sweep.append({"scale": scale, **evaluate(0)})
    if 0 in eval_at and not sweep:
        evals.append(evaluate(0))
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        loss, metrics = objective(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_s += time.perf_counter() - t
        history.append({k: round(float(v), 4) for k, v in metrics.items()} | {"step": step})
        if step in eval_at:
            evals.append(evaluate(step))
    out = {"store": args.store, "clap_version": version, "preset": args.preset, "latent": args.latent,
           "position": args.position, "fit_share": args.fit_share,
           "scale": args.scale, "settings": vars(args), "fit": fit.__dict__, "n_population_train_pairs": len(pop_train),
           "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(args.steps, 1), 2),
           "total_seconds": round(time.perf_counter() - t0, 1), "evals": evals, "scale_sweep": sweep, "history": history,
           "cpu": _cpu(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
           "trainable_params": sum(p.numel() for p in params)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
