"""Per-stream and connection credit: spending, returning, stalling, overruns, resets."""

from __future__ import annotations

import pytest

from sshrelay.protocol.codec import encode_fields
from sshrelay.protocol.errors import (
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    RemoteFlowControlError,
)
from sshrelay.protocol.events import (
    ConnectionTerminated,
    CreditAvailable,
    StreamAccepted,
    StreamDataReceived,
    StreamOpened,
    StreamReset,
)
from sshrelay.protocol.frames import FrameType, GoAway, WindowUpdate

FT = FrameType
STREAM_WINDOW = 4096
CONNECTION_WINDOW = 16384


def _open(pair, sender=None):
    """Open a stream from ``sender`` (default: client) and accept it at the peer."""
    sender = sender or pair.client
    receiver = pair.peer(sender)
    stream_id = sender.open_stream(0)
    pair.drain()
    assert any(isinstance(e, StreamOpened) for e in pair.take(receiver))
    receiver.accept_stream(stream_id)
    pair.drain()
    assert any(isinstance(e, StreamAccepted) for e in pair.take(sender))
    return stream_id


def _received(events, stream_id):
    return sum(
        len(e.data)
        for e in events
        if isinstance(e, StreamDataReceived) and e.stream_id == stream_id
    )


def _credit_events(events):
    return [e for e in events if isinstance(e, CreditAvailable)]


@pytest.fixture
def pair(make_pair, small_config):
    return make_pair(config=small_config())


def test_initial_window_is_the_peers_stream_window(pair) -> None:
    stream_id = _open(pair)
    assert pair.client.send_window(stream_id) == STREAM_WINDOW
    assert pair.relay.send_window(stream_id) == STREAM_WINDOW


def test_window_is_zero_before_accept_and_after_fin(pair) -> None:
    stream_id = pair.client.open_stream(0)
    assert pair.client.send_window(stream_id) == 0
    pair.drain()
    pair.relay.accept_stream(stream_id)
    pair.drain()
    pair.client.end_stream(stream_id)
    assert pair.client.send_window(stream_id) == 0
    assert pair.client.send_window(999) == 0


def test_sending_beyond_credit_raises(pair) -> None:
    stream_id = _open(pair)
    with pytest.raises(FlowControlError):
        pair.client.send_stream_data(stream_id, b"x" * (STREAM_WINDOW + 1))
    assert pair.client.send_window(stream_id) == STREAM_WINDOW  # nothing was spent
    pair.client.send_stream_data(stream_id, b"x" * 3000)
    with pytest.raises(FlowControlError):
        pair.client.send_stream_data(stream_id, b"x" * 1097)
    pair.client.send_stream_data(stream_id, b"x" * 1096)
    assert pair.client.send_window(stream_id) == 0
    with pytest.raises(FlowControlError):
        pair.client.send_stream_data(stream_id, b"x")
    assert isinstance(FlowControlError("x"), LocalProtocolError)


def test_connection_window_limits_all_streams_together(pair) -> None:
    streams = [_open(pair) for _ in range(5)]
    for stream_id in streams[:4]:
        pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    assert pair.client.send_window(streams[4]) == 0  # 4 x 4096 = the connection window
    with pytest.raises(FlowControlError):
        pair.client.send_stream_data(streams[4], b"x")


def test_credit_returns_only_on_acknowledge(pair) -> None:
    stream_id = _open(pair)
    pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    pair.drain()
    assert _received(pair.take(pair.relay), stream_id) == STREAM_WINDOW
    pair.advance(10.0)
    pair.drain()
    assert pair.client.send_window(stream_id) == 0  # delivered, but not consumed
    assert pair.relay.buffered()["received_unacknowledged"] == STREAM_WINDOW

    pair.relay.acknowledge_received_data(stream_id, 1000)  # below a quarter: batched
    pair.drain()
    assert pair.client.send_window(stream_id) == 0
    pair.relay.acknowledge_received_data(stream_id, 24)  # now a quarter
    pair.drain()
    assert pair.client.send_window(stream_id) == 1024
    pair.relay.acknowledge_received_data(stream_id, STREAM_WINDOW - 1024)
    pair.drain()
    assert pair.client.send_window(stream_id) == STREAM_WINDOW
    assert pair.relay.buffered()["received_unacknowledged"] == 0


def test_acknowledging_more_than_received_is_a_local_error(pair) -> None:
    stream_id = _open(pair)
    pair.client.send_stream_data(stream_id, b"x" * 10)
    pair.drain()
    with pytest.raises(LocalProtocolError):
        pair.relay.acknowledge_received_data(stream_id, 11)
    pair.relay.acknowledge_received_data(stream_id, 10)


