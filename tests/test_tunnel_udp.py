"""UDP through the real tunnel: one flow per public peer, boundaries kept, idle expiry.

The UDP target (in this test process) answers every datagram with the same
bytes reversed and records the source address it came from, so a test sees
both what crossed the tunnel and which flow (source port) carried it.
"""

from __future__ import annotations

import os
import selectors
import socket
import time

import pytest

LOOPBACK = "127.0.0.1"


def _peer() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


def _exchange(sock: socket.socket, port: int, payload: bytes, tries: int = 3) -> bytes:
    """Send ``payload`` to the public port until one reply comes (bounded tries)."""
    sock.settimeout(3.0)
    for _ in range(tries):
        sock.sendto(payload, (LOOPBACK, port))
        try:
            reply, addr = sock.recvfrom(65_536)
        except TimeoutError:
            continue
        assert addr == (LOOPBACK, port), f"reply from {addr}, not from the public port"
        return reply
    raise AssertionError(f"no reply to a {len(payload)}-byte datagram after {tries} tries")


@pytest.mark.timeout(60)
def test_50_peers_on_one_port_each_get_only_their_own_replies(bed, targets):
    peers_count, rounds = 50, 3
    target = targets.udp()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port, "udp"))
    port = tunnel.ports[0]

    peers = [_peer() for _ in range(peers_count)]
    selector = selectors.DefaultSelector()
    try:
        for index, sock in enumerate(peers):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        replies: dict[int, list[bytes]] = {index: [] for index in range(peers_count)}
        for round_no in range(rounds):
            wanted = set(range(peers_count))
            for attempt in range(3):  # resend to peers whose reply was lost (bounded)
                for index in sorted(wanted):
                    message = f"peer {index:02d} round {round_no} try {attempt} ".encode()
                    peers[index].sendto(message + os.urandom(100), (LOOPBACK, port))
                deadline = time.monotonic() + 3.0
                while wanted and time.monotonic() < deadline:
                    for key, _ in selector.select(timeout=0.1):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        while True:
                            try:
                                data, addr = sock.recvfrom(65_536)
                            except BlockingIOError:
                                break
                            assert addr == (LOOPBACK, port)
                            replies[key.data].append(data)
                            wanted.discard(key.data)
                if not wanted:
                    break
            assert not wanted, f"round {round_no}: no reply for peers {sorted(wanted)}"

        for index, got in replies.items():
            own = f"peer {index:02d} ".encode()
            for reply in got:
                request = reply[::-1]
                assert request.startswith(own), (
                    f"peer {index} received a reply meant for {request[:8]!r}"
                )
        # The target saw one distinct source (one flow) per public peer, stable per peer.
        sources_by_peer: dict[str, set[tuple[str, int]]] = {}
        for addr, data in list(target.received):
            sources_by_peer.setdefault(data[:7].decode(), set()).add(addr)
        assert len(sources_by_peer) == peers_count
        for peer, sources in sources_by_peer.items():
            assert len(sources) == 1, f"{peer} reached the target from {sources}"
        assert len(target.sources()) == peers_count, (
            f"the target saw {len(target.sources())} source addresses for {peers_count} peers"
        )
    finally:
        selector.close()
        for sock in peers:
            sock.close()


@pytest.mark.timeout(60)
def test_datagrams_up_to_65507_bytes_arrive_whole_both_ways(bed, targets):
    target = targets.udp()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port, "udp"))

    with _peer() as sock:
        for size in (1, 1200, 1472, 9000, 65_507):
            payload = os.urandom(size)
            before = len(target.received)
            reply = _exchange(sock, tunnel.ports[0], payload)
            # peer -> target: the target got exactly this datagram, in one piece
            arrived = [data for _, data in target.received[before:]]
            assert arrived and all(data == payload for data in arrived), (
                f"{size} B toward the target arrived as sizes {[len(d) for d in arrived]}"
            )
            # target -> peer: the reply came back in one piece
            assert len(reply) == size, f"{size} B reply arrived as {len(reply)} B"
            assert reply == payload[::-1]
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            extra, _ = sock.recvfrom(65_536)  # nothing split off or duplicated is left over
            pytest.fail(f"unexpected extra datagram of {len(extra)} B")


def _source_of(target, marker: bytes, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    def find():  # type: ignore[no-untyped-def]
        for addr, data in list(target.received):
            if data == marker:
                return addr
        return None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"the target never received {marker!r}")


@pytest.mark.timeout(60)
def test_idle_flow_expires_and_the_same_peer_then_gets_a_fresh_flow(bed, targets):
    idle = 1.0
    target = targets.udp()
    relay = bed.serve()
    config = bed.write(
        "client.toml",
        f"""
[connect]
server = "127.0.0.1:{relay.port}"
identity = "{bed.keys.client}"
known_hosts = "{bed.known_hosts}"
accept_new = true

[[connect.forwards]]
name = "game"
spec = "{bed.forward(target.port, "udp")}"
idle_timeout = {idle}
""",
    )
    argv = [*bed.relay_argv(), "connect", "--config", str(config), *bed.metrics_args]
    proc = bed.start(argv, "relay connect")
    port = int(proc.wait_line(r"^relay: forward game up: relay udp \S+:(\d+) -> ").group(1))

    with _peer() as sock:
        # Active for 2 idle timeouts, a datagram every 0.3 idle: expiry counts from the
        # last activity, so the flow (the source port the target sees) must not change.
        first = None
        for step in range(7):
            marker = f"keepalive {step}".encode()
            _exchange(sock, port, marker)
            source = _source_of(target, marker)
            first = first or source
            assert source == first, f"flow changed while active (step {step})"
            time.sleep(idle * 0.3)
        # Silent for twice the idle timeout: the flow expires on both ends.
        time.sleep(idle * 2)
        _exchange(sock, port, b"after idle")
        fresh = _source_of(target, b"after idle")
        assert fresh != first, "the same flow carried traffic after its idle timeout"
        # The fresh flow works both ways and is stable.
        _exchange(sock, port, b"again")
        assert _source_of(target, b"again") == fresh


@pytest.mark.timeout(60)
def test_udp_idle_timeout_flag_applies_to_every_udp_forward(bed, targets):
    target = targets.udp()
    relay = bed.serve()
    tunnel = bed.connect(
        relay, bed.forward(target.port, "udp"), extra=["--udp-idle-timeout", "0.5"]
    )
    with _peer() as sock:
        _exchange(sock, tunnel.ports[0], b"one")
        first = _source_of(target, b"one")
        time.sleep(1.2)
        _exchange(sock, tunnel.ports[0], b"two")
        assert _source_of(target, b"two") != first
