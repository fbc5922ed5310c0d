# -*- test-case-name: tests.test_erasure -*-
"""
Pipeline micro-benchmark: what this machine can do per byte uploaded.

A PUT computes MD5 (the ETag) and SHA-256 (the content address) of the
body, erasure-codes it stripe by stripe with zfec and checksums every block
(CRC-32) before it reaches a disk. This script measures each step alone and
the steps combined, in one thread and across two threads, on the same
random data and in-process, so the node's S3 figures can be put next to the
machine's limit. It prints one line per figure, C{name: value unit}.

The C{engine} figures measure the storage engine itself, the ceiling of
the node's PUT and GET without HTTP, SigV4 or PostgreSQL: the same bytes
written through L{anvil.storage.engine.ContentWriter} in 64 KiB pieces (as
an upload body arrives) and committed (headers, fsyncs, renames) into
C{--engine-dirs} data directories under a temporary directory, then read
back through C{engine.read}, by one stream and by several concurrent
streams (disjoint parts of the data), with a CPU pool of one thread per CPU
and an io pool of two threads, on a private Twisted reactor. Each is timed
once (the page cache is warm for reads: the bytes were just written).

Run::

    PYTHONPATH=. python bench/pipeline.py --size-mib 256 --k 4 --m 2 --stripe-size 1048576

All figures are MB/s (10^6 bytes per second) of object data, best of
C{--repeat} runs for the in-process steps.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zfec
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from anvil.storage.cpu import CpuPool
from anvil.storage.engine import StorageEngine
from anvil.storage.erasure import ErasureCodec, ErasureParams
from anvil.storage.shardstore import LocalShardStore

#: Bytes per ContentWriter.write in the engine figures (an HTTP body arrives
#: in pieces of about this size).
_PIECE = 65536


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _stripes(view: memoryview, stripe_size: int) -> list[memoryview]:
    return [view[i : i + stripe_size] for i in range(0, len(view), stripe_size)]


def _private_reactor() -> Any:
    """
    A reactor instance of our own, never installed as the global one, so
    the engine figures also run inside a process that has one (the smoke
    test under trial).
    """
    try:
        from twisted.internet.epollreactor import EPollReactor

        return EPollReactor()  # type: ignore[no-untyped-call]
    except ImportError:  # pragma: no cover - not Linux
        from twisted.internet.selectreactor import SelectReactor

        return SelectReactor()


def engine_figures(
    data: bytes,
    params: ErasureParams,
    streams: list[int],
    dirs: int,
    tmp: str | None,
) -> list[tuple[str, float, int]]:
    """
    Write C{data} through the storage engine and read it back, once per
    stream count, with real thread pools.

    @param data: The bytes; with C{n} streams each writes and reads
        C{len(data) // n} of them.
    @param params: The erasure geometry.
    @param streams: Stream counts to measure (for example C{[1, 4]}).
    @param dirs: Data directories of the shard store.
    @param tmp: Where to create the temporary data directories.
    @return: C{(name, seconds, bytes)} per figure.
    """
    reactor = _private_reactor()
    base = tempfile.mkdtemp(prefix="anvil-bench-", dir=tmp)
    store = LocalShardStore([os.path.join(base, f"disk{i}") for i in range(dirs)])
    cpu = CpuPool(reactor, max_threads=os.cpu_count() or 1, name="bench-cpu")
    io = CpuPool(reactor, max_threads=2, name="bench-io")
    engine = StorageEngine(params, store, cpu, io, inline_threshold=0)
    figures: list[tuple[str, float, int]] = []
    view = memoryview(data)

    async def write_one(part: memoryview) -> Any:
        writer = engine.new_writer()
        for offset in range(0, len(part), _PIECE):
            await writer.write(part[offset : offset + _PIECE])
        record = await writer.finish()
        await writer.commit()
        return record

    async def read_one(record: Any, expected_crc: int, expected_size: int) -> None:
        # CRC-32 (over 1 GB/s) checks the bytes without costing much of the
        # time measured; comparing slices would cost more than the read.
        got, crc = 0, 0
        async for chunk in engine.read(record):
            crc = zlib.crc32(chunk, crc)
            got += len(chunk)
        if (got, crc) != (expected_size, expected_crc):
            raise AssertionError(f"engine read returned wrong bytes ({got} of {expected_size})")

    async def measure() -> None:
        cpu.startService()
        io.startService()
        try:
            for count in streams:
                share = len(data) // count
                parts = [view[i * share : (i + 1) * share] for i in range(count)]
                label = f"{count} stream" + ("s" if count > 1 else "")
                start = time.perf_counter()
                records = await gatherResults([Deferred.fromCoroutine(write_one(p)) for p in parts])
                figures.append((f"engine write, {label}", time.perf_counter() - start, share * count))
                crcs = [zlib.crc32(p) for p in parts]
                start = time.perf_counter()
                await gatherResults(
                    [Deferred.fromCoroutine(read_one(r, c, share)) for r, c in zip(records, crcs)]
                )
                figures.append((f"engine read, {label}", time.perf_counter() - start, share * count))
                for record in records:
                    await engine.delete_content(record.hash)
        finally:
            await cpu.stopService()
            await io.stopService()

    outcome: list[Failure | None] = []

    def start() -> None:
        d = Deferred.fromCoroutine(measure())
        d.addCallbacks(lambda _: outcome.append(None), outcome.append)
        d.addBoth(lambda _: reactor.stop())

    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if outcome and outcome[0] is not None:
        outcome[0].raiseException()
    return figures


def main(argv: list[str] | None = None) -> int:
    """
    Parse arguments, run every measurement and print one line per figure.

    @param argv: Command-line arguments (default C{sys.argv[1:]}).
    @return: The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="MiB of random data (default 256)")
    parser.add_argument("--k", type=int, default=4, help="data blocks per stripe (default 4)")
    parser.add_argument("--m", type=int, default=2, help="parity blocks per stripe (default 2)")
    parser.add_argument("--stripe-size", type=int, default=1 << 20, help="bytes per stripe (default 1 MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, best kept (default 3)")
    parser.add_argument(
        "--engine-streams",
        default="1,4",
        help="comma-separated concurrent streams for the engine figures, empty to skip (default 1,4)",
    )
    parser.add_argument("--engine-dirs", type=int, default=1, help="data directories for the engine (default 1)")
    parser.add_argument(
        "--engine-tmp", default=None, help="where the engine's data directories go (default: the temp dir)"
    )
    args = parser.parse_args(argv)

    params = ErasureParams(args.k, args.m, args.stripe_size)
    codec = ErasureCodec(params)
    data = os.urandom(args.size_mib << 20)
    view = memoryview(data)
    stripes = _stripes(view, params.stripe_size)
    half = len(stripes) // 2
    size = len(data)

    def report(name: str, seconds: float, nbytes: int = size) -> None:
        print(f"{name}: {nbytes / max(seconds, 1e-9) / 1e6:.0f} MB/s", flush=True)

    print(
        f"# {args.size_mib} MiB random data, k={params.k} m={params.m} "
        f"stripe={params.stripe_size} B, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
        f"zfec {zfec.__version__}",
        flush=True,
    )

    def md5() -> None:
        h = hashlib.md5()
        for s in stripes:
            h.update(s)

    def sha256() -> None:
        h = hashlib.sha256()
        for s in stripes:
            h.update(s)

    def crc32() -> None:
        for s in stripes:
            zlib.crc32(s)

    report("md5", _best(md5, args.repeat))
    report("sha256", _best(sha256, args.repeat))
    report("crc32 (block checksums)", _best(crc32, args.repeat))

    # zfec alone on pre-split views: the native ceiling for the codec.
    encoder = zfec.Encoder(params.k, params.total) if params.m else None
    parity_ids = tuple(range(params.k, params.total))
    bs = params.block_size
    # Full stripes only: zfec needs equal blocks and padding is our work.
    full = [s for s in stripes if len(s) == params.stripe_size]
    presplit = [tuple(s[i * bs : (i + 1) * bs] for i in range(params.k)) for s in full]

    def zfec_native() -> None:
        if encoder is not None:
            for blocks in presplit:
                encoder.encode(blocks, parity_ids)

    def encode() -> None:
        for s in stripes:
            codec.encode_stripe(s)

    def encode_copying() -> None:
        # What encode would cost if data blocks were copied into bytes.
        for s in stripes:
            [bytes(b) for b in codec.encode_stripe(s)]

    report(
        f"zfec native encode {params.k}+{params.m} (parity only)",
        _best(zfec_native, args.repeat),
        len(full) * params.stripe_size,
    )
    report(f"zfec encode {params.k}+{params.m} (ErasureCodec.encode_stripe)", _best(encode, args.repeat))
    report(f"zfec encode {params.k}+{params.m} with copied data blocks", _best(encode_copying, args.repeat))

    encoded = [codec.encode_stripe(s) for s in stripes[: min(len(stripes), 64)]]
    sample = sum(len(s) for s in stripes[: len(encoded)])
    lost = min(params.m, params.k)
    survivors = list(range(lost, params.total))[: params.k]

    def decode_data() -> None:
        for s, blocks in zip(stripes, encoded):
            codec.decode_stripe(dict(enumerate(blocks[: params.k])), len(s))

    def decode_parity() -> None:
        for s, blocks in zip(stripes, encoded):
            codec.decode_stripe({i: blocks[i] for i in survivors}, len(s))

    report("decode from data blocks (join)", _best(decode_data, args.repeat), sample)
    report(f"decode with {lost} data blocks lost", _best(decode_parity, args.repeat), sample)

    def pipeline(part: list[memoryview]) -> None:
        md, sh = hashlib.md5(), hashlib.sha256()
        for s in part:
            md.update(s)
            sh.update(s)
            for block in codec.encode_stripe(s):
                zlib.crc32(block)

    report("md5+sha256+encode+crc32, 1 thread", _best(lambda: pipeline(stripes), args.repeat))

    with ThreadPoolExecutor(2) as pool:

        def two_streams() -> None:
            # Two uploads at once, each on its own thread.
            for f in [pool.submit(pipeline, stripes[:half]), pool.submit(pipeline, stripes[half:])]:
                f.result()

        def one_stream_split() -> None:
            # One upload, its work split over two threads stripe by stripe:
            # MD5 on one thread, SHA-256 + encode + CRC on the other.
            md, sh = hashlib.md5(), hashlib.sha256()

            def rest(s: memoryview) -> None:
                sh.update(s)
                for block in codec.encode_stripe(s):
                    zlib.crc32(block)

            for s in stripes:
                a, b = pool.submit(md.update, s), pool.submit(rest, s)
                a.result()
                b.result()

        report("md5+sha256+encode+crc32, 2 threads, 2 streams", _best(two_streams, args.repeat))
        report("md5+sha256+encode+crc32, 2 threads, 1 stream split", _best(one_stream_split, args.repeat))

    streams = [int(n) for n in args.engine_streams.split(",") if n.strip()]
    if streams:
        for name, seconds, nbytes in engine_figures(data, params, streams, args.engine_dirs, args.engine_tmp):
            report(name, seconds, nbytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
