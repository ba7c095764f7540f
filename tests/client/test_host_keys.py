"""`relay connect` verifies the relay's host key like OpenSSH: fail closed, say what to check."""

from __future__ import annotations

import signal

import pytest


@pytest.mark.timeout(30)
def test_unknown_host_key_fails_and_prints_its_fingerprint(bed, targets):
    target = targets.tcp_echo()
    relay = bed.serve()
    proc = bed.start_connect(relay, bed.forward(target.port), accept_new=False)
    code = proc.wait(20)
    assert code != 0, proc.describe()
    fingerprint = bed.keys.fingerprint(bed.keys.host)
    assert relay.fingerprint == fingerprint
    assert fingerprint in proc.stderr, proc.describe()
    assert "unknown host key" in proc.stderr
    assert "--accept-new" in proc.stderr, "the message should say how to trust the key"
    assert "forward" not in proc.stdout
    assert not bed.known_hosts.exists(), "an unknown key was stored without --accept-new"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("accept_new", [False, True], ids=["strict", "with-accept-new"])
def test_changed_host_key_fails_with_host_key_changed(bed, targets, accept_new):
    target = targets.tcp_echo()
    relay = bed.serve()
    old_line = f"[127.0.0.1]:{relay.port} {bed.keys.public_line(bed.keys.other_host)}\n"
    bed.known_hosts.write_text(old_line)
    proc = bed.start_connect(relay, bed.forward(target.port), accept_new=accept_new)
    code = proc.wait(20)
    assert code != 0, proc.describe()
    assert "HOST KEY CHANGED" in proc.stderr, proc.describe()
    assert relay.fingerprint in proc.stderr, "the message should show the presented key"
    assert bed.known_hosts.read_text() == old_line, "known_hosts was modified"
    assert target.connections == 0


@pytest.mark.timeout(30)
def test_the_same_key_stored_for_port_22_is_not_trusted_for_the_relay_port(bed, targets):
    """known_hosts is matched on [host]:port: an entry for the bare host is sshd's (port 22)."""
    target = targets.tcp_echo()
    relay = bed.serve()
    bed.known_hosts.write_text(f"127.0.0.1 {bed.keys.public_line(bed.keys.host)}\n")
    proc = bed.start_connect(relay, bed.forward(target.port), accept_new=False)
    assert proc.wait(20) != 0, proc.describe()
    assert "unknown host key" in proc.stderr, proc.describe()


@pytest.mark.timeout(60)
def test_the_vps_sshd_key_on_port_22_is_not_a_changed_relay_key(bed, targets):
    """A user who has ssh'd to the VPS before has its sshd key under the bare host name.
    That is not the relay's key and must not be reported as HOST KEY CHANGED."""
    target = targets.tcp_echo()
    relay = bed.serve()
    sshd_line = f"127.0.0.1 {bed.keys.public_line(bed.keys.other_host)}\n"
    bed.known_hosts.write_text(sshd_line)
    strict = bed.start_connect(relay, bed.forward(target.port), accept_new=False)
    assert strict.wait(20) != 0, strict.describe()
    assert "HOST KEY CHANGED" not in strict.stderr, strict.describe()
    assert "unknown host key" in strict.stderr and relay.fingerprint in strict.stderr

    tunnel = bed.connect(relay, bed.forward(target.port), accept_new=True)
    assert tunnel.ports[0] > 0
    stored = bed.known_hosts.read_text()
    assert stored.startswith(sshd_line), "the sshd entry must be kept"
    assert f"[127.0.0.1]:{relay.port} " in stored


@pytest.mark.timeout(60)
def test_accept_new_stores_the_key_and_the_next_connect_needs_no_flag(bed, targets):
    target = targets.tcp_echo()
    relay = bed.serve()
    first = bed.connect(relay, bed.forward(target.port), accept_new=True)
    stored = bed.known_hosts.read_text()
    host_key = bed.keys.public_line(bed.keys.host).split()[:2]
    assert f"[127.0.0.1]:{relay.port} {' '.join(host_key)}" in stored, stored
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(10) == 0, first.proc.describe()

    second = bed.connect(relay, bed.forward(target.port), accept_new=False)
    assert second.ports[0] > 0
    assert bed.known_hosts.read_text() == stored, "a known key was stored twice"


@pytest.mark.timeout(60)
def test_a_hashed_known_hosts_entry_is_trusted(bed, targets, require_tool):
    """`ssh-keygen -H` hashes [host]:port names (HashKnownHosts); they must still match."""
    ssh_keygen = require_tool("/usr/bin/ssh-keygen")
    target = targets.tcp_echo()
    relay = bed.serve()
    bed.known_hosts.write_text(f"[127.0.0.1]:{relay.port} {bed.keys.public_line(bed.keys.host)}\n")
    hashed = bed.run([ssh_keygen, "-H", "-f", str(bed.known_hosts)], timeout=20)
    assert hashed.code == 0, hashed.describe()
    assert bed.known_hosts.read_text().startswith("|1|"), "ssh-keygen -H did not hash"
    tunnel = bed.connect(relay, bed.forward(target.port), accept_new=False)
    assert tunnel.ports[0] > 0
