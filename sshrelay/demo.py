"""`relay demo`: relay, client and echo services in one process on loopback.

Throwaway keys in a temporary directory, a TCP echo and a UDP echo behind a
real relay and client (real asyncssh on both ends), a short bounded load, and a
table of what was measured. Everything shares one event loop and one core, so
the numbers show the tunnel works and its order of magnitude; ``bench/`` has
the real side-by-side measurements.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from sshrelay.client.connect import Client, ClientError, ClientOptions
from sshrelay.protocol.aio.keys import generate_keypair
from sshrelay.protocol.aio.loop import run as run_loop
from sshrelay.protocol.aio.udp import Address, UdpSocket
from sshrelay.protocol.forwards import ForwardSpec
from sshrelay.relay.auth import AuthorizedKeys
from sshrelay.relay.server import RelayOptions, RelayServer

LOOPBACK = "127.0.0.1"


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class _UdpProbe:
    """Sends datagrams to one address and records when echoes come back."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.sent_at: dict[int, float] = {}
        self.rtts: list[float] = []
        self.received = 0
        self.waiter: asyncio.Future[None] | None = None
        self.sock = UdpSocket.bind(LOOPBACK, 0, self._datagram)

    def _datagram(self, data: bytes, addr: Address) -> None:
        self.received += 1
        seq = int.from_bytes(data[:8], "big")
        sent = self.sent_at.pop(seq, None)
        if sent is not None and seq < 1_000_000:  # blast() datagrams are not timed
            self.rtts.append(time.perf_counter() - sent)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def send(self, seq: int, size: int) -> None:
        self.sent_at[seq] = time.perf_counter()
        self.sock.sendto(seq.to_bytes(8, "big") + bytes(size - 8), self.target)

    async def ping_pong(self, count: int, size: int = 64) -> list[float]:
        """Sequential round trips (one outstanding): latency, not throughput."""
        loop = asyncio.get_running_loop()
        self.rtts = []
        for seq in range(count):
            self.waiter = loop.create_future()
            self.send(seq, size)
            try:
                await asyncio.wait_for(self.waiter, 1.0)
            except TimeoutError:
                self.sent_at.pop(seq, None)
        rtts, self.rtts = self.rtts, []
        return rtts

    async def blast(self, seconds: float, size: int = 1200, window: int = 256) -> float:
        """Keep ``window`` datagrams in flight for ``seconds``; echoed datagrams per second."""
        loop = asyncio.get_running_loop()
        self.received = 0
        seq = 1_000_000
        start = loop.time()
        deadline = start + seconds
        while loop.time() < deadline:
            while seq - 1_000_000 - self.received < window:
                self.send(seq, size)
                seq += 1
            self.waiter = loop.create_future()
            try:
                await asyncio.wait_for(self.waiter, 0.05)
            except TimeoutError:
                window = max(16, window // 2)  # losses: back off, keep measuring
                self.received = seq - 1_000_000 - window  # forget lost ones
        return self.received / (loop.time() - start)

    def close(self) -> None:
        self.sock.close()


async def _tcp_throughput(port: int, seconds: float) -> float:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    block = os.urandom(65536)
    received = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds

    async def pump() -> None:
        while loop.time() < deadline:
            writer.write(block)
            await writer.drain()
        writer.write_eof()

    task = asyncio.ensure_future(pump())
    while data := await reader.read(262144):
        received += len(data)
    await task
    writer.close()
    return received / (loop.time() - start) / 1e6


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _demo(seconds: float) -> int:
    with tempfile.TemporaryDirectory(prefix="sshrelay-demo-") as tmp:
        root = Path(tmp)
        host_key = generate_keypair(root / "host_ed25519", "demo-host")
        generate_keypair(root / "client_ed25519", "demo-client")
        (root / "authorized_keys").write_bytes((root / "client_ed25519.pub").read_bytes())

        echo_tcp = await asyncio.start_server(_tcp_echo, LOOPBACK, 0)
        tcp_port = echo_tcp.sockets[0].getsockname()[1]

        def echo(data: bytes, addr: Address) -> None:
            echo_udp.sendto(data, addr)

        echo_udp = UdpSocket.bind(LOOPBACK, 0, echo)
        udp_port = echo_udp.address[1]

        relay = RelayServer(
            RelayOptions(listen_host=LOOPBACK, listen_port=0),
            host_key,
            AuthorizedKeys(root / "authorized_keys"),
        )
        await relay.start()
        client = Client(
            ClientOptions(
                host=LOOPBACK,
                port=relay.port,
                identity=root / "client_ed25519",
                known_hosts=root / "known_hosts",
                accept_new=True,
                forwards=[
                    ForwardSpec(LOOPBACK, 0, LOOPBACK, tcp_port, "tcp", "echo-tcp"),
                    ForwardSpec(LOOPBACK, 0, LOOPBACK, udp_port, "udp", "echo-udp"),
                ],
            )
        )
        try:
            await client.connect()
        except ClientError as exc:
            print(f"relay demo: the client could not connect: {exc}")
            return 1
        public_tcp = client.bound[1][1]
        public_udp = client.bound[2][1]
        print(
            f"relay on {LOOPBACK}:{relay.port}; TCP echo :{tcp_port} exposed on :{public_tcp}; "
            f"UDP echo :{udp_port} exposed on :{public_udp}"
        )

        direct = _UdpProbe((LOOPBACK, udp_port))
        tunnel = _UdpProbe((LOOPBACK, public_udp))
        rounds = 500
        direct_rtt = await direct.ping_pong(rounds)
        tunnel_rtt = await tunnel.ping_pong(rounds)
        rate = await tunnel.blast(seconds)
        mbps = await _tcp_throughput(public_tcp, seconds)
        direct.close()
        tunnel.close()

        client.close()
        await relay.close()
        echo_tcp.close()
        echo_udp.close()

        if len(tunnel_rtt) < rounds * 0.9 or rate <= 0 or mbps <= 0:
            print("relay demo: FAILED: traffic did not get through the tunnel")
            return 1
        rows = [
            ("UDP RTT p50, direct", f"{statistics.median(direct_rtt) * 1e6:8.0f} us"),
            ("UDP RTT p99, direct", f"{_percentile(direct_rtt, 0.99) * 1e6:8.0f} us"),
            ("UDP RTT p50, through the tunnel", f"{statistics.median(tunnel_rtt) * 1e6:8.0f} us"),
            ("UDP RTT p99, through the tunnel", f"{_percentile(tunnel_rtt, 0.99) * 1e6:8.0f} us"),
            ("UDP 1200 B echoed datagrams/s", f"{rate:8.0f} /s"),
            ("TCP echo through the tunnel", f"{mbps:8.1f} MB/s"),
        ]
        print()
        print(f"{'measurement (one process, one core, loopback)':<46} {'value':>11}")
        print("-" * 58)
        for name, value in rows:
            print(f"{name:<46} {value:>11}")
        print(f"\n{rounds} sequential 64-byte round trips each; load phases of {seconds:g} s.")
        print("Side-by-side benchmarks in separate processes: see docs/performance.md.")
        return 0


def run_demo(seconds: float = 2.0) -> int:
    return run_loop(_demo(seconds))
