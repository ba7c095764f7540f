"""sshrelay: expose home TCP and UDP services on a VPS over one SSH connection.

The package is assembled from the repository's top-level folders:
``protocol/`` (sans-I/O core and shared asyncio glue), ``relay/`` (the VPS side)
and ``client/`` (the home side). This module only carries the version.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sshrelay")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
