"""PING/PONG: round-trip time on the pair clock, periodic pings, and the ping timeout."""

from __future__ import annotations

import pytest

from sshrelay.protocol.errors import ErrorCode
from sshrelay.protocol.events import ConnectionTerminated, PingAcknowledged
from sshrelay.protocol.frames import GoAway, Ping, Pong


def _acks(events):
    return [e for e in events if isinstance(e, PingAcknowledged)]


def test_rtt_is_measured_with_the_pair_clock(make_pair) -> None:
    pair = make_pair(now=100.0)
    seq = pair.client.send_ping(pair.now)
    pair.transfer(pair.client)  # PING reaches the relay at t=100
    pair.now += 0.030
    pair.transfer(pair.relay)  # PONG leaves the relay at t=100.030, arrives at once
    (ack,) = _acks(pair.take(pair.client))
    assert ack.seq == seq
    assert ack.rtt == pytest.approx(0.030)
    assert pair.client.counters.last_rtt == pytest.approx(0.030)
    assert pair.client.counters.rtt.count == 1
    assert pair.client.counters.pings_sent == 1
    assert pair.client.counters.pongs_received == 1


def test_rtt_includes_datagram_queueing(make_pair, decode) -> None:
    """PING and PONG ride the datagram lane, behind datagrams queued before them."""
    pair = make_pair()
    flow = pair.relay.open_flow(0, None, None, pair.now)
    pair.drain()
    for _ in range(3):
        pair.relay.send_datagram(flow, b"d" * 1000, pair.now)
    pair.relay.send_ping(pair.now)
    frames = decode(pair.relay.data_to_send(now=pair.now))
    assert [type(f).__name__ for f in frames] == ["Datagram"] * 3 + ["Ping"]


def test_pings_answer_in_order_and_each_gets_its_rtt(make_pair) -> None:
    pair = make_pair()
    seqs = []
    for _ in range(5):
        seqs.append(pair.relay.send_ping(pair.now))
        pair.now += 0.010
    pair.drain()
    acks = _acks(pair.take(pair.relay))
    assert [a.seq for a in acks] == seqs
    assert [round(a.rtt, 6) for a in acks] == [0.05, 0.04, 0.03, 0.02, 0.01]


def test_unsolicited_pong_is_ignored(raw_peer) -> None:
    peer = raw_peer()
    assert peer.send(3, 42) == []
    assert peer.mux.is_open
    assert peer.mux.counters.pongs_received == 0


def test_peer_ping_is_answered(raw_peer) -> None:
    peer = raw_peer()
    assert peer.send(2, 7) == []
    (pong,) = peer.pull()
    assert isinstance(pong, Pong) and pong.seq == 7


def test_ping_interval_sends_pings_via_handle_timer(make_pair, small_config, decode) -> None:
    config = small_config(ping_interval=5.0)
    pair = make_pair(config=config)
    # The first PING goes right after the handshake (an early RTT sample for window
    # tuning), then one every interval.
    assert pair.relay.get_timer() == pytest.approx(0.0)
    assert pair.relay.handle_timer(0.0) == []
    (first,) = decode(pair.relay.data_to_send(now=0.0))
    assert isinstance(first, Ping)
    assert pair.relay.get_timer() == pytest.approx(5.0)
    assert pair.relay.handle_timer(4.9) == []
    assert pair.relay.data_to_send(now=4.9) == b""
    assert pair.relay.handle_timer(5.0) == []
    (ping,) = decode(pair.relay.data_to_send(now=5.0))
    assert isinstance(ping, Ping)
    assert pair.relay.get_timer() == pytest.approx(10.0)

    for _ in range(60):  # one minute of a pair answering promptly
        pair.advance(1.0)
        pair.drain()
    assert pair.relay.counters.pings_sent == 13  # t = 0, 5, 10, ..., 60
    assert pair.relay.counters.pongs_received == 11  # those sent at t=0 and 5 never arrived
    assert all(isinstance(e, PingAcknowledged) for e in pair.take(pair.relay))
    assert pair.relay.is_open and pair.client.is_open


