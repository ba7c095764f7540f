"""Events the multiplexer reports to the application.

Small past-tense dataclasses, returned as lists by ``Multiplexer.receive_data``
and ``Multiplexer.handle_timer`` (the aioquic/h2 pattern). They carry only
plain values, never references into multiplexer state.
"""

from __future__ import annotations

from dataclasses import dataclass

from sshrelay.protocol.errors import ProtocolError
from sshrelay.protocol.frames import Meta


class Event:
    """Base class of all multiplexer events."""

    __slots__ = ()


@dataclass(slots=True)
class HandshakeCompleted(Event):
    """Both HELLOs were exchanged; the session is open."""

    peer_version: int
    peer_capabilities: frozenset[str]
    peer_limits: dict[str, int]


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """The session ended: a GOAWAY was received, or this end detected an error.

    ``remote`` tells whether the peer ended it. ``error`` holds the protocol
    error when this end closed the session because of the peer's input.
    """

    code: int
    reason: str
    remote: bool
    error: ProtocolError | None = None


@dataclass(slots=True)
class RequestReceived(Event):
    """The peer asked for something (for example a forward); answer with ``send_response``."""

    request_id: int
    kind: str
    body: Meta


@dataclass(slots=True)
class ResponseReceived(Event):
    """The peer answered one of our requests; ``code`` 0 means success."""

    request_id: int
    code: int
    body: Meta


@dataclass(slots=True)
class PingAcknowledged(Event):
    """A PONG arrived; ``rtt`` includes time spent in both ends' datagram queues."""

    seq: int
    rtt: float


@dataclass(slots=True)
class StreamOpened(Event):
    """The peer opened a stream; answer with ``accept_stream`` or ``reset_stream``."""

    stream_id: int
    forward: int
    meta: Meta


@dataclass(slots=True)
class StreamAccepted(Event):
    """The peer accepted a stream we opened; data may now flow both ways."""

    stream_id: int


@dataclass(slots=True)
class StreamDataReceived(Event):
    """Stream bytes arrived. Acknowledge them once consumed to return credit."""

    stream_id: int
    data: bytes


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream (FIN): no more data will arrive on it."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The peer aborted the stream. (When the whole session ends there is one
    ``ConnectionTerminated`` instead: every stream and flow is gone with it.)"""

    stream_id: int
    code: int
    remote: bool = True


@dataclass(slots=True)
class CreditAvailable(Event):
    """A stream that had run out of send credit can send again."""

    stream_id: int
    credit: int


@dataclass(slots=True)
class FlowOpened(Event):
    """The peer opened a datagram flow (metadata such as the public peer comes once)."""

    flow_id: int
    forward: int
    idle_timeout: float
    meta: Meta


@dataclass(slots=True)
class DatagramReceived(Event):
    """One datagram, exactly as it was sent: never merged, split or truncated."""

    flow_id: int
    data: bytes


@dataclass(slots=True)
class FlowClosed(Event):
    """A flow ended: closed by the peer (``remote``) or expired idle here. (Session
    teardown reports one ``ConnectionTerminated`` instead.)"""

    flow_id: int
    code: int
    remote: bool
