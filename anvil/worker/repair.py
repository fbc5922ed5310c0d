# -*- test-case-name: tests.test_repair -*-
"""
Repair: rebuild the unhealthy shards of a content from any C{k} healthy
ones, place them on healthy members of the region, and record them in the
shard map atomically (ARCHITECTURE §5, §7; issue 5).

Task kinds handled here (registered in L{anvil.worker.tasks}):

  - C{repair} C{{"content_hash", "shard_index"?, "node_id"?, "reason"}}:
    from the scrubber (one corrupt shard it quarantined), the sweep (missing
    shards) or an evacuation.  The whole content is examined, not only the
    shard named: whatever is unhealthy is rebuilt in one read.
  - C{evacuate} C{{"node_id"}}: from C{anvil-admin cluster remove} or a
    member down for longer than C{worker.dead_member_repair_after}: one
    C{repair} task (one unfinished per content) is enqueued for every content with
    a shard on that node, so that the region's task workers rebuild them all
    in parallel at once.
  - C{member_down} C{{"node_id"}}: enqueued by the sweep, to run
    C{dead_member_repair_after} seconds after it first saw a member named
    in shard maps down; if the member is still not alive then, it is
    recorded in C{removed_nodes} (as C{cluster remove} does) and evacuated.
    The sweep cancels the task when it sees the member alive again.

Which shards are unhealthy
==========================

Shard I{i}'s map entry names a node; the shard is unhealthy when that node
is C{""} (never stored), recorded in C{removed_nodes}, unknown to
membership (once this node has joined the cluster: a node that sees no
other member yet knows nothing of the others), dead or departed; when the node is alive but its file is
missing or its header damaged (a local header check, or the peer's
C{stat_shard}); or when the task names this very shard on this very node
and a full read of it (every block's checksum) fails.  A shard whose node
is suspect, or alive but not answering, is I{unverified}: counted as
healthy (it cannot be judged now; a later pass will).  Checking the named
shard by reading it, rather than trusting the task, is what makes a
repair idempotent: run twice, the second run finds the rebuilt shard
sound and does nothing.

Where rebuilt shards go
=======================

Candidates are the alive members of the region not recorded as removed.
Shard I{i} goes to the node the normal placement would give it
(L{anvil.storage.placement.assign} over the candidates, by rendezvous
ranking of the map's placement key, or of the content hash for maps
without one) if that node holds no healthy shard of the content; otherwise
to the candidate holding the fewest shards of it (ties by rank).  So
shards spread over distinct nodes while there are enough, and wrap onto
the least loaded ones when there are not, and a later rebalance has little
to move.

Recording and cleaning up
=========================

L{anvil.storage.engine.StorageEngine.rebuild} streams the new shards and
commits them; then L{anvil.meta.contents.ContentStore.replace_shard_targets}
swaps the map entries only if they still name the nodes read (a
compare-and-set).  When another repair won meanwhile, the map is read again
and the decision made again (usually: nothing left to do); the files this
attempt wrote and nobody records are orphans the orphan collector
(L{anvil.worker.sweep.OrphanCollector}) removes after the grace period.
After a successful swap, the replaced shard files are removed where they
can be reached (a local one by its index, a peer's with
L{anvil.cluster.peers.PeerClient.delete_shard}); the map no longer names
them, so they are orphans by definition, and one that cannot be reached
now is left to the orphan collector of its node.

A rebuilt shard counts once in C{anvil_shard_repairs_total}, and its block
bytes (the content's bytes divided among C{k} blocks per stripe, exactly
as on disk without the header and the per-block checksums) in
C{anvil_shard_repaired_bytes_total}.

Fewer than C{k} healthy shards: the content is lost.  Nothing is written
(the engine never produces bytes it could not verify), an error is logged,
and the task fails (and is parked after its attempts); the sweep counts
the content under C{anvil_objects_by_redundancy{healthy_shards="<k"}}.

Cluster access outside the node
===============================

The node gives workers its membership and its storage engine, whose peer
client reaches the other nodes.  C{anvil-admin worker run-once} runs in a
separate process without either; L{cluster_access} then connects as the
node does (its certificate from the data dir, the cluster CA certificate
from the configured file or the global database), asks the node's own
cluster listener for its member list, and attaches a peer client to the
command's storage engine.  The node must be running for that.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from anvil.cluster.membership import Member, MemberState
from anvil.errors import AnvilError
from anvil.meta.contents import ContentStore
from anvil.meta.records import ContentRecord
from anvil.metrics import Metrics
from anvil.storage.engine import ContentUnavailable
from anvil.storage.erasure import ErasureParams
from anvil.storage.placement import InvalidShardMap, ShardMap, ShardTarget, assign, rank_nodes
from anvil.storage.shardfile import CorruptShard, ShardReader
from anvil.worker.queue import Task, TaskQueue

__all__ = [
    "ClusterAccess",
    "ContentLost",
    "RepairBacklog",
    "RepairError",
    "RepairResult",
    "Repairer",
    "cluster_access",
    "shard_bytes",
]

#: Contents per page when an evacuation walks a node's contents.
EVACUATE_PAGE = 500

#: Rounds of decide / rebuild / record within one repair: a lost
#: compare-and-set or a target that failed sends the repair round again
#: (avoiding the nodes that failed).
MAX_ROUNDS = 4

#: Stripes per peer request when a reported shard is read in full.
_VERIFY_WINDOW = 16


class RepairError(AnvilError):
    """
    A repair could not finish now (no candidate node, targets failed, the
    shard map cannot be understood); the task is retried later.
    """


class ContentLost(RepairError):
    """
    Fewer than C{k} shards of a content are healthy: it cannot be rebuilt.
    """


def shard_bytes(content: ContentRecord) -> int:
    """
    The block bytes of one shard of a content: for every stripe, its
    length divided among C{k} blocks (rounded up), as stored on disk
    without the header and the per-block checksums.
    """
    params = ErasureParams(content.k, content.m, content.stripe_size)
    stripes = params.stripe_count(content.size)
    if stripes == 0:
        return 0
    last = params.stripe_length(stripes - 1, content.size)
    return (stripes - 1) * params.block_size + params.block_length(last)


# -- cluster access --------------------------------------------------------------


@dataclass
class ClusterAccess:
    """
    What repair and the sweep need of the cluster.

    @ivar node_id: this node's id.
    @ivar region: this node's region.
    @ivar members: returns the members as this node sees them.
    @ivar engine: a storage engine able to reach peers (its C{address}
        gives a reachable member's cluster address).
    @ivar peers: the peer client (L{anvil.cluster.peers.PeerClient}), or
        L{None} on a node without peers.
    """

    node_id: str
    region: str
    members: Callable[[], list[Member]]
    engine: Any
    peers: Any

    def member(self, node_id: str) -> Member | None:
        """
        One member, or L{None} when this node does not know it.
        """
        for member in self.members():
            if member.node_id == node_id:
                return member
        return None

    def address(self, node_id: str) -> str | None:
        """
        A member's cluster address when it can be asked now.
        """
        address: str | None = self.engine.address(node_id)
        return address

    def joined(self) -> bool:
        """
        Whether this node sees another alive member of its region: until
        gossip has joined it to the cluster, a node knows only itself, and
        a member it does not know is not evidence of anything.
        """
        return any(
            m.node_id != self.node_id and m.region == self.region and m.state is MemberState.ALIVE
            for m in self.members()
        )

    def candidates(self, removed: set[str]) -> list[str]:
        """
        The members that may receive shards: alive, in this region, not
        removed.
        """
        return [
            m.node_id
            for m in self.members()
            if m.region == self.region and m.state is MemberState.ALIVE and m.node_id not in removed
        ]


AccessFactory = Callable[[], Awaitable[ClusterAccess]]


def cluster_access(ctx: Any) -> AccessFactory:
    """
    The cluster access of a worker context: the node's own membership and
    engine, or (in C{anvil-admin worker run-once}, which has neither) a
    connection to the running node's cluster listener made on first use
    (see the module docstring).

    @param ctx: a L{anvil.worker.tasks.WorkerContext}.
    @return: an async function returning the access (cached; a remote
        member list is refreshed when older than a few seconds).
    """
    engine = ctx.s3.engine
    config = ctx.config
    if ctx.membership is not None and getattr(engine, "peers", None) is not None:
        access = ClusterAccess(ctx.node_id, config.node.region, ctx.membership.members, engine, engine.peers)

        async def local() -> ClusterAccess:
            return access

        return local
    if ctx.membership is not None:
        # A node without peers (a single node): its own view is all there is.
        access = ClusterAccess(ctx.node_id, config.node.region, ctx.membership.members, engine, None)

        async def alone() -> ClusterAccess:
            return access

        return alone
    return _RemoteAccess(ctx).get


class _RemoteAccess:
    """
    Cluster access from outside the node process (see L{cluster_access}).
    """

    _log = Logger()
    #: Seconds a fetched member list is used before it is fetched again.
    refresh = 5.0

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._members: list[Member] = []
        self._fetched_at: float | None = None
        self._http: Any = None
        self._access: ClusterAccess | None = None

    async def get(self) -> ClusterAccess:
        """
        The access, connecting on first use and refreshing the members.

        @raise RepairError: when the node's cluster listener does not answer.
        """
        ctx = self._ctx
        if self._http is None:
            await self._connect()
        now = ctx.clock.seconds()
        if self._fetched_at is None or now - self._fetched_at > self.refresh:
            self._members = await self._fetch_members()
            self._fetched_at = now
        assert self._access is not None
        return self._access

    async def _connect(self) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        from anvil.cluster.ca import ClusterCA
        from anvil.cluster.peers import PeerClient
        from anvil.cluster.tls import ClusterTLSPolicy, NodeIdentity
        from anvil.storage.remote import MembershipDirectory

        ctx = self._ctx
        config = ctx.config
        cluster = config.cluster
        if cluster.ca_cert_file:
            ca = ClusterCA.from_certificate_file(cluster.ca_cert_file)
        else:
            rows = await ctx.global_db.run_query("SELECT cert_pem FROM cluster_ca")
            if not rows:
                raise RepairError(
                    "There is no cluster CA in the global database (no node has started yet); "
                    "this command needs the node running."
                )
            pem = rows[0][0]
            ca = ClusterCA.from_certificate_pem(pem.encode("ascii") if isinstance(pem, str) else bytes(pem))
        if cluster.node_cert_file:
            identity = NodeIdentity.from_files(cluster.node_cert_file, cluster.node_key_file, ca)
        else:
            identity = NodeIdentity.from_data_dir(config.node.data_dir, ca)
        node_id = ctx.node_id

        def expected(host: str, port: int) -> str | None:
            address = f"{host}:{port}"
            if address == self._own_address():
                return node_id
            for member in self._members:
                if member.cluster_addr == address:
                    return member.node_id
            return None

        pool = HTTPConnectionPool(ctx.clock, persistent=True)
        agent = Agent(
            ctx.clock,
            contextFactory=ClusterTLSPolicy(identity, ca, expected),
            pool=pool,
            connectTimeout=cluster.peer_timeout,
        )
        self._http = HTTPClient(agent)
        peers = PeerClient(self._http, ctx.clock, cluster.peer_timeout, ctx.metrics)
        engine = ctx.s3.engine
        # The command's own engine (built without peers): give it the way
        # to other nodes, as the node's engine has.
        engine.peers = peers
        engine.directory = MembershipDirectory(_ListView(lambda: self._members))
        self._access = ClusterAccess(node_id, config.node.region, lambda: list(self._members), engine, peers)

    def _own_address(self) -> str:
        from anvil.scripts.cluster_admin import cluster_address

        return cluster_address(self._ctx.config)

    async def _fetch_members(self) -> list[Member]:
        import treq

        from anvil.cluster.swim import member_from_dict

        ctx = self._ctx
        address = self._own_address()
        url = f"https://{address}/cluster/v1/members"
        try:
            d = self._http.get(url)
            d.addTimeout(ctx.config.cluster.peer_timeout, ctx.clock)
            response = await d
            body = await treq.content(response)
            if response.code != 200:
                raise RepairError(f"answered {response.code}")
            document = json.loads(body)
            return [member_from_dict(m) for m in document["members"]]
        except Exception as e:
            raise RepairError(
                f"The node's cluster listener at {address} did not give its member list "
                f"({type(e).__name__}: {e}); this command needs the node running."
            ) from None


class _ListView:
    """
    A membership-like view (C{get}) over a list of members.
    """

    def __init__(self, members: Callable[[], list[Member]]) -> None:
        self._members = members

    def get(self, node_id: str) -> Member | None:
        """
        One member, or L{None}.
        """
        for member in self._members():
            if member.node_id == node_id:
                return member
        return None


# -- repair ---------------------------------------------------------------------


@dataclass
class RepairResult:
    """
    What one repair of one content did.

    @ivar content_hash: the content.
    @ivar unhealthy: shard index to why it was found unhealthy (in the
        last round).
    @ivar repaired: shard index to the node it was rebuilt on and recorded.
    @ivar gone: the content no longer exists (collected): nothing to do.
    """

    content_hash: str
    unhealthy: dict[int, str] = field(default_factory=dict)
    repaired: dict[int, str] = field(default_factory=dict)
    gone: bool = False


class RepairBacklog:
    """
    Enqueues repair tasks for many contents, one unfinished task per
    content: the contents with an unfinished repair are read once (one
    query), then each new repair is a plain insert.

    L{TaskQueue.enqueue_unique} checks the queue for every task it adds,
    which for an evacuation of a node holding a hundred thousand contents
    would compare each new task with every one queued before it.  A
    repair enqueued meanwhile by someone else (a scrubber) can still make a
    second task for a content; repairs are idempotent, the second finds
    nothing to do.
    """

    def __init__(self, global_db: Any, queue: TaskQueue, region: str) -> None:
        """
        @param global_db: the global database (the task table).
        @param queue: where repairs are enqueued.
        @param region: the region the repairs are for.
        """
        self._db = global_db
        self._queue = queue
        self._region = region
        self._queued: set[str] | None = None

    async def add(self, content_hash: str, payload: Mapping[str, Any]) -> bool:
        """
        Enqueue a repair of C{content_hash} unless one is unfinished.

        @param payload: the task's payload (with C{content_hash}).
        @return: whether a task was added.
        """
        if self._queued is None:
            rows = await self._db.run_query(
                "SELECT DISTINCT payload->>'content_hash' FROM tasks WHERE kind = 'repair'"
                " AND state IN ('pending', 'running') AND region IS NOT DISTINCT FROM %s",
                (self._region,),
            )
            self._queued = {r[0] for r in rows if r[0]}
        if content_hash in self._queued:
            return False
        await self._queue.enqueue("repair", {**payload, "content_hash": content_hash}, region=self._region)
        self._queued.add(content_hash)
        return True


async def removed_nodes(global_db: Any) -> set[str]:
    """
    The node ids recorded in the global C{removed_nodes} table.
    """
    rows = await global_db.run_query("SELECT node_id FROM removed_nodes")
    return {r[0] for r in rows}


class Repairer:
    """
    The handlers of the C{repair}, C{evacuate} and C{member_down} tasks of
    one node (see the module docstring).
    """

    _log = Logger()

    def __init__(
        self,
        contents: ContentStore,
        global_db: Any,
        queue: TaskQueue,
        access: AccessFactory,
        metrics: Metrics,
        io: Any,
        shards: Any,
        region: str,
    ) -> None:
        """
        @param contents: the region's content table.
        @param global_db: the global database (C{removed_nodes}, regions).
        @param queue: the task queue (evacuations enqueue repairs).
        @param access: gives the cluster access (L{cluster_access}).
        @param metrics: C{shard_repairs}, C{shard_repaired_bytes}.
        @param io: the node's I/O pool (local shard checks and deletes).
        @param shards: the node's L{anvil.storage.shardstore.LocalShardStore}.
        @param region: this node's region.
        """
        self._contents = contents
        self._global_db = global_db
        self._queue = queue
        self._access = access
        self._metrics = metrics
        self._io = io
        self._shards = shards
        self._region = region

    @classmethod
    def for_node(cls, ctx: Any) -> Repairer:
        """
        The repairer of a worker context.
        """
        # The regional database is the object store's (the S3 service has
        # no other handle on it).
        regional_db = ctx.s3.objects._db  # noqa: SLF001
        return cls(
            ContentStore(regional_db),
            ctx.global_db,
            ctx.queue,
            cluster_access(ctx),
            ctx.metrics,
            ctx.io,
            ctx.shards,
            ctx.config.node.region,
        )

    # -- task handlers ------------------------------------------------------

    async def handle(self, task: Task) -> None:
        """
        Handle a C{repair} task.

        @raise ContentLost: fewer than C{k} shards are healthy.
        @raise RepairError: the repair could not finish (retried later).
        """
        payload = task.payload
        content_hash = str(payload["content_hash"])
        reported: tuple[int, str] | None = None
        if payload.get("shard_index") is not None and payload.get("node_id"):
            reported = (int(payload["shard_index"]), str(payload["node_id"]))
        await self.repair(content_hash, reported, reason=str(payload.get("reason", "")))

    async def handle_evacuate(self, task: Task) -> None:
        """
        Handle an C{evacuate} task: enqueue a repair of every content of
        this region with a shard on the node (and, for a task of no
        region, an evacuation in every other region).
        """
        node_id = str(task.payload["node_id"])
        if task.region is None:
            rows = await self._global_db.run_query("SELECT name FROM regions ORDER BY name")
            for (region,) in rows:
                if region != self._region:
                    await self._queue.enqueue_unique("evacuate", {"node_id": node_id}, ("node_id",), region=region)
        after = ""
        enqueued = seen = 0
        backlog = RepairBacklog(self._global_db, self._queue, self._region)
        while True:
            page = await self._contents.with_shards_on(node_id, after, EVACUATE_PAGE)
            for content in page:
                enqueued += await backlog.add(
                    content.hash, {"node_id": node_id, "reason": f"evacuate {node_id}"}
                )
            seen += len(page)
            if len(page) < EVACUATE_PAGE:
                break
            after = page[-1].hash
        self._log.info(
            "Evacuating {node_id}: {seen} contents with shards on it, {enqueued} repairs enqueued",
            node_id=node_id, seen=seen, enqueued=enqueued,
        )

    async def handle_member_down(self, task: Task) -> None:
        """
        Handle a C{member_down} task: a member still not alive after the
        delay is recorded as removed and evacuated.
        """
        node_id = str(task.payload["node_id"])
        access = await self._access()
        if not access.joined():
            # Just started, gossip has not told this node of the others yet:
            # not knowing the member proves nothing.
            raise RepairError(f"this node sees no other member yet; {node_id} is judged later")
        member = access.member(node_id)
        if member is not None and member.state in (MemberState.ALIVE, MemberState.SUSPECT):
            self._log.info("Member {node_id} is back ({state}); nothing to do", node_id=node_id,
                           state=member.state.value)
            return
        rows = await self._global_db.run_query(
            "INSERT INTO removed_nodes (node_id) VALUES (%s) ON CONFLICT (node_id) DO NOTHING RETURNING node_id",
            (node_id,),
        )
        if rows:
            self._log.warn(
                "Member {node_id} has been down longer than dead_member_repair_after: "
                "treated as removed, its shards are rebuilt elsewhere",
                node_id=node_id,
            )
        await self._queue.enqueue_unique("evacuate", {"node_id": node_id}, ("node_id",), region=self._region)

    # -- the repair -----------------------------------------------------------

    async def repair(
        self, content_hash: str, reported: tuple[int, str] | None = None, reason: str = ""
    ) -> RepairResult:
        """
        Rebuild whatever is unhealthy in one content and record it.

        @param content_hash: the content.
        @param reported: C{(shard index, node)} a finder reported damaged:
            read in full to check it.
        @param reason: why the repair was asked for (logged).
        @return: what was done.
        @raise ContentLost: fewer than C{k} shards are healthy.
        @raise RepairError: not everything could be repaired now.
        """
        result = RepairResult(content_hash)
        avoid: set[str] = set()
        failures: dict[int, str] = {}
        for _ in range(MAX_ROUNDS):
            content = await self._contents.get(content_hash)
            if content is None or content.inline_data is not None:
                result.gone = content is None
                return result
            access = await self._access()
            removed = await removed_nodes(self._global_db)
            try:
                shard_map = ShardMap.from_json(content.shard_map)
            except InvalidShardMap as e:
                raise RepairError(f"content {content_hash}: {e}") from None
            total = content.k + content.m
            if len(shard_map.targets) != total:
                raise RepairError(
                    f"content {content_hash}: its shard map has {len(shard_map.targets)} entries, not {total}"
                )
            unhealthy = await self.assess(content, shard_map, access, removed, reported)
            result.unhealthy = unhealthy
            if not unhealthy:
                return result
            healthy = total - len(unhealthy)
            if healthy < content.k:
                self._log.error(
                    "Content {content_hash} is lost: {healthy} healthy shards of {total}, {k} needed "
                    "({unhealthy})",
                    content_hash=content_hash, healthy=healthy, total=total, k=content.k,
                    unhealthy=_describe(unhealthy),
                )
                raise ContentLost(
                    f"content {content_hash} has only {healthy} healthy shards, {content.k} are needed"
                )
            targets = self.choose(content, shard_map, unhealthy, access.candidates(removed | avoid))
            if not targets:
                raise RepairError(f"content {content_hash}: no alive member of region {self._region} to rebuild on")
            self._log.info(
                "Repairing content {content_hash} ({reason}): rebuilding {targets} ({unhealthy})",
                content_hash=content_hash, reason=reason or "-",
                targets=", ".join(f"{i}->{n}" for i, n in sorted(targets.items())),
                unhealthy=_describe(unhealthy),
            )
            try:
                done: dict[int, ShardTarget] = await access.engine.rebuild(content, targets)
            except ContentUnavailable as e:
                self._log.error("Content {content_hash} is lost: {error}", content_hash=content_hash, error=str(e))
                raise ContentLost(str(e)) from None
            for index, node in targets.items():
                if index not in done:
                    failures[index] = f"rebuilding on {node} failed"
                    avoid.add(node)
            if not done:
                continue
            changes = {i: (shard_map.targets[i].node, t) for i, t in done.items()}
            if not await self._contents.replace_shard_targets(content_hash, changes):
                self._log.info(
                    "The shard map of {content_hash} changed during its repair; deciding again",
                    content_hash=content_hash,
                )
                continue
            for index, target in done.items():
                result.repaired[index] = target.node
                failures.pop(index, None)
            self._metrics.shard_repairs.inc(len(done))
            self._metrics.shard_repaired_bytes.inc(len(done) * shard_bytes(content))
            await self._clean_up(content, shard_map, changes, access)
            reported = None
            if len(done) == len(unhealthy):
                return result
        raise RepairError(
            f"content {content_hash}: not every unhealthy shard could be repaired now"
            + (f" ({_describe(failures)})" if failures else "")
        )

    async def assess(
        self,
        content: ContentRecord,
        shard_map: ShardMap,
        access: ClusterAccess,
        removed: set[str],
        reported: tuple[int, str] | None = None,
    ) -> dict[int, str]:
        """
        Find the unhealthy shards of a content (see the module docstring).

        @return: shard index to the reason it is unhealthy.
        """
        from anvil.cluster.peers import PeerError

        unhealthy: dict[int, str] = {}
        joined = access.joined()
        members = {m.node_id: m for m in access.members()}
        digest = bytes.fromhex(content.hash)
        params = ErasureParams(content.k, content.m, content.stripe_size)
        for target in shard_map.targets:
            index, node = target.index, target.node
            if not node:
                unhealthy[index] = "never stored"
                continue
            if node in removed:
                unhealthy[index] = f"node {node} removed"
                continue
            member = members.get(node)
            if member is None:
                if joined:
                    unhealthy[index] = f"node {node} unknown"
                continue
            if member.state in (MemberState.DEAD, MemberState.LEFT):
                unhealthy[index] = f"node {node} {member.state.value}"
                continue
            if member.state is not MemberState.ALIVE:
                continue
            full = reported == (index, node)
            if node == access.node_id:
                problem = await self._io.run(self._check_local, digest, index, content, full)
                if problem is not None:
                    unhealthy[index] = problem
                continue
            address = access.address(node)
            if address is None or access.peers is None:
                continue
            try:
                if not await access.peers.stat_shard(address, digest, index):
                    unhealthy[index] = f"file missing or damaged on {node}"
                    continue
                if full:
                    problem = await self._verify_remote(access.peers, address, digest, index, params, content.size)
                    if problem is not None:
                        unhealthy[index] = f"{problem} on {node}"
            except PeerError as e:
                self._log.info(
                    "Shard {index} of {content_hash} on {node} cannot be checked now: {error}",
                    index=index, content_hash=content.hash, node=node, error=str(e),
                )
        return unhealthy

    def _check_local(self, digest: bytes, index: int, content: ContentRecord, full: bool) -> str | None:
        """
        Check a local shard file (in the I/O pool): present, its header
        matching the content, and with C{full} every block's checksum.

        @return: the problem, or L{None} when it is sound.
        """
        path = self._shards.locate(digest, index)
        if path is None:
            return "file missing"
        try:
            reader = ShardReader(path)
        except FileNotFoundError:
            return "file missing"
        except CorruptShard as e:
            return f"bad header: {e.reason}"
        with reader:
            header = reader.header
            if (
                header.content_hash != digest
                or header.shard_index != index
                or header.content_length != content.size
                or header.params != ErasureParams(content.k, content.m, content.stripe_size)
            ):
                return "header disagrees with the content"
            if full:
                for stripe in range(header.stripe_count):
                    try:
                        reader.read_block(stripe)
                    except CorruptShard as e:
                        return f"corrupt at stripe {stripe}: {e.reason}"
        return None

    async def _verify_remote(
        self, peers: Any, address: str, digest: bytes, index: int, params: ErasureParams, length: int
    ) -> str | None:
        """
        Read a peer's shard in full, each block checked by the peer.

        @return: the problem, or L{None} when it is sound.
        @raise PeerError: the peer could not be asked.
        """
        from anvil.cluster.peers import PeerShardCorrupt, PeerShardMissing

        stripes = params.stripe_count(length)
        first = 0
        while first < stripes:
            count = min(_VERIFY_WINDOW, stripes - first)
            try:
                batch = await peers.read_blocks(address, digest, index, params, length, first, count)
            except PeerShardMissing:
                return "file missing"
            except PeerShardCorrupt as e:
                return f"corrupt at stripe {e.stripe}"
            if batch.corrupt_stripe is not None:
                return f"corrupt at stripe {batch.corrupt_stripe}"
            if not batch.blocks:
                return f"short at stripe {first}"
            first += len(batch.blocks)
        return None

    def choose(
        self,
        content: ContentRecord,
        shard_map: ShardMap,
        unhealthy: Mapping[int, str],
        candidates: list[str],
    ) -> dict[int, str]:
        """
        New nodes for the unhealthy shards (see the module docstring).

        @return: shard index to node id; empty without candidates.
        """
        if not candidates:
            return {}
        key = _placement_key(shard_map, content.hash)
        total = content.k + content.m
        ideal = assign(key, candidates, total)
        ranked = rank_nodes(key, candidates)
        rank = {node: position for position, node in enumerate(ranked)}
        load: Counter[str] = Counter(
            t.node for t in shard_map.targets if t.index not in unhealthy and t.node
        )
        chosen: dict[int, str] = {}
        for index in sorted(unhealthy):
            node = ideal[index]
            if load[node]:
                node = min(ranked, key=lambda n: (load[n], rank[n]))
            chosen[index] = node
            load[node] += 1
        return chosen

    async def _clean_up(
        self,
        content: ContentRecord,
        shard_map: ShardMap,
        changes: Mapping[int, tuple[str, ShardTarget]],
        access: ClusterAccess,
    ) -> None:
        """
        Remove the replaced shard files where they can be reached (see the
        module docstring); failures leave orphans, never errors.
        """
        digest = bytes.fromhex(content.hash)
        for index, (old, target) in sorted(changes.items()):
            if not old or old == target.node:
                continue
            try:
                if old == access.node_id:
                    await self._io.run(self._shards.delete, digest, index)
                    continue
                address = access.address(old)
                if address is None or access.peers is None:
                    continue
                await access.peers.delete_shard(address, digest, index)
            except Exception as e:
                self._log.info(
                    "Replaced shard {index} of {content_hash} on {node} stays as an orphan: {error}",
                    index=index, content_hash=content.hash, node=old, error=str(e),
                )


def _placement_key(shard_map: ShardMap, content_hash: str) -> bytes:
    """
    The key a content's placement is ranked by: the map's placement key,
    else the content hash.
    """
    if shard_map.key:
        try:
            return bytes.fromhex(shard_map.key)
        except ValueError:
            pass
    return bytes.fromhex(content_hash)


def _describe(problems: Mapping[int, str]) -> str:
    return "; ".join(f"shard {i}: {r}" for i, r in sorted(problems.items()))
