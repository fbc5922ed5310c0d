# -*- test-case-name: tests.test_placement -*-
"""
Tests for L{anvil.storage.placement}.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.erasure import ErasureParams
from anvil.storage.placement import (
    SHARD_MAP_VERSION,
    ClusterPlacement,
    InvalidShardMap,
    LocalPlacement,
    NoPlacement,
    assign,
    rank_nodes,
    ShardMap,
    ShardTarget,
)
from anvil.storage.shardstore import LocalShardStore


class LocalPlacementTests(SynchronousTestCase):
    """
    Tests for L{LocalPlacement}.
    """

    def make_placement(self, count: int, node_id: str = "node-a") -> LocalPlacement:
        """
        A placement over a store of C{count} new directories.
        """
        base = self.mktemp()
        store = LocalShardStore([os.path.join(base, f"disk{i}") for i in range(count)])
        return LocalPlacement(node_id, store)

    def test_agrees_with_the_store(self) -> None:
        """
        Shard I{i} is placed in the directory where the store opens the
        writer for the same key, on this node.
        """
        placement = self.make_placement(3)
        shard_map = placement.choose(b"upload key", 6)
        self.assertEqual([t.index for t in shard_map.targets], list(range(6)))
        for target in shard_map.targets:
            self.assertEqual(target.node, "node-a")
            self.assertEqual(target.dir, placement.store.dir_for(b"upload key", target.index))
            writer = placement.store.open_writer(target.index, ErasureParams(4, 2, 4096), b"upload key")
            self.addCleanup(writer.abort)
            self.assertEqual(os.path.dirname(os.path.dirname(writer.path)), target.dir)

    def test_distinct_dirs_when_enough(self) -> None:
        """
        With at least C{k + m} directories every shard gets its own.
        """
        placement = self.make_placement(7)
        for n in range(20):
            dirs = [t.dir for t in placement.choose(b"key %d" % n, 6).targets]
            self.assertEqual(len(set(dirs)), 6)

    def test_wraps_over_fewer_dirs(self) -> None:
        """
        With fewer directories than shards, shards wrap round evenly.
        """
        placement = self.make_placement(4)
        dirs = [t.dir for t in placement.choose(b"wrap", 6).targets]
        self.assertEqual(sorted(dirs.count(d) for d in placement.store.data_dirs), [1, 1, 2, 2])

    def test_is_local(self) -> None:
        """
        Only targets naming this node's id are local.
        """
        placement = self.make_placement(1, node_id="me")
        self.assertTrue(placement.is_local(ShardTarget(0, "me", "/x")))
        self.assertFalse(placement.is_local(ShardTarget(0, "other", "/x")))


class ShardMapTests(SynchronousTestCase):
    """
    Tests for L{ShardMap} encoding.
    """

    def test_json_shape(self) -> None:
        """
        The stored form is C{{"version": 1, "shards": [{"index", "node",
        "dir"}, ...]}}, and survives JSON.
        """
        shard_map = ShardMap((ShardTarget(0, "n1", "/d0"), ShardTarget(1, "n2", "/d1")))
        stored = shard_map.to_json()
        self.assertEqual(
            stored,
            {
                "version": 1,
                "shards": [
                    {"index": 0, "node": "n1", "dir": "/d0"},
                    {"index": 1, "node": "n2", "dir": "/d1"},
                ],
            },
        )
        self.assertEqual(ShardMap.from_json(json.loads(json.dumps(stored))), shard_map)

    def test_empty(self) -> None:
        """
        An inline content's map has no shards; the column default C{{}}
        decodes as an empty map too.
        """
        self.assertEqual(ShardMap(()).to_json(), {"version": SHARD_MAP_VERSION, "shards": []})
        self.assertEqual(ShardMap.from_json({}), ShardMap(()))
        self.assertIsNone(ShardMap(()).target(0))

    def test_entries_sorted_by_index(self) -> None:
        """
        Entries stored out of order are put back in index order.
        """
        stored = {
            "version": 1,
            "shards": [{"index": 1, "node": "n", "dir": "/b"}, {"index": 0, "node": "n", "dir": "/a"}],
        }
        self.assertEqual(ShardMap.from_json(stored).target(1), ShardTarget(1, "n", "/b"))

    def test_invalid(self) -> None:
        """
        Unknown versions, missing lists, malformed entries and gaps in the
        indices are refused.
        """
        bad = [
            {"version": 2, "shards": []},
            {"version": 1},
            {"version": 1, "shards": ["x"]},
            {"version": 1, "shards": [{"index": "0", "node": "n", "dir": "/a"}]},
            {"version": 1, "shards": [{"index": True, "node": "n", "dir": "/a"}]},
            {"version": 1, "shards": [{"index": 0, "node": 1, "dir": "/a"}]},
            {"version": 1, "shards": [{"index": 0, "node": "n"}]},
            {"version": 1, "shards": [{"index": 1, "node": "n", "dir": "/a"}]},
        ]
        for stored in bad:
            self.assertRaises(InvalidShardMap, ShardMap.from_json, stored)

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.text(), st.text()), max_size=20))
    def test_round_trip(self, entries: list[tuple[str, str]]) -> None:
        """
        Any map survives encoding and JSON.
        """
        shard_map = ShardMap(tuple(ShardTarget(i, n, d) for i, (n, d) in enumerate(entries)))
        self.assertEqual(ShardMap.from_json(json.loads(json.dumps(shard_map.to_json()))), shard_map)


class RendezvousTests(SynchronousTestCase):
    """
    Tests for L{rank_nodes}, L{assign} and L{ClusterPlacement}.
    """

    nodes = [f"{i:032x}" for i in range(1, 11)]

    def test_deterministic(self) -> None:
        """
        The same key and members give the same ranking whatever the order
        the members are listed in.
        """
        key = b"k" * 16
        self.assertEqual(rank_nodes(key, self.nodes), rank_nodes(key, list(reversed(self.nodes))))
        self.assertEqual(sorted(rank_nodes(key, self.nodes)), sorted(self.nodes))

    def test_keys_spread(self) -> None:
        """
        Over many keys every node comes first about equally often.
        """
        firsts: dict[str, int] = {}
        for i in range(5000):
            first = rank_nodes(i.to_bytes(8, "big"), self.nodes)[0]
            firsts[first] = firsts.get(first, 0) + 1
        self.assertEqual(set(firsts), set(self.nodes))
        for count in firsts.values():
            self.assertTrue(350 < count < 650, firsts)

    def test_minimal_movement_on_join(self) -> None:
        """
        When an eleventh member joins, only about 1/11 of the first choices
        move, and all of them move to the new member.
        """
        new = f"{99:032x}"
        moved = 0
        for i in range(5000):
            key = i.to_bytes(8, "big")
            before = rank_nodes(key, self.nodes)[0]
            after = rank_nodes(key, self.nodes + [new])[0]
            if before != after:
                moved += 1
                self.assertEqual(after, new)
        self.assertTrue(5000 / 11 * 0.8 < moved < 5000 / 11 * 1.2, moved)

    def test_minimal_movement_on_leave(self) -> None:
        """
        When a member leaves, the placements of shards on the others do not
        change: only the shards it held move, about 1/n of them.
        """
        gone = self.nodes[3]
        rest = [n for n in self.nodes if n != gone]
        moved = 0
        for i in range(2000):
            key = i.to_bytes(8, "big")
            before = assign(key, self.nodes, 6)
            after = assign(key, rest, 6)
            for index, node in enumerate(before):
                if node != after[index]:
                    moved += 1
        # Each shard held by the leaving node moves, and the shards ranked
        # after it shift by one place.
        self.assertLess(moved / (2000 * 6), 0.35)
        kept = sum(
            1 for i in range(2000)
            if rank_nodes(i.to_bytes(8, "big"), rest)
            == [n for n in rank_nodes(i.to_bytes(8, "big"), self.nodes) if n != gone]
        )
        self.assertEqual(kept, 2000)

    def test_wraps_with_few_members(self) -> None:
        """
        With fewer members than shards, the shards wrap round the ranked
        members, so each member holds one or two of six.
        """
        nodes = self.nodes[:4]
        placed = assign(b"key", nodes, 6)
        ranked = rank_nodes(b"key", nodes)
        self.assertEqual(placed, ranked + ranked[:2])

    def test_no_members(self) -> None:
        """
        No candidate at all is an error, not an empty map.
        """
        self.assertRaises(NoPlacement, assign, b"key", [], 6)

    def test_cluster_placement_map(self) -> None:
        """
        L{ClusterPlacement} records the key, names the ranked nodes and
        fills in the directory only for its own shards.
        """
        base = self.mktemp()
        store = LocalShardStore([os.path.join(base, "d1"), os.path.join(base, "d2")])
        me = self.nodes[0]
        placement = ClusterPlacement(me, store, lambda: self.nodes[:3])
        shard_map = placement.choose(b"upload", 6)
        self.assertEqual(shard_map.key, b"upload".hex())
        self.assertEqual([t.node for t in shard_map.targets], assign(b"upload", self.nodes[:3], 6))
        for target in shard_map.targets:
            if target.node == me:
                self.assertTrue(placement.is_local(target))
                self.assertEqual(target.dir, store.dir_for(b"upload", target.index))
            else:
                self.assertFalse(placement.is_local(target))
                self.assertEqual(target.dir, "")
        again = ShardMap.from_json(json.loads(json.dumps(shard_map.to_json())))
        self.assertEqual(again, shard_map)
        self.assertEqual(again.nodes(), set(self.nodes[:3]))

    def test_missing_target(self) -> None:
        """
        An entry without a node is a shard that was never stored.
        """
        self.assertTrue(ShardTarget(2, "", "").missing)
        self.assertFalse(ShardTarget(2, "n", "").missing)
