# -*- test-case-name: tests.test_peer_shards -*-
"""
Tests for L{anvil.cluster.peers} and L{anvil.cluster.shardserver}: the peer
shard protocol over real loopback sockets, a real L{AnvilSite} and a real
L{LocalShardStore}.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from anvil.cluster.ca import ClusterCA
from anvil.cluster.listener import ClusterRoot
from anvil.cluster.peers import (
    BlockBatch,
    PeerClient,
    PeerError,
    PeerShardCorrupt,
    PeerShardMissing,
    PeerTimeout,
)
from anvil.cluster.shardserver import END_FRAME, FRAME_HEADER, ShardServer
from anvil.cluster.tls import ClusterTLSPolicy, NodeIdentity, peer_node_id, server_context
from anvil.metrics import Metrics
from anvil.storage.cpu import CpuPool
from anvil.storage.erasure import ErasureCodec, ErasureParams
from anvil.storage.shardfile import HEADER_SIZE
from anvil.storage.shardstore import LocalShardStore
from anvil.web.server import AnvilSite

PARAMS = ErasureParams(4, 2, 64 * 1024)
NODE_A = "a" * 32
NODE_B = "b" * 32


def _content(size: int, seed: int = 1) -> bytes:
    """
    Deterministic pseudo-random bytes.
    """
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


def _shards(data: bytes, params: ErasureParams = PARAMS) -> list[list[bytes]]:
    """
    The blocks of each shard of C{data}: C{result[index][stripe]}.
    """
    codec = ErasureCodec(params)
    shards: list[list[bytes]] = [[] for _ in range(params.total)]
    for offset in range(0, len(data), params.stripe_size):
        for index, block in enumerate(codec.encode_stripe(data[offset : offset + params.stripe_size])):
            shards[index].append(bytes(block))
    return shards


async def _eventually(predicate: Any, timeout: float = 10.0) -> None:
    """
    Wait until C{predicate()} is true (polling the real reactor).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)


class _Harness:
    """
    A node's shard server on 127.0.0.1 and a client talking to it.
    """

    def __init__(
        self,
        testcase: TestCase,
        timeout: float = 10.0,
        server_clock: Any = None,
        authorize: Any = None,
        io_threads: int = 2,
    ) -> None:
        base = testcase.mktemp()
        self.store = LocalShardStore([os.path.join(base, "disk0"), os.path.join(base, "disk1")])
        self.io = CpuPool(reactor, max_threads=io_threads, name="test-io")
        self.io.startService()
        testcase.addCleanup(self.io.stopService)
        self.corrupt: list[tuple[str, int, int | None]] = []
        self.server = ShardServer(
            self.store,
            self.io,
            server_clock if server_clock is not None else reactor,
            on_corrupt=lambda h, i, s: self.corrupt.append((h, i, s)),
            authorize=authorize,
        )
        testcase.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))
        root = ClusterRoot()
        root.register(b"shards", self.server.resource())
        self.server_metrics = Metrics()
        self.site = AnvilSite(root, self.server_metrics, reactor)
        self.root = root
        self.metrics = Metrics()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(self.pool.closeCachedConnections)
        self.timeout = timeout

    def listen_plain(self, testcase: TestCase) -> None:
        """
        Serve over plain HTTP and make an http client.
        """
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        testcase.addCleanup(port.stopListening)
        self.addr = f"127.0.0.1:{port.getHost().port}"
        http = HTTPClient(Agent(reactor, pool=self.pool))
        self.client = PeerClient(http, reactor, self.timeout, self.metrics, scheme="http")

    def temporary_files(self) -> list[str]:
        """
        Temporary shard files in all data directories.
        """
        return [p for d in self.store.data_dirs for p in glob.glob(os.path.join(d, "tmp", "*"))]

    async def upload(
        self, data: bytes, indices: range | list[int] | None = None, key: bytes = b"upload-1"
    ) -> tuple[bytes, list[list[bytes]]]:
        """
        Upload and commit the shards of C{data}; return the hash and blocks.
        """
        digest = hashlib.sha256(data).digest()
        shards = _shards(data)
        for index in indices if indices is not None else range(PARAMS.total):
            upload = self.client.open_upload(self.addr, key, index, PARAMS)
            for block in shards[index]:
                await upload.write_block(block)
            await upload.finish()
            await upload.commit(digest, len(data))
        return digest, shards


