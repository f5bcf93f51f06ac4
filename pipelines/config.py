"""Typed configuration of the nightly flow: one pydantic model per stage, YAML presets, CLI overrides.

Every section forbids unknown keys, so a typo in YAML (`lerning_rate:`) fails naming the key instead of
being silently ignored (STYLE.md §6). Presets live in `presets/*.yaml`; `--set section.key=value` goes
through the same validation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from latentpref.tasks.defaults import BASELINE_DEFAULTS, MODE_LR, MODE_NOISE_DRAWS, MODE_STEPS  # noqa: F401
from latentpref.tasks.policy.settings import FitSettings

PRESETS_DIR = Path(__file__).resolve().parent / "presets"

# the night's stages, in order (`nightly(until=...)`, the report, `latentpref runs`, the nights dashboard)
Stage = Literal["prepare", "pretrain", "personalize", "evaluate", "report"]
STAGES: tuple[str, ...] = get_args(Stage)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeConfig(_Section):
    """Where things run and are stored. Defaults are embedded: local folder, local Ray, sqlite MLflow."""

    store: str = "./latentpref-store"          # local folder or s3://bucket/prefix
    ray_address: str | None = None            # None = start a local Ray; "auto" or "ray://host:10001"
    ray_num_cpus: int | None = None           # local Ray only; None = all cores
    ray_object_store_mb: int = 512            # local Ray only; Ray's default (30% of RAM) is too much here
    mlflow_tracking_uri: str | None = None    # None = sqlite:///<store>/mlflow/mlflow.db (local store only)
    mlflow_experiment: str = "latentpref-nightly"
    run_name: str | None = None
    # precision of every LM forward/backward (candidate sampling, CLaP training, evaluation, baselines, serving);
    # latent math stays fp32. auto = bf16 where the device computes it natively (CPU AVX512-BF16/AMX, CUDA), else
    # fp32; None = the environment's LATENTPREF_LM_DTYPE (default auto). tasks/models/precision.py
    lm_dtype: Literal["auto", "bf16", "fp32"] | None = None


class DataConfig(_Section):
    """prepare: corpus -> prompts -> SFT base LM -> K candidates -> scores -> simulated users -> pairs."""

    base_model: str = "tiny-gpt2"             # tiny-gpt2 | tiny-llama | smollm2-135m | folder | s3:// | hub id
    corpus: str | None = None                 # None = vendored Pang-Lee movie reviews
    n_prompts: int = 300
    prompt_tokens: int = 32                   # spec §4.1 uses 64
    response_tokens: int = 24                 # spec §4.1 uses 48 (fixed length, no early EOS)
    n_candidates: int = 8                     # spec uses 32 per prompt; more = better rankings, linear cost
    sft_steps: int = 150                      # brief LM fine-tune on the corpus (0 = skip)
    sft_lr: float = 1e-3
    sft_batch_size: int = 16
    generation_batch_size: int = 64
    top_k: int = 50
    learned_scorer: bool = True               # also score candidates with the SST-2 classifier (sentiment_clf)
    n_users: int = 20
    cohort_mix: dict[str, float] | None = None   # None = the population's default mix
    min_pairs: int = 2
    max_pairs: int = 64
    heldout_pairs_per_user: int = 8
    # who the evaluation can judge personalisation on (users.make_population): a share of the cohort users held out
    # from everything the CLaP's training reads ("unseen" when evaluated), and users outside every cohort (a random
    # signed mixture of the scorer features; never read by the CLaP either)
    holdout_share: float = Field(0.25, ge=0.0, lt=1.0)
    n_out_of_cohort: int = Field(0, ge=0)
    seed: int = 0


def _bool_to_str(value: Any) -> Any:
    # YAML/CLI `true`/`false` arrive as booleans; the setting also takes the word "auto"
    return str(value).lower() if isinstance(value, bool) else value


class PretrainConfig(_Section):
    """pretrain: CLaP (latent encoder + adapter) on Ray Train, stage 1 (frozen base + G-skip) then stage 2."""

    latent_dim: int = 32                      # spec latent-dpo.md §2.1 `dim_z`
    n_query: int = 4                          # `num_q`
    n_prefix: int = 4                         # `num_p`
    encoder_layers: int = 2
    stage1_steps: int = 40
    stage2_steps: int = 20                    # 0 = stop after stage 1
    prompts_per_batch: int = 4                # P: prompts per step (spec §9.1: explicit P x B layout)
    responses_per_prompt: int = 4             # B: responses of each prompt in the step
    lr: float = 1e-3                          # spec uses 1e-4 on GPT-2; tiny random models need more
    kl_samples: int = 16                      # DG-KLD Monte-Carlo samples per posterior
    kl_weight: float = 1.0
    contrastive_weight: float = 1.0
    # gradient-norm clip of every CLaP step (None = off); the NLL is a per-sequence token sum (spec §3.1), so norms
    # are large (SmolLM2 stage 1, first step: 189) and the clip mostly bounds rare spikes
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    num_workers: int = 2                      # Ray Train workers (DDP, gloo on CPU)
    # CPUs (= torch threads) each Ray Train worker takes; None = the machine's cores / num_workers, so workers x
    # threads never oversubscribe the box (on 2 cores: 1 worker x 2 threads or 2 x 1)
    threads_per_worker: Annotated[int, Field(ge=1)] | None = None
    # adapter init (CLaPConfig.prefix_init): auto = "anchor" for pretrained bases (CLaP starts at the base LM's
    # NLL), "random" (the spec's) for the random tiny bases
    prefix_init: Literal["auto", "random", "anchor"] = "auto"
    # "anchor" only: init std of the adapter's z-dependent output layer. 0.005 on SmolLM2: a random z costs
    # +0.06 nats/token at init and two random z differ by 0.24 nats/token (0.02: +5.8, the z-part swamps the anchor)
    anchor_scale: float = Field(0.005, gt=0)
    # standardise the posterior encoder's features with statistics of real (x, y) rows before training
    # (CLaPConfig.feature_norm); None = auto: on for pretrained bases (same rule as prefix_init auto)
    feature_norm: bool | None = None
    # add the pooled token states to the posterior encoder's query features (CLaPConfig.pool_tokens), and a
    # bag-of-words loss on z (below). Off by default: alone, neither tied z to sentiment (ridge probe from the
    # posterior mean, within a prompt: 0.09 pooled, 0.07 pooled + BoW, 0.11 on a GPU at spec size). The small preset
    # turns the pooled view on with encoder_layers 8 and the population preference term: together, 0.39 (frozen LM
    # 0.42) and users' held-out pairs ranked at 0.64 from the posterior mean (benchmarks/README.md)
    pool_tokens: bool = False
    # weight of the bag-of-words loss (ClapObjective: predict every response token from z; the CLaP gets a BoW
    # head); 0 = off, the spec's objective
    bow_weight: Annotated[float, Field(ge=0)] = 0.0
    bow_lr: Annotated[float, Field(gt=0)] = 1e-2     # the BoW head's own learning rate (bow_weight > 0)
    # population preference term (Gaussian only; tasks/objectives.population_preference_loss): every population
    # user gets a latent direction v_u, and the posterior samples of each train pair must rank under <v_u, z>, so z
    # holds what users disagree on and latent DPO has a direction to fit. 0 = off (the spec's objective); > 0 reads
    # the train pairs and makes their digest part of the CLaP's version
    preference_weight: Annotated[float, Field(ge=0)] = 0.0
    preference_lr: Annotated[float, Field(gt=0)] = 1e-2          # the user directions' own learning rate
    preference_pairs_per_batch: Annotated[int, Field(ge=1)] = 16
    # population preference space (Gaussian only; tasks/models/preference_space.py, issue 28): before the first
    # step, every population user's pairs fit a logistic read-out of the base LM's states after `preference_layer`
    # blocks (mean over the response); the top `preference_dims` directions of those read-outs become the first
    # coordinates of the posterior mean, so the LM learns to write at a position of that space and a user's latent
    # DPO fit (LM-free) places them in it. Reads the "population" users' pairs (never the held-out ones). 0 = off
    preference_dims: Annotated[int, Field(ge=0)] = 0
    preference_layer: Annotated[int, Field(ge=1)] = 8
    preference_l2: Annotated[float, Field(gt=0)] = 1.0
    # share of stage 1-2 rows whose z keeps only the preference coordinates (the other latent_dim - preference_dims
    # at the prior's mean 0), as personalize.preference_only serves users: the LM learns to write from the space's
    # position alone, not only from the free coordinates that describe the text. Needs preference_dims > 0. 0 = off:
    # at 0.5 on the seed-0 default night nothing moved beyond a night's noise (LM-run held-out accuracy 0.59 both;
    # benchmarks/README.md, "Training the LM on the preference coordinates alone")
    preference_only_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    # stage 3, "follow" (Gaussian only; tasks/train/follow.py, issue 28 lever 2): after stages 1-2 every population
    # user is fitted as the night fits a user (head-only latent DPO with the personalize section's settings), and a
    # rank-`follow_rank` adapter reading the preference space's coordinates (zero at z = 0: the prior's text is
    # untouched) is trained with DPO through the frozen LM, reference z = 0, so that a user's latent makes the LM
    # prefer that user's responses. Reads the "population" users' pairs. 0 steps = off
    follow_steps: Annotated[int, Field(ge=0)] = 0
    follow_rank: Annotated[int, Field(ge=1)] = 64
    follow_pairs_per_batch: Annotated[int, Field(ge=1)] = 8
    follow_lr: Annotated[float, Field(gt=0)] = 1e-4
    follow_beta: Annotated[float, Field(gt=0)] = 0.1
    follow_nll_weight: Annotated[float, Field(ge=0)] = 1.0
    # learning rate of the latent adapter (None = lr): anchored prefixes need a smaller one than the encoder
    adapter_lr: Annotated[float, Field(gt=0)] | None = None
    use_gpu: Annotated[Literal["auto", "true", "false"], BeforeValidator(_bool_to_str)] = "auto"  # auto: GPUs if the cluster has them
    checkpoint_every: int = 20
    max_failures: int = 2
    seed: int = 0
    # discrete latent codes (LPC, shared/spec/lpc.md §6.3); every field below is ignored for "gaussian"
    latent_type: Literal["gaussian", "discrete"] = "gaussian"
    n_codes: int = Field(32, ge=2)            # K; lpc.md §2.2: 32-64 best on population data
    tau_start: float = Field(1.0, gt=0)       # Gumbel-softmax temperature, annealed exponentially to tau_end
    tau_end: float = Field(0.5, gt=0)         # low = near one-hot samples; serving uses the expected code, so
                                              # soft mixtures must stay in-distribution (lpc.md §6.3 trade-offs)
    straight_through: bool = False            # hard one-hot samples, soft gradients
    lpc_kl_weight: float = Field(0.05, ge=0)  # lambda of KL(q || p(k|x)), lpc.md §3.2 (0.05 in the paper)
    lpc_pair_weight: float = Field(1.0, ge=0)  # LPC objective on pooled train pairs; 0 = off (no pair data read)
    lpc_loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"   # lpc.md §3.2-3.4
    lpc_beta: float = Field(0.1, gt=0)        # lpc.md §3.2: beta 0.1 for the baselines
    lpc_gamma: float = 0.0                    # SimPO target margin


# personalize defaults per mode (steps / lr / noise_draws where unset): tasks/defaults.py, the one table


class PersonalizeConfig(_Section):
    """personalize: per-user Latent DPO fits fanned out as Ray tasks over chunks of users."""

    # head-only: Gaussian head on cached features (fastest); trunk-frozen: + top encoder block and queries;
    # faithful: the whole encoder copy minus its token embedding (spec §3.6; the spec's lr is 1e-4)
    mode: Literal["head-only", "trunk-frozen", "faithful"] = "head-only"
    loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"
    steps: Annotated[int, Field(ge=0)] | None = None   # None = MODE_STEPS[mode] (filled in when the config loads)
    lr: Annotated[float, Field(gt=0)] | None = None   # None = mode_lr / MODE_LR[mode] (filled in at load)
    # per-mode default rates of this preset, over MODE_LR (an explicit `lr` wins): a preset can retune one mode
    # without pinning the rate of the others when `mode` is changed on the command line
    mode_lr: dict[Literal["head-only", "trunk-frozen", "faithful"], Annotated[float, Field(gt=0)]] = {}
    # k = reuse k latent-sample draws cyclically (the samples + evidence mask are computed k times per fit, not
    # `steps` times: ~5x cheaper head-only); "fresh" = new samples every step; None = MODE_NOISE_DRAWS[mode]
    noise_draws: Annotated[int, Field(ge=1)] | Literal["fresh"] | None = None
    beta: Annotated[float, Field(gt=0)] = 0.1  # spec §3.6
    n_samples: Annotated[int, Field(ge=1)] = 16  # per source: prior, q(z|x,y_w), q(z|x,y_l)
    evidence_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5  # spec §3.6 quantile mask (Gaussian latents)
    code_evidence_ratio: Annotated[float, Field(gt=0, le=1)] = 1.0  # discrete code fits: lpc.md §6.3 keeps all
    users_per_task: int = 256                 # users fitted together in one Ray task (batched)
    # the driver commits finished tasks' rows to the policy table at most this often (and once at the end): a
    # killed night keeps what was committed (its re-run finds those users unchanged); 0 = after every task
    commit_every_s: float = 30.0
    # before the night's tag, a policy table with more fragments than this (each night task adds one; a lookup
    # costs ~2 us of CPU per fragment: scale.json's 4,298 fragments put p99 at the 10 ms target) has its small
    # fragments merged into ones of up to `compact_target_rows` rows, so the tag serving reads is compact. Same
    # rows; tags and old versions untouched (retention stays `latentpref policies compact`). 0 = never
    compact_fragments: Annotated[int, Field(ge=0)] = 256
    compact_target_rows: Annotated[int, Field(ge=1)] = 65_536
    texts_per_encode_task: int = 512          # new texts per encoding task (Ray fan-out before the fits)
    min_pairs: int = 4                        # fewer -> cold start: population prior, flagged
    # head-only, CLaPs with a preference space (pretrain.preference_dims): a user is served at their position in the
    # space only: the fit's means of those coordinates times `preference_scale`, every other coordinate the prior's
    # (`fit_user.project_heads`). The head-only fit moves all 32 coordinates (|z| 14-16 on the default night, the
    # prior's ~5.7), and at that latent the LM predicts held-out responses 2.7 nats/token worse than the prior
    preference_only: bool = False
    preference_scale: Annotated[float, Field(gt=0)] = 0.5
    max_retries: int = 3
    seed: int = 0
    # discrete CLaPs only (pretrain.latent_type): "dpo" = categorical latent DPO by exact enumeration over the
    # K codes (trained, steps/lr/beta/loss_type apply); "mean_posterior" = smoothed mean pair posterior, no
    # training (lpc.md §6.3 options 3 and 1)
    discrete_estimator: Literal["dpo", "mean_posterior"] = "dpo"

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        """Unset steps / lr / noise_draws take the mode's default, so `cfg.lr` is always the rate the fits use."""
        if isinstance(data, dict) and data.get("mode", "head-only") in MODE_LR:
            mode = data.get("mode", "head-only")
            data = {**data}
            if data.get("steps") is None:
                data["steps"] = MODE_STEPS[mode]
            if data.get("lr") is None:
                data["lr"] = (data.get("mode_lr") or {}).get(mode, MODE_LR[mode])
            if data.get("noise_draws") is None:
                data["noise_draws"] = MODE_NOISE_DRAWS[mode]
        return data

    def fit_noise_draws(self) -> int | None:
        """`FitConfig.noise_draws`: None = fresh samples every step."""
        return None if self.noise_draws == "fresh" else self.noise_draws

    def fit_settings(self) -> FitSettings:
        """The per-user fit's settings, as personalize fits them and evaluate times them (one payload)."""
        return FitSettings(steps=self.steps, lr=self.lr, beta=self.beta, n_samples=self.n_samples,
                           evidence_ratio=self.evidence_ratio, loss_type=self.loss_type, seed=self.seed,
                           noise_draws=self.fit_noise_draws(), code_evidence_ratio=self.code_evidence_ratio)