def test_late_timer_does_not_burst_pings(make_pair, small_config) -> None:
    pair = make_pair(config=small_config(ping_interval=1.0))
    pair.relay.handle_timer(100.0)  # the loop was blocked for 99 s
    assert pair.relay.counters.pings_sent == 1
    assert pair.relay.get_timer() is not None
    assert pair.relay.get_timer() > 100.0


def test_ping_timeout_terminates_with_timeout(make_pair, small_config, decode) -> None:
    pair = make_pair(config=small_config(ping_interval=1.0, ping_timeout=3.0))
    pair.relay.handle_timer(0.0)  # the first PING, right after the handshake; never arrives
    pair.relay.data_to_send(now=0.0)
    assert pair.relay.get_timer() == pytest.approx(1.0)  # next ping comes before the deadline
    for t in (1.0, 2.0):
        assert pair.relay.handle_timer(t) == []
        pair.relay.data_to_send(now=t)
    events = pair.relay.handle_timer(2.999)
    assert events == []
    (term,) = pair.relay.handle_timer(3.0)
    assert isinstance(term, ConnectionTerminated)
    assert term.code == ErrorCode.TIMEOUT and not term.remote
    assert not pair.relay.is_open
    wire = pair.relay.data_to_send()
    (goaway,) = decode(wire)
    assert isinstance(goaway, GoAway) and goaway.code == ErrorCode.TIMEOUT
    assert pair.relay.get_timer() is None
    # If the link comes back, the peer learns why.
    (peer_term,) = pair.client.receive_data(wire, 3.0)
    assert isinstance(peer_term, ConnectionTerminated)
    assert peer_term.code == ErrorCode.TIMEOUT and peer_term.remote


def test_get_timer_reports_the_ping_deadline(make_pair, small_config) -> None:
    pair = make_pair(config=small_config(ping_timeout=2.0))
    assert pair.relay.get_timer() is None  # no interval, nothing outstanding
    pair.relay.send_ping(10.0)
    assert pair.relay.get_timer() == pytest.approx(12.0)
    pair.now = 10.5
    pair.drain()
    assert pair.relay.get_timer() is None
    assert pair.relay.is_open


def test_ping_timeout_fires_even_with_many_outstanding_pings(make_pair, small_config) -> None:
    """Pinging much more often than the timeout must not hide the oldest unanswered ping."""
    pair = make_pair(config=small_config(ping_interval=0.1, ping_timeout=10.0))
    now = 0.0
    terminated_at = None
    while now < 20.0 and terminated_at is None:
        now = round(now + 0.1, 6)
        for event in pair.relay.handle_timer(now):
            if isinstance(event, ConnectionTerminated):
                terminated_at = now
        pair.relay.data_to_send(now=now)  # the pings are lost: the link is dead
    assert terminated_at is not None, "dead link never detected"
    assert 10.0 < terminated_at <= 10.2


def test_answered_pings_do_not_time_out(make_pair, small_config) -> None:
    pair = make_pair(config=small_config(ping_interval=0.5, ping_timeout=1.0))
    for _ in range(100):
        pair.advance(0.25)
        pair.drain()
    assert pair.relay.is_open and pair.client.is_open
    assert pair.relay.counters.pongs_received >= 45


def test_timers_stop_after_close(make_pair, small_config) -> None:
    pair = make_pair(config=small_config(ping_interval=1.0))
    pair.relay.close()
    assert pair.relay.get_timer() is None
    assert pair.relay.handle_timer(100.0) == []


def test_a_ping_flood_from_a_peer_that_never_reads_queues_a_bounded_number_of_pongs(
    raw_peer,
) -> None:
    from sshrelay.protocol.codec import encode_fields
    from sshrelay.protocol.frames import FrameType
    from sshrelay.protocol.multiplexer import MAX_QUEUED_PONGS

    peer = raw_peer()
    flood = b"".join(encode_fields(FrameType.PING, seq) for seq in range(10_000))
    assert peer.send_bytes(flood) == []
    pongs = [frame for frame in peer.pull() if isinstance(frame, Pong)]
    assert len(pongs) == MAX_QUEUED_PONGS
    assert [p.seq for p in pongs] == list(range(MAX_QUEUED_PONGS))
    # Once the queue drained, PINGs are answered again.
    peer.send(FrameType.PING, 99_999)
    assert [f.seq for f in peer.pull() if isinstance(f, Pong)] == [99_999]
