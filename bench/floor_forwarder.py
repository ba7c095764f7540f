"""The cheapest possible two-process UDP-over-TCP forwarder, to measure the floor.

``bench/suite.py`` compares sshrelay's added UDP round-trip time with this: two
processes on loopback (``near`` takes datagrams on a public UDP port, ``far``
sends them to the target) joined by one TCP connection carrying a 2-byte length
before each datagram. No SSH, no encryption, no multiplexing, no metrics: a
uvloop reader callback, one ``recv``/``send`` each way. Whatever RTT this adds
over direct is what the process hops alone cost on the machine, and no design
with a relay process and a client process can add less.

    python bench/floor_forwarder.py far --tcp-port P --target-port T
    python bench/floor_forwarder.py near --tcp-port P   # prints "ready <udp port>"

Both exit after ``--max-seconds`` (default 600) or when the TCP connection ends.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys

import uvloop

_LEN = struct.Struct(">H")


def _tcp(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pump(tcp: socket.socket, udp: socket.socket, to: tuple[str, int] | None) -> None:
    """Forward datagrams both ways until the TCP connection ends."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    buf = bytearray()
    peer: list[tuple[str, int] | None] = [to]

    def udp_readable() -> None:
        while True:
            try:
                data, addr = udp.recvfrom(65536)
            except BlockingIOError:
                return
            if to is None:
                peer[0] = addr  # near: replies go back to the last public sender
            try:
                tcp.send(_LEN.pack(len(data)) + data)
            except BlockingIOError:
                pass  # a floor measurement at 1,000/s never fills the buffer

    def tcp_readable() -> None:
        try:
            chunk = tcp.recv(262144)
        except BlockingIOError:
            return
        if not chunk:
            if not done.done():
                done.set_result(None)
            return
        buf.extend(chunk)
        while len(buf) >= 2:
            (size,) = _LEN.unpack_from(buf)
            if len(buf) < 2 + size:
                break
            data = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            if peer[0] is not None:
                udp.sendto(data, peer[0])

    loop.add_reader(udp.fileno(), udp_readable)
    loop.add_reader(tcp.fileno(), tcp_readable)
    try:
        await done
    finally:
        loop.remove_reader(udp.fileno())
        loop.remove_reader(tcp.fileno())


async def near(args: argparse.Namespace) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    tcp = socket.create_connection(("127.0.0.1", args.tcp_port), timeout=10)
    _tcp(tcp)
    print(f"ready {udp.getsockname()[1]}", flush=True)
    await asyncio.wait_for(_pump(tcp, udp, None), args.max_seconds)


async def far(args: argparse.Namespace) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.tcp_port))
    listener.listen(1)
    print(f"ready {args.tcp_port}", flush=True)
    listener.settimeout(args.max_seconds)
    tcp, _ = listener.accept()
    listener.close()
    _tcp(tcp)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    await asyncio.wait_for(_pump(tcp, udp, ("127.0.0.1", args.target_port)), args.max_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["near", "far"])
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--target-port", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    try:
        uvloop.run(near(args) if args.role == "near" else far(args))
    except (TimeoutError, ConnectionError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
