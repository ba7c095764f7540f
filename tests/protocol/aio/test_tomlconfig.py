"""The tunnel settings both ends accept in TOML: checked, named in errors, applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from sshrelay.protocol.aio.tomlconfig import (
    TUNNEL_SETTINGS,
    ConfigError,
    check_table,
    load_section,
    tunnel_config,
)
from sshrelay.protocol.config import MuxConfig


def _load(tmp_path: Path, text: str) -> dict[str, object]:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return check_table(load_section(path, "serve"), TUNNEL_SETTINGS, f"{path} [serve]")


def test_defaults_without_keys() -> None:
    dead_link, mux = tunnel_config({})
    assert dead_link.timeout == 12.0
    assert mux.stream_window == MuxConfig().stream_window
    assert mux.latency_window == MuxConfig().latency_window == 256 * 1024
    assert mux.ping_interval == 3.0 and mux.ping_timeout == 9.0


def test_windows_and_timings_are_applied(tmp_path: Path) -> None:
    values = _load(
        tmp_path,
        "[serve]\nstream_window = 4194304\nlatency_window = 131072\n"
        "dead_link_timeout = 20\nmax_datagram_age = 0.1\n",
    )
    dead_link, mux = tunnel_config(values)
    assert mux.stream_window == 4 * 1024 * 1024
    assert mux.latency_window == 128 * 1024
    assert dead_link.timeout == 20.0 and mux.ping_timeout == 15.0
    assert mux.max_datagram_age == 0.1


def test_max_stream_window_below_the_window_means_a_fixed_window(tmp_path: Path) -> None:
    _, mux = tunnel_config(_load(tmp_path, "[serve]\nmax_stream_window = 4096\n"))
    assert mux.max_stream_window == mux.stream_window  # no growth
    _, mux = tunnel_config(_load(tmp_path, "[serve]\nmax_stream_window = 67108864\n"))
    assert mux.max_stream_window == 64 * 1024 * 1024


def test_latency_window_zero_turns_latency_mode_off(tmp_path: Path) -> None:
    _, mux = tunnel_config(_load(tmp_path, "[serve]\nlatency_window = 0\n"))
    assert mux.latency_window is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("latency_window = 100", "'latency_window' must be 0 (off) or at least 1024"),
        ("latency_window = -1", "'latency_window' must be 0 (off) or at least 1024"),
        ("latency_window = 1.5", "'latency_window' must be int"),
        ("stream_window = 512", "'stream_window' must be at least 1024"),
        ("stream_windw = 4096", "unknown key 'stream_windw'"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[serve]\n{line}\n")
    assert message in str(info.value)
    assert str(tmp_path / "relay.toml") in str(info.value)


def test_a_whole_number_is_accepted_for_seconds(tmp_path: Path) -> None:
    values = _load(tmp_path, "[serve]\ndead_link_timeout = 20\n")
    assert values["dead_link_timeout"] == 20.0
    assert isinstance(values["dead_link_timeout"], float)
