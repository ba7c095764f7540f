"""The sans-I/O core of sshrelay, shared by the relay and the client.

Bytes and ``now`` go in (``Multiplexer.receive_data``, ``handle_timer``),
events and bytes come out (event lists, ``data_to_send``). Nothing in this
package imports asyncio, socket, asyncssh, prometheus_client or uvloop, with
the single exception of the ``aio`` subpackage, which is the asyncio glue.
"""

from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from sshrelay.protocol.multiplexer import Multiplexer

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "Multiplexer",
    "MuxConfig",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
]
