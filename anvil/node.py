# -*- test-case-name: tests.integration.test_twistd -*-
"""
The node: builds and orders the service tree of one C{twistd anvil} process.

Children start in dependency order and, because L{MultiService} stops its
children in reverse, stop in the opposite order:

  1. metadata: the embedded PostgreSQL (when no URLs are configured), the
     global and regional connection pools, migrations;
  2. the CPU pool (hashing, erasure coding) and the disk I/O pool of the
     storage engine;
  3. the cluster (L{anvil.cluster.service.ClusterService}): the node's
     certificate, the mutual-TLS cluster listener serving gossip and shard
     transfers, SWIM membership, the client peers are reached with; on
     stop it announces its departure and stops serving shards;
  4. workers: the garbage collector's loop and the loop refreshing the
     storage and usage gauges;
  5. the API listener, last to start and first to stop, so on SIGTERM the
     node stops accepting requests before anything they need goes away.

Start-up I/O is asynchronous (L{NodeService._start}); a failure there is
logged as one sentence and ends the process with a non-zero status.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from anvil import __version__
from anvil.bootstrap import ensure_region, first_start
from anvil.cluster.listener import request_peer
from anvil.cluster.membership import Member, Membership, load_or_create_node_id
from anvil.cluster.peers import PeerClient
from anvil.cluster.service import ClusterService
from anvil.cluster.shardserver import ShardServer
from anvil.config import NodeConfig
from anvil.errors import AnvilError
from anvil.logs import json_observer
from anvil.meta.connect import Metadata, open_metadata
from anvil.metrics import Metrics
from anvil.s3.service import S3Service, build_s3
from anvil.s3.proxy import RegionProxy
from anvil.storage.cpu import CpuPool
from anvil.storage.placement import ClusterPlacement
from anvil.storage.remote import MembershipDirectory
from anvil.storage.shardstore import LocalShardStore
from anvil.web.listener import DrainingListener, track_channels
from anvil.meta.listen import Listener
from anvil.worker.loop import PeriodicWorker
from anvil.worker.queue import CHANNEL as TASK_CHANNEL
from anvil.worker.queue import TaskQueue
from anvil.worker.repair import removed_nodes
from anvil.worker.scrub import REPAIR_KEY
from anvil.worker.tasks import REGISTRY, WorkerContext, node_task_queue
from anvil.web.readiness import Readiness
from anvil.web.root import RootResource
from anvil.web.server import AnvilSite


class MetadataService(Service):
    """
    Owns the metadata connections; stopping it closes them and stops the
    embedded PostgreSQL if this node started it.
    """

    def __init__(self, metadata: Metadata) -> None:
        self.setName("metadata")
        self.metadata = metadata

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.metadata.close(stop_embedded=True))


class NodeService(MultiService):
    """
    One Anvil node.

    @ivar node_id: this node's id, once started.
    @ivar api_port: the API listener's port number, once listening.
    @ivar ready: fires when the node serves requests.
    """

    _log = Logger()

    def __init__(self, config: NodeConfig, reactor: Any) -> None:
        """
        @param config: the validated configuration.
        @param reactor: the reactor (clock, endpoints, threads).
        """
        super().__init__()
        self.setName("anvil")
        self._config = config
        self._reactor = reactor
        self.metrics = Metrics()
        self.node_id: str | None = None
        self.api_port: int | None = None
        self.cluster: ClusterService | None = None
        self._shard_server: ShardServer | None = None
        self._task_queue: TaskQueue | None = None
        self.workers: dict[str, PeriodicWorker] = {}
        self._starting: Deferred[None] | None = None
        self.failed = False
        self.ready: Deferred[None] = Deferred()

    def setServiceParent(self, parent: Any) -> None:
        """
        Attach to the twistd application, installing the JSON log observer
        there when configured (twistd picks it up before logging starts).
        """
        super().setServiceParent(parent)
        if self._config.node.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, json_observer())

    def startService(self) -> None:
        """
        Start the node; the real work is asynchronous (L{_start}).
        """
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addCallbacks(self.ready.callback, self._start_failed)

    def stopService(self) -> Deferred[None]:
        """
        Stop the children in reverse order, after any start in progress has
        settled (so an embedded PostgreSQL being started is also stopped).
        """
        starting = self._starting if self._starting is not None else succeed(None)
        self._exit_zero_after_sigterm()

        async def stop() -> None:
            if not starting.called:
                if self.cluster is not None and self.cluster.ca is None:
                    # Still waiting for the cluster CA to appear: stop
                    # waiting (the start then fails and the process exits).
                    await self.cluster.stopService()
                await starting
            # MultiService would start stopping every child at once; each
            # must finish first: the listener drains its requests while the
            # databases and pools they use are still there.
            Service.stopService(self)
            for child in reversed(list(self)):
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    self._log.failure("Stopping {service} failed", service=child.name)

        return Deferred.fromCoroutine(stop())

    def _exit_zero_after_sigterm(self) -> None:
        """
        SIGTERM is how systemd and orchestrators ask a node to stop; a node
        that then shuts down cleanly exits with status 0.  twistd would
        instead re-raise the signal after shutdown (so the exit status says
        "killed by SIGTERM"): forget the signal it recorded.
        """
        if getattr(self._reactor, "_exitSignal", None) == signal.SIGTERM:
            self._reactor._exitSignal = None

    async def _start(self) -> None:
        config = self._config
        self._log.info(
            "Anvil {version} starting (data dir {data_dir}, region {region}, "
            "{mode} PostgreSQL)",
            version=__version__,
            data_dir=config.node.data_dir,
            region=config.node.region,
            mode="embedded" if config.embedded else "external",
        )
        metadata = await open_metadata(config, self._reactor)
        MetadataService(metadata).setServiceParent(self)
        await ensure_region(metadata.global_store, config.node.region)

        self.node_id = node_id = load_or_create_node_id(config.node.data_dir)
        membership = Membership(
            Member(
                node_id=node_id,
                region=config.node.region,
                api_addr=config.api.public_addr,
                cluster_addr=(config.cluster.public_addrs or ("",))[0],
            )
        )
        self.membership = membership
        self.metrics.set_node_info(
            version=__version__, region=config.node.region, node_id=node_id
        )

        readiness = self._readiness(metadata, membership)
        s3 = await self._storage(metadata, node_id)
        await self._cluster_start()
        await self._workers(metadata, s3)
        port = await self._listen(RootResource(readiness, self.metrics, s3.resource()))
        endpoint_url = self.api_url(port.getHost())
        if not config.api.public_addr:
            self.cluster.update_local(api_addr=endpoint_url)

        if config.embedded:
            await first_start(
                metadata.global_store,
                config.node.data_dir,
                config.node.region,
                endpoint_url,
            )
        self._log.info(
            "Anvil node {node_id} serving S3 on {url}", node_id=node_id, url=endpoint_url
        )

    def _readiness(self, metadata: Metadata, membership: Membership) -> Readiness:
        """
        The checks behind C{/ready}: both databases answer, membership holds
        an alive member, and start-up has finished.
        """

        async def membership_check() -> None:
            if not membership.alive():
                raise AnvilError("no alive member")

        async def startup_check() -> None:
            # The listener opens before the first-start bootstrap finishes
            # (the credentials name the bound port): not ready until then.
            if not self.ready.called:
                raise AnvilError("still starting")

        timeout = self._config.database.ready_timeout
        return Readiness(
            [
                ("global database", lambda: metadata.global_db.ping(timeout)),
                ("regional database", lambda: metadata.regional_db.ping(timeout)),
                ("membership", membership_check),
                ("startup", startup_check),
            ],
            timeout=timeout,
            clock=self._reactor,
        )

    async def _workers(self, metadata: Metadata, s3: S3Service) -> None:
        """
        Start the background loops (garbage collection, scrub, the task
        worker, the gauges; L{anvil.worker.tasks.REGISTRY} lists them and
        C{anvil-admin worker run-once} builds them the same way); they join
        before the listener, so they stop after it has drained. A
        notification on the task channel wakes the task worker at once.
        """
        assert self.node_id is not None
        context = WorkerContext(
            config=self._config,
            clock=self._reactor,
            node_id=self.node_id,
            metrics=self.metrics,
            io=self._io,
            global_db=metadata.global_db,
            s3=s3,
            membership=self.membership,
            cluster=self.cluster,
            task_queue=self._task_queue,
        )
        self.workers = REGISTRY.build_services(context)
        for service in self.workers.values():
            service.setServiceParent(self)
        tasks = self.workers.get("tasks")
        if tasks is not None:
            listener = Listener(
                metadata.global_db.dsn, self._reactor, TASK_CHANNEL, lambda kind: tasks.wake()
            )
            _StopListener(listener).setServiceParent(self)
            await listener.start()

    async def _listen(self, root: RootResource) -> Any:
        """
        Open the API listener (the last child: first to stop, draining).

        @return: the listening port.
        """
        config = self._config
        site = AnvilSite(root, self.metrics, self._reactor)
        channels = track_channels(site)
        endpoint = serverFromString(self._reactor, config.api.listen)
        try:
            port = await endpoint.listen(site)
        except Exception as e:
            raise AnvilError(f"api.listen {config.api.listen!r}: cannot listen: {e}") from None
        self.api_port = port.getHost().port
        DrainingListener(port, channels, self._reactor, config.node.shutdown_timeout).setServiceParent(self)
        return port

    async def _storage(self, metadata: Metadata, node_id: str) -> S3Service:
        """
        Start the worker pools, prepare the cluster (its CA, this node's
        certificate, the peer client) and build the S3 service over this
        node's shard directories and the region's members.

        The pools are children of the node before the cluster and the API
        listener, so they stop only after both have drained.
        """
        config = self._config
        cpu = CpuPool(self._reactor, name="anvil-cpu")
        # Disk I/O threads mostly wait on the device (fsync above all), so
        # there are more of them than cores.
        io = self._io = CpuPool(self._reactor, max_threads=16, name="anvil-io")
        cpu.setServiceParent(self)
        io.setServiceParent(self)
        shards = LocalShardStore(config.storage_dirs)
        # Temporaries left by a crash belong to uploads that never
        # committed; no upload of this process has started yet.
        removed = await io.run(shards.clean_temporary, 0)
        if removed:
            self._log.info("Removed {count} temporary shard files of interrupted uploads",
                           count=removed)

        membership = self.membership
        region = config.node.region
        # The node's one task queue: read-found repairs and collections are
        # queued through it here, and its workers claim through it.
        queue = self._task_queue = node_task_queue(config, metadata.global_db, self._reactor, node_id)

        def corrupt(content_hash: str, shard_index: int, stripe: object) -> None:
            # Found by a read (here, or by a peer serving its own shard):
            # count it and queue its repair at once (one task per shard,
            # however many reads trip over it); the read itself went on
            # from parity.
            self.metrics.shards_corrupt.inc()
            enqueue = Deferred.fromCoroutine(
                queue.enqueue_unique(
                    "repair",
                    {"content_hash": content_hash, "shard_index": shard_index,
                     "node_id": node_id, "reason": "read: shard unusable"},
                    REPAIR_KEY,
                    region=region,
                )
            )
            enqueue.addErrback(
                lambda f: self._log.failure(
                    "Queueing the repair of {content_hash}.{shard_index} failed",
                    f, content_hash=content_hash, shard_index=shard_index,
                )
            )
        cluster = self.cluster = ClusterService(
            config, node_id, membership, metadata.global_db, metadata.secret_box,
            self.metrics, self._reactor,
        )
        # A child before prepare(), so that stopping the node ends a wait
        # for the cluster CA.
        cluster.setServiceParent(self)
        await cluster.prepare()
        assert cluster.http is not None
        peers = PeerClient(cluster.http, self._reactor, config.cluster.peer_timeout, self.metrics)

        removed = _RemovedNodes(metadata.global_db)
        PeriodicWorker(removed, 30.0, self._reactor, now=True).setServiceParent(self)

        def candidates() -> list[str]:
            # Members that take new shards: alive, in this node's region,
            # and not declared gone for good (a removed node that comes
            # back would only have its new shards moved away again).
            return [
                m.node_id for m in membership.alive()
                if m.region == region and m.node_id not in removed.ids
            ]

        s3 = build_s3(
            config,
            self._reactor,
            global_store=metadata.global_store,
            global_db=metadata.global_db,
            regional_db=metadata.regional_db,
            metrics=self.metrics,
            cpu=cpu,
            io=io,
            shards=shards,
            node_id=node_id,
            on_corrupt=corrupt,
            placement=ClusterPlacement(node_id, shards, candidates),
            peers=peers,
            directory=MembershipDirectory(membership),
        )
        grace = config.worker.gc_grace
        # When the collection this node queued last will run: until then
        # another enqueue would find it and do nothing, so a burst of
        # deletes costs one global-database transaction, not one each.
        queued_until = 0.0

        def collect_soon() -> None:
            # One pending collection per region at a time; it runs once the
            # grace period of the delete that queued it has passed (later
            # deletes' leftovers wait for the next one, or the periodic gc).
            now = self._reactor.seconds()
            if now < queued_until:
                return
            due = now + grace + 1.0

            def queued(result: tuple[int, bool]) -> None:
                nonlocal queued_until
                if result[1]:
                    queued_until = due

            enqueue = Deferred.fromCoroutine(
                queue.enqueue_unique(
                    "collect", {"region": region}, ["region"], region=region,
                    run_after=datetime.fromtimestamp(due, UTC),
                )
            )
            enqueue.addCallback(queued)
            enqueue.addErrback(lambda f: self._log.failure("Queueing a collection failed", f))

        s3.on_delete = collect_soon
        self._shard_server = ShardServer(
            shards, io, self._reactor, on_corrupt=corrupt, authorize=request_peer,
        )
        cluster.root.register(b"shards", self._shard_server)
        s3.proxy = RegionProxy(
            Agent(self._reactor, pool=HTTPConnectionPool(self._reactor, persistent=True)),
            node_id,
            membership.members,
        )
        capacity = await io.run(_capacity, shards)
        cluster.update_local(capacity=capacity)
        return s3

    async def _cluster_start(self) -> None:
        """
        Open the cluster listener and start gossip (joining through
        C{BOOTSTRAP_ADDRS} in the background).
        """
        assert self.cluster is not None
        assert self._shard_server is not None
        _StopShardServer(self._shard_server).setServiceParent(self)
        try:
            await self.cluster.listen()
        except Exception as e:
            raise AnvilError(
                f"cluster.listen {self._config.cluster.listen!r}: cannot listen: {e}"
            ) from None
        self.cluster.start_gossip()

    def api_url(self, host: Any) -> str:
        """
        The URL clients use for this node: C{api.public_addr}, or one made
        from the address the listener is bound to.
        """
        if self._config.api.public_addr:
            return self._config.api.public_addr.rstrip("/")
        scheme = "https" if self._config.api.listen.startswith("ssl:") else "http"
        address = getattr(host, "host", "127.0.0.1")
        if address in ("0.0.0.0", "", "::"):
            address = "127.0.0.1"
        if ":" in address:
            address = f"[{address}]"
        return f"{scheme}://{address}:{host.port}"

    def _start_failed(self, failure: Failure) -> None:
        """
        Report a start-up failure as one sentence and end the process with
        status 1 once the reactor has shut down (stopping what did start).
        """
        if isinstance(failure.value, (AnvilError, OSError)):
            self._log.critical("Anvil cannot start: {reason}", reason=str(failure.value))
            _stderr(f"anvil: cannot start: {failure.value}")
        else:
            self._log.failure("Anvil cannot start", failure)
            _stderr(f"anvil: cannot start: {failure.getErrorMessage()}")
        self.failed = True

        def exit_with_failure() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            # twistd has no way to set the exit status; shut down normally
            # first (every started service has stopped by now), then exit.
            os._exit(1)

        self._reactor.addSystemEventTrigger("after", "shutdown", exit_with_failure)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)


class _RemovedNodes:
    """
    The ids of members declared gone for good (C{removed_nodes}), refreshed
    periodically for placement.
    """

    _log = Logger()
    name = "removed-nodes"

    def __init__(self, global_db: Any) -> None:
        self._db = global_db
        self.ids: set[str] = set()

    async def run_once(self) -> None:
        try:
            self.ids = await removed_nodes(self._db)
        except Exception as e:
            # Keep the last known set; the database may be briefly away.
            self._log.warn("Reading the removed nodes failed: {error}", error=str(e))


class _StopListener(Service):
    """
    Closes the task-notification connection when the node stops.
    """

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def stopService(self) -> None:
        Service.stopService(self)
        self._listener.stop()


class _StopShardServer(Service):
    """
    Drops the shard uploads still waiting for their commit when the node
    stops (after the API listener and workers, before the pools).
    """

    def __init__(self, server: ShardServer) -> None:
        self._server = server

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._server.stop())


def _capacity(shards: LocalShardStore) -> int:
    """
    Bytes of the filesystems holding the shard directories (each counted
    once), the capacity this node announces to the cluster.
    """
    seen: set[int] = set()
    total = 0
    for data_dir in shards.data_dirs:
        device = os.stat(data_dir).st_dev
        if device not in seen:
            seen.add(device)
            total += shards.capacity(data_dir).total_bytes
    return total


def _stderr(line: str) -> None:
    """
    Write one line to the process's real standard error: twistd redirects
    C{sys.stderr} into the log, but an operator starting the node by hand
    (or a supervisor capturing stderr) must see why it did not start.
    """
    stream = sys.__stderr__
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()
