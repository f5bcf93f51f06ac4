"""A population preference space in the frozen LM's states (issue 28, lever 1; after PReF: a user is a weight vector
over a few reward directions shared by everyone).

What users differ in is readable from the base LM's hidden states (a linear read-out of layer ~8 of SmolLM2, mean
over the response, separates a user's held-out pairs far better than the CLaP posterior), but one user's few pairs
cannot fit a 576-d read-out. The population's pairs can: fit every population user's read-out at once (L2-logistic
on the differences of chosen and rejected states), and keep the top right singular directions of the stacked
weights. A new user then only has to place themselves in those few shared directions. The CLaP carries them as the
first `preference_dims` coordinates of its posterior mean (`CLaP.encode`), so the LM is trained to write text at a
given position of the space, and latent DPO's per-user fit (LM-free) moves the user's latent along it.

Plain PyTorch; fp32 whatever the LM's dtype.
"""
from __future__ import annotations

import threading

from dataclasses import dataclass

import torch
from torch import Tensor

from latentpref.tasks.models import precision


class _Reached(Exception):
    """Raised by the hook on block `layer`: the blocks above it need not run."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


def _blocks(base_lm) -> torch.nn.ModuleList:
    body = base_lm.base_model
    return body.h if hasattr(body, "h") else body.layers   # GPT-2 | Llama


@torch.no_grad()
def pooled_states(base_lm, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                  layer: int) -> Tensor:
    """Mean over the response's real tokens of the base LM's hidden state after `layer` blocks (1..n_layers), run on
    [prompt; response] with explicit positions from the masks; the blocks above are not run. (B, d) float32; a
    response without real tokens gives zeros."""
    blocks = _blocks(base_lm)
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"preference layer {layer} is outside the base's 1..{len(blocks)} blocks")
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)

    caller = threading.get_ident()

    def stop(_module, _inputs, output):
        # only this call's forward stops here: a server decodes with the same LM in another thread meanwhile
        if threading.get_ident() == caller:
            raise _Reached(output[0] if isinstance(output, tuple) else output)

    handle = blocks[layer - 1].register_forward_hook(stop)
    try:
        with precision.lm_autocast(ids.device):
            base_lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        raise RuntimeError("the base LM returned without reaching the preference layer's block")
    except _Reached as reached:
        h = reached.hidden[:, prompt_ids.shape[1]:].float()                                 # (B, T_r, d)
    finally:
        handle.remove()
    real = response_mask[..., None].float()
    return (h * real).sum(1) / real.sum(1).clamp(min=1.0)


@dataclass
class PreferenceSpace:
    """coords(states) = ((states - mean) @ directions.T) / scale: (B, d) -> (B, dims), unit spread over the texts
    the space was fitted on."""
    directions: Tensor   # (dims, d), orthonormal rows
    mean: Tensor         # (d,)
    scale: Tensor        # (dims,)
    layer: int

    def coords(self, states: Tensor) -> Tensor:
        return ((states.float() - self.mean) @ self.directions.T) / self.scale


def fit_user_readouts(diffs: Tensor, users: Tensor, n_users: int, *, weights: Tensor | None = None,
                      l2: float = 1.0, steps: int = 200) -> Tensor:
    """Every user's L2-regularised logistic read-out at once: W (n_users, d) minimising
    sum_i w_i softplus(-<W[u_i], diff_i>) + l2/2 |W|^2 per user, diff = state(chosen) - state(rejected) (already
    standardised). L-BFGS, deterministic."""
    if diffs.ndim != 2 or users.shape != (diffs.shape[0],):
        raise ValueError(f"diffs must be (N, d) and users (N,); got {tuple(diffs.shape)} and {tuple(users.shape)}")
    if diffs.shape[0] == 0:
        raise ValueError("no pairs to fit the population preference space on")
    w = torch.ones(diffs.shape[0]) if weights is None else weights.float()
    W = torch.zeros(n_users, diffs.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        margin = (W[users] * diffs).sum(-1)
        loss = (w * torch.nn.functional.softplus(-margin)).sum() + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with precision.fp32():
        opt.step(closure)
    return W.detach()


def fit_preference_space(chosen_states: Tensor, rejected_states: Tensor, users: Tensor, n_users: int, *,
                         dims: int, layer: int, weights: Tensor | None = None, l2: float = 1.0) -> PreferenceSpace:
    """The population preference space from every population user's pairs.

    Args:
        chosen_states, rejected_states: (N, d) pooled LM states (`pooled_states`) of each pair's two responses.
        users: (N,) user index of each pair in [0, n_users).
        dims: directions kept (the top right singular vectors of the stacked per-user read-outs, uncentred: the
            direction most users share counts as one of them).
    Raises:
        ValueError: bad shapes, no pairs, dims outside [1, min(n_users, d)].
    """
    if chosen_states.shape != rejected_states.shape:
        raise ValueError(f"chosen {tuple(chosen_states.shape)} and rejected {tuple(rejected_states.shape)} differ")
    if chosen_states.shape[0] == 0:
        raise ValueError("no pairs to fit the population preference space on")
    d = chosen_states.shape[1]
    if not 1 <= dims <= min(n_users, d):
        raise ValueError(f"preference dims={dims} must be in [1, min(users={n_users}, d={d})]")
    states = torch.cat([chosen_states, rejected_states]).float()
    mean, std = states.mean(0), states.std(0).clamp(min=1e-4)
    diffs = (chosen_states.float() - rejected_states.float()) / std
    W = fit_user_readouts(diffs, users, n_users, weights=weights, l2=l2) / std            # back to raw state units
    _, _, vh = torch.linalg.svd(W, full_matrices=False)
    directions = vh[:dims]                                                                  # (dims, d)
    # orient each direction so that the average user prefers its positive side (a stable sign across refits)
    signs = torch.sign((W @ directions.T).mean(0))
    directions = directions * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    scale = ((states - mean) @ directions.T).std(0).clamp(min=1e-6)
    return PreferenceSpace(directions.contiguous(), mean, scale, layer)
