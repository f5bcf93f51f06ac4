"""Candidate pool: K sampled continuations per prompt, then scorer features (spec latent-dpo.md §4.1
step 3: 32 samples per prompt, top_k=50, exactly 48 new tokens).

The sampler is injected (`generate_fn`), so the same code drives a plain causal LM (`lm_sampling_fn`: our
own cached decoder, one prefill per distinct prompt; `hf_sampling_fn`: HF `generate`) and the CLaP generator:

    generate_fn(prompt_ids (B, T) left-padded LongTensor, attention_mask (B, T), *,
                max_new_tokens: int, generator: torch.Generator) -> LongTensor (B, max_new_tokens)

candidates table (notes/CONTRACT.md): candidate_id "{prompt_id}-{k}", prompt_id, cand_idx:int32,
text, seed:int64, + scorer feature columns (float32, added by `annotate`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from latentpref.tasks.data.scorers import SentimentClassifier, score_texts
from latentpref.tasks.data.validate import clean_text
from latentpref.tasks.models import precision

log = logging.getLogger(__name__)

GenerateFn = Callable[..., torch.Tensor]
Progress = Callable[[int, int], None]   # (calls done, calls total)
CANDIDATES_SCHEMA = pa.schema(
    [
        ("candidate_id", pa.string()),
        ("prompt_id", pa.string()),
        ("cand_idx", pa.int32()),
        ("text", pa.string()),
        ("seed", pa.int64()),
    ]
)


def derive_seed(seed: int, *parts: object) -> int:
    """A non-negative int64 seed from (seed, parts...), stable across processes and machines."""
    digest = hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, left-padded (the next token goes right after real text)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def generate_candidates(
    generate_fn: GenerateFn,
    tokenizer,
    prompts: pa.Table,
    *,
    k: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    pack_prompts: bool = False,
    progress: Progress | None = None,
) -> pa.Table:
    """Sample k continuations of every prompt.

    Reproducibility: each generate call covers the k copies of ONE prompt (in chunks of at most
    batch_size rows) and gets a torch.Generator seeded with derive_seed(seed, prompt_id, chunk), so a
    prompt's candidates do not depend on which other prompts are generated, their order or
    batch_size (as long as k <= batch_size). The `seed` column records that generator seed.
    With pack_prompts=True, batch_size // k prompts share a call (faster on a GPU when k is small)
    and the generator is seeded from the first prompt of the call: results then depend on batching.

    Args:
        generate_fn: see module docstring; receives tensors and generator on `device`.
        tokenizer: the policy's tokenizer (pad falls back to eos).
        prompts: table with prompt_id, prompt.
        k: candidates per prompt (spec: 32).
        max_new_tokens: continuation length in tokens (spec: 48).
        progress: called as progress(0, total) first, then progress(done, total) after every generate call
            (total = number of calls).

    Returns:
        candidates table (CANDIDATES_SCHEMA), prompts in input order, cand_idx 0..k-1. Text is the
        decoded new tokens up to the first eos (if any), cleaned (`validate.clean_text`: no control
        characters, no U+FFFD from a multi-byte character cut at max_new_tokens).

    Raises:
        ValueError: bad k / sizes, missing columns, or generate_fn returned the wrong shape.
    """
    if k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"k={k}, max_new_tokens={max_new_tokens}, batch_size={batch_size}: all must be >= 1")
    for c in ("prompt_id", "prompt"):
        if c not in prompts.column_names:
            raise ValueError(f"prompts lacks column {c!r}; has {prompts.column_names}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    prompt_ids = [str(p) for p in prompts.column("prompt_id").to_pylist()]
    encoded = [tokenizer(p or "", add_special_tokens=False)["input_ids"] for p in prompts.column("prompt").to_pylist()]
    # An empty prompt starts from <|endoftext|>, GPT-2's document separator (unconditional sampling).
    encoded = [ids if ids else [eos_id] for ids in encoded]

    # Work items: (prompt index, first cand_idx, n rows, generator seed).
    calls: list[list[tuple[int, int, int, int]]] = []
    if pack_prompts and k <= batch_size:
        per_call = batch_size // k
        for start in range(0, len(prompt_ids), per_call):
            group = range(start, min(start + per_call, len(prompt_ids)))
            call_seed = derive_seed(seed, prompt_ids[group[0]], "packed")
            calls.append([(p, 0, k, call_seed) for p in group])
    else:
        for p, pid in enumerate(prompt_ids):
            for chunk, first in enumerate(range(0, k, batch_size)):
                calls.append([(p, first, min(batch_size, k - first), derive_seed(seed, pid, chunk))])

    out: dict[str, list] = {name: [] for name in CANDIDATES_SCHEMA.names}
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, len(calls))
    for n_done, call in enumerate(calls, start=1):
        rows = [encoded[p] for p, _, n, _ in call for _ in range(n)]
        ids, mask = _left_pad(rows, pad_id)
        generator = torch.Generator(device=device).manual_seed(call[0][3])
        new = generate_fn(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, generator=generator)
        if not isinstance(new, torch.Tensor) or new.ndim != 2 or new.shape[0] != len(rows) or new.shape[1] > max_new_tokens:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"generate_fn returned {shape}; expected a LongTensor ({len(rows)}, {max_new_tokens}) of NEW tokens "
                "only (slice off the prompt if your generate returns it)"
            )
        new = new.detach().cpu().tolist()
        r = 0
        for p, first, n, call_seed in call:
            for j in range(first, first + n):
                tokens = new[r]
                r += 1
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]
                out["candidate_id"].append(f"{prompt_ids[p]}-{j}")
                out["prompt_id"].append(prompt_ids[p])
                out["cand_idx"].append(j)
                out["text"].append(clean_text(tokenizer.decode(tokens)))
                out["seed"].append(call_seed)
        if progress is not None:
            progress(n_done, len(calls))
    seconds = time.perf_counter() - t0
    log.info("generated %d candidates for %d prompts in %d calls, %.1f s (%.1f new tokens/s)", len(out["text"]),
             len(prompt_ids), len(calls), seconds, len(out["text"]) * max_new_tokens / max(seconds, 1e-9))
    return pa.table(out, schema=CANDIDATES_SCHEMA)


@torch.inference_mode()
@precision.under_lm_autocast
def sample_fixed_length(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                        top_k: int = 50, temperature: float = 1.0, do_sample: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly `max_new_tokens` new tokens per row from a Hugging Face causal LM, over a KV cache.

    Consecutive identical rows (the k copies of a prompt that `generate_candidates` asks for) share ONE
    prefill: the prompt is encoded once and its cache rows are repeated, which removes (k-1)/k of the
    prompt compute (spec §4.1 lengths, 64-token prompts and 48 new tokens: the per-row prefill was about a
    third of the CPU time of SmolLM2-135M candidate sampling).
    Each step then runs one new token per row against the cache, with the attention mask and position
    ids given explicitly (left padding: a row's positions count its real tokens only).

    Args:
        model: a causal LM with `base_model` (the trunk) and output embeddings (LM head).
        prompt_ids, attention_mask: (B, T), left-padded; every row has at least one real token.
        top_k: sample among the k most likely tokens (0 = whole vocabulary); ignored when do_sample=False.
        do_sample: False = greedy argmax (used to check the cache against a full recompute).
        generator: makes sampling reproducible.

    Returns:
        (B, max_new_tokens) LongTensor of new tokens (EOS is not special: fixed length, spec §4.1).
    """
    from transformers import DynamicCache  # lazy: keeps `import candidates` light

    B, T = prompt_ids.shape
    mask = attention_mask.long()
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded with a real last token (attention_mask[:, -1] == 1)")
    body, lm_head = model.base_model, model.get_output_embeddings()
    same = torch.cat([prompt_ids.new_zeros(1, dtype=torch.bool),
                      (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (mask[1:] == mask[:-1]).all(-1)])  # (B,)
    first = (~same).nonzero().squeeze(-1)             # (U,) rows that start a run of identical rows
    group = (~same).long().cumsum(0) - 1              # (B,) each row's index into the U distinct prompts
    pos = (mask.cumsum(-1) - 1).clamp(min=0)          # (B, T) pads get a valid dummy position
    cache = DynamicCache(config=model.config)
    h = body(input_ids=prompt_ids[first], attention_mask=mask[first], position_ids=pos[first], cache=cache,
             use_cache=True)
    last = h.last_hidden_state[:, -1][group]          # (B, C)
    if first.numel() < B:
        cache.batch_select_indices(group)             # (U, ...) -> (B, ...) cache rows
    next_pos = pos[:, -1:] + 1                        # (B, 1)
    full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # grows by one column per step
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    for step in range(max_new_tokens):
        logits = lm_head(last).float()                # (B, V)
        new[:, step] = _pick(logits, top_k=top_k, temperature=temperature, do_sample=do_sample, generator=generator)
        if step == max_new_tokens - 1:
            break
        h = body(input_ids=new[:, step:step + 1], attention_mask=full_mask[:, :T + step + 1], position_ids=next_pos,
                 cache=cache, use_cache=True)
        last = h.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return new


def _pick(logits: torch.Tensor, *, top_k: int, temperature: float, do_sample: bool,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from logits (B, V): argmax, or a sample from softmax(top-k logits / temperature)."""
    if not do_sample:
        return logits.argmax(-1)
    if top_k > 0:
        # multinomial over the k best only: over a 50k vocabulary it is slow on CPU
        values, index = logits.topk(min(top_k, logits.shape[-1]), dim=-1)          # (B, k)
        choice = torch.multinomial(torch.softmax(values / temperature, dim=-1), 1, generator=generator)
        return index.gather(-1, choice).squeeze(-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(-1)


def lm_sampling_fn(model, top_k: int = 50, temperature: float = 1.0) -> GenerateFn:
    """generate_fn for a plain causal LM with our cached decoder (`sample_fixed_length`): top-k sampling of
    exactly max_new_tokens tokens, reproducible from the generator, global RNG untouched."""
    if top_k < 0 or temperature <= 0:
        raise ValueError(f"top_k={top_k} must be >= 0 and temperature={temperature} > 0")

    def generate(prompt_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_fixed_length(model, prompt_ids, attention_mask, max_new_tokens=max_new_tokens, top_k=top_k,
                                   temperature=temperature, generator=generator)

    return generate


def hf_sampling_fn(model, top_k: int = 50, temperature: float = 1.0) -> GenerateFn:
    """generate_fn for a plain Hugging Face causal LM: top-k sampling of exactly max_new_tokens new
    tokens (min_new_tokens = max_new_tokens suppresses EOS, spec latent-dpo.md §4.1 step 3).

    HF `generate` draws from the global torch RNG, so the call runs inside `fork_rng` seeded with
    generator.initial_seed(): reproducible, and the caller's RNG state is left untouched.
    """

    def generate(prompt_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        config = model.generation_config
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0)
        seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 2**62, ()).item())
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=prompt_ids.to(device),
                attention_mask=attention_mask.to(device),  # left padding: HF derives position ids from it
                do_sample=True,
                top_k=top_k,
                top_p=1.0,  # plain top-k (spec §4.1), whatever a hub generation_config says
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
        return out[:, prompt_ids.shape[1] :]

    return generate


def annotate(candidates: pa.Table, classifier: SentimentClassifier | None = None) -> pa.Table:
    """Add (or replace) the scorer feature columns (float32) computed on each candidate's text."""
    scores = score_texts(candidates.column("text").to_pylist(), classifier=classifier)
    table = candidates
    for name, values in scores.items():
        array = pa.array(np.asarray(values, dtype=np.float32))
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table
