"""The shipped dashboards and alert rules, proven against a real Prometheus.

A real relay and client (subprocesses, keys, 127.0.0.1 only) carry one TCP and one
UDP forward to local echo targets; a real Prometheus (Debian package `prometheus`)
scrapes both ends every second with a config made from grafana/prometheus.yml
(only the targets, intervals and the rule file's path changed) and loads
grafana/alerts.yml. While traffic flows through the tunnel, the test runs:

- every PromQL expression of every panel of every dashboard, with Grafana's
  variables substituted (dashboard variables -> the regex ``.*``;
  ``$__rate_interval`` -> 1m, ``$__range`` -> 5m, ``$__interval`` -> 15s),
  and every template variable's ``label_values()`` query;
- every alert rule as Prometheus loaded it. An alert expression is empty while
  nothing is wrong, so it cannot prove the metrics are there. Instead each rule
  is cut into its parts at the top-level ``or`` / ``and`` / ``unless``; a part
  that compares against a threshold (``X > 0.25``) is evaluated WITHOUT the
  comparison (just ``X``), and ``absent(X)`` is evaluated as ``X``. Every such
  part must return data. The whole expression must return nothing: a healthy
  tunnel fires no alert.

Each query must return at least one series with a finite value (a quantile over
an empty histogram is NaN, which is no proof that the panel shows anything).
The promtool checks of the shipped files (config, rules, rule unit tests) are
separate tests below.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"
GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
ALERTS = GRAFANA / "alerts.yml"

# What the Grafana built-ins stand for when the test runs a query itself.
BUILTINS = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


# ---------------------------------------------------------------------------- PromQL helpers


def substitute(expr: str, variables: set[str]) -> str:
    """Grafana's variables replaced: dashboard ones by ``.*``, built-ins by fixed durations."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in variables:
            return ".*"
        raise AssertionError(f"undefined variable ${name} in {expr!r}")

    return VARIABLE.sub(replace, expr)


def _mask(expr: str) -> str:
    """``expr`` with everything inside brackets or strings blanked, so that what is left
    visible is the top level of the expression (same length, same positions)."""
    out: list[str] = []
    depth = 0
    quote = ""
    escaped = False
    for char in expr:
        if quote:
            out.append(" ")
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            continue
        if char in "\"'`":
            quote = char
            out.append(" ")
        elif char in "([{":
            out.append(char if depth == 0 else " ")
            depth += 1
        elif char in ")]}":
            depth -= 1
            out.append(char if depth == 0 else " ")
        else:
            out.append(char if depth == 0 else " ")
    return "".join(out)