class EvaluateConfig(_Section):
    """evaluate: personalised generation scored by each user's hidden reward, against baselines."""

    n_users: int = 6                          # cohort users evaluated (balanced over seen / unseen and cohorts)
    n_out_of_cohort_users: int = Field(0, ge=0)   # users from outside the cohorts evaluated too (data.n_out_of_cohort)
    # the baselines (a DPO run through the LM per user, ~100x a latent user's evaluation) on this many of the
    # evaluated users, spread over the groups; None = every evaluated user
    baseline_users: Annotated[int, Field(ge=1)] | None = None
    user_ids: tuple[str, ...] = ()            # evaluate exactly these users instead of a sample (must be fitted)
    prompts_per_user: int = 8
    max_new_tokens: int = 24
    baselines: tuple[Literal["lora_dpo", "full_dpo", "ptuning_dpo"], ...] = ("lora_dpo",)
    baseline_steps: int = 30
    # None = spec §5 per method (LoRA 1e-5, full 1e-6, P-Tuning 1e-4); one number = every method; or a mapping
    # {method: lr} over the spec values. Tiny random models need far larger rates than the spec's GPT-2 ones.
    baseline_lr: float | dict[Literal["lora_dpo", "full_dpo", "ptuning_dpo"], float] | None = None
    baseline_beta: float | dict[Literal["lora_dpo", "full_dpo", "ptuning_dpo"], float] | None = None  # spec: 0.1; P-Tuning 0.5
    baseline_batch_size: int = 8
    ptuning_sft_steps: int = 50               # P-Tuning-SFT of the shared prefix before per-user P-Tuning-DPO (0 = none)
    ptuning_sft_lr: float = 1e-3              # spec §5
    # samples per prompt of the un-personalised model for the oracle_best_of_k ceiling and the reward spread
    oracle_k: Annotated[int, Field(ge=1)] = 4
    # > 1: also evaluate `latent_dpo_best_of_k`, serving's personal best-of-K (`best_of` of /v1/completions): K
    # samples per prompt under the user's latent (the first is latent_dpo's own text), the one with the highest
    # latent reward of the user returned (LM-free scoring, tasks/evaluate/serving.latent_rewards). Decodes K - 1
    # more texts per user and prompt. 0 = off
    best_of_k: Annotated[int, Field(ge=0)] = 0
    users_per_task: int = 2                   # users evaluated in one Ray task (each task loads the models once)
    # CPUs (= torch threads) of each evaluation task: each task holds its own copies of the LM, so on a small box
    # fewer, wider tasks hold fewer copies (default preset, 2 tasks x 1 thread: the box peaked at 9.0 GB evaluating)
    threads_per_task: Annotated[int, Field(ge=1)] = 1
    max_retries: int = 2
    seed: int = 0

    def _per_method(self, value: float | dict | None, key: str) -> dict[str, float]:
        out = {m: float(BASELINE_DEFAULTS[m][key]) for m in BASELINE_DEFAULTS}
        if isinstance(value, dict):
            out.update({m: float(v) for m, v in value.items()})
        elif value is not None:
            out = {m: float(value) for m in out}
        bad = {m: v for m, v in out.items() if not v > 0}
        if bad:
            raise ValueError(f"evaluate.baseline_{key} must be > 0; got {bad}")
        return out

    @model_validator(mode="after")
    def _check_rates(self) -> "EvaluateConfig":
        self.lr_by_method(), self.beta_by_method()   # a bad value fails at load time, naming the key
        return self

    def lr_by_method(self) -> dict[str, float]:
        """Learning rate of each baseline: spec §5 defaults, overridden by `baseline_lr`."""
        return self._per_method(self.baseline_lr, "lr")

    def beta_by_method(self) -> dict[str, float]:
        return self._per_method(self.baseline_beta, "beta")


