"""nginx configurations: the upstream (fastest thing that answers HTTP) and the reference proxy."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from bench.procs import BenchError

SMALL_BODY = "upstream says hello\n"
BODY_BYTES = 1 << 20  # 1 MiB, for the download file and the uploads


def _common(workdir: Path, name: str) -> tuple[str, str]:
    """The main-context head (events) and the shared `http` settings."""
    temp = workdir / f"{name}-temp"
    temp.mkdir(mode=0o755, exist_ok=True)  # nginx creates only the last level of each path
    return (
        f"""
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 16384; }}
"""[1:],
        f"""
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
""",
    )


def upstream_conf(workdir: Path, port: int) -> str:
    """`/` answers a small fixed body with `return 200`; `/download` is a 1 MiB static file;
    `/upload` reads the whole (<= 2 MiB, in-memory) body *before* answering 200; `/_identity`
    echoes the identity headers it received (the decision scenario's sanity check).

    A plain `return 200` would answer as soon as the headers arrive and discard the body
    afterwards (bench.nginx.check_upload_reads_body proves the difference), so `/upload` uses
    `mirror` with `mirror_request_body on`, which reads the body in the precontent phase; the
    static handler then refuses POST on a small file (405) and `error_page` turns that into a 200.
    """
    events, http = _common(workdir, "upstream")
    blob = workdir / "blob-1MiB.bin"
    target = workdir / "upload-target.txt"
    if not blob.exists():
        blob.write_bytes(bytes(range(256)) * (BODY_BYTES // 256))
        target.write_text("upload target\n")
    return f"""{events}
http {{
{http}
    sendfile on;
    tcp_nopush on;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            return 200 "{SMALL_BODY.strip()}\\n";
        }}
        location = /download {{
            alias {blob};
            default_type application/octet-stream;
        }}
        location = /upload {{
            client_max_body_size 2m;
            client_body_buffer_size 2m;
            mirror /_sink;
            mirror_request_body on;
            alias {target};
            error_page 405 =200 @uploaded;
        }}
        location = /_identity {{
            return 200 "subject=$http_x_auth_subject scopes=$http_x_auth_scopes\n";
        }}
        location = /_sink {{
            internal;
            return 204;
        }}
        location @uploaded {{
            return 200 "uploaded\\n";
        }}
    }}
}}
"""


def proxy_conf(workdir: Path, port: int, upstream_port: int) -> str:
    """The nginx reference: proxy_pass with pooled keep-alive upstream connections, bodies
    streamed (no request buffering, responses never spooled to temp files)."""
    events, http = _common(workdir, "nginx-proxy")
    return f"""{events}
http {{
{http}
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 2m;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


DECISION_PATH = "/_gateway/auth"  # the gateway's default `decision.path`, as in the example
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "nginx" / "gateway.conf"
POOL = 64  # idle keep-alive connections per upstream, as the nginx reference proxy's

# The shipped example's placeholders and what the benchmark puts in their place (see
# decision_conf); each must occur `count` times, else the example changed shape.
_PLACEHOLDERS = (
    ("gateway upstream", r"server\s+gateway:8080;", 1),
    ("app upstream", r"server\s+app:8000;", 1),
    ("keepalive pools", r"keepalive\s+\d+;", 2),
    ("listen", r"(?m)^(\s*)listen\s+80;", 1),
)


def decision_conf(
    workdir: Path, port: int, upstream_port: int, gateway_port: int, example: Path = EXAMPLE
) -> str:
    """nginx in front, asking the gateway in decision mode (`auth_request`) and proxying to the
    upstream itself: the shipped examples/nginx/gateway.conf (an `http { }` snippet) as it
    is, inside the benchmark's common nginx settings, with its placeholders filled in
    (`gateway:8080`, `app:8000`, `listen 80`) and its keep-alive pools raised to the nginx
    reference proxy's (64 idle connections, 10^6 requests each), so that 64 connections do not
    churn upstream connections in one configuration and not in the other."""
    try:
        text = example.read_text()
    except OSError as exc:
        raise BenchError(f"decision: cannot read the nginx example {example}: {exc}") from exc
    values = {
        "gateway upstream": f"server 127.0.0.1:{gateway_port};",
        "app upstream": f"server 127.0.0.1:{upstream_port};",
        "keepalive pools": f"keepalive {POOL};\n    keepalive_requests 1000000;",
        "listen": f"\\1listen 127.0.0.1:{port} backlog=4096;",
    }
    for what, pattern, count in _PLACEHOLDERS:
        text, found = re.subn(pattern, values[what], text)
        if found != count:
            raise BenchError(
                f"decision: {example} has {found} {what} placeholder(s) ({pattern!r}), "
                f"expected {count}: update bench/nginx.py to the example's new shape"
            )
    events, http = _common(workdir, "nginx-decision")
    body = "\n".join(f"    {line}" if line else "" for line in text.splitlines())
    return f"""{events}
http {{
{http}
{body}
}}
"""


def nginx_argv(nginx: str, workdir: Path, name: str, conf: str) -> list[str]:
    path = workdir / f"{name}.conf"
    path.write_text(conf)
    return [nginx, "-p", str(workdir), "-c", str(path), "-e", str(workdir / f"{name}-error.log")]


def check_upload_reads_body(port: int, path: str = "/upload") -> str | None:
    """None if the server reads the whole body before answering and keeps the connection
    usable afterwards; otherwise what went wrong."""
    body = b"x" * BODY_BYTES
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body[:4096])
        sock.settimeout(0.3)
        try:
            early = sock.recv(64)
        except TimeoutError:
            early = b""
        if early:
            return f"answered before the body was sent: {early[:15]!r}"
        sock.settimeout(5)
        sock.sendall(body[4096:])
        first = _read_response(sock)
        if not first.startswith(b"HTTP/1.1 200"):
            return f"upload answered {first[:20]!r}"
        time.sleep(0.05)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        second = _read_response(sock)
        if not second.startswith(b"HTTP/1.1 200"):
            return f"next request on the connection answered {second[:20]!r}"
    return None


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head
