# -*- test-case-name: tests.test_s3_dispatch -*-
"""
S3 XML documents: building responses and parsing (small) request bodies.

Responses
=========
L{Element} is a tiny builder that writes exactly the document AWS
documents, in element order, with the S3 namespace on the root::

    doc = Element("ListAllMyBucketsResult")
    owner = doc.child("Owner")
    owner.text("ID", owner_id)
    ...
    body = doc.to_bytes()

Text is escaped; characters XML 1.0 cannot carry (object keys may contain
any code point, C{\\x01} for example) are replaced by U+FFFD, as in
L{anvil.s3.errors}. Listings that may hold such keys should be requested
with C{encoding-type=url}, as AWS advises.

Requests
========
L{parse_xml} accepts only small, plain documents: the size is capped
before parsing, C{DOCTYPE} declarations (and with them every entity
definition, internal or external) are refused, and so is anything the
parser rejects. Every problem is C{MalformedXML}, never a 500. The
namespace of the request document is ignored (AWS accepts documents with
and without it); L{XmlNode} exposes children by local name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from xml.parsers import expat
from xml.sax.saxutils import escape

from anvil.s3.errors import MalformedXML

#: The S3 document namespace.
S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
#: The XML Schema instance namespace (C{xsi:type} in ACL grantees).
XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"

XML_CONTENT_TYPE = "application/xml"

_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

#: The default largest request document (CompleteMultipartUpload with 10,000
#: parts and DeleteObjects with 1,000 keys of 1,024 bytes both fit).
MAX_REQUEST_XML = 2 * 1024 * 1024


def xml_text(value: object) -> str:
    """
    Escape a value as XML character data.

    @param value: converted with C{str}; C{bool} becomes C{true}/C{false}.
    @return: escaped text with characters XML cannot carry replaced.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(_XML_INVALID.sub("\ufffd", str(value)))


def iso8601(moment: datetime) -> str:
    """
    Format a timestamp as S3 does in XML (millisecond precision, C{Z}).

    @param moment: an aware datetime.
    @return: e.g. C{2024-05-01T12:00:00.000Z}.
    """
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Element:
    """
    An XML element under construction.
    """

    def __init__(self, name: str, attributes: dict[str, str] | None = None) -> None:
        """
        @param name: the tag.
        @param attributes: attributes, written in order (already trusted
            names; values are escaped).
        """
        self._name = name
        self._attributes = dict(attributes or {})
        self._parts: list[Element | str] = []

    def child(self, name: str, attributes: dict[str, str] | None = None) -> Element:
        """
        Append an empty child element and return it.

        @param name: its tag.
        @param attributes: its attributes.
        @return: the child.
        """
        element = Element(name, attributes)
        self._parts.append(element)
        return element

    def text(self, name: str, value: object) -> Element:
        """
        Append a child element holding text.

        @param name: its tag.
        @param value: its text (see L{xml_text}).
        @return: this element, for chaining.
        """
        self._parts.append(f"<{name}>{xml_text(value)}</{name}>")
        return self

    def content(self, value: object) -> Element:
        """
        Append text directly inside this element (for documents whose root
        holds only text, such as C{LocationConstraint}).

        @param value: the text (see L{xml_text}).
        @return: this element, for chaining.
        """
        self._parts.append(xml_text(value))
        return self

    def optional(self, name: str, value: object | None) -> Element:
        """
        Like L{text}, but only when C{value} is not C{None}.

        @return: this element, for chaining.
        """
        if value is not None:
            self.text(name, value)
        return self

    def _render(self, out: list[str]) -> None:
        attributes = "".join(
            f' {name}="{xml_text(value)}"' for name, value in self._attributes.items()
        )
        if not self._parts:
            out.append(f"<{self._name}{attributes}/>")
            return
        out.append(f"<{self._name}{attributes}>")
        for part in self._parts:
            if isinstance(part, Element):
                part._render(out)
            else:
                out.append(part)
        out.append(f"</{self._name}>")

    def to_bytes(self) -> bytes:
        """
        @return: the UTF-8 document, with the XML declaration.
        """
        out: list[str] = []
        self._render(out)
        return _DECLARATION + "".join(out).encode("utf-8")


def document(root: str) -> Element:
    """
    Start a response document whose root carries the S3 namespace.

    @param root: the root tag, e.g. C{ListBucketResult}.
    @return: the root element.
    """
    return Element(root, {"xmlns": S3_NAMESPACE})


# Parsing ----------------------------------------------------------------------

#: Request documents are flat; anything deeper is not one of ours.
_MAX_DEPTH = 16


class _Refused(Exception):
    """Raised from expat handlers to stop at a construct we refuse."""


class XmlNode:
    """
    A parsed request element, with namespace-free access to children.

    @ivar name: the local name.
    @ivar value: the text content; a text made only of whitespace (the
        indentation of an element holding children) is C{""}, any other
        text is kept exactly (keys may start or end with spaces).
    @ivar raw: the text content exactly as received (object keys made of
        spaces only are keys too).
    @ivar nodes: the child elements, in document order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[XmlNode] = []
        self._text: list[str] = []
        self.value = ""
        self.raw = ""

    def _close(self) -> None:
        text = "".join(self._text)
        self.raw = text
        self.value = text if text.strip() else ""
        self._text = []

    def children(self, name: str | None = None) -> Iterator[XmlNode]:
        """
        @param name: only children with this local name (all if C{None}).
        @return: the child elements, in document order.
        """
        for node in self.nodes:
            if name is None or node.name == name:
                yield node

    def find(self, name: str) -> XmlNode | None:
        """
        @param name: a local name.
        @return: the first child with that name, or C{None}.
        """
        return next(self.children(name), None)

    def find_text(self, name: str) -> str | None:
        """
        @param name: a local name.
        @return: the text of the first such child, or C{None} if absent.
        """
        node = self.find(name)
        return None if node is None else node.value


def _local(name: str) -> str:
    # With a namespace separator, expat reports "uri}local" for namespaced
    # names and "local" for the others.
    return name.rsplit("}", 1)[-1]


def parse_xml(body: bytes, root: str, max_size: int = MAX_REQUEST_XML) -> XmlNode:
    """
    Parse a request document safely.

    expat is driven directly (no third-party parser is needed): a DOCTYPE
    stops the parse before any entity can be declared, so no internal or
    external entity is ever expanded; only the five predefined entities
    and character references remain.

    @param body: the request body.
    @param root: the expected local name of the root element.
    @param max_size: the largest accepted body.
    @return: the root element.
    @raise MalformedXML: for an empty, oversized, ill-formed or unsafe
        document, one nested too deeply, or one with another root element.
    """
    if not body or len(body) > max_size:
        raise MalformedXML()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[XmlNode] = []
    top: list[XmlNode] = []

    def start(name: str, attributes: object) -> None:
        if len(stack) >= _MAX_DEPTH:
            raise _Refused()
        node = XmlNode(_local(name))
        if stack:
            stack[-1].nodes.append(node)
        else:
            top.append(node)
        stack.append(node)

    def end(name: str) -> None:
        stack.pop()._close()

    def text(data: str) -> None:
        if stack:
            stack[-1]._text.append(data)

    def refuse(*args: Any) -> Any:
        raise _Refused()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    try:
        parser.Parse(body, True)
    except (_Refused, expat.ExpatError, ValueError, UnicodeError):
        raise MalformedXML() from None
    if len(top) != 1 or top[0].name != root:
        raise MalformedXML()
    return top[0]
