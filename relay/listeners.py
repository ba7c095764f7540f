"""Public TCP listeners and UDP endpoints on the relay, and who owns each port.

A listener is a *lease*: it belongs to (client key, protocol, bind address,
port), not to a TCP session. It serves at most one live session at a time
(``ForwardBinding``). When that session ends the socket stays bound for a
grace period: UDP datagrams arriving meanwhile are dropped and counted, new TCP
connections are held (bounded in number and time) and handed to the client
when it comes back. The same key asking for the same forward takes the lease
over at once, evicting an older session that still looks alive; another key is
refused until the lease expires. This is what keeps public ports from being
lost or "already in use" after a reconnect.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from time import monotonic
from typing import cast

from sshrelay.protocol.aio.metrics import MetricsBook
from sshrelay.protocol.aio.session import MuxChannelSession
from sshrelay.protocol.aio.tcp import TcpStreamBridge
from sshrelay.protocol.aio.udp import Address, UdpSocket
from sshrelay.protocol.errors import ErrorCode, LocalProtocolError
from sshrelay.protocol.flowtable import PeerFlowTable
from sshrelay.protocol.forwards import ForwardRequest

log = logging.getLogger("sshrelay.relay")


class ForwardRefused(Exception):
    """A forward request the relay will not serve; ``code`` goes back on the wire."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class ForwardBinding:
    """The live session a listener hands its traffic to."""

    session: MuxChannelSession
    forward: int  # id chosen by the client for this forward


def format_peer(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener:
    """Common part of a TCP listener and a UDP endpoint."""

    proto = ""

    def __init__(self, request: ForwardRequest, owner: str, metrics: MetricsBook) -> None:
        self.request = request
        self.owner = owner  # key fingerprint
        self.metrics = metrics
        self.bind_host = request.bind or "0.0.0.0"
        self.port = request.port
        self.binding: ForwardBinding | None = None
        self.name = request.name or f"{request.proto}/{request.port}"
        self.grace_timer: asyncio.TimerHandle | None = None
        self.grace_until = 0.0  # monotonic time the lease expires while in grace

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.proto, self.bind_host, self.port)

    def attach(self, binding: ForwardBinding) -> None:
        self.binding = binding

    def detach(self) -> None:
        self.binding = None

    async def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PublicTcpBridge(TcpStreamBridge):
    """A public TCP connection: opens a stream toward the client when it arrives."""

    def __init__(self, listener: TcpListener, binding: ForwardBinding) -> None:
        super().__init__(binding.session, listener.name)
        self.listener = listener
        self.binding = binding

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.label = f"{self.listener.name} {format_peer(peer) if peer else '?'}"
        session = self.binding.session
        if not session.mux.is_open:
            self.abort()
            return
        try:
            stream_id = session.mux.open_stream(
                self.binding.forward,
                {"peer": format_peer(peer) if peer else "", "forward": self.listener.name},
            )
        except LocalProtocolError as exc:
            log.warning("%s: refused: %s", self.label, exc)
            self.abort()
            return
        self.bind(stream_id, accepted=False)
        session.kick()
        log.debug("%s: stream %d opened", self.label, stream_id)


class TcpListener(Listener):
    proto = "tcp"

    def __init__(
        self, request: ForwardRequest, owner: str, metrics: MetricsBook, max_held: int = 64
    ) -> None:
        super().__init__(request, owner, metrics)
        self._server: asyncio.Server | None = None
        self.max_held = max_held
        self.held: list[_HeldConnection] = []

    def attach(self, binding: ForwardBinding) -> None:
        super().attach(binding)
        held, self.held = self.held, []
        for connection in held:
            connection.hand_over(self, binding)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._make_bridge,
                self.bind_host,
                self.port,
                reuse_address=True,
                family=socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET,
            )
        except OSError as exc:
            raise _bind_error("tcp", self.bind_host, self.port, exc) from None
        self.port = self._server.sockets[0].getsockname()[1]

    def _make_bridge(self) -> asyncio.Protocol:
        binding = self.binding
        if binding is not None:
            return PublicTcpBridge(self, binding)
        if self.grace_timer is not None and len(self.held) < self.max_held:
            return _HeldConnection(self)
        return _Refuser()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        held, self.held = self.held, []
        for connection in held:
            connection.drop()


