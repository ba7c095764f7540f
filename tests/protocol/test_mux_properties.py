"""Random operation sequences on an in-memory relay/client pair, checked against a model.

A hypothesis state machine drives both ends through the public API (streams,
credit, flows, datagrams, pings, timers), moves the wire bytes in random
pieces with random ``max_bytes``, and checks after every step that:

* stream bytes arrive exactly once, in order, uncorrupted; FIN comes once,
  after all data, and nothing follows it; after a reset no data event arrives
  and the peer hears of it unless it had already closed or reset the stream;
* datagrams are never duplicated, reordered within a flow or corrupted, and
  every datagram handed to ``send_datagram`` is delivered or counted under
  exactly one drop reason;
* credit never goes negative, and at quiescence the sender's credit equals
  the receiver's remaining window (nothing leaks);
* every buffer stays within its configured bound;
* valid use never ends the session.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import event as label
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sshrelay.protocol.config import MAX_UDP_PAYLOAD, MuxConfig
from sshrelay.protocol.errors import ErrorCode, FlowControlError, LocalProtocolError
from sshrelay.protocol.events import (
    ConnectionTerminated,
    CreditAvailable,
    DatagramReceived,
    Event,
    FlowClosed,
    FlowOpened,
    PingAcknowledged,
    StreamAccepted,
    StreamDataReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.pair import MuxPair
from sshrelay.protocol.states import StreamState

RELAY_CONFIG = MuxConfig(
    stream_window=4096,
    max_stream_window=16384,  # windows may grow to 4x (when PINGs gave an RTT)
    connection_window=16384,
    stream_chunk=1024,
    max_chunk=4096,
    datagram_queue_bytes=200_000,
    max_datagram_age=0.25,
    max_streams=3,
    max_flows=8,
)
# The client accepts smaller datagrams, so relay -> client sends can be too large.
# Only the relay holds back part of its credit while it sends datagrams (latency
# mode), so both behaviours run in every example.
CLIENT_CONFIG = dataclasses.replace(
    RELAY_CONFIG, max_datagram=9000, stream_chunk=1500, latency_window=None
)
RELAY_CONFIG = dataclasses.replace(RELAY_CONFIG, latency_window=1536, latency_hold=0.5)

_PATTERN = random.Random(1).randbytes(1 << 17)


def _payload(tag: int, size: int) -> bytes:
    """Distinct-looking bytes for (tag, size): corruption or mix-ups are visible."""
    head = tag.to_bytes(4, "big")
    start = (tag * 7919) % (len(_PATTERN) - MAX_UDP_PAYLOAD)
    return (head + _PATTERN[start : start + size])[:size]


@dataclass
class StreamModel:
    opener: str  # "relay" or "client"
    meta: dict[str, object]
    sent: dict[str, bytearray] = field(
        default_factory=lambda: {"relay": bytearray(), "client": bytearray()}, repr=False
    )
    received: dict[str, bytearray] = field(
        default_factory=lambda: {"relay": bytearray(), "client": bytearray()}, repr=False
    )
    unacked: dict[str, int] = field(default_factory=lambda: {"relay": 0, "client": 0})
    known: set[str] = field(default_factory=set)  # ends that know the stream
    can_send: set[str] = field(default_factory=set)  # accepted (as seen by that end)
    fin_called: set[str] = field(default_factory=set)
    ended_seen: set[str] = field(default_factory=set)
    reset_called: set[str] = field(default_factory=set)
    reset_seen: set[str] = field(default_factory=set)

    def aborted(self, end: str) -> bool:
        return end in self.reset_called or end in self.reset_seen

    def fully_closed(self, end: str) -> bool:
        return end in self.fin_called and end in self.ended_seen


@dataclass
class FlowModel:
    opener: str
    meta: dict[str, object]
    idle_timeout: float
    open_at: dict[str, bool] = field(default_factory=lambda: {"relay": False, "client": False})
    seen: set[str] = field(default_factory=set)  # ends that were told of the flow
    sent: dict[str, list[bytes]] = field(
        default_factory=lambda: {"relay": [], "client": []}, repr=False
    )
    matched: dict[str, int] = field(default_factory=lambda: {"relay": 0, "client": 0})
    last_activity: dict[str, float] = field(default_factory=dict)


OTHER = {"relay": "client", "client": "relay"}
ENDS = st.sampled_from(["relay", "client"])


class MuxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = MuxPair(RELAY_CONFIG, dataclasses.replace(CLIENT_CONFIG)).handshake()
        self.pair.take(self.pair.relay)
        self.pair.take(self.pair.client)
        self.streams: dict[int, StreamModel] = {}
        self.flows: dict[int, FlowModel] = {}
        self.attempts = 0  # send_datagram calls
        self.delivered = 0  # DatagramReceived events
        self.pings: dict[str, dict[int, float]] = {"relay": {}, "client": {}}
        self.tag = 0
        self.in_batch = False

    # ------------------------------------------------------------------ helpers

    def mux(self, end: str) -> Multiplexer:
        return self.pair.relay if end == "relay" else self.pair.client

    def next_tag(self) -> int:
        self.tag += 1
        return self.tag

    def on_events(self, end: str, events: list[Event]) -> None:
        """Check one batch of events, in order, against the model."""
        self.in_batch = True  # stays set if a check fails: the model is then stale
        for event in events:
            self.on_event(end, event)
        self.in_batch = False
        # The multiplexer's state is the one after the whole batch: check credit now.
        for event in events:
            if isinstance(event, CreditAvailable):
                model = self.streams[event.stream_id]
                if self._sendable(end, model):
                    assert self.mux(end).send_window(event.stream_id) >= event.credit

    def on_event(self, end: str, event: object) -> None:
        peer = OTHER[end]
        now = self.pair.now
        if isinstance(event, ConnectionTerminated):
            raise AssertionError(f"{end}: session ended by valid use: {event}")
        if isinstance(event, StreamOpened):
            model = self.streams[event.stream_id]
            assert model.opener == peer and end not in model.known, "StreamOpened twice"
            assert event.stream_id % 2 == (0 if peer == "relay" else 1)
            assert event.meta == model.meta
            model.known.add(end)
        elif isinstance(event, StreamDataReceived | StreamEnded | StreamReset | StreamAccepted):
            model = self.streams[event.stream_id]
            assert end in model.known
            assert not model.aborted(end), f"{event} after reset at {end}"
        if isinstance(event, StreamOpened):
            pass
        elif isinstance(event, StreamAccepted):
            assert model.opener == end and end not in model.can_send
            model.can_send.add(end)
        elif isinstance(event, StreamDataReceived):
            assert event.data, "no empty data events"
            assert end not in model.ended_seen, "data after FIN"
            got = model.received[end]
            expected = model.sent[peer][len(got) : len(got) + len(event.data)]
            assert event.data == expected, "stream bytes corrupted, duplicated or reordered"
            got += event.data
            model.unacked[end] += len(event.data)
        elif isinstance(event, StreamEnded):
            assert end not in model.ended_seen, "StreamEnded twice"
            assert peer in model.fin_called
            assert model.received[end] == model.sent[peer], "FIN before all data"
            model.ended_seen.add(end)
        elif isinstance(event, StreamReset):
            assert peer in model.reset_called, "StreamReset without a reset by the peer"
            assert event.remote
            model.reset_seen.add(end)
            model.unacked[end] = 0  # the multiplexer gave the credit back itself
        elif isinstance(event, CreditAvailable):
            assert event.credit > 0
            assert self._sendable(end, self.streams[event.stream_id])
        elif isinstance(event, FlowOpened):
            flow = self.flows[event.flow_id]
            assert flow.opener == peer and end not in flow.seen, "flow metadata twice"
            assert event.flow_id % 2 == (0 if peer == "relay" else 1)
            assert event.meta == flow.meta
            assert abs(event.idle_timeout - flow.idle_timeout) < 0.001
            flow.seen.add(end)
            flow.open_at[end] = True
            flow.last_activity[end] = now
        elif isinstance(event, DatagramReceived):
            flow = self.flows[event.flow_id]
            assert flow.open_at[end], "datagram on a flow closed at the receiver"
            sent, start = flow.sent[peer], flow.matched[end]
            try:
                index = sent.index(event.data, start)
            except ValueError:
                raise AssertionError("datagram duplicated, reordered or corrupted") from None
            flow.matched[end] = index + 1
            flow.last_activity[end] = now
            self.delivered += 1
        elif isinstance(event, FlowClosed):
            flow = self.flows[event.flow_id]
            assert flow.open_at[end], "FlowClosed for a flow not open here"
            flow.open_at[end] = False
            if event.remote:
                assert not flow.open_at[peer], "peer closed a flow it still has open"
            else:
                assert event.code == ErrorCode.IDLE
                assert flow.idle_timeout > 0
                assert now - flow.last_activity[end] >= flow.idle_timeout - 1e-9, "expired early"
        elif isinstance(event, PingAcknowledged):
            sent_at = self.pings[end].pop(event.seq)
            assert abs(event.rtt - (now - sent_at)) < 1e-9
        else:  # pragma: no cover
            raise AssertionError(f"unexpected event {event!r}")

    def transfer(self, end: str, max_bytes: int | None, cuts: list[int]) -> None:
        sender = self.mux(end)
        data = sender.data_to_send(max_bytes, now=self.pair.now)
        positions = sorted({cut % (len(data) + 1) for cut in cuts})
        receiver = self.mux(OTHER[end])
        for start, stop in zip([0, *positions], [*positions, len(data)], strict=True):
            self.on_events(OTHER[end], receiver.receive_data(data[start:stop], self.pair.now))

    def quiesce(self) -> None:
        for _ in range(200):
            moved = False
            for end in ("relay", "client"):
                data = self.mux(end).data_to_send(now=self.pair.now)
                if data:
                    moved = True
                    receiver = self.mux(OTHER[end])
                    self.on_events(OTHER[end], receiver.receive_data(data, self.pair.now))
            if not moved:
                return
        raise AssertionError("pair did not quiesce")

    def live_streams(self, end: str, predicate) -> list[int]:
        return sorted(s for s, m in self.streams.items() if end in m.known and predicate(m))

    # ------------------------------------------------------------------ candidates

    def acceptable(self, end: str) -> list[int]:
        return self.live_streams(
            end, lambda m: m.opener != end and end not in m.can_send and not m.aborted(end)
        )

    def sendable(self, end: str) -> list[int]:
        return self.live_streams(end, lambda m: self._sendable(end, m))

    def resettable(self, end: str) -> list[int]:
        return self.live_streams(end, lambda m: not m.aborted(end) and not m.fully_closed(end))

    def acknowledgeable(self, end: str) -> list[int]:
        return self.live_streams(end, lambda m: m.unacked[end] > 0 and not m.aborted(end))

    def any_end(self, candidates) -> bool:
        return bool(candidates("relay") or candidates("client"))

    # ------------------------------------------------------------------ start

    @initialize(
        streams=st.lists(st.sampled_from(["relay", "client"]), max_size=4),
        flows=st.lists(st.sampled_from(["relay", "client"]), max_size=4),
    )
    def start(self, streams: list[str], flows: list[str]) -> None:
        """Begin with some accepted streams and open flows, so every rule has work."""
        for end in streams:
            self.open_stream(end, 0)
        for end in flows:
            self.open_flow(end, None)
        self.quiesce()
        for stream_id, model in self.streams.items():
            acceptor = OTHER[model.opener]
            self.mux(acceptor).accept_stream(stream_id)
            model.can_send.add(acceptor)
        self.quiesce()

    # ------------------------------------------------------------------ streams

    @rule(end=ENDS, forward=st.integers(0, 3))
    def open_stream(self, end: str, forward: int) -> None:
        mux = self.mux(end)
        meta = {"tag": self.next_tag()}
        try:
            stream_id = mux.open_stream(forward, meta)
        except LocalProtocolError:
            assert mux._local_streams >= mux.peer_limits["max_streams"]
            return
        assert stream_id % 2 == (0 if end == "relay" else 1)
        assert stream_id not in self.streams
        self.streams[stream_id] = StreamModel(opener=end, meta=meta, known={end})

    @precondition(lambda self: self.any_end(self.acceptable))
    @rule(end=ENDS, data=st.data())
    def accept_or_refuse_stream(self, end: str, data: st.DataObject) -> None:
        candidates = self.acceptable(end)
        if not candidates:
            return
        stream_id = data.draw(st.sampled_from(candidates))
        if data.draw(st.integers(0, 4)):
            self.mux(end).accept_stream(stream_id)
            self.streams[stream_id].can_send.add(end)
        else:
            self.mux(end).reset_stream(stream_id, ErrorCode.CONNECT_REFUSED)
            self.streams[stream_id].reset_called.add(end)
            self.streams[stream_id].unacked[end] = 0

    def _sendable(self, end: str, model: StreamModel) -> bool:
        return end in model.can_send and end not in model.fin_called and not model.aborted(end)

    @precondition(lambda self: self.any_end(self.sendable))
    @rule(end=ENDS, data=st.data())
    def send_stream_data(self, end: str, data: st.DataObject) -> None:
        candidates = self.sendable(end)
        if not candidates:
            return
        stream_id = data.draw(st.sampled_from(candidates))
        model = self.streams[stream_id]
        mux = self.mux(end)
        window = mux.send_window(stream_id)
        assert window >= 0
        if window == 0 or data.draw(st.integers(0, 9)) == 0:
            try:
                mux.send_stream_data(stream_id, b"!" * (window + 1))
            except FlowControlError:
                pass
            else:
                raise AssertionError("sending beyond credit was accepted")
            assert mux.send_window(stream_id) == window
            return
        size = data.draw(st.integers(1, window) | st.just(window))
        payload = _payload(self.next_tag(), size)
        mux.send_stream_data(stream_id, payload)
        model.sent[end] += payload
        assert mux.send_window(stream_id) == window - size

    @precondition(lambda self: self.any_end(self.sendable))
    @rule(end=ENDS, data=st.data())
    def end_stream(self, end: str, data: st.DataObject) -> None:
        candidates = self.sendable(end)
        if not candidates:
            return
        stream_id = data.draw(st.sampled_from(candidates))
        self.mux(end).end_stream(stream_id)
        self.streams[stream_id].fin_called.add(end)

    @precondition(lambda self: self.any_end(self.resettable))
    @rule(end=ENDS, data=st.data())
    def reset_stream(self, end: str, data: st.DataObject) -> None:
        candidates = self.resettable(end)
        if not candidates:
            return
        stream_id = data.draw(st.sampled_from(candidates))
        self.mux(end).reset_stream(stream_id, ErrorCode.CANCEL)
        model = self.streams[stream_id]
        model.reset_called.add(end)
        model.unacked[end] = 0

    @precondition(lambda self: self.any_end(self.acknowledgeable))
    @rule(end=ENDS, data=st.data())
    def acknowledge(self, end: str, data: st.DataObject) -> None:
        candidates = self.acknowledgeable(end)
        if not candidates:
            return
        stream_id = data.draw(st.sampled_from(candidates))
        model = self.streams[stream_id]
        amount = data.draw(st.integers(1, model.unacked[end]) | st.just(model.unacked[end]))
        self.mux(end).acknowledge_received_data(stream_id, amount)
        model.unacked[end] -= amount

    # ------------------------------------------------------------------ flows

    @rule(end=ENDS, timeout=st.sampled_from([None, 0.5, 2.0]))
    def open_flow(self, end: str, timeout: float | None) -> None:
        mux = self.mux(end)
        meta = {"peer": f"198.51.100.{self.next_tag() % 250}", "port": self.tag}
        try:
            flow_id = mux.open_flow(1, meta, timeout, self.pair.now)
        except LocalProtocolError:
            assert mux._local_flows >= mux.peer_limits["max_flows"]
            return
        assert flow_id % 2 == (0 if end == "relay" else 1)
        assert flow_id not in self.flows and flow_id not in self.streams
        flow = FlowModel(opener=end, meta=meta, idle_timeout=timeout or 0.0)
        flow.open_at[end] = True
        flow.seen.add(end)
        flow.last_activity[end] = self.pair.now
        self.flows[flow_id] = flow

    def open_flows(self, end: str) -> list[int]:
        return sorted(f for f, m in self.flows.items() if m.open_at[end])

    @precondition(lambda self: self.any_end(self.open_flows))
    @rule(end=ENDS, data=st.data())
    def close_flow(self, end: str, data: st.DataObject) -> None:
        candidates = self.open_flows(end)
        if not candidates:
            return
        flow_id = data.draw(st.sampled_from(candidates))
        self.mux(end).close_flow(flow_id)
        self.flows[flow_id].open_at[end] = False

    @precondition(lambda self: self.any_end(self.open_flows))
    @rule(
        end=ENDS,
        data=st.data(),
        size=st.integers(0, 1500) | st.integers(0, MAX_UDP_PAYLOAD) | st.just(MAX_UDP_PAYLOAD),
        count=st.integers(1, 4),
    )
    def send_datagrams(self, end: str, data: st.DataObject, size: int, count: int) -> None:
        candidates = self.open_flows(end)
        if not candidates:
            return
        flow_id = data.draw(st.sampled_from(candidates))
        flow = self.flows[flow_id]
        mux = self.mux(end)
        for _ in range(count):
            payload = _payload(self.next_tag(), size)
            self.attempts += 1
            if mux.send_datagram(flow_id, payload, self.pair.now):
                flow.sent[end].append(payload)
                flow.last_activity[end] = self.pair.now
            else:
                assert size > mux.peer_limits["max_datagram"] or (
                    mux.buffered()["datagram_queue"] + size > mux.config.datagram_queue_bytes
                )

    # ------------------------------------------------------------------ wire and time

    @rule(end=ENDS)
    def ping(self, end: str) -> None:
        seq = self.mux(end).send_ping(self.pair.now)
        self.pings[end][seq] = self.pair.now

    @rule(
        end=ENDS,
        max_bytes=st.none() | st.integers(1, 70_000) | st.integers(1, 3000) | st.integers(1, 200),
        cuts=st.lists(st.integers(0, 1 << 17), max_size=8),
    )
    def transfer_bytes(self, end: str, max_bytes: int | None, cuts: list[int]) -> None:
        self.transfer(end, max_bytes, cuts)

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.2, 0.3, 0.6, 1.0, 2.5]))
    def advance_time(self, seconds: float) -> None:
        self.pair.now += seconds
        for end in ("relay", "client"):
            timer = self.mux(end).get_timer()
            events = self.mux(end).handle_timer(self.pair.now)
            if events:
                assert timer is not None and timer <= self.pair.now, "timer not announced"
            self.on_events(end, events)

    @rule()
    def drain(self) -> None:
        self.quiesce()
        self.check_quiescent()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def sessions_open(self) -> None:
        assert self.pair.relay.is_open and self.pair.client.is_open

    @invariant()
    def credit_never_negative(self) -> None:
        for end in ("relay", "client"):
            mux = self.mux(end)
            assert mux._send_connection_credit >= 0
            for stream_id, stream in mux._streams.items():
                assert stream.send_credit >= 0
                assert mux.send_window(stream_id) >= 0
                # Receivers may grow a stream's window (up to max_stream_window), never
                # past it, and never hold more unconsumed bytes than the window.
                peer = self.mux(OTHER[end])._streams.get(stream_id)
                if peer is not None:
                    assert stream.out_bytes <= peer.recv.size
                assert stream.out_bytes <= self.mux(OTHER[end]).config.max_stream_window
                assert stream.recv.unacknowledged <= stream.recv.size
                assert mux.config.stream_window <= stream.recv.size
                assert stream.recv.size <= mux.config.max_stream_window

    @invariant()
    def buffers_within_limits(self) -> None:
        for end in ("relay", "client"):
            mux = self.mux(end)
            buffered = mux.buffered()
            assert buffered["datagram_queue"] <= mux.config.datagram_queue_bytes
            assert buffered["decoder"] <= mux._decoder.max_buffer
            assert buffered["received_unacknowledged"] <= mux.config.connection_window
            assert buffered["stream_out"] <= mux.peer_limits["connection_window"]
            model_unacked = sum(m.unacked[end] for m in self.streams.values() if not m.aborted(end))
            assert buffered["received_unacknowledged"] == model_unacked

    @invariant()
    def datagrams_accounted_once(self) -> None:
        queued = sum(
            1
            for end in ("relay", "client")
            for flow, _, _ in self.mux(end)._datagrams
            if flow is not None
        )
        drops = sum(sum(self.mux(end).counters.drops.values()) for end in ("relay", "client"))
        assert self.attempts == self.delivered + drops + queued, (
            self.attempts,
            self.delivered,
            drops,
            queued,
        )

    @invariant()
    def flow_tables_agree_with_model(self) -> None:
        for end in ("relay", "client"):
            assert self.mux(end).flow_count() == len(self.open_flows(end))

    def check_quiescent(self) -> None:
        """Nothing in flight: credit matches windows, all non-reset data arrived."""
        for end in ("relay", "client"):
            sender, receiver = self.mux(end), self.mux(OTHER[end])
            assert sender.buffered()["datagram_queue"] == 0
            assert sender.buffered()["stream_out"] == 0
            assert sender._send_connection_credit == receiver._recv_connection.available
            for stream_id, stream in sender._streams.items():
                peer_stream = receiver._streams.get(stream_id)
                if (
                    peer_stream is not None
                    and stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
                    and not stream.fin_queued
                    and peer_stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
                ):
                    assert stream.send_credit == peer_stream.recv.available
        for stream_id, model in self.streams.items():
            for end in ("relay", "client"):
                peer = OTHER[end]
                if model.aborted(end) or model.aborted(peer):
                    if peer in model.reset_called and end in model.known:
                        # The reset reached us unless we had closed or reset it ourselves.
                        assert (
                            end in model.reset_seen
                            or end in model.reset_called
                            or model.fully_closed(end)
                        ), (stream_id, model)
                    continue
                if end in model.known and peer in model.known:
                    assert model.received[end] == model.sent[peer]
                    assert (end in model.ended_seen) == (peer in model.fin_called)

    def teardown(self) -> None:
        # After a failed check the model is stale; the end-of-run checks would only
        # add a second, misleading error to the report.
        if not self.in_batch and self.pair.relay.is_open and self.pair.client.is_open:
            self.quiesce()
            self.check_quiescent()
            self.datagrams_accounted_once()
            self.report_coverage()

    def report_coverage(self) -> None:
        """Label what the run exercised (see ``--hypothesis-show-statistics``)."""
        for end in ("relay", "client"):
            counters = self.mux(end).counters
            for reason, count in counters.drops.items():
                if count:
                    label(f"datagram drop: {reason}")
            if counters.flows_closed.get("idle"):
                label("flow idle expiry")
            if counters.credit_stalls:
                label("credit stall")
        if self.delivered:
            label("datagram delivered")
        if any(m.reset_seen for m in self.streams.values()):
            label("stream reset seen by the peer")
        if any(m.ended_seen for m in self.streams.values()):
            label("stream ended")
        if any(
            len(m.received["relay"]) + len(m.received["client"]) >= 4096
            for m in self.streams.values()
        ):
            label("stream moved a full window")


MuxMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_random_operations_keep_the_invariants = MuxMachine.TestCase
