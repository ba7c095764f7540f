"""SSH settings and socket options both ends use, and the hooks into asyncssh's
connection and transport.

asyncssh ignores back-pressure from its TCP transport (its connection's
``pause_writing`` is a no-op), so everything written to a channel lands in the
transport's buffer at once. To keep our scheduler, not that FIFO, in charge of
what goes on the wire next, ``TransportWatch`` reads the transport's buffer size
and chains its pause/resume callbacks; ``streamline`` removes per-packet work
our cipher choice makes pointless. This needs asyncssh private attributes;
they are touched only here and in ``sshfastpath.py``, and
``tests/protocol/aio/test_sshtuning.py`` and ``test_sshfastpath.py`` fail loudly
if asyncssh changes them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.logging import SSHLogger
from asyncssh.packet import String

from sshrelay.protocol.config import MuxConfig

SUBSYSTEM: Final = "sshrelay"
_EMPTY_STRING: Final = (String(b""),)
# AES-GCM is one call per packet; chacha20-poly1305 (asyncssh's default) is two.
ENCRYPTION_ALGS: Final = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
]
CHANNEL_WINDOW: Final = 64 * 1024 * 1024  # SSH channel window: never the limit below our credit
CHANNEL_MAX_PKTSIZE: Final = 32768  # larger packets measured slower: asyncssh re-copies its input
WRITE_HIGH_WATER: Final = 128 * 1024  # unsent bytes we allow below our scheduler
NOTSENT_LOWAT: Final = 64 * 1024
# Bytes of channel data handled per event-loop pass before the SSH socket yields to
# the others. libuv reads a busy socket up to 32 times per pass; without a bound a
# bulk stream keeps UDP sockets (and their datagrams' latency) waiting for megabytes.
READ_BURST: Final = 256 * 1024


DEAD_LINK_TIMEOUT: Final = 12.0  # seconds within which both ends notice a dead link


@dataclass(frozen=True, slots=True)
class DeadLink:
    """Timings derived from one bound: a black-holed link is noticed within ``timeout``.

    In-band PINGs go every timeout/4 and a PING unanswered for 3*timeout/4 ends
    the session, so the worst case is one interval plus the wait. SSH keepalives
    back this up, and TCP_USER_TIMEOUT makes the kernel give up on unacknowledged
    data after ``timeout`` too.
    """

    timeout: float = DEAD_LINK_TIMEOUT

    @property
    def ping_interval(self) -> float:
        return self.timeout / 4

    @property
    def ping_timeout(self) -> float:
        return self.timeout * 3 / 4

    def ssh_options(self) -> dict[str, Any]:
        return {"keepalive_interval": self.timeout / 3, "keepalive_count_max": 3}

    def apply(self, config: MuxConfig) -> MuxConfig:
        config.ping_interval = self.ping_interval
        config.ping_timeout = self.ping_timeout
        return config


def connection_options() -> dict[str, Any]:
    """Keyword options common to ``asyncssh.connect`` and ``asyncssh.create_server``."""
    return {
        "encryption_algs": ENCRYPTION_ALGS,
        "compression_algs": None,
    }


def tune_socket(sock: socket.socket | None, user_timeout: float | None = None) -> None:
    """Low latency for the SSH socket: no Nagle, little unsent data in the kernel;
    with ``user_timeout``, the kernel drops the connection when sent data stays
    unacknowledged that long (a black-holed link)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    timeout_ms = int(user_timeout * 1000) if user_timeout else None
    for level, option, value in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", None), NOTSENT_LOWAT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), timeout_ms),
    ):
        if value is None:
            continue
        if option is None:
            continue
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass  # not supported by this kernel; only latency suffers


def quiet_packet_log(obj: Any) -> None:
    """Skip asyncssh's per-packet log formatting unless packet logging is on.

    asyncssh formats a name, a byte count and a note for every packet before
    its logger checks the debug level (packet logs need level 3).
    """
    log_sent, log_received = obj.log_sent_packet, obj.log_received_packet

    def log_sent_packet(pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        if SSHLogger._debug_level >= 3:
            log_sent(pkttype, pktid, packet, note)

    def log_received_packet(pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        if SSHLogger._debug_level >= 3:
            log_received(pkttype, pktid, packet, note)

    obj.log_sent_packet = log_sent_packet
    obj.log_received_packet = log_received_packet


def streamline(conn: SSHConnection) -> None:
    """Remove per-packet work asyncssh does that our cipher choice makes pointless.

    asyncssh sends an empty SSH_MSG_IGNORE before every packet once encryption is
    on: the countermeasure to CBC mode's predictable-IV attack. ``ENCRYPTION_ALGS``
    offers no CBC cipher, so it only doubles the packets, cipher calls and
    socket writes per channel write; drop those (and only those) packets.
    """
    if getattr(conn, "_sshrelay_streamlined", False):
        return
    conn._sshrelay_streamlined = True  # type: ignore[attr-defined]
    send_packet = conn.send_packet

    def send_packet_without_ignore(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == _EMPTY_STRING:
            return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = send_packet_without_ignore  # type: ignore[method-assign]
    quiet_packet_log(conn)


class TransportWatch:
    """Buffered bytes under an SSH channel, with a callback when they drain."""

    def __init__(self, conn: SSHConnection, user_timeout: float | None = None) -> None:
        self._conn = conn
        self._transport: Any = getattr(conn, "_transport", None)
        self._callbacks: list[Callable[[], None]] = []
        if self._transport is not None:
            self._transport.set_write_buffer_limits(
                high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4
            )
            original = conn.resume_writing

            def resume_writing() -> None:
                original()
                for callback in list(self._callbacks):
                    callback()

            conn.resume_writing = resume_writing  # type: ignore[method-assign]
            tune_socket(conn.get_extra_info("socket"), user_timeout)
            streamline(conn)

    def on_drain(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def remove(self, callback: Callable[[], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def pause_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def buffered(self) -> int:
        transport = self._transport
        if transport is None or transport.is_closing():
            return 0
        return int(transport.get_write_buffer_size())
