"""An in-memory relay/client pair of multiplexers, for tests and benchmarks.

Bytes move only when asked (``transfer``), optionally cut at arbitrary points,
so tests can interleave API calls, partial deliveries and timers without any
socket or event loop (aioquic's ``tests/utils.py`` idea).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sshrelay.protocol.config import MuxConfig, Role
from sshrelay.protocol.events import Event
from sshrelay.protocol.multiplexer import Multiplexer


class MuxPair:
    """A relay and a client multiplexer wired back to back."""

    def __init__(
        self,
        relay_config: MuxConfig | None = None,
        client_config: MuxConfig | None = None,
        now: float = 0.0,
    ) -> None:
        self.now = now
        self.relay = Multiplexer(Role.RELAY, relay_config)
        self.client = Multiplexer(Role.CLIENT, client_config)
        self.events: dict[Multiplexer, list[Event]] = {self.relay: [], self.client: []}
        self.relay.initiate(now)
        self.client.initiate(now)

    def peer(self, mux: Multiplexer) -> Multiplexer:
        return self.client if mux is self.relay else self.relay

    def transfer(
        self,
        sender: Multiplexer,
        max_bytes: int | None = None,
        split: Callable[[bytes], Iterable[bytes]] | None = None,
    ) -> list[Event]:
        """Move what ``sender`` has to send (up to ``max_bytes``) into its peer."""
        data = sender.data_to_send(max_bytes, now=self.now)
        receiver = self.peer(sender)
        events: list[Event] = []
        for piece in split(data) if split else (data,):
            events.extend(receiver.receive_data(piece, self.now))
        self.events[receiver].extend(events)
        return events

    def drain(self, rounds: int = 100) -> None:
        """Transfer both ways until neither end has anything to send."""
        for _ in range(rounds):
            moved = False
            for sender in (self.relay, self.client):
                data = sender.data_to_send(now=self.now)
                if data:
                    moved = True
                    self.events[self.peer(sender)].extend(
                        self.peer(sender).receive_data(data, self.now)
                    )
            if not moved:
                return
        raise RuntimeError("pair did not quiesce")

    def handshake(self) -> MuxPair:
        self.drain()
        return self

    def take(self, mux: Multiplexer) -> list[Event]:
        """Return and clear the events ``mux`` has reported so far."""
        events, self.events[mux] = self.events[mux], []
        return events

    def advance(self, seconds: float) -> None:
        """Move the clock and run both ends' timers."""
        self.now += seconds
        for mux in (self.relay, self.client):
            self.events[mux].extend(mux.handle_timer(self.now))
