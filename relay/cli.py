"""`relay serve`: flags and TOML ``[serve]`` settings, then run the relay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sshrelay.protocol.aio.keys import KeyFileError, fingerprint
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
from sshrelay.relay.auth import AuthorizedKeys, AuthSetupError
from sshrelay.relay.server import RelayOptions, RelayServer, load_host_key

log = logging.getLogger("sshrelay.relay")

EXAMPLES = """\
examples:
  relay serve                                   # 0.0.0.0:2222, keys in ~/.config/sshrelay/
  relay serve --listen 0.0.0.0:2222 --authorized-keys /etc/sshrelay/authorized_keys
  relay serve --config /etc/sshrelay/relay.toml

The authorized_keys file takes OpenSSH lines; restrict a key's ports with
  permitlisten="51820/udp",permitlisten="8443" ssh-ed25519 AAAA... home-server
"""


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "sshrelay"


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[V6]:PORT``; ValueError with a clear message."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        return host or "0.0.0.0", default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return host or "0.0.0.0", port


SETTINGS: dict[str, Setting] = {
    **TUNNEL_SETTINGS,
    "listen": Setting(str),
    "host_key": Setting(str),
    "authorized_keys": Setting(str),
    "lease_grace": Setting(float, non_negative),
    "max_held_connections": Setting(int, non_negative),
    "login_timeout": Setting(float, non_negative),
    "key_check_interval": Setting(float, positive),
}


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the relay (on the VPS)",
        description="Run the relay: an SSH server that only carries sshrelay tunnels.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="SSH listen address (default 0.0.0.0:2222)"
    )
    serve.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML file with a [serve] section"
    )
    serve.add_argument(
        "--host-key", metavar="FILE", help="host key (default: generated in ~/.config/sshrelay/)"
    )
    serve.add_argument(
        "--authorized-keys",
        metavar="FILE",
        help="client keys (default ~/.config/sshrelay/authorized_keys)",
    )
    serve.add_argument(
        "--metrics", metavar="HOST:PORT", help="Prometheus /metrics (default 127.0.0.1:9817; 'off')"
    )
    serve.add_argument(
        "--dead-link-timeout",
        metavar="SECONDS",
        type=float,
        help="notice a dead client link within this bound (default 12)",
    )
    serve.add_argument(
        "--lease-grace",
        metavar="SECONDS",
        type=float,
        help="keep a client's public ports this long after it disconnects (default 60)",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.config is not None:
        where = f"{args.config} [serve]"
        values = check_table(load_section(args.config, "serve"), SETTINGS, where)
    flags = ("listen", "host_key", "authorized_keys", "metrics", "log_level")
    for key in (*flags, "dead_link_timeout", "lease_grace"):
        flag = getattr(args, key)
        if flag is not None:
            values[key] = flag
    return values


def run(args: argparse.Namespace) -> int:
    from sshrelay.cli import usage_error

    try:
        values = _settings(args)
    except ConfigError as exc:
        usage_error("relay serve", str(exc))
    try:
        host, port = parse_host_port(values.get("listen", "0.0.0.0:2222"), 2222)
    except ValueError as exc:
        usage_error("relay serve", f"--listen {exc}")
    setup_logging(values.get("log_level", "info"))
    dead_link, mux = tunnel_config(values)
    options = RelayOptions(
        listen_host=host,
        listen_port=port,
        mux=mux,
        dead_link=dead_link,
        lease_grace=values.get("lease_grace", 60.0),
        max_held_connections=values.get("max_held_connections", 64),
        login_timeout=values.get("login_timeout", 30.0),
        key_check_interval=values.get("key_check_interval", 5.0),
    )
    key_path = Path(values.get("host_key") or config_dir() / "host_ed25519").expanduser()
    keys_path = Path(values.get("authorized_keys") or config_dir() / "authorized_keys").expanduser()
    try:
        keys = AuthorizedKeys(keys_path)
        host_key, created = load_host_key(key_path)
    except (AuthSetupError, KeyFileError) as exc:
        sys.stderr.write(f"relay serve: {exc}\n")
        return 1
    print(
        f"relay: host key {fingerprint(host_key)} ({'generated ' if created else ''}{key_path})",
        flush=True,
    )
    return run_loop(_serve(options, host_key, keys, values.get("metrics")))


async def _serve(
    options: RelayOptions, host_key: Any, keys: AuthorizedKeys, metrics: str | None
) -> int:
    server = RelayServer(options, host_key, keys)
    try:
        _, metrics_url = await start_metrics(metrics, [server.metrics], "relay")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"relay serve: metrics: {exc}\n")
        return 1
    if metrics_url:
        print(f"relay: metrics on {metrics_url}", flush=True)
    try:
        await server.start()
    except OSError as exc:
        where = f"{options.listen_host}:{options.listen_port}"
        sys.stderr.write(f"relay serve: cannot listen on {where}: {exc.strerror}\n")
        return 1
    print(
        f"relay: listening on {options.listen_host}:{server.port} ({keys.count} client keys)",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: closing %d sessions and all public listeners", len(server.sessions))
    await server.close()
    return 0
