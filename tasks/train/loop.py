"""CLaP training step in plain PyTorch (spec latent-dpo.md §3.5), usable with or without Ray/DDP.

`ClapObjective` wraps a CLaP model so that the *whole* loss is computed inside `forward`: DDP only
synchronises gradients correctly for work done through the wrapped module's forward.

Data layout (spec §9.1): a batch holds P prompts x B responses, flattened prompt-major to P*B rows;
DG-KLD aggregates the posterior over the B responses of each prompt, and the contrastive loss uses the
other responses of the same prompt as negatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from latentpref.tasks import objectives
from latentpref.tasks.data.batching import tokenize_prompts, tokenize_responses
from latentpref.tasks.models import latent
from latentpref.tasks.models.clap import freeze_base

Stage = Literal[1, 2]


@dataclass
class ClapBatch:
    prompt_ids: torch.Tensor       # (P*B, Tp) left-padded
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor     # (P*B, Tr) right-padded
    response_mask: torch.Tensor
    n_prompts: int                 # P
    n_responses: int               # B

    def to(self, device) -> "ClapBatch":
        return ClapBatch(self.prompt_ids.to(device), self.prompt_mask.to(device), self.response_ids.to(device),
                         self.response_mask.to(device), self.n_prompts, self.n_responses)


def make_clap_batch(tokenizer, prompts: list[str], responses: list[list[str]], *,
                    max_prompt_tokens: int, max_response_tokens: int) -> ClapBatch:
    """prompts (P,), responses (P, B) -> one ClapBatch (every prompt must have the same B)."""
    n_resp = {len(r) for r in responses}
    if len(n_resp) != 1:
        raise ValueError(f"every prompt needs the same number of responses in a batch, got {sorted(n_resp)}")
    B = n_resp.pop()
    flat_prompts = [p for p in prompts for _ in range(B)]
    flat_responses = [r for rs in responses for r in rs]
    p_ids, p_mask = tokenize_prompts(tokenizer, flat_prompts, max_prompt_tokens)
    r_ids, r_mask = tokenize_responses(tokenizer, flat_responses, max_response_tokens)
    return ClapBatch(p_ids, p_mask, r_ids, r_mask, len(prompts), B)


def sample_clap_batches(tokenizer, prompt_texts: list[str], candidate_texts: list[list[str]], *,
                        prompts_per_batch: int, responses_per_prompt: int, max_prompt_tokens: int,
                        max_response_tokens: int, seed: int):
    """Endless iterator of ClapBatches: P random prompts, B random distinct candidates of each."""
    rng = np.random.default_rng(seed)
    n = len(prompt_texts)
    if n == 0:
        raise ValueError("no prompts to train CLaP on")
    while True:
        idx = rng.choice(n, size=min(prompts_per_batch, n), replace=False)
        prompts = [prompt_texts[i] for i in idx]
        responses = []
        for i in idx:
            cands = candidate_texts[i]
            pick = rng.choice(len(cands), size=min(responses_per_prompt, len(cands)), replace=False)
            responses.append([cands[j] for j in pick])
        yield make_clap_batch(tokenizer, prompts, responses, max_prompt_tokens=max_prompt_tokens,
                              max_response_tokens=max_response_tokens)


@dataclass
class PairBatch:
    """Preference pairs, one prompt row per pair: the LPC objective's (discrete CLaP) and the population preference
    term's (Gaussian CLaP, which also needs each pair's user and weight)."""

    prompt_ids: torch.Tensor       # (N, Tp) left-padded
    prompt_mask: torch.Tensor
    chosen_ids: torch.Tensor       # (N, Tr) right-padded
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor     # (N, Tr') right-padded
    rejected_mask: torch.Tensor
    user_index: torch.Tensor | None = None   # (N,) long: row of the pair's user in the population table
    weight: torch.Tensor | None = None       # (N,) float32: the feedback `weight` column

    def to(self, device) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(*(move(t) for t in (self.prompt_ids, self.prompt_mask, self.chosen_ids, self.chosen_mask,
                                             self.rejected_ids, self.rejected_mask, self.user_index, self.weight)))


@dataclass(frozen=True)
class PreferencePair:
    """One train-split pair of the population, as pretraining reads it."""

    prompt: str
    chosen: str
    rejected: str
    user_index: int = 0
    weight: float = 1.0


def population_pairs(table) -> tuple[list[PreferencePair], list[PreferencePair], int]:
    """A pairs table (pyarrow) as (train pairs, held-out pairs, number of users with train pairs). `user_index` is the
    user's row among the sorted ids of users with train pairs; held-out pairs of other users are dropped. A table
    without `split` is all train, without `user_id` one user, without `weight` (or a null weight) weight 1."""
    n = table.num_rows
    column = lambda name, default: table[name].to_pylist() if name in table.column_names else [default] * n  # noqa: E731
    split, users, weights = column("split", "train"), column("user_id", ""), column("weight", 1.0)
    index = {u: k for k, u in enumerate(sorted({u for u, s in zip(users, split) if s == "train"}))}
    prompts, chosen, rejected = (table[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
    train: list[PreferencePair] = []
    heldout: list[PreferencePair] = []
    for i in range(n):
        if users[i] in index:
            pair = PreferencePair(prompts[i], chosen[i], rejected[i], index[users[i]],
                                  1.0 if weights[i] is None else float(weights[i]))
            (train if split[i] == "train" else heldout).append(pair)
    return train, heldout, len(index)


def make_pair_batch(tokenizer, pairs: list[PreferencePair], *, max_prompt_tokens: int,
                    max_response_tokens: int) -> PairBatch:
    p_ids, p_mask = tokenize_prompts(tokenizer, [p.prompt for p in pairs], max_prompt_tokens)
    c_ids, c_mask = tokenize_responses(tokenizer, [p.chosen for p in pairs], max_response_tokens)
    r_ids, r_mask = tokenize_responses(tokenizer, [p.rejected for p in pairs], max_response_tokens)
    return PairBatch(p_ids, p_mask, c_ids, c_mask, r_ids, r_mask,
                     torch.tensor([p.user_index for p in pairs], dtype=torch.long),
                     torch.tensor([p.weight for p in pairs], dtype=torch.float32))


def sample_pair_batches(tokenizer, pairs: list[PreferencePair], *, pairs_per_batch: int,
                        max_prompt_tokens: int, max_response_tokens: int, seed: int):
    """Endless iterator of PairBatches of `pairs_per_batch` distinct random pairs."""
    if not pairs:
        raise ValueError("no preference pairs to sample pair batches from")
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.choice(len(pairs), size=min(pairs_per_batch, len(pairs)), replace=False)
        yield make_pair_batch(tokenizer, [pairs[i] for i in idx], max_prompt_tokens=max_prompt_tokens,
                              max_response_tokens=max_response_tokens)


class UserDirections(nn.Module):
    """One latent direction v_u per population user, for the population preference term
    (`objectives.population_preference_loss`). A pretraining device only: it is not part of the CLaP that is saved
    and served (a user's own fit, latent DPO, learns that user's direction from the prompt)."""

    def __init__(self, n_users: int, latent_dim: int, *, init_std: float = 0.1, seed: int = 0):
        super().__init__()
        if n_users < 1:
            raise ValueError(f"n_users={n_users}; the population preference term needs at least one user")
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n_users, latent_dim, generator=g) * init_std)

    def forward(self, user_index: torch.Tensor) -> torch.Tensor:
        if user_index.numel() and (int(user_index.min()) < 0 or int(user_index.max()) >= self.weight.shape[0]):
            raise ValueError(f"user_index outside [0, {self.weight.shape[0]}): {user_index.tolist()}")
        return self.weight[user_index]


def set_stage(clap: nn.Module, stage: int) -> None:
    """Trainable parameters of CLaP stage 1 or 2 (spec §2.6): stage 1 freezes the base LM and the adapter's K/V
    copies and trains the skip MLP; stage 2 trains everything but the skip MLP (a stage-1 device only, spec
    §3.4; frozen so DDP sees no trainable parameter without a gradient). Stage 3 (our extension, issue 28 lever 2,
    tasks/train/follow.py) trains only the follow adapter; it stays frozen in stages 1 and 2."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage={stage!r}; expected 1 (frozen base + G-skip), 2 (all + contrastive) or 3 "
                         "(follow adapter only)")
    follow = getattr(clap.adapter, "follow", None)
    if stage == 3:
        if follow is None:
            raise ValueError("stage 3 trains the follow adapter; this CLaP has none (CLaPConfig.follow_rank = 0)")
        clap.requires_grad_(False)
        follow.requires_grad_(True)
        return
    clap.requires_grad_(True)
    freeze_base(clap, frozen=(stage == 1))
    if clap.skip is not None:
        clap.skip.requires_grad_(stage == 1)
    if follow is not None:
        follow.requires_grad_(False)


