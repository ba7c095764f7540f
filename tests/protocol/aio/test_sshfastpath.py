"""ChannelFastPath against real asyncssh (and OpenSSH) on loopback.

The fast path builds and parses AES-GCM SSH_MSG_CHANNEL_DATA packets itself and
hands everything else to asyncssh, reading and writing asyncssh private state.
These tests check that the bytes a channel delivers are exactly the bytes that
were written, whichever ends use the fast path, that both ends' books (windows,
sequence numbers, rekey byte counts) agree, and that the fast path is really
used when it should be and steps aside when it must:

* one-way transfers fast->fast, fast->slow and slow->fast in both directions,
  with packet sizes around the peer's maximum packet size, with a window large
  enough for everything (every write goes the fast way, exact window and
  sequence-number accounting) and with a window smaller than single writes
  (fallback to ``chan.write`` and window adjusts mid-transfer, then the fast
  path again);
* a receiver that pauses reading (no delivery while paused, asyncssh's buffer
  first on resume), one that closes mid-transfer (nothing delivered after the
  close), and two channels on one connection (each fast path takes only its own);
* concurrent transfers both ways with frequent re-keying: several key exchanges,
  fast packets under more than one key in each direction, none while a key
  exchange is in progress, and rekeys started on time by each side's own byte
  count (so the fast path's rekey accounting is real);
* packet debug logging (level 3) and a non-GCM cipher: no fast packets at all;
* interop with OpenSSH's own AES-GCM: the `ssh` client sends through an
  asyncssh server whose session echoes via the fast path, with no rekeys, with
  rekeys started by the server and with rekeys started by OpenSSH.

Channels the fast path cannot drive (asyncssh's line-editor proxy, text
channels) are refused with a TypeError.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.channel import SSHChannel, SSHClientChannel
from asyncssh.logging import SSHLogger
from asyncssh.session import SSHSession

from sshrelay.protocol.aio.sshfastpath import ChannelFastPath
from sshrelay.protocol.aio.sshtuning import quiet_packet_log, streamline

LOOPBACK = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB
GCM = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"
PKTSIZE = 32768  # max_pktsize on both ends (the production value)
BIG_WINDOW = 16 * MiB  # more than any one-way transfer here: no write waits for the window
SMALL_WINDOW = 256 * KiB  # less than some single writes
CHAN_HIGH_WATER = 256 * KiB  # senders pause while asyncssh buffers more than this
TRANSPORT_HIGH_WATER = 1 * MiB  # ... or the TCP transport does


# ---------------------------------------------------------------------------- payloads


def _payload(seed: int, total: int, max_chunk: int = 1 * MiB) -> list[bytes]:
    """Random chunks: the sizes around a packet first, then random sizes up to ``total``."""
    rng = random.Random(seed)
    sizes = [1, PKTSIZE - 1, PKTSIZE, PKTSIZE + 1, 100 * KiB, 2 * PKTSIZE + 7]
    while sum(sizes) < total:
        kind = rng.randrange(3)
        if kind == 0:
            sizes.append(rng.randint(1, 64))
        elif kind == 1:
            sizes.append(rng.randint(1, 4 * PKTSIZE))
        else:
            sizes.append(rng.randint(PKTSIZE, max_chunk))
    return [rng.randbytes(size) for size in sizes]


def _sha(chunks: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _packets(chunks: Sequence[bytes]) -> int:
    """CHANNEL_DATA packets for these writes when the window never limits them."""
    return sum(math.ceil(len(chunk) / PKTSIZE) for chunk in chunks)


def _note(keys: list[object], key: object) -> None:
    """Remember ``key`` (by identity; the list keeps it alive, so ids are never reused)."""
    if not any(known is key for known in keys):
        keys.append(key)


def _same(peer: _ClientPeer) -> _ClientPeer:
    """A session factory that returns an existing session."""
    return peer


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


# ---------------------------------------------------------------------------- sessions


class _Peer(SSHSession[bytes]):
    """One end of the channel: optional fast path, hashed input, paced output, counters."""

    def __init__(self, name: str, install: bool, fast_send: bool | None = None) -> None:
        self.name = name
        self.install = install
        self.fast_send = install if fast_send is None else fast_send
        assert install or not self.fast_send
        self.chan: Any = None
        self.conn: Any = None
        self.fast: ChannelFastPath | None = None
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()  # connection_lost
        for future in (self.started, self.eof):
            future.add_done_callback(_retrieve)  # reported by the awaiting test, or moot
        self.digest = hashlib.sha256()
        self.received = 0
        self.deliveries = 0  # data_received calls
        self.chan_writes = 0  # chan.write calls: ours, or the fast path's fallback
        self.write_log: list[str] = []  # per write of ours: "fast" or "asyncssh"
        self.fast_send_keys: list[object] = []  # send encryptions fast packets went out under
        self.fast_recv_keys: list[object] = []  # receive encryptions fast packets came under
        self._fast_seen = 0
        self.pause_every = 0  # with N > 0: pause_reading() after every N bytes ...
        self.pause_for = 0.01  # ... for this many seconds
        self.pauses = 0
        self.fast_at_pause: list[int] = []  # fast_received when each pause began
        self.delivered_while_paused = 0
        self._paused = False
        self._next_pause = 0
        self.close_after = 0  # with N > 0: chan.close() once N bytes have arrived
        self.received_at_close: int | None = None
        self.delivered_after_close = 0
        self.fast_in_kex = 0  # fast writes while a key exchange was in progress (RFC 4253 7.1)

    # -- asyncssh callbacks

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        self.conn = chan.get_connection()
        streamline(self.conn)  # as production: no empty MSG_IGNORE, no per-packet log formatting
        quiet_packet_log(chan)
        original_write = chan.write

        def counting_write(data: bytes, datatype: asyncssh.DataType = None) -> None:
            self.chan_writes += 1
            original_write(data, datatype)

        chan.write = counting_write
        if self.install:
            self.fast = ChannelFastPath(chan)

    def session_started(self) -> None:
        if not self.started.done():
            self.started.set_result(None)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        assert isinstance(data, bytes) and datatype is None, (type(data), datatype)
        if self._paused:
            self.delivered_while_paused += 1
        if self.received_at_close is not None:
            self.delivered_after_close += 1
            return
        self.digest.update(data)
        self.received += len(data)
        self.deliveries += 1
        fast = self.fast
        if fast is not None and fast.fast_packets_received != self._fast_seen:
            self._fast_seen = fast.fast_packets_received
            _note(self.fast_recv_keys, self.conn._recv_encryption)
        if self.pause_every and self.received >= self._next_pause:
            self._next_pause = self.received + self.pause_every
            self._paused = True
            self.pauses += 1
            self.fast_at_pause.append(self.fast_received)
            self.chan.pause_reading()
            asyncio.get_running_loop().call_later(self.pause_for, self._resume)
        if self.close_after and self.received >= self.close_after:
            self.received_at_close = self.received
            self.chan.close()  # what is still in flight must not reach us any more

    def _resume(self) -> None:
        self._paused = False
        self.chan.resume_reading()  # delivers what asyncssh buffered meanwhile, at once

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return True  # half-close only: the other direction may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.started, self.eof):
            if not future.done():
                future.set_exception(
                    ConnectionError(f"{self.name}: channel closed before EOF ({exc!r})")
                )
        if self.fast is not None:
            self.fast.detach()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- sending

    def write(self, data: bytes) -> None:
        fast = self.fast
        if fast is not None and self.fast_send:
            before_fast, before_chan = fast.fast_packets_sent, self.chan_writes
            in_kex = not self.conn._kex_complete
            fast.write(data)
            if fast.fast_packets_sent != before_fast:
                assert self.chan_writes == before_chan, "a write went both ways"
                self.fast_in_kex += in_kex
                _note(self.fast_send_keys, self.conn._send_encryption)
                self.write_log.append("fast")
            else:
                assert self.chan_writes == before_chan + 1, "a write went nowhere"
                self.write_log.append("asyncssh")
        else:
            self.chan.write(data)
            self.write_log.append("asyncssh")

    async def send(self, chunks: Sequence[bytes]) -> None:
        """Write every chunk (pausing while the buffers below are full), then EOF."""
        for chunk in chunks:
            self.write(chunk)
            await self.drain()
        self.chan.write_eof()

    async def drain(self) -> None:
        await asyncio.sleep(0)  # let the peer (same loop) read
        while (
            self.chan.get_write_buffer_size() > CHAN_HIGH_WATER
            or self.conn._transport.get_write_buffer_size() > TRANSPORT_HIGH_WATER
            # During a key exchange asyncssh queues packets where neither buffer shows
            # them; sent all at once afterwards they would be due for the next one.
            or len(self.conn._deferred_packets) > 8
        ):
            if self.chan.is_closing():
                raise ConnectionError(f"{self.name}: channel closed while sending")
            await asyncio.sleep(0.001)

    # -- results

    @property
    def fast_sent(self) -> int:
        return 0 if self.fast is None else self.fast.fast_packets_sent

    @property
    def fast_received(self) -> int:
        return 0 if self.fast is None else self.fast.fast_packets_received

    def check_received(self, chunks: Sequence[bytes]) -> None:
        expected = sum(map(len, chunks))
        assert self.received == expected, f"{self.name} received {self.received} of {expected}"
        assert self.digest.hexdigest() == _sha(chunks), f"{self.name} received different bytes"


class _ClientPeer(_Peer, asyncssh.SSHClientSession[bytes]):
    pass


class _ServerPeer(_Peer, asyncssh.SSHServerSession[bytes]):
    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return True


class _EchoPeer(_ServerPeer):
    """Echoes everything back (through the fast path); after EOF, closes once all is sent."""

    def __init__(self) -> None:
        super().__init__("echo server", install=True)
        self._closing: asyncio.Task[None] | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        super().data_received(data, datatype)
        self.write(data)

    def eof_received(self) -> bool:
        super().eof_received()
        self._closing = asyncio.get_running_loop().create_task(self._close_when_sent())
        return True

    async def _close_when_sent(self) -> None:
        # What did not fit the client's window waits in asyncssh's buffer: send it first.
        while self.chan.get_write_buffer_size():
            if self.chan.is_closing():
                return
            await asyncio.sleep(0.002)
        self.chan.exit(0)


class _Server(asyncssh.SSHServer):
    """Hands out the given sessions, in order, to the client's session requests."""

    def __init__(
        self, sessions: list[_ServerPeer], conns: list[asyncssh.SSHServerConnection], auth: bool
    ) -> None:
        self.sessions = sessions
        self.conns = conns
        self.auth = auth

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conns.append(conn)

    def begin_auth(self, username: str) -> bool:
        return self.auth

    def session_requested(self) -> _ServerPeer:
        return self.sessions.pop(0)


