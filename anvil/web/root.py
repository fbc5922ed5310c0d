# -*- test-case-name: tests.test_web_root -*-
"""
The root resource of the API listener.

It answers the node's own endpoints and hands everything else to the S3
resource tree:

  - C{GET /} (and C{HEAD /}): liveness, 200 C{OK} while the process runs.
    It touches no database and does no I/O, so a node whose databases are
    down is still I{alive} (and is not restarted for it) while not ready.
  - C{GET /ready}: readiness, 200 C{ready} or 503 naming each failing check
    (see L{anvil.web.readiness}).
  - C{GET /metrics}: the Prometheus text exposition.

These paths collide with S3 path-style addressing (C{GET /} is ListBuckets,
C{GET /ready} is ListObjects of a bucket named C{ready}). The rule is: a
request carrying an AWS signature (an C{Authorization} header, or presigned
query parameters) always goes to S3; an anonymous request for exactly one of
those three paths is answered here. Anonymous S3 access to buckets named
C{ready} or C{metrics} through path-style URLs is therefore not possible;
signed access is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from anvil.metrics import API_NODE, Metrics
from anvil.web.readiness import Readiness, ReadinessResult

_TEXT = b"text/plain; charset=utf-8"

_ALLOWED = (b"GET", b"HEAD")

_SIGNATURE_QUERY_PARAMETERS = frozenset(
    {
        # Signature Version 4, presigned URL.
        b"x-amz-signature",
        b"x-amz-credential",
        # Signature Version 2, presigned URL: not supported by Anvil, but
        # S3 (not the health endpoint) must be the one to reject it.
        b"awsaccesskeyid",
    }
)


def is_signed(request: Any) -> bool:
    """
    Tell whether a request claims an AWS signature.

    Only the presence of a signature counts here; checking it is the S3
    layer's job. Parameter names are compared case-insensitively so a
    client that spells them oddly still reaches S3 and gets S3's error.

    @param request: The request (C{request.args} holds the query).
    @return: C{True} when it carries an C{Authorization} header or
        presigned-URL query parameters.
    """
    if request.requestHeaders.hasHeader(b"authorization"):
        return True
    return any(name.lower() in _SIGNATURE_QUERY_PARAMETERS for name in request.args)


def _respond(request: Any, code: int, body: bytes, content_type: bytes = _TEXT) -> None:
    """
    Finish a node-endpoint request with a short body.

    @param request: The request.
    @param code: The status code.
    @param body: The body; not sent for HEAD (Twisted drops it), but its
        length is still announced, as HEAD requires.
    @param content_type: The C{Content-Type} value.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    # Probe results describe this instant; no proxy may replay them.
    request.setHeader(b"Cache-Control", b"no-store")
    request.write(body)
    request.finish()


class _NodeEndpoint(Resource):
    """
    Common part of C{/}, C{/ready} and C{/metrics}: labels the request for
    the metrics and answers methods other than GET and HEAD with 405.

    @cvar operation: The C{operation} metric label.
    """

    isLeaf = True
    operation = ""

    def render(self, request: Any) -> bytes | int:
        """
        Label the request and dispatch GET and HEAD to L{render_node}.

        @param request: The request.
        @return: C{NOT_DONE_YET}: every endpoint finishes the request itself.
        """
        request.anvil_api = API_NODE
        request.anvil_operation = self.operation
        if request.method not in _ALLOWED:
            request.setHeader(b"Allow", b", ".join(_ALLOWED))
            _respond(request, 405, b"method not allowed")
            return NOT_DONE_YET
        return self.render_node(request)

    def render_node(self, request: Any) -> bytes | int:
        """
        Answer a GET or HEAD request.

        @param request: The request.
        @return: C{NOT_DONE_YET}.
        """
        raise NotImplementedError()


class _Health(_NodeEndpoint):
    """
    C{GET /}: liveness. Never does any I/O.
    """

    operation = "Health"

    def render_node(self, request: Any) -> bytes | int:
        """
        Answer 200 C{OK}.

        @param request: The request.
        @return: C{NOT_DONE_YET}.
        """
        _respond(request, 200, b"OK")
        return NOT_DONE_YET


class _Metrics(_NodeEndpoint):
    """
    C{GET /metrics}: the Prometheus text exposition of this node's registry.
    """

    operation = "Metrics"

    def __init__(self, metrics: Metrics) -> None:
        """
        @param metrics: The node's metrics.
        """
        super().__init__()
        self._metrics = metrics

    def render_node(self, request: Any) -> bytes | int:
        """
        Answer 200 with the current metrics.

        @param request: The request.
        @return: C{NOT_DONE_YET}.
        """
        body, content_type = self._metrics.render()
        # The exposition content type carries the format version that
        # Prometheus reads to pick its parser.
        _respond(request, 200, body, content_type.encode("ascii"))
        return NOT_DONE_YET


