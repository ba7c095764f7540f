"""Shared fixtures for the end-to-end tests: the real `relay` command as subprocesses.

Everything talks to 127.0.0.1 only. Each test gets its own temporary directory
(removed at teardown) and every process it starts is killed at teardown. Local
targets (TCP echo, sink+source, half-close, UDP echo) run on an asyncio loop in
a background thread of the test process and record what they saw, so tests can
assert on both ends of the tunnel.

Fixtures:
    require_tool(name)  -> path of an external tool; skip when missing, FAIL when CI=true
    keyring             -> session-wide key pairs made with `relay keygen`
    bed                 -> a ``Testbed``: start `relay serve` / `relay connect` / any command
    targets             -> a ``Targets``: start local TCP and UDP targets
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

LOOPBACK = "127.0.0.1"
T = TypeVar("T")

# ---------------------------------------------------------------------------- tools


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _missing(message: str) -> None:
    """Skip, or fail under CI=true: in CI a missing component is a broken setup."""
    if _ci():
        pytest.fail(f"{message} (CI=true: a missing component is a failure, not a skip)")
    pytest.skip(message)


DEBIAN_PACKAGE = {
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "socat": "socat",
    "iperf3": "iperf3",
    "nft": "nftables",
    "ip": "iproute2",
}


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """``require_tool(name)`` -> the tool's path.

    ``name`` is a command looked up on PATH or an absolute path. When it is
    missing the test is skipped with the reason, except when the environment
    has CI=true: then the test fails.
    """

    def require(name: str) -> str:
        if os.path.isabs(name):
            found = name if os.access(name, os.X_OK) else None
        else:
            found = shutil.which(name)
        if found is None:
            package = DEBIAN_PACKAGE.get(os.path.basename(name), os.path.basename(name))
            _missing(f"{name} is not installed (Debian package {package}; tools/test installs it)")
        assert found is not None
        return found

    return require


def relay_command() -> list[str]:
    """The installed `relay` console script of the interpreter running the tests."""
    beside = Path(sys.executable).parent / "relay"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("relay")
    if found is None:
        pytest.fail("the `relay` command is not installed (pip install -e '.[test]')")
    return [found]


# ---------------------------------------------------------------------------- polling


def wait_until(predicate: Callable[[], T], timeout: float, what: str, step: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago (only for tools that cannot take port 0)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tcp_refused(port: int, timeout: float = 1.0) -> bool:
    """True when nothing accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- processes


