"""Issue 28, lever 1 ("a preference space at the dimension the data supports"): how well a few pairs place a user,
read LM-free from the frozen LM's states, per user group, number of train pairs and space dimension.

    python benchmarks/space.py --store STORE --out benchmarks/results/space-default.json \\
        [--clap VERSION] [--data DIGEST] [--dims 1,2,4,8,16,32] [--pairs 4,8,16,32] [--seeds 0,1,2]

It takes a night's store (its CLaP, base LM and data), pools the base LM's states after the CLaP's
`preference_layer` blocks (or `--layer`) over every pair's two responses (`preference_space.pooled_states`, what
the CLaP's preference coordinates read), refits the population preference space from the population (seen) users'
train pairs at each `--dims` (`fit_preference_space`, the pretrain step's own function) and, for every user of each
group, fits an L2-logistic read-out of the user's first N train pairs (`fit_user_readouts`, N in `--pairs`, the
pairs drawn in `--seeds` orders) in:
  - `space_<dims>`: the refitted space's coordinates (what a user's latent DPO fit can use at that dimension),
  - `clap_space`: the night's CLaP's own preference coordinates (the space its LM learnt to write from),
  - `full`: all of the layer's states (no shared space: one user's pairs alone),
and reports the accuracy on the user's held-out pairs (mean over users and seeds, and the std over seeds of the
group mean). No LM decoding and no training of the CLaP: an upper bound on what the night's latent held-out accuracy
can reach with that space, and the dimension the data supports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _readout_accuracy(train_diff: torch.Tensor, test_diff: torch.Tensor, l2: float) -> float:
    """One user's L2-logistic read-out on standardised train differences, accuracy on the held-out ones."""
    from latentpref.tasks.models.preference_space import fit_user_readouts
    w = fit_user_readouts(train_diff, torch.zeros(len(train_diff), dtype=torch.long), 1, l2=l2)[0]
    return float(((test_diff @ w) > 0).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clap", default=None, help="CLaP version (default: the store's current one)")
    ap.add_argument("--data", default=None, help="population dataset digest (data/population/<digest>)")
    ap.add_argument("--dims", default="1,2,4,8,16,32")
    ap.add_argument("--pairs", default="4,8,16,32")
    ap.add_argument("--seeds", default="0,1,2", help="orders in which a user's train pairs are taken")
    ap.add_argument("--layer", type=int, default=None,
                    help="read the states after this many blocks (default: the CLaP's preference_layer; another "
                         "layer drops the clap_space view, which only exists at the CLaP's own)")
    ap.add_argument("--l2", type=float, default=1.0, help="the read-outs' L2 weight (the space's own default)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc

    from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
    from latentpref.tasks.data.store import Store
    from latentpref.tasks.models.clap import load_clap, load_clap_tokenizer
    from latentpref.tasks.models.preference_space import fit_preference_space, pooled_states
    from latentpref.tasks.policy.store import current_clap_version

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nights import _cpu, night_population

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    store = Store(args.store)
    version = args.clap or current_clap_version(store)
    manifest = store.read_json("models", "clap", version, "_manifest.json")
    folder = store.local_copy("models", "clap", version)
    clap, tokenizer = load_clap(folder), load_clap_tokenizer(folder)
    clap.eval()
    cfg = clap.cfg
    if not cfg.preference_dims:
        raise SystemExit(f"error: CLaP {version} has no preference space (pretrain.preference_dims = 0)")
    pt, rt = manifest["prompt_tokens"], manifest["response_tokens"]
    layer = args.layer or cfg.preference_layer
    data_dir, pairs, users, groups = night_population(store, args.data)
    pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=pa.array(list(groups), pa.string())))

    # every pair's two pooled states, once (the only LM work here)
    t0 = time.perf_counter()
    prompts, chosen, rejected = (pairs[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
    states = {}
    for side, texts in (("chosen", chosen), ("rejected", rejected)):
        out = []
        for i in range(0, len(texts), args.batch):
            p_ids, p_mask = tokenize_prompts(tokenizer, prompts[i:i + args.batch], pt)
            r_ids, r_mask = tokenize_responses(tokenizer, texts[i:i + args.batch], rt)
            out.append(pooled_states(clap.base_lm, p_ids, p_mask, r_ids, r_mask, layer))
        states[side] = torch.cat(out)
    encode_s = time.perf_counter() - t0
    user_of = pairs["user_id"].to_pylist()
    split = np.asarray(pairs["split"].to_pylist())
    group_of = np.asarray([groups[u] for u in user_of])

    # the population space at each dimension, from the seen users' train pairs only
    pop = np.flatnonzero((group_of == "population") & (split == "train"))
    pop_ids = sorted({user_of[i] for i in pop})
    index = {u: k for k, u in enumerate(pop_ids)}
    pop_users = torch.tensor([index[user_of[i]] for i in pop])
    d = states["chosen"].shape[1]
    spaces = {}
    for dims in [int(x) for x in args.dims.split(",") if x.strip()]:
        if dims <= min(len(pop_ids), d):
            spaces[f"space_{dims}"] = fit_preference_space(states["chosen"][pop], states["rejected"][pop], pop_users,
                                                           len(pop_ids), dims=dims, layer=layer)
    # a difference of two texts' coordinates: the space's mean cancels
    directions, scale = clap.preference_directions.float(), clap.preference_scale.float()
    all_states = torch.cat([states["chosen"], states["rejected"]])
    full_std = all_states.std(0).clamp(min=1e-4)

    def features(name: str, rows: np.ndarray) -> torch.Tensor:
        """Standardised chosen - rejected differences of these pairs in a view."""
        c, r = states["chosen"][rows], states["rejected"][rows]
        if name == "full":
            return (c - r) / full_std
        if name == "clap_space":
            return ((c - r) @ directions.T) / scale
        return spaces[name].coords(c) - spaces[name].coords(r)

    views = (["clap_space"] if layer == cfg.preference_layer else []) + [*spaces, "full"]
    n_pairs = [int(x) for x in args.pairs.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    result: dict = {}
    for group in ("population", "holdout", "out_of_cohort"):
        ids = sorted({u for u, g in groups.items() if g == group})
        per: dict = {}
        for u in ids:
            mine = np.flatnonzero(np.asarray([x == u for x in user_of]))
            train, held = mine[split[mine] == "train"], mine[split[mine] == "heldout"]
            if len(held) == 0 or len(train) == 0:
                continue
            for seed in seeds:
                order = np.random.default_rng(seed).permutation(train)
                for n in n_pairs:
                    if n > len(train):
                        continue
                    for view in views:
                        acc = _readout_accuracy(features(view, order[:n]), features(view, held), args.l2)
                        per.setdefault(view, {}).setdefault(n, {}).setdefault(seed, []).append(acc)
        label = {"population": "seen", "holdout": "unseen"}.get(group, group)
        result[label] = {view: {str(n): {"accuracy": round(float(np.mean([a for s in by_seed.values() for a in s])), 4),
                                         "std_over_seeds": round(float(np.std([np.mean(s) for s in by_seed.values()])),
                                                                 4),
                                         "users": len(next(iter(by_seed.values())))}
                                for n, by_seed in by_n.items()}
                         for view, by_n in per.items()}
        print(group, json.dumps({v: {n: r["accuracy"] for n, r in by_n.items()} for v, by_n in result[label].items()}),
              flush=True)
    out = {"store": args.store, "clap_version": version, "data": data_dir, "preference_layer": cfg.preference_layer,
           "layer": layer,
           "clap_preference_dims": cfg.preference_dims, "population_users": len(pop_ids),
           "pairs": {"train": int((split == "train").sum()), "heldout": int((split == "heldout").sum())},
           "l2": args.l2, "seeds": seeds, "groups": result, "encode_s": round(encode_s, 1),
           "wall_s": round(time.perf_counter() - t_start, 1), "cpu": _cpu(), "cpu_count": os.cpu_count(),
           "load_average": list(os.getloadavg())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