class _Refuser(asyncio.Protocol):
    """Closes a public connection that arrived while no session serves the port."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


HELD_BUFFER = 64 * 1024  # bytes a held public connection may send before we stop reading


class _HeldConnection(asyncio.Protocol):
    """A public TCP connection that arrived during a lease's grace period.

    What the public client sends meanwhile is kept (up to ``HELD_BUFFER``, then
    reading pauses) and handed, with any EOF, to a ``PublicTcpBridge`` when the
    client is back, so nothing is lost. Reading (rather than pausing at once)
    also lets us notice a public client that gives up and leaves. Closed if the
    lease expires first.
    """

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.held.append(self)
        self.listener.metrics.held_connections["held"] += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= HELD_BUFFER and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # half-close: the answer may still come once the client is back

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.listener.held:
            self.listener.held.remove(self)
            self.listener.metrics.held_connections["gone"] += 1
        self.transport = None

    def hand_over(self, listener: TcpListener, binding: ForwardBinding) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        bridge = PublicTcpBridge(listener, binding)
        transport.set_protocol(bridge)
        bridge.connection_made(transport)
        if self.buffer:
            bridge.data_received(bytes(self.buffer))
        if self.eof:
            bridge.eof_received()
        listener.metrics.held_connections["attached"] += 1

    def drop(self) -> None:
        if self.transport is not None:
            self.listener.metrics.held_connections["closed"] += 1
            self.transport.abort()


class _PublicFlow:
    """Replies from the tunnel go back to one public peer."""

    __slots__ = ("addr", "endpoint", "flow_id")

    def __init__(self, endpoint: UdpListener, addr: Address, flow_id: int) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.flow_id = flow_id

    def tunnel_datagram(self, data: bytes) -> None:
        sock = self.endpoint.sock
        if sock is not None:
            sock.sendto(data, self.addr)  # a refusal is counted in sock.send_errors

    def tunnel_flow_closed(self, code: int, remote: bool) -> None:
        self.endpoint.table.remove(self.flow_id)

    def tunnel_session_lost(self) -> None:
        self.endpoint.table.remove(self.flow_id)


class UdpListener(Listener):
    proto = "udp"

    def __init__(self, request: ForwardRequest, owner: str, metrics: MetricsBook) -> None:
        super().__init__(request, owner, metrics)
        self.sock: UdpSocket | None = None
        self.table = PeerFlowTable(request.max_flows)

    async def open(self) -> None:
        try:
            self.sock = UdpSocket.bind(self.bind_host, self.port, self._datagram, self._batch_done)
        except OSError as exc:
            raise _bind_error("udp", self.bind_host, self.port, exc) from None
        self.port = self.sock.address[1]

    def detach(self) -> None:
        super().detach()
        for flow_id in self.table.flows():
            self.table.remove(flow_id)

    def _datagram(self, data: bytes, addr: Address) -> None:
        binding = self.binding
        if binding is None or not binding.session.mux.is_open:
            self.metrics.extra_drops["no_session"] += 1
            return
        session = binding.session
        mux = session.mux
        now = monotonic()
        flow_id = self.table.lookup(addr)
        if flow_id is None:
            victim = self.table.victim()
            if victim is not None:
                self.table.remove(victim)
                session.detach_flow(victim)
                mux.close_flow(victim, ErrorCode.EVICTED)
                self.metrics.flows_evicted += 1
            try:
                flow_id = mux.open_flow(
                    binding.forward,
                    {"peer": format_peer(addr), "forward": self.name},
                    self.request.idle_timeout,
                    now,
                )
            except LocalProtocolError as exc:
                log.warning("%s: cannot open a flow for %s: %s", self.name, format_peer(addr), exc)
                self.metrics.extra_drops["no_session"] += 1  # no flow can carry it
                return
            self.table.add(addr, flow_id)
            session.attach_flow(flow_id, _PublicFlow(self, addr, flow_id))
        mux.send_datagram(flow_id, data, now)

    def _batch_done(self) -> None:
        binding = self.binding
        if binding is not None:
            binding.session.flush()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _bind_error(proto: str, host: str, port: int, exc: OSError) -> ForwardRefused:
    if exc.errno == errno.EADDRINUSE:
        return ForwardRefused(
            ErrorCode.ADDRESS_IN_USE,
            f"{proto} port {port} on {host} is already in use on the relay",
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ForwardRefused(
            ErrorCode.NOT_PERMITTED, f"the relay may not bind {proto} port {port} on {host}"
        )
    return ForwardRefused(
        ErrorCode.BAD_REQUEST, f"cannot bind {proto} {host}:{port} on the relay: {exc.strerror}"
    )


class PortRegistry:
    """All public listeners (leases) of the relay, by (proto, bind address, port)."""

    def __init__(self, metrics: MetricsBook, grace: float = 60.0, max_held: int = 64) -> None:
        self.metrics = metrics
        self.grace = grace
        self.max_held = max_held
        self.listeners: dict[tuple[str, str, int], Listener] = {}

    async def claim(self, request: ForwardRequest, owner: str, binding: ForwardBinding) -> Listener:
        bind_host = request.bind or "0.0.0.0"
        key = (request.proto, bind_host, request.port)
        existing = self.listeners.get(key) if request.port else None
        if existing is not None:
            return self._take_over(existing, request, owner, binding)
        listener: Listener
        if request.proto == "tcp":
            listener = TcpListener(request, owner, self.metrics, self.max_held)
        else:
            listener = UdpListener(request, owner, self.metrics)
        await listener.open()
        listener.attach(binding)
        self.listeners[listener.key] = listener
        self._count()
        return listener

    def _take_over(
        self, listener: Listener, request: ForwardRequest, owner: str, binding: ForwardBinding
    ) -> Listener:
        where = f"{request.proto} port {request.port} on {listener.bind_host}"
        if listener.owner != owner:
            if listener.binding is None:
                left = max(0.0, listener.grace_until - monotonic())
                raise ForwardRefused(
                    ErrorCode.ADDRESS_IN_USE,
                    f"{where} is leased to another key for {left:.0f} more seconds",
                )
            raise ForwardRefused(ErrorCode.ADDRESS_IN_USE, f"{where} is held by another key")
        if listener.binding is not None:
            old = listener.binding.session
            if old is binding.session:
                raise ForwardRefused(
                    ErrorCode.ADDRESS_IN_USE, f"{where} is already forwarded by this session"
                )
            # A reconnecting client whose old session still looks alive (half-open
            # after a link failure): the newest session of the key wins.
            log.info("%s: taken over by a new session of the same key; closing the old one", where)
            self.metrics.lease_events["takeover"] += 1
            old.close(ErrorCode.SUPERSEDED, "replaced by a newer session of the same key")
            if listener.binding is not None:  # the old session had already ended
                self.detach(listener)
        elif listener.grace_timer is not None:
            self.metrics.lease_events["resumed"] += 1
        if listener.grace_timer is not None:
            listener.grace_timer.cancel()
            listener.grace_timer = None
        listener.request = request
        listener.attach(binding)
        self._count()
        return listener

    def detach(self, listener: Listener) -> None:
        """Its session ended: keep the port for the grace period, then let it go."""
        if self.listeners.get(listener.key) is not listener:
            return
        listener.detach()
        if self.grace <= 0:
            self.release(listener)
            return
        loop = asyncio.get_running_loop()
        listener.grace_until = monotonic() + self.grace
        listener.grace_timer = loop.call_later(self.grace, self._expire, listener)
        log.info(
            "%s %s:%d (%s): lease kept for %.0f s for the client to return",
            listener.proto,
            listener.bind_host,
            listener.port,
            listener.name,
            self.grace,
        )
        self._count()

    def _expire(self, listener: Listener) -> None:
        listener.grace_timer = None
        self.metrics.lease_events["expired"] += 1
        log.info(
            "%s %s:%d (%s): lease expired; port released",
            listener.proto,
            listener.bind_host,
            listener.port,
            listener.name,
        )
        self.release(listener)

    def release(self, listener: Listener) -> None:
        if listener.grace_timer is not None:
            listener.grace_timer.cancel()
            listener.grace_timer = None
        listener.detach()
        listener.close()
        if self.listeners.get(listener.key) is listener:
            del self.listeners[listener.key]
        self._count()

    def close_all(self) -> None:
        for listener in list(self.listeners.values()):
            self.release(listener)

    def _count(self) -> None:
        active = sum(1 for item in self.listeners.values() if item.binding is not None)
        self.metrics.leases["active"] = active
        self.metrics.leases["grace"] = len(self.listeners) - active
