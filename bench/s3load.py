# -*- test-case-name: tests.test_s3_objects -*-
"""
S3 load generator (boto3): PUT and GET throughput and latency against any
S3 endpoint, a listing benchmark, and the node's peak memory.

Examples::

    # 16 x 64 MiB at concurrency 4, PUT then GET (every GET verified)
    python bench/s3load.py --credentials /var/lib/anvil/credentials.json \\
        --size 64MiB --count 16 --concurrency 4 --op both

    # 2,000 x 4 KiB at concurrency 16, the client spread over 3 processes
    # (boto3 costs a few ms of CPU per request under one GIL)
    python bench/s3load.py --credentials credentials.json \\
        --size 4KiB --count 2000 --concurrency 16 --processes 3 --op both

    # listing 10,000 keys, 1,000 per page
    python bench/s3load.py --credentials credentials.json --list-keys 10000

    # one 1 GiB object up and down while sampling the node's RSS
    python bench/s3load.py --credentials credentials.json --size 1GiB \\
        --count 1 --concurrency 1 --op both --rss-pid $(pgrep -f 'twistd.*anvil')

PUT bodies are sent as C{UNSIGNED-PAYLOAD} (C{--payload signed} to sign
their SHA-256, which botocore otherwise always does over plain HTTP).
Every object has its own random content (so deduplication cannot flatter
the figures: a unique 16-byte header, then a shared random block cycled
from a per-object offset, generated as it is sent); GET verifies the
SHA-256 of what was read against the SHA-256 of what was written (computed
before the timed phases), and the run fails if any differs. The tool never
holds an object whole in memory (a 1 GiB object costs a few MiB here).

Output is one line per figure::

    put   16 objects x 64.0 MiB  concurrency 4  total 3.21 s  334.5 MB/s  5.0 ops/s  p50 0.791 s  p99 0.845 s

MB/s is 10**6 bytes per second of object data, as the issue's targets
count it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
}

#: Bytes generated per block of a body stream.
_BLOCK = 1024 * 1024


def parse_size(text: str) -> int:
    """
    Parse a size such as C{64MiB}, C{4KiB}, C{1GiB}, C{1000} or C{2MB}.

    @param text: the size.
    @return: bytes.
    @raise argparse.ArgumentTypeError: for an unknown form.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4KiB, 64MiB, 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def human(size: int) -> str:
    """@return: C{size} in binary units, e.g. C{64.0 MiB}."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


#: One random block shared by every body; each body starts with a unique
#: 16-byte header and continues with this block cycled from a
#: seed-dependent offset, so bodies differ (no deduplication) yet cost
#: nothing to generate.
_PATTERN = os.urandom(_BLOCK)
_PATTERN2 = memoryview(_PATTERN + _PATTERN)


class BodyStream:
    """
    A readable, seekable body of C{size} bytes derived from a seed, never
    held whole in memory.
    """

    def __init__(self, seed: int, size: int) -> None:
        self._header = seed.to_bytes(16, "big")[: min(16, size)]
        self._offset = seed % _BLOCK
        self._size = size
        self._position = 0

    def __len__(self) -> int:
        return self._size

    def read(self, amount: int = -1) -> bytes:
        """@return: up to C{amount} next bytes (all remaining for -1)."""
        remaining = self._size - self._position
        if amount is None or amount < 0 or amount > remaining:
            amount = remaining
        out: list[bytes | memoryview] = []
        position, end = self._position, self._position + amount
        if position < len(self._header):
            piece = self._header[position:end]
            out.append(piece)
            position += len(piece)
        while position < end:
            start = (self._offset + position) % _BLOCK
            take = min(end - position, _BLOCK)
            out.append(_PATTERN2[start : start + take])
            position += take
        self._position = end
        return (
            out[0].tobytes() if len(out) == 1 and isinstance(out[0], memoryview) else b"".join(out)
        )

    def seek(self, offset: int, whence: int = 0) -> int:
        """Seek (only within the body)."""
        if whence == 1:
            offset += self._position
        elif whence == 2:
            offset += self._size
        if not 0 <= offset <= self._size:
            raise OSError(f"cannot seek to {offset}")
        self._position = offset
        return offset

    def tell(self) -> int:
        """@return: the position."""
        return self._position


def body_digest(seed: int, size: int) -> str:
    """@return: the SHA-256 of the body of C{seed}, computed in pieces."""
    stream = BodyStream(seed, size)
    sha = hashlib.sha256()
    while data := stream.read(4 * _BLOCK):
        sha.update(data)
    return sha.hexdigest()


@dataclass
class Figures:
    """
    Timings of one phase.

    @ivar latencies: seconds per operation.
    @ivar elapsed: wall-clock seconds of the whole phase.
    @ivar errors: failure descriptions.
    """

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        """@return: the latency below which C{fraction} of the operations fall."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        # Nearest rank: the smallest value with at least this fraction at
        # or below it.
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return ordered[index]


