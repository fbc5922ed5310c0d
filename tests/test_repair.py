# -*- test-case-name: tests.test_repair -*-
"""
Tests for L{anvil.meta.contents} and L{anvil.worker.repair} against a real
PostgreSQL and a real storage engine (one node holding every shard, other
members simulated in the membership the repairer is given).
"""

from __future__ import annotations

import os
from typing import Any

from psycopg2.extras import Json
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.cluster.membership import Member, MemberState
from anvil.errors import InvalidArgument
from anvil.meta.contents import ContentStore
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.records import ContentRecord
from anvil.storage.placement import ShardMap, ShardTarget, assign
from anvil.worker.queue import TaskQueue
from anvil.worker.repair import (
    ClusterAccess,
    ContentLost,
    RepairBacklog,
    RepairError,
    Repairer,
    shard_bytes,
)
from tests.pg import fresh_database
from tests.s3fixture import S3Stack
from tests.test_scrub import flip_byte

HASH_A = "a" * 64
HASH_B = "b" * 64
HASH_C = "c" * 64


def shard_map(nodes: list[str], key: str = "") -> dict[str, Any]:
    """
    A shard map document naming C{nodes[i]} for shard I{i}.
    """
    return ShardMap(tuple(ShardTarget(i, n, f"/d{i}") for i, n in enumerate(nodes)), key).to_json()


async def insert_content(
    db: Database, content_hash: str, shard_map: dict[str, Any], inline: bytes | None = None, size: int = 10
) -> None:
    """
    Insert one content row.
    """
    await db.run_operation(
        "INSERT INTO contents (hash, size, k, m, stripe_size, shard_map, inline_data, refcount)"
        " VALUES (%s, %s, 4, 2, 65536, %s, %s, 1)",
        (content_hash, size, Json(shard_map), inline),
    )


