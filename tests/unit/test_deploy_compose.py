"""docker-compose.yml and deploy/: the compose file validates, every meshserve
service runs a command the CLI accepts, workers scale without host ports and
advertise their container address, Prometheus finds workers through Consul,
and the Grafana dashboard asks for metrics the components export."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.main import get_command

from meshserve.cli import app
from tests.harness import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DEPLOY = REPO_ROOT / "deploy"
# Metric names from DESIGN.md (observability); exported names of counters end in _total.
DESIGN_METRICS = {
    "meshserve_requests_total",
    "meshserve_request_duration_seconds",
    "meshserve_batch_size",
    "meshserve_queue_depth",
    "meshserve_endpoints",
    "meshserve_retries_total",
    "meshserve_ejections_total",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def meshserve_argv(command: list[str] | str) -> list[str]:
    """The argv a service runs (compose accepts a list or a shell-like string)."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def parse_with_cli(argv: list[str]) -> typer.Context:
    """Parses `argv` exactly as `meshserve` would, without running it; raises click's UsageError on bad usage.

    (Typer vendors click, so the command tree is walked through `get_command`'s objects.)
    """
    assert argv[0] == "meshserve", argv
    command: Any = get_command(app)
    context = command.make_context("meshserve", argv[1:])
    while hasattr(command, "resolve_command"):
        # click >= 8.2 keeps the sub-command's name in `_protected_args`, older ones in `protected_args`.
        pending = getattr(context, "_protected_args", None) or getattr(context, "protected_args", [])
        name, sub, rest = command.resolve_command(context, [*pending, *context.args])
        assert sub is not None, f"no such command {name!r}"
        command = sub
        context = command.make_context(name or "", rest, parent=context)
    return context


def meshserve_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("meshserve")}


