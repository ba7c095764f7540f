"""The client's local side: dial TCP targets for new streams, open a UDP socket per flow.

Each UDP flow gets its own connected socket, so the target sees one distinct
source port per public peer and its replies map back to the right peer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from time import monotonic

from sshrelay.protocol.aio.session import MuxChannelSession
from sshrelay.protocol.aio.tcp import TcpStreamBridge
from sshrelay.protocol.aio.udp import Address, UdpSocket
from sshrelay.protocol.errors import ErrorCode, LocalProtocolError
from sshrelay.protocol.events import FlowOpened, StreamOpened
from sshrelay.protocol.forwards import ForwardSpec

log = logging.getLogger("sshrelay.client")

DIAL_TIMEOUT = 10.0


@dataclass(slots=True)
class LocalTarget:
    spec: ForwardSpec
    family: int = socket.AF_INET
    sockaddr: Address | None = None  # resolved once for UDP

    async def resolve(self) -> None:
        if self.spec.proto != "udp":
            return
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.spec.host, self.spec.host_port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve {self.spec.host}")
        self.family = infos[0][0]
        self.sockaddr = infos[0][4]  # type: ignore[assignment]


async def dial_stream(session: MuxChannelSession, event: StreamOpened, target: LocalTarget) -> None:
    """Connect to the TCP target, then accept the stream (or reset it if that fails)."""
    peer = str(event.meta.get("peer", "?"))
    label = f"{target.spec.label} {peer}"
    bridge = TcpStreamBridge(session, label)
    bridge.bind(event.stream_id, accepted=False)  # a RESET while we dial reaches it
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: bridge, target.spec.host, target.spec.host_port),
            DIAL_TIMEOUT,
        )
    except (OSError, TimeoutError) as exc:
        code = (
            ErrorCode.CONNECT_REFUSED
            if isinstance(exc, ConnectionRefusedError)
            else ErrorCode.CONNECT_FAILED
        )
        log.warning(
            "%s: cannot reach %s:%d: %s",
            label,
            target.spec.host,
            target.spec.host_port,
            _reason(exc),
        )
        session.detach_stream(event.stream_id)
        try:
            session.mux.reset_stream(event.stream_id, code)
        except LocalProtocolError:
            pass
        session.kick()
        return
    if event.stream_id not in session.streams:  # reset by the relay while we dialled
        bridge.abort()
        return
    try:
        session.mux.accept_stream(event.stream_id)
    except LocalProtocolError:
        bridge.abort()
        return
    bridge.tunnel_accepted()
    session.kick()


def _reason(exc: BaseException) -> str:
    """Why a dial failed, e.g. "Connection refused" (asyncio's own loop puts
    "Connect call failed (...)" in strerror and keeps the reason only in errno)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {DIAL_TIMEOUT:g} s"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class UdpParking:
    """Local UDP sockets of public peers, kept across a reconnect.

    When the session is lost, each flow's socket is parked under (forward,
    public peer) for a while instead of closed. When the relay opens a flow for
    the same peer on the next session, the socket is reused, so the target (a
    game server, WireGuard) keeps seeing the same source port and carries on as
    if nothing happened. Replies the target sends while parked are dropped.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._parked: dict[tuple[int, str], tuple[UdpSocket, asyncio.TimerHandle]] = {}

    def park(self, key: tuple[int, str], sock: UdpSocket) -> None:
        if self.seconds <= 0 or key in self._parked:
            sock.close()
            return
        sock.retarget(_drop_datagram)
        timer = asyncio.get_running_loop().call_later(self.seconds, self._expire, key)
        self._parked[key] = (sock, timer)

    def take(self, key: tuple[int, str]) -> UdpSocket | None:
        entry = self._parked.pop(key, None)
        if entry is None:
            return None
        sock, timer = entry
        timer.cancel()
        return None if sock.closed else sock

    def _expire(self, key: tuple[int, str]) -> None:
        entry = self._parked.pop(key, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for sock, timer in self._parked.values():
            timer.cancel()
            sock.close()
        self._parked.clear()


def _drop_datagram(data: bytes, addr: Address) -> None:
    """A parked socket's reply while no session can carry it: lost, as UDP may be."""


class LocalFlow:
    """One public peer's datagrams <-> a connected UDP socket toward the target."""

    __slots__ = ("flow_id", "key", "parking", "session", "sock")

    def __init__(
        self,
        session: MuxChannelSession,
        flow_id: int,
        target: LocalTarget,
        key: tuple[int, str],
        parking: UdpParking | None,
    ) -> None:
        assert target.sockaddr is not None
        self.session = session
        self.flow_id = flow_id
        self.key = key
        self.parking = parking
        sock = parking.take(key) if parking is not None else None
        if sock is None:
            sock = UdpSocket.connect(target.sockaddr, target.family, self._reply, session.flush)
        else:
            sock.retarget(self._reply, session.flush)
        self.sock = sock

    def _reply(self, data: bytes, addr: Address) -> None:
        mux = self.session.mux
        if mux.is_open and self.flow_id in self.session.flows:
            mux.send_datagram(self.flow_id, data, monotonic())

    def tunnel_datagram(self, data: bytes) -> None:
        self.sock.send(data)

    def tunnel_flow_closed(self, code: int, remote: bool) -> None:
        self.sock.close()

    def tunnel_session_lost(self) -> None:
        if self.parking is None:
            self.sock.close()
        else:
            self.parking.park(self.key, self.sock)


def open_local_flow(
    session: MuxChannelSession,
    event: FlowOpened,
    target: LocalTarget,
    parking: UdpParking | None = None,
) -> None:
    key = (event.forward, str(event.meta.get("peer", "")))
    try:
        flow = LocalFlow(session, event.flow_id, target, key, parking)
    except OSError as exc:
        log.warning("%s: cannot open a UDP socket to the target: %s", target.spec.label, exc)
        session.mux.close_flow(event.flow_id, ErrorCode.CONNECT_FAILED)
        session.kick()
        return
    session.attach_flow(event.flow_id, flow)
