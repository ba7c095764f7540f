"""Bridge one local TCP connection to one multiplexer stream, with back-pressure.

Both directions are bounded. Tunnel -> socket: bytes are written to the
transport and credit is returned to the peer only while the transport's buffer
is below its high-water mark (i.e. the kernel is taking the bytes); when it
pauses, acknowledgements wait for ``resume_writing``. Socket -> tunnel: we read
only while the stream has credit; the remainder of a read that did not fit is
held here (at most one read) and reading pauses until ``CreditAvailable``.
Half-close travels both ways as FIN; errors travel as RESET.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from sshrelay.protocol.aio.session import MuxChannelSession
from sshrelay.protocol.errors import ErrorCode, LocalProtocolError, describe_code

log = logging.getLogger("sshrelay.tcp")

LOCAL_WRITE_HIGH = 256 * 1024


class TcpStreamBridge(asyncio.Protocol):
    """asyncio protocol of a local TCP socket bound to one stream of a session."""

    def __init__(
        self,
        session: MuxChannelSession,
        label: str,
        on_done: Callable[[TcpStreamBridge], None] | None = None,
    ) -> None:
        self.session = session
        self.mux = session.mux
        self.label = label  # forward name and peer, for logs
        self.stream_id: int | None = None
        self.transport: asyncio.Transport | None = None
        self._on_done = on_done
        self._accepted = False
        self._pending = bytearray()  # read from the socket, not yet given credit
        self._eof_from_socket = False
        self._fin_sent = False
        self._eof_from_tunnel = False
        self._write_paused = False
        self._unacked = 0
        self._outbox: list[bytes] = []  # tunnel data waiting for this pass's single write
        self._finished = False

    # ------------------------------------------------------------------ wiring

    def bind(self, stream_id: int, accepted: bool) -> None:
        """Attach to a stream. ``accepted``: the stream is already open both ways."""
        self.stream_id = stream_id
        self.session.attach_stream(stream_id, self)
        if accepted:
            self.tunnel_accepted()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=LOCAL_WRITE_HIGH, low=LOCAL_WRITE_HIGH // 4)
        if not self._accepted:
            self.transport.pause_reading()  # until the tunnel accepts the stream

    # ------------------------------------------------------------------ socket -> tunnel

    def data_received(self, data: bytes) -> None:
        if self._pending:
            self._pending += data
        else:
            self._push(memoryview(data))
        if self._pending and self.transport is not None:
            self.transport.pause_reading()

    def _push(self, data: memoryview) -> None:
        """Send what credit allows; keep the rest in ``_pending``."""
        sid = self.stream_id
        if sid is None or not self._accepted:
            self._pending += data
            return
        window = self.mux.send_window(sid)
        if window <= 0:
            self._pending += data
            return
        part = data[:window]
        self.mux.send_stream_data(sid, part)
        self.session.kick()
        if len(data) > window:
            self._pending += data[window:]

    def _drain_pending(self) -> None:
        if self._pending:
            data, self._pending = self._pending, bytearray()
            self._push(memoryview(data))
        if not self._pending:
            if self._eof_from_socket:
                self._send_fin()
            elif self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._eof_from_socket = True
        if not self._pending:
            self._send_fin()
        return True  # keep the write side open: half-close

    def _send_fin(self) -> None:
        if self._fin_sent or self.stream_id is None or not self._accepted:
            return
        self._fin_sent = True
        try:
            self.mux.end_stream(self.stream_id)
        except LocalProtocolError:
            return
        self.session.kick()
        self._maybe_finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._finished:
            return
        if exc is not None or not (self._fin_sent and self._eof_from_tunnel):
            self._reset(ErrorCode.CANCEL if exc is None else ErrorCode.CONNECT_FAILED)
        self._finish()

    # ------------------------------------------------------------------ tunnel -> socket

    def tunnel_accepted(self) -> None:
        self._accepted = True
        self._drain_pending()

    def tunnel_data(self, data: bytes) -> None:
        if self.transport is None or self.stream_id is None:
            return
        # Chunks arriving in one loop pass leave in one socket write (a syscall per
        # 16-64 KiB chunk was the client's biggest cost under bulk TCP).
        if not self._outbox:
            self.session.loop.call_soon(self._write_outbox)
        self._outbox.append(data)

    def _write_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        transport = self.transport
        sid = self.stream_id
        if not outbox or transport is None or sid is None or transport.is_closing():
            return
        size = sum(map(len, outbox))
        transport.writelines(outbox) if len(outbox) > 1 else transport.write(outbox[0])
        if self._write_paused:
            self._unacked += size
        else:
            self.mux.acknowledge_received_data(sid, size + self._unacked)
            self._unacked = 0
            self.session.kick()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unacked and self.stream_id is not None:
            self.mux.acknowledge_received_data(self.stream_id, self._unacked)
            self._unacked = 0
            self.session.kick()

    def tunnel_eof(self) -> None:
        self._write_outbox()  # data before EOF
        self._eof_from_tunnel = True
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                pass
        self._maybe_finish()

    def tunnel_credit(self) -> None:
        self._drain_pending()

    def tunnel_reset(self, code: int) -> None:
        """The peer reset the stream (or the session ended): abort the socket."""
        log.debug("%s: stream reset by peer (%s)", self.label, describe_code(code))
        self._finished = True
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    # ------------------------------------------------------------------ endings

    def _reset(self, code: int) -> None:
        if self.stream_id is None or self._finished:
            return
        try:
            self.mux.reset_stream(self.stream_id, code)
        except LocalProtocolError:
            pass
        self.session.kick()

    def abort(self, code: int = ErrorCode.CANCEL) -> None:
        """Reset the stream and drop the local connection (shutdown, errors)."""
        self._reset(code)
        self._finished = True
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    def _maybe_finish(self) -> None:
        if self._fin_sent and self._eof_from_tunnel and not self._finished:
            self._finished = True
            if self.transport is not None:
                self.transport.close()  # flushes what is buffered, then closes
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        if self.stream_id is not None:
            self.session.detach_stream(self.stream_id)
            self._unacked += sum(map(len, self._outbox))  # never written: give it back too
            self._outbox = []
            if self._unacked:  # the socket is gone; give the credit back
                self.mux.acknowledge_received_data(self.stream_id, self._unacked)
                self._unacked = 0
                self.session.kick()
        callback, self._on_done = self._on_done, None
        if callback is not None:
            callback(self)
