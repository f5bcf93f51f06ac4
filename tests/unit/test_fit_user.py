"""Unit tests for tasks/train/fit_user.py (batched head-only Latent-DPO fitting)."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentpref.tasks.objectives import (
    _antisymmetric_quantile,
    _pairwise_differences,
    _sample_log_prob,
    latent_dpo_loss,
    latent_dpo_pair_terms,
)
from latentpref.tasks.models.latent import POLICY_LOGVAR_BOUND
from latentpref.tasks.train.fit_user import (
    FitConfig,
    _Adam,
    _fold_draw,
    _head_loss_grad,
    _link_scale,
    _step_noise,
    draw_pair_samples,
    fit_users,
    init_params,
    pair_loss_terms,
    predict_latent,
    reduce_per_user,
    user_latent,
)




Q, d, D = 2, 6, 4


def _user_pairs(n_pairs, sign, seed, dims=(0, 1)):
    """Pairs whose chosen posteriors sit at sign * 2 and rejected at -sign * 2 in `dims` (0 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_pairs, Q, d, generator=g)
    cm, rm = torch.zeros(n_pairs, D), torch.zeros(n_pairs, D)
    cm[:, list(dims)], rm[:, list(dims)] = 2.0 * sign, -2.0 * sign
    cm += 0.3 * torch.randn(n_pairs, D, generator=g)
    rm += 0.3 * torch.randn(n_pairs, D, generator=g)
    lv = torch.full((n_pairs, D), -1.0)
    return feats, cm, lv.clone(), rm, lv.clone()


def _stack(users):
    """Interleave the users' rows round-robin; each user's own row order (which keys its noise) is kept."""
    queues = [list(range(len(u[0]))) for u in users]
    rows = []
    while any(queues):
        rows += [(u, q.pop(0)) for u, q in enumerate(queues) if q]
    tensors = [torch.stack([users[u][t][r] for u, r in rows]) for t in range(5)]
    return tensors, torch.tensor([u for u, _ in rows])


class TestHead:
    def test_init_params(self):
        w, b = init_params(3, 4, 8, 32)
        assert w.shape == (3, 4, 8, 16) and b.shape == (3, 4, 16)
        assert (w == 0).all() and (b == 0).all()
        with pytest.raises(ValueError, match="latent_dim=30 must be divisible by n_query=4"):
            init_params(3, 4, 8, 30)

    def test_user_latent_groups_dims_per_query(self):
        """Q = 2, d = 1, D = 4 -> width 4 per query: query q gives means of dims 2q, 2q+1 (entries 0-1) and
        their log-variances (entries 2-3). With features 1 the output is weight + bias."""
        w = torch.arange(8.0).reshape(2, 1, 4)          # query 0: (0, 1, 2, 3), query 1: (4, 5, 6, 7)
        b = torch.full((2, 4), 0.5)
        mu, logvar = user_latent(w, b, torch.ones(3, 2, 1))
        torch.testing.assert_close(mu, torch.tensor([[0.5, 1.5, 4.5, 5.5]]).expand(3, 4))
        torch.testing.assert_close(logvar, torch.tensor([[2.5, 3.5, 6.5, 7.5]]).expand(3, 4))

    def test_stacked_and_zero_head(self):
        w, b = init_params(2, Q, d, D)
        f = torch.randn(5, Q, d)
        mu, logvar = user_latent(w, b, f)                # broadcast features over users
        assert mu.shape == (2, 5, D) and (mu == 0).all() and (logvar == 0).all()
        w = torch.randn_like(w)
        torch.testing.assert_close(predict_latent(w, b, f)[1], predict_latent(w[1], b[1], f))
        torch.testing.assert_close(predict_latent(w, b, f.expand(2, 5, Q, d))[0], predict_latent(w[0], b[0], f))


