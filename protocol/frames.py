"""Frame types of the sshrelay wire protocol (version 1).

Every frame is a msgpack array whose first element is the frame type; payloads
are msgpack ``bin``. This module is the one place that lists the frames, their
fields and field types; ``docs/protocol.md`` is the normative prose for it and
``tests/protocol/vectors.json`` the byte-level examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

MAGIC: Final = "sshrelay"
PROTOCOL_VERSION: Final = 1

# Scalars allowed as values in metadata maps (HELLO limits are ints only).
MetaValue = str | int | float | bool | bytes | None
Meta = dict[str, MetaValue]

CONNECTION_ID: Final = 0  # WINDOW_UPDATE id for the connection-level window


class FrameType(IntEnum):
    HELLO = 0
    GOAWAY = 1
    PING = 2
    PONG = 3
    REQUEST = 4
    RESPONSE = 5
    WINDOW_UPDATE = 8
    STREAM_OPEN = 10
    STREAM_ACCEPT = 11
    STREAM_DATA = 12
    STREAM_FIN = 13
    STREAM_RESET = 14
    FLOW_OPEN = 20
    DATAGRAM = 21
    FLOW_CLOSE = 22


class Frame:
    """Base class of decoded frames."""

    __slots__ = ()
    TYPE: FrameType


@dataclass(slots=True, frozen=True)
class Hello(Frame):
    TYPE = FrameType.HELLO
    magic: str
    version: int
    capabilities: list[str]
    limits: dict[str, int]


@dataclass(slots=True, frozen=True)
class GoAway(Frame):
    TYPE = FrameType.GOAWAY
    code: int
    reason: str


@dataclass(slots=True, frozen=True)
class Ping(Frame):
    TYPE = FrameType.PING
    seq: int


@dataclass(slots=True, frozen=True)
class Pong(Frame):
    TYPE = FrameType.PONG
    seq: int


@dataclass(slots=True, frozen=True)
class Request(Frame):
    TYPE = FrameType.REQUEST
    request_id: int
    kind: str
    body: Meta


@dataclass(slots=True, frozen=True)
class Response(Frame):
    TYPE = FrameType.RESPONSE
    request_id: int
    code: int
    body: Meta


@dataclass(slots=True, frozen=True)
class WindowUpdate(Frame):
    TYPE = FrameType.WINDOW_UPDATE
    stream_id: int  # 0 = connection window
    increment: int


@dataclass(slots=True, frozen=True)
class StreamOpen(Frame):
    TYPE = FrameType.STREAM_OPEN
    stream_id: int
    forward: int
    meta: Meta


@dataclass(slots=True, frozen=True)
class StreamAccept(Frame):
    TYPE = FrameType.STREAM_ACCEPT
    stream_id: int


@dataclass(slots=True, frozen=True)
class StreamData(Frame):
    TYPE = FrameType.STREAM_DATA
    stream_id: int
    data: bytes


@dataclass(slots=True, frozen=True)
class StreamFin(Frame):
    TYPE = FrameType.STREAM_FIN
    stream_id: int


@dataclass(slots=True, frozen=True)
class StreamResetFrame(Frame):
    TYPE = FrameType.STREAM_RESET
    stream_id: int
    code: int


@dataclass(slots=True, frozen=True)
class FlowOpen(Frame):
    TYPE = FrameType.FLOW_OPEN
    flow_id: int
    forward: int
    idle_timeout_ms: int
    meta: Meta


@dataclass(slots=True, frozen=True)
class Datagram(Frame):
    TYPE = FrameType.DATAGRAM
    flow_id: int
    data: bytes


@dataclass(slots=True, frozen=True)
class FlowClose(Frame):
    TYPE = FrameType.FLOW_CLOSE
    flow_id: int
    code: int


# Field kinds used by the codec's validator.
INT, STR, BIN, META, LIMITS, STRLIST = "int", "str", "bin", "meta", "limits", "strlist"

FRAME_CLASSES: Final[dict[int, type[Frame]]] = {
    int(cls.TYPE): cls
    for cls in (
        Hello,
        GoAway,
        Ping,
        Pong,
        Request,
        Response,
        WindowUpdate,
        StreamOpen,
        StreamAccept,
        StreamData,
        StreamFin,
        StreamResetFrame,
        FlowOpen,
        Datagram,
        FlowClose,
    )
}

FRAME_FIELDS: Final[dict[int, tuple[str, ...]]] = {
    FrameType.HELLO: (STR, INT, STRLIST, LIMITS),
    FrameType.GOAWAY: (INT, STR),
    FrameType.PING: (INT,),
    FrameType.PONG: (INT,),
    FrameType.REQUEST: (INT, STR, META),
    FrameType.RESPONSE: (INT, INT, META),
    FrameType.WINDOW_UPDATE: (INT, INT),
    FrameType.STREAM_OPEN: (INT, INT, META),
    FrameType.STREAM_ACCEPT: (INT,),
    FrameType.STREAM_DATA: (INT, BIN),
    FrameType.STREAM_FIN: (INT,),
    FrameType.STREAM_RESET: (INT, INT),
    FrameType.FLOW_OPEN: (INT, INT, INT, META),
    FrameType.DATAGRAM: (INT, BIN),
    FrameType.FLOW_CLOSE: (INT, INT),
}