def test_credit_available_after_stall(pair) -> None:
    stream_id = _open(pair)
    pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    pair.drain()
    assert _credit_events(pair.take(pair.client)) == []
    pair.relay.acknowledge_received_data(stream_id, STREAM_WINDOW)
    pair.drain()
    (event,) = _credit_events(pair.take(pair.client))
    assert event.stream_id == stream_id
    assert event.credit == STREAM_WINDOW == pair.client.send_window(stream_id)
    # Not stalled any more: further updates bring no event.
    pair.client.send_stream_data(stream_id, b"x" * 100)
    pair.drain()
    pair.relay.acknowledge_received_data(stream_id, 100)
    pair.relay.acknowledge_received_data(stream_id, 0)
    pair.drain()
    assert _credit_events(pair.take(pair.client)) == []


def test_credit_available_for_a_stream_starved_by_the_connection_window(pair) -> None:
    """A stream that never sent, but found no connection credit, is woken too."""
    streams = [_open(pair) for _ in range(5)]
    for stream_id in streams[:4]:
        pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    waiting = streams[4]
    assert pair.client.send_window(waiting) == 0  # the application now waits for credit
    pair.drain()
    pair.relay.acknowledge_received_data(streams[0], STREAM_WINDOW)
    pair.drain()
    woken = {e.stream_id: e.credit for e in _credit_events(pair.take(pair.client))}
    assert woken.get(waiting) == STREAM_WINDOW == pair.client.send_window(waiting)
    assert woken.get(streams[0]) == STREAM_WINDOW


def test_credit_available_after_a_refused_send(pair) -> None:
    streams = [_open(pair) for _ in range(5)]
    for stream_id in streams[:4]:
        pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    with pytest.raises(FlowControlError):
        pair.client.send_stream_data(streams[4], b"x" * 10)
    pair.drain()
    pair.relay.acknowledge_received_data(streams[1], STREAM_WINDOW)
    pair.drain()
    assert streams[4] in {e.stream_id for e in _credit_events(pair.take(pair.client))}


def test_no_credit_event_for_a_reset_stream(pair) -> None:
    stream_id = _open(pair)
    pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    pair.drain()
    pair.client.reset_stream(stream_id)
    pair.drain()
    assert _credit_events(pair.take(pair.client)) == []


def test_window_update_for_streams_stops_after_peer_fin(pair, decode) -> None:
    """No stream WINDOW_UPDATE once the peer can no longer send on that stream."""
    stream_id = _open(pair)
    pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    pair.client.end_stream(stream_id)
    pair.drain()
    pair.relay.acknowledge_received_data(stream_id, STREAM_WINDOW)
    frames = decode(pair.relay.data_to_send())
    updates = [f for f in frames if isinstance(f, WindowUpdate)]
    assert [u.stream_id for u in updates] == [0]  # only the connection window


# ---------------------------------------------------------------- misbehaving peer


def _overrun(peer, frames):
    events = []
    for frame in frames:
        events += peer.send(*frame)
    term = events[-1]
    assert isinstance(term, ConnectionTerminated), events
    assert term.code == ErrorCode.FLOW_CONTROL_ERROR
    assert isinstance(term.error, RemoteFlowControlError)
    goaway = peer.pull()[-1]
    assert isinstance(goaway, GoAway) and goaway.code == ErrorCode.FLOW_CONTROL_ERROR
    return term


@pytest.fixture
def peer(raw_peer, small_config):
    peer = raw_peer(config=small_config())
    return peer


def _peer_stream(peer, stream_id):
    peer.send(FT.STREAM_OPEN, stream_id, 0, {})
    peer.mux.accept_stream(stream_id)
    peer.pull()


def test_peer_overrunning_the_stream_window(peer) -> None:
    _peer_stream(peer, 1)
    term = _overrun(peer, [(FT.STREAM_DATA, 1, b"x" * STREAM_WINDOW), (FT.STREAM_DATA, 1, b"y")])
    assert "stream 1" in term.reason


def test_peer_overrunning_the_stream_window_in_one_frame(raw_peer, small_config) -> None:
    peer = raw_peer(config=small_config(max_chunk=2 * STREAM_WINDOW))
    _peer_stream(peer, 1)
    _overrun(peer, [(FT.STREAM_DATA, 1, b"x" * (STREAM_WINDOW + 1))])