class ContentStoreTests(TestCase):
    """
    L{ContentStore} queries and its compare-and-set.
    """

    async def setUp(self) -> None:
        self.dsn = fresh_database(self, "c")
        self.db = await Database.connect(self.dsn, reactor, pool_size=4)
        self.addCleanup(self.db.close)
        await apply_migrations(self.db, "regional")
        self.store = ContentStore(self.db)

    async def test_get(self) -> None:
        """
        C{get} returns the content's record, or L{None} when there is none.
        """
        await insert_content(self.db, HASH_A, shard_map(["n1"] * 6, "ab"))
        record = await self.store.get(HASH_A)
        assert record is not None
        self.assertEqual((record.hash, record.size, record.k, record.m), (HASH_A, 10, 4, 2))
        self.assertEqual(record.shard_map, shard_map(["n1"] * 6, "ab"))
        self.assertIsNone(await self.store.get(HASH_B))
        with self.assertRaises(InvalidArgument):
            await self.store.get("nope")

    async def test_page_skips_inline_and_pages_by_hash(self) -> None:
        """
        C{page} lists contents with shards in hash order from a cursor,
        never inline ones.
        """
        await insert_content(self.db, HASH_C, shard_map(["n1"] * 6))
        await insert_content(self.db, HASH_A, shard_map(["n1"] * 6))
        await insert_content(self.db, HASH_B, {}, inline=b"x" * 10)
        await insert_content(self.db, "d" * 64, {"version": 1, "shards": []})
        first = await self.store.page("", 1)
        self.assertEqual([c.hash for c in first], [HASH_A])
        rest = await self.store.page(first[-1].hash, 10)
        self.assertEqual([c.hash for c in rest], [HASH_C])
        from datetime import UTC, datetime

        self.assertEqual(await self.store.page("", 10, created_before=datetime(2000, 1, 1, tzinfo=UTC)), [])

    async def test_with_shards_on(self) -> None:
        """
        C{with_shards_on} pages through the contents whose map names the
        node for any shard.
        """
        await insert_content(self.db, HASH_A, shard_map(["n1", "n2", "n3", "n1", "n2", "n3"]))
        await insert_content(self.db, HASH_B, shard_map(["n4"] * 6))
        await insert_content(self.db, HASH_C, shard_map(["n4", "n4", "n4", "n4", "n4", "n2"]))
        self.assertEqual([c.hash for c in await self.store.with_shards_on("n2")], [HASH_A, HASH_C])
        self.assertEqual([c.hash for c in await self.store.with_shards_on("n2", HASH_A, 5)], [HASH_C])
        self.assertEqual([c.hash for c in await self.store.with_shards_on("n2", "", 1)], [HASH_A])
        self.assertEqual(await self.store.with_shards_on("n9"), [])

    async def test_get_many(self) -> None:
        """
        C{get_many} returns the existing contents among the hashes asked for.
        """
        await insert_content(self.db, HASH_A, shard_map(["n1"] * 6))
        found = await self.store.get_many([HASH_A, HASH_B])
        self.assertEqual(list(found), [HASH_A])
        self.assertEqual(found[HASH_A].record.hash, HASH_A)
        self.assertEqual(await self.store.get_many([]), {})

    async def test_replace_changes_only_named_entries(self) -> None:
        """
        A successful compare-and-set replaces the named entries and keeps the
        rest of the stored map (version, key, other entries).
        """
        await insert_content(self.db, HASH_A, shard_map(["n1", "n2", "", "n4", "n5", "n6"], "feed"))
        changed = await self.store.replace_shard_targets(
            HASH_A, {1: ("n2", ShardTarget(1, "n7", "/x")), 2: ("", ShardTarget(2, "n8", "/y"))}
        )
        self.assertTrue(changed)
        record = await self.store.get(HASH_A)
        assert record is not None
        parsed = ShardMap.from_json(record.shard_map)
        self.assertEqual([t.node for t in parsed.targets], ["n1", "n7", "n8", "n4", "n5", "n6"])
        self.assertEqual((parsed.key, parsed.targets[1].dir), ("feed", "/x"))

    async def test_replace_refused_when_an_entry_moved(self) -> None:
        """
        When any named entry no longer names its old node, nothing changes;
        a missing row or an entry beyond the map is refused as well.
        """
        nodes = ["n1", "n2", "n3", "n4", "n5", "n6"]
        await insert_content(self.db, HASH_A, shard_map(nodes))
        changed = await self.store.replace_shard_targets(
            HASH_A, {0: ("n1", ShardTarget(0, "n7", "")), 1: ("n9", ShardTarget(1, "n8", ""))}
        )
        self.assertFalse(changed)
        record = await self.store.get(HASH_A)
        assert record is not None
        self.assertEqual([t.node for t in ShardMap.from_json(record.shard_map).targets], nodes)
        self.assertFalse(await self.store.replace_shard_targets(HASH_B, {0: ("n1", ShardTarget(0, "n7", ""))}))
        self.assertFalse(await self.store.replace_shard_targets(HASH_A, {9: ("n1", ShardTarget(9, "n7", ""))}))
        with self.assertRaises(InvalidArgument):
            await self.store.replace_shard_targets(HASH_A, {0: ("n1", ShardTarget(1, "n7", ""))})
        with self.assertRaises(InvalidArgument):
            await self.store.replace_shard_targets(HASH_A, {})

    async def test_concurrent_replacements_one_wins(self) -> None:
        """
        Two compare-and-sets of the same entry from the same old node, run
        at once on two connections, cannot both win: exactly one does and
        the map holds its target.
        """
        await insert_content(self.db, HASH_A, shard_map(["dead"] * 6))
        other = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(other.close)
        results = await gatherResults(
            [
                Deferred.fromCoroutine(
                    ContentStore(db).replace_shard_targets(HASH_A, {3: ("dead", ShardTarget(3, node, ""))})
                )
                for db, node in ((self.db, "x"), (other, "y"))
                for _ in range(5)
            ]
        )
        self.assertEqual(sum(results), 1)
        record = await self.store.get(HASH_A)
        assert record is not None
        winner = ShardMap.from_json(record.shard_map).targets[3].node
        self.assertIn(winner, ("x", "y"))


class ShardBytesTests(SynchronousTestCase):
    """
    L{shard_bytes}.
    """

    def test_block_bytes(self) -> None:
        """
        A shard holds a block of every stripe: full stripes' blocks plus the
        last, shorter stripe's block rounded up.
        """
        content = ContentRecord(HASH_A, 2 * 4096 + 10, 4, 2, 4096)
        self.assertEqual(shard_bytes(content), 2 * 1024 + 3)
        self.assertEqual(shard_bytes(ContentRecord(HASH_A, 0, 4, 2, 4096)), 0)


def member(node_id: str, state: MemberState = MemberState.ALIVE, region: str = "us-east-1") -> Member:
    """
    A member record for tests.
    """
    return Member(node_id, region, f"http://{node_id}", f"{node_id}:7443", state=state)