class NightlyConfig(_Section):
    preset: str = "default"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    personalize: PersonalizeConfig = Field(default_factory=PersonalizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _check_across_sections(self) -> "NightlyConfig":
        """Combinations judged at load time, before any stage runs (not in a Ray worker after pretraining)."""
        if self.pretrain.latent_type == "discrete" and self.personalize.mode != "head-only":
            raise ValueError(f"personalize.mode={self.personalize.mode!r} needs a Gaussian CLaP; with "
                             "pretrain.latent_type='discrete' a user is K code offsets fitted on cached posteriors: "
                             "use personalize.mode=head-only")
        if self.pretrain.latent_type == "discrete" and self.pretrain.preference_dims > 0:
            raise ValueError(f"pretrain.preference_dims={self.pretrain.preference_dims} needs "
                             "pretrain.latent_type=gaussian (the discrete CLaP has no Gaussian posterior mean)")
        if self.pretrain.preference_only_share > 0 and not self.pretrain.preference_dims:
            raise ValueError(f"pretrain.preference_only_share={self.pretrain.preference_only_share} trains the LM on "
                             "the preference space's coordinates alone: it needs pretrain.preference_dims > 0")
        if self.pretrain.preference_dims > self.pretrain.latent_dim:
            raise ValueError(f"pretrain.preference_dims={self.pretrain.preference_dims} exceeds "
                             f"pretrain.latent_dim={self.pretrain.latent_dim}")
        if self.pretrain.latent_type == "discrete" and self.pretrain.preference_weight > 0:
            raise ValueError(f"pretrain.preference_weight={self.pretrain.preference_weight} is the Gaussian CLaP's "
                             "population preference term; a discrete CLaP pools the pairs with "
                             "pretrain.lpc_pair_weight: set pretrain.preference_weight=0")
        return self


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. personalize.beta=0.2)")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_config(preset: str = "default", *, file: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = (), seed_shift: int = 0) -> NightlyConfig:
    """Preset YAML, then an optional user YAML file, then `section.key=value` overrides, validated once.
    `seed_shift` then adds the same number to every section's seed (data, CLaP, fits, evaluation): another draw of
    the whole night, for the spread of its figures over seeds.

    Raises:
        ValueError: unknown preset, unreadable file, malformed override, or a config error (pydantic
            names the offending key).
    """
    preset_path = PRESETS_DIR / f"{preset}.yaml"
    if not preset_path.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ValueError(f"unknown preset {preset!r}; expected one of {known}")
    data: dict[str, Any] = yaml.safe_load(preset_path.read_text()) or {}
    if file is not None:
        path = Path(file)
        if not path.exists():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = _deep_update(data, yaml.safe_load(path.read_text()) or {})
    for item in overrides:
        data = _deep_update(data, _parse_override(item))
    data["preset"] = preset
    cfg = NightlyConfig.model_validate(data)
    if seed_shift:
        for name in type(cfg).model_fields:
            section = getattr(cfg, name)
            if isinstance(section, BaseModel) and "seed" in type(section).model_fields:
                data[name] = {**(data.get(name) or {}), "seed": section.seed + seed_shift}
        cfg = NightlyConfig.model_validate(data)
    return cfg
