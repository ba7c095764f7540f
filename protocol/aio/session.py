"""Drive a ``Multiplexer`` over one asyncssh session channel.

``MuxChannelSession`` is the asyncssh session object for our subsystem on both
ends (the relay and the client subclass it with their asyncssh base class). It
feeds channel bytes into the multiplexer, pulls output only while the bytes
buffered below us stay under a small high-water mark (so that the
multiplexer's scheduler, not asyncssh's FIFO, decides what goes next), arms the
multiplexer's timer on the loop, and routes events to stream bridges, flow
sinks and the end's policy (``SessionPolicy``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Protocol

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.session import SSHSession

from sshrelay.protocol.aio.sshfastpath import ChannelFastPath
from sshrelay.protocol.aio.sshtuning import (
    READ_BURST,
    WRITE_HIGH_WATER,
    TransportWatch,
    quiet_packet_log,
)
from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.errors import ErrorCode
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
from sshrelay.protocol.frames import Meta
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.stats import ForwardKey

log = logging.getLogger("sshrelay.session")


class StreamEndpoint(Protocol):
    """The local side of a stream (a TCP connection bridge)."""

    def tunnel_accepted(self) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> None: ...
    def tunnel_reset(self, code: int) -> None: ...
    def tunnel_credit(self) -> None: ...


class FlowEndpoint(Protocol):
    """The local side of a flow: where its datagrams from the tunnel go."""

    def tunnel_datagram(self, data: bytes) -> None: ...
    def tunnel_flow_closed(self, code: int, remote: bool) -> None: ...
    def tunnel_session_lost(self) -> None: ...


class SessionPolicy(Protocol):
    """What an end decides: requests, incoming streams and flows, lifecycle."""

    def session_ready(self, session: MuxChannelSession) -> None: ...
    def session_ended(self, session: MuxChannelSession, event: ConnectionTerminated) -> None: ...
    def request_received(self, session: MuxChannelSession, event: RequestReceived) -> None: ...
    def stream_opened(self, session: MuxChannelSession, event: StreamOpened) -> None: ...
    def flow_opened(self, session: MuxChannelSession, event: FlowOpened) -> None: ...
    def ping_acknowledged(self, session: MuxChannelSession, event: PingAcknowledged) -> None: ...


class MuxChannelSession(SSHSession[bytes]):
    """asyncssh session callbacks <-> multiplexer <-> local endpoints."""

    def __init__(self, role: Role, config: MuxConfig, policy: SessionPolicy) -> None:
        self.mux = Multiplexer(role, config)
        self.policy = policy
        self.loop = asyncio.get_running_loop()
        self.streams: dict[int, StreamEndpoint] = {}
        self.flows: dict[int, FlowEndpoint] = {}
        self.closed = asyncio.Event()
        self.termination: ConnectionTerminated | None = None
        self._chan: SSHChannel[bytes] | None = None
        self._fast: ChannelFastPath | None = None
        self._write: Callable[[bytes], None] | None = None
        self._watch: TransportWatch | None = None
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._requests: dict[int, asyncio.Future[tuple[int, Meta]]] = {}
        self._write_blocked = False
        self.forward_names: dict[int, ForwardKey] = {}  # forward id -> metric labels
        self.write_stalls = 0  # flushes that found the SSH buffers full
        self._burst = 0  # channel bytes handled in this loop pass
        self._read_yielded = False

    # ------------------------------------------------------------------ asyncssh callbacks

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self._chan = chan
        chan.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)
        if isinstance(chan, SSHChannel):  # (tests drive sessions over in-memory channels too)
            quiet_packet_log(chan)
            self._fast = ChannelFastPath(chan)
            self._write = self._fast.write
        else:
            self._write = chan.write  # type: ignore[unreachable]
        config = self.mux.config
        dead_link = None
        if config.ping_timeout is not None:
            dead_link = (config.ping_interval or 0.0) + config.ping_timeout
        self._watch = TransportWatch(chan.get_connection(), dead_link)
        self._watch.on_drain(self._on_drain)

    def session_started(self) -> None:
        self.mux.initiate(monotonic())
        self.flush()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        events = self.mux.receive_data(data, monotonic())
        if events:
            self._dispatch(events)
        self.flush()
        self._burst += len(data)
        if self._burst >= READ_BURST and not self._read_yielded and self._watch is not None:
            # Let the loop poll the other sockets before we read more of this one.
            self._read_yielded = True
            self._watch.pause_reading()
            self.loop.call_soon(self._resume_after_burst)

    def _resume_after_burst(self) -> None:
        self._burst = 0
        self._read_yielded = False
        if self._watch is not None and self.termination is None:
            self._watch.resume_reading()

    def eof_received(self) -> bool:
        self._terminate_locally(ErrorCode.NO_ERROR, "channel EOF from peer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"SSH channel lost: {exc}" if exc else "SSH channel closed"
        self._terminate_locally(
            ErrorCode.NO_ERROR if exc is None else ErrorCode.INTERNAL_ERROR, reason
        )
        if self._watch is not None:
            self._watch.remove(self._on_drain)
        if self._fast is not None:
            self._fast.detach()
        if self._timer is not None:
            self._timer.cancel()
        self.closed.set()

    def pause_writing(self) -> None:
        self._write_blocked = True

    def resume_writing(self) -> None:
        self._write_blocked = False
        self.flush()

    # ------------------------------------------------------------------ output pump

    def kick(self) -> None:
        """Ask for a flush at the end of this loop iteration (batches many API calls)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def _on_drain(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write what the multiplexer has, as far as the buffers below allow."""
        chan = self._chan
        write = self._write
        if chan is None or write is None:
            return
        mux = self.mux
        while not self._write_blocked:
            room = WRITE_HIGH_WATER - chan.get_write_buffer_size()
            if self._watch is not None:
                room -= self._watch.buffered()
            if room <= 0:
                self.write_stalls += 1
                break
            data = mux.data_to_send(room, monotonic())
            if not data:
                break
            try:
                write(data)
            except OSError:  # channel already closing
                break
        if self.termination is not None:
            # Only the GOAWAY (and frames queued before it) is left: send it and close.
            tail = mux.data_to_send(None, monotonic())
            try:
                if tail:
                    chan.write(tail)
                chan.close()
            except OSError:
                pass
            return
        self._arm_timer()

    def _arm_timer(self) -> None:
        when = self.mux.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            # The multiplexer's clock is time.monotonic (uvloop's loop.time() only has
            # millisecond resolution, too coarse for RTTs); convert to a delay.
            self._timer = self.loop.call_later(max(0.0, when - monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        events = self.mux.handle_timer(monotonic())
        if events:
            self._dispatch(events)
        self.flush()

    # ------------------------------------------------------------------ event routing

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        flows = self.flows
        for event in events:
            kind = type(event)
            if kind is DatagramReceived:
                sink = flows.get(event.flow_id)  # type: ignore[attr-defined]
                if sink is not None:
                    sink.tunnel_datagram(event.data)  # type: ignore[attr-defined]
            elif kind is StreamDataReceived:
                endpoint = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if endpoint is not None:
                    endpoint.tunnel_data(event.data)  # type: ignore[attr-defined]
            else:
                self._dispatch_other(event)

    def _dispatch_other(self, event: Event) -> None:
        if isinstance(event, CreditAvailable):
            endpoint = self.streams.get(event.stream_id)
            if endpoint is not None:
                endpoint.tunnel_credit()
        elif isinstance(event, StreamAccepted):
            endpoint = self.streams.get(event.stream_id)
            if endpoint is not None:
                endpoint.tunnel_accepted()
        elif isinstance(event, StreamEnded):
            endpoint = self.streams.get(event.stream_id)
            if endpoint is not None:
                endpoint.tunnel_eof()
        elif isinstance(event, StreamReset):
            endpoint = self.streams.pop(event.stream_id, None)
            if endpoint is not None:
                endpoint.tunnel_reset(event.code)
        elif isinstance(event, FlowClosed):
            sink = self.flows.pop(event.flow_id, None)
            if sink is not None:
                sink.tunnel_flow_closed(event.code, event.remote)
        elif isinstance(event, StreamOpened):
            self.policy.stream_opened(self, event)
        elif isinstance(event, FlowOpened):
            self.policy.flow_opened(self, event)
        elif isinstance(event, RequestReceived):
            self.policy.request_received(self, event)
        elif isinstance(event, ResponseReceived):
            future = self._requests.pop(event.request_id, None)
            if future is not None and not future.done():
                future.set_result((event.code, event.body))
        elif isinstance(event, PingAcknowledged):
            self.policy.ping_acknowledged(self, event)
        elif isinstance(event, HandshakeCompleted):
            self.policy.session_ready(self)
        elif isinstance(event, ConnectionTerminated):
            self._terminated(event)

    # ------------------------------------------------------------------ lifecycle

    def _terminated(self, event: ConnectionTerminated) -> None:
        if self.termination is not None:
            return
        self.termination = event
        streams, self.streams = self.streams, {}
        flows, self.flows = self.flows, {}
        for endpoint in streams.values():
            endpoint.tunnel_reset(ErrorCode.CANCEL)
        for sink in flows.values():
            sink.tunnel_session_lost()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionError(f"session ended: {event.reason}"))
        self._requests.clear()
        self.policy.session_ended(self, event)
        self.kick()  # flush the GOAWAY, then close the channel

    def _terminate_locally(self, code: int, reason: str) -> None:
        if self.termination is None:
            self.mux.close(code, reason)
            assert self.mux.termination is not None
            self._terminated(self.mux.termination)

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session: GOAWAY to the peer, then close the channel."""
        self._terminate_locally(code, reason)
        self.flush()

    # ------------------------------------------------------------------ API for the ends

    async def request(self, kind: str, body: Meta, timeout: float = 30.0) -> tuple[int, Meta]:
        """Send a REQUEST and wait for its RESPONSE: (code, body)."""
        request_id = self.mux.send_request(kind, body)
        future: asyncio.Future[tuple[int, Meta]] = self.loop.create_future()
        self._requests[request_id] = future
        self.kick()
        return await asyncio.wait_for(future, timeout)

    def respond(self, request_id: int, code: int, body: Meta) -> None:
        if self.mux.is_open:
            self.mux.send_response(request_id, code, body)
            self.kick()

    def ping(self) -> None:
        if self.mux.is_open:
            self.mux.send_ping(monotonic())
            self.kick()

    def attach_stream(self, stream_id: int, endpoint: StreamEndpoint) -> None:
        self.streams[stream_id] = endpoint

    def detach_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def attach_flow(self, flow_id: int, endpoint: FlowEndpoint) -> None:
        self.flows[flow_id] = endpoint

    def detach_flow(self, flow_id: int) -> None:
        self.flows.pop(flow_id, None)
