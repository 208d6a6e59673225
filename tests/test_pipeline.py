"""The request pipeline's stages as plain functions over plain values: routing with its
per-plan cache, framing checks, token extraction, cache lookup, the scope decision and the
503 for an unreachable Authlete. Configs come from `make_config`; nothing is contacted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.cache import token_key
from gateway.config import Config, Route, Upstream
from gateway.decision import NOT_FOUND, SERVICE_UNAVAILABLE, Denial
from gateway.metrics import Metrics
from gateway.pipeline import (
    _ROUTED_CACHE_SIZE,
    BAD_FRAMING,
    TOO_LARGE,
    Miss,
    Plan,
    Routed,
    check_framing,
    judge,
    lookup,
    route_request,
    token_of,
    unavailable,
)
from gateway.proxy import Inbound
from gateway.upstream import Pool
from gateway.verdict import Active, Inactive, Verdict
from gateway.verdicts import Verdicts
from tests.conftest import make_config

UP = "http://127.0.0.1:9"
OTHER = "http://127.0.0.2:9"
ROUTES: list[dict[str, Any]] = [
    {"name": "api", "path_prefix": "/api", "upstream": UP, "scopes": ["read"]},
    {"name": "admin", "path_prefix": "/admin", "upstream": OTHER, "scopes": ["read", "admin"]},
    {"name": "pub", "path_prefix": "/public", "upstream": UP, "auth": "none", "methods": ["GET"]},
    {"name": "open", "path_prefix": "/open", "upstream": UP, "max_body_bytes": 100},
]
READER = Active("alice", "42", ("read",), "read", 2e9)
ADMIN = Active("root", "1", ("admin", "read"), "admin read", 2e9)
NOBODY = Active(None, "9", (), "", 2e9)


def config(routes: list[dict[str, Any]] | None = None, **overrides: Any) -> Config:
    return make_config("http://authlete.test", ROUTES if routes is None else routes, **overrides)


def plan_of(cfg: Config, pools: dict[Upstream, Pool] | None = None) -> Plan:
    pools = {} if pools is None else pools

    def pool_for(route: Route) -> Pool:
        upstream = route.upstream
        assert upstream is not None
        if upstream not in pools:
            pools[upstream] = Pool(upstream, None)
        return pools[upstream]

    return Plan(cfg, pool_for, Metrics())


@pytest.fixture
def plan() -> Plan:
    return plan_of(config())


def inbound(plan: Plan, *headers: tuple[bytes, bytes], trusted: bool = False) -> Inbound:
    return plan.header_policy.scan(list(headers), trusted)


def routed(plan: Plan, method: bytes, target: bytes) -> Routed:
    found = route_request(plan, method, target)
    assert isinstance(found, Routed), found
    return found


def description(denial: Denial) -> str:
    text: str = json.loads(denial.body)["error_description"]
    return text


async def never(token: str, deadline: float, on_send: Any, priority: Any) -> Verdict:
    raise AssertionError("lookup must not introspect")


def verdicts_of(cfg: Config) -> Verdicts:
    return Verdicts(cfg.cache, never, Metrics(), 1.0)


# --------------------------------------------------------------------------- Plan


def test_plan_compiles_every_route_with_one_pool_per_origin() -> None:
    pools: dict[Upstream, Pool] = {}
    plan = plan_of(config(), pools)
    assert list(plan.routes) == ["api", "admin", "pub", "open"]
    api, admin, pub, open_ = (plan.routes[n] for n in ("api", "admin", "pub", "open"))
    assert api.pool is pub.pool is open_.pool
    assert admin.pool is not api.pool
    assert len(pools) == 2
    assert (api.scopes, api.auth_required) == (("read",), True)
    assert (pub.scopes, pub.auth_required) == ((), False)
    assert open_.max_body_bytes == 100 and api.max_body_bytes == 0
    assert api.route is plan.cfg.routes[0] and api.name == "api"
    assert plan.routed == {}


def test_plan_takes_token_limit_and_header_names_from_the_config() -> None:
    plan = plan_of(config(max_token_bytes=64, headers={"subject": "X-Caller"}))
    assert plan.max_token_bytes == 64
    fields = inbound(plan, (b"x_caller", b"spoof"), (b"X-A", b"1")).kept
    assert fields == [b"X-A", b": ", b"1", b"\r\n"]


# --------------------------------------------------------------------------- route_request


def test_route_normalises_the_path_and_keeps_the_query(plan: Plan) -> None:
    found = routed(plan, b"GET", b"/api/a/./b/../c?x=1&y=%2F")
    assert found.route is plan.routes["api"]
    assert found.path == "/api/a/c"
    assert found.target == b"/api/a/c?x=1&y=%2F"


def test_route_keeps_an_empty_query_and_decodes_unreserved_escapes(plan: Plan) -> None:
    found = routed(plan, b"GET", b"/api/%7Euser/%41?")
    assert (found.path, found.target) == ("/api/~user/A", b"/api/~user/A?")


def test_first_matching_route_wins_by_whole_segments(plan: Plan) -> None:
    assert routed(plan, b"GET", b"/admin/x").route.name == "admin"
    assert routed(plan, b"GET", b"/api").route.name == "api"
    assert route_request(plan, b"GET", b"/apiary") is NOT_FOUND
    assert routed(plan, b"GET", b"/api;v=1/x").route.name == "api"  # ;params ignored


def test_route_methods_restrict_matching(plan: Plan) -> None:
    assert routed(plan, b"GET", b"/public/a").route.name == "pub"
    assert route_request(plan, b"POST", b"/public/a") is NOT_FOUND


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/api/%2Fetc", "encoded slash"),
        (b"/api/../../etc", "path escapes the root"),
        (b"/api//x", "empty path segment (repeated slash)"),
        (b"/api/a\\b", "backslash in path"),
        (b"/api/%zz", "invalid percent-encoding"),
        (b"/api/%c0%ae", "invalid UTF-8 in percent-encoding"),
        (b"/api/x?a b", "invalid character in query"),
        (b"*", "request target must be an absolute path"),
        (b"http://evil.example/api", "request target must be an absolute path"),
    ],
)
def test_unroutable_targets_are_400_with_the_reason(plan: Plan, target: bytes, reason: str) -> None:
    refused = route_request(plan, b"GET", target)
    assert isinstance(refused, Denial)
    assert refused.status == 400
    assert json.loads(refused.body) == {
        "error": "invalid_request",
        "error_description": f"Invalid request path: {reason}.",
    }
    assert plan.routed == {}  # refusals are not remembered


def test_no_route_is_404_and_not_remembered() -> None:
    plan = plan_of(config([{"name": "api", "path_prefix": "/api", "upstream": UP}]))
    assert route_request(plan, b"GET", b"/other") is NOT_FOUND
    assert plan.routed == {}


def test_the_same_method_and_target_get_the_same_routed(plan: Plan) -> None:
    first = routed(plan, b"GET", b"/api/x?q=1")
    assert routed(plan, b"GET", b"/api/x?q=1") is first
    assert plan.routed == {(b"GET", b"/api/x?q=1", None): first}
    # Another method or another spelling of the target is its own entry.
    head = routed(plan, b"HEAD", b"/api/x?q=1")
    dotted = routed(plan, b"GET", b"/api/./x?q=1")
    assert head is not first and dotted is not first
    assert head == first == dotted
    assert len(plan.routed) == 3


def test_a_remembered_routing_is_served_without_routing_again(plan: Plan) -> None:
    first = routed(plan, b"GET", b"/api/x")
    plan.router = type(plan.router)(())  # a router that would match nothing
    assert route_request(plan, b"GET", b"/api/x") is first
    assert route_request(plan, b"GET", b"/api/y") is NOT_FOUND


def test_method_decides_even_for_a_remembered_target(plan: Plan) -> None:
    assert routed(plan, b"GET", b"/public/a").route.name == "pub"
    assert route_request(plan, b"POST", b"/public/a") is NOT_FOUND
    assert routed(plan, b"GET", b"/public/a").route.name == "pub"


def test_route_cache_belongs_to_its_plan() -> None:
    old = plan_of(config())
    before = routed(old, b"GET", b"/public/a")
    assert before.route.name == "pub"
    new_routes = [{"name": "moved", "path_prefix": "/public", "upstream": OTHER}]
    new = plan_of(config(new_routes))
    after = routed(new, b"GET", b"/public/a")
    assert after.route.name == "moved"
    assert routed(old, b"GET", b"/public/a") is before  # a request keeps its plan
    assert (b"GET", b"/public/a", None) in new.routed and new.routed is not old.routed


def test_route_cache_is_bounded(plan: Plan) -> None:
    first = routed(plan, b"GET", b"/api/0")
    for i in range(1, _ROUTED_CACHE_SIZE):
        routed(plan, b"GET", b"/api/%d" % i)
    assert len(plan.routed) == _ROUTED_CACHE_SIZE
    assert routed(plan, b"GET", b"/api/0") is first  # still remembered at the bound
    extra = routed(plan, b"GET", b"/api/extra")
    assert len(plan.routed) <= _ROUTED_CACHE_SIZE
    assert plan.routed[(b"GET", b"/api/extra", None)] is extra
    again = routed(plan, b"GET", b"/api/0")
    assert again == first  # routed afresh after the cache was emptied
    for i in range(3 * _ROUTED_CACHE_SIZE):
        routed(plan, b"GET", b"/api/v%d" % i)
        assert len(plan.routed) <= _ROUTED_CACHE_SIZE


# --------------------------------------------------------------------------- check_framing


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b" CHUNKED "])
def test_a_single_chunked_coding_is_accepted_on_http_1_1(plan: Plan, value: bytes) -> None:
    assert check_framing(inbound(plan, (b"Transfer-Encoding", value)), True, 0) is None


def test_chunked_is_refused_on_http_1_0(plan: Plan) -> None:
    refused = check_framing(inbound(plan, (b"Transfer-Encoding", b"chunked")), False, 0)
    assert refused is BAD_FRAMING
    assert refused.status == 400


@pytest.mark.parametrize(
    "fields",
    [
        [b"gzip, chunked"],
        [b"chunked, chunked"],
        [b"chunked", b"chunked"],
        [b"gzip", b"chunked"],
        [b"identity"],
        [b"chunked;q=1"],
        [b""],
    ],
)
def test_any_other_transfer_encoding_is_refused(plan: Plan, fields: list[bytes]) -> None:
    headers = [(b"Transfer-Encoding", v) for v in fields]
    assert check_framing(inbound(plan, *headers), True, 0) is BAD_FRAMING


def test_no_framing_headers_pass(plan: Plan) -> None:
    assert check_framing(inbound(plan), True, 0) is None
    assert check_framing(inbound(plan), False, 10) is None


@pytest.mark.parametrize(
    ("length", "limit", "refused"),
    [
        (b"101", 100, True),
        (b"100", 100, False),
        (b"0", 100, False),
        (b"99999999999999999999", 100, True),
        (b"99999999999999999999", 0, False),  # 0: no limit
    ],
)
def test_declared_length_over_the_limit_is_413(
    plan: Plan, length: bytes, limit: int, refused: bool
) -> None:
    got = check_framing(inbound(plan, (b"Content-Length", length)), True, limit)
    assert got is (TOO_LARGE if refused else None)
    if refused:
        assert TOO_LARGE.status == 413


# --------------------------------------------------------------------------- token_of


def test_a_bearer_token_is_extracted(plan: Plan) -> None:
    assert token_of(plan, inbound(plan, (b"Authorization", b"Bearer abc.DEF-1_~+/=="))) == (
        "abc.DEF-1_~+/=="
    )
    assert token_of(plan, inbound(plan, (b"authorization", b"bearer   tok"))) == "tok"


@pytest.mark.parametrize(
    ("headers", "status", "challenge"),
    [
        ([], 401, 'Bearer realm="test"'),
        ([(b"Authorization", b"Basic dXNlcjpwYXNz")], 401, 'Bearer realm="test"'),
        ([(b"Authorization", b"Bearer")], 400, 'Bearer error="invalid_request"'),
        ([(b"Authorization", b"Bearer a b")], 400, 'Bearer error="invalid_request"'),
        ([(b"Authorization", b"Bearer\tabc")], 400, 'Bearer error="invalid_request"'),
        (
            [(b"Authorization", b"Bearer a"), (b"Authorization", b"Bearer a")],
            400,
            'Bearer error="invalid_request"',
        ),
        ([(b"Authorization", b"Bearer caf\xe9")], 400, 'Bearer error="invalid_request"'),
    ],
    ids=["none", "basic", "empty", "space", "tab", "two", "obs-text"],
)
def test_no_usable_token_is_denied(
    plan: Plan, headers: list[tuple[bytes, bytes]], status: int, challenge: str
) -> None:
    refused = token_of(plan, inbound(plan, *headers))
    assert isinstance(refused, Denial)
    assert (refused.status, refused.challenge) == (status, challenge)


def test_token_length_limit_comes_from_the_config() -> None:
    plan = plan_of(config(max_token_bytes=16))
    assert token_of(plan, inbound(plan, (b"Authorization", b"Bearer " + b"a" * 16))) == "a" * 16
    refused = token_of(plan, inbound(plan, (b"Authorization", b"Bearer " + b"a" * 17)))
    assert isinstance(refused, Denial)
    assert refused is plan.decider.too_long
    assert refused.status == 400


def test_a_connection_listed_authorization_still_carries_the_token(plan: Plan) -> None:
    found = inbound(plan, (b"Connection", b"Authorization"), (b"Authorization", b"Bearer t"))
    assert token_of(plan, found) == "t"


# --------------------------------------------------------------------------- lookup


def test_lookup_without_a_cached_verdict_is_a_miss_with_the_key() -> None:
    verdicts = verdicts_of(config())
    assert lookup(verdicts, "tok") == Miss("tok", token_key("tok"))


def test_lookup_returns_a_cached_active_verdict_as_a_hit() -> None:
    verdicts = verdicts_of(config())
    verdicts.cache.put_active(token_key("tok"), READER, 60)
    assert lookup(verdicts, "tok") == (READER, "hit")
    assert isinstance(lookup(verdicts, "other"), Miss)  # keyed by the token


def test_lookup_returns_a_cached_refusal_as_a_negative_hit() -> None:
    verdicts = verdicts_of(config())
    refusal = Inactive("UNAUTHORIZED", 'Bearer error="invalid_token"')
    verdicts.cache.put_negative(token_key("bad"), refusal)
    assert lookup(verdicts, "bad") == (refusal, "negative_hit")


def test_lookup_counts_hits_and_negative_hits() -> None:
    metrics = Metrics()
    verdicts = Verdicts(config().cache, never, metrics, 1.0)
    verdicts.cache.put_active(token_key("a"), READER, 60)
    verdicts.cache.put_negative(token_key("n"), Inactive("UNAUTHORIZED", "Bearer"))
    for token in ("a", "a", "n", "missing"):
        lookup(verdicts, token)
    assert metrics.cache_requests.labels("hit").value == 2
    assert metrics.cache_requests.labels("negative_hit").value == 1
    assert metrics.cache_requests.labels("miss").value == 0  # counted by fetch, not lookup


# --------------------------------------------------------------------------- judge


def test_judge_allows_a_verdict_with_every_required_scope(plan: Plan) -> None:
    assert judge(plan, plan.routes["api"], READER) is READER
    assert judge(plan, plan.routes["admin"], ADMIN) is ADMIN
    assert judge(plan, plan.routes["open"], NOBODY) is NOBODY  # no scopes required


@pytest.mark.parametrize(
    ("route", "verdict", "scope"),
    [("api", NOBODY, "read"), ("admin", READER, "read admin")],
)
def test_judge_refuses_a_verdict_missing_a_scope(
    plan: Plan, route: str, verdict: Active, scope: str
) -> None:
    refused = judge(plan, plan.routes[route], verdict)
    assert isinstance(refused, Denial)
    assert refused.status == 403
    assert refused.challenge == f'Bearer error="insufficient_scope", scope="{scope}"'
    assert json.loads(refused.body)["error"] == "insufficient_scope"


def test_judge_checks_scopes_by_whole_name(plan: Plan) -> None:
    near = Active("a", "1", ("reader", "rea", "READ"), "reader rea READ", 2e9)
    refused = judge(plan, plan.routes["api"], near)
    assert isinstance(refused, Denial) and refused.status == 403


@pytest.mark.parametrize(
    ("action", "status", "error"),
    [
        ("UNAUTHORIZED", 401, "invalid_token"),
        ("FORBIDDEN", 403, "insufficient_scope"),
        ("BAD_REQUEST", 400, "invalid_request"),
        ("INTERNAL_SERVER_ERROR", 500, "server_error"),
    ],
)
def test_judge_turns_an_inactive_verdict_into_authletes_answer(
    plan: Plan, action: str, status: int, error: str
) -> None:
    challenge = f'Bearer error="{error}", realm="x"'
    for route in ("api", "open"):  # with or without required scopes
        refused = judge(plan, plan.routes[route], Inactive(action, challenge))
        assert isinstance(refused, Denial)
        assert (refused.status, refused.challenge) == (status, challenge)
        assert json.loads(refused.body)["error"] == error


# --------------------------------------------------------------------------- unavailable


def test_unavailable_without_a_hint_is_the_fixed_503() -> None:
    assert unavailable(None) is SERVICE_UNAVAILABLE
    assert SERVICE_UNAVAILABLE.status == 503
    assert SERVICE_UNAVAILABLE.retry_after == "1"


@pytest.mark.parametrize(
    ("hint", "header"),
    [(0.0, "1"), (0.001, "1"), (1.0, "1"), (1.2, "2"), (2.999, "3"), (30.0, "30"), (-5.0, "1")],
)
def test_unavailable_rounds_the_retry_hint_up_to_whole_seconds(hint: float, header: str) -> None:
    refused = unavailable(hint)
    assert refused.retry_after == header
    assert refused.status == 503
    assert refused.body == SERVICE_UNAVAILABLE.body
    assert description(refused) == "The token could not be checked; try again."


# --------------------------------------------------------------------------- together


def test_a_request_through_every_stage(plan: Plan) -> None:
    verdicts = verdicts_of(plan.cfg)
    verdicts.cache.put_active(token_key("good"), READER, 60)
    head = inbound(plan, (b"Host", b"gw.test"), (b"Authorization", b"Bearer good"))
    assert check_framing(head, True, 0) is None
    where = routed(plan, b"GET", b"/api/orders/7")
    token = token_of(plan, head)
    assert token == "good"
    found = lookup(verdicts, token)
    assert not isinstance(found, Miss)
    verdict, cache = found
    assert cache == "hit"
    assert judge(plan, where.route, verdict) == READER
    # The same token on a route needing more is refused, hit or not.
    refused = judge(plan, routed(plan, b"GET", b"/admin").route, verdict)
    assert isinstance(refused, Denial) and refused.status == 403
