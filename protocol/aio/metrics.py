"""Prometheus metrics for both ends, read at scrape time, served on the event loop.

The hot path never touches prometheus_client: multiplexers bump plain integers
(``protocol/stats.py``). ``MetricsBook`` remembers the totals of finished
sessions and which sessions are live; ``TunnelCollector`` sums both when
Prometheus scrapes, so counters stay monotonic across reconnects and move
while a transfer runs, not only when it ends. Labels come only from bounded
sets: role, configured forward name, proto, direction, reason, frame type.
``docs/metrics.md`` documents every family; a test checks both agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from sshrelay import __version__
from sshrelay.protocol.frames import FrameType
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.stats import SEND_DROP_REASONS, ForwardKey, Histogram, Snapshot

log = logging.getLogger("sshrelay.metrics")

PREFIX = "sshrelay"
MAX_FORWARD_NAMES = 256  # beyond this, forward labels collapse into "other"
EXTRA_DROP_REASONS = ("no_session",)  # counted by the relay's UDP listeners
DROP_REASONS = (*SEND_DROP_REASONS, "unknown_flow", *EXTRA_DROP_REASONS)
OUTAGE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0)
# Multiplexer close reasons (wire code names) folded into a small exported set.
FLOW_CLOSE_REASONS = {
    "idle": "idle",
    "evicted": "evicted",
    "no_error": "closed",
    "cancel": "closed",
    "connect_failed": "refused",
    "connect_refused": "refused",
    "not_permitted": "refused",
}
EXPORTED_FLOW_CLOSE_REASONS = ("idle", "evicted", "closed", "refused", "session_end")


class LiveSession(Protocol):
    """What the book needs from a live session (``MuxChannelSession`` provides it)."""

    mux: Multiplexer
    forward_names: dict[int, ForwardKey]
    write_stalls: int


class MetricsBook:
    """Per-end metric state: finished totals, live sessions, end-level counters."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.finished = Snapshot()
        self.finished_write_stalls = 0
        self.live: set[LiveSession] = set()
        self.forwards: dict[ForwardKey, None] = {}  # configured forwards, in order
        self.forward_up: dict[ForwardKey, int] = {}  # 1 while the public port is served
        self.connects = 0  # sessions that completed the handshake
        self.disconnects = 0  # sessions that ended after the handshake
        self.reconnects = 0  # client: connects after the first one
        self.auth_failures: dict[str, int] = {}
        self.forwards_refused: dict[str, int] = {}
        self.extra_drops: dict[str, int] = dict.fromkeys(EXTRA_DROP_REASONS, 0)
        self.flows_evicted = 0
        # Resilience (relay): leases by state, lease events, held public TCP connections.
        self.leases: dict[str, int] = {"active": 0, "grace": 0}
        self.lease_events: dict[str, int] = {"takeover": 0, "resumed": 0, "expired": 0}
        self.held_connections: dict[str, int] = dict.fromkeys(
            ("held", "attached", "closed", "gone"), 0
        )
        # Resilience (client): failed connection attempts and outage lengths.
        self.connect_failures: dict[str, int] = dict.fromkeys(
            ("network", "auth", "host_key", "forward_refused", "handshake"), 0
        )
        self.outages = Histogram(OUTAGE_BUCKETS)

    def forward_key(self, name: str, proto: str) -> ForwardKey:
        """A label-safe forward key; unbounded name sets collapse into 'other'."""
        key = (name, proto)
        if key not in self.forwards and len(self.forwards) >= MAX_FORWARD_NAMES:
            return ("other", proto)
        self.forwards.setdefault(key, None)
        return key

    def session_started(self, session: LiveSession) -> None:
        self.live.add(session)
        if self.connects:
            self.reconnects += 1 if self.role == "client" else 0
        self.connects += 1

    def session_finished(self, session: LiveSession) -> None:
        if session not in self.live:
            return
        self.live.discard(session)
        self.disconnects += 1
        snapshot = Snapshot()
        snapshot.add_counters(session.mux.counters, session.forward_names)
        self.finished.add(snapshot.finished())
        self.finished_write_stalls += session.write_stalls

    def snapshot(self) -> tuple[Snapshot, int]:
        total = Snapshot()
        total.add(self.finished)
        stalls = self.finished_write_stalls
        for session in list(self.live):
            total.add_counters(session.mux.counters, session.forward_names)
            stalls += session.write_stalls
        return total, stalls

    def last_rtt(self) -> float | None:
        for session in self.live:
            if session.mux.counters.last_rtt is not None:
                return session.mux.counters.last_rtt
        return None


