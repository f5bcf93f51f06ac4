"""A small store a server can serve, built in seconds without a night: a random tiny-GPT-2 CLaP saved the way
pretrain saves it, users' heads written with personalize's own artifact writer, releases published with the
function the personalize stage calls. Used by tests/integration/test_serve.py."""
from __future__ import annotations

import torch

from latentpref.tasks.data.store import MANIFEST, Store
from latentpref.tasks.evaluate.serve_core import Release, publish_release
from latentpref.tasks.policy.store import HEAD_FILE, fit_version
from latentpref.tasks.policy.store import store_users
from latentpref.tasks.policy.table import PolicyTable, night_tag

BASE = ("models", "base", "tiny-gpt2-tokenizer")
PROMPT_TOKENS = 32


def write_clap(store: Store, version: str, *, seed: int):
    """A random tiny CLaP as models/clap/<version>/ (weights, config, manifest last) + the current pointer."""
    from latentpref.tasks.models.clap import CLaP, CLaPConfig, save_clap
    from latentpref.tasks.models.registry import load_base_model
    base, tok = load_base_model("tiny-gpt2", seed=seed)
    torch.manual_seed(seed)
    clap = CLaP(base, CLaPConfig(), base_spec="tiny-gpt2").eval()
    if not store.exists(*BASE, MANIFEST):
        tok.save_pretrained(store.url(*BASE))
        store.write_json({"spec": "tiny-gpt2"}, *BASE, MANIFEST)
    save_clap(clap, store.url("models", "clap", version))
    store.write_json({"version": version, "base_model_path": list(BASE), "prompt_tokens": PROMPT_TOKENS,
                      "response_tokens": 16},
                     "models", "clap", version, MANIFEST)
    store.write_json({"version": version}, "models", "clap", "current.json")   # as pretrain does, before users
    return clap, tok


def write_users(store: Store, clap, clap_version: str, user_ids: list[str], *, seed: int,
                cold: tuple[str, ...] = ()) -> None:
    """Random (but distinct) heads for `user_ids` fitted 'against' clap_version; users in `cold` get cold starts."""
    from latentpref.tasks.train.fit_user import init_params
    Q, D = clap.cfg.n_query, clap.cfg.latent_dim
    d = clap.encoder.features(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)).shape[-1]
    gen = torch.Generator().manual_seed(seed)
    fits = []
    for i, user_id in enumerate(user_ids):
        weight, bias = init_params(1, Q, d, D)
        is_cold = user_id in cold
        if not is_cold:
            weight = weight + 3.0 * torch.randn(weight.shape, generator=gen)
            bias = bias + 3.0 * torch.randn(bias.shape, generator=gen)
        data_hash = f"s{seed}u{i}"
        fits.append((user_id, fit_version(clap_version, "head-only", data_hash), HEAD_FILE,
                     {"weight": weight[0], "bias": bias[0]},
                     {"cold_start": is_cold, "n_pairs": 0 if is_cold else 8, "data_hash": data_hash,
                      "clap_version": clap_version, "mode": "head-only", "fit_seconds": 0.0}))
    store_users(store, fits)     # one commit, as a night's driver makes


PAIRS = ("data", "population", "serve-test", "pairs.parquet")
# the fit settings a synthetic release says its users were fitted with (what an online refit then uses)
FIT = {"steps": 20, "lr": 0.05, "beta": 0.1, "n_samples": 4, "evidence_ratio": 0.5, "loss_type": "dpo", "seed": 0,
       "noise_draws": 2, "code_evidence_ratio": 1.0}
MIN_PAIRS = 2


def pair_rows(user_id: str, n: int, *, offset: int = 0) -> list[dict]:
    """n feedback rows of a user (the contract's columns)."""
    return [{"user_id": user_id, "prompt": f"The movie {i} was", "chosen": f" wonderful and warm {i} .",
             "rejected": f" dull and cold {i} ."} for i in range(offset, offset + n)]


def write_pairs(store: Store, user_ids: list[str], n: int = 3) -> None:
    """The night's simulated train pairs (split "train"), as prepare writes them."""
    import pyarrow as pa
    rows = [{**r, "weight": 1.0, "split": "train"} for u in user_ids for r in pair_rows(u, n)]
    store.write_table(pa.Table.from_pylist(rows), *PAIRS)


def night(store: Store, version: str, user_ids: list[str], *, seed: int, cold: tuple[str, ...] = (),
          publish: bool = True) -> Release | None:
    """One synthetic night: CLaP, then users, then (optionally) the release, published as the personalize stage
    publishes it (night tag, pairs and fit settings for online refits)."""
    clap, _ = write_clap(store, version, seed=seed)
    write_users(store, clap, version, user_ids, seed=seed, cold=cold)
    if not publish:
        return None
    write_pairs(store, user_ids)
    tag = night_tag(version)
    PolicyTable(store, version).tag(tag)
    return publish_release(store, clap_version=version, run_id=f"night-{version}", policy_tag=tag, mode="head-only",
                           pairs_path=list(PAIRS), fit=FIT, min_pairs=MIN_PAIRS, discrete_estimator="dpo")
