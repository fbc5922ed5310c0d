# -*- test-case-name: tests.integration.test_s3_buckets -*-
"""
An in-process S3 node for tests: the real S3 stack on real PostgreSQL,
real shard files and a real listening socket, plus boto3 clients for apps.

Use it from a L{twisted.trial.unittest.TestCase} (a real reactor is
needed: boto3 talks to a real socket)::

    class BucketTests(TestCase):
        async def setUp(self) -> None:
            self.s3 = await S3Stack.start(self)
            self.app = await self.s3.create_app("acme", "web")
            self.client = self.s3.client(self.app)

        async def test_create(self) -> None:
            await self.s3.call(self.client.create_bucket, Bucket="photos")

What is real: two fresh PostgreSQL databases (global and regional, from
L{tests.pg.fresh_database}) with all migrations applied, a L{GlobalStore}
with a random L{SecretBox}, a L{LocalShardStore} over three temporary
directories (three "disks"), started L{CpuPool}s, the S3 service built by
L{anvil.s3.service.build_s3} under L{RootResource} and L{AnvilSite}, listening
on C{127.0.0.1:0} with the global reactor.

boto3 is blocking: every call goes through L{S3Stack.call}, which runs it in
a thread so the reactor keeps serving the request. Cleanup (registered on the
test case) closes the clients, stops listening, aborts server connections,
closes the databases and stops the pools, so trial finds a clean reactor.

The S3 service, bucket/object stores and storage engine are imported when a
stack starts, not when this module is imported, so tests that use only part
of it can be written while the rest is still being built.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from anvil.config import ErasureSection, NodeConfig, NodeSection, StorageSection
from anvil.errors import NotFound
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import SecretBox
from anvil.meta.store import GlobalStore
from anvil.metrics import Metrics
from anvil.s3.service import build_s3
from anvil.s3.sigv4 import build_canonical_request, parse_query, signing_key
from anvil.storage.cpu import CpuPool
from anvil.storage.shardstore import LocalShardStore
from anvil.web.listener import track_channels
from anvil.web.readiness import Readiness
from anvil.web.root import RootResource
from anvil.web.server import AnvilSite
from tests.pg import fresh_database

_T = TypeVar("_T")

#: Policies of an app that may do everything within its tenant.
FULL_ACCESS: tuple[tuple[str, str], ...] = (("*", "*"),)


@dataclass(frozen=True)
class AppCredentials:
    """
    An app created in the stack's global database.

    @ivar tenant: the tenant's name.
    @ivar name: the app's name.
    @ivar client_id: the access key id.
    @ivar secret: the secret access key.
    """

    tenant: str
    name: str
    client_id: str
    secret: str


@dataclass
class RawResponse:
    """
    A response to L{S3Stack.raw_request}.

    @ivar status: the status code.
    @ivar headers: lower-case header name to value (last one wins).
    @ivar body: the whole body.
    """

    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)


class S3Stack:
    """
    A running in-process S3 node (see the module docstring).

    @ivar config: the node configuration used.
    @ivar global_db: the global database.
    @ivar regional_db: the regional database.
    @ivar global_store: regions, tenants, apps, policies.
    @ivar shards: the shard store over C{storage_dirs}.
    @ivar storage_dirs: the temporary shard directories.
    @ivar cpu: the CPU pool.
    @ivar io: the disk I/O pool.
    @ivar metrics: the node metrics.
    @ivar service: the L{anvil.s3.service.S3Service}.
    @ivar site: the L{AnvilSite}.
    @ivar port: the listening port.
    @ivar endpoint_url: C{http://127.0.0.1:<port>}.
    @ivar region: the node's region.
    """

    config: NodeConfig
    global_db: Database
    regional_db: Database
    global_store: GlobalStore
    shards: LocalShardStore
    storage_dirs: list[str]
    cpu: CpuPool
    io: CpuPool
    metrics: Metrics
    service: Any
    site: AnvilSite
    port: Any
    endpoint_url: str
    region: str
    _channels: set[Any]

    def __init__(self, testcase: TestCase) -> None:
        self._testcase = testcase
        self._clients: list[Any] = []
        self._tenants: set[str] = set()

    @classmethod
    async def start(
        cls,
        testcase: TestCase,
        *,
        region: str = "us-east-1",
        k: int = 4,
        m: int = 2,
        stripe_size: int = 64 * 1024,
        inline_threshold: int = 4096,
        storage_dir_count: int = 3,
        public_addr: str = "",
        secret_cache_seconds: float = 5.0,
    ) -> S3Stack:
        """
        Start a stack for one test; its cleanup is registered on C{testcase}.

        @param testcase: the running test.
        @param region: C{node.region}.
        @param k: erasure data blocks.
        @param m: erasure parity blocks.
        @param stripe_size: bytes per stripe (small by default so that
            modest objects span several stripes).
        @param inline_threshold: contents up to this size are stored inline.
        @param storage_dir_count: how many shard directories.
        @param public_addr: C{api.public_addr} (virtual-host domains derive
            from it).
        @param secret_cache_seconds: the authenticator's cache lifetime.
        @return: the started stack.
        """
        self = cls(testcase)

        base = os.path.abspath(testcase.mktemp())
        os.makedirs(base)
        self.storage_dirs = [os.path.join(base, f"disk{i}") for i in range(storage_dir_count)]
        self.region = region
        self.config = NodeConfig(
            node=NodeSection(data_dir=base, region=region),
            storage=StorageSection(
                dirs=tuple(self.storage_dirs),
                stripe_size=stripe_size,
                inline_threshold=inline_threshold,
            ),
            erasure=ErasureSection(k=k, m=m),
        )
        if public_addr:
            from anvil.config import ApiSection

            self.config = NodeConfig(
                node=self.config.node,
                api=ApiSection(public_addr=public_addr),
                storage=self.config.storage,
                erasure=self.config.erasure,
            )

        self.global_db = await Database.connect(fresh_database(testcase, "g"), reactor, pool_size=4)
        testcase.addCleanup(self.global_db.close)
        self.regional_db = await Database.connect(
            fresh_database(testcase, "r"), reactor, pool_size=4
        )
        testcase.addCleanup(self.regional_db.close)
        await apply_migrations(self.global_db, "global")
        await apply_migrations(self.regional_db, "regional")
        self.global_store = GlobalStore(self.global_db, SecretBox(secrets.token_bytes(32)))
        await self.global_store.create_region(region)

        self.shards = LocalShardStore(self.storage_dirs)
        self.cpu = CpuPool(reactor, 2, name="s3test-cpu")
        self.io = CpuPool(reactor, 4, name="s3test-io")
        for pool in (self.cpu, self.io):
            pool.startService()
            testcase.addCleanup(pool.stopService)

        self.metrics = Metrics()
        self.service = build_s3(
            self.config,
            reactor,
            global_store=self.global_store,
            global_db=self.global_db,
            regional_db=self.regional_db,
            metrics=self.metrics,
            cpu=self.cpu,
            io=self.io,
            shards=self.shards,
        )
        if secret_cache_seconds != self.service.authenticator.cache_seconds:
            self.service.authenticator.cache_seconds = secret_cache_seconds

        timeout = 2.0
        readiness = Readiness(
            [
                ("global database", lambda: self.global_db.ping(timeout)),
                ("regional database", lambda: self.regional_db.ping(timeout)),
            ],
            timeout=timeout,
            clock=reactor,
        )
        root = RootResource(readiness, self.metrics, s3=self.service.resource())
        self.site = AnvilSite(root, self.metrics, reactor)
        self._channels = track_channels(self.site)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        testcase.addCleanup(self._stop_listening)
        self.endpoint_url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def _stop_listening(self) -> None:
        """
        Close clients, stop listening and abort every server connection,
        then wait until the reactor has dropped them all.
        """
        for client in self._clients:
            await deferToThread(client.close)
        self._clients.clear()
        await self.port.stopListening()
        for protocol in list(self._channels):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        for _ in range(200):
            if not self._channels:
                break
            await deferLater(reactor, 0.01, lambda: None)

    # -- tenants and apps ----------------------------------------------------

    async def create_app(
        self,
        tenant: str,
        app: str,
        policies: Sequence[tuple[str, str]] = FULL_ACCESS,
    ) -> AppCredentials:
        """
        Create an app (and its tenant, if new) with policies.

        @param tenant: the tenant's name.
        @param app: the app's name (unique in the whole stack).
        @param policies: C{(action, resource)} grants.
        @return: the app's credentials.
        """
        if tenant not in self._tenants:
            try:
                await self.global_store.get_tenant(tenant)
            except NotFound:
                await self.global_store.create_tenant(tenant)
            self._tenants.add(tenant)
        record = await self.global_store.create_app(tenant, app)
        for action, resource in policies:
            await self.global_store.grant(app, action, resource)
        return AppCredentials(tenant, app, record["client_id"], record["client_secret"])

    async def grant(self, app: AppCredentials, action: str, resource: str) -> None:
        """
        Grant one more policy to C{app}.
        """
        await self.global_store.grant(app.name, action, resource)

    async def revoke(self, app: AppCredentials, action: str, resource: str) -> None:
        """
        Revoke one policy of C{app}.
        """
        await self.global_store.revoke(app.name, action, resource)

    def forget_cached_credentials(self) -> None:
        """
        Drop the authenticator's cache so policy or secret changes made by a
        test apply to the next request.
        """
        self.service.authenticator.clear_cache()

    # -- data ----------------------------------------------------------------

    async def insert_objects(
        self, bucket: str, keys: Sequence[str], data: bytes = b"x", concurrency: int = 4
    ) -> None:
        """
        Create objects directly through the object store (much faster than
        PutObject for thousands of keys); each holds C{data}, stored inline.

        @param bucket: an existing bucket's name.
        @param keys: the keys to create.
        @param data: every object's bytes.
        @param concurrency: transactions in flight.
        """
        from datetime import UTC, datetime

        from twisted.internet.defer import DeferredSemaphore, gatherResults

        from anvil.meta.records import ContentRecord, ManifestPart, ObjectRecord

        record = await self.service.buckets.get_bucket(bucket)
        assert record is not None, bucket
        config = self.config
        digest = hashlib.sha256(data).hexdigest()
        content = ContentRecord(
            digest,
            len(data),
            config.erasure.k,
            config.erasure.m,
            config.storage.stripe_size,
            {},
            data,
        )
        etag = hashlib.md5(data).hexdigest()
        semaphore = DeferredSemaphore(concurrency)

        async def put(key: str) -> None:
            await self.service.objects.put_object(
                ObjectRecord(
                    record.id,
                    key,
                    len(data),
                    etag,
                    "binary/octet-stream",
                    {},
                    {},
                    {},
                    [ManifestPart(digest, 0, len(data))],
                    datetime.now(UTC),
                ),
                [content],
            )

        await gatherResults(
            [semaphore.run(put, key) for key in keys]
        )

    # -- clients -------------------------------------------------------------

    def client(
        self,
        app: AppCredentials | None,
        *,
        secret: str | None = None,
        addressing_style: str = "path",
        endpoint_url: str | None = None,
        **config: Any,
    ) -> Any:
        """
        A boto3 S3 client for C{app} (closed in cleanup).

        @param app: the credentials, or C{None} for an anonymous client
            (unsigned requests).
        @param secret: sign with this secret instead of the app's.
        @param addressing_style: C{"path"} or C{"virtual"}.
        @param endpoint_url: instead of L{endpoint_url}.
        @param config: more L{botocore.config.Config} arguments.
        @return: the client; call it through L{call}.
        """
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        options: dict[str, Any] = {
            "region_name": "us-east-1",
            "s3": {"addressing_style": addressing_style},
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        if app is None:
            options["signature_version"] = UNSIGNED
        else:
            options["signature_version"] = "s3v4"
        options.update(config)
        session = boto3.session.Session()
        client = session.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=app.client_id if app else "anonymous",
            aws_secret_access_key=(secret or app.secret) if app else "anonymous",
            config=Config(**options),
        )
        self._clients.append(client)
        return client

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """
        Run a blocking (boto3) call in a thread.

        @return: its result.
        """
        return deferToThread(fn, *args, **kwargs)

    async def client_error(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Run a boto3 call that must fail with an S3 error.

        @return: the L{botocore.exceptions.ClientError}; its C{response}
            holds C{Error} (C{Code}, C{Message}, ...) and
            C{ResponseMetadata} (C{HTTPStatusCode}).
        @raise AssertionError: if the call succeeds.
        """
        from botocore.exceptions import ClientError

        try:
            result = await self.call(fn, *args, **kwargs)
        except ClientError as e:
            return e
        raise AssertionError(f"expected an S3 error, got {result!r}")

    async def raw_request(
        self,
        method: str,
        target: str | bytes,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> RawResponse:
        """
        Send one HTTP request exactly as given (no path normalisation), in a
        thread.

        @param method: the method.
        @param target: the request target (path and query), sent verbatim.
        @param headers: request headers.
        @param body: the body (a Content-Length is sent when non-empty or
            for methods that carry one).
        @return: the response.
        """
        port = self.port.getHost().port
        if isinstance(target, bytes):
            target = target.decode("latin-1")

        def send() -> RawResponse:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                sent = {name.lower() for name in (headers or {})}
                if "host" not in sent:
                    connection.putheader("Host", f"127.0.0.1:{port}")
                for name, value in (headers or {}).items():
                    connection.putheader(name, value)
                if (body or method in ("PUT", "POST")) and "content-length" not in sent:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body or None)
                response = connection.getresponse()
                data = response.read()
                return RawResponse(
                    response.status,
                    {name.lower(): value for name, value in response.getheaders()},
                    data,
                )
            finally:
                connection.close()

        return await deferToThread(send)

    def signed_headers(
        self,
        app: AppCredentials,
        method: str,
        path: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        payload_hash: str | None = None,
        timestamp: float | None = None,
    ) -> dict[str, str]:
        """
        Sign a raw request with SigV4 (as botocore would), for
        L{raw_request}.

        @param app: the credentials.
        @param method: the method.
        @param path: the percent-encoded path, exactly as it will be sent.
        @param query: the raw query string (without C{?}).
        @param headers: headers to sign too.
        @param body: the body.
        @param payload_hash: the C{x-amz-content-sha256} value; default the
            SHA-256 of C{body}.
        @param timestamp: sign as of this POSIX time (default: now).
        @return: the headers to send, including C{Authorization}.
        """
        return sign_request(
            app.client_id,
            app.secret,
            method,
            f"127.0.0.1:{self.port.getHost().port}",
            path,
            query,
            headers or {},
            body,
            payload_hash,
            timestamp,
        )


def sign_request(
    access_key: str,
    secret: str,
    method: str,
    host: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    payload_hash: str | None = None,
    timestamp: float | None = None,
    region: str = "us-east-1",
) -> dict[str, str]:
    """
    SigV4-sign a request independently of botocore (so that raw paths are
    signed exactly as sent).

    @return: the headers to send: C{headers} plus C{Host},
        C{x-amz-date}, C{x-amz-content-sha256} and C{Authorization}.
    """
    moment = time.gmtime(time.time() if timestamp is None else timestamp)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", moment)
    date = amz_date[:8]
    payload = payload_hash or hashlib.sha256(body).hexdigest()
    all_headers = {name.lower(): value for name, value in headers.items()}
    all_headers["host"] = host
    all_headers["x-amz-date"] = amz_date
    all_headers["x-amz-content-sha256"] = payload
    signed = sorted(all_headers)
    canonical = build_canonical_request(
        method, path, parse_query(query), all_headers, signed, payload
    )
    scope = f"{date}/{region}/s3/aws4_request"
    string_to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical).hexdigest()}"
    )
    key = signing_key(secret, date, region)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    result = dict(headers)
    result["Host"] = host
    result["x-amz-date"] = amz_date
    result["x-amz-content-sha256"] = payload
    result["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return result