def _server_options(line_editor: bool = False) -> dict[str, Any]:
    return {
        "server_host_keys": [asyncssh.generate_private_key("ssh-ed25519")],
        # As the relay: with asyncssh's default (True) the session gets a line-editor
        # proxy of its channel instead of the channel itself.
        "line_editor": line_editor,
        "allow_pty": False,
    }


def _options(cipher: str, window: int, rekey_bytes: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "encryption_algs": [cipher],
        "compression_algs": None,
        "encoding": None,  # bytes sessions, like production
        "window": window,
        "max_pktsize": PKTSIZE,
    }
    if rekey_bytes is not None:
        options["rekey_bytes"] = rekey_bytes
    return options


@contextlib.asynccontextmanager
async def _connected(
    client: _ClientPeer,
    server: _ServerPeer,
    *,
    cipher: str = GCM,
    window: int = BIG_WINDOW,
    rekey_bytes: int | None = None,
    line_editor: bool = False,
    more: Sequence[tuple[_ClientPeer, _ServerPeer]] = (),
) -> AsyncIterator[tuple[Any, Any]]:
    """A real asyncssh server and client on loopback with a session channel between
    ``client`` and ``server`` (and one per pair in ``more``); yields (client connection,
    server connection)."""
    options = _options(cipher, window, rekey_bytes)
    server_conns: list[asyncssh.SSHServerConnection] = []
    pairs = [(client, server), *more]
    sessions = [server for _, server in pairs]
    acceptor = await asyncssh.create_server(
        lambda: _Server(sessions, server_conns, auth=False),
        LOOPBACK,
        0,
        **_server_options(line_editor),
        **options,
    )
    try:
        port = acceptor.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            LOOPBACK, port, known_hosts=None, username="test", client_keys=None, **options
        ) as conn:
            for client_peer, server_peer in pairs:
                await conn.create_session(functools.partial(_same, client_peer), subsystem="test")
                await asyncio.wait_for(server_peer.started, 10)
                if not line_editor:
                    for peer in (client_peer, server_peer):
                        assert isinstance(peer.chan, SSHChannel), type(peer.chan)
            assert len(server_conns) == 1
            for end in (conn, server_conns[0]):
                cipher_used = end.get_extra_info("send_cipher")
                assert cipher_used == cipher, f"negotiated {cipher_used}, wanted {cipher}"
            yield conn, server_conns[0]
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def _run(coro: Any, timeout: float) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def _sequence_numbers_agree(a: Any, b: Any) -> None:
    """Once nothing is in flight, each side's send sequence number is the other side's
    receive sequence number: the fast path numbered (and counted) every packet.
    (AES-GCM itself does not use them, so nothing else would notice.)"""

    def pairs() -> tuple[tuple[int, int], tuple[int, int]]:
        return (a._send_seq, b._recv_seq), (b._send_seq, a._recv_seq)

    for _ in range(200):
        if all(sent == received for sent, received in pairs()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"(sent, received) sequence numbers disagree: {pairs()}")


