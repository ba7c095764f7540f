"""The metrics of both ends, scraped over HTTP from the real `relay serve` / `relay connect`.

Every test runs the real relay and client as subprocesses on 127.0.0.1 (the ``bed``
fixture, metrics on free ports) with local targets in this process (``targets``), pushes
known traffic through the tunnel and reads ``/metrics`` the way Prometheus does. What is
checked is what docs/metrics.md and the design's metrics principles promise:

- counters (``*_total``, histogram ``_count``/``_sum``/``_bucket``) never go down across
  client reconnects (SIGTERM and SIGKILL), and connects/disconnects count each session;
- byte, datagram and wire counters agree exactly with the bytes pushed;
- counters move while a long transfer runs, not only when it ends;
- driving 1,000 UDP peers and 500 TCP connections adds no series (no per-peer labels).

Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import pytest
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = "127.0.0.1"
MIB = 1 << 20

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


# ---------------------------------------------------------------------------- scraping


@dataclass
class Scrape:
    """One scrape of one end: sample values and the family type of every sample."""

    values: dict[SeriesKey, float]
    kinds: dict[SeriesKey, str]
    at: float  # time.monotonic() when the answer had arrived

    def __repr__(self) -> str:  # keeps assertion messages readable
        return f"<Scrape of {len(self.values)} samples>"

    def get(self, name: str, **labels: str) -> float:
        """The value of the one sample ``name{labels}`` (labels given must match exactly)."""
        key = (name, tuple(sorted(labels.items())))
        if key not in self.values:
            near = sorted(k for k in self.values if k[0] == name)
            raise AssertionError(f"no sample {name}{labels}; samples of {name}: {near}")
        return self.values[key]

    def total(self, name: str, **labels: str) -> float:
        """Sum of every sample ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, pairs), value in self.values.items()
            if sample == name and wanted <= set(pairs)
        )

    def series(self) -> set[SeriesKey]:
        return set(self.values)

    def monotonic_keys(self) -> Iterable[SeriesKey]:
        """Samples that must never decrease: counters and histogram buckets/count/sum."""
        for key, kind in self.kinds.items():
            if kind == "counter" or (
                kind == "histogram" and key[0].endswith(("_bucket", "_count", "_sum"))
            ):
                yield key


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[SeriesKey, float] = {}
    kinds: dict[SeriesKey, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in values, f"duplicate sample {key} in {url}"
            values[key] = sample.value
            kinds[key] = family.type
    return Scrape(values, kinds, time.monotonic())


def metrics_url(proc) -> str:  # type: ignore[no-untyped-def]
    """The /metrics URL a `relay serve` / `relay connect` printed at start-up."""
    return proc.wait_line(r"^relay: metrics on (http://\S+/metrics)").group(1)


def scrape_until(
    url: str, ready: Callable[[Scrape], bool], what: str, timeout: float = 10.0
) -> Scrape:
    """Scrape until ``ready(scrape)``; fail with the last scrape's relevant facts."""
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(url)
        if ready(got):
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} at {url}")
        time.sleep(0.05)


def regressions(before: Scrape, after: Scrape) -> list[str]:
    """Every counter/histogram sample of ``before`` that went down or vanished in ``after``."""
    found = []
    for key in before.monotonic_keys():
        if key not in after.values:
            found.append(f"{key[0]}{dict(key[1])} vanished (was {before.values[key]:g})")
        elif after.values[key] < before.values[key]:
            found.append(
                f"{key[0]}{dict(key[1])} went down: {before.values[key]:g} -> {after.values[key]:g}"
            )
    return found


def fwd_bytes(s: Scrape, role: str, forward: str, proto: str, direction: str) -> float:
    return s.get(
        "sshrelay_forward_bytes_total", role=role, forward=forward, proto=proto, direction=direction
    )


def fwd_dgrams(s: Scrape, role: str, forward: str, direction: str) -> float:
    return s.get(
        "sshrelay_forward_datagrams_total", role=role, forward=forward, direction=direction
    )


# ---------------------------------------------------------------------------- traffic


def spec(name: str, public_port: int, target_port: int, proto: str) -> str:
    return f"{name}={LOOPBACK}:{public_port}:{LOOPBACK}:{target_port}/{proto}"


