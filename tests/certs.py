"""Throw-away test certificates, made with the `openssl` command line tool (no extra Python
dependency). EC P-256 keys, valid for two days, every leaf naming 127.0.0.1 and localhost."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("the openssl command line tool is needed to make test certificates")
    done = subprocess.run([exe, *map(str, args)], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def make_ca(directory: Path, name: str) -> Pair:
    """A self-signed CA certificate and its key."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _new_key(pair.key)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        pair.key,
        "-out",
        pair.cert,
        "-days",
        _DAYS,
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return pair


def _extensions(usage: str, san: str) -> str:
    return (
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\n"
        f"subjectAltName={san}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )


def issue(
    ca: Pair,
    directory: Path,
    name: str,
    *,
    cn: str | None = None,
    serial: int = 1,
    client: bool = False,
    san: str = "IP:127.0.0.1,DNS:localhost",
) -> Pair:
    """A leaf certificate signed by `ca`: serverAuth, or clientAuth with `client=True`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(_extensions("clientAuth" if client else "serverAuth", san))
    _new_key(pair.key)
    _openssl("req", "-new", "-key", pair.key, "-out", csr, "-subj", f"/CN={cn or name}")
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca.cert,
        "-CAkey",
        ca.key,
        "-set_serial",
        str(serial),
        "-days",
        _DAYS,
        "-extfile",
        ext,
        "-out",
        pair.cert,
    )
    return pair


def self_signed(directory: Path, name: str, *, san: str = "IP:127.0.0.1,DNS:localhost") -> Pair:
    """A server certificate that is its own issuer (what an unconfigured service ships)."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _new_key(pair.key)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        pair.key,
        "-out",
        pair.cert,
        "-days",
        _DAYS,
        "-subj",
        f"/CN={name}",
        "-addext",
        f"subjectAltName={san}",
        "-addext",
        "extendedKeyUsage=serverAuth",
    )
    return pair
