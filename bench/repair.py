# -*- test-case-name: tests.test_local_cluster -*-
"""
Repair benchmark: the time from losing one node of a six-node cluster
(erasure 4+2) holding 2 GiB of objects to full redundancy again, and the
repair throughput (issue 5).

The cluster is started with the machinery of C{anvil-local-cluster} (one
PostgreSQL, N C{twistd anvil} nodes), as C{bench/cluster.py} does, in a
temporary directory under C{/tmp}, and stopped at the end.  Then:

  1. C{--count} objects of C{--size} (default 32 x 64 MiB = 2 GiB), each
     unique, are written through every node's endpoint;
  2. one node (C{--victim}, default the last) is killed with SIGKILL;
  3. with C{--mode remove} (the default) the benchmark waits until node 1
     sees it dead and runs C{anvil-admin cluster remove NODE_ID} (repair of
     every shard it held starts at once); with C{--mode auto} the nodes run
     with C{ANVIL_DEAD_MEMBER_REPAIR_AFTER=--repair-after} and a short sweep
     interval, and nothing is done by hand;
  4. the regional database's shard maps and the survivors' shard files are
     polled every half second until every content has C{k+m} shards, each
     on a surviving node that holds the file: full redundancy;
  5. every object is read back and checked against the SHA-256 of what
     was written (a wrong or failed read exits 1).

Figures (MB/s is 10**6 bytes per second):

  - the time to full redundancy after the kill, and after the removal
    (the C{anvil-admin cluster remove} command's end, or in C{auto} mode
    the moment the global database records the node as removed): the
    repair work itself, failure detection and the waiting excluded;
  - the shards rebuilt and their bytes (the survivors'
    C{anvil_shard_repairs_total} and C{anvil_shard_repaired_bytes_total}),
    the rebuild throughput (shard bytes written per second of repair), and
    the content throughput (bytes of the contents repaired per second:
    each repair reads C{k} shards' worth, the content's size).

Run from a checkout::

    PYTHONPATH=. python bench/repair.py --size 64MiB --count 32 --concurrency 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cluster as bench_cluster  # noqa: E402  (bench/cluster.py: shared helpers)
import s3load  # noqa: E402  (bench/ is not a package)

from anvil.scripts import local_cluster  # noqa: E402
from anvil.storage.placement import ShardMap  # noqa: E402

#: Seconds between two looks at the shard maps and files.
POLL = 0.5


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_cluster.add_cluster_arguments(parser)
    parser.add_argument("--size", type=s3load.parse_size, default=s3load.parse_size("64MiB"), help="object size")
    parser.add_argument("--count", type=int, default=32, help="number of objects (default 32)")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel requests for writing and reading")
    parser.add_argument("--victim", type=int, default=0, help="the node killed (default: the last)")
    parser.add_argument(
        "--mode",
        choices=("remove", "auto"),
        default="remove",
        help="declare the node gone with anvil-admin cluster remove, or let the nodes do it (dead_member_repair_after)",
    )
    parser.add_argument(
        "--repair-after", type=float, default=10.0, help="ANVIL_DEAD_MEMBER_REPAIR_AFTER in --mode auto (default 10 s)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds of repair")
    parser.add_argument("--bucket", default="bench-repair", help="bucket (created if missing)")
    parser.add_argument(
        "--payload", choices=("unsigned", "signed"), default="unsigned", help="as in bench/s3load.py"
    )
    args = parser.parse_args(list(argv))
    if args.count < 1 or args.concurrency < 1 or args.size < 1:
        parser.error("--count, --concurrency and --size must be positive")
    if not args.victim:
        args.victim = args.nodes
    if not 2 <= args.victim <= args.nodes:
        parser.error("--victim must name a node other than node 1 (which the benchmark talks to)")
    return args


def node_env(args: argparse.Namespace) -> dict[str, str]:
    """
    The settings every node gets: the task poll interval short (NOTIFY
    wakes workers anyway), and in C{auto} mode a short sweep and the dead
    member delay.
    """
    env = {"ANVIL_TASK_POLL_INTERVAL": "2"}
    if args.mode == "auto":
        env["ANVIL_SWEEP_INTERVAL"] = "5"
        env["ANVIL_DEAD_MEMBER_REPAIR_AFTER"] = str(args.repair_after)
    env.update(local_cluster.parse_env_assignments(args.env))
    return env


def shard_maps(regional_url: str) -> dict[str, list[str]]:
    """
    content hash -> node of each shard index, for contents with shards
    (the regional database's C{contents.shard_map}).
    """
    import psycopg2

    conn = psycopg2.connect(regional_url, connect_timeout=10)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT hash, shard_map FROM contents WHERE inline_data IS NULL")
            rows = cursor.fetchall()
    finally:
        conn.close()
    maps = {}
    for content_hash, shard_map in rows:
        targets = ShardMap.from_json(shard_map or {}).targets
        if targets:
            maps[content_hash] = [t.node for t in targets]
    return maps


def recorded_removed(global_url: str, node: str) -> bool:
    """Whether the global database records C{node} as removed for good."""
    import psycopg2

    conn = psycopg2.connect(global_url, connect_timeout=10)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM removed_nodes WHERE node_id = %s", (node,))
            return bool(cursor.fetchall())
    finally:
        conn.close()


def shard_files(data_dir: str) -> set[tuple[str, int]]:
    """
    (content hash, index) of the committed shard files under a node's data
    directory (not temporaries, not quarantined ones).
    """
    found = set()
    for directory, subdirs, names in os.walk(data_dir):
        subdirs[:] = [d for d in subdirs if d not in ("quarantine", "tmp", "postgres")]
        for name in names:
            stem, _, index = name.partition(".")
            if len(stem) == 64 and index.isdigit():
                found.add((stem, int(index)))
    return found


def missing_shards(
    maps: dict[str, list[str]], files: dict[str, set[tuple[str, int]]], total: int
) -> int:
    """
    How many shards fall short of full redundancy: entries missing, on a
    node that is not a survivor, or without the file on that node.

    @param files: survivor node id -> its shard files.
    """
    missing = 0
    for content_hash, nodes in maps.items():
        missing += max(0, total - len(nodes))
        for index, node in enumerate(nodes):
            if (content_hash, index) not in files.get(node, set()):
                missing += 1
    return missing


def repair_counters(urls: list[str]) -> tuple[float, float]:
    """
    The survivors' C{anvil_shard_repairs_total} and
    C{anvil_shard_repaired_bytes_total}, summed.
    """
    from prometheus_client.parser import text_string_to_metric_families

    repairs = repaired_bytes = 0.0
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "anvil_shard_repairs_total":
                    repairs += sample.value
                elif sample.name == "anvil_shard_repaired_bytes_total":
                    repaired_bytes += sample.value
    return repairs, repaired_bytes


def wait_seen_dead(cluster: local_cluster.LocalCluster, observer: int, victim_id: str, timeout: float) -> bool:
    """Wait until node C{observer} no longer sees the victim alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = bench_cluster.alive_seen_by(cluster, observer)
        if alive is not None and victim_id not in alive:
            return True
        time.sleep(0.2)
    return False


def run(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """
    Start the cluster, write, kill, repair, verify.

    @return: 0 when the cluster is back at full redundancy and every object
        reads back exactly, else 1.
    """
    temporary = None
    root = args.dir or (temporary := tempfile.mkdtemp(prefix="anvil-bench-", dir="/tmp"))
    if temporary:
        os.chmod(temporary, 0o755)
        root = os.path.join(temporary, "cluster")
    cluster = local_cluster.LocalCluster(root, out=sys.stderr)
    env = node_env(args)
    settings = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
    out(f"start {args.nodes} nodes, erasure {args.k}+{args.m}, in {root} ({settings})")
    started = time.monotonic()
    state = cluster.start(
        nodes=args.nodes,
        base_port=args.base_port or bench_cluster.free_base_port(args.nodes),
        k=args.k,
        m=args.m,
        extra_env=env,
    )
    out(f"ready in {time.monotonic() - started:.1f} s")
    try:
        return measure(args, cluster, state, out)
    finally:
        cluster.shutdown()
        if temporary and not args.keep_dir:
            shutil.rmtree(temporary, ignore_errors=True)


def measure(
    args: argparse.Namespace, cluster: local_cluster.LocalCluster, state: dict[str, Any], out: Callable[[str], None]
) -> int:
    """The benchmark proper, on a running cluster."""
    credentials = state["credentials"]
    records = {n["index"]: n for n in state["nodes"]}
    ids = {i: bench_cluster.node_id(r) for i, r in records.items()}
    urls = {i: r["api_url"] for i, r in records.items()}
    victim, victim_id = args.victim, ids[args.victim]
    assert victim_id is not None
    survivors = [i for i in records if i != victim]
    total = args.k + args.m
    regional_url = state["postgres"]["regional_url"]

    clients = [bench_cluster.client_for(args, credentials, urls[i]) for i in sorted(records)]
    s3load.ensure_bucket(clients[0], args.bucket, credentials["region"])
    plan = s3load.new_plan(args.bucket, args.size, args.count, "bench-repair")
    _, ok = bench_cluster.phase(args, clients, plan, "put", "put", out)
    if not ok:
        return 1
    maps = shard_maps(regional_url)
    held = sum(1 for nodes in maps.values() for n in nodes if n == victim_id)
    data = len(plan.keys) * plan.size
    out(f"data  {len(maps)} contents, {s3load.human(data)} of objects; node {victim} ({victim_id}) holds {held} shards")
    before_repairs, before_bytes = repair_counters([urls[i] for i in survivors])

    killed = time.monotonic()
    cluster.stop_node(victim, kill=True)
    out(f"kill  node {victim} (SIGKILL)")
    removed = None
    if args.mode == "remove":
        if not wait_seen_dead(cluster, 1, victim_id, 120):
            out(f"error node 1 still sees node {victim} alive after 120 s")
            return 1
        detected = time.monotonic()
        out(f"dead  node 1 sees node {victim} gone {detected - killed:.1f} s after the kill")
        result = subprocess.run(
            [sys.executable, "-m", "anvil.scripts.admin", "cluster", "remove", victim_id],
            env=local_cluster.child_environ(os.environ, records[1]["env"]),
            cwd=records[1]["data_dir"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            out(f"error anvil-admin cluster remove failed: {result.stderr.strip()}")
            return 1
        removed = time.monotonic()
        out(f"remove anvil-admin cluster remove {victim_id}: {result.stdout.strip().splitlines()[-1]}")

    survivor_ids = {ids[i]: records[i]["data_dir"] for i in survivors}
    deadline = time.monotonic() + args.timeout
    last_report = 0.0
    while True:
        maps = shard_maps(regional_url)
        files = {node: shard_files(path) for node, path in survivor_ids.items()}
        short = missing_shards(maps, files, total)
        now = time.monotonic()
        if removed is None and recorded_removed(state["postgres"]["global_url"], victim_id):
            # Auto mode: the cluster declared the node gone by itself
            # (seen within one poll).
            removed = now
            out(f"remove the cluster recorded node {victim} as removed {removed - killed:.1f} s after the kill")
        if short == 0 and maps:
            break
        if now > deadline:
            out(f"error {short} shards still missing after {args.timeout:.0f} s")
            return 1
        if now - last_report >= 10:
            out(f"wait  {short} shards below full redundancy, {now - killed:.0f} s after the kill")
            last_report = now
        time.sleep(POLL)
    whole = time.monotonic()
    repairs, repaired_bytes = repair_counters([urls[i] for i in survivors])
    repairs -= before_repairs
    repaired_bytes -= before_bytes
    since_kill = whole - killed
    out(f"full  every content back at {total} shards {since_kill:.1f} s after the kill")
    work = whole - removed if removed is not None else since_kill
    if removed is not None:
        out(f"full  {work:.1f} s after the removal")
    contents = len(maps)
    out(
        f"repair {repairs:.0f} shards rebuilt, {repaired_bytes / 1e6:.1f} MB of shard blocks: "
        f"{repaired_bytes / work / 1e6:.1f} MB/s rebuilt; contents repaired {s3load.human(data)} "
        f"({contents} contents): {data / work / 1e6:.1f} MB/s of content"
    )
    if repairs < held:
        out(f"note  {held} shards were on node {victim} but the counters show {repairs:.0f} repairs")
    _, ok = bench_cluster.phase(args, [clients[i - 1] for i in survivors], plan, "get", "get", out)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """Run the benchmark; see the module docstring."""
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def say(line: str) -> None:
        out(line)
        sys.stdout.flush()

    out("command: python bench/repair.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return run(args, say)


if __name__ == "__main__":
    raise SystemExit(main())
