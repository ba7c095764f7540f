"""What goes on the wire next: control, then datagrams, then stream data round-robin."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshrelay.protocol.codec import FrameDecoder
from sshrelay.protocol.config import MuxConfig
from sshrelay.protocol.events import DatagramReceived, StreamDataReceived, StreamEnded
from sshrelay.protocol.frames import (
    Datagram,
    Frame,
    Ping,
    Pong,
    StreamData,
    StreamFin,
)

BUDGET = 64 * 1024
MB = 1024 * 1024
_fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def _big_config(**overrides) -> MuxConfig:
    values = {
        "stream_window": 16 * MB,
        "connection_window": 64 * MB,
        "stream_chunk": 16 * 1024,
    }
    values.update(overrides)
    return MuxConfig(**values)


def _lane(frame: Frame) -> int:
    if isinstance(frame, StreamData | StreamFin):
        return 2
    if isinstance(frame, Datagram | Ping | Pong):
        return 1
    return 0


def _open_accepted(pair, count=1, sender=None):
    sender = sender or pair.relay
    ids = [sender.open_stream(0) for _ in range(count)]
    pair.drain()
    for stream_id in ids:
        pair.peer(sender).accept_stream(stream_id)
    pair.drain()
    pair.take(pair.relay)
    pair.take(pair.client)
    return ids


def _flow(pair, sender=None):
    sender = sender or pair.relay
    flow_id = sender.open_flow(0, None, None, pair.now)
    pair.drain()
    pair.take(pair.peer(sender))
    return flow_id


class Wire:
    """Decodes everything a multiplexer sends, across calls, like its peer would."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 20)

    def frames(self, data: bytes) -> list[Frame]:
        return self.decoder.feed(data)


def test_datagram_overtakes_ten_megabytes_of_stream_data(make_pair) -> None:
    pair = make_pair(config=_big_config())
    (stream_id,) = _open_accepted(pair)
    flow_id = _flow(pair)
    pair.relay.send_stream_data(stream_id, bytes(10 * MB))
    wire = Wire()
    first = wire.frames(pair.relay.data_to_send(BUDGET))
    assert first and all(isinstance(f, StreamData) for f in first)
    assert pair.relay.buffered()["stream_out"] > 9 * MB

    pair.relay.send_datagram(flow_id, b"urgent", pair.now)
    frames = wire.frames(pair.relay.data_to_send(BUDGET))
    index = next(i for i, f in enumerate(frames) if isinstance(f, Datagram))
    assert index == 0  # nothing of the 10 MB goes first
    assert frames[index].data == b"urgent"


def test_datagram_overtakes_stream_data_at_any_point(make_pair) -> None:
    pair = make_pair(config=_big_config())
    streams = _open_accepted(pair, count=3)
    flow_id = _flow(pair)
    for stream_id in streams:
        pair.relay.send_stream_data(stream_id, bytes(4 * MB))
    wire = Wire()
    for step in range(40):
        wire.frames(pair.relay.data_to_send(BUDGET - step * 997))
        pair.relay.send_datagram(flow_id, b"d%d" % step, pair.now)
        frames = wire.frames(pair.relay.data_to_send(BUDGET))
        chunks_before = next(i for i, f in enumerate(frames) if isinstance(f, Datagram))
        assert chunks_before <= 1


def test_two_busy_streams_share_bytes_fairly(make_pair) -> None:
    pair = make_pair(config=_big_config())
    a, b = _open_accepted(pair, count=2)
    pair.relay.send_stream_data(a, bytes(8 * MB))
    pair.relay.send_stream_data(b, bytes(8 * MB))
    wire = Wire()
    sent = {a: 0, b: 0}
    for call in range(100):
        for frame in wire.frames(pair.relay.data_to_send(BUDGET)):
            sent[frame.stream_id] += len(frame.data)
        if call >= 4:
            assert abs(sent[a] - sent[b]) <= 0.1 * max(sent.values()), (call, sent)
    assert sent[a] + sent[b] >= 100 * (BUDGET - 100)


