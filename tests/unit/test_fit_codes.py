"""Per-user fitting of discrete-code policies (tasks/train/fit_codes.py) and its worker path (`fit_chunk` on a
discrete CLaP's latent cache): learning, batched == separate, the zero-training estimator, cold start = prior."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from latentpref.tasks.data.batching import tokenize_prompts
from latentpref.tasks.data.store import Store
from latentpref.tasks.models.clap import CLaP, CLaPConfig, save_clap
from latentpref.tasks.objectives import categorical_latent_dpo_loss
from latentpref.tasks.train.fit_codes import CodeFitConfig, fit_code_users, mean_posterior_delta, user_code_probs
from latentpref.tasks.data.ipc import table_to_ipc
from latentpref.tasks.policy.cache import LatentCache, build_latent_cache
from latentpref.tasks.policy.store import CODES_FILE, current_fit, load_user_policy
from latentpref.tasks.train.personalize import ChunkJob, fit_chunk

V = 101
PROMPTS = [f"prompt {i} about the film" for i in range(6)]




def _clear_user(n: int, K: int, good: int = 0, bad: int = 1, seed: int = 0):
    """n pairs whose chosen responses sit on code `good` and rejected ones on code `bad`."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.randn(n, K, generator=g) * 0.3
    chosen = torch.randn(n, K, generator=g) * 0.1
    rejected = torch.randn(n, K, generator=g) * 0.1
    chosen[:, good] += 3.0
    rejected[:, bad] += 3.0
    return prior, chosen, rejected


# ------------------------------------------------------------------------------------------------ fit_code_users
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_loss_decreases_and_the_preferred_code_gains(loss_type):
    K = 6
    prior, chosen, rejected = _clear_user(12, K)
    res = fit_code_users(prior, chosen, rejected, torch.zeros(12, dtype=torch.long), 1,
                         CodeFitConfig(steps=60, lr=0.05, beta=1.0, loss_type=loss_type))
    assert res.loss_curve[-1] < res.loss_curve[0]
    # the fit's precomputed-mask loss is `categorical_latent_dpo_loss` itself (step 0: delta = 0)
    at_prior, _ = categorical_latent_dpo_loss(prior, chosen, rejected, ref_logits=prior, beta=1.0, loss_type=loss_type)
    assert res.loss_curve[0] == pytest.approx(float(at_prior), rel=1e-5)
    assert res.delta.shape == (1, K) and res.final_accuracy[0] > 0.6   # pairs among noise codes are arbitrary
    p_u, p_ref = user_code_probs(res.delta[0], prior), torch.softmax(prior, -1)
    assert (p_u[:, 0] > p_ref[:, 0]).all() and (p_u[:, 1] < p_ref[:, 1]).all()
    torch.testing.assert_close(res.mixture[0], p_u.mean(0))
    torch.testing.assert_close(res.mixture.sum(-1), torch.ones(1))


