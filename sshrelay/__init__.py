"""sshrelay: expose home TCP and UDP services on a VPS over one SSH connection.

The package is assembled from the repository's top-level folders:
``protocol/`` (sans-I/O core and shared asyncio glue), ``relay/`` (the VPS side)
and ``client/`` (the home side). This module only carries the version; it is a
plain constant (pyproject.toml reads it) so that importing the sans-I/O core
loads no I/O module (``importlib.metadata`` would pull in ``socket``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