@_fixture_ok
@given(
    budgets=st.lists(st.integers(1000, 200_000), min_size=60, max_size=60),
    chunk=st.sampled_from([1024, 4096, 16384, 65536]),
    third=st.booleans(),
)
def test_busy_streams_share_bytes_for_any_budget(make_pair, budgets, chunk, third) -> None:
    pair = make_pair(config=_big_config(stream_chunk=chunk))
    streams = _open_accepted(pair, count=3 if third else 2)
    for stream_id in streams:
        pair.relay.send_stream_data(stream_id, bytes(8 * MB))
    wire = Wire()
    sent = dict.fromkeys(streams, 0)
    for budget in budgets:
        for frame in wire.frames(pair.relay.data_to_send(budget)):
            sent[frame.stream_id] += len(frame.data)
    total = sum(sent.values())
    if total >= 20 * chunk * len(streams):
        assert max(sent.values()) - min(sent.values()) <= 0.1 * max(sent.values()), sent


def test_streams_with_little_data_are_not_starved_by_a_busy_one(make_pair) -> None:
    pair = make_pair(config=_big_config())
    bulk, small = _open_accepted(pair, count=2)
    pair.relay.send_stream_data(bulk, bytes(8 * MB))
    wire = Wire()
    for _ in range(5):
        wire.frames(pair.relay.data_to_send(BUDGET))
    pair.relay.send_stream_data(small, b"ls -l\n")
    frames = wire.frames(pair.relay.data_to_send(BUDGET))
    assert [f.stream_id for f in frames].index(small) <= 1


def test_control_then_datagrams_then_stream_data(make_pair, small_config) -> None:
    pair = make_pair(config=small_config())
    streams = _open_accepted(pair, count=2)
    flow_id = _flow(pair)
    # Queue in the reverse order of priority.
    for stream_id in streams:
        pair.relay.send_stream_data(stream_id, b"s" * 3000)
    for size in (10, 1000, 0):
        pair.relay.send_datagram(flow_id, b"d" * size, pair.now)
    pair.relay.send_ping(pair.now)
    pair.relay.open_flow(0, {"peer": "x"}, None, pair.now)
    pair.relay.open_stream(0)
    pair.relay.send_request("forward", {"port": 1})
    frames = Wire().frames(pair.relay.data_to_send())
    lanes = [_lane(f) for f in frames]
    assert lanes == sorted(lanes)
    assert lanes.count(0) == 3 and lanes.count(1) == 4 and lanes.count(2) == 6


@_fixture_ok
@given(
    budgets=st.lists(st.integers(1, 5000), min_size=1, max_size=200),
    datagram_sizes=st.lists(st.integers(0, 3000), max_size=12),
    stream_bytes=st.lists(st.integers(1, 4096), min_size=1, max_size=3),
    controls=st.integers(0, 12),
)
def test_priority_holds_for_any_budget(
    make_pair, small_config, budgets, datagram_sizes, stream_bytes, controls
) -> None:
    """Whatever the budgets, no frame overtakes a queued frame of a higher lane."""
    pair = make_pair(config=small_config())
    streams = _open_accepted(pair, count=len(stream_bytes))
    flow_id = _flow(pair)
    for stream_id, size in zip(streams, stream_bytes, strict=True):
        pair.relay.send_stream_data(stream_id, b"s" * size)
        pair.relay.end_stream(stream_id)
    for size in datagram_sizes:
        pair.relay.send_datagram(flow_id, b"d" * size, pair.now)
    for i in range(controls):
        pair.relay.send_request("kind" * (i % 5), {"body": "b" * (i * 37)})
    wire = Wire()
    frames: list[Frame] = []
    for budget in [*budgets, None]:
        data = pair.relay.data_to_send(budget)
        if not data:
            assert not any(pair.relay.buffered()[k] for k in ("control", "datagram_queue"))
            assert pair.relay.buffered()["stream_out"] == 0
        frames += wire.frames(data)
    lanes = [_lane(f) for f in frames]
    assert lanes == sorted(lanes)
    assert lanes.count(0) == controls
    assert lanes.count(1) == len(datagram_sizes)
    assert sum(len(f.data) for f in frames if isinstance(f, StreamData)) == sum(stream_bytes)
    assert lanes.count(2) >= 2 * len(stream_bytes)


@pytest.mark.parametrize("budget", [1, 50, 400, 1100])
def test_flow_open_precedes_its_datagrams_under_any_budget(make_pair, small_config, budget) -> None:
    """A FLOW_OPEN still queued is never overtaken by a datagram of that flow."""
    pair = make_pair(config=small_config())
    for i in range(4):
        pair.relay.send_request("r", {"pad": "p" * 300 * i})
    flow_id = pair.relay.open_flow(0, None, None, pair.now)
    pair.relay.send_datagram(flow_id, b"", pair.now)
    events = []
    while data := pair.relay.data_to_send(budget):
        events += pair.client.receive_data(data, pair.now)
    assert pair.client.is_open, events[-1]
    assert [e.data for e in events if isinstance(e, DatagramReceived)] == [b""]


