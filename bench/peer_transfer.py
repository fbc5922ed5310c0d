# -*- test-case-name: tests.test_peer_shards -*-
"""
Peer shard transfer benchmark: how fast one node streams a shard to another
and reads it back, over loopback mutual TLS, through the real code paths.

A L{anvil.cluster.shardserver.ShardServer} is served by an
L{anvil.web.server.AnvilSite} under the cluster's mutual TLS
(L{anvil.cluster.tls.server_context}, a throwaway L{ClusterCA}) on
127.0.0.1, over a L{LocalShardStore} in a temporary directory (or
C{--dir}); a L{PeerClient} with L{ClusterTLSPolicy} and a persistent
connection pool, in the same process and on the same reactor, then:

  - B{put}: streams one shard of C{--size-mib} MiB with
    L{ShardUpload.write_block} (blocks of C{stripe_size / k} bytes), then
    C{finish} and C{commit} (header, fsync, rename);
  - B{get}: reads it back with L{PeerClient.read_blocks} in windows of
    C{--window-mib} MiB, one request after another.

With C{--streams N}, N shards are sent (and read) concurrently on N
connections. Client and server share one process and one core's reactor,
so the figures are a lower bound for two nodes on two machines.

Run::

    PYTHONPATH=. python bench/peer_transfer.py --size-mib 256

Figures are MB/s (10^6 bytes per second) of shard bytes.

Measured on the 2-core development VM, shared with other test runs (load
average 3 to 7, so the spread is wide), 256 MiB shard, 256 KiB blocks:

    mutual TLS   put 43-100 MB/s, get 48-137 MB/s (best at load ~3)
    plain HTTP   put 121-142 MB/s, get 187-223 MB/s

Both ends share one reactor thread here: per-TLS-record Python work in
Twisted's TLS layer and pyOpenSSL, not AES, bounds the TLS figures (the
profile shows SSL_read/SSL_write and their wrappers on top; AES-GCM alone
runs at about 3.4 GB/s on this CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent, HTTPConnectionPool

from anvil.cluster.ca import ClusterCA
from anvil.cluster.listener import ClusterRoot
from anvil.cluster.peers import PeerClient
from anvil.cluster.shardserver import ShardServer
from anvil.cluster.tls import ClusterTLSPolicy, NodeIdentity, server_context
from anvil.metrics import Metrics
from anvil.storage.cpu import CpuPool
from anvil.storage.erasure import ErasureParams
from anvil.storage.shardstore import LocalShardStore
from anvil.web.server import AnvilSite

NODE_SERVER = "5e" * 16
NODE_CLIENT = "c1" * 16


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """
    Set up the server and the client, stream, read, and print the figures.
    """
    base = args.dir or tempfile.mkdtemp(prefix="anvil-peer-bench-")
    try:
        await _measure(reactor, args, base)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


async def _measure(reactor: Any, args: argparse.Namespace, base: str) -> None:
    params = ErasureParams(args.k, args.m, args.stripe_size)
    ca = ClusterCA.generate(time.time())
    ids = []
    for name, node in (("server", NODE_SERVER), ("client", NODE_CLIENT)):
        d = os.path.join(base, name)
        os.makedirs(d, exist_ok=True)
        ids.append(NodeIdentity.load_or_create(d, node, ca, time.time()))
    store = LocalShardStore([os.path.join(base, "server", "shards")])
    io = CpuPool(reactor, max_threads=2, name="bench-io")
    io.startService()
    server = ShardServer(store, io, reactor)
    root = ClusterRoot()
    root.register(b"shards", server)
    site = AnvilSite(root, Metrics(), reactor)
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(server_context(ids[0], ca), False, site), interface="127.0.0.1")
    addr = f"127.0.0.1:{port.getHost().port}"
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max(2, args.streams)
    policy = ClusterTLSPolicy(ids[1], ca, lambda host, p: NODE_SERVER)
    scheme = "https"
    if args.plain:
        await port.stopListening()
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        addr = f"127.0.0.1:{port.getHost().port}"
        scheme = "http"
    client = PeerClient(HTTPClient(Agent(reactor, contextFactory=policy, pool=pool)), reactor, 30.0, scheme=scheme)

    blocks_per_shard = (args.size_mib << 20) // params.block_size
    content_length = blocks_per_shard * params.stripe_size
    distinct = [os.urandom(params.block_size) for _ in range(16)]
    digest = hashlib.sha256(b"peer-transfer-bench").digest()
    shard_bytes = blocks_per_shard * params.block_size * args.streams

    async def put(index: int) -> float:
        upload = client.open_upload(addr, b"bench", index, params)
        for n in range(blocks_per_shard):
            await upload.write_block(distinct[n % 16])
        await upload.finish()
        started = time.perf_counter()
        await upload.commit(digest, content_length)
        return time.perf_counter() - started

    started = time.perf_counter()
    commits = await gatherResults([Deferred.fromCoroutine(put(i)) for i in range(args.streams)])
    put_seconds = time.perf_counter() - started

    window = max(1, (args.window_mib << 20) // params.block_size)

    async def get(index: int) -> None:
        for first in range(0, blocks_per_shard, window):
            count = min(window, blocks_per_shard - first)
            batch = await client.read_blocks(addr, digest, index, params, content_length, first, count)
            assert batch.corrupt_stripe is None and len(batch.blocks) == count
            assert batch.blocks[0] == distinct[first % 16]

    started = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(get(i)) for i in range(args.streams)])
    get_seconds = time.perf_counter() - started

    label = f"{'plain HTTP' if args.plain else 'mutual TLS'}, {args.streams} stream(s), {params.block_size >> 10} KiB blocks"
    print(f"put {args.size_mib} MiB/shard ({label}): {shard_bytes / put_seconds / 1e6:.1f} MB/s"
          f"  ({put_seconds:.2f} s, commit {max(commits) * 1000:.0f} ms)")
    print(f"get, {args.window_mib} MiB windows ({label}): {shard_bytes / get_seconds / 1e6:.1f} MB/s"
          f"  ({get_seconds:.2f} s)")
    await pool.closeCachedConnections()
    await port.stopListening()
    await server.stop()
    await io.stopService()


def main(argv: list[str] | None = None) -> None:
    """
    Parse the arguments and run the benchmark on the global reactor.

    @param argv: Command-line arguments (default C{sys.argv[1:]}).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="MiB per shard (default 256)")
    parser.add_argument("--k", type=int, default=4, help="data blocks per stripe (default 4)")
    parser.add_argument("--m", type=int, default=2, help="parity blocks per stripe (default 2)")
    parser.add_argument("--stripe-size", type=int, default=1 << 20, help="bytes per stripe (default 1 MiB)")
    parser.add_argument("--window-mib", type=int, default=4, help="MiB per read request (default 4)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent shards (default 1)")
    parser.add_argument("--plain", action="store_true", help="plain HTTP instead of mutual TLS")
    parser.add_argument("--dir", default=None, help="where the shard store goes (default: a temp dir)")
    args = parser.parse_args(argv)
    react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
