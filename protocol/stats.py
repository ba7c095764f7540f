"""Plain counters and fixed-bucket histograms kept by the multiplexer.

Hot paths only bump integers here; the Prometheus collector (issue 4) reads
these objects at scrape time. Everything is monotonic for the life of one
multiplexer; the ends add finished sessions' totals to keep metrics monotonic
across reconnects.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

# Every reason a datagram handed to the multiplexer can fail to reach the peer
# application. Each undelivered datagram is counted under exactly one of them.
DROP_TOO_LARGE: Final = "too_large"  # over the negotiated max datagram size
DROP_QUEUE_FULL: Final = "queue_full"  # send queue byte bound reached
DROP_TOO_OLD: Final = "too_old"  # waited longer than max_datagram_age in the queue
DROP_FLOW_CLOSED: Final = "flow_closed"  # its flow closed while it was queued
DROP_SESSION_CLOSED: Final = "session_closed"  # the session ended while it was queued
DROP_UNKNOWN_FLOW: Final = "unknown_flow"  # receiver: flow already closed on arrival
SEND_DROP_REASONS: Final = (
    DROP_TOO_LARGE,
    DROP_QUEUE_FULL,
    DROP_TOO_OLD,
    DROP_FLOW_CLOSED,
    DROP_SESSION_CLOSED,
)
RECEIVE_DROP_REASONS: Final = (DROP_UNKNOWN_FLOW,)

# Seconds; RTT over loopback is ~100 us, over the internet tens of ms.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Histogram:
    """Cumulative-on-read histogram with fixed upper bounds (Prometheus semantics)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def merge(self, other: Histogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different buckets")
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.count += other.count
        self.sum += other.sum

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs ending with +Inf."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty)."""
        if not self.count:
            return None
        rank = q * self.count
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            if running >= rank:
                return bound
        return float("inf")  # pragma: no cover


class ForwardCounters:
    """Traffic of one forward (bounded label set: configured forwards only)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "datagrams_in",
        "datagrams_out",
        "flows_active",
        "flows_opened",
        "streams_active",
        "streams_opened",
    )

    def __init__(self) -> None:
        self.bytes_in = 0  # payload bytes received from the peer (stream + datagram)
        self.bytes_out = 0  # payload bytes handed to the wire for the peer
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.streams_opened = 0
        self.streams_active = 0
        self.flows_opened = 0
        self.flows_active = 0


class Counters:
    """Everything a metric needs about one multiplexer, as plain numbers."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "credit_stalls",
        "datagram_bytes_received",
        "datagram_bytes_sent",
        "datagrams_received",
        "datagrams_sent",
        "drops",
        "flows_closed",
        "flows_opened",
        "forwards",
        "frames_received",
        "frames_sent",
        "last_rtt",
        "pings_sent",
        "pongs_received",
        "queue_wait",
        "rtt",
        "stream_bytes_received",
        "stream_bytes_sent",
        "streams_closed",
        "streams_opened",
        "window_growths",
    )

    def __init__(self) -> None:
        self.bytes_sent = 0  # wire bytes returned by data_to_send
        self.bytes_received = 0  # wire bytes given to receive_data
        self.frames_sent: dict[str, int] = {}  # by frame type name
        self.frames_received: dict[str, int] = {}
        self.stream_bytes_sent = 0
        self.stream_bytes_received = 0
        self.datagrams_sent = 0  # datagram frames put on the wire
        self.datagrams_received = 0  # delivered to the application
        self.datagram_bytes_sent = 0
        self.datagram_bytes_received = 0
        self.drops: dict[str, int] = dict.fromkeys(SEND_DROP_REASONS + RECEIVE_DROP_REASONS, 0)
        self.streams_opened: dict[str, int] = {"local": 0, "remote": 0}
        self.streams_closed: dict[str, int] = {"clean": 0, "reset": 0}
        self.flows_opened: dict[str, int] = {"local": 0, "remote": 0}
        self.flows_closed: dict[str, int] = {}  # by close code name
        self.credit_stalls = 0  # times a stream ran out of send credit
        self.window_growths = 0  # times a stream window this end grants doubled
        self.pings_sent = 0
        self.pongs_received = 0
        self.last_rtt: float | None = None
        self.rtt = Histogram()
        self.queue_wait = Histogram()  # seconds datagrams waited in the send queue
        self.forwards: dict[int, ForwardCounters] = {}

    def forward(self, forward: int) -> ForwardCounters:
        counters = self.forwards.get(forward)
        if counters is None:
            counters = self.forwards[forward] = ForwardCounters()
        return counters


# ---------------------------------------------------------------------- aggregation

ForwardKey = tuple[str, str]  # (configured forward name, proto)

_FORWARD_FIELDS: Final = (
    "bytes_in",
    "bytes_out",
    "datagrams_in",
    "datagrams_out",
    "streams_opened",
    "streams_active",
    "flows_opened",
    "flows_active",
)


class Snapshot:
    """Counters of one or many multiplexers, keyed by forward *name* (ids are per session).

    The metrics exporter sums the snapshots of finished sessions (kept as a running
    total) and of live ones at scrape time, so every counter stays monotonic across
    reconnects while the hot path keeps bumping plain integers.
    """

    __slots__ = ("counts", "forwards", "histograms")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], float] = {}
        self.forwards: dict[ForwardKey, dict[str, int]] = {}
        self.histograms: dict[str, Histogram] = {
            "rtt": Histogram(),
            "queue_wait": Histogram(),
        }

    def add_counters(self, counters: Counters, names: dict[int, ForwardKey]) -> None:
        counts = self.counts

        def bump(key: tuple[str, ...], value: float) -> None:
            counts[key] = counts.get(key, 0) + value

        bump(("wire_bytes", "out"), counters.bytes_sent)
        bump(("wire_bytes", "in"), counters.bytes_received)
        for name, value in counters.frames_sent.items():
            bump(("frames", name, "out"), value)
        for name, value in counters.frames_received.items():
            bump(("frames", name, "in"), value)
        for reason, value in counters.drops.items():
            bump(("drops", reason), value)
        for reason, value in counters.flows_closed.items():
            bump(("flows_closed", reason), value)
        for how, value in counters.streams_closed.items():
            bump(("streams_closed", how), value)
        bump(("credit_stalls",), counters.credit_stalls)
        bump(("window_growths",), counters.window_growths)
        bump(("pings",), counters.pings_sent)
        bump(("pongs",), counters.pongs_received)
        for forward_id, traffic in counters.forwards.items():
            forward = names.get(forward_id)
            if forward is None:
                continue  # a forward that was refused or not configured here
            totals = self.forwards.setdefault(forward, dict.fromkeys(_FORWARD_FIELDS, 0))
            for field in _FORWARD_FIELDS:
                totals[field] += getattr(traffic, field)
        self.histograms["rtt"].merge(counters.rtt)
        self.histograms["queue_wait"].merge(counters.queue_wait)

    def add(self, other: Snapshot) -> None:
        for key, value in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + value
        for forward, fields in other.forwards.items():
            totals = self.forwards.setdefault(forward, dict.fromkeys(_FORWARD_FIELDS, 0))
            for field, value in fields.items():
                totals[field] += value
        for kind, histogram in other.histograms.items():
            self.histograms[kind].merge(histogram)

    def finished(self) -> Snapshot:
        """This snapshot as part of a finished total: nothing is active any more."""
        for fields in self.forwards.values():
            fields["streams_active"] = 0
            fields["flows_active"] = 0
        return self
