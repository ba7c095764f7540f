"""Public TCP listeners and UDP endpoints on the relay, and who owns each port.

A listener belongs to (client key, protocol, bind address, port) and is bound
to at most one live session at a time (``ForwardBinding``). The
``PortRegistry`` refuses a port that another key holds and reports a bind
failure ("address already in use") with the port in the message.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from time import monotonic

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

    def __init__(self, request: ForwardRequest, owner: str) -> None:
        self.request = request
        self.owner = owner  # key fingerprint
        self.bind_host = request.bind or "0.0.0.0"
        self.port = request.port
        self.binding: ForwardBinding | None = None
        self.name = request.name or f"{request.proto}/{request.port}"

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

    def __init__(self, request: ForwardRequest, owner: str) -> None:
        super().__init__(request, owner)
        self._server: asyncio.Server | None = None

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
        if binding is None:
            return _Refuser()
        return PublicTcpBridge(self, binding)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class _Refuser(asyncio.Protocol):
    """Closes a public connection that arrived while no session serves the port."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _PublicFlow:
    """Replies from the tunnel go back to one public peer."""

    __slots__ = ("addr", "endpoint", "flow_id")

    def __init__(self, endpoint: UdpListener, addr: Address, flow_id: int) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.flow_id = flow_id

    def tunnel_datagram(self, data: bytes) -> None:
        sock = self.endpoint.sock
        if sock is not None and not sock.sendto(data, self.addr):
            self.endpoint.send_drops += 1

    def tunnel_flow_closed(self, code: int, remote: bool) -> None:
        self.endpoint.table.remove(self.flow_id)


class UdpListener(Listener):
    proto = "udp"

    def __init__(self, request: ForwardRequest, owner: str, metrics: MetricsBook) -> None:
        super().__init__(request, owner)
        self.sock: UdpSocket | None = None
        self.table = PeerFlowTable(request.max_flows)
        self.metrics = metrics
        self.send_drops = 0  # replies the kernel refused

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
                self.table.evictions += 1
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
    """All public listeners of the relay, by (proto, bind address, port)."""

    def __init__(self, metrics: MetricsBook) -> None:
        self.metrics = metrics
        self.listeners: dict[tuple[str, str, int], Listener] = {}

    async def claim(self, request: ForwardRequest, owner: str, binding: ForwardBinding) -> Listener:
        bind_host = request.bind or "0.0.0.0"
        key = (request.proto, bind_host, request.port)
        if request.port and key in self.listeners:
            existing = self.listeners[key]
            if existing.owner != owner:
                raise ForwardRefused(
                    ErrorCode.ADDRESS_IN_USE,
                    f"{request.proto} port {request.port} on {bind_host} is held by another key",
                )
            raise ForwardRefused(
                ErrorCode.ADDRESS_IN_USE,
                f"{request.proto} port {request.port} on {bind_host} is already forwarded "
                "by another session of this key",
            )
        listener: Listener
        if request.proto == "tcp":
            listener = TcpListener(request, owner)
        else:
            listener = UdpListener(request, owner, self.metrics)
        await listener.open()
        listener.attach(binding)
        self.listeners[listener.key] = listener
        return listener

    def release(self, listener: Listener) -> None:
        listener.detach()
        listener.close()
        if self.listeners.get(listener.key) is listener:
            del self.listeners[listener.key]

    def close_all(self) -> None:
        for listener in list(self.listeners.values()):
            self.release(listener)
