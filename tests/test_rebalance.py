# -*- test-case-name: tests.test_rebalance -*-
"""
Tests for L{anvil.worker.rebalance}: the move planning against
L{anvil.storage.placement.assign}, and passes of L{Rebalancer} over
in-memory contents, a recording engine and a simulated clock.  The real
multi-node path is in L{tests.integration.test_rebalance}.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.meta.records import ContentRecord
from anvil.metrics import Metrics
from anvil.storage.placement import NoPlacement, ShardMap, ShardTarget, assign
from anvil.worker.rebalance import RebalanceReport, Rebalancer, plan_moves, shard_bytes

K, M = 4, 2
TOTAL = K + M
STRIPE = 1024 * 1024
OLD = [f"node-{i}" for i in range(4)]
NEW = OLD + ["node-4", "node-5"]


def key_of(n: int) -> bytes:
    """A placement key."""
    return hashlib.sha256(b"key %d" % n).digest()


def hash_of(n: int) -> str:
    """A content hash, in the order of C{n}."""
    return f"{n:064x}"


def placed(key: bytes, nodes: Sequence[str], total: int = TOTAL) -> ShardMap:
    """The map a write with C{nodes} alive records."""
    return ShardMap(
        tuple(ShardTarget(i, n, f"/srv/{n}") for i, n in enumerate(assign(key, nodes, total))), key.hex()
    )


def counts(shard_map: ShardMap) -> Counter[str]:
    """Shards per node."""
    return Counter(t.node for t in shard_map.targets)


def apply(shard_map: ShardMap, moves: Mapping[int, tuple[str, str]]) -> ShardMap:
    """The map after C{moves}."""
    targets = list(shard_map.targets)
    for index, (old, new) in moves.items():
        assert targets[index].node == old
        targets[index] = ShardTarget(index, new, f"/srv/{new}")
    return ShardMap(tuple(targets), shard_map.key)


def content(n: int, shard_map: ShardMap, size: int = 3 * STRIPE + 5) -> ContentRecord:
    """A sharded content record."""
    return ContentRecord(hash_of(n), size, K, M, STRIPE, shard_map.to_json())


class PlanTests(SynchronousTestCase):
    """
    L{plan_moves}: node counts match C{assign} afterwards, with as few moves
    as possible, and nothing moves off members that are not alive.
    """

    def test_balanced(self) -> None:
        """
        A map written with the same members alive needs no move.
        """
        for n in range(50):
            self.assertEqual(plan_moves(placed(key_of(n), NEW), NEW, TOTAL), {})

    def test_members_joined(self) -> None:
        """
        After two members join a four-node region, shards move only from
        nodes holding two to the newcomers, and the counts become those of
        the six-node placement.
        """
        moved = 0
        for n in range(200):
            before = placed(key_of(n), OLD)
            moves = plan_moves(before, NEW, TOTAL)
            after = apply(before, moves)
            self.assertEqual(counts(after), Counter(assign(key_of(n), NEW, TOTAL)))
            for index, (old, new) in moves.items():
                self.assertIn(new, ("node-4", "node-5"))
                self.assertEqual(counts(before)[old], 2, f"{old} held one shard only")
            moved += len(moves)
            # Six nodes and six shards: one each.
            self.assertEqual(set(counts(after).values()), {1})
        self.assertEqual(moved, 200 * 2)

    def test_own_index_preferred(self) -> None:
        """
        A shard moves to the node C{assign} gives its own index when that
        node is short, so the result is C{assign}'s own map where it can be.
        """
        exact = 0
        for n in range(100):
            before = placed(key_of(n), OLD)
            after = apply(before, plan_moves(before, NEW, TOTAL))
            exact += [t.node for t in after.targets] == assign(key_of(n), NEW, TOTAL)
        self.assertGreater(exact, 0)

    def test_minimal(self) -> None:
        """
        For random memberships, the number of moves is the number of shards
        above each node's count, and the result has C{assign}'s counts
        whenever every entry is on an alive member.
        """
        rng = random.Random(5)
        pool = [f"n{i}" for i in range(12)]
        for n in range(300):
            total = rng.choice([3, 6, 9])
            before_nodes = rng.sample(pool, rng.randint(1, 8))
            alive = sorted(set(before_nodes) | set(rng.sample(pool, rng.randint(0, 4))))
            before = placed(key_of(n), before_nodes, total)
            moves = plan_moves(before, alive, total)
            want = Counter(assign(key_of(n), alive, total))
            excess = sum(max(0, c - want[node]) for node, c in counts(before).items())
            self.assertEqual(len(moves), excess)
            self.assertEqual(counts(apply(before, moves)), want)

    def test_members_gone(self) -> None:
        """
        Members that are not alive (down, or removed) move nothing: their
        entries stay for repair, and no alive node ends up with too many.
        """
        for n in range(100):
            before = placed(key_of(n), NEW)
            self.assertEqual(plan_moves(before, NEW[:4], TOTAL), {})
            self.assertEqual(plan_moves(before, NEW[1:], TOTAL), {})

    def test_dead_entries_left_alone(self) -> None:
        """
        With a member down and others joined, the down member's entries do
        not move; the others' surplus does.
        """
        for n in range(100):
            before = placed(key_of(n), OLD)
            alive = [x for x in NEW if x != "node-0"]
            moves = plan_moves(before, alive, TOTAL)
            self.assertNotIn("node-0", [old for old, _ in moves.values()])
            self.assertNotIn("node-0", [new for _, new in moves.values()])
            for index in moves:
                self.assertNotEqual(before.targets[index].node, "node-0")

    def test_unplaceable(self) -> None:
        """
        A map without a placement key or of another size moves nothing; no
        alive member raises L{NoPlacement}.
        """
        before = placed(key_of(1), OLD)
        self.assertEqual(plan_moves(ShardMap(before.targets, ""), NEW, TOTAL), {})
        self.assertEqual(plan_moves(before, NEW, TOTAL + 1), {})
        self.assertRaises(NoPlacement, plan_moves, before, [], TOTAL)

    def test_shard_bytes(self) -> None:
        """
        A shard holds C{ceil(stripe / k)} bytes per stripe.
        """
        self.assertEqual(shard_bytes(ContentRecord("a" * 64, 0, 4, 2, 1024)), 0)
        self.assertEqual(shard_bytes(ContentRecord("a" * 64, 1024, 4, 2, 1024)), 256)
        self.assertEqual(shard_bytes(ContentRecord("a" * 64, 2 * 1024 + 5, 4, 2, 1024)), 512 + 2)


class FakeContents:
    """
    The region's contents in memory, with the compare-and-set of
    L{anvil.meta.contents.ContentStore}.

    @ivar before_cas: called with the hash before each compare-and-set (a
        test changes the map there to lose the race).
    """

    def __init__(self, records: Sequence[ContentRecord]) -> None:
        self.rows = {r.hash: r for r in records}
        self.before_cas: Any = None
        self.pages: list[str] = []

    def map(self, content_hash: str) -> ShardMap:
        """The current map of a content."""
        return ShardMap.from_json(self.rows[content_hash].shard_map)

    def set_map(self, content_hash: str, shard_map: ShardMap) -> None:
        """Replace a content's map."""
        row = self.rows[content_hash]
        self.rows[content_hash] = ContentRecord(
            row.hash, row.size, row.k, row.m, row.stripe_size, shard_map.to_json()
        )

    def page(self, after: str = "", limit: int = 500) -> Deferred[list[ContentRecord]]:
        """Contents after C{after}, in hash order."""
        self.pages.append(after)
        return succeed([self.rows[h] for h in sorted(self.rows) if h > after][:limit])

    def get(self, content_hash: str) -> Deferred[ContentRecord | None]:
        """One content."""
        return succeed(self.rows.get(content_hash))

    def replace_shard_targets(
        self, content_hash: str, changes: Mapping[int, tuple[str, ShardTarget]]
    ) -> Deferred[bool]:
        """All named entries still name their old node, or nothing changes."""
        if self.before_cas is not None:
            self.before_cas(content_hash)
        current = self.map(content_hash)
        if any(current.targets[i].node != old for i, (old, _) in changes.items()):
            return succeed(False)
        targets = list(current.targets)
        for index, (_, target) in changes.items():
            targets[index] = target
        self.set_map(content_hash, ShardMap(tuple(targets), current.key))
        return succeed(True)


