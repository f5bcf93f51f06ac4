"""`latentpref` command line: one hop from each subcommand to its flow (STYLE.md §5)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _quiet_defaults() -> None:
    # offline box: Prefect's telemetry would only log DNS errors
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary API server can take long to start on a busy 2-core box (default 20 s)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default",
                   help="default (real SmolLM2-135M, ~20 min on 2 CPU cores), small (spec-sized SmolLM2 comparison) "
                        "or tiny (random 2-layer GPT-2, for tests)")
    p.add_argument("--config", help="YAML file overriding the preset")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set personalize.beta=0.2 (repeatable)")
    p.add_argument("--store", help="store root: local folder or s3://bucket/prefix")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite in the store)")
    p.add_argument("--seed-shift", type=int, default=0, metavar="N",
                   help="add N to every stage's seed (data, CLaP, fits, evaluation): another draw of the night")


def _load(args):
    from latentpref.pipelines.config import load_config
    overrides = list(args.set)
    if args.store:
        overrides.append(f"runtime.store={args.store}")
    if args.ray_address:
        overrides.append(f"runtime.ray_address={args.ray_address}")
    if args.mlflow_uri:
        overrides.append(f"runtime.mlflow_tracking_uri={args.mlflow_uri}")
    return load_config(args.preset, file=args.config, overrides=overrides,
                       seed_shift=getattr(args, "seed_shift", 0))


def _run_flow(args, until: str) -> int:
    from latentpref.pipelines.console import operator_console
    from latentpref.pipelines.nightly import NightFailed, nightly
    from latentpref.pipelines.runs import describe_error, root_cause
    from latentpref.tasks.data.locks import StoreLocked
    from latentpref.tasks.data.store import StoreUnavailable
    cfg = _load(args)
    command = "nightly" if until == "report" else until
    # a real process keeps fds 1/2 on the log file to its end: interpreter-exit noise stays out of the console
    with operator_console(verbose=args.verbose, store_root=cfg.runtime.store,
                          restore=not getattr(args, "own_process", False)) as screen:
        try:
            report = nightly(cfg, until=until)
        except NightFailed as err:
            _night_summary(screen, cfg, err.report, command)
            screen.error(f"latentpref {command}: FAILED in stage {err.stage}: {err.error}")
            screen.error("  resume        : run the same command again: finished stages and users are skipped, "
                         "it continues from what was stored")
            return 2 if isinstance(root_cause(err.__cause__ or err), ValueError) else 1
        except (StoreLocked, StoreUnavailable) as err:   # another night holds the store / the store is down
            screen.error(f"error: {err}")
            return 3
        except ValueError as err:   # config / argument errors: say what is wrong, no traceback
            screen.error(f"error: {err}")
            return 2
        except Exception as err:  # noqa: BLE001 - before the night's MLflow run existed
            logging.getLogger(__name__).exception("latentpref %s failed", command)
            screen.error(f"latentpref {command}: FAILED before its first stage: {describe_error(err)}")
            screen.error(f"  full log      : {screen.log_path}")
            return 1
        _night_summary(screen, cfg, report, command)
    return 0


def _night_summary(screen, cfg, report, command: str) -> None:
    """The operator's final lines: what ran and how long, where results, report and log are, how to open MLflow."""
    from latentpref.pipelines.runtime import mlflow_uris, open_store
    uri, _ = mlflow_uris(cfg.runtime, open_store(cfg.runtime))
    times = ", ".join(f"{k} {v:.0f}s" for k, v in report.stage_seconds.items())
    screen.line(f"\nlatentpref {command}: {report.status.lower()} in {report.seconds:.0f}s ({times or 'no stage'})")
    screen.line(f"  MLflow run id : {report.run_id} (experiment '{cfg.runtime.mlflow_experiment}')")
    screen.line(f"  MLflow UI     : mlflow ui --backend-store-uri {uri}")
    screen.line(f"  output folder : {report.store}")
    if report.report_path:
        screen.line(f"  HTML report   : {report.report_path} (across nights: nights.html beside it)")
    if report.log_path:
        screen.line(f"  full log      : {report.log_path}")
    if report.users:
        screen.line(f"  users         : {json.dumps(report.users)}")
    q = report.quality or {}
    if q.get("latent_dpo"):
        p, b = q["latent_dpo"], q.get("best_baseline")
        ci = f" [{p['lo']:.3f}, {p['hi']:.3f}]" if p.get("lo") is not None else ""
        line = f"  quality       : latent_dpo {p['value']:.3f}{ci}"
        if b:
            line += f", best baseline {b['method']} {b['value']:.3f}"
        screen.line(line + f" ({q['label']})")
        personal = q.get("personal") or {}
        if personal:
            screen.line("  personal      : latent_dpo " + ", ".join(
                f"{name} {p['value']:.3f}" + (f" [{p['lo']:.3f}, {p['hi']:.3f}]" if p.get("lo") is not None else "")
                for name, p in personal.items() if p.get("value") is not None))
        for group, figures in (q.get("groups") or {}).items():
            screen.line(f"  {group:<14}: latent_dpo " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    metric = q.get("metric", "win_rate")   # the headline column (win_rate_vs_prior when the evaluation has it)
    for row in report.comparison:
        extra = "".join(f" {k}={row[k]:.3f}" for k in ("win_rate_vs_base", "own_vs_swapped")
                        if row.get(k) is not None)
        screen.line(f"  {row['method']:<16} {metric}={row.get(metric) or 0:.3f}{extra} "
                    f"mean_reward={row.get('mean_reward') or 0:.3f} fit_s/user={row.get('fit_seconds') or 0:.3f}")
    screen.line(f"  past nights   : latentpref runs --store {report.store}")


def _ingest(args) -> int:
    import mlflow

    from latentpref.pipelines import tracking
    from latentpref.pipelines.runtime import open_store, setup_mlflow
    from latentpref.tasks.data.ingest import ingest_feedback
    from latentpref.tasks.data.validate import FeedbackFileError
    cfg = _load(args)
    store = open_store(cfg.runtime)
    setup_mlflow(cfg.runtime, store)
    with mlflow.start_run(run_name="ingest"):
        mlflow.set_tag("flow", "ingest")
        try:
            report = ingest_feedback(args.file, store)
        except FeedbackFileError as err:
            mlflow.set_tag("error", str(err)[:500])
            print(f"error: {err}", file=sys.stderr)
            return 2
        mlflow.log_metrics({"rows_read": report.rows_read, "rows_accepted": report.rows_accepted,
                            "rows_quarantined": report.rows_quarantined,
                            "rows_duplicate_of_stored": report.rows_duplicate_of_stored, "users": report.users})
        mlflow.log_params({"source": tracking.safe_value("source", args.file), "batch": report.batch})
        tracking.log_json_artifact(report.to_dict(), "ingest_report.json")
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def _generate(args) -> int:
    from latentpref.pipelines.runtime import open_store
    from latentpref.tasks.evaluate.serving import PersonalizedGenerator
    cfg = _load(args)
    try:
        gen = PersonalizedGenerator.from_store(open_store(cfg.runtime))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result = gen.generate([(args.user, args.prompt)], max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          seed=args.seed)[0]
    if result.notice:
        print(f"notice: {result.notice}", file=sys.stderr)
    print(result.text)
    return 0


def _serve(args) -> int:
    from latentpref.pipelines.serve import ServeOptions, run
    cfg = _load(args)
    options = ServeOptions(store=cfg.runtime.store, num_replicas=args.replicas, max_batch_size=args.max_batch_size,
                           cache_users=args.cache_users, dtype=args.dtype, token_file=args.token_file,
                           mlflow_tracking_uri=cfg.runtime.mlflow_tracking_uri)
    from latentpref.pipelines.runtime import open_store
    from latentpref.pipelines.serve import ServeStartFailed
    from latentpref.tasks.evaluate.serve_core import current_release
    try:
        current_release(open_store(cfg.runtime))      # nothing to serve: say so before starting Ray
        run(options, host=args.host, port=args.port, ray_address=cfg.runtime.ray_address,
            num_cpus=cfg.runtime.ray_num_cpus, object_store_mb=cfg.runtime.ray_object_store_mb,
            start_budget_s=args.start_budget)
    except (ServeStartFailed, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    return 0


def _existing_tracking_uri(cfg, store, which: str) -> str | None:
    """The MLflow tracking URI of the configured store, or None (after saying why on stderr) when the store's own
    sqlite database does not exist: reading commands must not create an empty one."""
    from latentpref.pipelines.runtime import mlflow_uris
    configured = cfg.runtime.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not configured and store.is_local and not os.path.exists(store.url("mlflow", "mlflow.db")):
        print(f"error: no MLflow database at {store.url('mlflow', 'mlflow.db')}: pass --store ({which}) "
              "or --mlflow-uri", file=sys.stderr)
        return None
    return mlflow_uris(cfg.runtime, store)[0]


def _report(args) -> int:
    from latentpref.pipelines.report import build_report
    from latentpref.tasks.data.store import Store
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per tiny table is noise
    cfg = _load(args)
    store = Store(cfg.runtime.store)
    uri = _existing_tracking_uri(cfg, store, "the night's store")
    if uri is None:
        return 2
    try:
        path = build_report(args.run_id, args.out, tracking_uri=uri, store=store)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _runs(args) -> int:
    """The last nights of the configured MLflow experiment (newest first), as a table or JSON."""
    import mlflow

    from latentpref.pipelines import runs
    from latentpref.tasks.data.store import Store
    cfg = _load(args)
    store = Store(cfg.runtime.store)
    uri = _existing_tracking_uri(cfg, store, "the nights' store")
    if uri is None:
        return 2
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.runtime.mlflow_experiment)
    nights = runs.list_nights(client, exp.experiment_id, last=args.last) if exp is not None else []
    print(runs.to_json(nights) if args.json else runs.format_nights(nights))
    return 0


def _evaluation_runs(cfg, store, user_id: str) -> list[dict]:
    """MLflow per-(user, method) runs of this user, newest first, with the data/model versions they were tagged
    with, so the chain reaches from a stored artifact to every night that evaluated it."""
    import mlflow

    from latentpref.pipelines.runtime import setup_mlflow
    if "'" in user_id or "\\" in user_id:   # cannot be quoted in an MLflow filter string; no such ids are ingested
        return []
    exp_id = setup_mlflow(cfg.runtime, store)
    runs = mlflow.MlflowClient().search_runs([exp_id], filter_string=f"tags.user_id = '{user_id}'",
                                             order_by=["attributes.start_time DESC"], max_results=50)
    keys = ("method", "clap_version", "user_artifact_version", "pairs_digest", "candidates_digest", "prompts_digest")
    return [{"run_id": r.info.run_id, "parent_run_id": r.data.tags.get("mlflow.parentRunId"),
             **{k: r.data.tags.get(k) for k in keys}} for r in runs]


def _lineage(args) -> int:
    from latentpref.pipelines.runtime import open_store
    from latentpref.tasks.policy.store import current_fit
    from latentpref.tasks.policy.forget import TOMBSTONES, is_forgotten, tombstone_key
    cfg = _load(args)
    store = open_store(cfg.runtime)
    if is_forgotten(store, args.user_id):   # lineage keeps only the tombstone: a hash of the id and the time
        stone = store.read_json(*TOMBSTONES, f"{tombstone_key(args.user_id)}.json")
        print(json.dumps({"forgotten": True, **stone}, indent=2))
        return 0
    fit = current_fit(store, args.user_id)
    if fit is None:
        print(f"user {args.user_id!r} has no stored fit in {store.url()}", file=sys.stderr)
        return 1
    clap = store.read_json("models", "clap", fit["clap_version"], "_manifest.json")
    from latentpref.tasks.policy.table import PolicyTable
    table = PolicyTable(store, fit["clap_version"])
    chain = {"user_id": args.user_id, "artifact_version": fit["version"], "data_hash": fit["data_hash"],
             "n_pairs": fit["n_pairs"], "cold_start": fit["cold_start"], "mode": fit["mode"],
             "clap_version": fit["clap_version"], "clap_registered_version": clap.get("clap_model_version"),
             "base_model_version": clap.get("base_model_version"),
             "base_model_path": "/".join(clap.get("base_model_path", [])),
             "policy_table": table.uri, "nights": table.history(args.user_id),
             "evaluation_runs": _evaluation_runs(cfg, store, args.user_id)}
    print(json.dumps(chain, indent=2))
    return 0


def _policies(args) -> int:
    """`latentpref policies {list,compact,migrate}`: the store's policy tables, their upkeep, old stores moved in."""
    from latentpref.pipelines.runtime import open_store
    from latentpref.tasks.data.locks import store_lock
    from latentpref.tasks.policy.store import current_clap_version, migrate_legacy
    from latentpref.tasks.policy.table import TABLE_DIR, PolicyTable
    cfg = _load(args)
    store = open_store(cfg.runtime)
    versions = sorted(n.removesuffix(".lance") for n in store.listdir(TABLE_DIR) if n.endswith(".lance"))
    if args.action == "list":
        out = []
        for v in versions:
            table = PolicyTable(store, v)
            out.append({"clap_version": v, "current": v == current_clap_version(store), "uri": table.uri,
                        "rows": table.count(), "version": table.latest_version(), "tags": table.tags()})
        print(json.dumps(out, indent=2))
        return 0
    # both rewrite the store's tables: never beside a night (the night's lock)
    with store_lock(store, "nightly"):
        if args.action == "migrate":
            print(json.dumps(migrate_legacy(store), indent=2))
            return 0
        from latentpref.tasks.evaluate.serve_core import current_release
        try:
            served = current_release(store).policy_tag
        except FileNotFoundError:
            served = None
        done = [PolicyTable(store, v).compact(keep_nights=args.keep_nights, protect=[served] if served else [])
                for v in versions]
        print(json.dumps(done, indent=2))
    return 0


def _forget(args) -> int:
    """`latentpref forget USER_ID`: remove the user from the store and MLflow (tasks/policy/forget.py)."""
    from latentpref.pipelines.runtime import mlflow_uris, open_store
    from latentpref.tasks.data.locks import store_lock
    from latentpref.tasks.policy.forget import forget_in_mlflow, forget_user
    cfg = _load(args)
    store = open_store(cfg.runtime)
    with store_lock(store, "nightly", wait_s=args.wait):     # never beside a night's writes
        report = forget_user(store, args.user_id)
        try:
            report["mlflow"] = forget_in_mlflow(mlflow_uris(cfg.runtime, store)[0], args.user_id)
        except Exception as err:
            print(json.dumps(report, indent=2))
            print(f"error: the store is purged but MLflow is not: {err} (run the command again)", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentpref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("nightly", "run the whole chain: prepare, pretrain, personalize, evaluate, report"),
                        ("prepare", "prepare data: prompts, SFT base LM, candidates, scores, users, pairs"),
                        ("pretrain", "prepare (if needed), then pretrain CLaP on Ray Train"),
                        ("personalize", "... then fit every user's latent encoder (Ray fan-out)"),
                        ("evaluate", "... then evaluate latent DPO against the baselines")):
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.add_argument("-v", "--verbose", action="store_true",
                       help="every log line (Ray, Prefect, libraries) on the console too; default: progress and "
                            "summaries only, the full log in the night's run folder")
        p.set_defaults(func=lambda a, n=name: _run_flow(a, "report" if n == "nightly" else n))
    p = sub.add_parser("ingest", help="validate a feedback file (Parquet/CSV/JSONL) and add it to the store")
    p.add_argument("file")
    _config_args(p)
    p.set_defaults(func=_ingest)
    p = sub.add_parser("generate", help="generate text for a user id and a prompt")
    p.add_argument("--user", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample (top-k 50) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    _config_args(p)
    p.set_defaults(func=_generate)
    p = sub.add_parser("serve", help="serve every user of the store: OpenAI-style /v1/completions on Ray Serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--cache-users", type=int, default=1024, help="user policies held per replica (LRU)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="LM precision: auto = bf16 autocast where the CPU computes it natively (runtime.lm_dtype)")
    p.add_argument("--token-file", help="require this bearer token (or set $LATENTPREF_SERVE_TOKEN)")
    p.add_argument("--start-budget", type=float, default=600.0,
                   help="seconds to keep retrying a start that fails (a busy box: e.g. beside a running night)")
    _config_args(p)
    p.set_defaults(func=_serve)
    p = sub.add_parser("report", help="render the HTML report of a nightly run")
    p.add_argument("run_id")
    p.add_argument("--out", default="latentpref-report")
    _config_args(p)
    p.set_defaults(func=_report)
    p = sub.add_parser("runs", help="the last nights from MLflow: status, time per stage, users, quality, failures")
    p.add_argument("--last", type=int, default=10, help="how many nights (newest first)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _config_args(p)
    p.set_defaults(func=_runs)
    p = sub.add_parser("policies", help="the policy tables: list them, compact them (merge files, keep the newest "
                                        "nights' tags, drop untagged versions), or migrate per-user folders in")
    p.add_argument("action", choices=("list", "compact", "migrate"))
    p.add_argument("--keep-nights", type=int, default=7,
                   help="compact: night tags kept per table, newest first (the served release's is always kept)")
    _config_args(p)
    p.set_defaults(func=_policies)
    p = sub.add_parser("forget", help="remove a user everywhere (feedback, policy tables and their old versions, "
                                      "cached latents, run tables, logs, reports, MLflow); a tombstone keeps them out")
    p.add_argument("user_id")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a running night's lock")
    _config_args(p)
    p.set_defaults(func=_forget)
    p = sub.add_parser("lineage", help="print the data/model chain behind a user's artifact")
    p.add_argument("user_id")
    _config_args(p)
    p.set_defaults(func=_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from latentpref.tasks.data.locks import StoreLocked
    from latentpref.tasks.data.store import StoreUnavailable
    args = build_parser().parse_args(argv)
    args.own_process = argv is None   # the `latentpref` command itself, not a call from Python
    try:
        return args.func(args)
    except (StoreLocked, StoreUnavailable) as err:   # another night holds the store / the store is down
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ValueError as err:   # config / argument errors: say what is wrong, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
