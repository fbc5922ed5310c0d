# -*- test-case-name: tests.test_s3_dispatch -*-
"""
The S3 service object: everything an S3 request handler needs, in one place.

The node builds one L{S3Service} with L{build_s3} and mounts
L{S3Service.resource} under its L{anvil.web.root.RootResource}; the S3
resource tree hands the service to every handler through
L{anvil.s3.dispatch.S3Call.service}.

Virtual-host style addressing (C{bucket.<base domain>}) needs to know which
C{Host} values are the service's own names. They are, by default, the host
name of C{api.public_addr} when that is a DNS name (an IP address cannot
have sub-domains) and C{localhost} (every C{*.localhost} name resolves to
the loopback interface, RFC 6761, so local clients can use virtual hosts
without DNS set-up).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from anvil.config import NodeConfig
from anvil.meta.store import GlobalStore
from anvil.metrics import API_S3, Metrics
from anvil.s3.authn import Authenticator
from anvil.s3.bucketcache import OwnerBucketCache

_log = Logger()

if TYPE_CHECKING:
    from anvil.meta.buckets import BucketStore
    from anvil.meta.database import Database
    from anvil.meta.objects import ObjectStore
    from anvil.s3.resource import S3Resource
    from anvil.storage.cpu import CpuPool
    from anvil.storage.engine import StorageEngine
    from anvil.storage.shardstore import LocalShardStore


def default_virtual_host_domains(config: NodeConfig) -> tuple[str, ...]:
    """
    The base domains under which C{bucket.<domain>} is virtual-host style.

    @param config: the node configuration.
    @return: lower-case domain names: the C{api.public_addr} host when it is
        a DNS name, and C{localhost}.
    """
    domains = []
    if config.api.public_addr:
        host = urlsplit(config.api.public_addr).hostname
        if host and not _is_ip(host):
            domains.append(host.lower().rstrip("."))
    if "localhost" not in domains:
        domains.append("localhost")
    return tuple(domains)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class S3Service:
    """
    The state S3 handlers share: configuration, stores, storage engine,
    clock, metrics and the authenticator (with its secret cache).

    @ivar config: the node configuration.
    @ivar clock: the reactor's time (for SigV4 checks, caches, timestamps).
    @ivar global_store: tenants, apps and policies.
    @ivar buckets: the bucket records.
    @ivar objects: the regional object records.
    @ivar engine: reads and writes object contents.
    @ivar metrics: the node's metrics.
    @ivar region: this node's region (C{node.region}).
    @ivar proxy: the L{anvil.s3.proxy.RegionProxy} for buckets of other
        regions, or L{None}.
    @ivar virtual_host_domains: base domains for virtual-host style
        addressing, lower case.
    @ivar authenticator: verifies signatures and resolves principals.
    @ivar bucket_cache: bucket records, briefly reused for their owners'
        requests.
    """

    def __init__(
        self,
        config: NodeConfig,
        clock: IReactorTime,
        global_store: GlobalStore,
        buckets: BucketStore,
        objects: ObjectStore,
        engine: StorageEngine,
        metrics: Metrics,
        *,
        virtual_host_domains: Sequence[str] | None = None,
        secret_cache_seconds: float = 5.0,
        bucket_cache_seconds: float = 1.0,
    ) -> None:
        """
        @param config: the node configuration.
        @param clock: the reactor (its C{seconds()} is "now" for SigV4).
        @param global_store: the global store.
        @param buckets: the bucket store.
        @param objects: the object store.
        @param engine: the storage engine.
        @param metrics: the node's metrics; every S3 operation is declared
            on it at once.
        @param virtual_host_domains: overrides
            L{default_virtual_host_domains}.
        @param secret_cache_seconds: how long an app's secret and policies
            are remembered (rotation and policy changes take effect after
            at most this long).
        @param bucket_cache_seconds: how long a bucket record is reused for
            its owner's requests (L{anvil.s3.bucketcache}); 0 reads the
            database for every request.
        """
        # Imported here: the dispatch table imports the handlers, which
        # import this module for their type annotations.
        from anvil.s3.dispatch import OPERATION_NAMES

        self.config = config
        self.clock = clock
        self.global_store = global_store
        self.buckets = buckets
        self.objects = objects
        self.engine = engine
        self.metrics = metrics
        self.region = config.node.region
        # Forwards requests for buckets of other regions (set by the node
        # once it knows the cluster's members); None: redirect instead.
        self.proxy: Any = None
        # Told after every delete (objects, uploads, buckets): the node
        # queues a garbage-collection task for when the grace period ends.
        self.on_delete: Callable[[], object] | None = None
        if virtual_host_domains is None:
            virtual_host_domains = default_virtual_host_domains(config)
        self.virtual_host_domains = tuple(d.lower().rstrip(".") for d in virtual_host_domains)
        self.authenticator = Authenticator(global_store, clock, cache_seconds=secret_cache_seconds)
        self.bucket_cache = OwnerBucketCache(buckets, clock, seconds=bucket_cache_seconds)
        metrics.declare_operations(API_S3, OPERATION_NAMES)

    def deleted(self) -> None:
        """
        Data was deleted (an object, an upload, a bucket): tell C{on_delete}
        so the space is collected soon (a failure there is logged: the
        periodic collection is the safety net).
        """
        if self.on_delete is not None:
            try:
                self.on_delete()
            except Exception:
                _log.failure("on_delete failed")

    def resource(self) -> S3Resource:
        """
        Make the S3 resource tree for this service.

        @return: the resource to pass as C{s3=} to
            L{anvil.web.root.RootResource}.
        """
        from anvil.s3.resource import S3Resource

        return S3Resource(self)


def build_s3(
    config: NodeConfig,
    reactor: Any,
    *,
    global_store: GlobalStore,
    global_db: Database,
    regional_db: Database,
    metrics: Metrics,
    cpu: CpuPool,
    io: CpuPool,
    shards: LocalShardStore | None = None,
    node_id: str = "local",
    on_corrupt: Any = None,
    virtual_host_domains: Sequence[str] | None = None,
    placement: Any = None,
    peers: Any = None,
    directory: Any = None,
) -> S3Service:
    """
    Build the S3 service of a node from its configuration and open
    metadata.

    @param config: the node configuration (region, erasure parameters,
        stripe size, inline threshold, storage directories).
    @param reactor: the reactor (clock).
    @param global_store: the global store of the open metadata.
    @param global_db: the global database (buckets).
    @param regional_db: the regional database (objects).
    @param metrics: the node's metrics.
    @param cpu: the CPU pool (hashing, erasure coding); a started service.
    @param io: the pool for blocking disk I/O; a started service.
    @param shards: the shard store; by default one over
        C{config.storage_dirs}.
    @param node_id: this node's id, recorded in shard maps.
    @param on_corrupt: called by the engine as C{(hash, shard_index,
        stripe)} for each corrupt shard block found on read.
    @param virtual_host_domains: base domains for virtual-host style
        addressing (default: L{default_virtual_host_domains}).
    @param placement: chooses shard targets (default: every shard on this
        node).
    @param peers: the L{anvil.cluster.peers.PeerClient} for shards on
        other nodes.
    @param directory: finds peers' cluster addresses.
    @return: the service; mount C{service.resource()}.
    """
    from anvil.meta.buckets import BucketStore
    from anvil.meta.objects import ObjectStore
    from anvil.storage.engine import StorageEngine
    from anvil.storage.erasure import ErasureParams
    from anvil.storage.placement import LocalPlacement
    from anvil.storage.shardstore import LocalShardStore

    if shards is None:
        shards = LocalShardStore(config.storage_dirs)
    params = ErasureParams(config.erasure.k, config.erasure.m, config.storage.stripe_size)
    engine = StorageEngine(
        params,
        shards,
        cpu,
        io,
        inline_threshold=config.storage.inline_threshold,
        on_corrupt=on_corrupt,
        placement=placement if placement is not None else LocalPlacement(node_id, shards),
        peers=peers,
        directory=directory,
        write_quorum=config.cluster.write_quorum,
    )
    return S3Service(
        config,
        reactor,
        global_store,
        BucketStore(global_db),
        ObjectStore(regional_db),
        engine,
        metrics,
        virtual_host_domains=virtual_host_domains,
    )
