"""The `gateway` command as an operator runs it: real subprocesses, real loopback sockets.

check-config: exit 0 and a summary, or exit 2 with one `key.path: message` line per problem.
run: serves until SIGTERM/SIGINT, then stops accepting, lets in-flight requests finish within
`shutdown_timeout`, and exits 0. No config mistake ever prints a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.cli import main as cli_main
from tests.conftest import start_app

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY_SCRIPT = str(SCRIPT) if SCRIPT.exists() else (shutil.which("gateway") or "gateway")
# Both spellings of the command; `python -m gateway` must do what `gateway` does.
COMMANDS = {
    "script": [GATEWAY_SCRIPT],
    "module": [sys.executable, "-m", "gateway"],
}

VALID: dict[str, Any] = {
    "listen": "127.0.0.1:18080",
    "admin_listen": "127.0.0.1:19090",
    "realm": "cli-test",
    "authlete": {
        "base_url": "http://127.0.0.1:18400",
        "allow_insecure_http": True,
        "service_id": "715948317",
        "access_token": "${CLI_TEST_TOKEN:-emulator-access-token}",
    },
    "routes": [
        {
            "name": "public-docs",
            "path_prefix": "/docs",
            "upstream": "http://127.0.0.1:8000",
            "auth": "none",
        },
        {
            "name": "orders-api",
            "path_prefix": "/orders",
            "methods": ["GET", "POST"],
            "upstream": "http://127.0.0.1:8001",
            "scopes": ["orders.read"],
        },
        {
            "name": "billing-api",
            "path_prefix": "/billing/v2",
            "upstream": "https://billing.internal:8443",
            "scopes": ["billing"],
        },
    ],
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "CLI_TEST_TOKEN")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _write(tmp_path: Path, data: Any, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _cli(
    args: list[str], *, env: dict[str, str] | None = None, command: str = "script"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMANDS[command], *args],
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        timeout=60,
        cwd=REPO,
        check=False,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, stream
        assert 'File "' not in stream, stream


# --------------------------------------------------------------------------- check-config


@pytest.mark.parametrize("command", COMMANDS)
def test_check_config_valid(tmp_path: Path, command: str) -> None:
    path = _write(tmp_path, VALID)
    result = _cli(["check-config", "--config", str(path)], command=command)
    assert result.returncode == 0, result.stderr
    _no_traceback(result)
    out = result.stdout
    for route in VALID["routes"]:
        assert route["name"] in out
        assert route["path_prefix"] in out
    assert "127.0.0.1:8001" in out
    assert "billing.internal:8443" in out
    # one screen
    assert len(out.splitlines()) <= 25


def test_check_config_bundled_demo_file() -> None:
    result = _cli(["check-config", "--config", str(REPO / "config" / "demo.yaml")])
    assert result.returncode == 0, result.stderr
    for name in ("public", "orders", "admin"):
        assert name in result.stdout


def test_check_config_short_option(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID)
    result = _cli(["check-config", "-c", str(path)])
    assert result.returncode == 0, result.stderr
    assert "orders-api" in result.stdout


def test_check_config_env_fallback(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID)
    result = _cli(["check-config"], env=_env(GATEWAY_CONFIG=str(path)))
    assert result.returncode == 0, result.stderr
    assert "orders-api" in result.stdout


def test_option_wins_over_env(tmp_path: Path) -> None:
    good = _write(tmp_path, VALID, "good.yaml")
    bad = _write(tmp_path, "routes: 5\n", "bad.yaml")
    result = _cli(["check-config", "-c", str(good)], env=_env(GATEWAY_CONFIG=str(bad)))
    assert result.returncode == 0, result.stderr
    result = _cli(["check-config", "-c", str(bad)], env=_env(GATEWAY_CONFIG=str(good)))
    assert result.returncode == 2
    _no_traceback(result)


def _bad_upstream() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(VALID))
    data["routes"][1]["upstream"] = "ftp://127.0.0.1:8001"
    return data


def _several() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(VALID))
    data["listen"] = "8080"
    data["bogus"] = 1
    data["routes"][0]["scopes"] = ["x"]
    data["routes"][2]["upstream"] = "not a url"
    del data["authlete"]["service_id"]
    return data


INVALID_FILES: list[tuple[str, Any, list[str] | None]] = [
    ("bad-upstream", _bad_upstream(), ["routes[1].upstream: not an http(s) URL"]),
    (
        "several",
        _several(),
        [
            'listen: must be "host:port"',
            "bogus: unknown key",
            "authlete.service_id: is required",
            "routes[0].scopes: not allowed with auth: none",
            "routes[2].upstream: not an http(s) URL",
        ],
    ),
    (
        "empty",
        "",
        [
            "authlete: is required (base_url, service_id, access_token)",
            "routes: at least one route is required",
        ],
    ),
    ("list", "- a\n- b\n", ["config: must be a mapping of settings"]),
    ("yaml-syntax", "routes: [\n  {name: x\n", None),  # one "config: invalid YAML..." line
    ("not-utf8", b"realm: caf\xe9\n", None),
    (
        "unset-env",
        yaml.safe_dump(VALID).replace(
            "${CLI_TEST_TOKEN:-emulator-access-token}", "${CLI_TEST_TOKEN}"
        ),
        ["authlete.access_token: environment variable CLI_TEST_TOKEN is not set"],
    ),
]


@pytest.mark.parametrize("subcommand", ["check-config", "run"])
@pytest.mark.parametrize(
    ("content", "expected"),
    [(c, e) for _, c, e in INVALID_FILES],
    ids=[name for name, _, _ in INVALID_FILES],
)
def test_invalid_config_exit_2(
    tmp_path: Path, subcommand: str, content: Any, expected: list[str] | None
) -> None:
    path = _write(tmp_path, content)
    result = _cli([subcommand, "--config", str(path)])
    assert result.returncode == 2, (result.stdout, result.stderr)
    _no_traceback(result)
    problems = _lines(result.stderr)
    if expected is None:
        assert len(problems) == 1, problems
        assert problems[0].startswith("config: "), problems
    else:
        assert sorted(problems) == sorted(expected)
    assert "OK" not in result.stdout


@pytest.mark.parametrize("subcommand", ["check-config", "run"])
def test_missing_file_exit_2(tmp_path: Path, subcommand: str) -> None:
    path = tmp_path / "does-not-exist.yaml"
    result = _cli([subcommand, "--config", str(path)])
    assert result.returncode == 2
    _no_traceback(result)
    problems = _lines(result.stderr)
    assert len(problems) == 1, problems
    assert str(path) in problems[0]


@pytest.mark.parametrize("subcommand", ["check-config", "run"])
def test_directory_as_config_exit_2(tmp_path: Path, subcommand: str) -> None:
    result = _cli([subcommand, "--config", str(tmp_path)])
    assert result.returncode == 2
    _no_traceback(result)
    assert len(_lines(result.stderr)) == 1, result.stderr


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("subcommand", ["check-config", "run"])
def test_no_config_given_exit_2(subcommand: str, command: str) -> None:
    result = _cli([subcommand], command=command)
    assert result.returncode == 2
    _no_traceback(result)
    problems = _lines(result.stderr)
    assert len(problems) == 1, problems
    assert "GATEWAY_CONFIG" in problems[0] or "--config" in problems[0]


def test_help_and_version_same_for_module_and_script() -> None:
    script = _cli(["--help"], command="script")
    module = _cli(["--help"], command="module")
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout
    for sub in ("run", "check-config", "demo"):
        assert sub in script.stdout
    version = _cli(["--version"], command="module")
    assert version.returncode == 0
    assert re.search(r"\d+\.\d+", version.stdout + version.stderr)


# --------------------------------------------------------------------------- check-config warnings


def _routes_config(routes: list[dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(VALID))
    data["routes"] = routes
    return data


def _check_warnings(
    tmp_path: Path, routes: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> list[str]:
    """check-config through the CLI's main(): exit 0, and the `warning:` lines."""
    path = _write(tmp_path, _routes_config(routes))
    assert cli_main(["check-config", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: OK")
    assert "warning: " not in out
    lines = _lines(err)
    assert all(line.startswith("warning: ") for line in lines), lines
    return [line.removeprefix("warning: ") for line in lines]


def _route(name: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "path_prefix": prefix, "upstream": f"http://{name}.svc:8080", **extra}


def test_check_config_warns_when_other_methods_reach_a_public_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [
        _route("admin", "/admin", methods=["GET"], scopes=["admin"]),
        _route("site", "/", auth="none"),
    ]
    warnings = _check_warnings(tmp_path, routes, capsys)
    assert len(warnings) == 2, warnings
    falls, catch_all = warnings
    assert "'admin'" in falls and "'site'" in falls
    assert "only GET for /admin" in falls
    assert "any other method (not GET)" in falls
    assert "WITHOUT a token" in falls and "http://site.svc:8080" in falls
    assert "public catch-all" in catch_all and "'site'" in catch_all
    assert "without a token" in catch_all
    # The example names the protected prefix that an upstream may confuse.
    assert "/adminx" in catch_all and 'nginx "location /admin"' in catch_all


def test_check_config_warns_when_a_broader_protected_route_takes_other_methods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [
        _route("reports", "/api/reports", methods=["GET", "HEAD"], scopes=["reports"]),
        _route("api", "/api", methods=["GET", "POST", "DELETE"], scopes=["api"]),
        _route("fallback", "/"),
    ]
    warnings = _check_warnings(tmp_path, routes, capsys)
    assert len(warnings) == 3, warnings
    to_api, to_fallback, api_to_fallback = warnings
    assert "route 'reports' takes only GET, HEAD for /api/reports" in to_api
    assert "DELETE, POST requests to /api/reports fall through to route 'api' (/api)" in to_api
    assert "only its own scopes (api)" in to_api and "WITHOUT" not in to_api
    assert "any other method (not DELETE, GET, HEAD, POST)" in to_fallback
    assert "route 'fallback' (/)" in to_fallback and "accepts any token" in to_fallback
    assert "route 'api' takes only DELETE, GET, POST for /api" in api_to_fallback


@pytest.mark.parametrize(
    "routes",
    [
        # Methods split deliberately over routes for the same prefix, all protected.
        [
            _route("orders-write", "/orders", methods=["POST", "PUT"], scopes=["w"]),
            _route("orders", "/orders", scopes=["r"]),
            _route("docs", "/docs", auth="none"),
        ],
        # The broader route takes no method the limited one leaves over.
        [
            _route("admin", "/admin", methods=["GET", "POST"], scopes=["admin"]),
            _route("api", "/", methods=["GET"]),
        ],
        # Not an ancestor by whole segments: /admin does not cover /administration.
        [
            _route("administration", "/administration", methods=["GET"]),
            _route("admin", "/admin", auth="none"),
        ],
        # Later routes for other prefixes, and a public route limited by methods.
        [
            _route("public-get", "/public", methods=["GET"], auth="none"),
            _route("orders", "/orders", methods=["GET"], scopes=["r"]),
            _route("billing", "/billing"),
        ],
    ],
    ids=["same-prefix-split", "nothing-left-over", "not-an-ancestor", "unrelated"],
)
def test_check_config_no_warning_for_tables_without_fall_through(
    tmp_path: Path, routes: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _check_warnings(tmp_path, routes, capsys) == []


def test_check_config_same_prefix_routes_are_reported_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [
        _route("orders-read", "/orders", methods=["GET"], scopes=["r"]),
        _route("orders-write", "/orders", methods=["POST"], scopes=["w"]),
        _route("anything", "/", auth="none"),
    ]
    falls, catch_all = _check_warnings(tmp_path, routes, capsys)
    assert "routes 'orders-read', 'orders-write' take only GET, POST for /orders" in falls
    assert "(not GET, POST)" in falls and "WITHOUT a token" in falls
    assert "public catch-all" in catch_all


def test_check_config_warnings_from_the_real_command(tmp_path: Path) -> None:
    routes = [_route("admin", "/admin", methods=["GET"]), _route("all", "/", auth="none")]
    path = _write(tmp_path, _routes_config(routes))
    result = _cli(["check-config", "-c", str(path)])
    assert result.returncode == 0, result.stderr
    _no_traceback(result)
    warnings = _lines(result.stderr)
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings), warnings
    assert result.stdout.startswith(f"{path}: OK")
    # The valid example file of this module has none.
    clean = _cli(["check-config", "-c", str(_write(tmp_path, VALID, "valid.yaml"))])
    assert clean.returncode == 0 and clean.stderr == ""


# --------------------------------------------------------------------------- run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    proxy: str
    admin: str
    proxy_port: int
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class SlowUpstream:
    url: str
    entered: asyncio.Event
    release: asyncio.Event


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        # Sleeps until the test lets it go (at most a generous bound).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        await asyncio.sleep(0.2)
        return web.Response(text="slow-done")

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(120)
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/fast", fast)
    app.router.add_get("/slow", slow)
    app.router.add_get("/hang", hang)
    runner, url, _ = await start_app(app)
    try:
        yield SlowUpstream(url, entered, release)
    finally:
        release.set()
        await runner.cleanup()


@contextlib.contextmanager
def _served(
    tmp_path: Path,
    upstream: str,
    *,
    shutdown_timeout: float = 10,
    command: str = "script",
    how: str = "--config",
) -> Iterator[Served]:
    proxy_port, admin_port = _free_port(), _free_port()
    while admin_port == proxy_port:
        admin_port = _free_port()
    config = {
        "listen": f"127.0.0.1:{proxy_port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "shutdown_timeout": shutdown_timeout,
        "upstream_timeout": 60,
        # never called: the only route is auth: none
        "authlete": {
            "base_url": "http://127.0.0.1:9",
            "allow_insecure_http": True,
            "service_id": "715948317",
            "access_token": "unused",
        },
        "routes": [{"name": "all", "path_prefix": "/", "upstream": upstream, "auth": "none"}],
    }
    path = _write(tmp_path, config)
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as err, (tmp_path / "stdout.log").open("wb") as out:
        args = [*COMMANDS[command], "run"]
        env = _env()
        if how == "env":
            env["GATEWAY_CONFIG"] = str(path)
        else:
            args += [how, str(path)]
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=REPO)
    served = Served(
        proc,
        f"http://127.0.0.1:{proxy_port}",
        f"http://127.0.0.1:{admin_port}",
        proxy_port,
        stderr_path,
    )
    try:
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def _wait_ready(served: Served, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            pytest.fail(f"gateway exited {served.proc.returncode}: {served.stderr()}")
        try:
            async with session.get(served.admin + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"gateway never became ready: {served.stderr()}")


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.05)
    return proc.poll()


async def _connect_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except ConnectionRefusedError:
        return True
    except (TimeoutError, OSError):
        return False
    writer.close()
    return False


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=40),
    )


