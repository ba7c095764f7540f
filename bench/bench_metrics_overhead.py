"""What metrics cost: tunnel CPU per datagram with metrics off versus on and scraped.

Two tunnels run side by side for the whole run, each a `relay serve` and a `relay connect`
process on 127.0.0.1 (throwaway keys in a temporary directory), each with one UDP forward
to the same UDP echo (``bench/loadgen.py udp-echo``, its own process):

- ``off``: ``--metrics off`` on both ends;
- ``on``:  ``--metrics 127.0.0.1:0`` on both ends, and a scraper hitting both ``/metrics``
  endpoints every second for the whole run: a real Prometheus (``scrape_interval: 1s``)
  when the ``prometheus`` binary is installed, else an HTTP GET loop in this process.

One measurement sends ``--rate`` x ``--seconds`` 1200-byte datagrams at a fixed rate
(never skipping: a late sender catches up) from a separate sender process through one
tunnel to the echo and counts the echoes that come back. The relay's and the client's CPU
seconds (utime + stime from /proc/PID/stat, all threads) are read just before the
sender starts and after the last echo (plus a 0.5 s grace); CPU per datagram is that
difference divided by the datagrams sent. Each of ``--reps`` repetitions measures both
tunnels, alternating which goes first, so that drift of the machine hits both alike.

    python bench/bench_metrics_overhead.py [--reps 6] [--rate 20000] [--seconds 5]
        [--scraper auto|prometheus|http] [--json FILE] [--markdown]

Note: the multiplexer bumps its plain-integer counters whether or not metrics are served
(there is no switch for them), so this measures the exporter: the HTTP server, the
collector reading the counters, and the scrapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tunnel import (  # noqa: E402  (bench/ is not a package)
    BenchError,
    Procs,
    Target,
    machine,
    relay_command,
    wait_for_line,
)

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 20.0
GRACE = 0.5  # seconds after the sender's end before the CPU is read again
MODES = ("off", "on")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the sender process


def sender(port: int, rate: float, count: int, size: int, grace: float) -> dict[str, Any]:
    """``count`` datagrams at ``rate``/s to 127.0.0.1:port; count the echoes (one process)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
    sock.connect((LOOPBACK, port))
    received = [0, 0]  # echoes, echoes of the wrong size
    stop = threading.Event()

    def receive() -> None:
        buf = bytearray(65536)
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError:  # ECONNREFUSED from an earlier send: nothing to read
                continue
            received[0] += 1
            if n != size:
                received[1] += 1

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    payload = os.urandom(size)
    sent = errors = 0
    max_behind = 0
    start = time.perf_counter()
    hard_deadline = start + 3 * count / rate + 5  # bounded even if starved
    while sent < count:
        now = time.perf_counter()
        if now > hard_deadline:
            break
        due = min(count, int((now - start) * rate) + 1) - sent
        max_behind = max(max_behind, due)
        for _ in range(due):
            try:
                sock.send(payload)
            except OSError:  # ENOBUFS / ECONNREFUSED: counted, never fatal
                errors += 1
            sent += 1
        if due <= 1:
            time.sleep(0.0005)
    send_seconds = time.perf_counter() - start
    end = time.monotonic() + grace + 1.0
    while received[0] < sent and time.monotonic() < end:
        time.sleep(0.01)
    stop.set()
    reader.join(1.0)
    sock.close()
    return {
        "sent": sent,
        "send_errors": errors,
        "echoes": received[0],
        "wrong_size": received[1],
        "send_seconds": send_seconds,
        "achieved_rate": sent / send_seconds if send_seconds > 0 else 0.0,
        "max_burst": max_behind,
    }


# ---------------------------------------------------------------- tunnels and scrapers


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


@dataclass
class Tunnel:
    mode: str
    relay: subprocess.Popen[bytes]
    client: subprocess.Popen[bytes]
    port: int  # public UDP port on the relay
    metrics: list[str]  # /metrics URLs (empty when off)

    def alive(self) -> bool:
        return self.relay.poll() is None and self.client.poll() is None


