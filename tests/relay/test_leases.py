"""Port leases on the relay: ``PortRegistry`` and the lease rules, in process.

The relay side is the real thing: a ``RelayServer`` (not listening for SSH), its
``PortRegistry`` and real ``RelayChannelSession`` objects with their policy, and
real public TCP listeners and UDP endpoints on 127.0.0.1. Only the SSH channel
under a session is replaced by an in-memory pipe to a client-side
``Multiplexer`` that the test drives (``ClientEnd``), so each test can end a
session exactly when it wants: ``lose()`` is what asyncssh reports when the TCP
connection dies.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

import asyncssh
import pytest
import uvloop

from sshrelay.protocol.aio.sshtuning import SUBSYSTEM
from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.errors import ErrorCode
from sshrelay.protocol.events import (
    ConnectionTerminated,
    DatagramReceived,
    Event,
    FlowOpened,
    HandshakeCompleted,
    ResponseReceived,
    StreamDataReceived,
    StreamEnded,
    StreamOpened,
)
from sshrelay.protocol.forwards import FORWARD_REQUEST, ForwardRequest
from sshrelay.protocol.multiplexer import Multiplexer
from sshrelay.relay.auth import AuthorizedKeys, KeyPermissions
from sshrelay.relay.server import RelayChannelSession, RelayOptions, RelayServer

LOOPBACK = "127.0.0.1"
KEY_A = "SHA256:key-a"
KEY_B = "SHA256:key-b"
T = TypeVar("T")

pytestmark = pytest.mark.timeout(30)


async def until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` on the loop until it is truthy; fail after ``timeout`` s."""
    deadline = monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)


class _NoTransport:
    """What ``TransportWatch`` gets from ``chan.get_connection()``: no TCP transport."""


class MemoryChannel:
    """The SSH channel under a relay session: what the relay writes reaches the client."""

    def __init__(self, end: ClientEnd) -> None:
        self.end = end
        self.closed = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_connection(self) -> _NoTransport:
        return _NoTransport()

    def write(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError("channel closed")
        self.end.receive(data)

    def close(self) -> None:
        # asyncssh reports a closed channel to the session as connection_lost.
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.end.session.connection_lost, None)


class ClientEnd:
    """A client session on the relay: a real ``RelayChannelSession`` on one side,
    a sans-I/O client ``Multiplexer`` the test drives on the other."""

    def __init__(self, relay: RelayServer, fingerprint: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.mux = Multiplexer(Role.CLIENT, MuxConfig())
        self.events: list[Event] = []
        permissions = KeyPermissions(fingerprint=fingerprint, comment=f"test {fingerprint}")
        self.session = RelayChannelSession(relay, permissions, f"{LOOPBACK}:1")
        self.chan = MemoryChannel(self)
        self.mux.initiate(monotonic())
        assert self.session.subsystem_requested(SUBSYSTEM)
        self.session.connection_made(self.chan)  # type: ignore[arg-type]
        self.session.session_started()
        self.push()

    @classmethod
    async def start(cls, relay: RelayServer, fingerprint: str) -> ClientEnd:
        end = cls(relay, fingerprint)
        await until(lambda: end.mux.is_open and end.session.mux.is_open, 5, "the handshake")
        assert any(isinstance(e, HandshakeCompleted) for e in end.events)
        return end

    # -- the in-memory wire

    def receive(self, data: bytes) -> None:
        self.events.extend(self.mux.receive_data(data, monotonic()))
        self.push()

    def push(self) -> None:
        """Deliver what the client multiplexer has to the relay session (next loop pass)."""
        self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        data = self.mux.data_to_send(None, monotonic())
        if data and not self.chan.closed:
            self.session.data_received(data, None)

    # -- what a client does

    async def forward(
        self, proto: str, port: int, forward: int = 1, bind: str = LOOPBACK
    ) -> tuple[int, dict[str, Any]]:
        """Ask for a forward; (response code, body)."""
        body = ForwardRequest(forward, proto, bind, port, f"{proto}-{forward}").to_body()
        request_id = self.mux.send_request(FORWARD_REQUEST, body)
        self.push()

        def response() -> ResponseReceived | None:
            for event in self.events:
                if isinstance(event, ResponseReceived) and event.request_id == request_id:
                    return event
            return None

        event = await until(response, 5, f"the answer to forward {proto}/{port}")
        return event.code, dict(event.body)

    async def must_forward(self, proto: str, port: int, forward: int = 1) -> int:
        code, body = await self.forward(proto, port, forward)
        assert code == ErrorCode.NO_ERROR, body
        return int(body["port"])

    def lose(self) -> None:
        """The TCP connection under the session died (what asyncssh reports)."""
        self.chan.closed = True
        self.session.connection_lost(ConnectionResetError("connection lost"))

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.events if isinstance(e, kind)]

    def terminated(self) -> ConnectionTerminated | None:
        found = self.of_type(ConnectionTerminated)
        return found[0] if found else None