async def test_run_serves_and_drains_on_sigterm(
    tmp_path: Path, slow_upstream: SlowUpstream
) -> None:
    with _served(tmp_path, slow_upstream.url, shutdown_timeout=15) as served:
        async with _session() as session:
            await _wait_ready(served, session)
            async with session.get(served.proxy + "/fast") as resp:
                assert resp.status == 200
                assert await resp.text() == "fast"
            async with session.get(served.admin + "/healthz") as resp:
                assert resp.status == 200

            async def in_flight() -> tuple[int, str]:
                async with session.get(served.proxy + "/slow") as resp:
                    return resp.status, await resp.text()

            task = asyncio.create_task(in_flight())
            await asyncio.wait_for(slow_upstream.entered.wait(), 20)

            served.proc.send_signal(signal.SIGTERM)

            # While draining: /readyz is 503 ...
            readyz: list[int | str] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    async with session.get(served.admin + "/readyz") as resp:
                        readyz.append(resp.status)
                        if resp.status == 503:
                            break
                except aiohttp.ClientError as exc:
                    readyz.append(type(exc).__name__)
                await asyncio.sleep(0.05)
            assert readyz and readyz[-1] == 503, readyz

            # ... and new connections to the proxy listener are refused.
            deadline = time.monotonic() + 10
            refused = False
            while time.monotonic() < deadline and not refused:
                refused = await _connect_refused(served.proxy_port)
                if not refused:
                    await asyncio.sleep(0.05)
            assert refused, "the proxy listener still accepts connections after SIGTERM"

            assert served.proc.poll() is None, "exited before the in-flight request finished"
            assert not task.done()

            slow_upstream.release.set()
            status, body = await asyncio.wait_for(task, 20)
            assert status == 200
            assert body == "slow-done"

        code = await _wait_exit(served.proc, 20)
        assert code == 0, served.stderr()
        assert "Traceback" not in served.stderr()


