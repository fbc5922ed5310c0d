# -*- test-case-name: tests.test_scrub -*-
"""
The scrubber: a slow, endless walk over this node's shard files that reads
every block and checks its CRC (ARCHITECTURE §7, specification "scrub").

Reads catch a bad block only when someone reads it; a shard nobody reads
for a year can rot unnoticed until the day it is needed, perhaps together
with the other shards of its content.  The scrubber reads them all, a
budget at a time:

  - A pass reads at most C{budget_bytes} (C{scrub_rate} MB/s times
    C{scrub_interval} s), so a L{anvil.worker.loop.PeriodicWorker} running
    it every C{scrub_interval} seconds scrubs at C{scrub_rate} on average.
    The daemon's passes are also I{paced}: after each chunk of a few MiB the
    pass sleeps until it is back on the C{scrub_rate} schedule, so the disk
    sees a trickle rather than a burst at disk speed (client traffic keeps
    priority).  C{anvil-admin worker run-once scrub} runs the same pass
    unpaced: an operator asking for a pass wants it now.
  - Passes resume where the previous one stopped: the position (a file,
    and the stripe within it for files larger than a budget) is kept in
    memory and in C{<data_dir>/scrub-state.json}, so a restart continues
    the walk instead of re-reading the first files over and over.  When the
    walk reaches the end of the last directory, the pass ends there and the
    next one starts again from the beginning (a file is never read twice
    in one pass).
  - All file I/O (listing, reading, renaming, the state file) runs in the
    node's I/O pool, never on the reactor thread.

A corrupt shard (bad header, wrong size, a block failing its CRC, a header
naming another shard than its file name) is:

  1. counted in C{anvil_shards_corrupt_total} and logged;
  2. quarantined: moved to C{<dir>/quarantine/} of its data directory (same
     filesystem, so an atomic rename), keeping its name, so that reads no
     longer use it (they rebuild from the other shards) and the evidence
     stays for a post-mortem;
  3. reported: a C{repair} task is enqueued with
     C{{"content_hash", "shard_index", "node_id", "reason"}}, at most one
     unfinished per C{(content_hash, shard_index)}
     (L{TaskQueue.enqueue_unique}).  If the database cannot be reached the
     request is kept in the state file and retried at the next pass.

The scrubber only checks files.  Whether a content is still referenced is
the garbage collector's business; whether a shard that should exist is
missing, the sweeper's.

Races with writers and the collector: a file removed during its check is
skipped; a file replaced during its check (an upload of identical content
committing the same name) is not quarantined, because the corrupt bytes
were in the old inode: the check compares the device and inode the
verdict was reached on with the path's current ones before the rename.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from anvil.metrics import Metrics
from anvil.storage.shardfile import HEADER_SIZE, TRAILER_SIZE, CorruptShard, ShardReader
from anvil.storage.shardstore import LocalShardStore, ShardLocation
from anvil.worker.queue import TaskQueue

__all__ = ["Scrubber", "ScrubReport", "ScrubCursor", "STATE_FILE", "QUARANTINE_DIR"]

_T = TypeVar("_T")

#: The state file's name in the node's data directory.
STATE_FILE = "scrub-state.json"
#: The directory of quarantined shards in each data directory.
QUARANTINE_DIR = "quarantine"
#: The payload fields identifying one repair (one unfinished task each).
REPAIR_KEY = ("content_hash", "shard_index")

# The shard store's committed-file name (LocalShardStore keeps its own copy
# private): "<64 hex>.<index>".
_SHARD_NAME = re.compile(r"([0-9a-f]{64})\.([0-9]{1,3})")

#: Bytes verified per I/O-pool call (and between pacing sleeps): large
#: enough that thread hand-offs cost nothing, small enough that a pass can
#: be interrupted and paced finely.
CHUNK_BYTES = 4 * 1024 * 1024

#: Shard files listed per I/O-pool call.
_LIST_BATCH = 256


class IRunner(Protocol):
    """
    Runs blocking functions off the reactor thread, as
    L{anvil.storage.cpu.CpuPool} does.
    """

    def run(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{fn(*args)} in a thread.
        """


