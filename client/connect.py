"""`relay connect`: one SSH connection, one channel, then the forwards; and again.

``Client.connect`` dials the relay, verifies its host key, opens our
subsystem and requests every forward. A refused forward fails the whole run:
never a silently partial tunnel. ``Client.run`` keeps the tunnel up: when a
session ends it reconnects with exponential backoff and full jitter, asks for
the same public ports again (ports the relay chose are pinned), and never
retries what cannot get better (authentication, host key, refused forwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import monotonic
from typing import TypeVar

import asyncssh

from sshrelay.client.dialers import LocalTarget, UdpParking, dial_stream, open_local_flow
from sshrelay.client.hostkeys import HostKeyVerifier
from sshrelay.protocol.aio.metrics import MetricsBook
from sshrelay.protocol.aio.session import MuxChannelSession
from sshrelay.protocol.aio.sshtuning import (
    CHANNEL_MAX_PKTSIZE,
    CHANNEL_WINDOW,
    SUBSYSTEM,
    DeadLink,
    connection_options,
)
from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.errors import ErrorCode, describe_code
from sshrelay.protocol.events import (
    ConnectionTerminated,
    FlowOpened,
    PingAcknowledged,
    RequestReceived,
    StreamOpened,
)
from sshrelay.protocol.forwards import FORWARD_REQUEST, ForwardRequest, ForwardSpec
from sshrelay.protocol.stats import ForwardKey

log = logging.getLogger("sshrelay.client")
T = TypeVar("T")
PROBE_INTERVAL = 1.0  # a fresh SYN toward the relay every second while reconnecting

# Exit codes of `relay connect` (docs/operations.md).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FORWARD_REFUSED = 3
EXIT_AUTH = 4  # authentication or host key failure: never retried
EXIT_CONNECT = 5  # could not connect / gave up


FATAL_EXITS = frozenset({EXIT_USAGE, EXIT_FORWARD_REFUSED, EXIT_AUTH})


class ClientError(Exception):
    """A failure with an exit code, a metrics reason and a one-line message for the user."""

    def __init__(self, code: int, message: str, reason: str = "network") -> None:
        super().__init__(message)
        self.exit_code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter")."""

    first: float = 1.0  # the first retry comes within this many seconds
    cap: float = 30.0
    stable: float = 60.0  # a session that lasted this long resets the backoff

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        ceiling = min(self.cap, self.first * 2 ** (attempt - 1))
        return (rng or _RNG).uniform(0, ceiling)


_RNG = random.Random()


@dataclass(slots=True)
class ClientOptions:
    host: str
    port: int = 2222
    username: str = "relay"
    identity: Path | None = None
    forwards: list[ForwardSpec] = field(default_factory=list)
    known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    accept_new: bool = False
    connect_timeout: float = 15.0
    dead_link: DeadLink = field(default_factory=DeadLink)
    mux: MuxConfig = field(default_factory=MuxConfig)  # ping timings come from dead_link
    reconnect: bool = True
    max_retries: int | None = None  # None: retry for ever
    backoff: Backoff = field(default_factory=Backoff)
    udp_park_seconds: float = 90.0  # keep a peer's local UDP socket across reconnects
    tcp_connect_timeout: float = 3.0  # per TCP connect attempt (the SSH handshake has its own)

    def __post_init__(self) -> None:
        if self.mux.ping_timeout is None:
            self.dead_link.apply(self.mux)


class _SshClient(asyncssh.SSHClient):
    def __init__(self, verifier: HostKeyVerifier) -> None:
        self.verifier = verifier

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        return self.verifier.verify(host, addr, port, key)


class ClientChannelSession(MuxChannelSession, asyncssh.SSHClientSession[bytes]):
    """The client's end of the channel."""


def _new_session(
    config: MuxConfig, policy: _ClientPolicy, names: dict[int, ForwardKey]
) -> ClientChannelSession:
    session = ClientChannelSession(Role.CLIENT, config, policy)
    session.forward_names = names
    return session


