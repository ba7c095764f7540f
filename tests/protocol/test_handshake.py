"""The HELLO exchange: what opens a session and what refuses it."""

from __future__ import annotations

import pytest

from sshrelay.protocol import multiplexer as multiplexer_module
from sshrelay.protocol.codec import encode_fields
from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.errors import (
    ErrorCode,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
    SessionClosedError,
    VersionMismatchError,
)
from sshrelay.protocol.events import ConnectionTerminated, HandshakeCompleted
from sshrelay.protocol.frames import GoAway, Hello
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.pair import MuxPair


def _fresh(role: Role = Role.RELAY) -> Multiplexer:
    mux = Multiplexer(role)
    mux.initiate(0.0)
    return mux


def _terminated(events: list[object]) -> ConnectionTerminated:
    assert events, "expected a ConnectionTerminated event"
    last = events[-1]
    assert isinstance(last, ConnectionTerminated), events
    return last


def test_handshake_completes_and_reports_peer_limits() -> None:
    relay_config = MuxConfig(max_datagram=1400, stream_window=8192)
    pair = MuxPair(relay_config, MuxConfig()).handshake()
    (event,) = pair.take(pair.client)
    assert isinstance(event, HandshakeCompleted)
    assert event.peer_version == 1
    assert {"streams", "datagrams", "ping", "requests"} <= event.peer_capabilities
    assert event.peer_limits["max_datagram"] == 1400
    assert event.peer_limits["stream_window"] == 8192
    assert pair.relay.is_open and pair.client.is_open


def test_handshake_survives_one_byte_deliveries() -> None:
    pair = MuxPair()
    for sender in (pair.relay, pair.client):
        pair.transfer(sender, split=lambda data: [data[i : i + 1] for i in range(len(data))])
    assert pair.relay.is_open and pair.client.is_open
    assert [type(e) for e in pair.take(pair.relay)] == [HandshakeCompleted]
    assert [type(e) for e in pair.take(pair.client)] == [HandshakeCompleted]


def test_hello_is_the_first_frame_sent(decode) -> None:
    mux = _fresh()
    frames = decode(mux.data_to_send())
    assert isinstance(frames[0], Hello)
    assert frames[0].magic == "sshrelay"


def test_unknown_capabilities_and_extra_limits_are_accepted(raw_hello) -> None:
    mux = _fresh()
    limits = {**MuxConfig().hello_limits(), "future_limit": 7}
    events = mux.receive_data(raw_hello(limits=limits, capabilities=("streams", "teleport")), 0.0)
    (event,) = events
    assert isinstance(event, HandshakeCompleted)
    assert "teleport" in event.peer_capabilities
    assert mux.is_open


def test_magic_mismatch_closes_with_goaway(raw_hello, decode) -> None:
    mux = _fresh()
    mux.data_to_send()
    events = mux.receive_data(raw_hello(magic="SSH-2.0-OpenSSH_9.6"), 0.0)
    term = _terminated(events)
    assert isinstance(term.error, HandshakeError)
    assert term.code == ErrorCode.PROTOCOL_ERROR
    assert not term.remote
    assert "magic" in term.reason
    (goaway,) = decode(mux.data_to_send())
    assert isinstance(goaway, GoAway)
    assert goaway.code == ErrorCode.PROTOCOL_ERROR
    assert not mux.is_open


def test_version_mismatch_detected_by_one_end_reaches_both(raw_hello) -> None:
    """A peer speaking version 2: this end refuses, the peer learns why."""
    relay = _fresh(Role.RELAY)
    client = _fresh(Role.CLIENT)
    client.data_to_send()  # the client's real HELLO is replaced by a version 2 one
    relay_events = relay.receive_data(raw_hello(version=2), 0.0)
    term = _terminated(relay_events)
    assert term.code == ErrorCode.VERSION_MISMATCH
    assert isinstance(term.error, VersionMismatchError)
    assert "1" in term.reason and "2" in term.reason

    client_events = client.receive_data(relay.data_to_send(), 0.0)
    client_term = _terminated(client_events)
    assert client_term.remote
    assert client_term.code == ErrorCode.VERSION_MISMATCH
    assert client_term.reason == term.reason
    assert not client.is_open


