"""The setuptools config maps every package folder into the sshrelay namespace."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("sshrelay", "protocol", "relay", "client")


def _config() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        setuptools: dict[str, object] = tomllib.load(handle)["tool"]["setuptools"]
    return setuptools


def _package_folders() -> dict[str, Path]:
    """Every folder with an __init__.py under the mapped top-level folders, by import name."""
    found: dict[str, Path] = {}
    for top in TOP_LEVEL:
        base = ROOT / top
        for init in base.rglob("__init__.py"):
            folder = init.parent
            parts = folder.relative_to(base).parts
            prefix = "sshrelay" if top == "sshrelay" else f"sshrelay.{top}"
            found[".".join((prefix, *parts))] = folder
    return found


def test_every_package_folder_is_listed() -> None:
    config = _config()
    listed = set(config["packages"])  # type: ignore[call-overload]
    folders = _package_folders()
    assert set(folders) == listed, (
        f"packages missing from pyproject.toml: {sorted(set(folders) - listed)}; "
        f"listed without a folder: {sorted(listed - set(folders))}"
    )


def test_package_dir_maps_each_package_to_its_folder() -> None:
    mapping: dict[str, str] = _config()["package-dir"]  # type: ignore[assignment]
    for name, folder in _package_folders().items():
        assert name in mapping, f"{name} has no package-dir entry"
        assert (ROOT / mapping[name]).resolve() == folder.resolve()


def test_no_bare_top_level_modules_installed() -> None:
    config = _config()
    for package in config["packages"]:  # type: ignore[attr-defined]
        assert package == "sshrelay" or package.startswith("sshrelay."), package
