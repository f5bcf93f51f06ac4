"""Unit tests for tasks/objectives.py (values worked by hand in the docstrings, torchtune test_dpo_loss style)."""

import itertools
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from latentpref.tasks.objectives import (
    _antisymmetric_quantile,
    _evidence_pair_terms,
    categorical_latent_dpo_loss,
    contrastive_loss,
    dg_kld,
    latent_dpo_loss,
    latent_dpo_pair_terms,
    population_preference_loss,
    preference_loss,
    sequence_dpo_loss,
)

LN2 = math.log(2.0)


class TestPreferenceLoss:
    def test_dpo(self):
        """margin = 1 - 0 = 1, beta = 0.5: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770."""
        out = preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), loss_type="dpo", beta=0.5)
        torch.testing.assert_close(out, torch.tensor([0.4740770]))

    def test_ipo(self):
        """(margin - 1/(2 beta))^2: margin 1, beta 0.5 -> (1 - 1)^2 = 0; beta 0.25 -> (1 - 2)^2 = 1."""
        c, r = torch.tensor([1.0]), torch.tensor([0.0])
        torch.testing.assert_close(preference_loss(c, r, loss_type="ipo", beta=0.5), torch.tensor([0.0]))
        torch.testing.assert_close(preference_loss(c, r, loss_type="ipo", beta=0.25), torch.tensor([1.0]))

    def test_simpo(self):
        """-log sigmoid(beta * margin - gamma) = -log sigmoid(2 * 1 - 1) = log(1 + e^-1) = 0.3132617."""
        out = preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), loss_type="simpo", beta=2.0, gamma=1.0)
        torch.testing.assert_close(out, torch.tensor([0.3132617]))

    def test_bad_arguments(self):
        x = torch.zeros(1)
        with pytest.raises(ValueError, match="'kto'.*'dpo', 'ipo', 'simpo'"):
            preference_loss(x, x, loss_type="kto", beta=0.1)
        with pytest.raises(ValueError, match="beta=0"):
            preference_loss(x, x, loss_type="ipo", beta=0)


class TestSequenceDPOLoss:
    def test_dpo(self):
        """Chosen log-ratio -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5, margin 1, beta 0.1:
        loss = log(1 + e^-0.1) = 0.6443967; rewards = beta * ratios = (0.05, -0.05)."""
        out = sequence_dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                torch.tensor([-1.5]), loss_type="dpo", beta=0.1)
        torch.testing.assert_close(out.losses, torch.tensor([0.6443967]))
        torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.05]))
        torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.05]))

    def test_ipo(self):
        """Same log-ratios, margin 1, beta 0.25: (1 - 2)^2 = 1."""
        out = sequence_dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                torch.tensor([-1.5]), loss_type="ipo", beta=0.25)
        torch.testing.assert_close(out.losses, torch.tensor([1.0]))

    def test_simpo_length_normalised_reference_free(self):
        """Chosen -4 over 4 tokens = -1, rejected -6 over 2 tokens = -3, margin 2, beta 1, gamma 0.5:
        -log sigmoid(2 - 0.5) = log(1 + e^-1.5) = 0.2014133. References are ignored (None allowed)."""
        out = sequence_dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), None, None, loss_type="simpo",
                                beta=1.0, gamma=0.5, chosen_lengths=torch.tensor([4]),
                                rejected_lengths=torch.tensor([2]))
        torch.testing.assert_close(out.losses, torch.tensor([0.2014133]))
        torch.testing.assert_close(out.chosen_rewards, torch.tensor([-1.0]))

    def test_half_precision_inputs_give_fp32(self):
        x = torch.tensor([-1.0, -3.0], dtype=torch.bfloat16)
        out = sequence_dpo_loss(x, x - 1, x, x, loss_type="dpo", beta=0.1)
        assert out.losses.dtype == torch.float32

    def test_missing_inputs(self):
        x = torch.zeros(2)
        with pytest.raises(ValueError, match="ref_chosen_logps"):
            sequence_dpo_loss(x, x, None, None, loss_type="dpo", beta=0.1)
        with pytest.raises(ValueError, match="chosen_lengths"):
            sequence_dpo_loss(x, x, x, x, loss_type="simpo", beta=0.1)
        with pytest.raises(ValueError, match="lengths must be > 0"):
            sequence_dpo_loss(x, x, None, None, loss_type="simpo", beta=0.1, chosen_lengths=torch.tensor([1, 0]),
                              rejected_lengths=torch.tensor([1, 1]))