class FakeShards:
    """The local shard store's delete."""

    def __init__(self) -> None:
        self.deleted: list[tuple[bytes, int]] = []

    def delete(self, digest: bytes, index: int) -> bool:
        """Record a local delete."""
        self.deleted.append((digest, index))
        return True


class FakePeers:
    """The peer client's delete_shard."""

    def __init__(self) -> None:
        self.deleted: list[tuple[str, bytes, int]] = []

    def delete_shard(self, addr: str, digest: bytes, index: int) -> Deferred[bool]:
        """Record a remote delete."""
        self.deleted.append((addr, digest, index))
        return succeed(True)


class FakeEngine:
    """
    Records rebuilds; nodes in C{down} fail as rebuild targets and cannot
    be addressed; C{unavailable} contents raise.
    """

    def __init__(self) -> None:
        self.rebuilds: list[tuple[str, dict[int, str]]] = []
        self.down: set[str] = set()
        self.unavailable: set[str] = set()
        self.shards = FakeShards()
        self.peers = FakePeers()

    def address(self, node: str) -> str | None:
        """A peer's address unless it is down."""
        return None if node in self.down else f"{node}:7443"

    async def rebuild(self, content: ContentRecord, targets: Mapping[int, str]) -> dict[int, ShardTarget]:
        """Pretend to write the shards."""
        if content.hash in self.unavailable:
            raise RuntimeError("fewer than k shards")
        self.rebuilds.append((content.hash, dict(targets)))
        return {i: ShardTarget(i, n, f"/new/{n}") for i, n in targets.items() if n not in self.down}


