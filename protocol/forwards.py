"""Remote forwards: the ``-R`` spec syntax and the FORWARD request body.

``[BIND_ADDRESS:]PORT:HOST:HOSTPORT[/tcp|/udp]`` is OpenSSH's ``-R`` syntax with
chisel's protocol suffix. The client turns each spec into a REQUEST of kind
``forward``; the relay validates the body with ``ForwardRequest.from_body``.
Both ends share this module, so the schema lives in one place.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from sshrelay.protocol.frames import Meta

FORWARD_REQUEST: Final = "forward"
PROTOCOLS: Final = ("tcp", "udp")
DEFAULT_UDP_IDLE_TIMEOUT: Final = 180.0  # WireGuard keepalives are 25 s; games re-send often
DEFAULT_MAX_FLOWS: Final = 16_384


class ForwardSpecError(ValueError):
    """A ``-R`` spec or forward request that cannot be used (message is user-facing)."""


@dataclass(frozen=True, slots=True)
class ForwardSpec:
    """One remote forward as the user wrote it."""

    bind: str  # "" = all interfaces (the relay decides, subject to permissions)
    port: int  # public port on the relay; 0 = any free port
    host: str  # target as seen from the client
    host_port: int
    proto: str = "tcp"
    name: str = ""
    idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    max_flows: int = DEFAULT_MAX_FLOWS

    @property
    def label(self) -> str:
        return self.name or f"{self.proto}/{self.port}"

    def describe(self) -> str:
        bind = f"{self.bind}:" if self.bind else ""
        return f"{bind}{self.port} -> {self.host}:{self.host_port}/{self.proto}"


def _port(text: str, what: str, allow_zero: bool) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ForwardSpecError(f"{what} {text!r} is not a number") from None
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ForwardSpecError(f"{what} {value} is out of range {low}-65535")
    return value


def _split_host_port(text: str) -> list[str]:
    """Split on ':' but keep bracketed IPv6 addresses ([::1]) whole."""
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p[1:-1] if p.startswith("[") and p.endswith("]") else p for p in parts]


def parse_forward_spec(text: str, name: str = "") -> ForwardSpec:
    """Parse ``[BIND:]PORT:HOST:HOSTPORT[/tcp|/udp]``; raise ForwardSpecError with the reason."""
    spec, proto = text, "tcp"
    if "/" in text:
        spec, proto = text.rsplit("/", 1)
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise ForwardSpecError(f"forward {text!r}: protocol must be tcp or udp, not {proto!r}")
    parts = _split_host_port(spec)
    if len(parts) == 3:
        bind, (port, host, host_port) = "", parts
    elif len(parts) == 4:
        bind, port, host, host_port = parts
    else:
        raise ForwardSpecError(
            f"forward {text!r}: expected [BIND_ADDRESS:]PORT:HOST:HOSTPORT[/tcp|/udp]"
        )
    if bind in ("*", "0.0.0.0"):
        bind = "0.0.0.0"
    if bind:
        _check_address(bind, f"forward {text!r}: bind address")
    if not host:
        raise ForwardSpecError(f"forward {text!r}: HOST is empty")
    return ForwardSpec(
        bind=bind,
        port=_port(port, f"forward {text!r}: PORT", allow_zero=True),
        host=host,
        host_port=_port(host_port, f"forward {text!r}: HOSTPORT", allow_zero=False),
        proto=proto,
        name=name,
    )


def _check_address(text: str, what: str) -> None:
    if text == "localhost":
        return
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ForwardSpecError(f"{what} {text!r} is not an IP address") from None


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """The body of a ``forward`` REQUEST: what the relay must listen on."""

    forward: int  # id the client chose; the relay uses it in STREAM_OPEN / FLOW_OPEN
    proto: str
    bind: str
    port: int
    name: str = ""
    idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    max_flows: int = DEFAULT_MAX_FLOWS

    @classmethod
    def from_spec(cls, forward: int, spec: ForwardSpec) -> ForwardRequest:
        return cls(
            forward, spec.proto, spec.bind, spec.port, spec.label, spec.idle_timeout, spec.max_flows
        )

    def to_body(self) -> Meta:
        return {
            "forward": self.forward,
            "proto": self.proto,
            "bind": self.bind,
            "port": self.port,
            "name": self.name,
            "idle_timeout": self.idle_timeout,
            "max_flows": self.max_flows,
        }

    @classmethod
    def from_body(cls, body: Meta) -> ForwardRequest:
        """Validate a request body from the peer; ForwardSpecError names the bad field."""

        def get(key: str, kind: type | tuple[type, ...]) -> object:
            value = body.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ForwardSpecError(f"forward request field {key!r} is missing or invalid")
            return value

        forward = get("forward", int)
        proto = get("proto", str)
        bind = get("bind", str)
        port = get("port", int)
        name = body.get("name", "")
        idle = body.get("idle_timeout", DEFAULT_UDP_IDLE_TIMEOUT)
        max_flows = body.get("max_flows", DEFAULT_MAX_FLOWS)
        assert isinstance(forward, int) and isinstance(port, int)
        assert isinstance(proto, str) and isinstance(bind, str)
        if proto not in PROTOCOLS:
            raise ForwardSpecError(f"unknown protocol {proto!r}")
        if not 0 <= port <= 65535:
            raise ForwardSpecError(f"port {port} out of range")
        if bind:
            _check_address(bind, "bind address")
        if not isinstance(name, str) or len(name) > 64:
            raise ForwardSpecError("forward name must be a string of at most 64 characters")
        if not isinstance(idle, int | float) or isinstance(idle, bool) or not 0 <= idle <= 86400:
            raise ForwardSpecError("idle_timeout must be between 0 and 86400 seconds")
        if not isinstance(max_flows, int) or not 1 <= max_flows <= 1_000_000:
            raise ForwardSpecError("max_flows must be between 1 and 1000000")
        return cls(forward, proto, bind, port, name, float(idle), max_flows)
