"""`relay status` reads a running end's /metrics and prints a per-forward summary."""

from __future__ import annotations

import re
import socket
import time

LOOPBACK = "127.0.0.1"


def _metrics_address(proc) -> str:  # type: ignore[no-untyped-def]
    return proc.wait_line(r"^relay: metrics on http://(\S+)/metrics").group(1)


def test_status_summarises_both_ends_with_rates_and_rtt(bed, targets) -> None:  # type: ignore[no-untyped-def]
    relay = bed.serve()
    echo = targets.udp()  # echoes each datagram
    config = bed.write("fast-ping.toml", "[connect]\nping_interval = 0.2\n")
    tunnel = bed.connect(
        relay,
        f"wg={LOOPBACK}:0:{LOOPBACK}:{echo.port}/udp",
        extra=["--config", str(config)],
    )
    relay_metrics = _metrics_address(relay.proc)
    client_metrics = _metrics_address(tunnel.proc)
    public = tunnel.ports[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    try:
        # Traffic during the status run's two scrapes, bounded: at most 3 s of 200/s.
        status = bed.start(
            [*bed.relay_argv(), "status", "--metrics", relay_metrics, "--metrics", client_metrics]
        )
        deadline = time.monotonic() + 3
        while status.running() and time.monotonic() < deadline:
            sock.sendto(b"x" * 500, (LOOPBACK, public))
            sock.recv(2048)
            time.sleep(0.005)
        assert status.wait(10) == 0, status.describe()
    finally:
        sock.close()
    out = status.stdout
    assert f"relay at http://{relay_metrics}/metrics" in out
    assert f"client at http://{client_metrics}/metrics" in out
    assert out.count("tunnel UP, 1 session") == 2, out
    rows = re.findall(r"^  wg\s+udp\s+(\S+ \S+)\s+(\S+ \S+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
    assert len(rows) == 2, out
    for _, _, dgrams_in, dgrams_out, flows in rows:
        assert int(dgrams_in) > 50 and int(dgrams_out) > 50, out  # ~200/s were flowing
        assert int(flows) == 1
    assert re.search(r"RTT p50 \d+\.\d\d ms, p99 \d+\.\d\d ms", out), out
    assert "datagrams dropped: none" in out


def test_status_without_a_running_end_says_so_and_fails(bed) -> None:  # type: ignore[no-untyped-def]
    port = bed.free_port()
    result = bed.relay("status", "--metrics", f"{LOOPBACK}:{port}")
    assert result.code == 1
    assert f"no sshrelay metrics at http://{LOOPBACK}:{port}/metrics" in result.stdout
