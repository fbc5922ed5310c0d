# -*- test-case-name: tests.test_gc -*-
"""
The garbage collector: one bounded, idempotent pass over what deletes left
behind (ARCHITECTURE §5 Delete, §7).

DeleteObject only soft-deletes the row and drops the content references;
DeleteBucket only soft-deletes the bucket.  L{GarbageCollector.run_once}
removes for good, in this order:

  1. the live objects and multipart uploads of soft-deleted buckets (a PUT
     or UploadPart that resolved the bucket before it was deleted can still
     land in it): objects are deleted as by DeleteObject, uploads aborted;
  2. multipart uploads initiated more than C{stale_upload_seconds} ago
     (aborted: their parts release their contents);
  3. soft-deleted object rows older than the grace period (they hold no
     references);
  4. the global row of each soft-deleted bucket, once the grace period has
     passed and nothing of it is left in the regional database;
  5. contents with no reference since longer than the grace period: row
     and shard files, one content per transaction; inline contents have no
     files and go a batch per statement first;
  6. temporary shard files older than C{temp_file_seconds}.

Every step works in batches of C{batch_size}, at most C{max_batches} per
pass, so a pass is bounded whatever the backlog; what is left waits for the
next pass.  Running a pass twice, or on two nodes at once, is harmless:
every removal re-checks its condition under a lock or in one statement.

Why removing a content is safe against a PUT of identical bytes
===============================================================

The write-commit protocol (L{anvil.meta.objects}): a writer asks
C{content_state(hash)}; on C{"present"} it calls C{put_object(...,
require_existing=[hash])} and only then drops its own temporary shards;
when that raises L{ContentMissingError} it commits (renames into place)
its own shards and calls C{put_object} again.  On C{"absent"} it commits
its shards first, then calls C{put_object}.

Shard files are named by content hash only, so a writer's freshly
committed shards and the collected content's old ones are the same paths.
Removing the row, committing, and I{then} unlinking the files (the obvious
order) therefore loses data: the collector commits the row's deletion; a
writer that saw C{"present"} gets L{ContentMissingError}, renames its
shards into place and inserts a new row; the collector's unlink, still to
come, removes the writer's new shards.  No grace period closes this: the
writer may have looked at the row a millisecond before the collector took
it.

So the collector unlinks I{inside} the transaction, after deleting the row
and before committing (L{ObjectStore.gc_remove_content}); the row lock
orders everything:

  - the writer's C{put_object} upserts the content row; while the
    collector's deletion is uncommitted, that upsert waits for it.  If the
    upsert went first, the refcount is 1 and the collector's locked re-check
    (C{refcount = 0}) finds nothing to do; the writer drops only its own
    temporaries, the old shards stay.
  - If the collector went first, the upsert inserts a fresh row, so
    C{require_existing} raises L{ContentMissingError}, and the writer's
    shards are committed after that, i.e. after the collector's unlink: they
    survive, and the writer's new row points at them.
  - A writer that sees C{"absent"} does so after the collector committed
    (before, the row was visible), so its rename follows the unlink too.

One window is left, and the grace period closes it: a writer that saw
C{"absent"} while I{no} row existed, and then stalled between that check
and its C{put_object} while another writer created the same content,
referenced it, and released it, and the grace period passed.  That writer's
rename could precede the collector's unlink.  It needs the writer to take
longer than the grace period (default 300 s) between its body's end and its
row's commit; uploading the body itself does not count.

Grace also protects readers: a GET streaming an object that is replaced
meanwhile keeps reading the old content's files for up to the grace period.

Two more failure modes are not data loss: when unlinking fails part-way
the row's deletion is still committed (files left over are orphans, never a
row with missing files); if the process dies between the unlink and the
commit, the row survives with refcount 0 and no files, and the next pass
deletes it; only a writer deduplicating onto exactly that row in between
would reference missing data.

Clock: cut-offs come from the injected clock (as the task queue's times),
compared with the database server's C{now()} stored in C{released_at},
C{deleted_at} and C{created_at}; clock skew between node and database
shortens or lengthens the grace period by that much, negligible against
minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from anvil.meta.buckets import BucketStore
from anvil.meta.objects import NoSuchUploadError, ObjectStore
from anvil.meta.records import ContentRecord
from anvil.storage.engine import StorageEngine

__all__ = ["GarbageCollector", "GcReport"]


@dataclass
class GcReport:
    """
    What one pass removed.

    @ivar contents_removed: content rows removed (with their files).
    @ivar bytes_freed: the sizes of those contents (logical bytes, before
        erasure coding; inline ones included).
    @ivar shard_files_deleted: shard files unlinked.
    @ivar objects_purged: soft-deleted object rows removed, plus the live
        objects of deleted buckets deleted.
    @ivar uploads_aborted: multipart uploads aborted (stale, or of deleted
        buckets).
    @ivar buckets_purged: soft-deleted bucket rows removed.
    @ivar temporaries_removed: stale temporary shard files removed.
    @ivar errors: steps or items that failed (logged); the next pass
        retries them.
    """

    contents_removed: int = 0
    bytes_freed: int = 0
    shard_files_deleted: int = 0
    objects_purged: int = 0
    uploads_aborted: int = 0
    buckets_purged: int = 0
    temporaries_removed: int = 0
    errors: int = 0


class GarbageCollector:
    """
    Removes deleted objects, their unreferenced contents, stale uploads,
    deleted buckets and stale temporary files, one bounded pass at a time.

    An L{anvil.worker.loop.IWorkerTask}: a
    L{anvil.worker.loop.PeriodicWorker} runs it periodically.

    @ivar name: C{"gc"}, for the worker's logs and metrics.
    """

    _log = Logger()
    name = "gc"

    def __init__(
        self,
        objects: ObjectStore,
        buckets: BucketStore,
        engine: StorageEngine,
        clock: IReactorTime,
        *,
        grace_seconds: float = 300,
        stale_upload_seconds: float = 7 * 86400,
        temp_file_seconds: float = 3600,
        region: str | None = None,
        batch_size: int = 500,
        max_batches: int = 20,
    ) -> None:
        """
        @param objects: the regional object store.
        @param buckets: the global bucket store.
        @param engine: this node's storage engine (its shard files).
        @param clock: the time source of the cut-offs.
        @param grace_seconds: how long an unreferenced content, a
            soft-deleted object row or a soft-deleted bucket is kept; must
            exceed the longest time a writer takes from the end of its body
            to its metadata commit (see the module docstring).
        @param stale_upload_seconds: multipart uploads older than this are
            aborted.
        @param temp_file_seconds: temporary shard files older than this are
            removed; must exceed the longest upload.
        @param region: only soft-deleted buckets of this region are
            collected (their objects live in this regional database);
            C{None} for all (a single-region deployment).
        @param batch_size: rows handled per query.
        @param max_batches: batches per step and pass.
        """
        if grace_seconds < 0 or stale_upload_seconds < 0 or temp_file_seconds < 0:
            raise ValueError("garbage collection ages must not be negative")
        if batch_size < 1 or max_batches < 1:
            raise ValueError("batch_size and max_batches must be at least 1")
        self._objects = objects
        self._buckets = buckets
        self._engine = engine
        self._clock = clock
        self._grace = grace_seconds
        self._stale_upload = stale_upload_seconds
        self._temp_file = temp_file_seconds
        self._region = region
        self._batch = batch_size
        self._max_batches = max_batches

    def _before(self, seconds: float) -> datetime:
        """
        The time C{seconds} ago by the clock.
        """
        return datetime.fromtimestamp(self._clock.seconds() - seconds, UTC)

    @classmethod
    def for_node(cls, config: Any, s3: Any, clock: IReactorTime) -> "GarbageCollector":
        """
        The collector of a node, configured from its C{[worker]} section;
        the node's loop and C{anvil-admin worker run-once gc} both build it
        here, so they do the same work.

        @param config: the node's L{anvil.config.NodeConfig}.
        @param s3: the node's L{anvil.s3.service.S3Service} (its stores and
            storage engine).
        @param clock: the time source.
        """
        return cls(
            s3.objects,
            s3.buckets,
            s3.engine,
            clock,
            grace_seconds=config.worker.gc_grace,
            stale_upload_seconds=config.worker.stale_upload_age,
            region=config.node.region,
        )

    async def run_once(self) -> GcReport:
        """
        Run one pass.  Each step's failure is logged and counted in
        L{GcReport.errors}; the other steps still run.

        @return: what was removed.
        """
        report = GcReport()
        steps = (
            ("deleted buckets' contents", self._empty_deleted_buckets),
            ("stale uploads", self._abort_stale_uploads),
            ("deleted object rows", self._purge_deleted_objects),
            ("deleted buckets", self._purge_deleted_buckets),
            ("unreferenced contents", self._remove_contents),
            ("temporary files", self._clean_temporary),
        )
        for name, step in steps:
            try:
                await step(report)
            except Exception:
                report.errors += 1
                self._log.failure("Garbage collection of {step} failed", step=name)
        self._log.info(
            "Garbage collection pass: {contents_removed} contents ({bytes_freed} bytes, "
            "{shard_files_deleted} shard files) removed, {objects_purged} object rows purged, "
            "{uploads_aborted} uploads aborted, {buckets_purged} buckets purged, "
            "{temporaries_removed} temporary files removed, {errors} errors",
            **asdict(report),
        )
        return report

    # -- steps ---------------------------------------------------------

    async def _abort(self, upload_ids: list[str], report: GcReport) -> None:
        """
        Abort uploads; one completed or aborted meanwhile is not an error.
        """
        for upload_id in upload_ids:
            try:
                await self._objects.abort_upload(upload_id)
            except NoSuchUploadError:
                continue
            report.uploads_aborted += 1

    async def _deleted_buckets(self, deleted_before: datetime | None) -> list[int]:
        """
        Ids of soft-deleted buckets of our region (deleted before
        C{deleted_before}, when given).
        """
        # BucketStore has no query for deleted buckets (and is not ours to
        # change): read them through its database, read-only.
        db: Any = self._buckets._db  # noqa: SLF001
        rows = await db.run_query(
            "SELECT id FROM buckets WHERE deleted_at IS NOT NULL"
            " AND (%s::text IS NULL OR region = %s)"
            " AND (%s::timestamptz IS NULL OR deleted_at < %s)"
            " ORDER BY deleted_at LIMIT %s",
            (self._region, self._region, deleted_before, deleted_before, self._batch),
        )
        return [row[0] for row in rows]

    async def _empty_deleted_buckets(self, report: GcReport) -> None:
        """
        Delete the live objects and abort the uploads of deleted buckets.
        """
        for bucket_id in await self._deleted_buckets(None):
            for _ in range(self._max_batches):
                keys = await self._objects.gc_bucket_keys(bucket_id, self._batch)
                if not keys:
                    break
                report.objects_purged += len(await self._objects.delete_objects(bucket_id, keys))
            for _ in range(self._max_batches):
                uploads = await self._objects.gc_bucket_uploads(bucket_id, self._batch)
                if not uploads:
                    break
                await self._abort(uploads, report)

    async def _abort_stale_uploads(self, report: GcReport) -> None:
        """
        Abort multipart uploads initiated too long ago.
        """
        before = self._before(self._stale_upload)
        for _ in range(self._max_batches):
            uploads = await self._objects.gc_stale_uploads(before, self._batch)
            if not uploads:
                break
            await self._abort(uploads, report)

    async def _purge_deleted_objects(self, report: GcReport) -> None:
        """
        Remove soft-deleted object rows older than the grace period.
        """
        before = self._before(self._grace)
        for _ in range(self._max_batches):
            purged = await self._objects.gc_purge_deleted_objects(before, self._batch)
            report.objects_purged += purged
            if purged < self._batch:
                break

    async def _purge_deleted_buckets(self, report: GcReport) -> None:
        """
        Remove the rows of deleted buckets of which nothing is left.
        """
        before = self._before(self._grace)
        db: Any = self._buckets._db  # noqa: SLF001
        for bucket_id in await self._deleted_buckets(before):
            if await self._objects.gc_bucket_has_rows(bucket_id):
                continue
            rows = await db.run_query(
                "DELETE FROM buckets WHERE id = %s AND deleted_at < %s RETURNING id",
                (bucket_id, before),
            )
            report.buckets_purged += len(rows)

    async def _remove_contents(self, report: GcReport) -> None:
        """
        Remove contents unreferenced for longer than the grace period, row
        and files (see the module docstring for the order).
        """
        before = self._before(self._grace)
        for _ in range(self._max_batches):
            count, size = await self._objects.gc_remove_inline_contents(before, self._batch)
            report.contents_removed += count
            report.bytes_freed += size
            if count < self._batch:
                break
        for _ in range(self._max_batches):
            hashes = await self._objects.gc_unreferenced_contents(before, self._batch)
            for content_hash in hashes:
                try:
                    removed = await self._objects.gc_remove_content(
                        content_hash, before, lambda content: self._remove_files(content, report)
                    )
                except Exception:
                    report.errors += 1
                    self._log.failure(
                        "Removing content {content_hash} failed", content_hash=content_hash
                    )
                    continue
                if removed is None:
                    continue
                content, files = removed
                report.contents_removed += 1
                report.bytes_freed += content.size
                report.shard_files_deleted += files
            if len(hashes) < self._batch:
                break

    async def _remove_files(self, content: ContentRecord, report: GcReport) -> int:
        """
        Unlink a content's shard files, here and on the peers its shard
        map names; a failure is logged, not
        raised, so that the row's deletion still commits (leftover files
        are orphans; a row without its files would be data loss for the
        next writer deduplicating onto it).
        """
        try:
            return await self._engine.delete_content(content.hash, content.shard_map)
        except Exception:
            report.errors += 1
            self._log.failure(
                "Removing the shard files of content {content_hash} failed; "
                "what is left of them is orphaned",
                content_hash=content.hash,
            )
            return 0

    async def _clean_temporary(self, report: GcReport) -> None:
        """
        Remove temporary shard files older than C{temp_file_seconds}.
        """
        report.temporaries_removed += await self._engine.clean_temporary(self._temp_file)
