"""Typed configuration of the nightly flow: one pydantic model per stage, YAML presets, CLI overrides.

Every section forbids unknown keys, so a typo in YAML (`lerning_rate:`) fails naming the key instead of
being silently ignored (STYLE.md §6). Presets live in `presets/*.yaml`; `--set section.key=value` goes
through the same validation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


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
    num_workers: int = 2                      # Ray Train workers (DDP, gloo on CPU)
    use_gpu: Annotated[Literal["auto", "true", "false"], BeforeValidator(_bool_to_str)] = "auto"  # auto: GPUs if the cluster has them
    checkpoint_every: int = 20
    max_failures: int = 2
    seed: int = 0


class PersonalizeConfig(_Section):
    """personalize: per-user Latent DPO fits fanned out as Ray tasks over chunks of users."""

    # head-only: Gaussian head on cached features (fastest); trunk-frozen: + top encoder block and queries;
    # faithful: the whole encoder copy minus its token embedding (spec §3.6; the spec's lr is 1e-4)
    mode: Literal["head-only", "trunk-frozen", "faithful"] = "head-only"
    loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"
    steps: int = 100
    lr: float = 1e-2
    beta: float = 0.1                         # spec §3.6
    n_samples: int = 16                       # per source: prior, q(z|x,y_w), q(z|x,y_l)
    evidence_ratio: float = 0.5               # spec §3.6 quantile mask
    users_per_task: int = 256                 # users fitted together in one Ray task (batched)
    min_pairs: int = 4                        # fewer -> cold start: population prior, flagged
    max_retries: int = 3
    seed: int = 0


class EvaluateConfig(_Section):
    """evaluate: personalised generation scored by each user's hidden reward, against baselines."""

    n_users: int = 6                          # users sampled for the (costly) baseline comparison
    prompts_per_user: int = 8
    max_new_tokens: int = 24
    baselines: tuple[Literal["lora_dpo", "full_dpo", "ptuning_dpo"], ...] = ("lora_dpo",)
    baseline_steps: int = 30
    baseline_lr: float = 1e-3
    baseline_beta: float = 0.1
    baseline_batch_size: int = 8
    seed: int = 0


class NightlyConfig(_Section):
    preset: str = "tiny"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    personalize: PersonalizeConfig = Field(default_factory=PersonalizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


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


def load_config(preset: str = "tiny", *, file: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> NightlyConfig:
    """Preset YAML, then an optional user YAML file, then `section.key=value` overrides, validated once.

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
    return NightlyConfig.model_validate(data)
