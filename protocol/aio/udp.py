"""Non-blocking UDP sockets read in batches straight from the event loop.

No asyncio transport: ``loop.add_reader`` plus ``recvfrom`` in a loop, up to
``BATCH`` datagrams per wake-up, so one loop iteration can gather many
datagrams and the session flushes them to the channel in one write. Sending
never blocks: if the kernel buffer is full the datagram is dropped and the
caller counts it (late UDP is worse than lost UDP).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

BATCH = 64
RECV_SIZE = 65_536  # one more than the largest UDP payload, to see truncation
SOCKET_BUFFER = 4 * 1024 * 1024

Address = tuple[str, int] | tuple[str, int, int, int]


class UdpSocket:
    """A bound (and optionally connected) UDP socket with a batch reader."""

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_done: Callable[[], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._on_datagram = on_datagram
        self._on_batch_done = on_batch_done
        self.closed = False
        self.send_errors = 0
        self.loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_done: Callable[[], None] | None = None,
    ) -> UdpSocket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and host in ("::", ""):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock, on_datagram, on_batch_done)

    @classmethod
    def connect(
        cls,
        target: Address,
        family: int,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_done: Callable[[], None] | None = None,
    ) -> UdpSocket:
        """A fresh socket connected to ``target``: one distinct source port per flow."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return cls(sock, on_datagram, on_batch_done)

    def retarget(
        self,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_done: Callable[[], None] | None = None,
    ) -> None:
        """Send what this socket reads somewhere else (a parked socket's new flow)."""
        self._on_datagram = on_datagram
        self._on_batch_done = on_batch_done

    @property
    def address(self) -> Address:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        deliver = self._on_datagram
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors surface here on connected sockets (e.g. ECONNREFUSED
                # when the target is not listening); the datagram is simply lost.
                continue
            deliver(data, addr)
            if self.closed:
                return
        if self._on_batch_done is not None:
            self._on_batch_done()

    def sendto(self, data: bytes, addr: Address) -> bool:
        try:
            self.sock.sendto(data, addr)
        except OSError:  # buffer full, ICMP error, peer unreachable: the datagram is lost
            self.send_errors += 1
            return False
        return True

    def send(self, data: bytes) -> bool:
        """Send on a connected socket; False when the kernel dropped it."""
        try:
            self.sock.send(data)
        except OSError:
            self.send_errors += 1
            return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
