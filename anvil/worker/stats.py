# -*- test-case-name: tests.test_stats -*-
"""
The periodic refresh of the usage gauges.

L{UsageStats} is a worker task (see L{anvil.worker.loop}): each pass sets
the storage, usage and membership gauges of L{anvil.metrics.Metrics} from
their sources.  A scrape of C{/metrics} only serialises what the last pass
found, so it never costs a database aggregate or a disk syscall; the
values are as old as the worker's interval at most.

Sources:

  - C{anvil_storage_capacity_bytes} and C{anvil_storage_used_bytes}: the
    C{statvfs} of each data directory (L{LocalShardStore.capacity}).  Used
    bytes are the filesystem's, by anything, not only shard files: that is
    what fills a disk, and it costs one syscall instead of a walk of every
    shard file.  The call still runs in the I/O pool, because a stalled
    disk or network mount blocks it.
  - C{anvil_bucket_stored_bytes}, C{anvil_bucket_objects} and
    C{anvil_tenant_stored_bytes}: one aggregate over the live objects of
    the regional database (L{ObjectStore.usage_by_bucket}), named with the
    bucket records of the global database.  Only buckets with live objects
    in this region appear, plus those that had some at an earlier pass and
    are still live (they drop to 0); a deleted bucket's series vanish at
    the next pass.
  - C{anvil_cluster_members}: L{Membership.by_state}, every state present.

L{RecordedGc} wraps the garbage collector's task so that each pass the
daemon runs is counted by L{Metrics.record_gc}.

L{TaskQueueStats} is the worker task setting C{anvil_tasks{kind,state}}
from one C{GROUP BY} over the task queue (L{TaskQueue.depth}), every state
of every kind seen, zeros included, so alert rules on failed tasks find a
series even before the first failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from anvil.cluster.membership import Membership
from anvil.meta.buckets import BucketStore
from anvil.meta.objects import ObjectStore
from anvil.metrics import Metrics
from anvil.storage.shardstore import DirCapacity, LocalShardStore
from anvil.worker.gc import GcReport
from anvil.worker.queue import STATES, TaskQueue

_T = TypeVar("_T")


class IRunner(Protocol):
    """
    Runs blocking functions off the reactor thread, as
    L{anvil.storage.cpu.CpuPool} does.
    """

    def run(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{fn(*args)} in a thread.

        @return: a L{Deferred} firing, on the reactor thread, with its result.
        """