def _histogram(name: str, doc: str, histogram: Histogram, labels: dict[str, str]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    buckets = [(_le(bound), float(count)) for bound, count in histogram.cumulative()]
    family.add_metric(list(labels.values()), buckets, histogram.sum)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class TunnelCollector(Collector):
    """Builds every sshrelay metric family from one or more books at scrape time."""

    def __init__(self, books: Iterable[MetricsBook]) -> None:
        self.books = list(books)

    def describe(self) -> Iterable[Metric]:
        return []  # families vary with configured forwards; skip registry-time collection

    def collect(self) -> Iterator[Metric]:
        p = PREFIX
        build = GaugeMetricFamily(
            f"{p}_build_info", "Build information.", labels=["version", "role"]
        )
        up = GaugeMetricFamily(
            f"{p}_tunnel_up", "1 while at least one tunnel session is open.", labels=["role"]
        )
        sessions = GaugeMetricFamily(f"{p}_sessions", "Open tunnel sessions.", labels=["role"])
        connects = CounterMetricFamily(
            f"{p}_connects", "Sessions that completed the handshake.", labels=["role"]
        )
        disconnects = CounterMetricFamily(
            f"{p}_disconnects", "Sessions that ended after the handshake.", labels=["role"]
        )
        reconnects = CounterMetricFamily(
            f"{p}_reconnects", "Client sessions established after the first one.", labels=["role"]
        )
        auth = CounterMetricFamily(
            f"{p}_auth_failures", "Refused logins by reason.", labels=["role", "reason"]
        )
        refused = CounterMetricFamily(
            f"{p}_forwards_refused",
            "Forward requests refused by reason.",
            labels=["role", "reason"],
        )
        last_rtt = GaugeMetricFamily(
            f"{p}_rtt_last_seconds", "Last in-band PING round-trip time.", labels=["role"]
        )
        fwd_up = GaugeMetricFamily(
            f"{p}_forward_up",
            "1 while the forward's public port is served by a live session.",
            labels=["role", "forward", "proto"],
        )
        fwd_bytes = CounterMetricFamily(
            f"{p}_forward_bytes",
            "Payload bytes per forward and direction (in: from the peer end).",
            labels=["role", "forward", "proto", "direction"],
        )
        fwd_dgrams = CounterMetricFamily(
            f"{p}_forward_datagrams",
            "Datagrams per forward and direction.",
            labels=["role", "forward", "direction"],
        )
        fwd_streams = GaugeMetricFamily(
            f"{p}_forward_streams_active",
            "Open TCP streams per forward.",
            labels=["role", "forward"],
        )
        fwd_flows = GaugeMetricFamily(
            f"{p}_forward_flows_active", "Open UDP flows per forward.", labels=["role", "forward"]
        )
        fwd_streams_opened = CounterMetricFamily(
            f"{p}_forward_streams_opened",
            "TCP streams opened per forward.",
            labels=["role", "forward"],
        )
        fwd_flows_opened = CounterMetricFamily(
            f"{p}_forward_flows_opened", "UDP flows opened per forward.", labels=["role", "forward"]
        )
        flows_closed = CounterMetricFamily(
            f"{p}_flows_closed", "UDP flows closed by reason.", labels=["role", "reason"]
        )
        evicted = CounterMetricFamily(
            f"{p}_flows_evicted",
            "UDP flows evicted because a forward's flow table was full.",
            labels=["role"],
        )
        drops = CounterMetricFamily(
            f"{p}_datagrams_dropped",
            "Datagrams not delivered, by reason.",
            labels=["role", "reason"],
        )
        stalls = CounterMetricFamily(
            f"{p}_stream_credit_stalls", "Times a stream ran out of send credit.", labels=["role"]
        )
        growths = CounterMetricFamily(
            f"{p}_stream_window_growths",
            "Times a stream window this end grants doubled (window auto-tuning).",
            labels=["role"],
        )
        write_stalls = CounterMetricFamily(
            f"{p}_write_buffer_stalls",
            "Times output waited for the SSH write buffer to drain.",
            labels=["role"],
        )
        wire = CounterMetricFamily(
            f"{p}_wire_bytes",
            "Bytes of frames through the SSH channel.",
            labels=["role", "direction"],
        )
        frames = CounterMetricFamily(
            f"{p}_frames",
            "Frames through the SSH channel by type.",
            labels=["role", "type", "direction"],
        )
        families: list[Metric] = [
            build, up, sessions, connects, disconnects, reconnects, auth, refused, last_rtt,
            fwd_up, fwd_bytes, fwd_dgrams, fwd_streams, fwd_flows, fwd_streams_opened,
            fwd_flows_opened, flows_closed, evicted, drops, stalls, growths, write_stalls, wire,
            frames,
        ]  # fmt: skip
        leases = GaugeMetricFamily(
            f"{p}_leases", "Relay: public port leases by state.", labels=["role", "state"]
        )
        lease_events = CounterMetricFamily(
            f"{p}_lease_events",
            "Relay: lease takeovers, resumptions after a reconnect, and expiries.",
            labels=["role", "event"],
        )
        held = CounterMetricFamily(
            f"{p}_held_connections",
            "Relay: public TCP connections that arrived during a lease's grace period, by outcome.",
            labels=["role", "outcome"],
        )
        connect_failures = CounterMetricFamily(
            f"{p}_connect_failures",
            "Client: failed attempts to bring the tunnel up, by reason.",
            labels=["role", "reason"],
        )
        families += [leases, lease_events, held, connect_failures]
        histograms: list[Metric] = []
        for book in self.books:
            role = book.role
            snap, write_stall_count = book.snapshot()
            counts = snap.counts
            live = len(book.live)
            build.add_metric([__version__, role], 1)
            up.add_metric([role], 1 if live else 0)
            sessions.add_metric([role], live)
            connects.add_metric([role], book.connects)
            disconnects.add_metric([role], book.disconnects)
            reconnects.add_metric([role], book.reconnects)
            for reason, value in sorted(book.auth_failures.items()):
                auth.add_metric([role, reason], value)
            for reason, value in sorted(book.forwards_refused.items()):
                refused.add_metric([role, reason], value)
            if role == "relay":
                for state, value in book.leases.items():
                    leases.add_metric([role, state], value)
                for event, value in book.lease_events.items():
                    lease_events.add_metric([role, event], value)
                for outcome, value in book.held_connections.items():
                    held.add_metric([role, outcome], value)
            else:
                for reason, value in book.connect_failures.items():
                    connect_failures.add_metric([role, reason], value)
                histograms.append(
                    _histogram(
                        f"{p}_outage_seconds",
                        "Client: time from losing the tunnel to having it back.",
                        book.outages,
                        {"role": role},
                    )
                )
            rtt = book.last_rtt()
            if rtt is not None:
                last_rtt.add_metric([role], rtt)
            for name, proto in book.forwards:
                fwd_up.add_metric([role, name, proto], book.forward_up.get((name, proto), 0))
                fields = snap.forwards.get((name, proto), {})
                fwd_bytes.add_metric([role, name, proto, "in"], fields.get("bytes_in", 0))
                fwd_bytes.add_metric([role, name, proto, "out"], fields.get("bytes_out", 0))
                if proto == "udp":
                    fwd_dgrams.add_metric([role, name, "in"], fields.get("datagrams_in", 0))
                    fwd_dgrams.add_metric([role, name, "out"], fields.get("datagrams_out", 0))
                    fwd_flows.add_metric([role, name], fields.get("flows_active", 0))
                    fwd_flows_opened.add_metric([role, name], fields.get("flows_opened", 0))
                else:
                    fwd_streams.add_metric([role, name], fields.get("streams_active", 0))
                    fwd_streams_opened.add_metric([role, name], fields.get("streams_opened", 0))
            closed = dict.fromkeys(EXPORTED_FLOW_CLOSE_REASONS, 0.0)
            for key, closed_count in counts.items():
                if key[0] == "flows_closed":
                    closed[FLOW_CLOSE_REASONS.get(key[1], "session_end")] += closed_count
            for reason, closed_total in closed.items():
                flows_closed.add_metric([role, reason], closed_total)
            evicted.add_metric([role], book.flows_evicted)
            for reason in DROP_REASONS:
                dropped = counts.get(("drops", reason), 0) + book.extra_drops.get(reason, 0)
                drops.add_metric([role, reason], dropped)
            stalls.add_metric([role], counts.get(("credit_stalls",), 0))
            growths.add_metric([role], counts.get(("window_growths",), 0))
            write_stalls.add_metric([role], write_stall_count)
            for direction in ("in", "out"):
                wire.add_metric([role, direction], counts.get(("wire_bytes", direction), 0))
            for frame_type in FrameType:
                for direction in ("in", "out"):
                    frame_count = counts.get(("frames", frame_type.name, direction), 0)
                    frames.add_metric([role, frame_type.name, direction], frame_count)
            histograms.append(
                _histogram(
                    f"{p}_rtt_seconds",
                    "In-band PING round-trip time (includes datagram queueing).",
                    snap.histograms["rtt"],
                    {"role": role},
                )
            )
            histograms.append(
                _histogram(
                    f"{p}_datagram_queue_wait_seconds",
                    "Time datagrams waited in the send queue.",
                    snap.histograms["queue_wait"],
                    {"role": role},
                )
            )
        yield from families
        yield from histograms


def make_registry(*books: MetricsBook) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TunnelCollector(books))
    return registry