# ---------------------------------------------------------------------------- 1. equivalence


def _ends(direction: str, sender_fast: bool, receiver_fast: bool) -> tuple[_Peer, _Peer]:
    """(sender, receiver), with the client and server sessions created accordingly."""
    if direction == "client->server":
        return _ClientPeer("client", sender_fast), _ServerPeer("server", receiver_fast)
    return _ServerPeer("server", sender_fast), _ClientPeer("client", receiver_fast)


def _pair(sender: _Peer, receiver: _Peer) -> tuple[_ClientPeer, _ServerPeer]:
    client = sender if isinstance(sender, _ClientPeer) else receiver
    server = receiver if client is sender else sender
    assert isinstance(client, _ClientPeer) and isinstance(server, _ServerPeer)
    return client, server


DIRECTIONS = pytest.mark.parametrize("direction", ["client->server", "server->client"])


@pytest.mark.timeout(60)
@DIRECTIONS
@pytest.mark.parametrize(
    ("sender_fast", "receiver_fast"),
    [(True, True), (True, False), (False, True)],
    ids=["fast->fast", "fast->slow", "slow->fast"],
)
def test_one_way_transfer_delivers_the_same_bytes(
    direction: str, sender_fast: bool, receiver_fast: bool
) -> None:
    """Window large enough for everything: every write of a fast sender goes the fast
    way, and every packet reaching a fast receiver is parsed by the fast path."""
    chunks = _payload(seed=1, total=6 * MiB)

    async def scenario() -> None:
        sender, receiver = _ends(direction, sender_fast, receiver_fast)
        async with _connected(*_pair(sender, receiver)):
            await asyncio.gather(sender.send(chunks), receiver.eof)
            await asyncio.sleep(0.05)  # a window adjust, if one were sent, arrives
            # Less than half the window was used, so no adjust: both ends' books show
            # exactly the bytes sent, whichever path each packet took.
            total = sum(map(len, chunks))
            assert total < BIG_WINDOW / 2
            assert sender.chan._send_window == BIG_WINDOW - total
            assert receiver.chan._recv_window == BIG_WINDOW - total
            await _sequence_numbers_agree(sender.conn, receiver.conn)

        receiver.check_received(chunks)
        packets = _packets(chunks)
        # One CHANNEL_DATA packet per data_received, whoever parsed or built it.
        assert receiver.deliveries == packets
        if sender_fast:
            assert sender.write_log == ["fast"] * len(chunks)
            assert sender.fast_sent == packets
            assert sender.chan_writes == 0
        else:
            assert sender.fast is None and sender.fast_sent == 0
            assert sender.chan_writes == len(chunks)
        if receiver_fast:
            assert receiver.fast_received == packets
        else:
            assert receiver.fast is None and receiver.fast_received == 0
        # Nothing flowed the other way, so the other counters stay at zero.
        assert sender.fast_received == 0
        assert receiver.fast_sent == 0
        assert sender.received == 0

    _run(scenario(), 40)


