"""The Helm chart in helm/gateway, checked offline.

Renders the chart with its default values, with values-sidecar.yaml and with
ci/full-values.yaml (every optional part on), validates every manifest with
`kubernetes-validate --strict` against the Kubernetes 1.30 schemas, checks the rendered
gateway.yaml with `gateway check-config`, and asserts the properties that matter in a cluster.

Needs `helm` and `kubernetes-validate`: found through env HELM / KUBERNETES_VALIDATE, then the
tools cache that scripts/get-helm.sh and scripts/check-chart.sh fill ($GATEWAY_TOOLS, default
/var/tmp/gateway-tools), then PATH. Tests are skipped (with the reason) when they are missing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "gateway"
SIDECAR_VALUES = CHART / "values-sidecar.yaml"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
TOOLS = Path(os.environ.get("GATEWAY_TOOLS", "/var/tmp/gateway-tools"))
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
SHAPES = {"default": DEFAULT, "sidecar": SIDECAR, "full": FULL, "sidecar-policy": SIDECAR_POLICY}

Doc = dict[str, Any]


def _find(env: str, name: str, cached: Path) -> str | None:
    explicit = os.environ.get(env)
    if explicit:
        return explicit
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


HELM = _find("HELM", "helm", TOOLS / "bin" / "helm")
KUBERNETES_VALIDATE = _find(
    "KUBERNETES_VALIDATE", "kubernetes-validate", TOOLS / "venv" / "bin" / "kubernetes-validate"
)

needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="helm not found (env HELM, $GATEWAY_TOOLS/bin/helm or PATH; scripts/get-helm.sh)",
)
needs_validator = pytest.mark.skipif(
    KUBERNETES_VALIDATE is None,
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


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def gateway_container(docs: list[Doc]) -> Doc:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    container: Doc = containers[0]
    return container


def pod_annotations(docs: list[Doc]) -> dict[str, str]:
    annotations: dict[str, str] = one(docs, "Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    return annotations


def gateway_yaml(docs: list[Doc]) -> str:
    text: str = one(docs, "ConfigMap")["data"]["gateway.yaml"]
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


def check_config(
    path: Path, token: str | None = "dummy-authlete-token"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHLETE_", "GATEWAY_"))}
    if token is not None:
        env["AUTHLETE_ACCESS_TOKEN"] = token
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
    # Only the CRD kind may go unvalidated (a warning); anything else is a failure.
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert all("ServiceMonitor" in line for line in warnings), warnings
    assert bool(warnings) == ("ServiceMonitor" in kinds(render(*SHAPES[shape])))


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
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
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
    docs = render(*FULL, "--set", "mode=sidecar", "--set", "networkPolicy.podSelector.app=x")
    assert kinds(docs) == ["ConfigMap", "NetworkPolicy", "Secret"]
    assert kinds(
        render(*FULL, "--set", "mode=sidecar", "--set", "networkPolicy.enabled=false")
    ) == [
        "ConfigMap",
        "Secret",
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_everything_lands_in_the_release_namespace(shape: str) -> None:
    for doc in render(*SHAPES[shape]):
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_config_is_accepted_by_the_gateway(shape: str, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(render(*SHAPES[shape])), encoding="utf-8")
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
    assert "s3cr3t-token-value" not in yaml.safe_dump(one(docs, "ConfigMap"))


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
    assert one(docs, "ConfigMap")["metadata"]["name"] == "ci-gateway"


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
    selector: dict[str, str] = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
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
    for path in (SIDECAR_VALUES, FULL_VALUES):
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
