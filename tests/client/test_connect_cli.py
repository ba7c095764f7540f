"""`relay connect` as a process: refusals, usage errors, config files, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

import pytest

EXIT_USAGE = 2
EXIT_FORWARD_REFUSED = 3


@pytest.mark.timeout(30)
def test_wrong_client_key_exits_non_zero_with_a_clear_message(bed, targets):
    target = targets.tcp_echo()
    relay = bed.serve()
    proc = bed.start_connect(relay, bed.forward(target.port), key=bed.keys.stranger)
    code = proc.wait(20)
    assert code != 0, proc.describe()
    assert "refused our key" in proc.stderr, proc.describe()
    assert str(bed.keys.stranger) in proc.stderr
    assert "authorized_keys" in proc.stderr, "the message should say where the key must go"
    assert "Traceback" not in proc.stderr
    bed.wait_until(lambda: "not authorized" in relay.proc.stderr, 5, "the relay to log it")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_forward_to_a_port_in_use_on_the_relay_exits_3_naming_the_port(bed, targets, proto):
    target = targets.tcp_echo() if proto == "tcp" else targets.udp()
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as squatter:
        squatter.bind(("127.0.0.1", 0))
        if proto == "tcp":
            squatter.listen()
        busy = squatter.getsockname()[1]
        relay = bed.serve()
        proc = bed.start_connect(relay, bed.forward(target.port, proto, public_port=busy))
        code = proc.wait(20)
    assert code == EXIT_FORWARD_REFUSED, proc.describe()
    assert str(busy) in proc.stderr, proc.describe()
    assert "in use" in proc.stderr, proc.describe()
    assert "forward" not in proc.stdout, "a refused forward was reported as up"
    assert relay.proc.running(), relay.proc.describe()


@pytest.mark.timeout(30)
def test_one_refused_forward_fails_the_whole_connect(bed, targets):
    """Never a silently partial tunnel: the good forward is released again."""
    target = targets.tcp_echo()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        good = bed.free_port()
        relay = bed.serve()
        proc = bed.start_connect(
            relay,
            bed.forward(target.port, public_port=good),
            bed.forward(target.port, public_port=busy),
        )
        assert proc.wait(20) == EXIT_FORWARD_REFUSED, proc.describe()
    bed.wait_until(lambda: bed.tcp_refused(good), 5, f"the relay to release port {good}")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "spec",
    [
        "nonsense",
        "8080:127.0.0.1",
        "0:127.0.0.1:80/sctp",
        "0:127.0.0.1:0",
        "70000:127.0.0.1:80",
        "0:127.0.0.1:http",
        "not-an-ip:0:127.0.0.1:80",
        "0::80",
    ],
)
def test_bad_forward_spec_exits_2_with_one_line(bed, spec):
    result = bed.relay(*bed.connect_args(9, spec)[1:], timeout=20)
    assert result.code == EXIT_USAGE, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("relay connect: error:"), lines[0]
    assert result.stdout == ""


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [
        ["connect"],  # no relay address
        ["connect", "127.0.0.1:2222", "-i", "k"],  # no forward
        ["connect", "127.0.0.1:notaport", "-R", "0:127.0.0.1:80", "-i", "k"],
        ["connect", "127.0.0.1:0", "-R", "0:127.0.0.1:80", "-i", "k"],
        ["connect", "127.0.0.1", "-R", "0:127.0.0.1:80", "-i", "k", "--udp-idle-timeout", "x"],
        ["connect", "--frobnicate"],
        ["connect", "a", "b"],
        ["bogus-command"],
        [],
    ],
    ids=[
        "no-server",
        "no-forward",
        "port-not-a-number",
        "port-zero",
        "bad-float",
        "unknown-flag",
        "two-servers",
        "unknown-command",
        "no-command",
    ],
)
def test_bad_arguments_exit_2_with_one_line(bed, args):
    result = bed.relay(*args, timeout=20)
    assert result.code == EXIT_USAGE, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert "error" in lines[0], lines[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[connect]\nserver = "127.0.0.1:9"\nforwardz = []\n', "forwardz"),
        (
            '[connect]\nserver = "127.0.0.1:9"\n'
            '[[connect.forwards]]\nspec = "0:127.0.0.1:80/udp"\nidle_timout = 5\n',
            "idle_timout",
        ),
        ('[connect]\nserver = "127.0.0.1:9"\n[conect]\n', "conect"),
    ],
    ids=["top-level", "forward-table", "section"],
)
def test_config_with_an_unknown_key_exits_2_naming_key_and_file(bed, body, key):
    config = bed.write("client.toml", body)
    result = bed.relay("connect", "--config", str(config), "-i", "k", timeout=20)
    assert result.code == EXIT_USAGE, result.describe()
    assert key in result.stderr and str(config) in result.stderr, result.describe()
    assert len(result.stderr.strip().splitlines()) == 1, result.describe()


@pytest.mark.timeout(30)
def test_config_with_a_bad_value_exits_2(bed):
    config = bed.write(
        "client.toml",
        '[connect]\nserver = "127.0.0.1:9"\n'
        '[[connect.forwards]]\nspec = "0:127.0.0.1:80/udp"\nidle_timeout = -1\n',
    )
    result = bed.relay("connect", "--config", str(config), "-i", "k", timeout=20)
    assert result.code == EXIT_USAGE, result.describe()
    assert "idle_timeout" in result.stderr, result.describe()


@pytest.mark.timeout(30)
def test_unreachable_relay_without_reconnect_fails_quickly_and_says_so(bed, targets):
    target = targets.tcp_echo()
    port = bed.free_port()  # nobody listens here
    proc = bed.start_connect(port, bed.forward(target.port), extra=["--no-reconnect"])
    assert proc.wait(20) not in (0, EXIT_USAGE), proc.describe()
    assert "cannot connect" in proc.stderr, proc.describe()
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(40)
def test_unreachable_relay_is_retried_until_stopped(bed, targets):
    target = targets.tcp_echo()
    port = bed.free_port()
    proc = bed.start_connect(port, bed.forward(target.port))
    bed.wait_until(
        lambda: proc.stderr.count("cannot connect") >= 2 or not proc.running(),
        15,
        "two connection attempts",
    )
    assert proc.running(), proc.describe()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.describe()


@pytest.mark.timeout(40)
def test_max_retries_gives_up(bed, targets):
    target = targets.tcp_echo()
    port = bed.free_port()
    proc = bed.start_connect(port, bed.forward(target.port), extra=["--max-retries", "1"])
    assert proc.wait(20) not in (0, EXIT_USAGE), proc.describe()
    assert "cannot connect" in proc.stderr, proc.describe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_and_the_relay_closes_its_public_ports(bed, targets, signum):
    target = targets.tcp_echo()
    udp_target = targets.udp()
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port), bed.forward(udp_target.port, "udp"))
    public_tcp, public_udp = tunnel.ports
    with socket.create_connection(("127.0.0.1", public_tcp), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"

    tunnel.proc.send_signal(signum)
    assert tunnel.proc.wait(10) == 0, tunnel.proc.describe()
    bed.wait_until(lambda: bed.tcp_refused(public_tcp), 5, "the public TCP port to close")

    def udp_released() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", public_udp))
            except OSError:
                return False
            return True

    bed.wait_until(udp_released, 5, "the public UDP port to be released")
    assert relay.proc.running(), relay.proc.describe()
    # The same forwards can be taken again at once (no "address already in use").
    again = bed.connect(
        relay,
        bed.forward(target.port, public_port=public_tcp),
        bed.forward(udp_target.port, "udp", public_port=public_udp),
        accept_new=False,
    )
    assert again.ports == [public_tcp, public_udp]


@pytest.mark.timeout(60)
def test_sigterm_during_a_transfer_still_says_goodbye_and_closes_the_port(bed, targets):
    """The GOAWAY must reach the relay even behind queued bulk data; otherwise the relay
    takes the exit for a lost link and keeps the public port leased."""
    target = targets.tcp_sink_source(1 << 30)  # sends far more than this test reads
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))
    public = tunnel.ports[0]
    block = os.urandom(1 << 16)
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", public), timeout=10) as sock:

        def pump() -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock.sendall(block)

        def drain() -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set() and sock.recv(1 << 20):
                    pass

        workers = [threading.Thread(target=f, daemon=True) for f in (pump, drain)]
        for worker in workers:
            worker.start()
        bed.wait_until(lambda: target.connections, 10, "the transfer to start")
        time_to_fill = 0.5  # let the channel and the windows fill up
        stop.wait(time_to_fill)
        tunnel.proc.send_signal(signal.SIGTERM)
        assert tunnel.proc.wait(10) == 0, tunnel.proc.describe()
        stop.set()
    for worker in workers:
        worker.join(5)
    bed.wait_until(lambda: bed.tcp_refused(public), 5, "the public port to close")
    assert "client shutting down" in relay.proc.stderr, relay.proc.describe()


def test_forwards_get_distinct_names_for_metric_labels() -> None:
    from sshrelay.client.cli import unique_names
    from sshrelay.protocol.forwards import parse_forward_spec

    specs = [
        parse_forward_spec("0:127.0.0.1:9"),
        parse_forward_spec("0:127.0.0.1:7"),
        parse_forward_spec("8080:127.0.0.1:80"),
        parse_forward_spec("0:127.0.0.1:1/udp", "wg"),
    ]
    assert [spec.label for spec in unique_names(specs)] == ["tcp/0", "tcp/0-2", "tcp/8080", "wg"]
    twice = [parse_forward_spec("1:h:1", "a"), parse_forward_spec("2:h:2", "a")]
    with pytest.raises(ValueError, match="'a' is used more than once"):
        unique_names(twice)
