"""Few-shot curve (issue #15 item 6): quality and cost of each method as a user's number of pairs N grows.

    python benchmarks/fewshot.py --out F [--preset tiny|default|small] [--store DIR] [--n-pairs 1,2,4,8,16,32,64]
                                 [--users 16] [--out-of-cohort-users 0] [--resume]

Reuses a finished night's store (prepare + pretrain done: `models/clap/current.json`, `data/population/*/`,
`data/prompts/*/`); `--preset` must be the one that night ran (its evaluate / personalize settings are used).
Without `--store` a tiny world is built first (`latentpref pretrain --preset tiny` into a temporary folder).
The store is only read while the curve runs; with `--store`, the finished result (the same JSON as `--out`, written
there first) is also written to `reports/fewshot/<clap_version>.json` in it, where the night's HTML report
(`latentpref report`) finds and plots it. Partial results (after each N) go to `--out` only, so a run that dies
never replaces a finished curve of the same CLaP in the store. `--resume` continues such a run: the N points already
in `--out` are kept and only the rest are measured (the small preset's curve takes hours on a 2-core box); it is
refused unless the store's CLaP, the users, the preset, the overrides, the N values, the methods and the fit
settings are those of the earlier run.

For every N, each of `--users` users (sorted ids, those with held-out pairs; then `--out-of-cohort-users` users from
outside the cohorts, group "out_of_cohort" of the users table, appended) keeps the first N of its train pairs
(a fixed per-user shuffle, so the N-sets are nested; N is capped at what the user has, `n_pairs_used` says so), and:
- latent DPO, the preset's default mode (`latent_dpo`) and faithful (`latent_dpo_faithful`): the user's texts are
  encoded by the CLaP (`build_latent_cache`, the night's per-user cache encoding) and the user is fitted alone by
  the night's fit function (`fit_users` / `fit_encoder_users`) with the preset's PersonalizeConfig for that mode;
- LoRA-DPO: `fit_baseline` with the preset's evaluate.baseline_steps / baseline_lr / baseline_batch_size, through the
  evaluation itself;
- the population prior (`clap_prior`, CLaP with the prior's z: zero shift) needs no pairs.
Quality comes from the night's evaluation, `tasks/evaluate/evaluate.evaluate_users`, on the N-pair train table:
- heldout_accuracy: share of the user's held-out pairs with [log p(y_w|x, policy) - log p(y_w|x, ref)] >
  [same for y_l], the LM run (latent: policy = the LM with the user's z = mu_theta(x), ref = with the prior's z;
  LoRA-DPO: policy = the LoRA model, ref = the base LM); ties half. The prior is its own reference: 0.5 exactly.
- win_rate_vs_prior: share of the evaluation's test prompts where the method's generation beats the prior's (same
  prompt, same sampling seed) under the user's hidden reward (ties half). The prior against itself: 0.5.
- seconds_per_user: latent DPO = encoding of the user's N pairs' texts + the fit, one user alone; LoRA-DPO = the
  reference log-probs of the user's N pairs + the fit (`fit_baseline`'s seconds, one user alone); prior 0.
Whether the personalisation is *personal* (issue 27), as the night measures it:
- win_rate_vs_base: as win_rate_vs_prior, against the plain base LM's generation (base_lm, same prompt and seed).
- own_vs_swapped: the user's generation against the generation of the same method, same N, for the curve's user with
  the least similar hidden reward (`tasks/evaluate/personal.add_personal_measures` over all of the N's users and
  methods together; partners among the users of the same method), judged by the user's own reward, ties half. 0.5 =
  the method wrote nothing this user prefers over another user's text (it learnt only what users share); null for
  the prior (the same text for everyone) and for a method with fewer than two users.
Each value is the mean over users with a 95% percentile bootstrap interval over users (`<metric>_ci`: [lo, hi]); the
per-user values are in `<metric>_per_user` (one list per N, in the order of `users`, LoRA-DPO: its first users).
Per method, the objects `seen` (users whose pairs the CLaP's training read), `unseen` (cohort users it never read)
and `out_of_cohort` hold `users` and the same means and intervals over that group's users only, for the groups the
method has users in; `user_groups` says each user's group, `clap_read_pairs` whether the CLaP read pairs (the preset's
pretrain settings: the LPC pair objective of a discrete CLaP, the population preference term of a Gaussian one).
`--resume` refuses an earlier JSON without these (they need every N's generated texts): rerun it without `--resume`.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

log = logging.getLogger("fewshot_bench")
N_PAIRS = (1, 2, 4, 8, 16, 32, 64)
METRICS = ("heldout_accuracy", "win_rate_vs_prior", "seconds_per_user", "win_rate_vs_base", "own_vs_swapped")
PERSONAL = ("win_rate_vs_base", "own_vs_swapped")   # issue 27: absent from curves measured before it
GROUPS = ("seen", "unseen", "out_of_cohort")        # tasks/evaluate/personal.GROUPS


@dataclass
class Night:
    """What a finished night left in its store, loaded once."""

    store: str
    clap_dir: str
    clap_version: str
    clap: Any
    tokenizer: Any
    base_model: Any
    base_tokenizer: Any
    train: pa.Table          # split == "train"
    heldout: pa.Table        # split == "heldout"
    users: pa.Table          # hidden user table (cohort, weights_json)
    test_prompts: list[str]
    references: list[str]
    prompt_tokens: int
    response_tokens: int


def _newest(pattern: str) -> str:
    found = glob.glob(pattern)
    if not found:
        raise FileNotFoundError(f"nothing matches {pattern!r}: is this a store of a finished prepare stage?")
    return max(found, key=os.path.getmtime)


def ensure_store(store_dir: str | None, preset: str) -> str:
    """A store holding a finished prepare + pretrain; built with the CLI when none is given."""
    if store_dir is None or not os.path.exists(os.path.join(store_dir, "models", "clap", "current.json")):
        store_dir = store_dir or tempfile.mkdtemp(prefix="lp-fewshot-store-")
        log.info("building a %s world in %s (latentpref pretrain --preset %s)", preset, store_dir, preset)
        subprocess.run([sys.executable, "-m", "latentpref.pipelines.cli", "pretrain", "--preset", preset,
                        "--store", store_dir], check=True)
    return store_dir


def load_night(store_dir: str, seed: int = 0) -> Night:
    from latentpref.tasks.models.clap import load_clap, load_clap_tokenizer
    from latentpref.tasks.models.registry import load_base_model
    version = json.loads(Path(store_dir, "models", "clap", "current.json").read_text())["version"]
    clap_dir = os.path.join(store_dir, "models", "clap", version)
    manifest = json.loads(Path(clap_dir, "_manifest.json").read_text())
    pairs = pq.read_table(_newest(os.path.join(store_dir, "data", "population", "*", "pairs.parquet")))
    users = pq.read_table(_newest(os.path.join(store_dir, "data", "population", "*", "users.parquet")))
    prompts = pq.read_table(_newest(os.path.join(store_dir, "data", "prompts", "*", "prompts.parquet")))
    test = prompts.filter(pc.equal(prompts["split"], "test"))
    base_model, base_tok = load_base_model(os.path.join(store_dir, *manifest["base_model_path"]), seed=seed)
    return Night(store_dir, clap_dir, version, load_clap(clap_dir).eval(), load_clap_tokenizer(clap_dir),
                 base_model.eval(), base_tok, pairs.filter(pc.equal(pairs["split"], "train")),
                 pairs.filter(pc.equal(pairs["split"], "heldout")), users, test["prompt"].to_pylist(),
                 test["reference"].to_pylist(), int(manifest.get("prompt_tokens", 32)),
                 int(manifest.get("response_tokens", 24)))


def triples_of(table: pa.Table) -> list[tuple[str, str, str]]:
    return list(zip(table["prompt"].to_pylist(), table["chosen"].to_pylist(), table["rejected"].to_pylist()))


def weights_of(table: pa.Table) -> list[float]:
    if "weight" not in table.column_names:
        return [1.0] * table.num_rows
    return [1.0 if w is None else float(w) for w in table["weight"].to_pylist()]


# ------------------------------------------------------------------------------------------------ one user alone
def fit_latent_alone(night: Night, mode: str, triples: list[tuple[str, str, str]], weights: list[float],
                     fit) -> tuple[Any, float, float]:
    """(UserPolicy, encode_s, fit_s) of one user fitted alone by the night's fit function in `mode`.

    encode_s: the CLaP encoding of this user's texts (prompt features / tokens, posteriors of every chosen and
    rejected response: `build_latent_cache`, as the personalize stage's cache); fit_s: the fit on them.
    `fit` is a FitSettings (PersonalizeConfig.fit_settings() of the mode).
    """
    from latentpref.tasks.policy.cache import build_latent_cache, text_key
    from latentpref.tasks.policy.store import UserPolicy
    from latentpref.tasks.train.fit_encoder import fit_encoder_users
    from latentpref.tasks.train.fit_user import FitConfig, fit_users
    prompts = [t[0] for t in triples]
    t0 = time.perf_counter()
    cache = build_latent_cache(night.clap, night.tokenizer, prompts,
                               [(t[0], t[1]) for t in triples] + [(t[0], t[2]) for t in triples],
                               prompt_tokens=night.prompt_tokens, response_tokens=night.response_tokens)
    encode_s = time.perf_counter() - t0
    p = torch.tensor([cache.prompt_index[text_key(t[0])] for t in triples])
    c = torch.tensor([cache.response_index[text_key(t[0], t[1])] for t in triples])
    r = torch.tensor([cache.response_index[text_key(t[0], t[2])] for t in triples])
    post = (cache.mu[c], cache.logvar[c], cache.mu[r], cache.logvar[r])
    one = torch.zeros(len(triples), dtype=torch.long)
    w = torch.tensor(weights, dtype=torch.float32)
    cfg = FitConfig(**fit.gaussian())
    t0 = time.perf_counter()
    if mode == "head-only":
        res = fit_users(cache.features[p], *post, one, 1, cfg, pair_weight=w)
        tensors = {"weight": res.weight[0], "bias": res.bias[0]}
    else:
        encoder = night.clap.encoder.eval().requires_grad_(False)
        used, pair_prompt = torch.unique(p, return_inverse=True)
        res = fit_encoder_users(encoder, mode, cache.prompt_ids[used], cache.prompt_mask[used], pair_prompt, *post,
                                one, 1, cfg, pair_weight=w)
        tensors = res.states[0]
    fit_s = time.perf_counter() - t0
    n = sum(t.numel() for t in tensors.values())
    policy = UserPolicy(mode, tensors, {"mode": mode, "fit_seconds": fit_s, "trainable_params": n,
                                        "artifact_bytes": 4 * n, "cold_start": False})
    return policy, encode_s, fit_s


def eval_settings(cfg, night: Night, baselines: tuple[str, ...], latent_fit):
    """The evaluation's settings of the night's config (EvalSettings as pipelines/evaluate.py builds them)."""
    from latentpref.tasks.evaluate.evaluate import EvalSettings
    e = cfg.evaluate
    return EvalSettings(prompts_per_user=e.prompts_per_user, max_new_tokens=e.max_new_tokens,
                        prompt_tokens=night.prompt_tokens, response_tokens=night.response_tokens,
                        baselines=baselines, baseline_steps=e.baseline_steps, baseline_lr=e.lr_by_method(),
                        baseline_beta=e.beta_by_method(), baseline_batch_size=e.baseline_batch_size,
                        latent_fit=latent_fit, seed=e.seed, oracle_k=e.oracle_k, ptuning_prefix=None)


def latent_heldout_accuracy(night: Night, policy, held: list[tuple[str, str, str]]) -> float:
    """The evaluation's LM-based held-out accuracy of a latent policy (user's z vs the prior's z)."""
    from latentpref.tasks.evaluate.evaluate import EvalSettings, _latent_lm_checks
    s = EvalSettings(prompts_per_user=0, max_new_tokens=0, prompt_tokens=night.prompt_tokens,
                     response_tokens=night.response_tokens, baselines=(), baseline_steps=0, baseline_lr={},
                     baseline_beta={}, baseline_batch_size=1, latent_fit=None)
    return _latent_lm_checks(night.clap, night.tokenizer, policy, held, s)["heldout_accuracy"]


