"""`relay demo` (the README's first command) runs both ends on loopback and prints a table."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(90)
def test_relay_demo_exits_0_and_prints_its_table(bed):
    result = bed.relay("demo", "--seconds", "0.5", timeout=60)
    assert result.code == 0, result.describe()
    out = result.stdout
    assert "FAILED" not in out, result.describe()
    assert "measurement" in out and "value" in out, result.describe()
    rows = {
        "UDP RTT p50, direct": " us",
        "UDP RTT p50, through the tunnel": " us",
        "UDP RTT p99, through the tunnel": " us",
        "UDP 1200 B echoed datagrams/s": " /s",
        "TCP echo through the tunnel": " MB/s",
    }
    for name, unit in rows.items():
        lines = [line for line in out.splitlines() if line.startswith(name)]
        assert len(lines) == 1, f"row {name!r} missing:\n{out}"
        value = lines[0][len(name) :].strip().removesuffix(unit.strip()).strip()
        assert float(value) > 0, f"row {name!r} has no positive value: {lines[0]!r}"
    assert "Traceback" not in result.stderr, result.describe()


@pytest.mark.timeout(30)
def test_relay_help_lists_every_command(bed):
    result = bed.relay("--help")
    assert result.code == 0, result.describe()
    for command in ("serve", "connect", "keygen", "demo"):
        assert command in result.stdout
    for command in ("serve", "connect", "keygen"):
        sub = bed.relay(command, "--help")
        assert sub.code == 0, sub.describe()
        assert "example" in sub.stdout, f"`relay {command} --help` has no examples"


@pytest.mark.timeout(30)
def test_keygen_writes_an_openssh_pair_and_refuses_to_overwrite(bed):
    path = bed.root / "id_test"
    first = bed.relay("keygen", str(path))
    assert first.code == 0, first.describe()
    assert path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert path.stat().st_mode & 0o077 == 0, "the private key is readable by others"
    assert (bed.root / "id_test.pub").read_text().startswith("ssh-ed25519 ")
    second = bed.relay("keygen", str(path))
    assert second.code == 2, second.describe()
    assert len(second.stderr.strip().splitlines()) == 1
    assert "exists" in second.stderr