class FakeIO:
    """An I/O pool running the function at once."""

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        """Call C{fn}."""
        return succeed(fn(*args))


class _PassFixture(SynchronousTestCase):
    """
    Twenty-five contents written on four nodes, six alive now, and the
    fakes a L{Rebalancer} works on.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics()
        self.engine = FakeEngine()
        self.alive: list[str] = list(NEW)
        self.repairs = 0
        self.records = [content(n, placed(key_of(n), OLD)) for n in range(25)]
        self.contents = FakeContents(self.records)

    def rebalancer(self, node_id: str = "node-1", **kwargs: Any) -> Rebalancer:
        """A rebalancer of C{node_id} over the fakes."""

        async def alive() -> list[str]:
            return list(self.alive)

        async def repairs() -> int:
            return self.repairs

        options: dict[str, Any] = {"page_size": 10, "rate_bytes": 1e12}
        options.update(kwargs)
        return Rebalancer(
            self.contents,
            self.engine,
            node_id,
            alive,
            self.metrics,
            self.clock,
            io=FakeIO(),
            repairs_pending=repairs,
            **options,
        )

    def one_pass(self, rebalancer: Rebalancer) -> RebalanceReport:
        """Run one pass to its end."""
        report: RebalanceReport = self.successResultOf(Deferred.fromCoroutine(rebalancer.run_once()))
        return report

    def metric(self, name: str) -> float:
        """A counter's value."""
        return self.metrics.registry.get_sample_value(name) or 0.0