class ChooseTests(SynchronousTestCase):
    """
    L{Repairer.choose}: where rebuilt shards go.
    """

    def setUp(self) -> None:
        self.repairer = Repairer(None, None, None, None, None, None, None, "us-east-1")  # type: ignore[arg-type]

    def test_ideal_node_when_free(self) -> None:
        """
        With enough candidates, a shard goes to the node the placement would
        give it when that node holds no shard of the content, else to a node
        holding none.
        """
        key = "00ff"
        candidates = [f"n{i}" for i in range(8)]
        ideal = assign(bytes.fromhex(key), candidates, 6)
        nodes = list(ideal)
        nodes[2] = "gone"
        content = ContentRecord(HASH_A, 100, 4, 2, 4096, shard_map(nodes, key))
        chosen = self.repairer.choose(content, ShardMap.from_json(content.shard_map), {2: "x"}, candidates)
        self.assertEqual(chosen, {2: ideal[2]})
        # The ideal node of shard 2 already holds shard 0: another, empty node.
        nodes[0] = ideal[2]
        content = ContentRecord(HASH_A, 100, 4, 2, 4096, shard_map(nodes, key))
        chosen = self.repairer.choose(content, ShardMap.from_json(content.shard_map), {2: "x"}, candidates)
        self.assertNotIn(chosen[2], nodes)

    def test_wraps_onto_least_loaded(self) -> None:
        """
        With fewer candidates than shards, rebuilt shards go to the least
        loaded candidates, never to a non-candidate.
        """
        content = ContentRecord(HASH_A, 100, 4, 2, 4096, shard_map(["a", "a", "b", "b", "x", "x"]))
        chosen = self.repairer.choose(
            content, ShardMap.from_json(content.shard_map), {4: "x", 5: "x"}, ["a", "b", "c"]
        )
        self.assertEqual(sorted(chosen.values())[0], "c")
        self.assertTrue(set(chosen.values()) <= {"a", "b", "c"})
        self.assertEqual(self.repairer.choose(content, ShardMap.from_json(content.shard_map), {4: "x"}, []), {})