def _dg_kld_loops(mu, logvar, noise, marginal):
    """Brute force with explicit loops and torch.distributions, float64; mu (P, B, D), noise (P, B, S, D)."""
    P, B, S, D = noise.shape
    total = 0.0
    for p in range(P):
        acc = 0.0
        for b, s in itertools.product(range(B), range(S)):
            z = mu[p, b] + torch.exp(0.5 * logvar[p, b]) * noise[p, b, s]
            if marginal:
                for d in range(D):
                    dens = sum(Normal(mu[p, c, d], torch.exp(0.5 * logvar[p, c, d])).log_prob(z[d]).exp()
                               for c in range(B)) / B
                    acc += (torch.log(dens) - Normal(0.0, 1.0).log_prob(z[d])).item()
            else:
                dens = sum(Normal(mu[p, c], torch.exp(0.5 * logvar[p, c])).log_prob(z).sum().exp()
                           for c in range(B)) / B
                acc += (torch.log(dens) - Normal(0.0, 1.0).log_prob(z).sum()).item()
        total += acc / (B * S)
    return total / P


class TestDGKLD:
    @pytest.mark.parametrize("marginal", [True, False])
    def test_matches_loops(self, marginal):
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(2, 3, 2, dtype=torch.float64, generator=g)
        logvar = 0.5 * torch.randn(2, 3, 2, dtype=torch.float64, generator=g)
        noise = torch.randn(2, 3, 4, 2, dtype=torch.float64, generator=g)
        got = dg_kld(mu.reshape(6, 2), logvar.reshape(6, 2), n_samples=4, marginal=marginal, group=(2, 3),
                     noise=noise)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.item(), _dg_kld_loops(mu, logvar, noise, marginal), rtol=1e-9, atol=1e-9)

    def test_marginal_matches_quadrature(self):
        """Sum over dims of the 1-D KL(q_agg,d || N(0, 1)), by trapezoid quadrature on a fine grid."""
        mu = torch.tensor([[1.0, -0.5], [-1.5, 0.0], [0.3, 2.0]], dtype=torch.float64)
        logvar = torch.tensor([[-1.0, 0.0], [-2.0, 0.5], [0.0, -0.5]], dtype=torch.float64)
        grid = torch.linspace(-12, 12, 48_001, dtype=torch.float64)
        exact = 0.0
        for d in range(2):
            q = Normal(mu[:, d, None], torch.exp(0.5 * logvar[:, d, None])).log_prob(grid).exp().mean(0)
            exact += torch.trapezoid(q * (q.log() - Normal(0.0, 1.0).log_prob(grid)), grid).item()
        got = dg_kld(mu, logvar, n_samples=20_000, generator=torch.Generator().manual_seed(0))
        assert abs(got.item() - exact) < 0.02, (got.item(), exact)

    def test_joint_matches_mixture_monte_carlo(self):
        """Joint KL(q_agg || N(0, I)) vs an independent estimate from torch's MixtureSameFamily."""
        mu = torch.tensor([[1.0, -0.5], [-1.5, 0.0], [0.3, 2.0]], dtype=torch.float64)
        logvar = torch.tensor([[-1.0, 0.0], [-2.0, 0.5], [0.0, -0.5]], dtype=torch.float64)
        mix = MixtureSameFamily(Categorical(torch.ones(3, dtype=torch.float64)),
                                Independent(Normal(mu, torch.exp(0.5 * logvar)), 1))
        torch.manual_seed(0)
        z = mix.sample((200_000,))
        ref = (mix.log_prob(z) - Normal(0.0, 1.0).log_prob(z).sum(-1)).mean().item()
        got = dg_kld(mu, logvar, n_samples=20_000, marginal=False, generator=torch.Generator().manual_seed(1))
        assert abs(got.item() - ref) < 0.03, (got.item(), ref)

    def test_zero_when_every_posterior_is_the_prior(self):
        """All q_b = N(0, I) -> q_agg = N(0, I): every log-ratio is logsumexp of B equal terms - log B = 0."""
        out = dg_kld(torch.zeros(8, 4), torch.zeros(8, 4), n_samples=5, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, torch.tensor(0.0), atol=1e-6, rtol=0)

    def test_grouping_is_per_prompt(self):
        """group=(P, B) is the mean over prompts of each prompt's own DG-KLD (q_agg never mixes prompts)."""
        g = torch.Generator().manual_seed(0)
        mu, logvar = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
        noise = torch.randn(2, 3, 5, 3, generator=g)
        both = dg_kld(mu, logvar, n_samples=5, group=(2, 3), noise=noise)
        each = [dg_kld(mu[3 * p:3 * p + 3], logvar[3 * p:3 * p + 3], n_samples=5, noise=noise[p:p + 1])
                for p in range(2)]
        torch.testing.assert_close(both, (each[0] + each[1]) / 2)
        pooled = dg_kld(mu, logvar, n_samples=5, noise=noise.reshape(1, 6, 5, 3))
        assert not torch.allclose(both, pooled)
        torch.testing.assert_close(dg_kld(mu.reshape(2, 3, 3), logvar.reshape(2, 3, 3), n_samples=5, noise=noise),
                                   both)

    def test_gradients_reach_mu_and_logvar(self):
        mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
        dg_kld(mu, logvar, generator=torch.Generator().manual_seed(0)).backward()
        assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0

    def test_bad_group(self):
        with pytest.raises(ValueError, match=r"group=\(2, 4\)"):
            dg_kld(torch.zeros(6, 2), torch.zeros(6, 2), group=(2, 4))