def baseline_heldout_accuracy(night: Night, model, held: list[tuple[str, str, str]], ref: dict) -> float:
    """The evaluation's held-out accuracy of a baseline policy: its log-ratio against the base LM, LM run."""
    from latentpref.tasks.evaluate import baselines, metrics
    lengths = dict(max_prompt_tokens=night.prompt_tokens, max_response_tokens=night.response_tokens)
    hp = [h[0] for h in held]
    lc, _ = baselines.sequence_logps(model, night.base_tokenizer, hp, [h[1] for h in held], **lengths)
    lr, _ = baselines.sequence_logps(model, night.base_tokenizer, hp, [h[2] for h in held], **lengths)
    rc = np.array([ref[(h[0], h[1])] for h in held])
    rr = np.array([ref[(h[0], h[2])] for h in held])
    return metrics.preference_accuracy(lc.numpy() - rc, lr.numpy() - rr)


def reference_logps(night: Night, triples: list[tuple[str, str, str]]) -> tuple[dict, float]:
    """(reference log-prob cache of the triples' responses under the base LM, seconds)."""
    from latentpref.tasks.evaluate.baselines import reference_logps_cache
    t0 = time.perf_counter()
    ref = reference_logps_cache(night.base_model, night.base_tokenizer,
                                [(a, b) for a, b, _ in triples] + [(a, d) for a, _, d in triples],
                                max_prompt_tokens=night.prompt_tokens, max_response_tokens=night.response_tokens)
    return ref, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ the curve
