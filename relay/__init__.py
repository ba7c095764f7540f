"""The VPS side of sshrelay: SSH server, per-key permissions, public listeners."""
