"""End-to-end tunnel benchmark: sshrelay versus the same targets reached directly.

`relay serve` and `relay connect` run as two separate `relay` processes on 127.0.0.1 with
throwaway keys in a temporary directory. The targets (a TCP sink, a UDP sink, a UDP echo) and
every load generator run as further processes (``bench/loadgen.py``), never inside the relay's
or the client's process. Each repetition measures, through the tunnel and directly:

1. TCP single stream: one connection pushes for ``--seconds`` into the sink; MB/s counted at
   the sink (first byte to EOF); bytes received must equal bytes sent.
2. UDP 1200-byte datagrams/s one way at < 1 % loss: a paced sender at a fixed rate, the sink
   counts; the rate is stepped up and bisected (bounded steps). Wrong-size datagrams: must be 0.
3. UDP RTT p50/p99 of 64-byte probes at 1,000/s to the echo, idle and while a separate process
   pushes bulk TCP as fast as it can through the same path into the TCP sink.

    python bench/bench_tunnel.py [--runs 5] [--seconds 2] [--json FILE] [--markdown]

Tunnel and direct are interleaved (order alternating per run) so that machine noise hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
LOOPBACK = "127.0.0.1"
UDP_SIZE = 1200
RTT_SIZE = 64
RTT_RATE = 1000.0
LOSS_LIMIT = 0.01
UDP_GRACE = 0.6  # seconds to wait for in-flight datagrams (relay drops after 0.25 s)
STARTUP_TIMEOUT = 20.0
PATHS = ("sshrelay", "direct")


class BenchError(RuntimeError):
    pass


def relay_command() -> list[str]:
    script = Path(sys.executable).parent / "relay"
    if script.exists():
        return [str(script)]
    found = shutil.which("relay")
    return [found] if found else [sys.executable, "-m", "sshrelay"]


# ---------------------------------------------------------------- processes


class LineReader:
    """Reads whole lines from a child's stdout pipe with a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line from child process")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError("child process closed its stdout")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")


