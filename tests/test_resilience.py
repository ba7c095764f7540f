"""Fault injection, end to end: the real `relay serve` and `relay connect` processes.

Each test makes its own network namespace (``ip netns``) joined to the root
namespace by a veth pair with addresses from 198.18.0.0/15 (the benchmarking
range): the relay runs inside the namespace (``ip netns exec``), the client,
its local targets (127.0.0.1) and the public test peers run outside and talk to
the relay's address over the veth. Faults are nftables rules inside the
namespace on the SSH port only, so public traffic keeps flowing while the
tunnel is cut:

    black hole   drop the SSH port both ways (nothing answers, nothing resets)
    reset        reject the client's current SSH connection with TCP resets
                 (new connections pass: a middlebox forgot the connection)

Every namespace, veth, nft table and process is removed at teardown, also when
a test fails; if the test process itself is killed, the next run removes what
it left (namespaces named after a dead pid, and the processes it recorded).
Times come from the processes' own log timestamps (wall clock, millisecond
resolution) against ``time.time()`` taken by the test just before it changes
the rules; each test prints what it measured (``pytest -s``).
Needs root, ``ip`` (iproute2) and ``nft`` (nftables).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = "127.0.0.1"
SSH_PORT = 2222  # inside the namespace: nothing else can hold it
METRICS_PORT = 9817
DEAD_LINK = 12.0  # the default dead-link timeout (relay and client)
SLACK = 0.25  # log timestamps (ms, truncated), timer and nft latency in a measured bound
FIRST_BACKOFF = 1.0  # the client's first retry comes within this (Backoff.first)
UP_LINE = re.compile(r"^relay: forward (\S+) up: relay (\w+) (\S+):(\d+) -> ")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

pytestmark = pytest.mark.timeout(120)

_serial = itertools.count()


# ------------------------------------------------------------------------- namespace


def _sh(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=20, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


NS_PREFIX = "sshrelay-rt-"
NS_NAME = re.compile(rf"^{NS_PREFIX}(\d+)-(\d+)$")


def _pid_file(name: str) -> Path:
    """Where a namespace's test run records the pids of the processes it started."""
    return Path(tempfile.gettempdir()) / f"{name}.pids"


def _kill_recorded(name: str, relay_addr: str) -> None:
    """SIGKILL the processes a dead run recorded for namespace ``name`` (only those whose
    command line still names its relay address: a pid may have been reused)."""
    path = _pid_file(name)
    try:
        pids = path.read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if relay_addr.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    path.unlink(missing_ok=True)


