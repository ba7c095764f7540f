"""The relay's SSH server: public-key login, our subsystem only, forward requests.

Everything asyncssh would offer by default beyond that is refused: password
and keyboard-interactive login, PTYs, agent and X11 forwarding, direct-tcpip
(``ssh -L``) and tcpip-forward (``ssh -R``). A person who opens a shell gets a
one-line explanation and exit status 1 instead of a hang.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh

from sshrelay.protocol.aio.keys import generate_keypair, load_private_key
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
from sshrelay.protocol.errors import ErrorCode
from sshrelay.protocol.events import (
    ConnectionTerminated,
    FlowOpened,
    PingAcknowledged,
    RequestReceived,
    StreamOpened,
)
from sshrelay.protocol.forwards import FORWARD_REQUEST, ForwardRequest, ForwardSpecError
from sshrelay.relay.auth import AuthorizedKeys, KeyPermissions
from sshrelay.relay.listeners import ForwardBinding, ForwardRefused, Listener, PortRegistry

log = logging.getLogger("sshrelay.relay")

SHELL_MESSAGE = (
    b"This is an sshrelay relay: it only carries tunnels for `relay connect`; "
    b"shell, exec and port forwarding are not available.\r\n"
)


@dataclass(slots=True)
class RelayOptions:
    listen_host: str = "0.0.0.0"
    listen_port: int = 2222
    dead_link: DeadLink = field(default_factory=DeadLink)
    mux: MuxConfig = field(default_factory=MuxConfig)  # ping timings come from dead_link
    lease_grace: float = 60.0  # seconds a public port stays reserved after its session ends
    max_held_connections: int = 64  # public TCP connections held per lease during grace
    key_check_interval: float = 5.0  # re-read authorized_keys; close sessions of removed keys

    def __post_init__(self) -> None:
        if self.mux.ping_timeout is None:
            self.dead_link.apply(self.mux)

    login_timeout: float = 30.0


class RelayServer:
    """Owns the SSH listener, live sessions and the public port registry."""

    def __init__(self, options: RelayOptions, host_key: asyncssh.SSHKey, keys: AuthorizedKeys):
        self.options = options
        self.host_key = host_key
        self.keys = keys
        self.metrics = MetricsBook("relay")
        self.registry = PortRegistry(
            self.metrics, options.lease_grace, options.max_held_connections
        )
        self.sessions: set[RelayChannelSession] = set()
        self.metrics.auth_failures.update(unknown_key=0)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._key_watch: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._acceptor = await asyncssh.create_server(
            lambda: _SshServer(self),
            self.options.listen_host,
            self.options.listen_port,
            server_host_keys=[self.host_key],
            encoding=None,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
            allow_pty=False,
            line_editor=False,  # asyncssh's default would filter every byte of our channel
            agent_forwarding=False,
            x11_forwarding=False,
            **self.options.dead_link.ssh_options(),
            login_timeout=self.options.login_timeout,
            reuse_address=True,
            **connection_options(),
        )
        self._key_watch = asyncio.ensure_future(self._watch_keys())

    async def _watch_keys(self) -> None:
        """Permissions hold for live sessions too, not only at login: a key removed from
        authorized_keys loses its session and its ports within one interval."""
        while True:
            await asyncio.sleep(self.options.key_check_interval)
            self.keys.maybe_reload()
            self.revoke_removed_keys()

    def revoke_removed_keys(self) -> None:
        for session in list(self.sessions):
            if session.key is None or session.revoked:
                continue
            if self.keys.lookup(session.key, session.peer_host, session.peer_host) is None:
                log.warning(
                    "%s: key removed from authorized_keys; closing its session and ports",
                    session.who,
                )
                session.revoked = True
                session.close(ErrorCode.NOT_PERMITTED, "this key was removed from the relay")

    @property
    def port(self) -> int:
        assert self._acceptor is not None
        return int(self._acceptor.sockets[0].getsockname()[1])

    async def close(self, reason: str = "relay shutting down") -> None:
        """Stop accepting, tell every client (GOAWAY), close all public listeners."""
        if self._key_watch is not None:
            self._key_watch.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
        for session in list(self.sessions):
            session.close(ErrorCode.SHUTDOWN, reason)
        self.registry.close_all()
        if self.sessions:
            await asyncio.wait(
                [asyncio.ensure_future(s.closed.wait()) for s in self.sessions], timeout=2.0
            )
        if self._acceptor is not None:
            await self._acceptor.wait_closed()


class _SshServer(asyncssh.SSHServer):
    """Per-connection asyncssh hooks: authentication and channel policy."""

    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay
        self.conn: asyncssh.SSHServerConnection | None = None
        self.permissions: KeyPermissions | None = None
        self.key: asyncssh.SSHKey | None = None
        self.peer_host = ""
        self.peer = "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.permissions is None:
            log.debug("connection from %s closed before login", self.peer)

    def begin_auth(self, username: str) -> bool:
        self.relay.keys.maybe_reload()
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        peer = self.conn.get_extra_info("peername") if self.conn else None
        host = peer[0] if peer else ""
        permissions = self.relay.keys.lookup(key, host, host)
        if permissions is None:
            self.relay.metrics.auth_failures["unknown_key"] += 1
            log.warning(
                "login refused from %s: key %s is not authorized",
                self.peer,
                key.get_fingerprint("sha256"),
            )
            return False
        self.permissions = permissions
        self.key = key
        self.peer_host = host
        return True

    def session_requested(self) -> RelayChannelSession:
        assert self.permissions is not None and self.key is not None
        session = RelayChannelSession(self.relay, self.permissions, self.peer)
        session.key, session.peer_host = self.key, self.peer_host
        return session

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        log.warning(
            "refused direct-tcpip (ssh -L) from %s to %s:%d", self.peer, dest_host, dest_port
        )
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        log.warning("refused tcpip-forward (ssh -R) from %s for port %d", self.peer, listen_port)
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


class RelayChannelSession(MuxChannelSession, asyncssh.SSHServerSession[bytes]):
    """One SSH session channel: our subsystem, or a polite refusal."""

    def __init__(self, relay: RelayServer, permissions: KeyPermissions, peer: str) -> None:
        self.relay = relay
        self.permissions = permissions
        self.peer = peer
        self.key: asyncssh.SSHKey | None = None  # the key this session logged in with
        self.peer_host = ""
        self.revoked = False  # its key left authorized_keys: its ports go at once
        self.listeners: list[Listener] = []
        self._mode = "none"
        self._pending: set[asyncio.Task[None]] = set()
        super().__init__(Role.RELAY, relay.options.mux, _RelayPolicy(self))

    @property
    def who(self) -> str:
        comment = f" ({self.permissions.comment})" if self.permissions.comment else ""
        return f"client {self.peer} key {self.permissions.fingerprint}{comment}"

    # asyncssh server-session hooks --------------------------------------------------

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        self._mode = "explain"
        return True

    def exec_requested(self, command: str) -> bool:
        self._mode = "explain"
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != SUBSYSTEM:
            log.warning("%s asked for unknown subsystem %r", self.who, subsystem)
            return False
        self._mode = "mux"
        return True

    def session_started(self) -> None:
        if self._mode == "mux":
            self.relay.sessions.add(self)
            super().session_started()
            return
        chan = cast(asyncssh.SSHServerChannel[bytes], self._chan)
        log.info("%s opened a shell or exec; explained and closed", self.who)
        chan.write_stderr(SHELL_MESSAGE)
        chan.exit(1)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._mode == "mux":
            super().data_received(data, datatype)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.relay.sessions.discard(self)
        for task in self._pending:
            task.cancel()

    def start_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


class _RelayPolicy:
    """What the relay decides for one session."""

    def __init__(self, session: RelayChannelSession) -> None:
        self.session = session

    def session_ready(self, session: MuxChannelSession) -> None:
        self.session.relay.metrics.session_started(session)
        log.info("%s connected", self.session.who)

    def session_ended(self, session: MuxChannelSession, event: ConnectionTerminated) -> None:
        relay_session = self.session
        relay_session.relay.metrics.session_finished(session)
        for key in relay_session.forward_names.values():
            relay_session.relay.metrics.forward_up[key] = 0
        registry = relay_session.relay.registry
        # A client that said goodbye (GOAWAY without an error) is not coming back, nor is
        # a revoked key: their ports close now. A lost link (or any other ending) keeps
        # them leased for the grace period so that a reconnecting client gets them back.
        goodbye = event.remote and event.code in (ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN)
        goodbye = goodbye or relay_session.revoked
        for listener in relay_session.listeners:
            bound = listener.binding is not None and listener.binding.session is session
            if goodbye and bound:
                registry.release(listener)
                log.info(
                    "%s: forward %s closed (client shut down)", relay_session.who, listener.name
                )
            else:
                registry.detach(listener)
        relay_session.listeners.clear()
        if relay_session._mode == "mux":
            who = "client" if event.remote else "relay"
            log.info(
                "%s disconnected (%s: %s)", relay_session.who, who, event.reason or "no reason"
            )

    def request_received(self, session: MuxChannelSession, event: RequestReceived) -> None:
        if event.kind != FORWARD_REQUEST:
            session.respond(
                event.request_id,
                ErrorCode.BAD_REQUEST,
                {"message": f"unknown request {event.kind!r}"},
            )
            return
        self.session.start_task(self._forward(event))

    def _current_permissions(self) -> KeyPermissions:
        """Permissions as authorized_keys says *now*: checked on every request, not
        only at login, so removing a key or a permitlisten takes effect at once."""
        relay_session = self.session
        keys = relay_session.relay.keys
        keys.maybe_reload()
        if relay_session.key is not None:
            current = keys.lookup(
                relay_session.key, relay_session.peer_host, relay_session.peer_host
            )
            relay_session.permissions = current or KeyPermissions(
                relay_session.permissions.fingerprint,
                relay_session.permissions.comment,
                forwarding=False,
                revoked=True,
            )
        return relay_session.permissions

    async def _forward(self, event: RequestReceived) -> None:
        relay_session = self.session
        relay = relay_session.relay
        try:
            request = ForwardRequest.from_body(event.body)
        except ForwardSpecError as exc:
            relay_session.respond(event.request_id, ErrorCode.BAD_REQUEST, {"message": str(exc)})
            return
        problem = self._current_permissions().check(request)
        try:
            if problem is not None:
                raise ForwardRefused(ErrorCode.NOT_PERMITTED, problem)
            listener = await relay.registry.claim(
                request,
                relay_session.permissions.fingerprint,
                ForwardBinding(relay_session, request.forward),
            )
        except ForwardRefused as exc:
            reason = ErrorCode(exc.code).name.lower()
            refused = relay.metrics.forwards_refused
            refused[reason] = refused.get(reason, 0) + 1
            log.warning(
                "%s: forward %s refused: %s", relay_session.who, request.name or request.port, exc
            )
            relay_session.respond(event.request_id, exc.code, {"message": str(exc)})
            return
        if relay_session.termination is not None:  # session ended while binding
            relay.registry.detach(listener)
            return
        relay_session.listeners.append(listener)
        key = relay.metrics.forward_key(listener.name, listener.proto)
        relay_session.forward_names[request.forward] = key
        relay.metrics.forward_up[key] = 1
        log.info(
            "%s: forward %s listening on %s %s:%d",
            relay_session.who,
            listener.name,
            listener.proto,
            listener.bind_host,
            listener.port,
        )
        relay_session.respond(
            event.request_id,
            ErrorCode.NO_ERROR,
            {"bind": listener.bind_host, "port": listener.port},
        )

    def stream_opened(self, session: MuxChannelSession, event: StreamOpened) -> None:
        session.mux.reset_stream(event.stream_id, ErrorCode.NOT_PERMITTED)
        session.kick()

    def flow_opened(self, session: MuxChannelSession, event: FlowOpened) -> None:
        session.mux.close_flow(event.flow_id, ErrorCode.NOT_PERMITTED)
        session.kick()

    def ping_acknowledged(self, session: MuxChannelSession, event: PingAcknowledged) -> None:
        pass


def load_host_key(path: Path) -> tuple[asyncssh.SSHKey, bool]:
    """Load the host key, generating it (0600) on first start. Returns (key, created)."""
    if path.exists():
        return load_private_key(path), False
    return generate_keypair(path, comment="sshrelay-host"), True
