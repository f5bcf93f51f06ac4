"""Evaluation metrics (spec latent-dpo.md §6): win rate, mean reward, perplexity, preference accuracy, and
bootstrap confidence intervals over users for the summary tables.

All scalar metrics take 1-D sequences (lists, numpy arrays or tensors) and return Python floats; ties count
half wherever a comparison is made, so a policy identical to its reference scores exactly 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from latentpref.tasks.evaluate.baselines import eval_mode, lm_forward

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise ValueError(f"{name} has non-finite values at positions {bad} (first 5)")
    return arr


def _paired(a: ArrayLike, b: ArrayLike, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_1d(a, name_a), _as_1d(b, name_b)
    if x.shape != y.shape:
        raise ValueError(f"{name_a} has {x.size} values but {name_b} has {y.size}; they must be paired")
    return x, y


def _wins(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x > y) + 0.5 * (x == y)))


def win_rate(rewards: ArrayLike, reference_rewards: ArrayLike) -> float:
    """Share of prompts where the output's reward beats the reference text's (ties count half).

    Spec §6 (IMDB): output vs the full original review, scored by the same reward; the reference code's
    strict ``>`` counted ties as losses, we count them half so identical outputs give 0.5.
    """
    return _wins(*_paired(rewards, reference_rewards, "rewards", "reference_rewards"))


def mean_reward(rewards: ArrayLike) -> float:
    """Mean reward of the outputs (spec §6 "positive expectation" when rewards are sigmoid scores)."""
    return float(_as_1d(rewards, "rewards").mean())


def preference_accuracy(chosen_scores: ArrayLike, rejected_scores: ArrayLike) -> float:
    """Share of held-out pairs where the chosen response scores higher (ties count half)."""
    return _wins(*_paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores"))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
) -> float:
    """exp(Σ NLL / Σ tokens) of whole texts (prompt + output) under ``model`` (spec §6, vanilla base LM).

    Every token after a text's first is scored given its prefix (the first token has no context and no BOS is
    added, as with HF ``labels=input_ids``). Texts are right-padded with an explicit attention mask and
    mask-derived positions, so padding does not change the value. Runs in eval mode, restored afterwards.

    Args:
        max_tokens: keep the first ``max_tokens`` tokens of each text (None: all).

    Raises:
        ValueError: no text has two or more tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 (one token has nothing to predict)")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    ids = [row[:max_tokens] if max_tokens is not None else row for row in ids]
    ids = sorted((row for row in ids if len(row) >= 2), key=len)  # similar lengths per batch: less padding
    if not ids:
        raise ValueError(f"none of the {len(texts)} texts has >= 2 tokens; perplexity is undefined")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            T = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for b, r in enumerate(rows):
                input_ids[b, : len(r)] = torch.tensor(r)
                mask[b, : len(r)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = lm_forward(model, input_ids, mask, position_ids).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, T-1)
            keep = mask[:, 1:].bool()
            total_nll += float(nll[keep].double().sum())
            total_tokens += int(keep.sum())
    return math.exp(total_nll / total_tokens)


