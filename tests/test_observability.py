"""The observability files the project ships, checked without a Prometheus server:

- the dashboard, the rules and their Helm chart copies are what observability/queries.yaml
  renders (`python -m observability.build --check`), the copies identical;
- the dashboard's structure: the `${datasource}` variable of type prometheus on every panel
  and target, the namespace/pod/route variables with a regex-all "All", every target's
  expression one of the named queries with the variables added (and, with the variables
  substituted and the window put back, exactly that query), every subject the dashboard
  must show covered;
- the README's PromQL is made only of named queries (which tests/test_promql.py proves);
- `promtool check rules` is clean and `promtool test rules` passes, with a firing and a
  quiet unit test for every alert;
- the Helm chart renders the dashboard ConfigMap (with the Grafana sidecar's label) and the
  PrometheusRule when asked, byte for byte the shipped files, and neither by default.

The live proof of every expression against a real Prometheus is tests/test_promql.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from observability import build
from tests.conftest import need_tool

REPO = Path(__file__).resolve().parent.parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ALL = {"namespace": ".*", "pod": ".*", "route": ".*"}


def board() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(build.DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in board()["panels"] if p["type"] != "row"]


# ------------------------------------------------------------------------------ generated


def test_generated_files_are_up_to_date() -> None:
    stale = [str(p.relative_to(REPO)) for p in build.stale()]
    assert not stale, f"out of date (run `python -m observability.build`): {stale}"


def test_chart_copies_are_the_shipped_files() -> None:
    assert build.CHART_DASHBOARD.read_bytes() == build.DASHBOARD.read_bytes()
    assert build.CHART_RULES.read_bytes() == build.RULES.read_bytes()


def test_every_named_query_is_shipped_somewhere() -> None:
    source = build.load()
    used = {name for name, _ in source.readme}
    used |= {t["query"] for t in build.dashboard_targets(source)}
    assert set(source.queries) - used == set()


# ------------------------------------------------------------------------------ dashboard


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in board()["templating"]["list"]}
    assert list(variables) == list(build.DASHBOARD_VARIABLES)
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for name in ("namespace", "pod", "route"):
        var = variables[name]
        assert var["type"] == "query", name
        assert var["datasource"] == DATASOURCE, name
        assert var["query"] == var["definition"] == build.variable_queries()[name]
        # "All" must match every value and series without the label (a scrape without
        # Kubernetes labels): the regex-all value, which tests/test_promql.py substitutes.
        assert var["includeAll"] is True and var["allValue"] == ".*", name
        assert var["multi"] is True, name


def test_dashboard_metadata() -> None:
    data = board()
    assert data["uid"] == "authlete-gateway"
    assert 36 <= data["schemaVersion"] <= 41
    assert data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_datasource_and_queries() -> None:
    found = panels()
    assert len(found) >= 20
    for panel in found:
        title = panel["title"]
        assert panel["type"] == "timeseries", title
        assert panel["datasource"] == DATASOURCE, title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["description"], title
        assert panel["targets"], title
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
            assert "legendFormat" in target, title


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in board()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def untemplated(expr: str) -> str:
    """A dashboard expression with the variables at "All" and the matchers they added
    removed, its window put back: the named query it must be."""
    expr = build.substitute(expr, ALL, window="5m")
    expr = re.sub(r', (namespace|pod|route)=~"\.\*"', "", expr)
    expr = re.sub(r'\{(namespace|pod|route)=~"\.\*"\}', "", expr)
    return expr


def test_every_dashboard_query_is_a_proven_query() -> None:
    """Each target's expression is a named query (tests/test_promql.py runs it, and the
    target itself with its variables substituted, against a real Prometheus)."""
    queries = {q.expr: name for name, q in build.load().queries.items()}
    templated = {build.dashboard_expr(expr): name for expr, name in queries.items()}
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr in templated, f"{panel['title']}: not a named query: {expr}"
            assert untemplated(expr) in queries, (panel["title"], untemplated(expr))
            assert queries[untemplated(expr)] == templated[expr]
            used = set(re.findall(r"\$(\w+)", expr))
            assert used <= {"namespace", "pod", "route", "__rate_interval"}, used
            assert {"namespace", "pod"} <= used, f"{panel['title']}: not filtered: {expr}"


def test_every_selector_is_filtered_by_the_variables() -> None:
    for panel in panels():
        for target in panel["targets"]:
            for name, matchers in re.findall(
                r"\b((?:gateway|process)_\w+)(\{[^}]*\})?", target["expr"]
            ):
                assert 'namespace=~"$namespace"' in matchers, (panel["title"], name)
                assert 'pod=~"$pod"' in matchers, (panel["title"], name)
                has_route = build.family(name) in build.ROUTE_FAMILIES
                assert ('route=~"$route"' in matchers) == has_route, (panel["title"], name)


# What the dashboard must show (issue 14): each subject by a metric one of its panels uses.
SUBJECTS = {
    "traffic by route and status": "gateway_requests_total",
    "denials": "gateway_authlete_budget_rejected_total",
    "gateway overhead": "gateway_overhead_seconds_bucket",
    "upstream latency": "gateway_upstream_duration_seconds_bucket",
    "cache hit ratio": "gateway_cache_requests_total",
    "cache entries": "gateway_cache_entries",
    "Authlete calls by outcome": "gateway_introspection_requests_total",
    "Authlete latency": "gateway_introspection_duration_seconds_bucket",
    "budget tokens": "gateway_authlete_budget_tokens",
    "budget waits": "gateway_authlete_budget_wait_seconds_count",
    "breaker state": "gateway_authlete_breaker_state",
    "429s received": "gateway_authlete_throttled_total",
    "shared-state mode": "gateway_shared_mode",
    "open connections": "gateway_open_connections",
    "process memory": "process_resident_memory_bytes",
    "process CPU": "process_cpu_seconds_total",
    "reloads": "gateway_config_reloads_total",
    "decisions": "gateway_decisions_total",
    "upstream errors": "gateway_upstream_errors_total",
    "readiness": "gateway_ready",
}


def test_dashboard_covers_every_subject() -> None:
    used = {
        name
        for panel in panels()
        for target in panel["targets"]
        for name in re.findall(r"\b((?:gateway|process)_\w+)", target["expr"])
    }
    missing = {subject: metric for subject, metric in SUBJECTS.items() if metric not in used}
    assert not missing


def test_denials_show_401_and_403() -> None:
    titles = {p["title"]: p for p in panels()}
    exprs = [t["expr"] for t in titles["Denials by reason"]["targets"]]
    assert any('status=~"401|403"' in e for e in exprs)
    assert any("sum by (reason)" in e and "gateway_denials_total" in e for e in exprs)


# ------------------------------------------------------------------------------ README


def test_readme_queries_are_named_queries() -> None:
    """Every expression in the README's ```promql blocks is a named query, so the live test
    proves it (the block is `python -m observability.build --readme`)."""
    found = build.readme_expressions((REPO / "README.md").read_text())
    assert found, "no ```promql block in README.md"
    queries = {build.normal(q.expr): name for name, q in build.load().queries.items()}
    unknown = [expr for expr in found if build.normal(expr) not in queries]
    assert not unknown, f"README queries not in observability/queries.yaml: {unknown}"


def test_readme_block_parses_back_to_its_queries() -> None:
    source = build.load()
    found = build.readme_expressions(build.readme_block(source))
    assert found == [source.queries[name].expr for name, _ in source.readme]


# ------------------------------------------------------------------------------ rules


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(build.RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(build.load().alerts)} rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(build.RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load(build.RULE_TESTS.read_text())
    assert tests["rule_files"] == ["../gateway-rules.yaml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {a.name for a in build.load().alerts}
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert fires | quiet <= alerts


def test_rules_are_well_formed() -> None:
    rules = yaml.safe_load(build.RULES.read_text())
    (group,) = rules["groups"]
    for rule in group["rules"]:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


# ------------------------------------------------------------------------------ Helm


def helm_render(*args: str) -> list[dict[str, Any]]:
    from tests.test_helm import render  # skips when helm is missing

    return render(*args)


DASHBOARD_ON = ("--set", "metrics.grafanaDashboard.enabled=true")
RULES_ON = ("--set", "metrics.prometheusRule.enabled=true")


def _dashboards(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "ConfigMap" and "gateway-dashboard.json" in d["data"]]


def test_chart_renders_neither_by_default() -> None:
    docs = helm_render()
    assert not _dashboards(docs)
    assert not [d for d in docs if d["kind"] == "PrometheusRule"]


def test_chart_dashboard_configmap_is_the_shipped_dashboard() -> None:
    docs = helm_render(*DASHBOARD_ON)
    (cm,) = _dashboards(docs)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["gateway-dashboard.json"]) == board()
    assert cm["data"]["gateway-dashboard.json"] + "\n" == build.DASHBOARD.read_text()
    # The sidecar's label and namespace are those of your Grafana.
    docs = helm_render(
        *DASHBOARD_ON,
        "--set", "metrics.grafanaDashboard.label=my_dashboards",
        "--set", "metrics.grafanaDashboard.labelValue=yes",
        "--set", "metrics.grafanaDashboard.namespace=monitoring",
        "--set", "metrics.grafanaDashboard.annotations.grafana_folder=Gateways",
    )  # fmt: skip
    (cm,) = _dashboards(docs)
    assert cm["metadata"]["labels"]["my_dashboards"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Gateways"}


def test_chart_prometheus_rule_is_the_shipped_rules() -> None:
    docs = helm_render(*RULES_ON, "--set", "metrics.prometheusRule.labels.release=prom")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == yaml.safe_load(build.RULES.read_text())


@pytest.mark.parametrize("shape", ["standalone", "sidecar"])
def test_chart_renders_both_in_either_mode(shape: str) -> None:
    sidecar = ("-f", str(REPO / "helm" / "gateway" / "values-sidecar.yaml"))
    docs = helm_render(*DASHBOARD_ON, *RULES_ON, *(sidecar if shape == "sidecar" else ()))
    assert len(_dashboards(docs)) == 1
    assert len([d for d in docs if d["kind"] == "PrometheusRule"]) == 1