class Proc:
    """A subprocess whose stdout and stderr are collected line by line by threads."""

    def __init__(
        self,
        argv: Sequence[str],
        name: str,
        env: dict[str, str],
        cwd: Path,
        stdin: int = subprocess.DEVNULL,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            start_new_session=True,  # a ^C in the terminal does not reach it
        )
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout_lines)),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr_lines)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.stderr_lines)

    def describe(self) -> str:
        return (
            f"{self.name} (pid {self.pid}, exit {self.popen.poll()}): {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def wait_line(
        self, pattern: str, timeout: float = 15.0, stream: str = "stdout"
    ) -> re.Match[str]:
        """The first line of ``stream`` matching ``pattern``; fail if it exits or times out."""
        regex = re.compile(pattern)
        lines = self.stdout_lines if stream == "stdout" else self.stderr_lines
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(lines)
                if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise AssertionError(
                        f"{self.name} exited before printing {pattern!r}:\n{self.describe()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name} did not print {pattern!r} within {timeout:g} s:\n"
                        f"{self.describe()}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float = 15.0) -> int:
        """Exit status; fail (the process is killed at teardown) if it does not exit in time."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:g} s:\n{self.describe()}"
            ) from None
        for reader in self._readers:
            reader.join(5.0)
        return code

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """Stop it for good: SIGTERM, then SIGKILL; close the pipes."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(3.0)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5.0)
        for reader in self._readers:
            reader.join(2.0)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@dataclass
class Completed:
    """A finished command: exit status and its output."""

    argv: list[str]
    code: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"exit {self.code}: {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


# ---------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Keyring:
    """Key pairs made once per session by `relay keygen` (read-only for tests)."""

    client: Path  # authorized in the default authorized_keys
    stranger: Path  # a client key the relay does not know
    host: Path  # the relay's host key
    other_host: Path  # a different host key ("changed host key")

    @staticmethod
    def public_line(key: Path) -> str:
        return Path(f"{key}.pub").read_text().strip()

    @staticmethod
    def fingerprint(key: Path) -> str:
        import asyncssh

        return str(asyncssh.read_public_key(f"{key}.pub").get_fingerprint("sha256"))


@pytest.fixture(scope="session")
def keyring() -> Iterator[Keyring]:
    root = Path(tempfile.mkdtemp(prefix="sshrelay-keys-"))
    try:
        names = ("client", "stranger", "host", "other_host")
        for name in names:
            result = subprocess.run(
                [*relay_command(), "keygen", str(root / name), "-C", f"test-{name}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, result.stderr
        yield Keyring(*(root / name for name in names))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- testbed


@dataclass
class Relay:
    proc: Proc
    port: int
    fingerprint: str

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@dataclass
class Tunnel:
    """A running `relay connect` whose forwards are all up."""

    proc: Proc
    ports: list[int]  # public port of each forward on the relay, in -R order
    binds: list[str] = field(default_factory=list)


class Testbed:
    """One test's directory, processes and files; everything is removed at teardown."""

    __test__ = False

    def __init__(self, root: Path, keys: Keyring) -> None:
        self.root = root
        self.keys = keys
        self.procs: list[Proc] = []
        self.authorized_keys = root / "authorized_keys"
        self.authorized_keys.write_text(keys.public_line(keys.client) + "\n")
        self.known_hosts = root / "known_hosts"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
        self.env.update(
            HOME=str(root / "home"),
            XDG_CONFIG_HOME=str(root / "home" / ".config"),
            PYTHONUNBUFFERED="1",
        )
        (root / "home").mkdir()
        # Metrics on a free port: the defaults are fixed ports another run may hold.
        self.metrics_args = ["--metrics", f"{LOOPBACK}:0"]

    # -- generic commands

    def start(
        self, argv: Sequence[str], name: str | None = None, stdin: int = subprocess.DEVNULL
    ) -> Proc:
        """Start a command (stdout/stderr collected); it is killed at teardown."""
        proc = Proc(argv, name or Path(argv[0]).name, self.env, self.root, stdin)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], timeout: float = 30.0, stdin: int = subprocess.DEVNULL
    ) -> Completed:
        """Run a command to completion (fails, and is killed, if it outlives ``timeout``)."""
        proc = self.start(argv, stdin=stdin)
        code = proc.wait(timeout)
        return Completed(list(argv), code, proc.stdout, proc.stderr)

    @staticmethod
    def relay_argv() -> list[str]:
        """argv[0:] of the `relay` command under test."""
        return relay_command()

    def relay(self, *args: str, timeout: float = 30.0) -> Completed:
        return self.run([*relay_command(), *args], timeout)

    @staticmethod
    def forward(target_port: int, proto: str = "tcp", public_port: int = 0) -> str:
        """An -R spec whose public side is bound to loopback only."""
        return f"{LOOPBACK}:{public_port}:{LOOPBACK}:{target_port}/{proto}"

    wait_until = staticmethod(wait_until)
    free_port = staticmethod(free_port)
    tcp_refused = staticmethod(tcp_refused)

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    # -- relay serve

    def serve_args(self, *extra: str, host_key: Path | None = None) -> list[str]:
        return [
            *relay_command(),
            "serve",
            "--listen",
            f"{LOOPBACK}:0",
            "--host-key",
            str(host_key or self.keys.host),
            "--authorized-keys",
            str(self.authorized_keys),
            *self.metrics_args,
            *extra,
        ]

    def serve(self, *extra: str, host_key: Path | None = None) -> Relay:
        """Start `relay serve` on 127.0.0.1:0 and wait until it listens."""
        proc = self.start(self.serve_args(*extra, host_key=host_key), "relay serve")
        fingerprint = proc.wait_line(r"^relay: host key (SHA256:\S+)").group(1)
        port = int(proc.wait_line(rf"^relay: listening on {re.escape(LOOPBACK)}:(\d+)").group(1))
        return Relay(proc, port, fingerprint)

    # -- relay connect

    def connect_args(
        self,
        relay: Relay | int,
        *forwards: str,
        extra: Sequence[str] = (),
        key: Path | None = None,
        accept_new: bool = True,
    ) -> list[str]:
        port = relay.port if isinstance(relay, Relay) else relay
        argv = [
            *relay_command(),
            "connect",
            f"{LOOPBACK}:{port}",
            "-i",
            str(key or self.keys.client),
            "--known-hosts",
            str(self.known_hosts),
            *self.metrics_args,
        ]
        if accept_new:
            argv.append("--accept-new")
        for spec in forwards:
            argv += ["-R", spec]
        return [*argv, *extra]

    def start_connect(
        self,
        relay: Relay | int,
        *forwards: str,
        extra: Sequence[str] = (),
        key: Path | None = None,
        accept_new: bool = True,
    ) -> Proc:
        argv = self.connect_args(relay, *forwards, extra=extra, key=key, accept_new=accept_new)
        return self.start(argv, "relay connect")

    def connect(
        self,
        relay: Relay | int,
        *forwards: str,
        extra: Sequence[str] = (),
        key: Path | None = None,
        accept_new: bool = True,
        count: int | None = None,
    ) -> Tunnel:
        """Start `relay connect` and wait for every forward's "up" line."""
        proc = self.start_connect(relay, *forwards, extra=extra, key=key, accept_new=accept_new)
        expected = len(forwards) if count is None else count
        ports: list[int] = []
        binds: list[str] = []
        for index in range(expected):
            match = wait_line_n(proc, r"^relay: forward \S+ up: relay \w+ (\S+):(\d+) -> ", index)
            binds.append(match.group(1))
            ports.append(int(match.group(2)))
        return Tunnel(proc, ports, binds)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


def wait_line_n(proc: Proc, pattern: str, index: int, timeout: float = 20.0) -> re.Match[str]:
    """The ``index``-th (0-based) stdout line of ``proc`` matching ``pattern``."""
    regex = re.compile(pattern)

    def nth() -> re.Match[str] | None:
        matches = [m for m in map(regex.search, list(proc.stdout_lines)) if m]
        if len(matches) > index:
            return matches[index]
        if not proc.running():
            raise AssertionError(f"{proc.name} exited early:\n{proc.describe()}")
        return None

    try:
        return wait_until(nth, timeout, f"line {index + 1} matching {pattern!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.describe()}") from None


@pytest.fixture
def bed(keyring: Keyring) -> Iterator[Testbed]:
    root = Path(tempfile.mkdtemp(prefix="sshrelay-e2e-"))
    testbed = Testbed(root, keyring)
    try:
        yield testbed
    finally:
        testbed.close()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- local targets


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for targets the test process serves."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(shutdown(), 10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "TcpTarget"], Any]


class TcpTarget:
    """A local TCP service behind the tunnel; records what each connection saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.peers: list[tuple[str, int]] = []
        self.results: list[dict[str, Any]] = []  # one dict per finished connection
        self.errors: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.peers.append(writer.get_extra_info("peername"))
        self._writers.add(writer)
        try:
            result = await self.handler(reader, writer, self)
            if result is not None:
                self.results.append(result)
        except (ConnectionError, OSError) as exc:
            self.errors.append(repr(exc))
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()


async def echo_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: TcpTarget
) -> dict[str, Any]:
    """Echo until EOF, then half-close."""
    total = 0
    while data := await reader.read(256 * 1024):
        total += len(data)
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    return {"echoed": total}


def sink_source_handler(size: int) -> Handler:
    """Receive until EOF (hashing) while sending ``size`` fresh random bytes (hashing)."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: TcpTarget
    ) -> dict[str, Any]:
        async def sink() -> tuple[int, str]:
            digest = hashlib.sha256()
            total = 0
            while data := await reader.read(1 << 20):
                digest.update(data)
                total += len(data)
            return total, digest.hexdigest()

        async def source() -> str:
            digest = hashlib.sha256()
            sent = 0
            while sent < size:
                chunk = os.urandom(min(1 << 20, size - sent))
                digest.update(chunk)
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            writer.write_eof()
            return digest.hexdigest()

        (received, received_sha), sent_sha = await asyncio.gather(sink(), source())
        return {"received": received, "received_sha": received_sha, "sent_sha": sent_sha}

    return handle


