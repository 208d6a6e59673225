"""TLS contexts: the proxy listener's (reloadable on SIGHUP) and the one for https upstreams."""

from __future__ import annotations

import logging
import ssl

from gateway.config import TLSConfig, UpstreamTLSConfig

log = logging.getLogger("gateway.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TLSError(Exception):
    """A certificate or key could not be loaded; the message names the file, never key bytes."""


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.sni_callback = _remember_server_name
    load_server_certificates(ctx, cfg)
    return ctx


def _remember_server_name(
    sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
) -> None:
    """The handshake's server name (SNI), kept on the connection's SSL object: the server
    side of Python's ssl has no getter for it. Certificates are not chosen by it."""
    if name is not None:
        sslobj._gateway_server_name = name.lower().rstrip(".")  # type: ignore[union-attr]
    return None


def server_name_of(sslobj: object) -> str | None:
    """The server name a TLS client asked for, or None (none sent: a client connecting to
    an IP address)."""
    return getattr(sslobj, "_gateway_server_name", None)


def load_server_certificates(ctx: ssl.SSLContext, cfg: TLSConfig) -> None:
    """(Re)load the certificate chain and client CA into `ctx`; new handshakes use them,
    open connections keep theirs. On failure the context keeps what it had."""
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"tls: cannot load {cfg.cert_file} / {cfg.key_file}: {_why(exc)}") from None
    ctx.verify_mode = _CLIENT_AUTH[cfg.client_auth]
    if cfg.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=cfg.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(
                f"tls.client_ca_file: cannot load {cfg.client_ca_file}: {_why(exc)}"
            ) from None


def authlete_context(ca_file: str | None) -> ssl.SSLContext:
    """Always verified; against the system store, or `authlete.ca_file` (a private CA, or a
    TLS-inspecting egress proxy's)."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"authlete.ca_file: cannot load {ca_file}: {_why(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def upstream_context(cfg: UpstreamTLSConfig) -> ssl.SSLContext:
    """Verification on, against the system store or `ca_file`; off only by an explicit flag."""
    if cfg.insecure_skip_verify:
        log.warning(
            "upstream_tls.insecure_skip_verify is set: https upstreams are NOT verified; "
            "anyone on the path can impersonate them"
        )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"upstream_tls.ca_file: cannot load {cfg.ca_file}: {_why(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