@pytest.mark.timeout(60)
@DIRECTIONS
@pytest.mark.parametrize("receiver_fast", [True, False], ids=["to-fast", "to-slow"])
def test_writes_beyond_the_peer_window_fall_back_and_come_back(
    direction: str, receiver_fast: bool
) -> None:
    """A 256 KiB window and writes up to 1 MiB: those beyond the window go through
    asyncssh (which waits for window adjusts), later ones the fast way again."""
    chunks = _payload(seed=2, total=6 * MiB)
    assert max(map(len, chunks)) > SMALL_WINDOW

    async def scenario() -> None:
        sender, receiver = _ends(direction, True, receiver_fast)
        async with _connected(*_pair(sender, receiver), window=SMALL_WINDOW):
            assert sender.chan._send_window == SMALL_WINDOW
            await asyncio.gather(sender.send(chunks), receiver.eof)

        receiver.check_received(chunks)
        log = sender.write_log
        assert "asyncssh" in log, "no write exceeded the window: the test proves nothing"
        assert sender.chan_writes == log.count("asyncssh")
        first_fallback = log.index("asyncssh")
        assert "fast" in log[first_fallback:], "the fast path never came back after a fallback"
        assert 0 < sender.fast_sent < _packets(chunks)
        # The window was refilled many times (by the receiver's fast path or asyncssh).
        assert sum(map(len, chunks)) > 10 * SMALL_WINDOW
        if receiver_fast:
            assert 0 < receiver.fast_received <= receiver.deliveries
        else:
            assert receiver.fast_received == 0

    _run(scenario(), 40)


