"""Target services and load generators for ``bench/bench_tunnel.py``, one process each.

Every role runs as its own ``python bench/loadgen.py ROLE ...`` process, so none of them shares
a process (or a GIL) with the relay, the client or the benchmark driver. Only the standard
library is imported, to keep start-up short.

Targets (long-lived; print ``ready PORT`` then answer ``stats [TAG]`` lines on stdin with one
JSON line; exit when stdin closes or after ``--max-seconds``):

    tcp-sink   accepts TCP connections; each starts with an 8-byte tag; counts bytes per tag
    udp-sink   counts 1200-byte datagrams per 4-byte run tag: received, wrong size, duplicates
    udp-echo   sends every datagram back to its sender
    udp-check  like udp-sink for any size: checks each datagram against the length in its own
               header and the sequence number in its trailer; counts merged, cut and spliced ones
    tcp-echo   accepts many TCP connections (one thread, epoll) and echoes what they send

Load generators (one-shot; print one JSON line and exit; bounded in time and count):

    tcp-push   one connection, pushes data for N seconds, half-closes, waits for the sink's EOF
    udp-pace   paced 1200-byte datagrams at a fixed rate for N seconds
    udp-rtt    64-byte datagrams (sequence number + send timestamp) at a fixed rate to an echo
    udp-probe  like udp-rtt, with a checked header and trailer, p99.9, and the raw samples
    udp-flows  N sockets (N distinct peers), one echoed datagram each; keeps them alive until told
    tcp-conns  N TCP connections, one echoed message each; holds them open until told

``udp-flows`` and ``tcp-conns`` print ``up {json}`` once every flow or connection has been tried,
then wait for ``release`` on stdin (bounded by ``--hold``) and print their final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from typing import Any

LOOPBACK = "127.0.0.1"
MAGIC = b"SRB1"
# magic, run tag, sequence number, length the sender meant to send
BULK_HEADER = struct.Struct("!4sIQI")
# sequence number, send time (perf_counter_ns)
RTT_HEADER = struct.Struct("!QQ")
# sequence number again, in the last 8 bytes (udp-pace --trailer, udp-probe)
TRAILER = struct.Struct("!Q")
# magic, sequence number, send time (perf_counter_ns), length the sender meant to send
PROBE_HEADER = struct.Struct("!4sQQI")
PROBE_MAGIC = b"SRP1"
MAX_SEQ = 2_000_000  # duplicate map size per run tag; senders never exceed it
TCP_CHUNK = 256 * 1024


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _big_buffers(sock: socket.socket, size: int = 4 * 1024 * 1024) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass


def _serve_commands(stats: Any, max_seconds: float) -> None:
    """Answer ``stats [TAG]`` on stdin until stdin closes or the lifetime ends."""
    deadline = time.monotonic() + max_seconds
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            words = line.decode().split()
            if words and words[0] == "stats":
                _emit(stats(words[1] if len(words) > 1 else None))
            elif words and words[0] == "quit":
                os._exit(0)
    os._exit(0)


# ---------------------------------------------------------------- targets


def tcp_sink(max_seconds: float) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    conns: dict[str, dict[str, Any]] = {}

    def handle(conn: socket.socket) -> None:
        conn.settimeout(max_seconds)
        buf = bytearray(1024 * 1024)
        view = memoryview(buf)
        record: dict[str, Any] = {"bytes": 0, "first": None, "last": None, "eof": False}
        try:
            tag = b""
            while len(tag) < 8:
                part = conn.recv(8 - len(tag))
                if not part:
                    return
                tag += part
            record["first"] = time.perf_counter()
            conns[tag.decode(errors="replace")] = record
            total = 0
            while True:
                n = conn.recv_into(view)
                if not n:
                    record["eof"] = True
                    break
                total += n
                record["bytes"] = total
                record["last"] = time.perf_counter()
        except OSError as exc:
            record["error"] = repr(exc)
        finally:
            conn.close()

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def stats(tag: str | None) -> dict[str, Any]:
        record = conns.get(tag or "")
        if record is None:
            return {"found": False}
        seconds = 0.0
        if record["first"] is not None and record["last"] is not None:
            seconds = record["last"] - record["first"]
        return {
            "found": True,
            "bytes": record["bytes"],
            "seconds": seconds,
            "eof": record["eof"],
            "error": record.get("error"),
        }

    threading.Thread(target=accept, daemon=True).start()
    print(f"ready {listener.getsockname()[1]}", flush=True)
    _serve_commands(stats, max_seconds)


def udp_sink(max_seconds: float, size: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((LOOPBACK, 0))
    runs: dict[int, list[int]] = {}  # tag -> [received, wrong_size, duplicates, foreign]
    seen: dict[int, bytearray] = {}
    closed: set[int] = set()  # runs already reported: late datagrams are only counted
    totals = {"wrong_size": 0, "foreign": 0, "late": 0}

    def receive() -> None:
        buf = bytearray(65536)
        view = memoryview(buf)
        unpack = BULK_HEADER.unpack_from
        hsize = BULK_HEADER.size
        while True:
            n = sock.recv_into(view)
            if n < hsize:
                totals["wrong_size"] += 1
                continue
            magic, tag, seq, length = unpack(buf)
            if magic != MAGIC:
                totals["foreign"] += 1
                continue
            counters = runs.get(tag)
            if counters is None:
                if tag in closed:
                    totals["late"] += 1
                    if n != size or n != length:
                        totals["wrong_size"] += 1
                    continue
                counters = runs[tag] = [0, 0, 0, 0]
                seen[tag] = bytearray(MAX_SEQ)
            if n != size or n != length:
                counters[1] += 1
                totals["wrong_size"] += 1
                continue
            marks = seen[tag]
            if seq < MAX_SEQ and marks[seq]:
                counters[2] += 1
                continue
            if seq < MAX_SEQ:
                marks[seq] = 1
            counters[0] += 1

    def stats(tag: str | None) -> dict[str, Any]:
        key = int(tag) if tag else -1
        counters = runs.pop(key, [0, 0, 0, 0])  # a run is reported once
        seen.pop(key, None)
        closed.add(key)
        return {
            "received": counters[0],
            "wrong_size": counters[1],
            "duplicates": counters[2],
            "total_wrong_size": totals["wrong_size"],
            "total_foreign": totals["foreign"],
            "total_late": totals["late"],
        }

    threading.Thread(target=receive, daemon=True).start()
    print(f"ready {sock.getsockname()[1]}", flush=True)
    _serve_commands(stats, max_seconds)


def udp_echo(max_seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((LOOPBACK, 0))
    counters = {"echoed": 0}

    def echo() -> None:
        while True:
            data, addr = sock.recvfrom(65536)
            try:
                sock.sendto(data, addr)
            except OSError:
                continue
            counters["echoed"] += 1

    threading.Thread(target=echo, daemon=True).start()
    print(f"ready {sock.getsockname()[1]}", flush=True)
    _serve_commands(lambda _tag: dict(counters), max_seconds)


# ---------------------------------------------------------------- load generators


def tcp_push(port: int, seconds: float, tag: str, timeout: float) -> dict[str, Any]:
    """Push for ``seconds``, half-close, wait (bounded) until the far end closes."""
    result: dict[str, Any] = {"sent": 0, "seconds": 0.0, "closed_by_peer": False, "error": None}
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        sock.settimeout(timeout)
        sock.sendall(tag.encode()[:8].ljust(8, b"-"))
        block = memoryview(os.urandom(TCP_CHUNK))
        start = time.perf_counter()
        deadline = start + seconds
        sent = 0
        while time.perf_counter() < deadline:
            try:
                sent += sock.send(block)
            except TimeoutError:
                result["error"] = f"send stalled for {timeout:g} s"
                break
        result["sent"] = sent
        result["seconds"] = time.perf_counter() - start
        if result["error"] is None:
            sock.shutdown(socket.SHUT_WR)
            try:
                result["closed_by_peer"] = sock.recv(1) == b""
            except TimeoutError:
                result["error"] = f"no EOF from the far end within {timeout:g} s"
        result["drained_seconds"] = time.perf_counter() - start
    except OSError as exc:
        result["error"] = repr(exc)
    finally:
        sock.close()
    return result


def udp_pace(
    port: int,
    rate: float,
    seconds: float,
    size: int,
    tag: int,
    max_lag: float = 0.005,
    trailer: bool = False,
) -> dict[str, Any]:
    """Send ``rate`` datagrams/s for ``seconds`` in small bursts (one every ~0.5 ms).

    If the sender falls more than ``max_lag`` behind (a noisy neighbour stole the CPU) the
    debt is forgiven rather than sent as one big burst; ``achieved_rate`` shows it.
    With ``trailer`` the last 8 bytes repeat the sequence number (for ``udp-check``).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.connect((LOOPBACK, port))
    payload = bytearray(size)
    pack = BULK_HEADER.pack_into
    pack_trailer = TRAILER.pack_into
    if trailer and size < BULK_HEADER.size + TRAILER.size:
        raise ValueError(f"--trailer needs at least {BULK_HEADER.size + TRAILER.size} bytes")
    total = min(int(rate * seconds), MAX_SEQ - 1)
    max_debt = max(1, int(rate * max_lag))
    tick = 0.0005
    sent = 0
    errors = 0
    skipped = 0
    start = time.perf_counter()
    hard_deadline = start + seconds + 1.0
    while sent + skipped < total:
        now = time.perf_counter()
        if now > hard_deadline:
            break
        due = min(total, int((now - start) * rate)) - sent - skipped
        if due > max_debt:
            skipped += due - max_debt
            due = max_debt
        for _ in range(due):
            pack(payload, 0, MAGIC, tag, sent, size)
            if trailer:
                pack_trailer(payload, size - TRAILER.size, sent)
            try:
                sock.send(payload)
            except OSError:  # ENOBUFS/ECONNREFUSED: counted, never fatal
                errors += 1
            sent += 1
        if due == 0:
            next_due = start + (sent + skipped + 1) / rate
            time.sleep(max(0.0, min(tick, next_due - time.perf_counter())))
    elapsed = time.perf_counter() - start
    sock.close()
    return {
        "sent": sent,
        "send_errors": errors,
        "skipped": skipped,
        "seconds": elapsed,
        "requested_rate": rate,
        "achieved_rate": sent / elapsed if elapsed > 0 else 0.0,
    }


