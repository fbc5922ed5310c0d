# -*- test-case-name: tests.test_admin -*-
"""
Open a node's metadata: databases, migrations, the secret key check.

The node and C{anvil-admin} both call L{open_metadata}, so they reach the
same databases the same way: the configured URLs, or (when none are
configured) the embedded PostgreSQL of the data directory, started here if
nobody runs it yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from anvil.config import NodeConfig, encryption_key
from anvil.errors import AnvilError, DatabaseUnavailable, InvalidArgument
from anvil.meta.database import Database
from anvil.meta.embedded import EmbeddedPostgres
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import SecretBox, load_or_create_key_file, verify_or_record_key
from anvil.meta.store import GlobalStore

_log = Logger()
_T = TypeVar("_T")

#: The databases the embedded PostgreSQL holds.
EMBEDDED_GLOBAL_DATABASE = "anvil_global"
EMBEDDED_REGIONAL_DATABASE = "anvil_regional"

#: Where the embedded default keeps its generated encryption key.
KEY_FILE_NAME = "secret.key"


@dataclass
class Metadata:
    """
    A node's open metadata.

    @ivar global_db: the global database.
    @ivar regional_db: this region's database.
    @ivar secret_box: encrypts and decrypts secrets at rest.
    @ivar global_store: regions, tenants, apps, policies, buckets.
    @ivar embedded: the embedded PostgreSQL, or C{None} with external
        databases.
    @ivar started_embedded: whether L{open_metadata} started C{embedded}
        (rather than finding it running, for example under a node).
    @ivar migrations_applied: the migrations L{open_metadata} applied, by
        role (C{"global"}, C{"regional"}).
    """

    global_db: Database
    regional_db: Database
    secret_box: SecretBox
    global_store: GlobalStore
    embedded: EmbeddedPostgres | None
    started_embedded: bool
    migrations_applied: dict[str, list[str]] = field(default_factory=dict)
    _reactor: Any = field(repr=False, default=None)
    _threadpool: ThreadPool | None = field(repr=False, default=None)

    async def close(self, stop_embedded: bool) -> None:
        """
        Close both databases' connections.

        @param stop_embedded: also stop the embedded PostgreSQL, if
            L{open_metadata} started it (a server someone else started is
            left running).
        """
        self.global_db.close()
        self.regional_db.close()
        if stop_embedded and self.started_embedded and self.embedded is not None:
            await _in_thread(self._reactor, self._threadpool, self.embedded.stop)
            _log.info("Stopped the embedded PostgreSQL in {pgdata}", pgdata=self.embedded.pgdata)


async def _in_thread(reactor: Any, pool: ThreadPool | None, f: Callable[..., _T], *args: Any) -> _T:
    """
    Run blocking C{f(*args)} in C{pool} (default: the reactor's).
    """
    result: _T = await deferToThreadPool(reactor, pool or reactor.getThreadPool(), f, *args)
    return result


async def open_metadata(
    config: NodeConfig, reactor: Any, threadpool: ThreadPool | None = None
) -> Metadata:
    """
    Connect to the global and regional databases, apply pending migrations
    and check the secret encryption key.

    With no database URLs configured, the embedded PostgreSQL of
    C{config.node.data_dir} is used, started if it is not running, and the
    encryption key defaults to one generated once in
    C{<data-dir>/secret.key}.

    @param config: the node's configuration.
    @param reactor: the reactor for database I/O and threads.
    @param threadpool: where blocking work (starting PostgreSQL) runs;
        default: the reactor's thread pool.
    @return: the open metadata; call L{Metadata.close} when done.
    @raise DatabaseUnavailable: when a database cannot be reached or the
        embedded PostgreSQL does not start.
    @raise InvalidArgument: when the encryption key is missing or malformed.
    @raise SecretKeyMismatch: when the key is not the cluster's key.
    """
    embedded: EmbeddedPostgres | None = None
    started = False
    opened: list[Database] = []

    async def blocking(f: Callable[..., _T], *args: Any) -> _T:
        return await _in_thread(reactor, threadpool, f, *args)

    try:
        key_hex = encryption_key(config)
        if config.embedded:
            embedded = EmbeddedPostgres.for_data_dir(
                config.node.data_dir,
                tcp_port=config.database.embedded_port,
                user=config.database.embedded_user,
            )
            started = await _start_embedded(embedded, blocking)
            global_dsn = embedded.dsn(EMBEDDED_GLOBAL_DATABASE)
            regional_dsn = embedded.dsn(EMBEDDED_REGIONAL_DATABASE)
            if key_hex:
                box = SecretBox.from_hex(key_hex)
            else:
                path = os.path.join(config.node.data_dir, KEY_FILE_NAME)
                box = SecretBox(await blocking(load_or_create_key_file, path))
        else:
            if not (config.database.global_url and config.database.regional_url):
                raise InvalidArgument(
                    "database.global_url and database.regional_url must both be "
                    "set, or both be empty for the embedded PostgreSQL."
                )
            if not key_hex:
                raise InvalidArgument(
                    "ANVIL_SECRET_ENCRYPTION_KEY (secrets.encryption_key) is "
                    "required with external databases: every node of the "
                    "cluster needs the same 64-hex-character key."
                )
            box = SecretBox.from_hex(key_hex)
            global_dsn = config.database.global_url
            regional_dsn = config.database.regional_url

        for dsn in (global_dsn, regional_dsn):
            opened.append(
                await Database.connect(
                    dsn,
                    reactor,
                    pool_size=config.database.pool_size,
                    connect_timeout=config.database.connect_timeout,
                )
            )
        global_db, regional_db = opened
        applied = {
            "global": await apply_migrations(global_db, "global"),
            "regional": await apply_migrations(regional_db, "regional"),
        }
        await verify_or_record_key(global_db, box)
    except BaseException:
        for db in opened:
            db.close()
        if started and embedded is not None:
            try:
                await blocking(embedded.stop)
            except Exception as e:
                _log.warn("Could not stop the embedded PostgreSQL: {error}", error=str(e))
        raise
    return Metadata(
        global_db,
        regional_db,
        box,
        GlobalStore(global_db, box),
        embedded,
        started,
        applied,
        reactor,
        threadpool,
    )


async def _start_embedded(
    embedded: EmbeddedPostgres, blocking: Callable[..., Any]
) -> bool:
    """
    Start the embedded server unless it runs, and create its databases.

    @return: whether it was started here.
    """
    started = False
    try:
        if not await blocking(embedded.is_running):
            _log.info("Starting the embedded PostgreSQL in {pgdata}", pgdata=embedded.pgdata)
            await blocking(embedded.start)
            started = True
        for name in (EMBEDDED_GLOBAL_DATABASE, EMBEDDED_REGIONAL_DATABASE):
            await blocking(embedded.create_database, name)
    except Exception as e:
        if started:
            try:
                await blocking(embedded.stop)
            except Exception as stop_error:
                # The original error is the one to report.
                _log.warn("Could not stop the embedded PostgreSQL: {error}", error=str(stop_error))
        if isinstance(e, AnvilError):
            raise
        raise DatabaseUnavailable(
            f"The embedded PostgreSQL in {embedded.pgdata} could not be "
            f"started: {' '.join(str(e).split()) or type(e).__name__}."
        ) from None
    return started