def pick_users(night: Night, n: int, n_out_of_cohort: int = 0) -> list[str]:
    """The first `n` sorted ids with train and held-out pairs, then the first `n_out_of_cohort` of the users outside
    the cohorts (users table group "out_of_cohort") not among them."""
    from latentpref.tasks.data.users import OUT_OF_COHORT, user_groups
    held = set(night.heldout["user_id"].to_pylist())
    have = set(night.train["user_id"].to_pylist())
    eligible = sorted(u for u in set(night.users["user_id"].to_pylist()) if u in held and u in have)
    picked = eligible[:n]
    outside = {u for u, g in zip(night.users["user_id"].to_pylist(), user_groups(night.users)) if g == OUT_OF_COHORT}
    return picked + [u for u in eligible if u in outside and u not in picked][:n_out_of_cohort]


def clap_read_pairs(cfg, night: "Night | None" = None) -> bool:
    """Whether the night's CLaP trained on population users' pairs (they then count as "seen"): the CLaP manifest's
    `read_pairs` (written by the pretrain stage), else (manifests from before it) the preset's pretrain settings as
    the stage decides it."""
    if night is not None:
        manifest = os.path.join(night.clap_dir, "_manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as fh:
                found = json.load(fh)
            if "read_pairs" in found:
                return bool(found["read_pairs"])
    from latentpref.pipelines import pretrain
    return pretrain._uses_pairs(cfg.pretrain)


def evaluation_groups(night: Night, cfg, user_ids: list[str]) -> dict[str, str]:
    """{user: "seen" / "unseen" / "out_of_cohort"} as the night's evaluate stage assigns them."""
    from latentpref.tasks.data.users import user_groups
    from latentpref.tasks.evaluate.personal import evaluation_group
    stored = dict(zip(night.users["user_id"].to_pylist(), user_groups(night.users)))
    read = clap_read_pairs(cfg, night)
    return {u: evaluation_group(stored[u], read) for u in user_ids}


def personal_measures(rows: list[dict[str, Any]], users: pa.Table) -> dict[tuple[str, str], float | None]:
    """{(method, user): own_vs_swapped} over one N's evaluation rows of every method (methods already renamed to the
    curve's names), as the night computes it over its per-user table."""
    from latentpref.tasks.evaluate.personal import add_personal_measures
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = add_personal_measures(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), users)
    return {(m, u): v for m, u, v in zip(table["method"].to_pylist(), table["user_id"].to_pylist(),
                                         table["own_vs_swapped"].to_pylist())}


