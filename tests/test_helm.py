"""The Helm chart in helm/gateway, checked offline.

Renders the chart with its default values, with values-sidecar.yaml, with
ci/full-values.yaml (every optional part on), with shared state on the trial Redis
(ci/redis-values.yaml, and ci/sidecar-shared-values.yaml on top of values-sidecar.yaml), and
in decision mode behind an ingress (ci/decision-values.yaml), validates every manifest with
`kubernetes-validate --strict` against the Kubernetes 1.30 schemas, checks the rendered
gateway.yaml with `gateway check-config`, and asserts the properties that matter in a cluster.

Needs `helm` and `kubernetes-validate`: found through env HELM / KUBERNETES_VALIDATE, then the
tools cache that scripts/get-helm.sh and scripts/check-chart.sh fill ($GATEWAY_TOOLS, default
/var/tmp/gateway-tools), then PATH. Tests are skipped (with the reason) when they are missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from tests.conftest import (
    HELM,
    KUBERNETES_VALIDATE,
    free_port,
    gateway_run,
    need_tool,
    wait_for_port,
)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "gateway"
SIDECAR_VALUES = CHART / "values-sidecar.yaml"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
REDIS_VALUES = CHART / "ci" / "redis-values.yaml"
SIDECAR_SHARED_VALUES = CHART / "ci" / "sidecar-shared-values.yaml"
DECISION_VALUES = CHART / "ci" / "decision-values.yaml"
KUBE_VERSION = "1.30.0"
RELEASE = "ci"
NAMESPACE = "ci-ns"

DEFAULT: tuple[str, ...] = ()
SIDECAR: tuple[str, ...] = ("-f", str(SIDECAR_VALUES))
FULL: tuple[str, ...] = ("-f", str(FULL_VALUES))
# Sidecar mode with the NetworkPolicy on: it selects the application's pods by their labels.
SIDECAR_POLICY: tuple[str, ...] = (
    *SIDECAR,
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "networkPolicy.podSelector.app=orders",
)
# Shared state on the chart's trial Redis: standalone, and for sidecars.
REDIS: tuple[str, ...] = ("-f", str(REDIS_VALUES))
SIDECAR_SHARED: tuple[str, ...] = (*SIDECAR, "-f", str(SIDECAR_SHARED_VALUES))
# Decision mode behind an ingress: routes without upstreams, trusted_proxies, a NetworkPolicy.
DECISION: tuple[str, ...] = ("-f", str(DECISION_VALUES))
SHAPES = {
    "default": DEFAULT,
    "sidecar": SIDECAR,
    "full": FULL,
    "sidecar-policy": SIDECAR_POLICY,
    "redis": REDIS,
    "sidecar-shared": SIDECAR_SHARED,
    "decision": DECISION,
}

Doc = dict[str, Any]


# .ci/run installs both: under CI a missing one fails the tests instead of skipping them.
needs_helm = pytest.mark.skipif(
    HELM is None and not os.environ.get("CI"),
    reason="helm not found (env HELM, $GATEWAY_TOOLS/bin/helm or PATH; scripts/get-helm.sh)",
)
needs_validator = pytest.mark.skipif(
    KUBERNETES_VALIDATE is None and not os.environ.get("CI"),
    reason="kubernetes-validate not found (env KUBERNETES_VALIDATE, $GATEWAY_TOOLS/venv or PATH;"
    " pip install kubernetes-validate==1.37.0)",
)
pytestmark = needs_helm


# ------------------------------------------------------------------------------ helpers


def _helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run(
        [
            HELM,
            "template",
            RELEASE,
            str(chart),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            "--api-versions",
            "monitoring.coreos.com/v1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@cache
def _rendered_text(args: tuple[str, ...]) -> str:
    proc = _helm(*args)
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def render(*args: str) -> list[Doc]:
    """The manifests `helm template` renders with these extra arguments (fresh copies)."""
    return [doc for doc in yaml.safe_load_all(_rendered_text(args)) if doc]


def kinds(docs: list[Doc]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def is_redis(doc: Doc) -> bool:
    return bool(doc["metadata"]["labels"].get("app.kubernetes.io/component") == "redis")


def gateway_deployment(docs: list[Doc]) -> Doc:
    """The gateway's Deployment (not the trial Redis's)."""
    found = [d for d in docs if d["kind"] == "Deployment" and not is_redis(d)]
    assert len(found) == 1, f"expected one gateway Deployment, got {len(found)}"
    return found[0]


def redis_deployment(docs: list[Doc]) -> Doc:
    found = [d for d in docs if d["kind"] == "Deployment" and is_redis(d)]
    assert len(found) == 1, f"expected one Redis Deployment, got {len(found)}"
    return found[0]


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = gateway_deployment(docs)["spec"]["template"]["spec"]
    return spec


def gateway_container(docs: list[Doc]) -> Doc:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    container: Doc = containers[0]
    return container


def pod_annotations(docs: list[Doc]) -> dict[str, str]:
    annotations: dict[str, str] = gateway_deployment(docs)["spec"]["template"]["metadata"][
        "annotations"
    ]
    return annotations


def config_map(docs: list[Doc]) -> Doc:
    """The gateway's own ConfigMap (the Grafana dashboard's, when on, is another)."""
    found = [d for d in docs if d["kind"] == "ConfigMap" and "gateway.yaml" in d["data"]]
    assert len(found) == 1, f"expected one ConfigMap with gateway.yaml, got {len(found)}"
    return found[0]


def gateway_yaml(docs: list[Doc]) -> str:
    text: str = config_map(docs)["data"]["gateway.yaml"]
    return text


def gateway_config(docs: list[Doc]) -> Doc:
    config: Doc = yaml.safe_load(gateway_yaml(docs))
    return config


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def named_port(container: Doc, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name])


def env_secret_ref(container: Doc, name: str) -> Doc:
    (entry,) = [e for e in container["env"] if e["name"] == name]
    ref: Doc = entry["valueFrom"]["secretKeyRef"]
    return ref


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    assert KUBERNETES_VALIDATE is not None
    return subprocess.run(
        # options must come before the file names
        [
            KUBERNETES_VALIDATE,
            "--strict",
            "--quiet",
            "-k",
            KUBE_VERSION.rsplit(".", 1)[0],
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# What the pod gets from Secrets, for `gateway check-config` outside the cluster.
DUMMY_ENV = {
    "GATEWAY_REDIS_URL": "redis://redis.invalid:6379/0",
    "GATEWAY_SHARED_SECRET": "dummy-shared-secret-0123456789abcdef",
    "GATEWAY_ADMIN_TOKEN": "dummy-admin-token-0123",
}


def write_config(docs: list[Doc], directory: Path) -> Path:
    """The rendered gateway.yaml in `directory`; a file the pod mounts from a Secret
    (shared.tls.ca_file) is pointed at a placeholder there."""
    text = gateway_yaml(docs)
    ca = (gateway_config(docs).get("shared") or {}).get("tls", {}).get("ca_file")
    if ca:
        placeholder = directory / "redis-ca.pem"
        placeholder.write_text("placeholder\n", encoding="utf-8")
        text = text.replace(ca, str(placeholder))
    path = directory / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def check_config(
    path: Path,
    token: str | None = "dummy-authlete-token",
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHLETE_", "GATEWAY_"))}
    if token is not None:
        env["AUTHLETE_ACCESS_TOKEN"] = token
    if extra_env is None:
        extra_env = dict(DUMMY_ENV)
        if "redis-ca.pem" in path.read_text(encoding="utf-8"):
            extra_env["GATEWAY_REDIS_URL"] = "rediss://redis.invalid:6380/0"
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


# ------------------------------------------------------------------------------ lint + schema


@pytest.mark.parametrize("shape", SHAPES)
def test_helm_lint_strict(shape: str) -> None:
    assert HELM is not None
    proc = subprocess.run(
        [HELM, "lint", "--strict", str(CHART), *SHAPES[shape]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_validator
@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_manifests_are_valid_kubernetes(shape: str, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_rendered_text(SHAPES[shape]), encoding="utf-8")
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Only the CRD kinds may go unvalidated (a warning); anything else is a failure.
    crds = {"ServiceMonitor", "PrometheusRule"}
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert all(any(kind in line for kind in crds) for line in warnings), warnings
    assert bool(warnings) == bool(crds & set(kinds(render(*SHAPES[shape]))))


@needs_validator
def test_validator_catches_an_unknown_field(tmp_path: Path) -> None:
    # Guard against a validator that silently accepts anything.
    docs = render()
    one(docs, "Deployment")["spec"]["replicaz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    proc = kubernetes_validate(bad)
    assert proc.returncode != 0
    assert "replicaz" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("replicaz=3", "replicaz"),  # unknown top-level key
        ("replicaCount=many", "replicaCount"),  # wrong type
        ("mode=daemonset", "mode"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("ports.admin=70000", "admin"),
        ("workers=0", "workers"),
        ("config.listen=0.0.0.0:1", "listen"),  # owned by the chart
        ("config.authlete.access_token=plaintext", "access_token"),  # never in the ConfigMap
        ("config.upstream_timeout=true", "upstream_timeout"),
        ("config.shutdown_timeout=soon", "shutdown_timeout"),
        ("metrics.serviceMonitor.interval=often", "interval"),
        ("metrics.grafanaDashboard.enabled=yes", "enabled"),
        ("metrics.grafanaDashboard.label=", "label"),
        ("metrics.prometheusRule.rules=x", "rules"),
    ],
)
def test_schema_rejects_bad_values(setting: str, message: str) -> None:
    proc = _helm("--set", setting)
    assert proc.returncode != 0
    assert "schema" in proc.stderr
    assert message in proc.stderr


def test_schema_rejects_a_wrong_type_from_a_values_file(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("service:\n  port: '80'\n", encoding="utf-8")
    proc = _helm("-f", str(values))
    assert proc.returncode != 0
    # helm 4: "at '/service/port': got string, want integer"; helm 3: "service.port: Invalid type"
    assert re.search(r"service[/.]port", proc.stderr), proc.stderr


# ------------------------------------------------------------------------------ what renders


def test_default_render_is_standalone_without_optional_parts() -> None:
    assert kinds(render()) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]


def test_full_render_has_every_optional_part() -> None:
    assert kinds(render(*FULL)) == [
        "ConfigMap",
        "ConfigMap",  # the Grafana dashboard
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Secret",
        "Service",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


def test_sidecar_render_is_only_the_config() -> None:
    assert kinds(render(*SIDECAR)) == ["ConfigMap"]
    assert kinds(render(*SIDECAR, "--set", "authlete.accessToken=tok")) == ["ConfigMap", "Secret"]
    # Even with the optional parts switched on, sidecar mode renders no workload objects
    # (the NetworkPolicy then needs the application pods' labels).
    # (Sidecars with shared state need the number of application pods.)
    sidecar_full = (*FULL, "--set", "mode=sidecar", "--set", "shared.expectedReplicas=4")
    # (The dashboard and the alert rules are no workload: they render in either mode.)
    off = ("metrics.grafanaDashboard.enabled=false", "metrics.prometheusRule.enabled=false")
    monitoring = ("--set", off[0], "--set", off[1])
    docs = render(*sidecar_full, *monitoring, "--set", "networkPolicy.podSelector.app=x")
    assert kinds(docs) == ["ConfigMap", "NetworkPolicy", "Secret"]
    docs = render(*sidecar_full, *monitoring, "--set", "networkPolicy.enabled=false")
    assert kinds(docs) == ["ConfigMap", "Secret"]
    docs = render(*sidecar_full, "--set", "networkPolicy.enabled=false")
    assert kinds(docs) == ["ConfigMap", "ConfigMap", "PrometheusRule", "Secret"]


@pytest.mark.parametrize("shape", SHAPES)
def test_everything_lands_in_the_release_namespace(shape: str) -> None:
    for doc in render(*SHAPES[shape]):
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_config_is_accepted_by_the_gateway(shape: str, tmp_path: Path) -> None:
    path = write_config(render(*SHAPES[shape]), tmp_path)
    proc = check_config(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{path}: OK")
    # The token comes only from the environment: without it the gateway refuses to start.
    proc = check_config(path, token=None)
    assert proc.returncode == 2
    assert "AUTHLETE_ACCESS_TOKEN" in proc.stderr


def test_config_keys_unknown_to_the_schema_reach_the_gateway(tmp_path: Path) -> None:
    # The schema only type-checks the keys it knows, so newer gateway settings need no chart
    # change; the gateway itself (check-config, or the pod at start) rejects real typos.
    docs = render("--set", "config.upstream_timout=5")
    assert gateway_config(docs)["upstream_timout"] == 5
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(docs), encoding="utf-8")
    proc = check_config(path)
    assert proc.returncode == 2
    assert "upstream_timout: unknown key" in proc.stderr


@pytest.mark.parametrize("shape", SHAPES)
def test_config_token_is_an_environment_reference(shape: str) -> None:
    docs = render(*SHAPES[shape], "--set", "authlete.accessToken=s3cr3t-token-value")
    assert gateway_config(docs)["authlete"]["access_token"] == "${AUTHLETE_ACCESS_TOKEN}"
    assert "s3cr3t-token-value" not in yaml.safe_dump(config_map(docs))


@pytest.mark.parametrize("shape", ["default", "full"])
def test_listeners_agree_with_container_ports_and_probes(shape: str) -> None:
    docs = render(*SHAPES[shape])
    config = gateway_config(docs)
    container = gateway_container(docs)
    assert port_of(config["listen"]) == named_port(container, "http")
    assert port_of(config["admin_listen"]) == named_port(container, "admin")
    # Not loopback: the kubelet probes and Prometheus scrapes the pod IP.
    for key in ("listen", "admin_listen"):
        assert config[key].rpartition(":")[0] in ("0.0.0.0", "[::]")
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_config_is_mounted_where_the_image_looks_for_it() -> None:
    docs = render()
    container = gateway_container(docs)
    assert container["args"] == ["run", "--config", "/etc/gateway/gateway.yaml"]
    assert container["volumeMounts"][0] == {
        "name": "gateway-config",
        "mountPath": "/etc/gateway",
        "readOnly": True,
    }
    volume = pod_spec(docs)["volumes"][0]
    assert volume == {"name": "gateway-config", "configMap": {"name": "ci-gateway"}}
    assert config_map(docs)["metadata"]["name"] == "ci-gateway"


def test_workers_flag() -> None:
    assert "--workers" not in gateway_container(render())["args"]
    assert gateway_container(render(*FULL))["args"][-2:] == ["--workers", "2"]


def test_checksum_annotation_follows_the_config() -> None:
    base = pod_annotations(render())["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert base == hashlib.sha256(gateway_yaml_body(render()).encode()).hexdigest()
    changed = pod_annotations(render("--set", "config.cache.ttl=30"))["checksum/config"]
    assert changed != base
    routes = pod_annotations(
        render("--set-json", 'config.routes=[{"path_prefix": "/", "upstream": "http://other:80"}]')
    )
    assert routes["checksum/config"] != base
    port = pod_annotations(render("--set", "ports.admin=9191"))["checksum/config"]
    assert port != base  # admin_listen is part of the config
    unrelated = pod_annotations(render("--set", "replicaCount=7"))["checksum/config"]
    assert unrelated == base


def gateway_yaml_body(docs: list[Doc]) -> str:
    """gateway.yaml without the chart's leading comment: what the checksum is taken of."""
    lines = gateway_yaml(docs).splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#")).rstrip("\n")


