"""Who may connect and what each key may listen on (fail closed).

Keys come from an OpenSSH ``authorized_keys`` file. Per-key permissions use
OpenSSH's own options: ``no-port-forwarding`` forbids every forward (so does
``restrict`` unless ``port-forwarding`` re-enables it, as in OpenSSH) and
``permitlisten="[host:]port[/tcp|/udp]"`` (repeatable; port may be ``*``)
restricts them. A key without options may listen on unprivileged ports
(1024-65535, or 0 for "any free port"). Permissions are checked on every
forward request, not only at login. The file is re-read when it changes; once
it holds no key (emptied or deleted) nobody may log in.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from sshrelay.protocol.forwards import ForwardRequest

_PERMITLISTEN = re.compile(r'permitlisten="([^"]*)"')

log = logging.getLogger("sshrelay.relay")


class AuthSetupError(Exception):
    """The authorized keys cannot be used; the message says how to fix it."""

    def __init__(self, message: str, no_keys: bool = False) -> None:
        super().__init__(message)
        self.no_keys = no_keys  # the file is missing or lists no key at all


@dataclass(frozen=True, slots=True)
class ListenRule:
    host: str  # "" or "*" = any bind address
    port: int | None  # None = any port
    proto: str | None  # None = both

    def allows(self, request: ForwardRequest) -> bool:
        if self.proto is not None and self.proto != request.proto:
            return False
        if self.port is not None and self.port != request.port:
            return False
        return self.host in ("", "*") or self.host == (request.bind or "0.0.0.0")


@dataclass(frozen=True, slots=True)
class KeyPermissions:
    fingerprint: str
    comment: str
    forwarding: bool = True
    rules: tuple[ListenRule, ...] = field(default_factory=tuple)
    revoked: bool = False  # the key left authorized_keys after this session logged in

    def check(self, request: ForwardRequest) -> str | None:
        """None if allowed, else the reason (sent to the client)."""
        if self.revoked:
            return "this key is no longer in the relay's authorized_keys"
        if not self.forwarding:
            return (
                "port forwarding is off for this key in the relay's authorized_keys "
                "(no-port-forwarding, or restrict without port-forwarding)"
            )
        if self.rules:
            if any(rule.allows(request) for rule in self.rules):
                return None
            return (
                f"{request.proto} port {request.port} is not in this key's permitlisten list "
                "on the relay"
            )
        if request.port == 0 or request.port >= 1024:
            return None
        return f'port {request.port} is privileged; add permitlisten="{request.port}" for this key'


def parse_listen_rule(text: str) -> ListenRule:
    spec, proto = text, None
    if "/" in text:
        spec, proto = text.rsplit("/", 1)
        if proto not in ("tcp", "udp"):
            raise ValueError(f"permitlisten {text!r}: protocol must be tcp or udp")
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    if port == "*":
        return ListenRule(host, None, proto)
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"permitlisten {text!r}: port must be a number or *") from None
    return ListenRule(host, number, proto)


class AuthorizedKeys:
    """The relay's client keys, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._keys = asyncssh.SSHAuthorizedKeys()
        self._count = 0
        self.reload()

    @property
    def count(self) -> int:
        return self._count

    def reload(self) -> None:
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            raise AuthSetupError(
                f"authorized keys file {self.path} does not exist. Create it with the client's "
                f"public key, e.g.:  relay keygen ~/.ssh/sshrelay_ed25519  and then copy "
                f"~/.ssh/sshrelay_ed25519.pub into {self.path}",
                no_keys=True,
            ) from None
        except OSError as exc:
            raise AuthSetupError(f"cannot read {self.path}: {exc.strerror}") from None
        lines = [
            line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        if not lines:
            raise AuthSetupError(
                f"no client key is authorized: {self.path} is empty. Refusing to start. "
                f"Add a client's public key (the .pub file written by `relay keygen FILE`)",
                no_keys=True,
            )
        try:
            keys = asyncssh.import_authorized_keys(text)
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise AuthSetupError(f"{self.path}: {exc}") from None
        for line in lines:  # check permitlisten syntax up front, not at first use
            for rule in _PERMITLISTEN.findall(line):
                try:
                    parse_listen_rule(rule)
                except ValueError as exc:
                    raise AuthSetupError(f"{self.path}: {exc}") from None
        self._keys = keys
        self._count = len(lines)
        self._signature = _signature(stat)

    def maybe_reload(self) -> None:
        """Re-read the file if it changed. No key left (emptied, deleted): nobody may log in;
        a file that does not parse: keep the last good keys (an edit in progress)."""
        try:
            signature: tuple[int, int, int] | None = _signature(self.path.stat())
        except FileNotFoundError:
            signature = None
        except OSError:
            return  # cannot tell: keep the keys we have
        if signature == self._signature:
            return
        try:
            self.reload()
        except AuthSetupError as exc:
            self._signature = signature
            if exc.no_keys:
                if self._count:
                    log.warning("%s; every client key is refused until one is added", exc)
                self._keys = asyncssh.SSHAuthorizedKeys()
                self._count = 0
            else:
                log.warning("%s; keeping the keys read before", exc)

    def lookup(self, key: asyncssh.SSHKey, peer_host: str, peer_addr: str) -> KeyPermissions | None:
        options = self._keys.validate(key, peer_host, peer_addr)
        if options is None:
            return None
        listen = options.get("permitlisten", [])
        assert isinstance(listen, list)
        rules = tuple(parse_listen_rule(str(text)) for text in listen)
        comment = key.get_comment() or ""
        forwarding = not options.get("no-port-forwarding", False) and (
            not options.get("restrict", False) or bool(options.get("port-forwarding", False))
        )
        return KeyPermissions(
            fingerprint=key.get_fingerprint("sha256"),
            comment=comment,
            forwarding=forwarding,
            rules=rules,
        )


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells a changed file apart (mtime alone misses edits within one clock tick)."""
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
