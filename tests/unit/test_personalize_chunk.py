"""Unit tests for tasks/train/personalize.py `fit_chunk`: every mode fits, stores and reloads per-user artifacts;
unchanged users are skipped, changed ones refitted (warm start), users with too few pairs get the prior (flagged).

A tiny real CLaP (small-vocab GPT-2, saved with `save_clap`) in a temporary local store, and its latent cache built
by `build_latent_cache` through a word-hashing tokenizer, so the worker path is exactly the flow's.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from latentpref.tasks.data.batching import tokenize_prompts
from latentpref.tasks.data.store import Store
from latentpref.tasks.models.clap import CLaP, CLaPConfig, save_clap
from latentpref.tasks.data.ipc import table_to_ipc
from latentpref.tasks.policy.cache import build_latent_cache
from latentpref.tasks.policy.store import current_fit, load_user_head, load_user_policy
from latentpref.tasks.train.personalize import ChunkJob, fit_chunk

V = 101
PROMPTS = [f"prompt {i} about the film" for i in range(6)]
MODES = ["head-only", "trunk-frozen", "faithful"]




class WordTokenizer:
    """Deterministic word-hash tokenizer with the three members `tokenize_prompts/responses` use."""

    pad_token_id = eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + sum(map(ord, w)) % (V - 1) for w in text.split()]


def _pairs(user_id: str, n: int, good_first: bool = True, offset: int = 0) -> list[dict]:
    rows = []
    for k in range(n):
        p = PROMPTS[(k + offset) % len(PROMPTS)]
        good, bad = f"a good great fine answer {k % 3}", f"a bad awful poor answer {k % 3}"
        rows.append({"user_id": user_id, "prompt": p, "chosen": good if good_first else bad,
                     "rejected": bad if good_first else good, "weight": 1.0})
    return rows


def _table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("weight", pa.float32())])
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Store with a saved tiny CLaP and the latent cache of every text the tests use."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0))
    clap = CLaP(base, CLaPConfig(latent_dim=4, n_query=2, n_prefix=2)).eval()
    with torch.no_grad():   # a "trained" posterior encoder: non-zero head so posteriors depend on the text
        clap.encoder.h2z.weight.normal_(0, 0.5)
        clap.encoder.h2z.bias.normal_(0, 0.1)
    store = Store(str(tmp_path_factory.mktemp("store")))
    save_clap(clap, store.url("models", "clap", "v1"))
    store.write_json({"version": "v1"}, "models", "clap", "current.json")   # as pretrain does
    responses = {r for row in _pairs("a", 3) for r in (row["chosen"], row["rejected"])}
    pr = [(p, r) for p in PROMPTS for r in sorted(responses)]
    cache = build_latent_cache(clap, WordTokenizer(), PROMPTS, pr, prompt_tokens=8, response_tokens=8)
    store.write_bytes(cache.to_bytes(), "cache", "v1", "latents-test.safetensors")
    return store, clap


def _job(store: Store, mode: str, pairs: pa.Table, user_ids, **fit) -> ChunkJob:
    cfg = {"steps": 6, "lr": 1e-2, "n_samples": 4, "seed": 0, "code_evidence_ratio": 1.0, **fit}
    return ChunkJob(store_root=store.root, clap_version="v1", cache_path=("cache", "v1", "latents-test.safetensors"),
                    user_ids=tuple(user_ids), pairs_ipc=table_to_ipc(pairs), fit=cfg, mode=mode, min_pairs=4,
                    clap_path=("models", "clap", "v1"))


@pytest.mark.parametrize("mode, loss_type", [("head-only", "ipo"), ("trunk-frozen", "simpo"), ("faithful", "dpo")])
def test_fit_store_skip_refit(world, tmp_path, mode, loss_type):
    _, clap = world
    store = Store(str(tmp_path))   # fresh user space; the CLaP and the cache come from the module store
    for parts in (("cache", "v1", "latents-test.safetensors"),):
        store.write_bytes(world[0].read_bytes(*parts), *parts)
    save_clap(clap, store.url("models", "clap", "v1"))
    store.write_json({"version": "v1"}, "models", "clap", "current.json")   # as pretrain does
    users = ["u1", "u2", "u3", "u4"]
    u1, u2, u3 = _pairs("u1", 6), _pairs("u2", 5, good_first=False, offset=2), _pairs("u3", 2)
    pairs = _table(u1 + u2 + u3)

    records = {r["user_id"]: r for r in fit_chunk(_job(store, mode, pairs, users, loss_type=loss_type))}
    assert {u: r["status"] for u, r in records.items()} == {"u1": "fitted", "u2": "fitted", "u3": "cold_start",
                                                            "u4": "cold_start"}
    for u in users:
        manifest = current_fit(store, u, clap_version="v1")
        assert manifest["mode"] == mode and manifest["clap_version"] == "v1"
        assert manifest["cold_start"] == (u in ("u3", "u4"))
        if not manifest["cold_start"]:
            assert manifest["loss_type"] == loss_type and math.isfinite(manifest["final_loss"])
            assert manifest["artifact"] == ("head.safetensors" if mode == "head-only" else "policy.safetensors")
    if mode == "head-only":
        assert records["u1"]["artifact_bytes"] <= 64 * 1024

    # the stored policy serves: a fitted user moves off the prior, a cold-start user is exactly the prior
    ids, mask = tokenize_prompts(WordTokenizer(), PROMPTS[:3], 8)
    mu, _ = load_user_policy(store, "u1", clap_version="v1").latent(clap.encoder, ids, mask)
    assert mu.shape == (3, 4) and mu.abs().sum() > 0
    cold = load_user_policy(store, "u3", clap_version="v1")
    assert cold.cold_start and (cold.latent(clap.encoder, ids, mask)[0] == 0).all()

    # nothing changed -> nothing refitted
    again = fit_chunk(_job(store, mode, pairs, users, loss_type=loss_type))
    assert [r["status"] for r in again] == ["unchanged"] * 4

    # u2 loses a pair: only u2 is refitted, from its previous fit
    changed = _table(u1 + u2[:-1] + u3)
    third = {r["user_id"]: r for r in fit_chunk(_job(store, mode, changed, users, loss_type=loss_type))}
    assert {u: r["status"] for u, r in third.items()} == {"u1": "unchanged", "u2": "fitted", "u3": "unchanged",
                                                          "u4": "unchanged"}
    assert third["u2"]["warm_start"] and third["u2"]["n_pairs"] < records["u2"]["n_pairs"]


def test_mode_switch_refits(world):
    """A user fitted head-only is refitted when the mode changes (the version names the mode); the head loader
    refuses an encoder-mode policy with a pointer to load_user_policy."""
    store, _ = world
    pairs = _table(_pairs("m1", 5) + _pairs("m2", 1))
    first = {r["user_id"]: r for r in fit_chunk(_job(store, "head-only", pairs, ["m1", "m2"]))}
    assert (first["m1"]["status"], first["m2"]["status"]) == ("fitted", "cold_start")
    assert load_user_head(store, "m1")[0].shape == (2, 16, 4)           # (Q, d, 2D/Q)
    second = {r["user_id"]: r for r in fit_chunk(_job(store, "trunk-frozen", pairs, ["m1", "m2"]))}
    assert (second["m1"]["status"], second["m2"]["status"]) == ("fitted", "cold_start")
    assert "-trunk-frozen-" in second["m1"]["version"] and not second["m1"]["warm_start"]  # no cross-mode start
    with pytest.raises(ValueError, match="load_user_policy"):
        load_user_head(store, "m1")
    assert load_user_head(store, "m2")[2]["cold_start"]                 # cold start is a zero head in any mode


def test_bad_jobs(world):
    store, _ = world
    pairs = _table(_pairs("x1", 5))
    job = _job(store, "faithful", pairs, ["x1"])
    with pytest.raises(ValueError, match="clap_path"):
        fit_chunk(ChunkJob(**{**job.__dict__, "clap_path": ()}))
    with pytest.raises(ValueError, match="mode='lora'"):
        fit_chunk(ChunkJob(**{**job.__dict__, "mode": "lora"}))


def test_personalize_config_mode_defaults():
    """lr / noise_draws left unset take the mode's defaults (faithful: spec lr 1e-4, fresh samples); set values
    win; bad values fail naming the key."""
    from pydantic import ValidationError

    from latentpref.pipelines.config import MODE_LR, PersonalizeConfig, load_config

    assert MODE_LR == {"head-only": 1e-2, "trunk-frozen": 1e-3, "faithful": 1e-4}
    head, faithful = PersonalizeConfig(), PersonalizeConfig(mode="faithful")
    assert (head.lr, head.noise_draws, head.fit_noise_draws()) == (1e-2, 4, 4)
    assert (faithful.lr, faithful.noise_draws, faithful.fit_noise_draws()) == (1e-4, "fresh", None)
    tiny = load_config("tiny", overrides=["personalize.mode=faithful"]).personalize
    assert tiny.lr == 1e-4 and tiny.fit_noise_draws() is None          # the preset does not pin lr
    own = PersonalizeConfig(mode="faithful", lr=3e-4, noise_draws=2)
    assert (own.lr, own.fit_noise_draws()) == (3e-4, 2)
    assert PersonalizeConfig.model_validate(own.model_dump()) == own
    for bad, key in (({"lr": 0}, "lr"), ({"noise_draws": 0}, "noise_draws"), ({"noise_draws": "never"}, "noise_draws")):
        with pytest.raises(ValidationError, match=key):
            PersonalizeConfig(**bad)


@pytest.mark.parametrize("change", [{"loss_type": "ipo"}, {"beta": 0.5}, {"steps": 7}, {"evidence_ratio": 0.25}])
def test_a_changed_fit_setting_refits_every_user(world, tmp_path, change):
    """A fit is a function of its settings: the same feedback under a changed setting is refitted (never served
    as if it were the new setting), and the manifest names the settings that produced it."""
    _, clap = world
    store = Store(str(tmp_path))
    store.write_bytes(world[0].read_bytes("cache", "v1", "latents-test.safetensors"),
                      "cache", "v1", "latents-test.safetensors")
    pairs = _table(_pairs("u1", 6) + _pairs("u2", 5, good_first=False, offset=2) + _pairs("u3", 2))
    users = ["u1", "u2", "u3"]
    first = {r["user_id"]: r["version"] for r in fit_chunk(_job(store, "head-only", pairs, users))}
    again = fit_chunk(_job(store, "head-only", pairs, users))
    assert {r["status"] for r in again} == {"unchanged"}
    changed = {r["user_id"]: r for r in fit_chunk(_job(store, "head-only", pairs, users, **change))}
    assert {u: r["status"] for u, r in changed.items()} == {"u1": "fitted", "u2": "fitted", "u3": "cold_start"}
    for u in users:
        manifest = current_fit(store, u, clap_version="v1")
        assert manifest["version"] != first[u]
        key, value = next(iter(change.items()))
        assert manifest["fit_settings"][key] == value