def make_keys(tmp: Path) -> None:
    for name in ("host_ed25519", "client_ed25519"):
        subprocess.run(
            [*relay_command(), "keygen", str(tmp / name)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    shutil.copy(tmp / "client_ed25519.pub", tmp / "authorized_keys")


def start_tunnel(procs: Procs, tmp: Path, mode: str, echo_port: int, metrics_on: bool) -> Tunnel:
    metrics = ["--metrics", f"{LOOPBACK}:0" if metrics_on else "off"]
    out, err = tmp / f"relay-{mode}.out", tmp / f"relay-{mode}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        relay = procs.start(
            [
                *relay_command(),
                "serve",
                "--listen",
                f"{LOOPBACK}:0",
                "--host-key",
                str(tmp / "host_ed25519"),
                "--authorized-keys",
                str(tmp / "authorized_keys"),
                *metrics,
            ],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    line = wait_for_line(out, r"listening on [\d.]+:\d+", relay, STARTUP_TIMEOUT)
    ssh_port = int(re.search(r"listening on [\d.]+:(\d+)", line).group(1))  # type: ignore[union-attr]
    cout, cerr = tmp / f"client-{mode}.out", tmp / f"client-{mode}.err"
    with cout.open("wb") as stdout, cerr.open("wb") as stderr:
        client = procs.start(
            [
                *relay_command(),
                "connect",
                f"{LOOPBACK}:{ssh_port}",
                "-i",
                str(tmp / "client_ed25519"),
                "--known-hosts",
                str(tmp / "known_hosts"),
                "--accept-new",
                *metrics,
                "-R",
                f"echo={LOOPBACK}:0:{LOOPBACK}:{echo_port}/udp",
            ],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    line = wait_for_line(cout, r"forward echo up: ", client, STARTUP_TIMEOUT)
    match = re.search(r"up: relay udp ([\d.]+):(\d+) ->", line)
    if match is None:
        raise BenchError(f"unexpected forward line {line!r}")
    urls = []
    for path in (out, cout):
        found = re.search(r"metrics on (http://\S+)", path.read_text(errors="replace"))
        if found:
            urls.append(found.group(1))
    if metrics_on and len(urls) != 2:
        raise BenchError(f"metrics on, but {len(urls)} /metrics URLs were printed")
    if not metrics_on and urls:
        raise BenchError(f"--metrics off, but metrics are served at {urls}")
    return Tunnel(mode, relay, client, int(match.group(2)), urls)


class HttpScraper:
    """GET both /metrics every second in a thread (when Prometheus is not installed)."""

    kind = "http GET loop in the benchmark process, every 1 s"

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.scrapes = dict.fromkeys(urls, 0)
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        response.read()
                    self.scrapes[url] += 1
                except OSError:
                    self.failures += 1
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))

    def report(self) -> dict[str, Any]:
        return {"kind": self.kind, "scrapes": dict(self.scrapes), "failures": self.failures}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


class PrometheusScraper:
    """A real Prometheus scraping both ends every second (its own process)."""

    kind = "Prometheus, scrape_interval 1s"

    def __init__(self, procs: Procs, binary: str, tmp: Path, urls: list[str]) -> None:
        targets = [url.removeprefix("http://").removesuffix("/metrics") for url in urls]
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
            + "".join(
                f"  - job_name: sshrelay-{role}\n"
                f"    static_configs:\n      - targets: ['{target}']\n"
                for role, target in zip(("relay", "client"), targets, strict=True)
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(3):
            with socket.socket() as probe:
                probe.bind((LOOPBACK, 0))
                self.port = probe.getsockname()[1]
            log = (tmp / f"prometheus-{attempt}.log").open("wb")
            self.proc = procs.start(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / f'tsdb-{attempt}'}",
                    f"--web.listen-address={LOOPBACK}:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._targets_up():
                    return
                time.sleep(0.2)
            if self.proc.poll() is None:
                raise BenchError("Prometheus did not scrape both ends within 20 s")
        raise BenchError("Prometheus could not start (3 tries)")

    def _api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}{path}", timeout=5) as r:
            return json.loads(r.read())["data"]

    def _targets_up(self) -> bool:
        try:
            active = self._api("/api/v1/targets")["activeTargets"]
        except (OSError, ValueError, KeyError):
            return False
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        with contextlib.suppress(OSError, ValueError, KeyError):
            rows = self._api("/api/v1/query?query=count_over_time(up%5B1h%5D)")["result"]
            out["scrapes"] = {r["metric"]["job"]: int(float(r["value"][1])) for r in rows}
            rows = self._api("/api/v1/query?query=sum_over_time(up%5B1h%5D)")["result"]
            out["successful_scrapes"] = {
                r["metric"]["job"]: int(float(r["value"][1])) for r in rows
            }
            rows = self._api("/api/v1/query?query=scrape_samples_scraped")["result"]
            out["samples_per_scrape"] = {
                r["metric"]["job"]: int(float(r["value"][1])) for r in rows
            }
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


# ---------------------------------------------------------------- measuring


def run_sender(port: int, rate: float, count: int, size: int) -> dict[str, Any]:
    timeout = 3 * count / rate + 20
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "sender",
            "--port",
            str(port),
            "--rate",
            str(rate),
            "--count",
            str(count),
            "--size",
            str(size),
        ],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"sender exit {done.returncode}: {done.stderr.decode()[-400:]}")
    return dict(json.loads(lines[-1]))


