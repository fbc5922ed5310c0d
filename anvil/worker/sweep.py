# -*- test-case-name: tests.test_sweep -*-
"""
The sweep (one node of a region per interval) and the orphan collector
(every node, its own files) (ARCHITECTURE §7; issue 5).

The sweep
=========

A pass walks the region's contents with shard files in hash order (a page
at a time) and, for each shard map entry, asks:

  - does it name a node at all (C{""}: never stored)?
  - is that node recorded in C{removed_nodes} (C{anvil-admin cluster
    remove}, or down for longer than C{dead_member_repair_after})?
  - is the node alive (or suspect), or dead, departed, unknown?
  - for an alive node: is the file there?  Every alive member's shard list
    (L{anvil.cluster.peers.PeerClient.list_shards}; this node's own with
    L{anvil.storage.shardstore.LocalShardStore.list_page}) is read in the
    same hash order alongside the contents, a page at a time (a merge
    join), so a pass holds one page per node whatever the number of
    shards.

A shard is I{healthy} when its node is alive or suspect and (as far as the
listing tells) holds the file; a node whose listing failed is given the
benefit of the doubt.  A content with a shard that is never stored, on a
removed node, or missing from an alive node's listing gets a C{repair}
task (one unfinished per content, L{anvil.worker.repair.RepairBacklog};
the repair itself checks every shard again before rebuilding anything, so
a listing that raced with a write or a repair costs a task that finds
nothing to do).  Contents
whose rows were inserted after the pass started are skipped: their files
may have been committed after the listing passed them.

Shards on dead, departed or unknown members are I{not} repaired by the
sweep at once: a reboot or an upgrade takes minutes, and rebuilding a
whole node's shards each time would be far costlier than waiting.  The
first pass that sees such a member named in shard maps enqueues a
C{member_down} task to run C{dead_member_repair_after} seconds later; a
pass that sees the member alive again cancels it; if it runs, the member
is recorded as removed and evacuated (L{anvil.worker.repair}).  So a member
is rebuilt elsewhere between C{dead_member_repair_after} and that plus one
sweep interval after it went down.

Gauges: C{anvil_shards_missing} (entries not healthy, all reasons
together) and C{anvil_objects_by_redundancy{healthy_shards="0".."k+m"}}
(contents with shard files by their number of healthy shards; inline
contents, kept in PostgreSQL, have no shards and are not counted; a
content below C{k} is lost).  Every label from C{"0"} to C{"k+m"} is set
by each pass, zeros included.  C{anvil_objects_by_redundancy_state} counts
the same contents by what their healthy shards leave them, judged with each
content's own C{k} and C{m} (L{redundancy_state}): alert rules use it, so
they hold for any erasure code, and for a region holding contents written
under several.

One sweep per region per interval
---------------------------------

Each node runs the sweep worker every C{sweep_interval} seconds, but only
the one that I{claims} the interval sweeps: the claim is one conditional
upsert of the global C{settings} row C{sweep:<region>}, succeeding only
when the previous claim's C{next_after} time has passed (and setting it to
0.8 intervals from now).  No connection or lock is held while sweeping; a
node that dies mid-sweep just leaves the next claim to the next interval.
The same row keeps the last pass's result, and a node that does not sweep
sets its gauges from it, so every node's C{/metrics} shows the region's
numbers (never a stale result of its own).  C{anvil-admin worker run-once
sweep} always sweeps (an operator asked for a pass now) and records its
claim and result the same way.

The orphan collector
====================

Every node, every C{sweep_interval}, lists its own committed shard files a
page at a time and looks their contents up: a file is an orphan when its
content has no row, or has one whose shard map does not name this node for
that index (the losing writer of two identical uploads, a shard a repair
replaced while this node was unreachable, a failed write's leftovers).  An
orphan is removed once its modification time (the commit of the file) is
older than C{gc_grace}: a writer commits its files before it inserts the
content row, and a repair rebuilds before it records the shard, each well
within the grace period.  A regional database holding no content at all
while the node has shard files is taken for a wrong or empty database, and
nothing is removed.  The file's inode is recorded before the database
is asked; the removal first renames the file aside and removes it only if
it is still that inode, so a shard committed at the same path in the
meantime (a repair choosing this node) is put back, never lost.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

from anvil.cluster.membership import Member, MemberState
from anvil.meta.contents import ContentStore
from anvil.meta.records import ContentRecord
from anvil.metrics import Metrics
from anvil.storage.placement import InvalidShardMap, ShardMap
from anvil.storage.shardstore import shard_cursor
from anvil.worker.queue import TaskQueue
from anvil.worker.repair import AccessFactory, ClusterAccess, RepairBacklog, cluster_access, removed_nodes

__all__ = ["REDUNDANCY_STATES", "OrphanCollector", "OrphanReport", "SweepReport", "Sweeper", "redundancy_state"]

#: Contents per page of the sweep.
PAGE = 500
#: Shards per page of a node's listing.
LIST_PAGE = 2000
#: The share of the interval after a claim before the next may be made.
CLAIM_SHARE = 0.8

#: What a content's healthy shards leave it, in order: all C{k+m}; more
#: than C{k}; exactly C{k} (one more loss makes it unreadable); fewer than
#: C{k} (unreadable until shards come back).
REDUNDANCY_STATES = ("full", "degraded", "no_spare", "lost")


def redundancy_state(healthy: int, k: int, m: int) -> str:
    """
    @return: the L{REDUNDANCY_STATES} entry of a content of C{k} data and
        C{m} parity shards that has C{healthy} healthy ones.
    """
    if healthy >= k + m:
        return "full"
    if healthy > k:
        return "degraded"
    if healthy == k:
        return "no_spare"
    return "lost"


@dataclass
class SweepReport:
    """
    What one sweep pass found and did.

    @ivar swept: whether this node swept (C{False}: another node holds the
        interval's claim; the gauges were set from its last result).
    @ivar contents: contents with shard files checked.
    @ivar shards_missing: map entries not healthy.
    @ivar repairs_enqueued: repair tasks created (not counting ones
        already pending).
    @ivar lost: contents with fewer than C{k} healthy shards.
    @ivar redundancy: healthy-shard count (as a string) to contents.
    @ivar states: L{REDUNDANCY_STATES} to contents.
    @ivar members_down: members named in shard maps that are down (dead,
        departed or unknown) and not removed.
    @ivar removed: removed members still named in shard maps.
    @ivar unverified_nodes: alive members whose listing failed.
    """

    swept: bool = True
    contents: int = 0
    shards_missing: int = 0
    repairs_enqueued: int = 0
    lost: int = 0
    redundancy: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    members_down: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unverified_nodes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """
        The report as a JSON-ready dict.
        """
        return asdict(self)


class _Listing:
    """
    One node's committed shards, read a page at a time in (hash, index)
    order, consumed alongside contents in hash order.

    @ivar failed: the listing failed (the node's shards are unverified
        from then on).
    """

    def __init__(self, fetch: Callable[[str, int], Awaitable[list[tuple[str, int]]]], limit: int = LIST_PAGE) -> None:
        """
        @param fetch: one page: C{(after cursor, limit)} to C{(hash hex,
            index)} pairs in order.
        """
        self._fetch = fetch
        self._limit = limit
        self._buffer: list[tuple[str, int]] = []
        self._position = 0
        self._cursor = ""
        self._exhausted = False
        self.failed = False

    async def indices(self, content_hash: str) -> set[int] | None:
        """
        The shard indices of C{content_hash} the node holds; calls must
        come in increasing hash order.

        @return: the indices, or L{None} when the listing failed.
        """
        found: set[int] = set()
        while not self.failed:
            while self._position < len(self._buffer):
                hash_hex, index = self._buffer[self._position]
                if hash_hex > content_hash:
                    return found
                if hash_hex == content_hash:
                    found.add(index)
                self._position += 1
            if self._exhausted:
                return found
            try:
                page = await self._fetch(self._cursor, self._limit)
            except Exception:
                self.failed = True
                raise
            self._buffer, self._position = page, 0
            if len(page) < self._limit:
                self._exhausted = True
            if page:
                self._cursor = shard_cursor(page[-1][0], page[-1][1])
        return None


class Sweeper:
    """
    The sweep worker task of one node (see the module docstring).
    """

    name = "sweep"
    _log = Logger()

    def __init__(
        self,
        contents: ContentStore,
        global_db: Any,
        queue: TaskQueue,
        access: AccessFactory,
        metrics: Metrics,
        io: Any,
        shards: Any,
        clock: Any,
        *,
        node_id: str,
        region: str,
        interval: float,
        dead_after: float,
        default_total: int,
        forced: bool = False,
    ) -> None:
        """
        @param contents: the region's content table.
        @param global_db: the global database (claims, C{removed_nodes}).
        @param queue: where repairs and C{member_down} tasks go.
        @param access: the cluster access (L{anvil.worker.repair.cluster_access}).
        @param metrics: the gauges set.
        @param io: the I/O pool (this node's listing).
        @param shards: this node's shard store.
        @param clock: an C{IReactorTime}.
        @param node_id: this node's id.
        @param region: this node's region.
        @param interval: C{sweep_interval}.
        @param dead_after: C{dead_member_repair_after}.
        @param default_total: C{k + m} of the configuration: the gauge has
            at least these labels.
        @param forced: sweep whatever the claim (C{run-once}).
        """
        self._contents = contents
        self._global_db = global_db
        self._queue = queue
        self._access = access
        self._metrics = metrics
        self._io = io
        self._shards = shards
        self._clock = clock
        self._node_id = node_id
        self._region = region
        self._interval = interval
        self._dead_after = dead_after
        self._default_total = default_total
        self.forced = forced
        self._joined = False
        self._members: dict[str, Member] = {}

    @classmethod
    def for_node(cls, ctx: Any) -> Sweeper:
        """
        The sweeper of a worker context; C{run-once} (unpaced) sweeps
        whatever the claim.
        """
        config = ctx.config
        return cls(
            ContentStore(ctx.s3.objects._db),  # noqa: SLF001 - the regional database
            ctx.global_db,
            ctx.queue,
            cluster_access(ctx),
            ctx.metrics,
            ctx.io,
            ctx.shards,
            ctx.clock,
            node_id=ctx.node_id,
            region=config.node.region,
            interval=float(config.worker.sweep_interval),
            dead_after=float(config.worker.dead_member_repair_after),
            default_total=config.erasure.k + config.erasure.m,
            forced=not ctx.paced,
        )

    @property
    def _key(self) -> str:
        return f"sweep:{self._region}"

    # -- the claim ------------------------------------------------------------

    async def claim(self) -> bool:
        """
        Claim this interval's sweep (always, when forced).

        @return: whether this node sweeps now.
        """
        now = self._clock.seconds()
        claim = {"node_id": self._node_id, "claimed_at": now, "next_after": now + CLAIM_SHARE * self._interval}
        condition = "" if self.forced else (
            " WHERE COALESCE((convert_from(settings.value, 'UTF8')::jsonb->>'next_after')::float8, 0) <= %s"
        )
        params: tuple[Any, ...] = (self._key, json.dumps(claim).encode("utf-8"), json.dumps(claim))
        if not self.forced:
            params += (now,)
        rows = await self._global_db.run_query(
            "INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE"
            " SET value = convert_to((convert_from(settings.value, 'UTF8')::jsonb || %s::jsonb)::text, 'UTF8')"
            + condition + " RETURNING key",
            params,
        )
        return bool(rows)

    async def _record(self, report: SweepReport) -> None:
        result = {
            "node_id": self._node_id,
            "finished_at": self._clock.seconds(),
            "shards_missing": report.shards_missing,
            "redundancy": report.redundancy,
            "states": report.states,
            "contents": report.contents,
        }
        await self._global_db.run_operation(
            "UPDATE settings SET value = convert_to((convert_from(value, 'UTF8')::jsonb"
            " || jsonb_build_object('result', %s::jsonb))::text, 'UTF8') WHERE key = %s",
            (json.dumps(result), self._key),
        )

    async def last_result(self) -> dict[str, Any] | None:
        """
        The last recorded sweep result of this region, if any.
        """
        rows = await self._global_db.run_query(
            "SELECT convert_from(value, 'UTF8')::jsonb->'result' FROM settings WHERE key = %s", (self._key,)
        )
        if not rows or rows[0][0] is None:
            return None
        result: dict[str, Any] = rows[0][0]
        return result

    def _set_gauges(self, report: SweepReport) -> None:
        self._metrics.shards_missing.set(report.shards_missing)
        for label, count in report.redundancy.items():
            self._metrics.objects_by_redundancy.labels(healthy_shards=label).set(count)
        for state in REDUNDANCY_STATES:
            self._metrics.objects_by_redundancy_state.labels(state=state).set(report.states.get(state, 0))

    # -- the pass ---------------------------------------------------------------

    async def run_once(self) -> SweepReport:
        """
        One pass: sweep if this node claims the interval, else refresh the
        gauges from the last result.
        """
        if not await self.claim():
            report = SweepReport(swept=False)
            result = await self.last_result()
            if result is not None:
                report.shards_missing = int(result.get("shards_missing", 0))
                report.redundancy = {str(k): int(v) for k, v in result.get("redundancy", {}).items()}
                report.states = {str(k): int(v) for k, v in result.get("states", {}).items()}
                report.contents = int(result.get("contents", 0))
                self._set_gauges(report)
            return report
        report = await self.sweep()
        await self._record(report)
        return report

    async def sweep(self) -> SweepReport:
        """
        Walk every content with shard files (see the module docstring).
        """
        started = datetime.fromtimestamp(self._clock.seconds(), UTC)
        access = await self._access()
        removed = await removed_nodes(self._global_db)
        report = SweepReport()
        counts: dict[int, int] = {n: 0 for n in range(self._default_total + 1)}
        states = dict.fromkeys(REDUNDANCY_STATES, 0)
        listings = self._listings(access)
        # One view for the whole pass (and no lookup in a list per shard).
        self._members = {m.node_id: m for m in access.members()}
        self._joined = access.joined()
        down: set[str] = set()
        named_removed: set[str] = set()
        backlog = RepairBacklog(self._global_db, self._queue, self._region)
        after = ""
        while True:
            page = await self._contents.page(after, PAGE, created_before=started)
            for content in page:
                healthy, missing, repairable = await self._check(content, access, removed, listings, down, named_removed)
                report.contents += 1
                report.shards_missing += missing
                counts[healthy] = counts.get(healthy, 0) + 1
                state = redundancy_state(healthy, content.k, content.m)
                states[state] += 1
                if state == "lost":
                    report.lost += 1
                if repairable:
                    report.repairs_enqueued += await backlog.add(content.hash, {"reason": f"sweep: {repairable}"})
            if len(page) < PAGE:
                break
            after = page[-1].hash
        top = max(counts)
        report.redundancy = {str(n): counts.get(n, 0) for n in range(top + 1)}
        report.states = states
        report.members_down = sorted(down)
        report.removed = sorted(named_removed)
        report.unverified_nodes = sorted(n for n, listing in listings.items() if listing.failed)
        self._set_gauges(report)
        await self._track_down_members(access, down)
        self._log.info(
            "Sweep: {contents} contents, {missing} shards missing, {repairs} repairs enqueued, {lost} lost, "
            "members down {down}, unverified {unverified}",
            contents=report.contents, missing=report.shards_missing, repairs=report.repairs_enqueued,
            lost=report.lost, down=",".join(report.members_down) or "none",
            unverified=",".join(report.unverified_nodes) or "none",
        )
        return report

    def _listings(self, access: ClusterAccess) -> dict[str, _Listing]:
        """
        A listing per alive member of the region (this node's read locally).
        """
        listings: dict[str, _Listing] = {}
        for member in access.members():
            if member.region != self._region or member.state is not MemberState.ALIVE:
                continue
            node = member.node_id
            if node == access.node_id:
                listings[node] = _Listing(self._local_page)
                continue
            address = access.address(node)
            if address is None or access.peers is None:
                continue
            listings[node] = _Listing(_remote_page(access.peers, address))
        return listings

    async def _local_page(self, after: str, limit: int) -> list[tuple[str, int]]:
        page = await self._io.run(self._shards.list_page, after, limit)
        return [(location.content_hash.hex(), location.shard_index) for location, _ in page]

    async def _check(
        self,
        content: ContentRecord,
        access: ClusterAccess,
        removed: set[str],
        listings: dict[str, _Listing],
        down: set[str],
        named_removed: set[str],
    ) -> tuple[int, int, str]:
        """
        Judge one content's shards.

        @return: healthy shards, missing (not healthy) shards, and why a
            repair is needed (C{""}: none is).
        """
        total = content.k + content.m
        try:
            targets = ShardMap.from_json(content.shard_map).targets
        except InvalidShardMap as e:
            self._log.error("Content {content_hash} has an unreadable shard map: {error}",
                            content_hash=content.hash, error=str(e))
            return 0, total, ""
        healthy = 0
        joined = self._joined
        reasons: list[str] = []
        held: dict[str, set[int] | None] = {}
        for target in targets[:total]:
            node = target.node
            if not node:
                reasons.append(f"{target.index} never stored")
                continue
            if node in removed:
                named_removed.add(node)
                reasons.append(f"{target.index} on removed {node}")
                continue
            member = self._members.get(node)
            if member is None and not joined:
                # This node has not joined the cluster yet: it knows no
                # other member, which says nothing about them.
                healthy += 1
                continue
            if member is None or member.state in (MemberState.DEAD, MemberState.LEFT):
                down.add(node)
                continue
            if member.state is not MemberState.ALIVE or node not in listings:
                healthy += 1
                continue
            if node not in held:
                try:
                    held[node] = await listings[node].indices(content.hash)
                except Exception as e:
                    self._log.warn("Listing the shards of {node} failed; they are unverified: {error}",
                                   node=node, error=str(e))
                    held[node] = None
            indices = held[node]
            if indices is None or target.index in indices:
                healthy += 1
            else:
                reasons.append(f"{target.index} missing on {node}")
        return healthy, total - healthy, "; ".join(reasons)

    async def _track_down_members(self, access: ClusterAccess, down: set[str]) -> None:
        """
        Enqueue a delayed C{member_down} task for each member newly seen
        down, and cancel those of members seen alive again.
        """
        pending = await self._queue.list(state="pending", kind="member_down", limit=1000)
        tracked: dict[str, list[int]] = {}
        for task in pending:
            tracked.setdefault(str(task.payload.get("node_id")), []).append(task.id)
        alive = {m.node_id for m in access.members() if m.state in (MemberState.ALIVE, MemberState.SUSPECT)}
        for node, ids in tracked.items():
            if node in alive:
                for task_id in ids:
                    await self._queue.cancel(task_id)
                self._log.info("Member {node_id} is back; its removal is called off", node_id=node)
        now = self._clock.seconds()
        for node in sorted(down - set(tracked)):
            run_after = datetime.fromtimestamp(now + self._dead_after, UTC)
            await self._queue.enqueue(
                "member_down", {"node_id": node, "since": now}, region=self._region, run_after=run_after
            )
            self._log.warn(
                "Member {node_id} holds shards and is down; it is treated as removed at {when} "
                "unless it comes back",
                node_id=node, when=run_after.isoformat(),
            )


def _remote_page(peers: Any, address: str) -> Callable[[str, int], Awaitable[list[tuple[str, int]]]]:
    async def fetch(after: str, limit: int) -> list[tuple[str, int]]:
        page = await peers.list_shards(address, after, limit)
        return [(h, i) for h, i, _ in page]

    return fetch


# -- orphans --------------------------------------------------------------------------


@dataclass
class OrphanReport:
    """
    What one orphan-collection pass did.

    @ivar files_checked: committed shard files looked at.
    @ivar orphans_removed: orphan files removed.
    @ivar bytes_freed: their sizes.
    @ivar young_orphans: orphans left because they are newer than the
        grace period.
    @ivar errors: files that could not be removed.
    @ivar skipped: the pass removed nothing because the regional database
        holds no content at all while this node has shard files.
    """

    skipped: bool = False
    files_checked: int = 0
    orphans_removed: int = 0
    bytes_freed: int = 0
    young_orphans: int = 0
    errors: int = 0

    def to_json(self) -> dict[str, Any]:
        """
        The report as a JSON-ready dict.
        """
        return asdict(self)


class OrphanCollector:
    """
    The orphan-collection worker task of one node (see the module
    docstring).
    """

    name = "orphans"
    _log = Logger()

    def __init__(
        self, contents: ContentStore, shards: Any, io: Any, clock: Any, *, node_id: str, grace: float,
        page: int = 500,
    ) -> None:
        """
        @param contents: the region's content table.
        @param shards: this node's shard store.
        @param io: the I/O pool.
        @param clock: an C{IReactorTime} (file times are compared with it).
        @param node_id: this node's id.
        @param grace: C{gc_grace} seconds.
        @param page: shard files per page.
        """
        self._contents = contents
        self._shards = shards
        self._io = io
        self._clock = clock
        self._node_id = node_id
        self._grace = grace
        self._page = page

    @classmethod
    def for_node(cls, ctx: Any) -> OrphanCollector:
        """
        The orphan collector of a worker context.
        """
        return cls(
            ContentStore(ctx.s3.objects._db),  # noqa: SLF001 - the regional database
            ctx.shards,
            ctx.io,
            ctx.clock,
            node_id=ctx.node_id,
            grace=float(ctx.config.worker.gc_grace),
        )

    async def run_once(self) -> OrphanReport:
        """
        One pass over every local shard file.
        """
        report = OrphanReport()
        if not await self._contents.any():
            # A regional database without a single content while this node
            # holds shard files is far more likely the wrong (or a freshly
            # restored, empty) database than a region whose every object
            # was deleted: never empty the disks on its word.
            first = await self._io.run(self._stat_page, "")
            if first:
                report.files_checked = len(first)
                report.skipped = True
                self._log.warn(
                    "The regional database records no content at all but {path} holds shard files; "
                    "orphan collection is skipped (check the database this node uses)",
                    path=first[0][3],
                )
            return report
        after = ""
        while True:
            page = await self._io.run(self._stat_page, after)
            if not page:
                break
            report.files_checked += len(page)
            rows = await self._contents.get_many({entry[0] for entry in page})
            cutoff = self._clock.seconds() - self._grace
            doomed = []
            for hash_hex, index, path, data_dir, stat in page:
                if stat is None:
                    continue
                row = rows.get(hash_hex)
                if row is not None and self._named(row.record, index):
                    continue
                if stat[1] > cutoff:
                    report.young_orphans += 1
                    continue
                doomed.append((path, data_dir, stat))
            if doomed:
                removed, freed, errors = await self._io.run(self._remove, doomed)
                report.orphans_removed += removed
                report.bytes_freed += freed
                report.errors += errors
            if len(page) < self._page:
                break
            after = shard_cursor(page[-1][0], page[-1][1])
        if report.orphans_removed or report.errors:
            self._log.info(
                "Orphan collection: {removed} orphan shard files removed ({freed} bytes), {young} younger "
                "than the grace period, {errors} errors",
                removed=report.orphans_removed, freed=report.bytes_freed, young=report.young_orphans,
                errors=report.errors,
            )
        return report

    def _named(self, content: ContentRecord, index: int) -> bool:
        """
        Whether the content's shard map names this node for C{index}.
        """
        if content.inline_data is not None:
            return False
        try:
            target = ShardMap.from_json(content.shard_map).target(index)
        except InvalidShardMap:
            # Not understood: never remove what might be referenced.
            return True
        return target is not None and target.node == self._node_id

    def _stat_page(self, after: str) -> list[tuple[str, int, str, str, tuple[int, float, int] | None]]:
        """
        One page of local shard files with their inode, modification time
        and size (in the I/O pool); C{None} for a file gone meanwhile.
        """
        found = []
        for location, _ in self._shards.list_page(after, self._page):
            try:
                st = os.stat(location.path)
                stat: tuple[int, float, int] | None = (st.st_ino, st.st_mtime, st.st_size)
            except FileNotFoundError:
                stat = None
            found.append((location.content_hash.hex(), location.shard_index, location.path, location.data_dir, stat))
        return found

    def _remove(self, doomed: list[tuple[str, str, tuple[int, float, int]]]) -> tuple[int, int, int]:
        """
        Remove orphan files, each only if it is still the inode judged (in
        the I/O pool).  The file is first renamed into its data directory's
        C{tmp/} (same file system) under a temporary name, so that a crash
        right then leaves a temporary the collector's temporary clean-up
        removes, not a stray file.

        @return: files removed, bytes freed, errors.
        """
        removed = freed = errors = 0
        for path, data_dir, (inode, _, size) in doomed:
            aside = os.path.join(data_dir, "tmp", f"orphan-{secrets.token_hex(8)}.tmp")
            try:
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            except OSError:
                errors += 1
                continue
            try:
                if os.stat(aside).st_ino == inode:
                    os.unlink(aside)
                    removed += 1
                    freed += size
                    continue
                # A new shard was committed at this path after the check:
                # put it back (unless yet another one took the name).
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.unlink(aside)
            except OSError:
                errors += 1
        return removed, freed, errors