class _ClientPolicy:
    def __init__(
        self, targets: dict[int, LocalTarget], metrics: MetricsBook, parking: UdpParking
    ) -> None:
        self.targets = targets
        self.metrics = metrics
        self.parking = parking
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[ConnectionTerminated] = (
            asyncio.get_running_loop().create_future()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def session_ready(self, session: MuxChannelSession) -> None:
        self.metrics.session_started(session)
        if not self.ready.done():
            self.ready.set_result(None)

    def session_ended(self, session: MuxChannelSession, event: ConnectionTerminated) -> None:
        self.metrics.session_finished(session)
        for key in session.forward_names.values():
            self.metrics.forward_up[key] = 0
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(event.reason or describe_code(event.code)))
        if not self.ended.done():
            self.ended.set_result(event)
        for task in self._tasks:
            task.cancel()

    def request_received(self, session: MuxChannelSession, event: RequestReceived) -> None:
        session.respond(event.request_id, ErrorCode.BAD_REQUEST, {"message": "not supported"})

    def stream_opened(self, session: MuxChannelSession, event: StreamOpened) -> None:
        target = self.targets.get(event.forward)
        if target is None or target.spec.proto != "tcp":
            session.mux.reset_stream(event.stream_id, ErrorCode.NOT_PERMITTED)
            session.kick()
            return
        task = asyncio.ensure_future(dial_stream(session, event, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def flow_opened(self, session: MuxChannelSession, event: FlowOpened) -> None:
        target = self.targets.get(event.forward)
        if target is None or target.spec.proto != "udp":
            session.mux.close_flow(event.flow_id, ErrorCode.NOT_PERMITTED)
            session.kick()
            return
        open_local_flow(session, event, target, self.parking)

    def ping_acknowledged(self, session: MuxChannelSession, event: PingAcknowledged) -> None:
        pass


class Client:
    def __init__(self, options: ClientOptions, metrics: MetricsBook | None = None) -> None:
        self.options = options
        self.metrics = metrics or MetricsBook("client")
        for spec in options.forwards:
            self.metrics.forward_key(spec.label, spec.proto)
        self.session: ClientChannelSession | None = None
        self.conn: asyncssh.SSHClientConnection | None = None
        self.bound: dict[int, tuple[str, int]] = {}  # forward id -> (bind, port) on the relay
        self.parking = UdpParking(options.udp_park_seconds)
        self._policy: _ClientPolicy | None = None

    async def connect(self) -> ClientChannelSession:
        """Connect, open the channel and request every forward; raise ClientError."""
        options = self.options
        targets = {index: LocalTarget(spec) for index, spec in enumerate(options.forwards, start=1)}
        for target in targets.values():
            try:
                await target.resolve()
            except OSError as exc:
                raise ClientError(EXIT_USAGE, f"forward {target.spec.describe()}: {exc}") from None
        verifier = HostKeyVerifier(options.known_hosts, options.accept_new)
        keys: list[asyncssh.SSHKey] = []
        if options.identity is not None:
            try:
                keys = [asyncssh.read_private_key(str(options.identity))]
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                raise ClientError(
                    EXIT_USAGE, f"cannot read key {options.identity}: {exc}"
                ) from None
        where = f"{options.host}:{options.port}"
        sock = await self._tcp_connect(options.tcp_connect_timeout)
        try:
            self.conn = await asyncio.wait_for(
                asyncssh.connect(
                    options.host,
                    options.port,
                    sock=sock,
                    username=options.username,
                    client_keys=keys,
                    known_hosts=([], [], []),  # every key goes through HostKeyVerifier
                    client_factory=lambda: _SshClient(verifier),
                    agent_path=None,
                    password=None,
                    kbdint_auth=False,
                    config=None,
                    **options.dead_link.ssh_options(),
                    **connection_options(),
                ),
                options.connect_timeout,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            message = str(verifier.failure) if verifier.failure else f"host key of {where}: {exc}"
            raise ClientError(EXIT_AUTH, message, "host_key") from None
        except asyncssh.PermissionDenied:
            raise ClientError(
                EXIT_AUTH,
                f"the relay at {where} refused our key"
                + (f" {options.identity}" if options.identity else "")
                + "; add its .pub line to the relay's authorized_keys",
                "auth",
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            if verifier.failure is not None:
                raise ClientError(EXIT_AUTH, str(verifier.failure), "host_key") from None
            detail = str(exc) or type(exc).__name__
            raise ClientError(
                EXIT_CONNECT, f"cannot connect to the relay at {where}: {detail}"
            ) from None
        if verifier.added:
            log.warning("stored the relay's host key for %s in %s", where, options.known_hosts)

        policy = _ClientPolicy(targets, self.metrics, self.parking)
        names = {
            i: self.metrics.forward_key(t.spec.label, t.spec.proto) for i, t in targets.items()
        }
        try:
            _, session = await self.conn.create_session(
                lambda: _new_session(options.mux, policy, names),
                subsystem=SUBSYSTEM,
                encoding=None,
                window=CHANNEL_WINDOW,
                max_pktsize=CHANNEL_MAX_PKTSIZE,
            )
        except (asyncssh.ChannelOpenError, OSError) as exc:
            self.conn.close()
            raise ClientError(
                EXIT_CONNECT, f"the relay at {where} did not open the tunnel: {exc}"
            ) from None
        assert isinstance(session, ClientChannelSession)
        self.session = session
        try:
            await asyncio.wait_for(asyncio.shield(policy.ready), options.connect_timeout)
        except (ConnectionError, TimeoutError) as exc:
            self.close()
            raise ClientError(
                EXIT_CONNECT, f"tunnel handshake with {where} failed: {exc}", "handshake"
            ) from None
        self._policy = policy
        for index, target in targets.items():
            await self._request_forward(session, index, target.spec)
        return session

    async def _tcp_connect(self, timeout: float) -> socket.socket:
        """Our own TCP connect, so a black-holed relay costs ``timeout``, not minutes of SYNs.

        A fresh connection attempt starts every second (earlier ones keep going) and the
        first to succeed wins, so a restored link is used within about a second whatever
        the kernel's SYN retransmission schedule (0, 1, 3, 7 s on older kernels).
        """
        options = self.options
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ClientError(EXIT_CONNECT, f"cannot resolve {options.host}: {exc}") from None
        family, kind, proto, _, address = infos[0]

        async def attempt() -> socket.socket:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
            return sock

        deadline = loop.time() + timeout
        next_launch = loop.time()
        attempts: set[asyncio.Future[socket.socket]] = set()
        last: BaseException | None = None
        try:
            while loop.time() < deadline:
                if loop.time() >= next_launch:
                    attempts.add(asyncio.ensure_future(attempt()))
                    next_launch = loop.time() + PROBE_INTERVAL
                done, _ = await asyncio.wait(
                    attempts,
                    timeout=max(0.0, min(next_launch, deadline) - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    attempts.discard(task)
                    if task.exception() is None:
                        return task.result()
                    last = task.exception()
                if done and not attempts:
                    break  # refused or unreachable outright: report it now, not in 3 s
        finally:
            for task in attempts:
                task.cancel()
            for task in attempts:
                with contextlib.suppress(BaseException):
                    (await task).close()
        detail = str(last) if last is not None else "timed out"
        raise ClientError(
            EXIT_CONNECT, f"cannot connect to the relay at {options.host}:{options.port}: {detail}"
        )

    async def _wait_or_probe(self, stop: asyncio.Event, delay: float, probe: bool) -> None:
        """Sleep ``delay`` (or until ``stop``); with ``probe``, end early once the relay's
        port accepts a TCP connection again, so recovery follows the network at once.

        The probe is one staggered ``_tcp_connect`` spanning the wait (a fresh SYN every
        second while the link is black-holed); when the relay refuses outright (its
        process is down), the next probe follows a second later.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not stop.is_set() and loop.time() < deadline:
            started = loop.time()
            try:
                if not probe:
                    await self._until(stop, asyncio.sleep(deadline - started))
                    return
                sock = await self._until(stop, self._tcp_connect(deadline - started))
            except _Stopped:
                return
            except ClientError:  # refused outright, or no answer until the deadline
                pause = min(started + PROBE_INTERVAL, deadline) - loop.time()
                with contextlib.suppress(_Stopped):
                    await self._until(stop, asyncio.sleep(max(0.0, pause)))
                continue
            sock.close()
            log.info("the relay answers again: reconnecting now")
            return

    async def _request_forward(
        self, session: ClientChannelSession, index: int, spec: ForwardSpec
    ) -> None:
        request = ForwardRequest.from_spec(index, spec)
        if spec.port == 0 and index in self.bound:
            # The relay chose this port last time: ask for the same one (the lease).
            request = replace(request, port=self.bound[index][1])
        try:
            code, body = await session.request(FORWARD_REQUEST, request.to_body())
        except (ConnectionError, TimeoutError) as exc:
            self.close()
            raise ClientError(
                EXIT_CONNECT, f"forward {spec.describe()}: no answer ({exc})"
            ) from None
        if code != ErrorCode.NO_ERROR:
            message = str(body.get("message") or describe_code(code))
            self.close()
            raise ClientError(
                EXIT_FORWARD_REFUSED,
                f"forward {spec.describe()} refused: {message}",
                "forward_refused",
            )
        bind, port = str(body.get("bind", "")), int(body.get("port", spec.port) or 0)
        self.bound[index] = (bind, port)
        self.metrics.forward_up[self.metrics.forward_key(spec.label, spec.proto)] = 1
        log.info(
            "forward %s: relay %s %s:%d -> %s:%d",
            spec.label,
            spec.proto,
            bind,
            port,
            spec.host,
            spec.host_port,
        )

    async def wait_closed(self) -> ConnectionTerminated:
        assert self._policy is not None
        return await self._policy.ended

    async def run(self, stop: asyncio.Event, on_up: Callable[[], None] | None = None) -> int:
        """Keep the tunnel up until ``stop`` is set, then return 0.

        Raises ``ClientError`` for what retrying cannot fix (usage, authentication,
        host key, refused forward) and when ``max_retries`` is exhausted. ``on_up``
        is called each time every forward is up (again).
        """
        options = self.options
        attempt = 0
        lost_at: float | None = None
        last_error: ClientError | None = None
        while not stop.is_set():
            started = monotonic()
            try:
                await self._until(stop, self.connect())
            except ClientError as exc:
                self.metrics.connect_failures[exc.reason] += 1
                if exc.exit_code in FATAL_EXITS or not options.reconnect:
                    raise
                last_error = exc
                log.warning("%s", exc)
            except _Stopped:
                self.close()
                return EXIT_OK
            else:
                if lost_at is not None:
                    outage = monotonic() - lost_at
                    self.metrics.outages.observe(outage)
                    log.info("tunnel back after an outage of %.1f s", outage)
                lost_at = None
                if on_up is not None:
                    on_up()
                try:
                    event = await self._until(stop, self.wait_closed())
                except _Stopped:
                    await self.shutdown("client shutting down")
                    return EXIT_OK
                self.close()
                lost_at = monotonic()
                who = "the relay" if event.remote else "this end"
                log.warning("tunnel lost (%s: %s)", who, event.reason or describe_code(event.code))
                last_error = ClientError(
                    EXIT_CONNECT, f"the tunnel ended: {event.reason or describe_code(event.code)}"
                )
                if not options.reconnect:
                    raise last_error
                if monotonic() - started >= options.backoff.stable:
                    attempt = 0
            attempt += 1
            if options.max_retries is not None and attempt > options.max_retries:
                raise ClientError(
                    EXIT_CONNECT, f"gave up after {options.max_retries} retries: {last_error}"
                )
            delay = options.backoff.delay(attempt)
            log.info("reconnecting in %.1f s (attempt %d)", delay, attempt)
            # After network-level failures, probe the relay's port meanwhile: when the
            # link comes back we reconnect within a second instead of a backoff step.
            network = last_error is not None and last_error.reason == "network"
            await self._wait_or_probe(stop, delay, probe=network)
        self.close()
        return EXIT_OK

    @staticmethod
    async def _until(stop: asyncio.Event, work: Awaitable[T]) -> T:
        """Await ``work`` unless ``stop`` is set first (then raise _Stopped)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise _Stopped
        return task.result()

    async def shutdown(self, reason: str = "client shutting down", timeout: float = 2.0) -> None:
        """Say goodbye and let it reach the relay before the SSH connection closes.

        The GOAWAY can sit behind queued channel data; closing the connection at
        once discards it, and the relay then keeps our public ports leased as after
        a lost link instead of closing them. The relay answers a GOAWAY by closing
        its end of the channel, which is what we wait for (bounded).
        """
        session = self.session
        if session is not None:
            session.close(ErrorCode.NO_ERROR, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.closed.wait(), timeout)
        self.close(reason)

    def close(self, reason: str = "client shutting down") -> None:
        if self.session is not None:
            self.session.close(ErrorCode.NO_ERROR, reason)
            self.session = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _Stopped(Exception):
    """The stop event fired while we were waiting for something else."""
