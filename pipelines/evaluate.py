"""evaluate stage: per-user comparison of latent DPO with the baselines, logged to MLflow with lineage."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import tracking
from latentpref.pipelines.config import DataConfig, EvaluateConfig, PersonalizeConfig
from latentpref.pipelines.personalize import PersonalizeSummary, training_pairs
from latentpref.pipelines.pretrain import ClapArtifact
from latentpref.tasks.data.prepare import DataArtifacts
from latentpref.tasks.data.store import Store


@dataclass(frozen=True)
class EvaluationResult:
    per_user_path: tuple[str, ...]
    comparison_path: tuple[str, ...]
    comparison: list[dict]
    users: tuple[str, ...]


def pick_users(records: pa.Table, users_table: pa.Table, n: int, seed: int) -> list[str]:
    """A deterministic sample of fitted (not cold-start) users, spread over cohorts round-robin."""
    fitted = set(u for u, s in zip(records["user_id"].to_pylist(), records["status"].to_pylist())
                 if s in ("fitted", "unchanged"))
    cold = set(u for u, c in zip(records["user_id"].to_pylist(), records["cold_start"].to_pylist()) if c)
    by_cohort: dict[str, list[str]] = {}
    for u, c in zip(users_table["user_id"].to_pylist(), users_table["cohort"].to_pylist()):
        if u in fitted and u not in cold:
            by_cohort.setdefault(c, []).append(u)
    rng = np.random.default_rng(seed)
    for c in by_cohort:
        rng.shuffle(by_cohort[c])
    picked: list[str] = []
    while len(picked) < n and any(by_cohort.values()):
        for c in sorted(by_cohort):
            if by_cohort[c] and len(picked) < n:
                picked.append(by_cohort[c].pop())
    return picked


def _markdown(table: pa.Table) -> str:
    cols = ["method", "users", "mean_reward", "win_rate", "heldout_accuracy", "perplexity", "fit_seconds",
            "trainable_params", "artifact_bytes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table.to_pylist():
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
                cells.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}")
            else:
                cells.append("–" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stage(cfg: EvaluateConfig, data_cfg: DataConfig, pcfg: PersonalizeConfig, data: DataArtifacts,
                   clap: ClapArtifact, fits: PersonalizeSummary, store: Store, parent_run_id: str) -> EvaluationResult:
    import mlflow

    from latentpref.tasks.evaluate.evaluate import EvalSettings, evaluate_users, summarise
    from latentpref.tasks.models.clap import load_clap
    from latentpref.tasks.models.registry import load_base_model
    from latentpref.tasks.train.personalize import load_user_policy
    from tqdm.auto import tqdm
    logger = get_run_logger()
    with mlflow.start_run(run_name="evaluate", parent_run_id=parent_run_id, nested=True) as stage_run:
        mlflow.set_tags({"clap_version": clap.version, "base_model_version": data.base_model_version})
        tracking.log_params(tracking.flatten("evaluate", cfg))
        records = store.read_table(*fits.records_path)
        users_table = store.read_table(*data.users.path)
        user_ids = pick_users(records, users_table, cfg.n_users, cfg.seed)
        prompts = store.read_table(*data.prompts.path)
        test = prompts.filter(pc.equal(prompts["split"], "test"))
        all_pairs = store.read_table(*data.pairs.path)
        heldout = all_pairs.filter(pc.equal(all_pairs["split"], "heldout"))
        train = training_pairs(store, data)
        for name, ref in (("prompts", data.prompts), ("pairs", data.pairs), ("users_hidden", data.users)):
            tracking.log_table_input(ref.url(store), name=name, digest=ref.digest, context="evaluation", rows=ref.rows)

        clap_model = load_clap(store.local_copy(*clap.path))
        base_model, tokenizer = load_base_model(store.local_copy(*data.base_model_path), seed=data_cfg.seed)
        heads = {u: load_user_policy(store, u) for u in user_ids}
        settings = EvalSettings(
            prompts_per_user=cfg.prompts_per_user, max_new_tokens=cfg.max_new_tokens,
            prompt_tokens=data_cfg.prompt_tokens, response_tokens=data_cfg.response_tokens,
            baselines=tuple(cfg.baselines), baseline_steps=cfg.baseline_steps, baseline_lr=cfg.baseline_lr,
            baseline_beta=cfg.baseline_beta, baseline_batch_size=cfg.baseline_batch_size,
            latent_fit={"steps": pcfg.steps, "lr": pcfg.lr, "beta": pcfg.beta, "n_samples": pcfg.n_samples,
                        "evidence_ratio": pcfg.evidence_ratio, "loss_type": pcfg.loss_type, "seed": pcfg.seed},
            seed=cfg.seed)
        with tqdm(total=len(user_ids), desc="evaluate users", unit="user") as bar:
            def progress(done: int, total: int) -> None:
                bar.update(done - bar.n)
                rate = bar.format_dict.get("rate")
                eta = f"{(total - done) / rate:.0f}s" if rate else "?"
                logger.info("evaluate: %d/%d users done, ETA %s", done, total, eta)

            per_user = evaluate_users(
                clap=clap_model, base_model=base_model, tokenizer=tokenizer, users_table=users_table,
                user_ids=user_ids, test_prompts=test["prompt"].to_pylist(), references=test["reference"].to_pylist(),
                train_pairs=train, heldout_pairs=heldout, user_policies=heads, settings=settings, progress=progress)
        comparison = summarise(per_user, seed=cfg.seed)
        per_user_path = ("runs", parent_run_id, "evaluation_per_user.parquet")
        comparison_path = ("runs", parent_run_id, "comparison.parquet")
        store.write_table(per_user, *per_user_path)
        store.write_table(comparison, *comparison_path)

        # one child run per (user, method): every per-user number traces to its data and model versions
        lineage = {"clap_version": clap.version, "base_model_version": data.base_model_version,
                   "pairs_digest": data.pairs.digest, "candidates_digest": data.candidates.digest,
                   "prompts_digest": data.prompts.digest}
        for r in per_user.to_pylist():
            head_manifest = heads[r["user_id"]].manifest if heads.get(r["user_id"]) else {}
            with mlflow.start_run(run_name=f"{r['user_id']}/{r['method']}", nested=True,
                                  parent_run_id=stage_run.info.run_id):
                mlflow.set_tags({**lineage, "user_id": r["user_id"], "method": r["method"], "cohort": r["cohort"],
                                 "user_artifact_version": head_manifest.get("version", ""),
                                 "user_data_hash": head_manifest.get("data_hash", "")})
                mlflow.log_metrics({k: float(r[k]) for k in ("mean_reward", "win_rate", "perplexity", "fit_seconds",
                                                             "trainable_params", "artifact_bytes", "n_train_pairs")
                                    if r.get(k) is not None}
                                   | ({"heldout_accuracy": float(r["heldout_accuracy"])}
                                      if r.get("heldout_accuracy") is not None else {}))
        tracking.log_table_artifact(per_user, "evaluation_per_user")
        for row in comparison.to_pylist():
            mlflow.log_metrics({f"{row['method']}.{k}": float(v) for k, v in row.items()
                                if k in ("mean_reward", "win_rate", "heldout_accuracy", "fit_seconds") and v is not None})
    # the comparison table belongs to the night as a whole: artifact of the parent run
    client = mlflow.MlflowClient()
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
        pq.write_table(comparison, str(Path(d) / "comparison.parquet"))
        pacsv.write_csv(comparison, str(Path(d) / "comparison.csv"))
        (Path(d) / "comparison.md").write_text(_markdown(comparison))
        for name in ("comparison.parquet", "comparison.csv", "comparison.md"):
            client.log_artifact(parent_run_id, str(Path(d) / name), artifact_path="comparison")
    logger.info("evaluate:\n%s", _markdown(comparison))
    return EvaluationResult(per_user_path, comparison_path, comparison.to_pylist(), tuple(user_ids))
