"""UDP flows: ids, metadata, idle expiry, and every way a datagram can be dropped."""

from __future__ import annotations

import pytest

from sshrelay.protocol.config import MAX_UDP_PAYLOAD
from sshrelay.protocol.errors import ErrorCode, StreamStateError
from sshrelay.protocol.events import DatagramReceived, FlowClosed, FlowOpened
from sshrelay.protocol.frames import FlowClose


def _datagrams(events, flow_id=None):
    return [
        e.data
        for e in events
        if isinstance(e, DatagramReceived) and (flow_id is None or e.flow_id == flow_id)
    ]


def _closed(events):
    return [(e.flow_id, e.code, e.remote) for e in events if isinstance(e, FlowClosed)]


def _drops(mux):
    return {reason: count for reason, count in mux.counters.drops.items() if count}


@pytest.fixture
def pair(make_pair, small_config):
    return make_pair(config=small_config())


def _flow(pair, opener=None, idle_timeout=None, meta=None, forward=7):
    opener = opener or pair.relay
    flow_id = opener.open_flow(forward, meta, idle_timeout, pair.now)
    pair.drain()
    pair.take(pair.peer(opener))
    return flow_id


# ---------------------------------------------------------------- ids and metadata


def test_relay_ids_are_even_and_client_ids_odd(pair) -> None:
    relay_ids = [pair.relay.open_flow(0, None, None, 0.0) for _ in range(3)]
    relay_ids.append(pair.relay.open_stream(0))
    client_ids = [pair.client.open_flow(0, None, None, 0.0) for _ in range(3)]
    client_ids.append(pair.client.open_stream(0))
    assert all(i % 2 == 0 and i > 0 for i in relay_ids)
    assert all(i % 2 == 1 for i in client_ids)
    assert len(set(relay_ids)) == len(set(client_ids)) == 4
    pair.drain()
    assert pair.relay.is_open and pair.client.is_open


def test_flow_metadata_arrives_once_in_flow_opened(pair) -> None:
    meta = {"peer_host": "203.0.113.9", "peer_port": 51820, "v6": False}
    flow_id = pair.relay.open_flow(3, meta, 30.0, pair.now)
    for i in range(5):
        pair.relay.send_datagram(flow_id, b"packet %d" % i, pair.now)
    pair.drain()
    events = pair.take(pair.client)
    opened = [e for e in events if isinstance(e, FlowOpened)]
    assert len(opened) == 1
    assert opened[0].flow_id == flow_id
    assert opened[0].forward == 3
    assert opened[0].meta == meta
    assert opened[0].idle_timeout == pytest.approx(30.0)
    assert events[0] is opened[0]  # before any of its datagrams
    assert _datagrams(events) == [b"packet %d" % i for i in range(5)]
    assert all(isinstance(e, DatagramReceived) for e in events[1:])