def _remove_stale_namespaces(ip: str) -> None:
    """What an earlier run of these tests left when its process was killed (SIGKILL):
    its namespace, veth, and the processes it started (recorded in a pid file)."""
    for line in _sh(ip, "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        match = NS_NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            addrs = _sh(ip, "-n", name, "-4", "-o", "addr", "show", check=False)
            for addr in re.findall(r"inet (198\.1[89]\.\d+\.\d+)/30", addrs):
                _kill_recorded(name, addr)
            for pid in _sh(ip, "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            host_veth = f"sr{match.group(1)}h{match.group(2)}"
            _sh(ip, "link", "del", host_veth, check=False)
            _sh(ip, "netns", "del", name, check=False)


def _free_subnet(ip: str, seed: int) -> int:
    """A /30 inside 198.18.0.0/15 that no root-namespace address uses; its base as int."""
    used = _sh(ip, "-4", "-o", "addr", "show").split()
    base = (198 << 24) | (18 << 16)
    for step in range(64):
        index = (seed + step * 7919) % (1 << 15)  # 32768 /30 subnets in a /15
        net = base + index * 4
        if net & 0xFF in (0, 252) and (net >> 8) & 0xFF in (0, 255):
            continue  # skip the first and last block of each /16 (no .0.x/.255.x surprises)
        prefix = ".".join(str((net >> shift) & 0xFF) for shift in (24, 16, 8))
        hosts = {f"{prefix}.{(net & 0xFF) + k}/30" for k in (1, 2)}
        if not hosts & set(used):
            return net
    raise AssertionError("no free /30 in 198.18.0.0/15")


def _dotted(value: int) -> str:
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


@dataclass
class Netns:
    """A namespace for the relay, a veth to it, and one nft table for the faults."""

    ip: str
    nft_path: str
    name: str
    host_veth: str
    ns_veth: str
    host_addr: str  # root side of the veth: the client's source address
    relay_addr: str  # inside: where the relay listens
    table: str = "sshrelay_faults"
    procs: list[Any] = field(default_factory=list)

    def exec(self, *argv: str) -> list[str]:
        return [self.ip, "netns", "exec", self.name, *argv]

    def nft(self, script: str) -> None:
        _sh(*self.exec(self.nft_path, "-f", "-"), stdin=script)

    def setup(self) -> None:
        _sh(self.ip, "netns", "add", self.name)
        _sh(self.ip, "link", "add", self.host_veth, "type", "veth", "peer", "name", self.ns_veth)
        _sh(self.ip, "link", "set", self.ns_veth, "netns", self.name)
        _sh(self.ip, "addr", "add", f"{self.host_addr}/30", "dev", self.host_veth)
        _sh(self.ip, "link", "set", self.host_veth, "up")
        _sh(*self.exec(self.ip, "addr", "add", f"{self.relay_addr}/30", "dev", self.ns_veth))
        _sh(*self.exec(self.ip, "link", "set", self.ns_veth, "up"))
        _sh(*self.exec(self.ip, "link", "set", "lo", "up"))
        self.nft(
            f"table inet {self.table} {{\n"
            "  chain input { type filter hook input priority 0; policy accept; }\n"
            "  chain output { type filter hook output priority 0; policy accept; }\n"
            "}\n"
        )

    def track(self, proc: Any) -> Any:
        """Kill ``proc`` at teardown; record its pid in case this run dies without one."""
        self.procs.append(proc)
        with _pid_file(self.name).open("a") as pids:
            pids.write(f"{proc.pid}\n")
        return proc

    def teardown(self) -> None:
        """Processes first (killed by their pid), then the table, the veth, the namespace."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill()
        _pid_file(self.name).unlink(missing_ok=True)
        for pid in _sh(self.ip, "netns", "pids", self.name, check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _sh(*self.exec(self.nft_path, "delete", "table", "inet", self.table), check=False)
        _sh(self.ip, "link", "del", self.host_veth, check=False)
        _sh(self.ip, "netns", "del", self.name, check=False)

    # -- faults on the SSH port

    def blackhole(self) -> float:
        """Drop the SSH port both ways; returns time.time() taken just before."""
        at = time.time()
        self.nft(
            f"add rule inet {self.table} input tcp dport {SSH_PORT} drop\n"
            f"add rule inet {self.table} output tcp sport {SSH_PORT} drop\n"
        )
        return at

    def reset(self, client_port: int) -> float:
        """Answer every segment of the client's current SSH connection with a TCP reset
        (its own resets pass, so the relay is reset too when the client's kernel answers
        the relay's next segment). New connections pass. Returns time.time() before."""
        match = f"ip saddr {self.host_addr} tcp sport {client_port} tcp dport {SSH_PORT}"
        at = time.time()
        self.nft(
            f"add rule inet {self.table} input {match} tcp flags & rst == rst accept\n"
            f"add rule inet {self.table} input {match} reject with tcp reset\n"
        )
        return at

    def restore(self) -> float:
        at = time.time()
        self.nft(f"flush chain inet {self.table} input\nflush chain inet {self.table} output\n")
        return at


@pytest.fixture
def netns(require_tool: Any, bed: Any) -> Iterator[Netns]:
    ip = require_tool("ip")
    nft = require_tool("nft")
    if os.geteuid() != 0:
        message = "network namespaces need root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: a missing component is a failure, not a skip)")
        pytest.skip(message)
    _remove_stale_namespaces(ip)
    pid, serial = os.getpid(), next(_serial)
    net = _free_subnet(ip, pid * 8 + serial)
    space = Netns(
        ip=ip,
        nft_path=nft,
        name=f"{NS_PREFIX}{pid}-{serial}",
        host_veth=f"sr{pid}h{serial}",
        ns_veth=f"sr{pid}r{serial}",
        host_addr=_dotted(net + 1),
        relay_addr=_dotted(net + 2),
    )
    try:
        space.setup()
        yield space
    finally:
        space.teardown()


# --------------------------------------------------------------------- processes, logs


def log_events(proc: Any, pattern: str, after: float = 0.0) -> list[tuple[float, str]]:
    """(timestamp, line) of each stderr log line matching ``pattern`` at or after ``after``."""
    regex = re.compile(pattern)
    found = []
    for line in list(proc.stderr_lines):
        stamp = LOG_LINE.match(line)
        if stamp and regex.search(line):
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if when >= after - 0.001:  # the log truncates to the millisecond
                found.append((when, line))
    return found


def wait_log(bed: Any, proc: Any, pattern: str, after: float, timeout: float) -> tuple[float, str]:
    def first() -> tuple[float, str] | None:
        events = log_events(proc, pattern, after)
        return events[0] if events else None

    try:
        return bed.wait_until(first, timeout, f"{proc.name} to log {pattern!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.describe()}") from None


def up_lines(proc: Any) -> list[tuple[str, str, str, int]]:
    """(name, proto, bind, port) of every "forward ... up" line so far."""
    found = []
    for line in list(proc.stdout_lines):
        match = UP_LINE.search(line)
        if match:
            found.append((match.group(1), match.group(2), match.group(3), int(match.group(4))))
    return found


def wait_up(bed: Any, proc: Any, total: int, timeout: float) -> list[tuple[str, str, str, int]]:
    """Wait until ``total`` up lines were printed (forwards x times up); return the last set."""

    def enough() -> bool:
        if not proc.running():
            raise AssertionError(f"{proc.name} exited:\n{proc.describe()}")
        return len(up_lines(proc)) >= total

    try:
        bed.wait_until(enough, timeout, f"{total} 'forward ... up' lines", step=0.005)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.describe()}") from None
    return up_lines(proc)[:total]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(values: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for (sample, sample_labels), value in values.items():
        if sample == name and set(labels.items()) <= set(sample_labels):
            total += value
    return total


@dataclass
class World:
    """One test's relay (in the namespace), client(s), targets and public peers."""

    bed: Any
    ns: Netns
    relays: list[Any] = field(default_factory=list)

    @property
    def relay(self) -> Any:
        return self.relays[-1]

    def serve(self, *extra: str) -> Any:
        bed, ns = self.bed, self.ns
        argv = ns.exec(
            *bed.relay_argv(),
            "serve",
            "--listen",
            f"{ns.relay_addr}:{SSH_PORT}",
            "--host-key",
            str(bed.keys.host),
            "--authorized-keys",
            str(bed.authorized_keys),
            "--metrics",
            f"{ns.relay_addr}:{METRICS_PORT}",
            *extra,
        )
        proc = self.start(argv, "relay serve")
        proc.wait_line(rf"^relay: listening on {re.escape(ns.relay_addr)}:{SSH_PORT} ")
        self.relays.append(proc)
        return proc

    def start(self, argv: list[str], name: str) -> Any:
        """Start a process (killed at teardown, also after a crash of this run)."""
        return self.ns.track(self.bed.start(argv, name))

    @property
    def relay_metrics(self) -> str:
        return f"http://{self.ns.relay_addr}:{METRICS_PORT}/metrics"

    def spec(self, public_port: int, target_port: int, proto: str = "tcp") -> str:
        return f"{self.ns.relay_addr}:{public_port}:{LOOPBACK}:{target_port}/{proto}"

    def connect_argv(
        self, *specs: str, extra: tuple[str, ...] = (), key: Path | None = None
    ) -> list[str]:
        bed = self.bed
        argv = [
            *bed.relay_argv(),
            "connect",
            f"{self.ns.relay_addr}:{SSH_PORT}",
            "-i",
            str(key or bed.keys.client),
            "--known-hosts",
            str(bed.known_hosts),
            "--accept-new",
            "--metrics",
            f"{LOOPBACK}:0",
        ]
        for spec in specs:
            argv += ["-R", spec]
        return [*argv, *extra]

    def connect(self, *specs: str, extra: tuple[str, ...] = (), key: Path | None = None) -> Any:
        """Start `relay connect` and wait until every forward is up."""
        proc = self.start(self.connect_argv(*specs, extra=extra, key=key), "relay connect")
        wait_up(self.bed, proc, len(specs), 20)
        return proc

    def client_metrics(self, proc: Any) -> str:
        return proc.wait_line(r"^relay: metrics on (\S+)").group(1)

    def client_port(self, after: float = 0.0) -> int:
        """Source port of the client's current SSH connection, from the relay's log."""
        pattern = rf"client {re.escape(self.ns.host_addr)}:(\d+) key \S+ .*connected$"
        events = log_events(self.relay, pattern, after)
        assert events, f"no 'connected' line in the relay's log:\n{self.relay.describe()}"
        match = re.search(pattern, events[-1][1])
        assert match is not None
        return int(match.group(1))

    def all_output(self) -> str:
        return "\n".join(f"{p.stdout}\n{p.stderr}" for p in self.bed.procs)


@pytest.fixture
def world(bed: Any, netns: Netns) -> World:
    return World(bed, netns)


# ------------------------------------------------------------------------ public peers


class UdpStream:
    """A public UDP peer sending seq-numbered datagrams at ``rate``/s to the relay and
    reading the target's replies (the datagram reversed). Bounded in time."""

    def __init__(self, addr: tuple[str, int], rate: int, size: int = 200) -> None:
        self.addr = addr
        self.rate = rate
        self.size = size
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.settimeout(0.2)
        self.sent: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.bad = 0  # replies that are not a reversed datagram of ours
        self._stop = threading.Event()
        self._stop_reading = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._read, daemon=True),
        ]

    def start(self) -> UdpStream:
        for thread in self._threads:
            thread.start()
        return self

    def _send(self, limit: float = 90.0) -> None:
        start = time.monotonic()
        offset = time.time() - start
        padding = b"\x00" * (self.size - 12)
        for seq in itertools.count():
            due = start + seq / self.rate
            if self._stop.is_set() or due - start > limit:
                return
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.sent[seq] = time.monotonic() + offset
            with contextlib.suppress(OSError):
                self.sock.sendto(struct.pack("!QI", seq, 0xC0FFEE) + padding, self.addr)

    def _read(self) -> None:
        while not self._stop_reading.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            head = data[::-1][:12]
            if len(data) != self.size or head[8:] != struct.pack("!I", 0xC0FFEE):
                self.bad += 1
                continue
            seq = struct.unpack("!Q", head[:8])[0]
            self.received.setdefault(seq, time.time())

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join(5)
        time.sleep(0.5)  # the last replies
        self._stop_reading.set()
        self._threads[1].join(5)
        self.sock.close()

    def last_before(self, when: float) -> float | None:
        """Receive time of the last reply received before ``when``."""
        times = [t for t in self.received.values() if t < when]
        return max(times) if times else None

    def first_after(self, when: float) -> float | None:
        times = [t for t in self.received.values() if t >= when]
        return min(times) if times else None