class ShardTransferTests(TestCase):
    """
    Uploads, commits, aborts and reads over plain HTTP.
    """

    timeout = 30

    def setUp(self) -> None:
        self.h = _Harness(self)
        self.h.listen_plain(self)

    async def test_round_trip(self) -> None:
        """
        Every shard uploaded and committed reads back byte-exact, and any k
        of them rebuild the content.
        """
        data = _content(5 * PARAMS.stripe_size + 12345)
        digest, shards = await self.h.upload(data)
        stripes = len(shards[0])
        got = []
        for index in range(PARAMS.total):
            batch = await self.h.client.read_blocks(
                self.h.addr, digest, index, PARAMS, len(data), 0, stripes
            )
            self.assertEqual(batch, BlockBatch(shards[index], None))
            got.append(batch.blocks)
        codec = ErasureCodec(PARAMS)
        rebuilt = b""
        for stripe in range(stripes):
            length = min(PARAMS.stripe_size, len(data) - stripe * PARAMS.stripe_size)
            present = {i: got[i][stripe] for i in (1, 2, 4, 5)}
            rebuilt += bytes(codec.decode_stripe(present, length))
        self.assertEqual(rebuilt, data)
        self.assertEqual(self.h.temporary_files(), [])
        self.assertEqual(self.h.server.pending_uploads, 0)

    async def test_window(self) -> None:
        """
        A window in the middle returns exactly those stripes' blocks; an
        empty window returns nothing; a window past the end is refused.
        """
        data = _content(7 * PARAMS.stripe_size + 5)
        digest, shards = await self.h.upload(data, [3])
        batch = await self.h.client.read_blocks(self.h.addr, digest, 3, PARAMS, len(data), 2, 5)
        self.assertEqual(batch.blocks, shards[3][2:7])
        self.assertIsNone(batch.corrupt_stripe)
        batch = await self.h.client.read_blocks(self.h.addr, digest, 3, PARAMS, len(data), 7, 1)
        self.assertEqual(batch.blocks, [shards[3][7]])
        self.assertEqual(len(batch.blocks[0]), 2)
        empty = await self.h.client.read_blocks(self.h.addr, digest, 3, PARAMS, len(data), 8, 0)
        self.assertEqual(empty, BlockBatch([], None))
        with self.assertRaises(ValueError):
            await self.h.client.read_blocks(self.h.addr, digest, 3, PARAMS, len(data), 7, 2)

    async def test_empty_content(self) -> None:
        """
        A shard of an empty content (no blocks) commits and stats fine.
        """
        digest, _ = await self.h.upload(b"", [0])
        self.assertTrue(await self.h.client.stat_shard(self.h.addr, digest, 0))
        batch = await self.h.client.read_blocks(self.h.addr, digest, 0, PARAMS, 0, 0, 0)
        self.assertEqual(batch.blocks, [])

    async def test_commit_visible(self) -> None:
        """
        A finished upload is invisible until committed; commit puts it at
        the store's shard path in the data directory it reports.
        """
        data = _content(100000)
        digest = hashlib.sha256(data).digest()
        upload = self.h.client.open_upload(self.h.addr, b"key", 2, PARAMS)
        for block in _shards(data)[2]:
            await upload.write_block(block)
        await upload.finish()
        self.assertIsNone(self.h.store.locate(digest, 2))
        self.assertEqual(len(self.h.temporary_files()), 1)
        self.assertFalse(await self.h.client.stat_shard(self.h.addr, digest, 2))
        await upload.commit(digest, len(data))
        assert upload.data_dir is not None
        self.assertIn(upload.data_dir, self.h.store.data_dirs)
        path = self.h.store.shard_path(upload.data_dir, digest, 2)
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(self.h.store.locate(digest, 2), path)
        self.assertEqual(self.h.temporary_files(), [])
        self.assertTrue(await self.h.client.stat_shard(self.h.addr, digest, 2))

    async def test_commit_wrong_length(self) -> None:
        """
        A commit whose length disagrees with the blocks is refused and
        leaves nothing behind.
        """
        data = _content(100000)
        digest = hashlib.sha256(data).digest()
        upload = self.h.client.open_upload(self.h.addr, b"key", 0, PARAMS)
        for block in _shards(data)[0]:
            await upload.write_block(block)
        with self.assertRaises(PeerError) as caught:
            await upload.commit(digest, len(data) + 70000)
        self.assertEqual(caught.exception.status, 400)
        self.assertEqual(self.h.temporary_files(), [])
        self.assertIsNone(self.h.store.locate(digest, 0))

    async def test_abort_after_finish(self) -> None:
        """
        Aborting a finished upload removes its temporary file; a commit
        afterwards finds nothing.
        """
        data = _content(200000)
        digest = hashlib.sha256(data).digest()
        upload = self.h.client.open_upload(self.h.addr, b"key", 1, PARAMS)
        for block in _shards(data)[1]:
            await upload.write_block(block)
        await upload.finish()
        self.assertEqual(len(self.h.temporary_files()), 1)
        await upload.abort()
        self.assertEqual(self.h.temporary_files(), [])
        self.assertEqual(self.h.server.pending_uploads, 0)
        again = self.h.client.open_upload(self.h.addr, b"key", 1, PARAMS)
        await again.finish()
        await again.abort()
        with self.assertRaises(PeerError):
            await upload.commit(digest, len(data))
        http = HTTPClient(Agent(reactor, pool=self.h.pool))
        url = self.h.client.url(self.h.addr, f"/uploads/6b6579/1/commit?hash={digest.hex()}&length={len(data)}")
        response = await http.post(url)
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders(b"Anvil-Error"), [b"missing"])
        await response.content()

    async def test_abort_mid_body(self) -> None:
        """
        Aborting an upload part-way drops the connection; the server
        removes the temporary file.
        """
        upload = self.h.client.open_upload(self.h.addr, b"key", 0, PARAMS)
        for block in _shards(_content(4 * PARAMS.stripe_size))[0][:3]:
            await upload.write_block(block)
        await _eventually(lambda: len(self.h.temporary_files()) == 1)
        await upload.abort()
        await _eventually(lambda: self.h.temporary_files() == [] and self.h.server.pending_uploads == 0)
        with self.assertRaises(PeerError):
            await upload.write_block(b"x")

    async def test_disconnect_mid_body(self) -> None:
        """
        A client that hangs up in the middle of a block leaves no temporary
        file.
        """
        host, port = self.h.addr.split(":")
        endpoint = TCP4ClientEndpoint(reactor, host, int(port))
        protocol = await endpoint.connect(Factory.forProtocol(Protocol))
        frame = FRAME_HEADER.pack(PARAMS.block_size) + bytes(PARAMS.block_size)
        body = frame + frame[:1000]
        protocol.transport.write(
            b"PUT /cluster/v1/shards/uploads/6b6b/0?k=4&m=2&stripe_size=65536 HTTP/1.1\r\n"
            b"Host: x\r\nContent-Length: %d\r\n\r\n" % (len(frame) * 3) + body
        )
        await _eventually(lambda: len(self.h.temporary_files()) == 1)
        protocol.transport.loseConnection()
        await _eventually(lambda: self.h.temporary_files() == [] and self.h.server.pending_uploads == 0)

    async def test_truncated_body(self) -> None:
        """
        A body that ends cleanly but without its end frame is refused and
        leaves no temporary file; so is a wrong block count.
        """
        block = bytes(PARAMS.block_size)
        url = self.h.client.url(self.h.addr, "/uploads/6b6b/0?k=4&m=2&stripe_size=65536")
        http = HTTPClient(Agent(reactor, pool=self.h.pool))
        response = await http.put(url, data=FRAME_HEADER.pack(len(block)) + block)
        self.assertEqual(response.code, 400)
        self.assertEqual(response.headers.getRawHeaders(b"Anvil-Error"), [b"truncated"])
        await response.content()
        bad_count = FRAME_HEADER.pack(len(block)) + block + FRAME_HEADER.pack(0) + END_FRAME.pack(2)
        response = await http.put(url, data=bad_count)
        self.assertEqual(response.code, 400)
        await response.content()
        oversized = FRAME_HEADER.pack(len(block) + 1) + block + b"x"
        response = await http.put(url, data=oversized)
        self.assertEqual(response.code, 400)
        await response.content()
        self.assertEqual(self.h.temporary_files(), [])
        self.assertEqual(self.h.server.pending_uploads, 0)

    async def test_concurrent_put_refused(self) -> None:
        """
        A second PUT for an upload still receiving is refused (409); the
        first one completes.
        """
        data = _content(3 * PARAMS.stripe_size)
        digest = hashlib.sha256(data).digest()
        blocks = _shards(data)[0]
        first = self.h.client.open_upload(self.h.addr, b"key", 0, PARAMS)
        await first.write_block(blocks[0])
        await _eventually(lambda: self.h.server.pending_uploads == 1)
        second = self.h.client.open_upload(self.h.addr, b"key", 0, PARAMS)
        with self.assertRaises(PeerError) as caught:
            await second.finish()
        self.assertIn("409", str(caught.exception))
        for block in blocks[1:]:
            await first.write_block(block)
        await first.commit(digest, len(data))
        self.assertTrue(await self.h.client.stat_shard(self.h.addr, digest, 0))

    async def test_repeated_commit(self) -> None:
        """
        Repeating a successful commit (a lost reply) succeeds again.
        """
        data = _content(1000)
        digest = hashlib.sha256(data).digest()
        upload = self.h.client.open_upload(self.h.addr, b"key", 4, PARAMS)
        for block in _shards(data)[4]:
            await upload.write_block(block)
        await upload.commit(digest, len(data))
        first_dir = upload.data_dir
        upload._committed = False
        await upload.commit(digest, len(data))
        self.assertEqual(upload.data_dir, first_dir)

    async def test_missing(self) -> None:
        """
        Reading or statting a shard the peer does not have raises
        L{PeerShardMissing} / answers C{False}.
        """
        digest = hashlib.sha256(b"nothing").digest()
        with self.assertRaises(PeerShardMissing):
            await self.h.client.read_blocks(self.h.addr, digest, 0, PARAMS, 10, 0, 1)
        self.assertFalse(await self.h.client.stat_shard(self.h.addr, digest, 0))

    async def test_mismatch(self) -> None:
        """
        A read whose geometry or length disagrees with the shard's header
        is refused with L{PeerShardCorrupt} naming no stripe.
        """
        data = _content(3000)
        digest, _ = await self.h.upload(data, [0])
        with self.assertRaises(PeerShardCorrupt) as caught:
            await self.h.client.read_blocks(self.h.addr, digest, 0, PARAMS, len(data) + 1, 0, 1)
        self.assertIsNone(caught.exception.stripe)
        other = ErasureParams(4, 1, PARAMS.stripe_size)
        with self.assertRaises(PeerShardCorrupt):
            await self.h.client.read_blocks(self.h.addr, digest, 0, other, len(data), 0, 1)
        self.assertEqual(self.h.corrupt, [])

    async def test_corrupt_block(self) -> None:
        """
        A flipped byte in a committed block: the peer returns the good
        blocks before it and names its stripe, reports it through
        on_corrupt, and a read starting at it raises.
        """
        data = _content(6 * PARAMS.stripe_size)
        digest, shards = await self.h.upload(data, [2])
        path = self.h.store.locate(digest, 2)
        assert path is not None
        with open(path, "r+b") as f:
            f.seek(HEADER_SIZE + 3 * (PARAMS.block_size + 4) + 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))
        batch = await self.h.client.read_blocks(self.h.addr, digest, 2, PARAMS, len(data), 1, 5)
        self.assertEqual(batch, BlockBatch(shards[2][1:3], 3))
        self.assertEqual(self.h.corrupt, [(digest.hex(), 2, 3)])
        with self.assertRaises(PeerShardCorrupt) as caught:
            await self.h.client.read_blocks(self.h.addr, digest, 2, PARAMS, len(data), 3, 2)
        self.assertEqual(caught.exception.stripe, 3)
        after = await self.h.client.read_blocks(self.h.addr, digest, 2, PARAMS, len(data), 4, 2)
        self.assertEqual(after.blocks, shards[2][4:6])

    async def test_corrupt_header(self) -> None:
        """
        A damaged header makes reads raise L{PeerShardCorrupt} without a
        stripe, stat answer C{False}, and on_corrupt hear of it.
        """
        data = _content(3000)
        digest, _ = await self.h.upload(data, [5])
        path = self.h.store.locate(digest, 5)
        assert path is not None
        with open(path, "r+b") as f:
            f.seek(20)
            f.write(b"\xff")
        with self.assertRaises(PeerShardCorrupt) as caught:
            await self.h.client.read_blocks(self.h.addr, digest, 5, PARAMS, len(data), 0, 1)
        self.assertIsNone(caught.exception.stripe)
        self.assertFalse(await self.h.client.stat_shard(self.h.addr, digest, 5))
        self.assertEqual(self.h.corrupt[0], (digest.hex(), 5, None))

    async def test_delete_and_list(self) -> None:
        """
        list_shards pages through every shard with its size; delete_content
        removes one content's shards and reports how many.
        """
        a, _ = await self.h.upload(_content(5000, seed=1), key=b"a")
        b, _ = await self.h.upload(_content(9000, seed=2), [0, 3], key=b"b")
        expected = sorted([(a.hex(), i) for i in range(6)] + [(b.hex(), 0), (b.hex(), 3)])
        seen: list[tuple[str, int, int]] = []
        after = ""
        while True:
            page = await self.h.client.list_shards(self.h.addr, after, limit=3)
            seen.extend(page)
            if len(page) < 3:
                break
            after = f"{page[-1][0]}.{page[-1][1]}"
        self.assertEqual([(h, i) for h, i, _ in seen], expected)
        for h, i, size in seen:
            path = self.h.store.locate(bytes.fromhex(h), i)
            assert path is not None
            self.assertEqual(size, os.path.getsize(path))
        self.assertEqual(await self.h.client.delete_content(self.h.addr, a), 6)
        self.assertEqual(await self.h.client.delete_content(self.h.addr, a), 0)
        rest = await self.h.client.list_shards(self.h.addr)
        self.assertEqual([(h, i) for h, i, _ in rest], [(b.hex(), 0), (b.hex(), 3)])
        with self.assertRaises(PeerError) as caught:
            await self.h.client.list_shards(self.h.addr, "not-a-cursor")
        self.assertEqual(caught.exception.status, 400)

    async def test_delete_one_shard(self) -> None:
        """
        delete_shard removes exactly one shard of a content (in whichever
        data directory it is) and says whether there was one; the other
        shards still read back.
        """
        data = _content(3 * PARAMS.stripe_size + 17)
        digest, shards = await self.h.upload(data)
        path = self.h.store.locate(digest, 2)
        assert path is not None
        self.assertTrue(await self.h.client.delete_shard(self.h.addr, digest, 2))
        self.assertFalse(os.path.exists(path))
        self.assertIsNone(self.h.store.locate(digest, 2))
        self.assertFalse(await self.h.client.delete_shard(self.h.addr, digest, 2))
        self.assertFalse(await self.h.client.stat_shard(self.h.addr, digest, 2))
        left = await self.h.client.list_shards(self.h.addr)
        self.assertEqual([i for _, i, _ in left], [0, 1, 3, 4, 5])
        batch = await self.h.client.read_blocks(self.h.addr, digest, 5, PARAMS, len(data), 0, len(shards[5]))
        self.assertEqual(batch.blocks, shards[5])
        with self.assertRaises(PeerError) as caught:
            await self.h.client.request("shard_delete", "DELETE", self.h.client.url(self.h.addr, f"/{digest.hex()}/x"))
        self.assertEqual(caught.exception.status, 400)
        deleted = self.h.metrics.registry.get_sample_value(
            "anvil_peer_requests_total", {"kind": "shard_delete", "outcome": "ok"}
        )
        self.assertEqual(deleted, 2)

    async def test_metrics(self) -> None:
        """
        Each request counts once in peer_requests by kind and outcome.
        """
        data = _content(1000)
        digest, _ = await self.h.upload(data, [0])
        await self.h.client.stat_shard(self.h.addr, digest, 1)
        with self.assertRaises(PeerShardMissing):
            await self.h.client.read_blocks(self.h.addr, digest, 1, PARAMS, len(data), 0, 1)

        def count(kind: str, outcome: str) -> float:
            value = self.h.metrics.registry.get_sample_value(
                "anvil_peer_requests_total", {"kind": kind, "outcome": outcome}
            )
            return value or 0.0

        self.assertEqual(count("shard_put", "ok"), 1)
        self.assertEqual(count("shard_commit", "ok"), 1)
        self.assertEqual(count("shard_stat", "ok"), 1)
        self.assertEqual(count("shard_get", "error"), 1)

    async def test_connection_refused(self) -> None:
        """
        A peer that is not listening fails requests and uploads with
        L{PeerError}.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        addr = f"127.0.0.1:{port.getHost().port}"
        await port.stopListening()
        with self.assertRaises(PeerError):
            await self.h.client.stat_shard(addr, bytes(32), 0)
        upload = self.h.client.open_upload(addr, b"k", 0, PARAMS)
        with self.assertRaises(PeerError):
            await upload.write_block(b"x")
        await upload.abort()


class AuthorizeTests(TestCase):
    """
    The server's C{authorize} hook.
    """

    async def test_refused(self) -> None:
        """
        A request C{authorize} refuses is answered 403 and does nothing.
        """

        def refuse(request: Any) -> None:
            raise PermissionError("not a node")

        h = _Harness(self, authorize=refuse)
        h.listen_plain(self)
        with self.assertRaises(PeerError) as caught:
            await h.client.list_shards(h.addr)
        self.assertEqual(caught.exception.status, 403)
        upload = h.client.open_upload(h.addr, b"k", 0, PARAMS)
        with self.assertRaises(PeerError) as caught:
            await upload.finish()
        self.assertEqual(h.temporary_files(), [])


class ExpiryTests(TestCase):
    """
    Finished uploads that are never committed expire.
    """

    async def test_expired(self) -> None:
        """
        After upload_ttl the temporary file is removed and a commit fails.
        """
        clock = Clock()
        h = _Harness(self, server_clock=clock)
        h.listen_plain(self)
        data = _content(70000)
        digest = hashlib.sha256(data).digest()
        upload = h.client.open_upload(h.addr, b"key", 0, PARAMS)
        for block in _shards(data)[0]:
            await upload.write_block(block)
        await upload.finish()
        self.assertEqual(len(h.temporary_files()), 1)
        clock.advance(899)
        self.assertEqual(h.server.pending_uploads, 1)
        clock.advance(2)
        await _eventually(lambda: h.temporary_files() == [])
        self.assertEqual(h.server.pending_uploads, 0)
        with self.assertRaises(PeerShardMissing):
            await upload.commit(digest, len(data))

    async def test_idle_body(self) -> None:
        """
        A sender silent mid-body for the idle timeout loses its upload.
        """
        clock = Clock()
        h = _Harness(self, server_clock=clock)
        h.listen_plain(self)
        upload = h.client.open_upload(h.addr, b"key", 0, PARAMS)
        await upload.write_block(bytes(PARAMS.block_size))
        await _eventually(lambda: len(h.temporary_files()) == 1)
        # Let the server finish writing that block and wait for more.
        await _eventually(lambda: h.io.pending == 0)
        await deferLater(reactor, 0.05, lambda: None)
        clock.advance(121)
        await _eventually(lambda: h.temporary_files() == [] and h.server.pending_uploads == 0)
        await upload.abort()


class _Silent(Protocol):
    """
    Accepts a connection, never reads from it and never answers.
    """

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.factory.connections.append(self)  # type: ignore[attr-defined]


class _SilentFactory(Factory):
    protocol = _Silent

    def __init__(self) -> None:
        self.connections: list[_Silent] = []


class _Sink(Protocol):
    """
    Reads and drops everything once resumed.
    """

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)  # type: ignore[attr-defined]


class StalledPeerTests(TestCase):
    """
    Timeouts and flow control against a peer that does not keep up.
    """

    timeout = 30

    def setUp(self) -> None:
        self.factory = _SilentFactory()
        self.factory.received = 0  # type: ignore[attr-defined]
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addr = f"127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.metrics = Metrics()

    def client(self, timeout: float) -> PeerClient:
        """
        A client over plain HTTP with the given timeout.
        """
        http = HTTPClient(Agent(reactor, pool=self.pool))
        return PeerClient(http, reactor, timeout, self.metrics, scheme="http")

    def tearDown(self) -> None:
        for connection in self.factory.connections:
            connection.transport.abortConnection()

    async def test_read_timeout(self) -> None:
        """
        A peer that never answers fails a read with L{PeerTimeout} after
        the timeout.
        """
        client = self.client(0.3)
        started = time.monotonic()
        with self.assertRaises(PeerTimeout):
            await client.read_blocks(self.addr, bytes(32), 0, PARAMS, 10, 0, 1)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "anvil_peer_requests_total", {"kind": "shard_get", "outcome": "timeout"}
            ),
            1,
        )

    async def test_backpressure_then_timeout(self) -> None:
        """
        A peer that stops reading makes write_block stop returning with a
        bounded amount sent; after the timeout it raises L{PeerTimeout}.
        """
        client = self.client(1.5)
        upload = client.open_upload(self.addr, b"key", 0, PARAMS)
        block = bytes(PARAMS.block_size)
        returned = []

        async def writer() -> None:
            for _ in range(2000):  # 125 MiB if nothing pushed back
                await upload.write_block(block)
                returned.append(time.monotonic())

        writing = Deferred.fromCoroutine(writer())
        await _eventually(lambda: len(self.factory.connections) == 1)
        await deferLater(reactor, 0.8, lambda: None)
        self.assertFalse(writing.called)
        stuck_at = len(returned)
        # Only what the kernel's socket buffers hold got through.
        self.assertLess(stuck_at * PARAMS.block_size, 24 * 1024 * 1024)
        with self.assertRaises(PeerTimeout):
            await writing
        self.assertEqual(len(returned), stuck_at)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "anvil_peer_requests_total", {"kind": "shard_put", "outcome": "timeout"}
            ),
            1,
        )

    async def test_backpressure_resumes(self) -> None:
        """
        When the stalled peer starts reading again, write_block returns
        again and every block arrives.
        """
        client = self.client(30)
        upload = client.open_upload(self.addr, b"key", 0, PARAMS)
        block = bytes(PARAMS.block_size)
        total = 600
        returned = []

        async def writer() -> None:
            for _ in range(total):
                await upload.write_block(block)
                returned.append(1)

        writing = Deferred.fromCoroutine(writer())
        await _eventually(lambda: len(self.factory.connections) == 1)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(writing.called)
        self.assertLess(len(returned), total)
        connection = self.factory.connections[0]
        connection.dataReceived = lambda data: setattr(  # type: ignore[method-assign]
            self.factory, "received", self.factory.received + len(data)  # type: ignore[attr-defined]
        )
        connection.transport.resumeProducing()
        await writing
        self.assertEqual(len(returned), total)
        await _eventually(
            lambda: self.factory.received > total * PARAMS.block_size  # type: ignore[attr-defined]
        )
        await upload.abort()


class ServerFlowControlTests(TestCase):
    """
    End-to-end flow control: a server whose disk is stuck slows the sender.
    """

    timeout = 30

    async def test_stuck_disk(self) -> None:
        """
        While the server's io pool is blocked, write_block stops returning
        with a bounded amount sent; once it unblocks, the upload completes.
        """
        h = _Harness(self, io_threads=1)
        h.listen_plain(self)
        gate = threading.Event()
        self.addCleanup(gate.set)
        blocked = h.io.run(gate.wait)
        # Shard 0 of a 4+2 content of 200 stripes of 1 MiB: 50 MiB of 256
        # KiB blocks, far more than socket buffers hold.
        params = ErasureParams(4, 2, 1024 * 1024)
        blocks = [_content(params.block_size, seed=n % 7) for n in range(200)]
        length = 200 * params.stripe_size
        digest = hashlib.sha256(b"stand-in").digest()
        upload = h.client.open_upload(h.addr, b"key", 0, params)
        sent = []

        async def writer() -> None:
            for block in blocks:
                await upload.write_block(block)
                sent.append(1)
            await upload.commit(digest, length)

        writing = Deferred.fromCoroutine(writer())
        await deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(writing.called)
        self.assertLess(len(sent), len(blocks))
        self.assertLess(len(sent) * params.block_size, 24 * 1024 * 1024)
        gate.set()
        await blocked
        await writing
        self.assertEqual(len(sent), len(blocks))
        batch = await h.client.read_blocks(h.addr, digest, 0, params, length, 0, len(blocks))
        self.assertEqual(batch.blocks, blocks)


class MutualTLSTests(TestCase):
    """
    The client and server over the cluster's mutual TLS.
    """

    timeout = 30

    async def test_round_trip_over_tls(self) -> None:
        """
        With ClusterTLSPolicy on the client and server_context on the
        listener, shards go and come back byte-exact, and the server's
        authorize hook sees the client's node id.
        """
        ca = ClusterCA.generate(time.time())
        dirs = []
        for name in ("a", "b"):
            d = os.path.join(self.mktemp(), name)
            os.makedirs(d)
            dirs.append(d)
        server_identity = NodeIdentity.load_or_create(dirs[0], NODE_A, ca, time.time())
        client_identity = NodeIdentity.load_or_create(dirs[1], NODE_B, ca, time.time())
        callers: list[str] = []
        h = _Harness(self, authorize=lambda request: callers.append(peer_node_id(request.transport)))
        factory = TLSMemoryBIOFactory(server_context(server_identity, ca), False, h.site)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        h.addr = f"127.0.0.1:{port.getHost().port}"
        policy = ClusterTLSPolicy(client_identity, ca, lambda host, port: NODE_A)
        http = HTTPClient(Agent(reactor, contextFactory=policy, pool=h.pool))
        h.client = PeerClient(http, reactor, 10.0, h.metrics)
        data = _content(3 * PARAMS.stripe_size + 777)
        digest, shards = await h.upload(data)
        for index in range(PARAMS.total):
            batch = await h.client.read_blocks(h.addr, digest, index, PARAMS, len(data), 0, 4)
            self.assertEqual(batch.blocks, shards[index])
        self.assertTrue(callers)
        self.assertEqual(set(callers), {NODE_B})
