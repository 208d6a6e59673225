"""The `decision` scenario (issue 13): nginx with `auth_request` asking the gateway in decision
mode and proxying to the upstream itself, against the gateway as the proxy, on the same core.

Both sides get CPU 1 (the proxy core of every scenario): the `gateway` configuration is one
gateway process there, `decision` is one nginx worker (plus its idle master) and one gateway
process sharing it. wrk, the upstream nginx and the emulator stay on CPU 0, as everywhere.
`nginx` (plain `proxy_pass`) runs beside them as the reference, and `direct` at one
connection for the added latency. See bench/README.md, "Decision mode".
"""

from __future__ import annotations

import contextlib
import http.client
import os
import statistics
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bench import measure, nginx, report
from bench.procs import BenchError, Child, free_ports, http_ok, http_request, wait_until

if TYPE_CHECKING:
    from bench.runner import Bench

CONFIGS = ("direct", "nginx", "gateway", "decision")
C64 = ("nginx", "gateway", "decision")
C1 = ("direct", "nginx", "gateway", "decision")
ROLE = "decision: nginx auth_request + gateway (decision mode)"
_FAMILY = "gateway_decisions_total"


def start(bench: Bench, started: list[Child], token: str) -> tuple[Child, Child, int]:
    """The gateway in decision mode, then the nginx in front of it, both on the proxy core.
    Each child is appended to `started` as soon as it exists (the caller stops them)."""
    gw_port, admin, port = free_ports(3)
    config = bench.gateway_yaml(gw_port, admin, decision=True)
    check = subprocess.run(
        bench.python("-m", "gateway", "check-config", "-c", str(config)),
        capture_output=True,
        text=True,
        env=_merged(bench.env()),
        check=False,
    )
    if check.returncode != 0:
        raise BenchError(
            f"decision: the gateway refuses its decision-mode config {config} (does this "
            f"checkout have decision mode?):\n{(check.stdout + check.stderr).strip()[-2000:]}"
        )
    gateway = bench.procs.start(
        "decision-gateway",
        bench.python("-m", "gateway", "run", "-c", str(config)),
        bench.cpu_proxy,
        env=bench.env(),
    )
    started.append(gateway)
    gateway.extra["admin"] = admin
    wait_until("decision gateway", lambda: http_ok(admin, "/readyz"), gateway)
    argv = nginx.nginx_argv(
        bench.nginx,
        bench.workdir,
        "nginx-decision",
        nginx.decision_conf(bench.workdir, port, bench.upstream_port, gw_port),
    )
    front = bench.procs.start("nginx-decision", argv, bench.cpu_proxy)
    started.append(front)
    auth = {"Authorization": f"Bearer {token}"}
    wait_until("nginx in front of the decision gateway", lambda: http_ok(port, "/", auth), front)
    return front, gateway, port


def _merged(env: Mapping[str, str]) -> dict[str, str]:
    return {**os.environ, **env}


