"""The `relay` command: a tiny dispatcher over both ends.

`serve` lives in ``sshrelay.relay.cli``, `connect` in ``sshrelay.client.cli``;
`keygen` and `demo` are here because they need neither end's policy (demo
wires both). Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from sshrelay import __version__

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def usage_error(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(EXIT_USAGE)


def build_parser() -> OneLineParser:
    from sshrelay.client import cli as client_cli
    from sshrelay.relay import cli as relay_cli

    parser = OneLineParser(
        prog="relay",
        description="Expose home TCP and UDP services on a VPS over one SSH connection.",
        epilog="Run `relay COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"sshrelay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True
    relay_cli.add_parser(commands)
    client_cli.add_parser(commands)

    keygen = commands.add_parser(
        "keygen",
        help="write an OpenSSH ed25519 key pair (FILE and FILE.pub)",
        description="Write an OpenSSH-format ed25519 key pair: FILE (mode 0600) and FILE.pub.",
        epilog="example:\n  relay keygen ~/.ssh/sshrelay_ed25519",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keygen.add_argument("file", metavar="FILE", type=Path)
    keygen.add_argument("-C", "--comment", default="sshrelay", help="key comment")
    keygen.set_defaults(run=run_keygen)

    demo = commands.add_parser(
        "demo",
        help="run relay, client and echo services on loopback and print measurements",
        description=(
            "Start a relay and a client in this process on 127.0.0.1 with throwaway keys, "
            "expose a TCP echo and a UDP echo through the tunnel, run a short bounded load "
            "and print what was measured."
        ),
    )
    demo.add_argument("--seconds", type=float, default=2.0, help="length of each load phase")
    demo.set_defaults(run=run_demo)

    status = commands.add_parser(
        "status",
        help="summarise a running relay or client from its metrics",
        description=(
            "Read a running end's /metrics and print, per forward: state, RTT p50/p99, "
            "throughput in/out, datagram rate, drops by reason, flows and reconnects."
        ),
        epilog=(
            "examples:\n  relay status                       # tries 127.0.0.1:9817 and :9818\n"
            "  relay status --metrics 127.0.0.1:9818 --watch"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--metrics", metavar="URL", action="append", help="metrics URL or HOST:PORT (repeatable)"
    )
    status.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    status.set_defaults(run=run_status)
    return parser


def run_keygen(args: argparse.Namespace) -> int:
    from sshrelay.protocol.aio.keys import KeyFileError, fingerprint, generate_keypair

    try:
        key = generate_keypair(args.file.expanduser(), args.comment)
    except (KeyFileError, OSError) as exc:
        usage_error("relay keygen", str(exc))
    print(f"wrote {args.file} and {args.file}.pub ({fingerprint(key)})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from sshrelay.demo import run_demo as demo

    return demo(args.seconds)


def run_status(args: argparse.Namespace) -> int:
    from sshrelay.status import run_status as status

    return status(args.metrics or [], args.watch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
