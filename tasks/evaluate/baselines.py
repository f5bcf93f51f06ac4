"""Per-user DPO baselines (LoRA-DPO, full DPO, P-Tuning-DPO) and the LM helpers they share.

The baselines are the ones the paper compares Latent DPO against (spec latent-dpo.md §5): a fresh DPO run
per user through the whole LM, training LoRA adapters, all weights, or a 4-token prefix. The loss is the
sequence-level DPO family of spec §3.9 (``objectives.sequence_dpo_loss``) on log-probs summed over response
tokens. Two reference-code bugs are avoided on purpose:

* the reference is the frozen base model in eval mode, so no dropout noise in log π_ref (spec §9.9), and
* reference log-probs are user-independent, so they are computed once and looked up (spec §8.6), instead of
  an online deepcopy forward every step (spec §3.9).

Sequences are built as ``[left-padded prompt | right-padded response]`` with an explicit attention mask and
position ids computed from that mask (spec §9.3: never infer padding from ids, pad = eos for GPT-2). All
log-prob math runs on fp32 logits (spec §9.5).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from latentpref.tasks.defaults import BASELINE_DEFAULTS
from latentpref.tasks.objectives import LossType, sequence_dpo_loss
from latentpref.tasks.models import precision

log = logging.getLogger(__name__)

Method = Literal["lora_dpo", "full_dpo", "ptuning_dpo"]
Pair = tuple[str, str, str]  # (prompt, chosen, rejected)

# peft's default LoRA targets for the architectures we ship (spec §5: GPT-2 `c_attn`, GPT-J/Llama `q,v`).
_DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
}
# Spec §5 hyper-parameters, used by `BaselineConfig.for_method`; presets override lr for tiny random models.
SPEC_DEFAULTS = BASELINE_DEFAULTS


# ----------------------------------------------------------------------------------------------------------
# Tokenisation and sequence log-probs
# ----------------------------------------------------------------------------------------------------------
class SequenceBatch(NamedTuple):
    """``[left-padded prompt | right-padded response]`` with everything a forward pass needs."""

    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long, 1 = real token
    position_ids: Tensor  # (B, T) long, 0 at each row's first real token
    response_mask: Tensor  # (B, T) bool, True on response tokens (all at columns >= prompt_len)
    prompt_len: int  # columns [0, prompt_len) hold the prompts, [prompt_len, T) the responses


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, keeping the *last* ``max_prompt_tokens`` (the end touches the response).

    Left truncation here and in `generate_texts` keeps training and generation consistent (spec §9.10).
    An empty prompt becomes ``[bos]`` (``eos`` for GPT-2) so the first response token has a context.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be >= 1")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    return [row[-max_prompt_tokens:] if row else [bos] for row in ids]


def encode_responses(tokenizer: Any, responses: Sequence[str], *, max_response_tokens: int) -> list[list[int]]:
    """Token ids of each response, keeping the first ``max_response_tokens``."""
    if max_response_tokens < 1:
        raise ValueError(f"max_response_tokens={max_response_tokens} must be >= 1")
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    return [row[:max_response_tokens] for row in ids]


def collate(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_id: int
) -> SequenceBatch:
    """Build one batch; rows need not have equal lengths. Pads never sit between prompt and response."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (encode_prompts maps '' to [bos])")
    B = len(prompt_ids)
    Lp = max(len(p) for p in prompt_ids)
    Lr = max((len(r) for r in response_ids), default=0)
    input_ids = torch.full((B, Lp + Lr), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, Lp + Lr), dtype=torch.long)
    response_mask = torch.zeros((B, Lp + Lr), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[b, Lp - len(p) : Lp] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, Lp - len(p) : Lp] = 1
        if r:
            input_ids[b, Lp : Lp + len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, Lp : Lp + len(r)] = 1
            response_mask[b, Lp : Lp + len(r)] = True
    # positions from the mask, so a left-padded row sees the same positions as unpadded (spec §9.3, §9.4)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attention_mask, position_ids, response_mask, Lp)


