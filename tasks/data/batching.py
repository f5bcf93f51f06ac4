"""Tokenisation into the explicit layouts the models expect.

Prompts are LEFT-padded (so every prompt ends at the same column and the response follows directly),
responses RIGHT-padded. Padding is described only by the returned masks: pad = eos in GPT-2, so a real
EOS token must never be mistaken for padding (spec latent-dpo.md §9.3c).
"""
from __future__ import annotations

import torch


def _pad(rows: list[list[int]], *, pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    width = max(width, 1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if left:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        else:
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
    return ids, mask


def tokenize_prompts(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (N, T) left-padded; long prompts keep their LAST `max_tokens` tokens (the part next to
    the response), the same rule at training and generation time (spec §9.10)."""
    rows = [tokenizer.encode(t)[-max_tokens:] if max_tokens else tokenizer.encode(t) for t in texts]
    rows = [r if r else [tokenizer.eos_token_id] for r in rows]  # an empty prompt still needs one token
    return _pad(rows, pad_id=tokenizer.pad_token_id, left=True)


def tokenize_responses(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (N, T) right-padded; long responses keep their FIRST `max_tokens` tokens."""
    rows = [tokenizer.encode(t)[:max_tokens] for t in texts]
    rows = [r if r else [tokenizer.eos_token_id] for r in rows]
    return _pad(rows, pad_id=tokenizer.pad_token_id, left=False)