async def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> asyncio.Server:
    """A minimal HTTP/1.1 server for GET /metrics on the running loop (both text formats)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        lines = request.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif parts[1].split("?")[0] not in ("/metrics", "/"):
            status, content_type, body = "404 Not Found", "text/plain", b"try /metrics\n"
        else:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            status, body = "200 OK", encoder(registry)
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head if parts and parts[0] == "HEAD" else head + body)
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True, limit=16384)


DEFAULT_METRICS = {"relay": "127.0.0.1:9817", "client": "127.0.0.1:9818"}


async def start_metrics(
    spec: str | None, books: list[MetricsBook], role: str
) -> tuple[asyncio.Server | None, str | None]:
    """Serve ``/metrics`` at ``spec`` (HOST:PORT, or 'off'); None means the default.

    A busy default port only logs a warning; a busy port the user asked for is an
    error (OSError) for the caller to report.
    """
    explicit = spec is not None
    spec = spec or DEFAULT_METRICS[role]
    if spec == "off":
        return None, None
    host, _, port_text = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--metrics {spec!r}: expected HOST:PORT or 'off'") from None
    try:
        server = await serve_metrics(host, port, make_registry(*books))
    except OSError as exc:
        if explicit:
            raise
        log.warning("metrics disabled: cannot listen on %s (%s)", spec, exc.strerror)
        return None, None
    bound = server.sockets[0].getsockname()
    return server, f"http://{host}:{bound[1]}/metrics"
