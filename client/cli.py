"""`relay connect`: flags and TOML ``[connect]`` settings, then run the client."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from sshrelay.client.connect import EXIT_USAGE, Client, ClientError, ClientOptions
from sshrelay.protocol.aio.logs import setup_logging
from sshrelay.protocol.aio.loop import run as run_loop
from sshrelay.protocol.aio.metrics import start_metrics
from sshrelay.protocol.aio.tomlconfig import (
    TUNNEL_SETTINGS,
    ConfigError,
    Setting,
    check_table,
    load_section,
    non_negative,
    positive,
    tunnel_config,
)
from sshrelay.protocol.forwards import ForwardSpec, ForwardSpecError, parse_forward_spec

log = logging.getLogger("sshrelay.client")

EXAMPLES = """\
examples:
  relay connect vps.example.com -i ~/.ssh/id_ed25519 -R 51820:127.0.0.1:51820/udp
  relay connect me@vps.example.com:2222 -R 8443:127.0.0.1:443 -R game=27015:10.0.0.5:27015/udp
  relay connect --config ~/.config/sshrelay/client.toml

SPEC is OpenSSH's -R syntax plus a protocol: [NAME=][BIND_ADDRESS:]PORT:HOST:HOSTPORT[/tcp|/udp].
Without a bind address the relay listens on all interfaces. PORT 0 lets the relay pick one.
"""

FORWARD_TABLE: dict[str, Setting] = {
    "spec": Setting(str),
    "name": Setting(str),
    "idle_timeout": Setting(float, positive),
    "max_flows": Setting(int, lambda v: None if 1 <= v <= 1_000_000 else "must be 1-1000000"),
}

SETTINGS: dict[str, Setting] = {
    **TUNNEL_SETTINGS,
    "server": Setting(str),
    "identity": Setting(str),
    "forwards": Setting(list),
    "known_hosts": Setting(str),
    "accept_new": Setting(bool),
    "reconnect": Setting(bool),
    "max_retries": Setting(int, non_negative),
    "connect_timeout": Setting(float, positive),
    "udp_idle_timeout": Setting(float, positive),
}


def add_parser(commands: Any) -> None:
    connect = commands.add_parser(
        "connect",
        help="connect to a relay and expose local services (at home)",
        description="Connect to a relay over SSH and expose local TCP/UDP services on it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    connect.add_argument(
        "server", nargs="?", metavar="[USER@]HOST[:PORT]", help="the relay (port 2222 by default)"
    )
    connect.add_argument(
        "-i", dest="identity", metavar="KEYFILE", help="private key (default ~/.ssh/id_ed25519)"
    )
    connect.add_argument(
        "-R", dest="forwards", metavar="SPEC", action="append", help="remote forward; repeatable"
    )
    connect.add_argument("--known-hosts", metavar="FILE", help="default ~/.ssh/known_hosts")
    connect.add_argument(
        "--accept-new",
        action="store_true",
        default=None,
        help="store an unknown relay host key (like StrictHostKeyChecking=accept-new)",
    )
    connect.add_argument(
        "--metrics", metavar="HOST:PORT", help="Prometheus /metrics (default 127.0.0.1:9818; 'off')"
    )
    connect.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML file with a [connect] section"
    )
    connect.add_argument(
        "--udp-idle-timeout",
        metavar="SECONDS",
        type=float,
        help="idle expiry of UDP flows (default 180)",
    )
    connect.add_argument(
        "--dead-link-timeout",
        metavar="SECONDS",
        type=float,
        help="notice a dead link within this bound (default 12)",
    )
    connect.add_argument(
        "--max-retries",
        metavar="N",
        type=int,
        help="give up after N failed reconnects in a row (default: never)",
    )
    connect.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        default=None,
        help="exit when the tunnel ends instead of reconnecting",
    )
    connect.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    connect.set_defaults(run=run)


def parse_server(text: str) -> tuple[str | None, str, int]:
    """``[USER@]HOST[:PORT]`` with ``[v6]`` brackets; ValueError says what is wrong."""
    user = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
        if not user:
            raise ValueError("empty user name before '@'")
    host, port = text, 2222
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected :PORT after ']'")
            port = _port(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text)
    if not host:
        raise ValueError("missing HOST")
    return user, host, port


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"port {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def _forward(text: str, idle: float | None) -> ForwardSpec:
    name = ""
    if "=" in text:
        name, text = text.split("=", 1)
    spec = parse_forward_spec(text, name)
    if idle is not None:
        spec = _replace(spec, idle_timeout=idle)
    return spec


def unique_names(forwards: list[ForwardSpec]) -> list[ForwardSpec]:
    """Give every forward a distinct name (metric label, logs): explicit names must be
    unique; unnamed ones that would share a default label ("tcp/0") get "-2", "-3"..."""
    explicit = [spec.name for spec in forwards if spec.name]
    duplicates = {name for name in explicit if explicit.count(name) > 1}
    if duplicates:
        raise ValueError(f"forward name {sorted(duplicates)[0]!r} is used more than once")
    seen: set[str] = set(explicit)
    named: list[ForwardSpec] = []
    for spec in forwards:
        if not spec.name:
            label, suffix = spec.label, 2
            while label in seen:
                label, suffix = f"{spec.label}-{suffix}", suffix + 1
            spec = _replace(spec, name=label) if label != spec.label else spec
        seen.add(spec.label)
        named.append(spec)
    return named


def _replace(spec: ForwardSpec, **changes: Any) -> ForwardSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def build_options(args: argparse.Namespace) -> tuple[ClientOptions, dict[str, Any]]:
    """Merge flags over the TOML file over defaults; raise ConfigError/ValueError."""
    values: dict[str, Any] = {}
    where = ""
    if args.config is not None:
        where = f"{args.config} [connect]"
        values = check_table(load_section(args.config, "connect"), SETTINGS, where)
    for key in (
        "server",
        "identity",
        "known_hosts",
        "accept_new",
        "metrics",
        "log_level",
        "udp_idle_timeout",
        "dead_link_timeout",
        "max_retries",
        "reconnect",
    ):
        flag = getattr(args, key)
        if flag is not None:
            values[key] = flag
    if "server" not in values:
        raise ValueError("missing the relay address [USER@]HOST[:PORT]")
    user, host, port = parse_server(values["server"])
    idle = values.get("udp_idle_timeout")
    forwards: list[ForwardSpec] = []
    if args.forwards:
        for text in args.forwards:
            forwards.append(_forward(text, idle))
    else:
        for index, item in enumerate(values.get("forwards", []), start=1):
            item_where = f"{where} forwards[{index}]"
            if isinstance(item, str):
                forwards.append(_forward(item, idle))
                continue
            if not isinstance(item, dict):
                raise ConfigError(f"{item_where}: must be a SPEC string or a table")
            table = check_table(item, FORWARD_TABLE, item_where)
            if "spec" not in table:
                raise ConfigError(f"{item_where}: key 'spec' is required")
            try:
                spec = parse_forward_spec(table["spec"], table.get("name", ""))
            except ForwardSpecError as exc:
                raise ConfigError(f"{item_where}: key 'spec': {exc}") from None
            changes: dict[str, Any] = {}
            if "idle_timeout" in table or idle is not None:
                changes["idle_timeout"] = table.get("idle_timeout", idle)
            if "max_flows" in table:
                changes["max_flows"] = table["max_flows"]
            forwards.append(_replace(spec, **changes) if changes else spec)
    if not forwards:
        raise ValueError("no forward given: add at least one -R SPEC")
    forwards = unique_names(forwards)
    identity = values.get("identity")
    if identity is None:
        default = Path("~/.ssh/id_ed25519").expanduser()
        identity = str(default) if default.exists() else None
    if identity is None:
        raise ValueError("no key: pass -i KEYFILE (create one with `relay keygen FILE`)")
    dead_link, mux = tunnel_config(values)
    options = ClientOptions(
        host=host,
        port=port,
        username=user or getpass.getuser(),
        identity=Path(identity).expanduser(),
        forwards=forwards,
        accept_new=bool(values.get("accept_new", False)),
        connect_timeout=values.get("connect_timeout", 15.0),
        dead_link=dead_link,
        mux=mux,
        reconnect=values.get("reconnect", True),
        max_retries=values.get("max_retries"),
    )
    if "known_hosts" in values:
        options.known_hosts = Path(values["known_hosts"]).expanduser()
    return options, values


def run(args: argparse.Namespace) -> int:
    from sshrelay.cli import usage_error

    try:
        options, values = build_options(args)
    except (ConfigError, ValueError) as exc:
        usage_error("relay connect", str(exc))
    setup_logging(values.get("log_level", "info"))
    return run_loop(_connect(options, values.get("metrics")))


async def _connect(options: ClientOptions, metrics: str | None = None) -> int:
    client = Client(options)
    try:
        _, metrics_url = await start_metrics(metrics, [client.metrics], "client")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"relay connect: metrics: {exc}\n")
        return EXIT_USAGE
    if metrics_url:
        print(f"relay: metrics on {metrics_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def announce() -> None:
        for index, spec in enumerate(options.forwards, start=1):
            bind, port = client.bound[index]
            print(
                f"relay: forward {spec.label} up: relay {spec.proto} {bind}:{port} -> "
                f"{spec.host}:{spec.host_port}",
                flush=True,
            )

    try:
        code = await client.run(stop, announce)
    except ClientError as exc:
        sys.stderr.write(f"relay connect: {exc}\n")
        return exc.exit_code
    finally:
        client.parking.close()
    log.info("shut down")
    return code