class TestContrastiveLoss:
    def test_hand_value(self):
        """nll = [[1, 1], [3, 2]] (row 0 = own latent). b = 0: 1 + log(e^-1 + e^-3) = log(1 + e^-2) = 0.1269280;
        b = 1: 1 + log(e^-1 + e^-2) = log(1 + e^-1) = 0.3132617; mean 0.2200948."""
        torch.testing.assert_close(contrastive_loss(torch.tensor([[1.0, 1.0], [3.0, 2.0]])), torch.tensor(0.2200948))

    def test_minimal_when_own_latent_is_best(self):
        """score[j, b] = NLL of y_b under z_j, lowest on the diagonal. Over every assignment of latents to
        responses (a permutation pi), the loss is smallest when each response keeps its own latent."""
        B = 4
        g = torch.Generator().manual_seed(0)
        score = 3.0 + torch.rand(B, B, generator=g)
        score.fill_diagonal_(1.0)

        def loss_for(pi):
            idx = torch.tensor([[pi[(b - k) % B] for b in range(B)] for k in range(B)])
            return contrastive_loss(score.gather(0, idx)).item()   # nll[k, b] = score[pi((b - k) mod B), b]

        own = loss_for(list(range(B)))
        others = [loss_for(list(p)) for p in itertools.permutations(range(B)) if list(p) != list(range(B))]
        assert own < min(others)
        sharper = score.clone().fill_diagonal_(0.0)
        assert contrastive_loss(sharper.gather(0, torch.tensor(
            [[(b - k) % B for b in range(B)] for k in range(B)]))).item() < own

    def test_batched_is_mean_over_prompts(self):
        x = torch.rand(3, 5, 5)
        torch.testing.assert_close(contrastive_loss(x), torch.stack([contrastive_loss(m) for m in x]).mean())
        assert contrastive_loss(x.half()).dtype == torch.float32

    def test_bad_shape(self):
        with pytest.raises(ValueError, match=r"\(5,\)"):
            contrastive_loss(torch.zeros(5))


