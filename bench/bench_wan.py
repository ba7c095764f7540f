"""One TCP stream over a long link: sshrelay versus ``ssh -R``, through a delay proxy.

    python bench/bench_wan.py [--rtt-ms 20 50 100] [--reps 3] [--seconds 8]

For each round-trip time, a ``bench/delay_proxy.py`` sits between the client and
the server of both tunnels (a private OpenSSH sshd with ``ssh -R``, and ``relay
serve`` with ``relay connect``; the same set-up code as ``bench/suite.py``), and
``iperf3 -c`` pushes one stream through each public port to an ``iperf3 -s`` on
the client side, alternating the order per repetition. A single stream over a
long link is bounded by window / RTT: OpenSSH's channel window is 2 MiB, and
sshrelay's stream window starts at 512 KiB and grows while a stream is
window-limited (``max_stream_window``, docs/protocol.md section 8). Everything
runs on 127.0.0.1; the proxy adds delay, not a bandwidth limit.

Writes ``bench/results/wan.json`` and prints a Markdown table (medians, min-max).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite as S
from bench_tunnel import summary

HERE = Path(__file__).resolve().parent
PROXY = HERE / "delay_proxy.py"


def start_proxy(procs: S.Procs, target: int, rtt_ms: float) -> int:
    proc = procs.start(
        [sys.executable, str(PROXY), "--target", str(target), "--rtt-ms", f"{rtt_ms:g}"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("ready "):
        raise S.SuiteError(f"delay proxy did not start: {line!r}")
    return int(line.split()[1])


def growths(urls: list[str]) -> float:
    total = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue
        for match in re.finditer(r"^sshrelay_stream_window_growths_total\{.*\} (\S+)$", text, re.M):
            total += float(match.group(1))
    return total


def run_rtt(rtt_ms: float, reps: int, seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sshrelay-wan-"))
    procs = S.Procs()
    try:
        iperf3 = S.need("iperf3", "iperf3")
        iperf_port = S.free_port()
        server = procs.start(
            [iperf3, "-s", "-B", S.LOOPBACK, "-p", str(iperf_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        S.wait_bound("tcp", iperf_port, server, "iperf3 server")
        sshd = S.start_sshd(procs, tmp)
        via_sshd = dataclasses.replace(sshd, port=start_proxy(procs, sshd.port, rtt_ms))
        ssh = S.start_ssh_forward(procs, tmp, via_sshd, [iperf_port], f"wan{rtt_ms:g}")
        tunnel = S.start_sshrelay(
            procs,
            tmp,
            {"tcp": str(iperf_port)},
            f"wan{rtt_ms:g}",
            via=lambda port: start_proxy(procs, port, rtt_ms),
        )
        ports = {"ssh": ssh.remote[iperf_port], "sshrelay": tunnel.ports["tcp"]}
        results: dict[str, list[float | None]] = {"ssh": [], "sshrelay": []}
        for rep in range(reps):
            order = ["ssh", "sshrelay"] if rep % 2 == 0 else ["sshrelay", "ssh"]
            for path in order:
                S.wait_iperf_idle(iperf_port)
                r = S.iperf_client(procs, ports[path], seconds)
                results[path].append(r.get("mb_per_s"))
                S.log(f"rtt {rtt_ms:g} ms rep {rep + 1} {path:8} {r.get('mb_per_s')} MB/s")
        return {
            "rtt_ms": rtt_ms,
            "mb_per_s": results,
            "summary": {path: summary(values) for path, values in results.items()},
            "sshrelay_window_growths": growths(tunnel.metrics),
        }
    finally:
        procs.stop_all()


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(stat: dict[str, float] | None) -> str:
        if not stat:
            return "n/a"
        return f"{stat['median']:,.1f} ({stat['min']:,.1f}-{stat['max']:,.1f})"

    lines = [
        "| RTT | ssh -R, MB/s | sshrelay, MB/s | sshrelay / ssh -R | window growths |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s, r = row["summary"]["ssh"], row["summary"]["sshrelay"]
        ratio = f"{r['median'] / s['median']:.2f}" if s and r and s["median"] else "n/a"
        lines.append(
            f"| {row['rtt_ms']:g} ms | {cell(s)} | {cell(r)} | {ratio} | "
            f"{row['sshrelay_window_growths']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[20.0, 50.0, 100.0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "wan.json")
    args = parser.parse_args()
    started = time.monotonic()
    rows = [run_rtt(rtt, args.reps, args.seconds) for rtt in args.rtt_ms]
    results = {
        "machine": S.machine(),
        "settings": vars(args) | {"json": str(args.json)},
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
