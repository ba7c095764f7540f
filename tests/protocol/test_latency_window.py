"""How much stream credit a receiver hands out, beyond the fixed window.

Latency mode: while datagrams arrive, a receiver returns stream credit only up to
``latency_window`` outstanding per stream, so little stream data can sit ahead of
the next datagram in the one channel; ``latency_hold`` seconds after the last
datagram the held-back credit goes out.

Window tuning: a stream that consumes a whole window within two round trips was
waiting for credit, so the receiver doubles its window (up to
``max_stream_window``); a slow consumer never grows it.
"""

from __future__ import annotations

from sshrelay.protocol.events import StreamAccepted, StreamDataReceived, StreamOpened
from sshrelay.protocol.windows import ReceiveWindow

WINDOW = 8192
LATENCY = 2048
HOLD = 1.0
RTT = 0.05


def _setup(make_pair, small_config, **overrides):
    """A client -> relay stream and flow; the relay is the receiver under test."""
    values = {
        "stream_window": WINDOW,
        "connection_window": 64 * WINDOW,
        "latency_window": LATENCY,
        "latency_hold": HOLD,
        "max_stream_window": 4 * WINDOW,
    }
    values.update(overrides)
    pair = make_pair(config=small_config(**values))
    sender, receiver = pair.client, pair.relay
    stream_id = sender.open_stream(0)
    flow_id = sender.open_flow(0, {}, None, pair.now)
    pair.drain()
    assert any(isinstance(e, StreamOpened) for e in pair.take(receiver))
    receiver.accept_stream(stream_id)
    pair.drain()
    assert any(isinstance(e, StreamAccepted) for e in pair.take(sender))
    return pair, sender, receiver, stream_id, flow_id


def _push_and_consume(pair, sender, receiver, stream_id, length) -> None:
    """Send ``length`` stream bytes, deliver them, and let the receiver consume them."""
    sender.send_stream_data(stream_id, b"a" * length)
    pair.drain()
    got = sum(
        len(e.data)
        for e in pair.take(receiver)
        if isinstance(e, StreamDataReceived) and e.stream_id == stream_id
    )
    assert got == length
    receiver.acknowledge_received_data(stream_id, got)
    pair.drain()


def _measure_rtt(pair, receiver) -> None:
    receiver.send_ping(pair.now)
    pair.now += RTT  # the PING and its PONG take this long
    pair.drain()


# ---------------------------------------------------------------- latency mode


