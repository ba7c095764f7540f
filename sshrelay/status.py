"""`relay status`: a readable summary of a running end, read from its /metrics.

Two scrapes a second apart give rates (throughput, datagrams/s); RTT
quantiles are estimated from the histogram buckets the way Prometheus'
``histogram_quantile`` does. Needs only the HTTP endpoint, not the end itself.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URLS = ("http://127.0.0.1:9817/metrics", "http://127.0.0.1:9818/metrics")

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Scrape:
    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=lambda: defaultdict(dict))

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for sample_labels, value in self.samples.get(name, {}).items():
            found = dict(sample_labels)
            if all(found.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def label_values(self, name: str, label: str) -> list[str]:
        values: dict[str, None] = {}
        for sample_labels in self.samples.get(name, {}):
            value = dict(sample_labels).get(label)
            if value is not None:
                values.setdefault(value, None)
        return list(values)


def normalise_url(text: str) -> str:
    if "://" not in text:
        text = f"http://{text}"
    if text.count("/") < 3:
        text += "/metrics"
    return text


def scrape(url: str, timeout: float = 3.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read().decode()
    result = Scrape(time.monotonic())
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            result.samples[sample.name][key] = sample.value
    return result


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style linear interpolation inside the bucket holding quantile ``q``."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def _buckets(now: Scrape, before: Scrape | None, name: str, role: str) -> list[tuple[float, float]]:
    out = []
    for labels, value in now.samples.get(name, {}).items():
        found = dict(labels)
        if found.get("role") != role:
            continue
        bound = float(found["le"])
        earlier = before.samples.get(name, {}).get(labels, 0.0) if before else 0.0
        out.append((bound, value - earlier))
    return out


def _rate(now: Scrape, before: Scrape, name: str, **labels: str) -> float:
    elapsed = max(now.at - before.at, 1e-9)
    return max(0.0, now.get(name, **labels) - before.get(name, **labels)) / elapsed


def _bits(rate_bytes: float) -> str:
    bits = rate_bytes * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.1f} {unit}"
    return f"{bits:.0f} bit/s"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _row(*cells: str) -> str:
    name, proto, *rest = cells
    widths = (12, 12, 11, 8, 6, 7)
    return f"  {name:<16} {proto:<5} " + " ".join(
        f"{c:>{w}}" for c, w in zip(rest, widths, strict=True)
    )


def _forward_row(now: Scrape, before: Scrape, role: str, name: str, proto: str) -> str:
    labels = {"role": role, "forward": name}
    bytes_in = _rate(now, before, "sshrelay_forward_bytes_total", direction="in", **labels)
    bytes_out = _rate(now, before, "sshrelay_forward_bytes_total", direction="out", **labels)
    if proto == "udp":
        dgrams_in = _rate(now, before, "sshrelay_forward_datagrams_total", direction="in", **labels)
        dgrams_out = _rate(
            now, before, "sshrelay_forward_datagrams_total", direction="out", **labels
        )
        flows = now.get("sshrelay_forward_flows_active", **labels)
        return _row(
            name, proto, _bits(bytes_in), _bits(bytes_out), f"{dgrams_in:.0f}", f"{dgrams_out:.0f}",
            f"{flows:.0f}", "-",
        )  # fmt: skip
    streams = now.get("sshrelay_forward_streams_active", **labels)
    return _row(name, proto, _bits(bytes_in), _bits(bytes_out), "-", "-", "-", f"{streams:.0f}")


def summarise(url: str, before: Scrape, now: Scrape) -> str:
    lines: list[str] = []
    for role in now.label_values("sshrelay_build_info", "role"):
        version = next(
            (dict(k).get("version", "?") for k in now.samples["sshrelay_build_info"]), "?"
        )
        up = now.get("sshrelay_tunnel_up", role=role) > 0
        sessions = int(now.get("sshrelay_sessions", role=role))
        lines.append(f"{role} at {url} (sshrelay {version})")
        # Recent RTT if pings arrived between the scrapes, else the lifetime distribution.
        recent = _buckets(now, before, "sshrelay_rtt_seconds_bucket", role)
        buckets = (
            recent
            if any(c for _, c in recent)
            else _buckets(now, None, "sshrelay_rtt_seconds_bucket", role)
        )
        last = now.samples.get("sshrelay_rtt_last_seconds", {})
        last_rtt = next((v for k, v in last.items() if dict(k).get("role") == role), None)
        lines.append(
            f"  tunnel {'UP' if up else 'DOWN'}, {sessions} session{'s' if sessions != 1 else ''}; "
            f"connects {now.get('sshrelay_connects_total', role=role):.0f}, "
            f"reconnects {now.get('sshrelay_reconnects_total', role=role):.0f}; "
            f"RTT p50 {_ms(histogram_quantile(0.5, buckets))}, "
            f"p99 {_ms(histogram_quantile(0.99, buckets))}, last {_ms(last_rtt)}"
        )
        lines.append(_row("forward", "proto", "in", "out", "dgram/s in", "out", "flows", "streams"))
        names = [
            (dict(k).get("forward", "?"), dict(k).get("proto", "?"))
            for k in now.samples.get("sshrelay_forward_bytes_total", {})
            if dict(k).get("role") == role and dict(k).get("direction") == "in"
        ]
        if not names:
            lines.append("  (no forwards)")
        for name, proto in names:
            lines.append(_forward_row(now, before, role, name, proto))
        drops = {
            reason: now.get("sshrelay_datagrams_dropped_total", role=role, reason=reason)
            for reason in now.label_values("sshrelay_datagrams_dropped_total", "reason")
        }
        dropped = ", ".join(f"{reason} {count:.0f}" for reason, count in drops.items() if count)
        lines.append(f"  datagrams dropped: {dropped or 'none'}")
    return "\n".join(lines)


def run_status(urls: list[str], watch: bool, interval: float = 2.0) -> int:
    targets = [normalise_url(u) for u in urls] if urls else list(DEFAULT_URLS)
    reachable: dict[str, Scrape] = {}
    errors: list[str] = []
    for url in targets:
        try:
            reachable[url] = scrape(url)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            errors.append(f"{url}: {reason}")
    if not reachable:
        for error in errors:
            print(f"relay status: no sshrelay metrics at {error}")
        print(
            "relay status: start `relay serve` or `relay connect` (metrics are on by default), "
            "or pass --metrics URL"
        )
        return 1
    while True:
        time.sleep(1.0 if not watch else interval)
        blocks = []
        for url, before in list(reachable.items()):
            try:
                now = scrape(url)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                blocks.append(f"{url}: unreachable ({getattr(exc, 'reason', exc)})")
                continue
            blocks.append(summarise(url, before, now))
            reachable[url] = now
        if watch:
            print("\x1b[H\x1b[2J", end="")
        print("\n\n".join(blocks), flush=True)
        if not watch:
            return 0