def tcp_echo_roundtrip(port: int, size: int, timeout: float = 20.0) -> int:
    """Send ``size`` random bytes to an echo behind the tunnel, read all of them back."""
    payload = os.urandom(size)
    received = bytearray()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        writer = threading.Thread(
            target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR))
        )
        writer.start()
        while chunk := sock.recv(256 * 1024):
            received += chunk
        writer.join(timeout)
    assert bytes(received) == payload, (
        f"echo returned {len(received)} of {size} bytes (or wrong bytes)"
    )
    return size


def tcp_push(port: int, size: int, timeout: float = 30.0) -> None:
    """Send exactly ``size`` bytes one way, half-close, wait for the far end's EOF."""
    block = os.urandom(MIB)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        left = size
        while left:
            n = min(left, len(block))
            sock.sendall(block[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def udp_echo_exchange(
    port: int, count: int, size: int, window: int = 50, timeout: float = 5.0
) -> None:
    """``count`` datagrams of ``size`` bytes to a UDP echo, ``window`` at a time; every one
    must be answered (no resend: the counters are then exact)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((LOOPBACK, 0))
        sock.settimeout(timeout)
        sent = 0
        while sent < count:
            batch = min(window, count - sent)
            for _ in range(batch):
                sock.sendto(os.urandom(size), (LOOPBACK, port))
            for got in range(batch):
                try:
                    reply, addr = sock.recvfrom(65536)
                except TimeoutError:
                    raise AssertionError(
                        f"datagram {sent + got} of {count}: no echo within {timeout:g} s"
                    ) from None
                assert addr == (LOOPBACK, port)
                assert len(reply) == size
            sent += batch


def raise_fd_limit(wanted: int) -> None:
    """Raise RLIMIT_NOFILE (inherited by the relay and client started afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        pytest.skip(f"RLIMIT_NOFILE is {soft}; this test needs {wanted} file descriptors")


# ---------------------------------------------------------------------------- 1. monotonic


@pytest.mark.timeout(120)
def test_counters_stay_monotonic_across_client_reconnects(bed, targets) -> None:
    tcp_bytes, udp_count, udp_size = 300_000, 200, 700
    tcp_target = targets.tcp_echo()
    udp_target = targets.udp()
    relay = bed.serve()
    url = metrics_url(relay.proc)

    ports = (0, 0)  # session 1 lets the relay pick; later sessions ask for the same ports
    scrapes: list[tuple[str, Scrape]] = []
    totals = {"tcp": 0, "udp": 0}

    def record(label: str, current: Scrape) -> None:
        if scrapes:
            previous_label, previous = scrapes[-1]
            bad = regressions(previous, current)
            assert not bad, f"relay counters went down from '{previous_label}' to '{label}':\n" + (
                "\n".join(bad)
            )
        scrapes.append((label, current))

    kills = {1: signal.SIGTERM, 2: signal.SIGKILL}
    for session in (1, 2, 3):
        tunnel = bed.connect(
            relay,
            spec("web", ports[0], tcp_target.port, "tcp"),
            spec("game", ports[1], udp_target.port, "udp"),
        )
        if session == 1:
            ports = (tunnel.ports[0], tunnel.ports[1])
        assert tuple(tunnel.ports) == ports, f"session {session} got ports {tunnel.ports}"
        before = scrape_until(
            url,
            lambda s, n=session: (
                s.get("sshrelay_connects_total", role="relay") == n
                and s.get("sshrelay_sessions", role="relay") == 1
            ),
            f"session {session} to be counted",
        )
        record(f"session {session} connected", before)
        assert before.get("sshrelay_disconnects_total", role="relay") == session - 1

        tcp_echo_roundtrip(ports[0], tcp_bytes)
        udp_echo_exchange(ports[1], udp_count, udp_size)
        totals["tcp"] += tcp_bytes
        totals["udp"] += udp_count * udp_size

        def arrived(s: Scrape) -> bool:
            return (
                fwd_bytes(s, "relay", "web", "tcp", "in") >= totals["tcp"]
                and fwd_bytes(s, "relay", "game", "udp", "in") >= totals["udp"]
            )

        after = scrape_until(url, arrived, f"session {session} traffic in the counters")
        record(f"session {session} traffic", after)
        for direction in ("in", "out"):
            tcp_growth = fwd_bytes(after, "relay", "web", "tcp", direction) - fwd_bytes(
                before, "relay", "web", "tcp", direction
            )
            udp_growth = fwd_bytes(after, "relay", "game", "udp", direction) - fwd_bytes(
                before, "relay", "game", "udp", direction
            )
            assert tcp_growth == tcp_bytes, f"session {session}: web {direction} grew {tcp_growth}"
            assert udp_growth == udp_count * udp_size, (
                f"session {session}: game {direction} grew {udp_growth}"
            )
            # Totals over all sessions so far: nothing of a finished session was lost.
            assert fwd_bytes(after, "relay", "web", "tcp", direction) == totals["tcp"]
            assert fwd_bytes(after, "relay", "game", "udp", direction) == totals["udp"]
        assert fwd_dgrams(after, "relay", "game", "out") == session * udp_count
        assert after.get("sshrelay_forward_streams_opened_total", role="relay", forward="web") == (
            session
        )

        if session in kills:
            tunnel.proc.send_signal(kills[session])
            tunnel.proc.wait(15)
            gone = scrape_until(
                url,
                lambda s, n=session: (
                    s.get("sshrelay_disconnects_total", role="relay") == n
                    and s.get("sshrelay_sessions", role="relay") == 0
                ),
                f"the relay to notice the end of session {session} ({kills[session].name})",
            )
            record(f"session {session} ended by {kills[session].name}", gone)
            assert gone.get("sshrelay_connects_total", role="relay") == session

    final = scrapes[-1][1]
    assert final.get("sshrelay_connects_total", role="relay") == 3
    assert final.get("sshrelay_disconnects_total", role="relay") == 2
    assert final.get("sshrelay_reconnects_total", role="relay") == 0
    first = scrapes[0][1]
    bad = regressions(first, final)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------- 2. exact bytes


@pytest.mark.timeout(120)
def test_byte_counters_equal_the_bytes_sent(bed, targets) -> None:
    tcp_size = 8 * MIB
    dgram_count, dgram_size = 2000, 1000
    sink = targets.tcp_sink_source(0)  # receives and hashes; sends nothing back
    echo = targets.udp()
    relay = bed.serve()
    tunnel = bed.connect(
        relay, spec("bulk", 0, sink.port, "tcp"), spec("dgram", 0, echo.port, "udp")
    )
    relay_url, client_url = metrics_url(relay.proc), metrics_url(tunnel.proc)
    r0, c0 = scrape(relay_url), scrape(client_url)

    # -- TCP: exactly tcp_size bytes, public peer -> relay -> client -> sink
    tcp_push(tunnel.ports[0], tcp_size)
    bed.wait_until(lambda: sink.results, 20, "the sink to see EOF")
    assert sink.results[0]["received"] == tcp_size
    r1 = scrape_until(
        relay_url, lambda s: fwd_bytes(s, "relay", "bulk", "tcp", "out") >= tcp_size, "relay bytes"
    )
    c1 = scrape_until(
        client_url,
        lambda s: fwd_bytes(s, "client", "bulk", "tcp", "in") >= tcp_size,
        "client bytes",
    )
    assert (
        fwd_bytes(r1, "relay", "bulk", "tcp", "out") - fwd_bytes(r0, "relay", "bulk", "tcp", "out")
        == tcp_size
    )
    assert (
        fwd_bytes(c1, "client", "bulk", "tcp", "in") - fwd_bytes(c0, "client", "bulk", "tcp", "in")
        == tcp_size
    )
    assert fwd_bytes(r1, "relay", "bulk", "tcp", "in") == 0, "nothing came back from the sink"
    assert fwd_bytes(c1, "client", "bulk", "tcp", "out") == 0, "nothing came back from the sink"
    for label, before, after, role, direction in (
        ("relay out", r0, r1, "relay", "out"),
        ("client in", c0, c1, "client", "in"),
    ):
        wire = after.get("sshrelay_wire_bytes_total", role=role, direction=direction) - before.get(
            "sshrelay_wire_bytes_total", role=role, direction=direction
        )
        assert tcp_size <= wire <= tcp_size * 1.01 + 64 * 1024, (
            f"{label}: {wire} wire bytes for {tcp_size} stream bytes"
        )

    # -- UDP: dgram_count datagrams of dgram_size bytes to an echo (each way)
    udp_echo_exchange(tunnel.ports[1], dgram_count, dgram_size)
    payload = dgram_count * dgram_size
    r2 = scrape_until(
        relay_url, lambda s: fwd_bytes(s, "relay", "dgram", "udp", "in") >= payload, "relay bytes"
    )
    c2 = scrape_until(
        client_url,
        lambda s: fwd_bytes(s, "client", "dgram", "udp", "out") >= payload,
        "client bytes",
    )
    for end, role in ((r2, "relay"), (c2, "client")):
        drops = {
            dict(key[1])["reason"]: value
            for key, value in end.values.items()
            if key[0] == "sshrelay_datagrams_dropped_total" and value
        }
        assert not drops, f"{role} dropped datagrams: {drops}"
        for direction in ("in", "out"):
            assert fwd_bytes(end, role, "dgram", "udp", direction) == payload, (role, direction)
            assert fwd_dgrams(end, role, "dgram", direction) == dgram_count, (role, direction)
        for direction in ("in", "out"):
            before = r1 if role == "relay" else c1
            wire = end.get(
                "sshrelay_wire_bytes_total", role=role, direction=direction
            ) - before.get("sshrelay_wire_bytes_total", role=role, direction=direction)
            assert payload <= wire <= payload * 1.01 + 64 * 1024, (
                f"{role} {direction}: {wire} wire bytes for {payload} datagram bytes"
            )


# ---------------------------------------------------------------------------- 3. live updates


@pytest.mark.timeout(90)
def test_counters_move_during_a_long_transfer(bed, targets) -> None:
    seconds, rate = 4.0, 8 * MIB  # a paced transfer: ~4 s at ~8 MiB/s
    chunk = 64 * 1024
    sink = targets.tcp_sink_source(0)
    relay = bed.serve()
    tunnel = bed.connect(relay, spec("slow", 0, sink.port, "tcp"))
    relay_url, client_url = metrics_url(relay.proc), metrics_url(tunnel.proc)

    state: dict[str, float] = {"sent": 0, "sending_ended": float("inf")}
    errors: list[BaseException] = []

    def push() -> None:
        try:
            block = os.urandom(chunk)
            with socket.create_connection((LOOPBACK, tunnel.ports[0]), timeout=20) as sock:
                start = time.monotonic()
                total = int(seconds * rate)
                while state["sent"] < total and time.monotonic() < start + seconds + 10:
                    due = (time.monotonic() - start) * rate
                    if state["sent"] >= due:
                        time.sleep(0.002)
                        continue
                    sock.sendall(block)
                    state["sent"] += len(block)
                state["sending_ended"] = time.monotonic()
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            state["sending_ended"] = min(state["sending_ended"], time.monotonic())

    pusher = threading.Thread(target=push, daemon=True)
    samples: list[tuple[float, float, float]] = []  # (scraped at, relay out, client in)
    pusher.start()
    deadline = time.monotonic() + seconds + 20
    while pusher.is_alive() and time.monotonic() < deadline:
        r, c = scrape(relay_url), scrape(client_url)
        samples.append(
            (
                max(r.at, c.at),
                fwd_bytes(r, "relay", "slow", "tcp", "out"),
                fwd_bytes(c, "client", "slow", "tcp", "in"),
            )
        )
        time.sleep(0.25)
    pusher.join(20)
    assert not errors, f"the transfer failed: {errors[0]!r}"
    assert not pusher.is_alive(), "the transfer did not finish"
    sent = state["sent"]
    bed.wait_until(lambda: sink.results, 20, "the sink to see EOF")
    assert sink.results[0]["received"] == sent

    during = [sample for sample in samples if sample[0] < state["sending_ended"]]
    for index, role in ((1, "relay"), (2, "client")):
        values = [sample[index] for sample in during]
        longest = run = 1
        for previous, current in pairwise(values):
            run = run + 1 if current > previous else 1
            longest = max(longest, run)
        assert longest >= 4, (
            f"{role}: the byte counter did not rise strictly over 4 consecutive scrapes while "
            f"the transfer ran (longest run {longest}); values during the transfer: {values}"
        )
    final_r = scrape_until(
        relay_url, lambda s: fwd_bytes(s, "relay", "slow", "tcp", "out") >= sent, "relay total"
    )
    final_c = scrape_until(
        client_url, lambda s: fwd_bytes(s, "client", "slow", "tcp", "in") >= sent, "client total"
    )
    assert fwd_bytes(final_r, "relay", "slow", "tcp", "out") == sent
    assert fwd_bytes(final_c, "client", "slow", "tcp", "in") == sent


# ---------------------------------------------------------------------------- 4. cardinality


def _drive_udp_peers(port: int, peers: int, batch: int = 200, timeout: float = 3.0) -> set[int]:
    """``peers`` distinct source ports each send one datagram and get its echo back.

    All sockets stay open until the end so that the kernel cannot hand a port out twice.
    """
    sockets: list[socket.socket] = []
    used: set[int] = set()
    try:
        for _ in range(peers):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((LOOPBACK, 0))
            sock.setblocking(False)
            sockets.append(sock)
            used.add(sock.getsockname()[1])
        assert len(used) == peers
        for start in range(0, peers, batch):
            group = sockets[start : start + batch]
            selector = selectors.DefaultSelector()
            try:
                for index, sock in enumerate(group):
                    selector.register(sock, selectors.EVENT_READ, index)
                wanted = set(range(len(group)))
                for attempt in range(3):  # resend only to peers without an answer (bounded)
                    for index in sorted(wanted):
                        group[index].sendto(
                            b"peer %d try %d" % (start + index, attempt), (LOOPBACK, port)
                        )
                    end = time.monotonic() + timeout
                    while wanted and time.monotonic() < end:
                        for key, _ in selector.select(timeout=0.1):
                            sock = key.fileobj
                            assert isinstance(sock, socket.socket)
                            try:
                                while sock.recvfrom(65536):
                                    wanted.discard(key.data)
                            except BlockingIOError:
                                pass
                    if not wanted:
                        break
                assert not wanted, f"peers {sorted(start + i for i in wanted)[:10]}... got no echo"
            finally:
                selector.close()
    finally:
        for sock in sockets:
            sock.close()
    return used


def _tcp_connection(port: int, index: int) -> None:
    message = b"connection %d " % index + os.urandom(64)
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received == message, f"connection {index}: echo {len(received)} of {len(message)} bytes"


@pytest.mark.timeout(90)
def test_series_stay_the_same_with_1000_udp_peers_and_500_tcp_connections(bed, targets) -> None:
    udp_peers, tcp_connections = 1000, 500
    raise_fd_limit(4096)  # 1,000 peer sockets here; the client opens one per flow too
    tcp_target = targets.tcp_echo()
    udp_target = targets.udp()
    # PONGs every 0.2 s so that sshrelay_rtt_last_seconds (absent until the first one) is
    # there before the first look at the series.
    serve_toml = bed.write("serve.toml", "[serve]\nping_interval = 0.2\n")
    connect_toml = bed.write("connect.toml", "[connect]\nping_interval = 0.2\n")
    relay = bed.serve("--config", str(serve_toml))
    tunnel = bed.connect(
        relay,
        spec("web", 0, tcp_target.port, "tcp"),
        spec("game", 0, udp_target.port, "udp"),
        extra=["--config", str(connect_toml)],
    )
    urls = {"relay": metrics_url(relay.proc), "client": metrics_url(tunnel.proc)}

    def pinged(s: Scrape) -> bool:
        return any(key[0] == "sshrelay_rtt_last_seconds" for key in s.values)

    before = {role: scrape_until(url, pinged, f"{role} RTT") for role, url in urls.items()}

    used = _drive_udp_peers(tunnel.ports[1], udp_peers)
    assert len(used) == udp_peers
    with ThreadPoolExecutor(max_workers=25) as pool:
        for future in [
            pool.submit(_tcp_connection, tunnel.ports[0], i) for i in range(tcp_connections)
        ]:
            future.result(timeout=30)
    assert tcp_target.connections >= tcp_connections
    assert len(udp_target.sources()) >= udp_peers, "the target saw fewer flows than peers"

    after = {
        "relay": scrape_until(
            urls["relay"],
            lambda s: (
                s.get("sshrelay_forward_streams_opened_total", role="relay", forward="web")
                >= tcp_connections
            ),
            "relay streams",
        ),
        "client": scrape(urls["client"]),
    }
    for role in urls:
        added = sorted(after[role].series() - before[role].series())
        removed = sorted(before[role].series() - after[role].series())
        assert not added and not removed, (
            f"{role}: series changed under load; added {added[:20]} (of {len(added)}), "
            f"removed {removed[:20]} (of {len(removed)})"
        )
        label_values: dict[str, set[str]] = {}
        for _, labels in after[role].series():
            for label, value in labels:
                label_values.setdefault(label, set()).add(value)
        assert label_values.get("forward", set()) <= {"web", "game"}, label_values["forward"]
    relay_after, relay_before = after["relay"], before["relay"]
    opened = relay_after.get(
        "sshrelay_forward_flows_opened_total", role="relay", forward="game"
    ) - relay_before.get("sshrelay_forward_flows_opened_total", role="relay", forward="game")
    assert opened >= udp_peers, f"{opened} flows opened for {udp_peers} peers"
    streams = relay_after.get("sshrelay_forward_streams_opened_total", role="relay", forward="web")
    assert streams >= tcp_connections
