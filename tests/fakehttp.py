# -*- test-case-name: tests.test_web_body -*-
"""
Parsing raw HTTP/1.1 responses written to a L{StringTransport}, for tests
that drive an L{anvil.web.server.AnvilSite} byte by byte.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers


class Response:
    """
    One parsed HTTP response.

    @ivar code: The status code.
    @ivar headers: The headers.
    @ivar body: The body (de-chunked).
    """

    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        """
        The single value of header C{name}, or C{None}.
        """
        values = self.headers.getRawHeaders(name)
        if values is None:
            return None
        assert len(values) == 1, values
        return values[0]


def parse_response(data: bytes, head: bool) -> tuple[Response, bytes] | None:
    """
    Parse one complete response from the start of C{data}.

    @return: The response and the bytes after it, or C{None} when
        incomplete.
    """
    if b"\r\n\r\n" not in data:
        return None
    head_bytes, rest = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head_bytes.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, value = line.split(b":", 1)
        headers.addRawHeader(name.strip().lower(), value.strip())
    code = int(status_line.split(b" ")[1])
    if head or code in (100, 204, 304):
        return Response(code, headers, b""), rest
    length = headers.getRawHeaders(b"content-length")
    if length is not None:
        size = int(length[0])
        if len(rest) < size:
            return None
        return Response(code, headers, rest[:size]), rest[size:]
    if headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
        body = b""
        while True:
            if b"\r\n" not in rest:
                return None
            size_line, after = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            if len(after) < size + 2:
                return None
            body += after[:size]
            rest = after[size + 2 :]
            if size == 0:
                return Response(code, headers, body), rest
    # Delimited by the end of the connection.
    return Response(code, headers, rest), b""
