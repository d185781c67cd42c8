"""The operators' dashboard and alert rules, checked offline: promtool accepts the rules and
their unit tests, the dashboard's queries parse, and every metric either names is one that the
running services (or the cleanup job) really expose."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devstack.system import Backends, System
from tests.helpers import run_cleanup_job, system_over

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "payment-push.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-rules.yaml"
MONITORING_KUSTOMIZATION = ROOT / "deploy" / "k8s" / "monitoring" / "kustomization.yaml"

# Grafana's own variables, as Prometheus would see them once Grafana filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}
# PromQL's words that are neither functions (followed by `(`) nor metric names.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_OPERATORS = {"and", "or", "unless", "bool", "offset"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make setup` installs it (Debian's prometheus package)")
    return found


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append(expr)
    return queries


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        rules.extend(group["rules"])
    return rules


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, grouping lists, functions and keywords are taken out."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word in PROMQL_WORDS or word in PROMQL_OPERATORS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="b c"}[5m]))) > 1 '
        "and on() (hour() + 7) % 24 or sum(b_total offset 15m) / c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def exposed_series(metrics_text: str) -> set[str]:
    """Every series name a /metrics page makes (`_total` of counters, `_bucket` of
    histograms, ...), whether or not a labelled metric has a sample yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alerts_fire_when_they_should_and_stay_quiet_otherwise() -> None:
    """promtool's unit tests (alerts.test.yml): synthetic series in, the alerts expected out
    (a silent ingest alerts in Vietnam's business hours only, a disconnected gateway names its
    pod, 503s from MongoDB alert, a publish backlog that does not drain alerts)."""
    result = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERT_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_summary_and_description() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_prometheus_rule_carries_exactly_the_alert_rules() -> None:
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    assert manifest["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    kustomization = yaml.safe_load(MONITORING_KUSTOMIZATION.read_text())
    assert PROMETHEUS_RULE.name in kustomization["resources"]


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Each panel's query, as a recording rule promtool must accept."""
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_dashboard_panels_use_the_prometheus_variable_and_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "payment-push"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


@pytest.fixture(scope="module")
def system(servers: Backends) -> Iterator[System]:
    with system_over(servers, "monitoring") as started:
        yield started


async def scrape(system: System) -> dict[str, str]:
    """Each service's /metrics page, read from its running process."""
    s = system.settings
    ports = {
        "webhook-ingest": s.webhook_ingest_port,
        "stream-gateway": s.stream_gateway_port,
        "session-api": s.session_api_port,
    }
    pages = {}
    async with aiohttp.ClientSession() as http:
        for name, port in ports.items():
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                pages[name] = await resp.text()
    return pages


async def cleanup_job_series(system: System) -> set[str]:
    """What the cleanup CronJob pushes to the Pushgateway (it has no /metrics of its own): one
    real run of `python -m session_api.cleanup` against a stand-in Pushgateway."""
    [(_method, _path, body)] = await run_cleanup_job(system.settings)
    return exposed_series(body)


async def test_every_metric_the_dashboard_and_alerts_read_is_exposed(system: System) -> None:
    exposed = await cleanup_job_series(system)
    for page in (await scrape(system)).values():
        exposed |= exposed_series(page)
    used: dict[str, set[str]] = {}
    for query in dashboard_queries():
        for name in metric_names(query):
            used.setdefault(name, set()).add(f"dashboard: {query}")
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    assert len(used) > 10
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert missing == {}


async def test_the_dashboard_charts_every_metric_the_services_expose(system: System) -> None:
    """A metric added to a service without a panel is a metric nobody looks at."""
    charted = set().union(*(metric_names(q) for q in dashboard_queries()))
    for service, page in (await scrape(system)).items():
        uncharted = {
            family.name
            for family in text_string_to_metric_families(page)
            # `_created`: the text format's creation time of a counter or histogram.
            if family.name.startswith("paypush_")
            and not family.name.endswith("_created")
            and not {family.name, f"{family.name}_total", f"{family.name}_bucket"} & charted
        }
        assert uncharted == set(), (service, sorted(uncharted))
