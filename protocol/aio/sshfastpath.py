"""A lean path for our channel's data through asyncssh's AES-GCM transport.

asyncssh moves every SSH_MSG_CHANNEL_DATA packet through a general-purpose
pipeline: about seven copies of each payload (buffer, slice, length prefix,
channel prefix, type byte, padding, MAC concatenation), a fresh ``AESGCM`` key
schedule and an ``os.urandom`` syscall per packet, and on receive a re-slice of
the whole input buffer per packet. For a tunnel that is most of the CPU per
byte. ``ChannelFastPath`` builds and parses exactly the same packets (RFC 4253
binary packets, RFC 5647/OpenSSH AES-GCM with the 4-byte length as associated
data, the same sequence numbers, IV counter and rekey byte count) with one copy
each way, and hands everything else to asyncssh:

* sending goes through asyncssh whenever the connection is not in its steady
  state: a key exchange in progress or due, deferred packets, a cipher other
  than AES-GCM, compression, packet logging on, or data beyond the peer's
  window (asyncssh then buffers it and respects the window as usual);
* receiving handles only CHANNEL_DATA for our channel while it is open,
  unpaused and within its window; any other packet (key exchange, window
  adjusts, keepalives, EOF, a bad MAC) is left, undecrypted, at the head of
  asyncssh's input buffer for asyncssh's own parser, which then also raises
  the right errors.

Everything here reads and writes asyncssh private attributes; the tests in
``tests/protocol/aio/test_sshfastpath.py`` run both paths against each other
(and against OpenSSH) and fail loudly if asyncssh's internals move.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from time import monotonic
from typing import Any, Final

from asyncssh.channel import SSHChannel
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.packet import UInt32
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_MAC: Final = 16  # GCM tag
_SEQ_MASK: Final = 0xFFFFFFFF
_U32 = struct.Struct(">I")
_DATA_HEADER = struct.Struct(">BBII")  # padding length, type, channel, string length
_PAD_POOL: Final = 64 * 1024


class _Gcm:
    """One direction's AES-GCM state, borrowed from asyncssh's cipher object."""

    __slots__ = ("aead", "cipher", "encryption")

    def __init__(self, encryption: GCMEncryption) -> None:
        self.encryption = encryption
        self.cipher: GCMCipher = encryption._cipher
        self.aead = AESGCM(self.cipher._key)


class ChannelFastPath:
    """Send and receive one channel's data with as little work per packet as the protocol allows."""

    def __init__(self, chan: SSHChannel[bytes]) -> None:
        # Attribute writes must reach the channel itself (asyncssh's line-editor proxy
        # would keep them), and payloads are bytes on both sides.
        if not isinstance(chan, SSHChannel):
            raise TypeError(f"ChannelFastPath needs an asyncssh SSHChannel, not {type(chan)}")
        if getattr(chan, "_encoding", None) is not None:
            raise TypeError("ChannelFastPath needs a binary channel (encoding=None)")
        self.chan = chan
        conn: Any = chan.get_connection()
        self.conn = conn
        self._send_gcm: _Gcm | None = None
        self._recv_gcm: _Gcm | None = None
        self._pad = os.urandom(_PAD_POOL)
        self._pad_at = 0
        self.fast_packets_sent = 0
        self.fast_packets_received = 0
        self._original_pkthdr: Callable[[], bool] = conn._recv_pkthdr
        self._chained = "_recv_pkthdr" in conn.__dict__  # another channel's fast path
        # asyncssh looks ``_recv_pkthdr`` up on the instance after every packet.
        conn._recv_pkthdr = self._recv_pkthdr

    def detach(self) -> None:
        if self.conn.__dict__.get("_recv_pkthdr") == self._recv_pkthdr:
            if self._chained:
                self.conn._recv_pkthdr = self._original_pkthdr
            else:
                del self.conn._recv_pkthdr

    # ------------------------------------------------------------------ send

    def _send_state(self) -> _Gcm | None:
        conn = self.conn
        encryption = conn._send_encryption
        if (
            type(encryption) is not GCMEncryption
            or not conn._kex_complete
            or not conn._auth_complete
            or conn._deferred_packets
            or conn._compressor is not None
            or conn._transport is None
            or conn._rekey_bytes_sent >= conn._rekey_bytes
            or SSHLogger._debug_level >= 3
        ):
            return None
        if conn._rekey_seconds and monotonic() >= conn._rekey_time:
            return None  # let asyncssh start the key exchange
        gcm = self._send_gcm
        if gcm is None or gcm.encryption is not encryption:
            gcm = self._send_gcm = _Gcm(encryption)
        return gcm

    def write(self, data: bytes) -> None:
        """``chan.write(data)``, on the lean path when the connection allows it."""
        chan: Any = self.chan
        gcm = self._send_state()
        if (
            gcm is None
            or chan._send_state != "open"
            or chan._send_buf
            or chan._send_chan is None
            or len(data) > chan._send_window
        ):
            chan.write(data)
            return
        conn = self.conn
        pktsize = chan._send_pktsize
        blocksize = conn._send_blocksize
        enchdrlen = conn._send_enchdrlen
        recipient = chan._send_chan
        seq = conn._send_seq
        cipher = gcm.cipher
        encrypt = gcm.aead.encrypt
        view = memoryview(data)
        out: list[bytes] = []
        sent_bytes = 0
        for start in range(0, len(data), pktsize):
            piece = view[start : start + pktsize]
            size = len(piece)
            payload_len = 9 + size  # type, channel, string length, data
            padlen = -(enchdrlen + payload_len) % blocksize
            if padlen < 4:
                padlen += blocksize
            packet = b"".join(
                (
                    _DATA_HEADER.pack(padlen, MSG_CHANNEL_DATA, recipient, size),
                    piece,
                    self._padding(padlen),
                )
            )
            header = _U32.pack(len(packet))
            out.append(header)
            out.append(encrypt(cipher._iv, packet, header))
            cipher._update_iv()
            seq = (seq + 1) & _SEQ_MASK
            sent_bytes += len(packet)
        conn._send_seq = seq
        conn._rekey_bytes_sent += sent_bytes
        chan._send_window -= len(data)
        self.fast_packets_sent += len(out) // 2
        conn._transport.writelines(out)

    def _padding(self, size: int) -> bytes:
        at = self._pad_at
        if at + size > _PAD_POOL:
            self._pad = os.urandom(_PAD_POOL)
            at = 0
        self._pad_at = at + size
        return self._pad[at : at + size]

    # ------------------------------------------------------------------ receive

    def _recv_pkthdr(self) -> bool:
        """asyncssh's packet-header handler: take every leading data packet of ours."""
        conn = self.conn
        encryption = conn._recv_encryption
        if (
            type(encryption) is not GCMEncryption
            or conn._decompressor is not None
            or not conn._auth_complete
            or SSHLogger._debug_level >= 3
        ):
            return self._original_pkthdr()
        gcm = self._recv_gcm
        if gcm is None or gcm.encryption is not encryption:
            gcm = self._recv_gcm = _Gcm(encryption)
        chan: Any = self.chan
        session = chan._session
        buf: bytes = conn._inpbuf
        view = memoryview(buf)
        end = len(buf)
        offset = 0
        max_len = conn._max_recv_pktlen
        cipher = gcm.cipher
        decrypt = gcm.aead.decrypt
        while True:
            if end - offset < 4:
                break
            pktlen = _U32.unpack_from(buf, offset)[0]
            if pktlen > max_len or pktlen < 16:
                return self._hand_over(buf, offset)
            total = 4 + pktlen + _MAC
            if end - offset < total:
                break
            if (
                chan._recv_state != "open"
                or chan._recv_paused
                or chan._send_state in ("close_pending", "closed")
                or session is None
            ):
                return self._hand_over(buf, offset)
            try:
                plain = decrypt(
                    cipher._iv, view[offset + 4 : offset + total], view[offset : offset + 4]
                )
            except InvalidTag:
                return self._hand_over(buf, offset)  # asyncssh reports the MAC error
            padlen, pkttype, recipient, size = _DATA_HEADER.unpack_from(plain)
            if (
                pkttype != MSG_CHANNEL_DATA
                or recipient != chan._recv_chan
                or size != len(plain) - 10 - padlen
                or size > chan._recv_window
                or size == 0
            ):
                return self._hand_over(buf, offset)  # asyncssh decrypts it again
            # Committed: this packet is ours.
            cipher._update_iv()
            conn._recv_seq = (conn._recv_seq + 1) & _SEQ_MASK
            conn._auth_final = True
            offset += total
            data = plain[10 : 10 + size]
            chan._recv_window -= size
            if chan._recv_window < chan._init_recv_window / 2:
                adjust = chan._init_recv_window - chan._recv_window
                chan.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(adjust))
                chan._recv_window = chan._init_recv_window
            self.fast_packets_received += 1
            session.data_received(data, None)
            if conn._inpbuf is not buf or conn._transport is None:
                return False  # the session closed or reset the connection meanwhile
        conn._inpbuf = buf[offset:] if offset else buf
        return False

    def _hand_over(self, buf: bytes, offset: int) -> bool:
        """Leave the packet at ``offset`` to asyncssh's parser."""
        conn = self.conn
        if offset:
            conn._inpbuf = buf[offset:]
        return bool(self._original_pkthdr())
