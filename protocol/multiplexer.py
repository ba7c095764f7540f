"""The sans-I/O multiplexer: TCP streams and UDP flows over one byte stream.

Three drivers, as in aioquic: API calls (``open_stream``, ``send_datagram``,
...), ``receive_data(data, now)`` and ``handle_timer(now)``. Output is pulled
with ``data_to_send(max_bytes)``; results come back as event lists. Nothing
here touches a socket, a loop or a clock: time is always a parameter.

The scheduler decides what goes on the wire next: control frames first, then
datagrams (and PING/PONG, so measured RTT includes datagram queueing), then
stream data in bounded chunks, round-robin across streams.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from sshrelay.protocol.codec import (
    MAX_WIRE_INT,
    FrameDecoder,
    cut_reason,
    data_frame_prefix,
    encode_fields,
    with_bin_header,
)
from sshrelay.protocol.config import MuxConfig, Role, check_peer_limits
from sshrelay.protocol.errors import (
    ErrorCode,
    FlowControlError,
    FrameTooLargeError,
    HandshakeError,
    LocalProtocolError,
    RemoteFlowControlError,
    RemoteLimitError,
    RemoteProtocolError,
    RemoteStateError,
    SessionClosedError,
    StreamStateError,
    VersionMismatchError,
    describe_code,
)
from sshrelay.protocol.events import (
    ConnectionTerminated,
    CreditAvailable,
    DatagramReceived,
    Event,
    FlowClosed,
    FlowOpened,
    HandshakeCompleted,
    PingAcknowledged,
    RequestReceived,
    ResponseReceived,
    StreamAccepted,
    StreamDataReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from sshrelay.protocol.frames import (
    CONNECTION_ID,
    FRAME_CLASSES,
    MAGIC,
    PROTOCOL_VERSION,
    Datagram,
    FlowClose,
    FlowOpen,
    Frame,
    FrameType,
    GoAway,
    Hello,
    Meta,
    Ping,
    Pong,
    Request,
    Response,
    StreamAccept,
    StreamData,
    StreamFin,
    StreamOpen,
    StreamResetFrame,
    WindowUpdate,
)
from sshrelay.protocol.states import (
    SessionInput,
    SessionState,
    StreamInput,
    StreamState,
    next_session_state,
    next_stream_state,
)
from sshrelay.protocol.stats import (
    DROP_FLOW_CLOSED,
    DROP_QUEUE_FULL,
    DROP_SESSION_CLOSED,
    DROP_TOO_LARGE,
    DROP_TOO_OLD,
    DROP_UNKNOWN_FLOW,
    Counters,
    ForwardCounters,
)
from sshrelay.protocol.windows import ReceiveWindow

CAPABILITIES: Final = ("streams", "datagrams", "ping", "requests")
MIN_SPLIT_CHUNK: Final = 1024  # do not cut a stream chunk smaller than this to fit a budget
MAX_OUTSTANDING_PINGS: Final = 64
MAX_QUEUED_PONGS: Final = 64
# Stream credit goes back at least every 64 KiB consumed, however large the window
# (it grows to MiBs), so latency mode's capped returns still flow in small steps.
STREAM_CREDIT_BATCH: Final = 64 * 1024
_INF: Final = float("inf")
_SENDABLE: Final = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_DATAGRAM_TYPE: Final = int(FrameType.DATAGRAM)
_PONG_TYPE: Final = int(FrameType.PONG)
_FRAME_NAMES: Final[dict[type[Frame], str]] = {
    cls: FrameType(number).name for number, cls in FRAME_CLASSES.items()
}
_HANDSHAKE_FRAMES: Final = frozenset({Hello, GoAway})
_STREAM_DATA_TYPE: Final = int(FrameType.STREAM_DATA)


class _Stream:
    __slots__ = (
        "fin_queued",
        "fin_sent",
        "forward",
        "id",
        "local",
        "out",
        "out_bytes",
        "prefix",
        "recv",
        "scheduled",
        "send_credit",
        "state",
        "traffic",
        "tune_bytes",
        "tune_started",
    )

    def __init__(
        self,
        stream_id: int,
        forward: int,
        state: StreamState,
        send_credit: int,
        recv_window: int,
        local: bool,
        traffic: ForwardCounters,
    ) -> None:
        self.id = stream_id
        self.forward = forward
        self.state = state
        self.local = local
        self.send_credit = send_credit
        self.recv = ReceiveWindow(recv_window, STREAM_CREDIT_BATCH)
        self.out: deque[bytes | memoryview] = deque()
        self.out_bytes = 0
        self.fin_queued = False
        self.fin_sent = False
        self.scheduled = False
        self.prefix = data_frame_prefix(_STREAM_DATA_TYPE, stream_id)
        self.traffic = traffic
        self.tune_started: float | None = None  # window tuning: this epoch's first consumption
        self.tune_bytes = 0  # ... and the bytes consumed since


class _Flow:
    __slots__ = (
        "forward",
        "id",
        "idle_timeout",
        "last_activity",
        "local",
        "open",
        "prefix",
        "traffic",
    )

    def __init__(
        self,
        flow_id: int,
        forward: int,
        idle_timeout: float,
        now: float,
        local: bool,
        traffic: ForwardCounters,
    ) -> None:
        self.id = flow_id
        self.forward = forward
        self.idle_timeout = idle_timeout  # 0 means never expire
        self.last_activity = now
        self.local = local
        self.open = True
        self.prefix = data_frame_prefix(_DATAGRAM_TYPE, flow_id)
        self.traffic = traffic


class Multiplexer:
    """One end of an sshrelay session. See the module docstring for the drivers."""

    def __init__(self, role: Role, config: MuxConfig | None = None) -> None:
        self.role = role
        self.config = config or MuxConfig()
        self.counters = Counters()
        self.state = SessionState.IDLE
        self.peer_limits: dict[str, int] = {}
        self.peer_capabilities: frozenset[str] = frozenset()
        self.termination: ConnectionTerminated | None = None
        self._now = 0.0
        self._next_id = 1 if role is Role.CLIENT else 2
        self._peer_parity = 0 if role is Role.CLIENT else 1
        self._last_peer_id = 0
        self._streams: dict[int, _Stream] = {}
        self._flows: dict[int, _Flow] = {}
        self._local_streams = 0
        # Peer-opened streams not CLOSED here. Streams kept only for an unacknowledged
        # tail are not counted: the peer may already have forgotten them and reused
        # the slot, so counting them would turn its valid STREAM_OPEN into an error.
        self._remote_streams = 0
        self._local_flows = 0
        self._control: deque[bytes] = deque()
        # Entries: (flow, payload, enqueued_at); flow None means a pre-encoded PING/PONG.
        self._datagrams: deque[tuple[_Flow | None, bytes, float]] = deque()
        self._datagram_bytes = 0
        self._ready: deque[_Stream] = deque()
        self._turn_left = 0  # rest of the head stream's turn, cut short by a budget
        self._stalled: set[int] = set()
        self._send_connection_credit = 0
        # Latency mode (receiver side): while datagrams arrive, each stream's peer gets
        # credit only up to config.latency_window; streams holding back credit are here.
        self._latency_until = -_INF
        self._held_credit: set[int] = set()
        self._min_rtt: float | None = None  # smallest PING round trip seen (window tuning)
        self._recv_connection = ReceiveWindow(self.config.connection_window)
        self._send_chunk = self.config.stream_chunk
        self._max_send_datagram = self.config.max_datagram
        self._expiry: list[tuple[float, int]] = []
        self._pings: dict[int, float] = {}
        self._ping_seq = 0
        self._pongs_queued = 0
        self._next_ping_at: float | None = None
        self._next_request_id = 1
        self._pending_requests: set[int] = set()
        self._decoder = FrameDecoder(max(self.config.max_datagram, self.config.max_chunk))
        self._handlers: dict[type[Frame], Callable[[Any, list[Event]], None]] = {
            Hello: self._on_hello,
            GoAway: self._on_goaway,
            Ping: self._on_ping,
            Pong: self._on_pong,
            Request: self._on_request,
            Response: self._on_response,
            WindowUpdate: self._on_window_update,
            StreamOpen: self._on_stream_open,
            StreamAccept: self._on_stream_accept,
            StreamData: self._on_stream_data,
            StreamFin: self._on_stream_fin,
            StreamResetFrame: self._on_stream_reset,
            FlowOpen: self._on_flow_open,
            Datagram: self._on_datagram,
            FlowClose: self._on_flow_close,
        }

    # ------------------------------------------------------------------ session

    def initiate(self, now: float) -> None:
        """Queue our HELLO. Call once, before anything else."""
        self._now = now
        self._set_state(SessionInput.SEND_HELLO)
        self._queue_control(
            FrameType.HELLO,
            MAGIC,
            PROTOCOL_VERSION,
            list(CAPABILITIES),
            self.config.hello_limits(),
        )

    @property
    def is_open(self) -> bool:
        return self.state is SessionState.OPEN

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY and end the session; everything still queued is dropped."""
        if self.state is SessionState.CLOSED:
            return
        self._queue_control(FrameType.GOAWAY, int(code), cut_reason(reason))
        self._set_state(SessionInput.SEND_GOAWAY)
        self.termination = ConnectionTerminated(int(code), reason, remote=False)
        self._teardown(describe_code(code))

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed bytes from the peer; return the events they complete, in order.

        A protocol violation by the peer never raises: it queues a GOAWAY and
        ends with a ``ConnectionTerminated`` event carrying the error.
        """
        if self.state is SessionState.CLOSED:
            return []
        if self.state is SessionState.IDLE:
            raise SessionClosedError("call initiate() before receive_data()")
        self._now = now
        self.counters.bytes_received += len(data)
        events: list[Event] = []
        try:
            # Frames completed before a decode error are handled first, so the
            # events never depend on how the peer's bytes were cut.
            frames, decode_error = self._decoder.feed_frames(data)
            received = self.counters.frames_received
            handlers = self._handlers
            for frame in frames:
                kind = type(frame)
                name = _FRAME_NAMES[kind]  # Enum.name is a slow property on this hot path
                received[name] = received.get(name, 0) + 1
                if kind not in _HANDSHAKE_FRAMES and self.state is SessionState.HELLO_SENT:
                    raise HandshakeError(f"expected HELLO, got {name}")
                handlers[kind](frame, events)
                if self.termination is not None:  # GOAWAY received
                    break
            if decode_error is not None and self.termination is None:
                raise decode_error
        except RemoteProtocolError as exc:
            self._fail(exc, events)
        return events

    def _fail(self, exc: RemoteProtocolError, events: list[Event]) -> None:
        code = int(exc.code)
        self._queue_control(FrameType.GOAWAY, code, cut_reason(str(exc)))
        self._set_state(SessionInput.PROTOCOL_ERROR)
        self.termination = ConnectionTerminated(code, str(exc), remote=False, error=exc)
        events.append(self.termination)
        self._teardown("protocol_error")

    def _teardown(self, why: str) -> None:
        counters = self.counters
        while self._datagrams:
            flow, _, _ = self._datagrams.popleft()
            if flow is not None:
                counters.drops[DROP_SESSION_CLOSED if flow.open else DROP_FLOW_CLOSED] += 1
        self._datagram_bytes = 0
        self._pongs_queued = 0
        for stream in self._streams.values():
            if stream.state is not StreamState.CLOSED:
                counters.streams_closed["reset"] += 1
                stream.traffic.streams_active -= 1
            stream.state = StreamState.CLOSED
        for flow in self._flows.values():
            flow.open = False
            flow.traffic.flows_active -= 1
        if self._flows:
            counters.flows_closed[why] = counters.flows_closed.get(why, 0) + len(self._flows)
        self._streams.clear()
        self._flows.clear()
        self._ready.clear()
        self._stalled.clear()
        self._expiry.clear()
        self._pings.clear()
        self._next_ping_at = None

    def _set_state(self, event: SessionInput) -> None:
        self.state = next_session_state(self.state, event)

    def _require_open(self) -> None:
        if self.state is not SessionState.OPEN:
            raise SessionClosedError(f"session is {self.state.name}, not OPEN")

    # ------------------------------------------------------------------ output

    def data_to_send(self, max_bytes: int | None = None, now: float | None = None) -> bytes:
        """Pull up to ``max_bytes`` of wire bytes, highest priority first.

        The first frame is always returned even if it alone exceeds the budget,
        so a positive budget always makes progress; stream chunks are cut to
        fit. ``now`` (default: the last time seen) ages the datagram queue.
        """
        if now is not None:
            self._now = now
        now = self._now
        budget = _INF if max_bytes is None else max_bytes
        out: list[bytes | memoryview] = []
        size = 0
        control = self._control
        while control:
            frame = control[0]
            if out and size + len(frame) > budget:
                break
            control.popleft()
            out.append(frame)
            size += len(frame)
        # Strict priority: a lane is served only once every lane above it is empty,
        # so a frame never overtakes one queued before it in a higher lane (a
        # DATAGRAM never precedes its FLOW_OPEN, stream data never its STREAM_ACCEPT).
        if self._datagrams and not control and size < budget:
            size = self._pull_datagrams(out, size, budget, now)
        if self._ready and not control and not self._datagrams and size < budget:
            size = self._pull_streams(out, size, budget)
        if not out:
            return b""
        self.counters.bytes_sent += size
        return b"".join(out)

    def _pull_datagrams(
        self, out: list[bytes | memoryview], size: int, budget: float, now: float
    ) -> int:
        queue = self._datagrams
        counters = self.counters
        drops = counters.drops
        oldest = now - self.config.max_datagram_age
        observe = counters.queue_wait.observe
        sent = sent_bytes = 0
        while queue:
            flow, payload, enqueued = queue[0]
            length = len(payload)
            if flow is None:  # PING/PONG, already encoded
                if out and size + length > budget:
                    break
                queue.popleft()
                if payload[1] == _PONG_TYPE:
                    self._pongs_queued -= 1
                out.append(payload)
                size += length
                continue
            if not flow.open:
                queue.popleft()
                self._datagram_bytes -= length
                drops[DROP_FLOW_CLOSED] += 1
                continue
            if enqueued < oldest:
                queue.popleft()
                self._datagram_bytes -= length
                drops[DROP_TOO_OLD] += 1
                continue
            header = with_bin_header(flow.prefix, length)
            frame_size = len(header) + length
            if out and size + frame_size > budget:
                break
            queue.popleft()
            self._datagram_bytes -= length
            out.append(header)
            out.append(payload)
            size += frame_size
            sent += 1
            sent_bytes += length
            traffic = flow.traffic
            traffic.datagrams_out += 1
            traffic.bytes_out += length
            observe(now - enqueued)
        if sent:
            counters.datagrams_sent += sent
            counters.datagram_bytes_sent += sent_bytes
            frames = counters.frames_sent
            frames["DATAGRAM"] = frames.get("DATAGRAM", 0) + sent
        return size

    def _pull_streams(self, out: list[bytes | memoryview], size: int, budget: float) -> int:
        ready = self._ready
        counters = self.counters
        chunk = self._send_chunk
        data_frames = data_bytes = 0
        while ready and size < budget:
            stream = ready.popleft()
            # A turn cut short by the previous budget continues with what was left of it.
            turn = self._turn_left or chunk
            self._turn_left = 0
            if stream.out_bytes:
                room = budget - size - 16  # 16 bytes cover any STREAM_DATA header
                take = min(stream.out_bytes, turn)
                if room < take:
                    if out and room < MIN_SPLIT_CHUNK:
                        ready.appendleft(stream)
                        self._turn_left = turn
                        break
                    take = min(max(int(room), MIN_SPLIT_CHUNK), take)
                header = with_bin_header(stream.prefix, take)
                out.append(header)
                size += len(header) + take
                self._take_chunk(stream, take, out)
                data_frames += 1
                data_bytes += take
                stream.traffic.bytes_out += take
                if take < turn and stream.out_bytes:
                    # Cut to fit the budget: finish this turn first next time (fairness).
                    self._turn_left = turn - take
                    ready.appendleft(stream)
                    continue
            if stream.out_bytes == 0 and stream.fin_queued and not stream.fin_sent:
                frame = encode_fields(FrameType.STREAM_FIN, stream.id)
                if out and size + len(frame) > budget:
                    ready.appendleft(stream)
                    break
                out.append(frame)
                size += len(frame)
                stream.fin_sent = True
                self._count_sent("STREAM_FIN")
                self._maybe_forget(stream)
            if stream.out_bytes:
                ready.append(stream)
            else:
                stream.scheduled = False
        if data_frames:
            counters.stream_bytes_sent += data_bytes
            frames = counters.frames_sent
            frames["STREAM_DATA"] = frames.get("STREAM_DATA", 0) + data_frames
        return size

    @staticmethod
    def _take_chunk(stream: _Stream, take: int, out: list[bytes | memoryview]) -> None:
        pieces = stream.out
        stream.out_bytes -= take
        while take:
            piece = pieces[0]
            if len(piece) <= take:
                pieces.popleft()
                out.append(piece)
                take -= len(piece)
            else:
                view = memoryview(piece)
                out.append(view[:take])
                pieces[0] = view[take:]
                take = 0

    def _queue_control(self, frame_type: FrameType, *fields: Any) -> None:
        self._control.append(encode_fields(frame_type, *fields))
        self._count_sent(frame_type.name)

    def _count_sent(self, name: str) -> None:
        frames = self.counters.frames_sent
        frames[name] = frames.get(name, 0) + 1

    def buffered(self) -> dict[str, int]:
        """Bytes held in each bounded buffer (for tests and metrics)."""
        return {
            "datagram_queue": self._datagram_bytes,
            "stream_out": sum(s.out_bytes for s in self._streams.values()),
            "control": sum(len(f) for f in self._control),
            "decoder": self._decoder.buffered(),
            "received_unacknowledged": self._recv_connection.unacknowledged,
        }

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` has work to do, or None."""
        if self.state is SessionState.CLOSED:
            return None
        deadlines: list[float] = []
        if self._expiry:
            deadlines.append(self._expiry[0][0])
        if self._next_ping_at is not None:
            deadlines.append(self._next_ping_at)
        if self._pings and self.config.ping_timeout is not None:
            deadlines.append(min(self._pings.values()) + self.config.ping_timeout)
        if self._held_credit and self._latency_until > -_INF:
            deadlines.append(self._latency_until)  # held-back credit goes out then
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Event]:
        """Expire idle flows, send due pings, detect unanswered pings."""
        self._now = now
        events: list[Event] = []
        if self.state is not SessionState.OPEN:
            return events
        timeout = self.config.ping_timeout
        if timeout is not None and self._pings and min(self._pings.values()) + timeout <= now:
            self.close(ErrorCode.TIMEOUT, f"no PONG within {timeout:g} s")
            assert self.termination is not None
            events.append(self.termination)
            return events
        if self._next_ping_at is not None and now >= self._next_ping_at:
            self.send_ping(now)
            interval = self.config.ping_interval or 0.0
            self._next_ping_at = max(self._next_ping_at + interval, now + interval / 2)
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, flow_id = heapq.heappop(expiry)
            flow = self._flows.get(flow_id)
            if flow is None:
                continue
            deadline = flow.last_activity + flow.idle_timeout
            if deadline > now:
                heapq.heappush(expiry, (deadline, flow_id))
                continue
            self.close_flow(flow_id, ErrorCode.IDLE)
            events.append(FlowClosed(flow_id, ErrorCode.IDLE, remote=False))
        if -_INF < self._latency_until <= now:
            self._latency_until = -_INF  # latency mode over: return held credit
            held, self._held_credit = self._held_credit, set()
            for stream_id in held:
                stream = self._streams.get(stream_id)
                if stream is not None:
                    self._send_stream_credit(stream, stream.recv.flush())
        return events

    # ------------------------------------------------------------------ ping & requests

    def send_ping(self, now: float) -> int:
        """Queue a PING in the datagram lane; a ``PingAcknowledged`` event follows."""
        self._require_open()
        self._ping_seq += 1
        seq = self._ping_seq
        self._pings[seq] = now
        if len(self._pings) > MAX_OUTSTANDING_PINGS:
            # Forget the second-oldest: the oldest unanswered PING decides ping_timeout.
            pending = iter(self._pings)
            next(pending)
            del self._pings[next(pending)]
        self._datagrams.append((None, encode_fields(FrameType.PING, seq), now))
        self._count_sent("PING")
        self.counters.pings_sent += 1
        return seq

    def send_request(self, kind: str, body: Meta) -> int:
        """Ask the peer for something; the answer is a ``ResponseReceived`` event."""
        self._require_open()
        request_id = self._next_request_id
        self._next_request_id += 1
        self._pending_requests.add(request_id)
        self._queue_control(FrameType.REQUEST, request_id, kind, body)
        return request_id

    def send_response(self, request_id: int, code: int, body: Meta) -> None:
        self._require_open()
        self._queue_control(FrameType.RESPONSE, request_id, int(code), body)

    # ------------------------------------------------------------------ streams

    def open_stream(self, forward: int, meta: Meta | None = None) -> int:
        """Open a stream toward the peer; data may flow after ``StreamAccepted``."""
        self._require_open()
        if self._local_streams >= self.peer_limits["max_streams"]:
            raise LocalProtocolError(f"peer allows {self.peer_limits['max_streams']} streams")
        stream_id = self._allocate_id()
        traffic = self.counters.forward(forward)
        stream = _Stream(
            stream_id,
            forward,
            StreamState.LOCAL_OPENING,
            self.peer_limits["stream_window"],
            self.config.stream_window,
            local=True,
            traffic=traffic,
        )
        self._streams[stream_id] = stream
        self._local_streams += 1
        self.counters.streams_opened["local"] += 1
        traffic.streams_opened += 1
        traffic.streams_active += 1
        self._queue_control(FrameType.STREAM_OPEN, stream_id, forward, meta or {})
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        stream = self._stream(stream_id)
        stream.state = next_stream_state(stream_id, stream.state, StreamInput.SEND_ACCEPT)
        self._queue_control(FrameType.STREAM_ACCEPT, stream_id)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_stream_data`` accepts now (0 while opening, closed or out of credit).

        A sendable stream found without credit gets a ``CreditAvailable`` event
        once credit returns, even if it ran dry because of other streams.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _SENDABLE or stream.fin_queued:
            return 0
        credit = min(stream.send_credit, self._send_connection_credit)
        if not credit:
            self._stalled.add(stream_id)
        return credit

    def send_stream_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue stream bytes; more than ``send_window`` is a ``FlowControlError``."""
        stream = self._stream(stream_id)
        if stream.fin_queued:
            raise StreamStateError(f"stream {stream_id}: data after end_stream()")
        next_stream_state(stream_id, stream.state, StreamInput.SEND_DATA)
        length = len(data)
        if not length:
            return
        credit = min(stream.send_credit, self._send_connection_credit)
        if length > credit:
            self._stalled.add(stream_id)  # wake the caller when credit returns
            raise FlowControlError(f"stream {stream_id}: {length} bytes exceed credit {credit}")
        stream.send_credit -= length
        self._send_connection_credit -= length
        stream.out.append(bytes(data) if isinstance(data, bytearray) else data)
        stream.out_bytes += length
        if not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)
        if length == credit:
            self._stalled.add(stream_id)
            self.counters.credit_stalls += 1

    def end_stream(self, stream_id: int) -> None:
        """Half-close: FIN goes out after all data queued so far."""
        stream = self._stream(stream_id)
        if stream.fin_queued:
            raise StreamStateError(f"stream {stream_id}: end_stream() called twice")
        stream.state = next_stream_state(stream_id, stream.state, StreamInput.SEND_FIN)
        stream.fin_queued = True
        if not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)
        if stream.state is StreamState.CLOSED:
            self._enter_closed_cleanly(stream)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream: queued output is discarded and RESET goes out at once."""
        stream = self._stream(stream_id)
        if stream.state is StreamState.CLOSED:
            # Clean close already happened (only an unacknowledged tail keeps it).
            return
        next_stream_state(stream_id, stream.state, StreamInput.SEND_RESET)
        self._queue_control(FrameType.STREAM_RESET, stream_id, int(code))
        self._drop_stream(stream)

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        """The application consumed ``length`` bytes of the stream: return credit."""
        stream = self._streams.get(stream_id)
        if stream is None or length == 0:
            return  # reset streams had their credit returned already
        now = self._now
        recv = stream.recv
        if now < self._latency_until:
            # Datagrams are arriving: keep the stream bytes that may sit ahead of them small.
            increment = recv.acknowledge(length, cap=self.config.latency_window)
            if recv.unreturned:
                self._held_credit.add(stream_id)
        else:
            increment = recv.acknowledge(length)
            increment += self._tune_window(stream, length, now)
        self._send_stream_credit(stream, increment)
        self._acknowledge_connection(length)
        self._maybe_forget(stream)

    def _tune_window(self, stream: _Stream, length: int, now: float) -> int:
        """Grow a stream's window when it is the bottleneck; the extra credit to send.

        A whole window consumed within two round trips means the sender was waiting
        for credit (window / RTT limits one stream), so the window doubles, up to
        ``max_stream_window``. A slow consumer never triggers it (the same rule as
        HTTP/2 and QUIC receivers use).
        """
        if stream.tune_started is None:
            stream.tune_started = now
        stream.tune_bytes += length
        recv = stream.recv
        if stream.tune_bytes < recv.size:
            return 0
        started, stream.tune_started, stream.tune_bytes = stream.tune_started, now, 0
        rtt = self._min_rtt
        limit = self.config.max_stream_window
        if rtt is None or recv.size >= limit or now - started >= 2 * rtt:
            return 0
        self.counters.window_growths += 1
        return recv.grow(min(2 * recv.size, limit))

    def _send_stream_credit(self, stream: _Stream, increment: int) -> None:
        if increment and stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            self._queue_control(FrameType.WINDOW_UPDATE, stream.id, increment)

    def _acknowledge_connection(self, length: int) -> None:
        increment = self._recv_connection.acknowledge(length)
        if increment and self.state is SessionState.OPEN:
            self._queue_control(FrameType.WINDOW_UPDATE, CONNECTION_ID, increment)

    def _stream(self, stream_id: int) -> _Stream:
        self._require_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamStateError(f"stream {stream_id} does not exist (or is closed)")
        return stream

    def _drop_stream(self, stream: _Stream) -> None:
        """Forget a reset stream and give back all credit it held at both ends."""
        if stream.state is not StreamState.CLOSED:
            self.counters.streams_closed["reset"] += 1
            stream.traffic.streams_active -= 1
            if not stream.local:
                self._remote_streams -= 1
        stream.state = StreamState.CLOSED
        self._send_connection_credit += stream.out_bytes  # queued, never sent
        stream.out.clear()
        stream.out_bytes = 0
        stream.fin_queued = False  # it may still sit in the ready ring: send nothing
        unacknowledged = stream.recv.unacknowledged
        stream.recv.unacknowledged = 0
        self._forget(stream)
        if unacknowledged:
            self._acknowledge_connection(unacknowledged)

    def _maybe_forget(self, stream: _Stream) -> None:
        if (
            stream.state is StreamState.CLOSED
            and stream.fin_sent
            and not stream.recv.unacknowledged
            and stream.id in self._streams
        ):
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is not None and stream.local:
            self._local_streams -= 1
        self._stalled.discard(stream.id)
        # A forgotten stream may still sit in the ready ring; it has no output left.

    def _enter_closed_cleanly(self, stream: _Stream) -> None:
        self.counters.streams_closed["clean"] += 1
        stream.traffic.streams_active -= 1
        if not stream.local:
            self._remote_streams -= 1
        self._maybe_forget(stream)

    # ------------------------------------------------------------------ flows

    def open_flow(
        self, forward: int, meta: Meta | None, idle_timeout: float | None, now: float
    ) -> int:
        """Open a datagram flow; its metadata (e.g. the public peer) is sent once."""
        self._require_open()
        if self._local_flows >= self.peer_limits["max_flows"]:
            raise LocalProtocolError(f"peer allows {self.peer_limits['max_flows']} flows")
        flow_id = self._allocate_id()
        timeout = idle_timeout or 0.0
        flow = self._add_flow(flow_id, forward, timeout, now, local=True)
        self._queue_control(
            FrameType.FLOW_OPEN, flow_id, forward, round(timeout * 1000), meta or {}
        )
        return flow.id

    def _add_flow(
        self, flow_id: int, forward: int, timeout: float, now: float, local: bool
    ) -> _Flow:
        traffic = self.counters.forward(forward)
        flow = _Flow(flow_id, forward, timeout, now, local, traffic)
        self._flows[flow_id] = flow
        if local:
            self._local_flows += 1
        self.counters.flows_opened["local" if local else "remote"] += 1
        traffic.flows_opened += 1
        traffic.flows_active += 1
        if timeout:
            heapq.heappush(self._expiry, (now + timeout, flow_id))
        return flow

    def send_datagram(self, flow_id: int, data: bytes, now: float) -> bool:
        """Queue one datagram. False means it was dropped (and counted under one reason)."""
        flow = self._flows.get(flow_id)
        if flow is None:
            if self.state is SessionState.CLOSED:
                self.counters.drops[DROP_SESSION_CLOSED] += 1
                return False
            raise StreamStateError(f"flow {flow_id} does not exist (or is closed)")
        length = len(data)
        if length > self._max_send_datagram:
            self.counters.drops[DROP_TOO_LARGE] += 1
            return False
        if self._datagram_bytes + length > self.config.datagram_queue_bytes:
            self.counters.drops[DROP_QUEUE_FULL] += 1
            return False
        self._datagrams.append((flow, data, now))
        self._datagram_bytes += length
        flow.last_activity = now
        return True

    def close_flow(self, flow_id: int, code: int = ErrorCode.NO_ERROR) -> None:
        """Close a flow; datagrams still queued for it are dropped as ``flow_closed``."""
        self._require_open()
        flow = self._flows.get(flow_id)
        if flow is None:
            raise StreamStateError(f"flow {flow_id} does not exist (or is closed)")
        self._remove_flow(flow, describe_code(code))
        self._queue_control(FrameType.FLOW_CLOSE, flow_id, int(code))

    def _remove_flow(self, flow: _Flow, why: str) -> None:
        del self._flows[flow.id]
        flow.open = False
        if flow.local:
            self._local_flows -= 1
        flow.traffic.flows_active -= 1
        closed = self.counters.flows_closed
        closed[why] = closed.get(why, 0) + 1

    def flow_count(self) -> int:
        return len(self._flows)

    def stream_count(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ ids

    def _allocate_id(self) -> int:
        new_id = self._next_id
        self._next_id += 2
        return new_id

    def _accept_peer_id(self, new_id: int) -> None:
        if new_id & 1 != self._peer_parity or new_id == 0:
            raise RemoteStateError(f"peer used id {new_id} of the wrong parity")
        if new_id <= self._last_peer_id:
            raise RemoteStateError(f"peer reused or reordered id {new_id}")
        self._last_peer_id = new_id

    def _was_used(self, some_id: int) -> bool:
        """True for ids that existed once (late frames for them are ignored)."""
        if some_id & 1 == self._peer_parity:
            return 0 < some_id <= self._last_peer_id
        return 0 < some_id < self._next_id

    def _missing(self, some_id: int, what: str) -> None:
        if not self._was_used(some_id):
            raise RemoteStateError(f"{what} for id {some_id} that was never opened")

    # ------------------------------------------------------------------ frame handlers

    def _on_hello(self, frame: Hello, events: list[Event]) -> None:
        if self.state is not SessionState.HELLO_SENT:
            raise RemoteStateError("a second HELLO")
        if frame.magic != MAGIC:
            raise HandshakeError(f"peer is not an sshrelay endpoint (magic {frame.magic!r})")
        if frame.version != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"protocol version mismatch: this end speaks {PROTOCOL_VERSION}, "
                f"the peer speaks {frame.version}; upgrade the older end"
            )
        self.peer_limits = check_peer_limits(frame.limits)
        self.peer_capabilities = frozenset(frame.capabilities)
        self._set_state(SessionInput.RECV_HELLO)
        self._send_connection_credit = self.peer_limits["connection_window"]
        self._send_chunk = min(self.config.stream_chunk, self.peer_limits["max_chunk"])
        self._max_send_datagram = self.peer_limits["max_datagram"]
        if self.config.ping_interval:
            # The first PING goes at once: window tuning needs an RTT sample early.
            self._next_ping_at = self._now
        events.append(
            HandshakeCompleted(frame.version, self.peer_capabilities, dict(self.peer_limits))
        )

    def _on_goaway(self, frame: GoAway, events: list[Event]) -> None:
        self._set_state(SessionInput.RECV_GOAWAY)
        self.termination = ConnectionTerminated(frame.code, frame.reason, remote=True)
        events.append(self.termination)
        self._teardown("peer_goaway")

    def _on_ping(self, frame: Ping, events: list[Event]) -> None:
        # PONG rides the datagram lane too, so RTT includes the peer's queueing.
        if self._pongs_queued >= MAX_QUEUED_PONGS:
            return  # a peer that floods PINGs and does not read gets no more answers
        self._pongs_queued += 1
        self._datagrams.append((None, encode_fields(FrameType.PONG, frame.seq), self._now))
        self._count_sent("PONG")

    def _on_pong(self, frame: Pong, events: list[Event]) -> None:
        sent = self._pings.pop(frame.seq, None)
        if sent is None:
            return  # answered after we stopped waiting
        rtt = self._now - sent
        if self._min_rtt is None or rtt < self._min_rtt:
            self._min_rtt = rtt
        counters = self.counters
        counters.pongs_received += 1
        counters.last_rtt = rtt
        counters.rtt.observe(rtt)
        events.append(PingAcknowledged(frame.seq, rtt))

    def _on_request(self, frame: Request, events: list[Event]) -> None:
        events.append(RequestReceived(frame.request_id, frame.kind, frame.body))

    def _on_response(self, frame: Response, events: list[Event]) -> None:
        if frame.request_id not in self._pending_requests:
            raise RemoteStateError(f"RESPONSE to unknown request {frame.request_id}")
        self._pending_requests.discard(frame.request_id)
        events.append(ResponseReceived(frame.request_id, frame.code, frame.body))

    def _on_window_update(self, frame: WindowUpdate, events: list[Event]) -> None:
        if frame.increment == 0:
            raise RemoteFlowControlError("WINDOW_UPDATE with a zero increment")
        if frame.stream_id == CONNECTION_ID:
            self._send_connection_credit += frame.increment
            if self._send_connection_credit > MAX_WIRE_INT:
                raise RemoteFlowControlError("connection credit overflow")
        else:
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                self._missing(frame.stream_id, "WINDOW_UPDATE")
                return
            stream.send_credit += frame.increment
            if stream.send_credit > MAX_WIRE_INT:
                raise RemoteFlowControlError(f"stream {stream.id} credit overflow")
        for stream_id in list(self._stalled):
            credit = self.send_window(stream_id)
            if credit:
                self._stalled.discard(stream_id)
                events.append(CreditAvailable(stream_id, credit))

    def _on_stream_open(self, frame: StreamOpen, events: list[Event]) -> None:
        self._accept_peer_id(frame.stream_id)
        if self._remote_streams >= self.config.max_streams:
            raise RemoteLimitError(f"peer opened more than {self.config.max_streams} streams")
        traffic = self.counters.forward(frame.forward)
        self._streams[frame.stream_id] = _Stream(
            frame.stream_id,
            frame.forward,
            StreamState.REMOTE_OPENING,
            self.peer_limits["stream_window"],
            self.config.stream_window,
            local=False,
            traffic=traffic,
        )
        self._remote_streams += 1
        self.counters.streams_opened["remote"] += 1
        traffic.streams_opened += 1
        traffic.streams_active += 1
        events.append(StreamOpened(frame.stream_id, frame.forward, frame.meta))

    def _on_stream_accept(self, frame: StreamAccept, events: list[Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._missing(frame.stream_id, "STREAM_ACCEPT")  # we reset it meanwhile
            return
        stream.state = next_stream_state(stream.id, stream.state, StreamInput.RECV_ACCEPT)
        events.append(StreamAccepted(stream.id))

    def _on_stream_data(self, frame: StreamData, events: list[Event]) -> None:
        length = len(frame.data)
        if length > self.config.max_chunk:
            raise FrameTooLargeError(
                f"STREAM_DATA of {length} bytes exceeds {self.config.max_chunk}"
            )
        if not self._recv_connection.consume(length):
            raise RemoteFlowControlError("peer exceeded the connection window")
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._missing(frame.stream_id, "STREAM_DATA")
            self._acknowledge_connection(length)  # late data for a reset stream
            return
        stream.state = next_stream_state(stream.id, stream.state, StreamInput.RECV_DATA)
        if not stream.recv.consume(length):
            raise RemoteFlowControlError(f"peer exceeded the window of stream {stream.id}")
        self.counters.stream_bytes_received += length
        stream.traffic.bytes_in += length
        if length:
            events.append(StreamDataReceived(stream.id, frame.data))

    def _on_stream_fin(self, frame: StreamFin, events: list[Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._missing(frame.stream_id, "STREAM_FIN")
            return
        stream.state = next_stream_state(stream.id, stream.state, StreamInput.RECV_FIN)
        events.append(StreamEnded(stream.id))
        if stream.state is StreamState.CLOSED:
            self._enter_closed_cleanly(stream)

    def _on_stream_reset(self, frame: StreamResetFrame, events: list[Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.state is StreamState.CLOSED:
            if stream is None:
                self._missing(frame.stream_id, "STREAM_RESET")
            return
        next_stream_state(stream.id, stream.state, StreamInput.RECV_RESET)
        self._drop_stream(stream)
        events.append(StreamReset(stream.id, frame.code, remote=True))

    def _on_flow_open(self, frame: FlowOpen, events: list[Event]) -> None:
        self._accept_peer_id(frame.flow_id)
        if len(self._flows) - self._local_flows >= self.config.max_flows:
            raise RemoteLimitError(f"peer opened more than {self.config.max_flows} flows")
        timeout = frame.idle_timeout_ms / 1000
        self._add_flow(frame.flow_id, frame.forward, timeout, self._now, local=False)
        events.append(FlowOpened(frame.flow_id, frame.forward, timeout, frame.meta))

    def _on_datagram(self, frame: Datagram, events: list[Event]) -> None:
        flow = self._flows.get(frame.flow_id)
        data = frame.data
        if len(data) > self.config.max_datagram:
            raise FrameTooLargeError(
                f"DATAGRAM of {len(data)} bytes exceeds {self.config.max_datagram}"
            )
        if flow is None:
            self._missing(frame.flow_id, "DATAGRAM")
            self.counters.drops[DROP_UNKNOWN_FLOW] += 1
            return
        flow.last_activity = self._now
        if self.config.latency_window is not None:
            self._latency_until = self._now + self.config.latency_hold
        counters = self.counters
        counters.datagrams_received += 1
        counters.datagram_bytes_received += len(data)
        traffic = flow.traffic
        traffic.datagrams_in += 1
        traffic.bytes_in += len(data)
        events.append(DatagramReceived(flow.id, data))

    def _on_flow_close(self, frame: FlowClose, events: list[Event]) -> None:
        flow = self._flows.get(frame.flow_id)
        if flow is None:
            self._missing(frame.flow_id, "FLOW_CLOSE")
            return
        self._remove_flow(flow, describe_code(frame.code))
        events.append(FlowClosed(flow.id, frame.code, remote=True))