def subsets(night: Night, user_ids: list[str], seed: int) -> dict[str, pa.Table]:
    """Each user's train pairs in a fixed random order (N pairs = the first N rows: nested sets)."""
    out = {}
    for k, u in enumerate(user_ids):
        t = night.train.filter(pc.equal(night.train["user_id"], u))
        out[u] = t.take(np.random.default_rng(seed + k).permutation(t.num_rows))
    return out


def _ci(values: list[float], seed: int) -> tuple[float, float, float]:
    from latentpref.tasks.evaluate.metrics import bootstrap_ci
    return bootstrap_ci(np.asarray(values, dtype=float), seed=seed)


def run_curve(night: Night, cfg, user_ids: list[str], n_pairs: list[int], seed: int = 0,
              faithful: bool = True, lora_users: list[str] | None = None, overrides: list[str] = (),
              on_point=None, done: dict | None = None) -> dict:
    """The curve over `n_pairs` (module docstring); `on_point(partial)` gets the result so far after each N.

    `done`: the curve of an earlier, interrupted run (`run_curve`'s or the --out JSON's "methods" / "n_pairs_used" /
    "settings"): its first N points are taken over, not measured again. It must come from the same methods and fit
    settings, with N values that begin `n_pairs`.

    Raises:
        ValueError: `done` was measured with other methods, settings or N values (naming which).
    """
    from latentpref.pipelines.config import load_config
    from latentpref.tasks.evaluate.evaluate import evaluate_users
    default_mode = cfg.personalize.mode
    modes = {"latent_dpo": default_mode}
    if faithful and default_mode != "faithful":
        modes["latent_dpo_faithful"] = "faithful"
    # the night's own settings per mode: the preset (and overrides) with that mode; unset steps / lr / noise draws
    # take the mode's defaults (pipelines/config.py MODE_STEPS / MODE_LR / MODE_NOISE_DRAWS)
    pcfg = {m: load_config(cfg.preset, overrides=[*overrides, f"personalize.mode={m}"]).personalize
            for m in set(modes.values())}
    by_user = subsets(night, user_ids, seed)
    lora_users = list(user_ids if lora_users is None else lora_users)
    groups = evaluation_groups(night, cfg, user_ids)
    methods = [*modes, *(["lora_dpo"] if lora_users else []), "clap_prior"]
    per: dict[str, dict[str, list[list[float]]]] = {m: {k: [] for k in (*METRICS, "fit_seconds", "encode_seconds")}
                                                     for m in methods}
    used: list[list[int]] = []

    def summary() -> dict:
        return _summary(per, methods, modes, user_ids, lora_users, used, pcfg, cfg, seed, groups)

    if done:
        k = len(done.get("n_pairs_used") or [])
        settings = json.loads(json.dumps(_settings(pcfg, modes, cfg), default=str))
        users_per_method = {m: len(lora_users if m == "lora_dpo" else user_ids) for m in methods}
        earlier = {m: v.get("users") for m, v in done.get("methods", {}).items()}
        if earlier != users_per_method:
            raise ValueError(f"the earlier curve has methods and users {earlier}, this run {users_per_method}: "
                             "resume with the same --no-faithful / --lora-users")
        if done.get("settings") != settings:
            diff = sorted(key for key in settings if done.get("settings", {}).get(key) != settings[key])
            raise ValueError(f"the earlier curve was fitted with other settings ({', '.join(diff)}): resume with "
                             "the same preset and --set overrides")
        if k > len(n_pairs) or list(done.get("n_pairs", n_pairs[:k])) != n_pairs[:k]:
            raise ValueError(f"the earlier curve has N = {done.get('n_pairs')}; this run's N = {n_pairs}")
        lacking = sorted({key for m in methods for key in PERSONAL if f"{key}_per_user" not in done["methods"][m]})
        if lacking:
            raise ValueError(f"the earlier curve has no {' / '.join(lacking)} (measured before issue 27; they need "
                             "every N's generated texts, which it did not keep): rerun without --resume")
        for m in methods:
            for key in per[m]:
                per[m][key] = [list(v) for v in done["methods"][m][f"{key}_per_user"]]
        used.extend(list(u) for u in done["n_pairs_used"])
        log.info("resuming: N = %s taken from the earlier run", n_pairs[:k])

    for n in n_pairs[len(used):]:
        t_n = time.perf_counter()
        tables = {u: t.slice(0, min(n, t.num_rows)) for u, t in by_user.items()}
        used.append([tables[u].num_rows for u in user_ids])
        train = pa.concat_tables([tables[u] for u in user_ids])
        evaluated: list[dict[str, Any]] = []   # this N's rows of every method, for own_vs_swapped
        for k, (name, mode) in enumerate(modes.items()):
            policies, enc, fit = {}, [], []
            for u in user_ids:
                policy, e_s, f_s = fit_latent_alone(night, mode, triples_of(tables[u]), weights_of(tables[u]),
                                                    pcfg[mode].fit_settings())
                policies[u] = policy
                enc.append(e_s)
                fit.append(f_s)
            rows = evaluate_users(clap=night.clap, base_model=night.base_model, tokenizer=night.tokenizer,
                                  users_table=night.users, user_ids=user_ids, test_prompts=night.test_prompts,
                                  references=night.references, train_pairs=train, heldout_pairs=night.heldout,
                                  user_policies=policies,
                                  settings=eval_settings(cfg, night, (), pcfg[mode].fit_settings())).to_pylist()
            lat = {r["user_id"]: r for r in rows if r["method"] == "latent_dpo"}
            # the shared rows (base LM, prior, oracle) once; each mode's latent rows under the curve's name
            evaluated += [{**r, "method": name} if r["method"] == "latent_dpo" else r for r in rows
                          if k == 0 or r["method"] == "latent_dpo"]
            per[name]["heldout_accuracy"].append([lat[u]["heldout_accuracy"] for u in user_ids])
            per[name]["win_rate_vs_prior"].append([lat[u]["win_rate_vs_prior"] for u in user_ids])
            per[name]["win_rate_vs_base"].append([lat[u]["win_rate_vs_base"] for u in user_ids])
            per[name]["seconds_per_user"].append([a + b for a, b in zip(enc, fit)])
            per[name]["fit_seconds"].append(fit)
            per[name]["encode_seconds"].append(enc)
            if k == 0:
                prior = {r["user_id"]: r for r in rows if r["method"] == "clap_prior"}
                per["clap_prior"]["heldout_accuracy"].append([0.5] * len(user_ids))   # its own reference: ties
                per["clap_prior"]["win_rate_vs_prior"].append([prior[u]["win_rate_vs_prior"] for u in user_ids])
                per["clap_prior"]["win_rate_vs_base"].append([prior[u]["win_rate_vs_base"] for u in user_ids])
                for key in ("seconds_per_user", "fit_seconds", "encode_seconds"):
                    per["clap_prior"][key].append([0.0] * len(user_ids))
                default_policies = policies
        if lora_users:   # LoRA-DPO through the evaluation on the same N pairs (its own call: maybe fewer users)
            rows = evaluate_users(clap=night.clap, base_model=night.base_model, tokenizer=night.tokenizer,
                                  users_table=night.users, user_ids=lora_users, test_prompts=night.test_prompts,
                                  references=night.references, train_pairs=train, heldout_pairs=night.heldout,
                                  user_policies=default_policies,
                                  settings=eval_settings(cfg, night, ("lora_dpo",),
                                                         pcfg[default_mode].fit_settings())).to_pylist()
            b = {r["user_id"]: r for r in rows if r["method"] == "lora_dpo"}
            evaluated += list(b.values())
            ref_s = [reference_logps(night, triples_of(tables[u]))[1] for u in lora_users]
            per["lora_dpo"]["heldout_accuracy"].append([b[u]["heldout_accuracy"] for u in lora_users])
            per["lora_dpo"]["win_rate_vs_prior"].append([b[u]["win_rate_vs_prior"] for u in lora_users])
            per["lora_dpo"]["win_rate_vs_base"].append([b[u]["win_rate_vs_base"] for u in lora_users])
            per["lora_dpo"]["fit_seconds"].append([b[u]["fit_seconds"] for u in lora_users])
            per["lora_dpo"]["encode_seconds"].append(ref_s)
            per["lora_dpo"]["seconds_per_user"].append([b[u]["fit_seconds"] + s for u, s in zip(lora_users, ref_s)])
        own = personal_measures(evaluated, night.users)
        for m in methods:
            per[m]["own_vs_swapped"].append([own.get((m, u)) for u in (lora_users if m == "lora_dpo" else user_ids)])
        log.info("N = %d done in %.0fs: %s", n, time.perf_counter() - t_n,
                 ", ".join(f"{m} acc {np.mean(per[m]['heldout_accuracy'][-1]):.3f} "
                           f"win {np.mean(per[m]['win_rate_vs_prior'][-1]):.3f} "
                           f"s {np.mean(per[m]['seconds_per_user'][-1]):.3f}" for m in methods))
        if on_point is not None:
            on_point(summary())
    return summary()