@pytest.mark.parametrize("command", COMMANDS)
async def test_run_exits_0_on_sigint(
    tmp_path: Path, slow_upstream: SlowUpstream, command: str
) -> None:
    with _served(tmp_path, slow_upstream.url, command=command) as served:
        async with _session() as session:
            await _wait_ready(served, session)
            async with session.get(served.proxy + "/fast?x=1") as resp:
                assert resp.status == 200
        served.proc.send_signal(signal.SIGINT)
        code = await _wait_exit(served.proc, 20)
        assert code == 0, served.stderr()
        assert "Traceback" not in served.stderr()
        assert "KeyboardInterrupt" not in served.stderr()


@pytest.mark.parametrize("how", ["--config", "-c", "env"])
async def test_run_idle_sigterm_exits_0(
    tmp_path: Path, slow_upstream: SlowUpstream, how: str
) -> None:
    with _served(tmp_path, slow_upstream.url, how=how) as served:
        async with _session() as session:
            await _wait_ready(served, session)
            async with session.get(served.proxy + "/fast") as resp:
                assert resp.status == 200
                assert await resp.text() == "fast"
        served.proc.send_signal(signal.SIGTERM)
        code = await _wait_exit(served.proc, 20)
        assert code == 0, served.stderr()
        assert "Traceback" not in served.stderr()
        # The only route is a public catch-all: `run` says so once, as check-config does.
        warned = [
            line for line in served.stderr().splitlines() if "WARNING gateway: config:" in line
        ]
        assert len(warned) == 1 and "catch-all" in warned[0], served.stderr()


