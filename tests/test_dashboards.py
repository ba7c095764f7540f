"""Structure of the shipped Grafana dashboards and alert rules (no Prometheus needed).

- panel ids unique per dashboard, dashboard uids unique;
- every querying panel (and every target and query variable) uses the
  ``${datasource}`` variable, itself a Prometheus datasource variable;
- every ``$var`` / ``${var}`` in a query is a templating variable or a Grafana
  built-in, and every templating variable filters at least one panel;
- every panel target has a PromQL expression;
- every metric name in the dashboards, the alert rules and their unit tests is
  in the real exporter's output and in the docs/metrics.md catalogue, and every
  label they filter or group by is one that metric carries.

tests/test_grafana_prometheus.py runs the same queries against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sshrelay.protocol.aio.metrics import MetricsBook, make_registry
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.pair import MuxPair
from sshrelay.protocol.stats import ForwardKey

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DOC = ROOT / "docs" / "metrics.md"
EXPECTED_DASHBOARDS = ("tunnel-health.json", "forward-detail.json")
DASHBOARD_PATHS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")
METRIC = re.compile(r"\bsshrelay_\w+")
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus when it scrapes


# ---------------------------------------------------------------------------- reading


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


BOARDS = {path.name: _load(path) for path in DASHBOARD_PATHS}


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in board.get("panels", []):
        found.append(panel)
        found += panel.get("panels", [])
    return found


def _querying(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in _panels(board) if panel["type"] != "row"]


def _variables(board: dict[str, Any]) -> list[dict[str, Any]]:
    return list(board.get("templating", {}).get("list", []))


def _variable_query(var: dict[str, Any]) -> str:
    query = var.get("query", "")
    return str(query.get("query", "") if isinstance(query, dict) else query)


def _refs(text: str) -> set[str]:
    return {match.group(1) or match.group(2) for match in VARIABLE.finditer(text)}


def _alert_exprs() -> dict[str, str]:
    """alert name -> expr, read from alerts.yml's layout (block or one-line ``expr:``)."""
    exprs: dict[str, str] = {}
    lines = (GRAFANA / "alerts.yml").read_text().splitlines()
    name = None
    for index, line in enumerate(lines):
        alert = re.match(r"\s*- alert:\s*(\w+)", line)
        if alert:
            name = alert.group(1)
            continue
        expr = re.match(r"(\s*)expr:\s*(.*)$", line)
        if expr and name:
            indent, value = len(expr.group(1)), expr.group(2).strip()
            if value in ("|", "|-", ">", ">-"):
                block = []
                for following in lines[index + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                value = " ".join(part for part in block if part)
            exprs[name] = value
            name = None
    return exprs


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target of every dashboard."""
    return [
        (f"{name} / {panel['title']}", target.get("expr", ""))
        for name, board in BOARDS.items()
        for panel in _querying(board)
        for target in panel.get("targets", [])
    ]


def _doc_catalogue() -> dict[str, tuple[str, set[str]]]:
    """metric -> (type, labels) from the docs/metrics.md catalogue table."""
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `(sshrelay_\w+)` \| (\w+) \| ([\w, ]+) \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), {x.strip() for x in match.group(3).split(",")})
    return rows


class _Session:
    """What MetricsBook reads from a live session, around a real multiplexer."""

    def __init__(self, mux: Multiplexer, names: dict[int, ForwardKey]) -> None:
        self.mux = mux
        self.forward_names = names
        self.write_stalls = 0


def _exporter_sample_names() -> set[str]:
    """Sample names in the real exporter's text output, both ends, after some traffic."""
    pair = MuxPair().handshake()
    pair.relay.open_stream(1, {"peer": "198.51.100.1:5000"})
    flow = pair.relay.open_flow(2, {"peer": "198.51.100.2:6000"}, 30.0, pair.now)
    pair.relay.send_datagram(flow, b"y" * 100, pair.now)
    pair.relay.send_ping(pair.now)
    pair.client.send_ping(pair.now)
    pair.now += 0.002
    pair.drain()
    names: set[str] = set()
    for role, mux in (("relay", pair.relay), ("client", pair.client)):
        book = MetricsBook(role)
        keys = {1: book.forward_key("web", "tcp"), 2: book.forward_key("wg", "udp")}
        book.session_started(_Session(mux, keys))
        text = generate_latest(make_registry(book)).decode()
        for family in text_string_to_metric_families(text):
            names |= {sample.name for sample in family.samples}
    return names


def _base_name(name: str, catalogue: dict[str, tuple[str, set[str]]]) -> str:
    """The catalogue name of a sample name (histogram series carry _bucket/_sum/_count)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and catalogue.get(base, ("",))[0] == "histogram":
            return base
    return name


# ---------------------------------------------------------------------------- dashboards


def test_both_dashboards_are_shipped() -> None:
    assert set(EXPECTED_DASHBOARDS) <= set(BOARDS), f"dashboards found: {sorted(BOARDS)}"
    for name, board in BOARDS.items():
        assert board.get("title"), f"{name}: no title"
        assert board.get("schemaVersion"), f"{name}: no schemaVersion"


def test_dashboard_uids_are_unique() -> None:
    uids = [board.get("uid") for board in BOARDS.values()]
    for name, board in BOARDS.items():
        uid = board.get("uid")
        assert isinstance(uid, str) and re.fullmatch(r"[a-z0-9-]{1,40}", uid), (
            f"{name}: uid {uid!r} (want 1-40 of [a-z0-9-])"
        )
    assert len(set(uids)) == len(uids), f"duplicate dashboard uids: {uids}"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panel_ids_are_unique(name: str) -> None:
    ids = [panel.get("id") for panel in _panels(BOARDS[name])]
    assert all(isinstance(i, int) for i in ids), f"{name}: panel without an integer id: {ids}"
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"{name}: duplicate panel ids {duplicates}"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_queries_through_the_datasource_variable(name: str) -> None:
    board = BOARDS[name]
    variables = {var["name"]: var for var in _variables(board)}
    datasource = variables.get("datasource")
    assert datasource is not None, f"{name}: no 'datasource' variable"
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus", (
        f"{name}: the 'datasource' variable must be a Prometheus datasource variable"
    )
    wrong = []
    for panel in _querying(board):
        if panel.get("datasource") != DATASOURCE:
            wrong.append(f"panel {panel['id']} {panel['title']!r}: {panel.get('datasource')}")
        for target in panel.get("targets", []):
            if target.get("datasource", DATASOURCE) != DATASOURCE:
                wrong.append(f"panel {panel['id']} target {target.get('refId')}")
    for var in variables.values():
        if var["type"] == "query" and var.get("datasource") != DATASOURCE:
            wrong.append(f"variable ${var['name']}: {var.get('datasource')}")
    assert not wrong, f"{name}: not using {DATASOURCE}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_target_has_an_expr(name: str) -> None:
    board = BOARDS[name]
    for panel in _querying(board):
        targets = panel.get("targets", [])
        assert targets, f"{name}: panel {panel['id']} {panel['title']!r} has no targets"
        ref_ids = [target.get("refId") for target in targets]
        assert len(set(ref_ids)) == len(ref_ids), f"{name}: panel {panel['id']}: refIds {ref_ids}"
        for target in targets:
            expr = target.get("expr")
            assert isinstance(expr, str) and expr.strip(), (
                f"{name}: panel {panel['id']} {panel['title']!r} target {target.get('refId')} "
                "has no expr"
            )


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_variables_are_defined_and_used(name: str) -> None:
    board = BOARDS[name]
    defined = [var["name"] for var in _variables(board)]
    assert len(set(defined)) == len(defined), f"{name}: duplicate variables {defined}"
    assert "[[" not in json.dumps(board), f"{name}: deprecated [[var]] syntax"

    used_by_panels: set[str] = set()
    for panel in _querying(board):
        texts = [json.dumps(panel.get("datasource")), panel.get("title", "")]
        texts += [target.get("expr", "") for target in panel.get("targets", [])]
        texts += [json.dumps(target.get("datasource")) for target in panel.get("targets", [])]
        for text in texts:
            refs = _refs(text)
            undefined = refs - set(defined) - BUILTINS
            assert not undefined, f"{name}: panel {panel['id']} uses undefined {undefined}: {text}"
            used_by_panels |= refs
    for var in _variables(board):
        query = _variable_query(var)
        undefined = _refs(query) - set(defined)
        assert not undefined, f"{name}: variable ${var['name']} uses undefined {undefined}"
        position = defined.index(var["name"])
        later = _refs(query) & set(defined[position:])
        assert not later, f"{name}: ${var['name']} depends on later variables {later}"
    unused = set(defined) - used_by_panels
    assert not unused, f"{name}: variables that filter no panel: {sorted(unused)}"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    boxes = []
    for panel in _panels(BOARDS[name]):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{name}: panel {panel['id']} {pos}"
        boxes.append((panel["id"], pos))
    for index, (first, a) in enumerate(boxes):
        for second, b in boxes[index + 1 :]:
            overlap = (
                a["x"] < b["x"] + b["w"]
                and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"]
                and b["y"] < a["y"] + a["h"]
            )
            assert not overlap, f"{name}: panels {first} and {second} overlap"


# ---------------------------------------------------------------------------- metric names


def _used_metric_names() -> dict[str, set[str]]:
    """metric name -> where it is used (dashboards, variables, alerts, alert unit tests)."""
    used: dict[str, set[str]] = {}
    sources = [(where, expr) for where, expr in _dashboard_exprs()]
    for name, board in BOARDS.items():
        sources += [(f"{name} ${var['name']}", _variable_query(var)) for var in _variables(board)]
    sources += [(f"alerts.yml {alert}", expr) for alert, expr in _alert_exprs().items()]
    sources.append(("alerts_test.yml", (GRAFANA / "alerts_test.yml").read_text()))
    for where, text in sources:
        for metric in METRIC.findall(text):
            used.setdefault(metric, set()).add(where)
    return used


def test_alert_rules_are_found() -> None:
    assert set(_alert_exprs()) >= {
        "SshrelayTunnelDown",
        "SshrelayRttP99High",
        "SshrelayDatagramDropRatioHigh",
        "SshrelayReconnectFlapping",
    }


def test_every_metric_used_is_exported_and_documented() -> None:
    used = _used_metric_names()
    assert len(used) >= 10, f"suspiciously few metric names found: {sorted(used)}"
    exported = _exporter_sample_names()
    catalogue = _doc_catalogue()
    assert catalogue, "docs/metrics.md has no catalogue table"
    not_exported = {m: sorted(w) for m, w in used.items() if m not in exported}
    assert not not_exported, f"not in the exporter's output: {not_exported}"
    undocumented = {
        m: sorted(w) for m, w in used.items() if _base_name(m, catalogue) not in catalogue
    }
    assert not undocumented, f"not in docs/metrics.md: {undocumented}"


def _label_problems(where: str, expr: str, catalogue: dict[str, tuple[str, set[str]]]) -> list[str]:
    problems = []
    metrics = set(METRIC.findall(expr))

    def labels_of(metric: str) -> set[str]:
        base = _base_name(metric, catalogue)
        labels = catalogue.get(base, ("", set()))[1] | SCRAPE_LABELS
        return labels | {"le"} if metric.endswith("_bucket") and base != metric else labels

    for metric, matchers in re.findall(r"\b(sshrelay_\w+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in labels_of(metric):
                problems.append(f"{where}: {metric} has no label {label!r}")
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (part.strip() for part in grouping.split(",")):
            for metric in metrics:
                if label and label not in labels_of(metric):
                    problems.append(
                        f"{where}: grouping by {label!r} but {metric} has no such label"
                    )
    return problems


def test_queries_filter_and_group_only_by_labels_the_metrics_have() -> None:
    catalogue = _doc_catalogue()
    sources = _dashboard_exprs()
    for name, board in BOARDS.items():
        sources += [(f"{name} ${var['name']}", _variable_query(var)) for var in _variables(board)]
    sources += [(f"alerts.yml {alert}", expr) for alert, expr in _alert_exprs().items()]
    problems = [p for where, expr in sources for p in _label_problems(where, expr, catalogue)]
    assert not problems, "\n".join(problems)


def test_label_check_catches_a_label_the_metric_lacks() -> None:
    catalogue = _doc_catalogue()
    bad = 'sum by (forward) (rate(sshrelay_datagrams_dropped_total{forward=~"$forward"}[5m]))'
    assert len(_label_problems("example", bad, catalogue)) == 2


# ---------------------------------------------------------------------------- the rest


def test_provisioning_prometheus_config_and_readme_are_shipped() -> None:
    for path in (
        "provisioning/datasources/prometheus.yml",
        "provisioning/dashboards/sshrelay.yml",
        "prometheus.yml",
        "alerts.yml",
        "alerts_test.yml",
        "README.md",
    ):
        assert (GRAFANA / path).is_file(), f"grafana/{path} is missing"
    assert "type: prometheus" in (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    readme = (GRAFANA / "README.md").read_text()
    for alert in _alert_exprs():
        assert alert in readme, f"grafana/README.md does not explain {alert}"
    for name in BOARDS:
        assert name in readme, f"grafana/README.md does not mention dashboards/{name}"