def run_parallel(indices: Sequence[int], concurrency: int, work: Callable[[int], None]) -> Figures:
    """
    Run C{work(i)} for every i in C{indices} on C{concurrency} threads.

    @return: the figures (a failing operation is recorded, not raised).
    """
    figures = Figures()
    lock = threading.Lock()

    def one(index: int) -> None:
        started = time.perf_counter()
        try:
            work(index)
        except Exception as e:  # noqa: BLE001 - reported in the summary
            with lock:
                figures.errors.append(f"#{index}: {type(e).__name__}: {e}")
            return
        elapsed = time.perf_counter() - started
        with lock:
            figures.latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, indices))
    figures.elapsed = time.perf_counter() - started
    return figures


def report(name: str, figures: Figures, count: int, size: int, concurrency: int) -> str:
    """@return: the one-line summary of a phase."""
    done = len(figures.latencies)
    seconds = figures.elapsed or 1e-9
    line = (
        f"{name:<5} {count} objects x {human(size)}  concurrency {concurrency}  "
        f"total {figures.elapsed:.2f} s  {done * size / seconds / 1e6:.1f} MB/s  "
        f"{done / seconds:.1f} ops/s  p50 {figures.percentile(0.5):.3f} s  "
        f"p99 {figures.percentile(0.99):.3f} s"
    )
    if figures.errors:
        line += f"  ERRORS {len(figures.errors)}"
    return line


class RssSampler:
    """
    Sample C{VmRSS} of a process from /proc in a background thread.

    @ivar peak_kib: the largest value seen, in KiB.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._path = f"/proc/{pid}/status"
        self._interval = interval
        self._stop = threading.Event()
        self.peak_kib = 0
        self.start_kib = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """@return: the current VmRSS in KiB (0 if the process is gone)."""
        try:
            with open(self._path) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:  # noqa: PYI034 - never subclassed
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.sample())


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """
    @return: the user plus system CPU time the processes C{pids} have used
        so far, from /proc (a process that is gone counts 0).
    """
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def parse_cpu_group(text: str) -> tuple[str, list[int]]:
    """
    Parse a C{--cpu} value, C{NAME=PID[,PID...]}.

    @raise argparse.ArgumentTypeError: for anything else.
    """
    name, sep, pids = text.partition("=")
    try:
        numbers = [int(p) for p in pids.replace(" ", ",").split(",") if p]
    except ValueError:
        numbers = []
    if not sep or not name or not numbers:
        raise argparse.ArgumentTypeError(f"expected NAME=PID[,PID...], not {text!r}")
    return name, numbers


def load_credentials(path: str) -> dict[str, str]:
    """@return: the node's credentials.json (access key, secret, region, endpoint)."""
    with open(path) as f:
        data: dict[str, str] = json.load(f)
    return data