def udp_rtt(port: int, rate: float, seconds: float, size: int, grace: float) -> dict[str, Any]:
    """Paced probes to an echo; RTT from the timestamp carried in each echoed datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((LOOPBACK, port))
    sock.setblocking(False)
    payload = bytearray(size)
    total = int(rate * seconds)
    rtts: list[int] = []
    seen = bytearray(total + 1)
    wrong_size = duplicates = errors = 0
    sent = skipped = 0
    start = time.perf_counter()
    end_send = start + seconds + 1.0  # bound even if the loop is starved
    deadline = None

    def drain() -> None:
        nonlocal wrong_size, duplicates
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED from an earlier send: nothing to read
                return
            now_ns = time.perf_counter_ns()
            if len(data) != size:
                wrong_size += 1
                continue
            seq, sent_ns = RTT_HEADER.unpack_from(data)
            if seq >= len(seen) or seen[seq]:
                duplicates += 1
                continue
            seen[seq] = 1
            rtts.append(now_ns - sent_ns)

    while True:
        now = time.perf_counter()
        if sent + skipped < total and now < end_send:
            behind = int((now - start) * rate) - sent - skipped
            if behind > 5:  # starved by a noisy neighbour: skip, do not burst
                skipped += behind - 5
            if now >= start + (sent + skipped) / rate:
                seq = sent + skipped
                RTT_HEADER.pack_into(payload, 0, seq, time.perf_counter_ns())
                try:
                    sock.send(payload)
                except OSError:
                    errors += 1
                sent += 1
                continue
            wait = start + (sent + skipped) / rate - now
        else:
            if deadline is None:
                deadline = now + grace
            if now >= deadline or len(rtts) + wrong_size >= sent:
                break
            wait = deadline - now
        readable, _, _ = select.select([sock], [], [], max(0.0, wait))
        if readable:
            drain()
    drain()
    sock.close()
    rtts.sort()

    def pct(q: float) -> float | None:
        if not rtts:
            return None
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))] / 1000.0

    return {
        "sent": sent,
        "received": len(rtts),
        "lost": sent - len(rtts),
        "wrong_size": wrong_size,
        "duplicates": duplicates,
        "send_errors": errors,
        "skipped": skipped,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "max_us": rtts[-1] / 1000.0 if rtts else None,
    }


# ---------------------------------------------------------------- suite roles (bench/suite.py)


def _raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``wanted`` if allowed; the soft limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
    for limits in ((wanted, new_hard), (min(wanted, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def udp_check(max_seconds: float) -> None:
    """Sink for ``udp-pace --trailer`` datagrams of any size.

    Each datagram must be exactly as long as its header says and end with its own sequence
    number. Otherwise it is counted as merged (longer: glued to the next), cut (shorter),
    spliced (right length, wrong tail) or headless (does not start with a header: a piece).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((LOOPBACK, 0))
    # tag -> [intact, merged, cut, spliced, duplicates]
    runs: dict[int, list[int]] = {}
    seen: dict[int, bytearray] = {}
    closed: set[int] = set()
    totals = {"datagrams": 0, "headless": 0, "merged": 0, "cut": 0, "spliced": 0, "late": 0}
    minimum = BULK_HEADER.size + TRAILER.size

    def receive() -> None:
        buf = bytearray(65536)
        view = memoryview(buf)
        unpack = BULK_HEADER.unpack_from
        tail = TRAILER.unpack_from
        hsize = BULK_HEADER.size
        while True:
            n = sock.recv_into(view)
            totals["datagrams"] += 1
            if n < hsize or buf[:4] != MAGIC:
                totals["headless"] += 1
                continue
            _magic, tag, seq, length = unpack(buf)
            counters = runs.get(tag)
            if counters is None:
                if tag in closed:
                    totals["late"] += 1
                    continue
                counters = runs[tag] = [0, 0, 0, 0, 0]
                seen[tag] = bytearray(MAX_SEQ)
            if n > length:
                counters[1] += 1
                totals["merged"] += 1
                continue
            if n < length:
                counters[2] += 1
                totals["cut"] += 1
                continue
            if n >= minimum and tail(buf, n - TRAILER.size)[0] != seq:
                counters[3] += 1
                totals["spliced"] += 1
                continue
            marks = seen[tag]
            if seq < MAX_SEQ and marks[seq]:
                counters[4] += 1
                continue
            if seq < MAX_SEQ:
                marks[seq] = 1
            counters[0] += 1

    def stats(tag: str | None) -> dict[str, Any]:
        key = int(tag) if tag else -1
        counters = runs.pop(key, [0, 0, 0, 0, 0])  # a run is reported once
        seen.pop(key, None)
        closed.add(key)
        return {
            "received": counters[0],
            "merged": counters[1],
            "cut": counters[2],
            "spliced": counters[3],
            "duplicates": counters[4],
            "totals": dict(totals),
        }

    threading.Thread(target=receive, daemon=True).start()
    print(f"ready {sock.getsockname()[1]}", flush=True)
    _serve_commands(stats, max_seconds)


