"""Credit (flow-control) arithmetic for stream data, in one small class.

The receiver grants credit; the sender spends it. Credit comes back only when
the receiving *application* acknowledges that it consumed bytes (for the relay
and client: the local socket accepted them), so a slow consumer stalls its own
stream and never fills the shared SSH channel. Like h2's ``WindowManager``,
increments are batched: one WINDOW_UPDATE per quarter window consumed.
"""

from __future__ import annotations

from sshrelay.protocol.errors import LocalProtocolError


class ReceiveWindow:
    """Receive-side credit for one stream or for the whole connection."""

    __slots__ = ("available", "batch", "size", "unacknowledged", "unreturned")

    def __init__(self, size: int, max_batch: int | None = None) -> None:
        self.size = size
        # Credit goes back once this much is consumed: a quarter of the initial window,
        # or ``max_batch`` if smaller (also the step latency mode returns credit in).
        self.batch = max(1, size // 4 if max_batch is None else min(size // 4, max_batch))
        self.available = size  # bytes the peer may still send
        self.unacknowledged = 0  # received, not yet consumed by the application
        self.unreturned = 0  # consumed, credit not yet sent back

    def consume(self, length: int) -> bool:
        """Account for received bytes; False means the peer overran its credit."""
        if length > self.available:
            return False
        self.available -= length
        self.unacknowledged += length
        return True

    def acknowledge(self, length: int, cap: int | None = None) -> int:
        """The application consumed ``length`` bytes; return an increment to send, or 0.

        With ``cap``, credit goes back only while the peer would then hold at most
        ``cap`` bytes of credit; the rest waits in ``unreturned`` for ``flush()``.
        """
        if length < 0 or length > self.unacknowledged:
            raise LocalProtocolError(
                f"acknowledged {length} bytes but only {self.unacknowledged} are unacknowledged"
            )
        self.unacknowledged -= length
        self.unreturned += length
        if self.unreturned < self.batch:
            return 0
        if cap is None:
            return self.flush()
        room = cap - self.available
        if room < min(self.batch, self.unreturned):
            return 0  # not worth a WINDOW_UPDATE yet
        return self._give(min(self.unreturned, room))

    def flush(self) -> int:
        """Return all consumed credit now (used when nothing else is outstanding)."""
        return self._give(self.unreturned)

    def _give(self, increment: int) -> int:
        self.unreturned -= increment
        self.available += increment
        return increment

    def grow(self, size: int) -> int:
        """Enlarge the window to ``size``; the extra credit to grant the peer at once."""
        extra = max(0, size - self.size)
        self.size = size
        self.available += extra
        return extra