def user_system_seconds(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree (reaped children included), from /proc:
    where a request's CPU goes between the interpreter and the kernel (loopback I/O)."""
    user = system = 0.0
    for pid in measure.tree(root):
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        user += (int(fields[11]) + int(fields[13])) / measure.CLK_TCK  # utime + cutime
        system += (int(fields[12]) + int(fields[14])) / measure.CLK_TCK  # stime + cstime
    return user, system


def decisions_counted(admin: int) -> int:
    """The sum of `gateway_decisions_total` over its labels, from the admin /metrics."""
    status, raw = http_request(admin, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"decision gateway /metrics: {status}")
    total = 0.0
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith((_FAMILY + "{", _FAMILY + " ")):
            with contextlib.suppress(ValueError):
                total += float(line.rpartition(" ")[2])
    return int(total)


def _get(port: int, path: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=dict(headers))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def sanity(port: int, gateway: Child, token: str, scope: str) -> None:
    """What the measured runs rely on: nginx asks the gateway for every request (it counts
    decisions), the identity of the answer reaches the upstream and a client's own copy does
    not, and a request without a token gets the gateway's 401 with its challenge."""
    admin = gateway.extra["admin"]
    assert isinstance(admin, int)
    before = decisions_counted(admin)
    status, headers, _ = _get(port, "/", {})
    if status != 401 or "bearer" not in headers.get("www-authenticate", "").lower():
        raise BenchError(
            f"decision: GET / without a token answered {status}, WWW-Authenticate "
            f"{headers.get('www-authenticate')!r} (expected 401 with the gateway's challenge)"
        )
    forged = {
        "Authorization": f"Bearer {token}",
        "X-Auth-Scopes": "forged",
        "X-Auth-Subject": "forged",
        "X-Forwarded-Uri": "/elsewhere",
    }
    status, _, body = _get(port, "/_identity", forged)
    text = body.decode(errors="replace")
    if status != 200 or f"scopes={scope}" not in text or "forged" in text:
        raise BenchError(
            f"decision: the upstream saw {text.strip()!r} ({status}); expected the gateway's "
            f"identity (scopes={scope}) and not the client's forged headers"
        )
    counted = decisions_counted(admin) - before
    if counted < 2:
        raise BenchError(
            f"decision: the gateway counted {counted} decisions for 2 requests through nginx "
            f"(no {_FAMILY}: is nginx asking it? log {gateway.log})"
        )


def scenario(bench: Bench) -> None:
    c64 = bench.pick(C64, CONFIGS)
    c1 = bench.pick(C1, CONFIGS)
    names = sorted(set(c64) | set(c1), key=CONFIGS.index)
    if not names:
        return
    with bench.proxies(names) as targets:
        title = (
            "one valid token, every request a cache hit (the hot case); `decision` = nginx "
            "`auth_request` to the gateway in decision mode, nginx proxying to the upstream; "
            f"`gateway` = the gateway as the proxy; both on CPU {bench.cpu_proxy}"
        )
        bench.run_case(
            "decision",
            "c64",
            f"{title}; 64 connections (wrk -t1 -c64)",
            targets,
            c64,
            connections=64,
        )
        bench.run_case(
            "decision",
            "c1",
            "the same at 1 connection: the latency each path adds",
            targets,
            c1,
            connections=1,
        )
    bench.notes.setdefault("decision", []).extend(notes(bench.runs, bench.cpu_proxy))


def notes(runs: list[report.Run], cpu: str) -> list[str]:
    mine = [r for r in runs if r["scenario"] == "decision"]
    out = [
        f"pinning: `gateway` is one gateway process on CPU {cpu}; `decision` is one nginx "
        f"worker (nginx's master idles) and one gateway process, both on CPU {cpu}; `nginx` is "
        f"one nginx worker on CPU {cpu}; wrk, the upstream nginx and the emulator on the other "
        "core, as in every scenario",
        "nginx in front: examples/nginx/gateway.conf as shipped, its placeholders filled in and "
        f"its keep-alive pools at {nginx.POOL} idle connections (the example's 16 would make 64 "
        "connections open and close upstream connections; the nginx reference has 64); the "
        "gateway: the `gateway` configuration's file plus `decision:` and `trusted_proxies: "
        "[127.0.0.1/32]`, its route without an upstream",
    ]

    def med(config: str, key: str, case: str = "c64") -> float | None:
        values = [r[key] for r in mine if r["case"] == case and r["config"] == config and key in r]
        return statistics.median(values) if values else None

    parts = [
        r["cpu_parts_us_per_req"]
        for r in mine
        if r["case"] == "c64" and r["config"] == "decision" and "cpu_parts_us_per_req" in r
    ]
    proxy_gw, plain = med("gateway", "cpu_us_per_req"), med("nginx", "cpu_us_per_req")
    if parts:
        n_part = statistics.median(p["nginx"] for p in parts)
        g_part = statistics.median(p["gateway"] for p in parts)
        text = (
            f"c64, where a request's CPU goes (µs, medians): `decision` = nginx {n_part:.1f} + "
            f"gateway {g_part:.1f} = {n_part + g_part:.1f}"
        )
        if proxy_gw is not None:
            text += f"; `gateway` as the proxy {proxy_gw:.1f}"
        if plain is not None:
            text += (
                f"; nginx as a plain proxy {plain:.1f}, so the `auth_request` subrequest costs "
                f"nginx {n_part - plain:+.1f}"
            )
        out.append(text)
        if proxy_gw:
            out.append(
                "where the ingress has cores of its own (the deployment decision mode is for), "
                f"a core of the gateway answers {1e6 / g_part:,.0f} decisions/s against "
                f"{1e6 / proxy_gw:,.0f} proxied requests/s ({proxy_gw / g_part:.2f}x; 10^6 / "
                "its CPU µs per request)"
            )
    split = [
        f"`{config}` {u:.1f} + {k:.1f}"
        for config in ("gateway", "decision")
        if (u := med(config, "gateway_user_us_per_req")) is not None
        and (k := med(config, "gateway_system_us_per_req")) is not None
    ]
    if split:
        out.append(
            "c64, the gateway's own CPU per request as user (the interpreter) + system (the "
            "kernel: loopback reads and writes, epoll) µs, medians: " + ", ".join(split)
        )
    counted = [
        f"{r['case']} {r['decisions_per_req']:.3f}"
        for r in mine
        if r["config"] == "decision" and "decisions_per_req" in r
    ]
    if counted:
        out.append(
            "decisions the gateway counted per response wrk got, per `decision` run (1.000 = "
            "nginx asked once per request; the last requests of a run may be answered after "
            "it ends): " + ", ".join(counted)
        )
    calls = sum(r["authlete_calls"] for r in mine if r["config"] in ("gateway", "decision"))
    out.append(f"Authlete calls during the measured gateway and decision runs: {calls} (hot cache)")
    return out