@pytest.mark.timeout(60)
@DIRECTIONS
def test_paused_reading_holds_data_back_until_resumed(direction: str) -> None:
    """While the receiving session has paused reading, the fast path leaves packets to
    asyncssh (which buffers them and withholds window adjusts); on resume the buffered
    data comes first, in order, and the fast path takes over again."""
    chunks = _payload(seed=8, total=6 * MiB)

    async def scenario() -> None:
        sender, receiver = _ends(direction, True, True)
        # Pauses further apart than the window: after each one asyncssh's buffer (at
        # most a window) is delivered and new packets find the channel reading again.
        receiver.pause_every = 1 * MiB + 100 * KiB
        async with _connected(*_pair(sender, receiver), window=1 * MiB):
            await asyncio.gather(sender.send(chunks), receiver.eof)

        receiver.check_received(chunks)
        assert receiver.pauses >= 4, receiver.pauses
        assert receiver.delivered_while_paused == 0
        # Some packets arrived while paused and went through asyncssh's buffer ...
        assert receiver.fast_received < receiver.deliveries
        # ... and between one pause and the next the fast path took over again.
        assert receiver.fast_at_pause == sorted(set(receiver.fast_at_pause))
        assert sender.fast_sent > 0

    _run(scenario(), 40)


@pytest.mark.timeout(60)
def test_refuses_channels_it_cannot_drive() -> None:
    """asyncssh's line-editor proxy (its default for server sessions) keeps attribute
    writes to itself, so the fast path's window accounting would shadow the real
    channel's and asyncssh would overrun the peer's window; a text channel would get
    undecoded bytes. Both are refused up front."""

    async def scenario() -> None:
        sender, receiver = _ServerPeer("server", False), _ClientPeer("client", False)
        async with _connected(receiver, sender, line_editor=True) as (client_conn, _):
            assert not isinstance(sender.chan, SSHChannel)  # the proxy
            with pytest.raises(TypeError, match="SSHChannel"):
                ChannelFastPath(sender.chan)
            # A real (unopened) asyncssh channel with a text encoding.
            text_chan = SSHClientChannel(
                client_conn,
                asyncio.get_running_loop(),
                "strict",
                "utf-8",
                "strict",
                BIG_WINDOW,
                PKTSIZE,
            )
            with pytest.raises(TypeError, match="binary"):
                ChannelFastPath(text_chan)
            assert "_recv_pkthdr" not in client_conn.__dict__  # nothing was hooked

    _run(scenario(), 40)


