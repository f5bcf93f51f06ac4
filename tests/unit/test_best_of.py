"""Personal best-of-K (tasks/evaluate/serving.py): the latent reward of a response under a user's policy (Gaussian and
discrete, known values on a tiny CLaP; the prior scores 0), and `complete_best_of` returning the sample the user's
reward ranks first among the K it would draw, reproducibly for a fixed seed."""
import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.data.store import Store
from latentpref.tasks.evaluate.online import OnlineGenerator
from latentpref.tasks.evaluate.serve_core import CompletionRequest
from latentpref.tasks.evaluate.serving import best_of_seeds, complete_best_of, latent_rewards
from latentpref.tasks.models.clap import CLaP, CLaPConfig
from latentpref.tasks.models.registry import load_base_model
from latentpref.tasks.policy.store import UserPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/serve_store.py
import serve_store  # noqa: E402

PROMPTS = ["The film was", "The film was", "The film was", "A long day at the"]
RESPONSES = [" great fun from start to end", " dull and far too long", " a quiet little story", " office, then home"]
LENGTHS = dict(prompt_tokens=16, response_tokens=16)


@functools.cache
def _clap(latent_type: str = "gaussian") -> tuple[CLaP, object]:
    base, tok = load_base_model("tiny-gpt2", seed=0)
    torch.manual_seed(0)
    cfg = CLaPConfig(latent_type=latent_type, n_codes=6) if latent_type == "discrete" else CLaPConfig()
    clap = CLaP(base, cfg, base_spec="tiny-gpt2").eval()
    with torch.no_grad():   # a non-trivial head (a fresh CLaP's is zero), so posteriors differ between responses
        head = clap.encoder.h2k if latent_type == "discrete" else clap.encoder.h2z
        head.weight.normal_(0, 0.5)
        head.bias.normal_(0, 0.1)
    return clap, tok


@dataclass(frozen=True)
class FixedPolicy:
    """A Gaussian p_theta(z|x) = N(mu, exp(logvar)) whatever the prompt."""
    mu: torch.Tensor
    logvar: torch.Tensor
    mode: str = "fixed"
    discrete: bool = False

    def latent(self, encoder, ids, mask):
        B = ids.shape[0]
        return self.mu.expand(B, -1).clone(), self.logvar.expand(B, -1).clone()


def _posterior_means(clap, tok) -> torch.Tensor:
    p_ids, p_mask = tokenize_prompts(tok, PROMPTS, LENGTHS["prompt_tokens"])
    r_ids, r_mask = tokenize_responses(tok, RESPONSES, LENGTHS["response_tokens"])
    with torch.no_grad():
        return clap.encode(p_ids, p_mask, r_ids, r_mask)[0]


