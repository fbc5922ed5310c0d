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
    InvalidShardMap,
    LocalPlacement,
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