# ------------------------------------------------------------------------------ secret wiring


def test_default_token_comes_from_the_existing_secret() -> None:
    docs = render()
    assert "Secret" not in kinds(docs)
    ref = env_secret_ref(gateway_container(docs), "AUTHLETE_ACCESS_TOKEN")
    assert ref == {"name": "authlete-access-token", "key": "access-token"}
    assert "checksum/secret" not in pod_annotations(docs)


def test_existing_secret_name_and_key_are_configurable() -> None:
    docs = render(
        "--set", "authlete.existingSecret=prod-authlete", "--set", "authlete.existingSecretKey=tok"
    )
    assert "Secret" not in kinds(docs)
    ref = env_secret_ref(gateway_container(docs), "AUTHLETE_ACCESS_TOKEN")
    assert ref == {"name": "prod-authlete", "key": "tok"}


def test_chart_made_secret_is_wired_and_rolls_the_pods() -> None:
    docs = render("--set", "authlete.accessToken=chart-token-1")
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "ci-gateway-authlete"
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["access-token"]).decode() == "chart-token-1"
    ref = env_secret_ref(gateway_container(docs), "AUTHLETE_ACCESS_TOKEN")
    assert ref == {"name": "ci-gateway-authlete", "key": "access-token"}
    first = pod_annotations(docs)["checksum/secret"]
    second = pod_annotations(render("--set", "authlete.accessToken=chart-token-2"))
    assert second["checksum/secret"] != first
    assert "chart-token-1" not in yaml.safe_dump(one(docs, "Deployment"))


