"""A TCP proxy on 127.0.0.1 that delays every byte by a fixed time in each direction.

Stands in for a long link where ``tc netem`` is not available: bytes read from one
side are written to the other ``rtt/2`` later, in order, with no bandwidth limit,
so a transfer through it is bounded by its windows and the round-trip time, as on
a long fat network. Used by ``bench/bench_wan.py``.

    python bench/delay_proxy.py --listen PORT --target PORT --rtt-ms 50

Prints ``ready PORT`` once listening; exits after ``--max-seconds`` (default 600).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections import deque

import uvloop

READ_SIZE = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader -> writer, each chunk ``delay`` seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue: deque[tuple[float, bytes]] = deque()
    ready = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not queue:
                if done:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                ready.clear()
                await ready.wait()
            due, data = queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(READ_SIZE):
            queue.append((loop.time() + delay, data))
            ready.set()
    finally:
        done = True
        ready.set()
        await task


async def _serve(args: argparse.Namespace) -> None:
    delay = args.rtt_ms / 2000.0

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", args.target)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, server_w, delay), _pipe(server_r, client_w, delay))
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await asyncio.sleep(args.max_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, default=0)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
