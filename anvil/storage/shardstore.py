# -*- test-case-name: tests.test_shardstore -*-
"""
Shards of contents on a node's local data directories (one per disk).

Layout of each data directory::

    <dir>/shards/<hash[:2]>/<hash[2:4]>/<hash>.<index>   committed shard files
    <dir>/tmp/<random>.<index>.tmp                       shards being written

where C{<hash>} is the hex SHA-256 of the content and C{<index>} the shard
index in decimal. Temporary files live in the same directory tree as the
committed ones, hence on the same filesystem, so the commit rename is atomic.
The two fan-out levels keep directories small (65,536 leaves).

Spreading: each data directory models a disk, and a node with C{k + m} or
more directories must survive losing any C{m} of them. Directories are
ranked per placement key by rendezvous (highest-random-weight) hashing, as
ARCHITECTURE.md section 5 does for nodes, and shard I{i} goes to the
I{i}-th ranked directory (modulo the number of directories). Shards of one
key therefore land on distinct directories whenever there are enough, the
load is even across contents, and adding a directory moves only the shards
it now ranks first for.

The placement key is the content hash when it is known before writing (for
example a PUT whose signed payload hash is the SHA-256), otherwise any key
common to the shards of one upload (an upload id): the content hash is only
known after the last byte, and a shard cannot move across disks at commit
without copying it. A reader therefore tries the directory the content hash
ranks for the shard first and then the others; a miss costs one failed
C{open} per directory.

Threading: every method here does blocking file I/O and is a plain
synchronous function. Code on the reactor thread must call them in a thread
pool (for example a L{anvil.storage.cpu.CpuPool} named for I/O)::

    reader = await io_pool.run(store.open_reader, content_hash, index)

The store keeps no state that needs locking apart from the set of temporary
files in use, which is guarded by a lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from anvil.storage.erasure import ErasureParams
from anvil.storage.shardfile import (
    BadShardHeader,
    ShardHeader,
    ShardReader,
    ShardWriter,
    fsync_dir,
)

__all__ = [
    "LocalShardStore",
    "ShardNotFound",
    "ShardLocation",
    "DirCapacity",
    "rank_dirs",
    "shard_cursor",
    "parse_shard_cursor",
]

_SHARD_NAME = re.compile(r"([0-9a-f]{64})\.([0-9]{1,3})")
_TMP_SUFFIX = ".tmp"


class ShardNotFound(Exception):
    """
    No data directory holds the requested shard.

    @ivar content_hash: The content's SHA-256 digest.
    @ivar shard_index: The shard index.
    """

    def __init__(self, content_hash: bytes, shard_index: int) -> None:
        super().__init__(f"shard {content_hash.hex()}.{shard_index} not found")
        self.content_hash = content_hash
        self.shard_index = shard_index


@dataclass(frozen=True)
class ShardLocation:
    """
    A committed shard file found on disk.

    @ivar data_dir: The data directory holding it.
    @ivar content_hash: SHA-256 digest of the content.
    @ivar shard_index: The shard index.
    @ivar path: The file.
    """

    data_dir: str
    content_hash: bytes
    shard_index: int
    path: str


@dataclass(frozen=True)
class DirCapacity:
    """
    Space on the filesystem of a data directory (from C{statvfs}).

    @ivar total_bytes: Size of the filesystem.
    @ivar used_bytes: Bytes in use on it (by anything, not only shards).
    @ivar available_bytes: Bytes an unprivileged writer can still use.
    """

    total_bytes: int
    used_bytes: int
    available_bytes: int


def rank_dirs(placement_key: bytes, dirs: Sequence[str]) -> list[str]:
    """
    Rendezvous (highest-random-weight) ranking of directories for a key.

    Weights are seeded with each directory's path, so the ranking is stable
    across restarts and independent of the configuration order.

    @param placement_key: A content hash or an upload key.
    @param dirs: Absolute directory paths.
    @return: C{dirs}, best first.
    """

    def weight(d: str) -> bytes:
        return hashlib.sha256(placement_key + b"\0" + d.encode("utf-8", "surrogateescape")).digest()

    return sorted(dirs, key=weight, reverse=True)


def _check_hash(content_hash: bytes) -> str:
    if not isinstance(content_hash, bytes) or len(content_hash) != 32:
        raise ValueError("content_hash must be a 32-byte SHA-256 digest")
    return content_hash.hex()


class LocalShardStore:
    """
    Committed and in-progress shard files over one or more data directories.

    @ivar data_dirs: The absolute data directories, in configuration order.
    """

    _log = Logger()

    def __init__(self, data_dirs: Sequence[str]) -> None:
        """
        Create the C{shards/} and C{tmp/} directories where missing.

        @param data_dirs: One or more distinct directories (one per disk).
        @raise ValueError: No directory, or the same directory twice.
        """
        if not data_dirs:
            raise ValueError("at least one data directory is required")
        dirs = [os.path.abspath(d) for d in data_dirs]
        real = [os.path.realpath(d) for d in dirs]
        if len(set(real)) != len(real):
            raise ValueError(f"data directories must be distinct: {list(data_dirs)}")
        self.data_dirs: tuple[str, ...] = tuple(dirs)
        self._active: set[str] = set()
        self._lock = threading.Lock()
        for d in dirs:
            os.makedirs(os.path.join(d, "shards"), exist_ok=True)
            os.makedirs(os.path.join(d, "tmp"), exist_ok=True)

    # -- placement -------------------------------------------------------

    def ranked_dirs(self, placement_key: bytes) -> list[str]:
        """
        Rank the data directories for a key (highest random weight first).

        @param placement_key: A content hash or an upload key.
        @return: All data directories, best first.
        """
        return rank_dirs(placement_key, self.data_dirs)

    def dir_for(self, placement_key: bytes, shard_index: int) -> str:
        """
        @param placement_key: A content hash or an upload key.
        @param shard_index: The shard index.
        @return: The data directory where that shard is written.
        """
        ranked = self.ranked_dirs(placement_key)
        return ranked[shard_index % len(ranked)]

    def shard_path(self, data_dir: str, content_hash: bytes, shard_index: int) -> str:
        """
        @param data_dir: One of L{data_dirs}.
        @param content_hash: SHA-256 digest of the content.
        @param shard_index: The shard index.
        @return: Where that shard is (or would be) committed in C{data_dir}.
        """
        name = _check_hash(content_hash)
        return os.path.join(data_dir, "shards", name[:2], name[2:4], f"{name}.{shard_index}")

    def _search_order(self, content_hash: bytes, shard_index: int) -> list[str]:
        preferred = self.dir_for(content_hash, shard_index)
        return [preferred] + [d for d in self.data_dirs if d != preferred]

    # -- writing ---------------------------------------------------------

    def open_writer(
        self,
        shard_index: int,
        params: ErasureParams,
        placement_key: bytes,
    ) -> ShardWriter:
        """
        Start writing a shard to a temporary file.

        @param shard_index: The shard index, C{0 <= shard_index < k + m}.
        @param params: The content's erasure geometry.
        @param placement_key: The content hash if already known, else a key
            shared by all shards of this upload (so they spread over
            distinct directories).
        @return: A writer; finish it with L{commit} or abort it.
        """
        data_dir = self.dir_for(placement_key, shard_index)
        path = os.path.join(data_dir, "tmp", f"{secrets.token_hex(16)}.{shard_index}{_TMP_SUFFIX}")
        with self._lock:
            self._active.add(path)
        try:
            return ShardWriter(path, shard_index=shard_index, params=params, on_close=self._writer_closed)
        except BaseException:
            with self._lock:
                self._active.discard(path)
            raise

    def _writer_closed(self, writer: ShardWriter) -> None:
        with self._lock:
            self._active.discard(writer.path)

    def commit(self, writer: ShardWriter, content_hash: bytes, content_length: int) -> ShardLocation:
        """
        Finish a writer (header, fsync) and rename it into place.

        The shard is committed in the data directory its temporary file is
        in. On failure the temporary file is removed.

        @param writer: A writer from L{open_writer} with all blocks written.
        @param content_hash: SHA-256 digest of the whole content.
        @param content_length: Bytes in the whole content.
        @return: Where the shard now is.
        """
        data_dir = os.path.dirname(os.path.dirname(writer.path))
        final = self.shard_path(data_dir, content_hash, writer.shard_index)
        try:
            if writer.header is None:
                writer.finish(content_hash, content_length)
            elif writer.header.content_hash != content_hash:
                raise ValueError("writer was finished with another content hash")
            writer.commit(final)
        except BaseException:
            writer.abort()
            raise
        return ShardLocation(data_dir, content_hash, writer.shard_index, final)

    def commit_all(
        self, writers: Sequence[ShardWriter], content_hash: bytes, content_length: int
    ) -> list[ShardLocation]:
        """
        Commit several shards of one content with fewer fsyncs.

        Each file is still fsynced, but each directory only once after all
        the renames: with a single data directory a 4+2 content costs 7
        fsyncs instead of 12, and fsync, not CPU, bounds small-object writes.

        If a step fails, the writers not yet renamed are aborted and the
        error is raised; shards already renamed stay (complete and valid,
        they are orphans for the garbage collector unless the content is
        recorded).

        @param writers: Writers from L{open_writer}, all blocks written.
        @param content_hash: SHA-256 digest of the whole content.
        @param content_length: Bytes in the whole content.
        @return: Where the shards now are, in the order of C{writers}.
        """
        locations: list[ShardLocation] = []
        try:
            for writer in writers:
                if writer.header is None:
                    writer.finish(content_hash, content_length)
                elif writer.header.content_hash != content_hash:
                    raise ValueError("writer was finished with another content hash")
            parents: dict[str, None] = {}
            for writer in writers:
                data_dir = os.path.dirname(os.path.dirname(writer.path))
                final = self.shard_path(data_dir, content_hash, writer.shard_index)
                writer.commit(final, sync_dir=False)
                parents[os.path.dirname(final)] = None
                locations.append(ShardLocation(data_dir, content_hash, writer.shard_index, final))
            for parent in parents:
                fsync_dir(parent)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        return locations

    # -- reading ---------------------------------------------------------

    def locate(self, content_hash: bytes, shard_index: int) -> str | None:
        """
        @param content_hash: SHA-256 digest of the content.
        @param shard_index: The shard index.
        @return: The path of the committed shard, or L{None}.
        """
        for data_dir in self._search_order(content_hash, shard_index):
            path = self.shard_path(data_dir, content_hash, shard_index)
            if os.path.exists(path):
                return path
        return None

    def open_reader(self, content_hash: bytes, shard_index: int) -> ShardReader:
        """
        Open a committed shard, looking in the preferred directory first.

        @param content_hash: SHA-256 digest of the content.
        @param shard_index: The shard index.
        @return: A reader (close it when done).
        @raise ShardNotFound: No directory holds it.
        @raise anvil.storage.shardfile.CorruptShard: It exists but its header
            or size is bad.
        """
        for data_dir in self._search_order(content_hash, shard_index):
            path = self.shard_path(data_dir, content_hash, shard_index)
            try:
                reader = ShardReader(path)
            except FileNotFoundError:
                continue
            if reader.header.content_hash != content_hash or reader.header.shard_index != shard_index:
                reader.close()
                raise BadShardHeader(path, "header names another shard than the file name")
            return reader
        raise ShardNotFound(content_hash, shard_index)

    def read_header(self, content_hash: bytes, shard_index: int) -> ShardHeader:
        """
        @param content_hash: SHA-256 digest of the content.
        @param shard_index: The shard index.
        @return: The validated header of the committed shard.
        @raise ShardNotFound: No directory holds it.
        """
        with self.open_reader(content_hash, shard_index) as reader:
            return reader.header

    # -- deleting and sweeping ----------------------------------------------

    def delete(self, content_hash: bytes, shard_index: int) -> bool:
        """
        Remove a committed shard from every directory holding it.

        Not fsynced: a delete lost in a crash leaves an orphan, which the
        garbage collector removes on its next pass.

        @param content_hash: SHA-256 digest of the content.
        @param shard_index: The shard index.
        @return: Whether any file was removed.
        """
        removed = False
        for data_dir in self.data_dirs:
            try:
                os.unlink(self.shard_path(data_dir, content_hash, shard_index))
            except FileNotFoundError:
                continue
            removed = True
        return removed

    def list_shards(self) -> Iterator[ShardLocation]:
        """
        Walk every data directory for committed shards (for the sweeper and
        garbage collector), in a stable order. Files that are not shards are
        skipped; files removed during the walk are tolerated.

        @return: An iterator of L{ShardLocation}.
        """
        for data_dir in self.data_dirs:
            root = os.path.join(data_dir, "shards")
            for level1 in _sorted_entries(root):
                for level2 in _sorted_entries(os.path.join(root, level1)):
                    leaf = os.path.join(root, level1, level2)
                    for name in _sorted_entries(leaf):
                        match = _SHARD_NAME.fullmatch(name)
                        if match is None or match.group(1)[:4] != level1 + level2:
                            continue
                        yield ShardLocation(
                            data_dir,
                            bytes.fromhex(match.group(1)),
                            int(match.group(2)),
                            os.path.join(leaf, name),
                        )

    def delete_content(self, content_hash: bytes) -> int:
        """
        Remove every committed shard of a content, whatever its index, from
        every data directory (the peer protocol's content delete).

        Only the content's leaf directories are listed, so this costs one
        C{listdir} per data directory, not one C{unlink} per possible index.
        Not fsynced, as L{delete}.

        @param content_hash: SHA-256 digest of the content.
        @return: Number of files removed.
        """
        name = _check_hash(content_hash)
        removed = 0
        for data_dir in self.data_dirs:
            leaf = os.path.join(data_dir, "shards", name[:2], name[2:4])
            for entry in _sorted_entries(leaf):
                match = _SHARD_NAME.fullmatch(entry)
                if match is None or match.group(1) != name:
                    continue
                try:
                    os.unlink(os.path.join(leaf, entry))
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    def list_page(self, after: str = "", limit: int = 1000) -> list[tuple[ShardLocation, int]]:
        """
        One page of the committed shards of all data directories, in the
        order of (content hash hex, shard index), for a sweep that pages
        through a peer's shards.

        A shard present in several directories is listed once (the first
        directory in configuration order). Files removed during the walk
        are skipped.

        @param after: A cursor C{"<hash hex>.<index>"} (see L{shard_cursor}):
            only shards ordered strictly after it are listed; C{""} starts
            at the beginning.
        @param limit: At most this many shards, C{>= 1}.
        @return: C{(location, file size in bytes)} pairs, in order.
        @raise ValueError: A malformed cursor or limit.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        start = parse_shard_cursor(after)
        found: dict[tuple[str, int], tuple[ShardLocation, int]] = {}
        for data_dir in self.data_dirs:
            for key, location, size in self._walk_after(data_dir, start, limit):
                found.setdefault(key, (location, size))
        return [found[key] for key in sorted(found)[:limit]]

    def _walk_after(
        self, data_dir: str, start: tuple[str, int] | None, limit: int
    ) -> Iterator[tuple[tuple[str, int], ShardLocation, int]]:
        """
        Up to C{limit} shards of one data directory ordered after C{start}.
        """
        root = os.path.join(data_dir, "shards")
        count = 0
        first = start[0] if start is not None else ""
        for level1 in _sorted_entries(root):
            if level1 < first[:2]:
                continue
            for level2 in _sorted_entries(os.path.join(root, level1)):
                if level1 + level2 < first[:4]:
                    continue
                leaf = os.path.join(root, level1, level2)
                entries: list[tuple[tuple[str, int], str]] = []
                for name in _sorted_entries(leaf):
                    match = _SHARD_NAME.fullmatch(name)
                    if match is None or match.group(1)[:4] != level1 + level2:
                        continue
                    key = (match.group(1), int(match.group(2)))
                    if start is not None and key <= start:
                        continue
                    entries.append((key, name))
                # Numeric index order: "x.10" sorts before "x.2" as text.
                entries.sort()
                for key, name in entries:
                    path = os.path.join(leaf, name)
                    try:
                        size = os.stat(path).st_size
                    except FileNotFoundError:
                        continue
                    yield key, ShardLocation(data_dir, bytes.fromhex(key[0]), key[1], path), size
                    count += 1
                    if count >= limit:
                        return

    def clean_temporary(self, older_than: float, now: float | None = None) -> int:
        """
        Remove temporary files left by crashed or abandoned writes.

        Files of writers still open in this process are never removed;
        C{older_than} protects those of other processes sharing the
        directories (there should be none) and of writers opened just now.

        @param older_than: Minimum age in seconds (by modification time).
        @param now: The current time (C{time.time()} by default).
        @return: Number of files removed.
        """
        if now is None:
            now = time.time()
        with self._lock:
            active = set(self._active)
        removed = 0
        for data_dir in self.data_dirs:
            tmp = os.path.join(data_dir, "tmp")
            for name in _sorted_entries(tmp):
                path = os.path.join(tmp, name)
                if path in active:
                    continue
                try:
                    if now - os.stat(path).st_mtime < older_than:
                        continue
                    os.unlink(path)
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    continue
                removed += 1
                self._log.info("removed stale temporary shard {path}", path=path)
        return removed

    # -- capacity --------------------------------------------------------

    def capacity(self, data_dir: str) -> DirCapacity:
        """
        @param data_dir: One of L{data_dirs}.
        @return: Space on its filesystem.
        """
        self._check_dir(data_dir)
        st = os.statvfs(data_dir)
        return DirCapacity(
            total_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            available_bytes=st.f_bavail * st.f_frsize,
        )

    def used_bytes(self, data_dir: str) -> int:
        """
        @param data_dir: One of L{data_dirs}.
        @return: Bytes in use on its filesystem.
        """
        return self.capacity(data_dir).used_bytes

    def _check_dir(self, data_dir: str) -> None:
        if os.path.abspath(data_dir) not in self.data_dirs:
            raise ValueError(f"{data_dir} is not a data directory of this store")


def shard_cursor(hash_hex: str, shard_index: int) -> str:
    """
    The paging cursor naming one shard, for L{LocalShardStore.list_page}.

    @param hash_hex: The content hash in lower-case hex.
    @param shard_index: The shard index.
    @return: C{"<hash hex>.<index>"}.
    """
    return f"{hash_hex}.{shard_index}"


def parse_shard_cursor(cursor: str) -> tuple[str, int] | None:
    """
    @param cursor: C{""} or a cursor made by L{shard_cursor}.
    @return: C{(hash hex, index)}, or L{None} for C{""}.
    @raise ValueError: The cursor is malformed.
    """
    if cursor == "":
        return None
    match = _SHARD_NAME.fullmatch(cursor)
    if match is None:
        raise ValueError(f"malformed shard cursor {cursor!r}")
    return match.group(1), int(match.group(2))


def _sorted_entries(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
