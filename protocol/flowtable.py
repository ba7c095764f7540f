"""Which flow carries which public UDP peer, with a cap and LRU eviction.

The relay keeps one table per UDP forward: a datagram from a new
(address, port) opens a flow; when the table is full the least recently
active peer is evicted (and counted) instead of new peers being silently
black-holed, which is what a hard-coded cap does (chisel's 100).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class PeerFlowTable:
    """Bidirectional peer <-> flow id map ordered by last activity."""

    __slots__ = ("_by_flow", "_by_peer", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("flow table capacity must be at least 1")
        self.capacity = capacity
        self._by_peer: OrderedDict[Hashable, int] = OrderedDict()
        self._by_flow: dict[int, Hashable] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    def lookup(self, peer: Hashable) -> int | None:
        """Flow of ``peer`` (marking it most recently active), or None."""
        flow_id = self._by_peer.get(peer)
        if flow_id is not None:
            self._by_peer.move_to_end(peer)
        return flow_id

    def victim(self) -> int | None:
        """The flow to evict before adding a peer, if the table is full."""
        if len(self._by_peer) < self.capacity:
            return None
        return next(iter(self._by_peer.values()))

    def add(self, peer: Hashable, flow_id: int) -> None:
        if len(self._by_peer) >= self.capacity:
            raise OverflowError("flow table full: evict victim() first")
        self._by_peer[peer] = flow_id
        self._by_flow[flow_id] = peer

    def remove(self, flow_id: int) -> Hashable | None:
        peer = self._by_flow.pop(flow_id, None)
        if peer is not None:
            del self._by_peer[peer]
        return peer

    def flows(self) -> list[int]:
        return list(self._by_flow)
