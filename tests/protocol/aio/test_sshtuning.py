"""TransportWatch reaches into asyncssh's private ``_transport``: fail loudly if that changes.

A real asyncssh server and client on loopback; both connections must expose a
transport whose write buffer TransportWatch can read.
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from sshrelay.protocol.aio.sshtuning import WRITE_HIGH_WATER, TransportWatch, streamline


class _Server(asyncssh.SSHServer):
    def __init__(self, seen: list[asyncssh.SSHServerConnection]) -> None:
        self.seen = seen

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.seen.append(conn)

    def begin_auth(self, username: str) -> bool:
        return False  # no authentication needed: this test is about the transport


async def _check() -> None:
    server_conns: list[asyncssh.SSHServerConnection] = []
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.create_server(
        lambda: _Server(server_conns),
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        process_factory=lambda process: process.exit(0),
    )
    port = acceptor.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="test", client_keys=None
        ) as conn:
            assert server_conns, "the server never saw the connection"
            for end in (conn, server_conns[0]):
                assert getattr(end, "_transport", None) is not None, (
                    f"asyncssh {asyncssh.__version__} no longer has SSHConnection._transport"
                )
                watch = TransportWatch(end)
                assert watch._transport is not None
                assert watch._transport is end._transport  # type: ignore[attr-defined]
                buffered = watch.buffered()
                assert isinstance(buffered, int) and 0 <= buffered <= WRITE_HIGH_WATER
                _low, high = watch._transport.get_write_buffer_limits()
                assert high == WRITE_HIGH_WATER

                # The chained resume_writing still reaches our drain callbacks.
                drained: list[bool] = []
                watch.on_drain(lambda drained=drained: drained.append(True))
                end.resume_writing()
                assert drained == [True]

            # The connection still works after the hooks are in place.
            result = await asyncio.wait_for(conn.run("true", check=False), 10)
            assert result.exit_status == 0
    finally:
        acceptor.close()
        await acceptor.wait_closed()


@pytest.mark.timeout(30)
def test_transport_watch_finds_asyncssh_private_transport() -> None:
    asyncio.run(asyncio.wait_for(_check(), 20))


async def _packets_per_write(streamlined: bool) -> tuple[int, int]:
    """(packets the client sent, channel writes) for a few writes through asyncssh."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    received: list[bytes] = []

    class _Sink(asyncssh.SSHServerSession[bytes]):
        def shell_requested(self) -> bool:
            return True

        def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
            received.append(data)

    class _SinkServer(_Server):
        def session_requested(self) -> _Sink:
            return _Sink()

    acceptor = await asyncssh.create_server(
        lambda: _SinkServer([]),
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        encryption_algs=["aes128-gcm@openssh.com"],
        line_editor=False,
        encoding=None,
    )
    port = acceptor.sockets[0].getsockname()[1]
    writes = 20
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            known_hosts=None,
            username="test",
            client_keys=None,
            encryption_algs=["aes128-gcm@openssh.com"],
        ) as conn:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
            if streamlined:
                streamline(conn)
            before = conn._send_seq  # type: ignore[attr-defined]
            for _ in range(writes):
                chan.write(b"x" * 100)
            sent = conn._send_seq - before  # type: ignore[attr-defined]
            for _ in range(200):
                if sum(map(len, received)) == writes * 100:
                    break
                await asyncio.sleep(0.01)
            assert sum(map(len, received)) == writes * 100
            chan.close()
            return sent, writes
    finally:
        acceptor.close()
        await acceptor.wait_closed()


@pytest.mark.timeout(30)
def test_streamline_drops_asyncssh_ignore_packets_and_nothing_else() -> None:
    # Plain asyncssh sends an empty MSG_IGNORE before every packet once encrypted...
    sent, writes = asyncio.run(asyncio.wait_for(_packets_per_write(False), 20))
    assert sent == 2 * writes
    # ...streamlined, one packet per write, and every byte still arrives.
    sent, writes = asyncio.run(asyncio.wait_for(_packets_per_write(True), 20))
    assert sent == writes