def _latent_dpo_reference(pm, pl, cm, cl, rm, rl, noise, rho, beta):
    """Naive full-matrix Latent DPO (spec §3.6) with torch.quantile over the off-diagonal entries and the
    extra C > 0 condition; everything float64."""
    N, _, S, D = noise.shape
    num, den = 0.0, 0.0
    for n in range(N):
        z = torch.cat([noise[n, 0], cm[n] + torch.exp(0.5 * cl[n]) * noise[n, 1],
                       rm[n] + torch.exp(0.5 * rl[n]) * noise[n, 2]])
        lw = Normal(cm[n], torch.exp(0.5 * cl[n])).log_prob(z).sum(-1)
        ll = Normal(rm[n], torch.exp(0.5 * rl[n])).log_prob(z).sum(-1)
        r = torch.softmax(torch.stack([lw, ll], -1), -1)[:, 0]
        R = Normal(pm[n], torch.exp(0.5 * pl[n])).log_prob(z).sum(-1) - Normal(0.0, 1.0).log_prob(z).sum(-1)
        C = r[:, None] - r[None, :]
        off = ~torch.eye(3 * S, dtype=torch.bool)
        tau = torch.quantile(C[off], 1 - rho / 2)
        M = off & (C >= tau) & (C > 0)
        loss = -torch.nn.functional.logsigmoid(beta * (R[:, None] - R[None, :]))
        num += (loss * M).sum()
        den += M.sum()
    return num / den