def test_compose_validates_with_the_docker_compose_client() -> None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        client = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        client = ["docker-compose"]
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the structure tests still run")
    for profile in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            [*client, "-f", str(COMPOSE_FILE), *profile, "config", "-q"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr


def test_every_meshserve_service_runs_a_command_the_cli_accepts(compose: dict[str, Any]) -> None:
    services = meshserve_services(compose)
    assert {"models", "gateway", "worker", "worker-gpu"} <= services.keys()

    commands = {name: parse_with_cli(meshserve_argv(svc["command"])) for name, svc in services.items()}

    assert commands["models"].info_name == "demo-models"
    assert commands["gateway"].info_name == "gateway"
    assert commands["worker"].info_name == commands["worker-gpu"].info_name == "worker"
    assert commands["worker"].params["registry"] == commands["gateway"].params["registry"] == "consul://consul:8500"
    assert commands["worker"].params["advertise_address"] is None, "each replica advertises its own address"


def test_the_cli_check_rejects_an_unknown_flag() -> None:
    with pytest.raises(Exception, match="--no-such-flag") as raised:
        parse_with_cli(["meshserve", "worker", "--model-repository", "/models", "--no-such-flag"])
    assert "UsageError" in {cls.__name__ for cls in type(raised.value).__mro__}


def test_workers_scale_share_the_model_volume_and_advertise_their_own_address(compose: dict[str, Any]) -> None:
    for name in ("worker", "worker-gpu"):
        worker = compose["services"][name]
        assert "ports" not in worker, "a fixed host port would stop `--scale worker=N`"
        assert "container_name" not in worker
        assert "models:/models:ro" in worker["volumes"]
        assert "--advertise-address" not in worker["command"]
        assert worker["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["consul"]["condition"] == "service_healthy"
        assert worker["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


def test_compose_waits_for_each_drain_before_it_kills(compose: dict[str, Any]) -> None:
    """`docker compose stop` sends SIGTERM, then SIGKILL after stop_grace_period (10 s unless set):
    a killed worker or gateway fails the requests its drain would have finished."""
    from gateway.settings import GatewaySettings
    from meshserve.drain import FLUSH_GRACE_S
    from worker.settings import WorkerSettings

    def seconds(period: str) -> float:
        assert period.endswith("s"), period
        return float(period[:-1])

    # Each grace counts from the signal, the drain delay included.
    gateway_drain = GatewaySettings().drain_grace + FLUSH_GRACE_S
    assert seconds(compose["services"]["gateway"]["stop_grace_period"]) >= gateway_drain
    worker_drain = WorkerSettings(model_repository=Path("/models")).drain_grace + FLUSH_GRACE_S
    for name in ("worker", "worker-gpu"):
        assert seconds(compose["services"][name]["stop_grace_period"]) >= worker_drain


def test_a_worker_without_advertise_address_registers_its_container_address() -> None:
    """What the compose workers rely on: in a container the hostname resolves to the container's own IP."""
    from registry.address import advertised_address

    assert advertised_address("0.0.0.0", None) == socket.gethostbyname(socket.gethostname())
    assert advertised_address("0.0.0.0", "10.1.2.3") == "10.1.2.3"


def test_gpu_workers_are_a_profile_with_a_device_reservation(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in compose["services"]["worker"]


def test_infrastructure_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "-dev" in services["consul"]["command"]
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "16686:16686" in services["jaeger"]["ports"]
    assert services["models"]["restart"] == "no"
    assert "models:/models" in services["models"]["volumes"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{source} is mounted but missing"


def test_prometheus_discovers_workers_and_gateways_through_consul_metrics_port_meta() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    # Gateways register as meshserve-gateway (gateway/registration.py), with their metrics port in Meta too.
    for service in ("meshserve-worker", "meshserve-gateway"):
        job = jobs[service]
        assert job["consul_sd_configs"] == [{"server": "consul:8500", "services": [service]}]
        address_rule = next(rule for rule in job["relabel_configs"] if rule.get("target_label") == "__address__")
        assert address_rule["source_labels"] == [
            "__meta_consul_service_address",
            "__meta_consul_service_metadata_metrics_port",
        ]
        assert re.fullmatch(address_rule["regex"], "172.18.0.7;8002")


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "meshserve.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    names = {name for expr in expressions for name in re.findall(r"\b(meshserve_[a-z_]+|process_[a-z_]+)\b", expr)}
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_dashboard_covers_the_design_panels_and_asks_only_for_design_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "meshserve.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Request rate", "Latency p50 / p99", "Errors by code", "Batch size", "Queue depth"} <= titles
    assert "Endpoints per model" in titles
    assert dashboard_metric_names() - {"process_cpu_seconds_total"} == DESIGN_METRICS


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder(compose: dict[str, Any]) -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {"url": "http://prometheus:9090", "uid": "prometheus"}.items() <= datasources["datasources"][0].items()
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/meshserve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


def metric_names_of(registry: Any) -> set[str]:
    names = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(re.sub(r"_(bucket|sum|count|created)$", "", sample.name))
    return names


def test_design_metrics_are_what_the_components_export() -> None:
    """The dashboard's names are the names the worker and balancer metric classes register."""
    from loadbalancer.metrics import BalancerMetrics
    from worker.metrics import WorkerMetrics

    worker = WorkerMetrics()
    worker.count_request("mlp784", __import__("grpc").StatusCode.OK)
    worker.for_model("mlp784").batch_size.observe(4)
    worker.for_model("mlp784").duration.observe(0.001)
    balancer = BalancerMetrics()
    balancer.watch_endpoints(lambda: [("mlp784", "healthy", 2)])
    balancer.retries.labels("mlp784", "unavailable").inc()
    balancer.ejections.labels("mlp784").inc()

    exported = metric_names_of(worker.registry) | metric_names_of(balancer.registry)

    assert exported >= DESIGN_METRICS, DESIGN_METRICS - exported


def test_dockerfile_is_one_slim_non_root_image_with_a_health_check_and_a_model_volume() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in dockerfile.splitlines() if line and not line.startswith(("#", " "))]
    by_keyword: dict[str, list[str]] = {}
    for keyword, *rest in instructions:
        by_keyword.setdefault(keyword, []).append(rest[0] if rest else "")

    assert by_keyword["ARG"][0] == "DEVICE=cpu"
    stages = " ".join(by_keyword["FROM"])
    assert "python:3.11-slim" in stages and "AS base-cpu" in stages
    assert "AS base-cuda" in stages
    # The CUDA libraries come from pip, matched to the onnxruntime-gpu pip resolves: a CUDA base image would
    # pin a CUDA major version of its own (12.6 here once, under an onnxruntime-gpu built for CUDA 13).
    assert "nvidia/cuda:" not in stages
    assert any('"[cuda]"' in run and 'install ".${extras}"' in run for run in by_keyword["RUN"])
    # The dependencies are installed before the code is copied in: a code change does not reinstall them.
    order = [f"{keyword} {rest[0] if rest else ''}" for keyword, *rest in instructions]
    dependencies = next(i for i, line in enumerate(order) if 'install ".${extras}"' in line)
    packages = ("protos", "worker", "registry", "loadbalancer", "gateway", "meshserve")
    code = [i for i, line in enumerate(order) if line.startswith(tuple(f"COPY {p} " for p in packages))]
    package = next(i for i, line in enumerate(order) if "pip install --no-deps ." in line)
    assert len(code) == len(packages) and dependencies < min(code) and max(code) < package
    assert by_keyword["FROM"][-1] == "base-${DEVICE}"
    assert by_keyword["USER"] == ["meshserve"]
    assert by_keyword["VOLUME"] == ['["/models"]']
    assert "healthcheck.py" in by_keyword["HEALTHCHECK"][0]
    assert not any("models" in copy or ".onnx" in copy for copy in by_keyword["COPY"]), "no model baked in"

    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "**" and "**/*.onnx" in ignored
    assert not any(line.startswith("!tests") or line.startswith("!.venv") for line in ignored)


def test_readme_explains_several_machines() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Run it on several machines", 1)[1]
    for needle in ("docker compose up", "--scale worker=", "--advertise-address", "CONSUL_HTTP_ADDR", "--registry"):
        assert needle in section, needle


def test_compose_paths_exist() -> None:
    for path in ("deploy/healthcheck.py", "deploy/prometheus/prometheus.yml", "Dockerfile", ".dockerignore"):
        assert Path(REPO_ROOT, path).is_file(), path


def test_the_image_smoke_test_runs_compose_s_commands(compose: dict[str, Any]) -> None:
    """deploy/smoke_image.py starts the containers compose starts; the two must not drift apart."""
    spec = importlib.util.spec_from_file_location("smoke_image", DEPLOY / "smoke_image.py")
    assert spec is not None and spec.loader is not None
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    services = compose["services"]
    assert meshserve_argv(services["worker"]["command"]) == list(smoke.WORKER_COMMAND)
    assert meshserve_argv(services["gateway"]["command"]) == list(smoke.GATEWAY_COMMAND)
    assert meshserve_argv(services["models"]["command"]) == list(smoke.MODELS_COMMAND)
    for argv in (smoke.WORKER_COMMAND, smoke.GATEWAY_COMMAND, smoke.MODELS_COMMAND):
        parse_with_cli(list(argv))