def clap_param_groups(clap: nn.Module, *, lr: float, adapter_lr: float, bow_lr: float) -> list[dict]:
    """Optimiser groups of CLaP's trainable parameters: everything at `lr`, the latent adapter at `adapter_lr`, the
    bag-of-words head (when there is one) at `bow_lr`; empty groups are left out.

    An anchored prefix lives on the scale of the base's normalised states (rms ~0.1-0.2), where Adam's ~lr-sized steps
    at the encoder's 1e-3 are a 1% change per step: SmolLM2's NLL drifted up from 2.9 to 3.4-4.2 nats/token in 40
    steps. The bag-of-words head is a plain softmax regression on z: at the encoder's lr it would barely move in a
    CPU-sized stage 1, and its gradient is what teaches the encoder to carry the response's words."""
    adapter = [p for p in clap.adapter.parameters() if p.requires_grad]
    bow = [p for p in clap.bow.parameters() if p.requires_grad] if getattr(clap, "bow", None) is not None else []
    ids = {id(p) for p in (*adapter, *bow)}
    rest = [p for p in clap.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": lr}]
    if adapter:
        groups.append({"params": adapter, "lr": adapter_lr})
    if bow:
        groups.append({"params": bow, "lr": bow_lr})
    return groups


def check_step(batch: ClapBatch, stage: int) -> None:
    """The stage is 1 or 2 and the batch holds P x B prompt-major rows (spec §9.1), for either latent type's
    objective.

    Raises:
        ValueError: naming the bad stage or the row counts.
    """
    P, B = batch.n_prompts, batch.n_responses
    if stage not in (1, 2):
        raise ValueError(f"stage={stage!r}; expected 1 or 2")
    if batch.prompt_ids.shape[0] != P * B or batch.response_ids.shape[0] != P * B:
        raise ValueError(f"batch has {batch.prompt_ids.shape[0]} prompt rows and {batch.response_ids.shape[0]} "
                         f"response rows; the layout P={P} x B={B} needs {P * B} of each (prompt-major)")


class ClapObjective(nn.Module):
    """L_CLaP = L_lm + w_kl * DG-KLD (+ w_con * contrastive in stage 2); G-skip in stage 1 (spec §3.5);
    + w_pref * population preference term on pair batches when `user_directions` is given (our extension)."""

    def __init__(self, clap: nn.Module, *, kl_samples: int = 16, kl_weight: float = 1.0,
                 contrastive_weight: float = 1.0, shared_prompt_cache: bool = True, bow_weight: float = 0.0,
                 user_directions: UserDirections | None = None, preference_weight: float = 0.0,
                 preference_only_share: float = 0.0):
        super().__init__()
        if not 0.0 <= preference_only_share <= 1.0:
            raise ValueError(f"preference_only_share={preference_only_share} must be in [0, 1]")
        if preference_only_share > 0 and not getattr(getattr(clap, "cfg", None), "preference_dims", 0):
            raise ValueError(f"preference_only_share={preference_only_share} needs a CLaP with a preference space "
                             "(CLaPConfig.preference_dims > 0): it trains the LM on the space's coordinates alone")
        # users are served at their preference coordinates with every other coordinate at the prior's mean 0
        # (personalize.preference_only); this share of rows is trained exactly so, or the adapter learns to read
        # the text from the 28 free coordinates and barely from the preference ones
        self.preference_only_share = preference_only_share
        if bow_weight > 0 and getattr(clap, "bow", None) is None:
            raise ValueError(f"bow_weight={bow_weight} needs a CLaP built with CLaPConfig.bow_head=True")
        if preference_weight > 0 and user_directions is None:
            raise ValueError(f"preference_weight={preference_weight} needs user_directions (one per population user)")
        self.bow_weight = bow_weight
        self.user_directions = user_directions
        self.preference_weight = preference_weight
        self.clap = clap
        # stage 2: True = one prompt pass per latent + B response passes (CLaP.shifted_response_logps); False = B
        # full passes with rolled latents (same values; kept as the benchmark's "before")
        self.shared_prompt_cache = shared_prompt_cache
        self.kl_samples = kl_samples
        self.kl_weight = kl_weight
        self.contrastive_weight = contrastive_weight

    def forward(self, batch: ClapBatch, stage: int, generator: torch.Generator | None = None,
                pairs: PairBatch | None = None):
        """One CLaP step's loss (scalar, with grad) and detached metrics; rows are P prompts x B responses.

        Stage 1: L_lm with G-skip (when the skip MLP exists) + DG-KLD. Stage 2: L_lm + DG-KLD + contrastive.
        `generator` draws, in this order, the DG-KLD noise, the prefix latent z, the G-skip latents, the rows
        trained from the preference coordinates alone (`preference_only_share` > 0) and the pair term's samples. `pairs` (with user_index) feeds the population preference term; it is required when
        preference_weight > 0 (every DDP rank must give the user directions a gradient).
        """
        P, B = batch.n_prompts, batch.n_responses
        check_step(batch, stage)
        mu, logvar = self.clap.encode(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        kl = objectives.dg_kld(mu, logvar, n_samples=self.kl_samples, group=(P, B), generator=generator)
        z = latent.sample(mu, logvar, 1, generator=generator)[0]                    # (P*B, D)
        n_tokens = batch.response_mask.sum()
        skip_z = None
        if stage == 1 and self.clap.skip is not None:
            # a fresh posterior sample per response position (spec §2.4)
            T = batch.response_ids.shape[1]
            skip_z = latent.sample(mu, logvar, T, generator=generator).transpose(0, 1)  # (P*B, T, D)
        if self.preference_only_share > 0:
            z, skip_z = self._preference_only_rows(z, skip_z, generator)
        contrastive_on = stage == 2 and B > 1 and self.contrastive_weight > 0
        if contrastive_on and not self.shared_prompt_cache:
            rows = []
            for k in range(B):
                z_k = torch.roll(z.view(P, B, -1), shifts=k, dims=1).reshape(P * B, -1)
                rows.append(self.clap.response_logps(z_k, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                                     batch.response_mask).view(P, B))
            nll_matrix = -torch.stack(rows, dim=1)
            logps = -nll_matrix[:, 0].reshape(P * B)
        elif contrastive_on:
            # nll_matrix[p, k, b] = -log p(y_{p,b} | x_p, z_{p,(b-k) mod B}) (spec §3.3): one prompt pass per latent,
            # B response passes; shift 0 is each response under its own latent, i.e. L_lm's log-probs
            nll_matrix = -self.clap.shifted_response_logps(z, batch.prompt_ids, batch.prompt_mask,
                                                           batch.response_ids, batch.response_mask, B)
            logps = -nll_matrix[:, 0].reshape(P * B)
        else:
            logps = self.clap.response_logps(z, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                             batch.response_mask, skip_z=skip_z)      # (P*B,)
        nll = -logps.mean()   # spec §3.1: per-sequence token sum, mean over sequences
        loss = nll + self.kl_weight * kl
        bow = torch.zeros((), device=nll.device)
        if self.bow_weight > 0:
            # per-sequence token sum like the NLL; the gradient reaches only the encoder and the BoW head
            bow = self.clap.bow_nll(z, batch.response_ids, batch.response_mask).mean()
            loss = loss + self.bow_weight * bow
        contrastive = torch.zeros((), device=nll.device)
        contrastive_acc = torch.zeros((), device=nll.device)
        if contrastive_on:
            contrastive = objectives.contrastive_loss(nll_matrix)
            contrastive_acc = (nll_matrix.argmin(dim=1) == 0).float().mean()
            loss = loss + self.contrastive_weight * contrastive
        preference = torch.zeros((), device=nll.device)
        preference_acc = torch.zeros((), device=nll.device)
        if self.preference_weight > 0:
            preference, preference_acc = self._preference_term(pairs, generator)
            loss = loss + self.preference_weight * preference
        with torch.no_grad():
            # active units (posterior-collapse detector): dims whose posterior mean varies across the batch
            active_units = (mu.float().var(dim=0) > 0.01).sum().float() if mu.shape[0] > 1 else torch.zeros(())
        metrics = {"loss": loss.detach(), "nll_per_token": (-logps.sum() / n_tokens).detach(),
                   "kl": kl.detach(), "bow_per_token": (bow * logps.shape[0] / n_tokens).detach(),
                   "contrastive": contrastive.detach(), "contrastive_acc": contrastive_acc,
                   "active_units": active_units, "tokens": n_tokens.detach().float()}
        if self.preference_weight > 0:
            metrics.update(preference=preference.detach(), preference_acc=preference_acc)
        return loss, metrics

    def _preference_only_rows(self, z: torch.Tensor, skip_z: torch.Tensor | None,
                              generator: torch.Generator | None):
        """z (and the G-skip latents) with the free coordinates (all but the first preference_dims) set to 0 on a
        `preference_only_share` of the rows, drawn from `generator`."""
        r = self.clap.cfg.preference_dims
        draw = torch.rand(z.shape[0], generator=generator, device=generator.device if generator is not None
                          else z.device).to(z.device)
        keep_free = (draw >= self.preference_only_share).to(z.dtype)[:, None]              # (N, 1)
        mask = torch.cat([torch.ones_like(z[:, :r]), keep_free.expand(-1, z.shape[1] - r)], dim=1)
        z = z * mask
        if skip_z is not None:
            skip_z = skip_z * mask[:, None, :]
        return z, skip_z

    def _preference_term(self, pairs: PairBatch | None, generator: torch.Generator | None):
        if pairs is None or pairs.user_index is None:
            raise ValueError("preference_weight > 0 needs a PairBatch with user_index at every step")
        n = pairs.prompt_ids.shape[0]
        # chosen and rejected rows through the encoder in one pass
        mu, logvar = self.clap.encode(torch.cat([pairs.prompt_ids, pairs.prompt_ids]),
                                      torch.cat([pairs.prompt_mask, pairs.prompt_mask]),
                                      *_stack_right_padded(pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids,
                                                           pairs.rejected_mask))
        z = latent.sample(mu, logvar, 1, generator=generator)[0]
        term, m = objectives.population_preference_loss(self.user_directions(pairs.user_index), z[:n], z[n:],
                                                        pair_weight=pairs.weight)
        return term, m["accuracy"]


def _stack_right_padded(a_ids: torch.Tensor, a_mask: torch.Tensor, b_ids: torch.Tensor, b_mask: torch.Tensor):
    """Rows of two right-padded batches in one (2N, T) batch (the shorter one padded on the right, mask 0)."""
    width = max(a_ids.shape[1], b_ids.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(a_ids), pad(b_ids)]), torch.cat([pad(a_mask), pad(b_mask)])


def lm_step_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a plain causal LM, with explicit positions from the mask."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    weight = attention_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view_as(weight)
    return (nll * weight).sum() / weight.sum().clamp(min=1)


def sft_base_model(model, tokenizer, texts: list[str], *, steps: int, lr: float, batch_size: int,
                   max_tokens: int, seed: int, progress=None) -> list[float]:
    """Brief full fine-tune of the base LM on corpus chunks (spec §4.1 step 2). Returns the loss curve."""
    if steps <= 0:
        return []
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    chunks: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text)
        for start in range(0, max(len(ids) - 8, 1), max_tokens):
            piece = ids[start:start + max_tokens]
            if len(piece) >= 8:
                chunks.append(piece)
    if not chunks:
        raise ValueError("corpus has no text long enough for SFT")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    curve = []
    for step in range(steps):
        rows = [chunks[i] for i in rng.choice(len(chunks), size=min(batch_size, len(chunks)), replace=False)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        loss = lm_step_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, curve[-1])
    model.eval()
    return curve