def test_max_size_datagram_passes_intact(pair) -> None:
    flow_id = _flow(pair)
    payload = bytes(range(256)) * (MAX_UDP_PAYLOAD // 256) + b"\xab" * (MAX_UDP_PAYLOAD % 256)
    assert len(payload) == MAX_UDP_PAYLOAD
    assert pair.relay.send_datagram(flow_id, payload, pair.now)
    pair.transfer(
        pair.relay, split=lambda data: [data[i : i + 1000] for i in range(0, len(data), 1000)]
    )
    assert _datagrams(pair.take(pair.client)) == [payload]


def test_empty_datagram_is_delivered(pair) -> None:
    flow_id = _flow(pair, opener=pair.client)
    assert pair.client.send_datagram(flow_id, b"", pair.now)
    pair.drain()
    assert _datagrams(pair.take(pair.relay)) == [b""]


def test_datagram_boundaries_are_preserved(pair) -> None:
    flow_id = _flow(pair)
    sizes = [0, 1, 2, 255, 256, 1200, 1500, 9000, 65535 - 28, 17, 0]
    payloads = [bytes([i]) * size for i, size in enumerate(sizes)]
    for payload in payloads:
        assert pair.relay.send_datagram(flow_id, payload, pair.now)
    pair.transfer(pair.relay, split=lambda data: [data[i : i + 7] for i in range(0, len(data), 7)])
    assert _datagrams(pair.take(pair.client)) == payloads


# ---------------------------------------------------------------- drops


def test_too_large_for_the_peers_advertised_limit(make_pair, small_config) -> None:
    pair = make_pair(small_config(), small_config(max_datagram=1400))
    flow_id = _flow(pair)
    assert not pair.relay.send_datagram(flow_id, b"x" * 1401, pair.now)
    assert pair.relay.send_datagram(flow_id, b"x" * 1400, pair.now)
    assert _drops(pair.relay) == {"too_large": 1}
    pair.drain()
    assert _datagrams(pair.take(pair.client)) == [b"x" * 1400]
    # The other direction uses the relay's (default) limit.
    assert pair.client.send_datagram(flow_id, b"y" * MAX_UDP_PAYLOAD, pair.now)
    assert _drops(pair.client) == {}


def test_queue_full(pair) -> None:
    flow_id = _flow(pair)
    accepted = 0
    while pair.relay.send_datagram(flow_id, b"q" * 30_000, pair.now):
        accepted += 1
    assert accepted == 200_000 // 30_000
    assert pair.relay.buffered()["datagram_queue"] == accepted * 30_000
    assert not pair.relay.send_datagram(flow_id, b"q" * 30_000, pair.now)
    assert pair.relay.send_datagram(flow_id, b"q" * (200_000 - accepted * 30_000), pair.now)
    assert _drops(pair.relay) == {"queue_full": 2}
    pair.drain()
    assert len(_datagrams(pair.take(pair.client))) == accepted + 1
    assert pair.relay.buffered()["datagram_queue"] == 0
    assert pair.relay.send_datagram(flow_id, b"q" * 30_000, pair.now)  # room again


def test_datagrams_older_than_max_age_are_dropped(make_pair, small_config) -> None:
    pair = make_pair(config=small_config(max_datagram_age=0.25))
    flow_id = _flow(pair)
    pair.relay.send_datagram(flow_id, b"old", 0.0)
    pair.relay.send_datagram(flow_id, b"fresh", 0.2)
    pair.now = 0.3
    pair.transfer(pair.relay)
    assert _datagrams(pair.take(pair.client)) == [b"fresh"]
    assert _drops(pair.relay) == {"too_old": 1}
    assert pair.relay.counters.datagrams_sent == 1
    assert pair.relay.buffered()["datagram_queue"] == 0
    assert pair.relay.counters.queue_wait.count == 1


def test_datagram_exactly_max_age_old_is_sent(make_pair, small_config) -> None:
    pair = make_pair(config=small_config(max_datagram_age=0.5))
    flow_id = _flow(pair)
    pair.relay.send_datagram(flow_id, b"edge", 1.0)
    pair.now = 1.5
    pair.transfer(pair.relay)
    assert _datagrams(pair.take(pair.client)) == [b"edge"]


def test_flow_closed_with_datagrams_queued(pair) -> None:
    flow_id = _flow(pair)
    other = _flow(pair)
    for _ in range(3):
        pair.relay.send_datagram(flow_id, b"doomed", pair.now)
        pair.relay.send_datagram(other, b"kept", pair.now)
    pair.relay.close_flow(flow_id)
    pair.drain()
    events = pair.take(pair.client)
    assert _datagrams(events) == [b"kept"] * 3
    assert _closed(events) == [(flow_id, ErrorCode.NO_ERROR, True)]
    assert _drops(pair.relay) == {"flow_closed": 3}
    assert pair.relay.buffered()["datagram_queue"] == 0


def test_flow_closed_then_session_closed_counts_flow_closed(pair) -> None:
    flow_id = _flow(pair)
    pair.relay.send_datagram(flow_id, b"a", pair.now)
    pair.relay.close_flow(flow_id)
    pair.relay.close()
    assert _drops(pair.relay) == {"flow_closed": 1}


def test_session_closed_with_datagrams_queued(pair) -> None:
    flow_id = _flow(pair)
    for _ in range(4):
        pair.relay.send_datagram(flow_id, b"a", pair.now)
    pair.relay.close(ErrorCode.SHUTDOWN)
    assert _drops(pair.relay) == {"session_closed": 4}
    assert not pair.relay.send_datagram(flow_id, b"a", pair.now)
    assert _drops(pair.relay) == {"session_closed": 5}


def test_unknown_flow_at_the_receiver_after_flow_close(pair) -> None:
    """The receiver closed the flow; a datagram already sent toward it is counted there."""
    flow_id = _flow(pair)
    pair.client.close_flow(flow_id)  # FLOW_CLOSE is on its way to the relay ...
    assert pair.relay.send_datagram(flow_id, b"late", pair.now)  # ... as this one crosses it
    pair.transfer(pair.relay)
    pair.transfer(pair.client)
    assert _datagrams(pair.take(pair.client)) == []
    assert _drops(pair.client) == {"unknown_flow": 1}
    assert _drops(pair.relay) == {}
    assert _closed(pair.take(pair.relay)) == [(flow_id, ErrorCode.NO_ERROR, True)]
    assert pair.relay.is_open and pair.client.is_open


def test_send_on_a_closed_flow_is_a_local_error(pair) -> None:
    flow_id = _flow(pair)
    pair.relay.close_flow(flow_id)
    with pytest.raises(StreamStateError):
        pair.relay.send_datagram(flow_id, b"x", pair.now)
    with pytest.raises(StreamStateError):
        pair.relay.close_flow(flow_id)
    with pytest.raises(StreamStateError):
        pair.relay.send_datagram(12345, b"x", pair.now)


def test_every_datagram_is_delivered_or_dropped_once(make_pair, small_config) -> None:
    pair = make_pair(small_config(datagram_queue_bytes=50_000), small_config(max_datagram=9000))
    flows = [_flow(pair) for _ in range(3)]
    attempts = 0
    for step in range(300):
        flow_id = flows[step % 3]
        size = (step * 7919) % 20_000
        pair.relay.send_datagram(flow_id, b"d" * size, pair.now)
        attempts += 1
        if step % 17 == 0:
            pair.now += 0.3  # the queue ages
        if step % 20 == 0:
            pair.transfer(pair.relay, max_bytes=30_000)
    pair.drain()
    delivered = len(_datagrams(pair.take(pair.client)))
    drops = pair.relay.counters.drops
    assert drops["too_large"] and drops["too_old"] and drops["queue_full"]
    assert attempts == delivered + sum(drops.values()) + sum(pair.client.counters.drops.values())


# ---------------------------------------------------------------- idle expiry


def test_idle_expiry_counts_from_last_send_not_creation(pair) -> None:
    flow_id = _flow(pair, idle_timeout=10.0)
    assert pair.relay.get_timer() == pytest.approx(10.0)
    for _ in range(5):  # traffic every 8 s keeps it alive well past 10 s
        pair.advance(8.0)
        assert pair.relay.send_datagram(flow_id, b"keepalive", pair.now)
        pair.drain()
    assert pair.relay.flow_count() == 1
    assert pair.now == pytest.approx(40.0)
    pair.advance(9.9)
    assert pair.relay.flow_count() == 1
    pair.advance(0.1)  # 10 s after the last datagram
    assert _closed(pair.take(pair.relay)) == [(flow_id, ErrorCode.IDLE, False)]
    assert pair.relay.flow_count() == 0


def test_idle_expiry_counts_from_last_receive(pair) -> None:
    flow_id = _flow(pair, idle_timeout=10.0)  # opened by the relay, traffic from the client
    for _ in range(5):
        pair.advance(6.0)
        assert pair.client.send_datagram(flow_id, b"reply", pair.now)
        pair.drain()
    assert pair.relay.flow_count() == 1
    pair.advance(9.0)
    assert pair.relay.flow_count() == 1
    pair.advance(1.0)
    assert pair.relay.flow_count() == 0


def test_idle_expiry_on_both_ends(pair) -> None:
    flow_id = _flow(pair, idle_timeout=5.0)
    assert pair.client.get_timer() == pytest.approx(5.0)
    pair.advance(5.0)  # both ends expire it on their own clocks
    assert _closed(pair.take(pair.relay)) == [(flow_id, ErrorCode.IDLE, False)]
    assert _closed(pair.take(pair.client)) == [(flow_id, ErrorCode.IDLE, False)]
    pair.drain()  # the crossing FLOW_CLOSE frames are late and ignored
    assert pair.take(pair.relay) == pair.take(pair.client) == []
    assert pair.relay.flow_count() == pair.client.flow_count() == 0
    assert pair.relay.is_open and pair.client.is_open


def test_idle_expiry_tells_the_peer(pair, decode) -> None:
    flow_id = _flow(pair, idle_timeout=5.0)
    pair.now = 3.0
    pair.relay.send_datagram(flow_id, b"x", pair.now)
    pair.drain()
    assert pair.client.handle_timer(7.9) == []
    events = pair.client.handle_timer(8.0)  # 5 s after the datagram arrived
    assert _closed(events) == [(flow_id, ErrorCode.IDLE, False)]
    wire = pair.client.data_to_send(now=8.0)
    (frame,) = decode(wire)
    assert isinstance(frame, FlowClose) and frame.code == ErrorCode.IDLE
    assert _closed(pair.relay.receive_data(wire, 8.0)) == [(flow_id, ErrorCode.IDLE, True)]
    assert pair.relay.flow_count() == 0


def test_flow_without_timeout_never_expires(pair) -> None:
    _flow(pair, idle_timeout=None)
    pair.advance(1e6)
    assert pair.relay.flow_count() == pair.client.flow_count() == 1
    assert pair.relay.get_timer() is None