def _strip_parens(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and _mask(expr).find(")") == len(expr) - 1:
        expr = expr[1:-1].strip()
    return expr


def data_parts(expr: str) -> list[str]:
    """The parts of an alert expression that must return data while all is well.

    Split at top-level ``or``/``and``/``unless``; in each part drop a top-level
    comparison and what follows it (``X > 0.25`` -> ``X``); ``absent(X)`` -> ``X``.
    """
    expr = _strip_parens(expr)
    masked = _mask(expr)
    cuts = [0]
    for match in re.finditer(r"(?<![\w:])(or|and|unless)(?![\w:])", masked):
        cuts += [match.start(), match.end()]
    cuts.append(len(expr))
    parts = []
    for start, end in zip(cuts[::2], cuts[1::2], strict=True):
        part = _strip_parens(expr[start:end])
        comparison = re.search(r"==|!=|>=|<=|>|<", _mask(part))
        if comparison:
            part = _strip_parens(part[: comparison.start()])
        absent = re.fullmatch(r"absent\s*\((.*)\)", part, re.DOTALL)
        if absent:
            part = _strip_parens(absent.group(1))
        parts.append(part)
    return parts


def test_data_parts_cuts_comparisons_and_set_operators() -> None:
    assert data_parts('up == 0 or absent(up{role="relay"})') == ["up", 'up{role="relay"}']
    assert data_parts('(a{x=~"y|z"} / b) > 0.01 and sum(c) >= 10') == ['a{x=~"y|z"} / b', "sum(c)"]
    assert data_parts("histogram_quantile(0.99, sum by (le) (rate(h[5m]))) > 0.25") == [
        "histogram_quantile(0.99, sum by (le) (rate(h[5m])))"
    ]
    assert data_parts('increase(r{role="client"}[15m]) > 3') == ['increase(r{role="client"}[15m])']


# ---------------------------------------------------------------------------- Prometheus


class Prometheus:
    """The HTTP API of a Prometheus on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.base = f"http://{LOOPBACK}:{port}"

    def get(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.base}{path}?{query}", timeout=10) as response:
            return json.load(response)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at the server's now; the result as a list of series."""
        data = urllib.parse.urlencode({"query": expr}).encode()
        try:
            with urllib.request.urlopen(f"{self.base}/api/v1/query", data, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Prometheus rejected {expr!r}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def _finite(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(item["value"][1])) for item in series)


def _prometheus_config(relay_metrics: str, client_metrics: str) -> str:
    """grafana/prometheus.yml with the real ports, 1 s intervals and the absolute rule path."""
    text = (GRAFANA / "prometheus.yml").read_text()
    replacements = {
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
        '"127.0.0.1:9817"': json.dumps(relay_metrics),
        '"127.0.0.1:9818"': json.dumps(client_metrics),
        "- alerts.yml": f"- {json.dumps(str(ALERTS))}",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"grafana/prometheus.yml: expected {old!r} exactly once"
        text = text.replace(old, new)
    return text


def _start_prometheus(bed: Any, binary: str, config: Path) -> tuple[Any, Prometheus]:
    """Start Prometheus on a free loopback port (retrying if that port was taken meanwhile)."""
    for attempt in range(3):
        port = bed.free_port()
        proc = bed.start(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={bed.root / f'tsdb-{attempt}'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            "prometheus",
        )
        api = Prometheus(port)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and proc.running() and not api.ready():
            time.sleep(0.1)
        if api.ready():
            return proc, api
        if proc.running():
            raise AssertionError(f"Prometheus not ready after 20 s:\n{proc.describe()}")
        if "address already in use" not in proc.stderr:
            raise AssertionError(f"Prometheus exited:\n{proc.describe()}")
    raise AssertionError("Prometheus found no free port in 3 tries")


# ---------------------------------------------------------------------------- traffic


def _drive_traffic(tcp_port: int, udp_port: int, rounds: int = 30, pace: float = 0.2) -> None:
    """Bounded TCP and UDP load through the tunnel, spread over ``rounds * pace`` seconds."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((LOOPBACK, 0))
    peer.settimeout(2.0)
    replies = 0
    try:
        for round_no in range(rounds):
            started = time.monotonic()
            payload = os.urandom(64 * 1024)
            with socket.create_connection((LOOPBACK, tcp_port), timeout=10) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                echoed = bytearray()
                while chunk := sock.recv(1 << 16):
                    echoed += chunk
            assert echoed == payload, f"round {round_no}: TCP echo came back wrong"
            for index in range(10):
                peer.sendto(bytes([index]) * 1200, (LOOPBACK, udp_port))
            for _ in range(10):
                try:
                    peer.recvfrom(65_536)
                    replies += 1
                except TimeoutError:
                    break
            time.sleep(max(0.0, pace - (time.monotonic() - started)))
    finally:
        peer.close()
    assert replies >= rounds * 10 // 2, f"only {replies} of {rounds * 10} UDP replies came back"


# ---------------------------------------------------------------------------- the test


def _dashboard_queries() -> list[tuple[str, str, str, set[str]]]:
    """(dashboard, panel title, expr, variable names) for every target of every panel."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = {var["name"] for var in board["templating"]["list"]}
        panels = list(board["panels"])
        for panel in board["panels"]:
            panels += panel.get("panels", [])
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"], variables))
    return found


def _variable_queries() -> list[tuple[str, str, str, str, set[str]]]:
    """(dashboard, variable, selector, label, variable names) of every label_values() variable."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = {var["name"] for var in board["templating"]["list"]}
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((?:(.*),\s*)?(\w+)\)", query.strip())
            assert match, f"{path.name} ${var['name']}: not a label_values() query: {query!r}"
            found.append((path.name, var["name"], match.group(1) or "", match.group(2), variables))
    return found


def _poll(what: str, probe: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value, ok = probe()
        if ok:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {what}; last result: {value}")
        time.sleep(0.25)


@pytest.mark.timeout(90)
def test_every_dashboard_and_alert_query_returns_data(bed, targets, require_tool) -> None:
    binary = require_tool("prometheus")
    require_tool("promtool")
    assert DASHBOARDS, "no dashboards in grafana/dashboards"

    # Both ends ping every 0.5 s so the RTT histograms fill within the test.
    serve_toml = bed.write("serve.toml", "[serve]\nping_interval = 0.5\n")
    connect_toml = bed.write("connect.toml", "[connect]\nping_interval = 0.5\n")
    tcp_target = targets.tcp_echo()
    udp_target = targets.udp()
    relay = bed.serve("--metrics", f"{LOOPBACK}:0", "--config", str(serve_toml))
    relay_metrics = relay.proc.wait_line(r"^relay: metrics on http://(\S+)/metrics").group(1)
    tunnel = bed.connect(
        relay,
        "web=" + bed.forward(tcp_target.port, "tcp"),
        "wg=" + bed.forward(udp_target.port, "udp"),
        extra=["--metrics", f"{LOOPBACK}:0", "--config", str(connect_toml)],
    )
    client_metrics = tunnel.proc.wait_line(r"^relay: metrics on http://(\S+)/metrics").group(1)

    config = bed.write("prometheus.yml", _prometheus_config(relay_metrics, client_metrics))
    prometheus, api = _start_prometheus(bed, binary, config)

    def targets_up() -> tuple[Any, bool]:
        active = api.get("/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        return health, health == {"sshrelay-relay": "up", "sshrelay-client": "up"}

    _poll("Prometheus scraping both ends", targets_up, timeout=15.0)

    _drive_traffic(tunnel.ports[0], tunnel.ports[1])
    traffic_end = time.time()

    def scraped_after_traffic() -> tuple[Any, bool]:
        stamps = api.query("timestamp(sshrelay_build_info)")
        jobs = {s["metric"]["job"] for s in stamps if float(s["value"][1]) > traffic_end}
        return stamps, jobs == {"sshrelay-relay", "sshrelay-client"}

    _poll("a scrape of both ends after the traffic", scraped_after_traffic)

    # Dashboards: every panel query returns data.
    empty: list[str] = []
    for board, title, expr, variables in _dashboard_queries():
        concrete = substitute(expr, variables)
        result = api.query(concrete)
        if not _finite(result):
            empty.append(f"{board} / {title}:\n    {concrete}\n    -> {result}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # Dashboards: every template variable lists values.
    expected = {
        "job": {"sshrelay-relay", "sshrelay-client"},
        "instance": {relay_metrics, client_metrics},
        "role": {"relay", "client"},
        "forward": {"web", "wg"},
    }
    for board, name, selector, label, variables in _variable_queries():
        params: dict[str, str | list[str]] = {}
        if selector:
            params["match[]"] = [substitute(selector, variables)]
        values = set(api.get(f"/api/v1/label/{label}/values", **params)["data"])
        want = expected.get(name, set())
        assert values and want <= values, (
            f"{board} ${name}: label_values({selector}, {label}) gave {sorted(values)}, "
            f"expected at least {sorted(want)}"
        )

    # Alerts: Prometheus loaded every rule of alerts.yml and evaluated it without error.
    names = set(re.findall(r"^\s*- alert:\s*(\w+)", ALERTS.read_text(), re.MULTILINE))

    def rules_evaluated() -> tuple[Any, bool]:
        groups = api.get("/api/v1/rules", type="alert")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        ok = {r["name"] for r in rules} == names and all(r["health"] == "ok" for r in rules)
        return rules, ok

    rules = _poll("every alert rule loaded and evaluated", rules_evaluated)
    assert len(names) >= 4, f"alerts.yml has only {sorted(names)}"

    # Alerts: the threshold-free parts return data; the alerts themselves stay quiet.
    failures: list[str] = []
    for rule in rules:
        for part in data_parts(rule["query"]):
            result = api.query(part)
            if not _finite(result):
                failures.append(f"{rule['name']}: part without data:\n    {part}\n    -> {result}")
        firing = api.query(rule["query"])
        if firing:
            failures.append(f"{rule['name']} would fire on a healthy tunnel: {firing}")
    assert not failures, "\n".join(failures)

    # Traffic really crossed, as the exporter counted it (sanity for the queries above).
    sent = api.query('sum by (role) (sshrelay_forward_datagrams_total{direction="out"})')
    assert {s["metric"]["role"] for s in sent if float(s["value"][1]) > 0} == {"relay", "client"}
    assert prometheus.running(), prometheus.describe()


# ---------------------------------------------------------------------------- promtool


def _promtool(require_tool: Any, *args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, *args],
        cwd=GRAFANA,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def test_promtool_check_config(require_tool) -> None:
    result = _promtool(require_tool, "check", "config", "prometheus.yml")
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(require_tool) -> None:
    result = _promtool(require_tool, "check", "rules", "alerts.yml")
    assert re.search(r"SUCCESS: [4-9]\d* rules found", result.stdout + result.stderr)


def test_promtool_rule_unit_tests(require_tool) -> None:
    result = _promtool(require_tool, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in result.stdout + result.stderr
