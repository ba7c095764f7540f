"""`relay connect`: one SSH connection, one channel, then the forwards.

``Client.run_once`` dials the relay, verifies its host key, opens our
subsystem, requests every forward and then serves streams and flows until the
session ends. A refused forward fails the whole run: never a silently partial
tunnel.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from sshrelay.client.dialers import LocalTarget, dial_stream, open_local_flow
from sshrelay.client.hostkeys import HostKeyVerifier
from sshrelay.protocol.aio.metrics import MetricsBook
from sshrelay.protocol.aio.session import MuxChannelSession
from sshrelay.protocol.aio.sshtuning import (
    CHANNEL_MAX_PKTSIZE,
    CHANNEL_WINDOW,
    SUBSYSTEM,
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

# Exit codes of `relay connect` (docs/operations.md).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FORWARD_REFUSED = 3
EXIT_AUTH = 4  # authentication or host key failure: never retried
EXIT_CONNECT = 5  # could not connect / gave up


class ClientError(Exception):
    """A failure with an exit code and a one-line message for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code


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
    keepalive_interval: float = 10.0
    keepalive_count_max: int = 3
    mux: MuxConfig = field(default_factory=lambda: MuxConfig(ping_interval=5.0))


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
    def __init__(self, targets: dict[int, LocalTarget], metrics: MetricsBook) -> None:
        self.targets = targets
        self.metrics = metrics
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
        open_local_flow(session, event, target)

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
        try:
            self.conn = await asyncio.wait_for(
                asyncssh.connect(
                    options.host,
                    options.port,
                    username=options.username,
                    client_keys=keys,
                    known_hosts=([], [], []),  # every key goes through HostKeyVerifier
                    client_factory=lambda: _SshClient(verifier),
                    agent_path=None,
                    password=None,
                    kbdint_auth=False,
                    config=None,
                    keepalive_interval=options.keepalive_interval,
                    keepalive_count_max=options.keepalive_count_max,
                    **connection_options(),
                ),
                options.connect_timeout,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            message = str(verifier.failure) if verifier.failure else f"host key of {where}: {exc}"
            raise ClientError(EXIT_AUTH, message) from None
        except asyncssh.PermissionDenied:
            raise ClientError(
                EXIT_AUTH,
                f"the relay at {where} refused our key"
                + (f" {options.identity}" if options.identity else "")
                + "; add its .pub line to the relay's authorized_keys",
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            if verifier.failure is not None:
                raise ClientError(EXIT_AUTH, str(verifier.failure)) from None
            detail = str(exc) or type(exc).__name__
            raise ClientError(
                EXIT_CONNECT, f"cannot connect to the relay at {where}: {detail}"
            ) from None
        if verifier.added:
            log.warning("stored the relay's host key for %s in %s", where, options.known_hosts)

        policy = _ClientPolicy(targets, self.metrics)
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
                EXIT_CONNECT, f"tunnel handshake with {where} failed: {exc}"
            ) from None
        self._policy = policy
        for index, target in targets.items():
            await self._request_forward(session, index, target.spec)
        return session

    async def _request_forward(
        self, session: ClientChannelSession, index: int, spec: ForwardSpec
    ) -> None:
        request = ForwardRequest.from_spec(index, spec)
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
            raise ClientError(EXIT_FORWARD_REFUSED, f"forward {spec.describe()} refused: {message}")
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
        return await self._policy.ended

    def close(self, reason: str = "client shutting down") -> None:
        if self.session is not None:
            self.session.close(ErrorCode.NO_ERROR, reason)
        if self.conn is not None:
            self.conn.close()
