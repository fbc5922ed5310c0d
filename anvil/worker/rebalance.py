# -*- test-case-name: tests.test_rebalance -*-
"""
Rebalancing: after members join (or a member is removed for good), move
shards so that each content's shard map matches the placement the current
alive members of the region give it (ARCHITECTURE §5 and §7).

What "matches" means
====================

Placement (L{anvil.storage.placement.assign}) gives shard I{i} of a content
to the I{i}-th node of the rendezvous ranking of its placement key over the
alive members, wrapping round when there are fewer members than C{k + m}.
Reads trust the recorded map, so which index sits on which node does not
matter for reading; what matters for durability and spreading load is
I{how many} shards of the content each node holds.  L{plan_moves}
therefore compares node I{counts}, not index by index: a content is
balanced when every alive node holds as many of its shards as C{assign}
gives it.  Shards on a node holding more than its count move to nodes
holding fewer, a shard going to the node C{assign} gives its own index when
that node is short (so a freshly balanced map usually is C{assign}'s map).

Comparing counts keeps the moves few.  Comparing indices would move almost
every shard of a content whenever a member joins or leaves ahead of others
in its ranking (the ranks behind it shift by one), and move them all back
when it returns.  With counts, a joining member takes over one shard of the
contents it ranks among the first C{k + m} for (about C{(k + m) / n} of
them), and a member that merely disappears moves nothing: a smaller alive
set never makes a node hold I{too many} shards.  Entries on members that
are not alive, and entries recorded as never stored, are left alone:
rebuilding those is repair's work (L{anvil.worker.repair}), which runs
first.

One move
========

For a content with moves, the shards are rebuilt on their new nodes from
the content's readable shards (L{StorageEngine.rebuild}, one read of the
content for all its moves); the map entries are then changed with a
compare-and-set (L{ContentStore.replace_shard_targets}: only if each still
names the node this pass read), and only then is the old shard file
deleted (L{PeerClient.delete_shard}, or the local store).  At every moment
the map names shard files that exist:

  - a failure before the compare-and-set leaves the new file unreferenced
    (the orphan collector removes it) and the map as it was;
  - a lost compare-and-set (a repair or another rebalance changed the map
    meanwhile) also leaves the new file to the orphan collector: deleting it
    could remove a file another mover has just written over it for its own
    entry;
  - before the old file is deleted, the map is read again, and a file that
    the map names again (another node, with a different view of the
    membership, moved the shard back) is kept.

Throttle and priority
=====================

A move reads the content (C{k} shards' worth, the content's size) and
writes the moved shards; the pass charges both against
C{worker.rebalance_rate} MB/s and sleeps after each content until it is
back on that schedule, so rebalancing is a steady trickle that client
traffic outruns.  The cap holds for the daemon's passes and for
C{anvil-admin worker run-once rebalance} alike (there is no per-pass
budget that would make an unpaced pass short).

Repairs run before rebalances: a pass does not start, and a running pass
stops at its next page, while repair or evacuation tasks of the region
(or C{member_down} checks that may turn into evacuations) are running or
due (tasks backing off after failures do not hold it up, or a
content that cannot be repaired would stop rebalancing for good).

The daemon's loop
=================

Every node runs the C{rebalance} worker, but only one node of a region
does passes: the alive member of the region with the smallest node id (the
views of the members converge, and the compare-and-set keeps a moment of
two passes at once safe).  It does a pass when the alive members have
changed since its last complete pass (and at its first tick after
starting, when it does not know) and the set has been the same for
L{SETTLE} seconds, so a join in progress or a flapping member does not
start a pass per change; a pass that left moves undone (a target did not
answer, the map changed meanwhile) is run again after L{RETRY_AFTER}
seconds.  C{run-once} does one pass at once, whatever the
membership history and on whichever node it is run.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from anvil.meta.records import ContentRecord
from anvil.metrics import Metrics
from anvil.storage.placement import InvalidShardMap, NoPlacement, ShardMap, ShardTarget, assign

__all__ = [
    "CHECK_INTERVAL",
    "SETTLE",
    "RebalanceReport",
    "Rebalancer",
    "plan_moves",
    "shard_bytes",
    "pending_repairs",
]

#: Seconds between two looks of the daemon's loop at the membership.
CHECK_INTERVAL = 30.0
#: Seconds the alive members must stay the same before a daemon pass.
SETTLE = 60.0
#: Seconds before a daemon pass that left moves undone (a target down, a
#: conflict) is tried again without a membership change.
RETRY_AFTER = 600.0
#: The shortest sleep towards the rate (shorter debts wait for the next).
MIN_SLEEP = 0.05
#: Contents read from the database per page.
PAGE_SIZE = 200
#: The task kinds that run before rebalancing (a due C{member_down} is
#: about to become an evacuation).
REPAIR_KINDS = ("repair", "evacuate", "member_down")


def plan_moves(shard_map: ShardMap, alive: Sequence[str], total: int) -> dict[int, tuple[str, str]]:
    """
    The moves that bring a content's shard map to the current placement
    (see the module docstring: node counts, not indices).

    @param shard_map: the content's recorded map, with its placement key.
    @param alive: the alive members of the region.
    @param total: the content's C{k + m}.
    @return: shard index to C{(current node, new node)}; empty when the map
        is balanced, has no placement key, or does not have C{total}
        entries.
    @raise NoPlacement: when no member is alive.
    """
    if not shard_map.key or len(shard_map.targets) != total:
        return {}
    alive_set = set(alive)
    ideal = assign(bytes.fromhex(shard_map.key), list(alive_set), total)
    want = Tally(ideal)
    kept: Tally[str] = Tally()
    movable = [t for t in shard_map.targets if t.node in alive_set]
    # Entries already where assign puts their index stay first, so that a
    # node holding too many keeps those and gives up the others.
    staying = {t.index for t in movable if ideal[t.index] == t.node}
    for target in movable:
        if target.index in staying:
            kept[target.node] += 1
    surplus: list[ShardTarget] = []
    for target in movable:
        if target.index in staying:
            continue
        if kept[target.node] < want[target.node]:
            kept[target.node] += 1
        else:
            surplus.append(target)
    # Empty places, in index order of the ideal map.
    short = want - kept
    free: list[int] = []
    for index, node in enumerate(ideal):
        if short[node] > 0:
            short[node] -= 1
            free.append(index)
    moves: dict[int, tuple[str, str]] = {}
    for target in surplus:
        if not free:
            break
        # Prefer the node assign gives the shard's own index, if it is
        # short; else the first place free.
        own = [i for i in free if ideal[i] == ideal[target.index]]
        place = own[0] if own else free[0]
        free.remove(place)
        moves[target.index] = (target.node, ideal[place])
    return moves


def shard_bytes(content: ContentRecord) -> int:
    """
    The block bytes one shard of a content holds (without its header and
    checksums): C{ceil(stripe / k)} per stripe.

    @param content: a sharded content.
    """
    full, rest = divmod(content.size, content.stripe_size)
    return full * -(-content.stripe_size // content.k) + (-(-rest // content.k) if rest else 0)


async def pending_repairs(global_db: Any, region: str, now: float) -> int:
    """
    How many tasks of L{REPAIR_KINDS} of a region are running or due now
    (the task queue's table; tasks waiting out a back-off or their time do
    not count).

    @param global_db: the global database.
    @param region: the region.
    @param now: the time, in seconds since the epoch (the task queue's
        clock).
    """
    rows = await global_db.run_query(
        "SELECT count(*) FROM tasks WHERE kind = ANY(%s)"
        " AND (state = 'running' OR (state = 'pending' AND run_after <= %s))"
        " AND (region IS NULL OR region = %s)",
        (list(REPAIR_KINDS), datetime.fromtimestamp(now, UTC), region),
    )
    return int(rows[0][0])


class ContentSource(Protocol):
    """
    What a pass needs of the region's contents
    (L{anvil.meta.contents.ContentStore}).
    """

    async def page(self, after: str = "", limit: int = 500) -> list[ContentRecord]:
        """Contents with shard files, in hash order, after C{after}."""

    async def get(self, content_hash: str) -> ContentRecord | None:
        """One content, or L{None}."""

    async def replace_shard_targets(
        self, content_hash: str, changes: Mapping[int, tuple[str, ShardTarget]]
    ) -> bool:
        """Compare-and-set of shard map entries."""


@dataclass
class RebalanceReport:
    """
    What one pass did.

    @ivar skipped: why the pass did nothing (C{"not the region's
        rebalancer"}, C{"membership unchanged"}, ...), or L{None}.
    @ivar complete: the pass went through every content.
    @ivar members: alive members of the region the pass placed on (at its
        end).
    @ivar contents_checked: contents whose maps were compared.
    @ivar contents_moved: contents at least one shard of which moved.
    @ivar moves: shards moved (rebuilt, recorded, old file deleted or left
        to the orphan collector).
    @ivar moved_bytes: block bytes of the shards moved.
    @ivar failed: shards that could not be rebuilt on their new node.
    @ivar conflicts: contents whose map changed under the pass (their new
        shard files are left to the orphan collector).
    @ivar old_left: old shard files that could not be deleted (their node
        could not be asked) or were kept because the map names them again.
    @ivar unplaced: contents without a usable placement key or map.
    """

    skipped: str | None = None
    complete: bool = False
    members: int = 0
    contents_checked: int = 0
    contents_moved: int = 0
    moves: int = 0
    moved_bytes: int = 0
    failed: int = 0
    conflicts: int = 0
    old_left: int = 0
    unplaced: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """
        The report as C{run-once} prints it.
        """
        document = asdict(self)
        if document["skipped"] is None:
            del document["skipped"]
        document["errors"] = document["errors"][:10]
        return document


class _Stopped(Exception):
    """
    The pass was interrupted (the worker is stopping).
    """


class Rebalancer:
    """
    The C{rebalance} worker of a node (see the module docstring).

    @ivar name: C{"rebalance"}.
    @ivar last_report: the report of the last pass, if any.
    """

    name = "rebalance"
    _log = Logger()

    def __init__(
        self,
        contents: ContentSource,
        engine: Any,
        node_id: str,
        alive: Callable[[], Awaitable[Sequence[str]]],
        metrics: Metrics,
        clock: Any,
        rate_bytes: float,
        io: Any,
        repairs_pending: Callable[[], Awaitable[int]] | None = None,
        daemon: bool = False,
        page_size: int = PAGE_SIZE,
        settle: float = SETTLE,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        """
        @param contents: the region's contents.
        @param engine: the node's L{anvil.storage.engine.StorageEngine}
            (C{rebuild}, C{shards}, C{peers}, C{address}).
        @param node_id: this node's id.
        @param alive: returns the ids of the region's alive members that
            may hold shards, this node included (asked once per page).
        @param metrics: C{rebalance_moves} and C{rebalance_moved_bytes}.
        @param clock: an C{IReactorTime}.
        @param rate_bytes: bytes per second a pass may read and write.
        @param io: the node's I/O pool, for deleting a local shard file.
        @param repairs_pending: how many repairs are running or due (a pass
            waits for zero); L{None}: never wait.
        @param daemon: whether passes follow the daemon's rules (only the
            region's rebalancer, only after a membership change) or run at
            once (C{run-once}).
        @param page_size: contents read per page.
        @param settle: seconds the alive set must be stable before a daemon
            pass.
        @param retry_after: seconds before a daemon pass that left moves
            undone runs again without a membership change.
        """
        if rate_bytes <= 0:
            raise ValueError(f"the rebalance rate must be positive, not {rate_bytes}")
        self._contents = contents
        self._engine = engine
        self._node_id = node_id
        self._alive = alive
        self._metrics = metrics
        self._clock = clock
        self._rate = float(rate_bytes)
        self._io = io
        self._repairs_pending = repairs_pending
        self._daemon = daemon
        self._page_size = page_size
        self._settle = settle
        self._retry_after = retry_after
        self._balanced_for: frozenset[str] | None = None
        self._retry_at: float | None = None
        self._seen: frozenset[str] | None = None
        self._seen_since = 0.0
        self._sleep: Deferred[None] | None = None
        self._stopping = False
        self.last_report: RebalanceReport | None = None

    @classmethod
    def for_node(cls, ctx: Any, daemon: bool) -> Rebalancer:
        """
        The rebalancer of a node from its L{anvil.worker.tasks.WorkerContext}.

        The members come from the node's membership, or, in
        C{anvil-admin worker run-once} (a process without one), from the
        running node's cluster listener, as repair gets them
        (L{anvil.worker.repair.cluster_access}, which also gives the
        command's engine its peer client); members recorded as removed are
        never candidates.

        @param ctx: the context.
        @param daemon: see L{__init__}.
        """
        from anvil.meta.contents import ContentStore
        from anvil.worker.repair import cluster_access, removed_nodes

        config = ctx.config
        region = config.node.region
        access = cluster_access(ctx)

        async def alive() -> list[str]:
            view = await access()
            return list(view.candidates(await removed_nodes(ctx.global_db)))

        def repairs() -> Awaitable[int]:
            return pending_repairs(ctx.global_db, region, ctx.clock.seconds())

        return cls(
            # The regional database is the object store's (the S3 service
            # has no other handle on it).
            ContentStore(ctx.s3.objects._db),  # noqa: SLF001
            ctx.s3.engine,
            ctx.node_id,
            alive,
            ctx.metrics,
            ctx.clock,
            float(config.worker.rebalance_rate) * 1_000_000,
            ctx.io,
            repairs_pending=repairs,
            daemon=daemon,
        )

    def interrupt(self) -> None:
        """
        End a pass in progress early (the worker is stopping): it stops
        after the content it is moving.
        """
        self._stopping = True
        if self._sleep is not None:
            self._sleep.cancel()

    # -- one pass ----------------------------------------------------------------

    async def run_once(self) -> RebalanceReport:
        """
        One pass (see the module docstring for when the daemon's passes do
        nothing).

        @return: what it did.
        """
        self._stopping = False
        report = RebalanceReport()
        self.last_report = report
        alive = frozenset(await self._alive())
        report.members = len(alive)
        if self._daemon:
            reason = self._daemon_skip(alive)
            if reason is not None:
                report.skipped = reason
                return report
        if await self._repairs_first(report):
            return report
        started = self._clock.seconds()
        charged = 0
        after = ""
        constant = True
        try:
            while True:
                page = await self._contents.page(after=after, limit=self._page_size)
                if after:
                    now_alive = frozenset(await self._alive())
                    if now_alive != alive:
                        constant, alive = False, now_alive
                        report.members = len(alive)
                for content in page:
                    charged += await self._content(content, sorted(alive), report)
                    await self._pace(started, charged)
                if len(page) < self._page_size:
                    break
                after = page[-1].hash
                if await self._repairs_first(report):
                    return report
        except _Stopped:
            report.skipped = "stopped"
            return report
        report.complete = True
        if constant:
            self._balanced_for = alive
            undone = report.failed or report.conflicts
            self._retry_at = self._clock.seconds() + self._retry_after if undone else None
        self._log.info(
            "Rebalance pass: {checked} contents checked, {moves} shards moved "
            "({moved_bytes} bytes) over {members} members, {failed} failed, {conflicts} conflicts",
            checked=report.contents_checked, moves=report.moves, moved_bytes=report.moved_bytes,
            members=report.members, failed=report.failed, conflicts=report.conflicts,
        )
        return report

    def _daemon_skip(self, alive: frozenset[str]) -> str | None:
        """
        Why the daemon's pass should do nothing now, or L{None}.
        """
        now = self._clock.seconds()
        if alive != self._seen:
            self._seen, self._seen_since = alive, now
        if not alive or min(alive) != self._node_id:
            return "not the region's rebalancer"
        if alive == self._balanced_for and (self._retry_at is None or now < self._retry_at):
            return "membership unchanged"
        if now - self._seen_since < self._settle:
            return "membership changed recently"
        return None

    async def _repairs_first(self, report: RebalanceReport) -> bool:
        """
        Whether repairs are running or due (the pass must wait for them);
        says so in the report.
        """
        if self._repairs_pending is None:
            return False
        pending = await self._repairs_pending()
        if pending:
            report.skipped = f"{pending} repair tasks pending"
            return True
        return False

    async def _pace(self, started: float, charged: int) -> None:
        """
        Sleep until the pass is back on its C{rate_bytes} schedule.
        """
        if self._stopping:
            raise _Stopped()
        delay = started + charged / self._rate - self._clock.seconds()
        if delay < MIN_SLEEP:
            # Not worth a timer: the debt is paid with the next sleep.
            return
        self._sleep = deferLater(self._clock, delay, lambda: None)
        try:
            await self._sleep
        except CancelledError:
            raise _Stopped() from None
        finally:
            self._sleep = None

    async def _content(self, content: ContentRecord, alive: list[str], report: RebalanceReport) -> int:
        """
        Compare one content's map with the placement and move what must
        move.

        @return: the bytes read and written (for pacing).
        """
        report.contents_checked += 1
        total = content.k + content.m
        try:
            shard_map = ShardMap.from_json(content.shard_map)
            if not shard_map.key or len(shard_map.targets) != total:
                raise InvalidShardMap("no placement key, or not one entry per shard")
            moves = plan_moves(shard_map, alive, total)
        except (InvalidShardMap, NoPlacement, ValueError):
            report.unplaced += 1
            return 0
        if not moves:
            return 0
        try:
            done = await self._engine.rebuild(content, {i: new for i, (_, new) in moves.items()})
        except Exception as e:
            report.failed += len(moves)
            report.errors.append(f"{content.hash}: {type(e).__name__}: {e}")
            self._log.warn(
                "Rebalance of {content_hash} failed: {error}", content_hash=content.hash, error=repr(e)
            )
            return content.size
        report.failed += len(moves) - len(done)
        size = shard_bytes(content)
        written = size * len(done)
        if not done:
            return content.size
        changes = {i: (moves[i][0], target) for i, target in done.items()}
        if not await self._contents.replace_shard_targets(content.hash, changes):
            report.conflicts += 1
            self._log.info(
                "The shard map of {content_hash} changed during its rebalance; the next pass looks again",
                content_hash=content.hash,
            )
            return content.size + written
        report.contents_moved += 1
        report.moves += len(done)
        report.moved_bytes += written
        self._metrics.rebalance_moves.inc(len(done))
        self._metrics.rebalance_moved_bytes.inc(written)
        await self._delete_old(content, {i: moves[i][0] for i in done}, report)
        return content.size + written

    async def _delete_old(self, content: ContentRecord, old: dict[int, str], report: RebalanceReport) -> None:
        """
        Delete the moved shards' old files, unless the map names them again.
        """
        try:
            current = await self._contents.get(content.hash)
            targets = ShardMap.from_json(current.shard_map).targets if current is not None else ()
        except Exception as e:
            # Not knowing whether the map names them again, keep them all
            # (the orphan collector removes them later).
            report.old_left += len(old)
            self._log.warn(
                "Reading the shard map of {content_hash} again failed, old shards kept: {error}",
                content_hash=content.hash, error=repr(e),
            )
            return
        named = {(t.index, t.node) for t in targets}
        digest = bytes.fromhex(content.hash)
        for index, node in sorted(old.items()):
            if current is None or (index, node) in named:
                report.old_left += 1
                continue
            try:
                if node == self._node_id:
                    await self._io.run(self._engine.shards.delete, digest, index)
                    continue
                address = self._engine.address(node)
                if address is None:
                    raise LookupError(f"node {node} cannot be reached")
                await self._engine.peers.delete_shard(address, digest, index)
            except Exception as e:
                # The orphan collector removes the file later.
                report.old_left += 1
                self._log.warn(
                    "Deleting the old shard {index} of {content_hash} on {node} failed: {error}",
                    index=index, content_hash=content.hash, node=node, error=repr(e),
                )
