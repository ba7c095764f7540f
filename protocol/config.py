"""Tunable limits and timings of one multiplexer, with the defaults we ship.

The first group is advertised to the peer in HELLO (``hello_limits``); the
rest is local policy. Everything is plain data so the ends can fill it from
flags and TOML.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sshrelay.protocol.errors import HandshakeError

MAX_UDP_PAYLOAD = 65_507  # largest IPv4 UDP payload; IPv6 without jumbograms allows 65,527


class Role(Enum):
    """Which end a multiplexer is; decides id parity (relay even, client odd)."""

    RELAY = "relay"
    CLIENT = "client"


@dataclass(slots=True)
class MuxConfig:
    # Advertised in HELLO: what this end accepts from the peer.
    max_datagram: int = MAX_UDP_PAYLOAD
    max_chunk: int = 65_536  # largest STREAM_DATA payload accepted
    stream_window: int = 512 * 1024  # initial credit per stream granted to the peer
    connection_window: int = 32 * 1024 * 1024  # credit for all streams together
    max_streams: int = 16_384  # concurrent streams the peer may open
    max_flows: int = 131_072  # concurrent flows the peer may open
    # Local policy.
    stream_chunk: int = 65_536  # STREAM_DATA payload this end sends (fairness vs. overhead)
    datagram_queue_bytes: int = 4 * 1024 * 1024  # bound on queued outgoing datagram bytes
    max_datagram_age: float = 0.25  # seconds a datagram may wait before it is dropped
    # Stream windows this end grants grow (doubling) up to this while a stream
    # consumes a whole window within two round trips: one stream's throughput is
    # window / RTT. Equal to stream_window: no growth.
    max_stream_window: int = 16 * 1024 * 1024
    # While datagrams arrive from the peer (and for ``latency_hold`` seconds after the
    # last one), the peer gets stream credit only up to ``latency_window`` per stream:
    # stream bytes ahead of a datagram in the one SSH channel are its queueing delay.
    # None: credit goes back as consumed, whatever arrives.
    latency_window: int | None = 256 * 1024
    latency_hold: float = 1.0
    ping_interval: float | None = None  # send PING this often (None: only on request)
    ping_timeout: float | None = None  # end the session when a PING is unanswered this long

    def hello_limits(self) -> dict[str, int]:
        return {
            "max_datagram": self.max_datagram,
            "max_chunk": self.max_chunk,
            "stream_window": self.stream_window,
            "connection_window": self.connection_window,
            "max_streams": self.max_streams,
            "max_flows": self.max_flows,
        }


# Smallest acceptable advertised values; below these a peer could not work.
HELLO_LIMIT_MINIMUMS: dict[str, int] = {
    "max_datagram": 1,
    "max_chunk": 1024,
    "stream_window": 1024,
    "connection_window": 1024,
    "max_streams": 1,
    "max_flows": 1,
}


def check_peer_limits(limits: dict[str, int]) -> dict[str, int]:
    """Validate the limits of a peer's HELLO; unknown keys are ignored (newer peers)."""
    checked: dict[str, int] = {}
    for key, minimum in HELLO_LIMIT_MINIMUMS.items():
        if key not in limits:
            raise HandshakeError(f"peer HELLO lacks the {key!r} limit")
        value = limits[key]
        if value < minimum:
            raise HandshakeError(f"peer HELLO limit {key}={value} is below the minimum {minimum}")
        checked[key] = value
    return checked
