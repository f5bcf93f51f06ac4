"""LPC discrete-latent math (tasks/models/lpc.py) and its losses (tasks/objectives.py): hand-computed values,
brute force, gradients, and the enumeration-vs-sampling identity of categorical latent DPO."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentpref.tasks.models import lpc
from latentpref.tasks.objectives import (
    _reduce_terms,
    categorical_latent_dpo_loss,
    categorical_latent_dpo_pair_terms,
    code_collapse_kl,
    lpc_kl,
    lpc_pair_loss,
)



# ------------------------------------------------------------------------------------------------ Gumbel-softmax
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_gradients_flow(hard):
    logits = torch.tensor([[0.2, -1.0, 0.5, 0.0]], requires_grad=True)
    w = lpc.gumbel_softmax(logits, 0.5, hard=hard, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.sum(-1), torch.ones(1))
    if hard:   # straight-through: exact one-hot values
        assert sorted(w.detach().flatten().tolist()) == [0.0, 0.0, 0.0, 1.0]
    (w * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gumbel_softmax_gradcheck_float64():
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    # a fresh generator per call: gradcheck evaluates the function many times on the same noise
    torch.autograd.gradcheck(lambda x: lpc.gumbel_softmax(x, 0.7, generator=torch.Generator().manual_seed(3)),
                             (logits,))


def test_gumbel_sample_mean_approaches_softmax():
    """Hard samples are exact categorical draws (Gumbel-max) at any tau; soft samples at tau -> 0 too."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    many = logits.expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(lpc.gumbel_softmax(many, 1.0, hard=True, generator=g).mean(0), p, atol=0.01, rtol=0)
    torch.testing.assert_close(lpc.gumbel_softmax(many, 0.05, generator=g).mean(0), p, atol=0.01, rtol=0)


def test_gumbel_softmax_rejects_bad_tau_and_keeps_fp32():
    with pytest.raises(ValueError, match="tau=0"):
        lpc.gumbel_softmax(torch.zeros(3), 0)
    assert lpc.gumbel_softmax(torch.zeros(2, 3, dtype=torch.bfloat16), 1.0).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ schedules
def test_temperature_and_mixing_schedule_endpoints():
    assert lpc.temperature(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lpc.temperature(99, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lpc.temperature(500, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lpc.temperature(33, 100, 1.0, 0.1) == pytest.approx(0.1 ** (33 / 99))   # exponential in between
    assert lpc.mixing_weight(0, 60) == 0.0 and lpc.mixing_weight(59, 60) == 1.0
    assert lpc.mixing_weight(30, 61) == pytest.approx(0.5)
    assert lpc.temperature(0, 1) == 1.0 and lpc.mixing_weight(0, 1) == 0.0   # one step: the start values
    with pytest.raises(ValueError, match="tau_end=0"):
        lpc.temperature(0, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="total=0"):
        lpc.mixing_weight(0, 0)


# ------------------------------------------------------------------------------------------------ KLs, usage
def test_categorical_kl_matches_brute_force():
    torch.manual_seed(0)
    q, p = torch.randn(4, 6), torch.randn(4, 6)
    want = []
    for row in range(4):
        qs, ps = torch.softmax(q[row], 0).tolist(), torch.softmax(p[row], 0).tolist()
        want.append(sum(a * math.log(a / b) for a, b in zip(qs, ps)))
    torch.testing.assert_close(lpc.categorical_kl(q, p), torch.tensor(want))
    torch.testing.assert_close(lpc.categorical_kl(q, q), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(lpc_kl(q, p), torch.tensor(want).mean())
    # hand value: q = (1/4, 3/4), p uniform -> 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120
    torch.testing.assert_close(lpc.categorical_kl(torch.tensor([0.0, math.log(3)]), torch.zeros(2)),
                               torch.tensor(0.1308120))


def test_categorical_kl_gradcheck_float64():
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lpc.categorical_kl, (q, p))


def test_aggregated_kl_and_perplexity_uniform_vs_collapsed():
    K = 8
    spread = torch.eye(K)                       # every code used exactly once: sharp posteriors, uniform usage
    collapsed = F.one_hot(torch.zeros(K, dtype=torch.long), K).float()
    torch.testing.assert_close(lpc.aggregated_kl_to_uniform(spread), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(lpc.aggregated_kl_to_uniform(collapsed), torch.tensor(math.log(K)))
    torch.testing.assert_close(lpc.code_usage_perplexity(spread), torch.tensor(float(K)))
    torch.testing.assert_close(lpc.code_usage_perplexity(collapsed), torch.tensor(1.0))
    torch.testing.assert_close(lpc.code_usage_perplexity(torch.tensor([5.0, 5.0, 0.0])), torch.tensor(2.0))  # counts
    # the objective wrapper works on logits: uniform logits -> uniform usage -> 0
    torch.testing.assert_close(code_collapse_kl(torch.zeros(3, K)), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_mean_pair_posterior_known_values():
    """q = e_0, e_1 with alpha = 1 over K = 3: (1 + 1, 1 + 1, 1 + 0) / (3 + 2) = (0.4, 0.4, 0.2)."""
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(lpc.mean_pair_posterior(q, 1.0), torch.tensor([0.4, 0.4, 0.2]))
    torch.testing.assert_close(lpc.mean_pair_posterior(q, 0.0), torch.tensor([0.5, 0.5, 0.0]))
    per_user = lpc.mean_pair_posterior(q, 1.0, user_index=torch.tensor([0, 2]), n_users=3)
    torch.testing.assert_close(per_user, torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.5, 0.25]]))
    with pytest.raises(ValueError, match="alpha=-1"):
        lpc.mean_pair_posterior(q, -1)


def test_pair_posterior_starts_uniform_and_is_order_sensitive():
    torch.manual_seed(0)
    net = lpc.PairPosterior(d=6, n_codes=4)
    a, b = torch.randn(2, 6), torch.randn(2, 6)
    torch.testing.assert_close(net(a, b), torch.zeros(2, 4))
    with torch.no_grad():
        net.net[2].weight.normal_()
    assert not torch.allclose(net(a, b), net(b, a))


# ------------------------------------------------------------------------------------------------ LPC pair loss
def test_lpc_pair_loss_dpo_hand_value():
    """log-ratios 0.5 and -0.5, beta 1: -log sigma(1) = 0.3132617; KL((1/4, 3/4) || uniform) = 0.1308120;
    lambda 0.05 -> 0.3132617 + 0.05 * 0.1308120 = 0.3198023."""
    loss, m = lpc_pair_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                            torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2), loss_type="dpo", beta=1.0,
                            kl_weight=0.05)
    torch.testing.assert_close(loss, torch.tensor(0.3198023))
    torch.testing.assert_close(m["preference"], torch.tensor(0.3132617))
    torch.testing.assert_close(m["kl"], torch.tensor(0.1308120))
    assert m["accuracy"] == 1.0