@pytest.mark.timeout(60)
def test_two_channels_on_one_connection_keep_their_data_apart() -> None:
    """Two fast paths on one connection (the second chains to the first's packet
    parser): each takes only its own channel's packets, all four streams intact."""
    payloads = [_payload(seed=seed, total=3 * MiB) for seed in (11, 12, 13, 14)]

    async def scenario() -> None:
        first = (_ClientPeer("client 1", True), _ServerPeer("server 1", True))
        second = (_ClientPeer("client 2", True), _ServerPeer("server 2", True))
        async with _connected(*first, more=[second]) as (client_conn, server_conn):
            peers = [*first, *second]
            assert first[0].chan._recv_chan != second[0].chan._recv_chan
            await asyncio.gather(
                *(peer.send(chunks) for peer, chunks in zip(peers, payloads, strict=True)),
                *(peer.eof for peer in peers),
            )
            await _sequence_numbers_agree(client_conn, server_conn)
        up_1, down_1, up_2, down_2 = payloads
        first[1].check_received(up_1)
        first[0].check_received(down_1)
        second[1].check_received(up_2)
        second[0].check_received(down_2)
        for peer in peers:
            assert peer.fast_sent > 0 and peer.fast_received > 0, peer.name

    _run(scenario(), 40)


@pytest.mark.timeout(60)
@DIRECTIONS
def test_nothing_is_delivered_after_the_receiver_closes(direction: str) -> None:
    """After the receiving session closes its channel, packets still in flight are
    dropped (asyncssh's rule), not delivered by the fast path."""
    chunks = _payload(seed=9, total=6 * MiB)
    data = b"".join(chunks)

    async def scenario() -> None:
        sender, receiver = _ends(direction, True, True)
        receiver.close_after = 1 * MiB

        async def send_until_closed() -> None:
            with contextlib.suppress(ConnectionError):  # BrokenPipeError too
                await sender.send(chunks)

        async with _connected(*_pair(sender, receiver)):
            await asyncio.gather(send_until_closed(), receiver.closed, sender.closed)

        assert receiver.received_at_close is not None
        assert receiver.received == receiver.received_at_close >= 1 * MiB
        assert receiver.digest.hexdigest() == _sha([data[: receiver.received]])
        assert receiver.fast_received > 0
        assert receiver.delivered_after_close == 0
        # The sender was still sending when the close came: data in flight was dropped.
        # (Less than half the window went out, so no window adjust: window = unsent.)
        sent = BIG_WINDOW - sender.chan._send_window
        assert sent < BIG_WINDOW / 2
        assert sent > receiver.received, (sent, receiver.received)

    _run(scenario(), 40)


# ---------------------------------------------------------------------------- 2. rekey


