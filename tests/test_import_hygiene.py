"""The sans-I/O core never touches I/O machinery: time comes in as ``now``.

Two checks: a static one (every ``import`` in every module under ``protocol/``
except the asyncio glue in ``protocol/aio/``), and a dynamic one (import the
core in a fresh interpreter and look at ``sys.modules``).
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "protocol"
FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "asyncssh",
        "prometheus_client",
        "uvloop",
        "selectors",
        "ssl",
        "threading",
        "time",
    }
)
# The core may not reach the I/O layers of this project either.
FORBIDDEN_PROJECT = ("sshrelay.protocol.aio", "sshrelay.relay", "sshrelay.client")
# What a fresh interpreter must not have loaded (``time`` is loaded at start-up).
NOT_LOADED = ("asyncio", "socket", "asyncssh", "prometheus_client", "uvloop", "selectors", "ssl")


def _core_files() -> list[Path]:
    files = sorted(
        path for path in PROTOCOL.rglob("*.py") if (PROTOCOL / "aio") not in path.parents
    )
    assert files, f"no Python files under {PROTOCOL}"
    return files


def _core_modules() -> list[str]:
    names = []
    for path in _core_files():
        parts = path.relative_to(PROTOCOL).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("sshrelay", "protocol", *parts)))
    return names


def _imported_names(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """Every module name an ``import`` statement or a literal dynamic import names."""
    package = module if module.endswith("protocol") else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _violations(name: str) -> bool:
    if name.split(".")[0] in FORBIDDEN:
        return True
    return any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN_PROJECT)


@pytest.mark.parametrize("path", _core_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_core_module_imports_no_io(path: Path) -> None:
    module = _core_modules()[_core_files().index(path)]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for line, name in _imported_names(tree, module)
        if _violations(name)
    ]
    assert not bad, "the sans-I/O core imports I/O machinery:\n" + "\n".join(bad)


def test_the_static_check_sees_every_kind_of_import() -> None:
    source = (
        "import os, time\n"
        "from asyncio import sleep\n"
        "def f():\n"
        "    import socket\n"
        "    __import__('ssl')\n"
        "    importlib.import_module('uvloop')\n"
        "from .aio import session\n"
        "from . import aio\n"
        "from sshrelay.relay import server\n"
    )
    names = [name for _, name in _imported_names(ast.parse(source), "sshrelay.protocol.x")]
    flagged = sorted({name for name in names if _violations(name)})
    assert flagged == sorted(
        [
            "asyncio",
            "asyncio.sleep",
            "socket",
            "ssl",
            "sshrelay.protocol.aio",
            "sshrelay.protocol.aio.session",
            "sshrelay.relay",
            "sshrelay.relay.server",
            "time",
            "uvloop",
        ]
    )
    assert "os" in names


def test_aio_is_the_only_excluded_folder() -> None:
    excluded = {
        path.relative_to(PROTOCOL).parts[0]
        for path in PROTOCOL.rglob("*.py")
        if path not in _core_files()
    }
    assert excluded <= {"aio"}
    assert "sshrelay.protocol.multiplexer" in _core_modules()


@functools.cache
def _loaded_after_import(modules: tuple[str, ...], *, skip_package_init: bool) -> list[str]:
    """Import ``modules`` in a fresh interpreter; return what ``sys.modules`` then holds."""
    stub = (
        # Keep sshrelay/__init__.py out: this checks protocol/ alone.
        "import importlib.util, types\n"
        "spec = importlib.util.find_spec('sshrelay')\n"
        "root = types.ModuleType('sshrelay')\n"
        "root.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['sshrelay'] = root\n"
    )
    code = (
        "import sys\n"
        + (stub if skip_package_init else "")
        + "".join(f"import {name}\n" for name in modules)
        + "loaded = sorted(sys.modules)\n"
        + "import json\n"
        + "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize("banned", NOT_LOADED)
def test_importing_the_core_loads_no_io_machinery(banned: str) -> None:
    loaded = _loaded_after_import(tuple(_core_modules()), skip_package_init=True)
    assert "sshrelay.protocol.multiplexer" in loaded
    offenders = [name for name in loaded if name == banned or name.startswith(banned + ".")]
    assert not offenders


@pytest.mark.parametrize("banned", NOT_LOADED)
def test_importing_the_multiplexer_loads_no_io_machinery(banned: str) -> None:
    """As an application would: ``import sshrelay.protocol.multiplexer``."""
    loaded = _loaded_after_import(
        ("sshrelay.protocol", "sshrelay.protocol.multiplexer", "sshrelay.protocol.pair"),
        skip_package_init=False,
    )
    offenders = [name for name in loaded if name == banned or name.startswith(banned + ".")]
    assert not offenders
