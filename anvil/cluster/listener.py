# -*- test-case-name: tests.test_cluster_listener -*-
"""
The cluster listener: HTTPS under mutual TLS, paths under C{/cluster/v1/}
(ARCHITECTURE §6, "Peer traffic").

L{ClusterRoot} is the root resource; the gossip, member and shard-transfer
resources are registered under it by name (C{register(b"gossip", ...)}
serves C{/cluster/v1/gossip} and everything below it).  Every request is
labelled C{api="cluster"} in the request metrics, with the registered name
as its operation.

The TLS handshake has already refused clients without a certificate from the
cluster CA naming a node (see L{anvil.cluster.tls}); handlers learn which
node is at the other end with L{request_peer}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from anvil.cluster.tls import NodeIdentity, RenewableServerContext, peer_node_id
from anvil.metrics import Metrics
from anvil.web.server import AnvilSite

#: The C{api} label of requests to the cluster listener.
API_CLUSTER = "cluster"

#: The path prefix of every cluster endpoint.
PREFIX = (b"cluster", b"v1")


def request_peer(request: Any) -> str:
    """
    The node id of the peer that sent C{request}, from its verified client
    certificate.

    @raise anvil.cluster.tls.PeerIdentityError: when the request did not come
        over a verified cluster connection.
    """
    return peer_node_id(request.transport)


def respond(request: Any, code: int, body: bytes = b"", content_type: bytes = b"text/plain; charset=utf-8") -> None:
    """
    Finish a cluster request with a short body.

    @param request: the request.
    @param code: the status code.
    @param body: the body (none for 204).
    @param content_type: the C{Content-Type} of a non-empty body.
    """
    request.setResponseCode(code)
    if body:
        request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.setHeader(b"Cache-Control", b"no-store")
    if body:
        request.write(body)
    request.finish()


def respond_json(request: Any, code: int, document: object) -> None:
    """
    Finish a cluster request with a JSON document.
    """
    respond(request, code, json.dumps(document, sort_keys=True).encode("utf-8"), b"application/json")


class _NotFound(Resource):
    """
    Any path no endpoint is registered for.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes | int:
        """
        Answer 404.
        """
        respond(request, 404, b"not found\n")
        return NOT_DONE_YET


class ClusterRoot(Resource):
    """
    The root resource of the cluster listener.
    """

    def __init__(self) -> None:
        """
        Start with no endpoints: every path answers 404.
        """
        super().__init__()
        self._endpoints: dict[bytes, IResource] = {}
        self._not_found = _NotFound()

    def register(self, name: bytes, resource: IResource) -> None:
        """
        Serve C{resource} at C{/cluster/v1/<name>} (and below: a non-leaf
        resource is traversed further as usual).

        @raise ValueError: when C{name} is taken or empty.
        """
        if not name or b"/" in name:
            raise ValueError(f"bad endpoint name {name!r}")
        if name in self._endpoints:
            raise ValueError(f"endpoint {name!r} is already registered")
        self._endpoints[name] = resource

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        """
        Route C{/cluster/v1/<name>/...} to the resource registered as
        C{name}, consuming the prefix; anything else is 404.

        @param path: the first path segment.
        @param request: the request (labelled for the metrics here).
        """
        request.anvil_api = API_CLUSTER
        postpath = request.postpath
        if path != PREFIX[0] or len(postpath) < 2 or postpath[0] != PREFIX[1]:
            return self._not_found
        request.prepath.append(postpath.pop(0))
        name = postpath.pop(0)
        request.prepath.append(name)
        resource = self._endpoints.get(name)
        if resource is None:
            return self._not_found
        # The registered names are a fixed set chosen by the code, so they
        # are safe metric labels; handlers may refine the operation.
        request.anvil_operation = name.decode("ascii", "replace")
        # Site's traversal continues below a non-leaf endpoint.
        return resource

    def render(self, request: Any) -> bytes | int:
        """
        C{/} itself: 404.
        """
        request.anvil_api = API_CLUSTER
        return self._not_found.render(request)


def cluster_factory(
    context: RenewableServerContext, root: ClusterRoot, metrics: Metrics, reactor: IReactorTime
) -> tuple[TLSMemoryBIOFactory, AnvilSite]:
    """
    The listening factory of the cluster listener: an L{AnvilSite} serving
    C{root}, wrapped in mutual TLS.

    @param context: the server TLS settings (see
        L{anvil.cluster.tls.RenewableServerContext}).
    @return: the factory to listen with, and the site it wraps (for
        connection tracking).
    """
    site = AnvilSite(root, metrics, reactor)
    return TLSMemoryBIOFactory(context, False, site), site


def server_tls(identity: NodeIdentity, ca: Any) -> RenewableServerContext:
    """
    The renewable server TLS settings for C{identity} under C{ca}.
    """
    return RenewableServerContext(identity, ca)
