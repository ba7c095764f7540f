"""Behaviour of the frame codec under hostile, random and split input."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sshrelay.protocol.codec import (
    FEED_SLICE,
    MAX_ARRAY,
    MAX_MAP,
    MAX_STR,
    MAX_WIRE_INT,
    FrameDecoder,
    data_frame_prefix,
    encode_frame,
    with_bin_header,
)
from sshrelay.protocol.errors import FrameDecodeError, FrameTooLargeError, RemoteProtocolError
from sshrelay.protocol.frames import (
    Datagram,
    FlowClose,
    FlowOpen,
    Frame,
    FrameType,
    GoAway,
    Hello,
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

MAX_PAYLOAD = 2048  # small, so that hypothesis reaches the limits often

# ---------------------------------------------------------------------- strategies

wire_ints = st.integers(0, MAX_WIRE_INT - 1)
# At most 4 UTF-8 bytes per code point: 1000 code points always fit MAX_STR.
texts = st.text(max_size=40) | st.text(max_size=MAX_STR // 4)
short_texts = st.text(max_size=16)
meta_values = st.one_of(
    short_texts,
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.binary(max_size=32),
)
metas = st.dictionaries(short_texts, meta_values, max_size=MAX_MAP)
limits = st.dictionaries(short_texts, wire_ints, max_size=MAX_MAP)
payloads = st.binary(max_size=64) | st.binary(min_size=MAX_PAYLOAD - 2, max_size=MAX_PAYLOAD)

frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, texts, wire_ints, st.lists(short_texts, max_size=MAX_ARRAY), limits),
    st.builds(GoAway, wire_ints, texts),
    st.builds(Ping, wire_ints),
    st.builds(Pong, wire_ints),
    st.builds(Request, wire_ints, texts, metas),
    st.builds(Response, wire_ints, wire_ints, metas),
    st.builds(WindowUpdate, wire_ints, wire_ints),
    st.builds(StreamOpen, wire_ints, wire_ints, metas),
    st.builds(StreamAccept, wire_ints),
    st.builds(StreamData, wire_ints, payloads),
    st.builds(StreamFin, wire_ints),
    st.builds(StreamResetFrame, wire_ints, wire_ints),
    st.builds(FlowOpen, wire_ints, wire_ints, wire_ints, metas),
    st.builds(Datagram, wire_ints, payloads),
    st.builds(FlowClose, wire_ints, wire_ints),
)

# Arbitrary msgpack values, including the ones the protocol never uses.
msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    ),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), children, max_size=4)
    ),
    max_leaves=16,
)
# Arrays that start like a frame, so the field validator sees odd values.
frame_shaped = st.tuples(
    st.sampled_from([*map(int, FrameType), 6, 99, -1, 21.0, 12.0, True, "PING"]),
    st.lists(msgpack_values, max_size=5),
).map(lambda t: [t[0], *t[1]])


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes replaced, inserted, or cut off."""
    wire = bytearray(encode_frame(draw(frames)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(wire)))
        action = draw(st.sampled_from(["replace", "insert", "truncate"]))
        if action == "replace" and position < len(wire):
            wire[position] = draw(st.integers(0, 255))
        elif action == "insert":
            wire[position:position] = draw(st.binary(min_size=1, max_size=4))
        else:
            del wire[position:]
    return bytes(wire)


hostile_inputs = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=64).map(lambda tail: b"\x93" + tail),  # array header first
    mutated_frames(),
    msgpack_values.map(_pack),
    frame_shaped.map(_pack),
)


def split(data: st.DataObject, wire: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8), label="cuts"))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------- hostile input


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(blobs=st.lists(hostile_inputs, min_size=1, max_size=3), data=st.data())
def test_hostile_input_only_raises_remote_protocol_errors(
    blobs: list[bytes], data: st.DataObject
) -> None:
    """Never a bare msgpack error, ValueError, KeyError, IndexError, TypeError, ..."""
    decoder = FrameDecoder(MAX_PAYLOAD)
    wire = b"".join(blobs)
    try:
        for piece in split(data, wire):
            for frame in decoder.feed(piece):
                assert isinstance(frame, Frame)
    except RemoteProtocolError as exc:
        assert type(exc) in (FrameDecodeError, FrameTooLargeError)
        with pytest.raises(type(exc)):  # and it stays failed
            decoder.feed(b"")
    assert decoder.buffered() <= decoder.max_buffer


# ---------------------------------------------------------------------- round trips


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(frames, min_size=1, max_size=6), data=st.data())
def test_random_frames_roundtrip_under_random_splits(
    batch: list[Frame], data: st.DataObject
) -> None:
    wire = b"".join(encode_frame(frame) for frame in batch)
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoded: list[Frame] = []
    for piece in split(data, wire):
        decoded.extend(decoder.feed(piece))
        assert decoder.buffered() <= decoder.max_buffer
    assert decoded == batch
    assert [type(frame) for frame in decoded] == [type(frame) for frame in batch]
    assert decoder.buffered() == 0
    assert b"".join(encode_frame(frame) for frame in decoded) == wire


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_any_buffer(kind: type) -> None:
    wire = encode_frame(Datagram(4, b"abc")) + encode_frame(StreamFin(2))
    assert FrameDecoder(MAX_PAYLOAD).feed(kind(wire)) == [Datagram(4, b"abc"), StreamFin(2)]


