"""TOML configuration files: load a section, check every key, and the settings both ends share.

Both ends describe their settings as ``Setting`` tables. An unknown key, a
value of the wrong type or out of range is a ``ConfigError`` that names the
key and the file, so a typo never silently falls back to a default (the
"authentication silently off through a config mistake" class of bugs).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshrelay.protocol.aio.sshtuning import DEAD_LINK_TIMEOUT, DeadLink
from sshrelay.protocol.config import MuxConfig


class ConfigError(Exception):
    """A configuration problem; the message names the file and key."""


@dataclass(frozen=True, slots=True)
class Setting:
    kind: type | tuple[type, ...]
    check: Callable[[Any], str | None] | None = None  # returns an error text or None


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def load_section(path: Path, section: str) -> dict[str, Any]:
    """The ``[section]`` table of a TOML file (empty if the section is absent)."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known_sections = {"serve", "connect"}
    for key in data:
        if key not in known_sections:
            raise ConfigError(
                f"config file {path}: unknown section or key {key!r} "
                f"(expected [serve] and/or [connect])"
            )
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: {section!r} must be a table")
    return table


def check_table(table: dict[str, Any], settings: dict[str, Setting], where: str) -> dict[str, Any]:
    """Validate ``table`` against ``settings``; ``where`` is e.g. 'relay.toml [serve]'."""
    checked: dict[str, Any] = {}
    for key, value in table.items():
        setting = settings.get(key)
        if setting is None:
            known = ", ".join(sorted(settings))
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {known})")
        kinds = setting.kind if isinstance(setting.kind, tuple) else (setting.kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            # A whole number is a fine float ("dead_link_timeout = 20").
            ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
        if ok and float in kinds and isinstance(value, int):
            value = float(value)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{where}: key {key!r} must be {names}, got {value!r}")
        if setting.check is not None:
            problem = setting.check(value)
            if problem:
                raise ConfigError(f"{where}: key {key!r} {problem}")
        checked[key] = value
    return checked


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: Any) -> str | None:
    return None if value in LOG_LEVELS else "must be debug, info, warning or error"


def _window(value: Any) -> str | None:
    return None if value >= 1024 else "must be at least 1024"


def _latency_window(value: Any) -> str | None:
    return None if value == 0 or value >= 1024 else "must be 0 (off) or at least 1024"


# Keys both [serve] and [connect] accept: metrics, logging and the tunnel's timings.
TUNNEL_SETTINGS: dict[str, Setting] = {
    "metrics": Setting(str),
    "log_level": Setting(str, _log_level),
    "dead_link_timeout": Setting(float, positive),
    "ping_interval": Setting(float, positive),
    "max_datagram_age": Setting(float, positive),
    "datagram_queue_bytes": Setting(int, positive),
    "stream_window": Setting(int, _window),
    "latency_window": Setting(int, _latency_window),
    "max_stream_window": Setting(int, _window),
}


def tunnel_config(values: dict[str, Any]) -> tuple[DeadLink, MuxConfig]:
    """The dead-link timings and multiplexer config that the TUNNEL_SETTINGS keys describe."""
    dead_link = DeadLink(values.get("dead_link_timeout", DEAD_LINK_TIMEOUT))
    mux = dead_link.apply(MuxConfig())
    if "ping_interval" in values:  # more frequent RTT samples than the dead-link timing needs
        mux.ping_interval = values["ping_interval"]
    # Windows this end grants (docs/operations.md, "Throughput and latency settings").
    for key in ("max_datagram_age", "datagram_queue_bytes", "stream_window", "max_stream_window"):
        if key in values:
            setattr(mux, key, values[key])
    if mux.max_stream_window < mux.stream_window:
        mux.max_stream_window = mux.stream_window  # a fixed window, no growth
    # latency_window: stream credit outstanding while datagrams arrive (0: no limit).
    if "latency_window" in values:
        mux.latency_window = values["latency_window"] or None
    return dead_link, mux
