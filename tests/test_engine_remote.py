# -*- test-case-name: tests.test_engine_remote -*-
"""
Tests for the storage engine across nodes: three engines in one process,
each with its own shard store and a real L{ShardServer} on a real loopback
socket, talking the peer shard protocol with L{PeerClient} (plain HTTP: the
mutual TLS of the cluster listener is tested in tests.test_cluster_*).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from anvil.cluster.listener import ClusterRoot
from anvil.cluster.peers import PeerClient
from anvil.cluster.shardserver import ShardServer
from anvil.metrics import Metrics
from anvil.storage.cpu import CpuPool
from anvil.storage.engine import ContentUnavailable, StorageEngine, WriteQuorumLost
from anvil.storage.erasure import ErasureParams
from anvil.storage.placement import ClusterPlacement, ShardMap, assign
from anvil.storage.shardfile import HEADER_SIZE
from anvil.storage.shardstore import LocalShardStore
from anvil.web.listener import track_channels
from anvil.web.server import AnvilSite
from tests.test_peer_shards import _content

K, M = 4, 2
STRIPE = 16 * 1024
PARAMS = ErasureParams(K, M, STRIPE)
NODES = ["1" * 32, "2" * 32, "3" * 32]


class _Directory:
    """
    Node id to address, with nodes that can be marked unreachable.
    """

    def __init__(self) -> None:
        self.addresses: dict[str, str] = {}
        self.down: set[str] = set()

    def address(self, node_id: str) -> str | None:
        if node_id in self.down:
            return None
        return self.addresses.get(node_id)


class _Node:
    """
    One node: a shard store, its shard server on 127.0.0.1, and an engine
    placing shards over every node of the test cluster.
    """

    def __init__(self, testcase: TestCase, node_id: str, directory: _Directory, alive: list[str]) -> None:
        self.node_id = node_id
        base = testcase.mktemp()
        self.store = LocalShardStore([os.path.join(base, "d1"), os.path.join(base, "d2")])
        self.io = CpuPool(reactor, max_threads=4, name=f"io-{node_id[:4]}")
        self.cpu = CpuPool(reactor, name=f"cpu-{node_id[:4]}")
        for pool in (self.io, self.cpu):
            pool.startService()
            testcase.addCleanup(pool.stopService)
        self.reports: list[tuple[str, int, int]] = []
        self.server = ShardServer(self.store, self.io, reactor)
        testcase.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))
        root = ClusterRoot()
        root.register(b"shards", self.server.resource())
        site = AnvilSite(root, Metrics(), reactor)
        self.connections = track_channels(site)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        testcase.addCleanup(self.stop_listening)
        directory.addresses[node_id] = f"127.0.0.1:{self.port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(pool.closeCachedConnections)
        peers = PeerClient(HTTPClient(Agent(reactor, pool=pool)), reactor, 5.0, scheme="http")
        self.engine = StorageEngine(
            PARAMS,
            self.store,
            self.cpu,
            self.io,
            inline_threshold=0,
            on_corrupt=lambda h, i, s: self.reports.append((h, i, s)),
            placement=ClusterPlacement(node_id, self.store, lambda: list(alive)),
            peers=peers,
            directory=directory,
        )

    def stop_listening(self) -> Any:
        """
        Stop serving and drop every connection (a node gone down, as far as
        peers can tell).
        """
        for channel in list(self.connections):
            channel.transport.abortConnection()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def shard_files(self) -> list[str]:
        """
        Committed shard files of this node.
        """
        return sorted(
            path for d in self.store.data_dirs for path in glob.glob(os.path.join(d, "shards", "*", "*", "*"))
        )

    def temporary_files(self) -> list[str]:
        """
        Temporary shard files of this node.
        """
        return sorted(path for d in self.store.data_dirs for path in glob.glob(os.path.join(d, "tmp", "*")))


class RemoteEngineTests(TestCase):
    """
    Writing and reading contents whose shards live on several nodes.
    """

    def setUp(self) -> None:
        self.directory = _Directory()
        self.alive = list(NODES)
        self.nodes = {n: _Node(self, n, self.directory, self.alive) for n in NODES}
        self.a = self.nodes[NODES[0]]

    async def put(self, node: _Node, data: bytes) -> Any:
        """
        Write C{data} through C{node}'s engine and commit it.
        """
        writer = node.engine.new_writer()
        try:
            await writer.write(data)
            record = await writer.finish()
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        return record

    async def get(self, node: _Node, record: Any, start: int = 0, stop: int | None = None) -> bytes:
        """
        Read a range back through C{node}'s engine.
        """
        return b"".join([chunk async for chunk in node.engine.read(record, start, stop)])

    def holders(self, record: Any) -> dict[str, list[int]]:
        """
        Node id to the shard indices of C{record} its store holds.
        """
        found: dict[str, list[int]] = {}
        for node_id, node in self.nodes.items():
            for path in node.shard_files():
                name = os.path.basename(path)
                if name.startswith(record.hash):
                    found.setdefault(node_id, []).append(int(name.rsplit(".", 1)[1]))
        return {n: sorted(i) for n, i in found.items()}

    async def test_shards_spread_and_read_back(self) -> None:
        """
        Each shard is committed on the node rendezvous hashing chose (two per
        node with three nodes), the shard map says so, and any node reads
        the content and any range of it back byte-exact.
        """
        data = _content(5 * STRIPE + 123)
        record = await self.put(self.a, data)
        shard_map = ShardMap.from_json(record.shard_map)
        expected = assign(bytes.fromhex(shard_map.key), NODES, K + M)
        self.assertEqual([t.node for t in shard_map.targets], expected)
        placed: dict[str, list[int]] = {}
        for index, node in enumerate(expected):
            placed.setdefault(node, []).append(index)
        self.assertEqual(self.holders(record), placed)
        for node in self.nodes.values():
            self.assertEqual(await self.get(node, record), data)
            self.assertEqual(node.temporary_files(), [])
        self.assertEqual(await self.get(self.nodes[NODES[2]], record, STRIPE - 7, 3 * STRIPE + 9), data[STRIPE - 7 : 3 * STRIPE + 9])

    async def test_range_fetches_only_its_stripes(self) -> None:
        """
        A range read asks peers only for blocks of the stripes the range
        covers, not for the rest of the content.
        """
        data = _content(10 * STRIPE)
        record = await self.put(self.a, data)
        reader = self.nodes[NODES[1]]
        asked: list[tuple[int, int, int]] = []
        read_blocks = reader.engine.peers.read_blocks

        def counting(addr: str, content_hash: bytes, index: int, params: Any, length: int,
                     first_stripe: int, count: int) -> Any:
            asked.append((index, first_stripe, count))
            return read_blocks(addr, content_hash, index, params, length, first_stripe, count)

        reader.engine.peers.read_blocks = counting  # type: ignore[method-assign]
        start, stop = 3 * STRIPE + 10, 4 * STRIPE + 20
        self.assertEqual(await self.get(reader, record, start, stop), data[start:stop])
        self.assertTrue(asked)
        for index, first_stripe, count in asked:
            self.assertLess(index, K, "a parity shard was read with every data shard healthy")
            self.assertGreaterEqual(first_stripe, 3)
            self.assertLessEqual(first_stripe + count, 5)

    async def test_reads_with_a_node_down(self) -> None:
        """
        With one of three nodes down (two shards gone), every node still up
        reads the exact bytes, without reporting the shards as damaged.
        """
        data = _content(4 * STRIPE + 1)
        record = await self.put(self.a, data)
        down = self.nodes[NODES[1]]
        await down.stop_listening()
        for node in (self.nodes[NODES[0]], self.nodes[NODES[2]]):
            with capturedLogs():
                self.assertEqual(await self.get(node, record), data)
            self.assertEqual(node.reports, [])

    async def test_two_nodes_down_fails_cleanly(self) -> None:
        """
        With two of three nodes down only two shards are left: the read
        fails with L{ContentUnavailable} before returning any byte.
        """
        data = _content(3 * STRIPE)
        record = await self.put(self.a, data)
        for node_id in NODES[1:]:
            await self.nodes[node_id].stop_listening()
        received: list[bytes] = []

        async def read() -> None:
            async for chunk in self.a.engine.read(record):
                received.append(chunk)

        with capturedLogs():
            with self.assertRaises(ContentUnavailable):
                await read()
        self.assertEqual(received, [])

    async def test_write_quorum_lost(self) -> None:
        """
        A write whose targets on two nodes are unreachable can store only
        two of six shards, under the quorum of five: it fails with
        L{WriteQuorumLost} and leaves no shard file, committed or
        temporary, anywhere.
        """
        self.directory.down.update(NODES[1:])
        with capturedLogs():
            with self.assertRaises(WriteQuorumLost):
                await self.put(self.a, _content(3 * STRIPE))
        for node in self.nodes.values():
            self.assertEqual(node.shard_files(), [])
            self.assertEqual(node.temporary_files(), [])

    async def test_target_lost_mid_write_within_quorum(self) -> None:
        """
        A peer that goes away during an upload costs only its shard while
        the quorum is still met: with four nodes, a node holding one of the
        six shards fails mid-write, the write succeeds with five, the map
        records that shard as missing, and the content reads back.
        """
        fourth = "4" * 32
        self.alive.append(fourth)
        self.nodes[fourth] = _Node(self, fourth, self.directory, self.alive)
        data = _content(6 * STRIPE + 3)
        writer = self.a.engine.new_writer()
        await writer.write(data[: STRIPE + 1])
        shard_map = writer._shard_map
        assert shard_map is not None
        nodes = [t.node for t in shard_map.targets]
        # Four nodes, six shards: the two ranked last hold one shard each.
        victim = next(n for n in nodes if nodes.count(n) == 1 and n != self.a.node_id)
        await self.nodes[victim].stop_listening()
        with capturedLogs():
            await writer.write(data[STRIPE + 1 :])
            record = await writer.finish()
            await writer.commit()
        stored = ShardMap.from_json(record.shard_map)
        self.assertEqual(
            [t.index for t in stored.targets if t.missing], [nodes.index(victim)]
        )
        self.assertEqual(await self.get(self.nodes[NODES[2]], record), data)
        self.assertEqual(self.nodes[victim].shard_files(), [])

    async def test_corrupt_remote_block_read_via_parity(self) -> None:
        """
        A flipped byte in a shard held by a peer is found by the peer, the
        reading node uses parity instead and reports the shard.
        """
        data = _content(4 * STRIPE)
        record = await self.put(self.a, data)
        shard_map = ShardMap.from_json(record.shard_map)
        target = next(t for t in shard_map.targets if t.node != NODES[0] and t.index < K)
        holder = self.nodes[target.node]
        path = next(p for p in holder.shard_files() if p.endswith(f"{record.hash}.{target.index}"))
        with open(path, "r+b") as f:
            f.seek(HEADER_SIZE + 10)
            byte = f.read(1)
            f.seek(HEADER_SIZE + 10)
            f.write(bytes([byte[0] ^ 0xFF]))
        with capturedLogs():
            self.assertEqual(await self.get(self.a, record), data)
        self.assertEqual(self.a.reports, [(record.hash, target.index, 0)])

    async def test_rebuild_on_another_node(self) -> None:
        """
        L{StorageEngine.rebuild} re-creates a lost shard on the node asked
        for from the others, and the content reads from the rebuilt shard
        plus the data shards.
        """
        data = _content(3 * STRIPE + 77)
        record = await self.put(self.a, data)
        shard_map = ShardMap.from_json(record.shard_map)
        lost = shard_map.targets[1]
        holder = self.nodes[lost.node]
        path = next(p for p in holder.shard_files() if p.endswith(f"{record.hash}.1"))
        with open(path, "rb") as f:
            original = f.read()
        os.unlink(path)
        new_home = next(n for n in NODES if n != lost.node)
        with capturedLogs():
            done = await self.a.engine.rebuild(record, {1: new_home})
        self.assertEqual(list(done), [1])
        self.assertEqual(done[1].node, new_home)
        rebuilt = next(p for p in self.nodes[new_home].shard_files() if p.endswith(f"{record.hash}.1"))
        with open(rebuilt, "rb") as f:
            self.assertEqual(f.read(), original)