def bootstrap_ci(
    values: ArrayLike, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(sample mean, low, high): percentile bootstrap interval of the mean at level 1 - alpha.

    Resample units are the entries of ``values`` (users, for the per-user tables). Deterministic for a seed.
    One value gives a zero-width interval.
    """
    x = _as_1d(values, "values")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, min(n_boot, 10_000_000 // n))  # bound the (chunk, n) index matrix
    means = np.concatenate(
        [x[rng.integers(0, n, size=(min(chunk, n_boot - s), n))].mean(axis=1) for s in range(0, n_boot, chunk)]
    )
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(low), float(high)


def ridge_probe_correlation(features: np.ndarray, targets: ArrayLike, groups: Sequence[object], *,
                            alpha: float = 1.0, folds: int = 2, seed: int = 0) -> float:
    """How much of a per-text score a representation carries, within a prompt: a linear probe's held-out
    correlation (a diagnostic of the CLaP posterior, issue #14).

    Features and targets are centred within each group (a prompt's candidates), so what the prompt alone
    explains does not count; groups are split into `folds` folds; per fold a ridge regression (standardised
    features, penalty `alpha` per row-normalised Gram) fitted on the other folds predicts the held-out rows;
    the result is the Pearson correlation of all held-out predictions with their targets.

    Raises:
        ValueError: mismatched lengths, fewer groups than folds, or constant targets.
    """
    x = np.asarray(features, dtype=np.float64)
    y = _as_1d(targets, "targets")
    g = np.asarray([str(v) for v in groups])
    if x.ndim != 2 or x.shape[0] != y.size or g.size != y.size:
        raise ValueError(f"features {x.shape}, targets ({y.size},) and groups ({g.size},) must share their rows")
    if not np.isfinite(x).all():
        raise ValueError("features hold non-finite values")
    names, index = np.unique(g, return_inverse=True)
    if names.size < folds or folds < 2:
        raise ValueError(f"{names.size} groups for {folds} folds; need folds >= 2 and at least as many groups")
    count = np.bincount(index).astype(np.float64)
    group_sums = np.zeros((names.size, x.shape[1]))
    np.add.at(group_sums, index, x)
    xc = x - group_sums[index] / count[index, None]
    yc = y - np.bincount(index, weights=y)[index] / count[index]
    if not np.any(yc != 0):
        raise ValueError("targets are constant within every group: nothing to probe")
    fold_of_group = np.random.default_rng(seed).permutation(names.size) % folds
    fold = fold_of_group[index]
    pred = np.zeros_like(yc)
    for k in range(folds):
        train, test = fold != k, fold == k
        mean, std = xc[train].mean(0), xc[train].std(0) + 1e-8
        a = (xc[train] - mean) / std
        gram = a.T @ a / train.sum() + alpha * np.eye(a.shape[1])
        w = np.linalg.solve(gram, a.T @ (yc[train] - yc[train].mean()) / train.sum())
        pred[test] = ((xc[test] - mean) / std) @ w
    if np.std(pred) == 0:
        return 0.0
    return float(np.corrcoef(pred, yc)[0, 1])


def linear_pair_accuracy(train_diffs: np.ndarray, train_users: Sequence[object], test_diffs: np.ndarray,
                         test_users: Sequence[object], *, alpha: float = 1.0, iterations: int = 200) -> float:
    """How well each user's held-out choices are a linear function of a representation (a diagnostic of the CLaP
    posterior, issue #14): per user, a logistic model without intercept, P(chosen beats rejected) = sigmoid(<w, d>)
    with d = features(chosen) - features(rejected), fitted on the user's train pairs (L2 penalty `alpha`, Newton
    steps); the result is the mean over users with test pairs of the share of their test pairs with <w, d> > 0
    (ties half). Latent DPO's implicit reward is linear in z, so this is the held-out accuracy its fit could reach
    from posterior means at best-linear.

    Raises:
        ValueError: mismatched rows or non-finite features.
    """
    xtr, xte = np.asarray(train_diffs, dtype=np.float64), np.asarray(test_diffs, dtype=np.float64)
    utr, ute = np.asarray([str(u) for u in train_users]), np.asarray([str(u) for u in test_users])
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[0] != utr.size or xte.shape[0] != ute.size \
            or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train diffs {xtr.shape} / users ({utr.size},) and test diffs {xte.shape} / users "
                         f"({ute.size},) must match row for row and in width")
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise ValueError("pair differences hold non-finite values")
    scores = []
    for user in np.unique(ute):
        a, t = xtr[utr == user], xte[ute == user]
        w = np.zeros(xtr.shape[1])
        for _ in range(iterations if len(a) else 0):
            p = 1.0 / (1.0 + np.exp(-(a @ w)))
            grad = a.T @ (p - 1.0) + alpha * w
            hess = (a * (p * (1 - p))[:, None]).T @ a + alpha * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        margin = t @ w
        scores.append(float(np.mean((margin > 0) + 0.5 * (margin == 0))))
    return float(np.mean(scores)) if scores else float("nan")


def _to_arrow(table: Any) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
        return pa.Table.from_pandas(table, preserve_index=False)
    if isinstance(table, Mapping):
        return pa.table(dict(table))
    if isinstance(table, Sequence):
        return pa.Table.from_pylist(list(table))
    raise TypeError(f"per_user_table of type {type(table).__name__}; expected a pyarrow Table, a pandas "
                    "DataFrame, a dict of columns or a list of row dicts")


def summarise(
    per_user_table: Any,
    group: str | Sequence[str] = "method",
    columns: Sequence[str] | None = None,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pa.Table:
    """Per-group mean and bootstrap CI over users of each metric column.

    Args:
        per_user_table: one row per (user, group) with metric columns; pyarrow Table, pandas DataFrame,
            dict of columns or list of row dicts.
        group: column(s) to group by, e.g. "method" or ["method", "cohort"].
        columns: metric columns; None = every numeric column outside ``group``.

    Returns:
        pyarrow Table sorted by group: the group columns, ``n`` (rows in the group), and per metric
        ``{col}_mean``, ``{col}_low``, ``{col}_high`` (nulls/NaN skipped; all-null gives nulls).
    """
    table = _to_arrow(per_user_table)
    keys = [group] if isinstance(group, str) else list(group)
    for name in keys:
        if name not in table.column_names:
            raise ValueError(f"group column {name!r} not in per_user_table columns {table.column_names}")
    if columns is None:
        columns = [
            f.name
            for f in table.schema
            if f.name not in keys and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        ]
    for name in columns:
        if name not in table.column_names:
            raise ValueError(f"metric column {name!r} not in per_user_table columns {table.column_names}")
    key_rows = list(zip(*(table.column(k).to_pylist() for k in keys))) if table.num_rows else []
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(key_rows):
        groups.setdefault(key, []).append(i)
    out: dict[str, list] = {k: [] for k in keys} | {"n": []}
    for name in columns:
        out.update({f"{name}_mean": [], f"{name}_low": [], f"{name}_high": []})
    metric_values = {name: table.column(name).to_pylist() for name in columns}
    for key in sorted(groups, key=lambda k: tuple((v is None, str(v)) for v in k)):
        rows = groups[key]
        for k, v in zip(keys, key):
            out[k].append(v)
        out["n"].append(len(rows))
        for name in columns:
            vals = [metric_values[name][i] for i in rows]
            vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
            stats = bootstrap_ci(vals, n_boot=n_boot, alpha=alpha, seed=seed) if vals else (None, None, None)
            for suffix, value in zip(("mean", "low", "high"), stats):
                out[f"{name}_{suffix}"].append(value)
    schema_fields = [table.schema.field(k) for k in keys] + [pa.field("n", pa.int64())]
    schema_fields += [pa.field(c, pa.float64()) for c in out if c not in keys and c != "n"]
    return pa.table(out, schema=pa.schema(schema_fields))