class RebalancerTests(_PassFixture):
    """
    Passes of L{Rebalancer} over fakes.
    """

    def test_moves_towards_placement(self) -> None:
        """
        A pass rebuilds each surplus shard on its new node, records it,
        deletes the old file (on the peer, or locally for this node's own),
        counts the moves and their bytes, and leaves every map with the
        six-node placement's counts.
        """
        report = self.one_pass(self.rebalancer())
        self.assertTrue(report.complete)
        self.assertEqual((report.contents_checked, report.contents_moved), (25, 25))
        self.assertEqual(report.moves, 50)
        self.assertEqual(report.moved_bytes, 50 * shard_bytes(self.records[0]))
        self.assertEqual((report.failed, report.conflicts, report.old_left), (0, 0, 0))
        self.assertEqual(self.metric("anvil_rebalance_moves_total"), 50)
        self.assertEqual(self.metric("anvil_rebalance_moved_bytes_total"), report.moved_bytes)
        self.assertEqual(self.contents.pages, ["", hash_of(9), hash_of(19)])
        deletes = [(a.split(":")[0], d.hex(), i) for a, d, i in self.engine.peers.deleted]
        deletes += [("node-1", d.hex(), i) for d, i in self.engine.shards.deleted]
        expected = []
        for n, record in enumerate(self.records):
            before = ShardMap.from_json(record.shard_map)
            after = self.contents.map(record.hash)
            self.assertEqual(counts(after), Counter(assign(key_of(n), NEW, TOTAL)))
            for t_before, t_after in zip(before.targets, after.targets):
                if t_before.node != t_after.node:
                    self.assertEqual(t_after.dir, f"/new/{t_after.node}")
                    expected.append((t_before.node, record.hash, t_before.index))
        self.assertEqual(sorted(deletes), sorted(expected))
        self.assertTrue(self.engine.shards.deleted, "node-1 gave up shards of its own")
        # A second pass finds nothing to do.
        again = self.one_pass(self.rebalancer())
        self.assertEqual((again.contents_checked, again.moves), (25, 0))

    def test_target_down(self) -> None:
        """
        A shard whose new node fails is counted as failed and stays where it
        was (its old file too); the content's other moves go ahead.
        """
        self.engine.down.add("node-5")
        report = self.one_pass(self.rebalancer())
        self.assertGreater(report.failed, 0)
        self.assertEqual(report.moves + report.failed, 50)
        for record in self.records:
            after = self.contents.map(record.hash)
            self.assertNotIn("node-5", after.nodes())
        deleted = {(d.hex(), i) for _, d, i in self.engine.peers.deleted} | {
            (d.hex(), i) for d, i in self.engine.shards.deleted
        }
        self.assertEqual(len(deleted), report.moves)

    def test_content_unavailable(self) -> None:
        """
        A content that cannot be read fails its moves, with the error in
        the report; the pass goes on.
        """
        self.engine.unavailable.add(hash_of(3))
        report = self.one_pass(self.rebalancer())
        self.assertEqual(report.failed, 2)
        self.assertEqual(report.moves, 48)
        self.assertIn(hash_of(3), report.errors[0])
        self.assertEqual(self.contents.map(hash_of(3)), ShardMap.from_json(self.records[3].shard_map))

    def test_conflict(self) -> None:
        """
        When the map changes between the rebuild and the compare-and-set,
        nothing is recorded or deleted for that content.
        """
        raced = hash_of(7)
        original = ShardMap.from_json(self.records[7].shard_map)
        moved = min(plan_moves(original, NEW, TOTAL))
        # A repair rebuilt one of the shards the pass moves elsewhere.
        repaired = ShardMap(
            tuple(ShardTarget(t.index, "node-9", "/x") if t.index == moved else t for t in original.targets),
            original.key,
        )

        def race(content_hash: str) -> None:
            if content_hash == raced:
                self.contents.set_map(raced, repaired)

        self.contents.before_cas = race
        report = self.one_pass(self.rebalancer())
        self.assertEqual(report.conflicts, 1)
        self.assertEqual(report.moves, 48)
        self.assertEqual(self.contents.map(raced), repaired)
        self.assertNotIn(raced, {d.hex() for _, d, _ in self.engine.peers.deleted})
        self.assertNotIn(raced, {d.hex() for d, _ in self.engine.shards.deleted})

    def test_old_named_again(self) -> None:
        """
        An old file that the map names again by the time it would be deleted
        (another mover moved it back) is kept.
        """
        target = hash_of(4)
        original = ShardMap.from_json(self.records[4].shard_map)
        contents = self.contents
        real = contents.replace_shard_targets

        def cas_then_revert(content_hash: str, changes: Mapping[int, tuple[str, ShardTarget]]) -> Deferred[bool]:
            result = real(content_hash, changes)
            if content_hash == target:
                contents.set_map(target, original)
            return result

        contents.replace_shard_targets = cas_then_revert  # type: ignore[method-assign]
        report = self.one_pass(self.rebalancer())
        self.assertEqual(report.old_left, 2)
        self.assertNotIn(target, {d.hex() for _, d, _ in self.engine.peers.deleted})
        self.assertNotIn(target, {d.hex() for d, _ in self.engine.shards.deleted})

    def test_map_unreadable_after_move(self) -> None:
        """
        When the map cannot be read again before deleting, the old files are
        kept (counted) and the pass goes on.
        """
        contents = self.contents
        real_get = contents.get

        def get(content_hash: str) -> Deferred[ContentRecord | None]:
            if content_hash == hash_of(2):
                raise ConnectionError("database gone for a moment")
            return real_get(content_hash)

        contents.get = get  # type: ignore[method-assign]
        report = self.one_pass(self.rebalancer())
        self.assertTrue(report.complete)
        self.assertEqual((report.moves, report.old_left), (50, 2))
        self.assertNotIn(hash_of(2), {d.hex() for _, d, _ in self.engine.peers.deleted})
        self.assertNotIn(hash_of(2), {d.hex() for d, _ in self.engine.shards.deleted})

    def test_old_node_unreachable(self) -> None:
        """
        An old shard whose node cannot be asked is left (for the orphan
        collector) and counted; the move still counts.
        """
        self.alive = list(NEW)
        # node-0 is alive for placement but its address is unknown.
        self.engine.address = lambda node: None if node == "node-0" else f"{node}:7443"  # type: ignore[method-assign]
        report = self.one_pass(self.rebalancer())
        self.assertEqual(report.moves, 50)
        self.assertGreater(report.old_left, 0)
        self.assertNotIn("node-0", {a.split(":")[0] for a, _, _ in self.engine.peers.deleted})

    def test_repairs_first(self) -> None:
        """
        With repairs pending a pass does nothing and says so; repairs that
        appear during a pass stop it at the next page.
        """
        self.repairs = 3
        report = self.one_pass(self.rebalancer())
        self.assertEqual(report.skipped, "3 repair tasks pending")
        self.assertEqual((report.contents_checked, self.engine.rebuilds), (0, []))

        self.repairs = 0
        contents = self.contents
        real_page = contents.page

        def page(after: str = "", limit: int = 500) -> Deferred[list[ContentRecord]]:
            self.repairs = 1
            return real_page(after, limit)

        contents.page = page  # type: ignore[method-assign]
        report = self.one_pass(self.rebalancer())
        self.assertEqual(report.skipped, "1 repair tasks pending")
        self.assertFalse(report.complete)
        self.assertEqual(report.contents_checked, 10)

    def test_paced(self) -> None:
        """
        A pass reads and writes at most C{rate_bytes} per second: it sleeps
        on the clock between contents, and finishes once the time has
        passed.
        """
        self.contents = FakeContents(self.records[:3])
        size = self.records[0].size + 2 * shard_bytes(self.records[0])
        d = Deferred.fromCoroutine(self.rebalancer(rate_bytes=size).run_once())
        self.assertNoResult(d)
        self.assertEqual(len(self.engine.rebuilds), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.engine.rebuilds), 2)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        report = self.successResultOf(d)
        self.assertEqual(report.moves, 6)

    def test_interrupt(self) -> None:
        """
        Interrupting a pass that sleeps towards its rate ends it at once,
        incomplete.
        """
        rebalancer = self.rebalancer(rate_bytes=1000.0)
        d = Deferred.fromCoroutine(rebalancer.run_once())
        self.assertNoResult(d)
        rebalancer.interrupt()
        report = self.successResultOf(d)
        self.assertEqual(report.skipped, "stopped")
        self.assertFalse(report.complete)
        self.assertEqual(report.contents_checked, 1)

    def test_membership_changes_during_pass(self) -> None:
        """
        Members joining during a pass are used from the next page on.
        """
        self.alive = list(OLD)
        contents = self.contents
        real_page = contents.page

        def page(after: str = "", limit: int = 500) -> Deferred[list[ContentRecord]]:
            if after:
                self.alive = list(NEW)
            return real_page(after, limit)

        contents.page = page  # type: ignore[method-assign]
        report = self.one_pass(self.rebalancer())
        self.assertTrue(report.complete)
        self.assertEqual(report.moves, 30)
        self.assertEqual(report.members, 6)
        for record in self.records[:10]:
            self.assertEqual(self.contents.map(record.hash), ShardMap.from_json(record.shard_map))