def _means(values: list[list[float | None]], seed: int) -> tuple[list, list]:
    """Per N: the mean over users and its [lo, hi] (None where no user has a value)."""
    stats = [_ci([v for v in vs if v is not None], seed) if any(v is not None for v in vs)
             else (None, None, None) for vs in values]
    return [s[0] for s in stats], [[s[1], s[2]] for s in stats]


def _summary(per, methods, modes, user_ids, lora_users, used, pcfg, cfg, seed, groups: dict[str, str]) -> dict:
    out: dict[str, Any] = {}
    for m in methods:
        users = lora_users if m == "lora_dpo" else user_ids
        entry: dict[str, Any] = {"mode": modes.get(m), "users": len(users)}
        for metric, values in per[m].items():
            entry[metric], entry[f"{metric}_ci"] = _means(values, seed)
            entry[f"{metric}_per_user"] = values
        for group in GROUPS:   # the same means over the group's users (its per-user values: `user_groups`)
            at = [i for i, u in enumerate(users) if groups[u] == group]
            if at:
                entry[group] = {"users": len(at)}
                for metric in METRICS:
                    entry[group][metric], entry[group][f"{metric}_ci"] = _means(
                        [[vs[i] for i in at] for vs in per[m][metric]], seed)
        out[m] = entry
    return {"methods": out, "n_pairs_used": used, "settings": _settings(pcfg, modes, cfg),
            "user_groups": {u: groups[u] for u in user_ids}}