def test_batched_users_equal_separate_fits():
    K, cfg = 5, CodeFitConfig(steps=25, lr=0.05, beta=0.5)
    users = [_clear_user(n, K, good=g, bad=b, seed=s) for n, g, b, s in ((4, 0, 1, 0), (7, 2, 0, 1), (3, 4, 3, 2))]
    prior, chosen, rejected = (torch.cat([u[i] for u in users]) for i in range(3))
    index = torch.cat([torch.full((u[0].shape[0],), k) for k, u in enumerate(users)])
    weight = torch.rand(index.shape[0], generator=torch.Generator().manual_seed(5)) + 0.5
    # a 4th user without pairs rides along and stays at the prior (delta = 0)
    batched = fit_code_users(prior, chosen, rejected, index, 4, cfg, pair_weight=weight)
    for k, u in enumerate(users):
        sel = index == k
        alone = fit_code_users(*u, torch.zeros(u[0].shape[0], dtype=torch.long), 1, cfg, pair_weight=weight[sel])
        # Same fit up to float reduction order (the code-pair matmul blocks differently for N rows). Where a
        # code's gradient is ~0 (a flat direction of the loss) Adam's g / sqrt(v) turns that rounding into
        # lr-sized steps of either sign, so delta itself is compared loosely and the loss and policy tightly.
        torch.testing.assert_close(batched.final_loss[k], alone.final_loss[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(user_code_probs(batched.delta[k], u[0]), user_code_probs(alone.delta[0], u[0]),
                                   rtol=0, atol=5e-3)
        torch.testing.assert_close(batched.delta[k], alone.delta[0], rtol=0, atol=0.05)
    assert (batched.delta[3] == 0).all() and math.isnan(batched.final_loss[3]) and batched.mixture[3].isnan().all()


def test_mean_posterior_estimator_known_value():
    """Pair posteriors e_0 and e_1 (K = 3), alpha = 1: pi = (0.4, 0.4, 0.2), delta = log pi - mean log pi; then
    p_u(k|x) ∝ p_ref(k|x) pi(k). No training (steps are ignored)."""
    big = 30.0   # logits this peaked are one-hot to float precision
    pair = torch.tensor([[big, 0.0, 0.0], [0.0, big, 0.0]])
    prior = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 0.0]])
    chosen, rejected = torch.randn(2, 3), torch.randn(2, 3)
    res = fit_code_users(prior, chosen, rejected, torch.zeros(2, dtype=torch.long), 2,
                         CodeFitConfig(estimator="mean_posterior", alpha=1.0, steps=1000), pair_logits=pair)
    log_pi = torch.tensor([0.4, 0.4, 0.2]).log()
    torch.testing.assert_close(res.delta[0], log_pi - log_pi.mean())
    assert (res.delta[1] == 0).all() and res.loss_curve == []          # user 1 has no pairs: the prior
    want = torch.softmax(prior, -1) * torch.tensor([0.4, 0.4, 0.2])
    torch.testing.assert_close(user_code_probs(res.delta[0], prior), want / want.sum(-1, keepdim=True))
    # uninformative (uniform) pair posteriors leave the prior exactly
    flat = mean_posterior_delta(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 1)
    torch.testing.assert_close(flat, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="pair_logits"):
        fit_code_users(prior, chosen, rejected, torch.zeros(2, dtype=torch.long), 1,
                       CodeFitConfig(estimator="mean_posterior"))


def test_cold_start_is_the_prior_and_bad_inputs_raise():
    prior = torch.randn(3, 4)
    torch.testing.assert_close(user_code_probs(torch.zeros(4), prior), torch.softmax(prior, -1))
    with pytest.raises(ValueError, match="estimator='em'"):
        CodeFitConfig(estimator="em")
    with pytest.raises(ValueError, match="user_index values"):
        fit_code_users(prior, prior, prior, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"\(N=3, K=4\)"):
        fit_code_users(prior, prior[:, :3], prior, torch.zeros(3, dtype=torch.long), 1)


# ------------------------------------------------------------------------------------------------ worker path
class WordTokenizer:
    pad_token_id = eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + sum(map(ord, w)) % (V - 1) for w in text.split()]


def _pairs(user_id: str, n: int, good_first: bool = True) -> list[dict]:
    rows = []
    for k in range(n):
        good, bad = f"a good great fine answer {k % 3}", f"a bad awful poor answer {k % 3}"
        rows.append({"user_id": user_id, "prompt": PROMPTS[k % len(PROMPTS)], "chosen": good if good_first else bad,
                     "rejected": bad if good_first else good, "weight": 1.0})
    return rows