def test_a_token_source_is_required() -> None:
    proc = _helm("--set", "authlete.existingSecret=")
    assert proc.returncode != 0
    assert "authlete.existingSecret" in proc.stderr


def test_extra_env_is_passed_through() -> None:
    env = gateway_container(render(*FULL))["env"]
    assert [e["name"] for e in env] == [
        "AUTHLETE_ACCESS_TOKEN",
        "GATEWAY_REDIS_URL",
        "GATEWAY_SHARED_SECRET",
        "GATEWAY_ADMIN_TOKEN",
        "AUTHLETE_TIMEOUT",
        "AUTHLETE_SERVICE_ID",
    ]


# ------------------------------------------------------------------------------ pod hardening


@pytest.mark.parametrize("shape", ["default", "full"])
def test_security_context(shape: str) -> None:
    docs = render(*SHAPES[shape])
    pod = pod_spec(docs)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = gateway_container(docs)["securityContext"]
    assert container["runAsNonRoot"] is True
    assert container["runAsUser"] == 10001
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    # ${VAR} references read the environment: no injected <SERVICE>_PORT=tcp://... variables.
    assert pod_spec(docs)["enableServiceLinks"] is False


def test_resources_are_set() -> None:
    resources = gateway_container(render())["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


@pytest.mark.parametrize(("shape", "shutdown"), [("default", 10), ("full", 25)])
def test_grace_period_outlasts_the_gateway_drain(shape: str, shutdown: int) -> None:
    docs = render(*SHAPES[shape])
    assert gateway_config(docs)["shutdown_timeout"] == shutdown
    container = gateway_container(docs)
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace > shutdown + sleep


def test_grace_period_follows_shutdown_timeout_and_refuses_too_small_values() -> None:
    docs = render("--set-json", "config.shutdown_timeout=42.5", "--set", "preStopSleepSeconds=0")
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > 42.5
    assert "lifecycle" not in gateway_container(docs)
    proc = _helm("--set", "terminationGracePeriodSeconds=15")  # 10 s drain + 5 s preStop
    assert proc.returncode != 0
    assert "terminationGracePeriodSeconds" in proc.stderr


# ------------------------------------------------------------------------------ PDB / HPA


def test_pdb_only_when_enabled() -> None:
    pdb = one(render(), "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": pod_selector(render())},
    }
    assert "PodDisruptionBudget" not in kinds(render("--set", "podDisruptionBudget.enabled=false"))
    full = one(render(*FULL), "PodDisruptionBudget")["spec"]
    assert full["minAvailable"] == 2 and "maxUnavailable" not in full


def pod_selector(docs: list[Doc]) -> dict[str, str]:
    selector: dict[str, str] = gateway_deployment(docs)["spec"]["selector"]["matchLabels"]
    return selector