def measure(tunnel: Tunnel, echo: Target, rate: float, count: int, size: int) -> dict[str, Any]:
    if not tunnel.alive():
        raise BenchError(f"the {tunnel.mode} tunnel died")
    echoed_before = int(echo.stats()["echoed"])
    relay0, client0 = cpu_seconds(tunnel.relay.pid), cpu_seconds(tunnel.client.pid)
    wall0 = time.monotonic()
    sent = run_sender(tunnel.port, rate, count, size)
    time.sleep(GRACE)
    relay1, client1 = cpu_seconds(tunnel.relay.pid), cpu_seconds(tunnel.client.pid)
    wall = time.monotonic() - wall0
    echoed = int(echo.stats()["echoed"]) - echoed_before
    n = sent["sent"] or 1
    relay_cpu, client_cpu = relay1 - relay0, client1 - client0
    return {
        "mode": tunnel.mode,
        "window_seconds": wall,
        "relay_cpu_s": relay_cpu,
        "client_cpu_s": client_cpu,
        "relay_us_per_dgram": relay_cpu / n * 1e6,
        "client_us_per_dgram": client_cpu / n * 1e6,
        "total_us_per_dgram": (relay_cpu + client_cpu) / n * 1e6,
        "reached_echo": echoed,
        "loss_round_trip": 1.0 - sent["echoes"] / n,
        **{f"sender_{key}": value for key, value in sent.items()},
    }


def scrape_cost(tunnel: Tunnel, count: int) -> dict[str, Any]:
    """CPU of the scraped end per /metrics request: ``count`` GETs back to back, idle tunnel.

    Run before the scraper starts, so that these are the only requests.
    """
    out: dict[str, Any] = {}
    for role, proc, url in zip(
        ("relay", "client"), (tunnel.relay, tunnel.client), tunnel.metrics, strict=True
    ):
        size = 0
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        for _ in range(count):
            with urllib.request.urlopen(url, timeout=10) as response:
                size = len(response.read())
        cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - wall0
        out[role] = {
            "scrapes": count,
            "cpu_ms_per_scrape": cpu / count * 1e3,
            "wall_ms_per_scrape": wall / count * 1e3,
            "response_bytes": size,
        }
    return out


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


ROLES = (("relay", "relay"), ("client", "client"), ("total", "relay + client"))