def pattern_stream(seed: int) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes in 64 KiB blocks (both ends can regenerate them)."""
    rng = random.Random(seed)
    while True:
        yield rng.randbytes(65536)


class PrefixChecker:
    """Checks that bytes received are exactly a prefix of ``pattern_stream(seed)``."""

    def __init__(self, seed: int) -> None:
        self.blocks = pattern_stream(seed)
        self.expected = bytearray()
        self.received = 0
        self.mismatch_at: int | None = None

    def feed(self, data: bytes) -> None:
        if self.mismatch_at is not None:
            self.received += len(data)
            return
        while len(self.expected) < len(data):
            self.expected += next(self.blocks)
        if self.expected[: len(data)] != data:
            first = next(
                i for i, (a, b) in enumerate(zip(self.expected, data, strict=False)) if a != b
            )
            self.mismatch_at = self.received + first
        del self.expected[: len(data)]
        self.received += len(data)


@dataclass
class Ending:
    """How one side of a TCP connection ended: "reset", "eof" or an error name."""

    how: str = ""
    at: float = 0.0
    received: int = 0
    sent: int = 0
    mismatch_at: int | None = None


# ------------------------------------------------------------------------------- tests


def test_client_killed_with_sigkill_gets_its_ports_back_within_2_s(world: World, targets):
    tcp_target, udp_target = targets.tcp_echo(), targets.udp()
    world.serve()
    specs = (world.spec(40001, tcp_target.port), world.spec(40002, udp_target.port, "udp"))
    first = world.connect(*specs)
    assert [(p, b, n) for _, p, b, n in up_lines(first)] == [
        ("tcp", world.ns.relay_addr, 40001),
        ("udp", world.ns.relay_addr, 40002),
    ]

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    started = time.monotonic()
    second = world.start(world.connect_argv(*specs), "relay connect (restarted)")
    ports = wait_up(world.bed, second, 2, 10)
    elapsed = time.monotonic() - started
    print(f"\n[client SIGKILL] new process to both forwards up: {elapsed:.3f} s; {ports}")
    assert [(p, n) for _, p, _, n in ports] == [("tcp", 40001), ("udp", 40002)]
    assert elapsed <= 2.0, f"forwards back after {elapsed:.3f} s (bound 2 s)"

    # Traffic flows again on the same public ports.
    with socket.create_connection((world.ns.relay_addr, 40001), timeout=5) as conn:
        conn.sendall(b"ping over tcp")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b"ping over tcp"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.settimeout(3)
        peer.sendto(b"ping over udp", (world.ns.relay_addr, 40002))
        assert peer.recvfrom(100)[0] == b"ping over udp"[::-1]
    values = scrape(world.relay_metrics)
    print(f"[client SIGKILL] relay lease events: {_lease_events(values)}")
    output = world.all_output().lower()
    assert "already in use" not in output, output


def _lease_events(values: dict[Any, float]) -> dict[str, float]:
    return {
        event: metric(values, "sshrelay_lease_events_total", event=event)
        for event in ("takeover", "resumed", "expired")
    }


def test_black_hole_is_detected_by_both_ends_and_udp_resumes_after_restoration(
    world: World, targets
):
    outage = 20.0
    udp_target = targets.udp()
    world.serve()
    client = world.connect(world.spec(40002, udp_target.port, "udp"))
    client_metrics = world.client_metrics(client)
    stream = UdpStream((world.ns.relay_addr, 40002), rate=1000).start()
    try:
        time.sleep(2.0)  # steady state
        cut = world.ns.blackhole()
        relay_seen, relay_line = wait_log(
            world.bed, world.relay, r" disconnected \(", cut, DEAD_LINK + 5
        )
        client_seen, client_line = wait_log(
            world.bed, client, r"tunnel lost \(", cut, DEAD_LINK + 5
        )
        time.sleep(max(0.0, cut + outage - time.time()))
        restored = world.ns.restore()
        wait_up(world.bed, client, 2, 15)
        back_at, _ = wait_log(world.bed, client, r"tunnel back after an outage", restored, 1)
        time.sleep(3.0)  # steady state again
    finally:
        stream.stop()

    lost = sorted(set(stream.sent) - set(stream.received))
    window = (cut - 0.05, restored + 2.0)
    outside = [seq for seq in lost if not window[0] <= stream.sent[seq] <= window[1]]
    last_before = stream.last_before(cut + 0.05)
    first_after = stream.first_after(restored)
    relay_values = scrape(world.relay_metrics)
    client_values = scrape(client_metrics)
    retries = log_events(client, r"reconnecting in |the relay answers again|cannot connect", cut)
    timeline = "".join(f"\n    cut{_rel(t, cut)}: {line.split(': ', 1)[1]}" for t, line in retries)
    print(
        f"\n[black hole {outage:g} s, dead-link timeout {DEAD_LINK:g} s]"
        f"\n  relay detected after {relay_seen - cut:.3f} s: {relay_line.split(': ', 1)[1]}"
        f"\n  client detected after {client_seen - cut:.3f} s: {client_line.split(': ', 1)[1]}"
        f"\n  client back {back_at - restored:.3f} s after restoration; meanwhile:"
        f"{timeline}"
        f"\n  UDP 1000/s: sent {len(stream.sent)}, received {len(stream.received)}, "
        f"lost {len(lost)} ({len(outside)} outside the outage window), bad {stream.bad}"
        f"\n  last reply before the cut at cut{_rel(last_before, cut)}, "
        f"first after restoration at restore{_rel(first_after, restored)}"
        f"\n  relay: no_session drops "
        f"{metric(relay_values, 'sshrelay_datagrams_dropped_total', reason='no_session'):g}, "
        f"lease events {_lease_events(relay_values)}"
        f"\n  client: outage histogram count "
        f"{metric(client_values, 'sshrelay_outage_seconds_count'):g} sum "
        f"{metric(client_values, 'sshrelay_outage_seconds_sum'):.3f} s"
    )
    assert relay_seen - cut <= DEAD_LINK + SLACK
    assert client_seen - cut <= DEAD_LINK + SLACK
    assert back_at - restored <= 2.0, f"client back {back_at - restored:.3f} s after restoration"
    assert first_after is not None and first_after - restored <= 2.0
    assert last_before is not None and cut - last_before < 0.05
    assert not outside, f"datagrams lost outside the outage: {outside[:20]}"
    assert stream.bad == 0
    assert metric(client_values, "sshrelay_outage_seconds_count") == 1


def _rel(when: float | None, base: float) -> str:
    return " (none)" if when is None else f"{when - base:+.3f} s"


def test_tcp_reset_is_recovered_within_the_first_backoff_step(world: World, targets):
    tcp_target = targets.tcp_echo()
    world.serve()
    started = time.time()
    client = world.connect(world.spec(40001, tcp_target.port))
    cut = world.ns.reset(world.client_port(started))
    # Nothing needs to be sent: the next PING (every timeout/4) meets the reset.
    lost_at, lost_line = wait_log(world.bed, client, r"tunnel lost \(", cut, DEAD_LINK + 5)
    wait_up(world.bed, client, 2, 10)
    back_at, _ = wait_log(world.bed, client, r"tunnel back after an outage", lost_at, 1)
    attempts = [line for _, line in log_events(client, r"reconnecting in ", lost_at)]
    relay_seen, relay_line = wait_log(
        world.bed, world.relay, r" disconnected \(", cut, DEAD_LINK + 5
    )
    with socket.create_connection((world.ns.relay_addr, 40001), timeout=5) as conn:
        conn.sendall(b"after the reset")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b"after the reset"
    values = scrape(world.relay_metrics)
    print(
        f"\n[TCP reset of the SSH connection]"
        f"\n  client detected after {lost_at - cut:.3f} s: {lost_line.split(': ', 1)[1]}"
        f"\n  relay detected after {relay_seen - cut:.3f} s: {relay_line.split(': ', 1)[1]}"
        f"\n  client back {back_at - lost_at:.3f} s after it noticed "
        f"({back_at - cut:.3f} s after the reset); "
        f"{[line.split(': ', 1)[1] for line in attempts]}"
        f"\n  relay lease events {_lease_events(values)}"
    )
    assert lost_at - cut <= DEAD_LINK / 4 + SLACK, "a reset is seen at the next PING"
    assert len(attempts) == 1 and "(attempt 1)" in attempts[0], attempts
    assert back_at - lost_at <= FIRST_BACKOFF + 1.0, "not back within the first backoff step"
    assert relay_seen - cut <= DEAD_LINK + SLACK


def test_relay_restart_says_goaway_and_the_client_gets_its_forwards_back(world: World, targets):
    tcp_target, udp_target = targets.tcp_echo(), targets.udp()
    world.serve()
    specs = (
        world.spec(40001, tcp_target.port),
        world.spec(40002, udp_target.port, "udp"),
        world.spec(0, tcp_target.port),  # the relay picks the port; the client pins it
    )
    client = world.connect(*specs)
    before = [(p, n) for _, p, _, n in up_lines(client)]
    once = world.connect(
        world.spec(40003, tcp_target.port), extra=("--no-reconnect",)
    )  # exits 5 when its tunnel ends
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.settimeout(3)
        peer.sendto(b"before", (world.ns.relay_addr, 40002))
        assert peer.recvfrom(100)[0] == b"erofeb"
        source_before = udp_target.sources()

        stopping = time.time()
        world.relay.send_signal(signal.SIGTERM)
        told_at, told_line = wait_log(world.bed, client, r"tunnel lost \(", stopping, 5)
        assert world.relay.wait(10) == 0
        assert once.wait(10) == 5, once.describe()
        stopped = time.time()

        world.serve()
        listening = time.time()
        after = wait_up(world.bed, client, 6, 15)[3:]
        back_at, _ = wait_log(world.bed, client, r"tunnel back after an outage", stopped, 1)
        attempts = [line for _, line in log_events(client, r"reconnecting in ", told_at)]
        print(
            f"\n[relay restart]"
            f"\n  client told {told_at - stopping:.3f} s after SIGTERM: "
            f"{told_line.split(': ', 1)[1]}"
            f"\n  relay down for {listening - stopped:.3f} s (process start to 'listening'); "
            f"client back {back_at - listening:.3f} s after the new relay listened"
            f"\n  forwards before {before}, after {[(p, n) for _, p, _, n in after]}"
            f"\n  {[line.split(': ', 1)[1] for line in attempts]}"
            f"\n  --no-reconnect client: exit 5: {once.stderr.splitlines()[-1]}"
        )
        assert "(the relay: relay shutting down)" in told_line
        assert told_at - stopping <= 1.0, "the client was not told promptly (GOAWAY)"
        assert [(p, n) for _, p, _, n in after] == before
        # Backing off, the client probes the relay's port every second (or retries
        # sooner): it is back within about a second of the relay listening again.
        assert back_at - listening <= 2.0

        # Traffic flows again, on the same ports, with nothing done at either end.
        for port in (40001, before[2][1]):
            with socket.create_connection((world.ns.relay_addr, port), timeout=5) as conn:
                conn.sendall(b"after restart")
                conn.shutdown(socket.SHUT_WR)
                assert conn.recv(100) == b"after restart"
        peer.sendto(b"after", (world.ns.relay_addr, 40002))
        assert peer.recvfrom(100)[0] == b"retfa"
        print(f"  UDP target saw the peer from {source_before} then {udp_target.sources()}")
        assert udp_target.sources() == source_before  # the parked socket was reused


BULK_RATE = 16 << 20  # bytes/s each way: a transfer in flight without starving the machine


def bulk_target(seed_send: int, seed_recv: int, ending: Ending) -> Any:
    """A target handler: sends pattern ``seed_send`` (paced), checks what it receives
    against pattern ``seed_recv``, and records how and when the connection ended."""
    import asyncio

    async def handle(reader: Any, writer: Any, target: Any) -> None:
        checker = PrefixChecker(seed_recv)

        async def sink() -> str:
            while data := await reader.read(1 << 20):
                checker.feed(data)
            return "eof"

        async def source() -> str:
            start = time.monotonic()
            for block in pattern_stream(seed_send):
                writer.write(block)
                await writer.drain()
                ending.sent += len(block)
                await asyncio.sleep(max(0.0, start + ending.sent / BULK_RATE - time.monotonic()))
            return "done"

        tasks = [asyncio.ensure_future(sink()), asyncio.ensure_future(source())]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        ending.at = time.time()
        for task in pending:
            task.cancel()
        error = next((t.exception() for t in done if t.exception() is not None), None)
        if error is None:
            ending.how = next(iter(done)).result()
        else:
            ending.how = _how(error)
        ending.received, ending.mismatch_at = checker.received, checker.mismatch_at
        writer.transport.abort()

    return handle


def _how(error: BaseException) -> str:
    if isinstance(error, ConnectionResetError | BrokenPipeError):
        return "reset"
    return type(error).__name__


def bulk_public(addr: tuple[str, int], seed_send: int, seed_recv: int, ending: Ending) -> None:
    """The public side of the bulk transfer, in two threads (send, receive)."""
    conn = socket.create_connection(addr, timeout=5)
    conn.settimeout(None)
    checker = PrefixChecker(seed_recv)
    lock = threading.Lock()

    def finish(how: str) -> None:
        with lock:
            if not ending.how:
                ending.how, ending.at = how, time.time()

    def send() -> None:
        start = time.monotonic()
        try:
            for block in pattern_stream(seed_send):
                conn.sendall(block)
                ending.sent += len(block)
                time.sleep(max(0.0, start + ending.sent / BULK_RATE - time.monotonic()))
                if ending.how or time.monotonic() - start > 60:
                    return
        except OSError as exc:
            finish(_how(exc))

    def receive() -> None:
        try:
            while data := conn.recv(1 << 20):
                checker.feed(data)
                ending.received, ending.mismatch_at = checker.received, checker.mismatch_at
            finish("eof")
        except OSError as exc:
            finish(_how(exc))
        ending.received, ending.mismatch_at = checker.received, checker.mismatch_at

    threads = [threading.Thread(target=f, daemon=True) for f in (send, receive)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(70)
    finally:
        conn.close()


def test_bulk_tcp_during_a_black_hole_ends_with_a_clean_reset_on_both_sides(world: World, targets):
    dead_link = 4.0  # configured on both ends
    timing = ("--dead-link-timeout", f"{dead_link:g}")
    target_end, public_end = Ending(), Ending()
    target = targets.tcp(bulk_target(seed_send=2, seed_recv=1, ending=target_end))
    world.serve(*timing)
    client = world.connect(world.spec(40001, target.port), extra=timing)
    public = threading.Thread(
        target=bulk_public,
        args=((world.ns.relay_addr, 40001), 1, 2, public_end),
        daemon=True,
    )
    public.start()
    world.bed.wait_until(lambda: target_end.sent > 8 << 20, 10, "the transfer to run")
    in_flight = (public_end.sent, public_end.received)
    cut = world.ns.blackhole()
    world.bed.wait_until(lambda: public_end.how and target_end.how, dead_link + 10, "both ends")
    relay_seen, _ = wait_log(world.bed, world.relay, r" disconnected \(", cut, dead_link + 5)
    client_seen, client_line = wait_log(world.bed, client, r"tunnel lost \(", cut, dead_link + 5)
    world.ns.restore()
    public.join(10)
    print(
        f"\n[bulk TCP through a black hole, dead-link timeout {dead_link:g} s, "
        f"{BULK_RATE >> 20} MiB/s each way; before the cut the public side had sent "
        f"{in_flight[0] >> 20} MiB and received {in_flight[1] >> 20} MiB]"
        f"\n  public client: {public_end.how} after {public_end.at - cut:.3f} s; "
        f"sent {public_end.sent}, received {public_end.received} (a correct prefix: "
        f"{public_end.mismatch_at is None})"
        f"\n  local target: {target_end.how} after {target_end.at - cut:.3f} s; "
        f"sent {target_end.sent}, received {target_end.received} (a correct prefix: "
        f"{target_end.mismatch_at is None})"
        f"\n  relay detected after {relay_seen - cut:.3f} s, client after "
        f"{client_seen - cut:.3f} s ({client_line.split(': ', 1)[1]})"
    )
    for name, end, sent_by_peer in (
        ("public client", public_end, target_end.sent),
        ("local target", target_end, public_end.sent),
    ):
        assert end.how in ("reset", "eof"), f"{name} ended with {end.how}"
        assert end.at - cut <= dead_link + SLACK, f"{name} ended {end.at - cut:.3f} s after"
        assert end.mismatch_at is None, f"{name}: corrupted at byte {end.mismatch_at}"
        assert 0 < end.received < sent_by_peer, f"{name} got {end.received} of {sent_by_peer}"
    assert relay_seen - cut <= dead_link + SLACK
    assert client_seen - cut <= dead_link + SLACK


def test_a_second_key_cannot_take_a_leased_port_and_the_same_key_can(world: World, targets):
    bed = world.bed
    with bed.authorized_keys.open("a") as keys:
        keys.write(bed.keys.public_line(bed.keys.stranger) + "\n")
    tcp_target = targets.tcp_echo()
    world.serve()
    spec = world.spec(40001, tcp_target.port)
    owner = world.connect(spec)
    where = f"tcp port 40001 on {world.ns.relay_addr}"

    def other_key() -> Any:
        argv = world.connect_argv(spec, key=bed.keys.stranger)
        proc = world.start(argv, "relay connect (other key)")
        assert proc.wait(15) == 3, proc.describe()
        assert not log_events(proc, r"reconnecting in "), "a refused forward was retried"
        return proc.stderr.splitlines()[-1]

    while_connected = other_key()
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    wait_log(bed, world.relay, r"lease kept for 60 s", 0, 10)
    during_grace = other_key()
    started = time.monotonic()
    again = world.start(world.connect_argv(spec), "relay connect (same key)")
    wait_up(bed, again, 1, 10)
    took = time.monotonic() - started
    print(
        f"\n[second key]\n  while the owner is connected: {while_connected}"
        f"\n  while the lease is in grace: {during_grace}"
        f"\n  the owner's key again: up {took:.3f} s after the process started"
    )
    assert while_connected.endswith(f"refused: {where} is held by another key")
    assert re.search(
        rf"refused: {where} is leased to another key for \d+ more seconds$", during_grace
    )
    assert took <= 2.0


def test_udp_peer_carries_on_after_a_reconnect_and_the_target_sees_the_same_source(
    world: World, targets
):
    rate = 20  # a game or VPN keepalive-like peer
    udp_target = targets.udp()
    world.serve()
    started = time.time()
    client = world.connect(world.spec(40002, udp_target.port, "udp"))
    peer = UdpStream((world.ns.relay_addr, 40002), rate=rate).start()
    try:
        world.bed.wait_until(lambda: len(peer.received) >= 5, 5, "replies before the cut")
        sources_before = udp_target.sources()
        cut = world.ns.reset(world.client_port(started))
        lost_at, lost_line = wait_log(world.bed, client, r"tunnel lost \(", cut, DEAD_LINK + 5)
        wait_up(world.bed, client, 2, 10)
        back_at, _ = wait_log(world.bed, client, r"tunnel back after an outage", lost_at, 1)
        time.sleep(1.5)
    finally:
        peer.stop()
    sources_after = udp_target.sources()
    after_back = [seq for seq, sent in peer.sent.items() if sent > back_at + 0.002]
    unanswered = [seq for seq in after_back if seq not in peer.received]
    first_after = peer.first_after(back_at)
    lost = sorted(set(peer.sent) - set(peer.received))
    print(
        f"\n[UDP continuity across a reconnect (TCP reset), peer at {rate}/s]"
        f"\n  client noticed {lost_at - cut:.3f} s after the reset "
        f"({lost_line.split(': ', 1)[1]}), back {back_at - lost_at:.3f} s later"
        f"\n  sent {len(peer.sent)}, answered {len(peer.received)}, lost {len(lost)} "
        f"(sent at cut{_rel(peer.sent[lost[0]] if lost else None, cut)} .. "
        f"cut{_rel(peer.sent[lost[-1]] if lost else None, cut)})"
        f"\n  first reply after the client was back: back{_rel(first_after, back_at)}"
        f"\n  target saw the peer from {sorted(sources_before)} before, "
        f"{sorted(sources_after)} in all"
    )
    assert after_back and not unanswered, f"datagrams after the reconnect unanswered: {unanswered}"
    assert first_after is not None and first_after - back_at <= 1 / rate + 0.1
    assert len(sources_before) == 1 and sources_after == sources_before
    assert peer.bad == 0
