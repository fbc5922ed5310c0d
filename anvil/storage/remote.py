# -*- test-case-name: tests.test_engine_remote -*-
"""
The storage engine's view of peers: where a node is, and reading one
shard's blocks from a peer in windows.

A L{ContentReader} asks for one block at a time, stripe after stripe. One
peer request per block would cost a round trip per 256 KiB; a
L{RemoteShardSource} instead asks for a window of consecutive stripes
(about L{WINDOW_BYTES} of the shard) and, once the reader has consumed half
of it, already asks for the next window, so a sequential read of a large
object keeps one request in flight per shard and holds at most two windows
per shard in memory.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from anvil.storage.erasure import ErasureParams

__all__ = ["WINDOW_BYTES", "PeerDirectory", "RemoteShardSource", "ShardUnavailable"]

#: Bytes of one shard fetched per peer request (rounded to whole blocks).
WINDOW_BYTES = 1024 * 1024


class PeerDirectory(Protocol):
    """
    Where the storage engine finds other nodes.
    """

    def address(self, node_id: str) -> str | None:
        """
        @param node_id: A member's id.
        @return: Its cluster address (C{host:port}) when it may be asked
            for shards now (alive or suspect), else L{None} (dead, departed
            or unknown: do not wait for a timeout).
        """


class ShardUnavailable(Exception):
    """
    A remote shard cannot be read (any more) for this read.

    @ivar corrupt: The peer found the shard corrupt or missing (report it),
        as opposed to the peer being unreachable.
    @ivar stripe: The stripe that was asked for.
    """

    def __init__(self, reason: str, stripe: int, corrupt: bool) -> None:
        super().__init__(reason)
        self.stripe = stripe
        self.corrupt = corrupt


class MembershipDirectory:
    """
    A L{PeerDirectory} over a membership view.
    """

    def __init__(self, membership: Any) -> None:
        """
        @param membership: An L{anvil.cluster.membership.Membership}.
        """
        self._membership = membership

    def address(self, node_id: str) -> str | None:
        """
        @see: L{PeerDirectory.address}
        """
        member = self._membership.get(node_id)
        if member is None or member.state.value not in ("alive", "suspect") or not member.cluster_addr:
            return None
        return str(member.cluster_addr)


class RemoteShardSource:
    """
    Blocks of one shard of one content, read from the peer holding it.
    """

    def __init__(
        self,
        peers: Any,
        addr: str,
        digest: bytes,
        index: int,
        params: ErasureParams,
        content_length: int,
        last_stripe: int,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        """
        @param peers: An L{anvil.cluster.peers.PeerClient}.
        @param addr: The peer's cluster address.
        @param digest: The content hash (raw).
        @param index: The shard index.
        @param params: The content's geometry.
        @param content_length: The content's size.
        @param last_stripe: The last stripe the read needs (no window goes
            beyond it).
        @param window_bytes: Shard bytes per request.
        """
        self._peers = peers
        self._addr = addr
        self._digest = digest
        self._index = index
        self._params = params
        self._length = content_length
        self._last = last_stripe
        self._window = max(1, window_bytes // max(1, params.block_size))
        self._blocks: dict[int, bytes] = {}
        # Windows asked for and not yet answered: first stripe -> request.
        self._pending: dict[int, Deferred[Any]] = {}
        self._requested_to = -1  # last stripe covered by a request
        self._failure: ShardUnavailable | None = None
        self._corrupt_stripe: int | None = None
        self._closed = False

    def _request(self, first: int) -> None:
        count = min(self._window, self._last - first + 1)
        if count <= 0 or self._closed:
            return
        self._requested_to = first + count - 1
        d = Deferred.fromCoroutine(
            self._peers.read_blocks(
                self._addr, self._digest, self._index, self._params, self._length, first, count
            )
        )
        self._pending[first] = d
        d.addBoth(self._answered, first, count)

    def _answered(self, result: Any, first: int, count: int) -> Any:
        self._pending.pop(first, None)
        if isinstance(result, Failure):
            error = result.value
            # Imported here: the cluster package depends on the storage
            # package, not the other way round.
            from anvil.cluster.peers import PeerShardCorrupt, PeerShardMissing

            corrupt = isinstance(error, (PeerShardMissing, PeerShardCorrupt))
            if self._failure is None:
                self._failure = ShardUnavailable(f"{self._addr}: {error}", first, corrupt)
            return None
        for offset, block in enumerate(result.blocks):
            self._blocks[first + offset] = block
        if result.corrupt_stripe is not None and self._corrupt_stripe is None:
            self._corrupt_stripe = result.corrupt_stripe
        elif len(result.blocks) < count and self._failure is None:
            self._failure = ShardUnavailable(
                f"{self._addr}: answered {len(result.blocks)} of {count} blocks", first + len(result.blocks), False
            )
        return None

    async def block(self, stripe: int) -> bytes:
        """
        @param stripe: A stripe index, at most C{last_stripe}; stripes are
            asked for in increasing order.
        @return: The shard's block of that stripe.
        @raise ShardUnavailable: The peer cannot deliver it.
        """
        while True:
            block = self._blocks.pop(stripe, None)
            if block is not None:
                # Forget what the reader skipped, and keep a window ahead.
                for old in [s for s in self._blocks if s < stripe]:
                    del self._blocks[old]
                if (
                    not self._pending
                    and self._requested_to < self._last
                    and self._requested_to - stripe < self._window // 2 + 1
                ):
                    self._request(self._requested_to + 1)
                return block
            if self._corrupt_stripe is not None and stripe >= self._corrupt_stripe:
                raise ShardUnavailable(
                    f"{self._addr}: shard {self._index} corrupt at stripe {self._corrupt_stripe}",
                    stripe,
                    True,
                )
            if self._failure is not None:
                raise ShardUnavailable(str(self._failure), stripe, self._failure.corrupt)
            covering = [d for first, d in self._pending.items() if first <= stripe]
            if covering:
                await _quietly(covering[0])
                continue
            if self._closed or stripe > self._last:
                raise ShardUnavailable("source closed", stripe, False)
            # The answer (or its failure) may be there at once: look again.
            self._request(stripe)

    def close(self) -> None:
        """
        Stop: cancel requests in flight and drop buffered blocks.
        """
        self._closed = True
        for d in list(self._pending.values()):
            d.cancel()
        self._pending.clear()
        self._blocks.clear()


def _quietly(d: Deferred[Any]) -> Deferred[None]:
    """
    A Deferred firing (with None) when C{d} fires, whatever its outcome,
    without consuming C{d}'s result.
    """
    waiter: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter
