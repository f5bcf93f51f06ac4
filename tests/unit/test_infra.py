"""Static checks of infra/: every manifest parses and agrees with the code it deploys.

No cluster, registry or server is contacted. What is checked is what the code relies on: one image name per
role (matching the package version), `latentpref` entrypoints that the real CLI parser accepts and whose
`--set` overrides pass config validation, GPU requests on the GPU worker group, credentials only through
Secrets, `$(VAR)` references that resolve, and Dockerfiles that install this project with the pinned torch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import stat
import subprocess
from fnmatch import fnmatch
from functools import lru_cache
from importlib.metadata import requires, version
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from latentpref.pipelines import cli
from latentpref.pipelines.deploy import IMAGE, IMAGE_GPU

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
README = INFRA / "README.md"
DOCKERFILES = {"cpu": INFRA / "docker" / "Dockerfile", "gpu": INFRA / "docker" / "Dockerfile.gpu"}
# An env var with one of these in its name carries a credential: it may only come from a Secret.
SECRET_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIALS?|BACKEND_STORE_URI|"
                         r"DATABASE_URL)(_|$)")
USERINFO_WITH_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


@lru_cache(maxsize=None)
def _docs(path: Path) -> tuple[dict, ...]:   # cached: the tests only read the documents
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() for d in _docs(p) if "kind" in d]


def _one(kind: str) -> dict:
    found = [d for _, d in _manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under infra/, found {len(found)}"
    return found[0]


def _ray_groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    groups = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    groups += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return groups


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        return _ray_groups(spec)
    if kind == "RayJob":
        pods = _ray_groups(spec["rayClusterSpec"]) if "rayClusterSpec" in spec else []
        if "submitterPodTemplate" in spec:
            pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return pods
    if kind == "RayService":
        return _ray_groups(spec["rayClusterConfig"])
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(doc["metadata"]["name"], spec["template"]["spec"])]
    return []


def _containers() -> list[tuple[str, dict]]:
    out = []
    for path, doc in _manifests():
        for where, pod in _pod_specs(doc):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                out.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{where}/{c['name']}", c))
    return out


def _env_lists() -> list[tuple[str, list[dict]]]:
    envs = [(where, c.get("env", [])) for where, c in _containers()]
    for path, doc in _manifests():   # the autoscaler sidecar has its own env list
        spec = doc.get("spec", {})
        for s in (spec, spec.get("rayClusterSpec") or {}):
            if (s.get("autoscalerOptions") or {}).get("env"):
                envs.append((f"{path.relative_to(ROOT)}:autoscaler", s["autoscalerOptions"]["env"]))
    return envs


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def _instructions(path: Path, name: str) -> list[str]:
    return [args for instr, args in _dockerfile(path) if instr == name]


def _readme_commands(program: str) -> list[list[str]]:
    """Shell commands in README code blocks that start with `program`, continuation lines joined."""
    fenced = re.findall(r"^```([\w-]*)\n(.*?)^```[ \t]*$", README.read_text(), re.S | re.M)
    blocks = [body for lang, body in fenced if lang in ("", "bash", "sh", "shell")]
    lines = re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith(program + " ")]


def _parse_cli(argv: list[str]):
    assert argv[0] == "latentpref", f"entrypoint must call the latentpref CLI, got {argv[0]!r}"
    parser = cli.build_parser()
    sub = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert argv[1] in sub, f"{argv[1]!r} is not a latentpref subcommand; known: {sorted(sub)}"
    args = parser.parse_args(argv[1:])               # argparse exits (SystemExit) on a bad flag
    return args, cli._load(args)                      # --preset/--set/--store... through config validation


def test_every_yaml_under_infra_parses():
    files = _yaml_files()
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {"prefect.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml",
            "mlflow/mlflow-server.yaml"} <= names
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.name not in ("prefect.yaml", "serve-config.yaml"):   # Prefect's / Ray Serve's own formats
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"


def test_images_are_the_project_images_tagged_with_the_package_version():
    assert IMAGE == f"ghcr.io/latentpref/latentpref:{version('latentpref')}"
    assert IMAGE_GPU == f"{IMAGE}-gpu"
    images = {where: c["image"] for where, c in _containers()}
    assert images, "no containers found under infra/"
    stray = {w: i for w, i in images.items() if i not in (IMAGE, IMAGE_GPU)}
    assert not stray, f"images other than {IMAGE} / {IMAGE_GPU}: {stray}"
    prefect_yaml = _docs(INFRA / "prefect.yaml")[0]
    for dep in prefect_yaml["deployments"]:
        assert dep["work_pool"]["job_variables"]["image"] == IMAGE
    readme = README.read_text()
    for dockerfile, tag in ((DOCKERFILES["cpu"], IMAGE), (DOCKERFILES["gpu"], IMAGE_GPU)):
        assert f"-f {dockerfile.relative_to(ROOT).as_posix()}" in readme and tag in readme
        assert f"-t {tag}" in dockerfile.read_text(), f"{dockerfile.name}'s build comment should name {tag}"


def test_ray_version_matches_the_installed_ray():
    for doc in (_one("RayCluster")["spec"], _one("RayJob")["spec"]["rayClusterSpec"]):
        assert doc["rayVersion"] == version("ray")


def test_gpu_worker_group_requests_a_gpu_and_cpu_groups_do_not():
    spec = _one("RayCluster")["spec"]
    gpu_groups = []
    for name, pod in _ray_groups(spec):
        (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        limits = container["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(name)
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert container["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
            assert container["image"] == IMAGE_GPU, f"{name}: a GPU group needs the CUDA image"
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        else:
            assert container["image"] == IMAGE, f"{name}: a CPU pod should use the CPU image"
    assert gpu_groups and "head" not in gpu_groups
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
    if any(g["minReplicas"] == 0 for g in spec["workerGroupSpecs"] if g["groupName"] in gpu_groups):
        assert spec.get("enableInTreeAutoscaling") is True, "GPU workers from zero need the autoscaler"


def test_rayjob_runs_on_the_same_cluster_spec_and_cleans_up():
    job = _one("RayJob")["spec"]
    assert job["rayClusterSpec"] == _one("RayCluster")["spec"], \
        "rayjob-pretrain.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    assert job.get("activeDeadlineSeconds", 1) > 0


def test_rayjob_entrypoint_is_a_valid_latentpref_call():
    argv = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    args, cfg = _parse_cli(argv)
    assert args.command == "pretrain"
    assert cfg.runtime.store.startswith("s3://")
    assert cfg.runtime.ray_address == "auto"        # the driver runs on the head pod
    assert urlparse(cfg.runtime.mlflow_tracking_uri).scheme == "http"
    assert cfg.pretrain.use_gpu == "true"            # GPU workers scale from zero: `auto` would see none


def test_latentpref_commands_in_the_readme_are_valid():
    commands = _readme_commands("latentpref")
    assert commands, "infra/README.md shows no latentpref command"
    for argv in commands:
        _parse_cli(argv)


def test_credentials_come_only_from_secret_key_refs():
    envs = _env_lists()
    prefect_env = _docs(INFRA / "prefect.yaml")[0]["deployments"][0]["work_pool"]["job_variables"].get("env", {})
    envs.append(("infra/prefect.yaml:job_variables", [{"name": k, "value": v} for k, v in prefect_env.items()]))
    for where, env in envs:
        for item in env:
            name = item["name"]
            if SECRET_NAME.search(name) and name != "RAY_AUTH_MODE":
                assert "value" not in item, f"{where}: {name} has a literal value; use valueFrom.secretKeyRef"
                assert "secretKeyRef" in item.get("valueFrom", {}), f"{where}: {name} must come from a Secret"
    for path, doc in _manifests():
        assert doc["kind"] != "Secret", f"{path}: Secrets are created out of band, never committed"
    scanned = 0
    for path in _yaml_files() + list(DOCKERFILES.values()):
        for s in _strings(_docs(path)) if path.suffix in (".yaml", ".yml") else [path.read_text()]:
            scanned += 1
            assert not USERINFO_WITH_PASSWORD.search(s), f"{path}: a URL with a password: {s!r}"
            assert not AWS_KEY_ID.search(s), f"{path}: what looks like an AWS access key id"
    assert scanned > 50


def test_secret_refs_are_documented_in_the_readme():
    readme = README.read_text()
    refs = {(i["valueFrom"]["secretKeyRef"]["name"], i["valueFrom"]["secretKeyRef"]["key"])
            for _, env in _env_lists() for i in env if "secretKeyRef" in i.get("valueFrom", {})}
    assert refs
    for name, key in refs:
        assert f"`{name}`" in readme and f"`{key}`" in readme, f"Secret {name}/{key} is not in infra/README.md"
    for doc in (_one("RayCluster")["spec"], _one("RayJob")["spec"]["rayClusterSpec"]):
        auth = doc.get("authOptions", {})
        assert auth.get("mode") == "token", "Ray token auth must be on (Ray 2.60 leaves `ray start` open)"
        assert f"`{auth['secretName']}`" in readme and "`auth_token`" in readme


def test_env_var_references_resolve_and_are_documented():
    readme = README.read_text()
    for where, c in _containers():
        defined = {e["name"] for e in c.get("env", [])}
        for arg in c.get("command", []) + c.get("args", []):
            for var in re.findall(r"\$\((\w+)\)", str(arg)):
                assert var in defined, f"{where}: $({var}) is used but not defined in env"
        for name in defined:
            assert f"`{name}`" in readme, f"{where}: env var {name} is missing from infra/README.md's table"
    # Ray workers write the store and checkpoints to S3 themselves: credentials on every Ray container
    for kind in ("RayCluster", "RayJob"):
        doc = _one(kind)
        spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
        for group, pod in _ray_groups(spec):
            for c in pod["containers"]:
                names = {e["name"] for e in c.get("env", [])}
                assert set(S3_CREDENTIALS) <= names, f"{kind}/{group}: missing {set(S3_CREDENTIALS) - names}"


def test_mlflow_server_manifest():
    deployment, service = _one("Deployment"), _one("Service")
    pod = deployment["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["mlflow", "server"]
    args, env = c["args"], {e["name"]: e for e in c["env"]}
    flags = {a for a in args if a.startswith("--")}
    # the flags exist in the installed mlflow's CLI, read from its source (importing mlflow.cli takes seconds)
    mlflow_dir = Path(find_spec("mlflow").origin).parent
    source = "".join((mlflow_dir / f).read_text() for f in ("cli/__init__.py", "utils/cli_args.py"))
    known = set(re.findall(r'"(--[a-z][a-z0-9-]*)[/"]', source))
    assert flags <= known, f"not mlflow server options: {flags - known}"
    backend = args[args.index("--backend-store-uri") + 1]
    assert backend == "$(MLFLOW_BACKEND_STORE_URI)"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "uri"
    assert env[args[args.index("--artifacts-destination") + 1][2:-1]]["value"].startswith("s3://")
    assert "--serve-artifacts" in flags
    port = int(args[args.index("--port") + 1])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == port
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"]["path"] == "/health"     # exempt from MLflow's Host-header check
    assert service["metadata"]["name"] == "mlflow"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == port
    # Every tracking URI the infra hands out must pass MLflow 3's Host allow-list (fnmatch patterns, exact
    # match otherwise: mlflow/server/security_utils.py); a Service name is rejected by the default list.
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")]
    uris = {_one("RayJob")["spec"]["entrypoint"].split("--mlflow-uri")[1].split()[0]}
    uris |= {d["parameters"]["mlflow_tracking_uri"] for d in _docs(INFRA / "prefect.yaml")[0]["deployments"]}
    for uri in uris:
        host = urlparse(uri).netloc
        assert urlparse(uri).hostname == service["metadata"]["name"]
        assert any(fnmatch(host, a) if "*" in a else host == a for a in allowed), f"{host} not in {allowed}"


def _pip_installs(path: Path) -> list[str]:
    return [cmd for cmd in _instructions(path, "RUN") if "pip install" in cmd]


def test_dockerfiles_install_the_project_with_the_pinned_torch():
    project_torch = next(r for r in requires("latentpref") if r.startswith("torch"))
    project_ray = next(r for r in requires("latentpref") if r.startswith("ray"))
    ray_pin = project_ray.split("==")[1].split(";")[0].strip()
    assert project_torch.replace(" ", "") == "torch==2.13.0"
    python_versions = set()
    for role, path in DOCKERFILES.items():
        installs = " ".join(_pip_installs(path))
        assert re.search(r"\btorch==2\.13\.0\b", installs), f"{path.name}: torch must be pinned to 2.13.0"
        assert re.search(r"pip install \.(\s|$)", installs), f"{path.name}: must `pip install .` the project"
        assert f'"ray[default]=={ray_pin}"' in installs, f"{path.name}: ray[default] must match pyproject's ray"
        copied = " ".join(_instructions(path, "COPY"))
        for part in ("pyproject.toml", "pipelines", "tasks", "dashboards"):
            assert part in copied, f"{path.name} does not copy {part}"
        assert _instructions(path, "WORKDIR") == ["/app"]
        assert any("wget" in cmd for cmd in _instructions(path, "RUN")), f"{path.name}: KubeRay probes need wget"
        (user,) = _instructions(path, "USER")
        assert user not in ("root", "0")
        args = [a for a in _instructions(path, "ARG") if a.startswith("PYTHON_VERSION=")]
        python_versions |= {a.split("=", 1)[1] for a in args}
        entrypoint = json.loads(_instructions(path, "ENTRYPOINT")[-1])
        assert entrypoint[-1] == "latentpref" and "exec latentpref" in entrypoint[2]
    (python,) = python_versions     # Ray rejects nodes whose Python differs from the head's, patch included
    assert python.startswith("3.11.")
    assert any(f.startswith("python:${PYTHON_VERSION}-slim") for f in _instructions(DOCKERFILES["cpu"], "FROM"))
    gpu_text = DOCKERFILES["gpu"].read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", gpu_text) and "FROM ${CUDA_IMAGE}" in gpu_text


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
def test_image_entrypoint_runs_the_cli_and_passes_prefect_through(tmp_path):
    """The ENTRYPOINT script, run with stand-in `latentpref` and `prefect` programs on PATH."""
    for program in ("latentpref", "prefect"):
        stub = tmp_path / program
        stub.write_text(f'#!/bin/sh\necho "{program} $*"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    entrypoint = json.loads(_instructions(DOCKERFILES["cpu"], "ENTRYPOINT")[-1])
    assert entrypoint == json.loads(_instructions(DOCKERFILES["gpu"], "ENTRYPOINT")[-1])
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*argv: str) -> str:
        return subprocess.run([*entrypoint, *argv], env=env, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    assert run("nightly", "--preset", "tiny") == "latentpref nightly --preset tiny"
    assert run("--help") == "latentpref --help"
    # Prefect's Kubernetes worker passes its command as container args
    assert run("prefect", "flow-run", "execute") == "prefect flow-run execute"


def test_prefect_pull_step_matches_the_image_workdir():
    pull = _docs(INFRA / "prefect.yaml")[0]["pull"]
    dirs = [step["prefect.deployments.steps.set_working_directory"]["directory"]
            for step in pull if "prefect.deployments.steps.set_working_directory" in step]
    assert dirs == _instructions(DOCKERFILES["cpu"], "WORKDIR")


def test_paths_named_in_the_readme_exist():
    named = set(re.findall(r"\b(?:infra|pipelines|tests)/[\w./-]*\w", README.read_text()))
    assert "infra/kuberay/raycluster.yaml" in named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"infra/README.md names paths that do not exist: {missing}"


def test_serve_config_and_rayservice_run_the_same_application():
    from latentpref.pipelines.serve import ServeOptions, app_builder
    config = _docs(INFRA / "serve" / "serve-config.yaml")[0]
    service = _one("RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config, \
        "rayservice.yaml's serveConfigV2 drifted from infra/serve/serve-config.yaml"
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("latentpref.pipelines.serve", "app_builder")
    options = ServeOptions.model_validate(app["args"])           # a misspelt key would fail here, as at deploy
    assert options.store.startswith("s3://") and options.max_ongoing_requests > options.max_batch_size
    assert app_builder(app["args"]) is not None
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == version("ray")
    assert cluster["authOptions"]["mode"] == "token"
    ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert config["http_options"]["port"] in ports
    for _, pod in _ray_groups(cluster):
        names = {e["name"] for e in pod["containers"][0].get("env", [])}
        assert set(S3_CREDENTIALS) <= names and "LATENTPREF_SERVE_TOKEN" in names