def test_version_mismatch_detected_by_both_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real ends of different versions each refuse and report both versions."""
    relay = _fresh(Role.RELAY)
    client = Multiplexer(Role.CLIENT)
    with monkeypatch.context() as patch:
        patch.setattr(multiplexer_module, "PROTOCOL_VERSION", 2)
        client.initiate(0.0)
        client_hello = client.data_to_send()
        client_events = client.receive_data(relay.data_to_send(), 0.0)
    relay_events = relay.receive_data(client_hello, 0.0)
    for events in (relay_events, client_events):
        term = _terminated(events)
        assert term.code == ErrorCode.VERSION_MISMATCH
        assert "speaks 1" in term.reason and "speaks 2" in term.reason
    # Each end's GOAWAY arrives at an end that is already closed: nothing more happens.
    assert relay.receive_data(client.data_to_send(), 0.0) == []
    assert client.receive_data(relay.data_to_send(), 0.0) == []


@pytest.mark.parametrize("missing", sorted(MuxConfig().hello_limits()))
def test_missing_limit_is_a_handshake_error(raw_hello, missing: str) -> None:
    mux = _fresh()
    limits = MuxConfig().hello_limits()
    del limits[missing]
    term = _terminated(mux.receive_data(raw_hello(limits=limits), 0.0))
    assert isinstance(term.error, HandshakeError)
    assert missing in term.reason


def test_limit_below_minimum_is_a_handshake_error(raw_hello) -> None:
    mux = _fresh()
    limits = {**MuxConfig().hello_limits(), "max_chunk": 10}
    term = _terminated(mux.receive_data(raw_hello(limits=limits), 0.0))
    assert isinstance(term.error, HandshakeError)
    assert "max_chunk" in term.reason


@pytest.mark.parametrize(
    "frame",
    [
        encode_fields(2, 1),  # PING
        encode_fields(10, 1, 0, {}),  # STREAM_OPEN
        encode_fields(21, 1, b"x"),  # DATAGRAM
        encode_fields(8, 0, 100),  # WINDOW_UPDATE
    ],
    ids=["ping", "stream_open", "datagram", "window_update"],
)
def test_frame_before_hello_is_a_handshake_error(frame: bytes, decode) -> None:
    mux = _fresh()
    mux.data_to_send()
    events = mux.receive_data(frame, 0.0)
    term = _terminated(events)
    assert isinstance(term.error, HandshakeError)
    assert isinstance(term.error, RemoteProtocolError)
    assert [type(f) for f in decode(mux.data_to_send())] == [GoAway]


def test_goaway_before_hello_ends_the_session_quietly() -> None:
    mux = _fresh()
    events = mux.receive_data(encode_fields(1, int(ErrorCode.NOT_PERMITTED), "no"), 0.0)
    term = _terminated(events)
    assert term.remote and term.code == ErrorCode.NOT_PERMITTED and term.error is None


def test_second_hello_is_a_protocol_error(raw_hello) -> None:
    pair = MuxPair().handshake()
    term = _terminated(pair.relay.receive_data(raw_hello(), 0.0))
    assert isinstance(term.error, RemoteProtocolError)


def test_receive_before_initiate_raises() -> None:
    mux = Multiplexer(Role.RELAY)
    with pytest.raises(SessionClosedError):
        mux.receive_data(b"\x90", 0.0)


def test_initiate_twice_raises() -> None:
    mux = _fresh()
    with pytest.raises(LocalProtocolError):
        mux.initiate(0.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.open_stream(1),
        lambda m: m.open_flow(1, None, None, 0.0),
        lambda m: m.send_ping(0.0),
        lambda m: m.send_request("forward", {}),
        lambda m: m.send_response(1, 0, {}),
        lambda m: m.accept_stream(1),
        lambda m: m.send_stream_data(1, b"x"),
        lambda m: m.end_stream(1),
        lambda m: m.reset_stream(1),
        lambda m: m.close_flow(1),
        lambda m: m.send_datagram(1, b"x", 0.0),
    ],
    ids=[
        "open_stream",
        "open_flow",
        "send_ping",
        "send_request",
        "send_response",
        "accept_stream",
        "send_stream_data",
        "end_stream",
        "reset_stream",
        "close_flow",
        "send_datagram",
    ],
)
@pytest.mark.parametrize("initiated", [False, True], ids=["idle", "hello_sent"])
def test_api_before_handshake_raises_local_error(call, initiated: bool) -> None:
    mux = Multiplexer(Role.RELAY)
    if initiated:
        mux.initiate(0.0)
    with pytest.raises(LocalProtocolError):
        call(mux)
    assert mux.send_window(1) == 0


def test_close_before_handshake_sends_goaway(decode) -> None:
    mux = _fresh()
    mux.close(ErrorCode.SHUTDOWN, "bye")
    frames = decode(mux.data_to_send())
    assert isinstance(frames[0], Hello)
    assert isinstance(frames[-1], GoAway) and frames[-1].code == ErrorCode.SHUTDOWN
    assert mux.termination is not None and not mux.termination.remote


def test_a_second_hello_is_a_protocol_error_and_changes_nothing(raw_peer) -> None:
    from sshrelay.protocol.frames import FrameType

    peer = raw_peer()
    limits_before = dict(peer.mux.peer_limits)
    small = dict(MuxConfig().hello_limits(), stream_window=1024)
    events = peer.send(FrameType.HELLO, "sshrelay", 2, [], small)
    (term,) = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert term.code == ErrorCode.STREAM_STATE_ERROR
    assert "second HELLO" in term.reason
    assert peer.mux.peer_limits == limits_before
