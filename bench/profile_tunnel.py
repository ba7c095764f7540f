"""Sample both ends of a tunnel with py-spy under three loads; save stacks and summaries.

    pip install py-spy
    python bench/profile_tunnel.py [--out bench/results/profiles] [--seconds 5]

Starts ``relay serve`` and ``relay connect`` on 127.0.0.1 like ``bench/bench_tunnel.py``
(same targets and helpers) and, for each load, records the relay and the client with
``py-spy record -f raw --nonblocking`` while the load runs:

* ``bulk-tcp``: one TCP connection pushing as fast as it can (public -> target);
* ``udp-1200``: 1200-byte datagrams one way at a fixed 60,000/s;
* ``idle-rtt``: 64-byte echo probes at 1,000/s (the latency case).

For each (load, end) it writes ``<load>-<end>.pyspy.txt`` (collapsed stacks, for any
flamegraph tool) and ``<load>-<end>.summary.txt`` (self and inclusive shares per
function), plus the CPU seconds each end used from ``/proc/PID/stat`` and what the
load moved, in ``profiles.json``. py-spy's sampling slows the ends a little, so the
loads' own numbers here are not benchmark results.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tunnel as bt
from suite import cpu_seconds

RATE = 300  # samples per second, as the earlier profiles


def summarise(raw: Path, out: Path, top: int = 30) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"total samples {total}", "--- self"]
    lines += [f"{100 * n / total:5.1f}% {f}" for f, n in own.most_common(top)]
    lines += ["--- inclusive"]
    lines += [f"{100 * n / total:5.1f}% {f}" for f, n in inclusive.most_common(top + 20)]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/profiles"))
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("profile_tunnel: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = args.seconds
    results: dict[str, Any] = {"seconds": seconds, "rate_hz": RATE, "loads": {}}
    with bt.workspace() as (tmp, procs):
        targets = {
            role: bt.Target(procs, role, 600) for role in ("tcp-sink", "udp-sink", "udp-echo")
        }
        tunnel = bt.start_tunnel(procs, tmp, targets)
        ends = {"relay": tunnel.relay.pid, "client": tunnel.client.pid}
        time.sleep(0.5)
        loads = {
            "bulk-tcp": lambda: bt.tcp_stream(
                tunnel.ports["tcp"], targets["tcp-sink"], seconds + 1, 1
            ),
            "udp-1200": lambda: bt.udp_trial(
                tunnel.ports["udp"], targets["udp-sink"], 60_000, seconds + 1, 2
            ),
            "idle-rtt": lambda: bt.udp_rtt(tunnel.ports["echo"], seconds + 1),
        }
        for name, run in loads.items():
            before = {end: cpu_seconds([pid]) for end, pid in ends.items()}
            spies = {
                end: subprocess.Popen(
                    [spy, "record", "-f", "raw", "-r", str(RATE), "--nonblocking", "-d",
                     f"{seconds:g}", "-o", str(args.out / f"{name}-{end}.pyspy.txt"),
                     "--pid", str(pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for end, pid in ends.items()
            }  # fmt: skip
            outcome = run()
            for proc in spies.values():
                proc.wait(timeout=seconds + 30)
            used = {end: round(cpu_seconds([pid]) - before[end], 2) for end, pid in ends.items()}
            for end in ends:
                raw = args.out / f"{name}-{end}.pyspy.txt"
                if raw.exists():
                    summarise(raw, args.out / f"{name}-{end}.summary.txt")
            brief = {k: v for k, v in outcome.items() if not isinstance(v, (list, dict))}
            results["loads"][name] = {"cpu_seconds": used, "load": brief}
            print(f"{name}: cpu {used} load {brief}", flush=True)
    (args.out / "profiles.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