def _prefix_tuning(model: nn.Module) -> tuple[nn.Module, int] | None:
    """``(inner HF model, n_virtual)`` for a peft prefix-tuning model, else None (without importing peft)."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or getattr(cfg, "peft_type", None) != "PREFIX_TUNING":  # PeftType is a str enum
        return None
    return model.get_base_model(), int(cfg.num_virtual_tokens)


@precision.under_lm_autocast
def lm_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    *,
    cache: Any = None,
    use_cache: bool = False,
    logits_to_keep: int = 0,
) -> Any:
    """One forward of a plain HF causal LM, a peft LoRA model or a peft prefix-tuning model.

    For prefix tuning we call the wrapped model ourselves: the prefix K/V go into the cache at positions
    0..n_virtual-1 and real tokens start at position n_virtual (peft's own convention, and the CLaP one in
    CONTRACT.md), and we keep control of the cache for incremental decoding, which peft's forward (it rebuilds
    the prefix cache on every call) does not allow. ``cache`` is the transformers>=5.24 name of
    ``past_key_values``.
    """
    prefix = _prefix_tuning(model)
    if prefix is not None:
        inner, n_virtual = prefix
        B = input_ids.shape[0]
        if cache is None:  # first call: seed the cache with the learned prefix K/V
            cache = model.get_prompt(B)
        # the caller's mask covers [earlier real tokens | new tokens]; prepend the always-visible prefix
        attention_mask = torch.cat([attention_mask.new_ones((B, n_virtual)), attention_mask], dim=1)
        return inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids + n_virtual,
            cache=cache,
            use_cache=True,  # the prefix lives in the cache; a fresh cache per call keeps this stateless
            logits_to_keep=logits_to_keep,
        )
    kwargs: dict[str, Any] = {}
    if cache is not None:
        kwargs["cache"] = cache
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_logps(model: nn.Module, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """Summed log p(response | prompt) per row; differentiable (no grad-mode changes here).

    Returns:
        logps (B,) float32 and lengths (B,) long, the number of response tokens scored.
    """
    device = _device_of(model)
    ids, mask, pos, resp = (t.to(device) for t in batch[:4])
    Lp = batch.prompt_len
    Lr = ids.shape[1] - Lp
    if Lr == 0:
        return torch.zeros(ids.shape[0], device=device), torch.zeros(ids.shape[0], dtype=torch.long, device=device)
    # Only the logits that predict response tokens (columns Lp-1 .. T-2) go through lm_head.
    out = lm_forward(model, ids, mask, pos, logits_to_keep=Lr + 1)
    logits = out.logits[:, :-1].float()  # (B, Lr, V), fp32 upcast (spec §9.5)
    targets = ids[:, Lp:]  # (B, Lr)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    keep = resp[:, Lp:]
    logps = (token_logps * keep).sum(-1)
    return logps, keep.sum(-1)


def sequence_logps(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    max_prompt_tokens: int = 64,
    max_response_tokens: int = 48,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Summed log p(response | prompt) over response tokens, for N (prompt, response) rows.

    The model's train/eval mode is left as is (callers wanting a deterministic reference use eval mode, as
    `reference_logps_cache` does). Rows are bucketed by length to cut padding; the output keeps input order.

    Args:
        requires_grad: False runs under ``torch.no_grad``; True keeps the graph (for training loops; prefer
            `batch_logps` on one pre-tokenised batch there).

    Returns:
        logps (N,) float32 and lengths (N,) long (response tokens after truncation), on the model's device.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = _device_of(model)
    N = len(prompts)
    if N == 0:
        return torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    p_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens=max_prompt_tokens)
    r_ids = encode_responses(tokenizer, responses, max_response_tokens=max_response_tokens)
    order = sorted(range(N), key=lambda i: (len(p_ids[i]), len(r_ids[i])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logps = torch.zeros(N, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    chunks_lp, chunks_idx = [], []
    with torch.set_grad_enabled(requires_grad):
        for start in range(0, N, batch_size):
            idx = order[start : start + batch_size]
            batch = collate([p_ids[i] for i in idx], [r_ids[i] for i in idx], pad_id=pad_id)
            lp, n = batch_logps(model, batch)
            chunks_lp.append(lp)
            chunks_idx.append(torch.tensor(idx, device=device))
            lengths[idx] = n
    index = torch.cat(chunks_idx)
    if requires_grad:  # scatter without in-place writes into a leaf, so autograd sees it
        logps = torch.zeros(N, device=device).index_add(0, index, torch.cat(chunks_lp))
    else:
        logps[index] = torch.cat(chunks_lp)
    return logps, lengths


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block, then the caller's mode back (we never leave a model we don't own changed)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def reference_logps_cache(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_prompt_tokens: int = 64,
    max_response_tokens: int = 48,
) -> dict[tuple[str, str], float]:
    """``{(prompt, response): log π_ref(response | prompt)}`` under ``model`` in eval mode, no grad.

    Reference log-probs do not depend on the user, so one table per (base model, truncation) serves every
    user's DPO fit (spec §8.6; the reference code recomputed them online, spec §3.9). Duplicates are scored once.
    The truncation arguments must match the ones the fit uses (`BaselineConfig`).
    """
    unique = list(dict.fromkeys((str(p), str(r)) for p, r in texts))
    if not unique:
        return {}
    with eval_mode(model):
        logps, _ = sequence_logps(
            model,
            tokenizer,
            [p for p, _ in unique],
            [r for _, r in unique],
            batch_size=batch_size,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
        )
    return dict(zip(unique, logps.cpu().tolist()))


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Exactly ``max_new_tokens`` new tokens per prompt (B, max_new_tokens), left-padded batch, KV cache.

    EOS is suppressed, the equivalent of HF ``min_new_tokens = max_new_tokens`` (the reference forced fixed
    lengths with ``min_length``, which only worked for its prompt lengths, spec §9.13). Positions continue from
    each row's own last real position, so padding never shifts them (spec §9.3a).
    """
    device = _device_of(model)
    batch = collate(prompt_ids, [[] for _ in prompt_ids], pad_id=pad_id)
    ids, mask, pos = batch.input_ids.to(device), batch.attention_mask.to(device), batch.position_ids.to(device)
    B = ids.shape[0]
    next_pos = pos[:, -1:] + 1  # (B, 1): the last column is every row's last real prompt token
    out_tokens = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
    cache = None
    step_ids, step_pos = ids, pos
    for t in range(max_new_tokens):
        out = lm_forward(model, step_ids, mask, step_pos, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1].float()  # (B, V)
        if eos_id is not None:
            logits[:, eos_id] = -math.inf
        if do_sample:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (B, 1)
        else:
            tok = logits.argmax(-1, keepdim=True)
        out_tokens[:, t] = tok[:, 0]
        step_ids, step_pos = tok, next_pos + t
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
    return out_tokens


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    top_k: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_tokens: int = 64,
) -> list[str]:
    """Continuations (new text only) of each prompt by a plain or peft (LoRA / prefix) HF causal LM.

    Runs in eval mode (restored afterwards). Sampling draws from a private generator seeded with ``seed``, so
    outputs are reproducible and the global RNG is untouched; a row's sample depends on its batch position.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling")
    device = _device_of(model)
    p_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens=max_prompt_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(seed) if do_sample else None
    texts: list[str] = []
    with eval_mode(model):
        for start in range(0, len(p_ids), batch_size):
            new = generate_ids(
                model,
                p_ids[start : start + batch_size],
                pad_id=pad_id,
                eos_id=tokenizer.eos_token_id,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                generator=generator,
            )
            texts.extend(tokenizer.batch_decode(new.cpu().tolist(), skip_special_tokens=True))
    return texts


# ----------------------------------------------------------------------------------------------------------
# Baseline fitting
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaselineConfig:
    """One per-user DPO baseline run (spec §5). Defaults are spec values for LoRA-DPO; see `for_method`."""

    method: Method = "lora_dpo"
    beta: float = 0.1  # spec §5: 0.1 IMDB/DailyDialog; P-Tuning-DPO and TL;DR use 0.5
    lr: float = 1e-5  # spec §5: LoRA 1e-5, full 1e-6, P-Tuning 1e-4; tiny random models need far more
    steps: int | None = None  # optimizer steps; when set it wins over epochs
    epochs: int = 1  # spec §5: 1 epoch over the user's pairs (ceil(n_pairs / batch_size) steps per epoch)
    batch_size: int = 8  # pairs per step (each step runs 2 * batch_size sequences)
    loss_type: LossType = "dpo"
    gamma: float = 0.0  # SimPO margin only
    lora_r: int = 8  # spec §5: r = alpha = 8, dropout 0
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: GPT-2 c_attn, Llama/GPT-J q_proj,v_proj
    num_virtual_tokens: int = 4  # spec §5: P-Tuning num_q = 4 prefix slots per layer
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # HF/DeepSpeed default clipping in the reference harness
    disable_dropout: bool = True  # policy forward in eval mode, as TRL's DPO default; ref is always eval
    max_prompt_tokens: int = 64  # spec §4.1 IMDB prompts <= 64 tokens
    max_response_tokens: int = 48  # spec §4.1 IMDB responses = 48 tokens
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in get_args(Method):
            raise ValueError(f"method={self.method!r}; expected one of {get_args(Method)}")
        if self.loss_type not in get_args(LossType):
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {get_args(LossType)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1 (or None to train for `epochs`)")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        for name in ("beta", "lr", "batch_size", "lora_r", "num_virtual_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str):  # a bare string would silently become a regex in peft
            object.__setattr__(self, "target_modules", (self.target_modules,))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def for_method(cls, method: Method, **overrides: Any) -> BaselineConfig:
        """Spec §5 lr / beta for ``method`` (LoRA 1e-5, full 1e-6, P-Tuning 1e-4 with beta 0.5), then overrides."""
        if method not in SPEC_DEFAULTS:
            raise ValueError(f"method={method!r}; expected one of {get_args(Method)}")
        return cls(method=method, **{**SPEC_DEFAULTS[method], **overrides})

    def n_steps(self, n_pairs: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(n_pairs / self.batch_size)


@dataclass
class BaselineResult:
    """A fitted per-user policy plus what the benchmark tables need (time, memory, artifact size)."""

    model: nn.Module  # policy in eval mode: peft-wrapped (LoRA / prefix; frozen base weights are *shared*
    #                   with the base model's storage, see `_frozen_view`) or a full copy (full DPO)
    method: str
    trainable_params: int
    total_params: int  # parameters the policy forward touches (base + adapter)
    loss_curve: list[float]
    margin_curve: list[float]  # mean implicit reward margin beta * (log-ratio_w - log-ratio_l) per step
    accuracy_curve: list[float]  # share of pairs in the step batch with a positive margin (ties half)
    seconds: float  # wall time of the whole fit, incl. any reference log-probs missing from the cache
    reference_seconds: float  # part of `seconds` spent on missing reference log-probs
    peak_rss_bytes: int  # peak RSS of the process (see `_PeakRSS`)
    peak_rss_scope: Literal["fit", "process"]  # "fit": high-water mark reset at the start; "process": lifetime
    peak_device_bytes: int | None  # torch.cuda.max_memory_allocated during the fit, None on CPU
    tokens: int  # real (unpadded) tokens through the policy forward, summed over steps
    flops: float  # `estimate_flops` for those tokens
    artifact_state: dict[str, Tensor] = field(repr=False)  # only the trained tensors, on CPU
    artifact_bytes: int = 0  # len(safetensors.torch.save(artifact_state))


def estimate_flops(n_params_trained: int, n_params_total: int, tokens: int, *, reference_tokens: int = 0) -> float:
    """Training FLOPs by the 6ND rule (Kaplan et al. 2020, arXiv 2001.08361 §2.1), split by what is trained.

    Per token: forward 2·N_total; backward through activations 2·N_total (a PEFT gradient still has to
    traverse the frozen layers); weight gradients 2·N_trained. Full fine-tuning gives the usual 6·N·D, LoRA or a
    prefix ≈ 4·N·D. Reference forwards (only when log-probs are not cached) add 2·N_total per token. Attention
    score FLOPs (∝ T²) are ignored, fine for the short sequences here.
    """
    if min(n_params_trained, n_params_total, tokens, reference_tokens) < 0:
        raise ValueError(
            f"counts must be >= 0: n_params_trained={n_params_trained}, n_params_total={n_params_total}, "
            f"tokens={tokens}, reference_tokens={reference_tokens}"
        )
    if n_params_trained > n_params_total:
        raise ValueError(f"n_params_trained={n_params_trained} > n_params_total={n_params_total}")
    return float((4 * n_params_total + 2 * n_params_trained) * tokens + 2 * n_params_total * reference_tokens)


class _PeakRSS:
    """Peak resident set size of this process over a block, in bytes.

    Linux lets a process reset its high-water mark (write "5" to /proc/self/clear_refs, kernel >= 4.0), so
    VmHWM then measures this block alone. Where that fails we fall back to ``ru_maxrss``, the peak over the
    whole process lifetime (an upper bound; `exact` says which one was measured).
    """

    def __enter__(self) -> _PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = self._vm_hwm() if self.exact else None
        if self.bytes is None:
            self.exact = False
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    @staticmethod
    def _vm_hwm() -> int | None:
        try:
            with open(f"/proc/{os.getpid()}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


def _frozen_view(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters share storage with it but are new, frozen Parameters.

    peft injects LoRA layers into the module tree and freezes every base parameter in place; doing that on
    this view leaves the caller's model (its modules and requires_grad flags) untouched, at the cost of the
    module objects and buffers only. Tied weights stay tied (one memo entry per Parameter object).
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _lora_targets(model: nn.Module, cfg: BaselineConfig) -> list[str] | None:
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    return _DEFAULT_LORA_TARGETS.get(getattr(model.config, "model_type", ""))  # None: peft's own defaults


def build_policy(base_model: nn.Module, cfg: BaselineConfig) -> nn.Module:
    """The trainable policy for ``cfg.method``; ``base_model`` is never modified."""
    if cfg.method == "full_dpo":
        policy = copy.deepcopy(base_model)
        policy.requires_grad_(True)
        return policy
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model  # lazy: 3 s import

    view = _frozen_view(base_model)
    if cfg.method == "lora_dpo":
        model_type = getattr(base_model.config, "model_type", "")
        peft_cfg = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=_lora_targets(base_model, cfg),
            fan_in_fan_out=model_type == "gpt2",  # GPT-2 c_attn is a transposed Conv1D
        )
    else:
        # peft prefix tuning learns the K/V of `num_virtual_tokens` slots per layer directly (no
        # reparametrisation), which works with GPT-2 and GQA Llama under transformers 5.24 / peft 0.21. The
        # paper's P-Tuning instead maps per-layer hidden states H_l through LN and a frozen attention copy
        # (spec §5: 55,296 params on GPT-2 small vs 73,728 here: 4 slots * 12 layers * 2 * 768).
        peft_cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    return get_peft_model(view, peft_cfg)


def trainable_state(policy: nn.Module, method: str) -> dict[str, Tensor]:
    """Only the trained tensors (the per-user artifact), detached CPU copies."""
    if method == "full_dpo":
        state = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    else:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(policy)
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


def artifact_to_bytes(state: Mapping[str, Tensor]) -> bytes:
    """The per-user artifact serialised with safetensors (what `BaselineResult.artifact_bytes` measures)."""
    from safetensors.torch import save

    return save(dict(state))


def _check_pairs(pairs: Sequence[Pair]) -> None:
    if not pairs:
        raise ValueError("pairs is empty: a DPO baseline needs at least one (prompt, chosen, rejected) pair")
    for i, pair in enumerate(pairs):
        if len(pair) != 3 or not all(isinstance(s, str) for s in pair):
            raise ValueError(f"pairs[{i}]={pair!r} must be a (prompt, chosen, rejected) tuple of strings")


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """``steps`` batches of pair indices; a fresh permutation each epoch, the last partial batch kept."""
    batch_size = min(batch_size, n)
    produced = 0
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]
            produced += 1
            if produced == steps:
                return


def _reference_logps(
    base_model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    cfg: BaselineConfig,
    ref_logps: Mapping[tuple[str, str], float] | None,
    init_adapter: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """(ref_chosen (N,), ref_rejected (N,), keys scored here): cache hits are free, misses are scored once by
    the frozen reference in eval mode (spec §8.6, §9.9): the base, or with ``init_adapter`` the PT-SFT model,
    built only when something is missing. SimPO is reference-free (SimPO Eq. 4): zeros, nothing scored.
    """
    table: dict[tuple[str, str], float] = dict(ref_logps or {})
    missing: list[tuple[str, str]] = []
    if cfg.loss_type != "simpo":
        needed = dict.fromkeys(key for p, c, r in pairs for key in ((p, c), (p, r)))
        missing = [key for key in needed if key not in table]
    if missing:
        log.info("computing %d reference log-probs missing from the cache", len(missing))
        reference = base_model if init_adapter is None else prefix_reference_model(base_model, init_adapter, cfg)
        table.update(
            reference_logps_cache(
                reference,
                tokenizer,
                missing,
                batch_size=2 * cfg.batch_size,
                max_prompt_tokens=cfg.max_prompt_tokens,
                max_response_tokens=cfg.max_response_tokens,
            )
        )
    ref_chosen = torch.tensor([table.get((p, c), 0.0) for p, c, _ in pairs], dtype=torch.float32)
    ref_rejected = torch.tensor([table.get((p, r), 0.0) for p, _, r in pairs], dtype=torch.float32)
    return ref_chosen, ref_rejected, missing


def dpo_step(
    policy: nn.Module,
    batch: SequenceBatch,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    cfg: BaselineConfig,
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    weights: Tensor | None = None,
) -> dict[str, float]:
    """One optimizer step of sequence-level DPO/IPO/SimPO (spec §3.9) on ``batch``.

    Args:
        batch: 2b rows, the b chosen responses first, then the b rejected ones (same prompts, same order).
        ref_chosen, ref_rejected: (b,) cached log π_ref (ignored by SimPO).
        weights: (b,) feedback weights of the pairs: the loss is their weighted mean (as the latent fits weigh
            each pair's terms), None = all 1.

    Returns:
        loss (batch mean), margin (mean implicit reward margin), accuracy (share of positive margins, ties half).
    """
    device = _device_of(policy)
    logps, lengths = batch_logps(policy, batch)  # (2b,)
    b = logps.shape[0] // 2
    out = sequence_dpo_loss(
        logps[:b],
        logps[b:],
        ref_chosen.to(device),
        ref_rejected.to(device),
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        gamma=cfg.gamma,
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
    )
    if weights is None:
        loss = out.losses.mean()
    else:
        w = weights.to(out.losses)
        loss = (out.losses * w).sum() / w.sum().clamp(min=1e-12)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    margin = out.chosen_rewards - out.rejected_rewards  # detached (b,)
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return {"loss": loss.item(), "margin": margin.mean().item(), "accuracy": accuracy.item()}


def fit_baseline(
    base_model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    cfg: BaselineConfig,
    *,
    ref_logps: Mapping[tuple[str, str], float] | None = None,
    init_adapter: Mapping[str, Tensor] | None = None,
    weights: Sequence[float] | None = None,
) -> BaselineResult:
    """Fit one user's DPO baseline (spec §5) on ``pairs`` and return the policy and its costs.

    DPO (Rafailov et al. 2023, arXiv 2305.18290) on summed response log-probs (spec §3.9); the reference is
    the frozen ``base_model`` in eval mode, its log-probs read from ``ref_logps`` (see
    `reference_logps_cache`) and computed here only for missing (prompt, response) keys. For P-Tuning-DPO pass the
    population prefix of `fit_prefix_sft` as ``init_adapter``: the policy starts from it and, as in the paper
    (spec §5: "PT-SFT model; ref = deepcopy"), the reference is that PT-SFT model, so ``ref_logps`` must then
    hold log-probs under it (`prefix_reference_model`). Without ``init_adapter`` the prefix starts random and
    the reference is the base LM.

    Raises:
        ValueError: empty or malformed ``pairs``; ``init_adapter`` for a method other than P-Tuning-DPO.
    """
    _check_pairs(pairs)
    if weights is not None:
        weight_t = torch.as_tensor(list(weights), dtype=torch.float32)
        if weight_t.shape != (len(pairs),) or not bool(torch.isfinite(weight_t).all()) or bool((weight_t < 0).any()):
            raise ValueError(f"weights must be {len(pairs)} finite numbers >= 0 (one per pair), got shape "
                             f"{tuple(weight_t.shape)}")
    else:
        weight_t = None
    if init_adapter is not None and cfg.method != "ptuning_dpo":
        raise ValueError(f"init_adapter (a PT-SFT prefix) only applies to ptuning_dpo, not {cfg.method!r}")
    t0 = time.perf_counter()
    device = _device_of(base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with _PeakRSS() as rss:
        t_ref = time.perf_counter()
        ref_chosen, ref_rejected, missing = _reference_logps(base_model, tokenizer, pairs, cfg, ref_logps,
                                                                 init_adapter)
        reference_seconds = time.perf_counter() - t_ref

        # peft initialises LoRA-A / prefix weights from the global RNG: seed it without leaking state.
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(cfg.seed)
            policy = build_policy(base_model, cfg)
        if init_adapter is not None:
            _load_adapter(policy, init_adapter)
        policy.to(device)
        # disable_dropout: eval mode only switches dropout off; gradients flow the same (TRL default; and a
        # noisy policy log-prob biases the sigmoid like the noisy reference of spec §9.9).
        policy.train(not cfg.disable_dropout)
        params = [p for p in policy.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in policy.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        prompt_ids = encode_prompts(tokenizer, [p for p, _, _ in pairs], max_prompt_tokens=cfg.max_prompt_tokens)
        chosen_ids = encode_responses(tokenizer, [c for _, c, _ in pairs], max_response_tokens=cfg.max_response_tokens)
        rejected_ids = encode_responses(
            tokenizer, [r for _, _, r in pairs], max_response_tokens=cfg.max_response_tokens
        )
        n_steps = cfg.n_steps(len(pairs))
        order_gen = torch.Generator().manual_seed(cfg.seed)
        losses, margins, accuracies, tokens = [], [], [], 0
        for idx in _batches(len(pairs), cfg.batch_size, n_steps, order_gen):
            # chosen and rejected in one forward (2b rows): one pass, one padding layout
            batch = collate(
                [prompt_ids[i] for i in idx] * 2,
                [chosen_ids[i] for i in idx] + [rejected_ids[i] for i in idx],
                pad_id=pad_id,
            )
            step = dpo_step(policy, batch, ref_chosen[idx], ref_rejected[idx], cfg, optimizer, params,
                            weights=None if weight_t is None else weight_t[idx])
            losses.append(step["loss"])
            margins.append(step["margin"])
            accuracies.append(step["accuracy"])
            tokens += int(batch.attention_mask.sum())
        policy.eval()  # ready for generation; trainable flags stay as peft set them
        state = trainable_state(policy, cfg.method)

    artifact_bytes = len(artifact_to_bytes(state))
    peak_device = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    seconds = time.perf_counter() - t0
    ref_tokens = _count_tokens(tokenizer, missing, cfg) if missing else 0
    log.info(
        "%s: %d pairs, %d steps, %.2fs, final loss %.4f, %d trainable params, artifact %d bytes",
        cfg.method, len(pairs), n_steps, seconds, losses[-1], trainable, artifact_bytes,
    )
    return BaselineResult(
        model=policy,
        method=cfg.method,
        trainable_params=trainable,
        total_params=total,
        loss_curve=losses,
        margin_curve=margins,
        accuracy_curve=accuracies,
        seconds=seconds,
        reference_seconds=reference_seconds,
        peak_rss_bytes=int(rss.bytes),
        peak_rss_scope="fit" if rss.exact else "process",
        peak_device_bytes=peak_device,
        tokens=tokens,
        flops=estimate_flops(trainable, total, tokens, reference_tokens=ref_tokens),
        artifact_state=state,
        artifact_bytes=artifact_bytes,
    )


def _load_adapter(policy: nn.Module, state: Mapping[str, Tensor]) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(policy, dict(state))
    # peft reports prefix embeddings as "unexpected" even when it loads them: check what actually landed
    loaded = get_peft_model_state_dict(policy)
    if loaded.keys() != state.keys() or any(not torch.equal(loaded[k].cpu(), state[k].cpu()) for k in state):
        raise ValueError(f"init_adapter {sorted(state)} does not fit this policy's adapter {sorted(loaded)}")


def prefix_reference_model(base_model: nn.Module, adapter: Mapping[str, Tensor], cfg: BaselineConfig) -> nn.Module:
    """The frozen PT-SFT model (base LM + population prefix) in eval mode: P-Tuning-DPO's reference (spec §5)."""
    with torch.random.fork_rng(devices=[]):
        model = build_policy(base_model, BaselineConfig(method="ptuning_dpo", num_virtual_tokens=cfg.num_virtual_tokens))
    _load_adapter(model, adapter)
    model.requires_grad_(False)
    return model.to(_device_of(base_model)).eval()


@dataclass(frozen=True)
class PrefixSFTResult:
    state: dict[str, Tensor]  # the population prefix (peft state dict): init and reference of every P-Tuning-DPO
    loss_curve: list[float]
    seconds: float


def fit_prefix_sft(
    base_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[tuple[str, str]],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    num_virtual_tokens: int = 4,
    max_prompt_tokens: int = 64,
    max_response_tokens: int = 48,
    seed: int = 0,
) -> PrefixSFTResult:
    """P-Tuning-SFT (spec §5, lr 1e-3): one population prefix trained by token NLL on (prompt, response) texts.

    User-independent, so it is fitted once per night and shared: every user's P-Tuning-DPO starts from it and
    uses it as the reference, whose log-probs are therefore cacheable like the base LM's.

    Raises:
        ValueError: no texts, or steps < 1.
    """
    if not texts:
        raise ValueError("fit_prefix_sft needs at least one (prompt, response) text")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    t0 = time.perf_counter()
    cfg = BaselineConfig(method="ptuning_dpo", num_virtual_tokens=num_virtual_tokens,
                         max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = build_policy(base_model, cfg)
    policy.to(_device_of(base_model)).eval()  # dropout off, as in the DPO fits
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    p_ids = encode_prompts(tokenizer, [t[0] for t in texts], max_prompt_tokens=max_prompt_tokens)
    r_ids = encode_responses(tokenizer, [t[1] for t in texts], max_response_tokens=max_response_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order_gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for idx in _batches(len(texts), batch_size, steps, order_gen):
        batch = collate([p_ids[i] for i in idx], [r_ids[i] for i in idx], pad_id=pad_id)
        logps, lengths = batch_logps(policy, batch)
        loss = -logps.sum() / lengths.sum().clamp(min=1)  # mean token NLL of the batch's response tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    state = trainable_state(policy, "ptuning_dpo")
    log.info("P-Tuning-SFT: %d texts, %d steps, NLL %.3f -> %.3f", len(texts), steps, losses[0], losses[-1])
    return PrefixSFTResult(state, losses, time.perf_counter() - t0)


def _count_tokens(tokenizer: Any, texts: Sequence[tuple[str, str]], cfg: BaselineConfig) -> int:
    p = encode_prompts(tokenizer, [t[0] for t in texts], max_prompt_tokens=cfg.max_prompt_tokens)
    r = encode_responses(tokenizer, [t[1] for t in texts], max_response_tokens=cfg.max_response_tokens)
    return sum(len(a) + len(b) for a, b in zip(p, r))