def test_payload_of_exactly_max_payload_is_accepted_and_one_more_is_not() -> None:
    exact = encode_frame(StreamData(2, b"\xaa" * MAX_PAYLOAD))
    assert FrameDecoder(MAX_PAYLOAD).feed(exact) == [StreamData(2, b"\xaa" * MAX_PAYLOAD)]
    with pytest.raises(FrameTooLargeError):
        FrameDecoder(MAX_PAYLOAD).feed(encode_frame(Datagram(2, b"\xaa" * (MAX_PAYLOAD + 1))))


# ---------------------------------------------------------------------- data fast path

BOUNDARY_IDS = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 2**32, 2**62 - 1, 2**62]
PAYLOAD_LENGTHS = [0, 255, 256, 65535, 65536, 70000]


@settings(deadline=None, max_examples=150)
@given(
    frame_type=st.sampled_from([FrameType.DATAGRAM, FrameType.STREAM_DATA]),
    frame_id=st.integers(0, 2**62) | st.sampled_from(BOUNDARY_IDS),
    length=st.sampled_from(PAYLOAD_LENGTHS),
)
@example(frame_type=FrameType.DATAGRAM, frame_id=2**62, length=70000)
def test_data_frame_prefix_matches_msgpack(
    frame_type: FrameType, frame_id: int, length: int
) -> None:
    payload = bytes((frame_id + i) & 0xFF for i in range(min(length, 256))) * (length // 256 + 1)
    payload = payload[:length]
    wire = with_bin_header(data_frame_prefix(int(frame_type), frame_id), length) + payload
    assert wire == _pack([int(frame_type), frame_id, payload])
    decoder = FrameDecoder(70000)
    if frame_id < MAX_WIRE_INT:
        cls = Datagram if frame_type is FrameType.DATAGRAM else StreamData
        assert decoder.feed(wire) == [cls(frame_id, payload)]
    else:  # the prefix can express it, but ids stop below 2**62
        with pytest.raises(FrameDecodeError):
            decoder.feed(wire)


# ---------------------------------------------------------------------- memory bounds


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(st.builds(Datagram, wire_ints, payloads), min_size=1, max_size=40),
    chunk=st.sampled_from([1, 7, 1000, FEED_SLICE - 1, FEED_SLICE, FEED_SLICE + 1, 3 * FEED_SLICE]),
)
def test_buffered_never_exceeds_max_buffer(batch: list[Frame], chunk: int) -> None:
    wire = b"".join(encode_frame(frame) for frame in batch)
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoded: list[Frame] = []
    for start in range(0, len(wire), chunk):
        decoded.extend(decoder.feed(wire[start : start + chunk]))
        assert 0 <= decoder.buffered() <= decoder.max_buffer
    assert decoded == batch


def test_buffered_counts_a_partial_frame() -> None:
    wire = encode_frame(Datagram(4, b"x" * 1000))
    decoder = FrameDecoder(MAX_PAYLOAD)
    assert decoder.feed(wire[:-10]) == []
    assert 0 < decoder.buffered() <= len(wire) - 10
    assert decoder.feed(wire[-10:]) == [Datagram(4, b"x" * 1000)]
    assert decoder.buffered() == 0


def test_bin_header_over_max_payload_is_rejected_when_the_bin_completes() -> None:
    """Real behaviour of msgpack's max_bin_len: checked once the whole bin has arrived."""
    claimed = MAX_PAYLOAD + 1
    head = data_frame_prefix(int(FrameType.DATAGRAM), 4) + struct.pack(">BH", 0xC5, claimed)
    decoder = FrameDecoder(MAX_PAYLOAD)
    assert decoder.feed(head) == []
    assert decoder.feed(b"\x00" * (claimed - 1)) == []
    with pytest.raises(FrameTooLargeError):
        decoder.feed(b"\x00")
    with pytest.raises(FrameTooLargeError):
        decoder.feed(encode_frame(Ping(1)))


def test_huge_bin_header_is_rejected_by_the_buffer_bound() -> None:
    """A bin32 header claiming 4 GiB never makes the decoder hold more than max_buffer."""
    head = data_frame_prefix(int(FrameType.STREAM_DATA), 2) + struct.pack(">BI", 0xC6, 2**32 - 1)
    decoder = FrameDecoder(MAX_PAYLOAD)
    assert decoder.feed(head) == []
    fed = 0
    piece = b"\x00" * 4096
    with pytest.raises(FrameTooLargeError):
        while fed <= decoder.max_buffer:
            assert decoder.feed(piece) == []
            fed += len(piece)
            assert decoder.buffered() <= decoder.max_buffer
    assert fed <= decoder.max_buffer


def test_an_unfinished_oversized_frame_is_rejected_before_it_completes() -> None:
    """Memory per session must stay bounded even when the peer never finishes a frame.

    No valid frame comes near 16 MiB (frames are at most 5 fields; maps and lists
    hold at most 64 short scalars), yet 64 x 64 strings of 4000 bytes nested in
    arrays are held in memory while max_buffer stays untouched.
    """
    decoder = FrameDecoder(MAX_PAYLOAD)
    element = _pack("s" * 4000)
    inner = b"\xdc\x00\x40" + element * 64  # array16 of 64 strings, 256 KB
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\xdc\x00\x40")  # outer array16 of 64: never completed
        for _ in range(63):
            decoder.feed(inner)
