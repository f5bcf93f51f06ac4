"""The Prefect deployment: build_deployment() and infra/prefect.yaml describe the same thing.

No flow runs and no Prefect API is contacted: `to_deployment` is pure, and the flow body is exercised
through `.fn` with `nightly` replaced by a stand-in.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

from latentpref.pipelines import deploy
from latentpref.pipelines.config import NightlyConfig
from latentpref.pipelines.nightly import STAGES

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"
K8S_JOB_VARIABLES = {   # prefect-kubernetes' base job template (prefect's bundled worker metadata)
    "name", "env", "labels", "command", "namespace", "image", "service_account_name", "image_pull_policy",
    "finished_job_ttl", "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output",
    "cluster_config", "cpu_request", "cpu_limit", "memory_request", "memory_limit"}


def _prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _yaml_deployment() -> dict:
    (dep,) = [d for d in _prefect_yaml()["deployments"] if d["name"] == deploy.DEPLOYMENT_NAME]
    return dep


def test_build_deployment_has_a_daily_utc_cron_schedule():
    dep = deploy.build_deployment()
    (schedule,) = dep.schedules
    assert isinstance(schedule.schedule, CronSchedule)
    assert schedule.schedule.cron == "0 3 * * *"
    assert schedule.schedule.timezone == "UTC"
    assert schedule.active is not False
    assert dep.name == "nightly" and dep.flow_name == deploy.FLOW_NAME == "nightly-deployment"
    assert dep.tags == ["latentpref"]
    assert dep.parameters == {}                      # flow defaults: the laptop setup


def test_build_deployment_passes_parameters_and_work_pool():
    params = {"preset": "small", "store": "s3://latentpref/store", "ray_address": "ray://head:10001",
              "mlflow_tracking_uri": "http://mlflow:5000", "overrides": ["pretrain.use_gpu=true"], "until": "evaluate"}
    dep = deploy.build_deployment(name="nightly-eu", cron="30 1 * * *", timezone="Europe/Paris", parameters=params,
                                  work_pool_name=deploy.WORK_POOL, job_variables={"image": deploy.IMAGE})
    assert dep.parameters == params
    assert dep.name == "nightly-eu"
    assert (dep.schedules[0].schedule.cron, dep.schedules[0].schedule.timezone) == ("30 1 * * *", "Europe/Paris")
    assert dep.work_pool_name == deploy.WORK_POOL and dep.job_variables == {"image": deploy.IMAGE}


@pytest.mark.parametrize("kwargs, match", [
    ({"parameters": {"stroe": "s3://x"}}, "unknown deployment parameter"),
    ({"parameters": {"until": "deploy"}}, "until="),
    ({"cron": "0 3 * *"}, "cron"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
])
def test_build_deployment_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deploy.build_deployment(**kwargs)


def test_entrypoint_resolves_to_nightly_deployment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)                      # the entrypoint must not depend on the caller's cwd
    dep = deploy.build_deployment()
    assert dep.entrypoint == deploy.ENTRYPOINT == "pipelines/deploy.py:nightly_deployment"
    path, func = dep.entrypoint.split(":")
    assert (ROOT / path).resolve() == Path(deploy.__file__).resolve()
    loaded = load_flow_from_entrypoint(f"{ROOT / path}:{func}")   # what a worker does (imports, runs nothing)
    assert loaded.name == deploy.FLOW_NAME
    assert list(loaded.parameters.properties) == list(deploy.deployment_parameters())


def test_flow_parameters_and_until_choices():
    assert deploy.deployment_parameters() == ("preset", "store", "ray_address", "mlflow_tracking_uri",
                                              "overrides", "until")
    schema = deploy.nightly_deployment.parameters
    assert schema.properties["preset"]["default"] == "default"
    until = json.dumps(schema.model_dump())          # the Literal shows up as an enum of the stages
    assert all(f'"{stage}"' in until for stage in STAGES)


def test_build_config_applies_overrides_then_runtime_parameters():
    cfg = deploy.build_config("tiny", store="s3://bucket/2024", ray_address="ray://head:10001",
                              mlflow_tracking_uri="http://mlflow:5000",
                              overrides=["personalize.beta=0.2", "runtime.store=/ignored"])
    assert isinstance(cfg, NightlyConfig) and cfg.preset == "tiny"
    assert cfg.runtime.store == "s3://bucket/2024"   # the parameter wins over the override, stays a string
    assert cfg.runtime.ray_address == "ray://head:10001"
    assert cfg.runtime.mlflow_tracking_uri == "http://mlflow:5000"
    assert cfg.personalize.beta == 0.2
    assert deploy.build_config("tiny") == deploy.build_config("tiny", overrides=[])
    with pytest.raises(ValueError, match="lerning_rate"):
        deploy.build_config("tiny", overrides=["pretrain.lerning_rate=0.1"])
    with pytest.raises(ValueError, match="unknown preset"):
        deploy.build_config("huge")


def test_flow_body_runs_nightly_and_returns_a_json_summary(monkeypatch):
    seen = {}

    def fake_nightly(cfg, until):
        seen.update(cfg=cfg, until=until)
        return SimpleNamespace(run_id="abc123", seconds=12.34567, stages_run=["prepare", "pretrain"],
                               users={"total": 3, "fitted": 3}, store=cfg.runtime.store, report_path=None)

    monkeypatch.setattr(deploy, "nightly", fake_nightly)
    out = deploy.nightly_deployment.fn(preset="tiny", store="s3://b/p", until="pretrain")
    assert seen["until"] == "pretrain" and seen["cfg"].runtime.store == "s3://b/p"
    assert out == {"run_id": "abc123", "seconds": 12.346, "stages_run": ["prepare", "pretrain"],
                   "users": {"total": 3, "fitted": 3}, "store": "s3://b/p", "report_path": None}
    json.dumps(out)


def test_prefect_yaml_is_a_valid_prefect_project_file():
    raw = _prefect_yaml()
    try:
        from prefect.cli.deploy._models import PrefectYamlModel   # what `prefect deploy` validates with
    except ImportError:                                             # private module: moved in another version
        pytest.skip("prefect.cli.deploy._models not available in this Prefect version")
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == [deploy.DEPLOYMENT_NAME]


def test_prefect_yaml_agrees_with_build_deployment():
    dep_yaml = _yaml_deployment()
    params = dep_yaml["parameters"]
    built = deploy.build_deployment(parameters=params)   # also rejects names nightly_deployment does not take

    assert dep_yaml["entrypoint"] == built.entrypoint
    assert set(params) <= set(deploy.deployment_parameters())
    assert dep_yaml["tags"] == built.tags
    (sched_yaml,) = dep_yaml["schedules"]
    assert (sched_yaml["cron"], sched_yaml["timezone"]) == (deploy.CRON, deploy.TIMEZONE)
    try:
        from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    except ImportError:
        _schedule_config_to_deployment_schedule = None
    if _schedule_config_to_deployment_schedule is not None:   # the schedule `prefect deploy` would create
        assert _schedule_config_to_deployment_schedule(sched_yaml)["schedule"] == built.schedules[0].schedule

    pool = dep_yaml["work_pool"]
    assert pool["name"] == deploy.WORK_POOL
    assert pool["job_variables"]["image"] == deploy.IMAGE
    assert set(pool["job_variables"]) <= K8S_JOB_VARIABLES, "job variable not in the Kubernetes work pool"

    # the parameters make a valid config for the cluster
    cfg = deploy.build_config(**{k: v for k, v in params.items() if k != "until"})
    assert cfg.runtime.store.startswith("s3://")
    assert cfg.runtime.ray_address and cfg.runtime.mlflow_tracking_uri.startswith("http")
    assert params.get("until", "report") in STAGES