def test_peer_overrunning_the_connection_window(peer) -> None:
    frames = []
    for stream_id in (1, 3, 5, 7, 9):
        _peer_stream(peer, stream_id)
        frames.append((FT.STREAM_DATA, stream_id, b"x" * STREAM_WINDOW))
    term = _overrun(peer, frames)
    assert "connection" in term.reason


def test_peer_may_send_again_only_what_was_returned(peer) -> None:
    _peer_stream(peer, 1)
    peer.send(FT.STREAM_DATA, 1, b"x" * STREAM_WINDOW)
    peer.mux.acknowledge_received_data(1, 2000)
    updates = [f for f in peer.pull() if isinstance(f, WindowUpdate)]
    assert {(u.stream_id, u.increment) for u in updates} == {(1, 2000)}
    # Connection window: 2000 is below a quarter of 16384, so not returned yet.
    peer.send(FT.STREAM_DATA, 1, b"x" * 2000)
    assert peer.mux.is_open
    _overrun(peer, [(FT.STREAM_DATA, 1, b"x")])


def test_peer_credit_overflow(peer) -> None:
    stream_id = peer.mux.open_stream(0)
    peer.send(FT.STREAM_ACCEPT, stream_id)
    _overrun(peer, [(FT.WINDOW_UPDATE, stream_id, 2**62 - 1)])


def test_connection_credit_overflow(peer) -> None:
    _overrun(peer, [(FT.WINDOW_UPDATE, 0, 2**62 - 1)])


def test_overrun_never_raises_out_of_receive_data(peer) -> None:
    _peer_stream(peer, 1)
    data = encode_fields(FT.STREAM_DATA, 1, b"x" * STREAM_WINDOW) * 3
    events = peer.mux.receive_data(data, 0.0)
    assert isinstance(events[-1], ConnectionTerminated)


# ---------------------------------------------------------------- resets give credit back


def _connection_credit(mux):
    return mux._send_connection_credit


def _assert_connection_windows_whole(pair):
    for sender in (pair.relay, pair.client):
        receiver = pair.peer(sender)
        window = receiver._recv_connection
        assert window.unacknowledged == receiver.buffered()["received_unacknowledged"]
        # Quiescent: what the sender may still send is what the receiver still accepts.
        assert _connection_credit(sender) == window.available
        assert window.available + window.unacknowledged + window.unreturned == CONNECTION_WINDOW
        assert window.unreturned < CONNECTION_WINDOW // 4  # only the batching remainder


@pytest.mark.parametrize("resetter", ["sender", "receiver"])
@pytest.mark.parametrize("delivered", ["none", "part", "all"])
def test_reset_returns_connection_credit_at_both_ends(pair, resetter, delivered) -> None:
    for round_ in range(200):
        sender = pair.client if round_ % 2 else pair.relay
        receiver = pair.peer(sender)
        stream_id = _open(pair, sender)
        # Both directions hold credit: the receiver also sends on the stream.
        sender.send_stream_data(stream_id, b"s" * STREAM_WINDOW)
        receiver.send_stream_data(stream_id, b"r" * 777)
        if delivered == "part":
            pair.transfer(sender, max_bytes=1500)
        elif delivered == "all":
            pair.drain()
            receiver.acknowledge_received_data(stream_id, 1000)  # the rest stays unconsumed
        pair.transfer(receiver)
        victim = sender if resetter == "sender" else receiver
        victim.reset_stream(stream_id, ErrorCode.CANCEL)
        pair.drain()
        events = pair.take(pair.peer(victim))
        resets = [e for e in events if isinstance(e, StreamReset)]
        assert [(e.stream_id, e.code, e.remote) for e in resets] == [
            (stream_id, ErrorCode.CANCEL, True)
        ]
        pair.take(victim)
        assert pair.relay.stream_count() == pair.client.stream_count() == 0
        _assert_connection_windows_whole(pair)
    # The connection window is still usable (less at most the batching remainder).
    streams = [_open(pair) for _ in range(3)]
    for stream_id in streams:
        pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW)
    pair.drain()
    assert pair.relay.is_open and pair.client.is_open


def test_clean_close_returns_connection_credit(pair) -> None:
    for _ in range(50):
        stream_id = _open(pair)
        pair.client.send_stream_data(stream_id, b"x" * 3000)
        pair.client.end_stream(stream_id)
        pair.relay.end_stream(stream_id)
        pair.drain()
        pair.relay.acknowledge_received_data(stream_id, 3000)
        pair.drain()
        assert pair.relay.stream_count() == pair.client.stream_count() == 0
    _assert_connection_windows_whole(pair)
