"""Warnings about valid route tables that probably do not do what their author meant.

`gateway check-config` prints each as `warning: <line>` and still exits 0: the file is
valid, and the pattern can be deliberate.

- A protected route limited by `methods`, followed by a broader route (an ancestor prefix
  such as `/`, or any public route covering its prefix): the other methods of that prefix
  go to the broader route, with its scopes, or without any token at all.
- A public catch-all (`path_prefix: /`, `auth: none`): every path no earlier route matches
  is forwarded without a token, and an upstream that matches prefixes as strings
  (nginx `location /admin` also matches `/adminx`) may route such a path where the
  gateway would not.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import Config, Route


def warnings(cfg: Config) -> list[str]:
    """One line per finding, in route order."""
    out: list[str] = []
    routes = cfg.routes
    analysed: set[str] = set()
    for i, route in enumerate(routes):
        limited = route.auth_required and route.methods is not None
        if limited and route.path_prefix not in analysed:
            analysed.add(route.path_prefix)
            out.extend(_other_methods(i, routes))
    for i, route in enumerate(routes):
        if not route.auth_required and route.path_prefix == "/":
            out.append(_public_catch_all(route, routes[:i]))
    if cfg.decision is not None and not cfg.trusted_proxies:
        out.append(
            "decision mode is on but trusted_proxies is empty: every decision request is "
            "refused (403); list the ingress's addresses"
        )
    for i, route in enumerate(routes):
        if route.upstream is None:
            out.extend(_proxied_instead(route, routes[i + 1 :]))
    return out


def _proxied_instead(route: Route, later: Sequence[Route]) -> list[str]:
    for other in later:
        if other.upstream is not None and covers(other.path_prefix, route.path_prefix):
            rules = "no token" if not other.auth_required else "its own scopes"
            return [
                f"route {route.name!r} has no upstream (decisions only): proxied requests to "
                f"{route.path_prefix} are taken by route {other.name!r} ({other.path_prefix}) "
                f"with {rules}"
            ]
    return []


def covers(prefix: str, path: str) -> bool:
    """Whether every path under `path` also matches `prefix` (whole segments)."""
    return prefix == "/" or prefix == path or path.startswith(prefix + "/")


def _other_methods(index: int, routes: Sequence[Route]) -> list[str]:
    """Where the methods that route `index` (protected, limited by `methods`) does not
    take go, for its whole prefix, if a broader route takes them."""
    limited = routes[index]
    prefix = limited.path_prefix
    assert limited.methods is not None
    # Methods an earlier route takes for the whole prefix never reach this one.
    decided = set(limited.methods)
    for earlier in routes[:index]:
        if earlier.methods is not None and covers(earlier.path_prefix, prefix):
            decided |= earlier.methods
    group = [limited]  # protected routes for exactly this prefix, split by method
    out: list[str] = []
    for later in routes[index + 1 :]:
        if not covers(later.path_prefix, prefix):
            continue
        taken = None if later.methods is None else later.methods - decided
        if taken is not None and not taken:
            continue
        if later.path_prefix == prefix and later.auth_required:
            # A deliberate split by method (e.g. writes need another scope): nothing
            # falls through unnoticed.
            group.append(later)
        else:
            out.append(_fall_through(group, later, taken, decided))
        if later.methods is None:
            break
        decided |= later.methods
    return out


def _fall_through(
    group: list[Route], broader: Route, taken: frozenset[str] | None, decided: set[str]
) -> str:
    prefix = group[0].path_prefix
    protected = _names({m for r in group for m in r.methods or ()})
    names = ", ".join(repr(r.name) for r in group)
    what = (
        f"requests to {prefix} with any other method (not {_names(decided)})"
        if taken is None
        else f"{_names(taken)} requests to {prefix}"
    )
    head = (
        f"route{'s' if len(group) > 1 else ''} {names} take{'' if len(group) > 1 else 's'} "
        f"only {protected} for {prefix}: {what} fall through to route {broader.name!r} "
        f"({broader.path_prefix})"
    )
    if not broader.auth_required:
        return (
            f"{head}, which is auth: none: they reach {_target(broader)} WITHOUT a "
            f"token; add a route for the other methods, or drop `methods`"
        )
    checks = f"only its own scopes ({' '.join(broader.scopes)})" if broader.scopes else "any token"
    return f"{head}, which accepts {checks}"


def _public_catch_all(route: Route, earlier: Sequence[Route]) -> str:
    example = next(
        (r.path_prefix for r in earlier if r.auth_required and r.path_prefix != "/"), "/admin"
    )
    methods = f" ({_names(route.methods)})" if route.methods is not None else ""
    return (
        f"route {route.name!r} (/) is a public catch-all{methods}: any path no earlier route "
        f"matches is forwarded to {_target(route)} without a token; the gateway "
        f"matches whole segments ({example} does not match {example}x), but an upstream "
        f'that matches by string prefix (nginx "location {example}") may serve {example}x '
        f"as part of {example}"
    )


def _target(route: Route) -> str:
    return route.upstream.origin if route.upstream is not None else "the ingress's upstream"


def _names(methods: frozenset[str] | set[str] | Sequence[str]) -> str:
    return ", ".join(sorted(methods))
