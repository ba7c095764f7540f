"""A misbehaving peer closes its session with GOAWAY; late frames are ignored.

The multiplexer under test is the relay; the scripted peer plays the client
(odd ids). Every violation must surface as a ``ConnectionTerminated`` event
carrying a ``RemoteProtocolError`` and a GOAWAY on the wire, never as an
exception out of ``receive_data``.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshrelay.protocol.codec import encode_fields
from sshrelay.protocol.config import MuxConfig
from sshrelay.protocol.errors import (
    ErrorCode,
    FrameDecodeError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteFlowControlError,
    RemoteLimitError,
    RemoteProtocolError,
    RemoteStateError,
)
from sshrelay.protocol.events import (
    ConnectionTerminated,
    DatagramReceived,
    StreamDataReceived,
    StreamEnded,
    StreamOpened,
)
from sshrelay.protocol.frames import FrameType, GoAway

FT = FrameType


def _assert_session_failed(peer, events, error_type=RemoteProtocolError):
    assert events, "expected a ConnectionTerminated event"
    term = events[-1]
    assert isinstance(term, ConnectionTerminated), events
    assert isinstance(term.error, error_type), term
    assert isinstance(term.error, RemoteProtocolError)
    assert not term.remote
    assert term.code == int(term.error.code)
    assert not peer.mux.is_open
    frames = peer.pull()
    assert frames and isinstance(frames[-1], GoAway), frames
    assert frames[-1].code == term.code
    assert frames[-1].reason == term.reason
    # After termination the multiplexer ignores everything.
    assert peer.mux.receive_data(encode_fields(FT.PING, 1), peer.now) == []
    assert peer.mux.receive_data(b"\xc1garbage", peer.now) == []
    assert peer.pull() == []
    return term


def _open_peer_stream(peer, stream_id=1, accept=True):
    (event,) = peer.send(FT.STREAM_OPEN, stream_id, 0, {})
    assert isinstance(event, StreamOpened)
    if accept:
        peer.mux.accept_stream(stream_id)
    peer.pull()


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "frame",
    [
        (FT.STREAM_OPEN, 2, 0, {}),
        (FT.FLOW_OPEN, 4, 0, 0, {}),
        (FT.STREAM_OPEN, 0, 0, {}),
        (FT.FLOW_OPEN, 0, 0, 0, {}),
    ],
    ids=["stream_even", "flow_even", "stream_zero", "flow_zero"],
)
def test_wrong_parity_id(raw_peer, frame) -> None:
    peer = raw_peer()
    _assert_session_failed(peer, peer.send(*frame), RemoteStateError)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((FT.STREAM_OPEN, 1, 0, {}), (FT.STREAM_OPEN, 1, 0, {})),
        ((FT.STREAM_OPEN, 1, 0, {}), (FT.FLOW_OPEN, 1, 0, 0, {})),
        ((FT.FLOW_OPEN, 5, 0, 0, {}), (FT.STREAM_OPEN, 3, 0, {})),
        ((FT.FLOW_OPEN, 3, 0, 0, {}), (FT.FLOW_OPEN, 3, 0, 0, {})),
    ],
    ids=["stream_twice", "stream_then_flow", "reordered", "flow_twice"],
)
def test_reused_id(raw_peer, first, second) -> None:
    peer = raw_peer()
    events = peer.send(*first)
    assert events and not isinstance(events[-1], ConnectionTerminated)
    _assert_session_failed(peer, peer.send(*second), RemoteStateError)


def test_reused_id_of_a_closed_stream(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer)
    peer.send(FT.STREAM_RESET, 1, int(ErrorCode.CANCEL))
    _assert_session_failed(peer, peer.send(FT.STREAM_OPEN, 1, 0, {}), RemoteStateError)


@pytest.mark.parametrize(
    "frame",
    [
        (FT.STREAM_DATA, 7, b"x"),
        (FT.STREAM_FIN, 7),
        (FT.STREAM_RESET, 7, 0),
        (FT.STREAM_ACCEPT, 8),
        (FT.WINDOW_UPDATE, 7, 10),
        (FT.DATAGRAM, 7, b"x"),
        (FT.FLOW_CLOSE, 8, 0),
    ],
    ids=["data", "fin", "reset", "accept", "window_update", "datagram", "flow_close"],
)
def test_frame_for_never_opened_id(raw_peer, frame) -> None:
    peer = raw_peer()
    _assert_session_failed(peer, peer.send(*frame), RemoteStateError)


# ---------------------------------------------------------------- stream states


def test_data_on_unaccepted_remote_stream(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer, accept=False)
    _assert_session_failed(peer, peer.send(FT.STREAM_DATA, 1, b"early"), RemoteStateError)


def test_data_on_local_stream_before_accept(raw_peer) -> None:
    peer = raw_peer()
    stream_id = peer.mux.open_stream(0)
    peer.pull()
    _assert_session_failed(peer, peer.send(FT.STREAM_DATA, stream_id, b"early"), RemoteStateError)


def test_fin_on_unaccepted_stream(raw_peer) -> None:
    peer = raw_peer()
    stream_id = peer.mux.open_stream(0)
    peer.pull()
    _assert_session_failed(peer, peer.send(FT.STREAM_FIN, stream_id), RemoteStateError)


def test_peer_accepting_its_own_stream(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer, accept=False)
    _assert_session_failed(peer, peer.send(FT.STREAM_ACCEPT, 1), RemoteStateError)


def test_accept_twice(raw_peer) -> None:
    peer = raw_peer()
    stream_id = peer.mux.open_stream(0)
    peer.pull()
    peer.send(FT.STREAM_ACCEPT, stream_id)
    _assert_session_failed(peer, peer.send(FT.STREAM_ACCEPT, stream_id), RemoteStateError)


def test_data_after_fin(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer)
    events = peer.send(FT.STREAM_DATA, 1, b"hello")
    events += peer.send(FT.STREAM_FIN, 1)
    assert [type(e) for e in events] == [StreamDataReceived, StreamEnded]
    _assert_session_failed(peer, peer.send(FT.STREAM_DATA, 1, b"more"), RemoteStateError)


def test_data_after_fin_on_a_closed_but_unacknowledged_stream(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer)
    peer.send(FT.STREAM_DATA, 1, b"hello")
    peer.mux.end_stream(1)
    peer.pull()
    peer.send(FT.STREAM_FIN, 1)  # both FINs: closed, kept only for the unacknowledged bytes
    _assert_session_failed(peer, peer.send(FT.STREAM_DATA, 1, b"more"), RemoteStateError)


def test_fin_twice(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer)
    peer.send(FT.STREAM_FIN, 1)
    _assert_session_failed(peer, peer.send(FT.STREAM_FIN, 1), RemoteStateError)


def test_too_many_streams(raw_peer) -> None:
    peer = raw_peer(config=MuxConfig(max_streams=2))
    peer.send(FT.STREAM_OPEN, 1, 0, {})
    peer.send(FT.STREAM_OPEN, 3, 0, {})
    term = _assert_session_failed(peer, peer.send(FT.STREAM_OPEN, 5, 0, {}), RemoteLimitError)
    assert term.code == ErrorCode.LIMIT_EXCEEDED


def test_stream_limit_counts_only_streams_the_peer_still_counts(make_pair) -> None:
    """A stream closed at both ends frees its slot at the opener at once; the acceptor,
    which keeps it only until its application consumes the tail, must not count it."""
    pair = make_pair(MuxConfig(max_streams=2), MuxConfig())
    first, second = pair.client.open_stream(0), pair.client.open_stream(0)
    pair.drain()
    pair.relay.accept_stream(first)
    pair.relay.accept_stream(second)
    pair.drain()
    pair.client.send_stream_data(first, b"unconsumed tail")
    pair.client.end_stream(first)
    pair.relay.end_stream(first)
    pair.drain()
    assert pair.client.stream_count() == 1  # the client forgot the first stream
    third = pair.client.open_stream(0)  # so it may open another
    pair.drain()
    assert pair.relay.is_open, pair.take(pair.relay)[-1]
    assert StreamOpened(third, 0, {}) in pair.take(pair.relay)
    with pytest.raises(LocalProtocolError):
        pair.client.open_stream(0)
    pair.relay.acknowledge_received_data(first, len(b"unconsumed tail"))
    assert pair.relay.stream_count() == 2


def test_too_many_flows(raw_peer) -> None:
    peer = raw_peer(config=MuxConfig(max_flows=1))
    peer.send(FT.FLOW_OPEN, 1, 0, 0, {})
    term = _assert_session_failed(peer, peer.send(FT.FLOW_OPEN, 3, 0, 0, {}), RemoteLimitError)
    assert term.code == ErrorCode.LIMIT_EXCEEDED


# ---------------------------------------------------------------- other frames


def test_response_to_unknown_request(raw_peer) -> None:
    peer = raw_peer()
    _assert_session_failed(peer, peer.send(FT.RESPONSE, 1, 0, {}), RemoteStateError)


def test_response_answered_twice(raw_peer) -> None:
    peer = raw_peer()
    request_id = peer.mux.send_request("forward", {"port": 80})
    peer.pull()
    assert len(peer.send(FT.RESPONSE, request_id, 0, {})) == 1
    _assert_session_failed(peer, peer.send(FT.RESPONSE, request_id, 0, {}), RemoteStateError)


@pytest.mark.parametrize("target", ["connection", "stream"])
def test_zero_window_update(raw_peer, target) -> None:
    peer = raw_peer()
    stream_id = 0
    if target == "stream":
        stream_id = peer.mux.open_stream(0)
        peer.send(FT.STREAM_ACCEPT, stream_id)
    term = _assert_session_failed(
        peer, peer.send(FT.WINDOW_UPDATE, stream_id, 0), RemoteFlowControlError
    )
    assert term.code == ErrorCode.FLOW_CONTROL_ERROR


def test_oversized_stream_chunk(raw_peer) -> None:
    peer = raw_peer(config=MuxConfig(max_chunk=2048))
    _open_peer_stream(peer)
    term = _assert_session_failed(
        peer, peer.send(FT.STREAM_DATA, 1, b"x" * 2049), FrameTooLargeError
    )
    assert term.code == ErrorCode.FRAME_TOO_LARGE


def test_oversized_datagram(raw_peer) -> None:
    peer = raw_peer(config=MuxConfig(max_datagram=1200))
    peer.send(FT.FLOW_OPEN, 1, 0, 0, {})
    term = _assert_session_failed(peer, peer.send(FT.DATAGRAM, 1, b"x" * 1201), FrameTooLargeError)
    assert term.code == ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb({"not": "an array"}),
        msgpack.packb([]),
        msgpack.packb([99, 1]),  # unknown frame type
        msgpack.packb(["PING", 1]),
        msgpack.packb([int(FT.PING)]),  # missing field
        msgpack.packb([int(FT.PING), 1, 2]),  # extra field
        msgpack.packb([int(FT.PING), -1]),
        msgpack.packb([int(FT.STREAM_DATA), 1, "text, not bin"]),
        msgpack.packb([int(FT.STREAM_OPEN), 1, 0, {"k": [1, 2]}]),
        msgpack.packb([int(FT.GOAWAY), 0, "x" * 5000]),
        b"\xdd\xff\xff\xff\xff",  # array of 4 G elements
    ],
    ids=[
        "reserved_byte",
        "map",
        "empty_array",
        "unknown_type",
        "type_not_int",
        "missing_field",
        "extra_field",
        "negative_int",
        "str_payload",
        "nested_meta",
        "long_reason",
        "huge_array",
    ],
)
def test_garbage_bytes(raw_peer, data: bytes) -> None:
    peer = raw_peer()
    peer.send(FT.FLOW_OPEN, 1, 0, 0, {})
    _assert_session_failed(peer, peer.send_bytes(data), (FrameDecodeError, FrameTooLargeError))


@pytest.mark.parametrize(
    "header",
    [
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GB
        b"\x93\x15\x01\xc6\x7f\xff\xff\xff",  # DATAGRAM claiming a 2 GB payload
        b"\x93\x0c\x01\xc6\x00\x10\x00\x00",  # STREAM_DATA claiming 1 MiB
    ],
    ids=["huge_bin", "huge_datagram", "huge_stream_data"],
)
def test_huge_length_prefix_is_refused_before_memory_is_committed(raw_peer, header) -> None:
    """A length prefix may only be judged once its payload arrives; the buffer stays bounded."""
    peer = raw_peer()
    _open_peer_stream(peer)
    peer.send(FT.FLOW_OPEN, 3, 0, 0, {})
    max_buffer = peer.mux._decoder.max_buffer
    events = peer.send_bytes(header)
    sent = len(header)
    while not events and sent <= 4 * max_buffer:
        events = peer.send_bytes(b"\x00" * 4096)
        sent += 4096
        assert peer.mux.buffered()["decoder"] <= max_buffer
    assert sent <= max_buffer + 4096 + len(header)
    _assert_session_failed(peer, events, FrameTooLargeError)


def test_frames_before_the_bad_one_are_processed(raw_peer) -> None:
    """Events must not depend on how the bytes were cut: valid frames before garbage count."""
    peer = raw_peer()
    peer.send(FT.FLOW_OPEN, 1, 0, 0, {})
    data = encode_fields(FT.DATAGRAM, 1, b"before") + b"\xc1" + encode_fields(FT.DATAGRAM, 1, b"x")
    events = peer.send_bytes(data)
    assert events and isinstance(events[0], DatagramReceived), events
    assert events[0].data == b"before"
    _assert_session_failed(peer, events[1:])


def test_frames_after_the_bad_one_are_not_processed(raw_peer) -> None:
    peer = raw_peer()
    peer.send(FT.FLOW_OPEN, 1, 0, 0, {})
    events = peer.send_bytes(b"\xc1" + encode_fields(FT.DATAGRAM, 1, b"x"))
    _assert_session_failed(peer, events, FrameDecodeError)
    assert not any(isinstance(e, DatagramReceived) for e in events)


def test_goaway_from_peer_ends_the_session(raw_peer) -> None:
    peer = raw_peer()
    stream_id = peer.mux.open_stream(0)
    flow_id = peer.mux.open_flow(0, None, None, 0.0)
    peer.mux.send_datagram(flow_id, b"queued", 0.0)
    (term,) = peer.send(FT.GOAWAY, int(ErrorCode.SHUTDOWN), "maintenance")
    assert isinstance(term, ConnectionTerminated)
    assert term.remote and term.code == ErrorCode.SHUTDOWN and term.reason == "maintenance"
    assert peer.mux.counters.drops["session_closed"] == 1
    assert peer.mux.send_window(stream_id) == 0
    assert peer.mux.receive_data(encode_fields(FT.PING, 1), 0.0) == []


# ---------------------------------------------------------------- late frames


def test_late_frames_for_a_reset_stream_are_ignored(raw_peer) -> None:
    peer = raw_peer(config=MuxConfig(stream_window=4096, connection_window=16384))
    _open_peer_stream(peer)
    peer.mux.reset_stream(1)
    peer.pull()
    events = []
    events += peer.send(FT.STREAM_DATA, 1, b"x" * 4096)  # was in flight when we reset
    events += peer.send(FT.WINDOW_UPDATE, 1, 100)
    events += peer.send(FT.STREAM_FIN, 1)
    events += peer.send(FT.STREAM_RESET, 1, 0)
    assert events == []
    assert peer.mux.is_open
    # The late bytes still count against the connection window, and are given back.
    assert peer.mux.buffered()["received_unacknowledged"] == 0
    assert peer.mux._recv_connection.available + peer.mux._recv_connection.unreturned == 16384


def test_late_frames_for_a_stream_the_peer_reset_are_ignored(raw_peer) -> None:
    peer = raw_peer()
    stream_id = peer.mux.open_stream(0)
    peer.pull()
    peer.send(FT.STREAM_RESET, stream_id, int(ErrorCode.CONNECT_REFUSED))
    assert peer.send(FT.STREAM_ACCEPT, stream_id) == []
    assert peer.send(FT.STREAM_RESET, stream_id, 0) == []
    assert peer.mux.is_open


def test_late_accept_for_a_stream_we_reset_is_ignored(raw_peer) -> None:
    peer = raw_peer()
    stream_id = peer.mux.open_stream(0)
    peer.mux.reset_stream(stream_id)
    peer.pull()
    assert peer.send(FT.STREAM_ACCEPT, stream_id) == []
    assert peer.send(FT.STREAM_DATA, stream_id, b"late") == []
    assert peer.mux.is_open


def test_late_frames_for_a_closed_flow_are_ignored(raw_peer) -> None:
    peer = raw_peer()
    flow_id = peer.mux.open_flow(0, None, None, 0.0)
    peer.pull()
    peer.mux.close_flow(flow_id)
    peer.pull()
    assert peer.send(FT.DATAGRAM, flow_id, b"late") == []
    assert peer.send(FT.FLOW_CLOSE, flow_id, 0) == []
    assert peer.mux.counters.drops["unknown_flow"] == 1
    assert peer.mux.is_open


def test_late_frames_for_a_stream_closed_cleanly_are_ignored(raw_peer) -> None:
    peer = raw_peer()
    _open_peer_stream(peer)
    peer.mux.end_stream(1)
    peer.pull()
    peer.send(FT.STREAM_FIN, 1)
    assert peer.mux.stream_count() == 0
    assert peer.send(FT.WINDOW_UPDATE, 1, 10) == []
    assert peer.send(FT.STREAM_RESET, 1, 0) == []
    assert peer.mux.is_open


# ---------------------------------------------------------------- fuzz

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.binary(max_size=40),
    st.text(max_size=20),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
    ),
    max_leaves=12,
)
_frame = st.one_of(
    st.tuples(
        st.sampled_from([int(t) for t in FT]) | st.integers(0, 40), st.lists(_value, max_size=5)
    ).map(lambda t: msgpack.packb([t[0], *t[1]])),
    st.tuples(
        st.sampled_from([int(FT.STREAM_OPEN), int(FT.FLOW_OPEN), int(FT.STREAM_DATA)]),
        st.integers(0, 12),
    ).map(
        lambda t: msgpack.packb(
            [t[0], t[1], 0, {}] if t[0] != FT.STREAM_DATA else [t[0], t[1], b"x"]
        )
    ),
    st.binary(max_size=30),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    frames=st.lists(_frame, max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_arbitrary_input_never_raises(raw_peer, frames: list[bytes], cuts: list[int]) -> None:
    peer = raw_peer()
    peer.mux.open_stream(0)
    peer.mux.open_flow(0, None, 1.0, 0.0)
    data = b"".join(frames)
    positions = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *positions], [*positions, len(data)], strict=True)]
    events = []
    for piece in pieces:
        events += peer.mux.receive_data(piece, 0.0)  # must never raise
        peer.mux.data_to_send()
    terminations = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(terminations) <= 1
    if terminations:
        assert events[-1] is terminations[0]
        assert terminations[0].remote or isinstance(terminations[0].error, RemoteProtocolError)
        assert not peer.mux.is_open
