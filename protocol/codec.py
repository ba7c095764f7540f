"""Frame codec: msgpack frames to bytes and back, with hard limits.

``encode_frame`` turns a frame object into wire bytes. ``FrameDecoder`` is
incremental: feed it any split of the byte stream and it returns the complete,
validated frames. Every limit is enforced before memory is committed (msgpack's
own length limits plus a bound on buffered bytes), and every way input can be
malformed surfaces as a ``RemoteProtocolError`` subclass.
"""

from __future__ import annotations

import dataclasses
import struct as _struct
from typing import Any, Final, cast

import msgpack

from sshrelay.protocol.errors import (
    FrameDecodeError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from sshrelay.protocol.frames import (
    BIN,
    FRAME_CLASSES,
    FRAME_FIELDS,
    INT,
    LIMITS,
    META,
    STR,
    STRLIST,
    Datagram,
    Frame,
    FrameType,
    StreamData,
)

MAX_WIRE_INT: Final = 2**62  # ids, codes, windows and limits are unsigned and below this
MAX_STR: Final = 4096  # reasons, kinds, metadata strings
MAX_MAP: Final = 64  # entries in a metadata or limits map
MAX_ARRAY: Final = 64  # frame arrays and the capability list
FEED_SLICE: Final = 65536  # bytes handed to msgpack at once (bounds its buffer)
MAX_CONTROL_FRAME: Final = 65536  # bytes of any frame beyond its bin payload
MAX_REASON: Final = 1024  # GOAWAY reasons are cut to this many characters
_META_SCALARS: Final = (str, int, float, bool, bytes, type(None))

_DATAGRAM: Final = int(FrameType.DATAGRAM)
_STREAM_DATA: Final = int(FrameType.STREAM_DATA)

_packer = msgpack.Packer(use_bin_type=True)


def encode_frame(frame: Frame) -> bytes:
    """Encode one frame (any ``Frame`` dataclass) to its wire bytes."""
    fields = [getattr(frame, field.name) for field in dataclasses.fields(cast(Any, frame))]
    return encode_fields(int(frame.TYPE), *fields)


def encode_fields(frame_type: int, *fields: Any) -> bytes:
    """Encode a frame from its type and raw field values (the multiplexer's fast path)."""
    return _packer.pack([frame_type, *fields])  # type: ignore[no-any-return]


def data_frame_prefix(frame_type: int, frame_id: int) -> bytes:
    """Encoded start of a STREAM_DATA or DATAGRAM frame: array header, type, id.

    The multiplexer caches this per stream and flow and appends the payload
    without copying it into a msgpack buffer (see ``with_bin_header``).
    """
    if frame_id < 0x80:
        return bytes((0x93, frame_type, frame_id))
    if frame_id <= 0xFF:
        return bytes((0x93, frame_type, 0xCC, frame_id))
    if frame_id <= 0xFFFF:
        return _struct.pack(">BBBH", 0x93, frame_type, 0xCD, frame_id)
    if frame_id <= 0xFFFFFFFF:
        return _struct.pack(">BBBI", 0x93, frame_type, 0xCE, frame_id)
    return _struct.pack(">BBBQ", 0x93, frame_type, 0xCF, frame_id)


def with_bin_header(prefix: bytes, length: int) -> bytes:
    """``prefix`` followed by the msgpack ``bin`` header for a payload of ``length``."""
    if length <= 0xFF:
        return prefix + bytes((0xC4, length))
    if length <= 0xFFFF:
        return prefix + _pack_bin16(0xC5, length)
    return prefix + _pack_bin32(0xC6, length)


_pack_bin16 = _struct.Struct(">BH").pack
_pack_bin32 = _struct.Struct(">BI").pack


class FrameDecoder:
    """Incremental, bounded decoder of the frame stream.

    ``max_payload`` bounds every ``bin`` (stream chunk or datagram). A frame
    that has consumed more than ``max_frame`` bytes without completing is an
    error, checked after every feed slice; msgpack advances its read position
    while it parses a partial object, so the bound is kept on the bytes since
    the last frame boundary, which covers both unparsed bytes and the objects
    already built for the partial frame. After the first error the decoder
    stays failed: a stream with a framing error cannot be resynchronised.
    """

    __slots__ = (
        "_error",
        "_fed",
        "_frame_start",
        "_unpacker",
        "max_buffer",
        "max_frame",
        "max_payload",
    )

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.max_frame = max_payload + MAX_CONTROL_FRAME
        self.max_buffer = self.max_frame + FEED_SLICE
        self._error: RemoteProtocolError | None = None
        self._fed = 0
        self._frame_start = 0
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_buffer_size=self.max_buffer,
            max_bin_len=max_payload,
            max_str_len=MAX_STR,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=0,
        )

    def buffered(self) -> int:
        """Bytes of the partial frame received so far (never above ``max_buffer``)."""
        return self._fed - self._frame_start

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume bytes; return every complete frame they finish, in order.

        Raises the first ``RemoteProtocolError``; frames before it are lost, so
        the multiplexer uses ``feed_frames`` instead.
        """
        frames, error = self.feed_frames(data)
        if error is not None:
            raise error
        return frames

    def feed_frames(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[Frame], RemoteProtocolError | None]:
        """Like ``feed`` but returns the frames completed before an error, and the error.

        The result then does not depend on how the peer's bytes were cut.
        """
        if self._error is not None:
            return [], self._error
        frames: list[Frame] = []
        view = memoryview(data)
        unpacker = self._unpacker
        try:
            for start in range(0, len(view), FEED_SLICE):
                piece = view[start : start + FEED_SLICE]
                unpacker.feed(piece)
                self._fed += len(piece)
                for obj in unpacker:
                    frames.append(validate_frame(obj))
                    self._frame_start = unpacker.tell()
                if self._fed - self._frame_start > self.max_frame:
                    raise FrameTooLargeError(
                        f"frame exceeds {self.max_frame} bytes without completing"
                    )
        except RemoteProtocolError as exc:
            self._error = exc
        except msgpack.BufferFull as exc:
            self._error = FrameTooLargeError(
                f"frame exceeds the {self.max_buffer}-byte decode buffer"
            )
            self._error.__cause__ = exc
        except Exception as exc:  # msgpack raises many types; all are the peer's fault
            self._error = _classify_msgpack_error(exc)
            self._error.__cause__ = exc
        return frames, self._error


def _classify_msgpack_error(exc: Exception) -> RemoteProtocolError:
    text = str(exc)
    if "exceeds max_" in text:
        return FrameTooLargeError(f"malformed frame: {text}")
    return FrameDecodeError(f"malformed frame: {type(exc).__name__}: {text}".rstrip(": "))


def validate_frame(obj: Any) -> Frame:
    """Check a decoded msgpack object against the frame table; build the frame."""
    if type(obj) is not list or not obj:
        raise FrameDecodeError(f"frame must be a non-empty array, got {type(obj).__name__}")
    frame_type = obj[0]
    # Fast path for the two frames that carry payload.
    if len(obj) == 3 and type(frame_type) is int and frame_type in (_DATAGRAM, _STREAM_DATA):
        fid, payload = obj[1], obj[2]
        if type(fid) is int and type(payload) is bytes and 0 <= fid < MAX_WIRE_INT:
            if frame_type == _DATAGRAM:
                return Datagram(fid, payload)
            return StreamData(fid, payload)
    if type(frame_type) is not int:
        raise FrameDecodeError("frame type must be an integer")
    kinds = FRAME_FIELDS.get(frame_type)
    if kinds is None:
        raise FrameDecodeError(f"unknown frame type {frame_type}")
    name = FrameType(frame_type).name
    if len(obj) != len(kinds) + 1:
        raise FrameDecodeError(f"{name} frame needs {len(kinds)} fields, got {len(obj) - 1}")
    for index, (kind, value) in enumerate(zip(kinds, obj[1:], strict=True), start=1):
        _check_field(name, index, kind, value)
    return FRAME_CLASSES[frame_type](*obj[1:])


def _check_field(name: str, index: int, kind: str, value: Any) -> None:
    ok: bool
    if kind == INT:
        ok = type(value) is int and 0 <= value < MAX_WIRE_INT
    elif kind == STR:
        ok = type(value) is str
    elif kind == BIN:
        ok = type(value) is bytes
    elif kind == META:
        ok = type(value) is dict and all(
            type(k) is str and isinstance(v, _META_SCALARS) for k, v in value.items()
        )
    elif kind == LIMITS:
        ok = type(value) is dict and all(
            type(k) is str and type(v) is int and 0 <= v < MAX_WIRE_INT for k, v in value.items()
        )
    elif kind == STRLIST:
        ok = type(value) is list and all(type(v) is str for v in value)
    else:  # pragma: no cover - table and checker out of sync
        raise AssertionError(kind)
    if not ok:
        raise FrameDecodeError(f"{name} frame field {index} must be {kind}, got {value!r:.60}")


def check_meta(meta: dict[str, Any], what: str) -> None:
    """Refuse (locally) metadata the peer's decoder would reject."""
    if len(meta) > MAX_MAP:
        raise LocalProtocolError(f"{what}: more than {MAX_MAP} metadata entries")
    for key, value in meta.items():
        if type(key) is not str or not isinstance(value, _META_SCALARS):
            raise LocalProtocolError(f"{what}: metadata {key!r} must map a string to a scalar")
        if (isinstance(value, str | bytes) and len(value) > MAX_STR) or len(key) > MAX_STR:
            raise LocalProtocolError(f"{what}: metadata {key!r} is longer than {MAX_STR}")


def cut_reason(reason: str) -> str:
    """A GOAWAY reason short enough for any peer's decoder."""
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