class DaemonTests(_PassFixture):
    """
    The daemon's rules on top of the passes: one rebalancer per region,
    passes after membership changes once they have settled.
    """

    def daemon(self, node_id: str = "node-0") -> Rebalancer:
        """The region's rebalancer (node-0 is the smallest id)."""
        return self.rebalancer(node_id, daemon=True, settle=60.0, retry_after=600.0)

    def test_not_the_rebalancer(self) -> None:
        """
        Only the alive member with the smallest id does passes.
        """
        report = self.one_pass(self.rebalancer("node-1", daemon=True, settle=0.0))
        self.assertEqual(report.skipped, "not the region's rebalancer")
        self.assertEqual(self.engine.rebuilds, [])
        self.alive.remove("node-0")
        report = self.one_pass(self.rebalancer("node-1", daemon=True, settle=0.0))
        self.assertIsNone(report.skipped)
        self.assertTrue(report.complete)

    def test_settle_then_pass_then_unchanged(self) -> None:
        """
        The first pass waits until the membership has been the same for the
        settle time; after a complete pass, nothing happens until the
        membership changes (and settles again).
        """
        daemon = self.daemon()
        self.assertEqual(self.one_pass(daemon).skipped, "membership changed recently")
        self.clock.advance(30)
        self.assertEqual(self.one_pass(daemon).skipped, "membership changed recently")
        self.clock.advance(30)
        report = self.one_pass(daemon)
        self.assertTrue(report.complete)
        self.assertEqual(report.moves, 50)
        self.clock.advance(30)
        self.assertEqual(self.one_pass(daemon).skipped, "membership unchanged")
        self.alive.append("node-6")
        self.assertEqual(self.one_pass(daemon).skipped, "membership changed recently")
        self.clock.advance(60)
        report = self.one_pass(daemon)
        self.assertTrue(report.complete)
        self.assertGreater(report.moves, 0)

    def test_retry_after_undone_moves(self) -> None:
        """
        A pass that left moves undone runs again after C{retry_after}
        without a membership change.
        """
        daemon = self.daemon()
        self.engine.down.add("node-5")
        self.clock.advance(60)
        self.one_pass(daemon)
        self.clock.advance(60)
        first = self.one_pass(daemon)
        self.assertGreater(first.failed, 0)
        self.clock.advance(60)
        self.assertEqual(self.one_pass(daemon).skipped, "membership unchanged")
        self.engine.down.clear()
        self.clock.advance(600)
        second = self.one_pass(daemon)
        self.assertEqual(second.moves, first.failed)
        self.assertEqual(second.failed, 0)