def tcp_echo(max_seconds: float) -> None:
    """Echo server for many mostly idle connections: one thread, epoll, small buffers."""
    import selectors

    _raise_nofile(65536)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    counters = {"accepted": 0, "open": 0, "echoed_bytes": 0}

    def loop() -> None:
        while True:
            for key, _ in sel.select(1.0):
                if key.data is None:
                    while True:
                        try:
                            conn, _addr = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:  # EMFILE: leave it in the backlog for now
                            break
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ, True)
                        counters["accepted"] += 1
                        counters["open"] += 1
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    counters["open"] -= 1
                    continue
                try:
                    counters["echoed_bytes"] += conn.send(data)
                except OSError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    print(f"ready {listener.getsockname()[1]}", flush=True)
    _serve_commands(lambda _tag: dict(counters), max_seconds)


def udp_probe(
    port: int, rate: float, seconds: float, size: int, grace: float, dump: str | None
) -> dict[str, Any]:
    """Paced RTT probes to an echo; every echo is checked (length, header, trailer).

    Returns p50/p90/p99/p99.9/max in microseconds; ``dump`` gets the raw samples (a JSON list
    of microseconds) for plots.
    """
    hsize = PROBE_HEADER.size
    if size < hsize + TRAILER.size:
        raise ValueError(f"--size must be at least {hsize + TRAILER.size}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock, 1024 * 1024)
    sock.connect((LOOPBACK, port))
    sock.setblocking(False)
    payload = bytearray(size)
    total = int(rate * seconds)
    rtts: list[int] = []
    seen = bytearray(total + 1)
    counts = {"merged": 0, "cut": 0, "corrupt": 0, "duplicates": 0, "send_errors": 0}
    sent = skipped = 0
    start = time.perf_counter()
    end_send = start + seconds + 1.0  # bound even if the loop is starved
    deadline = None
    tail_at = size - TRAILER.size

    def drain() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED from an earlier send: nothing to read
                return
            now_ns = time.perf_counter_ns()
            if len(data) != size:
                counts["merged" if len(data) > size else "cut"] += 1
                continue
            magic, seq, sent_ns, length = PROBE_HEADER.unpack_from(data)
            if (
                magic != PROBE_MAGIC
                or length != size
                or seq >= total
                or TRAILER.unpack_from(data, tail_at)[0] != seq
            ):
                counts["corrupt"] += 1
                continue
            if seen[seq]:
                counts["duplicates"] += 1
                continue
            seen[seq] = 1
            rtts.append(now_ns - sent_ns)

    while True:
        now = time.perf_counter()
        if sent + skipped < total and now < end_send:
            behind = int((now - start) * rate) - sent - skipped
            if behind > 5:  # starved by a noisy neighbour: skip, do not burst
                skipped += behind - 5
            if now >= start + (sent + skipped) / rate:
                seq = sent + skipped
                TRAILER.pack_into(payload, tail_at, seq)
                PROBE_HEADER.pack_into(payload, 0, PROBE_MAGIC, seq, time.perf_counter_ns(), size)
                try:
                    sock.send(payload)
                except OSError:
                    counts["send_errors"] += 1
                sent += 1
                continue
            wait = start + (sent + skipped) / rate - now
        else:
            if deadline is None:
                deadline = now + grace
            if now >= deadline or len(rtts) >= sent:
                break
            wait = deadline - now
        readable, _, _ = select.select([sock], [], [], max(0.0, wait))
        if readable:
            drain()
    drain()
    sock.close()
    rtts.sort()

    def pct(q: float) -> float | None:
        if not rtts:
            return None
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))] / 1000.0

    if dump:
        with open(dump, "w") as handle:
            json.dump([round(r / 1000.0, 1) for r in rtts], handle)
    return {
        "sent": sent,
        "received": len(rtts),
        "lost": sent - len(rtts),
        **counts,
        "skipped": skipped,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": rtts[-1] / 1000.0 if rtts else None,
    }