def test_gaussian_reward_known_values_and_ranking():
    clap, tok = _clap()
    mu_y = _posterior_means(clap, tok).double().numpy()                         # (4, D)
    D = mu_y.shape[1]
    mu, logvar = torch.full((D,), 0.3), torch.full((D,), -0.5)
    got = latent_rewards(clap, tok, FixedPolicy(mu, logvar), PROMPTS, RESPONSES, **LENGTHS)
    # log N(mu_y; mu, e^logvar) - log N(mu_y; 0, I), by hand: the log 2 pi terms cancel
    want = (-0.5 * (-0.5 + (mu_y - 0.3) ** 2 / np.exp(-0.5)) + 0.5 * mu_y ** 2).sum(-1)
    assert got.shape == (4,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # the policy N(0, I) is the prior: every reward 0
    np.testing.assert_allclose(latent_rewards(clap, tok, FixedPolicy(torch.zeros(D), torch.zeros(D)), PROMPTS,
                                              RESPONSES, **LENGTHS), 0.0, atol=1e-5)
    # a policy whose mean sits at one response's posterior mean ranks that response first
    for target in (0, 1, 2):
        policy = FixedPolicy(torch.tensor(mu_y[target], dtype=torch.float32), torch.full((D,), np.log(0.01)))
        assert int(np.argmax(latent_rewards(clap, tok, policy, PROMPTS[:3], RESPONSES[:3], **LENGTHS))) == target


def test_prior_scores_zero_and_prompts_group_correctly():
    clap, tok = _clap()
    np.testing.assert_array_equal(latent_rewards(clap, tok, None, PROMPTS, RESPONSES, **LENGTHS), np.zeros(4))
    cold = UserPolicy("head-only", {}, {"cold_start": True})
    np.testing.assert_allclose(latent_rewards(clap, tok, cold, PROMPTS, RESPONSES, **LENGTHS), 0.0, atol=1e-5)
    assert latent_rewards(clap, tok, None, [], [], **LENGTHS).shape == (0,)
    # the shared-prompt shortcut (one policy pass per distinct prompt) == each row scored alone
    D = clap.cfg.latent_dim
    policy = FixedPolicy(torch.linspace(-1, 1, D), torch.linspace(-1, 0.5, D))
    together = latent_rewards(clap, tok, policy, PROMPTS, RESPONSES, **LENGTHS)
    alone = [latent_rewards(clap, tok, policy, [p], [r], **LENGTHS)[0] for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="4 prompts but 3 responses"):
        latent_rewards(clap, tok, policy, PROMPTS, RESPONSES[:3], **LENGTHS)


def test_discrete_reward_is_the_expected_code_reward():
    clap, tok = _clap("discrete")
    delta = torch.tensor([2.0, -1.0, 0.0, 0.5, -3.0, 1.0])
    got = latent_rewards(clap, tok, UserPolicy("codes", {"delta": delta}, {}), PROMPTS, RESPONSES, **LENGTHS)
    p_ids, p_mask = tokenize_prompts(tok, PROMPTS, 16)
    r_ids, r_mask = tokenize_responses(tok, RESPONSES, 16)
    with torch.no_grad():
        log_prior = torch.log_softmax(clap.prior_logits(p_ids, p_mask).double(), -1)          # (N, K)
        log_user = torch.log_softmax(log_prior + delta.double(), -1)                          # p_u = prior * e^delta
        q = torch.softmax(clap.encode_logits(p_ids, p_mask, r_ids, r_mask).double(), -1)
    np.testing.assert_allclose(got, (q * (log_user - log_prior)).sum(-1).numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(got) > 0
    cold = UserPolicy("codes", {"delta": torch.zeros(6)}, {})                                  # delta 0 = the prior
    np.testing.assert_allclose(latent_rewards(clap, tok, cold, PROMPTS, RESPONSES, **LENGTHS), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="another CLaP version"):
        latent_rewards(_clap()[0], tok, UserPolicy("codes", {"delta": delta}, {}), PROMPTS, RESPONSES, **LENGTHS)


def test_best_of_seeds():
    assert best_of_seeds(7, 1) == [7]
    seeds = best_of_seeds(7, 8)
    assert seeds[0] == 7 and len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert not set(best_of_seeds(8, 8)) & set(seeds[1:])        # the next request seed shares no sample
    assert best_of_seeds(2**63 - 1, 3) == best_of_seeds(2**63 - 1, 3)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("best_of") / "store"))
    release = serve_store.night(store, "clapv1", ["user-0", "user-1"], seed=1)
    gen = OnlineGenerator.from_release(store, release, dtype="float32")
    with torch.no_grad():   # the stored CLaP's posterior head is a fresh (zero) one: every response alike
        gen.clap.encoder.h2z.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return gen


def _request(**kw) -> CompletionRequest:
    return CompletionRequest(**{"prompt": "The film was", "max_tokens": 6, "temperature": 1.0, **kw})