class NodeContextTests(TestCase):
    """
    The C{rebalance} worker built by the node's registry over a real S3
    stack (one node, real PostgreSQL): the content pages, the task-queue
    check and the summary.
    """

    async def setUp(self) -> None:
        from tests.s3fixture import S3Stack

        self.stack = await S3Stack.start(self, stripe_size=16 * 1024)

    def context(self, paced: bool = False) -> Any:
        """The worker context of the stack's node ("local")."""
        from twisted.internet import reactor

        from anvil.cluster.membership import Member, Membership
        from anvil.worker.tasks import WorkerContext

        stack = self.stack
        return WorkerContext(
            config=stack.config,
            clock=reactor,
            node_id="local",
            metrics=stack.metrics,
            io=stack.io,
            global_db=stack.global_db,
            s3=stack.service,
            membership=Membership(Member("local", stack.region, "http://a", "a:7443")),
            paced=paced,
        )

    async def test_run_once(self) -> None:
        """
        C{run_once("rebalance")} checks every sharded content (inline ones
        have no shards) and, the node being alone, moves nothing; a due
        repair task holds the pass back, one backing off does not, nor
        another region's; a due member_down check does.
        """
        from anvil.worker.tasks import REGISTRY

        client = self.stack.client(await self.stack.create_app("acme", "web"))
        await self.stack.call(client.create_bucket, Bucket="bkt")
        for n in range(3):
            await self.stack.call(client.put_object, Bucket="bkt", Key=f"k{n}", Body=os.urandom(70_000 + n))
        await self.stack.call(client.put_object, Bucket="bkt", Key="small", Body=b"inline")

        summary = await REGISTRY.run_once("rebalance", self.context())
        self.assertEqual(
            {k: summary[k] for k in ("complete", "members", "contents_checked", "moves", "unplaced")},
            {"complete": True, "members": 1, "contents_checked": 3, "moves": 0, "unplaced": 0},
        )
        self.assertNotIn("skipped", summary)

        ctx = self.context()
        task_id = await ctx.queue.enqueue("repair", {"content_hash": "ab" * 32}, region=self.stack.region)
        summary = await REGISTRY.run_once("rebalance", ctx)
        self.assertEqual((summary["skipped"], summary["contents_checked"]), ("1 repair tasks pending", 0))

        # Backing off after a failure: not due, so rebalancing goes on.
        later = datetime.now(UTC) + timedelta(hours=1)
        await self.stack.global_db.run_query(
            "UPDATE tasks SET run_after = %s WHERE id = %s RETURNING id", (later, task_id)
        )
        # Another region's evacuation, and a member_down check not due yet.
        await ctx.queue.enqueue("evacuate", {"node_id": "x"}, region="elsewhere")
        down = await ctx.queue.enqueue("member_down", {"node_id": "y"}, region=self.stack.region, run_after=later)
        summary = await REGISTRY.run_once("rebalance", self.context())
        self.assertEqual((summary.get("skipped"), summary["contents_checked"]), (None, 3))

        # Once due, the member_down check may become an evacuation: wait.
        await self.stack.global_db.run_query(
            "UPDATE tasks SET run_after = %s WHERE id = %s RETURNING id", (datetime.now(UTC), down)
        )
        summary = await REGISTRY.run_once("rebalance", self.context())
        self.assertEqual(summary["skipped"], "1 repair tasks pending")