def analyse(
    samples: list[dict[str, Any]], cost: dict[str, Any] | None, rate: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, _ in ROLES:
        key = f"{role}_us_per_dgram"
        by_mode = {mode: [s[key] for s in samples if s["mode"] == mode] for mode in MODES}
        off, on = summarize(by_mode["off"]), summarize(by_mode["on"])
        # Paired: each repetition's on/off ratio (both measured within seconds of each other).
        pairs = [b / a - 1.0 for a, b in zip(by_mode["off"], by_mode["on"], strict=True) if a > 0]
        out[role] = {
            "off": off,
            "on": on,
            "overhead_pct_of_medians": 100.0 * (on["median"] / off["median"] - 1.0),
            "overhead_pct_paired": summarize([100.0 * p for p in pairs]),
        }
        # What one scrape per second costs, as a share of what the traffic costs with
        # metrics off: CPU of one scrape / (CPU per datagram x datagrams per second).
        if cost is None:  # A/A control run: nothing is scraped
            continue
        scrape_ms = sum(cost[r]["cpu_ms_per_scrape"] for r in ("relay", "client"))
        if role != "total":
            scrape_ms = cost[role]["cpu_ms_per_scrape"]
        out[role]["scrape_cpu_ms"] = scrape_ms
        out[role]["scrape_share_pct_at_1_per_s"] = (
            100.0 * scrape_ms * 1e-3 / (off["median"] * 1e-6 * rate)
        )
    for mode in MODES:
        runs = [s for s in samples if s["mode"] == mode]
        out[f"loss_{mode}"] = summarize([100.0 * s["loss_round_trip"] for s in runs])
        out[f"rate_{mode}"] = summarize([s["sender_achieved_rate"] for s in runs])
    return out


def cell(stat: dict[str, float], fmt: str = ".2f") -> str:
    return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def markdown_table(results: dict[str, Any]) -> str:
    summ = results["summary"]
    control = results["config"]["control"]
    second = "tunnel B, metrics off too (A/A control)" if control else "metrics on + scraped 1/s"
    rows = [
        f"| CPU per datagram (us, round trip) | {'tunnel A, ' if control else ''}metrics off, "
        f"median (min-max) | {second}, median (min-max) | overhead, ratio of medians "
        "| overhead, paired per repetition, median (min-max) "
        "| CPU of one scrape (ms) and its share at 1 scrape/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for role, label in ROLES:
        r = summ[role]
        rows.append(
            f"| {label} | {cell(r['off'])} | {cell(r['on'])} | "
            f"{r['overhead_pct_of_medians']:+.1f} % | {cell(r['overhead_pct_paired'], '+.1f')} % "
            + (
                f"| {r['scrape_cpu_ms']:.2f} ms = {r['scrape_share_pct_at_1_per_s']:.2f} % |"
                if "scrape_cpu_ms" in r
                else "| n/a |"
            )
        )
    rows.append(
        f"| round-trip loss, % | {cell(summ['loss_off'])} | {cell(summ['loss_on'])} | | | |"
    )
    rows.append(
        f"| sender rate achieved, datagrams/s | {cell(summ['rate_off'], ',.0f')} "
        f"| {cell(summ['rate_on'], ',.0f')} | | | |"
    )
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "sender":
        parser = argparse.ArgumentParser(prog="bench_metrics_overhead.py sender")
        parser.add_argument("role")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--rate", type=float, required=True)
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument("--size", type=int, default=1200)
        args = parser.parse_args()
        print(json.dumps(sender(args.port, args.rate, args.count, args.size, GRACE)), flush=True)
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=6, help="repetitions per mode (>= 5)")
    parser.add_argument("--rate", type=float, default=10_000.0, help="datagrams per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--size", type=int, default=1200, help="datagram size, bytes")
    parser.add_argument("--scraper", choices=("auto", "prometheus", "http"), default="auto")
    parser.add_argument(
        "--scrape-cost-requests",
        type=int,
        default=200,
        help="back-to-back GETs per end to measure the CPU of one scrape",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A run: the second tunnel has metrics off too and nothing is scraped (noise floor)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if args.reps < 1 or args.rate <= 0 or args.seconds <= 0 or args.seconds * args.rate > 2e6:
        parser.error("need reps >= 1 and 0 < rate * seconds <= 2,000,000")
    count = int(args.rate * args.seconds)

    started = time.monotonic()
    info = machine()
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="sshrelay-bench-metrics-"))
    scraper: HttpScraper | PrometheusScraper | None = None
    cost: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = []
    try:
        make_keys(tmp)
        echo = Target(procs, "udp-echo", max_seconds=3600)
        metrics_on = {"off": False, "on": not args.control}
        tunnels = {m: start_tunnel(procs, tmp, m, echo.port, metrics_on[m]) for m in MODES}
        binary = shutil.which("prometheus")
        if args.scraper == "prometheus" and binary is None:
            raise BenchError("--scraper prometheus, but the prometheus binary is not installed")
        if args.control:
            print("A/A control: both tunnels have metrics off; no scraper", file=sys.stderr)
        else:
            cost = scrape_cost(tunnels["on"], args.scrape_cost_requests)
            if args.scraper != "http" and binary is not None:
                scraper = PrometheusScraper(procs, binary, tmp, tunnels["on"].metrics)
            else:
                scraper = HttpScraper(tunnels["on"].metrics)
            print(f"scraper: {scraper.kind}", file=sys.stderr)
        warm = min(count, int(args.rate))  # ~1 s through each tunnel, not measured
        for mode in MODES:
            run_sender(tunnels[mode].port, args.rate, warm, args.size)
        for rep in range(args.reps):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for mode in order:
                time.sleep(1.0)
                sample = measure(tunnels[mode], echo, args.rate, count, args.size)
                sample["rep"] = rep
                samples.append(sample)
                print(
                    f"rep {rep + 1}/{args.reps} {mode:>3}: relay {sample['relay_us_per_dgram']:.2f}"
                    f" + client {sample['client_us_per_dgram']:.2f} us/datagram, "
                    f"{sample['sender_sent']} sent at {sample['sender_achieved_rate']:,.0f}/s, "
                    f"round-trip loss {100 * sample['loss_round_trip']:.2f} %, "
                    f"{sample['reached_echo']} reached the echo",
                    file=sys.stderr,
                )
        scrapes = scraper.report() if scraper is not None else None
        alive = {mode: t.alive() for mode, t in tunnels.items()}
    finally:
        if scraper is not None:
            scraper.stop()
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    command = "python bench/bench_metrics_overhead.py " + " ".join(sys.argv[1:])
    results = {
        "benchmark": "metrics overhead (issue 4)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": info,
        "command": command.strip(),
        "config": {
            "reps": args.reps,
            "rate": args.rate,
            "seconds": args.seconds,
            "datagrams_per_measurement": count,
            "size": args.size,
            "grace_seconds": GRACE,
            "control": args.control,
        },
        "scraper": scrapes,
        "scrape_cost_idle": cost,
        "tunnels_alive_at_end": alive,
        "wall_seconds": time.monotonic() - started,
        "summary": analyse(samples, cost, args.rate),
        "samples": samples,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        print(markdown_table(results))
    else:
        print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