@dataclass
class ScrubReport:
    """
    What one pass did.

    @ivar files_checked: shard files whose check finished in this pass
        (every block verified, or found corrupt).
    @ivar bytes_read: bytes read from shard files (headers, blocks and
        their checksums).
    @ivar corrupt_found: corrupt shard files found.
    @ivar quarantined: of those, the files moved to quarantine.
    @ivar repairs_enqueued: repair tasks created (not counting a repair
        already pending for the same shard).
    @ivar errors: files that could not be checked or quarantined, and
        repair requests that could not be enqueued (kept for the next pass).
    @ivar cycle_completed: the walk reached the end of the last directory;
        the next pass starts from the beginning.
    """

    files_checked: int = 0
    bytes_read: int = 0
    corrupt_found: int = 0
    quarantined: int = 0
    repairs_enqueued: int = 0
    errors: int = 0
    cycle_completed: bool = False

    def to_json(self) -> dict[str, Any]:
        """
        The report as a JSON-ready dict.
        """
        return asdict(self)


@dataclass(frozen=True)
class ScrubCursor:
    """
    Where the walk resumes.

    @ivar data_dir: the data directory (one of the shard store's).
    @ivar key: the file's place in the walk: its two fan-out directory
        names and its file name.
    @ivar stripe: resume this file at this stripe; L{None} when the file is
        finished and the walk resumes after it.
    """

    data_dir: str
    key: tuple[str, str, str]
    stripe: int | None

    def to_json(self) -> dict[str, Any]:
        """
        The cursor as stored in the state file.
        """
        return {"data_dir": self.data_dir, "key": list(self.key), "stripe": self.stripe}

    @classmethod
    def from_json(cls, value: Any) -> ScrubCursor:
        """
        Parse a cursor from the state file.

        @raise ValueError: it is malformed.
        """
        try:
            data_dir = value["data_dir"]
            key = tuple(value["key"])
            stripe = value["stripe"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed scrub cursor: {e}") from None
        if not isinstance(data_dir, str) or len(key) != 3 or not all(isinstance(p, str) for p in key):
            raise ValueError("malformed scrub cursor")
        if stripe is not None and (not isinstance(stripe, int) or stripe < 0):
            raise ValueError("malformed scrub cursor stripe")
        return cls(data_dir, (key[0], key[1], key[2]), stripe)

    @classmethod
    def at(cls, location: ShardLocation, stripe: int | None) -> ScrubCursor:
        """
        The cursor of a shard file found by the walk.
        """
        leaf, name = os.path.split(location.path)
        level2_dir, level2 = os.path.split(leaf)
        level1 = os.path.basename(level2_dir)
        return cls(location.data_dir, (level1, level2, name), stripe)


@dataclass
class _FileCheck:
    """
    The outcome of one I/O-pool call checking (part of) one shard file.

    @ivar bytes_read: bytes read by this call.
    @ivar next_stripe: the first stripe not yet verified, or L{None} when
        the file is finished (verified or corrupt or gone).
    @ivar corrupt: why the file is corrupt, or L{None}.
    @ivar missing: the file vanished (collected, or replaced mid-open).
    @ivar identity: C{(st_dev, st_ino)} of the file checked.
    """

    bytes_read: int = 0
    next_stripe: int | None = None
    corrupt: str | None = None
    missing: bool = False
    identity: tuple[int, int] | None = None


@dataclass
class _State:
    """
    What survives a restart.
    """

    cursor: ScrubCursor | None = None
    pending_repairs: list[dict[str, Any]] = field(default_factory=list)


class Scrubber:
    """
    The scrub worker task of one node (see the module docstring).

    @ivar name: C{"scrub"}, for the worker's logs and service name.
    @ivar cursor: where the next pass starts (L{None}: the beginning).
    @ivar paced: whether passes sleep to hold C{rate_bytes} per second.
    """

    name = "scrub"
    _log = Logger()

    def __init__(
        self,
        shards: LocalShardStore,
        io_pool: IRunner,
        queue: TaskQueue | None,
        metrics: Metrics,
        clock: Any,
        *,
        node_id: str,
        region: str | None,
        state_path: str | None,
        budget_bytes: int,
        rate_bytes: float,
        paced: bool = True,
    ) -> None:
        """
        @param shards: this node's shard directories.
        @param io_pool: where file I/O runs (the node's I/O pool).
        @param queue: where repairs are enqueued; L{None} keeps them pending
            in the state (for tests of the file side alone).
        @param metrics: the node's metrics (C{anvil_shards_corrupt_total}).
        @param clock: an C{IReactorTime}, for pacing.
        @param node_id: this node's id, named in repair tasks.
        @param region: this node's region; repair tasks are for it.
        @param state_path: the state file (C{None}: memory only).
        @param budget_bytes: the most a pass reads.
        @param rate_bytes: bytes per second a paced pass holds.
        @param paced: sleep between chunks to hold C{rate_bytes}.
        """
        if budget_bytes < 1:
            raise ValueError(f"the scrub budget must be positive, not {budget_bytes}")
        if rate_bytes <= 0:
            raise ValueError(f"the scrub rate must be positive, not {rate_bytes}")
        self._shards = shards
        self._io = io_pool
        self._queue = queue
        self._metrics = metrics
        self._clock = clock
        self._node_id = node_id
        self._region = region
        self._state_path = state_path
        self.budget_bytes = budget_bytes
        self.rate_bytes = rate_bytes
        self.paced = paced
        self._state: _State | None = None
        self._sleep: Deferred[None] | None = None
        self._interrupted = False

    @classmethod
    def for_node(
        cls,
        config: Any,
        shards: LocalShardStore,
        io_pool: IRunner,
        queue: TaskQueue | None,
        metrics: Metrics,
        clock: Any,
        node_id: str,
        paced: bool = True,
    ) -> Scrubber:
        """
        The scrubber of a node, configured from C{config.worker}: a budget
        of C{scrub_rate} MB/s times C{scrub_interval} s per pass, the state
        in C{<data_dir>/scrub-state.json}.
        """
        rate = float(config.worker.scrub_rate) * 1_000_000
        return cls(
            shards,
            io_pool,
            queue,
            metrics,
            clock,
            node_id=node_id,
            region=config.node.region,
            state_path=os.path.join(config.node.data_dir, STATE_FILE),
            budget_bytes=max(1, int(rate * float(config.worker.scrub_interval))),
            rate_bytes=rate,
            paced=paced,
        )

    @property
    def cursor(self) -> ScrubCursor | None:
        """
        Where the next pass starts (L{None} before the state is loaded, or
        at the beginning of a cycle).
        """
        return self._state.cursor if self._state is not None else None

    @property
    def pending_repairs(self) -> list[dict[str, Any]]:
        """
        Repair requests waiting to be enqueued (the database was down).
        """
        return list(self._state.pending_repairs) if self._state is not None else []

    def interrupt(self) -> None:
        """
        End the pass in progress early (its position is kept); called by
        L{anvil.worker.loop.PeriodicWorker.stopService} so that a paced
        pass does not hold up shutdown.
        """
        self._interrupted = True
        if self._sleep is not None:
            self._sleep.cancel()

    # -- the pass ----------------------------------------------------------

    async def run_once(self) -> ScrubReport:
        """
        Scrub up to the budget from the cursor on.

        @return: what the pass did.
        """
        self._interrupted = False
        report = ScrubReport()
        if self._state is None:
            self._state = await self._io.run(self._load_state)
        state = self._state
        started = self._clock.seconds()
        try:
            await self._enqueue_pending(report)
            await self._walk(state, report, started)
        finally:
            try:
                await self._io.run(self._save_state, state)
            except Exception:
                report.errors += 1
                self._log.failure("Saving the scrub state to {path} failed", path=self._state_path)
        self._log.info(
            "Scrub pass: {files_checked} files, {bytes_read} bytes checked, {corrupt_found} corrupt, "
            "{quarantined} quarantined, {repairs_enqueued} repairs enqueued, {errors} errors"
            "{cycle}",
            cycle=", cycle completed" if report.cycle_completed else "",
            **{k: v for k, v in asdict(report).items() if k != "cycle_completed"},
        )
        return report

    async def _walk(self, state: _State, report: ScrubReport, started: float) -> None:
        """
        Check files from the cursor on until the budget is spent, the walk
        ends, or the pass is interrupted.
        """
        while not self._interrupted:
            batch = await self._io.run(self._next_files, state.cursor, _LIST_BATCH)
            if not batch:
                state.cursor = None
                report.cycle_completed = True
                return
            for location in batch:
                cursor = state.cursor
                stripe = 0
                if cursor is not None and cursor == ScrubCursor.at(location, cursor.stripe):
                    stripe = cursor.stripe or 0
                if not await self._check(location, stripe, state, report, started):
                    return

    async def _check(
        self, location: ShardLocation, stripe: int, state: _State, report: ScrubReport, started: float
    ) -> bool:
        """
        Check one file from C{stripe} on, chunk by chunk.

        @return: whether the pass may go on to the next file.
        """
        while True:
            remaining = self.budget_bytes - report.bytes_read
            try:
                check: _FileCheck = await self._io.run(
                    self._check_file, location, stripe, remaining, report.bytes_read == 0
                )
            except Exception:
                # An I/O error other than corruption (EIO on the header,
                # permissions): skip the file, it is checked again next cycle.
                report.errors += 1
                self._log.failure("Scrubbing {path} failed", path=location.path)
                state.cursor = ScrubCursor.at(location, None)
                return True
            report.bytes_read += check.bytes_read
            if check.missing:
                state.cursor = ScrubCursor.at(location, None)
                return True
            if check.corrupt is not None:
                report.files_checked += 1
                state.cursor = ScrubCursor.at(location, None)
                await self._corrupt(location, check, state, report)
                return await self._pace(report, started)
            if check.next_stripe is None:
                report.files_checked += 1
                state.cursor = ScrubCursor.at(location, None)
                return await self._pace(report, started)
            progressed = check.next_stripe > stripe
            state.cursor = ScrubCursor.at(location, check.next_stripe)
            if not progressed:
                # The next block does not fit in what is left of the budget.
                return False
            stripe = check.next_stripe
            if not await self._pace(report, started):
                return False

    async def _pace(self, report: ScrubReport, started: float) -> bool:
        """
        Sleep until the bytes read so far are due at C{rate_bytes}, when
        paced.

        @return: whether the pass may go on (not interrupted, budget left).
        """
        if self.paced and not self._interrupted:
            delay = started + report.bytes_read / self.rate_bytes - self._clock.seconds()
            if delay > 0:
                self._sleep = deferLater(self._clock, delay)
                try:
                    await self._sleep
                except CancelledError:
                    pass
                finally:
                    self._sleep = None
        return not self._interrupted and report.bytes_read < self.budget_bytes

    async def _corrupt(
        self, location: ShardLocation, check: _FileCheck, state: _State, report: ScrubReport
    ) -> None:
        """
        Count, log and quarantine a corrupt shard and ask for its repair.
        """
        report.corrupt_found += 1
        self._metrics.shards_corrupt.inc()
        hash_hex = location.content_hash.hex()
        self._log.warn(
            "Scrub found shard {content_hash}.{shard_index} corrupt at {path}: {reason}",
            content_hash=hash_hex,
            shard_index=location.shard_index,
            path=location.path,
            reason=check.corrupt,
        )
        try:
            moved = await self._io.run(self._quarantine, location, check.identity)
        except OSError:
            report.errors += 1
            self._log.failure("Quarantining {path} failed", path=location.path)
            return
        if moved is None:
            self._log.info(
                "{path} was replaced or removed during its check; the new file is checked next cycle",
                path=location.path,
            )
            return
        report.quarantined += 1
        self._log.warn("Quarantined {path} as {moved}", path=location.path, moved=moved)
        state.pending_repairs.append(
            {
                "content_hash": hash_hex,
                "shard_index": location.shard_index,
                "node_id": self._node_id,
                "reason": f"scrub: {check.corrupt}",
            }
        )
        await self._enqueue_pending(report)

    async def _enqueue_pending(self, report: ScrubReport) -> None:
        """
        Enqueue the repair requests not yet in the queue; on a database
        error they stay pending (and in the state file) for the next pass.
        """
        state = self._state
        assert state is not None
        if self._queue is None:
            return
        while state.pending_repairs:
            payload = state.pending_repairs[0]
            try:
                task_id, created = await self._queue.enqueue_unique(
                    "repair", payload, REPAIR_KEY, region=self._region
                )
            except Exception:
                report.errors += 1
                self._log.failure(
                    "Enqueueing the repair of {content_hash}.{shard_index} failed; retried next pass",
                    content_hash=payload.get("content_hash"),
                    shard_index=payload.get("shard_index"),
                )
                return
            state.pending_repairs.pop(0)
            if created:
                report.repairs_enqueued += 1
            self._log.info(
                "Repair of {content_hash}.{shard_index} is task {task_id}{already}",
                content_hash=payload["content_hash"],
                shard_index=payload["shard_index"],
                task_id=task_id,
                already="" if created else " (already queued)",
            )

    # -- blocking helpers (I/O pool) ----------------------------------------

    def _next_files(self, cursor: ScrubCursor | None, limit: int) -> list[ShardLocation]:
        """
        Up to C{limit} shard files from the cursor on, in walk order: data
        directories in configuration order, then by name.  Directories
        before the cursor are not even listed.
        """
        found: list[ShardLocation] = []
        dirs = list(self._shards.data_dirs)
        start = 0
        after: tuple[str, str, str] | None = None
        inclusive = False
        if cursor is not None and cursor.data_dir in dirs:
            start = dirs.index(cursor.data_dir)
            after = cursor.key
            inclusive = cursor.stripe is not None
        for position in range(start, len(dirs)):
            data_dir = dirs[position]
            bound = after if position == start else None
            root = os.path.join(data_dir, "shards")
            for level1 in _entries(root):
                if bound is not None and level1 < bound[0]:
                    continue
                for level2 in _entries(os.path.join(root, level1)):
                    if bound is not None and (level1, level2) < bound[:2]:
                        continue
                    leaf = os.path.join(root, level1, level2)
                    for name in _entries(leaf):
                        key = (level1, level2, name)
                        if bound is not None and (key < bound or (key == bound and not inclusive)):
                            continue
                        match = _SHARD_NAME.fullmatch(name)
                        if match is None or match.group(1)[:4] != level1 + level2:
                            continue
                        found.append(
                            ShardLocation(
                                data_dir,
                                bytes.fromhex(match.group(1)),
                                int(match.group(2)),
                                os.path.join(leaf, name),
                            )
                        )
                        if len(found) >= limit:
                            return found
        return found

    def _check_file(self, location: ShardLocation, start: int, allowance: int, first: bool) -> _FileCheck:
        """
        Verify the header and blocks of one file from stripe C{start} on,
        reading at most C{allowance} bytes (and stopping after about
        L{CHUNK_BYTES}).

        @param first: nothing was read yet in this pass: read at least one
            block even if it exceeds the allowance, so that a budget smaller
            than one block still makes progress.
        """
        path = location.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return _FileCheck(missing=True)
        identity = (st.st_dev, st.st_ino)
        if allowance < HEADER_SIZE and not first:
            return _FileCheck(next_stripe=start, identity=identity)
        try:
            reader = ShardReader(path)
        except FileNotFoundError:
            return _FileCheck(missing=True)
        except CorruptShard as e:
            return _FileCheck(min(st.st_size, HEADER_SIZE), corrupt=e.reason, identity=identity)
        with reader:
            header = reader.header
            read = HEADER_SIZE
            if header.content_hash != location.content_hash or header.shard_index != location.shard_index:
                return _FileCheck(read, corrupt="header names another shard than the file name", identity=identity)
            stripe = start if start < header.stripe_count else header.stripe_count
            while stripe < header.stripe_count:
                cost = header.block_length(stripe) + TRAILER_SIZE
                forced = first and stripe == start
                if not forced and (read + cost > allowance or read >= CHUNK_BYTES):
                    return _FileCheck(read, next_stripe=stripe, identity=identity)
                try:
                    reader.read_block(stripe)
                except CorruptShard as e:
                    return _FileCheck(read + cost, corrupt=f"stripe {stripe}: {e.reason}", identity=identity)
                read += cost
                stripe += 1
            return _FileCheck(read, identity=identity)

    def _quarantine(self, location: ShardLocation, identity: tuple[int, int] | None) -> str | None:
        """
        Move a corrupt file to C{<data_dir>/quarantine/}, keeping its name
        (with a numeric suffix if a file of that name is already there).

        @return: the new path, or L{None} when the file is gone or is no
            longer the one that was checked.
        """
        try:
            st = os.stat(location.path)
        except FileNotFoundError:
            return None
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            return None
        target_dir = os.path.join(location.data_dir, QUARANTINE_DIR)
        os.makedirs(target_dir, exist_ok=True)
        name = os.path.basename(location.path)
        target = os.path.join(target_dir, name)
        suffix = 1
        while os.path.exists(target):
            target = os.path.join(target_dir, f"{name}.{suffix}")
            suffix += 1
        os.rename(location.path, target)
        return target

    def _load_state(self) -> _State:
        """
        Read the state file; a missing or unreadable one starts afresh.
        """
        if self._state_path is None:
            return _State()
        try:
            with open(self._state_path, encoding="utf-8") as f:
                document = json.load(f)
            cursor = document.get("cursor")
            pending = document.get("pending_repairs", [])
            if not isinstance(pending, list) or not all(isinstance(p, dict) for p in pending):
                raise ValueError("malformed pending_repairs")
            return _State(ScrubCursor.from_json(cursor) if cursor is not None else None, pending)
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError, AttributeError) as e:
            self._log.warn(
                "Ignoring the unreadable scrub state {path} ({error}); scrubbing from the beginning",
                path=self._state_path,
                error=e,
            )
            return _State()

    def _save_state(self, state: _State) -> None:
        """
        Write the state file atomically (temporary file, rename).  Not
        fsynced: losing the last position in a crash only re-reads a
        little.
        """
        if self._state_path is None:
            return
        document = {
            "version": 1,
            "cursor": state.cursor.to_json() if state.cursor is not None else None,
            "pending_repairs": state.pending_repairs,
        }
        temporary = self._state_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(document, f)
        os.replace(temporary, self._state_path)


def _entries(path: str) -> list[str]:
    """
    The sorted names in a directory; none if it is missing.
    """
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