class TestFitUsers:
    def test_learns_clear_preference(self):
        """Chosen at +2, rejected at -2 in dims 0-1: the loss falls and the policy mean moves toward +2 there."""
        feats, cm, cl, rm, rl = _user_pairs(12, +1.0, seed=0)
        cfg = FitConfig(steps=60, lr=5e-2, n_samples=8)
        res = fit_users(feats, cm, cl, rm, rl, torch.zeros(12, dtype=torch.long), 1, cfg)
        assert res.loss_curve[0] == pytest.approx(math.log(2), abs=1e-6)   # standardized start: ln 2
        assert res.loss_curve[-1] < 0.5 * res.loss_curve[0]
        mu = predict_latent(res.weight[0], res.bias[0], feats)
        assert (mu[:, :2].mean(0) > 0.5).all(), mu.mean(0)
        assert res.final_accuracy[0] > 0.9 and res.n_pairs.tolist() == [12]
        assert res.seconds > 0 and len(res.loss_curve) == 60

    def test_batched_equals_separate(self):
        """Three users (different data and pair counts, rows interleaved, split into several chunks) fitted
        together give the same heads as three one-user fits."""
        users = [_user_pairs(5, +1.0, seed=1), _user_pairs(8, -1.0, seed=2, dims=(2,)),
                 _user_pairs(3, +1.0, seed=3, dims=(1, 3))]
        cfg = FitConfig(steps=15, lr=3e-2, n_samples=4, batch_pairs=10)
        (feats, cm, cl, rm, rl), user_index = _stack(users)
        assert user_index[:3].tolist() == [0, 1, 2]          # really interleaved
        both = fit_users(feats, cm, cl, rm, rl, user_index, 3, cfg)
        for u, data in enumerate(users):
            alone = fit_users(*data, torch.zeros(len(data[0]), dtype=torch.long), 1, cfg)
            torch.testing.assert_close(both.weight[u], alone.weight[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(both.bias[u], alone.bias[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(both.final_loss[u], alone.final_loss[0], atol=1e-5, rtol=1e-4)

    def test_users_without_pairs_stay_at_prior(self):
        feats, cm, cl, rm, rl = _user_pairs(6, +1.0, seed=4)
        user_index = torch.tensor([0, 2, 0, 2, 0, 2])
        cfg = FitConfig(steps=5, weight_decay=0.1)
        res = fit_users(feats, cm, cl, rm, rl, user_index, 4, cfg)
        for u in (1, 3):
            assert (res.weight[u] == 0).all() and (res.bias[u] == 0).all()
            assert math.isnan(res.final_loss[u]) and math.isnan(res.final_accuracy[u])
        assert res.n_pairs.tolist() == [3, 0, 3, 0] and res.weight[0].abs().sum() > 0
        # warm start: users without pairs keep the given head exactly, even with weight decay
        w0, b0 = torch.randn_like(res.weight), torch.randn_like(res.bias)
        warm = fit_users(feats, cm, cl, rm, rl, user_index, 4, cfg, init=(w0, b0))
        assert torch.equal(warm.weight[1], w0[1]) and torch.equal(warm.bias[3], b0[3])

    def test_loss_is_latent_dpo_of_the_users_pairs(self):
        """With steps=0, final_loss is exactly latent_dpo_loss on that user's pairs, warm head, step-0 noise."""
        feats, cm, cl, rm, rl = _user_pairs(5, +1.0, seed=5)
        w0, b0 = 0.1 * torch.randn(1, Q, d, 2 * D // Q), 0.1 * torch.randn(1, Q, 2 * D // Q)
        cfg = FitConfig(steps=0, n_samples=4, seed=7)
        res = fit_users(feats, cm, cl, rm, rl, torch.zeros(5, dtype=torch.long), 1, cfg, init=(w0, b0))
        mu, logvar = user_latent(w0[0], b0[0], feats)
        expected, metrics = latent_dpo_loss(mu, logvar, cm, cl, rm, rl, n_samples=4,
                                            noise=_step_noise(7, 0, 5, 4, D, feats.device))
        torch.testing.assert_close(res.final_loss[0], expected)
        torch.testing.assert_close(res.final_accuracy[0], metrics["accuracy"])

    def test_deterministic_in_seed(self):
        data = _user_pairs(4, +1.0, seed=6)
        idx = torch.zeros(4, dtype=torch.long)
        a = fit_users(*data, idx, 1, FitConfig(steps=3, seed=1))
        b = fit_users(*data, idx, 1, FitConfig(steps=3, seed=1))
        c = fit_users(*data, idx, 1, FitConfig(steps=3, seed=2))
        assert torch.equal(a.weight, b.weight) and a.loss_curve == b.loss_curve
        assert not torch.equal(a.weight, c.weight)

    def test_noise_rows_do_not_depend_on_count(self):
        torch.testing.assert_close(_step_noise(0, 3, 5, 2, 3, torch.device("cpu")),
                                   _step_noise(0, 3, 70, 2, 3, torch.device("cpu"))[:5], rtol=0, atol=0)

    def test_zero_weight_pairs_are_ignored(self):
        """Weights (1, 1, 0, 0) on a user's four pairs fit the same head as its first two pairs alone."""
        data = _user_pairs(4, +1.0, seed=8)
        cfg = FitConfig(steps=5, n_samples=4)
        idx = torch.zeros(4, dtype=torch.long)
        weighted = fit_users(*data, idx, 1, cfg, pair_weight=torch.tensor([1.0, 1.0, 0.0, 0.0]))
        first_two = fit_users(*[t[:2] for t in data], idx[:2], 1, cfg)
        torch.testing.assert_close(weighted.weight, first_two.weight, atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
    def test_other_links_learn(self, loss_type):
        """IPO and SimPO reach the fit through FitConfig.loss_type and also learn the clear preference."""
        feats, cm, cl, rm, rl = _user_pairs(12, +1.0, seed=10)
        res = fit_users(feats, cm, cl, rm, rl, torch.zeros(12, dtype=torch.long), 1,
                        FitConfig(steps=40, lr=5e-2, n_samples=8, loss_type=loss_type, gamma=0.5))
        assert res.loss_curve[-1] < 0.7 * res.loss_curve[0]
        assert res.final_accuracy[0] > 0.9

    def test_noise_draws(self):
        """noise_draws >= steps is bit-identical to fresh noise every step; a small pool (the parameter-free half
        drawn 3 times, reused cyclically) still learns."""
        data = _user_pairs(10, +1.0, seed=11)
        idx = torch.zeros(10, dtype=torch.long)
        fresh = fit_users(*data, idx, 1, FitConfig(steps=6, n_samples=4, noise_draws=None))
        same = fit_users(*data, idx, 1, FitConfig(steps=6, n_samples=4, noise_draws=6))
        assert torch.equal(fresh.weight, same.weight) and fresh.loss_curve == same.loss_curve
        pooled = fit_users(*data, idx, 1, FitConfig(steps=60, lr=5e-2, n_samples=8, noise_draws=3))
        assert pooled.loss_curve[-1] < 0.5 * pooled.loss_curve[0] and pooled.final_accuracy[0] > 0.9
        with pytest.raises(ValueError, match="noise_draws=0"):
            FitConfig(noise_draws=0)


class TestPairTerms:
    @pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
    def test_matches_latent_dpo_pair_terms(self, loss_type):
        """The two-half evaluation (samples + mask once, policy part per step) equals objectives'
        latent_dpo_pair_terms on the same noise: same kept counts, same loss sums and gradients."""
        g = torch.Generator().manual_seed(12)
        n = 7
        cm, rm = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
        cl, rl = 0.5 * torch.randn(n, D, generator=g), 0.5 * torch.randn(n, D, generator=g)
        mu = (0.5 * torch.randn(n, D, generator=g)).requires_grad_(True)
        logvar = (0.3 * torch.randn(n, D, generator=g)).requires_grad_(True)
        noise = torch.randn(n, 3, 5, D, generator=g)
        ref = latent_dpo_pair_terms(mu, logvar, cm, cl, rm, rl, n_samples=5, loss_type=loss_type, gamma=0.2,
                                    noise=noise)
        ref_grads = torch.autograd.grad(ref.loss_sum.sum(), (mu, logvar))
        samples = draw_pair_samples(cm, cl, rm, rl, noise, evidence_ratio=0.5)
        loss_sum, n_kept = pair_loss_terms(mu, logvar, samples, beta=0.1, loss_type=loss_type, gamma=0.2)
        grads = torch.autograd.grad(loss_sum.sum(), (mu, logvar))
        torch.testing.assert_close(n_kept, ref.n_kept)
        torch.testing.assert_close(loss_sum, ref.loss_sum, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


    def test_mask_matches_dense_reference(self):
        """draw_pair_samples' compacted (win, lose) are exactly the ordered sample pairs of the straightforward
        dense mask (objectives' helpers: r from `_sample_log_prob`, all K(K-1)/2 gaps, quantile, C > 0)."""
        g = torch.Generator().manual_seed(21)
        n, S, Dl = 9, 6, 5
        cm, rm = torch.randn(n, Dl, generator=g), torch.randn(n, Dl, generator=g)
        cl, rl = 0.5 * torch.randn(n, Dl, generator=g), 0.5 * torch.randn(n, Dl, generator=g)
        noise = torch.randn(n, 3, S, Dl, generator=g)
        cm[0] = rm[0]                                   # one pair with r = 1/2 everywhere: every gap ties at 0
        cl[0] = rl[0]
        for rho in (0.5, 1.0, 0.2):
            samples = draw_pair_samples(cm, cl, rm, rl, noise, evidence_ratio=rho)
            z = torch.cat([noise[:, 0], cm[:, None] + torch.exp(0.5 * cl)[:, None] * noise[:, 1],
                           rm[:, None] + torch.exp(0.5 * rl)[:, None] * noise[:, 2]], dim=1)
            r = torch.sigmoid(_sample_log_prob(z, cm, cl) - _sample_log_prob(z, rm, rl))
            c = _pairwise_differences(r)
            tau = _antisymmetric_quantile(c.abs(), 1.0 - rho / 2.0).unsqueeze(-1)
            keep = (c.abs() >= tau) & (c != 0)
            K = 3 * S
            iu, ju = torch.triu_indices(K, K, offset=1)
            for p in range(n):
                want = sorted((int(i), int(j)) if c[p, m] > 0 else (int(j), int(i))
                              for m, (i, j) in enumerate(zip(iu, ju)) if keep[p, m])
                kept = samples.keep[p] > 0
                got = list(zip(samples.win[p][kept].tolist(), samples.lose[p][kept].tolist()))
                assert sorted(got) == want, (rho, p)
            assert samples.keep.sum().item() == keep.sum().item() and samples.keep.sum().item() > 0
            assert samples.keep[0].sum().item() == 0

    @pytest.mark.parametrize("head_scale", [0.3, 6.0])
    @pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
    def test_hand_gradient_matches_autograd(self, loss_type, head_scale):
        """The head-only step's hand-written loss and gradient (`_head_loss_grad`: theta form, gathers /
        scatters, padding rows, folded per-user normaliser and pair weights) equal autograd through the
        straightforward path user_latent -> pair_loss_terms -> reduce_per_user on random heads; head_scale 6
        puts part of the log-variances beyond POLICY_LOGVAR_BOUND (no gradient there, either way)."""
        g = torch.Generator().manual_seed(22)
        counts, S = [5, 3, 2], 4
        uc, pm, E = len(counts), max(counts), 2 * D // Q
        local_user = torch.tensor([u for u, k in enumerate(counts) for _ in range(k)])
        rank = torch.tensor([i for k in counts for i in range(k)])
        n = len(local_user)
        feats = torch.randn(n, Q, d, generator=g)
        cm, rm = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
        cl, rl = 0.5 * torch.randn(n, D, generator=g), 0.5 * torch.randn(n, D, generator=g)
        weight = torch.rand(n, generator=g) + 0.5
        W = head_scale * torch.randn(uc, Q, d, E, generator=g)
        Bb = head_scale * torch.randn(uc, Q, E, generator=g)
        samples = draw_pair_samples(cm, cl, rm, rl, torch.randn(n, 3, S, D, generator=g), evidence_ratio=0.5)
        padded = torch.zeros(uc, pm, Q, d)
        padded[local_user, rank] = feats
        rows = local_user * pm + rank
        draw = _fold_draw(samples, local_user, uc, weight)
        loss = _head_loss_grad(W, Bb, padded.transpose(1, 2).reshape(uc * Q, pm, d), rows, draw,
                               scale=_link_scale(loss_type, 0.1), beta=0.1, loss_type=loss_type, gamma=0.3)
        Wr, Br = W.clone().requires_grad_(True), Bb.clone().requires_grad_(True)
        mu, logvar = user_latent(Wr, Br, padded)
        valid = torch.zeros(uc, pm, dtype=torch.bool)
        valid[local_user, rank] = True
        loss_sum, n_kept = pair_loss_terms(mu[valid], logvar[valid], samples, beta=0.1, loss_type=loss_type,
                                           gamma=0.3)
        u_loss = reduce_per_user(loss_sum, n_kept, local_user, uc, weight)
        u_loss.sum().backward()
        if head_scale > 1:
            assert (logvar[valid].abs() > POLICY_LOGVAR_BOUND).any() and (logvar[valid].abs() < 1).any()
        torch.testing.assert_close(torch.zeros(uc).index_add_(0, local_user, loss), u_loss.detach())
        torch.testing.assert_close(W.grad, Wr.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(Bb.grad, Br.grad, atol=1e-5, rtol=1e-4)
        assert Wr.grad.abs().max() > 1e-3

    def test_a_real_pair_that_diverged_stays_finite(self):
        """One real SmolLM2 pair (cached prompt features and posteriors of a small-preset night, tests/unit/data)
        fitted head-only at the preset's settings: without the log-variance bound, logvar ran to -80 by step 30
        and e^-logvar made the head NaN by step 40 (and the served text NaN); with it, every number stays finite."""
        t = load_file(str(Path(__file__).parent / "data" / "smollm2_one_pair.safetensors"))
        res = fit_users(t["features"], t["chosen_mu"], t["chosen_logvar"], t["rejected_mu"], t["rejected_logvar"],
                        torch.zeros(1, dtype=torch.long), 1,
                        FitConfig(steps=50, lr=1e-2, beta=0.1, n_samples=16, evidence_ratio=0.5, noise_draws=4))
        assert torch.isfinite(res.weight).all() and torch.isfinite(res.bias).all()
        mu, logvar = user_latent(res.weight[0], res.bias[0], t["features"])
        assert torch.isfinite(mu).all()
        assert logvar.min() < -POLICY_LOGVAR_BOUND       # it did run away, past the bound, without a gradient

    @pytest.mark.parametrize("fused", [True, False])
    def test_adam_matches_torch_optim(self, fused):
        """The flat-buffer Adam of fit_users (fused kernel, and its plain-ops fallback) is torch.optim.Adam."""
        g = torch.Generator().manual_seed(23)
        p0 = torch.randn(50, generator=g)
        ours, ref = p0.clone(), p0.clone().requires_grad_(True)
        grad = torch.zeros(50)
        opt = _Adam(ours, grad, lr=1e-2, weight_decay=0.1)
        opt.fused = opt.fused and fused
        ref_opt = torch.optim.Adam([ref], lr=1e-2, weight_decay=0.1)
        for _ in range(5):
            step_grad = torch.randn(50, generator=g)
            grad.copy_(step_grad)
            ref.grad = step_grad.clone()
            opt.step()
            ref_opt.step()
        torch.testing.assert_close(ours, ref.detach(), atol=1e-6, rtol=1e-5)


class TestBadInputs:
    def test_bad_inputs(self):
        feats, cm, cl, rm, rl = _user_pairs(3, +1.0, seed=9)
        with pytest.raises(ValueError, match=r"user_index values must lie in \[0, n_users=2\)"):
            fit_users(feats, cm, cl, rm, rl, torch.tensor([0, 1, 2]), 2)
        with pytest.raises(ValueError, match="posteriors must all be"):
            fit_users(feats, cm[:2], cl, rm, rl, torch.zeros(3, dtype=torch.long), 1)
        with pytest.raises(ValueError, match="init weight"):
            fit_users(feats, cm, cl, rm, rl, torch.zeros(3, dtype=torch.long), 1,
                      init=init_params(2, Q, d, D))
        with pytest.raises(ValueError, match="loss_type='kto'"):
            FitConfig(loss_type="kto")
        with pytest.raises(ValueError, match="evidence_ratio=1.5"):
            FitConfig(evidence_ratio=1.5)