def _read_command(fd: int, timeout: float) -> str | None:
    """One word from stdin within ``timeout`` (None: nothing; "" on EOF)."""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return None
    chunk = os.read(fd, 4096)
    return chunk.decode(errors="replace").strip() if chunk else ""


def udp_flows(
    port: int, flows: int, batch: int, hold: float, resend: float, timeout: float
) -> None:
    """``flows`` sockets on distinct local ports, each one echoed datagram: distinct peers.

    Batches of ``batch`` sockets send, then wait (up to ``timeout``) for their echoes; sockets
    without an echo retry twice. Prints ``up {json}``; then every ``resend`` seconds every socket
    sends again (keeping its flow alive) until ``release`` arrives on stdin or ``hold`` ends.
    An echo carrying another socket's index is counted as ``misdelivered``.
    """
    import selectors

    limit = _raise_nofile(flows + 256)
    if limit < flows + 64:
        _emit({"error": f"RLIMIT_NOFILE {limit} is too low for {flows} sockets"})
        return
    started = time.perf_counter()
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    answered = bytearray(flows)
    counts = {"answered": 0, "misdelivered": 0, "send_errors": 0}
    pack = struct.Struct("!Q16x").pack

    def drain(wait: float) -> None:
        for key, _ in sel.select(wait):
            index = key.data
            sock = key.fileobj
            while True:
                try:
                    data = sock.recv(2048)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if len(data) < 8 or struct.unpack_from("!Q", data)[0] != index:
                    counts["misdelivered"] += 1
                    continue
                if not answered[index]:
                    answered[index] = 1
                    counts["answered"] += 1

    def send(index: int) -> None:
        try:
            socks[index].send(pack(index))
        except OSError:
            counts["send_errors"] += 1

    def wait_for(indices: list[int]) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and any(not answered[i] for i in indices):
            drain(0.02)

    try:
        for index in range(flows):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind((LOOPBACK, 0))
            sock.connect((LOOPBACK, port))
            sel.register(sock, selectors.EVENT_READ, index)
            socks.append(sock)
        for _attempt in range(3):
            pending = [i for i in range(flows) if not answered[i]]
            if not pending:
                break
            for first in range(0, len(pending), batch):
                chunk = pending[first : first + batch]
                for index in chunk:
                    send(index)
                wait_for(chunk)
            wait_for(pending)
        first_round = counts["answered"]
        _emit(
            {
                "up": True,
                "flows": flows,
                "answered": first_round,
                "seconds": time.perf_counter() - started,
                **{k: v for k, v in counts.items() if k != "answered"},
            }
        )
        rounds: list[int] = []
        hold_end = time.perf_counter() + hold
        next_round = time.perf_counter() + resend
        fd = sys.stdin.fileno()
        while time.perf_counter() < hold_end:
            command = _read_command(fd, min(0.2, max(0.0, next_round - time.perf_counter())))
            if command is not None:
                break  # "release" or EOF
            drain(0.0)
            if time.perf_counter() >= next_round:
                answered[:] = bytes(flows)
                counts["answered"] = 0
                for first in range(0, flows, batch):
                    for index in range(first, min(flows, first + batch)):
                        send(index)
                    drain(0.002)
                wait_for(list(range(flows)))
                rounds.append(counts["answered"])
                next_round = time.perf_counter() + resend
        _emit(
            {
                "flows": flows,
                "answered": first_round,
                "keepalive_rounds": rounds,
                "misdelivered": counts["misdelivered"],
                "send_errors": counts["send_errors"],
                "seconds": time.perf_counter() - started,
            }
        )
    finally:
        for sock in socks:
            sock.close()