class UsageStats:
    """
    The worker task refreshing the usage gauges.

    @ivar name: C{"stats"}, for logs and the service name.
    """

    name = "stats"
    _log = Logger()

    def __init__(
        self,
        metrics: Metrics,
        objects: ObjectStore,
        buckets: BucketStore,
        shard_store: LocalShardStore,
        membership: Membership,
        io_pool: IRunner,
    ) -> None:
        """
        @param metrics: the node's metrics, whose gauges are set.
        @param objects: the regional object store.
        @param buckets: the global bucket store.
        @param shard_store: this node's shard directories.
        @param membership: this node's view of the cluster.
        @param io_pool: where the C{statvfs} calls run (the node's I/O pool).
        """
        self._metrics = metrics
        self._objects = objects
        self._buckets = buckets
        self._shards = shard_store
        self._membership = membership
        self._io = io_pool
        # Live buckets exported by the last pass: they are looked up again
        # so that a bucket emptied since drops to 0, and a deleted one's
        # series are removed.
        self._known: set[int] = set()

    async def run_once(self) -> None:
        """
        Refresh every gauge.  Membership and storage are set first, so a
        database outage (which fails the pass) leaves them current; the
        bucket gauges then keep the values of the last successful pass.
        """
        self._refresh_members()
        await self._refresh_storage()
        await self._refresh_usage()

    def _refresh_members(self) -> None:
        """
        Set C{anvil_cluster_members} for every state, zero included.
        """
        for state, count in self._membership.by_state().items():
            self._metrics.cluster_members.labels(state.value).set(count)

    async def _refresh_storage(self) -> None:
        """
        Set capacity and used bytes of each data directory.  A directory
        whose C{statvfs} fails loses its series (a stale value would hide
        the failure) and the error is logged; the others are still set.
        """
        for data_dir in self._shards.data_dirs:
            try:
                capacity: DirCapacity = await self._io.run(self._shards.capacity, data_dir)
            except OSError as e:
                self._log.warn(
                    "Cannot read the capacity of data directory {path}: {error}",
                    path=data_dir,
                    error=e,
                )
                for gauge in (self._metrics.storage_capacity, self._metrics.storage_used):
                    try:
                        gauge.remove(data_dir)
                    except KeyError:
                        pass
                continue
            self._metrics.storage_capacity.labels(data_dir).set(capacity.total_bytes)
            self._metrics.storage_used.labels(data_dir).set(capacity.used_bytes)

    async def _refresh_usage(self) -> None:
        """
        Set the per-bucket and per-tenant gauges from one aggregate query and
        the bucket records.  The gauges are replaced in one synchronous step
        after every query has answered, so a scrape never sees a half-updated
        set.
        """
        usage = await self._objects.usage_by_bucket()
        live: dict[int, tuple[str, str, int, int]] = {}
        # One lookup per bucket (by primary key): the bucket store answers
        # only by id or by tenant, and this runs every few tens of seconds.
        for bucket_id in sorted(set(usage) | self._known):
            bucket = await self._buckets.get_bucket_by_id(bucket_id)
            if bucket is None:
                # Deleted: its objects wait for the collector, but it is no
                # longer anyone's storage.
                continue
            objects, size = usage.get(bucket_id, (0, 0))
            live[bucket_id] = (bucket.tenant_name, bucket.name, objects, size)

        tenants: dict[str, int] = {}
        for tenant, _, _, size in live.values():
            tenants[tenant] = tenants.get(tenant, 0) + size
        metrics = self._metrics
        metrics.bucket_stored.clear()
        metrics.bucket_objects.clear()
        metrics.tenant_stored.clear()
        for tenant, name, objects, size in live.values():
            metrics.bucket_stored.labels(tenant, name).set(size)
            metrics.bucket_objects.labels(tenant, name).set(objects)
        for tenant, size in tenants.items():
            metrics.tenant_stored.labels(tenant).set(size)
        self._known = set(live)


class IGcTask(Protocol):
    """
    A worker task whose pass reports what it collected, as
    L{anvil.worker.gc.GarbageCollector} does.
    """

    name: str

    async def run_once(self) -> GcReport:
        """
        Run one collection pass.

        @return: what it removed.
        """


class RecordedGc:
    """
    A garbage collection task whose every finished pass is recorded in the
    metrics; run it under L{anvil.worker.loop.PeriodicWorker} in place of
    the bare collector.  A pass that raises is not recorded (the worker
    logs and counts it).

    @ivar name: the wrapped task's name (C{"gc"}), so the service keeps
        its name.
    """

    def __init__(self, collector: IGcTask, metrics: Metrics) -> None:
        """
        @param collector: the collector.
        @param metrics: the node's metrics.
        """
        self.name = collector.name
        self._collector = collector
        self._metrics = metrics

    async def run_once(self) -> GcReport:
        """
        Run one pass of the collector and record its report.

        @return: the report.
        """
        report = await self._collector.run_once()
        self._metrics.record_gc(report)
        return report


class TaskQueueStats:
    """
    The worker task refreshing C{anvil_tasks} from the task queue.

    @ivar name: C{"task-stats"}, for logs and the service name.
    """

    name = "task-stats"

    def __init__(self, metrics: Metrics, queue: TaskQueue, kinds: tuple[str, ...] = ()) -> None:
        """
        @param metrics: the node's metrics.
        @param queue: the task queue (any owner: only counted).
        @param kinds: kinds exported from the start even with no task yet
            (for example those the node has handlers for).
        """
        self._metrics = metrics
        self._queue = queue
        # Kinds seen once stay exported (at 0 when their tasks are gone),
        # so a series does not vanish when a queue empties.
        self._kinds: set[str] = set(kinds)

    async def run_once(self) -> dict[tuple[str, str], int]:
        """
        Count the tasks by kind and state and set the gauge; a database
        error fails the pass and leaves the last values.

        @return: the counts (as L{TaskQueue.depth}).
        """
        depth = await self._queue.depth()
        self._kinds |= {kind for kind, _ in depth}
        for kind in sorted(self._kinds):
            for state in STATES:
                self._metrics.tasks.labels(kind, state).set(depth.get((kind, state), 0))
        return depth
