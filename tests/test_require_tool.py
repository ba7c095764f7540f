"""require_tool(): a missing component skips locally but fails under CI=true."""

from __future__ import annotations

import pytest

MISSING = "/nonexistent/sshrelay-test-tool"


def test_missing_tool_skips_outside_ci(require_tool, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_tool(MISSING)


@pytest.mark.parametrize("value", ["true", "TRUE"])
def test_missing_tool_fails_under_ci(require_tool, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_tool(MISSING)


def test_missing_command_on_path_skips(require_tool, monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_tool("sshrelay-no-such-command")


def test_present_tool_is_returned(require_tool, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_tool("sh").endswith("/sh")