def tcp_conns(port: int, conns: int, batch: int, hold: float, timeout: float) -> None:
    """Open ``conns`` TCP connections, one echoed 16-byte message each; hold them open.

    Prints ``up {json}`` when all were tried, waits for ``release`` on stdin (bounded by
    ``hold``), closes them and prints the final JSON line.
    """
    import selectors

    limit = _raise_nofile(conns + 256)
    if limit < conns + 64:
        _emit({"error": f"RLIMIT_NOFILE {limit} is too low for {conns} connections"})
        return
    started = time.perf_counter()
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    echoed = bytearray(conns)
    counts = {"echoed": 0, "connect_errors": 0, "closed_early": 0}

    def drain(wait: float) -> None:
        for key, _ in sel.select(wait):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                counts["closed_early"] += 1
                sel.unregister(sock)
                continue
            if not echoed[key.data]:
                echoed[key.data] = 1
                counts["echoed"] += 1

    try:
        for first in range(0, conns, batch):
            chunk = range(first, min(conns, first + batch))
            for index in chunk:
                try:
                    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
                except OSError:
                    counts["connect_errors"] += 1
                    continue
                sock.setblocking(False)
                sock.send(struct.pack("!Q8x", index))
                sel.register(sock, selectors.EVENT_READ, index)
                socks.append(sock)
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline and any(not echoed[i] for i in chunk):
                drain(0.02)
        _emit({"up": True, "conns": conns, **counts, "seconds": time.perf_counter() - started})
        _read_command(sys.stdin.fileno(), hold)
        _emit({"conns": conns, **counts, "seconds": time.perf_counter() - started})
    finally:
        for sock in socks:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="bench/bench_tunnel.py helper processes")
    roles = parser.add_subparsers(dest="role", required=True)
    for name in ("tcp-sink", "udp-sink", "udp-echo", "udp-check", "tcp-echo"):
        role = roles.add_parser(name)
        role.add_argument("--max-seconds", type=float, default=900.0)
        role.add_argument("--size", type=int, default=1200)
    push = roles.add_parser("tcp-push")
    push.add_argument("--port", type=int, required=True)
    push.add_argument("--seconds", type=float, required=True)
    push.add_argument("--tag", required=True)
    push.add_argument("--timeout", type=float, default=10.0)
    pace = roles.add_parser("udp-pace")
    pace.add_argument("--port", type=int, required=True)
    pace.add_argument("--rate", type=float, required=True)
    pace.add_argument("--seconds", type=float, required=True)
    pace.add_argument("--size", type=int, default=1200)
    pace.add_argument("--tag", type=int, required=True)
    pace.add_argument("--trailer", action="store_true", help="sequence number in the last 8 B")
    rtt = roles.add_parser("udp-rtt")
    rtt.add_argument("--port", type=int, required=True)
    rtt.add_argument("--rate", type=float, default=1000.0)
    rtt.add_argument("--seconds", type=float, required=True)
    rtt.add_argument("--size", type=int, default=64)
    rtt.add_argument("--grace", type=float, default=1.0)
    probe = roles.add_parser("udp-probe")
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--rate", type=float, default=1000.0)
    probe.add_argument("--seconds", type=float, required=True)
    probe.add_argument("--size", type=int, default=64)
    probe.add_argument("--grace", type=float, default=1.0)
    probe.add_argument("--dump", help="write the RTT samples (JSON list of us) here")
    flows = roles.add_parser("udp-flows")
    flows.add_argument("--port", type=int, required=True)
    flows.add_argument("--flows", type=int, default=10_000)
    flows.add_argument("--batch", type=int, default=500)
    flows.add_argument("--hold", type=float, default=60.0)
    flows.add_argument("--resend", type=float, default=20.0)
    flows.add_argument("--timeout", type=float, default=2.0)
    conns = roles.add_parser("tcp-conns")
    conns.add_argument("--port", type=int, required=True)
    conns.add_argument("--conns", type=int, default=1000)
    conns.add_argument("--batch", type=int, default=100)
    conns.add_argument("--hold", type=float, default=60.0)
    conns.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    if args.role == "tcp-sink":
        tcp_sink(args.max_seconds)
    elif args.role == "udp-sink":
        udp_sink(args.max_seconds, args.size)
    elif args.role == "udp-echo":
        udp_echo(args.max_seconds)
    elif args.role == "udp-check":
        udp_check(args.max_seconds)
    elif args.role == "tcp-echo":
        tcp_echo(args.max_seconds)
    elif args.role == "tcp-push":
        _emit(tcp_push(args.port, args.seconds, args.tag, args.timeout))
    elif args.role == "udp-pace":
        _emit(
            udp_pace(args.port, args.rate, args.seconds, args.size, args.tag, trailer=args.trailer)
        )
    elif args.role == "udp-rtt":
        _emit(udp_rtt(args.port, args.rate, args.seconds, args.size, args.grace))
    elif args.role == "udp-probe":
        _emit(udp_probe(args.port, args.rate, args.seconds, args.size, args.grace, args.dump))
    elif args.role == "udp-flows":
        udp_flows(args.port, args.flows, args.batch, args.hold, args.resend, args.timeout)
    elif args.role == "tcp-conns":
        tcp_conns(args.port, args.conns, args.batch, args.hold, args.timeout)


if __name__ == "__main__":
    main()
