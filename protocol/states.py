"""Explicit state tables for the session and for streams (the h2 pattern).

Each table maps ``(state, input) -> next_state``. An input missing from the
table is an error: a ``LocalProtocolError`` when this end tried it, a
``RemoteProtocolError`` when the peer's frame caused it. No implicit state is
kept in flags elsewhere.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final

from sshrelay.protocol.errors import RemoteStateError, SessionClosedError, StreamStateError


class SessionState(Enum):
    IDLE = auto()  # nothing sent yet
    HELLO_SENT = auto()  # our HELLO queued, waiting for the peer's
    OPEN = auto()  # handshake done; streams, flows and requests allowed
    CLOSED = auto()  # GOAWAY sent or received, or a protocol error


class SessionInput(Enum):
    SEND_HELLO = auto()
    RECV_HELLO = auto()
    SEND_GOAWAY = auto()
    RECV_GOAWAY = auto()
    PROTOCOL_ERROR = auto()


S, SI = SessionState, SessionInput
SESSION_TRANSITIONS: Final[dict[tuple[SessionState, SessionInput], SessionState]] = {
    (S.IDLE, SI.SEND_HELLO): S.HELLO_SENT,
    (S.HELLO_SENT, SI.RECV_HELLO): S.OPEN,
    (S.HELLO_SENT, SI.SEND_GOAWAY): S.CLOSED,
    (S.HELLO_SENT, SI.RECV_GOAWAY): S.CLOSED,
    (S.HELLO_SENT, SI.PROTOCOL_ERROR): S.CLOSED,
    (S.OPEN, SI.SEND_GOAWAY): S.CLOSED,
    (S.OPEN, SI.RECV_GOAWAY): S.CLOSED,
    (S.OPEN, SI.PROTOCOL_ERROR): S.CLOSED,
    (S.IDLE, SI.SEND_GOAWAY): S.CLOSED,
}


def next_session_state(state: SessionState, event: SessionInput) -> SessionState:
    try:
        return SESSION_TRANSITIONS[(state, event)]
    except KeyError:
        if event is SI.RECV_HELLO or event is SI.RECV_GOAWAY:
            raise RemoteStateError(
                f"{event.name} not allowed in session state {state.name}"
            ) from None
        raise SessionClosedError(
            f"{event.name} not allowed in session state {state.name}"
        ) from None


class StreamState(Enum):
    LOCAL_OPENING = auto()  # we sent STREAM_OPEN, waiting for ACCEPT or RESET
    REMOTE_OPENING = auto()  # the peer sent STREAM_OPEN, we have not answered
    OPEN = auto()
    HALF_CLOSED_LOCAL = auto()  # we sent FIN; the peer may still send
    HALF_CLOSED_REMOTE = auto()  # the peer sent FIN; we may still send
    CLOSED = auto()


class StreamInput(Enum):
    SEND_ACCEPT = auto()
    RECV_ACCEPT = auto()
    SEND_DATA = auto()
    RECV_DATA = auto()
    SEND_FIN = auto()
    RECV_FIN = auto()
    SEND_RESET = auto()
    RECV_RESET = auto()


T, IN = StreamState, StreamInput
STREAM_TRANSITIONS: Final[dict[tuple[StreamState, StreamInput], StreamState]] = {
    (T.LOCAL_OPENING, IN.RECV_ACCEPT): T.OPEN,
    (T.LOCAL_OPENING, IN.SEND_RESET): T.CLOSED,
    (T.LOCAL_OPENING, IN.RECV_RESET): T.CLOSED,
    (T.REMOTE_OPENING, IN.SEND_ACCEPT): T.OPEN,
    (T.REMOTE_OPENING, IN.SEND_RESET): T.CLOSED,
    (T.REMOTE_OPENING, IN.RECV_RESET): T.CLOSED,
    (T.OPEN, IN.SEND_DATA): T.OPEN,
    (T.OPEN, IN.RECV_DATA): T.OPEN,
    (T.OPEN, IN.SEND_FIN): T.HALF_CLOSED_LOCAL,
    (T.OPEN, IN.RECV_FIN): T.HALF_CLOSED_REMOTE,
    (T.OPEN, IN.SEND_RESET): T.CLOSED,
    (T.OPEN, IN.RECV_RESET): T.CLOSED,
    (T.HALF_CLOSED_LOCAL, IN.RECV_DATA): T.HALF_CLOSED_LOCAL,
    (T.HALF_CLOSED_LOCAL, IN.RECV_FIN): T.CLOSED,
    (T.HALF_CLOSED_LOCAL, IN.SEND_RESET): T.CLOSED,
    (T.HALF_CLOSED_LOCAL, IN.RECV_RESET): T.CLOSED,
    (T.HALF_CLOSED_REMOTE, IN.SEND_DATA): T.HALF_CLOSED_REMOTE,
    (T.HALF_CLOSED_REMOTE, IN.SEND_FIN): T.CLOSED,
    (T.HALF_CLOSED_REMOTE, IN.SEND_RESET): T.CLOSED,
    (T.HALF_CLOSED_REMOTE, IN.RECV_RESET): T.CLOSED,
}

_RECV_INPUTS: Final = frozenset({IN.RECV_ACCEPT, IN.RECV_DATA, IN.RECV_FIN, IN.RECV_RESET})


def next_stream_state(stream_id: int, state: StreamState, event: StreamInput) -> StreamState:
    try:
        return STREAM_TRANSITIONS[(state, event)]
    except KeyError:
        message = f"stream {stream_id}: {event.name} not allowed in state {state.name}"
        if event in _RECV_INPUTS:
            raise RemoteStateError(message) from None
        raise StreamStateError(message) from None
