"""The Debian OpenSSH client against `relay serve`: everything but our subsystem is refused.

A person who points plain `ssh` at the relay gets a clear answer and a non-zero
exit, never a hang: a shell or exec prints the relay's one-line explanation,
-L channels are refused, -R with ExitOnForwardFailure exits.
"""

from __future__ import annotations

import os
import pty
import socket
import time

import pytest

SSH = "/usr/bin/ssh"
EXPLANATION = "This is an sshrelay relay"


def ssh_argv(ssh: str, bed, relay, *args: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        ssh,
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-i",
        str(bed.keys.client),
        "-p",
        str(relay.port),
        *args,
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [[], ["echo", "hello"]], ids=["shell", "exec"])
def test_shell_and_exec_get_the_one_line_explanation_and_fail(bed, require_tool, command):
    ssh = require_tool(SSH)
    relay = bed.serve()
    result = bed.run(ssh_argv(ssh, bed, relay, "-T", "127.0.0.1", *command), timeout=30)
    assert result.code != 0, result.describe()
    assert EXPLANATION in result.stderr, result.describe()
    assert "hello" not in result.stdout, "the command ran on the relay"
    explanation = [line for line in result.stderr.splitlines() if EXPLANATION in line]
    assert len(explanation) == 1, result.describe()
    assert relay.proc.running(), relay.proc.describe()


@pytest.mark.timeout(60)
def test_interactive_ssh_from_a_terminal_gets_the_explanation(bed, require_tool):
    """What a person typing `ssh -p PORT relay` sees: a PTY request (refused), then the
    explanation, then a non-zero exit."""
    ssh = require_tool(SSH)
    relay = bed.serve()
    controller, terminal = pty.openpty()
    try:
        result = bed.run(ssh_argv(ssh, bed, relay, "127.0.0.1"), timeout=30, stdin=terminal)
        os.set_blocking(controller, False)
        try:
            echoed = os.read(controller, 65536).decode(errors="replace")
        except (BlockingIOError, OSError):
            echoed = ""
    finally:
        os.close(terminal)
        os.close(controller)
    output = result.stdout + result.stderr + echoed
    assert result.code != 0, result.describe()
    assert EXPLANATION in output, result.describe()


@pytest.mark.timeout(60)
def test_local_forward_channels_are_refused(bed, targets, require_tool):
    ssh = require_tool(SSH)
    target = targets.tcp_echo()
    relay = bed.serve()
    local_port = bed.free_port()
    proc = bed.start(
        ssh_argv(
            ssh,
            bed,
            relay,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"127.0.0.1:{local_port}:127.0.0.1:{target.port}",
            "127.0.0.1",
        ),
        "ssh -L",
    )
    # ssh listens locally once it has logged in; then every channel it opens is refused.
    bed.wait_until(
        lambda: not bed.tcp_refused(local_port) or not proc.running(),
        15,
        "ssh to listen on its -L port",
    )
    if not proc.running():  # ssh gave up by itself: that is a refusal too, if it says so
        assert proc.wait(5) != 0, proc.describe()
        assert "forwarding" in proc.stderr or "prohibited" in proc.stderr, proc.describe()
    else:
        with socket.create_connection(("127.0.0.1", local_port), timeout=10) as sock:
            sock.settimeout(10)
            try:
                sock.sendall(b"through the relay?")
                data = sock.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except TimeoutError:
                pytest.fail("a connection through ssh -L hung instead of being refused")
        assert data == b"", f"ssh -L carried data through the relay: {data!r}"
        bed.wait_until(
            lambda: "prohibited" in proc.stderr or "open failed" in proc.stderr,
            10,
            "ssh to report the refused channel",
        )
    assert target.connections == 0, "the relay opened a direct-tcpip connection"


@pytest.mark.timeout(60)
def test_remote_forward_is_refused_and_ssh_exits(bed, targets, require_tool):
    ssh = require_tool(SSH)
    target = targets.tcp_echo()
    relay = bed.serve()
    start = time.monotonic()
    result = bed.run(
        ssh_argv(
            ssh,
            bed,
            relay,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"127.0.0.1:0:127.0.0.1:{target.port}",
            "127.0.0.1",
        ),
        timeout=30,
    )
    assert result.code != 0, result.describe()
    assert "forwarding failed" in result.stderr, result.describe()
    assert time.monotonic() - start < 20
    assert relay.proc.running(), relay.proc.describe()


@pytest.mark.timeout(60)
def test_openssh_with_an_unknown_key_is_refused(bed, require_tool):
    ssh = require_tool(SSH)
    relay = bed.serve()
    argv = ssh_argv(ssh, bed, relay, "-T", "127.0.0.1", "true")
    argv[argv.index(str(bed.keys.client))] = str(bed.keys.stranger)
    result = bed.run(argv, timeout=30)
    assert result.code == 255, result.describe()
    assert "Permission denied" in result.stderr, result.describe()
    assert EXPLANATION not in result.stderr


@pytest.mark.timeout(60)
def test_garbage_into_the_subsystem_ends_that_session_only(bed, targets, require_tool):
    """Raw bytes through `ssh -s sshrelay`: a protocol error closes that session, never the
    relay, and the relay still serves a real client afterwards."""
    ssh = require_tool(SSH)
    target = targets.tcp_echo()
    relay = bed.serve()
    garbage = bed.root / "garbage"
    garbage.write_bytes(os.urandom(200_000))
    with garbage.open("rb") as stdin:
        result = bed.run(
            ssh_argv(ssh, bed, relay, "-s", "127.0.0.1", "sshrelay"),
            timeout=30,
            stdin=stdin.fileno(),
        )
    assert result.code != 0, "the relay accepted garbage as a working session"
    assert relay.proc.running(), relay.proc.describe()
    bed.wait_until(lambda: "disconnected" in relay.proc.stderr, 10, "the relay to end the session")
    assert "Traceback" not in relay.proc.stderr, relay.proc.describe()
    tunnel = bed.connect(relay, bed.forward(target.port))
    with socket.create_connection(("127.0.0.1", tunnel.ports[0]), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"still serving")
        assert sock.recv(100) == b"still serving"