def make_relay(tmp_path: Path, grace: float, max_held: int = 64) -> RelayServer:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(host_key.export_public_key().decode())
    options = RelayOptions(
        listen_host=LOOPBACK, listen_port=0, lease_grace=grace, max_held_connections=max_held
    )
    return RelayServer(options, host_key, AuthorizedKeys(authorized))


class Loop:
    """Runs a test's coroutine on one event loop: uvloop (what `relay serve` uses) or
    the stdlib loop (``SSHRELAY_NO_UVLOOP=1``, or no uvloop installed)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, coro: Coroutine[Any, Any, None]) -> None:
        if self.name == "uvloop":
            uvloop.run(coro)
        else:
            asyncio.run(coro)


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Loop:
    return Loop(request.param)


def bind_error(proto: str, port: int) -> int | None:
    """errno of binding 127.0.0.1:port now (None: the port is free)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            return exc.errno
    return None


async def read_or_end(reader: asyncio.StreamReader, timeout: float) -> bytes | str:
    """Bytes read, "eof", "reset", or "open" if nothing happened within ``timeout``."""
    try:
        data = await asyncio.wait_for(reader.read(1024), timeout)
    except TimeoutError:
        return "open"
    except ConnectionResetError:
        return "reset"
    return data if data else "eof"


# ------------------------------------------------------------------------------- grace


def test_grace_keeps_both_ports_bound_and_expiry_releases_them(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=0.6)
        end = await ClientEnd.start(relay, KEY_A)
        tcp = await end.must_forward("tcp", 0, forward=1)
        udp = await end.must_forward("udp", 0, forward=2)
        assert relay.metrics.leases == {"active": 2, "grace": 0}

        end.lose()
        lost_at = monotonic()
        assert relay.metrics.leases == {"active": 0, "grace": 2}
        assert bind_error("tcp", tcp) == errno.EADDRINUSE, "TCP port released during grace"
        assert bind_error("udp", udp) == errno.EADDRINUSE, "UDP port released during grace"

        await until(lambda: not relay.registry.listeners, 3, "the leases to expire")
        expired_after = monotonic() - lost_at
        print(f"leases expired {expired_after:.3f} s after the session ended (grace 0.6 s)")
        assert expired_after >= 0.6 - 0.01
        assert bind_error("tcp", tcp) is None, "TCP port still bound after the grace period"
        assert bind_error("udp", udp) is None, "UDP port still bound after the grace period"
        assert relay.metrics.leases == {"active": 0, "grace": 0}
        assert relay.metrics.lease_events["expired"] == 2
        assert relay.metrics.lease_events["resumed"] == 0

    run(main())


def test_without_grace_the_port_is_released_at_once(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=0)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("tcp", 0)
        end.lose()
        assert not relay.registry.listeners
        assert bind_error("tcp", port) is None

    run(main())