async def test_run_grace_period_is_bounded(tmp_path: Path, slow_upstream: SlowUpstream) -> None:
    # The upstream would hold the request for two minutes; shutdown_timeout is 1 second.
    with _served(tmp_path, slow_upstream.url, shutdown_timeout=1) as served:
        async with _session() as session:
            await _wait_ready(served, session)

            async def stuck() -> int | str:
                try:
                    async with session.get(served.proxy + "/hang") as resp:
                        await resp.read()
                        return resp.status
                except aiohttp.ClientError as exc:
                    return type(exc).__name__

            task = asyncio.create_task(stuck())
            await asyncio.sleep(0.5)
            assert not task.done()
            served.proc.send_signal(signal.SIGTERM)
            code = await _wait_exit(served.proc, 30)  # generous; far below the 120 s hang
            assert code == 0, served.stderr()
            outcome = await asyncio.wait_for(task, 10)
            assert outcome != 200
        assert "Traceback" not in served.stderr()


async def test_run_port_in_use_no_traceback(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{_free_port()}",
            "authlete": {
                "base_url": "http://127.0.0.1:9",
                "allow_insecure_http": True,
                "service_id": "s",
                "access_token": "t",
            },
            "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:9", "auth": "none"}],
        }
        path = _write(tmp_path, config)
        result = _cli(["run", "--config", str(path)])
    assert result.returncode != 0
    _no_traceback(result)
    assert str(port) in result.stderr or "listen" in result.stderr


