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

A shard map entry whose C{node} is empty records a shard that was never
written (its target failed during the upload and the write quorum was met
without it): readers skip it and repair fills it in.

L{LocalPlacement} puts every shard on the local node and picks the
directory with the shard store's rendezvous ranking
(L{anvil.storage.shardstore.LocalShardStore.dir_for}), so the directory
recorded here is exactly where L{LocalShardStore.open_writer} creates the
file for the same placement key.

L{ClusterPlacement} ranks the alive members of the node's region by
rendezvous hashing of C{(placement key, node id)} (L{rank_nodes}) and gives
shard I{i} to the I{i}-th ranked node, wrapping round when there are fewer
members than C{k + m}; each node picks its own disk for the shards it
receives (the directory of a peer's shard is recorded when the peer
reports it at commit). Rendezvous hashing moves only about C{1/n} of the
placements when a member joins or leaves.

The placement key is a random key per upload, not the content hash: shards
stream to their targets from the first stripe, long before the last byte
fixes the hash. The key is recorded in the shard map (C{"key"}), so
rebalancing recomputes a content's ideal placement from the same input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from anvil.storage.shardstore import LocalShardStore

__all__ = [
    "SHARD_MAP_VERSION",
    "ClusterPlacement",
    "InvalidShardMap",
    "LocalPlacement",
    "NoPlacement",
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

    @property
    def missing(self) -> bool:
        """
        @return: Whether the shard was never stored (no node recorded).
        """
        return not self.node


@dataclass(frozen=True)
class ShardMap:
    """
    The recorded placement of a content's shards.

    @ivar targets: One entry per shard index, in index order; empty for
        an inline content.
    """

    targets: tuple[ShardTarget, ...]
    key: str = ""

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
        document: dict[str, object] = {
            "version": SHARD_MAP_VERSION,
            "shards": [{"index": t.index, "node": t.node, "dir": t.dir} for t in self.targets],
        }
        if self.key:
            document["key"] = self.key
        return document

    def nodes(self) -> set[str]:
        """
        @return: The ids of the nodes holding at least one shard.
        """
        return {t.node for t in self.targets if t.node}

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
        key = data.get("key", "")
        if not isinstance(key, str):
            raise InvalidShardMap("shard map key is not a string")
        return cls(tuple(targets), key)


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
            tuple(ShardTarget(i, self.node_id, ranked[i % len(ranked)]) for i in range(total)),
            placement_key.hex(),
        )

    def is_local(self, target: ShardTarget) -> bool:
        """
        @param target: An entry of a shard map.
        @return: Whether it names this node.
        """
        return target.node == self.node_id


class NoPlacement(Exception):
    """
    No member can take shards (the region has no alive member).
    """


def rank_nodes(placement_key: bytes, node_ids: Iterable[str]) -> list[str]:
    """
    Rendezvous (highest-random-weight) ranking of nodes for a key.

    @param placement_key: The upload's placement key.
    @param node_ids: Candidate node ids.
    @return: The ids, best first; the order of any two nodes depends only
        on the key and those two ids, so adding or removing one node moves
        only the placements it wins or held.
    """

    def weight(node_id: str) -> bytes:
        return hashlib.sha256(placement_key + b"\0" + node_id.encode("utf-8")).digest()

    return sorted(set(node_ids), key=weight, reverse=True)


def assign(placement_key: bytes, node_ids: Sequence[str], total: int) -> list[str]:
    """
    The node of each shard index: the I{i}-th ranked node for shard I{i},
    wrapping round when there are fewer nodes than shards.

    @raise NoPlacement: No node to choose from.
    """
    ranked = rank_nodes(placement_key, node_ids)
    if not ranked:
        raise NoPlacement("no alive member to place shards on")
    return [ranked[i % len(ranked)] for i in range(total)]


class ClusterPlacement:
    """
    Shards spread over the alive members of this node's region.

    @ivar node_id: This node's id.
    @ivar store: This node's shard store (it picks local directories).
    """

    def __init__(
        self, node_id: str, store: LocalShardStore, candidates: Callable[[], Iterable[str]]
    ) -> None:
        """
        @param node_id: This node's id.
        @param store: This node's shard store.
        @param candidates: Returns the ids of the members that may take new
            shards now (alive, in this node's region; this node included).
        """
        self.node_id = node_id
        self.store = store
        self._candidates = candidates

    def choose(self, placement_key: bytes, total: int) -> ShardMap:
        """
        @param placement_key: The upload's key.
        @param total: Number of shards, C{k + m}.
        @return: The targets; directories are filled in for local shards
            (where this store opens them) and left empty for peers'.
        @raise NoPlacement: No member is alive (not even this one).
        """
        nodes = assign(placement_key, list(self._candidates()), total)
        return ShardMap(
            tuple(
                ShardTarget(
                    i, node, self.store.dir_for(placement_key, i) if node == self.node_id else ""
                )
                for i, node in enumerate(nodes)
            ),
            placement_key.hex(),
        )

    def is_local(self, target: ShardTarget) -> bool:
        """
        @param target: An entry of a shard map.
        @return: Whether it names this node.
        """
        return target.node == self.node_id
