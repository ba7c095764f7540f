"""Logging set-up shared by both ends: one line per event, to stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info") -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sshrelay")
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    root.propagate = False
    # asyncssh logs every channel at INFO; keep only its warnings.
    logging.getLogger("asyncssh").setLevel(max(numeric, logging.WARNING))
