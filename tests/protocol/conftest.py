"""Shared fixtures for the multiplexer tests.

Tests run in importlib mode and never import each other, so everything shared
lives here as fixtures (most of them return small factories).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from sshrelay.protocol.codec import FrameDecoder, encode_fields
from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.events import Event
from sshrelay.protocol.frames import MAGIC, PROTOCOL_VERSION, Frame, FrameType
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.protocol.pair import MuxPair


def _small_config(**overrides: Any) -> MuxConfig:
    """Windows and queues small enough that credit and queue limits really bite."""
    values: dict[str, Any] = {
        "stream_window": 4096,
        "connection_window": 16384,
        "stream_chunk": 1024,
        "max_chunk": 4096,
        "datagram_queue_bytes": 200_000,
    }
    values.update(overrides)
    return MuxConfig(**values)


@pytest.fixture
def small_config() -> Callable[..., MuxConfig]:
    """``small_config(**overrides)`` -> a MuxConfig with small windows."""
    return _small_config


@pytest.fixture
def make_pair() -> Callable[..., MuxPair]:
    """``make_pair(relay_config, client_config, config=...)`` -> a handshaken MuxPair.

    ``config`` sets both ends at once. The handshake events are consumed.
    """

    def make(
        relay_config: MuxConfig | None = None,
        client_config: MuxConfig | None = None,
        *,
        config: MuxConfig | None = None,
        now: float = 0.0,
    ) -> MuxPair:
        if config is not None:
            relay_config = relay_config or config
            client_config = client_config or dataclasses.replace(config)
        pair = MuxPair(relay_config, client_config, now=now).handshake()
        pair.take(pair.relay)
        pair.take(pair.client)
        assert pair.relay.is_open and pair.client.is_open
        return pair

    return make


def _decode(data: bytes) -> list[Frame]:
    return FrameDecoder(1 << 20).feed(data)


@pytest.fixture
def decode() -> Callable[[bytes], list[Frame]]:
    """``decode(wire_bytes)`` -> the frames in them (a fresh decoder per call)."""
    return _decode


def hello_bytes(
    magic: str = MAGIC,
    version: int = PROTOCOL_VERSION,
    limits: dict[str, int] | None = None,
    capabilities: tuple[str, ...] = ("streams", "datagrams", "ping", "requests"),
) -> bytes:
    return encode_fields(
        FrameType.HELLO,
        magic,
        version,
        list(capabilities),
        MuxConfig().hello_limits() if limits is None else limits,
    )


@pytest.fixture
def raw_hello() -> Callable[..., bytes]:
    """``raw_hello(magic=..., version=..., limits=..., capabilities=...)`` -> HELLO bytes."""
    return hello_bytes


class RawPeer:
    """A scripted peer: the test writes raw frames, the multiplexer under test reacts.

    ``mux`` is a real multiplexer that completed its handshake with a crafted
    HELLO; the peer plays ``peer_role`` (so its ids have that role's parity).
    """

    def __init__(self, role: Role, config: MuxConfig | None, peer_limits: dict[str, int]) -> None:
        self.now = 0.0
        self.mux = Multiplexer(role, config)
        self.mux.initiate(self.now)
        self.events: list[Event] = self.mux.receive_data(hello_bytes(limits=peer_limits), self.now)
        self.wire = b""
        self.pull()  # the mux's HELLO

    def send(self, frame_type: int, *fields: Any) -> list[Event]:
        """Deliver one crafted frame to the multiplexer; return its events."""
        return self.send_bytes(encode_fields(frame_type, *fields))

    def send_bytes(self, data: bytes) -> list[Event]:
        events = self.mux.receive_data(data, self.now)
        self.events.extend(events)
        return events

    def pull(self, max_bytes: int | None = None) -> list[Frame]:
        """Frames the multiplexer sends toward this peer."""
        data = self.mux.data_to_send(max_bytes, now=self.now)
        self.wire += data
        return _decode(data)


@pytest.fixture
def raw_peer() -> Callable[..., RawPeer]:
    """``raw_peer(role=Role.RELAY, config=None, peer_limits=None)`` -> an open RawPeer.

    ``role`` is the role of the multiplexer under test; the scripted peer has
    the other one.
    """

    def make(
        role: Role = Role.RELAY,
        config: MuxConfig | None = None,
        peer_limits: dict[str, int] | None = None,
    ) -> RawPeer:
        peer = RawPeer(role, config, peer_limits or MuxConfig().hello_limits())
        assert peer.mux.is_open, peer.events
        peer.events.clear()
        return peer

    return make


@pytest.fixture
def frame_types() -> Callable[[list[Frame]], list[str]]:
    """``frame_types(frames)`` -> their type names, for compact assertions."""

    def names(frames: list[Frame]) -> list[str]:
        return [frame.TYPE.name for frame in frames]

    return names