def respond_after_eof_handler(response_size: int) -> Handler:
    """Half-close peer: read everything until EOF, then answer (the stream must still send)."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: TcpTarget
    ) -> dict[str, Any]:
        request = await reader.read(-1)  # until EOF
        eof_at = time.monotonic()
        response = hashlib.sha256(request).digest() + os.urandom(response_size)
        writer.write(response)
        await writer.drain()
        writer.write_eof()
        await writer.drain()
        return {"request": len(request), "eof_at": eof_at, "response_sha": _sha(response)}

    return handle


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class UdpTarget(asyncio.DatagramProtocol):
    """A local UDP service: records (source address, size) and replies to each datagram.

    The reply has the datagram's length; its bytes are the datagram reversed
    (so a reply is never mistaken for the request), or ``reply(data)``.
    """

    def __init__(self, reply: Callable[[bytes], bytes] | None = None) -> None:
        self.reply = reply or (lambda data: data[::-1])
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.received: list[tuple[tuple[str, int], bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((addr, data))
        assert self.transport is not None
        self.transport.sendto(self.reply(data), addr)

    def sources(self) -> set[tuple[str, int]]:
        return {addr for addr, _ in list(self.received)}


class Targets:
    """Starts local targets on a background loop; stops them at teardown."""

    def __init__(self) -> None:
        self.background = BackgroundLoop()
        self._tcp: list[TcpTarget] = []
        self._udp: list[UdpTarget] = []
        self._held: list[socket.socket] = []

    def tcp(self, handler: Handler = echo_handler) -> TcpTarget:
        """A TCP target running ``handler(reader, writer, target)`` per connection."""
        target = TcpTarget(handler)
        self.background.call(target.start())
        self._tcp.append(target)
        return target

    def tcp_echo(self) -> TcpTarget:
        """Echoes until EOF, then half-closes."""
        return self.tcp(echo_handler)

    def tcp_sink_source(self, size: int) -> TcpTarget:
        """Hashes what it receives while sending ``size`` random bytes (results per connection:
        received, received_sha, sent_sha)."""
        return self.tcp(sink_source_handler(size))

    def tcp_respond_after_eof(self, size: int) -> TcpTarget:
        """Reads until EOF, then sends sha256(request) + ``size`` random bytes (results:
        request, eof_at, response_sha)."""
        return self.tcp(respond_after_eof_handler(size))

    def udp(self, reply: Callable[[bytes], bytes] | None = None) -> UdpTarget:
        target = UdpTarget(reply)

        async def start() -> None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: target, local_addr=(LOOPBACK, 0)
            )
            sock = transport.get_extra_info("socket")
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
            target.port = sock.getsockname()[1]

        self.background.call(start())
        self._udp.append(target)
        return target

    def closed_tcp_port(self) -> int:
        """A port bound (so nobody else takes it) but not listening: connects are refused."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            for target in self._tcp:
                await target.stop()
            for udp in self._udp:
                if udp.transport is not None:
                    udp.transport.close()

        with contextlib.suppress(Exception):
            self.background.call(stop())
        self.background.close()
        for sock in self._held:
            sock.close()


@pytest.fixture
def targets() -> Iterator[Targets]:
    made = Targets()
    try:
        yield made
    finally:
        made.close()
