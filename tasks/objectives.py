"""DPO-family preference losses and the CLaP training terms, as pure functions of tensors.

Sequence level: `preference_loss` (the one DPO/IPO/SimPO switch, STYLE.md §3) and `sequence_dpo_loss` (what the
LoRA / P-Tuning baselines call). Latent level: `latent_dpo_loss` (spec latent-dpo.md §3.6) and
`categorical_latent_dpo_loss` (the discrete-code variant, spec lpc.md §6.3 option 3). CLaP terms: `dg_kld`
(§3.2) and `contrastive_loss` (§3.3). Latent math runs in float32 (spec §9.5) via `tasks.models.latent`.

Papers: DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 ; IPO, Azar et al. 2023,
https://arxiv.org/abs/2310.12036 ; SimPO, Meng et al. 2024, https://arxiv.org/abs/2405.14734 ; Latent DPO / CLaP,
Zhang et al. COLING 2025, https://arxiv.org/abs/2412.20834 ; LPC (latent preference coding), spec lpc.md.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from latentpref.tasks.models.latent import (
    LOG_2PI,
    gaussian_log_prob_dims,
    standard_normal_log_prob,
    standard_normal_log_prob_dims,
    to_latent_dtype,
)

__all__ = [
    "LossType",
    "PairTerms",
    "SequenceDPOOutput",
    "categorical_latent_dpo_loss",
    "contrastive_loss",
    "dg_kld",
    "evidence_mask",
    "latent_dpo_loss",
    "latent_dpo_pair_terms",
    "link_scale",
    "preference_loss",
    "preference_loss_grad",
    "sequence_dpo_loss",
]

LossType = Literal["dpo", "ipo", "simpo"]


def _check_loss_args(loss_type: str, beta: float) -> None:
    if loss_type not in get_args(LossType):
        raise ValueError(f"loss_type={loss_type!r}; expected one of {get_args(LossType)}")
    if not beta > 0:
        raise ValueError(f"beta={beta!r}; must be > 0 (IPO's target margin is 1/(2*beta))")


# ---------------------------------------------------------------------------------------------------------------
# Sequence-level preference losses
# ---------------------------------------------------------------------------------------------------------------


def preference_loss(chosen: Tensor, rejected: Tensor, *, loss_type: LossType, beta: float,
                    gamma: float = 0.0) -> Tensor:
    """Per-pair loss (B,) from chosen/rejected scores (B,): log-ratios for DPO/IPO, length-normalised
    log-probs for SimPO. Latent variants only change how scores are made (Gaussian log-ratios, §3.6).

    Args:
        chosen, rejected: broadcastable score tensors, e.g. (B,).
        loss_type: "dpo" | "ipo" | "simpo".
        beta: inverse temperature (DPO/SimPO) or IPO's tau (target margin 1/(2*beta)); > 0.
        gamma: SimPO target reward margin; ignored by DPO/IPO.
    Returns:
        Per-pair losses with the broadcast shape of the inputs.
    Raises:
        ValueError: unknown loss_type or beta <= 0.
    """
    _check_loss_args(loss_type, beta)
    margin = chosen - rejected
    if loss_type == "dpo":
        return -F.logsigmoid(beta * margin)              # DPO (arXiv 2305.18290) Eq. 7
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2            # IPO (arXiv 2310.12036) Eq. 17, tau = beta
    return -F.logsigmoid(beta * margin - gamma)          # SimPO (arXiv 2405.14734) Eq. 6; LPC Eq. 12


def link_scale(loss_type: LossType, beta: float) -> float:
    """The factor of the margin inside `preference_loss`'s link: beta for DPO / SimPO, 1 for IPO (whose beta only
    sets the target margin 1/(2 beta)). A caller that folds it into its scores can use `preference_loss_grad`."""
    return 1.0 if loss_type == "ipo" else beta


def preference_loss_grad(scaled_margin: Tensor, *, loss_type: LossType, beta: float,
                         gamma: float = 0.0) -> tuple[Tensor, Tensor]:
    """`preference_loss` and its closed-form derivative, as functions of s = link_scale(loss_type, beta) * margin.

    For callers that compute gradients by hand (the head-only fit, tasks/train/fit_user.py, has no autograd graph):
        dpo:   l(s) = -log sigma(s)          = softplus(-s),          dl/ds = -sigma(-s)
        simpo: l(s) = -log sigma(s - gamma)  = softplus(gamma - s),   dl/ds = -sigma(gamma - s)
        ipo:   l(s) = (s - 1/(2 beta))^2,                              dl/ds = 2 (s - 1/(2 beta))
    l(s) equals preference_loss(margin, 0) (softplus is the same function as -logsigmoid of the negation; tested
    against autograd in tests/unit/test_objectives.py).

    Args:
        scaled_margin: any shape, s = link_scale * (chosen - rejected).
        loss_type, beta, gamma: see `preference_loss`.
    Returns:
        (loss, dloss/ds), both of the input's shape.
    """
    if loss_type == "ipo":                                   # IPO (arXiv 2310.12036) Eq. 17
        y = scaled_margin - 1.0 / (2.0 * beta)
        return y * y, 2.0 * y
    x = gamma - scaled_margin if loss_type == "simpo" else -scaled_margin   # SimPO Eq. 6 / DPO Eq. 7
    return F.softplus(x), -torch.sigmoid(x)


def evidence_mask(r: Tensor, evidence_ratio: float) -> tuple[Tensor, Tensor]:
    """The evidence mask of latent DPO (spec latent-dpo.md §3.6; lpc.md §6.3 for codes) over K latent samples / codes.

    C_ij = r_i - r_j is antisymmetric, so its strict upper triangle (i < j) determines everything: entry (i, j)
    with C_ij > 0 is the ordered pair (i wins), C_ij < 0 the ordered pair (j wins), C_ij = 0 a tie. tau is the
    per-row (1 - rho/2) quantile of the K (K - 1) OFF-diagonal entries (the reference also counts the K zero
    diagonal entries, spec §9.11, which pulls tau down when many entries tie at zero).

    Args:
        r: (N, K) latent rewards in [0, 1] (no grad).
        evidence_ratio: rho in (0, 1]; 1 keeps every positive gap.
    Returns:
        (c, keep): (N, K (K - 1) / 2) the upper-triangle differences and the bool mask of kept entries.
    """
    c = _pairwise_differences(r)
    gap = c.abs()
    tau = _antisymmetric_quantile(gap, 1.0 - evidence_ratio / 2.0).unsqueeze(-1)             # (N, 1)
    # Departure from the reference mask [C_ij >= tau]: we also require C_ij > 0, so tied samples (e.g. both
    # r = 1.0 after sigmoid saturation, which makes tau = 0 common) never count as "wins" (spec §9.11).
    return c, (gap >= tau) & (gap > 0)


class SequenceDPOOutput(NamedTuple):
    losses: Tensor            # (B,) per-pair loss
    chosen_rewards: Tensor    # (B,) beta * score, detached (implicit reward, for logging / accuracy)
    rejected_rewards: Tensor  # (B,)


def sequence_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *,
                      loss_type: LossType, beta: float, gamma: float = 0.0,
                      chosen_lengths: Tensor | None = None,
                      rejected_lengths: Tensor | None = None) -> SequenceDPOOutput:
    """DPO / IPO / SimPO on summed response log-probs: the one implementation the PEFT baselines import.

    DPO and IPO score a response by log pi_theta(y|x) - log pi_ref(y|x) (spec latent-dpo.md §3.9). IPO uses the
    summed log-ratio of the paper's Eq. 17 (TRL averages per token instead; pass averaged log-probs to get that).
    SimPO is reference-free and scores by the length-normalised log-prob log pi_theta(y|x) / |y| (SimPO Eq. 4).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log pi_theta(y|x) over response tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) same under the frozen reference; required for DPO/IPO,
            ignored (may be None) for SimPO.
        loss_type, beta, gamma: see `preference_loss`.
        chosen_lengths, rejected_lengths: (B,) response token counts; required for SimPO, ignored otherwise.
    Returns:
        SequenceDPOOutput(losses (B,), chosen_rewards (B,), rejected_rewards (B,)), float32.
    Raises:
        ValueError: missing reference log-probs (DPO/IPO) or lengths (SimPO), non-positive lengths,
            unknown loss_type, beta <= 0.
    """
    _check_loss_args(loss_type, beta)
    # upcast: baseline LM logits may be bf16 (spec §9.5 notes the VAE path forgot to)
    pc, pr = to_latent_dtype(policy_chosen_logps), to_latent_dtype(policy_rejected_logps)
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='simpo' needs chosen_lengths and rejected_lengths (token counts, SimPO Eq. 4)")
        lc, lr = to_latent_dtype(chosen_lengths), to_latent_dtype(rejected_lengths)
        if bool((lc <= 0).any()) or bool((lr <= 0).any()):
            raise ValueError(f"response lengths must be > 0; got chosen min {lc.min().item()}, "
                             f"rejected min {lr.min().item()}")
        chosen, rejected = pc / lc, pr / lr
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        chosen = pc - to_latent_dtype(ref_chosen_logps)
        rejected = pr - to_latent_dtype(ref_rejected_logps)
    losses = preference_loss(chosen, rejected, loss_type=loss_type, beta=beta, gamma=gamma)
    return SequenceDPOOutput(losses, beta * chosen.detach(), beta * rejected.detach())


# ---------------------------------------------------------------------------------------------------------------
# CLaP terms
# ---------------------------------------------------------------------------------------------------------------


def dg_kld(mu: Tensor, logvar: Tensor, *, n_samples: int = 16, marginal: bool = True,
           group: tuple[int, int] | None = None, generator: torch.Generator | None = None,
           noise: Tensor | None = None) -> Tensor:
    """Density-gap KL, KL(q_agg || N(0, I)), of the aggregated posterior of each prompt (spec §3.2).

    q_agg(z) = (1/B) sum_b q_b(z) over the B responses of one prompt. Estimated by stratified Monte Carlo:
    `n_samples` reparameterised samples from every member, each scored under every member (O(P B^2 S D)
    memory). Gradients flow through the samples and the mixture densities. Unlike the reference code (one
    prompt per batch, spec §9.1) q_agg is per prompt of an explicit (P prompts x B responses) layout, and the
    result is the mean over prompts.

    Args:
        mu, logvar: (N, D) posteriors, or (P, B, D). With (N, D) and group=None all N form one group.
        n_samples: S, Monte-Carlo samples per member (reference `kl_sampling_times` = 16).
        marginal: True (reference default `marginal_kl=1`) sums the 1-D KLs of each dimension's marginal
            mixture; False uses the joint D-dimensional mixture density.
        group: (P, B) with P * B == N: rows are prompt-major (prompt p owns rows p*B .. p*B+B-1).
        generator: for the standard-normal noise.
        noise: optional explicit standard-normal noise (P, B, S, D); overrides generator.
    Returns:
        Scalar float32 (float64 for float64 inputs).
    Raises:
        ValueError: shape mismatch, bad group, n_samples < 1.
    """
    mu, logvar = to_latent_dtype(mu), to_latent_dtype(logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}; need >= 1")
    if group is not None:
        n_prompts, n_resp = group
        if mu.ndim != 2 or n_prompts < 1 or n_resp < 1 or n_prompts * n_resp != mu.shape[0]:
            raise ValueError(f"group={group} does not tile mu of shape {tuple(mu.shape)}; need (P*B, D)")
        mu, logvar = mu.reshape(n_prompts, n_resp, -1), logvar.reshape(n_prompts, n_resp, -1)
    elif mu.ndim == 2:
        mu, logvar = mu.unsqueeze(0), logvar.unsqueeze(0)
    elif mu.ndim != 3:
        raise ValueError(f"mu must be (N, D) or (P, B, D); got {tuple(mu.shape)}")
    P, B, D = mu.shape
    shape = (P, B, n_samples, D)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise shape {tuple(noise.shape)}; expected (P, B, S, D) = {shape}")
    z = mu[:, :, None] + torch.exp(0.5 * logvar)[:, :, None] * noise                    # (P, B, S, D)
    # every sample under every member b': (P, B, S, 1, D) vs (P, 1, 1, B', D) -> (P, B, S, B', D)
    lp = gaussian_log_prob_dims(z[:, :, :, None], mu[:, None, None], logvar[:, None, None])
    log_b = math.log(B)
    if marginal:
        log_q_agg = torch.logsumexp(lp, dim=3) - log_b                                     # (P, B, S, D)
        gap = log_q_agg - standard_normal_log_prob_dims(z)
        kl = gap.mean(dim=(1, 2)).sum(-1)                                                  # (P,)
    else:
        log_q_agg = torch.logsumexp(lp.sum(-1), dim=3) - log_b                             # (P, B, S)
        gap = log_q_agg - standard_normal_log_prob(z)
        kl = gap.mean(dim=(1, 2))
    return kl.mean()


def contrastive_loss(nll_matrix: Tensor) -> Tensor:
    """In-batch InfoNCE over latents of responses to the same prompt (CLaP "C", spec §3.3).

    nll_matrix[k, b] = -log p(y_b | x, z_{(b - k) mod B}); row k = 0 holds each response under its own latent.
    L = mean_b -log softmax_k(-nll[:, b])[0] = mean_b [nll[0, b] + logsumexp_k(-nll[k, b])].

    Args:
        nll_matrix: (K, B) or batched (P, K, B), K shifts (K = B in the reference; K >= 1), any float dtype.
    Returns:
        Scalar float32 (float64 for float64 input), the mean over responses (and prompts).
    Raises:
        ValueError: wrong rank.
    """
    nll = to_latent_dtype(nll_matrix)
    if nll.ndim == 2:
        nll = nll.unsqueeze(0)
    if nll.ndim != 3 or nll.shape[1] < 1:
        raise ValueError(f"nll_matrix must be (K, B) or (P, K, B) with K >= 1; got {tuple(nll_matrix.shape)}")
    logits = -nll                                                                          # (P, K, B)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


# ---------------------------------------------------------------------------------------------------------------
# Latent preference losses
# ---------------------------------------------------------------------------------------------------------------


class PairTerms(NamedTuple):
    """Per-preference-pair sums over the kept latent sample pairs; reduce them with any grouping."""

    loss_sum: Tensor    # (N,) sum_ij M_ij * loss_ij (carries the gradient to the policy)
    n_kept: Tensor      # (N,) sum_ij M_ij, detached float
    n_correct: Tensor | None   # (N,) kept entries with margin > 0 (loss < ln 2 for DPO); None if not asked
    margin_sum: Tensor | None  # (N,) sum of kept margins R_win - R_lose, detached; None if not asked
    n_entries: int      # ordered off-diagonal entries per pair, K (K - 1)


def _antisymmetric_quantile(a: Tensor, q: float) -> Tensor:
    """Linear-interpolated q-quantile (torch.quantile's default) of the off-diagonal entries of an
    antisymmetric K x K matrix, given the absolute values a = |c| (N, M) of its strict upper triangle c,
    M = K (K - 1) / 2.

    The off-diagonal multiset is {c} u {-c} = {|c|} u {-|c|}, so its ascending order is
    -a[M-1], ..., -a[0], a[0], ..., a[M-1] with a = sort(|c|). Only two adjacent order statistics of |c| are
    needed: one kthvalue plus a masked min, instead of sorting 2M entries per row (torch.quantile also refuses
    inputs above 2^24 entries).
    """
    M = a.shape[-1]
    pos = q * (2 * M - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, 2 * M - 1)
    frac = pos - lo
    if lo >= M:                       # both order statistics are in the upper (non-negative) half
        k = lo - M + 1                # 1-based rank of v_lo in a
        v_lo = torch.kthvalue(a, k, dim=-1).values
        if frac == 0.0 or hi == lo:
            return v_lo
        # (k+1)-th smallest: v_lo again if it occurs at least k+1 times, else the smallest entry above v_lo
        ties = (a <= v_lo.unsqueeze(-1)).sum(-1) >= k + 1
        above = torch.where(a > v_lo.unsqueeze(-1), a, torch.full_like(a, math.inf)).amin(-1)
        v_hi = torch.where(ties, v_lo, above)
    else:                             # q near (or below) 1/2: lower half, or straddling -a[0] and a[0]
        def full(j: int) -> Tensor:   # j-th smallest (0-based) of the 2M off-diagonal entries, (N,)
            return torch.kthvalue(a, j - M + 1, dim=-1).values if j >= M else \
                -torch.kthvalue(a, M - j, dim=-1).values
        v_lo = full(lo)
        if frac == 0.0 or hi == lo:
            return v_lo
        v_hi = full(hi)
    return v_lo + frac * (v_hi - v_lo)


def _pairwise_differences(x: Tensor) -> Tensor:
    """x_i - x_j for every strict-upper-triangle pair (i < j) of the last dim: (N, K) -> (N, K (K - 1) / 2).

    On CPU this is x @ D with D (K, M) holding +1 at (i, m) and -1 at (j, m): a matmul (and its transposed
    backward) is several times faster than gathering x[:, iu] - x[:, ju] and scattering the gradient back, and
    it is exact (two non-zeros per column; non-finite x would spread NaN through the row). On accelerators the
    gather is fast and immune to reduced-precision matmul modes (TF32), so it is used there.
    """
    K = x.shape[-1]
    iu, ju = torch.triu_indices(K, K, offset=1, device=x.device)
    if x.device.type != "cpu":
        return x[:, iu] - x[:, ju]
    cols = torch.arange(iu.numel(), device=x.device)
    d = torch.zeros(K, iu.numel(), device=x.device, dtype=x.dtype)
    d[iu, cols] = 1.0
    d[ju, cols] = -1.0
    return x @ d


def _evidence_pair_terms(R: Tensor, r: Tensor, *, evidence_ratio: float, beta: float, loss_type: LossType,
                         gamma: float, with_metrics: bool = True) -> PairTerms:
    """Evidence-masked pairwise preference loss over K latent samples (or codes) per pair (spec §3.6).

    Args:
        R: (N, K) implicit latent rewards log pi_theta(z) - log pi_ref(z) (carries grad).
        r: (N, K) latent rewards in [0, 1] (no grad).
    """
    if not 0.0 < evidence_ratio <= 1.0:
        raise ValueError(f"evidence_ratio={evidence_ratio!r}; must be in (0, 1] (1 keeps every positive gap)")
    N, K = R.shape
    if K < 2:
        raise ValueError(f"need >= 2 latent samples/codes per pair to form sample pairs; got K={K}")
    c, keep = evidence_mask(r.detach().to(R.dtype), evidence_ratio)                           # (N, M)
    # margin of the winner over the loser, R_win - R_lose (sign(C) orients each triangle entry)
    margin = torch.sign(c) * _pairwise_differences(R)                                        # (N, M)
    losses = preference_loss(margin, torch.zeros((), dtype=R.dtype, device=R.device), loss_type=loss_type,
                             beta=beta, gamma=gamma)
    keep_f = keep.to(R.dtype)
    loss_sum = (losses * keep_f).sum(-1)
    n_correct = margin_sum = None
    with torch.no_grad():
        n_kept = keep_f.sum(-1)
        if with_metrics:      # optional: 4 more passes over (N, M) that a training loop may not need
            n_correct = ((margin > 0).to(R.dtype) * keep_f).sum(-1)
            margin_sum = (margin * keep_f).sum(-1)
    return PairTerms(loss_sum, n_kept, n_correct, margin_sum, K * (K - 1))


def _sample_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z_k; mu, exp(logvar)) for K samples per row: z (N, K, D), mu/logvar (N, D) -> (N, K).

    Same exact density as `gaussian_log_prob`, but sum(logvar) is taken once per row instead of being
    broadcast over the K samples (fewer passes over the (N, K, D) tensor, forward and backward)."""
    prec = torch.exp(-logvar).unsqueeze(1)                                                    # (N, 1, D)
    quad = ((z - mu.unsqueeze(1)).square() * prec).sum(-1)                                   # (N, K)
    return -0.5 * (quad + logvar.sum(-1, keepdim=True) + z.shape[-1] * LOG_2PI)


def latent_dpo_pair_terms(policy_mu: Tensor, policy_logvar: Tensor, chosen_mu: Tensor, chosen_logvar: Tensor,
                          rejected_mu: Tensor, rejected_logvar: Tensor, *, n_samples: int = 16,
                          evidence_ratio: float = 0.5, beta: float = 0.1, loss_type: LossType = "dpo",
                          gamma: float = 0.0, generator: torch.Generator | None = None,
                          noise: Tensor | None = None, with_metrics: bool = True) -> PairTerms:
    """Per-pair latent-DPO sums (the un-reduced core of `latent_dpo_loss`; `fit_users` reduces per user).

    Args: see `latent_dpo_loss`. `noise` (N, 3, S, D) standard normal: [:, 0] are the prior samples, [:, 1] and
    [:, 2] the reparameterisation noise of q_w and q_l; it overrides `generator`. with_metrics=False leaves
    n_correct / margin_sum as None (cheaper inside a training loop).
    """
    _check_loss_args(loss_type, beta)
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}; need >= 1")
    tensors = dict(policy_mu=policy_mu, policy_logvar=policy_logvar, chosen_mu=chosen_mu,
                   chosen_logvar=chosen_logvar, rejected_mu=rejected_mu, rejected_logvar=rejected_logvar)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if policy_mu.ndim != 2 or len(set(shapes.values())) != 1:
        raise ValueError(f"all latent inputs must share one (N, D) shape; got {shapes}")
    N, D = policy_mu.shape
    p_mu, p_lv = to_latent_dtype(policy_mu), to_latent_dtype(policy_logvar)
    # posteriors come from the frozen CLaP encoder (no_grad in the reference): no gradient to them
    w_mu, w_lv = to_latent_dtype(chosen_mu).detach(), to_latent_dtype(chosen_logvar).detach()
    l_mu, l_lv = to_latent_dtype(rejected_mu).detach(), to_latent_dtype(rejected_logvar).detach()
    shape = (N, 3, n_samples, D)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=p_mu.device, dtype=p_mu.dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise shape {tuple(noise.shape)}; expected (N, 3, S, D) = {shape}")
    with torch.no_grad():
        # Z: S samples from pi_ref = N(0, I), S from q_w, S from q_l; no gradient through Z (spec §3.6)
        noise = to_latent_dtype(noise)
        z = torch.cat([noise[:, 0],
                       w_mu[:, None] + torch.exp(0.5 * w_lv)[:, None] * noise[:, 1],
                       l_mu[:, None] + torch.exp(0.5 * l_lv)[:, None] * noise[:, 2]], dim=1)     # (N, 3S, D)
        # r(z) = softmax([log q_w, log q_l])_0 = sigmoid(log q_w - log q_l), the "latent reward"
        r = torch.sigmoid(_sample_log_prob(z, w_mu, w_lv) - _sample_log_prob(z, l_mu, l_lv))     # (N, 3S)
        # log N(z; 0, I) through the same kernel as the policy density, so R_theta is exactly 0 (not 1e-8
        # rounding noise) while pi_theta = pi_ref: accuracy/margins at the standardized start are exact
        zeros = torch.zeros_like(p_mu)
        log_ref = _sample_log_prob(z, zeros, zeros)
    # implicit latent reward R_theta(z) = log pi_theta(z|x) - log N(z; 0, I); zero when pi_theta = pi_ref
    R = _sample_log_prob(z, p_mu, p_lv) - log_ref                                                # (N, 3S)
    return _evidence_pair_terms(R, r, evidence_ratio=evidence_ratio, beta=beta, loss_type=loss_type,
                                gamma=gamma, with_metrics=with_metrics)


