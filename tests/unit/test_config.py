import pytest
import yaml

from latentpref.pipelines.config import NightlyConfig, load_config


def test_presets_load_and_differ():
    tiny, small = load_config("tiny"), load_config("small")
    assert tiny.data.base_model == "tiny-gpt2"
    assert small.data.base_model == "smollm2-135m"
    assert small.data.prompt_tokens == 32 and small.data.base_model == "smollm2-135m"   # CPU-sized (presets/small.yaml)
    assert tiny.pretrain.num_workers == 2


def test_override_goes_through_validation():
    cfg = load_config("tiny", overrides=["personalize.beta=0.2", "evaluate.baselines=[lora_dpo, full_dpo]"])
    assert cfg.personalize.beta == 0.2
    assert cfg.evaluate.baselines == ("lora_dpo", "full_dpo")


def test_typo_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"personalize": {"lerning_rate": 0.1}}))
    with pytest.raises(ValueError, match="lerning_rate"):
        load_config("tiny", file=path)


def test_bad_values_and_unknown_preset_are_clear():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("tiny", overrides=["personalize.beta"])
    with pytest.raises(ValueError, match="loss_type"):
        load_config("tiny", overrides=["personalize.loss_type=kto"])


def test_config_is_frozen_and_round_trips():
    cfg = load_config("tiny")
    with pytest.raises(Exception):
        cfg.data.n_users = 3
    assert NightlyConfig.model_validate(cfg.model_dump()) == cfg


def test_baseline_rates_default_to_spec_and_take_overrides():
    spec = load_config("small", overrides=["evaluate.baseline_lr=null", "evaluate.baseline_beta=null"]).evaluate
    assert spec.lr_by_method() == {"lora_dpo": 1e-5, "full_dpo": 1e-6, "ptuning_dpo": 1e-4}   # spec §5
    assert spec.beta_by_method() == {"lora_dpo": 0.1, "full_dpo": 0.1, "ptuning_dpo": 0.5}
    one = load_config("tiny", overrides=["evaluate.baseline_lr=0.003"]).evaluate
    assert set(one.lr_by_method().values()) == {0.003}
    mixed = load_config("tiny", overrides=["evaluate.baseline_lr=null",
                                           "evaluate.baseline_lr={full_dpo: 0.0002}"]).evaluate
    assert mixed.lr_by_method()["full_dpo"] == 0.0002 and mixed.lr_by_method()["lora_dpo"] == 1e-5
    with pytest.raises(ValueError, match="baseline_lr must be > 0"):
        load_config("tiny", overrides=["evaluate.baseline_lr={lora_dpo: 0}"])
    with pytest.raises(ValueError, match="baseline_lr"):
        load_config("tiny", overrides=["evaluate.baseline_lr={lora: 0.1}"])   # unknown method named


@pytest.mark.parametrize("override, key", [("personalize.beta=0", "beta"), ("personalize.evidence_ratio=1.5", "evidence_ratio"),
                                           ("personalize.n_samples=0", "n_samples"),
                                           ("evaluate.baselines=[dora_dpo]", "baselines")])
def test_fit_settings_are_judged_at_load_time(override, key):
    with pytest.raises(ValueError, match=key):
        load_config("tiny", overrides=[override])


def test_discrete_clap_with_an_encoder_mode_fails_at_load_time():
    with pytest.raises(ValueError, match="personalize.mode='faithful' needs a Gaussian CLaP"):
        load_config("tiny", overrides=["pretrain.latent_type=discrete", "personalize.mode=faithful"])
    assert load_config("tiny", overrides=["pretrain.latent_type=discrete"]).personalize.code_evidence_ratio == 1.0


def test_preset_mode_lr_retunes_one_mode_only():
    """A preset's `personalize.mode_lr` sets that mode's default rate; another mode keeps MODE_LR's, an explicit
    `lr` wins, and an unknown mode is refused naming it."""
    import pydantic

    from latentpref.pipelines.config import MODE_LR, load_config
    small = load_config("small")
    assert small.personalize.mode == "head-only" and small.personalize.lr == 1e-3
    assert load_config("small", overrides=["personalize.mode=faithful"]).personalize.lr == MODE_LR["faithful"]
    assert load_config("small", overrides=["personalize.lr=0.05"]).personalize.lr == 0.05
    assert load_config("tiny").personalize.lr == MODE_LR["head-only"]
    with pytest.raises((ValueError, pydantic.ValidationError), match="mode_lr"):
        load_config("tiny", overrides=["personalize.mode_lr={fast: 0.1}"])


def test_population_preference_term_config_and_clap_version():
    """The Gaussian preference term is refused for a discrete CLaP at load time, and it is part of a CLaP's version
    only when on (then with the pairs' digest): CLaPs trained without it keep their version."""
    from latentpref.pipelines.pretrain import clap_version
    from latentpref.tasks.data.prepare import DataArtifacts, TableRef
    with pytest.raises(ValueError, match="pretrain.preference_weight=1.0 is the Gaussian CLaP's"):
        load_config("tiny", overrides=["pretrain.latent_type=discrete", "pretrain.preference_weight=1"])
    with pytest.raises(ValueError, match="preference_weight"):
        load_config("tiny", overrides=["pretrain.preference_weight=-1"])

    def data(pairs_digest: str) -> DataArtifacts:
        ref = lambda d: TableRef(("data", d), d, 1)  # noqa: E731
        return DataArtifacts(ref("p"), ref("c"), ref("u"), ref(pairs_digest), ("models", "base"), "b0")

    cfg = load_config("tiny")
    off = clap_version(cfg.pretrain, cfg.data, data("pairs1"))
    # off: the pairs and the term's other settings do not matter
    assert clap_version(cfg.pretrain, cfg.data, data("pairs2")) == off
    lr_only = load_config("tiny", overrides=["pretrain.preference_lr=0.5"])
    assert clap_version(lr_only.pretrain, cfg.data, data("pairs1")) == off
    on = load_config("tiny", overrides=["pretrain.preference_weight=10"])
    v1 = clap_version(on.pretrain, cfg.data, data("pairs1"))
    assert v1 != off and clap_version(on.pretrain, cfg.data, data("pairs2")) != v1