class _KexCounter:
    """Counts ``_send_kexinit`` calls on a connection, and which of them this side's
    own byte count started (asyncssh's send_packet: ``_rekey_bytes_sent >= _rekey_bytes``)."""

    def __init__(self, conn: Any) -> None:
        self.calls = 0
        self.by_own_bytes = 0
        self.bytes_at_kexinit: list[int] = []
        self.send_encryptions: list[object] = [conn._send_encryption]
        original = conn._send_kexinit

        def send_kexinit() -> None:
            self.calls += 1
            self.bytes_at_kexinit.append(conn._rekey_bytes_sent)
            if conn._rekey_bytes_sent >= conn._rekey_bytes:
                self.by_own_bytes += 1
            original()

        conn._send_kexinit = send_kexinit
        original_newkeys = conn.send_newkeys

        def send_newkeys(k: bytes, h: bytes) -> None:
            original_newkeys(k, h)
            _note(self.send_encryptions, conn._send_encryption)

        conn.send_newkeys = send_newkeys


@pytest.mark.timeout(60)
def test_rekeys_in_the_middle_of_concurrent_transfers() -> None:
    rekey_bytes = 512 * KiB
    max_chunk = 256 * KiB
    up = _payload(seed=3, total=16 * MiB, max_chunk=max_chunk)
    down = _payload(seed=4, total=16 * MiB, max_chunk=max_chunk)

    async def scenario() -> None:
        client = _ClientPeer("client", True)
        server = _ServerPeer("server", True)
        async with _connected(client, server, rekey_bytes=rekey_bytes, window=8 * MiB) as (
            client_conn,
            server_conn,
        ):
            kex = {"client": _KexCounter(client_conn), "server": _KexCounter(server_conn)}
            await asyncio.gather(client.send(up), server.send(down), client.eof, server.eof)
            await _sequence_numbers_agree(client_conn, server_conn)

        server.check_received(up)
        client.check_received(down)
        for peer in (client, server):
            counter = kex[peer.name]
            # Each key exchange has each side send one KEXINIT (after the first one,
            # which happened before the counters were installed).
            assert counter.calls >= 8, (peer.name, counter.calls)
            assert len(counter.send_encryptions) >= 3, (peer.name, counter.send_encryptions)
            # Between two key exchanges a side sends at most about rekey_bytes plus one
            # write, so 16 MiB needs many; asyncssh alone, blind to the fast packets,
            # would start hardly any.
            assert counter.by_own_bytes >= 4, (peer.name, counter.by_own_bytes)
            # ... and none is late: a write starts only below rekey_bytes, asyncssh's
            # packets only below it too (small margin for packet headers and padding).
            latest = max(counter.bytes_at_kexinit)
            assert latest <= rekey_bytes + max_chunk + 4 * KiB, (peer.name, latest)
            # Fast packets before and after rekeys, both ways.
            assert peer.fast_sent > 0 and peer.fast_received > 0
            assert len(peer.fast_send_keys) >= 3, (peer.name, len(peer.fast_send_keys))
            assert len(peer.fast_recv_keys) >= 3, (peer.name, len(peer.fast_recv_keys))
            # During a key exchange writes go through asyncssh (deferred until NEWKEYS).
            assert "asyncssh" in peer.write_log
            assert peer.fast_in_kex == 0, peer.fast_in_kex
        assert client.fast_send_keys[0] is not client.fast_send_keys[-1]

    _run(scenario(), 50)


# ---------------------------------------------------------------------------- 3./4. steps aside


async def _both_ways_without_fast_packets(cipher: str) -> None:
    up = _payload(seed=5, total=1 * MiB)
    down = _payload(seed=6, total=1 * MiB)
    client = _ClientPeer("client", True)
    server = _ServerPeer("server", True)
    async with _connected(client, server, cipher=cipher):
        await asyncio.gather(client.send(up), server.send(down), client.eof, server.eof)
    server.check_received(up)
    client.check_received(down)
    for peer, chunks in ((client, up), (server, down)):
        assert peer.fast is not None
        assert peer.fast_sent == 0 and peer.fast_received == 0, peer.name
        assert peer.write_log == ["asyncssh"] * len(chunks)
        assert peer.chan_writes == len(chunks)


