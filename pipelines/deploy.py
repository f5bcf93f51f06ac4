"""Prefect deployment of the nightly flow: plain parameters in, a small JSON-able summary out.

`nightly(cfg: NightlyConfig)` takes a pydantic config, which suits the CLI but not a scheduled deployment:
the Prefect UI, `prefect deployment run --param` and `infra/prefect.yaml` speak in JSON-able parameters.
`nightly_deployment` takes exactly the knobs a platform team turns (preset, where things run, `section.key=value`
overrides), builds the same validated `NightlyConfig` the CLI builds, and runs `nightly` as a subflow.

`build_deployment()` is the Python twin of `infra/prefect.yaml` (tests/unit/test_deploy.py keeps them in step);
`serve()` runs the schedule in-process for a team without a work pool. Nothing here contacts a Prefect API on
import; only `serve()` (and `.apply()`/`.deploy()` on what `build_deployment()` returns) do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

from prefect import flow
from prefect.schedules import Cron

from latentpref.pipelines.config import NightlyConfig, load_config
from latentpref.pipelines.nightly import Stage, nightly

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEPLOYMENT_NAME = "nightly"
FLOW_NAME = "nightly-deployment"
CRON = "0 3 * * *"                 # 03:00 every day: after the day's feedback has landed
TIMEZONE = "UTC"
TAGS = ("latentpref",)
WORK_POOL = "latentpref-k8s"       # a Kubernetes work pool; see infra/README.md
# Images built from infra/docker/ (tag = package version). Every manifest under infra/ names one of these;
# tests/unit/test_infra.py checks that, so a version bump is one edit here plus a grep.
IMAGE = "ghcr.io/latentpref/latentpref:0.1.0"
IMAGE_GPU = "ghcr.io/latentpref/latentpref:0.1.0-gpu"

# Relative to the repository root, which is the working directory of `prefect deploy` and of the worker
# (the image keeps the sources at /app; infra/prefect.yaml's pull step cds there).
ENTRYPOINT = "pipelines/deploy.py:nightly_deployment"


def build_config(preset: str = "default", *, store: str | None = None, ray_address: str | None = None,
                 mlflow_tracking_uri: str | None = None, overrides: list[str] | None = None) -> NightlyConfig:
    """The `NightlyConfig` a deployment run uses: preset, then `section.key=value` overrides, then the runtime
    parameters (which win, like the CLI's `--store/--ray-address/--mlflow-uri` over `--set`).

    Runtime values are merged as strings, not re-parsed as YAML, so a store path such as `s3://b/2024` or a
    URI with a colon stays exactly what was passed.

    Raises:
        ValueError: unknown preset, malformed override, or a config error naming the offending key.
    """
    cfg = load_config(preset, overrides=list(overrides or ()))
    runtime = {key: value for key, value in (("store", store), ("ray_address", ray_address),
                                             ("mlflow_tracking_uri", mlflow_tracking_uri)) if value is not None}
    if not runtime:
        return cfg
    data = cfg.model_dump()
    data["runtime"].update(runtime)
    return NightlyConfig.model_validate(data)


@flow(name=FLOW_NAME, log_prints=False)
def nightly_deployment(preset: str = "default", store: str | None = None, ray_address: str | None = None,
                       mlflow_tracking_uri: str | None = None, overrides: list[str] | None = None,
                       until: Stage = "report") -> dict[str, Any]:
    """Scheduled entry point: build the config from plain parameters and run the nightly chain up to `until`.

    Args:
        preset: `default`, `small` or `tiny` (pipelines/presets/).
        store: local folder or `s3://bucket/prefix`; None keeps the preset's (`./latentpref-store`).
        ray_address: `auto` (on a Ray node), `ray://head:10001` (Ray Client), or None for a local Ray.
        mlflow_tracking_uri: e.g. `http://mlflow:5000`; None = sqlite inside a local store.
        overrides: `section.key=value` items, as the CLI's `--set` (e.g. `personalize.beta=0.2`).
        until: last stage to run.

    Returns:
        `run_id` (MLflow), `seconds`, `stages_run`, `users` (counts), `store`, `report_path`.
    """
    cfg = build_config(preset, store=store, ray_address=ray_address, mlflow_tracking_uri=mlflow_tracking_uri,
                       overrides=overrides)
    report = nightly(cfg, until=until)
    return {"run_id": report.run_id, "seconds": round(float(report.seconds), 3),
            "stages_run": list(report.stages_run), "users": dict(report.users), "store": report.store,
            "report_path": report.report_path}


def deployment_parameters() -> tuple[str, ...]:
    """Names a deployment may set: the parameters of `nightly_deployment`."""
    return tuple(nightly_deployment.parameters.properties)


def _checked(parameters: dict[str, Any] | None) -> dict[str, Any]:
    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - set(deployment_parameters()))
    if unknown:
        raise ValueError(f"unknown deployment parameter(s) {unknown}; nightly_deployment takes "
                         f"{list(deployment_parameters())}")
    until = parameters.get("until")
    if until is not None and until not in get_args(Stage):
        raise ValueError(f"until={until!r}; expected one of {list(get_args(Stage))}")
    return parameters


def _schedule(cron: str, timezone: str) -> Cron:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"timezone={timezone!r} is not an IANA zone name (e.g. 'UTC', 'Europe/Paris')") from err
    return Cron(cron, timezone=timezone)   # raises ValueError naming a malformed cron string


def build_deployment(*, name: str = DEPLOYMENT_NAME, cron: str = CRON, timezone: str = TIMEZONE,
                     parameters: dict[str, Any] | None = None, work_pool_name: str | None = None,
                     job_variables: dict[str, Any] | None = None) -> RunnerDeployment:
    """The nightly deployment as a `RunnerDeployment`, without contacting any Prefect API.

    `prefect.deploy(build_deployment(), work_pool_name=WORK_POOL, image=IMAGE, build=False, push=False)`
    registers it for a work pool; `prefect.serve(build_deployment())` runs it in-process. `infra/prefect.yaml`
    is the same deployment in declarative form.

    Raises:
        ValueError: a parameter `nightly_deployment` does not take, a bad `until`, cron string or timezone.
    """
    deployment = nightly_deployment.to_deployment(
        name=name, schedules=[_schedule(cron, timezone)], parameters=_checked(parameters), tags=list(TAGS),
        description=(nightly_deployment.description or "").split("\n")[0], work_pool_name=work_pool_name,
        job_variables=job_variables)
    # Prefect derives the entrypoint from the current directory; pin it to the repository root, where
    # `prefect deploy` and the worker run, so the result does not depend on the caller's directory.
    deployment.entrypoint = ENTRYPOINT
    return deployment


def serve(*, name: str = DEPLOYMENT_NAME, cron: str = CRON, timezone: str = TIMEZONE,
          parameters: dict[str, Any] | None = None, limit: int | None = None) -> None:
    """Register the nightly deployment and run its scheduled runs in this process (blocks until stopped).

    Needs a Prefect API (`PREFECT_API_URL`); without one Prefect starts a temporary server that lives only
    as long as this process. For a long-lived setup prefer a work pool (infra/README.md).
    """
    nightly_deployment.serve(name=name, schedules=[_schedule(cron, timezone)], parameters=_checked(parameters),
                             tags=list(TAGS), limit=limit)


if __name__ == "__main__":
    serve()
