"""The CLaP training step (`ClapObjective`, spec latent-dpo.md §3.5) on tiny GPT-2 and tiny Llama bases.

Which parameters train in each stage (§2.6), the P prompts x B responses layout (§9.1: DG-KLD and the contrastive
negatives are per prompt), the stage-1 G-skip (§3.4), the stage-2 contrastive term (§3.3), and that a few
optimisation steps on a fixed batch lower the loss.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from latentpref.tasks import objectives
from latentpref.tasks.models import latent
from latentpref.tasks.models.clap import CLaP, CLaPConfig
from latentpref.tasks.models.registry import load_base_model
from latentpref.tasks.train.loop import ClapBatch, ClapObjective, make_clap_batch, set_stage

ARCHS = ["tiny-gpt2", "tiny-llama"]
PROMPTS = ["The movie was", "A long and winding road of a film that"]          # 3 and 9 tokens: left pads
RESPONSES = [[" great", " fun and sad", " bad acting all along the way"],      # 1, 3 and 6 tokens: right pads
             [" never ends", " was a bore", " I loved it"]]
P, B = 2, 3


@functools.cache
def _base(spec: str):
    return load_base_model(spec, seed=0)  # (model, tokenizer), built once per module


def _clap(spec: str, seed: int = 0) -> CLaP:
    base = copy.deepcopy(_base(spec)[0])
    torch.manual_seed(seed)
    model = CLaP(base, CLaPConfig(latent_dim=8, n_query=2), base_spec=spec).train()
    with torch.no_grad():  # a non-trivial posterior head (CLaP starts standardized, §2.2): posteriors differ per row
        model.encoder.h2z.weight.normal_(0, 0.5)
        model.encoder.h2z.bias.normal_(0, 0.1)
    return model


def _batch(spec: str) -> ClapBatch:
    return make_clap_batch(_base(spec)[1], PROMPTS, RESPONSES, max_prompt_tokens=16, max_response_tokens=8)


def _grad_norm(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def _has_no_grad(module: torch.nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def test_batch_layout_is_prompt_major():
    batch = _batch("tiny-gpt2")
    assert (batch.n_prompts, batch.n_responses) == (P, B)
    assert batch.prompt_ids.shape[0] == batch.response_ids.shape[0] == P * B
    # rows p*B .. p*B+B-1 share prompt p; prompts are left-padded, responses right-padded
    for p in range(P):
        rows = batch.prompt_ids[p * B:(p + 1) * B]
        assert bool((rows == rows[0]).all())
    assert not torch.equal(batch.prompt_ids[0], batch.prompt_ids[B])
    assert batch.prompt_mask[0].tolist()[:1] == [0] and batch.prompt_mask[:, -1].bool().all()
    assert batch.response_mask[0].tolist() == [1] + [0] * (batch.response_mask.shape[1] - 1)
    with pytest.raises(ValueError, match="same number of responses"):
        make_clap_batch(_base("tiny-gpt2")[1], PROMPTS, [["a", "b"], ["c"]], max_prompt_tokens=8,
                        max_response_tokens=8)


@pytest.mark.parametrize("spec", ARCHS)
def test_stage1_trains_encoder_adapter_and_skip_but_not_the_base(spec):
    model, batch = _clap(spec), _batch(spec)
    set_stage(model, 1)
    loss, metrics = ClapObjective(model, kl_samples=4)(batch, 1, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["contrastive"]) == 0.0 and float(metrics["contrastive_acc"]) == 0.0
    assert float(metrics["tokens"]) == float(batch.response_mask.sum())
    # frozen (spec §2.6): the base LM and the adapter's K/V copies
    assert _has_no_grad(model.base_lm)
    assert all(_has_no_grad(m) for m in model.adapter.attention_copies())
    # trained: posterior encoder (incl. its own embedding copy), adapter MLPs + LNs, skip MLP
    for module in (model.encoder.h2z, model.encoder.blocks, model.encoder.wte, model.encoder.queries,
                   model.adapter.z2h, model.skip):
        params = [module] if isinstance(module, torch.nn.Parameter) else list(module.parameters())
        assert _grad_norm(params) > 0, module
    assert all(p.grad is not None for p in model.adapter.ln.parameters())


def test_stage1_skip_adds_a_gradient_path_to_the_encoder():
    """G-skip (§3.4): same loss value, but the encoder's gradient changes with the skip MLP on."""
    grads, losses = [], []
    for skip in (True, False):
        torch.manual_seed(0)
        model = CLaP(copy.deepcopy(_base("tiny-gpt2")[0]), CLaPConfig(latent_dim=8, n_query=2, skip_connection=skip))
        torch.manual_seed(1)  # the skip MLP's init consumed the global RNG: same head either way
        with torch.no_grad():
            model.encoder.h2z.weight.normal_(0, 0.5)
        set_stage(model, 1)
        loss, metrics = ClapObjective(model, kl_samples=4, kl_weight=0.0)(
            _batch("tiny-gpt2"), 1, torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.encoder.h2z.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])  # value exactly the plain LM loss
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("spec", ARCHS)
def test_stage2_adds_contrastive_and_trains_the_base(spec):
    model, batch = _clap(spec), _batch(spec)
    set_stage(model, 2)
    objective = ClapObjective(model, kl_samples=4)
    loss, metrics = objective(batch, 2, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(math.isfinite(float(v)) for v in metrics.values())
    # InfoNCE over B latents: >= 0, and (a softmax over B candidates) its chance level is log B
    assert float(metrics["contrastive"]) > 0
    assert 0.0 <= float(metrics["contrastive_acc"]) <= 1.0
    assert _grad_norm(model.base_lm.parameters()) > 0
    assert all(_grad_norm(m.parameters()) > 0 for m in model.adapter.attention_copies())
    assert _grad_norm(model.encoder.parameters()) > 0 and _grad_norm(model.adapter.z2h.parameters()) > 0
    assert _has_no_grad(model.skip)  # the skip is a stage-1 device only (§3.4, reference arg default 0)
    # the same draws without the contrastive weight: the loss differs by exactly the contrastive term
    model.zero_grad(set_to_none=True)
    objective.contrastive_weight = 0.0
    loss0, metrics0 = objective(batch, 2, torch.Generator().manual_seed(0))
    # a difference of two losses of O(100) nats: float32 cancellation leaves ~1e-5 absolute error
    torch.testing.assert_close(loss.detach() - loss0.detach(), metrics["contrastive"], rtol=1e-4, atol=1e-4)
    assert float(metrics0["contrastive"]) == 0.0


@pytest.mark.parametrize("spec", ARCHS)
def test_kl_and_contrastive_match_by_hand_per_prompt(spec):
    """DG-KLD of the step == objectives.dg_kld grouped (P, B); the contrastive negatives are the other responses
    of the same prompt (latents rolled within each prompt, §3.3), never another prompt's."""
    model, batch = _clap(spec), _batch(spec)
    model.eval()
    objective = ClapObjective(model, kl_samples=5)
    with torch.no_grad():
        _, metrics = objective(batch, 2, torch.Generator().manual_seed(3))
        args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        mu, logvar = model.encode(*args)
        g = torch.Generator().manual_seed(3)  # same draws, same order: DG-KLD noise, then the prefix latent
        kl = objectives.dg_kld(mu, logvar, n_samples=5, group=(P, B), generator=g)
        z = latent.sample(mu, logvar, 1, generator=g)[0].view(P, B, -1)
        nll = torch.empty(P, B, B)  # nll[p, k, b] = -log p(y_pb | x_p, z_p,(b-k) mod B)
        for k in range(B):
            zk = torch.stack([z[p, [(b - k) % B for b in range(B)]] for p in range(P)]).view(P * B, -1)
            nll[:, k] = -model.response_logps(zk, *args).view(P, B)
        pooled = objectives.dg_kld(mu, logvar, n_samples=5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(metrics["kl"], kl)
    torch.testing.assert_close(metrics["contrastive"], objectives.contrastive_loss(nll), rtol=1e-5, atol=1e-5)
    # the grouping matters: one q_agg over all P*B responses is a different number
    assert abs(float(pooled) - float(kl)) > 1e-4


def test_layout_and_stage_errors():
    model, batch = _clap("tiny-gpt2"), _batch("tiny-gpt2")
    objective = ClapObjective(model, kl_samples=2)
    bad = ClapBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, 3, B)
    with pytest.raises(ValueError, match="P=3 x B=3"):
        objective(bad, 1)
    with pytest.raises(ValueError, match="stage"):
        objective(batch, 3)
    with pytest.raises(ValueError, match="stage"):
        set_stage(model, 0)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(stage):
    """From the real init (standardized posterior), AdamW on one batch with the same draws every step: the loss
    and the per-token NLL go down (stage 1 only through the latent prefix, the base being frozen)."""
    torch.manual_seed(0)
    model, batch = CLaP(copy.deepcopy(_base("tiny-gpt2")[0]), CLaPConfig(latent_dim=8, n_query=2)), _batch("tiny-gpt2")
    set_stage(model, stage)
    objective = ClapObjective(model, kl_samples=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses, nlls = [], []
    for _ in range(6):
        loss, metrics = objective(batch, stage, torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        nlls.append(float(metrics["nll_per_token"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert nlls[-1] < nlls[0] - 0.1, nlls


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_shared_prompt_cache_contrastive_equals_full_passes(spec):
    """The stage-2 swap matrix from one prompt pass + B response passes equals B full passes with rolled latents
    (spec §3.3), in value and in gradient; padded prompts and responses included."""
    from latentpref.tasks.models.clap import CLaP, CLaPConfig
    from latentpref.tasks.models.registry import load_base_model
    base, _ = load_base_model(spec)
    clap = CLaP(base, CLaPConfig(prefix_init="anchor")).eval()
    g = torch.Generator().manual_seed(0)
    P, B = 2, 3
    prompt_ids = torch.randint(5, 500, (P, 7), generator=g).repeat_interleave(B, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[B:, :2] = 0                                   # the second prompt is left-padded
    response_ids = torch.randint(5, 500, (P * B, 5), generator=g)
    response_mask = torch.ones_like(response_ids)
    response_mask[1, 3:] = 0                                  # a right-padded response
    z = torch.randn(P * B, 32, generator=g, requires_grad=True)
    fast = clap.shifted_response_logps(z, prompt_ids, prompt_mask, response_ids, response_mask, B)
    (grad_fast,) = torch.autograd.grad(fast.sum(), z)
    rows = []
    for k in range(B):
        z_k = torch.roll(z.view(P, B, -1), shifts=k, dims=1).reshape(P * B, -1)
        rows.append(clap.response_logps(z_k, prompt_ids, prompt_mask, response_ids, response_mask).view(P, B))
    full = torch.stack(rows, dim=1)
    (grad_full,) = torch.autograd.grad(full.sum(), z)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_fast, grad_full, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ population preference term
def _pairs(spec: str, users: list[int]) -> "PairBatch":
    """User 0 prefers the praising response, user 1 the panning one, on the same prompts."""
    from latentpref.tasks.train.loop import PreferencePair, make_pair_batch
    good, bad = " a great and lovely film", " an awful boring mess"
    rows = [PreferencePair(p, good if u == 0 else bad, bad if u == 0 else good, u, 1.0)
            for p in ["The movie was", "I thought the plot", "The actors"] for u in users]
    return make_pair_batch(_base(spec)[1], rows, max_prompt_tokens=8, max_response_tokens=8)


def test_preference_term_needs_directions_and_pairs():
    from latentpref.tasks.train.loop import UserDirections
    model = _clap("tiny-gpt2")
    with pytest.raises(ValueError, match="needs user_directions"):
        ClapObjective(model, preference_weight=1.0)
    objective = ClapObjective(model, kl_samples=4, user_directions=UserDirections(2, 8), preference_weight=1.0)
    with pytest.raises(ValueError, match="PairBatch with user_index"):
        objective(_batch("tiny-gpt2"), 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="user_index outside"):
        UserDirections(2, 8)(torch.tensor([0, 2]))


@pytest.mark.parametrize("spec", ARCHS)
def test_preference_term_trains_encoder_and_directions_not_the_base(spec):
    from latentpref.tasks.train.loop import UserDirections
    model, batch = _clap(spec), _batch(spec)
    set_stage(model, 1)
    directions = UserDirections(2, 8)
    objective = ClapObjective(model, kl_samples=4, user_directions=directions, preference_weight=1.0)
    loss, metrics = objective(batch, 1, torch.Generator().manual_seed(0), pairs=_pairs(spec, [0, 1]))
    loss.backward()
    assert {"preference", "preference_acc"} <= set(metrics)
    assert 0.0 <= float(metrics["preference_acc"]) <= 1.0
    assert directions.weight.grad is not None and float(directions.weight.grad.abs().sum()) > 0
    assert _grad_norm(model.encoder.parameters()) > 0
    assert _has_no_grad(model.base_lm)
    # without the term the loss is the spec's: same draws, the difference is exactly w_pref * preference
    plain, _ = ClapObjective(model, kl_samples=4)(batch, 1, torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(float(plain.detach()) + float(metrics["preference"]), rel=1e-5,
                                                 abs=1e-5)


def test_preference_term_separates_two_users_opposite_choices():
    """Two users with opposite tastes on the same pairs: with the term alone, the posterior means of the praising
    and the panning response move apart along each user's direction, so both users' pairs rank right by their means
    (the information latent DPO needs); at the start they do not."""
    from latentpref.tasks.train.loop import UserDirections
    torch.manual_seed(0)
    model = CLaP(copy.deepcopy(_base("tiny-gpt2")[0]), CLaPConfig(latent_dim=8, n_query=2))
    set_stage(model, 1)
    directions = UserDirections(2, 8, seed=1)
    pairs = _pairs("tiny-gpt2", [0, 1])

    def mean_accuracy() -> float:
        with torch.no_grad():
            mu_w, _ = model.encode(pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids, pairs.chosen_mask)
            mu_l, _ = model.encode(pairs.prompt_ids, pairs.prompt_mask, pairs.rejected_ids, pairs.rejected_mask)
            margin = (directions(pairs.user_index) * (mu_w - mu_l)).sum(-1)
        return float((margin > 0).float().mean()), float(margin.abs().mean())

    _, margin0 = mean_accuracy()
    opt = torch.optim.AdamW([*model.encoder.parameters(), *directions.parameters()], lr=1e-2, weight_decay=0.0)
    objective = ClapObjective(model, kl_samples=4, user_directions=directions, preference_weight=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        term, _ = objective._preference_term(pairs, g)
        opt.zero_grad(set_to_none=True)
        term.backward()
        opt.step()
    acc, margin = mean_accuracy()
    assert acc == 1.0 and margin > 1.0 and margin > 10 * margin0, (acc, margin, margin0)


def test_population_pairs_index_train_users_and_keep_weights():
    import pyarrow as pa

    from latentpref.tasks.train.loop import population_pairs
    table = pa.table({"user_id": ["ub", "ua", "ua", "uc"], "prompt": ["p1", "p2", "p3", "p4"],
                      "chosen": ["c1", "c2", "c3", "c4"], "rejected": ["r1", "r2", "r3", "r4"],
                      "weight": [0.0, None, 2.0, 1.0], "split": ["train", "train", "heldout", "heldout"]})
    train, heldout, n_users = population_pairs(table)
    assert n_users == 2                                    # uc has no train pair: not indexed, its pair dropped
    assert [(p.prompt, p.user_index, p.weight) for p in train] == [("p1", 1, 0.0), ("p2", 0, 1.0)]
    assert [(p.prompt, p.user_index, p.weight) for p in heldout] == [("p3", 0, 2.0)]
    bare, none_held, one = population_pairs(table.select(["prompt", "chosen", "rejected"]))
    assert len(bare) == 4 and not none_held and one == 1 and {p.user_index for p in bare} == {0}


def test_preference_only_rows_keep_the_space_and_zero_the_free_coordinates():
    torch.manual_seed(0)
    model = CLaP(copy.deepcopy(_base("tiny-gpt2")[0]), CLaPConfig(latent_dim=8, n_query=2, preference_dims=3,
                                                                          preference_layer=1))
    with pytest.raises(ValueError, match="preference space"):
        ClapObjective(CLaP(copy.deepcopy(_base("tiny-gpt2")[0]), CLaPConfig(latent_dim=8, n_query=2)),
                      preference_only_share=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ClapObjective(model, preference_only_share=1.5)
    z = torch.randn(400, 8)
    skip = torch.randn(400, 5, 8)
    out, out_skip = ClapObjective(model, preference_only_share=0.25)._preference_only_rows(
        z, skip, torch.Generator().manual_seed(3))
    assert torch.equal(out[:, :3], z[:, :3])                                   # the space's coordinates untouched
    dropped = (out[:, 3:] == 0).all(1)
    assert torch.equal(out[~dropped], z[~dropped])                             # other rows whole
    assert 0.15 < float(dropped.float().mean()) < 0.35                         # about the share
    assert (out_skip[dropped][..., 3:] == 0).all() and torch.equal(out_skip[~dropped], skip[~dropped])
    assert torch.equal(out_skip[..., :3], skip[..., :3])
    every, _ = ClapObjective(model, preference_only_share=1.0)._preference_only_rows(z, None, None)
    assert (every[:, 3:] == 0).all()
    # through a whole stage-1 step: a finite loss, and the encoder's free coordinates still get a gradient from the
    # rows that keep them (and the KL)
    batch = _batch("tiny-gpt2")
    loss, _ = ClapObjective(model, kl_samples=4, preference_only_share=0.5)(batch, 1, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and _grad_norm(model.encoder.parameters()) > 0
