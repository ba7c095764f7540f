"""Error types and wire error codes of the sshrelay protocol.

Following h11, errors are split by who is at fault: a ``LocalProtocolError``
means this program misused the API (a bug or a race the caller must handle);
a ``RemoteProtocolError`` means the peer sent something invalid. The
multiplexer converts remote errors into a GOAWAY and a ``ConnectionTerminated``
event at its single receive boundary, so malformed input closes one session and
never escapes as a bare msgpack, ``ValueError`` or ``KeyError``.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by GOAWAY, STREAM_RESET, FLOW_CLOSE and RESPONSE frames.

    Unknown codes from a newer peer are accepted and reported as plain ints.
    """

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    FRAME_TOO_LARGE = 4
    VERSION_MISMATCH = 5
    STREAM_STATE_ERROR = 6
    LIMIT_EXCEEDED = 7
    CANCEL = 8
    CONNECT_REFUSED = 9
    CONNECT_FAILED = 10
    TIMEOUT = 11
    SHUTDOWN = 12
    IDLE = 13
    EVICTED = 14
    NOT_PERMITTED = 15
    ADDRESS_IN_USE = 16
    BAD_REQUEST = 17
    SUPERSEDED = 18


def describe_code(code: int) -> str:
    """Name of a wire code, or ``code_<n>`` for codes this version does not know."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"code_{code}"


class ProtocolError(Exception):
    """Base class of every error this package raises about the protocol."""

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """The local application used the multiplexer wrongly."""


class StreamStateError(LocalProtocolError):
    """An operation is not allowed in the stream's (or flow's) current state."""

    code = ErrorCode.STREAM_STATE_ERROR


class FlowControlError(LocalProtocolError):
    """The application tried to send stream data beyond the available credit."""

    code = ErrorCode.FLOW_CONTROL_ERROR


class SessionClosedError(LocalProtocolError):
    """The session is not open (handshake pending, or closed)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that violates the protocol."""


class FrameDecodeError(RemoteProtocolError):
    """Bytes that are not a well-formed msgpack frame of a known type."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame or payload exceeds a negotiated or hard limit."""

    code = ErrorCode.FRAME_TOO_LARGE


class HandshakeError(RemoteProtocolError):
    """The HELLO exchange failed: wrong magic, bad limits, or a frame before HELLO."""


class VersionMismatchError(HandshakeError):
    """The peer speaks a protocol version this end does not."""

    code = ErrorCode.VERSION_MISMATCH


class RemoteFlowControlError(RemoteProtocolError):
    """The peer sent stream data beyond the credit this end granted."""

    code = ErrorCode.FLOW_CONTROL_ERROR


class RemoteStateError(RemoteProtocolError):
    """The peer sent a frame that is not valid in the stream's or session's state."""

    code = ErrorCode.STREAM_STATE_ERROR


class RemoteLimitError(RemoteProtocolError):
    """The peer opened more streams or flows than this end allows."""

    code = ErrorCode.LIMIT_EXCEEDED
