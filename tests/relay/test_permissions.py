"""Per-key permissions from OpenSSH authorized_keys options, enforced by the running relay."""

from __future__ import annotations

import socket
import time

import pytest

EXIT_FORWARD_REFUSED = 3


def _key_line(bed, options: str = "") -> str:  # type: ignore[no-untyped-def]
    line = bed.keys.public_line(bed.keys.client)
    return f"{options} {line}\n" if options else f"{line}\n"


@pytest.mark.timeout(30)
def test_no_port_forwarding_refuses_every_forward(bed, targets):
    target = targets.tcp_echo()
    bed.authorized_keys.write_text(_key_line(bed, "no-port-forwarding"))
    relay = bed.serve()
    proc = bed.start_connect(relay, bed.forward(target.port))
    assert proc.wait(20) == EXIT_FORWARD_REFUSED, proc.describe()
    assert "no-port-forwarding" in proc.stderr, proc.describe()


@pytest.mark.timeout(30)
def test_restrict_without_port_forwarding_refuses_forwards(bed, targets):
    """OpenSSH's `restrict` turns port forwarding off unless `port-forwarding` follows."""
    target = targets.tcp_echo()
    bed.authorized_keys.write_text(_key_line(bed, "restrict"))
    relay = bed.serve()
    proc = bed.start_connect(relay, bed.forward(target.port))
    assert proc.wait(20) == EXIT_FORWARD_REFUSED, proc.describe()
    assert "forward" not in proc.stdout


@pytest.mark.timeout(30)
def test_restrict_with_port_forwarding_allows_forwards(bed, targets):
    target = targets.tcp_echo()
    bed.authorized_keys.write_text(_key_line(bed, "restrict,port-forwarding"))
    relay = bed.serve()
    tunnel = bed.connect(relay, bed.forward(target.port))
    assert tunnel.ports[0] > 0


@pytest.mark.timeout(40)
def test_permitlisten_allows_only_the_listed_port_and_protocol(bed, targets):
    udp_target = targets.udp()
    allowed = bed.free_port(socket.SOCK_DGRAM)
    bed.authorized_keys.write_text(_key_line(bed, f'permitlisten="127.0.0.1:{allowed}/udp"'))
    relay = bed.serve()

    tunnel = bed.connect(relay, bed.forward(udp_target.port, "udp", public_port=allowed))
    assert tunnel.ports == [allowed]
    tunnel.proc.kill()

    for spec in (
        bed.forward(udp_target.port, "tcp", public_port=allowed),  # wrong protocol
        bed.forward(udp_target.port, "udp", public_port=0),  # not the listed port
    ):
        proc = bed.start_connect(relay, spec)
        assert proc.wait(20) == EXIT_FORWARD_REFUSED, proc.describe()
        assert "permitlisten" in proc.stderr, proc.describe()


@pytest.mark.timeout(30)
def test_privileged_port_needs_an_explicit_permitlisten(bed, targets):
    target = targets.tcp_echo()
    relay = bed.serve()
    proc = bed.start_connect(relay, bed.forward(target.port, public_port=80))
    assert proc.wait(20) == EXIT_FORWARD_REFUSED, proc.describe()
    assert "privileged" in proc.stderr and "80" in proc.stderr, proc.describe()


@pytest.mark.timeout(40)
def test_a_key_removed_while_the_relay_runs_can_no_longer_log_in(bed, targets):
    target = targets.tcp_echo()
    other = bed.keys.public_line(bed.keys.stranger)
    bed.authorized_keys.write_text(_key_line(bed) + other + "\n")
    relay = bed.serve()
    first = bed.connect(relay, bed.forward(target.port))
    first.proc.kill()

    bed.authorized_keys.write_text(other + "\n")
    proc = bed.start_connect(relay, bed.forward(target.port))
    assert proc.wait(20) != 0, proc.describe()
    assert "refused our key" in proc.stderr, proc.describe()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_emptying_authorized_keys_while_running_revokes_every_key(bed, targets, how):
    """Fail closed: an authorized_keys file with no key authorizes nobody."""
    target = targets.tcp_echo()
    relay = bed.serve()
    first = bed.connect(relay, bed.forward(target.port))
    first.proc.kill()

    if how == "emptied":
        bed.authorized_keys.write_text("")
    else:
        bed.authorized_keys.unlink()
    proc = bed.start_connect(relay, bed.forward(target.port))
    assert proc.wait(20) != 0, proc.describe()
    assert "refused our key" in proc.stderr, proc.describe()
    assert relay.proc.running(), relay.proc.describe()


@pytest.mark.timeout(60)
def test_removing_a_key_closes_its_live_session_and_releases_its_ports(bed, targets):
    """ACLs are not only checked at login: a live session of a removed key is closed,
    its public port released at once (no grace period), and the client cannot return."""
    target = targets.tcp_echo()
    other = bed.keys.public_line(bed.keys.stranger)
    bed.authorized_keys.write_text(_key_line(bed) + other + "\n")
    config = bed.write("relay.toml", "[serve]\nkey_check_interval = 0.5\n")
    relay = bed.serve("--config", str(config))
    tunnel = bed.connect(relay, bed.forward(target.port))
    port = tunnel.ports[0]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"

    bed.authorized_keys.write_text(other + "\n")
    started = time.monotonic()
    bed.wait_until(lambda: bed.tcp_refused(port), 10, "the revoked key's port to close")
    closed_after = time.monotonic() - started
    relay.proc.wait_line(
        r"key removed from authorized_keys; closing its session", timeout=5, stream="stderr"
    )
    # The client notices, tries to come back, and is refused for good (exit 4).
    assert tunnel.proc.wait(30) == 4, tunnel.proc.describe()
    assert "refused our key" in tunnel.proc.stderr, tunnel.proc.describe()
    print(f"port closed {closed_after:.2f} s after the key was removed (check interval 0.5 s)")
    assert closed_after < 5
