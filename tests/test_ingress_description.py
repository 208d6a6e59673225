"""gateway.ingress.describe alone: what each ingress dialect says of the original request,
and every way a description can be ambiguous (refused, never read the permissive way)."""

from __future__ import annotations

import pytest

from gateway.ingress import Original, describe


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_nginx_auth_request_reads_uri_method_and_own_host() -> None:
    got = describe(
        h(("X-Original-URI", "/api/x?q=1"), ("X-Original-Method", "POST")),
        b"GET",
        b"api.example.com",
        None,
    )
    assert got == Original(b"POST", b"/api/x?q=1", b"api.example.com")


def test_ingress_nginx_reads_the_host_from_the_original_url() -> None:
    got = describe(
        h(("X-Original-URL", "https://API.example.com:8443/a/b?c"), ("X-Original-Method", "GET")),
        b"GET",
        b"gateway.gateway.svc",  # ingress-nginx sends the auth service's own Host
        None,
    )
    assert got == Original(b"GET", b"/a/b?c", b"API.example.com:8443")


def test_traefik_and_caddy_read_forwarded_headers() -> None:
    got = describe(
        h(
            ("X-Forwarded-Method", "DELETE"),
            ("X-Forwarded-Uri", "/orders/7"),
            ("X-Forwarded-Host", "shop.example.com"),
            ("X-Forwarded-Proto", "https"),
        ),
        b"GET",
        b"gateway:8080",  # Traefik: the auth service's address
        None,
    )
    assert got == Original(b"DELETE", b"/orders/7", b"shop.example.com")


def test_forwarded_without_host_falls_back_to_host() -> None:
    got = describe(
        h(("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/x")), b"GET", b"a.test", None
    )
    assert got == Original(b"GET", b"/x", b"a.test")


def test_envoy_form_takes_path_method_and_host_of_the_check_request() -> None:
    got = describe(h(("Authorization", "Bearer t")), b"PATCH", b"api.test", b"/items/1?x=2")
    assert got == Original(b"PATCH", b"/items/1?x=2", b"api.test")


def test_agreeing_sources_are_accepted() -> None:
    got = describe(
        h(
            ("X-Original-URI", "/a"),
            ("X-Forwarded-Uri", "/a"),
            ("X-Original-Method", "GET"),
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Host", "A.TEST:443"),
        ),
        b"GET",
        b"a.test",
        None,
    )
    assert got == Original(b"GET", b"/a", b"a.test")


@pytest.mark.parametrize(
    ("headers", "suffix", "reason"),
    [
        ([("X-Original-Method", "GET")], None, "no original URI"),
        ([("X-Original-URI", "/a")], None, "no original method"),
        ([("X-Forwarded-Uri", "/a")], None, "no original method"),
        (
            [
                ("X-Original-URI", "/admin"),
                ("X-Forwarded-Uri", "/public"),
                ("X-Original-Method", "GET"),
            ],
            None,
            "differently",
        ),
        (
            [
                ("X-Original-URL", "http://a.test/admin"),
                ("X-Original-URI", "/public"),
                ("X-Original-Method", "GET"),
            ],
            None,
            "differently",
        ),
        ([("X-Forwarded-Uri", "/public"), ("X-Forwarded-Method", "GET")], b"/admin", "differently"),
        (
            [
                ("X-Original-URI", "/a"),
                ("X-Original-Method", "GET"),
                ("X-Forwarded-Method", "POST"),
            ],
            None,
            "differently",
        ),
        ([("X-Forwarded-Method", "GET")], b"/a", "differently"),  # Envoy: own method is POST
        (
            [("X-Original-URI", "/a"), ("X-Original-URI", "/a"), ("X-Original-Method", "GET")],
            None,
            "twice",
        ),
        (
            [
                ("X-Forwarded-Uri", "/a"),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Host", "a.test"),
                ("x-forwarded-host", "b.test"),
            ],
            None,
            "twice",
        ),
        (
            [
                ("X-Original-URI", "/a"),
                ("X-Original-Method", "GET"),
                ("X-Forwarded-Host", "evil.test"),
            ],
            None,
            "another host",
        ),
        (
            [
                ("X-Original-URL", "http://a.test/x"),
                ("X-Original-Method", "GET"),
                ("X-Forwarded-Host", "b.test"),
            ],
            None,
            "another host",
        ),
        ([("X-Original-URI", "/a"), ("X-Original-Method", "get")], None, "not a known"),
        ([("X-Original-URI", "/a"), ("X-Original-Method", "FOO")], None, "not a known"),
        ([("X-Original-URI", "/a"), ("X-Original-Method", "")], None, "not a known"),
        ([("X-Original-URL", "/a"), ("X-Original-Method", "GET")], None, "absolute"),
        ([("X-Original-URL", "ftp://a.test/a"), ("X-Original-Method", "GET")], None, "absolute"),
        ([("X-Original-URL", "http://a.test"), ("X-Original-Method", "GET")], None, "absolute"),
        ([("X-Original-URL", "http://u@a.test/a"), ("X-Original-Method", "GET")], None, "absolute"),
    ],
)
def test_ambiguous_or_missing_descriptions_are_refused(
    headers: list[tuple[str, str]], suffix: bytes | None, reason: str
) -> None:
    got = describe(h(*headers), b"POST", b"a.test", suffix)
    assert isinstance(got, str), got
    assert reason in got


def test_the_reason_never_echoes_header_values() -> None:
    # Refusal reasons go into answers and logs: they name headers, never repeat their values.
    secret = "/admin?access_token=s3cr3t"
    got = describe(
        h(("X-Original-URI", secret), ("X-Forwarded-Uri", "/p"), ("X-Original-Method", "GET")),
        b"GET",
        b"a.test",
        None,
    )
    assert isinstance(got, str) and "s3cr3t" not in got