def test_udp_during_grace_is_dropped_and_counted_as_no_session(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("udp", 0)
        end.lose()

        loop = asyncio.get_running_loop()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((LOOPBACK, 0))
        peer.setblocking(False)
        try:
            for index in range(5):
                peer.sendto(b"during grace %d" % index, (LOOPBACK, port))
            drops = relay.metrics.extra_drops
            await until(lambda: drops["no_session"] >= 5, 3, "5 no_session drops")
            await asyncio.sleep(0.1)
            assert drops["no_session"] == 5
            with pytest.raises(BlockingIOError):
                peer.recv(2048)  # nothing came back

            # The client returns: the peer's next datagram gets through, on a new flow.
            back = await ClientEnd.start(relay, KEY_A)
            assert await back.must_forward("udp", port) == port
            peer.sendto(b"after return", (LOOPBACK, port))
            await until(lambda: back.of_type(DatagramReceived), 3, "the datagram at the client")
            (opened,) = back.of_type(FlowOpened)
            assert opened.meta["peer"] == f"{LOOPBACK}:{peer.getsockname()[1]}"
            assert back.of_type(DatagramReceived)[0].data == b"after return"
            back.mux.send_datagram(opened.flow_id, b"reply", monotonic())
            back.push()
            reply = await asyncio.wait_for(loop.sock_recv(peer, 2048), 3)
            assert reply == b"reply"
            assert drops["no_session"] == 5
            assert relay.metrics.lease_events["resumed"] == 1
        finally:
            peer.close()
            relay.registry.close_all()

    run(main())


# ------------------------------------------------------------------------- held TCP


async def _held_then_returned(
    relay: RelayServer, count: int, early: bool
) -> tuple[ClientEnd, int, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """A session ends; ``count`` public clients connect during grace (each sends
    "sent while held N" at once when ``early``); the same key comes back."""
    end = await ClientEnd.start(relay, KEY_A)
    port = await end.must_forward("tcp", 0)
    end.lose()
    publics: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for index in range(count):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        if early:
            writer.write(b"sent while held %d" % index)
            await writer.drain()
        publics.append((reader, writer))
    held = relay.metrics.held_connections
    await until(lambda: held["held"] == count, 3, f"{count} held connections")
    for reader, _ in publics:
        assert await read_or_end(reader, 0.05) == "open"
    back = await ClientEnd.start(relay, KEY_A)
    returned = monotonic()
    assert await back.must_forward("tcp", port) == port
    await until(
        lambda: len(back.of_type(StreamOpened)) == count,
        3,
        f"{count} streams opened toward the returning client",
    )
    print(f"{count} held connections attached {monotonic() - returned:.3f} s after the return")
    assert held == {"held": count, "attached": count, "closed": 0, "gone": 0}
    assert relay.metrics.lease_events["resumed"] == 1
    return back, port, publics


def _stream_of(back: ClientEnd, writer: asyncio.StreamWriter) -> int:
    """The stream the relay opened for this public connection (by its peer address)."""
    local_port = writer.get_extra_info("sockname")[1]
    for event in back.of_type(StreamOpened):
        if event.meta["peer"] == f"{LOOPBACK}:{local_port}":
            return event.stream_id
    raise AssertionError(f"no stream for public client port {local_port}")


def _stream_bytes(back: ClientEnd, stream_id: int) -> bytes:
    return b"".join(e.data for e in back.of_type(StreamDataReceived) if e.stream_id == stream_id)


def test_tcp_connections_during_grace_are_held_and_attached_when_the_client_returns(
    tmp_path: Path, run: Loop
) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        back, _, publics = await _held_then_returned(relay, 3, early=False)
        for index, (reader, writer) in enumerate(publics):
            stream_id = _stream_of(back, writer)
            back.mux.accept_stream(stream_id)
            back.push()
            writer.write(b"question %d" % index)
            await writer.drain()
            want = b"question %d" % index
            await until(lambda s=stream_id, w=want: _stream_bytes(back, s) == w, 3, repr(want))
            back.mux.send_stream_data(stream_id, b"answer %d" % index)
            back.push()
            assert await asyncio.wait_for(reader.readexactly(8), 3) == b"answer %d" % index
            writer.close()
        relay.registry.close_all()

    run(main())


def test_bytes_a_held_connection_sent_before_the_client_returned_are_delivered(
    tmp_path: Path, run: Loop
) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        back, _, publics = await _held_then_returned(relay, 2, early=True)
        for index, (_, writer) in enumerate(publics):
            stream_id = _stream_of(back, writer)
            back.mux.accept_stream(stream_id)
            back.push()
            writer.write(b" and after")
            await writer.drain()
            want = b"sent while held %d and after" % index
            try:
                await until(lambda s=stream_id, w=want: _stream_bytes(back, s) == w, 3, repr(want))
            except AssertionError:
                raise AssertionError(
                    f"the client got {_stream_bytes(back, stream_id)!r}, not {want!r}"
                ) from None
            writer.close()
        relay.registry.close_all()

    run(main())


def test_a_held_half_close_and_more_than_the_held_buffer_are_delivered(
    tmp_path: Path, run: Loop
) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("tcp", 0)
        end.lose()
        request = bytes(range(256)) * 800  # 200 KiB: more than a held connection buffers
        _, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(request)
        writer.write_eof()  # a request, then a half-close: the answer is still owed
        await until(lambda: relay.metrics.held_connections["held"] == 1, 3, "a held connection")
        await asyncio.sleep(0.2)
        back = await ClientEnd.start(relay, KEY_A)
        await back.must_forward("tcp", port)
        (opened,) = await until(lambda: back.of_type(StreamOpened), 3, "the held stream")
        back.mux.accept_stream(opened.stream_id)
        back.push()

        await until(
            lambda: len(_stream_bytes(back, opened.stream_id)) >= len(request), 5, "200 KiB"
        )
        assert _stream_bytes(back, opened.stream_id) == request
        await until(
            lambda: any(
                isinstance(e, StreamEnded) and e.stream_id == opened.stream_id for e in back.events
            ),
            3,
            "the held half-close",
        )
        writer.close()
        relay.registry.close_all()

    run(main())


def test_held_connections_are_closed_when_the_lease_expires(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=0.5)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("tcp", 0)
        end.lose()
        lost_at = monotonic()
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        held = relay.metrics.held_connections
        await until(lambda: held["held"] == 1, 3, "a held connection")
        outcome = await read_or_end(reader, 3)
        closed_after = monotonic() - lost_at
        print(f"held connection ended ({outcome}) {closed_after:.3f} s after the session ended")
        assert outcome in ("eof", "reset")
        assert 0.5 - 0.01 <= closed_after < 1.5
        assert held == {"held": 1, "attached": 0, "closed": 1, "gone": 0}
        assert relay.metrics.lease_events["expired"] == 1
        writer.close()
        with pytest.raises(OSError):  # the port is gone: refused
            await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 3)

    run(main())


def test_the_number_of_held_connections_is_bounded(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30, max_held=2)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("tcp", 0)
        end.lose()
        publics = []
        for _ in range(4):
            publics.append(await asyncio.open_connection(LOOPBACK, port))
            await asyncio.sleep(0.02)  # accepted in this order
        outcomes = [await read_or_end(reader, 0.3) for reader, _ in publics]
        print(f"4 connections during grace with max_held_connections=2: {outcomes}")
        assert outcomes[:2] == ["open", "open"]
        assert all(outcome in ("eof", "reset") for outcome in outcomes[2:]), outcomes
        assert relay.metrics.held_connections["held"] == 2

        back = await ClientEnd.start(relay, KEY_A)
        await back.must_forward("tcp", port)
        await until(lambda: len(back.of_type(StreamOpened)) >= 2, 3, "the 2 held connections")
        await asyncio.sleep(0.05)
        assert len(back.of_type(StreamOpened)) == 2
        assert relay.metrics.held_connections == {
            "held": 2,
            "attached": 2,
            "closed": 0,
            "gone": 0,
        }
        for _, writer in publics:
            writer.close()
        relay.registry.close_all()

    run(main())


def test_a_held_connection_whose_public_client_left_is_counted_gone(
    tmp_path: Path, run: Loop
) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("tcp", 0)
        end.lose()
        _, writer = await asyncio.open_connection(LOOPBACK, port)
        held = relay.metrics.held_connections
        await until(lambda: held["held"] == 1, 3, "a held connection")
        # The public client gives up: a real RST (SO_LINGER 0). A plain close is a FIN,
        # which a held connection must treat as a half-close still owed an answer.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        try:
            await until(lambda: held["gone"] == 1, 2, "the held connection to be counted gone")
            back = await ClientEnd.start(relay, KEY_A)
            await back.must_forward("tcp", port)
            await asyncio.sleep(0.1)
            assert not back.of_type(StreamOpened), "a stream for a public client that left"
            assert held == {"held": 1, "attached": 0, "closed": 0, "gone": 1}
        finally:
            relay.registry.close_all()

    run(main())


# ---------------------------------------------------------------------- who may claim


def test_another_key_is_refused_while_the_port_is_leased(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        owner = await ClientEnd.start(relay, KEY_A)
        port = await owner.must_forward("tcp", 0)

        other = await ClientEnd.start(relay, KEY_B)
        code, body = await other.forward("tcp", port)
        print(f"other key while the owner is connected: {ErrorCode(code).name}: {body}")
        assert code == ErrorCode.ADDRESS_IN_USE
        assert body["message"] == f"tcp port {port} on {LOOPBACK} is held by another key"
        assert owner.terminated() is None and owner.session.mux.is_open

        owner.lose()
        code, body = await other.forward("tcp", port)
        print(f"other key during the grace period: {ErrorCode(code).name}: {body}")
        assert code == ErrorCode.ADDRESS_IN_USE
        message = str(body["message"])
        assert message.startswith(f"tcp port {port} on {LOOPBACK} is leased to another key for ")
        assert message.endswith(" more seconds")
        seconds = int(message.split(" for ")[1].split()[0])
        assert 28 <= seconds <= 30
        assert relay.metrics.forwards_refused == {"address_in_use": 2}
        assert relay.metrics.leases == {"active": 0, "grace": 1}
        # The refusals did not take the lease: the owner's key resumes it.
        back = await ClientEnd.start(relay, KEY_A)
        assert await back.must_forward("tcp", port) == port
        relay.registry.close_all()

    run(main())


def test_another_key_gets_the_port_once_the_lease_expired(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=0.3)
        owner = await ClientEnd.start(relay, KEY_A)
        port = await owner.must_forward("udp", 0)
        owner.lose()
        await until(lambda: not relay.registry.listeners, 3, "the lease to expire")
        other = await ClientEnd.start(relay, KEY_B)
        assert await other.must_forward("udp", port) == port
        relay.registry.close_all()

    run(main())


def test_the_same_key_resumes_its_lease_at_once_during_grace(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        owner = await ClientEnd.start(relay, KEY_A)
        tcp = await owner.must_forward("tcp", 0, forward=1)
        udp = await owner.must_forward("udp", 0, forward=2)
        owner.lose()
        back = await ClientEnd.start(relay, KEY_A)
        asked = monotonic()
        assert await back.must_forward("tcp", tcp, forward=1) == tcp
        assert await back.must_forward("udp", udp, forward=2) == udp
        took = monotonic() - asked
        print(f"same key resumed 2 leases in {took * 1000:.1f} ms (grace 30 s)")
        assert took < 1.0
        assert relay.metrics.lease_events == {"takeover": 0, "resumed": 2, "expired": 0}
        assert relay.metrics.leases == {"active": 2, "grace": 0}
        # The grace timers are gone: the leases do not expire under the new session.
        assert all(item.grace_timer is None for item in relay.registry.listeners.values())
        relay.registry.close_all()

    run(main())


def test_the_same_key_takes_over_from_a_live_session_which_is_superseded(
    tmp_path: Path, run: Loop
) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        old = await ClientEnd.start(relay, KEY_A)
        tcp = await old.must_forward("tcp", 0, forward=1)
        udp = await old.must_forward("udp", 0, forward=2)

        # A half-open old session (the link died, the relay has not noticed yet).
        new = await ClientEnd.start(relay, KEY_A)
        asked = monotonic()
        assert await new.must_forward("tcp", tcp, forward=1) == tcp
        took = monotonic() - asked
        ended = await until(old.terminated, 3, "the old session to be told")
        print(f"takeover in {took * 1000:.1f} ms; old session told: {ended}")
        assert ended.remote and ended.code == ErrorCode.SUPERSEDED
        assert "newer session" in ended.reason
        assert old.session.termination is not None
        assert relay.metrics.lease_events["takeover"] == 1
        # The old session's other lease waits in grace for the new session.
        assert relay.metrics.leases == {"active": 1, "grace": 1}
        assert await new.must_forward("udp", udp, forward=2) == udp
        assert relay.metrics.lease_events == {"takeover": 1, "resumed": 1, "expired": 0}
        assert relay.metrics.leases == {"active": 2, "grace": 0}

        # Public traffic now reaches the new session only.
        _, writer = await asyncio.open_connection(LOOPBACK, tcp)
        await until(lambda: new.of_type(StreamOpened), 3, "a stream toward the new session")
        assert not old.of_type(StreamOpened)
        writer.close()
        # The old session's connection_lost (asyncssh, later) must not disturb the lease.
        old.chan.close()
        await asyncio.sleep(0.05)
        assert relay.metrics.leases == {"active": 2, "grace": 0}
        relay.registry.close_all()

    run(main())


def test_one_session_cannot_claim_the_same_port_twice(tmp_path: Path, run: Loop) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        end = await ClientEnd.start(relay, KEY_A)
        port = await end.must_forward("tcp", 0, forward=1)
        code, body = await end.forward("tcp", port, forward=2)
        assert code == ErrorCode.ADDRESS_IN_USE
        assert "already forwarded by this session" in str(body["message"])
        assert end.session.mux.is_open
        relay.registry.close_all()

    run(main())


def test_a_port_in_use_by_another_program_is_refused_with_its_number(
    tmp_path: Path, run: Loop
) -> None:
    async def main() -> None:
        relay = make_relay(tmp_path, grace=30)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind((LOOPBACK, 0))
            port = taken.getsockname()[1]
            end = await ClientEnd.start(relay, KEY_A)
            code, body = await end.forward("udp", port)
        assert code == ErrorCode.ADDRESS_IN_USE
        assert body["message"] == f"udp port {port} on {LOOPBACK} is already in use on the relay"
        assert not relay.registry.listeners

    run(main())