def test_hpa_only_when_enabled() -> None:
    docs = render()
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    full = render(*FULL)
    hpa = one(full, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one(full, "Deployment")["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    # The HPA owns the replica count.
    assert "replicas" not in one(full, "Deployment")["spec"]


# ------------------------------------------------------------------------------ services, metrics


def test_service_targets_the_proxy_port_only() -> None:
    docs = render()
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == pod_selector(docs)


def test_prometheus_scrape_annotations() -> None:
    annotations = pod_annotations(render())
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod_annotations(render(*FULL))["prometheus.io/port"] == "9901"
    off = pod_annotations(render("--set", "metrics.podAnnotations=false"))
    assert not any(key.startswith("prometheus.io/") for key in off)


def test_service_monitor_scrapes_the_admin_port() -> None:
    docs = render(*FULL)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # It selects exactly the metrics Service, whose `admin` port reaches the admin listener.
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [
        s
        for s in services
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["edge-gateway-metrics"]
    (port,) = selected[0]["spec"]["ports"]
    assert port["name"] == "admin" and port["targetPort"] == "admin" and port["port"] == 9901
    assert named_port(gateway_container(docs), "admin") == 9901
    assert selected[0]["spec"]["selector"] == pod_selector(docs)
    main = one(docs, "Service", "edge-gateway")
    assert [p["name"] for p in main["spec"]["ports"]] == ["http"]


# ------------------------------------------------------------------------------ sidecar recipe


def _sidecar_pod(chart_copy: Path, values: tuple[str, ...]) -> Doc:
    """Render the pod NOTES.txt prints in sidecar mode (the same helpers), as a real Pod."""
    shutil.copytree(CHART, chart_copy)
    (chart_copy / "templates" / "zz-sidecar-pod.yaml").write_text(
        """apiVersion: v1
kind: Pod
metadata:
  name: app-with-gateway
  namespace: {{ .Release.Namespace }}
spec:
  terminationGracePeriodSeconds: {{ include "gateway.terminationGracePeriodSeconds" . }}
  containers:
    - {{ include "gateway.container" . | nindent 6 | trim }}
    - name: app
      image: registry.example.com/orders:1.4
  volumes:
    - {{ include "gateway.volume" . | nindent 6 | trim }}
    - {{ include "gateway.tmpVolume" . | nindent 6 | trim }}
    {{- if and .Values.shared.enabled .Values.shared.tls.caSecret }}
    - {{ include "gateway.redisCaVolume" . | nindent 6 | trim }}
    {{- end }}
""",
        encoding="utf-8",
    )
    proc = _helm(*values, chart=chart_copy)
    assert proc.returncode == 0, proc.stderr
    return one([d for d in yaml.safe_load_all(proc.stdout) if d], "Pod")


def test_notes_print_the_sidecar_container_from_the_shared_helpers() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    assert 'include "gateway.container"' in notes
    assert 'include "gateway.volume"' in notes
    assert 'include "gateway.terminationGracePeriodSeconds"' in notes
    assert 'include "gateway.tmpVolume"' in notes
    assert 'include "gateway.redisCaVolume"' in notes


@needs_validator
def test_sidecar_pod_recipe_is_valid(tmp_path: Path) -> None:
    pod = _sidecar_pod(tmp_path / "chart", SIDECAR)
    rendered = tmp_path / "pod.yaml"
    rendered.write_text(yaml.safe_dump(pod), encoding="utf-8")
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gateway = pod["spec"]["containers"][0]
    # Port names prefixed so they cannot clash with the app's own.
    assert [p["name"] for p in gateway["ports"]] == ["gw-http", "gw-admin"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "gw-admin"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "gw-admin"}
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == "ci-gateway"
    config = gateway_config(render(*SIDECAR))
    assert {r["upstream"] for r in config["routes"]} == {"http://127.0.0.1:8000"}


def _readme_sidecar_block() -> Doc:
    text = (CHART / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Sidecar") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "README.md: no yaml block in the Sidecar section"
    block: Doc = yaml.safe_load(match.group(1))["spec"]
    return block


@needs_validator
def test_readme_sidecar_example_matches_the_chart(tmp_path: Path) -> None:
    block = _readme_sidecar_block()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "readme"}, "spec": block}
    rendered = tmp_path / "readme-pod.yaml"
    rendered.write_text(yaml.safe_dump(pod), encoding="utf-8")
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    chart_pod = _sidecar_pod(tmp_path / "chart", SIDECAR)
    ours, theirs = block["containers"][0], chart_pod["spec"]["containers"][0]
    for key in ("name", "image", "args", "ports", "env", "lifecycle", "resources"):
        assert ours[key] == theirs[key], key
    assert ours["securityContext"] == theirs["securityContext"]
    assert ours["volumeMounts"] == theirs["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert ours[probe]["httpGet"] == theirs[probe]["httpGet"]
    expected_grace = chart_pod["spec"]["terminationGracePeriodSeconds"]
    assert block["terminationGracePeriodSeconds"] == expected_grace
    assert block["volumes"][0]["configMap"]["name"] == "orders-gw-gateway"  # release "orders-gw"


def test_values_files_only_use_documented_top_level_keys() -> None:
    documented = set(yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8")))
    for path in (SIDECAR_VALUES, FULL_VALUES, REDIS_VALUES, SIDECAR_SHARED_VALUES, DECISION_VALUES):
        used = set(yaml.safe_load(path.read_text(encoding="utf-8")))
        assert used <= documented, (path.name, used - documented)


# ------------------------------------------------------------------------------ NetworkPolicy


def admitted_ports(rule: Doc) -> set[int] | None:
    """The ports an ingress rule admits (None: every port)."""
    if "ports" not in rule:
        return None
    return {int(p["port"]) for p in rule["ports"]}


def test_network_policy_is_off_by_default() -> None:
    for shape in (DEFAULT, SIDECAR):
        assert "NetworkPolicy" not in kinds(render(*shape))


def test_network_policy_admits_the_admin_port_only_from_the_scrapers() -> None:
    docs = render(*FULL)
    values = yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))["networkPolicy"]
    policy = one(docs, "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    # Exactly the Deployment's pods, ingress only (egress stays open: Authlete, upstreams).
    assert spec["podSelector"] == {"matchLabels": pod_selector(docs)}
    assert spec["policyTypes"] == ["Ingress"]
    container = gateway_container(docs)
    proxy, admin = named_port(container, "http"), named_port(container, "admin")
    rules = spec["ingress"]
    assert all(admitted_ports(rule) is not None for rule in rules), "a rule admits every port"
    to_proxy = [r for r in rules if proxy in (admitted_ports(r) or set())]
    to_admin = [r for r in rules if admin in (admitted_ports(r) or set())]
    assert [r["from"] for r in to_proxy] == [values["proxy"]["from"]]
    assert admitted_ports(to_proxy[0]) == {proxy}
    # The admin port: from admin.from, and from what extraIngress names; never from anywhere.
    assert [r["from"] for r in to_admin] == [
        values["admin"]["from"],
        values["extraIngress"][0]["from"],
    ]
    assert all(r["from"] for r in to_admin)
    assert {p for r in rules for p in admitted_ports(r) or set()} == {proxy, admin}


def test_network_policy_defaults_proxy_open_admin_closed() -> None:
    docs = render("--set", "networkPolicy.enabled=true")
    spec = one(docs, "NetworkPolicy")["spec"]
    assert spec["podSelector"] == {"matchLabels": pod_selector(docs)}
    # One rule: the proxy port from anywhere. Nothing admits the admin port (the kubelet's
    # probes come from the node, which NetworkPolicies do not block in most plugins).
    assert spec["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    assert named_port(gateway_container(docs), "http") == 8080


def test_network_policy_follows_the_ports() -> None:
    docs = render(
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "ports.proxy=8181",
        "--set",
        "ports.admin=9191",
        "--set-json",
        'networkPolicy.admin.from=[{"namespaceSelector": {}}]',
    )
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert [admitted_ports(r) for r in rules] == [{8181}, {9191}]
    assert rules[1]["from"] == [{"namespaceSelector": {}}]


def test_network_policy_in_sidecar_mode_selects_the_application_pods(tmp_path: Path) -> None:
    proc = _helm(*SIDECAR, "--set", "networkPolicy.enabled=true")
    assert proc.returncode != 0
    assert "networkPolicy.podSelector" in proc.stderr
    docs = render(
        *SIDECAR_POLICY,
        "--set-json",
        'networkPolicy.admin.from=[{"podSelector": {"matchLabels": {"app": "prometheus"}}}]',
    )
    spec = one(docs, "NetworkPolicy")["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app": "orders"}}
    # The ports the pasted gateway container listens on; the app's own port gets no rule.
    gateway = _sidecar_pod(tmp_path / "chart", SIDECAR)["spec"]["containers"][0]
    ports = [admitted_ports(r) for r in spec["ingress"]]
    assert ports == [{named_port(gateway, "gw-http")}, {named_port(gateway, "gw-admin")}]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("networkPolicy.enabled=yes", "enabled"),
        ("networkPolicy.admin.from[0].namespaceSelectr.a=b", "namespaceSelectr"),
        ("networkPolicy.proxy.to=x", "to"),
        ("networkPolicy.podSelector.app.x=y", "podSelector"),
    ],
)
def test_schema_rejects_bad_network_policy_values(setting: str, message: str) -> None:
    proc = _helm("--set", setting)
    assert proc.returncode != 0
    assert "schema" in proc.stderr
    assert message in proc.stderr


def test_body_spill_directory_is_a_bounded_writable_volume() -> None:
    """The root filesystem is read-only: request bodies buffered on disk need /tmp."""
    docs = render()
    mounts = {m["mountPath"]: m["name"] for m in gateway_container(docs)["volumeMounts"]}
    assert mounts.get("/tmp") == "gateway-tmp"
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["gateway-tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
    resized = render("--set", "tmpVolume.sizeLimit=256Mi")
    volumes = {v["name"]: v for v in pod_spec(resized)["volumes"]}
    assert volumes["gateway-tmp"]["emptyDir"] == {"sizeLimit": "256Mi"}


# ------------------------------------------------------------------------------ shared state

SHARED_BY_URL: tuple[str, ...] = (
    "--set",
    "shared.enabled=true",
    "--set",
    "shared.redisUrl=rediss://:url-p4ssw0rd@redis.example:6380/2",
    "--set",
    "shared.secret.value=hmac-value-0123456789abcdef0123456789",
)
SHARED_BY_REF: tuple[str, ...] = (
    "--set",
    "shared.enabled=true",
    "--set",
    "shared.existingSecret=prod-redis",
    "--set",
    "shared.redisUrlKey=url",
    "--set",
    "shared.secret.existingSecret=prod-hmac",
    "--set",
    "shared.secret.key=hmac",
    "--set",
    "admin.existingSecret=prod-admin",
    "--set",
    "admin.existingSecretKey=purge",
)
SHARED_SHAPES = {
    "by-url": SHARED_BY_URL,
    "by-ref": SHARED_BY_REF,
    "full": FULL,
    "redis": REDIS,
    "sidecar-shared": SIDECAR_SHARED,
}
ALL_SHAPES: dict[str, tuple[str, ...]] = {**SHAPES, **SHARED_SHAPES}


def chart_secrets(docs: list[Doc]) -> dict[str, dict[str, str]]:
    """The Secrets the chart renders: name -> decoded data."""
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for d in docs
        if d["kind"] == "Secret"
    }


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container["env"]}


