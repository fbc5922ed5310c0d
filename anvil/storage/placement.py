# -*- test-case-name: tests.test_placement -*-
"""
Placement: which node, and which data directory on it, holds each shard
index of a content, and the shard map that records the choice.

The shard map is stored with the content (C{contents.shard_map}, JSON)::

    {"version": 1,
     "shards": [{"index": 0, "node": "<node id>", "dir": "/srv/anvil/d1"},
                {"index": 1, "node": "<node id>", "dir": "/srv/anvil/d2"},
                ...]}

An inline content (stored in PostgreSQL, no shard files) has
C{"shards": []}. Readers trust the map rather than recomputing the
placement (ARCHITECTURE.md section 5): membership and the directory list
change over time, a recorded map does not.

One node today: L{LocalPlacement} puts every shard on the local node and
picks the directory with the shard store's rendezvous ranking
(L{anvil.storage.shardstore.LocalShardStore.dir_for}), so the directory
recorded here is exactly where L{LocalShardStore.open_writer} creates the
file for the same placement key. The cluster issue adds a placement over
nodes with the same L{Placement} interface: rank the alive nodes of the
region by rendezvous hashing of C{(placement key, node id)}, give shard
I{i} to the I{i}-th ranked node (wrapping when there are fewer nodes than
C{k + m}), and let each node pick its own disk; L{ShardMap} and
L{ShardTarget} already carry the node id for that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from anvil.storage.shardstore import LocalShardStore

__all__ = [
    "SHARD_MAP_VERSION",
    "InvalidShardMap",
    "LocalPlacement",
    "Placement",
    "ShardMap",
    "ShardTarget",
]

#: The version written in every shard map; readers refuse other versions.
SHARD_MAP_VERSION = 1


class InvalidShardMap(ValueError):
    """
    A recorded shard map cannot be understood (wrong version or shape).
    """


@dataclass(frozen=True)
class ShardTarget:
    """
    Where one shard index of a content lives.

    @ivar index: The shard index (data shards first).
    @ivar node: Id of the node holding it.
    @ivar dir: The data directory on that node.
    """

    index: int
    node: str
    dir: str


@dataclass(frozen=True)
class ShardMap:
    """
    The recorded placement of a content's shards.

    @ivar targets: One entry per shard index, in index order; empty for
        an inline content.
    """

    targets: tuple[ShardTarget, ...]

    def __post_init__(self) -> None:
        for position, target in enumerate(self.targets):
            if target.index != position:
                raise InvalidShardMap(
                    f"shard map entry {position} is for shard index {target.index}"
                )

    def target(self, index: int) -> ShardTarget | None:
        """
        @param index: A shard index.
        @return: Where that shard lives, or L{None} when the map has no
            entry for it.
        """
        if 0 <= index < len(self.targets):
            return self.targets[index]
        return None

    def to_json(self) -> dict[str, object]:
        """
        @return: The map as the JSON-compatible dict stored with the content.
        """
        return {
            "version": SHARD_MAP_VERSION,
            "shards": [{"index": t.index, "node": t.node, "dir": t.dir} for t in self.targets],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ShardMap:
        """
        Decode a stored shard map.

        An empty mapping (the column's default) decodes as an empty map, so
        a reader falls back to searching the local directories.

        @param data: The stored dict.
        @return: The map.
        @raise InvalidShardMap: Unknown version or malformed entries.
        """
        if not data:
            return cls(())
        version = data.get("version")
        if version != SHARD_MAP_VERSION:
            raise InvalidShardMap(f"unsupported shard map version {version!r}")
        shards = data.get("shards")
        if not isinstance(shards, list):
            raise InvalidShardMap("shard map has no list of shards")
        targets = []
        for entry in shards:
            if not isinstance(entry, Mapping):
                raise InvalidShardMap(f"shard map entry {entry!r} is not an object")
            index, node, directory = entry.get("index"), entry.get("node"), entry.get("dir")
            if (
                not isinstance(index, int)
                or isinstance(index, bool)
                or not isinstance(node, str)
                or not isinstance(directory, str)
            ):
                raise InvalidShardMap(f"malformed shard map entry {dict(entry)!r}")
            targets.append(ShardTarget(index, node, directory))
        targets.sort(key=lambda t: t.index)
        return cls(tuple(targets))


class Placement(Protocol):
    """
    Chooses targets for the shards of a new content.
    """

    node_id: str

    def choose(self, placement_key: bytes, total: int) -> ShardMap:
        """
        @param placement_key: The content hash if known, otherwise a key
            common to all shards of one upload.
        @param total: Number of shards, C{k + m}.
        @return: One target per shard index.
        """

    def is_local(self, target: ShardTarget) -> bool:
        """
        @param target: An entry of a shard map.
        @return: Whether this node holds that shard.
        """


class LocalPlacement:
    """
    Every shard on this node, spread over its data directories.

    @ivar node_id: This node's id, recorded in every shard map entry.
    @ivar store: The node's shard store.
    """

    def __init__(self, node_id: str, store: LocalShardStore) -> None:
        """
        @param node_id: This node's id (L{anvil.cluster.membership}).
        @param store: The node's shard store, whose ranking picks the
            directories.
        """
        self.node_id = node_id
        self.store = store

    def choose(self, placement_key: bytes, total: int) -> ShardMap:
        """
        Give shard I{i} the I{i}-th directory the store ranks for the key,
        wrapping round when there are fewer directories than shards.

        @param placement_key: The key the shard writers are opened with.
        @param total: Number of shards, C{k + m}.
        @return: The map to record with the content.
        """
        ranked = self.store.ranked_dirs(placement_key)
        return ShardMap(
            tuple(ShardTarget(i, self.node_id, ranked[i % len(ranked)]) for i in range(total))
        )

    def is_local(self, target: ShardTarget) -> bool:
        """
        @param target: An entry of a shard map.
        @return: Whether it names this node.
        """
        return target.node == self.node_id
