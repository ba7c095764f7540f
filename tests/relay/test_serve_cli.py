"""`relay serve` as a process: refusing to start on bad set-ups, clean shutdown on signals."""

from __future__ import annotations

import signal
import socket

import pytest


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content", ["", "\n# only a comment\n\n"], ids=["empty", "comments"])
def test_empty_authorized_keys_refuses_to_start_and_says_how_to_add_a_key(bed, content):
    bed.authorized_keys.write_text(content)
    proc = bed.start(bed.serve_args(), "relay serve")
    code = proc.wait(15)
    assert code != 0, proc.describe()
    assert "listening" not in proc.stdout, proc.describe()
    message = proc.stderr
    assert str(bed.authorized_keys) in message, message
    assert "relay keygen" in message and ".pub" in message, (
        f"the message should say how to add a key: {message}"
    )


@pytest.mark.timeout(30)
def test_missing_authorized_keys_refuses_to_start(bed):
    bed.authorized_keys.unlink()
    proc = bed.start(bed.serve_args(), "relay serve")
    assert proc.wait(15) != 0
    assert "does not exist" in proc.stderr and "relay keygen" in proc.stderr, proc.describe()


@pytest.mark.timeout(30)
def test_config_with_an_unknown_key_exits_2_naming_key_and_file(bed):
    config = bed.write("relay.toml", '[serve]\nlisten = "127.0.0.1:0"\nlisen_port = 22\n')
    result = bed.relay("serve", "--config", str(config), "--authorized-keys", "x")
    assert result.code == 2, result.describe()
    assert "lisen_port" in result.stderr and str(config) in result.stderr, result.describe()
    assert len(result.stderr.strip().splitlines()) == 1, result.describe()


@pytest.mark.timeout(30)
def test_config_with_an_unknown_section_exits_2(bed):
    config = bed.write("relay.toml", "[server]\nlisten = '127.0.0.1:0'\n")
    result = bed.relay("serve", "--config", str(config))
    assert result.code == 2, result.describe()
    assert "server" in result.stderr and str(config) in result.stderr, result.describe()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [
        ["--listen", "127.0.0.1:notaport"],
        ["--listen", "127.0.0.1:70000"],
        ["--log-level", "loud"],
        ["--no-such-flag"],
        ["unexpected-positional"],
    ],
    ids=["port-not-a-number", "port-out-of-range", "bad-choice", "unknown-flag", "positional"],
)
def test_bad_arguments_exit_2_with_one_line(bed, args):
    result = bed.relay("serve", *args)
    assert result.code == 2, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert "error" in lines[0]
    assert result.stdout == ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_and_closes_every_listener(bed, targets, signum):
    target = targets.tcp_echo()
    udp_target = targets.udp()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port), bed.forward(udp_target.port, "udp"))
    public_tcp, public_udp = tunnel.ports
    with socket.create_connection(("127.0.0.1", public_tcp), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"

    relay.proc.send_signal(signum)
    assert relay.proc.wait(10) == 0, relay.proc.describe()
    assert bed.tcp_refused(relay.port), "the SSH port still accepts connections"
    assert bed.tcp_refused(public_tcp), "the public TCP port still accepts connections"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", public_udp))  # succeeds only if the relay let the port go