def test_credit_returns_in_full_without_datagrams(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, _ = _setup(make_pair, small_config)
    _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    assert sender.send_window(stream_id) == WINDOW
    assert receiver.get_timer() is None


def test_arriving_datagrams_cap_the_credit_then_it_all_returns(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, flow_id = _setup(make_pair, small_config)
    assert sender.send_datagram(flow_id, b"x" * 100, pair.now)
    _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    # The receiver consumed the whole window but the sender may only send LATENCY now.
    assert sender.send_window(stream_id) == LATENCY
    # HOLD after the last datagram the rest goes out; the timer says when.
    assert receiver.get_timer() == HOLD
    pair.now += HOLD / 2
    receiver.handle_timer(pair.now)
    pair.drain()
    assert sender.send_window(stream_id) == LATENCY
    pair.now += HOLD / 2
    receiver.handle_timer(pair.now)
    pair.drain()
    assert sender.send_window(stream_id) == WINDOW
    assert receiver.get_timer() is None


def test_each_datagram_extends_the_hold(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, flow_id = _setup(make_pair, small_config)
    assert sender.send_datagram(flow_id, b"x", pair.now)
    _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    pair.now += HOLD * 0.9
    assert sender.send_datagram(flow_id, b"y", pair.now)
    pair.drain()
    pair.now += HOLD * 0.9
    receiver.handle_timer(pair.now)
    pair.drain()
    assert sender.send_window(stream_id) == LATENCY
    pair.now += HOLD * 0.2
    receiver.handle_timer(pair.now)
    pair.drain()
    assert sender.send_window(stream_id) == WINDOW


def test_latency_window_none_returns_everything(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, flow_id = _setup(
        make_pair, small_config, latency_window=None
    )
    assert sender.send_datagram(flow_id, b"x", pair.now)
    _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    assert sender.send_window(stream_id) == WINDOW


def test_capped_receive_window_arithmetic() -> None:
    window = ReceiveWindow(8192, max_batch=1024)
    assert window.consume(8192)
    assert window.acknowledge(8192, cap=2048) == 2048  # peer may hold 2048 again
    assert (window.available, window.unreturned) == (2048, 6144)
    assert window.consume(512)
    assert window.acknowledge(512, cap=2048) == 0  # room 512 < a batch: not worth an update
    assert window.consume(512)
    assert window.acknowledge(512, cap=2048) == 1024  # room 1024: one batch
    assert (window.available, window.unreturned) == (2048, 6144)
    assert window.flush() == 6144 and window.available == 8192


def test_stream_credit_returns_every_64_kib_of_a_large_window() -> None:
    window = ReceiveWindow(1024 * 1024, max_batch=64 * 1024)
    assert window.consume(200 * 1024)
    assert window.acknowledge(64 * 1024 - 1) == 0
    assert window.acknowledge(1) == 64 * 1024
    connection = ReceiveWindow(1024 * 1024)  # no cap: a quarter window
    assert connection.consume(300 * 1024)
    assert connection.acknowledge(255 * 1024) == 0
    assert connection.acknowledge(1024) == 256 * 1024


# ---------------------------------------------------------------- window tuning


def test_window_doubles_when_consumed_within_two_round_trips(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, _ = _setup(make_pair, small_config)
    _measure_rtt(pair, receiver)
    # Two windows consumed back to back, no time passing: clearly window-limited.
    _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    assert receiver.counters.window_growths == 1
    assert sender.send_window(stream_id) == 2 * WINDOW  # the extra credit came at once
    for _ in range(6):
        _push_and_consume(pair, sender, receiver, stream_id, sender.send_window(stream_id))
    assert sender.send_window(stream_id) == 4 * WINDOW  # max_stream_window
    assert receiver.counters.window_growths == 2


def test_slow_consumer_keeps_its_window(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, _ = _setup(make_pair, small_config)
    _measure_rtt(pair, receiver)
    for _ in range(4):
        _push_and_consume(pair, sender, receiver, stream_id, WINDOW // 2)
        pair.now += 2 * RTT  # a window takes four round trips: not window-limited
    assert receiver.counters.window_growths == 0
    assert sender.send_window(stream_id) == WINDOW


def test_no_growth_without_an_rtt_sample_or_during_latency_mode(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, flow_id = _setup(make_pair, small_config)
    for _ in range(3):
        _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    assert receiver.counters.window_growths == 0  # no PING answered yet
    _measure_rtt(pair, receiver)
    assert sender.send_datagram(flow_id, b"x", pair.now)
    pair.drain()
    for _ in range(3):
        _push_and_consume(pair, sender, receiver, stream_id, sender.send_window(stream_id))
    assert receiver.counters.window_growths == 0


def test_max_stream_window_equal_to_the_window_turns_tuning_off(make_pair, small_config) -> None:
    pair, sender, receiver, stream_id, _ = _setup(make_pair, small_config, max_stream_window=WINDOW)
    _measure_rtt(pair, receiver)
    for _ in range(3):
        _push_and_consume(pair, sender, receiver, stream_id, WINDOW)
    assert receiver.counters.window_growths == 0
    assert sender.send_window(stream_id) == WINDOW


def test_grow_grants_the_difference() -> None:
    window = ReceiveWindow(4096)
    assert window.consume(4096)
    assert window.grow(8192) == 4096
    assert (window.size, window.available) == (8192, 4096)
