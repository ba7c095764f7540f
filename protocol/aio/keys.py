"""OpenSSH-format ed25519 keys: create, load and fingerprint (both ends and keygen)."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh


class KeyFileError(Exception):
    """A key file that cannot be used; the message is user-facing."""


def generate_keypair(path: Path, comment: str = "sshrelay") -> asyncssh.SSHKey:
    """Write ``path`` (private, mode 0600) and ``path.pub``; refuse to overwrite."""
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite it")
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.export_private_key("openssh"))
    Path(f"{path}.pub").write_bytes(key.export_public_key("openssh"))
    return key


def load_private_key(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint."""
    return key.get_fingerprint("sha256")
