"""Latency mode: while an end sends datagrams, its streams keep at most
``latency_window`` bytes spent and not yet credited back, so little stream data
sits ahead of a datagram in the one channel; the whole window returns
``latency_hold`` seconds after the last datagram, with a CreditAvailable event."""

from __future__ import annotations

import pytest

from sshrelay.protocol.errors import FlowControlError
from sshrelay.protocol.events import CreditAvailable, StreamAccepted, StreamOpened
from sshrelay.protocol.windows import ReceiveWindow

WINDOW = 8192
LATENCY = 2048
HOLD = 1.0


def _setup(make_pair, small_config, latency_window=LATENCY):
    config = small_config(
        stream_window=WINDOW,
        connection_window=8 * WINDOW,
        latency_window=latency_window,
        latency_hold=HOLD,
    )
    pair = make_pair(config=config)
    sender, receiver = pair.client, pair.relay
    stream_id = sender.open_stream(0)
    flow_id = sender.open_flow(0, {}, None, pair.now)
    pair.drain()
    assert any(isinstance(e, StreamOpened) for e in pair.take(receiver))
    receiver.accept_stream(stream_id)
    pair.drain()
    assert any(isinstance(e, StreamAccepted) for e in pair.take(sender))
    return pair, sender, stream_id, flow_id


def test_whole_window_without_datagrams(make_pair, small_config) -> None:
    _pair, sender, stream_id, _ = _setup(make_pair, small_config)
    assert sender.send_window(stream_id) == WINDOW
    assert sender.get_timer() is None


def test_datagrams_cap_stream_bytes_in_flight_then_release(make_pair, small_config) -> None:
    pair, sender, stream_id, flow_id = _setup(make_pair, small_config)
    assert sender.send_datagram(flow_id, b"x" * 100, pair.now)
    assert sender.send_window(stream_id) == LATENCY
    sender.send_stream_data(stream_id, b"a" * LATENCY)
    assert sender.send_window(stream_id) == 0  # capped, though 6 KiB of credit remain
    pair.drain()  # delivered, but the receiving application has not consumed it
    assert sender.send_window(stream_id) == 0
    # The cap ends HOLD seconds after the last datagram; the timer says when.
    assert sender.get_timer() == pair.now + HOLD
    pair.now += HOLD / 2
    assert sender.handle_timer(pair.now) == []
    pair.now += HOLD / 2
    events = sender.handle_timer(pair.now)
    assert [e for e in events if isinstance(e, CreditAvailable)] == [
        CreditAvailable(stream_id, WINDOW - LATENCY)
    ]
    assert sender.send_window(stream_id) == WINDOW - LATENCY
    assert sender.get_timer() is None


def test_each_datagram_extends_the_hold(make_pair, small_config) -> None:
    pair, sender, stream_id, flow_id = _setup(make_pair, small_config)
    assert sender.send_datagram(flow_id, b"x", pair.now)
    sender.send_stream_data(stream_id, b"a" * LATENCY)
    assert sender.send_window(stream_id) == 0
    pair.now += HOLD * 0.9
    assert sender.send_datagram(flow_id, b"y", pair.now)
    pair.now += HOLD * 0.9
    assert sender.handle_timer(pair.now) == []
    assert sender.send_window(stream_id) == 0
    pair.now += HOLD * 0.2
    assert CreditAvailable(stream_id, WINDOW - LATENCY) in sender.handle_timer(pair.now)


def test_credit_returned_during_latency_mode_is_usable(make_pair, small_config) -> None:
    pair, sender, stream_id, flow_id = _setup(make_pair, small_config)
    receiver = pair.relay
    assert sender.send_datagram(flow_id, b"x", pair.now)
    sender.send_stream_data(stream_id, b"a" * LATENCY)
    pair.drain()
    pair.take(receiver)
    receiver.acknowledge_received_data(stream_id, LATENCY)  # a batch's worth: credit goes back
    pair.drain()
    events = pair.take(sender)
    assert CreditAvailable(stream_id, LATENCY) in events
    assert sender.send_window(stream_id) == LATENCY  # capped again at the latency window


def test_sending_past_the_cap_is_a_flow_control_error(make_pair, small_config) -> None:
    pair, sender, stream_id, flow_id = _setup(make_pair, small_config)
    assert sender.send_datagram(flow_id, b"x", pair.now)
    with pytest.raises(FlowControlError):
        sender.send_stream_data(stream_id, b"a" * (LATENCY + 1))


def test_latency_window_none_keeps_the_whole_window(make_pair, small_config) -> None:
    pair, sender, stream_id, flow_id = _setup(make_pair, small_config, latency_window=None)
    assert sender.send_datagram(flow_id, b"x", pair.now)
    assert sender.send_window(stream_id) == WINDOW


def test_stream_credit_returns_every_64_kib_of_a_large_window() -> None:
    window = ReceiveWindow(1024 * 1024, max_batch=64 * 1024)
    assert window.consume(200 * 1024)
    assert window.acknowledge(64 * 1024 - 1) == 0
    assert window.acknowledge(1) == 64 * 1024
    connection = ReceiveWindow(1024 * 1024)  # no cap: a quarter window
    assert connection.consume(300 * 1024)
    assert connection.acknowledge(255 * 1024) == 0
    assert connection.acknowledge(1024) == 256 * 1024