def _settings(pcfg, modes, cfg) -> dict:
    """What every method of the curve was fitted and evaluated with (recorded; a resumed run must match it)."""
    return {
        "latent": {pcfg[mode].mode: pcfg[mode].fit_settings().as_dict() for mode in set(modes.values())},
        "lora_dpo": {"steps": cfg.evaluate.baseline_steps, "lr": cfg.evaluate.lr_by_method()["lora_dpo"],
                     "beta": cfg.evaluate.beta_by_method()["lora_dpo"],
                     "batch_size": cfg.evaluate.baseline_batch_size, "r": 8},
        "evaluation": {"prompts_per_user": cfg.evaluate.prompts_per_user,
                       "max_new_tokens": cfg.evaluate.max_new_tokens, "seed": cfg.evaluate.seed},
    }


# ------------------------------------------------------------------------------------------------ main
def store_path(clap_version: str) -> tuple[str, ...]:
    """Where the curve of a CLaP version lives in a store (path parts; pipelines/report.py reads it there): keyed by
    the CLaP version because the curve measures that CLaP, so a night's report shows the curve of its own CLaP."""
    return ("reports", "fewshot", f"{clap_version}.json")


def store_result(store_dir: str, result: dict) -> str:
    """Write `result` into the store at `store_path` (atomically, as the Store writes); returns its URL."""
    from latentpref.tasks.data.store import Store
    return Store(store_dir).write_json(result, *store_path(result["clap_version"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny", help="the preset the store's night ran (its settings are used)")
    ap.add_argument("--store", default=None, help="store of a finished prepare + pretrain (else a tiny one is built)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override section.key=value, as the night's --set (repeatable)")
    ap.add_argument("--n-pairs", default=",".join(map(str, N_PAIRS)), help="comma list of N (pairs per user)")
    ap.add_argument("--users", type=int, default=16, help="users (sorted ids with held-out pairs)")
    ap.add_argument("--out-of-cohort-users", type=int, default=0,
                    help="users from outside the cohorts added after --users (the out_of_cohort group)")
    ap.add_argument("--no-faithful", action="store_true", help="leave out latent DPO in faithful mode")
    ap.add_argument("--lora-users", type=int, default=None,
                    help="LoRA-DPO on the first K of the users only (its fits dominate the cost); 0 leaves it out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", action="append", default=[], help="a note to record in the JSON (repeatable)")
    ap.add_argument("--resume", action="store_true",
                    help="--out holds a partial curve of an interrupted run: keep its N points, measure the rest (same "
                         "store, CLaP, users, preset, overrides and methods, else refused)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from latentpref.pipelines.config import load_config
    cfg = load_config(args.preset, overrides=args.overrides)
    t0, load0 = time.perf_counter(), os.getloadavg()
    night = load_night(ensure_store(args.store, args.preset), seed=cfg.data.seed)
    user_ids = pick_users(night, args.users, args.out_of_cohort_users)
    max_have = max(night.train.filter(pc.is_in(night.train["user_id"], value_set=pa.array(user_ids)))
                   .group_by("user_id").aggregate([("prompt", "count")])["prompt_count"].to_pylist())
    requested = [int(x) for x in args.n_pairs.split(",") if x]
    n_pairs = sorted({min(n, max_have) for n in requested})
    log.info("%d users, N = %s (users have up to %d train pairs)", len(user_ids), n_pairs, max_have)
    resumed, seconds_before = None, 0.0
    if args.resume and Path(args.out).exists():
        resumed = json.loads(Path(args.out).read_text())
        mismatch = {key: (resumed.get(key), now) for key, now in (("clap_version", night.clap_version),
                                                                ("users", user_ids), ("preset", args.preset),
                                                                ("overrides", args.overrides),
                                                                ("n_pairs_planned", n_pairs))
                    if resumed.get(key) != now}
        if mismatch:
            raise ValueError(f"--resume: {args.out} was measured on other inputs: "
                             + "; ".join(f"{k} {old!r} there, {new!r} now" for k, (old, new) in mismatch.items()))
        if resumed.get("complete"):
            log.info("--resume: %s is already complete; nothing to do", args.out)
            return 0
        seconds_before = float((resumed.get("machine") or {}).get("total_seconds") or 0.0)

    def write(curve: dict, complete: bool) -> None:
        done = n_pairs[:len(curve["n_pairs_used"])]
        result = {
            "n_pairs": done, "complete": complete, "n_pairs_planned": n_pairs, "n_pairs_requested": requested,
            "n_pairs_used": curve["n_pairs_used"],
            "methods": curve["methods"], "settings": curve["settings"], "preset": args.preset,
            "overrides": args.overrides, "users": user_ids, "store": night.store, "clap_version": night.clap_version,
            "user_groups": curve["user_groups"], "clap_read_pairs": clap_read_pairs(cfg, night),
            "heldout_pairs_per_user": [night.heldout.filter(pc.equal(night.heldout["user_id"], u)).num_rows
                                       for u in user_ids],
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": args.threads, "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg(),
                        "total_seconds": seconds_before + time.perf_counter() - t0},
            "definitions": {
                "heldout_accuracy": "share of a user's held-out pairs with log-ratio(y_w) > log-ratio(y_l), log-ratio = "
                                    "log p(y|x, policy) - log p(y|x, ref), LM run (latent: user's z vs the prior's z; "
                                    "LoRA-DPO: vs the base LM); ties half; prior = 0.5 (its own reference)",
                "win_rate_vs_prior": "share of test prompts where the method's generation beats the prior's under the "
                                     "user's hidden reward (same prompt and seed), ties half",
                "win_rate_vs_base": "the same against the plain base LM's generation",
                "own_vs_swapped": "share of test prompts where the user's generation beats, under the user's hidden "
                                  "reward, the same method's generation (same N, prompt and seed) for the curve's "
                                  "user with the least similar hidden reward (ties half); 0.5 = nothing personal; "
                                  "null for the prior",
                "seen / unseen / out_of_cohort": "per method: the same means over the users the CLaP's training "
                                                 "read / cohort users it never read / users outside every cohort "
                                                 "(user_groups)",
                "seconds_per_user": "one user alone: latent = CLaP encoding of the user's N pairs + fit; LoRA-DPO = "
                                    "reference log-probs of the N pairs + fit",
                "ci": "95% percentile bootstrap over users ([lo, hi] per N)",
            },
            "notes": args.note
            + ([f"resumed: N = {n_pairs[:len(resumed['n_pairs_used'])]} measured by an earlier run of the same "
                "inputs"] if resumed else [])
            + ([] if complete else [f"partial: N = {done} of {n_pairs} done when this was written"]),
        }
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        return result

    curve = run_curve(night, cfg, user_ids, n_pairs, seed=cfg.evaluate.seed, faithful=not args.no_faithful,
                      lora_users=None if args.lora_users is None else user_ids[:args.lora_users],
                      overrides=args.overrides, on_point=lambda partial: write(partial, complete=False),
                      done=resumed)
    result = write(curve, complete=True)
    log.info("wrote %s (%.0fs)", args.out, time.perf_counter() - t0)
    if args.store is not None:
        try:
            log.info("wrote %s", store_result(night.store, result))
        except Exception as err:  # noqa: BLE001 - the --out file is written already: say where it is, exit 1
            log.error("the result is in %s, but its store copy could not be written (%s: %s); copy it to "
                      "reports/fewshot/%s.json in the store for the night's report", args.out,
                      type(err).__name__, err, night.clap_version)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