def check_pair_weight(pair_weight: Tensor, n: int) -> Tensor:
    """The feedback `weight` column of N pairs, validated, as a detached float32 (N,) tensor.

    Raises:
        ValueError: a shape other than (N,), or a negative weight.
    """
    w = to_latent_dtype(pair_weight).detach()
    if tuple(w.shape) != (n,):
        raise ValueError(f"pair_weight shape {tuple(w.shape)}; expected ({n},)")
    if n and bool((w < 0).any()):
        raise ValueError(f"pair_weight must be >= 0; min is {w.min().item()}")
    return w


def _reduce_terms(terms: PairTerms, pair_weight: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    loss_sum, n_kept, n_correct, margin_sum = terms.loss_sum, terms.n_kept, terms.n_correct, terms.margin_sum
    if pair_weight is not None:
        w = check_pair_weight(pair_weight, loss_sum.shape[0])
        loss_sum, n_kept = loss_sum * w, n_kept * w
        n_correct, margin_sum = n_correct * w, margin_sum * w
    # global normaliser over the batch (spec §3.6, §9.11): sum of the mask, not a per-pair mean
    denom = n_kept.sum()
    safe = denom.clamp_min(1e-12)
    loss = loss_sum.sum() / safe
    total = terms.n_entries * terms.loss_sum.shape[0]
    metrics = {
        "accuracy": (n_correct.sum() / safe).detach(),
        "mean_margin": (margin_sum.sum() / safe).detach(),
        "kept_fraction": (terms.n_kept.sum() / max(total, 1)).detach(),
    }
    return loss, metrics


def latent_dpo_loss(policy_mu: Tensor, policy_logvar: Tensor, chosen_mu: Tensor, chosen_logvar: Tensor,
                    rejected_mu: Tensor, rejected_logvar: Tensor, *, n_samples: int = 16,
                    evidence_ratio: float = 0.5, beta: float = 0.1, loss_type: LossType = "dpo",
                    gamma: float = 0.0, pair_weight: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent DPO (spec latent-dpo.md §3.6; Zhang et al. 2024, https://arxiv.org/abs/2412.20834).

    Per pair: Z = S samples from pi_ref = N(0, I) plus S from each frozen posterior q_w = q(z|x,y_w),
    q_l = q(z|x,y_l) (no gradient through Z). Latent reward r(z) = q_w(z) / (q_w(z) + q_l(z)); implicit reward
    R_theta(z) = log pi_theta(z|x) - log N(z; 0, I). Ordered sample pairs (i, j), i != j, with gap
    C_ij = r_i - r_j are kept when C_ij >= tau (tau = per-pair (1 - rho/2) quantile of the off-diagonal C) and
    C_ij > 0 (our departure: ties never count as wins). The kept pairs get preference_loss(R_i, R_j), so
    "ipo"/"simpo" change only the link; the latent margin keeps the N(0, I) reference, so every loss starts
    at zero margin when pi_theta = pi_ref. Normalised by the total mask count of the batch (global).

    Args:
        policy_mu, policy_logvar: (N, D) pi_theta(z|x) of each pair's prompt (the only inputs with gradient).
        chosen_mu, chosen_logvar, rejected_mu, rejected_logvar: (N, D) posteriors of y_w and y_l (detached).
        n_samples: S per source (3S latents per pair; reference `lpo_sampling_times` 16).
        evidence_ratio: rho in (0, 1]; 0.5 keeps about the top half of the positive gaps, 1 all of them.
        beta, loss_type, gamma: see `preference_loss`.
        pair_weight: optional (N,) non-negative weights (feedback `weight` column): weighted sums in both the
            numerator and the normaliser.
        generator: for the sampling noise. noise: explicit (N, 3, S, D) standard normal (overrides generator).
    Returns:
        (loss scalar fp32, {"accuracy", "mean_margin", "kept_fraction"} as detached 0-d tensors). accuracy is the
        share of kept entries with positive margin (== the reference's "loss < ln 2" for DPO); kept_fraction is
        over all N K (K - 1) ordered off-diagonal entries (at most 1/2 by antisymmetry).
    Raises:
        ValueError: shape mismatch, bad evidence_ratio / n_samples / beta / loss_type, negative weights.
    """
    terms = latent_dpo_pair_terms(policy_mu, policy_logvar, chosen_mu, chosen_logvar, rejected_mu,
                                  rejected_logvar, n_samples=n_samples, evidence_ratio=evidence_ratio, beta=beta,
                                  loss_type=loss_type, gamma=gamma, generator=generator, noise=noise)
    return _reduce_terms(terms, pair_weight)


def categorical_latent_dpo_loss(policy_logits: Tensor, chosen_logits: Tensor, rejected_logits: Tensor, *,
                                ref_logits: Tensor | None = None, evidence_ratio: float = 1.0, beta: float = 0.1,
                                loss_type: LossType = "dpo", gamma: float = 0.0,
                                pair_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent DPO over a discrete codebook, by exact enumeration of the K codes (spec lpc.md §6.3, option 3).

    r(k) = q(k|x,y_w) / (q(k|x,y_w) + q(k|x,y_l)); R(k) = log p_u(k|x) - log p_ref(k|x); code pairs are masked
    exactly like `latent_dpo_loss` (default rho = 1: every pair with r_i > r_j, as in lpc.md §6.3).

    Args:
        policy_logits: (N, K) user policy logits over codes (carries grad).
        chosen_logits, rejected_logits: (N, K) code posteriors of y_w and y_l (detached).
        ref_logits: (N, K) reference (e.g. population prior) logits, detached; None = uniform.
        evidence_ratio, beta, loss_type, gamma, pair_weight: see `latent_dpo_loss`.
    Returns:
        (loss scalar, metrics dict) as `latent_dpo_loss`.
    """
    terms = categorical_latent_dpo_pair_terms(policy_logits, chosen_logits, rejected_logits, ref_logits=ref_logits,
                                              evidence_ratio=evidence_ratio, beta=beta, loss_type=loss_type,
                                              gamma=gamma)
    return _reduce_terms(terms, pair_weight)


# ---------------------------------------------------------------------------------------------------------------
# LPC: discrete latent codes (spec lpc.md; math primitives in tasks.models.lpc)
# ---------------------------------------------------------------------------------------------------------------


def categorical_latent_dpo_pair_terms(policy_logits: Tensor, chosen_logits: Tensor, rejected_logits: Tensor, *,
                                      ref_logits: Tensor | None = None, evidence_ratio: float = 1.0,
                                      beta: float = 0.1, loss_type: LossType = "dpo", gamma: float = 0.0,
                                      with_metrics: bool = True) -> PairTerms:
    """Per-pair sums of `categorical_latent_dpo_loss` (same definitions), un-reduced so a caller can normalise
    per user (tasks/train/fit_codes.py): `_reduce_terms(terms, w)` of this equals `categorical_latent_dpo_loss`.

    Args: see `categorical_latent_dpo_loss`. Returns: PairTerms over the K (K - 1) ordered code pairs per pair.
    """
    _check_loss_args(loss_type, beta)
    if policy_logits.ndim != 2 or chosen_logits.shape != policy_logits.shape \
            or rejected_logits.shape != policy_logits.shape:
        raise ValueError(f"logits must share one (N, K) shape; got policy {tuple(policy_logits.shape)}, "
                         f"chosen {tuple(chosen_logits.shape)}, rejected {tuple(rejected_logits.shape)}")
    log_p = F.log_softmax(to_latent_dtype(policy_logits), dim=-1)
    if ref_logits is None:
        log_ref = torch.full_like(log_p, -math.log(log_p.shape[-1]))
    else:
        if ref_logits.shape != policy_logits.shape:
            raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != {tuple(policy_logits.shape)}")
        log_ref = F.log_softmax(to_latent_dtype(ref_logits).detach(), dim=-1)
    with torch.no_grad():   # r(k) = q_w(k) / (q_w(k) + q_l(k)), lpc.md §6.3 option 3
        r = torch.sigmoid(F.log_softmax(to_latent_dtype(chosen_logits), dim=-1)
                          - F.log_softmax(to_latent_dtype(rejected_logits), dim=-1))
    return _evidence_pair_terms(log_p - log_ref, r, evidence_ratio=evidence_ratio, beta=beta,
                                loss_type=loss_type, gamma=gamma, with_metrics=with_metrics)


def code_collapse_kl(posterior_logits: Tensor) -> Tensor:
    """KL(mean_b q(.|x_b, y_b) || Uniform_K) of a batch of code posteriors (lpc.md §6.3, shared stage).

    The discrete counterpart of `dg_kld`: it pulls the *aggregated* posterior to uniform (every code used),
    leaving individual posteriors free to be sharp. Exact, no sampling.

    Args:
        posterior_logits: (N, K) or (..., K) code logits of the batch's responses.
    Returns:
        Scalar float32 in [0, log K].
    """
    from latentpref.tasks.models.lpc import aggregated_kl_to_uniform
    return aggregated_kl_to_uniform(torch.softmax(to_latent_dtype(posterior_logits), dim=-1))


def lpc_kl(posterior_logits: Tensor, prior_logits: Tensor) -> Tensor:
    """Mean exact categorical KL(q(.|x, .) || p(.|x)) over the batch: the lambda term of the LPC ELBO (lpc.md §3.2).

    Args:
        posterior_logits, prior_logits: (N, K); the prior is p(k|x) of each row's prompt (carries gradient too:
            the ELBO trains both networks).
    Returns:
        Scalar float32.
    """
    from latentpref.tasks.models.lpc import categorical_kl
    return categorical_kl(posterior_logits, prior_logits).mean()


def lpc_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
                  ref_rejected_logps: Tensor | None, pair_logits: Tensor, prior_logits: Tensor, *,
                  loss_type: LossType, beta: float, gamma: float = 0.0, kl_weight: float = 0.05,
                  chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """LPC objective on preference pairs in its DPO / IPO / SimPO forms (lpc.md §3.2-3.4), one switch.

    L = mean_n [ l(s_w - s_l) ] + lambda * mean_n KL( q(.|x_n, y_w > y_l) || p(.|x_n) ), where the policy
    log-probs are conditioned on a code latent z ~ q(.|x, y_w > y_l) (one Gumbel-softmax sample per pair, the
    inner expectation of Eq. 7 estimated by a single draw) and l is `preference_loss`:
        dpo:   s = log pi(y|x,z) - log pi_ref(y|x)          -log sigma(beta (s_w - s_l))          (Eq. 7)
        ipo:   s as dpo                                       (s_w - s_l - 1/(2 beta))^2            (Eq. 13 [est])
        simpo: s = log pi(y|x,z) / |y|  (no reference)      -log sigma(beta (s_w - s_l) - gamma)  (Eq. 12 [est])
    The reference is not z-conditioned (Eq. 7; lpc.md §2.6 notes the Eq. 6 / Eq. 7 mismatch).

    Args:
        policy_chosen_logps, policy_rejected_logps: (N,) summed log pi_theta(y|x,z).
        ref_chosen_logps, ref_rejected_logps: (N,) summed log pi_ref(y|x); required for dpo / ipo.
        pair_logits: (N, K) pair posterior q(k|x, y_w > y_l) logits (the z of the policy terms came from these).
        prior_logits: (N, K) prior p(k|x) logits of each pair's prompt.
        loss_type, beta, gamma: see `preference_loss`.
        kl_weight: lambda >= 0 (lpc.md §3.2: 0.05 "across all methods").
        chosen_lengths, rejected_lengths: (N,) token counts; required for simpo.
    Returns:
        (loss scalar float32, {"preference", "kl", "accuracy", "margin"} detached 0-d tensors).
    Raises:
        ValueError: as `sequence_dpo_loss`, shape mismatch, or kl_weight < 0.
    """
    if kl_weight < 0:
        raise ValueError(f"kl_weight={kl_weight!r}; must be >= 0")
    if pair_logits.shape != prior_logits.shape or pair_logits.ndim != 2 \
            or pair_logits.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(f"pair_logits {tuple(pair_logits.shape)} and prior_logits {tuple(prior_logits.shape)} "
                         f"must both be (N, K) with N = {policy_chosen_logps.shape[0]} pairs")
    out = sequence_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            loss_type=loss_type, beta=beta, gamma=gamma, chosen_lengths=chosen_lengths,
                            rejected_lengths=rejected_lengths)
    preference = out.losses.mean()
    kl = lpc_kl(pair_logits, prior_logits)
    margin = (out.chosen_rewards - out.rejected_rewards).detach()
    metrics = {"preference": preference.detach(), "kl": kl.detach(), "accuracy": (margin > 0).float().mean(),
               "margin": margin.mean()}
    return preference + kl_weight * kl, metrics


def population_preference_loss(user_directions: Tensor, chosen_z: Tensor, rejected_z: Tensor, *,
                               loss_type: LossType = "dpo", beta: float = 1.0, gamma: float = 0.0,
                               pair_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Population preference term of a Gaussian CLaP (our extension, the counterpart of LPC's pooled pairs,
    lpc.md §6.2): every population user u has a direction v_u in latent space and a linear latent reward
    r_u(z) = <v_u, z>; each of u's pairs is scored with `preference_loss(r_u(z_w), r_u(z_l))`, z_w ~ q(z|x, y_w) and
    z_l ~ q(z|x, y_l) reparameterised samples.

    Why: per-user latent DPO's implicit reward log N(z; mu_theta, I) - log N(z; 0, I) = <mu_theta, z> - |mu_theta|^2/2
    is linear in z, so a user can only be fitted along directions in which the posteriors of the responses he prefers
    differ from those he rejects. LM NLL + DG-KLD alone put into z what predicts the next tokens (topic, first words),
    not what users disagree on; this term asks the encoder to make every population user's choices linearly
    separable in z. Samples (not means) carry the gradient, so the posteriors must separate by more than their own
    spread: a large |v_u| cannot make up for a vanishing mean difference.

    Args:
        user_directions: (N, D) v_u of each pair's user (carries gradient).
        chosen_z, rejected_z: (N, D) posterior samples of each pair's chosen and rejected response (carry gradient).
        loss_type, beta, gamma: see `preference_loss` (beta 1: v_u's own norm is the temperature).
        pair_weight: optional (N,) non-negative weights (the feedback `weight` column).
    Returns:
        (loss scalar fp32, {"preference", "accuracy", "margin"} detached 0-d tensors); accuracy and margin are of
        the sampled rewards.
    Raises:
        ValueError: shape mismatch, negative weights, bad loss_type / beta.
    """
    shapes = {tuple(t.shape) for t in (user_directions, chosen_z, rejected_z)}
    if len(shapes) != 1 or user_directions.ndim != 2:
        raise ValueError(f"user_directions, chosen_z and rejected_z must share one (N, D) shape; got "
                         f"{[tuple(t.shape) for t in (user_directions, chosen_z, rejected_z)]}")
    v = to_latent_dtype(user_directions)
    chosen = (v * to_latent_dtype(chosen_z)).sum(-1)
    rejected = (v * to_latent_dtype(rejected_z)).sum(-1)
    losses = preference_loss(chosen, rejected, loss_type=loss_type, beta=beta, gamma=gamma)
    w = torch.ones_like(losses) if pair_weight is None else check_pair_weight(pair_weight, losses.shape[0])
    loss = (losses * w).sum() / w.sum().clamp_min(1e-12)
    margin = (chosen - rejected).detach()
    metrics = {"preference": loss.detach(), "accuracy": ((margin > 0).float() * w).sum() / w.sum().clamp_min(1e-12),
               "margin": (margin * w).sum() / w.sum().clamp_min(1e-12)}
    return loss, metrics


__all__ += ["categorical_latent_dpo_pair_terms", "check_pair_weight", "code_collapse_kl", "lpc_kl",
            "lpc_pair_loss", "population_preference_loss"]
