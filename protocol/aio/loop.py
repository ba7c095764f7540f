"""Event-loop selection: uvloop when available, the stdlib loop otherwise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop (unless ``SSHRELAY_NO_UVLOOP`` is set) or asyncio."""
    if os.environ.get("SSHRELAY_NO_UVLOOP") != "1" and uvloop_available():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