_K8S_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args (unknown: left as is)."""

    def one_ref(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _K8S_REF.sub(one_ref, text)


def resolve_env(container: Doc, docs: list[Doc], outside: dict[str, str]) -> dict[str, str]:
    """The environment the container gets: values expanded in order, secretKeyRefs read
    from the chart's own Secrets, or from `outside` (Secrets of the user's) by variable."""
    secrets = chart_secrets(docs)
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = k8s_expand(str(entry["value"]), env)
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:
            env[name] = secrets[ref["name"]][ref["key"]]
        else:
            env[name] = outside[name]
    return env


def test_shared_is_off_by_default() -> None:
    for shape in (DEFAULT, SIDECAR, SIDECAR_POLICY):
        docs = render(*shape)
        config = gateway_config(docs)
        assert "shared" not in config and "admin" not in config
        assert not any(
            d["metadata"]["name"].endswith(("-redis", "-shared", "-admin")) for d in docs
        )
    container = gateway_container(render())
    assert [e["name"] for e in container["env"]] == ["AUTHLETE_ACCESS_TOKEN"]
    assert "checksum/shared" not in pod_annotations(render())


@pytest.mark.parametrize("shape", SHARED_SHAPES)
def test_shared_config_reads_its_secrets_from_the_environment(shape: str) -> None:
    args = SHARED_SHAPES[shape]
    docs = render(*args)
    config = gateway_config(docs)
    assert config["shared"]["redis_url"] == "${GATEWAY_REDIS_URL}"
    assert config["shared"]["secret"] == "${GATEWAY_SHARED_SECRET}"
    if shape == "by-url":
        assert "admin" not in config
    else:
        assert config["admin"] == {"token": "${GATEWAY_ADMIN_TOKEN}"}
    # Every variable the config references is in the gateway container's environment (the
    # Deployment's, or in sidecar mode the container NOTES.txt prints).
    sidecar = "sidecar" in shape
    env = _notes_container_env(args) if sidecar else env_of(gateway_container(docs))
    # (references with a default, ${VAR:-x}, may stay unset)
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", gateway_yaml(docs)))
    assert {"GATEWAY_REDIS_URL", "GATEWAY_SHARED_SECRET"} <= referenced
    assert referenced <= set(env), referenced - set(env)


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_no_secret_value_reaches_a_config_map_or_a_pod_spec(shape: str) -> None:
    args = ALL_SHAPES[shape]
    docs = render(*args, "--set", "authlete.accessToken=authlete-token-value-xyz")
    secrets = chart_secrets(docs)
    values = [v for data in secrets.values() for v in data.values()]
    assert "authlete-token-value-xyz" in values
    public = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for value in values:
        assert value not in public
    # Also the plain-text values given to the chart (parts of them, e.g. a URL's password).
    for given in ("url-p4ssw0rd", "hmac-value-0123", "ci-dummy-shared-secret", "ci-dummy-admin"):
        assert given not in public


def test_shared_by_url_value_goes_through_the_chart_secret() -> None:
    docs = render(*SHARED_BY_URL)
    data = chart_secrets(docs)["ci-gateway-shared"]
    assert data == {
        "redis-url": "rediss://:url-p4ssw0rd@redis.example:6380/2",
        "shared-secret": "hmac-value-0123456789abcdef0123456789",
    }
    env = env_of(gateway_container(docs))
    assert env_secret_ref(gateway_container(docs), "GATEWAY_REDIS_URL") == {
        "name": "ci-gateway-shared",
        "key": "redis-url",
    }
    assert env["GATEWAY_SHARED_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "ci-gateway-shared",
        "key": "shared-secret",
    }
    assert "GATEWAY_ADMIN_TOKEN" not in env and "admin" not in gateway_config(docs)
    # A plain value that changes rolls the pods (the config itself does not change).
    first = pod_annotations(docs)
    changed = render(*SHARED_BY_URL, "--set", "shared.redisUrl=redis://other:6379/0")
    assert pod_annotations(changed)["checksum/shared"] != first["checksum/shared"]
    assert pod_annotations(changed)["checksum/config"] == first["checksum/config"]


def test_shared_by_secret_reference_makes_no_secret() -> None:
    docs = render(*SHARED_BY_REF)
    assert "Secret" not in kinds(docs)
    container = gateway_container(docs)
    assert [e["name"] for e in container["env"]] == [
        "AUTHLETE_ACCESS_TOKEN",
        "GATEWAY_REDIS_URL",
        "GATEWAY_SHARED_SECRET",
        "GATEWAY_ADMIN_TOKEN",
    ]
    assert env_secret_ref(container, "GATEWAY_REDIS_URL") == {"name": "prod-redis", "key": "url"}
    assert env_secret_ref(container, "GATEWAY_SHARED_SECRET") == {
        "name": "prod-hmac",
        "key": "hmac",
    }
    assert env_secret_ref(container, "GATEWAY_ADMIN_TOKEN") == {
        "name": "prod-admin",
        "key": "purge",
    }
    assert "checksum/shared" not in pod_annotations(docs)
    shared = gateway_config(docs)["shared"]
    assert shared == {
        "redis_url": "${GATEWAY_REDIS_URL}",
        "secret": "${GATEWAY_SHARED_SECRET}",
        "key_prefix": "gateway",
        "local_ttl": 5,
        "timeout": 0.25,
        "expected_replicas": 2,
    }


def test_without_a_key_the_chart_generates_one() -> None:
    docs = render("--set", "shared.enabled=true", "--set", "shared.existingSecret=prod-redis")
    data = chart_secrets(docs)["ci-gateway-shared"]
    assert list(data) == ["shared-secret"]  # the URL is the user's
    assert re.fullmatch(r"[A-Za-z0-9]{48}", data["shared-secret"])  # >= 32 bytes, random
    assert env_secret_ref(gateway_container(docs), "GATEWAY_SHARED_SECRET") == {
        "name": "ci-gateway-shared",
        "key": "shared-secret",
    }
    # Generated values are not in the checksum: it would change on every render.
    assert "checksum/shared" not in pod_annotations(docs)


def test_shared_tuning_values_reach_the_config() -> None:
    docs = render(
        *SHARED_BY_REF,
        "--set",
        "shared.keyPrefix=orders-gw",
        "--set-json",
        "shared.localTtl=2.5",
        "--set-json",
        "shared.timeout=0.1",
        "--set-json",
        "shared.expectedReplicas=7",
        "--set-json",
        "shared.fallbackRate=12.5",
    )
    shared = gateway_config(docs)["shared"]
    assert (shared["key_prefix"], shared["local_ttl"], shared["timeout"]) == ("orders-gw", 2.5, 0.1)
    assert (shared["expected_replicas"], shared["fallback_rate"]) == (7, 12.5)


def test_expected_replicas_default_to_the_most_pods_there_can_be() -> None:
    def expected(*args: str) -> int:
        value: int = gateway_config(render(*SHARED_BY_REF, *args))["shared"]["expected_replicas"]
        return value

    assert expected() == 2  # replicaCount
    assert expected("--set", "replicaCount=5") == 5
    assert expected("--set", "replicaCount=0") == 1
    # With the autoscaler: its maximum, so the fleet's fallback never exceeds the rate.
    assert expected("--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=9") == 9
    assert gateway_config(render(*FULL))["shared"]["expected_replicas"] == 12
    # Sidecar: the chart cannot know the application's pods.
    proc = _helm(*SIDECAR, *SHARED_BY_REF)
    assert proc.returncode != 0
    assert "shared.expectedReplicas" in proc.stderr
    assert gateway_config(render(*SIDECAR_SHARED))["shared"]["expected_replicas"] == 6


def test_redis_ca_is_mounted_where_the_config_looks_for_it() -> None:
    docs = render(*FULL)
    ca_file = gateway_config(docs)["shared"]["tls"]["ca_file"]
    mounts = {m["name"]: m for m in gateway_container(docs)["volumeMounts"]}
    assert mounts["gateway-redis-ca"] == {
        "name": "gateway-redis-ca",
        "mountPath": str(Path(ca_file).parent),
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["gateway-redis-ca"]["secret"] == {
        "secretName": "edge-redis-ca",
        "items": [{"key": "ca.pem", "path": Path(ca_file).name}],
    }
    # Not below the ConfigMap's read-only mount.
    assert not ca_file.startswith("/etc/gateway/")
    assert "gateway-redis-ca" not in {
        v["name"] for v in pod_spec(render(*SHARED_BY_REF))["volumes"]
    }


@needs_validator
def test_sidecar_recipe_with_shared_state_is_valid(tmp_path: Path) -> None:
    values = (*SIDECAR_SHARED, "--set", "shared.tls.caSecret=redis-ca")
    values = (*values, "--set", "redis.enabled=false", "--set", "shared.existingSecret=r")
    pod = _sidecar_pod(tmp_path / "chart", values)
    rendered = tmp_path / "pod.yaml"
    rendered.write_text(yaml.safe_dump(pod), encoding="utf-8")
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gateway = pod["spec"]["containers"][0]
    mounted = {m["name"] for m in gateway["volumeMounts"]}
    assert mounted <= {v["name"] for v in pod["spec"]["volumes"]}
    assert "gateway-redis-ca" in mounted
    assert list(env_of(gateway)) == [
        "AUTHLETE_ACCESS_TOKEN",
        "GATEWAY_REDIS_URL",
        "GATEWAY_SHARED_SECRET",
        "GATEWAY_ADMIN_TOKEN",
    ]


# ------------------------------------------------------------------------------ admin token


def test_admin_token_wiring() -> None:
    docs = render("--set", "admin.token=given-admin-token-0123456789")
    assert chart_secrets(docs)["ci-gateway-admin"] == {
        "admin-token": "given-admin-token-0123456789"
    }
    assert env_secret_ref(gateway_container(docs), "GATEWAY_ADMIN_TOKEN") == {
        "name": "ci-gateway-admin",
        "key": "admin-token",
    }
    assert gateway_config(docs)["admin"] == {"token": "${GATEWAY_ADMIN_TOKEN}"}
    assert "shared" not in gateway_config(docs)  # a purge without shared state: one pod
    assert "given-admin-token" not in yaml.safe_dump(config_map(docs))
    generated = chart_secrets(render("--set", "admin.generateToken=true"))["ci-gateway-admin"]
    assert re.fullmatch(r"[A-Za-z0-9]{40}", generated["admin-token"])


def test_admin_service_reaches_the_admin_port_of_the_gateway_pods() -> None:
    assert "ci-gateway-admin" not in [d["metadata"]["name"] for d in render()]
    docs = render("--set", "admin.generateToken=true", "--set", "ports.admin=9191")
    service = one(docs, "Service", "ci-gateway-admin")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == pod_selector(docs)
    assert service["spec"]["ports"] == [
        {"name": "admin", "port": 9191, "targetPort": "admin", "protocol": "TCP"}
    ]
    assert named_port(gateway_container(docs), "admin") == 9191
    # Not what the ServiceMonitor scrapes, and not in sidecar mode (no gateway pods here).
    full = render(*FULL)
    monitor = one(full, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    admin = one(full, "Service", "edge-gateway-admin")
    assert not monitor.items() <= admin["metadata"]["labels"].items()
    assert "Service" not in kinds(render(*SIDECAR, "--set", "admin.generateToken=true"))


# ------------------------------------------------------------------------------ trial Redis


def redis_container(docs: list[Doc]) -> Doc:
    (container,) = redis_deployment(docs)["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_trial_redis_objects() -> None:
    docs = render(*REDIS)
    deployment = redis_deployment(docs)
    assert deployment["metadata"]["name"] == "ci-gateway-redis"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The gateway's Deployment, Services, PDB and policy never select the Redis pod.
    gateway_selector = pod_selector(docs)
    assert not gateway_selector.items() <= labels.items()
    for doc in docs:
        if doc["kind"] == "Service" and not is_redis(doc):
            assert not doc["spec"]["selector"].items() <= labels.items()
    service = one(docs, "Service", "ci-gateway-redis")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [
        {"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}
    ]
    container = redis_container(docs)
    assert container["image"] == "docker.io/library/redis:7.4-alpine"
    assert container["ports"] == [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}]
    args = container["args"]
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--maxmemory") + 1] == "400mb"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    for probe in ("livenessProbe", "readinessProbe"):
        assert "redis-cli -p 6379 ping" in " ".join(container[probe]["exec"]["command"])
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == "data" and "emptyDir" in volume
    assert pod["metadata"]["annotations"] == {"example.com/team": "platform"}


def test_trial_redis_url_and_password_agree() -> None:
    docs = render(*REDIS)
    gateway = env_of(gateway_container(docs))
    password_ref = gateway["GATEWAY_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password_ref == {"name": "ci-gateway-shared", "key": "redis-password"}
    assert env_of(redis_container(docs))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == (
        password_ref
    )
    assert gateway["GATEWAY_REDIS_URL"]["value"] == (
        "redis://:$(GATEWAY_REDIS_PASSWORD)@ci-gateway-redis.ci-ns.svc:6379/0"
    )
    # $(VAR) only expands variables defined before it.
    names = list(gateway)
    assert names.index("GATEWAY_REDIS_PASSWORD") < names.index("GATEWAY_REDIS_URL")
    assert re.fullmatch(
        r"[A-Za-z0-9]{32}", chart_secrets(docs)["ci-gateway-shared"]["redis-password"]
    )
    # A password of the user's, from a value or a Secret.
    given = render(*REDIS, "--set", "redis.auth.password=trial-pass.1")
    assert chart_secrets(given)["ci-gateway-shared"]["redis-password"] == "trial-pass.1"
    assert (
        "checksum/password"
        in redis_deployment(given)["spec"]["template"]["metadata"]["annotations"]
    )
    assert "checksum/shared" in pod_annotations(given)
    own = render(*REDIS, "--set", "redis.auth.existingSecret=my-redis")
    assert "redis-password" not in chart_secrets(own)["ci-gateway-shared"]
    ref = {"name": "my-redis", "key": "redis-password"}
    assert env_secret_ref(gateway_container(own), "GATEWAY_REDIS_PASSWORD") == ref
    assert env_of(redis_container(own))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref


def test_trial_redis_without_password() -> None:
    docs = render(*SIDECAR_SHARED)
    assert kinds(docs) == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "NetworkPolicy",
        "Secret",
        "Secret",
        "Service",
    ]
    container = redis_container(docs)
    assert "--requirepass" not in container["args"] and "env" not in container
    assert container["args"][container["args"].index("--protected-mode") + 1] == "no"
    assert "redis-password" not in chart_secrets(docs)["ci-gateway-shared"]
    pod = _notes_container_env(SIDECAR_SHARED)
    assert pod["GATEWAY_REDIS_URL"] == {
        "name": "GATEWAY_REDIS_URL",
        "value": "redis://ci-gateway-redis.ci-ns.svc:6379/0",
    }


def _notes_container_env(args: tuple[str, ...]) -> dict[str, Doc]:
    """The gateway container's env as NOTES.txt prints it for sidecar use."""
    assert HELM is not None
    proc = subprocess.run(
        [HELM, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
         *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout[proc.stdout.index("NOTES:") :]
    block = notes[notes.index("spec:") : notes.index("Point your Service")]
    spec: Doc = yaml.safe_load(block)["spec"]
    return env_of(spec["containers"][0])


@pytest.mark.parametrize(
    ("shape", "gateway_pods"), [("redis", None), ("sidecar-shared", {"app": "orders"})]
)
def test_only_the_gateway_pods_reach_the_trial_redis(
    shape: str, gateway_pods: dict[str, str] | None
) -> None:
    docs = render(*SHAPES[shape])
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    redis_policy = policies.pop("ci-gateway-redis")
    (gateway_policy,) = policies.values()
    pod_labels = redis_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert redis_policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert redis_policy["policyTypes"] == ["Ingress"]
    expected_pods = gateway_pods or pod_selector(docs)
    assert redis_policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": expected_pods}}],
            "ports": [{"port": 6379, "protocol": "TCP"}],
        }
    ]
    # The gateway's own policy selects the same pods and restricts ingress only: their
    # egress to Redis (and Authlete, upstreams) stays open.
    assert gateway_policy["podSelector"] == {"matchLabels": expected_pods}
    assert gateway_policy["policyTypes"] == ["Ingress"]
    assert "NetworkPolicy" in kinds(docs)
    off = render(*SHAPES[shape], "--set", "networkPolicy.enabled=false")
    assert "NetworkPolicy" not in kinds(off)