def make_client(args: argparse.Namespace) -> Any:
    """@return: a boto3 S3 client configured from the arguments."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=args.endpoint,
        region_name=args.region,
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        config=Config(
            # UNSIGNED-PAYLOAD (as SDKs send over HTTPS) unless --payload
            # signed: over plain HTTP botocore otherwise hashes every body
            # before sending it, which on a small machine shared with the
            # node measures the client's SHA-256 rather than the node.
            s3={
                "addressing_style": "path",
                "payload_signing_enabled": args.payload == "signed",
            },
            max_pool_connections=max(10, args.concurrency * 2),
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=30,
            read_timeout=600,
            # Checksums off: the node's own verification is what is measured,
            # not the client's CRC over every byte.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def ensure_bucket(client: Any, bucket: str, region: str = "us-east-1") -> None:
    """Create the bucket in C{region} unless the caller already owns it."""
    from botocore.exceptions import ClientError

    where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **where)
    except ClientError as e:
        if e.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise


@dataclass(frozen=True)
class Plan:
    """
    What one run writes and reads (sent to worker processes).

    @ivar bucket: the bucket.
    @ivar size: bytes per object.
    @ivar keys: the object keys.
    @ivar seeds: the body seed of each object.
    @ivar digests: the SHA-256 of each body (for GET verification).
    """

    bucket: str
    size: int
    keys: list[str]
    seeds: list[int]
    digests: list[str]


def operate(client: Any, plan: Plan, op: str, index: int) -> None:
    """
    One operation on object C{index}: C{put}, C{get} (verified) or
    C{delete}.

    @raise ValueError: when a GET does not return exactly what was written.
    """
    key = plan.keys[index]
    if op == "put":
        client.put_object(
            Bucket=plan.bucket,
            Key=key,
            Body=BodyStream(plan.seeds[index], plan.size),
            ContentLength=plan.size,
        )
    elif op == "get":
        response = client.get_object(Bucket=plan.bucket, Key=key)
        sha = hashlib.sha256()
        read = 0
        for chunk in response["Body"].iter_chunks(chunk_size=_BLOCK):
            sha.update(chunk)
            read += len(chunk)
        if read != plan.size or sha.hexdigest() != plan.digests[index]:
            raise ValueError(f"{key}: read {read} bytes, SHA-256 mismatch")
    else:
        client.delete_object(Bucket=plan.bucket, Key=key)


#: The client of a worker process (see L{_worker_start}).
_worker_client: Any = None


def _worker_start(args: argparse.Namespace) -> None:
    global _worker_client
    _worker_client = make_client(args)


def _worker_ready(_: int) -> int:
    # Long enough that the other workers get a share of the calls.
    time.sleep(0.05)
    return os.getpid()


def _worker_run(plan: Plan, op: str, indices: list[int], threads: int) -> Figures:
    return run_parallel(indices, threads, lambda i: operate(_worker_client, plan, op, i))


class Runner:
    """
    Runs a phase on threads of this process, or spread over worker
    processes (C{--processes}): boto3 spends milliseconds of CPU per request
    under the GIL, so one process caps small-object rates.
    """

    def __init__(self, args: argparse.Namespace, client: Any) -> None:
        self._args = args
        self._client = client
        self._pool: ProcessPoolExecutor | None = None
        self._pids = [os.getpid()]
        if args.processes > 1:
            self._pool = ProcessPoolExecutor(
                max_workers=args.processes,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_start,
                initargs=(args,),
            )
            # Start every worker (and its client) before anything is timed.
            pids: set[int] = set()
            while len(pids) < args.processes:
                pids |= set(self._pool.map(_worker_ready, range(args.processes * 2)))
            self._pids = sorted(pids)

    def run(self, plan: Plan, op: str, concurrency: int | None = None) -> Figures:
        """
        Run C{op} on every object of C{plan}.

        @return: the merged figures; C{elapsed} is the wall-clock time.
        """
        concurrency = concurrency or self._args.concurrency
        indices = list(range(len(plan.keys)))
        if self._pool is None:
            return run_parallel(indices, concurrency, lambda i: operate(self._client, plan, op, i))
        processes = self._args.processes
        threads = max(1, -(-concurrency // processes))
        chunks = [indices[p::processes] for p in range(processes)]
        started = time.perf_counter()
        results = list(
            self._pool.map(
                _worker_run, [plan] * processes, [op] * processes, chunks, [threads] * processes
            )
        )
        merged = Figures(elapsed=time.perf_counter() - started)
        for result in results:
            merged.latencies += result.latencies
            merged.errors += result.errors
        return merged

    def client_pids(self) -> list[int]:
        """@return: the processes that run the requests."""
        return self._pids

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown()


def new_plan(bucket: str, size: int, count: int, prefix: str, verify: bool = True) -> Plan:
    """
    The objects of one run: keys under C{prefix/<run id>/}, random body
    seeds and, when C{verify}, the SHA-256 each GET must find (computed
    here, before anything is timed).
    """
    run_id = f"{int(time.time())}-{os.getpid()}"
    seeds = [random.getrandbits(63) for _ in range(count)]
    keys = [f"{prefix}/{run_id}/{i:06d}" for i in range(count)]
    digests = [body_digest(seed, size) for seed in seeds] if verify else []
    return Plan(bucket, size, keys, seeds, digests)


def put_get(args: argparse.Namespace, client: Any, out: Callable[[str], None]) -> bool:
    """
    The PUT and/or GET phases.

    @return: whether every operation succeeded and verified.
    """
    plan = new_plan(args.bucket, args.size, args.count, "s3load", verify=args.op != "put")
    runner = Runner(args, client)
    groups = [("client", runner.client_pids()), *args.cpu] if args.cpu else []

    def timed(op: str) -> Figures:
        before = [process_cpu_seconds(pids) for _, pids in groups]
        figures = runner.run(plan, op)
        if groups:
            used = [
                f"{name} {1000 * (process_cpu_seconds(pids) - start) / args.count:.2f}"
                for (name, pids), start in zip(groups, before)
            ]
            out(f"cpu   {op:<4}  ms per request: " + "  ".join(used))
        return figures

    ok = True
    try:
        if args.op == "get":
            # Nothing was written in this run: write the objects first.
            runner.run(plan, "put")
        if args.op in ("put", "both"):
            figures = timed("put")
            out(report("put", figures, args.count, args.size, args.concurrency))
            for error in figures.errors[:5]:
                out(f"      {error}")
            ok = ok and not figures.errors
        if args.op in ("get", "both"):
            figures = timed("get")
            out(report("get", figures, args.count, args.size, args.concurrency))
            for error in figures.errors[:5]:
                out(f"      {error}")
            out(f"verify {len(figures.latencies)} of {args.count} GETs matched the SHA-256 written")
            ok = ok and not figures.errors
        if not args.keep:
            runner.run(plan, "delete")
    finally:
        runner.close()
    return ok


def _walk_boto3(client: Any, bucket: str, prefix: str) -> tuple[list[str], int]:
    """
    List every key under C{prefix} with boto3, 1,000 per page.

    @return: the keys and the number of pages.
    """
    listed: list[str] = []
    pages = 0
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            kwargs["ContinuationToken"] = token
        page = client.list_objects_v2(**kwargs)
        pages += 1
        listed += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return listed, pages
        token = page["NextContinuationToken"]


def _walk_raw(args: argparse.Namespace, prefix: str) -> tuple[list[str], int]:
    """
    The same walk with botocore's SigV4 signer, one keep-alive HTTP
    connection and ElementTree: botocore's response parsing costs several
    times the server's time for a 1,000-key page, so this measures the
    node rather than the client library.

    @return: the keys and the number of pages.
    """
    import http.client
    from urllib.parse import quote, urlsplit
    from xml.etree import ElementTree

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    namespace = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    endpoint = urlsplit(args.endpoint)
    connection_class = (
        http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(endpoint.hostname, endpoint.port, timeout=60)
    signer = S3SigV4Auth(Credentials(args.access_key, args.secret_key), "s3", args.region)
    listed: list[str] = []
    pages = 0
    token = None
    try:
        while True:
            query = f"list-type=2&max-keys=1000&prefix={quote(prefix, safe='')}"
            if token:
                query += f"&continuation-token={quote(token, safe='')}"
            target = f"/{quote(args.bucket)}?{query}"
            request = AWSRequest(method="GET", url=f"{args.endpoint.rstrip('/')}{target}")
            signer.add_auth(request)
            connection.request("GET", target, headers=dict(request.headers.items()))
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"ListObjectsV2 answered {response.status}: {body[:300]!r}")
            root = ElementTree.fromstring(body)
            pages += 1
            listed += [e.text or "" for e in root.iter(namespace + "Key")]
            if root.findtext(namespace + "IsTruncated") != "true":
                return listed, pages
            token = root.findtext(namespace + "NextContinuationToken")
    finally:
        connection.close()


def listing(args: argparse.Namespace, client: Any, out: Callable[[str], None]) -> bool:
    """
    The listing benchmark: create C{--list-keys} small objects (skipped
    when they exist already), then time full ListObjectsV2 walks, 1,000
    keys per page, with boto3 and with a plain HTTP client.

    @return: whether every walk returned exactly the keys.
    """
    prefix = f"s3load-list/{args.list_keys}/"
    keys = [f"{prefix}{i:08d}" for i in range(args.list_keys)]
    existing, _ = _walk_raw(args, prefix)
    if len(existing) != len(keys):
        runner = Runner(args, client)
        try:
            plan = Plan(args.bucket, 1, keys, [0] * len(keys), [])
            created = runner.run(plan, "put", max(args.concurrency, 16))
        finally:
            runner.close()
        out(report("fill", created, len(keys), 1, max(args.concurrency, 16)))
        if created.errors:
            return False
    ok = True
    walks: list[tuple[str, Callable[[], tuple[list[str], int]]]] = [
        ("boto3", lambda: _walk_boto3(client, args.bucket, prefix)),
        ("http", lambda: _walk_raw(args, prefix)),
    ]
    for name, walk in walks:
        for _ in range(args.list_repeat):
            started = time.perf_counter()
            listed, pages = walk()
            elapsed = time.perf_counter() - started
            out(
                f"list  {len(listed)} keys  max-keys 1000  client {name}  {pages} pages  "
                f"total {elapsed:.3f} s  {len(listed) / elapsed:.0f} keys/s"
            )
            if listed != keys:
                out(f"list  MISMATCH ({name}): got {len(listed)} keys, expected {len(keys)}")
                ok = False
    return ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and complete the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: from --credentials)")
    parser.add_argument("--access-key", help="access key id")
    parser.add_argument("--secret-key", help="secret access key")
    parser.add_argument("--credentials", help="a node's credentials.json")
    parser.add_argument("--region", default=None, help="signing region (default us-east-1)")
    parser.add_argument("--bucket", default="s3load", help="bucket (created if missing)")
    parser.add_argument("--size", type=parse_size, default=parse_size("4KiB"), help="object size")
    parser.add_argument("--count", type=int, default=100, help="number of objects")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel requests (in all)")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes sharing the concurrency (boto3 is CPU-bound under the GIL)",
    )
    parser.add_argument("--op", choices=("put", "get", "both"), default="both")
    parser.add_argument(
        "--list-keys",
        type=int,
        default=0,
        metavar="N",
        help="run the listing benchmark over N keys instead",
    )
    parser.add_argument("--list-repeat", type=int, default=3, help="listing walks to time")
    parser.add_argument(
        "--rss-pid", type=int, help="sample this process's VmRSS and print the peak"
    )
    parser.add_argument(
        "--cpu",
        type=parse_cpu_group,
        action="append",
        default=[],
        metavar="NAME=PID[,PID...]",
        help="print the CPU time these processes used per PUT and per GET (repeatable; "
        "the client's own processes are reported as 'client')",
    )
    parser.add_argument(
        "--payload",
        choices=("unsigned", "signed"),
        default="unsigned",
        help="PUT bodies UNSIGNED-PAYLOAD (default, as over HTTPS) or with a signed SHA-256",
    )
    parser.add_argument("--keep", action="store_true", help="keep the objects written")
    args = parser.parse_args(argv)
    if args.credentials:
        credentials = load_credentials(args.credentials)
        args.endpoint = args.endpoint or credentials.get("endpoint")
        args.access_key = args.access_key or credentials.get("access_key_id")
        args.secret_key = args.secret_key or credentials.get("secret_access_key")
        args.region = args.region or credentials.get("region")
    args.region = args.region or "us-east-1"
    if not (args.endpoint and args.access_key and args.secret_key):
        parser.error("give --endpoint, --access-key and --secret-key, or --credentials")
    if args.count < 1 or args.concurrency < 1 or args.processes < 1 or args.size < 0:
        parser.error("--count, --concurrency and --processes must be positive, --size not negative")
    return args


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    """
    Run the benchmark.

    @return: the exit status: 0 when every operation succeeded and every
        read verified, 1 otherwise.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    client = make_client(args)
    ensure_bucket(client, args.bucket)
    sampler = RssSampler(args.rss_pid) if args.rss_pid else None
    ok = True
    if sampler is not None:
        sampler.__enter__()
    try:
        if args.list_keys:
            ok = listing(args, client, out)
        else:
            ok = put_get(args, client, out)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
            out(
                f"rss   pid {args.rss_pid}  start {sampler.start_kib / 1024:.1f} MiB  "
                f"peak {sampler.peak_kib / 1024:.1f} MiB"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