@dataclass
class Procs:
    """Every process the benchmark started, so that ``finally`` can end them all."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)
        self.children.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
        deadline = time.monotonic() + 3.0
        for proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2.0)
        for proc in self.children:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


class Target:
    """A long-lived loadgen target with a ``stats`` command channel on stdin/stdout."""

    def __init__(self, procs: Procs, role: str, max_seconds: float) -> None:
        self.role = role
        self.proc = procs.start(
            [sys.executable, str(LOADGEN), role, "--max-seconds", str(max_seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.reader = LineReader(self.proc)
        line = self.reader.readline(STARTUP_TIMEOUT)
        if not line.startswith("ready "):
            raise BenchError(f"{role}: unexpected start-up line {line!r}")
        self.port = int(line.split()[1])

    def stats(self, tag: str = "") -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"stats {tag}\n".encode())
        self.proc.stdin.flush()
        return dict(json.loads(self.reader.readline(10.0)))


def run_loadgen(args: list[str], timeout: float) -> dict[str, Any]:
    """Run one bounded load generator; its JSON result, or ``{"error": ...}``."""
    try:
        done = subprocess.run(
            [sys.executable, str(LOADGEN), *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"loadgen {args[0]} killed after {timeout:g} s"}
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"loadgen {args[0]} exit {done.returncode}: {done.stderr.decode()[-300:]}"}
    return dict(json.loads(lines[-1]))


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if regex.search(line):
                return line
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode} before {pattern!r}")
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {pattern!r} in {path}")


@dataclass
class Tunnel:
    relay: subprocess.Popen[bytes]
    client: subprocess.Popen[bytes]
    ports: dict[str, int]
    logs: list[Path]
    metrics: list[str]

    def alive(self) -> bool:
        return self.relay.poll() is None and self.client.poll() is None

    def obituary(self) -> str:
        """Exit codes and the last log lines of both ends, for the problem report."""
        lines = [f"relay rc={self.relay.poll()}, client rc={self.client.poll()}"]
        for path in self.logs:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-8:]
                lines += [f"  {path.name}: {line}" for line in tail]
        return "\n".join(lines)


def start_tunnel(procs: Procs, tmp: Path, targets: dict[str, Target], attempt: int = 1) -> Tunnel:
    relay = relay_command()
    for name in ("host_ed25519", "client_ed25519"):
        if not (tmp / name).exists():
            subprocess.run(
                [*relay, "keygen", str(tmp / name)], check=True, capture_output=True, timeout=30
            )
    shutil.copy(tmp / "client_ed25519.pub", tmp / "authorized_keys")
    out, err = tmp / f"relay-{attempt}.out", tmp / f"relay-{attempt}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        server = procs.start(
            [
                *relay,
                "serve",
                "--listen",
                f"{LOOPBACK}:0",
                "--host-key",
                str(tmp / "host_ed25519"),
                "--authorized-keys",
                str(tmp / "authorized_keys"),
                "--metrics",
                f"{LOOPBACK}:0",  # on, as by default, but on a free port
            ],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    line = wait_for_line(out, r"listening on [\d.]+:\d+", server, STARTUP_TIMEOUT)
    ssh_port = int(re.search(r"listening on [\d.]+:(\d+)", line).group(1))  # type: ignore[union-attr]
    forwards = {
        "tcp": f"tcp=127.0.0.1:0:{LOOPBACK}:{targets['tcp-sink'].port}",
        "udp": f"udp=127.0.0.1:0:{LOOPBACK}:{targets['udp-sink'].port}/udp",
        "echo": f"echo=127.0.0.1:0:{LOOPBACK}:{targets['udp-echo'].port}/udp",
    }
    cout, cerr = tmp / f"client-{attempt}.out", tmp / f"client-{attempt}.err"
    argv = [
        *relay,
        "connect",
        f"{LOOPBACK}:{ssh_port}",
        "-i",
        str(tmp / "client_ed25519"),
        "--known-hosts",
        str(tmp / "known_hosts"),
        "--accept-new",
        "--metrics",
        f"{LOOPBACK}:0",
    ]
    for spec in forwards.values():
        argv += ["-R", spec]
    with cout.open("wb") as stdout, cerr.open("wb") as stderr:
        client = procs.start(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    ports: dict[str, int] = {}
    for name in forwards:
        line = wait_for_line(cout, rf"forward {name} up: ", client, STARTUP_TIMEOUT)
        match = re.search(r"up: relay \w+ ([\d.]+):(\d+) ->", line)
        if match is None or match.group(1) != LOOPBACK:
            raise BenchError(f"unexpected forward line {line!r}")
        ports[name] = int(match.group(2))
    metrics = []
    for path in (out, cout):
        found = re.search(r"metrics on (http://\S+)", path.read_text(errors="replace"))
        if found:
            metrics.append(found.group(1))
    return Tunnel(server, client, ports, [err, cerr, out, cout], metrics)


# ---------------------------------------------------------------- measurements


class Tags:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def tcp_stream(port: int, sink: Target, seconds: float, tag: int) -> dict[str, Any]:
    text = f"{tag:08d}"
    push = run_loadgen(
        ["tcp-push", "--port", str(port), "--seconds", str(seconds), "--tag", text],
        timeout=seconds + 25,
    )
    got: dict[str, Any] = {"found": False}
    for _ in range(20):  # the push waits for EOF from the far end; this is only a safety net
        got = sink.stats(text)
        if got.get("found") and got.get("eof"):
            break
        time.sleep(0.1)
    received = int(got.get("bytes", 0))
    elapsed = float(got.get("seconds", 0.0)) or float(push.get("seconds", 0.0)) or 1.0
    return {
        "mb_per_s": received / elapsed / 1e6,
        "sent": push.get("sent"),
        "received": received,
        "complete": bool(got.get("eof")) and received == push.get("sent"),
        "push": push,
    }


def udp_trial(port: int, sink: Target, rate: float, seconds: float, tag: int) -> dict[str, Any]:
    args = ["udp-pace", "--port", str(port), "--rate", f"{rate:.0f}", "--seconds", str(seconds)]
    sent = run_loadgen([*args, "--tag", str(tag), "--size", str(UDP_SIZE)], timeout=seconds + 15)
    time.sleep(UDP_GRACE)
    got = sink.stats(str(tag))
    n = int(sent.get("sent", 0))
    received = int(got.get("received", 0))
    return {
        "rate": rate,
        "sent": n,
        "achieved_rate": sent.get("achieved_rate", 0.0),
        "received": received,
        "loss": 1.0 - received / n if n else 1.0,
        "wrong_size": int(got.get("wrong_size", 0)),
        "duplicates": int(got.get("duplicates", 0)),
        "send_errors": sent.get("send_errors"),
        "error": sent.get("error"),
    }


def udp_search(
    port_of: Callable[[], int | None],
    sink: Target,
    seconds: float,
    start: float,
    max_steps: int,
    tags: Tags,
) -> dict[str, Any]:
    """Highest paced rate with < 1 % loss: step up until a failure, then bisect; bounded.

    ``port_of()`` gives the port to send to before each trial (None: the path is gone).
    """
    lo, hi = 0.0, 0.0  # highest rate that passed, lowest that failed (0: none yet)
    best: dict[str, Any] | None = None
    factor = 2.0 if start <= 10_000 else 1.25
    rate = start
    trials: list[dict[str, Any]] = []
    sender_limited = False
    for _ in range(max_steps):
        port = port_of()
        if port is None:
            break
        trial = udp_trial(port, sink, rate, seconds, tags())
        trials.append(trial)
        passed = trial["loss"] < LOSS_LIMIT and not trial["error"]
        if passed and trial["achieved_rate"] < 0.9 * rate:
            sender_limited = True  # the load generator itself cannot go faster
            if trial["achieved_rate"] > lo:
                lo, best = trial["achieved_rate"], trial
            break
        if passed:
            lo, best = rate, trial
        else:
            hi = rate
        if hi and lo and hi / lo < 1.08:
            break
        if hi:
            rate = (lo + hi) / 2 if lo else rate / factor
        else:
            rate *= factor
        if rate < 250:
            break
    return {
        # what the sender really offered at the best passing trial (a little under the
        # requested rate when the sender was starved); the search itself steps requested rates
        "rate": best["achieved_rate"] if best else 0.0,
        "requested_rate": lo,
        "delivered_per_s": best["received"] / seconds if best else 0.0,
        "loss_at_rate": best["loss"] if best else None,
        "sender_limited": sender_limited,
        "wrong_size": sum(t["wrong_size"] for t in trials),
        "duplicates": sum(t["duplicates"] for t in trials),
        "trials": trials,
    }


def udp_rtt(port: int, seconds: float) -> dict[str, Any]:
    return run_loadgen(
        ["udp-rtt", "--port", str(port), "--rate", str(RTT_RATE), "--seconds", str(seconds)],
        timeout=seconds + 15,
    )


def udp_rtt_loaded(
    procs: Procs, echo_port: int, bulk_port: int, sink: Target, seconds: float, tag: int
) -> dict[str, Any]:
    """RTT probes while a separate process pushes TCP as fast as it can along the same path."""
    text = f"{tag:08d}"
    bulk = procs.start(
        [
            sys.executable,
            str(LOADGEN),
            "tcp-push",
            "--port",
            str(bulk_port),
            "--seconds",
            str(seconds + 1.0),
            "--tag",
            text,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # let the bulk stream fill the pipes first
        rtt = udp_rtt(echo_port, seconds)
        try:
            out, _ = bulk.communicate(timeout=seconds + 25)
            push = json.loads(out.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, IndexError, ValueError):
            push = {"error": "bulk pusher did not finish"}
    finally:
        if bulk.poll() is None:
            bulk.kill()
            bulk.wait(5)
    got = sink.stats(text)
    elapsed = float(got.get("seconds", 0.0)) or 1.0
    rtt["bulk_mb_per_s"] = int(got.get("bytes", 0)) / elapsed / 1e6
    rtt["bulk_complete"] = bool(got.get("eof")) and got.get("bytes") == push.get("sent")
    rtt["bulk_error"] = push.get("error")
    return rtt


# ---------------------------------------------------------------- reporting


def summary(values: list[float | None]) -> dict[str, float] | None:
    clean = [v for v in values if v is not None]
    if not clean:
        return None
    return {
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
    }


METRICS: list[tuple[str, str, str, str]] = [
    # key, label, format, how the ratio reads
    ("tcp_mb_per_s", "TCP single stream, MB/s", ",.0f", "x"),
    ("udp_rate_per_s", "UDP 1200 B datagrams/s at < 1 % loss", ",.0f", "x"),
    ("rtt_idle_p50_us", "UDP RTT p50 at 1,000/s, idle, us", ",.0f", "x"),
    ("rtt_idle_p99_us", "UDP RTT p99 at 1,000/s, idle, us", ",.0f", "x"),
    ("rtt_bulk_p50_us", "UDP RTT p50 at 1,000/s, bulk TCP running, us", ",.0f", "x"),
    ("rtt_bulk_p99_us", "UDP RTT p99 at 1,000/s, bulk TCP running, us", ",.0f", "x"),
    ("rtt_bulk_loss_pct", "RTT probes lost with bulk TCP running, %", ".2f", ""),
    ("bulk_mb_per_s", "bulk TCP during the RTT test, MB/s", ",.0f", "x"),
]


def samples(runs: list[dict[str, Any]], path: str) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {key: [] for key, *_ in METRICS}
    for run in runs:
        r = run.get(path, {})
        tcp = r.get("tcp") or {}
        udp = r.get("udp") or {}
        idle = r.get("rtt_idle") or {}
        bulk = r.get("rtt_bulk") or {}
        out["tcp_mb_per_s"].append(tcp.get("mb_per_s"))
        out["udp_rate_per_s"].append(udp.get("rate"))
        out["rtt_idle_p50_us"].append(idle.get("p50_us"))
        out["rtt_idle_p99_us"].append(idle.get("p99_us"))
        out["rtt_bulk_p50_us"].append(bulk.get("p50_us"))
        out["rtt_bulk_p99_us"].append(bulk.get("p99_us"))
        sent = bulk.get("sent")
        out["rtt_bulk_loss_pct"].append(100.0 * bulk["lost"] / sent if sent else None)
        out["bulk_mb_per_s"].append(bulk.get("bulk_mb_per_s"))
    return out


def cell(stat: dict[str, float] | None, fmt: str, prefix: str = "") -> str:
    if stat is None:
        return "n/a"
    return f"{prefix}{stat['median']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def markdown_table(results: dict[str, Any]) -> str:
    summ = results["summary"]
    direct_limited = results["direct_udp_sender_limited_runs"]
    rows = [
        "| measurement | sshrelay median (min-max) | direct median (min-max) | sshrelay / direct |",
        "|---|---:|---:|---:|",
    ]
    for key, label, fmt, _ in METRICS:
        tun, direct = summ["sshrelay"].get(key), summ["direct"].get(key)
        prefix = ">= " if key == "udp_rate_per_s" and direct_limited else ""
        ratio = "n/a"
        if tun and direct and direct["median"]:
            ratio = f"{tun['median'] / direct['median']:.2f}"
        if key == "rtt_bulk_loss_pct":
            ratio = ""
        rows.append(f"| {label} | {cell(tun, fmt)} | {cell(direct, fmt, prefix)} | {ratio} |")
    done = results["tcp_complete"]
    rows.append(
        "| TCP transfers with bytes received = bytes sent "
        f"| {done['sshrelay']} | {done['direct']} | |"
    )
    wrong = results["udp_wrong_size"]
    dup = results["udp_duplicates"]
    rows.append(
        f"| UDP datagrams with the wrong size (all trials) | {wrong['sshrelay']} "
        f"| {wrong['direct']} | |"
    )
    rows.append(
        f"| UDP duplicated datagrams (all trials) | {dup['sshrelay']} | {dup['direct']} | |"
    )
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, cwd=HERE, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "relay", "client", "protocol"],
            capture_output=True,
            cwd=HERE.parent,
            timeout=10,
        )
        commit = head.stdout.decode().strip() + (" (+local changes)" if dirty.stdout else "")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": commit,
    }


def drop_metrics(urls: list[str]) -> list[str]:
    """Non-zero drop/error counters both ends export (where lost datagrams went)."""
    lines: list[str] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode(errors="replace")
        except (OSError, ValueError) as exc:
            lines.append(f"{url}: {exc}")
            continue
        for line in text.splitlines():
            if line.startswith("sshrelay_") and re.search(r"drop|error|lost|expired", line):
                value = line.rsplit(" ", 1)[-1]
                with contextlib.suppress(ValueError):
                    if float(value) != 0:
                        lines.append(f"{url.split('/')[2]} {line}")
    return lines


def log_problems(paths: list[Path]) -> list[str]:
    """Warnings and errors the relay and client logged (the host-key notice is expected)."""
    lines: list[str] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "stored the relay's host key" in line:
                continue
            if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception", line):
                lines.append(f"{path.stem}: {line}")
    return lines[:50]


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def workspace() -> Iterator[tuple[Path, Procs]]:
    tmp = Path(tempfile.mkdtemp(prefix="sshrelay-bench-"))
    procs = Procs()
    try:
        yield tmp, procs
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    tags = Tags()
    max_life = 120.0 + args.runs * (args.seconds * 40 + 60)
    with workspace() as (tmp, procs):
        targets = {
            role: Target(procs, role, max_life) for role in ("tcp-sink", "udp-sink", "udp-echo")
        }
        tunnel = start_tunnel(procs, tmp, targets)
        tunnels = [tunnel]
        ports = {
            "sshrelay": tunnel.ports,
            "direct": {
                "tcp": targets["tcp-sink"].port,
                "udp": targets["udp-sink"].port,
                "echo": targets["udp-echo"].port,
            },
        }
        log(f"bench: tunnel up, forwards {tunnel.ports}; targets {ports['direct']}")
        udp_start = {path: float(args.udp_start) for path in PATHS}
        gave_up = False

        def usable(path: str) -> bool:
            """Direct always; the tunnel if alive, restarted (at most twice) if it died."""
            nonlocal tunnel, gave_up
            if path == "direct" or tunnel.alive():
                return True
            if gave_up:
                return False
            problems.append(f"tunnel died after run {len(runs)}: {tunnel.obituary()}")
            log(f"bench: {problems[-1]}")
            if len(tunnels) > 2:
                gave_up = True
                return False
            for proc in (tunnel.relay, tunnel.client):
                if proc.poll() is None:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
            try:
                tunnel = start_tunnel(procs, tmp, targets, len(tunnels) + 1)
            except BenchError as exc:
                problems.append(f"tunnel restart failed: {exc}")
                gave_up = True
                return False
            tunnels.append(tunnel)
            ports["sshrelay"] = tunnel.ports
            log(f"bench: tunnel restarted, forwards {tunnel.ports}")
            return True

        def udp_port(path: str) -> int | None:
            return ports[path]["udp"] if usable(path) else None

        for index in range(args.runs):
            order = PATHS if index % 2 == 0 else PATHS[::-1]
            run: dict[str, Any] = {path: {} for path in PATHS}
            for path in order:
                if usable(path):
                    r = tcp_stream(ports[path]["tcp"], targets["tcp-sink"], args.seconds, tags())
                    run[path]["tcp"] = r
                    if not r["complete"]:
                        problems.append(f"run {index + 1} {path} TCP stream incomplete: {r}")
                    log(f"run {index + 1} {path:8} tcp {r['mb_per_s']:8.1f} MB/s")
            for path in order:
                if usable(path):
                    r = udp_search(
                        functools.partial(udp_port, path),
                        targets["udp-sink"],
                        args.udp_seconds,
                        udp_start[path],
                        args.udp_steps if index == 0 else args.udp_steps_later,
                        tags,
                    )
                    run[path]["udp"] = r
                    if r["requested_rate"]:
                        udp_start[path] = r["requested_rate"]
                    steps = ", ".join(
                        f"{t['rate']:.0f}:{100 * t['loss']:.1f}%" for t in r["trials"]
                    )
                    log(f"run {index + 1} {path:8} udp {r['rate']:8.0f}/s  [{steps}]")
                    if r["wrong_size"]:
                        problems.append(f"{path}: {r['wrong_size']} wrong-size datagrams")
            for path in order:
                if usable(path):
                    r = udp_rtt(ports[path]["echo"], args.seconds)
                    run[path]["rtt_idle"] = r
                    log(f"run {index + 1} {path:8} rtt idle {r.get('p50_us')} / {r.get('p99_us')}")
            for path in order:
                if usable(path):
                    r = udp_rtt_loaded(
                        procs,
                        ports[path]["echo"],
                        ports[path]["tcp"],
                        targets["tcp-sink"],
                        args.seconds,
                        tags(),
                    )
                    run[path]["rtt_bulk"] = r
                    if r.get("bulk_error") or not r.get("bulk_complete"):
                        problems.append(f"run {index + 1} {path} bulk TCP: {r.get('bulk_error')}")
                    log(
                        f"run {index + 1} {path:8} rtt bulk {r.get('p50_us')} / "
                        f"{r.get('p99_us')} lost {r.get('lost')} bulk "
                        f"{r.get('bulk_mb_per_s', 0):.0f} MB/s"
                    )
            runs.append(run)
        problems += log_problems([p for t in tunnels for p in t.logs])
        sink_totals = targets["udp-sink"].stats()
        drops = drop_metrics(tunnel.metrics) if tunnel.alive() else []
    per_path = {path: samples(runs, path) for path in PATHS}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine(),
        "runs": args.runs,
        "seconds": args.seconds,
        "udp_seconds": args.udp_seconds,
        "udp_size": UDP_SIZE,
        "rtt_rate": RTT_RATE,
        "rtt_size": RTT_SIZE,
        "loss_limit": LOSS_LIMIT,
        "summary": {
            path: {key: summary(vals) for key, vals in per_path[path].items()} for path in PATHS
        },
        "direct_udp_sender_limited_runs": sum(
            1 for run in runs if (run["direct"].get("udp") or {}).get("sender_limited")
        ),
        "tunnel_udp_sender_limited_runs": sum(
            1 for run in runs if (run["sshrelay"].get("udp") or {}).get("sender_limited")
        ),
        "udp_wrong_size": {
            path: sum((run[path].get("udp") or {}).get("wrong_size", 0) for run in runs)
            + sum((run[path].get("rtt_idle") or {}).get("wrong_size", 0) for run in runs)
            + sum((run[path].get("rtt_bulk") or {}).get("wrong_size", 0) for run in runs)
            for path in PATHS
        },
        "tcp_complete": {
            path: "{}/{}".format(
                sum(
                    bool((run[path].get(kind) or {}).get(flag))
                    for run in runs
                    for kind, flag in (("tcp", "complete"), ("rtt_bulk", "bulk_complete"))
                ),
                2 * len(runs),
            )
            for path in PATHS
        },
        "udp_duplicates": {
            path: sum((run[path].get("udp") or {}).get("duplicates", 0) for run in runs)
            for path in PATHS
        },
        "udp_sink_totals": sink_totals,
        "problems": problems,
        "tunnel_starts": len(tunnels),
        "tunnel_drop_metrics": drops,
        "elapsed_seconds": time.monotonic() - started,
        "raw": runs,
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="TCP push and RTT window per run (default 2)"
    )
    parser.add_argument(
        "--udp-seconds", type=float, default=1.5, help="length of each UDP rate trial"
    )
    parser.add_argument("--udp-start", type=float, default=5000, help="first UDP rate tried")
    parser.add_argument("--udp-steps", type=int, default=9, help="UDP trials in the first run")
    parser.add_argument("--udp-steps-later", type=int, default=5, help="UDP trials in later runs")
    parser.add_argument("--json", metavar="FILE", help="write machine-readable results here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    if args.runs < 1 or args.seconds <= 0 or args.udp_seconds <= 0:
        parser.error("--runs must be >= 1 and durations > 0")
    try:
        results = bench(args)
    except BenchError as exc:
        print(f"bench_tunnel: {exc}", file=sys.stderr)
        return 1
    table = markdown_table(results)
    if args.markdown:
        print(table)
    else:
        print(table.replace("|---|---:|---:|---:|\n", ""))
    if results["problems"]:
        print("\nproblems seen:")
        for line in results["problems"]:
            print(f"  {line}")
    if results["tunnel_drop_metrics"]:
        print("\nnon-zero drop/error counters of the tunnel (last tunnel, whole run):")
        for line in results["tunnel_drop_metrics"]:
            print(f"  {line}")
    print(f"\n{results['elapsed_seconds']:.0f} s; {results['machine']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
