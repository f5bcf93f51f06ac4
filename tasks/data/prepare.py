"""The prepare stage: corpus -> prompts -> SFT base LM -> K candidates -> scores -> users -> pairs.

Each sub-step writes a versioned folder whose name is the digest of everything it depends on (config
values and input digests) and a manifest last; a sub-step whose folder already has a manifest is skipped.
So re-running a night with unchanged inputs costs nothing, and a run killed mid-way resumes where it was.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pyarrow as pa
import torch

from latentpref.tasks.data import candidates as candidates_lib
from latentpref.tasks.data import corpus, users
from latentpref.tasks.data.store import MANIFEST, Store, json_digest, stage_done, table_digest
from latentpref.tasks.data.validate import CLEAN_TEXT_VERSION
from latentpref.tasks.models import precision

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TableRef:
    """A versioned Parquet table in the store: path parts + content digest."""

    path: tuple[str, ...]
    digest: str
    rows: int

    def url(self, store: Store) -> str:
        return store.url(*self.path)


@dataclass(frozen=True)
class DataArtifacts:
    prompts: TableRef
    candidates: TableRef
    users: TableRef                       # hidden preference functions: evaluation only
    pairs: TableRef
    base_model_path: tuple[str, ...]      # folder of the (SFT'd) base LM in the store
    base_model_version: str
    timings_s: dict[str, float] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    scorer: dict[str, Any] = field(default_factory=dict)   # learned scorer: path + SST-2 test accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ref(store: Store, parts: tuple[str, ...]) -> TableRef:
    manifest = store.read_json(*parts[:-1], MANIFEST)
    return TableRef(parts, manifest["digest"], manifest["rows"])


def _write_versioned(store: Store, table: pa.Table, folder: tuple[str, ...], name: str,
                     extra: dict[str, Any]) -> TableRef:
    parts = (*folder, name)
    store.write_table(table, *parts)
    digest = table_digest(table)
    store.write_json({"digest": digest, "rows": table.num_rows, **extra}, *folder, MANIFEST)
    return TableRef(parts, digest, table.num_rows)


def prepare_data(cfg, store: Store, *, progress: Progress | None = None) -> DataArtifacts:
    """Run (or skip, when already done) every prepare sub-step for a `DataConfig`."""
    from latentpref.tasks.models.registry import load_base_model

    say = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    skipped: list[str] = []

    # 1. prompts (split by document). "clean" in this key and the next two: texts are cleaned as they are made
    # (validate.clean_text), so a store made before (or with another cleaning) is not reused
    key = json_digest({"corpus": cfg.corpus, "n": cfg.n_prompts, "pt": cfg.prompt_tokens,
                       "rt": cfg.response_tokens, "seed": cfg.seed, "v": 1, "clean": CLEAN_TEXT_VERSION})
    folder = ("data", "prompts", key)
    t0 = time.perf_counter()
    if stage_done(store, *folder):
        prompts_ref = _ref(store, (*folder, "prompts.parquet"))
        skipped.append("prompts")
    else:
        from latentpref.tasks.models.registry import load_tokenizer
        tokenizer = load_tokenizer()
        docs = corpus.load_documents(cfg.corpus)
        prompts = corpus.make_prompts(docs, tokenizer, n_prompts=cfg.n_prompts, prompt_tokens=cfg.prompt_tokens,
                                      reference_tokens=cfg.response_tokens, seed=cfg.seed)
        prompts_ref = _write_versioned(store, prompts, folder, "prompts.parquet",
                                       {"stage": "prompts", "corpus": cfg.corpus or "vendored:pang-lee-reviews"})
    timings["prompts"] = time.perf_counter() - t0
    say("prompts", 1, 5)

    # 2. base LM, briefly fine-tuned on the TRAIN documents only (no text of val/test prompts leaks in)
    base_version = json_digest({"base": cfg.base_model, "sft_steps": cfg.sft_steps, "lr": cfg.sft_lr,
                                "bs": cfg.sft_batch_size, "prompts": prompts_ref.digest, "seed": cfg.seed,
                                "clean": CLEAN_TEXT_VERSION})   # the SFT documents are cleaned too
    base_folder = ("models", "base", base_version)
    t0 = time.perf_counter()
    if stage_done(store, *base_folder):
        skipped.append("sft")
        model, tokenizer = load_base_model(store.local_copy(*base_folder), seed=cfg.seed)
    else:
        from latentpref.tasks.train.loop import sft_base_model
        model, tokenizer = load_base_model(cfg.base_model, seed=cfg.seed)
        prompts = store.read_table(*prompts_ref.path)
        train_docs = set(d for d, s in zip(prompts["doc_id"].to_pylist(), prompts["split"].to_pylist())
                         if s == "train")
        docs = corpus.load_documents(cfg.corpus)
        texts = [t for d, t in zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist()) if d in train_docs]
        curve = sft_base_model(model, tokenizer, texts, steps=cfg.sft_steps, lr=cfg.sft_lr,
                               batch_size=cfg.sft_batch_size, max_tokens=cfg.prompt_tokens + cfg.response_tokens,
                               seed=cfg.seed, progress=lambda s, n, loss: say("sft", s, n))
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            store.upload_folder(d, *base_folder)
        store.write_json({"base_model": cfg.base_model, "sft_steps": cfg.sft_steps, "sft_loss_curve": curve,
                          "version": base_version}, *base_folder, MANIFEST)
    timings["sft"] = time.perf_counter() - t0
    say("sft", 2, 5)

    # 3a. the learned sentiment scorer (hashed TF-IDF + logistic regression on the vendored SST-2)
    classifier = None
    scorer_info: dict[str, Any] = {}
    if cfg.learned_scorer:
        from latentpref.tasks.data.scorers import SentimentClassifier, train_sentiment_classifier
        scorer_folder = ("models", "scorer", json_digest({"kind": "sst2-tfidf-logreg", "seed": cfg.seed, "v": 1}))
        t0 = time.perf_counter()
        done = stage_done(store, *scorer_folder)
        if done:
            classifier = SentimentClassifier.load(store.url(*scorer_folder))
            scorer_info = done
            skipped.append("scorer")
        else:
            classifier = train_sentiment_classifier(seed=cfg.seed)
            classifier.save(store.url(*scorer_folder))
            scorer_info = {"sst2_test_accuracy": classifier.accuracy_on_sst2_test(), "path": list(scorer_folder)}
            store.write_json(scorer_info, *scorer_folder, MANIFEST)
        timings["scorer"] = time.perf_counter() - t0

    # 3. K candidates per prompt + reward annotation (every candidate scored once by every scorer)
    key = json_digest({"prompts": prompts_ref.digest, "base": base_version, "k": cfg.n_candidates,
                       "scorer": scorer_info.get("path"),
                       "rt": cfg.response_tokens, "pt": cfg.prompt_tokens, "top_k": cfg.top_k, "seed": cfg.seed,
                       "clean": CLEAN_TEXT_VERSION,
                       # bf16 and fp32 sampling draw different candidates from the same seed
                       "lm_dtype": str(precision.lm_dtype()).removeprefix("torch.")})
    folder = ("data", "candidates", key)
    t0 = time.perf_counter()
    if stage_done(store, *folder):
        cand_ref = _ref(store, (*folder, "candidates.parquet"))
        skipped.append("candidates")
        timings["candidates"] = time.perf_counter() - t0
    else:
        prompts = store.read_table(*prompts_ref.path)
        # fixed-length top-k sampling (spec §4.1) with our cached decoder: one prefill per prompt for its k
        # copies, explicit masks and positions
        generate_fn = candidates_lib.lm_sampling_fn(model, top_k=cfg.top_k)
        cands = candidates_lib.generate_candidates(generate_fn, tokenizer, prompts, k=cfg.n_candidates,
                                                   max_new_tokens=cfg.response_tokens,
                                                   batch_size=cfg.generation_batch_size, seed=cfg.seed,
                                                   pack_prompts=True,  # batches of prompts: deterministic for a config
                                                   progress=lambda done, total: say("generate", done, total))
        timings["candidates"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cands = candidates_lib.annotate(cands, classifier=classifier)
        cand_ref = _write_versioned(store, cands, folder, "candidates.parquet",
                                    {"stage": "candidates", "base_model_version": base_version})
        timings["scoring"] = time.perf_counter() - t0
    say("candidates", 3, 5)

    # 4. simulated users (hidden) + 5. their preference pairs
    key = json_digest({"cands": cand_ref.digest, "prompts": prompts_ref.digest, "n_users": cfg.n_users,
                       "mix": cfg.cohort_mix, "min": cfg.min_pairs, "max": cfg.max_pairs,
                       "heldout": cfg.heldout_pairs_per_user, "seed": cfg.seed,
                       # hashed only when on, so stores prepared before the groups existed keep their population
                       **({"holdout": cfg.holdout_share} if cfg.holdout_share else {}),
                       **({"out_of_cohort": cfg.n_out_of_cohort} if cfg.n_out_of_cohort else {})})
    folder = ("data", "population", key)
    t0 = time.perf_counter()
    if stage_done(store, *folder):
        users_ref = _ref(store, (*folder, "users.parquet"))
        pairs_ref = TableRef((*folder, "pairs.parquet"), store.read_json(*folder, MANIFEST)["pairs_digest"],
                             store.read_json(*folder, MANIFEST)["pairs_rows"])
        skipped.append("population")
    else:
        prompts = store.read_table(*prompts_ref.path)
        cands = store.read_table(*cand_ref.path)
        stats = users.feature_stats(cands)
        population = users.make_population(cfg.n_users, feature_stats=stats, cohort_mix=cfg.cohort_mix,
                                           seed=cfg.seed, min_pairs=cfg.min_pairs, max_pairs=cfg.max_pairs,
                                           holdout_share=cfg.holdout_share, n_out_of_cohort=cfg.n_out_of_cohort)
        pairs = users.make_pairs(population, prompts, cands, heldout_pairs_per_user=cfg.heldout_pairs_per_user,
                                 seed=cfg.seed)
        store.write_table(population, *folder, "users.parquet")
        store.write_table(pairs, *folder, "pairs.parquet")
        store.write_json({"stage": "population", "digest": table_digest(population), "rows": population.num_rows,
                          "pairs_digest": table_digest(pairs), "pairs_rows": pairs.num_rows}, *folder, MANIFEST)
        users_ref = _ref(store, (*folder, "users.parquet"))
        pairs_ref = TableRef((*folder, "pairs.parquet"), table_digest(pairs), pairs.num_rows)
    timings["population"] = time.perf_counter() - t0
    say("population", 5, 5)

    return DataArtifacts(prompts=prompts_ref, candidates=cand_ref, users=users_ref, pairs=pairs_ref,
                         base_model_path=base_folder, base_model_version=base_version, timings_s=timings,
                         skipped=tuple(skipped), scorer=scorer_info)
