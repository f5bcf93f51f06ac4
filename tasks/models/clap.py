"""CLaP: latent encoder q(z|x,y), latent adapter p(y|x,z) (per-layer K/V prefix) and the shared base LM.

Spec: shared/spec/latent-dpo.md §2 (architecture), §3.4 (gradient-only skip), §9 (reference-code bugs we
avoid). Paper: Zhang et al., COLING 2025, https://arxiv.org/abs/2412.20834. Works for GPT-2 and Llama-family
bases (detected from `config.model_type`). All padding is explicit: callers pass attention masks; positions are
computed from the masks, never from token ids (spec §9.3, §9.4). `CLaPConfig.latent_type="discrete"` swaps the
Gaussian head for K code logits plus a codebook (LPC, spec lpc.md §6.3): z = expected code vector, fed to the same
adapter, so everything downstream of z is shared by both latent types.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from latentpref.tasks.models import precision
from latentpref.tasks.models.lpc import PairPosterior

log = logging.getLogger(__name__)

_GPT2_TYPES = ("gpt2",)
_LLAMA_TYPES = ("llama",)  # k_proj/v_proj + rotary_emb; other llama-like types are untested, so not admitted
WEIGHTS_FILE = "clap.safetensors"
CONFIG_FILE = "clap_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
# bumped when the same config builds a differently shaped/initialised adapter (part of the CLaP version, so a
# night retrains instead of loading a checkpoint of the old layout). 2: the anchored prefix lives after the norm.
ADAPTER_LAYOUT = 2
LATENT_TYPES = ("gaussian", "discrete")
PREFIX_INITS = ("random", "anchor")


@dataclass(frozen=True)
class CLaPConfig:
    latent_dim: int = 32  # reference `dim_z` (spec §2.1)
    n_query: int = 4  # reference `num_q`: each query emits latent_dim / n_query means + log-variances
    n_prefix: int = 4  # reference `num_p`: prefix K/V slots per LM layer
    encoder_layers: int = 2  # reference `latent_aggregator_layers`: copies of base blocks 0..L-1
    posterior_reads_prompt: bool = True  # reference `post_with_x` (train_vae default 1): q(z|x,y) reads [x; y]
    skip_connection: bool = True  # build the gradient-only skip MLP (spec §2.4, §3.4)
    # "gaussian": q(z|x,y) is a diagonal Gaussian (latent-dpo.md). "discrete": K code logits, z = expected code
    # vector of a shared codebook (LPC, lpc.md §6.3); same adapter, same prefix injection either way
    latent_type: str = "gaussian"
    n_codes: int = 32  # K, discrete only: lpc.md §2.2 finds 32-64 best (one configuration)
    # How the adapter starts. "random": the spec's fresh LN + MLP (§2.3); right for random tiny bases. "anchor":
    # for pretrained bases, each layer's prefix starts as the base's own hidden state of one real token (the BOS /
    # attention-sink state entering that layer, through a copy of the layer's pre-attention norm) plus a small
    # z-dependent part, so CLaP with any z starts at the base LM's NLL. Measured on SmolLM2-135M: "random"
    # starts at 14.9 nats/token against the plain LM's 3.62 (the LN'd random prefix gives keys of norm ~75 that
    # take the attention of every layer); "anchor" starts at 3.73.
    # The anchored prefix lives in the *normalised* space (the K/V projections' input): SmolLM2's BOS residual
    # stream has rms ~1,000 (max ~25,000: the attention-sink "massive activation") from layer 12 on, so a z-part
    # added before the norm moved the normalised prefix by ~1e-5 there and Adam's steps could not change that:
    # z reached layer 0 only and stage 1 ended with 0-2 active units.
    prefix_init: str = "random"
    anchor_scale: float = 0.005  # "anchor" only: init std of the z-dependent part's last Linear
    # "anchor" only: False rebuilds the layout-1 adapter (anchor before the norm) of CLaPs saved before it changed
    anchor_normed: bool = True
    # Standardise the encoder's query features per element with statistics of real inputs (`calibrate_features`,
    # run once before CLaP training). On SmolLM2 the features' spread across different (x, y) is 7% of their
    # scale (the copied blocks' queries mostly read the attention sink), so the zero-initialised head (spec §2.2)
    # gives every response the same posterior for dozens of steps: stage 1 ended with 0 active units of 32.
    feature_norm: bool = False
    # Add the masked mean of the encoder's (normalised) token states to every query's output. The spec's queries
    # sit after the last token and, two copied blocks deep, mostly read the attention sink: on SmolLM2 a ridge probe
    # from the trained posterior's features to a response's sentiment (within a prompt) reached corr 0.10, from
    # the mean-pooled token states of the same depth 0.39. What a user prefers (tone, length, wording) is spread
    # over the response, so the posterior needs the pooled view to carry it.
    pool_tokens: bool = False
    # Bag-of-words head z -> vocabulary logits (Zhao et al. 2017, "Learning discourse-level diversity ... CVAE"),
    # trained by ClapObjective's `bow_weight` term: predicting every response token from z alone. With the LM NLL
    # only, KL pressure leaves z with whatever helps the *next* tokens most: on SmolLM2 the stage-1 posterior
    # encoded the response's first token, while what a user prefers (tone, wording) is spread over all of it.
    bow_head: bool = False
    # Gaussian only (issue 28): the first `preference_dims` coordinates of the posterior mean are the text's position
    # in the population preference space (tasks/models/preference_space.py: top directions of every population
    # user's read-out of the base LM's states after `preference_layer` blocks, mean over the response), fixed before
    # training by `set_preference_space`, with posterior std `preference_std`. The LM is then trained to write text
    # at a given position of that space, and a user's latent DPO fit places them in it. 0 = off (the spec's CLaP).
    preference_dims: int = 0
    preference_layer: int = 8
    preference_std: float = 0.1
    # Gaussian only (issue 28, lever 2): rank of the *follow* adapter, a second z -> prefix map added to every
    # layer's prefix and trained after stages 1-2 (tasks/train/follow.py) with DPO through the frozen LM, so that a
    # population user's latent makes the LM prefer that user's chosen responses. It reads the preference space's
    # coordinates (z[:, :preference_dims]; all of z without a space) and is exactly zero at z = 0
    # (`FollowAdapter`), so the prior's text, the reference of every latent LM check, is untouched. 0 = off.
    follow_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "n_query", "n_prefix", "encoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"CLaPConfig.{name}={getattr(self, name)} must be >= 1")
        if self.latent_type not in LATENT_TYPES:
            raise ValueError(f"CLaPConfig.latent_type={self.latent_type!r}; expected one of {LATENT_TYPES}")
        if self.n_codes < 2:
            raise ValueError(f"CLaPConfig.n_codes={self.n_codes} must be >= 2 (a codebook of one code carries no "
                             "information)")
        if self.prefix_init not in PREFIX_INITS:
            raise ValueError(f"CLaPConfig.prefix_init={self.prefix_init!r}; expected one of {PREFIX_INITS}")
        if not self.anchor_scale > 0:
            raise ValueError(f"CLaPConfig.anchor_scale={self.anchor_scale} must be > 0")
        if not 0 <= self.preference_dims <= self.latent_dim:
            raise ValueError(f"CLaPConfig.preference_dims={self.preference_dims} must be in [0, latent_dim]")
        if self.preference_dims and self.latent_type != "gaussian":
            raise ValueError("CLaPConfig.preference_dims needs latent_type='gaussian'")
        if self.preference_dims and not (self.preference_layer >= 1 and self.preference_std > 0):
            raise ValueError(f"CLaPConfig.preference_layer={self.preference_layer} must be >= 1 and "
                             f"preference_std={self.preference_std} > 0")
        if self.follow_rank < 0 or (self.follow_rank and self.latent_type != "gaussian"):
            raise ValueError(f"CLaPConfig.follow_rank={self.follow_rank} must be >= 0, and > 0 only for "
                             "latent_type='gaussian' (its z = 0 is the prior)")
        if self.latent_dim % self.n_query:
            raise ValueError(
                f"CLaPConfig.latent_dim={self.latent_dim} must be divisible by n_query={self.n_query} "
                "(latent dims are grouped per query, spec §2.2)"
            )


# ------------------------------------------------------------------------------------------------ base access
def _kind(config) -> str:
    if config.model_type in _GPT2_TYPES:
        return "gpt2"
    if config.model_type in _LLAMA_TYPES:
        return "llama"
    raise ValueError(
        f"base model_type {config.model_type!r} is not supported; expected one of {_GPT2_TYPES + _LLAMA_TYPES}"
    )


def _blocks(body: nn.Module, kind: str) -> nn.ModuleList:
    return body.h if kind == "gpt2" else body.layers


def _kv_geometry(base_lm: PreTrainedModel) -> tuple[int, int, int]:
    """(hidden size d, number of KV heads, head dim) of the base."""
    c = base_lm.config
    d, heads = c.hidden_size, c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    return d, kv_heads, head_dim


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _positions(mask: Tensor, offset: int = 0) -> Tensor:
    """Position ids from a 0/1 mask (B, T): real tokens get offset, offset+1, ...; pads get a valid dummy."""
    return offset + (mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_padding(mask: Tensor, side: str, what: str) -> None:
    m = mask.long()
    bad = (m[:, 1:] < m[:, :-1]) if side == "left" else (m[:, 1:] > m[:, :-1])
    rows = bad.any(-1).nonzero().flatten().tolist()
    if rows:
        example = "0 0 1 1" if side == "left" else "1 1 0 0"
        raise ValueError(
            f"{what} must be {side}-padded (like {example}); rows {rows[:8]} are not, e.g. {m[rows[0]].tolist()}"
        )


def _check_z(z: Tensor | None, batch: int, latent_dim: int) -> None:
    if z is not None and tuple(z.shape) != (batch, latent_dim):
        raise ValueError(f"z has shape {tuple(z.shape)}; expected ({batch}, {latent_dim})")


# ------------------------------------------------------------------------------------------------ encoder
class LatentEncoder(nn.Module):
    """Latent aggregator: learned queries read a token sequence through copies of the base's first blocks.

    Spec §2.2: `h = LN_in([wte(ids); Q])`, `encoder_layers` copied base blocks, `LN_out(h[:, -n_query:])`, shared
    head Linear(d, 2·latent_dim/n_query): dims of query q are latent dims q·k..(q+1)·k-1 (k = latent_dim/n_query).
    Unlike the reference (spec §9.3, §9.4) the encoder gets explicit positions from the attention mask (copied
    GPT-2 `wpe`; rotary for Llama), so any padding layout encodes identically.
    """

    def __init__(self, base_lm: PreTrainedModel, cfg: CLaPConfig) -> None:
        super().__init__()
        self.kind = _kind(base_lm.config)
        self.cfg = cfg
        body = base_lm.base_model
        blocks = _blocks(body, self.kind)
        if cfg.encoder_layers > len(blocks):
            raise ValueError(f"CLaPConfig.encoder_layers={cfg.encoder_layers} > base layers {len(blocks)}")
        d = base_lm.config.hidden_size
        self.wte = copy.deepcopy(body.get_input_embeddings())
        self.wpe = copy.deepcopy(body.wpe) if self.kind == "gpt2" else None
        self.rotary = copy.deepcopy(body.rotary_emb) if self.kind == "llama" else None
        self.blocks = nn.ModuleList(copy.deepcopy(blocks[i]) for i in range(cfg.encoder_layers))
        self.queries = nn.Parameter(torch.randn(cfg.n_query, d) * 0.02)  # (Q, C), spec §2.2 N(0, 0.02)
        self.ln_in = nn.LayerNorm(d)
        self.ln_out = nn.LayerNorm(d)
        self.ln_pool = nn.LayerNorm(d) if cfg.pool_tokens else None
        if cfg.latent_type == "gaussian":
            self.h2z = nn.Linear(d, 2 * cfg.latent_dim // cfg.n_query)
        else:
            # discrete (lpc.md §6.3): pooled query features -> K code logits; the codebook lives here too, so the
            # encoder alone maps a prompt to its latent z (UserPolicy.latent(encoder, ...) for both types).
            # Codes start as N(0, I) draws: the adapter sees latents on the scale of the Gaussian prior
            self.h2k = nn.Linear(d, cfg.n_codes)
            self.codebook = nn.Parameter(torch.randn(cfg.n_codes, cfg.latent_dim))   # (K, D)
        self.to(self.wte.weight.dtype)  # new parts follow the base dtype; the head still computes in fp32
        if cfg.feature_norm:   # fp32 statistics, identity until `calibrate_features`
            self.register_buffer("feature_mean", torch.zeros(cfg.n_query, d))
            self.register_buffer("feature_std", torch.ones(cfg.n_query, d))

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Query outputs after LN_out (standardised when `feature_norm`), the input of the Gaussian head.

        Args:
            input_ids: (B, T) token ids, any padding layout (left, right or interior pads).
            attention_mask: (B, T) 1 = real token, 0 = pad.
        Returns:
            (B, n_query, d) float32.
        """
        with precision.lm_autocast(input_ids.device):
            h = self._features(input_ids, attention_mask).float()
        if self.cfg.feature_norm:
            h = (h - self.feature_mean.float()) / self.feature_std.float()
        return h

    @torch.no_grad()
    def calibrate_features(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Set the `feature_norm` statistics to the mean and std over these inputs (rows = real (x, y) sequences,
        ideally a few dozen): afterwards their features have zero mean and unit spread per element."""
        if not self.cfg.feature_norm:
            raise ValueError("calibrate_features needs CLaPConfig.feature_norm=True")
        if input_ids.shape[0] < 2:
            raise ValueError(f"calibrate_features needs >= 2 rows to measure a spread; got {input_ids.shape[0]}")
        with precision.lm_autocast(input_ids.device):
            h = self._features(input_ids, attention_mask).float()
        self.feature_mean.copy_(h.mean(0))
        self.feature_std.copy_(h.std(0).clamp(min=1e-3))

    def _features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        B, T = input_ids.shape
        Q = self.cfg.n_query
        mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, Q, dtype=torch.bool)], dim=1)
        pos = _positions(mask)  # queries sit right after the last real token, whatever the padding
        x = torch.cat([self.wte(input_ids), self.queries.to(self.wte.weight.dtype).expand(B, Q, -1)], dim=1)
        if self.wpe is not None:
            if T + Q > self.wpe.num_embeddings:
                n = self.wpe.num_embeddings
                raise ValueError(f"encoder input of {T} tokens + {Q} queries exceeds the {n} GPT-2 positions")
            x = x + self.wpe(pos)
        h = self.ln_in(x)  # (B, T+Q, C)
        # causal + key padding; each position may always see itself so pad rows never go fully masked (no NaN)
        L = T + Q
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        allowed = (causal & mask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=h.device)
        bias = torch.zeros(B, 1, L, L, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
        if self.kind == "gpt2":
            for block in self.blocks:
                h = block(h, attention_mask=bias)
        else:
            rope = self.rotary(h, pos)
            for block in self.blocks:
                h = block(h, attention_mask=bias, position_ids=pos, position_embeddings=rope)
        out = self.ln_out(h[:, -Q:])
        if self.ln_pool is not None:
            # per-token LayerNorm first: the pooled view is not dominated by a few high-norm (attention-sink) states
            real = attention_mask[..., None].to(h.dtype)                                     # (B, T, 1)
            pooled = (self.ln_pool(h[:, :T]) * real).sum(1) / real.sum(1).clamp(min=1.0)     # (B, C)
            out = out + pooled[:, None]
        return out

    @property
    def discrete(self) -> bool:
        return self.cfg.latent_type == "discrete"

    def head(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Gaussian head in fp32 (spec §9.5): features (B, Q, C) -> (mu, logvar), each (B, latent_dim)."""
        if self.discrete:
            raise ValueError("latent_type='discrete' encoders have no Gaussian head: use code_logits(features) "
                             "and code_latent(probs)")
        B = features.shape[0]
        k = self.cfg.latent_dim // self.cfg.n_query
        with precision.fp32():
            out = F.linear(features.float(), self.h2z.weight.float(), self.h2z.bias.float())  # (B, Q, 2k)
        return out[..., :k].reshape(B, -1), out[..., k:].reshape(B, -1)

    def code_logits(self, features: Tensor) -> Tensor:
        """Discrete head in fp32: features (B, Q, C) -> mean over queries -> (B, n_codes) code logits."""
        if not self.discrete:
            raise ValueError("code_logits needs latent_type='discrete'; this encoder is Gaussian (use head)")
        pooled = features.float().mean(1)                                                   # (B, C)
        with precision.fp32():
            return F.linear(pooled, self.h2k.weight.float(), self.h2k.bias.float())

    def code_latent(self, probs: Tensor) -> Tensor:
        """z = probs @ codebook in fp32: (..., n_codes) code weights -> (..., latent_dim) (lpc.md §2.3)."""
        if not self.discrete:
            raise ValueError("code_latent needs latent_type='discrete'; this encoder is Gaussian")
        with precision.fp32():
            return probs.float() @ self.codebook.float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each (B, latent_dim) float32 (Gaussian encoders; discrete ones: `code_logits`)."""
        return self.head(self.features(input_ids, attention_mask))

    @torch.no_grad()
    def standardize(self) -> None:
        """Zero the head so the encoder outputs exactly N(0, I) (spec §2.2; CLaP init and Latent-DPO init); for a
        discrete encoder, uniform code probabilities (the codebook is kept)."""
        head = self.h2k if self.discrete else self.h2z
        head.weight.zero_()
        head.bias.zero_()


# ------------------------------------------------------------------------------------------------ adapter
class LatentAdapter(nn.Module):
    """z -> per-layer prefix (key, value), spec §2.3 (reference `LatentDecoder`).

    Layer l: `H_l = LN_l(reshape(Linear(d -> P·d)(GELU(Linear(latent_dim -> d)(z))), [B, P, d]))`, then K/V from a
    separate (freezable) copy of layer l's K/V projections. K/V are computed explicitly rather than taken from the
    attention module's `present` (spec §9.15); Llama keys get rotary at positions 0..P-1 so real tokens start at P.
    """

    def __init__(self, base_lm: PreTrainedModel, cfg: CLaPConfig) -> None:
        super().__init__()
        self.kind = _kind(base_lm.config)
        self.cfg = cfg
        body = base_lm.base_model
        d, self.n_kv_heads, self.head_dim = _kv_geometry(base_lm)
        P = cfg.n_prefix
        blocks = _blocks(body, self.kind)
        self.z2h = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.latent_dim, d), nn.GELU(), nn.Linear(d, P * d)) for _ in blocks
        )
        if cfg.prefix_init == "anchor" and not cfg.anchor_normed:   # layout 1 (loading old checkpoints)
            self.ln = nn.ModuleList(copy.deepcopy(_pre_attention_norm(block, self.kind)) for block in blocks)
        elif cfg.prefix_init == "anchor":
            # no norm after the MLP: its bias starts at the anchor token's *normalised* state (see _anchor), so the
            # z-dependent part is on the scale of what the K/V projections read, in every layer
            self.ln = nn.ModuleList(nn.Identity() for _ in blocks)
        else:
            self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in blocks)
        self.k_proj = nn.ModuleList()
        self.v_proj = nn.ModuleList()
        for block in blocks:
            if self.kind == "gpt2":
                k, v = _gpt2_kv_linears(block.attn.c_attn, d)
            else:
                k, v = copy.deepcopy(block.self_attn.k_proj), copy.deepcopy(block.self_attn.v_proj)
            self.k_proj.append(k)
            self.v_proj.append(v)
        self.rotary = copy.deepcopy(body.rotary_emb) if self.kind == "llama" else None
        self.follow = None
        if cfg.follow_rank:
            # its own random stream: every other part of a CLaP with a follow adapter starts exactly as without one
            # (the follow stage's ablations share stages 1-2)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.follow_rank)
                self.follow = FollowAdapter(cfg.preference_dims or cfg.latent_dim, cfg.follow_rank, len(blocks),
                                            P * d)
        self.to(next(base_lm.parameters()).dtype)
        if cfg.prefix_init == "anchor":
            self._anchor(base_lm, blocks)

    @torch.no_grad()
    def _anchor(self, base_lm: PreTrainedModel, blocks: nn.ModuleList) -> None:
        """Start every layer's prefix at the base's hidden state of a lone BOS token entering that layer (the state
        whose K/V the base itself attends to as its attention sink) after the layer's own pre-attention norm
        (GPT-2 ln_1, Llama input_layernorm), plus a small z-dependent part."""
        c = base_lm.config
        token = c.bos_token_id if c.bos_token_id is not None else (c.eos_token_id or 0)
        p = next(base_lm.parameters())
        ids = torch.tensor([[int(token)]], device=p.device)
        out = base_lm.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        P = self.cfg.n_prefix
        for layer, (z2h, block) in enumerate(zip(self.z2h, blocks)):
            entering = out.hidden_states[layer][0, 0]  # (d,) residual stream entering `layer`
            if self.cfg.anchor_normed:
                entering = _pre_attention_norm(block, self.kind)(entering)
            anchor = entering.to(z2h[2].bias.dtype)
            z2h[2].bias.copy_(anchor.repeat(P))
            nn.init.normal_(z2h[2].weight, std=self.cfg.anchor_scale)

    def attention_copies(self) -> list[nn.Module]:
        """The K/V projection copies (frozen together with the base in CLaP stage 1, spec §2.5)."""
        return [self.k_proj, self.v_proj]

    def forward(self, z: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Args: z (B, latent_dim). Returns per layer (key, value), each (B, n_kv_heads, n_prefix, head_dim)."""
        B, P = z.shape[0], self.cfg.n_prefix
        dtype = self.k_proj[0].weight.dtype
        z = z.to(dtype)
        rope = None
        if self.rotary is not None:
            pos = torch.arange(P, device=z.device)[None]  # prefix occupies positions 0..P-1
            cos, sin = self.rotary(z, pos)  # (1, P, head_dim)
            rope = cos[:, None], sin[:, None]
        follow = self.follow(z) if self.follow is not None else None   # (L, B, P*C)
        prefix = []
        for layer, (z2h, ln, k_proj, v_proj) in enumerate(zip(self.z2h, self.ln, self.k_proj, self.v_proj)):
            h = ln(z2h(z).view(B, P, -1))  # (B, P, C)
            if follow is not None:
                h = h + follow[layer].view(B, P, -1)
            k = k_proj(h).view(B, P, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, P, hd)
            v = v_proj(h).view(B, P, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if rope is not None:
                k = k * rope[0] + _rotate_half(k) * rope[1]
            prefix.append((k, v))
        return prefix


class FollowAdapter(nn.Module):
    """delta_l(z) = W_l (GELU(A z + b) - GELU(b)): a rank-r map from z to every layer's prefix states (before the K/V
    projections), zero at z = 0 for any weights, and zero everywhere at initialisation (W = 0). Added to the
    adapter's prefix, it changes what a latent away from the prior makes the LM write, never the prior's text."""

    def __init__(self, in_dims: int, rank: int, n_layers: int, width: int) -> None:
        super().__init__()
        self.in_dims = in_dims     # reads z[:, :in_dims] (the preference space's coordinates when it has one)
        self.inner = nn.Linear(in_dims, rank)
        self.out = nn.Parameter(torch.zeros(n_layers, rank, width))

    def forward(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (n_layers, B, width)."""
        g = F.gelu(self.inner(z[:, :self.in_dims])) - F.gelu(self.inner.bias)
        return torch.einsum("br,lrw->lbw", g, self.out)


def _pre_attention_norm(block: nn.Module, kind: str) -> nn.Module:
    return block.ln_1 if kind == "gpt2" else block.input_layernorm


def _gpt2_kv_linears(c_attn: nn.Module, d: int) -> tuple[nn.Linear, nn.Linear]:
    """Copy the K and V slices of GPT-2's fused Conv1D c_attn (weight (d, 3d): x @ W + b) into two Linears."""
    out = []
    for i in (1, 2):  # q = 0, k = 1, v = 2
        lin = nn.Linear(d, d, dtype=c_attn.weight.dtype, device=c_attn.weight.device)
        with torch.no_grad():
            lin.weight.copy_(c_attn.weight[:, i * d : (i + 1) * d].T)
            lin.bias.copy_(c_attn.bias[i * d : (i + 1) * d])
        out.append(lin)
    return out[0], out[1]


class SkipMLP(nn.Module):
    """S(z) = LN_noaffine(Linear(d <- d)(GELU(Linear(d <- latent_dim)(z)))), spec §2.4."""

    def __init__(self, latent_dim: int, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, z: Tensor) -> Tensor:
        h = self.net(z.to(self.net[0].weight.dtype))
        return F.layer_norm(h, h.shape[-1:])


# ------------------------------------------------------------------------------------------------ CLaP
class CLaP(nn.Module):
    """Base LM + posterior encoder q(z|x,y) + latent adapter + skip MLP (reference `GPT2ForVAE`, spec §2.5).

    Layout for every LM call: [prefix (n_prefix slots in the cache) ; left-padded prompt ; right-padded response].
    The prefix takes positions 0..n_prefix-1 and real tokens start at n_prefix; positions come from the masks.
    """

    def __init__(self, base_lm: PreTrainedModel, cfg: CLaPConfig | None = None, *, base_spec: str | None = None):
        super().__init__()
        self.cfg = cfg or CLaPConfig()
        self.kind = _kind(base_lm.config)
        self.base_spec = base_spec
        self.base_lm = base_lm
        self.encoder = LatentEncoder(base_lm, self.cfg)
        self.encoder.standardize()  # CLaP starts from q = N(0, I) (spec §2.2)
        self.adapter = LatentAdapter(base_lm, self.cfg)
        d = base_lm.config.hidden_size
        self.skip = SkipMLP(self.cfg.latent_dim, d) if self.cfg.skip_connection else None
        # LPC pair posterior q(k|x, y_w > y_l) (lpc.md §2.4), trained by the LPC pair objective in pretraining
        self.pair_posterior = PairPosterior(d, self.cfg.n_codes) if self.discrete else None
        vocab = base_lm.get_output_embeddings().weight.shape[0]
        self.bow = nn.Linear(self.cfg.latent_dim, vocab) if self.cfg.bow_head else None
        p = next(base_lm.parameters())
        self.to(device=p.device, dtype=p.dtype)
        if self.cfg.preference_dims:   # fp32 buffers (saved with the model); identity-free zeros until set
            r = self.cfg.preference_dims
            self.register_buffer("preference_directions", torch.zeros(r, d, device=p.device))
            self.register_buffer("preference_mean", torch.zeros(d, device=p.device))
            self.register_buffer("preference_scale", torch.ones(r, device=p.device))

    @property
    def discrete(self) -> bool:
        return self.cfg.latent_type == "discrete"

    def bow_nll(self, z: Tensor, response_ids: Tensor, response_mask: Tensor) -> Tensor:
        """Bag-of-words NLL, fp32: -sum_t log softmax(W z)[y_t] over each response's real tokens -> (B,).

        Raises:
            ValueError: the CLaP was built without `bow_head`.
        """
        if self.bow is None:
            raise ValueError("bow_nll needs CLaPConfig.bow_head=True (this CLaP has no bag-of-words head)")
        with precision.fp32():
            logp = F.linear(z.float(), self.bow.weight.float(), self.bow.bias.float()).log_softmax(-1)  # (B, V)
        picked = logp.gather(1, response_ids)                                                           # (B, T)
        return -(picked * response_mask.to(picked.dtype)).sum(1)

    @property
    def max_positions(self) -> int | None:
        c = self.base_lm.config
        return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)

    # -------------------------------------------------------------------------------------------- encoder side
    def encode(
        self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Posterior q(z|x,y): (mu, logvar), each (B, latent_dim) float32.

        Reads [prompt; response] when `posterior_reads_prompt` (interior pads are fine: positions come from the
        concatenated mask, spec §9.3b), else the response only.

        Raises:
            ValueError: a discrete CLaP (use `encode_logits`).
        """
        if self.discrete:
            raise ValueError("CLaP.encode returns a Gaussian posterior; this CLaP has latent_type='discrete': use "
                             "encode_logits (code posterior) and encoder.code_latent")
        mu, logvar = self.encoder.head(self.posterior_features(prompt_ids, prompt_mask, response_ids, response_mask))
        r = self.cfg.preference_dims
        if r:
            coords = self.preference_coords(prompt_ids, prompt_mask, response_ids, response_mask)
            mu = torch.cat([coords, mu[:, r:]], dim=1)
            logvar = torch.cat([torch.full_like(coords, 2 * math.log(self.cfg.preference_std)), logvar[:, r:]], dim=1)
        return mu, logvar

    @torch.no_grad()
    def preference_coords(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                          response_mask: Tensor) -> Tensor:
        """The response's position in the population preference space: (B, preference_dims) float32."""
        from latentpref.tasks.models.preference_space import pooled_states
        states = pooled_states(self.base_lm, prompt_ids, prompt_mask, response_ids, response_mask,
                               self.cfg.preference_layer)
        return (((states - self.preference_mean.float()) @ self.preference_directions.float().T)
                / self.preference_scale.float())

    @torch.no_grad()
    def set_preference_space(self, space) -> None:
        """Fix the population preference space (a `preference_space.PreferenceSpace` of this CLaP's dims/layer)."""
        r = self.cfg.preference_dims
        if not r:
            raise ValueError("set_preference_space needs CLaPConfig.preference_dims > 0")
        if tuple(space.directions.shape) != tuple(self.preference_directions.shape) or \
                space.layer != self.cfg.preference_layer:
            raise ValueError(f"preference space of shape {tuple(space.directions.shape)} at layer {space.layer} does "
                             f"not fit this CLaP ({r} dims at layer {self.cfg.preference_layer})")
        self.preference_directions.copy_(space.directions)
        self.preference_mean.copy_(space.mean)
        self.preference_scale.copy_(space.scale)

    def _posterior_input(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                         response_mask: Tensor) -> tuple[Tensor, Tensor]:
        if not self.cfg.posterior_reads_prompt:
            return response_ids, response_mask
        return torch.cat([prompt_ids, response_ids], dim=1), torch.cat([prompt_mask, response_mask], dim=1)

    def posterior_features(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                           response_mask: Tensor) -> Tensor:
        """Encoder query features (B, n_query, d) fp32 of [prompt; response] (or the response alone)."""
        return self.encoder.features(*self._posterior_input(prompt_ids, prompt_mask, response_ids, response_mask))

    def calibrate_posterior(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                            response_mask: Tensor) -> None:
        """Before training, from real training (x, y) rows: the `feature_norm` statistics of the posterior's inputs,
        and the bag-of-words head's bias (when there is one) at the rows' smoothed unigram log-frequencies."""
        if not self.encoder.cfg.feature_norm and self.bow is None:
            raise ValueError("calibrate_posterior needs CLaPConfig.feature_norm=True or bow_head=True (nothing to "
                             "calibrate)")
        if self.encoder.cfg.feature_norm:
            self.encoder.calibrate_features(*self._posterior_input(prompt_ids, prompt_mask, response_ids,
                                                                   response_mask))
        if self.bow is not None:
            self.calibrate_bow(response_ids, response_mask)

    @torch.no_grad()
    def calibrate_bow(self, response_ids: Tensor, response_mask: Tensor, smoothing: float = 0.01) -> None:
        """BoW bias = log unigram frequency of these responses' tokens (add-`smoothing`): z then only has to explain
        how a response's words differ from the average, and the loss starts near the unigram entropy, not at
        log(vocab). (At the encoder's lr a zero bias would need thousands of steps to learn the unigram.)"""
        if self.bow is None:
            raise ValueError("calibrate_bow needs CLaPConfig.bow_head=True")
        counts = torch.zeros(self.bow.bias.shape[0], dtype=torch.float64)
        counts.index_add_(0, response_ids[response_mask.bool()].long().cpu(),
                          torch.ones(int(response_mask.sum()), dtype=torch.float64))
        freq = (counts + smoothing) / (counts.sum() + smoothing * counts.numel())
        self.bow.bias.copy_(freq.log().to(self.bow.bias))

    def encode_logits(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor) -> Tensor:
        """Discrete posterior q(k|x,y): (B, n_codes) float32 logits (lpc.md §6.3: `h2k(Enc(x, y))`)."""
        return self.encoder.code_logits(self.posterior_features(prompt_ids, prompt_mask, response_ids,
                                                                response_mask))

    def prior_logits(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Discrete population prior p(k|x): the same encoder on the prompt alone, (B, n_codes) float32 logits
        (as the Gaussian path encodes prompts for p(z|x), latent-dpo.md §3.6; lpc.md §2.4 prior network)."""
        return self.encoder.code_logits(self.encoder.features(prompt_ids, prompt_mask))

    def prior_latent(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Population-prior latent for serving: Gaussian z = 0 (the mean of N(0, I)); discrete
        z = softmax(p(k|x)) @ codebook (the expected code, lpc.md §3.6 leaves sample / mean / argmax open).
        Returns (B, latent_dim) float32."""
        if not self.discrete:
            return torch.zeros(prompt_ids.shape[0], self.cfg.latent_dim, device=prompt_ids.device)
        return self.encoder.code_latent(torch.softmax(self.prior_logits(prompt_ids, prompt_mask), dim=-1))

    def pair_logits(self, prompt_ids: Tensor, prompt_mask: Tensor, chosen_ids: Tensor, chosen_mask: Tensor,
                    rejected_ids: Tensor, rejected_mask: Tensor) -> Tensor:
        """LPC pair posterior q(k|x, y_w > y_l): (B, n_codes) float32 logits from the pooled encoder features of
        [x; y_w] and [x; y_l] (lpc.md §2.4). Raises ValueError for a Gaussian CLaP."""
        if self.pair_posterior is None:
            raise ValueError("pair_logits needs latent_type='discrete' (Gaussian CLaPs have no pair posterior)")
        f_w = self.posterior_features(prompt_ids, prompt_mask, chosen_ids, chosen_mask).mean(1)    # (B, d)
        f_l = self.posterior_features(prompt_ids, prompt_mask, rejected_ids, rejected_mask).mean(1)
        return self.pair_posterior(f_w, f_l)

    # -------------------------------------------------------------------------------------------- LM side
    def prefix_cache(self, z: Tensor | None) -> DynamicCache:
        """A fresh cache holding the adapter's prefix for z (B, latent_dim); empty when z is None."""
        cache = DynamicCache(config=self.base_lm.config)
        if z is not None:
            dtype = precision.cache_dtype(next(self.base_lm.parameters()).dtype, z.device)
            for layer, (k, v) in enumerate(self.adapter(z)):
                cache.update(k.to(dtype), v.to(dtype), layer)
        return cache

    def hidden_states(
        self,
        z: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        position_ids: Tensor | None = None,
        prefix_mask: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (after the last norm, before lm_head) of the base run with the prefix of z.

        Args:
            z: (B, latent_dim) or None (plain base LM, no prefix).
            input_ids, attention_mask: (B, T), any padding layout.
            position_ids: (B, T); default = n_prefix + cumsum(mask) - 1 (0-based without a prefix).
            prefix_mask: (B, n_prefix) attention mask of the prefix slots; default ones (tests mask them out).
        Returns:
            (B, T, d) in the base's dtype.
        """
        B, T = input_ids.shape
        _check_z(z, B, self.cfg.latent_dim)
        P = self.cfg.n_prefix if z is not None else 0
        if (
            z is not None
            and self.base_lm.training
            and torch.is_grad_enabled()
            and getattr(self.base_lm, "is_activation_checkpointing", False)
        ):
            # HF checkpointed layers drop `cache`, which would silently drop the prefix
            raise RuntimeError("gradient checkpointing on the base LM discards the latent prefix; disable it")
        if position_ids is None:
            position_ids = _positions(attention_mask, P)
        limit = self.max_positions
        if limit is not None and int(position_ids.max()) >= limit:
            raise ValueError(f"position {int(position_ids.max())} >= the base's {limit} positions ({P} prefix + {T})")
        mask = attention_mask.long()
        if z is not None:
            pm = torch.ones(B, P, dtype=torch.long, device=mask.device) if prefix_mask is None else prefix_mask.long()
            mask = torch.cat([pm, mask], dim=1)
        with precision.lm_autocast(input_ids.device):
            out = self.base_lm.base_model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                cache=self.prefix_cache(z) if z is not None else None,
                use_cache=False,
            )
        return out.last_hidden_state

    def forward(
        self,
        z: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        position_ids: Tensor | None = None,
        prefix_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) in the base's dtype; arguments as in `hidden_states`."""
        h = self.hidden_states(z, input_ids, attention_mask, position_ids=position_ids, prefix_mask=prefix_mask)
        with precision.lm_autocast(input_ids.device):
            return self.base_lm.get_output_embeddings()(h)

    def response_logps(
        self,
        z: Tensor | None,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        response_ids: Tensor,
        response_mask: Tensor,
        *,
        skip_z: Tensor | None = None,
    ) -> Tensor:
        """Summed log p(y|x,z) over the response tokens (spec §3.1: a sum, not a mean; spec §9.6).

        Args:
            z: (B, latent_dim) prefix latent, or None for the plain base LM.
            prompt_ids, prompt_mask: (B, Tp) left-padded, at least one real token per row.
            response_ids, response_mask: (B, Tr) right-padded.
            skip_z: (B, Tr, latent_dim) optional per-position latents for the gradient-only skip (spec §3.4):
                hidden + (s - s.detach()) with s = skip(z_t): the value is unchanged, the gradient reaches z_t.
        Returns:
            (B,) float32.
        """
        _check_padding(prompt_mask, "left", "prompt_mask")
        _check_padding(response_mask, "right", "response_mask")
        if not bool(prompt_mask[:, -1].bool().all()):
            raise ValueError("every prompt needs at least one real token (prompt_mask[:, -1] must be 1)")
        Tp, Tr = prompt_ids.shape[1], response_ids.shape[1]
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        h = self.hidden_states(z, ids, mask)[:, Tp - 1 : Tp + Tr - 1]  # (B, Tr, C): states predicting y_t
        if skip_z is not None:
            if self.skip is None:
                raise ValueError("skip_z given but CLaPConfig.skip_connection=False (no skip MLP was built)")
            if tuple(skip_z.shape) != (*response_ids.shape, self.cfg.latent_dim):
                want = (*response_ids.shape, self.cfg.latent_dim)
                raise ValueError(f"skip_z has shape {tuple(skip_z.shape)}; expected {want} (B, T_resp, latent_dim)")
            s = self.skip(skip_z)
            h = h + (s - s.detach()).to(h.dtype)  # value exactly 0, gradient identity (spec §3.4 "G-Skip")
        with precision.lm_autocast(h.device):
            logits = self.base_lm.get_output_embeddings()(h).float()  # upcast before log_softmax (spec §9.5)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)  # (B, Tr)
        return (logp * response_mask.to(logp.dtype)).sum(-1)

    def shifted_response_logps(
        self,
        z: Tensor,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        response_ids: Tensor,
        response_mask: Tensor,
        n_responses: int,
    ) -> Tensor:
        """In-batch latent swaps for the contrastive loss (spec §3.3): out[p, k, b] = log p(y_{p,b} | x_p,
        z_{p,(b-k) mod B}) over rows laid out prompt-major (P prompts x B responses, all B rows of a prompt share it).

        As the reference does, the prompt is encoded ONCE per latent (its K/V cache under each row's prefix) and
        only the responses are re-scored under the B rolled caches: 1 prompt pass + B response passes instead of
        B full passes. Row k = 0 is each response under its own latent (= `response_logps(z, ...)`).

        Returns:
            (P, B, B) float32: [prompt, shift, response].
        """
        _check_padding(prompt_mask, "left", "prompt_mask")
        _check_padding(response_mask, "right", "response_mask")
        rows, Tr = response_ids.shape
        B = n_responses
        if rows % B:
            raise ValueError(f"{rows} rows are not P prompts x B={B} responses")
        _check_z(z, rows, self.cfg.latent_dim)
        Pn = rows // B
        n_pre = self.cfg.n_prefix
        body, lm_head = self.base_lm.base_model, self.base_lm.get_output_embeddings()
        device = prompt_ids.device
        with precision.lm_autocast(device):
            cache = self.prefix_cache(z)
            mask = torch.cat([prompt_mask.new_ones(rows, n_pre), prompt_mask], dim=1).long()
            pos = _positions(prompt_mask, n_pre)
            h_prompt = body(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=True).last_hidden_state[:, -1:]                     # (rows, 1, C): predicts y_0
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            resp_mask = torch.cat([mask, response_mask[:, :-1].long()], dim=1)
            resp_pos = pos[:, -1:] + 1 + torch.arange(Tr - 1, device=device)[None]      # (rows, Tr-1)

            def roll(t: Tensor, k: int) -> Tensor:   # row (p, b) takes row (p, (b - k) mod B)
                return torch.roll(t.reshape(Pn, B, *t.shape[1:]), shifts=k, dims=1).reshape(t.shape)

            out = []
            for k in range(B):
                h = roll(h_prompt, k)
                if Tr > 1:
                    shifted = DynamicCache(config=self.base_lm.config)
                    for layer, (keys, values) in enumerate(layers):
                        shifted.update(roll(keys, k), roll(values, k), layer)
                    h_resp = body(input_ids=response_ids[:, :-1], attention_mask=resp_mask, position_ids=resp_pos,
                                  cache=shifted, use_cache=True).last_hidden_state              # (rows, Tr-1, C)
                    h = torch.cat([h, h_resp], dim=1)
                logits = lm_head(h).float()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)
                out.append((logp * response_mask.to(logp.dtype)).sum(-1).view(Pn, B))
        return torch.stack(out, dim=1)                                                   # (P, B_shift, B)

    @torch.no_grad()
    def generate(
        self,
        z: Tensor | None,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Tensor:
        """Batched decoding with each row's own prefix; exactly `max_new_tokens` tokens (no EOS stop, spec §4.1).

        Call `.eval()` first if the base has dropout. Incremental decoding over an explicit cache: the mask grows
        by one column and each row's position by one per step, so batched == row-by-row (left padding is inert).

        Args:
            z: (B, latent_dim) or None (plain base LM).
            prompt_ids, prompt_mask: (B, Tp) left-padded, at least one real token per row.
            do_sample: False = greedy argmax; True = sample from softmax(logits / temperature), top_k > 0 keeps
                the k most likely tokens. `generator` makes sampling reproducible; a list of B generators gives
                every row its own stream (a row's text then does not depend on the batch it is in).
        Returns:
            (B, max_new_tokens) LongTensor of new tokens.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 when sampling (use do_sample=False for greedy)")
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k filter)")
        _check_padding(prompt_mask, "left", "prompt_mask")
        if not bool(prompt_mask[:, -1].bool().all()):
            raise ValueError("every prompt needs at least one real token (prompt_mask[:, -1] must be 1)")
        B, Tp = prompt_ids.shape
        _check_z(z, B, self.cfg.latent_dim)
        if max_new_tokens == 0:
            return prompt_ids.new_zeros(B, 0)
        P = self.cfg.n_prefix if z is not None else 0
        limit = self.max_positions
        if limit is not None and P + Tp + max_new_tokens > limit:
            raise ValueError(
                f"{P} prefix + {Tp} prompt + {max_new_tokens} new tokens exceed the base's {limit} positions"
            )
        with precision.lm_autocast(prompt_ids.device):
            cache = self.prefix_cache(z)
        return decode(self.base_lm, prompt_ids, prompt_mask, cache=cache, n_prefix=P,
                      max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      generator=generator)


@torch.no_grad()
def decode(base_lm: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, *, cache: DynamicCache | None = None,
           n_prefix: int = 0, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """Incremental decoding of exactly `max_new_tokens` tokens over an explicit cache (which may already hold
    `n_prefix` prefix slots per layer). Left-padded prompts; the mask grows one column per step and each row's
    position by one, so batched == row-by-row. Used by CLaP.generate and for plain-LM candidate sampling.
    """
    with precision.lm_autocast(prompt_ids.device):
        return _decode(base_lm, prompt_ids, prompt_mask, cache=cache, n_prefix=n_prefix,
                       max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                       generator=generator)


def _decode(base_lm: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, *, cache: DynamicCache | None,
            n_prefix: int, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
            generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    B = prompt_ids.shape[0]
    P = n_prefix
    body, lm_head = base_lm.base_model, base_lm.get_output_embeddings()
    cache = cache if cache is not None else DynamicCache(config=base_lm.config)
    mask = torch.cat([prompt_mask.new_ones(B, P), prompt_mask], dim=1).long()  # (B, P+Tp)
    pos = _positions(prompt_mask, P)
    h = body(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    last = h.last_hidden_state[:, -1]  # (B, C)
    next_pos = pos[:, -1:] + 1
    # the mask only ever grows by ones: one buffer, sliced per step, instead of a torch.cat per step
    full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # (B, P+Tp+N)
    width = mask.shape[1]
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    for step in range(max_new_tokens):
        token = _next_token(last, lm_head, do_sample, temperature, top_k, generator)  # (B,)
        new[:, step] = token
        if step == max_new_tokens - 1:
            break
        width += 1
        h = body(input_ids=token[:, None], attention_mask=full_mask[:, :width], position_ids=next_pos, cache=cache,
                 use_cache=True)
        last = h.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return new


# Greedy steps of a wide batch: logits are computed per vocabulary slice and reduced to (max, index) at once, so
# the (B, V) logits matrix (13 MB for 64 rows of GPT-2) never goes through memory. Below ~1M logits it fits the
# cache anyway and one GEMM is faster. Each logit is the same dot product either way (same values, same argmax).
_GREEDY_CHUNK_MIN_LOGITS = 1 << 20
_GREEDY_CHUNK_COLS = 4096


def _next_token(last: Tensor, lm_head: nn.Module, do_sample: bool, temperature: float, top_k: int,
                generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Next token (B,) from the last hidden states (B, C)."""
    weight = getattr(lm_head, "weight", None)
    if (not do_sample and isinstance(lm_head, nn.Linear)
            and last.shape[0] * weight.shape[0] >= _GREEDY_CHUNK_MIN_LOGITS):
        return _greedy_by_slices(last, weight, lm_head.bias)
    return _pick(lm_head(last).float(), do_sample, temperature, top_k, generator)


def _greedy_by_slices(last: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """argmax over V of `F.linear(last, weight, bias)`, one vocabulary slice at a time; ties go to the lowest
    index, as in `Tensor.argmax` (max(-1) returns the first maximum, and the first best slice wins)."""
    values, index = [], []
    for s in range(0, weight.shape[0], _GREEDY_CHUNK_COLS):
        b = None if bias is None else bias[s:s + _GREEDY_CHUNK_COLS]
        v, i = F.linear(last, weight[s:s + _GREEDY_CHUNK_COLS], b).max(-1)  # (B,), (B,)
        values.append(v)
        index.append(i + s)
    best = torch.stack(values, dim=-1).float().argmax(-1, keepdim=True)  # (B, 1) slice holding the maximum
    return torch.stack(index, dim=-1).gather(-1, best).squeeze(-1)


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int,
          generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Next token per row. `generator` may be one per row (a list): each row then draws from its own stream, so its
    sample does not depend on what it is batched with (evaluation batches many users' rows of one prompt)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != logits.shape[0]:
        raise ValueError(f"{len(generator)} generators for {logits.shape[0]} rows")
    if top_k > 0:
        # sample among the k best only: torch.multinomial over a 50k vocabulary is slow on CPU
        values, index = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(values, dim=-1)
        if per_row:
            choice = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generator)])
        else:
            choice = torch.multinomial(probs, 1, generator=generator)
        return index.gather(-1, choice).squeeze(-1)
    # Gumbel-max: an exact categorical sample, O(V) and vectorised
    if per_row:
        u = torch.stack([torch.rand(logits.shape[1:], generator=g, device=logits.device) for g in generator])
    else:
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
    u = u.clamp_(min=1e-20)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def freeze_base(model: CLaP, frozen: bool) -> None:
    """Freeze (or unfreeze) the base LM and the adapter's K/V copies: CLaP stage 1 vs stage 2 (spec §2.5, §2.6).

    Encoder (with its own embedding copy), adapter MLPs + LNs and the skip MLP stay trainable either way.
    """
    model.base_lm.requires_grad_(not frozen)
    for module in model.adapter.attention_copies():
        module.requires_grad_(not frozen)


# ------------------------------------------------------------------------------------------------ save / load
def save_clap(model: CLaP, folder: str | Path, *, tokenizer=None) -> Path:
    """Write `clap.safetensors` (full state, tied weights stored once) + `clap_config.json` (CLaPConfig, base spec,
    base config dict) so `load_clap` rebuilds the model offline; `tokenizer`, if given, goes to `tokenizer/`."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".part")  # write-then-rename: a retried save never leaves a torn file
    save_model(model, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "clap_config": asdict(model.cfg),
        "base_spec": model.base_spec,
        "base_model_type": model.base_lm.config.model_type,
        "base_config": model.base_lm.config.to_dict(),
        "dtype": str(next(model.base_lm.parameters()).dtype).removeprefix("torch."),
    }
    tmp = folder / (CONFIG_FILE + ".part")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    tmp.replace(folder / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    return folder


def load_clap(folder: str | Path, base_spec: str | None = None, *, map_location: str = "cpu") -> CLaP:
    """Rebuild a CLaP saved by `save_clap`.

    Args:
        folder: the saved folder.
        base_spec: None (default) rebuilds the base from the saved config dict, offline. Given, the base is built
            with `registry.load_base_model(base_spec)` (must have the saved architecture) and then overwritten by
            the saved weights; `model.base_spec` records it.
    Raises:
        FileNotFoundError: the folder lacks clap.safetensors or clap_config.json.
        ValueError: unknown format version, or `base_spec` whose architecture differs from the saved one.
    """
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} missing: not a folder written by save_clap")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"clap format_version={meta.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    dtype = getattr(torch, meta["dtype"])
    saved_config = CONFIG_MAPPING[meta["base_model_type"]].from_dict(meta["base_config"])
    if base_spec is None:
        base = AutoModelForCausalLM.from_config(saved_config)
    else:
        from .registry import load_base_model

        base, _ = load_base_model(base_spec)
        keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        got, want = ({k: getattr(c, k, None) for k in keys} for c in (base.config, saved_config))
        if got != want:
            raise ValueError(f"base_spec {base_spec!r} has architecture {got}; the saved CLaP needs {want}")
    # CLaPs saved before `anchor_normed` existed used the layout-1 adapter (anchor before the norm)
    cfg = CLaPConfig(**{"anchor_normed": False, "feature_norm": False, **meta["clap_config"]})
    model = CLaP(base.to(dtype), cfg, base_spec=base_spec or meta.get("base_spec"))
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=map_location)
    if missing or unexpected:  # strict=True raises first; kept as a guard for future safetensors versions
        raise ValueError(f"state mismatch loading {str(folder)!r}: missing={missing} unexpected={unexpected}")
    log.info("loaded CLaP from %s (base %s, %s)", folder, model.base_spec, meta["base_model_type"])
    return model.to(map_location).eval()


def load_clap_tokenizer(folder: str | Path):
    """Tokenizer saved next to a CLaP (`save_clap(..., tokenizer=)`), else the GPT-2 one for tiny bases."""
    from .registry import TINY_SPECS, load_tokenizer

    folder = Path(folder)
    if (folder / TOKENIZER_DIR).is_dir():
        return load_tokenizer(folder / TOKENIZER_DIR)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("base_spec") in TINY_SPECS:
        return load_tokenizer()
    raise FileNotFoundError(
        f"{str(folder)!r} has no tokenizer/ and base_spec={meta.get('base_spec')!r} is not a tiny spec; "
        "pass tokenizer= to save_clap or load the base's tokenizer with registry.load_base_model"
    )