@pytest.mark.timeout(60)
def test_packet_debug_logging_turns_the_fast_path_off() -> None:
    previous = SSHLogger._debug_level
    asyncssh.set_debug_level(3)
    try:
        _run(_both_ways_without_fast_packets(GCM), 40)
    finally:
        asyncssh.set_debug_level(previous)
    assert previous == SSHLogger._debug_level


@pytest.mark.timeout(60)
def test_a_cipher_other_than_aes_gcm_turns_the_fast_path_off() -> None:
    _run(_both_ways_without_fast_packets(CHACHA), 40)


# ---------------------------------------------------------------------------- 5. OpenSSH


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rekeys", [None, "asyncssh", "openssh"])
def test_openssh_client_through_a_fast_path_echo_server(
    require_tool: Callable[[str], str], tmp_path: Path, rekeys: str | None
) -> None:
    """OpenSSH's AES-GCM parses what the fast path builds and builds what it parses;
    OpenSSH also enforces our window and packet size (it disconnects on a violation).
    Then the same with key exchanges started by the server's byte count (so OpenSSH
    sees the fast path's rekey accounting) and by OpenSSH's own RekeyLimit."""
    ssh = require_tool("ssh")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "id_ed25519"
    client_key.write_private_key(str(key_file))
    key_file.chmod(0o600)
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode("ascii"))
    data = random.Random(7).randbytes(4 * MiB + 12345)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    env["HOME"] = str(tmp_path)
    server_rekey_bytes = 256 * KiB if rekeys == "asyncssh" else None
    ssh_rekey = ["-o", "RekeyLimit=1M"] if rekeys == "openssh" else []

    async def scenario() -> None:
        echo = _EchoPeer()
        server_conns: list[asyncssh.SSHServerConnection] = []
        acceptor = await asyncssh.create_server(
            lambda: _Server([echo], server_conns, auth=True),
            LOOPBACK,
            0,
            **_server_options(),
            authorized_client_keys=authorized,
            **_options(GCM, 2 * MiB, server_rekey_bytes),
        )
        port = acceptor.sockets[0].getsockname()[1]
        argv = [
            ssh,
            *("-F", "/dev/null", "-i", str(key_file), "-p", str(port)),
            *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"),
            *("-o", f"Ciphers={GCM}", *ssh_rekey),
            *("-s", f"test@{LOOPBACK}", "echo"),
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        kex: list[_KexCounter] = []
        try:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

            async def feed() -> None:
                view = memoryview(data)
                for start in range(0, len(data), 64 * KiB):
                    stdin.write(view[start : start + 64 * KiB])
                    await stdin.drain()
                stdin.close()

            async def count_kex() -> None:
                await echo.started  # before any data: the session was just accepted
                kex.append(_KexCounter(server_conns[0]))

            _, echoed, errors, _ = await asyncio.wait_for(
                asyncio.gather(feed(), stdout.read(), stderr.read(), count_kex()), 30
            )
            code = await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            acceptor.close()
            await acceptor.wait_closed()

        message = errors.decode(errors="replace")
        assert code == 0, f"ssh exited with {code}: {message}"
        assert len(echoed) == len(data), message
        assert echoed == data, message
        echo.check_received([data])
        for name in ("send_cipher", "recv_cipher"):
            assert server_conns[0].get_extra_info(name) == GCM
        assert echo.fast_received > 0
        assert echo.fast_sent > 0
        assert echo.fast_in_kex == 0
        [counter] = kex
        if rekeys is None:
            assert counter.calls == 0
        elif rekeys == "asyncssh":
            # 4 MiB sent, mostly the fast way, with a rekey every 256 KiB.
            assert counter.by_own_bytes >= 8, counter.by_own_bytes
        else:
            assert counter.calls >= 3 and counter.by_own_bytes == 0, counter.calls
        if rekeys is not None:
            # Fast packets each way before and after key exchanges.
            assert len(echo.fast_send_keys) >= 2, len(echo.fast_send_keys)
            assert len(echo.fast_recv_keys) >= 2, len(echo.fast_recv_keys)

    _run(scenario(), 50)
