# -*- test-case-name: tests.test_erasure -*-
"""
Pipeline micro-benchmark: what this machine can do per byte uploaded.

A PUT computes MD5 (the ETag) and SHA-256 (the content address) of the
body, erasure-codes it stripe by stripe with zfec and checksums every block
(CRC-32) before it reaches a disk. This script measures each step alone and
the steps combined, in one thread and across two threads, on the same
random data and in-process, so the node's S3 figures can be put next to the
machine's limit. It prints one line per figure, C{name: value unit}.

Run::

    PYTHONPATH=. python bench/pipeline.py --size-mib 256 --k 4 --m 2 --stripe-size 1048576

All figures are MB/s (10^6 bytes per second) of object data, best of
C{--repeat} runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import zfec

from anvil.storage.erasure import ErasureCodec, ErasureParams


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _stripes(view: memoryview, stripe_size: int) -> list[memoryview]:
    return [view[i : i + stripe_size] for i in range(0, len(view), stripe_size)]


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
