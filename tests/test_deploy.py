"""The deployment files: Kubernetes manifests against the Kubernetes schemas,
the properties the docs promise of them, and the dashboard against the metrics
the server really exports.

The schema check uses `kubernetes-validate` (in the `test` extra), which ships
the schemas: no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bpfexec.server.metrics import Metrics
from bpfexec.server.settings import Settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # gRPC probes are GA since 1.27
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str) -> dict[str, Any]:
    found = [doc for path in MANIFESTS for doc in load(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in load(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def test_the_resources_the_docs_describe_are_there() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in load(path)}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert resource("Service")["spec"]["clusterIP"] == "None"  # headless
    assert resource("HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_deployment_probes_health_and_runs_locked_down() -> None:
    pod = resource("Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = Settings().port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}
    env = {var["name"]: var["value"] for var in container["env"]}
    assert env["BPFEXEC_HOST"] == "0.0.0.0"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["BPFEXEC_METRICS_PORT"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"requests", "limits"} <= container["resources"].keys()
    # Every BPFEXEC_* variable names a real setting.
    flags = {f"BPFEXEC_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert {name for name in env if name.startswith("BPFEXEC_")} <= flags


def exported_metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update({f"{family.name}_total", f"{family.name}_bucket"})
    return names


def test_dashboard_queries_only_metrics_the_server_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "bpfexec.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:bpfexec|grpc_server)_\w+)\{", target["expr"])
    }
    assert queried, "the dashboard queries no metric"
    assert queried <= exported_metric_names()


def test_compose_scrapes_the_metrics_port() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"bpfexec", "prometheus"}
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"bpfexec:{Settings().metrics_port}"]


REDIS_OVERLAY = KUBERNETES / "redis"


def test_the_redis_overlay_matches_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = load(REDIS_OVERLAY / "redis.yaml")
    assert sorted(doc["kind"] for doc in docs) == ["Service", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_redis_overlay_points_the_replicas_at_a_durable_redis() -> None:
    kustomization = yaml.safe_load((REDIS_OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "redis.yaml"]
    assert kustomization["patches"] == [{"path": "store.yaml"}]
    (patch,) = load(REDIS_OVERLAY / "store.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == (
        "Deployment",
        resource("Deployment")["metadata"]["name"],
    )
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    knobs = {f"BPFEXEC_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert {"BPFEXEC_STORE", "BPFEXEC_STATE_STORE"} <= knobs
    service, statefulset = sorted(load(REDIS_OVERLAY / "redis.yaml"), key=lambda d: d["kind"])
    port = service["spec"]["ports"][0]["port"]
    url = f"redis://{service['metadata']['name']}:{port}/0"
    assert env == {"BPFEXEC_STORE": url, "BPFEXEC_STATE_STORE": url}
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendfsync") + 1] == "always"
    assert args[args.index("--appendonly") + 1] == "yes"
