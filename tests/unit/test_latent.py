"""Unit tests for tasks/models/latent.py (diagonal-Gaussian latent math, fp32, exact)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from latentpref.tasks.models.latent import (
    gaussian_log_prob,
    gaussian_log_prob_dims,
    kl_to_standard,
    sample,
    standard_normal_log_prob,
)



class TestGaussianLogProb:
    def test_hand_values(self):
        """
        D = 2, z = (1, 3), mu = (1, 1), logvar = (0, log 4):
          dim 0: -1/2 log(2 pi)                         = -0.9189385
          dim 1: -1/2 (log(2 pi) + log 4 + (3-1)^2 / 4) = -0.9189385 - 0.6931472 - 0.5 = -2.1120857
          sum                                           = -3.0310242
        """
        z = torch.tensor([1.0, 3.0])
        mu = torch.tensor([1.0, 1.0])
        logvar = torch.tensor([0.0, math.log(4.0)])
        torch.testing.assert_close(gaussian_log_prob_dims(z, mu, logvar), torch.tensor([-0.9189385, -2.1120857]))
        torch.testing.assert_close(gaussian_log_prob(z, mu, logvar), torch.tensor(-3.0310242))

    def test_matches_torch_distributions(self):
        g = torch.Generator().manual_seed(0)
        z, mu = torch.randn(5, 3, 8, generator=g), torch.randn(3, 8, generator=g)
        logvar = 2 * torch.randn(3, 8, generator=g)
        expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
        got = gaussian_log_prob(z, mu, logvar)                      # broadcasts (5, 3, 8) vs (3, 8)
        assert got.shape == (5, 3) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected)

    def test_no_variance_stabiliser(self):
        """Spec §9.5: the reference adds 1e-4 to 2 sigma^2. With sigma^2 = 1e-6 and z - mu = 1e-3, the exact
        quadratic term is (1e-3)^2 / (2e-6) = 0.5; the reference would give 1e-6 / 1.02e-4 ~ 0.0098."""
        z, mu, logvar = torch.tensor([1e-3], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), \
            torch.tensor([math.log(1e-6)], dtype=torch.float64)
        exact = -0.5 * (math.log(2 * math.pi) + math.log(1e-6)) - 0.5
        torch.testing.assert_close(gaussian_log_prob(z, mu, logvar), torch.tensor(exact, dtype=torch.float64))

    def test_standard_normal(self):
        z = torch.randn(4, 6)
        torch.testing.assert_close(standard_normal_log_prob(z), gaussian_log_prob(z, torch.zeros(6), torch.zeros(6)))
        torch.testing.assert_close(standard_normal_log_prob(torch.zeros(1, 2)), torch.tensor([-math.log(2 * math.pi)]))

    def test_gradcheck_float64(self):
        g = torch.Generator().manual_seed(1)
        args = [torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
        assert torch.autograd.gradcheck(gaussian_log_prob, args)
        assert torch.autograd.gradcheck(kl_to_standard, args[1:])

    def test_fp16_inputs_do_not_overflow(self):
        """mu = 0, logvar = -10, z = 10: (z - mu)^2 * exp(-logvar) = 100 * 22026.5 = 2.2e6 > 65504 (fp16 max),
        so naive fp16 math gives -inf; ours upcasts to fp32 and matches the float64 value
        -1/2 (log 2 pi - 10 + 2202646.6) = -1101318.7."""
        z = torch.full((2, 32), 10.0, dtype=torch.float16)
        mu = torch.zeros(2, 32, dtype=torch.float16)
        logvar = torch.full((2, 32), -10.0, dtype=torch.float16)
        naive = (-0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar))).sum(-1)
        assert torch.isinf(naive).all()
        got = gaussian_log_prob(z, mu, logvar)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        expected = gaussian_log_prob(z.double(), mu.double(), logvar.double())
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0.0)

    def test_bf16_inputs_give_fp32(self):
        x = torch.randn(3, 4).bfloat16()
        for out in (gaussian_log_prob(x, x, x), kl_to_standard(x, x), standard_normal_log_prob(x),
                    sample(x, x, 2)):
            assert out.dtype == torch.float32


class TestKL:
    def test_hand_value(self):
        """KL(N(1, 1) || N(0, 1)) = 1/2 (1 + 1 - 0 - 1) = 0.5 per dim; two dims with mu = (1, 0), logvar = (0, log 2):
        0.5 + 1/2 (2 - log 2 - 1) = 0.5 + 0.1534264 = 0.6534264."""
        torch.testing.assert_close(kl_to_standard(torch.tensor([1.0, 0.0]), torch.tensor([0.0, math.log(2.0)])),
                                   torch.tensor(0.6534264))

    def test_matches_torch_distributions(self):
        mu, logvar = torch.randn(5, 8), torch.randn(5, 8)
        expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
        torch.testing.assert_close(kl_to_standard(mu, logvar), expected)


class TestSample:
    def test_shape_dtype_reproducible(self):
        mu, logvar = torch.zeros(4, 3, dtype=torch.float16), torch.zeros(4, 3, dtype=torch.float16)
        a = sample(mu, logvar, 7, generator=torch.Generator().manual_seed(3))
        b = sample(mu, logvar, 7, generator=torch.Generator().manual_seed(3))
        assert a.shape == (7, 4, 3) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_moments(self):
        mu, logvar = torch.tensor([1.0, -2.0]), torch.tensor([0.0, math.log(0.25)])
        z = sample(mu, logvar, 200_000, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(z.mean(0), mu, atol=0.01, rtol=0)
        torch.testing.assert_close(z.var(0), torch.exp(logvar), atol=0.01, rtol=0)

    def test_reparameterised_gradient(self):
        """z = mu + exp(logvar/2) eps: dz/dmu = 1 and dz/dlogvar = eps exp(logvar/2) / 2."""
        mu = torch.zeros(3, requires_grad=True)
        logvar = torch.zeros(3, requires_grad=True)
        z = sample(mu, logvar, 1, generator=torch.Generator().manual_seed(0))
        z.sum().backward()
        eps = torch.randn((1, 3), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mu.grad, torch.ones(3))
        torch.testing.assert_close(logvar.grad, 0.5 * eps[0])

    def test_gradcheck_float64(self):
        mu = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        logvar = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda m, lv: sample(m, lv, 4, generator=torch.Generator().manual_seed(0)), (mu, logvar))

    def test_bad_n(self):
        with pytest.raises(ValueError, match="n=0"):
            sample(torch.zeros(2), torch.zeros(2), 0)