@contextlib.contextmanager
def chart_redis(docs: list[Doc], tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A real redis-server run with the trial Redis container's args and environment, on
    loopback (a free port instead of 6379, `tmp_path` instead of /data): (port, its env)."""
    server_bin = need_tool("redis-server")
    container = redis_container(docs)
    env = resolve_env(container, docs, {})
    args = [k8s_expand(a, env) for a in container["args"]]
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    proc = subprocess.Popen(
        [server_bin, *args, "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield port, env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway_env_for(docs: list[Doc], port: int) -> dict[str, str]:
    """The gateway container's environment, its Redis URL pointed at the local server."""
    env = resolve_env(gateway_container(docs), docs, {"AUTHLETE_ACCESS_TOKEN": "t"})
    url = env["GATEWAY_REDIS_URL"]
    assert url == f"redis://:{env['GATEWAY_REDIS_PASSWORD']}@ci-gateway-redis.ci-ns.svc:6379/0"
    env["GATEWAY_REDIS_URL"] = url.replace("ci-gateway-redis.ci-ns.svc:6379", f"127.0.0.1:{port}")
    return env


def test_trial_redis_runs_and_the_gateway_url_reaches_it(tmp_path: Path) -> None:
    """Run the trial Redis as its Deployment says, probe it as the kubelet would, connect
    with the URL the gateway's environment resolves to, and check the gateway accepts its
    config with that environment."""
    need_tool("redis-cli")
    docs = render(*REDIS)
    container = redis_container(docs)
    with chart_redis(docs, tmp_path) as (port, env):
        assert env["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]
        probe = [
            part.replace("6379", str(port))
            for part in container["readinessProbe"]["exec"]["command"]
        ]
        run = subprocess.run(probe, env={**os.environ, **env}, timeout=10, check=False)
        assert run.returncode == 0
        no_auth = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
        assert subprocess.run(probe, env=no_auth, timeout=10, check=False).returncode != 0

        gateway_env = gateway_env_for(docs, port)
        assert gateway_env["GATEWAY_REDIS_PASSWORD"] == env["REDIS_PASSWORD"]
        client = redis.Redis.from_url(gateway_env["GATEWAY_REDIS_URL"], socket_timeout=5)
        try:
            assert client.ping() is True
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        finally:
            client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=5).ping()

        path = write_config(docs, tmp_path)
        names = ("GATEWAY_REDIS_URL", "GATEWAY_SHARED_SECRET", "GATEWAY_ADMIN_TOKEN")
        check = check_config(path, extra_env={k: gateway_env[k] for k in names})
        assert check.returncode == 0, check.stdout + check.stderr


async def test_a_gateway_with_the_rendered_config_runs_in_shared_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway run` with the ConfigMap's gateway.yaml and the Deployment's environment
    reaches the trial Redis: ready, and in shared mode."""
    docs = render(*REDIS)
    with chart_redis(docs, tmp_path) as (port, _):
        for name, value in gateway_env_for(docs, port).items():
            monkeypatch.setenv(name, value)
        cfg = gateway_config(docs)
        # No Authlete call is made here; keep it off the network anyway.
        cfg["authlete"] = {**cfg["authlete"], "base_url": "http://127.0.0.1:9"}
        cfg["authlete"]["allow_insecure_http"] = True
        run_dir = tmp_path / "gateway"
        run_dir.mkdir()
        async with gateway_run(run_dir, cfg) as gw, aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 10
            while True:
                async with session.get(f"{gw.admin_url}/metrics") as resp:
                    text = await resp.text()
                if 'gateway_shared_mode{mode="shared"} 1.0' in text:
                    break
                assert time.monotonic() < deadline, text + gw.stderr()
                await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "redis.enabled=true"), "shared.enabled"),
        (("--set", "shared.enabled=true"), "say where Redis is"),
        ((*SHARED_BY_URL, "--set", "shared.existingSecret=x"), "only one of"),
        ((*SHARED_BY_URL, "--set", "redis.enabled=true"), "only one of"),
        ((*REDIS, "--set", "shared.tls.caSecret=ca"), "does not speak TLS"),
        (
            (*SHARED_BY_URL, "--set", "shared.redisUrl=redis://r:6379/0", "--set",
             "shared.tls.caSecret=ca"),
            "rediss://",
        ),
        ((*SHARED_BY_URL, "--set", "shared.secret.existingSecret=x"), "not both"),
        (("--set", "admin.generateToken=true", "--set", "admin.existingSecret=x"), "only one of"),
        ((*REDIS, "--set", "redis.auth.existingSecret=x", "--set", "redis.auth.password=y"),
         "not both"),
        ((*SIDECAR, *SHARED_BY_URL), "shared.expectedReplicas"),
    ],
)  # fmt: skip
def test_render_refuses_contradictory_shared_values(args: tuple[str, ...], message: str) -> None:
    proc = _helm(*args)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("shared.enabled=yes", "enabled"),
        ("shared.redisUrl=http://redis:6379", "redisUrl"),
        ("shared.secret.value=too-short", "value"),
        ("shared.expectedReplicas=0", "expectedReplicas"),
        ("shared.localTtl=0", "localTtl"),
        ("shared.tls.caFile=/x", "caFile"),
        ("shared.keyPrefix=with space", "keyPrefix"),
        ("admin.token=short", "token"),
        ("admin.generateToken=yes", "generateToken"),
        ("redis.auth.password=p@ss", "password"),
        ("redis.maxmemory=lots", "maxmemory"),
        ("redis.persistence=true", "persistence"),
        ("config.shared.redis_url=redis://r:6379", "shared"),
        ("config.admin.token=plaintext-admin-token", "admin"),
    ],
)
def test_schema_rejects_bad_shared_values(setting: str, message: str) -> None:
    proc = _helm("--set", setting)
    assert proc.returncode != 0
    assert "schema" in proc.stderr
    assert message in proc.stderr


# ------------------------------------------------------------------------------ decision mode


def test_decision_mode_is_off_by_default() -> None:
    for shape in (DEFAULT, SIDECAR, FULL):
        assert "decision" not in gateway_config(render(*shape))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["decision"] == {"enabled": False, "path": "/_gateway/auth"}


def test_decision_config_is_written_by_the_chart() -> None:
    docs = render(*DECISION)
    config = gateway_config(docs)
    assert config["decision"] == {"path": "/_gateway/auth"}
    assert "decision_listen" not in config
    assert config["trusted_proxies"] == ["10.244.0.0/16"]
    # Routes without an upstream answer decisions only; one with an upstream stays proxied.
    upstreams = {r["name"]: r.get("upstream") for r in config["routes"]}
    assert upstreams == {
        "public": None,
        "orders-write": None,
        "orders": None,
        "legacy": "http://legacy.shop.svc.cluster.local:8080",
    }
    # Decisions are answered on the proxy port: the Service and container ports are unchanged.
    service = one(docs, "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in gateway_container(docs)["ports"]] == ["http", "admin"]
    # The path is configurable; the config follows it (and rolls the pods).
    moved = render(*DECISION, "--set", "decision.path=/auth/check")
    assert gateway_config(moved)["decision"] == {"path": "/auth/check"}
    base = pod_annotations(docs)["checksum/config"]
    assert pod_annotations(moved)["checksum/config"] != base


def test_decision_network_policy_admits_only_the_ingress_controller() -> None:
    docs = render(*DECISION)
    spec = one(docs, "NetworkPolicy")["spec"]
    proxy = named_port(gateway_container(docs), "http")
    (rule,) = [r for r in spec["ingress"] if proxy in (admitted_ports(r) or set())]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]


def _notes(release: str, namespace: str, *args: str) -> str:
    assert HELM is not None
    proc = subprocess.run(
        [HELM, "install", release, str(CHART), "--dry-run=client", "--namespace", namespace,
         *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout[proc.stdout.index("NOTES:") :]


def test_decision_notes_print_the_ingress_lines() -> None:
    notes = _notes("edge", "gateway", *DECISION, "--set", "service.port=8080")
    url = "http://edge-gateway.gateway.svc.cluster.local:8080/_gateway/auth"
    assert f'nginx.ingress.kubernetes.io/auth-url: "{url}"' in notes
    assert (
        'nginx.ingress.kubernetes.io/auth-response-headers: "X-Auth-Subject,X-Auth-Scopes,'
        'X-Auth-Client-Id"' in notes
    )
    assert f"forwardAuth.address: {url}" in notes
    assert "10.244.0.0/16" in notes
    # Renamed identity headers are the ones the ingress must copy.
    renamed = _notes("edge", "gateway", *DECISION, "--set", "config.headers.subject=X-User")
    assert '"X-User,X-Auth-Scopes,X-Auth-Client-Id"' in renamed
    # Nothing about it without decision mode.
    assert "Decision mode" not in _notes(RELEASE, NAMESPACE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Without trusted proxies every decision would be refused (403), or a range clients
        # connect from gets listed in a hurry: the render says what to list.
        (("--set", "decision.enabled=true"), "config.trusted_proxies"),
        (("--set", "decision.enabled=true", "--set-json", "config.trusted_proxies=[]"),
         "config.trusted_proxies"),
        ((*SIDECAR, "--set", "decision.enabled=true", "--set-json",
          'config.trusted_proxies=["127.0.0.1/32"]'), "not in sidecar mode"),
        # A route without an upstream needs decision mode.
        (("--set-json", 'config.routes=[{"name": "orders", "path_prefix": "/orders"}]'),
         "config.routes[0] (orders): upstream is required"),
        ((*DECISION, "--set", "decision.enabled=false"), "config.routes[0] (public): upstream"),
    ],
)  # fmt: skip
def test_render_refuses_incomplete_decision_values(args: tuple[str, ...], message: str) -> None:
    proc = _helm(*args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("decision.enabled=yes", "enabled"),
        ("decision.path=/", "path"),
        ("decision.path=_gateway/auth", "path"),
        ("decision.listen=0.0.0.0:8081", "listen"),
        ("config.decision.path=/x", "decision"),
        ("config.decision_listen=0.0.0.0:8081", "decision_listen"),
        ("config.trusted_proxies=10.0.0.0/8", "trusted_proxies"),
    ],
)
def test_schema_rejects_bad_decision_values(setting: str, message: str) -> None:
    proc = _helm("--set", setting)
    assert proc.returncode != 0
    assert "schema" in proc.stderr
    assert message in proc.stderr


async def test_a_gateway_with_the_rendered_decision_config_answers_decisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway run` with the ConfigMap's gateway.yaml in decision mode answers an ingress's
    questions at decision.path; a peer outside trusted_proxies (this test on loopback, with
    the chart's 10.244.0.0/16) gets 403 whatever it asks."""
    cfg = gateway_config(render(*DECISION))
    monkeypatch.setenv("AUTHLETE_ACCESS_TOKEN", "t")
    # No Authlete call is made here; keep it off the network anyway.
    cfg["authlete"] = {**cfg["authlete"], "base_url": "http://127.0.0.1:9"}
    cfg["authlete"]["allow_insecure_http"] = True
    # The Traefik / Caddy dialect: the original request in X-Forwarded-*.
    public = {
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": "/public/logo.png",
        "X-Forwarded-Host": "api.example.com",
        "X-Forwarded-Proto": "https",
    }
    orders = {**public, "X-Forwarded-Uri": "/orders/42"}
    cases = [("chart", cfg["trusted_proxies"], 403, 403), ("loopback", ["127.0.0.1/32"], 200, 401)]
    for name, trusted, public_status, orders_status in cases:
        run_dir = tmp_path / name
        run_dir.mkdir()
        async with (
            gateway_run(run_dir, {**cfg, "trusted_proxies": trusted}) as gw,
            aiohttp.ClientSession() as session,
        ):
            url = f"http://127.0.0.1:{gw.port}/_gateway/auth"
            async with session.get(url, headers=public) as resp:
                assert resp.status == public_status, await resp.text()
                assert "X-Auth-Subject" not in resp.headers  # auth: none: no identity
            async with session.get(url, headers=orders) as resp:
                assert resp.status == orders_status, await resp.text()
                if resp.status == 401:
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
