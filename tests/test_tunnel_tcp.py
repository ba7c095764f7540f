"""TCP through the real tunnel: `relay serve` and `relay connect` as processes on loopback.

A public client connects to the relay's public port; the stream crosses the SSH
channel to `relay connect`, which dials a local target served by this test
process. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time

import pytest

LOOPBACK = "127.0.0.1"
MiB = 1 << 20


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOOPBACK, port, limit=MiB)


async def _send_random(writer: asyncio.StreamWriter, size: int, chunk: int = MiB) -> str:
    """Send ``size`` random bytes, then EOF; the sha256 of what was sent."""
    digest = hashlib.sha256()
    sent = 0
    while sent < size:
        data = os.urandom(min(chunk, size - sent))
        digest.update(data)
        writer.write(data)
        await writer.drain()
        sent += len(data)
    writer.write_eof()
    return digest.hexdigest()


async def _receive_all(reader: asyncio.StreamReader, limit: int) -> tuple[int, str]:
    """Read until EOF (at most ``limit`` bytes): (count, sha256)."""
    digest = hashlib.sha256()
    total = 0
    while data := await reader.read(MiB):
        digest.update(data)
        total += len(data)
        assert total <= limit, f"received more than the {limit} bytes that were sent"
    return total, digest.hexdigest()


@pytest.mark.timeout(150)
def test_64_mib_each_way_concurrently_arrive_intact(bed, targets):
    size = 64 * MiB
    target = targets.tcp_sink_source(size)
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))

    async def exchange() -> tuple[str, tuple[int, str]]:
        reader, writer = await _open(tunnel.ports[0])
        try:
            sent_sha, received = await asyncio.gather(
                _send_random(writer, size), _receive_all(reader, size)
            )
        finally:
            writer.close()
        return sent_sha, received

    sent_sha, (received, received_sha) = asyncio.run(asyncio.wait_for(exchange(), 120))
    bed.wait_until(lambda: target.results, 10, "the target to finish")
    result = target.results[0]
    assert result["received"] == size, "public client -> target lost or added bytes"
    assert result["received_sha"] == sent_sha, "public client -> target corrupted the bytes"
    assert received == size, "target -> public client lost or added bytes"
    assert received_sha == result["sent_sha"], "target -> public client corrupted the bytes"
    assert target.connections == 1


@pytest.mark.timeout(120)
def test_100_concurrent_connections_each_echo_1_mib_exactly(bed, targets):
    count, size = 100, MiB
    target = targets.tcp_echo()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))

    async def one(index: int) -> tuple[int, bool, int]:
        payload = os.urandom(size)
        reader, writer = await _open(tunnel.ports[0])
        try:

            async def send() -> None:
                for start in range(0, size, 64 * 1024):
                    writer.write(payload[start : start + 64 * 1024])
                    await writer.drain()
                writer.write_eof()

            async def receive() -> bytes:
                parts = []
                got = 0
                while data := await reader.read(MiB):
                    parts.append(data)
                    got += len(data)
                    assert got <= size
                return b"".join(parts)

            _, echoed = await asyncio.gather(send(), receive())
        finally:
            writer.close()
        return index, echoed == payload, len(echoed)

    async def all_of_them() -> list[tuple[int, bool, int]]:
        return list(await asyncio.gather(*(one(i) for i in range(count))))

    results = asyncio.run(asyncio.wait_for(all_of_them(), 90))
    bad = [(index, length) for index, same, length in results if not same]
    assert not bad, f"{len(bad)} of {count} connections did not echo byte-exact: {bad[:5]}"
    bed.wait_until(lambda: len(target.results) == count, 10, "every target connection to end")
    assert target.connections == count


@pytest.mark.timeout(60)
def test_half_close_by_public_client_still_gets_the_full_response(bed, targets):
    response_size = 3 * MiB  # more than any window, so it must flow after the EOF
    target = targets.tcp_respond_after_eof(response_size)
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))

    request = os.urandom(300 * 1024)
    with socket.create_connection((LOOPBACK, tunnel.ports[0]), timeout=20) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        parts = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = sock.recv(MiB)
            if not data:
                break
            parts.append(data)
        else:
            pytest.fail("the response did not end within 30 s")
        response = b"".join(parts)

    bed.wait_until(lambda: target.results, 10, "the target to finish")
    result = target.results[0]
    assert result["request"] == len(request), "the target did not get the request before EOF"
    assert len(response) == 32 + response_size
    assert response[:32] == hashlib.sha256(request).digest()
    assert hashlib.sha256(response).hexdigest() == result["response_sha"]
    assert not target.errors, target.errors


@pytest.mark.timeout(60)
def test_half_close_by_target_still_carries_the_public_clients_bytes(bed, targets):
    greeting = os.urandom(100_000)

    async def greet_then_read(reader, writer, target):  # type: ignore[no-untyped-def]
        writer.write(greeting)
        await writer.drain()
        writer.write_eof()  # the target is done sending ...
        data = await reader.read(-1)  # ... but still reads until the client's EOF
        return {"sha": hashlib.sha256(data).hexdigest(), "size": len(data)}

    target = targets.tcp(greet_then_read)
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))

    upload = os.urandom(2 * MiB)
    with socket.create_connection((LOOPBACK, tunnel.ports[0]), timeout=20) as sock:
        received = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            data = sock.recv(MiB)
            if not data:  # the target's EOF arrived as EOF, not as a reset
                break
            received += data
        assert received == greeting
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"", "the connection should end after both EOFs"

    bed.wait_until(lambda: target.results, 10, "the target to finish")
    assert target.results[0] == {"sha": hashlib.sha256(upload).hexdigest(), "size": len(upload)}


@pytest.mark.timeout(90)
def test_paused_public_client_does_not_stall_another_connection(bed, targets):
    target = targets.tcp_echo()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))
    port = tunnel.ports[0]

    # Connection A writes and never reads: everything behind it backs up.
    paused = socket.create_connection((LOOPBACK, port), timeout=10)
    paused.setblocking(False)
    pushed = hashlib.sha256()
    pushed_bytes = 0
    block = os.urandom(256 * 1024)
    cap, blocked_for, deadline = 96 * MiB, 0.0, time.monotonic() + 20
    try:
        while pushed_bytes < cap and blocked_for < 1.0 and time.monotonic() < deadline:
            try:
                sent = paused.send(block)
            except BlockingIOError:
                time.sleep(0.05)
                blocked_for += 0.05
                continue
            pushed.update(block[:sent])
            pushed_bytes += sent
            blocked_for = 0.0
        assert blocked_for >= 1.0, (
            f"{pushed_bytes} bytes went into a connection nobody reads without back-pressure"
        )

        # Connection B must still echo 1 MiB promptly.
        payload = os.urandom(MiB)
        start = time.monotonic()
        with socket.create_connection((LOOPBACK, port), timeout=20) as other:

            def feed() -> None:
                other.sendall(payload)
                other.shutdown(socket.SHUT_WR)

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            echoed = bytearray()
            while len(echoed) <= len(payload) and time.monotonic() - start < 30:
                data = other.recv(MiB)
                if not data:
                    break
                echoed += data
            feeder.join(5)
        elapsed = time.monotonic() - start
        assert bytes(echoed) == payload, f"echo incomplete after {elapsed:.1f} s"
        assert elapsed < 20, f"1 MiB echo took {elapsed:.1f} s next to a paused connection"

        # A lost nothing while paused: read its whole echo back.
        paused.setblocking(True)
        paused.settimeout(30)
        paused.shutdown(socket.SHUT_WR)
        back = hashlib.sha256()
        back_bytes = 0
        while back_bytes <= pushed_bytes:
            data = paused.recv(MiB)
            if not data:
                break
            back.update(data)
            back_bytes += len(data)
        assert back_bytes == pushed_bytes
        assert back.hexdigest() == pushed.hexdigest()
    finally:
        paused.close()


@pytest.mark.timeout(60)
def test_refused_local_dial_resets_the_public_connection_promptly(bed, targets):
    closed_port = targets.closed_tcp_port()
    live = targets.tcp_echo()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(closed_port), bed.forward(live.port))

    for attempt in range(2):  # a refusal must not break the tunnel for the next one
        start = time.monotonic()
        with socket.create_connection((LOOPBACK, tunnel.ports[0]), timeout=10) as sock:
            sock.settimeout(5)
            try:
                sock.sendall(b"hello?")
                data = sock.recv(1024)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except TimeoutError:
                pytest.fail(f"attempt {attempt}: no reset/EOF within 5 s of a refused dial")
        assert data == b"", f"attempt {attempt}: got {data!r} from a refused target"
        assert time.monotonic() - start < 5

    assert tunnel.proc.running(), tunnel.proc.describe()
    with socket.create_connection((LOOPBACK, tunnel.ports[1]), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"still alive")
        assert sock.recv(100) == b"still alive"
    bed.wait_until(
        lambda: "refused" in tunnel.proc.stderr.lower(), 5, "the client to log the refused dial"
    )