def test_lpc_pair_loss_ipo_hand_value():
    """margin (0.5) - (-0.5) = 1, beta 1: target 1/(2 beta) = 0.5 -> (1 - 0.5)^2 = 0.25; q = p -> no KL."""
    loss, _ = lpc_pair_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                            torch.zeros(1, 3), torch.zeros(1, 3), loss_type="ipo", beta=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.25))


def test_lpc_pair_loss_simpo_hand_value():
    """-4 / 2 tokens = -2 vs -9 / 3 = -3: margin 1, beta 2, gamma 0.5 -> -log sigma(1.5) = 0.2014133;
    no reference needed."""
    loss, _ = lpc_pair_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), None, None, torch.zeros(1, 3),
                            torch.zeros(1, 3), loss_type="simpo", beta=2.0, gamma=0.5,
                            chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([3.0]))
    torch.testing.assert_close(loss, torch.tensor(0.2014133))
    with pytest.raises(ValueError, match="kl_weight"):
        lpc_pair_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 2),
                      torch.zeros(1, 2), loss_type="dpo", beta=1.0, kl_weight=-1.0)


def test_lpc_pair_loss_gradient_reaches_policy_and_both_networks():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    q, p = torch.randn(1, 4, requires_grad=True), torch.randn(1, 4, requires_grad=True)
    loss, _ = lpc_pair_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), q, p, loss_type="dpo", beta=0.5)
    loss.backward()
    assert pc.grad[0] < 0 < pr.grad[0]                  # descent raises the chosen, lowers the rejected
    assert q.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ enumeration
def test_categorical_pair_terms_reduce_to_the_loss():
    torch.manual_seed(1)
    pol, c, r, ref = (torch.randn(5, 7) for _ in range(4))
    w = torch.rand(5)
    for rho in (1.0, 0.5):
        want, want_m = categorical_latent_dpo_loss(pol, c, r, ref_logits=ref, evidence_ratio=rho, pair_weight=w)
        got, got_m = _reduce_terms(categorical_latent_dpo_pair_terms(pol, c, r, ref_logits=ref, evidence_ratio=rho),
                                   w)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_m["accuracy"], want_m["accuracy"])


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_enumeration_equals_sampled_estimate_in_expectation(loss_type):
    """Exact enumeration over code pairs == the Monte-Carlo estimate that draws ordered code pairs (i, j) uniformly
    and keeps those with r_i > r_j (the same global normaliser: kept losses over kept count)."""
    torch.manual_seed(0)
    N, K, beta = 3, 6, 0.7
    pol, c, r_logits, ref = (torch.randn(N, K) for _ in range(4))
    exact, _ = categorical_latent_dpo_loss(pol, c, r_logits, ref_logits=ref, beta=beta, loss_type=loss_type,
                                           gamma=0.3)
    R = F.log_softmax(pol, -1) - F.log_softmax(ref, -1)                                  # (N, K)
    r = torch.sigmoid(F.log_softmax(c, -1) - F.log_softmax(r_logits, -1))
    g = torch.Generator().manual_seed(0)
    S = 400_000
    n = torch.randint(0, N, (S,), generator=g)
    i = torch.randint(0, K, (S,), generator=g)
    j = (i + torch.randint(1, K, (S,), generator=g)) % K                                 # j != i, uniform
    keep = (r[n, i] > r[n, j]).float()
    margin = R[n, i] - R[n, j]
    if loss_type == "dpo":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * margin - 0.3)
    sampled = (losses * keep).sum() / keep.sum()
    torch.testing.assert_close(sampled, exact, rtol=1e-2, atol=1e-3)