class _Ready(_NodeEndpoint):
    """
    C{GET /ready}: runs the readiness checks for every request.
    """

    operation = "Ready"
    _log = Logger()

    def __init__(self, readiness: Readiness, metrics: Metrics) -> None:
        """
        @param readiness: Runs the node's checks.
        @param metrics: Receives the result as C{anvil_node_ready}.
        """
        super().__init__()
        self._readiness = readiness
        self._metrics = metrics

    def render_node(self, request: Any) -> bytes | int:
        """
        Start the checks; answer when they are done.

        @param request: The request.
        @return: C{NOT_DONE_YET}.
        """
        checking: Deferred[ReadinessResult] = Deferred.fromCoroutine(
            self._readiness.check()
        )
        gone = False

        def client_gone(reason: Failure) -> None:
            # The prober gave up (or the node is shutting down the
            # connection): stop the checks instead of finishing them for
            # nobody.
            nonlocal gone
            gone = True
            checking.cancel()

        # Registered before the callbacks: checks that are already settled
        # answer synchronously, and the request must not be finished yet
        # when notifyFinish is called.
        request.notifyFinish().addErrback(client_gone)

        def answer(result: ReadinessResult) -> None:
            if gone:
                return
            self._metrics.set_ready(result.ok)
            if result.ok:
                _respond(request, 200, b"ready")
                return
            lines = ["not ready"] + [f"{f.name}: {f.message}" for f in result.failures]
            _respond(request, 503, ("\n".join(lines) + "\n").encode("utf-8"))

        def broken(reason: Failure) -> None:
            if gone and reason.check(CancelledError):
                return
            # Readiness.check turns every check failure into data, so this
            # is a bug; still answer 503 rather than leave the probe hanging.
            self._log.failure("Readiness check crashed", reason)
            if gone:
                return
            self._metrics.set_ready(False)
            _respond(request, 503, b"not ready\nreadiness: internal error\n")

        checking.addCallbacks(answer, broken)
        return NOT_DONE_YET


class _NotFound(Resource):
    """
    Any path when the node serves no S3 API: 404 with a plain-text body.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes | int:
        """
        Answer 404 C{not found}.

        @param request: The request.
        @return: C{NOT_DONE_YET}.
        """
        _respond(request, 404, b"not found")
        return NOT_DONE_YET


class RootResource(Resource):
    """
    The root of the API listener: node endpoints, then S3.
    """

    def __init__(
        self, readiness: Readiness, metrics: Metrics, s3: IResource | None = None
    ) -> None:
        """
        @param readiness: Runs the checks behind C{/ready}.
        @param metrics: Served at C{/metrics}; also receives
            C{anvil_node_ready}.
        @param s3: The S3 resource tree, or C{None} to answer 404 for
            everything but the node endpoints. It is traversed as if it
            were the site's root: for C{/bucket/key} its
            C{getChildWithDefault} is called with C{b"bucket"} (or, if it
            is a leaf, it is rendered with C{request.postpath ==
            [b"bucket", b"key"]}); for C{/} with C{b""}.
        """
        super().__init__()
        self._s3 = s3
        self._not_found = _NotFound()
        self._endpoints: dict[bytes, IResource] = {
            b"": _Health(),
            b"ready": _Ready(readiness, metrics),
            b"metrics": _Metrics(metrics),
        }

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        """
        Route one request: node endpoint, S3, or 404.

        @param path: The first path segment (already moved to
            C{request.prepath} by Twisted's traversal).
        @param request: The request.
        @return: The resource that continues the traversal.
        """
        # An exact match only: "/ready/" or "/ready/x" are S3 paths.
        if not request.postpath and not is_signed(request):
            endpoint = self._endpoints.get(path)
            if endpoint is not None:
                return endpoint
        if self._s3 is None:
            return self._not_found
        # Undo this step of the traversal so the S3 tree sees the whole
        # path, exactly as if it were the site's root resource.
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self._s3

    def render(self, request: Any) -> bytes | int:
        """
        Unreachable through a L{Site} (every path has at least one
        segment); answers like an unknown path for direct calls.

        @param request: The request.
        @return: C{NOT_DONE_YET}.
        """
        return self._not_found.render(request)