def _table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("weight", pa.float32())])
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A discrete tiny CLaP (non-zero code head, so posteriors depend on the text) and its latent cache."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0))
    clap = CLaP(base, CLaPConfig(latent_dim=4, n_query=2, n_prefix=2, latent_type="discrete", n_codes=5)).eval()
    with torch.no_grad():
        clap.encoder.h2k.weight.normal_(0, 1.0)
        clap.pair_posterior.net[2].weight.normal_(0, 0.5)
    store = Store(str(tmp_path_factory.mktemp("store")))
    save_clap(clap, store.url("models", "clap", "v1"))
    store.write_json({"version": "v1"}, "models", "clap", "current.json")   # as pretrain does
    rows = _pairs("a", 6) + _pairs("b", 6, good_first=False)
    pr = [(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    cache = build_latent_cache(clap, WordTokenizer(), PROMPTS, pr, prompt_tokens=8, response_tokens=8, pairs=triples)
    store.write_bytes(cache.to_bytes(), "cache", "v1", "latents-test.safetensors")
    return store, clap


def _job(store: Store, pairs: pa.Table, user_ids, *, estimator: str = "dpo", mode: str = "head-only") -> ChunkJob:
    return ChunkJob(store_root=store.root, clap_version="v1", cache_path=("cache", "v1", "latents-test.safetensors"),
                    user_ids=tuple(user_ids), pairs_ipc=table_to_ipc(pairs), fit={"steps": 20, "lr": 0.05},
                    mode=mode, min_pairs=4, clap_path=("models", "clap", "v1"), discrete_estimator=estimator)


def test_code_cache_round_trips(world):
    store, _ = world
    cache = LatentCache.from_bytes(store.read_bytes("cache", "v1", "latents-test.safetensors"))
    assert cache.discrete and cache.code_logits.shape[1] == 5 and cache.prior_logits.shape == (len(PROMPTS), 5)
    assert len(cache.pair_index) == cache.pair_logits.shape[0] == 12   # 6 prompts x 2 orders, all distinct
    assert cache.mu.shape == (cache.code_logits.shape[0], 4)


@pytest.mark.parametrize("estimator", ["dpo", "mean_posterior"])
def test_fit_chunk_stores_k_numbers_and_a_code_mixture(world, estimator):
    store, clap = world
    pairs = _table(_pairs("c1", 6) + _pairs("c2", 6, good_first=False) + _pairs("c3", 2))
    records = {r["user_id"]: r for r in fit_chunk(_job(store, pairs, ["c1", "c2", "c3", "c4"], estimator=estimator))}
    assert {u: r["status"] for u, r in records.items()} == {"c1": "fitted", "c2": "fitted", "c3": "cold_start",
                                                            "c4": "cold_start"}
    ids, mask = tokenize_prompts(WordTokenizer(), PROMPTS[:3], 8)
    for u in records:
        manifest = current_fit(store, u, clap_version="v1")
        assert manifest["mode"] == "codes" and manifest["artifact"] == CODES_FILE
        assert manifest["estimator"] == estimator and f"-codes-{estimator}-" in manifest["version"]
        assert len(manifest["code_mixture"]) == 5 and sum(manifest["code_mixture"]) == pytest.approx(1.0, abs=1e-5)
        policy = load_user_policy(store, u, clap_version="v1")
        assert policy.tensors["delta"].shape == (5,)                      # the artifact: K numbers
        z, logvar = policy.latent(clap.encoder, ids, mask)
        assert z.shape == (3, 4) and (logvar == 0).all()
    # opposite preferences move the two users apart; cold start = exactly the population prior
    assert not torch.allclose(load_user_policy(store, "c1", clap_version="v1").tensors["delta"],
                              load_user_policy(store, "c2", clap_version="v1").tensors["delta"])
    cold = load_user_policy(store, "c3", clap_version="v1")
    assert cold.cold_start and (cold.tensors["delta"] == 0).all()
    torch.testing.assert_close(cold.latent(clap.encoder, ids, mask)[0], clap.prior_latent(ids, mask))
    again = fit_chunk(_job(store, pairs, ["c1", "c2", "c3", "c4"], estimator=estimator))
    assert [r["status"] for r in again] == ["unchanged"] * 4


def test_encoder_modes_are_refused_for_codes(world):
    store, _ = world
    with pytest.raises(ValueError, match="mode='trunk-frozen' is not supported with a discrete-code CLaP"):
        fit_chunk(_job(store, _table(_pairs("d1", 5)), ["d1"], mode="trunk-frozen"))


def test_serving_batches_code_users_and_falls_back_to_the_prior(world):
    """PersonalizedGenerator on a discrete CLaP: fitted users get p_u(.|x) @ codebook in one encoder pass; cold-start
    and unknown users get the population prior's expected code (prompt-dependent, not 0) with a notice."""
    from latentpref.tasks.evaluate.serving import PersonalizedGenerator

    store, clap = world
    pairs = _table(_pairs("s1", 6))
    fit_chunk(_job(store, pairs, ["s1", "s2"]))
    gen = PersonalizedGenerator(clap, WordTokenizer(), store, clap_version="v1", prompt_tokens=8)
    prompts = PROMPTS[:3]
    z, notices = gen.latents(["s1", "s2", "nobody"], prompts)
    ids, mask = tokenize_prompts(WordTokenizer(), prompts, 8)
    want_s1, _ = load_user_policy(store, "s1", clap_version="v1").latent(clap.encoder, ids[:1], mask[:1])
    torch.testing.assert_close(z[:1], want_s1)
    torch.testing.assert_close(z[1:], clap.prior_latent(ids[1:], mask[1:]))
    assert notices[0] is None and "cold start" in notices[1] and "no fitted" in notices[2]