# --------------------------------------------------------------------------- demo

DEMO_PORTS = (8080, 9090, 18400, 18401)


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _no_proxy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _status_of(curl_output: str) -> int:
    match = re.match(r"HTTP/[\d.]+ (\d{3})", curl_output)
    assert match, curl_output
    return int(match.group(1))


def test_demo_prints_working_curl_commands(tmp_path: Path) -> None:
    busy = [port for port in DEMO_PORTS if _port_busy(port)]
    if busy:
        pytest.skip(f"demo ports already in use on 127.0.0.1: {busy}")
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")

    stdout_path = tmp_path / "demo.out"
    stderr_path = tmp_path / "demo.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen([GATEWAY_SCRIPT, "demo"], stdout=out, stderr=err, env=_env())
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = stdout_path.read_text(encoding="utf-8", errors="replace")
            if "Ctrl-C" in text:
                break
            if proc.poll() is not None:
                pytest.fail(f"demo exited {proc.returncode}: {text}\n{stderr_path.read_text()}")
            time.sleep(0.1)
        else:
            pytest.fail(f"the demo never printed its commands: {text}")

        commands = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
        assert commands, text
        seen: dict[str, int] = {}
        for command in commands:
            if "|" in command:
                result = subprocess.run(
                    ["bash", "-c", command],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env=_no_proxy_env(),
                    check=False,
                )
                assert "gateway_" in result.stdout, (command, result.stdout, result.stderr)
                continue
            args = shlex.split(command)
            result = subprocess.run(
                args, capture_output=True, text=True, timeout=30, env=_no_proxy_env(), check=False
            )
            assert result.returncode == 0, (command, result.stderr)
            status = _status_of(result.stdout)
            lower = result.stdout.lower()
            if "demo-valid-token" in command:
                kind, expected = "valid", 200
                assert "x-auth-subject" in lower and "alice" in lower, result.stdout
            elif "demo-expired-token" in command:
                kind, expected = "expired", 401
                assert "www-authenticate: bearer" in lower, result.stdout
            elif "demo-noscope-token" in command:
                kind, expected = "noscope", 403
                assert "insufficient_scope" in lower, result.stdout
            elif "/orders" in command and "authorization" not in command.lower():
                kind, expected = "no-token", 401
                assert 'www-authenticate: bearer realm="demo"' in lower, result.stdout
            elif "/public" in command:
                kind, expected = "public", 200
            else:
                kind, expected = command, status
            assert status == expected, (command, result.stdout)
            seen[kind] = status
        assert {"valid", "expired", "noscope", "no-token"} <= set(seen), (seen, text)

        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        assert code == 0, stderr_path.read_text()
        assert "Traceback" not in stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- emulator


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:18499", "[::]:18499", "10.1.2.3:18499", "example.com:1"]
)
def test_emulator_refuses_a_non_loopback_listen_address(listen: str) -> None:
    result = _cli(["emulator", "--listen", listen])
    assert result.returncode == 2
    _no_traceback(result)
    (line,) = _lines(result.stderr)
    assert "not a loopback address" in line and "--allow-remote" in line
    assert "no authentication" in line


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
def test_emulator_loopback_listen_needs_no_flag(host: str) -> None:
    if host == "[::1]" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    port = _free_port()
    with _emulator_process([f"{host}:{port}"]) as (proc, stderr_path):
        _wait_for_emulator(proc, host if host != "localhost" else "127.0.0.1", port)
        stderr = stderr_path.read_text(encoding="utf-8")
    assert "warning" not in stderr


def test_emulator_allow_remote_listens_with_a_warning() -> None:
    port = _free_port()
    with _emulator_process(["0.0.0.0:" + str(port), "--allow-remote"]) as (proc, stderr_path):
        _wait_for_emulator(proc, "127.0.0.1", port)
        stderr = stderr_path.read_text(encoding="utf-8")
    (warning,) = [line for line in _lines(stderr) if line.startswith("warning: ")]
    assert "0.0.0.0" in warning and "no authentication" in warning and "/_emulator/" in warning


@contextlib.contextmanager
def _emulator_process(args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        stderr_path = Path(tmp) / "stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                [GATEWAY_SCRIPT, "emulator", "--listen", *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_env(),
                cwd=REPO,
            )
        try:
            yield proc, stderr_path
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_for_emulator(proc: subprocess.Popen[bytes], host: str, port: int) -> None:
    """Until the emulator answers on its control API (GET /_emulator/stats)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"emulator exited with {proc.returncode}"
        conn = http.client.HTTPConnection(host.strip("[]"), port, timeout=2)
        try:
            conn.request("GET", "/_emulator/stats")
            assert conn.getresponse().status == 200
            return
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    pytest.fail(f"the emulator never answered on {host}:{port}")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True
