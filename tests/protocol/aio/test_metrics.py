"""The exporter: docs/metrics.md and the collector agree both ways; counters stay
monotonic across session churn; label sets stay bounded; both text formats are served."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sshrelay.protocol.aio.metrics import MetricsBook, TunnelCollector, make_registry, serve_metrics
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.pair import MuxPair
from sshrelay.protocol.stats import ForwardKey

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


class FakeSession:
    """What MetricsBook reads from a live MuxChannelSession, around a real multiplexer."""

    def __init__(self, mux: Multiplexer, names: dict[int, ForwardKey]) -> None:
        self.mux = mux
        self.forward_names = names
        self.write_stalls = 0


def _busy_pair() -> tuple[MuxPair, int, int]:
    """A pair that moved stream bytes, datagrams and pings on forwards 1 (tcp) and 2 (udp)."""
    pair = MuxPair().handshake()
    relay, client = pair.relay, pair.client
    sid = relay.open_stream(1, {"peer": "198.51.100.1:5000"})
    pair.drain()
    client.accept_stream(sid)
    pair.drain()
    relay.send_stream_data(sid, b"x" * 1000)
    fid = relay.open_flow(2, {"peer": "198.51.100.2:6000"}, 30.0, pair.now)
    relay.send_datagram(fid, b"y" * 100, pair.now)
    relay.send_ping(pair.now)
    pair.now += 0.002
    pair.drain()
    return pair, sid, fid


def _book_with_traffic(role: str) -> tuple[MetricsBook, FakeSession, MuxPair]:
    book = MetricsBook(role)
    names = {1: book.forward_key("web", "tcp"), 2: book.forward_key("wg", "udp")}
    pair, _, _ = _busy_pair()
    session = FakeSession(pair.relay if role == "relay" else pair.client, names)
    book.session_started(session)
    book.auth_failures["unknown_key"] = 1
    book.forwards_refused["address_in_use"] = 1
    return book, session, pair


def _families(*books: MetricsBook) -> list[Metric]:
    return list(TunnelCollector(books).collect())


def _exported_name(family: Metric) -> str:
    return f"{family.name}_total" if family.type == "counter" else family.name


def _doc_table() -> dict[str, tuple[str, set[str]]]:
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `(sshrelay_\w+)` \| (\w+) \| ([\w, ]+) \|", line)
        if match:
            labels = {label.strip() for label in match.group(3).split(",")}
            rows[match.group(1)] = (match.group(2), labels)
    return rows


def test_every_exported_metric_is_documented_and_every_documented_one_exported() -> None:
    relay_book, _, _ = _book_with_traffic("relay")
    client_book, _, _ = _book_with_traffic("client")
    exported: dict[str, tuple[str, set[str]]] = {}
    for family in _families(relay_book, client_book):
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        exported[_exported_name(family)] = (family.type, labels)
    documented = _doc_table()
    assert documented, "docs/metrics.md has no catalogue table"
    assert set(exported) == set(documented), (
        f"undocumented: {sorted(set(exported) - set(documented))}; "
        f"documented but not exported: {sorted(set(documented) - set(exported))}"
    )
    for name, (kind, labels) in exported.items():
        doc_kind, doc_labels = documented[name]
        assert kind == doc_kind, f"{name}: exporter says {kind}, docs say {doc_kind}"
        assert labels == doc_labels, f"{name}: exporter labels {labels}, docs {doc_labels}"


def _sample(families: list[Metric], name: str, **labels: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_counters_are_monotonic_across_session_churn_and_move_while_live() -> None:
    book = MetricsBook("client")
    names = {1: book.forward_key("web", "tcp"), 2: book.forward_key("wg", "udp")}
    seen: list[float] = []
    for _ in range(3):
        pair, sid, _fid = _busy_pair()
        session = FakeSession(pair.client, names)
        book.session_started(session)
        live_before = _sample(
            _families(book), "sshrelay_forward_bytes_total", forward="web", direction="in"
        )
        pair.relay.send_stream_data(sid, b"z" * 500)  # more traffic while the session lives
        pair.drain()
        live_after = _sample(
            _families(book), "sshrelay_forward_bytes_total", forward="web", direction="in"
        )
        assert live_after == live_before + 500, "counter did not move during the session"
        seen.append(live_after)
        book.session_finished(session)
        finished = _sample(
            _families(book), "sshrelay_forward_bytes_total", forward="web", direction="in"
        )
        assert finished == live_after, "finishing a session changed the total"
        assert _sample(_families(book), "sshrelay_forward_streams_active", forward="web") == 0
    assert seen == [1500.0, 3000.0, 4500.0]
    families = _families(book)
    assert _sample(families, "sshrelay_forward_datagrams_total", forward="wg", direction="in") == 3
    assert _sample(families, "sshrelay_connects_total") == 3
    assert _sample(families, "sshrelay_reconnects_total") == 2
    assert _sample(families, "sshrelay_rtt_seconds_count") == 0  # client sent no ping


def test_many_flows_and_streams_add_no_label_values() -> None:
    book = MetricsBook("relay")
    names = {1: book.forward_key("web", "tcp"), 2: book.forward_key("wg", "udp")}
    pair = MuxPair().handshake()
    session = FakeSession(pair.relay, names)
    book.session_started(session)

    def label_values() -> set[tuple[tuple[str, str], ...]]:
        return {
            tuple(sorted(sample.labels.items()))
            for family in _families(book)
            for sample in family.samples
        }

    before = label_values()
    for index in range(1000):
        fid = pair.relay.open_flow(
            2, {"peer": f"198.51.100.{index % 250}:{1000 + index}"}, 60.0, 0.0
        )
        pair.relay.send_datagram(fid, b"d", 0.0)
    for _ in range(500):
        pair.relay.open_stream(1, {"peer": "203.0.113.9:40000"})
    pair.drain()
    assert pair.client.flow_count() == 1000
    assert label_values() == before


def test_forward_names_are_capped() -> None:
    book = MetricsBook("relay")
    keys = {book.forward_key(f"name-{index}", "tcp") for index in range(1000)}
    assert len(keys) == 257  # 256 real names plus the shared "other"
    assert ("other", "tcp") in keys


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", "text/plain"),
        (
            "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
            "application/openmetrics-text",
        ),
    ],
)
def test_metrics_endpoint_negotiates_the_text_format(accept: str, content_type: str) -> None:
    book, _, _ = _book_with_traffic("relay")

    async def scrape() -> tuple[str, str]:
        server = await serve_metrics("127.0.0.1", 0, make_registry(book))
        port = server.sockets[0].getsockname()[1]

        def fetch() -> tuple[str, str]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
            if accept:
                request.add_header("Accept", accept)
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.headers["Content-Type"], response.read().decode()

        try:
            return await asyncio.to_thread(fetch)
        finally:
            server.close()
            await server.wait_closed()

    got_type, body = asyncio.run(scrape())
    assert got_type.startswith(content_type)
    if content_type == "text/plain":
        names = {family.name for family in text_string_to_metric_families(body)}
        assert "sshrelay_forward_bytes" in names
        assert "sshrelay_rtt_seconds" in names
    else:
        assert body.rstrip().endswith("# EOF")
        assert 'sshrelay_forward_bytes_total{direction="in",forward="web"' in body