def test_best_of_returns_the_users_best_sample(generator):
    req = _request(user="user-0", seed=11, best_of=4)
    # the K samples by hand: plain requests with the derived seeds, scored with the user's policy
    samples = generator.complete([dataclasses.replace(req, seed=s, best_of=1) for s in best_of_seeds(11, 4)])
    policy = generator.served_user("user-0").policy
    rewards = latent_rewards(generator.clap, generator.tokenizer, policy, [req.prompt] * 4,
                             [c.text for c in samples], prompt_tokens=generator.prompt_tokens, response_tokens=64)
    assert len({c.text for c in samples}) > 1 and np.ptp(rewards) > 0
    (chosen,) = complete_best_of(generator, [req])
    assert chosen.completion == samples[int(np.argmax(rewards))]
    assert chosen.best_of == 4 and chosen.reward == pytest.approx(rewards.max(), rel=1e-5, abs=1e-5)
    assert chosen.completion_tokens == sum(c.completion_tokens for c in samples)   # usage counts every sample
    # reproducible, and independent of what it is batched with
    others = [_request(user="user-1", seed=3, best_of=3), _request(user="user-1", max_tokens=2, temperature=0)]
    again = complete_best_of(generator, [others[0], req, others[1]])
    assert again[1] == chosen
    assert again[2].best_of == 1 and again[2].reward is None


def test_best_of_one_and_the_prior_draw_one_sample(generator):
    plain = generator.complete([_request(user="user-0", seed=5)])[0]
    (one,) = complete_best_of(generator, [_request(user="user-0", seed=5)])
    assert (one.completion, one.best_of, one.reward, one.completion_tokens) == (plain, 1, None,
                                                                                plain.completion_tokens)
    # the prior's rewards are all 0, so its first sample (the request's own seed) is the answer; only it is drawn
    for user in (None, "never-seen"):
        first = generator.complete([_request(user=user, seed=5)])[0]
        (chosen,) = complete_best_of(generator, [_request(user=user, seed=5, best_of=4)])
        assert chosen.completion == first and chosen.reward is None and chosen.best_of == 4
        assert chosen.completion_tokens == first.completion_tokens and not first.personalized


def test_best_of_refuses_greedy(generator):
    with pytest.raises(ValueError, match="best_of=2 with temperature=0"):
        complete_best_of(generator, [_request(user="user-0", temperature=0.0, best_of=2)])


def test_the_nights_best_of_k_keeps_the_highest_latent_reward_sample_per_prompt():
    """evaluate's `latent_dpo_best_of_k`: sample 0 is latent_dpo's own text, the kept sample per prompt is the
    argmax of the user's latent reward over the K, and K = 0 / 1 evaluates nothing extra."""
    from latentpref.tasks.evaluate.evaluate import EvalSettings, _best_of_texts, _clap_generate_rows
    from latentpref.tasks.policy.settings import FitSettings
    clap, tok = _clap()
    g = torch.Generator().manual_seed(5)
    policy = FixedPolicy(torch.randn(1, clap.cfg.latent_dim, generator=g), torch.zeros(1, clap.cfg.latent_dim))
    prompts = ["The film was", "A long day at the"]
    s = EvalSettings(prompts_per_user=2, max_new_tokens=6, prompt_tokens=16, response_tokens=16, baselines=(),
                     baseline_steps=0, baseline_lr={}, baseline_beta={}, baseline_batch_size=1,
                     latent_fit=FitSettings(), best_of_k=3)
    p_ids, p_mask = tokenize_prompts(tok, prompts, 16)
    z = {"u": policy.mu.expand(2, -1).clone()}
    first = {"u": _clap_generate_rows(clap, tok, prompts, [0, 1], z["u"], s)}
    got = _best_of_texts(clap, tok, prompts, ["u"], {"u": policy}, z, first, s)
    texts, rewards = got["u"]
    assert rewards.shape == (3, 2)
    pool = [first["u"]] + [_clap_generate_rows(clap, tok, prompts, [0, 1], z["u"], s, samples=[j, j])
                           for j in (1, 2)]
    want = latent_rewards(clap, tok, policy, prompts * 3, [t for p in pool for t in p], **LENGTHS).reshape(3, 2)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
    assert texts == [pool[int(b)][i] for i, b in enumerate(want.argmax(0))]
    assert _best_of_texts(clap, tok, prompts, ["u"], {"u": policy}, z, first,
                          dataclasses.replace(s, best_of_k=1)) == {}