@pytest.mark.parametrize("K", [2, 3, 7, 48])
def test_antisymmetric_quantile_matches_torch_quantile(K):
    """tau from the upper triangle alone equals torch.quantile over all K (K - 1) off-diagonal entries,
    including heavy ties (r saturated at 1) and every q used by rho in (0, 1]."""
    g = torch.Generator().manual_seed(K)
    r = torch.rand(6, K, generator=g, dtype=torch.float64)
    r[:2] = (3 * r[:2]).round() / 3
    r[2:4, : K // 2] = 1.0
    off = ~torch.eye(K, dtype=torch.bool)
    iu, ju = torch.triu_indices(K, K, offset=1)
    for q in (0.5, 0.5001, 0.6, 0.75, 0.9, 0.999):
        expected = torch.quantile((r[:, :, None] - r[:, None, :])[:, off], q, dim=-1)
        torch.testing.assert_close(_antisymmetric_quantile((r[:, iu] - r[:, ju]).abs(), q), expected)


class TestLatentDPOLoss:
    def _inputs(self, N=5, D=3, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        pm = (0.5 * torch.randn(N, D, generator=g, dtype=dtype)).requires_grad_()
        pl = (0.3 * torch.randn(N, D, generator=g, dtype=dtype)).requires_grad_()
        cm = (torch.randn(N, D, generator=g, dtype=dtype) + 1).requires_grad_()
        cl = (0.3 * torch.randn(N, D, generator=g, dtype=dtype) - 0.5).requires_grad_()
        rm = (torch.randn(N, D, generator=g, dtype=dtype) - 1).requires_grad_()
        rl = (0.3 * torch.randn(N, D, generator=g, dtype=dtype) - 0.5).requires_grad_()
        return pm, pl, cm, cl, rm, rl

    @pytest.mark.parametrize("rho", [0.5, 1.0, 0.2])
    def test_matches_naive_reference(self, rho):
        args = self._inputs(dtype=torch.float64)
        noise = torch.randn(5, 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        got, _ = latent_dpo_loss(*args, n_samples=4, evidence_ratio=rho, beta=0.7, noise=noise)
        expected = _latent_dpo_reference(*[a.detach() for a in args], noise, rho, 0.7)
        torch.testing.assert_close(got, expected)

    def test_standardized_policy_gives_ln2(self):
        """pi_theta = pi_ref = N(0, I) -> every R_theta = 0 exactly, every kept loss = ln 2, no correct pairs."""
        _, _, cm, cl, rm, rl = self._inputs()
        zeros = torch.zeros_like(cm)
        loss, m = latent_dpo_loss(zeros, zeros, cm, cl, rm, rl, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loss, torch.tensor(LN2))
        assert m["accuracy"].item() == 0.0 and m["mean_margin"].item() == 0.0
        assert 0.0 < m["kept_fraction"].item() <= 0.5

    def test_gradient_only_reaches_policy(self):
        pm, pl, cm, cl, rm, rl = self._inputs()
        loss, _ = latent_dpo_loss(pm, pl, cm, cl, rm, rl, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(loss, [pm, pl, cm, cl, rm, rl], allow_unused=True)
        assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
        assert all(g is None for g in grads[2:]), "posteriors are frozen: no gradient may reach them"

    def test_gradient_points_to_chosen(self):
        """Chosen posteriors at +2, rejected at -2 in dim 0 (dim 1 identical): descending the loss moves
        the policy mean toward +2 in dim 0 (negative gradient)."""
        N = 8
        pm, pl = torch.zeros(N, 2, requires_grad=True), torch.zeros(N, 2, requires_grad=True)
        cm = torch.tensor([[2.0, 0.0]]).repeat(N, 1)
        rm = torch.tensor([[-2.0, 0.0]]).repeat(N, 1)
        lv = torch.full((N, 2), -1.0)
        loss, _ = latent_dpo_loss(pm, pl, cm, lv, rm, lv, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert (pm.grad[:, 0] < 0).all()

    def test_quantile_mask_hand_built(self):
        """K = 4 samples with r = (1, .75, .5, 0), R = (1, 0, 0, -1), beta = 1.
        Off-diagonal C sorted: -1, -.75, -.5, -.5, -.25, -.25, .25, .25, .5, .5, .75, 1; rho = .5 -> q = .75,
        position .75 * 11 = 8.25 -> tau = .5. Kept (winner, loser): (0,2) m=1, (0,3) m=2, (1,3) m=1, (2,3) m=1.
        Loss = (3 log(1 + e^-1) + log(1 + e^-2)) / 4 = 0.2666783; accuracy 1; mean margin 1.25; 4 of 12 kept."""
        R = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
        r = torch.tensor([[1.0, 0.75, 0.5, 0.0]])
        t = _evidence_pair_terms(R, r, evidence_ratio=0.5, beta=1.0, loss_type="dpo", gamma=0.0)
        assert t.n_kept.item() == 4 and t.n_entries == 12
        torch.testing.assert_close(t.loss_sum / t.n_kept, torch.tensor([0.2666783]))
        assert t.n_correct.item() == 4 and t.margin_sum.item() == 5.0

    def test_ties_never_count_as_wins(self):
        """r = (1, 1, 1, 0): C has 6 off-diagonal zeros. rho = 1 -> tau = median = 0, and the reference mask
        C >= 0 would keep 3 wins + 6 ties; ours keeps only the 3 strict wins (i, 3)."""
        R = torch.zeros(1, 4)
        r = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
        for rho in (1.0, 0.5):
            assert _evidence_pair_terms(R, r, evidence_ratio=rho, beta=1.0, loss_type="dpo",
                                        gamma=0.0).n_kept.item() == 3

    def test_identical_posteriors_keep_nothing(self):
        """q_w == q_l -> r = 1/2 everywhere -> no pair kept: loss 0, zero gradient, no NaN."""
        pm = torch.randn(3, 4, requires_grad=True)
        m0 = torch.randn(3, 4)
        loss, m = latent_dpo_loss(pm, torch.zeros(3, 4), m0, torch.zeros(3, 4), m0, torch.zeros(3, 4),
                                  generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.item() == 0.0 and m["kept_fraction"].item() == 0.0 and (pm.grad == 0).all()

    def test_global_normaliser_and_pair_weight(self):
        args = self._inputs()
        noise = torch.randn(5, 3, 16, 3, generator=torch.Generator().manual_seed(2))
        t = latent_dpo_pair_terms(*args, noise=noise)
        loss, _ = latent_dpo_loss(*args, noise=noise)
        torch.testing.assert_close(loss, t.loss_sum.sum() / t.n_kept.sum())
        # weight 0 drops a pair: equal to the loss of the others alone (same noise)
        w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
        keep = w.bool()
        wl, _ = latent_dpo_loss(*args, noise=noise, pair_weight=w)
        sub, _ = latent_dpo_loss(*[a[keep] for a in args], noise=noise[keep])
        torch.testing.assert_close(wl, sub)
        with pytest.raises(ValueError, match="pair_weight must be >= 0"):
            latent_dpo_loss(*args, noise=noise, pair_weight=-w)

    def test_noise_and_generator_paths_agree(self):
        args = self._inputs()
        a, _ = latent_dpo_loss(*args, n_samples=4, generator=torch.Generator().manual_seed(5))
        noise = torch.randn(5, 3, 4, 3, generator=torch.Generator().manual_seed(5))
        b, _ = latent_dpo_loss(*args, n_samples=4, noise=noise)
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_ipo_and_simpo_links(self):
        """At pi_theta = pi_ref every margin is 0: IPO gives (0 - 1/(2 * 0.1))^2 = 25; SimPO with gamma = 1
        gives -log sigmoid(-1) = 1.3132617."""
        _, _, cm, cl, rm, rl = self._inputs()
        z = torch.zeros_like(cm)
        g = torch.Generator().manual_seed(0)
        ipo, _ = latent_dpo_loss(z, z, cm, cl, rm, rl, loss_type="ipo", beta=0.1, generator=g)
        simpo, _ = latent_dpo_loss(z, z, cm, cl, rm, rl, loss_type="simpo", beta=0.1, gamma=1.0, generator=g)
        torch.testing.assert_close(ipo, torch.tensor(25.0))
        torch.testing.assert_close(simpo, torch.tensor(1.3132617))

    def test_fp16_sharp_posteriors_stay_finite(self):
        """Sharp fp16 posteriors (logvar -9) far apart: fp16 log-densities would overflow; fp32 stays finite."""
        N, D = 4, 32
        half = dict(dtype=torch.float16)
        pm = torch.zeros(N, D, requires_grad=True)
        loss, m = latent_dpo_loss(pm, torch.zeros(N, D), torch.full((N, D), 3.0, **half),
                                  torch.full((N, D), -9.0, **half), torch.full((N, D), -3.0, **half),
                                  torch.full((N, D), -9.0, **half), generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(pm.grad).all()
        assert m["kept_fraction"].item() > 0

    def test_bad_arguments(self):
        args = self._inputs()
        with pytest.raises(ValueError, match="evidence_ratio=0"):
            latent_dpo_loss(*args, evidence_ratio=0.0)
        with pytest.raises(ValueError, match="share one"):
            latent_dpo_loss(args[0], args[1], args[2][:2], args[3], args[4], args[5])


class TestCategoricalLatentDPO:
    def test_hand_value(self):
        """p_u = (.5, .25, .25), uniform ref -> R = log(3 p) = (log 1.5, log .75, log .75).
        q_w = (.8, .1, .1), q_l = (.1, .1, .8) -> r = (.889, .5, .111): all three gaps positive, rho = 1 keeps
        all: margins R0-R1 = R0-R2 = log 2, R1-R2 = 0; beta = 1:
        (2 log(1 + 1/2) + log 2) / 3 = 0.5013591."""
        p = torch.tensor([[0.5, 0.25, 0.25]]).log().requires_grad_()
        loss, m = categorical_latent_dpo_loss(p, torch.tensor([[0.8, 0.1, 0.1]]).log(),
                                              torch.tensor([[0.1, 0.1, 0.8]]).log(), beta=1.0)
        torch.testing.assert_close(loss, torch.tensor(0.5013591))
        torch.testing.assert_close(m["accuracy"], torch.tensor(2 / 3))
        loss.backward()
        assert p.grad[0, 0] < 0 < p.grad[0, 2]     # descent raises the chosen code, lowers the rejected one


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_preference_loss_grad_matches_preference_loss_and_autograd(loss_type):
    """The closed-form link (head-only fit) is `preference_loss` of the unscaled margin, and its derivative is
    autograd's: s = link_scale * margin, dl/ds checked in float64."""
    from latentpref.tasks.objectives import link_scale, preference_loss_grad
    beta, gamma = 0.3, 0.2
    margin = torch.linspace(-4.0, 4.0, 17, dtype=torch.float64)
    s = (link_scale(loss_type, beta) * margin).requires_grad_(True)
    loss, grad = preference_loss_grad(s, loss_type=loss_type, beta=beta, gamma=gamma)
    ref = preference_loss(margin, torch.zeros((), dtype=torch.float64), loss_type=loss_type, beta=beta, gamma=gamma)
    torch.testing.assert_close(loss, ref)
    (auto,) = torch.autograd.grad(loss.sum(), s)
    torch.testing.assert_close(grad, auto)


def test_evidence_mask_keeps_top_positive_gaps_and_never_ties():
    """r = [0, 0.5, 1, 1]: upper-triangle gaps (0,1) -0.5, (0,2) -1, (0,3) -1, (1,2) -0.5, (1,3) -0.5, (2,3) 0;
    rho = 1 keeps every non-zero gap, the tie (2,3) never counts."""
    from latentpref.tasks.objectives import evidence_mask
    c, keep = evidence_mask(torch.tensor([[0.0, 0.5, 1.0, 1.0]]), 1.0)
    torch.testing.assert_close(c, torch.tensor([[-0.5, -1.0, -1.0, -0.5, -0.5, 0.0]]))
    assert keep.tolist() == [[True, True, True, True, True, False]]


def test_population_preference_loss_known_values_weights_and_gradient():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z_w = torch.tensor([[2.0, 5.0], [0.0, 0.5]], requires_grad=True)
    z_l = torch.tensor([[0.0, -5.0], [0.0, 1.0]])
    loss, m = population_preference_loss(v, z_w, z_l)
    # rewards <v_u, z>: pair 0 margin 2 (the second coordinate is not user 0's), pair 1 margin 2 * (0.5 - 1) = -1
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(2.0)) - torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == pytest.approx(0.5)
    loss.backward()
    # raising the chosen reward lowers the loss: the gradient on z_w points against v_u
    assert float((z_w.grad * v.detach()).sum(-1).max()) < 0
    w_loss, w_m = population_preference_loss(v, z_w, z_l, pair_weight=torch.tensor([0.0, 1.0]))
    assert float(w_loss.detach()) == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.tensor(-1.0))), rel=1e-6)
    assert float(w_m["accuracy"]) == 0.0
    with pytest.raises(ValueError, match="one \\(N, D\\) shape"):
        population_preference_loss(v, z_w[:1], z_l)
    with pytest.raises(ValueError, match=">= 0"):
        population_preference_loss(v, z_w, z_l, pair_weight=torch.tensor([-1.0, 1.0]))
