"""Cheap, readable text features that define the simulated users' hidden rewards.

The paper scores IMDB samples with a DistilBERT sentiment classifier (spec latent-dpo.md §4.1 step 4);
no pretrained sentiment model ships offline (shared ASSETS.md), so rewards are built from:
- lexical features (`score_texts`): VADER sentiment and a few style rates, all float32;
- an optional learned classifier (`SentimentClassifier`): hashed uni+bigram TF-IDF + logistic
  regression trained with torch on the vendored SST-2 (train+dev); `sentiment_clf` = its logit.

Feature texts are the responses alone (not prompt + response as in §4.1): the K candidates of a
prompt share the prompt, so within-prompt rankings then depend only on what the policy wrote.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import fsspec
import numpy as np
import torch

log = logging.getLogger(__name__)

CORPORA = Path(__file__).resolve().parents[1] / "assets" / "corpora"

FEATURES: tuple[str, ...] = (
    "sentiment",          # VADER compound in [-1, 1]
    "abs_sentiment",      # |sentiment|: how opinionated (a "neutral" user wants it low)
    "length_words",       # number of words (responses have a fixed token count, so ~ word length)
    "exclamation_rate",   # '!' per word
    "question_rate",      # '?' per word
    "long_word_rate",     # share of words with >= 7 letters: a formality / register proxy
    "first_person_rate",  # share of words that are I / me / my / we / us / our ...
    "unique_word_rate",   # distinct words / words: lexical diversity (low for degenerate loops)
)
CLASSIFIER_FEATURE = "sentiment_clf"  # logit of SentimentClassifier, only when a classifier is given

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_FIRST_PERSON = frozenset(
    "i me my mine myself we us our ours ourselves i'm i've i'd i'll we're we've we'd we'll".split()
)


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # 0.02 s, lexicon in the wheel

    return SentimentIntensityAnalyzer()


def score_texts(texts: Iterable[str | None], classifier: "SentimentClassifier | None" = None) -> dict[str, np.ndarray]:
    """Score texts with every feature in FEATURES (+ CLASSIFIER_FEATURE when `classifier` is given).

    Args:
        texts: N strings (None counts as empty).
        classifier: optional trained SentimentClassifier.

    Returns:
        {feature: float32 array (N,)}; empty texts score 0 on every feature.
    """
    texts = ["" if t is None else str(t) for t in texts]
    n = len(texts)
    out = {name: np.zeros(n, dtype=np.float32) for name in FEATURES}
    vader = _vader()
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        n_words = len(words)
        if text.strip():
            out["sentiment"][i] = vader.polarity_scores(text)["compound"]
        if n_words == 0:
            continue
        out["length_words"][i] = n_words
        out["exclamation_rate"][i] = text.count("!") / n_words
        out["question_rate"][i] = text.count("?") / n_words
        out["long_word_rate"][i] = sum(len(w) >= 7 for w in words) / n_words
        out["first_person_rate"][i] = sum(w in _FIRST_PERSON for w in words) / n_words
        out["unique_word_rate"][i] = len(set(words)) / n_words
    out["abs_sentiment"] = np.abs(out["sentiment"])
    if classifier is not None:
        out[CLASSIFIER_FEATURE] = classifier.score(texts)
    return out


# --------------------------------------------------------------------------------------------------
# Learned sentiment classifier: hashed TF-IDF (1-2 grams) + logistic regression, torch only.

_CONTRACTION_NT = re.compile(r"(\w)n't\b")
_CONTRACTION = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_TOKEN = re.compile(r"n't|'\w+|\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    # SST-2 is PTB-tokenized ("does n't", "it 's"); split raw contractions the same way.
    text = _CONTRACTION.sub(r"\1 '\2", _CONTRACTION_NT.sub(r"\1 n't", text.lower()))
    return _TOKEN.findall(text)


def _hashed_ngrams(text: str, n_features: int) -> list[int]:
    toks = _tokens(text)
    grams = toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]
    # crc32, not hash(): Python's str hash is salted per process.
    return [zlib.crc32(g.encode("utf-8")) % n_features for g in grams]


def read_sst2(split: str) -> tuple[list[str], np.ndarray]:
    """Vendored SST-2 split ('train' | 'dev' | 'test') as (sentences, labels in {0, 1})."""
    path = CORPORA / f"sst2_{split}.txt.gz"
    if not path.exists():
        raise ValueError(f"SST-2 split {split!r} not found at {path}; expected one of train, dev, test")
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            label, _, sentence = line.strip().partition(" ")
            if sentence:
                texts.append(sentence)
                labels.append(int(label))
    return texts, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class ClassifierConfig:
    n_features: int = 2**18   # hashing buckets; 2**20 gains ~0.4 % test accuracy but trains 10x slower
    l2: float = 1e-5          # on the mean log-loss; SST-2 dev accuracy is flat over 3e-6..3e-5
    max_iter: int = 100       # L-BFGS iterations (full batch)


class SentimentClassifier:
    """Binary sentiment logit from sublinear TF-IDF over hashed uni+bigrams (L2-normalised rows)."""

    def __init__(self, weight: np.ndarray, bias: float, idf: np.ndarray, config: ClassifierConfig, metrics: dict | None = None):
        self.weight = np.asarray(weight, dtype=np.float32)
        # float32, as weights.npz stores it: a reloaded classifier then scores bit-for-bit like the one just trained
        # (a float64 bias flipped the last bit of 2 in 50 float32 scores after a save/load)
        self.bias = float(np.float32(bias))
        self.idf = np.asarray(idf, dtype=np.float32)
        self.config = config
        self.metrics = dict(metrics or {})

    @staticmethod
    def _counts(texts: Sequence[str], n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw n-gram counts of N texts as COO triplets (rows, cols, counts), sorted by row."""
        rows, cols, vals = [], [], []
        for i, text in enumerate(texts):
            idx, cnt = np.unique(np.asarray(_hashed_ngrams(text or "", n_features), dtype=np.int64), return_counts=True)
            rows.append(np.full(len(idx), i, dtype=np.int64))
            cols.append(idx)
            vals.append(cnt.astype(np.float32))
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        return cat(rows, np.int64), cat(cols, np.int64), cat(vals, np.float32)

    @staticmethod
    def _tfidf(counts: tuple[np.ndarray, np.ndarray, np.ndarray], idf: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sublinear-tf * idf values with L2-normalised rows, same COO layout as `counts`."""
        rows, cols, vals = counts
        vals = (1.0 + np.log(vals)) * idf[cols]
        norm = np.sqrt(np.bincount(rows, weights=vals * vals, minlength=n_rows)).clip(min=1e-12)
        return rows, cols, (vals / norm[rows]).astype(np.float32)

    @staticmethod
    def _matvec(x: tuple[np.ndarray, np.ndarray, np.ndarray], w: np.ndarray, n_rows: int) -> np.ndarray:
        # np.bincount as a sparse mat-vec: ~10x faster here than torch.sparse.mm and its backward
        rows, cols, vals = x
        return np.bincount(rows, weights=vals * w[cols], minlength=n_rows)

    def score(self, texts: Iterable[str | None]) -> np.ndarray:
        """Logit of P(positive) per text: float32 (N,)."""
        texts = ["" if t is None else str(t) for t in texts]
        x = self._tfidf(self._counts(texts, self.config.n_features), self.idf, len(texts))
        return (self._matvec(x, self.weight, len(texts)) + self.bias).astype(np.float32)

    def accuracy(self, texts: Sequence[str], labels: np.ndarray) -> float:
        return float(((self.score(texts) > 0).astype(np.int64) == np.asarray(labels)).mean())

    def accuracy_on_sst2_test(self) -> float:
        return self.accuracy(*read_sst2("test"))

    def save(self, folder: str) -> None:
        """Write weights.npz (weight, bias, idf) and config.json under folder (local or s3://)."""
        fs, root = fsspec.core.url_to_fs(folder)
        fs.makedirs(root, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, weight=self.weight, bias=np.float32(self.bias), idf=self.idf)
        with fs.open(f"{root}/weights.npz", "wb") as f:
            f.write(buf.getvalue())
        with fs.open(f"{root}/config.json", "w") as f:
            json.dump({"config": self.config.__dict__, "metrics": self.metrics, "kind": "hashed-tfidf-logreg"}, f, indent=2)

    @classmethod
    def load(cls, folder: str) -> "SentimentClassifier":
        fs, root = fsspec.core.url_to_fs(folder)
        with fs.open(f"{root}/config.json", "r") as f:
            meta = json.load(f)
        with fs.open(f"{root}/weights.npz", "rb") as f:
            arrays = np.load(io.BytesIO(f.read()))
            weight, bias, idf = arrays["weight"], float(arrays["bias"]), arrays["idf"]
        return cls(weight, bias, idf, ClassifierConfig(**meta["config"]), meta.get("metrics"))


def train_sentiment_classifier(seed: int = 0, *, config: ClassifierConfig = ClassifierConfig(), include_dev: bool = True) -> SentimentClassifier:
    """Fit SentimentClassifier on vendored SST-2 train (+ dev), full-batch L-BFGS in torch.

    Training is deterministic (full batch, zero init); `seed` only seeds torch for the fit.
    Measured: ~0.81 SST-2 test accuracy, ~2-4 s on 2 CPU cores (see metrics["train_s"]).
    """
    start = time.perf_counter()
    texts, labels = read_sst2("train")
    if include_dev:
        dev_texts, dev_labels = read_sst2("dev")
        texts, labels = texts + dev_texts, np.concatenate([labels, dev_labels])
    counts = SentimentClassifier._counts(texts, config.n_features)
    df = np.bincount(counts[1], minlength=config.n_features).astype(np.float64)
    idf = (np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0).astype(np.float32)  # smoothed idf, as scikit-learn
    x = SentimentClassifier._tfidf(counts, idf, len(texts))
    rows, cols, vals = x
    y = labels.astype(np.float64)
    n = len(texts)

    torch.manual_seed(seed)
    w = torch.zeros(config.n_features, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=config.max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # mean log-loss + L2 (bias unpenalised); the sparse gradient X^T (p - y) / n is computed
        # with np.bincount and handed to torch's L-BFGS.
        wn = w.detach().numpy()
        logits = SentimentClassifier._matvec(x, wn, n) + float(b.detach()[0])
        loss = np.mean(np.logaddexp(0.0, logits) - y * logits) + 0.5 * config.l2 * float((wn * wn).sum())
        residual = (1.0 / (1.0 + np.exp(-logits)) - y) / n
        w.grad = torch.from_numpy(np.bincount(cols, weights=vals * residual[rows], minlength=config.n_features) + config.l2 * wn)
        b.grad = torch.tensor([residual.sum()], dtype=torch.float64)
        return torch.tensor(loss, dtype=torch.float64)

    # L-BFGS works on 2**18-element vectors: intra-op threads gain nothing there, and on an
    # oversubscribed CPU torch's thread pool made each step ~70x slower (measured), so use one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    final_loss = float(closure())
    weight, bias = w.detach().numpy().astype(np.float32), float(b.detach()[0])
    clf = SentimentClassifier(weight, bias, idf, config)
    clf.metrics = {
        "train_s": round(time.perf_counter() - start, 3),
        "train_loss": final_loss,
        "n_train": len(texts),
        "sst2_test_accuracy": clf.accuracy_on_sst2_test(),
    }
    log.info("sentiment classifier: %s", clf.metrics)
    return clf
