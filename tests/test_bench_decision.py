"""The decision scenario's nginx config is the shipped example (examples/nginx/gateway.conf)
with its placeholders filled in: if the example changes shape, this fails here, in seconds,
rather than in the benchmark. (The scenario itself runs in tests/test_bench_smoke.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench import nginx
from bench.procs import BenchError
from tests.conftest import need_tool


def test_the_shipped_example_with_the_benchmark_ports(tmp_path: Path) -> None:
    conf = nginx.decision_conf(tmp_path, 18080, 18000, 18081)
    example = nginx.EXAMPLE.read_text()
    # The example's decision block is kept as it is: every auth_request and proxy_set_header
    # line of the example is in the benchmark's config.
    for line in example.splitlines():
        if re.match(r"\s*(auth_request|auth_request_set|proxy_set_header|error_page)\s", line):
            assert line.strip() in conf, line
    assert "server 127.0.0.1:18081;" in conf  # the gateway
    assert "server 127.0.0.1:18000;" in conf  # the upstream
    assert "listen 127.0.0.1:18080 backlog=4096;" in conf
    assert conf.count(f"keepalive {nginx.POOL};") == 2
    directives = "\n".join(x for x in conf.splitlines() if not x.lstrip().startswith("#"))
    assert "gateway:8080" not in directives and "app:8000" not in directives
    binary = need_tool("nginx")  # fails under CI, which installs it
    argv = nginx.nginx_argv(binary, tmp_path, "decision", conf)
    done = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_an_example_of_another_shape_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "gateway.conf"
    other.write_text(nginx.EXAMPLE.read_text().replace("server app:8000;", "server app:9000;"))
    with pytest.raises(BenchError, match="app upstream"):
        nginx.decision_conf(tmp_path, 1, 2, 3, example=other)
