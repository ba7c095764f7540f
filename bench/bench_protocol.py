"""Protocol-core throughput: frames encoded and decoded per second through a MuxPair.

One process, one core, no sockets: the relay multiplexer queues frames, the
client multiplexer decodes them (``data_to_send`` -> ``receive_data``), events
included. This is the ceiling the core puts on the tunnel.

    python bench/bench_protocol.py [--runs 5] [--seconds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

from sshrelay.protocol.config import MuxConfig
from sshrelay.protocol.pair import MuxPair

BATCH = 32  # frames per data_to_send(): what one channel write carries under load


def datagrams(seconds: float, size: int = 1200) -> float:
    pair = MuxPair().handshake()
    relay, client = pair.relay, pair.client
    flow = relay.open_flow(1, {"peer": "203.0.113.7:4000"}, 60.0, 0.0)
    pair.drain()
    payload = bytes(size)
    frames = 0
    now = 0.0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(200):
            for _ in range(BATCH):
                relay.send_datagram(flow, payload, now)
            events = client.receive_data(relay.data_to_send(None, now), now)
            frames += len(events)
    return frames / (time.perf_counter() - start)


def stream_chunks(seconds: float, chunk: int = 16384) -> float:
    config = MuxConfig(stream_chunk=chunk)
    pair = MuxPair(config, config).handshake()
    relay, client = pair.relay, pair.client
    sid = relay.open_stream(1, {})
    pair.drain()
    client.accept_stream(sid)
    pair.drain()
    data = bytes(chunk * BATCH)
    chunks = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            relay.send_stream_data(sid, data[: relay.send_window(sid)])
            events = client.receive_data(relay.data_to_send(None, 0.0), 0.0)
            for event in events:
                client.acknowledge_received_data(sid, len(event.data))  # type: ignore[attr-defined]
                chunks += 1
            relay.receive_data(client.data_to_send(None, 0.0), 0.0)
    return chunks / (time.perf_counter() - start)


def measure(fn: Callable[[float], float], runs: int, seconds: float) -> dict[str, float]:
    samples = [fn(seconds) for _ in range(runs)]
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    results = {
        "datagram_frames_per_s_1200B": measure(datagrams, args.runs, args.seconds),
        "stream_chunks_per_s_16KiB": measure(stream_chunks, args.runs, args.seconds),
        "runs": args.runs,
        "seconds": args.seconds,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    dg = results["datagram_frames_per_s_1200B"]
    st = results["stream_chunks_per_s_16KiB"]
    assert isinstance(dg, dict) and isinstance(st, dict)
    print(f"| 1200 B datagram frames/s | {dg['median']:,.0f} | {dg['min']:,.0f}-{dg['max']:,.0f} |")
    print(
        f"| 16 KiB stream chunks/s | {st['median']:,.0f} ({st['median'] * 16384 / 1e6:,.0f} MB/s)"
        f" | {st['min']:,.0f}-{st['max']:,.0f} |"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