class RepairTests(TestCase):
    """
    L{Repairer} over a real engine: every shard on this node (C{"local"}),
    other members simulated.
    """

    async def setUp(self) -> None:
        self.stack = await S3Stack.start(self, stripe_size=16 * 1024)
        self.engine = self.stack.service.engine
        self.contents = ContentStore(self.stack.regional_db)
        self.queue = TaskQueue(self.stack.global_db, reactor, "test")
        self.members = [member("local")]
        self.access = ClusterAccess("local", "us-east-1", lambda: list(self.members), self.engine, None)

        async def access() -> ClusterAccess:
            return self.access

        self.repairer = Repairer(
            self.contents, self.stack.global_db, self.queue, access, self.stack.metrics, self.stack.io,
            self.stack.shards, "us-east-1",
        )

    async def store(self, data: bytes) -> ContentRecord:
        """
        Write a content's shards and record it.
        """
        writer = self.engine.new_writer()
        await writer.write(data)
        record: ContentRecord = await writer.finish()
        await writer.commit()
        await insert_content(self.stack.regional_db, record.hash, record.shard_map, size=record.size)
        await self.stack.regional_db.run_operation(
            "UPDATE contents SET stripe_size = %s WHERE hash = %s", (record.stripe_size, record.hash)
        )
        return record

    async def read(self, record: ContentRecord) -> bytes:
        """
        The content's bytes as the engine reads them now (recorded map).
        """
        current = await self.contents.get(record.hash)
        assert current is not None
        return b"".join([chunk async for chunk in self.engine.read(current)])

    def path(self, record: ContentRecord, index: int) -> str | None:
        """
        Where a shard of the content is on disk, or L{None}.
        """
        return self.stack.shards.locate(bytes.fromhex(record.hash), index)

    def sample(self, name: str) -> float:
        """
        A counter's value in the stack's metrics (0 when unset).
        """
        value = self.stack.metrics.registry.get_sample_value(name)
        return value or 0.0

    async def test_missing_file_rebuilt(self) -> None:
        """
        A deleted shard file is rebuilt and recorded, counted in the repair
        metrics; the content reads back exactly; a second run does nothing.
        """
        data = os.urandom(70_000)
        record = await self.store(data)
        path = self.path(record, 2)
        assert path is not None
        os.unlink(path)
        result = await self.repairer.repair(record.hash)
        self.assertEqual(result.unhealthy, {2: "file missing"})
        self.assertEqual(result.repaired, {2: "local"})
        self.assertIsNotNone(self.path(record, 2))
        self.assertEqual(await self.read(record), data)
        self.assertEqual(self.sample("anvil_shard_repairs_total"), 1.0)
        self.assertEqual(self.sample("anvil_shard_repaired_bytes_total"), float(shard_bytes(record)))
        again = await self.repairer.repair(record.hash)
        self.assertEqual((again.unhealthy, again.repaired), ({}, {}))
        self.assertEqual(self.sample("anvil_shard_repairs_total"), 1.0)

    async def test_reported_corrupt_block_rebuilt(self) -> None:
        """
        A shard the task names is read in full: a bad block makes it
        unhealthy and it is rebuilt; once sound, the same report finds
        nothing to do.
        """
        data = os.urandom(70_000)
        record = await self.store(data)
        path = self.path(record, 3)
        assert path is not None
        flip_byte(path, stripe=1)
        unreported = await self.repairer.repair(record.hash)
        self.assertEqual(unreported.unhealthy, {})
        result = await self.repairer.repair(record.hash, (3, "local"), "scrub")
        self.assertEqual(list(result.unhealthy), [3])
        self.assertIn("corrupt", result.unhealthy[3])
        self.assertEqual(result.repaired, {3: "local"})
        again = await self.repairer.repair(record.hash, (3, "local"), "scrub")
        self.assertEqual(again.unhealthy, {})
        self.assertEqual(await self.read(record), data)

    async def test_removed_dead_unknown_and_never_stored(self) -> None:
        """
        Shards recorded on a removed node, a dead one, an unknown one or on
        no node are rebuilt on an alive member, and the map records it.
        """
        await self.stack.global_db.run_operation("INSERT INTO removed_nodes (node_id) VALUES ('gone')")
        self.members += [member("dead", MemberState.DEAD), member("peer")]
        cases = {
            (0, "gone"): "node gone removed",
            (1, "dead"): "node dead dead",
            (4, ""): "never stored",
            (5, "stranger"): "node stranger unknown",
        }
        for pair in ([(0, "gone"), (1, "dead")], [(4, ""), (5, "stranger")]):
            data = os.urandom(50_000)
            record = await self.store(data)
            parsed = ShardMap.from_json(record.shard_map)
            nodes = [t.node for t in parsed.targets]
            for index, node in pair:
                nodes[index] = node
            await self.stack.regional_db.run_operation(
                "UPDATE contents SET shard_map = %s WHERE hash = %s",
                (Json(shard_map(nodes, parsed.key)), record.hash),
            )
            result = await self.repairer.repair(record.hash)
            self.assertEqual(result.unhealthy, {index: cases[(index, node)] for index, node in pair})
            self.assertEqual(result.repaired, {index: "local" for index, _ in pair})
            current = await self.contents.get(record.hash)
            assert current is not None
            self.assertEqual({t.node for t in ShardMap.from_json(current.shard_map).targets}, {"local"})
            self.assertEqual(await self.read(record), data)

    async def test_unknown_nodes_before_joining(self) -> None:
        """
        A node that sees no other member yet (gossip has not joined it)
        does not take the members it does not know for gone.
        """
        record = await self.store(os.urandom(30_000))
        parsed = ShardMap.from_json(record.shard_map)
        nodes = [t.node for t in parsed.targets]
        nodes[1] = "stranger"
        await self.stack.regional_db.run_operation(
            "UPDATE contents SET shard_map = %s WHERE hash = %s", (Json(shard_map(nodes, parsed.key)), record.hash)
        )
        result = await self.repairer.repair(record.hash)
        self.assertEqual((result.unhealthy, result.repaired), ({}, {}))

    async def test_lost_content_writes_nothing(self) -> None:
        """
        With fewer than k healthy shards the repair raises L{ContentLost}
        and changes nothing.
        """
        record = await self.store(os.urandom(50_000))
        for index in (0, 1, 2):
            path = self.path(record, index)
            assert path is not None
            os.unlink(path)
        with self.assertRaises(ContentLost):
            await self.repairer.repair(record.hash)
        for index in (0, 1, 2):
            self.assertIsNone(self.path(record, index))
        current = await self.contents.get(record.hash)
        assert current is not None
        self.assertEqual(current.shard_map, record.shard_map)
        self.assertEqual(self.sample("anvil_shard_repairs_total"), 0.0)

    async def test_gone_content(self) -> None:
        """
        A content that no longer exists needs no repair.
        """
        result = await self.repairer.repair(HASH_A)
        self.assertTrue(result.gone)

    async def test_concurrent_repairs(self) -> None:
        """
        Two repairs of one content at once both finish; the shard is
        rebuilt once or twice into the same place, the map is whole and the
        content reads back exactly.
        """
        data = os.urandom(90_000)
        record = await self.store(data)
        for index in (1, 4):
            path = self.path(record, index)
            assert path is not None
            os.unlink(path)
        results = await gatherResults(
            [Deferred.fromCoroutine(self.repairer.repair(record.hash)) for _ in range(2)]
        )
        self.assertTrue(any(r.repaired for r in results))
        self.assertIsNotNone(self.path(record, 1))
        self.assertIsNotNone(self.path(record, 4))
        self.assertEqual(await self.read(record), data)
        self.assertEqual((await self.repairer.repair(record.hash)).unhealthy, {})

    async def test_evacuate_enqueues_one_repair_per_content(self) -> None:
        """
        An evacuation enqueues one repair per content with a shard on the
        node; running it again adds none.
        """
        await insert_content(self.stack.regional_db, HASH_A, shard_map(["x", "y", "z", "x", "y", "z"]))
        await insert_content(self.stack.regional_db, HASH_B, shard_map(["y"] * 6))
        await insert_content(self.stack.regional_db, HASH_C, shard_map(["x"] * 6))
        task_id = await self.queue.enqueue("evacuate", {"node_id": "x"}, region="us-east-1")
        task = await self.queue.get(task_id)
        await self.repairer.handle_evacuate(task)
        await self.repairer.handle_evacuate(task)
        repairs = await self.queue.list(kind="repair")
        self.assertEqual(sorted(t.payload["content_hash"] for t in repairs), [HASH_A, HASH_C])
        self.assertEqual({t.region for t in repairs}, {"us-east-1"})

    async def test_backlog_one_unfinished_repair_per_content(self) -> None:
        """
        L{RepairBacklog} adds a repair only for contents without an
        unfinished one (whoever queued it), and only once.
        """
        await self.queue.enqueue(
            "repair", {"content_hash": HASH_A, "shard_index": 2, "node_id": "n"}, region="us-east-1"
        )
        done = await self.queue.enqueue("repair", {"content_hash": HASH_C}, region="us-east-1")
        await self.stack.global_db.run_operation("UPDATE tasks SET state = 'done' WHERE id = %s", (done,))
        backlog = RepairBacklog(self.stack.global_db, self.queue, "us-east-1")
        added = [await backlog.add(h, {"reason": "test"}) for h in (HASH_A, HASH_B, HASH_B, HASH_C)]
        self.assertEqual(added, [False, True, False, True])
        pending = await self.queue.list(kind="repair", state="pending")
        self.assertEqual(sorted(t.payload["content_hash"] for t in pending), [HASH_A, HASH_B, HASH_C])

    async def test_member_down(self) -> None:
        """
        A C{member_down} task records a member still down as removed and
        evacuates it; for a member alive again it does nothing; a node that
        sees no other member yet judges nothing (the task is retried).
        """
        alone = await self.queue.get(await self.queue.enqueue("member_down", {"node_id": "lost"}))
        with self.assertRaises(RepairError):
            await self.repairer.handle_member_down(alone)
        self.members.append(member("back"))
        for node in ("back", "lost"):
            task = await self.queue.get(await self.queue.enqueue("member_down", {"node_id": node}))
            await self.repairer.handle_member_down(task)
        rows = await self.stack.global_db.run_query("SELECT node_id FROM removed_nodes")
        self.assertEqual(rows, [("lost",)])
        evacuations = await self.queue.list(kind="evacuate")
        self.assertEqual([t.payload for t in evacuations], [{"node_id": "lost"}])

    async def test_handle_task(self) -> None:
        """
        The C{repair} handler repairs the content its task names.
        """
        data = os.urandom(30_000)
        record = await self.store(data)
        path = self.path(record, 5)
        assert path is not None
        os.unlink(path)
        task = await self.queue.get(
            await self.queue.enqueue("repair", {"content_hash": record.hash, "shard_index": 5, "node_id": "local"})
        )
        await self.repairer.handle(task)
        self.assertIsNotNone(self.path(record, 5))
        self.assertEqual(await self.read(record), data)
