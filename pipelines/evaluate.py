"""evaluate stage: per-user comparison of latent DPO with the baselines, logged to MLflow with lineage."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from latentpref.pipelines import console, tracking
from latentpref.pipelines.config import DataConfig, EvaluateConfig, PersonalizeConfig
from latentpref.pipelines.personalize import PersonalizeSummary, training_pairs
from latentpref.pipelines.pretrain import ClapArtifact
from latentpref.tasks.data import users as users_lib
from latentpref.tasks.data.prepare import DataArtifacts
from latentpref.tasks.data.store import Store


@dataclass(frozen=True)
class EvaluationResult:
    per_user_path: tuple[str, ...]
    comparison_path: tuple[str, ...]
    comparison: list[dict]
    users: tuple[str, ...]
    # per user group (seen / unseen / out_of_cohort): the comparison rows of that group's users
    by_group: dict[str, list[dict]] = field(default_factory=dict)
    baseline_users: tuple[str, ...] = ()


def pick_users(records: pa.Table, users_table: pa.Table, n: int, seed: int, *, n_out_of_cohort: int = 0) -> list[str]:
    """A deterministic sample of fitted (not cold-start) users: `n` cohort users spread round-robin over (population
    group, cohort), so users the CLaP read and users it never read are balanced, then `n_out_of_cohort` users from
    outside the cohorts."""
    fitted = set(u for u, s in zip(records["user_id"].to_pylist(), records["status"].to_pylist())
                 if s in ("fitted", "unchanged"))
    cold = set(u for u, c in zip(records["user_id"].to_pylist(), records["cold_start"].to_pylist()) if c)
    pools: dict[tuple[str, str], list[str]] = {}
    for u, c, g in zip(users_table["user_id"].to_pylist(), users_table["cohort"].to_pylist(),
                       users_lib.user_groups(users_table)):
        if u in fitted and u not in cold:
            pools.setdefault((g, c), []).append(u)
    rng = np.random.default_rng(seed)
    for key in sorted(pools):
        rng.shuffle(pools[key])

    def take(keys: list[tuple[str, str]], count: int) -> list[str]:
        """Round-robin over the keys' cohorts, one user a cohort a round; within a cohort the group alternates
        from round to round (and from cohort to cohort), so groups and cohorts both stay balanced."""
        cohorts = sorted({c for _, c in keys})
        groups = sorted({g for g, _ in keys})
        out: list[str] = []
        rnd = 0
        while len(out) < count and any(pools[k] for k in keys):
            for j, cohort in enumerate(cohorts):
                for t in range(len(groups)):
                    pool = pools.get((groups[(rnd + j + t) % len(groups)], cohort))
                    if pool:
                        out.append(pool.pop())
                        break
                if len(out) >= count:
                    break
            rnd += 1
        return out

    cohort_keys = sorted(k for k in pools if k[0] != users_lib.OUT_OF_COHORT)
    return take(cohort_keys, n) + take(sorted(k for k in pools if k[0] == users_lib.OUT_OF_COHORT), n_out_of_cohort)


def _ptuning_prefix(cfg: EvaluateConfig, data_cfg: DataConfig, data: DataArtifacts, store: Store,
                   prompts: pa.Table) -> dict | None:
    """P-Tuning-SFT (spec §5): the shared prefix every user's P-Tuning-DPO starts from, fitted once per night on
    the train prompts and their true continuations (population text, no user data)."""
    import mlflow

    from latentpref.tasks.evaluate.baselines import fit_prefix_sft
    from latentpref.tasks.models.registry import load_base_model

    if cfg.ptuning_sft_steps == 0:
        return None
    train = prompts.filter(pc.equal(prompts["split"], "train"))
    texts = list(zip(train["prompt"].to_pylist(), train["reference"].to_pylist()))
    base_model, tokenizer = load_base_model(store.local_copy(*data.base_model_path), seed=data_cfg.seed)
    result = fit_prefix_sft(base_model, tokenizer, texts, steps=cfg.ptuning_sft_steps, lr=cfg.ptuning_sft_lr,
                            batch_size=cfg.baseline_batch_size, max_prompt_tokens=data_cfg.prompt_tokens,
                            max_response_tokens=data_cfg.response_tokens, seed=cfg.seed)
    for step, loss in enumerate(result.loss_curve):
        mlflow.log_metric("ptuning_sft.nll", loss, step=step)
    mlflow.log_metric("ptuning_sft.seconds", result.seconds)
    return result.state


PER_USER_METRICS = ("mean_reward", "win_rate", "win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped",
                    "heldout_accuracy", "latent_heldout_accuracy",
                    "z_sensitivity_nats", "latent_shift", "reward_spread", "perplexity", "fit_seconds",
                    "trainable_params", "artifact_bytes", "n_train_pairs", "fit_flops", "peak_rss_bytes")
SUMMARY_METRICS = ("mean_reward", "win_rate", "win_rate_vs_prior", "win_rate_vs_prior_lo", "win_rate_vs_prior_hi",
                   "win_rate_vs_base", "win_rate_vs_base_lo", "win_rate_vs_base_hi",
                   "own_vs_swapped", "own_vs_swapped_lo", "own_vs_swapped_hi",
                   "heldout_accuracy", "latent_heldout_accuracy", "z_sensitivity_nats", "reward_spread", "fit_seconds")


def _markdown(table: pa.Table) -> str:
    cols = (["group"] if "group" in table.column_names else []) + [
            "method", "users", "win_rate_vs_prior", "win_rate_vs_base", "own_vs_swapped", "win_rate", "mean_reward",
            "heldout_accuracy", "latent_heldout_accuracy", "z_sensitivity_nats", "reward_spread", "perplexity",
            "fit_seconds", "trainable_params", "artifact_bytes", "fit_flops", "peak_rss_bytes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table.to_pylist():
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
                cells.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.4g}")
            else:
                cells.append("–" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stage(cfg: EvaluateConfig, data_cfg: DataConfig, pcfg: PersonalizeConfig, data: DataArtifacts,
                   clap: ClapArtifact, fits: PersonalizeSummary, store: Store, parent_run_id: str) -> EvaluationResult:
    import mlflow
    import ray

    from latentpref.tasks.evaluate.chunk import EvalChunkJob, evaluate_chunk, table_from_ipc, table_to_ipc
    from latentpref.tasks.evaluate import personal
    from latentpref.tasks.evaluate.evaluate import EvalSettings, summarise, summarise_by_group
    from latentpref.tasks.policy.table import PolicyTable
    from tqdm.auto import tqdm
    logger = get_run_logger()
    with mlflow.start_run(run_name="evaluate", parent_run_id=parent_run_id, nested=True) as stage_run:
        mlflow.set_tags({"clap_version": clap.version, "base_model_version": data.base_model_version})
        tracking.log_params(tracking.flatten("evaluate", cfg))
        records = store.read_table(*fits.records_path)
        users_table = store.read_table(*data.users.path)
        if cfg.user_ids:
            known = set(records["user_id"].to_pylist())
            unknown = [u for u in cfg.user_ids if u not in known]
            if unknown:
                raise ValueError(f"evaluate.user_ids {unknown[:5]} have no personalize record in this store")
            user_ids = list(cfg.user_ids)
        else:
            user_ids = pick_users(records, users_table, cfg.n_users, cfg.seed,
                                  n_out_of_cohort=cfg.n_out_of_cohort_users)
        # the baselines (a DPO run through the LM per user) on the first baseline_users of them, spread like the rest
        baseline_users = tuple(user_ids if cfg.baseline_users is None else _spread(user_ids, users_table,
                                                                                    cfg.baseline_users))
        prompts = store.read_table(*data.prompts.path)
        test = prompts.filter(pc.equal(prompts["split"], "test"))
        all_pairs = store.read_table(*data.pairs.path)
        heldout = all_pairs.filter(pc.equal(all_pairs["split"], "heldout"))
        train = training_pairs(store, data, user_ids)     # the evaluated users' rows only, read in batches
        for name, ref in (("prompts", data.prompts), ("pairs", data.pairs), ("users_hidden", data.users)):
            tracking.log_table_input(ref.url(store), name=name, digest=ref.digest, context="evaluation", rows=ref.rows)

        table = PolicyTable(store, clap.version)
        heads = table.policies(user_ids, fits.policy_tag)    # the night's tag: exactly what it fitted
        prefix = _ptuning_prefix(cfg, data_cfg, data, store, prompts) if "ptuning_dpo" in cfg.baselines else None
        settings = EvalSettings(
            prompts_per_user=cfg.prompts_per_user, max_new_tokens=cfg.max_new_tokens,
            prompt_tokens=data_cfg.prompt_tokens, response_tokens=data_cfg.response_tokens,
            baselines=tuple(cfg.baselines), baseline_steps=cfg.baseline_steps, baseline_lr=cfg.lr_by_method(),
            baseline_beta=cfg.beta_by_method(), baseline_batch_size=cfg.baseline_batch_size,
            latent_fit=pcfg.fit_settings(),
            seed=cfg.seed, oracle_k=cfg.oracle_k, best_of_k=cfg.best_of_k, ptuning_prefix=prefix,
            baseline_user_ids=None if cfg.baseline_users is None else baseline_users)

        # fan-out: baselines are a full DPO run through the LM per user, by far the costliest part of the night,
        # so chunks of users go to Ray tasks like the latent fits (with retries); each task loads the models once
        def subset(table: pa.Table, users: list[str]) -> bytes:
            return table_to_ipc(table.filter(pc.is_in(table["user_id"], value_set=pa.array(users, pa.string()))))

        remote_eval = ray.remote(num_cpus=cfg.threads_per_task, max_retries=cfg.max_retries,
                                 retry_exceptions=True)(evaluate_chunk)
        chunks = [user_ids[i:i + cfg.users_per_task] for i in range(0, len(user_ids), cfg.users_per_task)]
        pending = {}
        for chunk in chunks:
            job = EvalChunkJob(store_root=store.root, clap_path=tuple(clap.path),
                               base_model_path=tuple(data.base_model_path), base_seed=data_cfg.seed,
                               user_ids=tuple(chunk), users_ipc=subset(users_table, chunk),
                               train_ipc=subset(train, chunk), heldout_ipc=subset(heldout, chunk),
                               test_prompts=tuple(test["prompt"].to_pylist()),
                               references=tuple(test["reference"].to_pylist()), settings=settings,
                               threads=cfg.threads_per_task, clap_version=clap.version,
                               policy_at=fits.policy_tag)
            pending[remote_eval.remote(job)] = len(chunk)
        parts: list[pa.Table] = []
        with tqdm(total=len(user_ids), desc="evaluate users", unit="user") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                parts.append(table_from_ipc(ray.get(done[0])))
                bar.update(pending.pop(done[0]))
                rate = bar.format_dict.get("rate")
                eta = f"{(len(user_ids) - bar.n) / rate:.0f}s" if rate else "?"
                logger.info("evaluate: %d/%d users done, ETA %s", bar.n, len(user_ids), eta)
                console.progress("evaluate", bar.n, len(user_ids))
        per_user = pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
        order = {u: i for i, u in enumerate(user_ids)}   # stable row order whatever the completion order
        per_user = per_user.take(sorted(range(per_user.num_rows),
                                        key=lambda i: (order[per_user["user_id"][i].as_py()], i)))
        # who is who: the user's group, then the measures that compare users with each other (after the fan-out)
        stored_group = dict(zip(users_table["user_id"].to_pylist(), users_lib.user_groups(users_table)))
        per_user = per_user.append_column("group", pa.array(
            [personal.evaluation_group(stored_group[u], clap.read_pairs) for u in per_user["user_id"].to_pylist()],
            pa.string()))
        per_user = personal.add_personal_measures(per_user, users_table)
        comparison = summarise(per_user, seed=cfg.seed)
        by_group = summarise_by_group(per_user, seed=cfg.seed)
        best_baseline = _best_baseline(comparison, cfg.baselines)
        cohorts = {"methods": {m: personal.cohort_reward_matrix(per_user, users_table, m)
                               for m in ("latent_dpo", "latent_dpo_discrete", best_baseline)
                               if m and m in per_user["method"].to_pylist()},
                   "baseline": best_baseline}
        per_user_path = ("runs", parent_run_id, "evaluation_per_user.parquet")
        comparison_path = ("runs", parent_run_id, "comparison.parquet")
        store.write_table(per_user, *per_user_path)
        store.write_table(comparison, *comparison_path)
        store.write_table(by_group, "runs", parent_run_id, "comparison_by_group.parquet")
        store.write_json(cohorts, "runs", parent_run_id, "cohort_matrix.json")

        # one child run per (user, method): every per-user number traces to its data and model versions
        lineage = {"clap_version": clap.version, "base_model_version": data.base_model_version,
                   "pairs_digest": data.pairs.digest, "candidates_digest": data.candidates.digest,
                   "prompts_digest": data.prompts.digest}
        for r in per_user.to_pylist():
            head_manifest = heads[r["user_id"]].manifest if heads.get(r["user_id"]) else {}
            with mlflow.start_run(run_name=f"{r['user_id']}/{r['method']}", nested=True,
                                  parent_run_id=stage_run.info.run_id):
                mlflow.set_tags({**lineage, "user_id": r["user_id"], "method": r["method"], "cohort": r["cohort"],
                                 "group": r["group"],
                                 "user_artifact_version": head_manifest.get("version", ""),
                                 "user_data_hash": head_manifest.get("data_hash", "")})
                mlflow.log_metrics({k: float(r[k]) for k in PER_USER_METRICS if r.get(k) is not None})
        tracking.log_table_artifact(per_user, "evaluation_per_user")
        for row in comparison.to_pylist():
            mlflow.log_metrics({f"{row['method']}.{k}": float(v) for k, v in row.items()
                                if k in SUMMARY_METRICS and v is not None})
        for row in by_group.to_pylist():
            mlflow.log_metrics({f"{row['group']}.{row['method']}.{k}": float(v) for k, v in row.items()
                                if k in SUMMARY_METRICS and v is not None})
    # the comparison table belongs to the night as a whole: artifact of the parent run
    client = mlflow.MlflowClient()
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
        pq.write_table(comparison, str(Path(d) / "comparison.parquet"))
        pacsv.write_csv(comparison, str(Path(d) / "comparison.csv"))
        (Path(d) / "comparison.md").write_text(_markdown(comparison) + "\n" + _markdown(by_group))
        pq.write_table(by_group, str(Path(d) / "comparison_by_group.parquet"))
        (Path(d) / "cohort_matrix.json").write_text(json.dumps(cohorts, indent=1))
        for name in ("comparison.parquet", "comparison.csv", "comparison.md", "comparison_by_group.parquet",
                     "cohort_matrix.json"):
            client.log_artifact(parent_run_id, str(Path(d) / name), artifact_path="comparison")
    logger.info("evaluate:\n%s\n%s", _markdown(comparison), _markdown(by_group))
    groups = {g: [r for r in by_group.to_pylist() if r["group"] == g] for g in personal.GROUPS
              if g in by_group["group"].to_pylist()}
    return EvaluationResult(per_user_path, comparison_path, comparison.to_pylist(), tuple(user_ids), groups,
                            baseline_users)


def _spread(user_ids: list[str], users_table: pa.Table, n: int) -> list[str]:
    """n of the picked users, round-robin over their population groups (keeping the pick order within each)."""
    group = dict(zip(users_table["user_id"].to_pylist(), users_lib.user_groups(users_table)))
    queues: dict[str, list[str]] = {}
    for u in user_ids:
        queues.setdefault(group[u], []).append(u)
    out: list[str] = []
    while len(out) < min(n, len(user_ids)):
        for g in list(queues):
            if queues[g] and len(out) < n:
                out.append(queues[g].pop(0))
    return out


def _best_baseline(comparison: pa.Table, baselines) -> str | None:
    """The baseline with the highest pooled win_rate_vs_prior (the cohort picture shows it beside latent DPO)."""
    rows = [r for r in comparison.to_pylist() if r["method"] in baselines and r.get("win_rate_vs_prior") is not None]
    return max(rows, key=lambda r: r["win_rate_vs_prior"])["method"] if rows else None