@pytest.mark.parametrize("budget", [1, 50, 400, 1100, 2000])
def test_stream_accept_precedes_the_acceptors_data_under_any_budget(
    make_pair, small_config, budget
) -> None:
    pair = make_pair(config=small_config())
    stream_id = pair.client.open_stream(0)
    pair.drain()
    for i in range(4):
        pair.relay.send_request("r", {"pad": "p" * 300 * i})
    pair.relay.accept_stream(stream_id)
    pair.relay.send_stream_data(stream_id, b"banner\r\n" * 200)
    events = []
    while data := pair.relay.data_to_send(budget):
        events += pair.client.receive_data(data, pair.now)
    assert pair.client.is_open, events[-1]
    received = b"".join(e.data for e in events if isinstance(e, StreamDataReceived))
    assert received == b"banner\r\n" * 200


@_fixture_ok
@given(
    budget=st.integers(1, 70_000),
    payload=st.integers(1, 40_000),
    datagrams=st.lists(st.integers(0, 20_000), max_size=4),
    fin=st.booleans(),
)
def test_max_bytes_is_respected(make_pair, budget, payload, datagrams, fin) -> None:
    pair = make_pair(config=_big_config())
    (stream_id,) = _open_accepted(pair)
    flow_id = _flow(pair)
    pair.relay.send_stream_data(stream_id, b"x" * payload)
    if fin:
        pair.relay.end_stream(stream_id)
    for size in datagrams:
        pair.relay.send_datagram(flow_id, b"d" * size, pair.now)
    wire = Wire()
    received = 0
    for _ in range(1000):
        data = pair.relay.data_to_send(budget)
        if not data:
            break
        frames = wire.frames(data)
        if len(data) > budget:
            # Over budget only as a lone first frame that cannot be cut further.
            assert len(frames) == 1, (budget, len(data), frames)
            if isinstance(frames[0], StreamData):
                assert len(frames[0].data) <= 1024, "stream chunks are cut to fit"
        received += sum(len(f.data) for f in frames if isinstance(f, StreamData))
    assert received == payload


@pytest.mark.parametrize("budget", [1100, 1500, 3000, 5000, 16_000, 16_300])
def test_stream_chunks_are_cut_to_fit(make_pair, budget) -> None:
    pair = make_pair(config=_big_config())
    (stream_id,) = _open_accepted(pair)
    pair.relay.send_stream_data(stream_id, bytes(100_000))
    pair.relay.end_stream(stream_id)
    wire = Wire()
    total = 0
    while data := pair.relay.data_to_send(budget):
        assert len(data) <= budget
        for frame in wire.frames(data):
            if isinstance(frame, StreamData):
                assert len(frame.data) <= 16 * 1024
                total += len(frame.data)
    assert total == 100_000


def test_first_frame_is_always_allowed(make_pair, small_config) -> None:
    pair = make_pair(config=small_config())
    flow_id = _flow(pair)
    pair.relay.send_datagram(flow_id, b"d" * 1000, pair.now)
    pair.relay.send_datagram(flow_id, b"e" * 10, pair.now)
    data = pair.relay.data_to_send(10)
    (frame,) = Wire().frames(data)
    assert frame.data == b"d" * 1000
    (frame,) = Wire().frames(pair.relay.data_to_send(1))
    assert frame.data == b"e" * 10
    assert pair.relay.data_to_send(10) == b""


def test_fin_follows_the_last_chunk_within_the_budget(make_pair) -> None:
    pair = make_pair(config=_big_config())
    (stream_id,) = _open_accepted(pair)
    pair.relay.send_stream_data(stream_id, b"x" * 2000)
    pair.relay.end_stream(stream_id)
    first = pair.relay.data_to_send(2006)  # room for exactly the data frame
    assert len(first) <= 2006
    rest = pair.relay.data_to_send(2006)
    events = pair.client.receive_data(first, pair.now) + pair.client.receive_data(rest, pair.now)
    assert sum(len(e.data) for e in events if isinstance(e, StreamDataReceived)) == 2000
    assert isinstance(events[-1], StreamEnded)
