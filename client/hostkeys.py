"""Verify the relay's host key against an OpenSSH known_hosts file.

Matching is strict on the port: the relay's entry is ``[host]:port``, so the
VPS's own sshd key for ``host`` (port 22) is neither trusted for the relay nor
reported as "changed". Unknown and changed keys fail closed with the
fingerprint to check; ``accept_new`` stores a first-seen key as OpenSSH's
``StrictHostKeyChecking=accept-new`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh


class HostKeyError(Exception):
    """The relay's host key could not be verified; the message says what to do."""


@dataclass(slots=True)
class HostKeyVerifier:
    known_hosts: Path
    accept_new: bool = False
    failure: HostKeyError | None = None
    added: bool = False

    def pattern(self, host: str, port: int) -> str:
        return host if port == 22 else f"[{host}]:{port}"

    def verify(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        fingerprint = key.get_fingerprint("sha256")
        trusted: list[asyncssh.SSHKey] = []
        revoked: list[asyncssh.SSHKey] = []
        if self.known_hosts.exists():
            try:
                known = asyncssh.read_known_hosts(str(self.known_hosts))
            except (OSError, ValueError) as exc:
                self.failure = HostKeyError(
                    f"cannot read known hosts file {self.known_hosts}: {exc}"
                )
                return False
            trusted, revoked = self._lookup(known, host, addr, port)
        label = self.pattern(host, port)
        if key in revoked:
            self.failure = HostKeyError(f"host key {fingerprint} of {label} is marked @revoked")
            return False
        if key in trusted:
            return True
        if trusted:
            self.failure = HostKeyError(
                f"HOST KEY CHANGED for {label}: the relay presented {fingerprint}, which does "
                f"not match {self.known_hosts}. If the relay was reinstalled on purpose, remove "
                f"the old line for {label} from {self.known_hosts} and connect again."
            )
            return False
        if not self.accept_new:
            self.failure = HostKeyError(
                f"unknown host key for {label}: {fingerprint}. Check it against the fingerprint "
                f"`relay serve` printed at start, then run again with --accept-new to store it "
                f"in {self.known_hosts}."
            )
            return False
        self._store(label, key)
        return True

    @staticmethod
    def _lookup(
        known: asyncssh.SSHKnownHosts, host: str, addr: str, port: int
    ) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
        """(trusted, revoked) keys listed for exactly this host and port.

        ``SSHKnownHosts.match`` retries without the port when nothing matches
        ``[host]:port``, which would trust (or call "changed") the VPS's sshd key
        for the relay. Looking up the bracketed names with no port never falls back.
        """
        if port == 22:
            result = known.match(host, addr, None)
            return list(result[0]), list(result[2])
        trusted: list[asyncssh.SSHKey] = []
        revoked: list[asyncssh.SSHKey] = []
        for name in dict.fromkeys(n for n in (host, addr) if n):
            result = known.match(f"[{name}]:{port}", "", None)
            trusted += result[0]
            revoked += result[2]
        return trusted, revoked

    def _store(self, label: str, key: asyncssh.SSHKey) -> None:
        line = f"{label} {key.export_public_key('openssh').decode().strip()}\n"
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(line)
        self.added = True
