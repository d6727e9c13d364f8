"""One parse of each JSON body, bounded before it starts.

The gate (`service/middleware.py`) reads the body and parses it once, for its own checks and for
the cached-score fast path; `JSONBodyRoute` hands that same document to FastAPI, which would
otherwise parse the bytes again. Before parsing, `expansion_estimate` guesses what the document
will cost as Python objects from a count of its tokens (C-speed `bytes.count`; strings cut out when
that is cheap and matters): 8 MB of `[{},{},…]` is 2.8 million dicts, ~220 MB and seconds of a blocked
event loop, and is refused with 413 before a single object is built.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.problems import Problem

PARSED = "codelen.json"  # scope key: the gate's ParsedBody

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string (unrolled: no backtracking)
# Bytes each token costs once parsed, on CPython 3.11 (object, GC header, the slot that holds it).
_OBJECT, _ARRAY, _STR, _ITEM = 88, 80, 64, 16
REFINE_MAX_STRINGS = 100_000  # cutting strings out costs ~1.3 us a string: at most ~130 ms


@dataclass(frozen=True)
class ParsedBody:
    raw: bytes
    doc: Any = None
    error: str | None = None  # the body is not JSON: why (a 400 on routes that take JSON)


def expansion_estimate(raw: bytes, bound: int) -> int:
    """About the bytes `json.loads(raw)` allocates; errs high (string payloads counted twice).

    First from plain counts of `{`, `[`, `"`, `,` and `:` (a few ms for 8 MB), which also count
    those inside strings. Only if that passes `bound` and the body has few enough strings for the
    cut to be cheap are the strings cut out and the structure counted again."""
    quotes = raw.count(b'"')
    estimate = _estimate(raw, quotes // 2, 0)
    if estimate > bound and quotes <= 2 * REFINE_MAX_STRINGS:
        bare = _STRING.sub(b'""', raw)
        estimate = _estimate(bare, bare.count(b'""'), len(raw) - len(bare))
    return estimate


def _estimate(text: bytes, strings: int, cut: int) -> int:
    containers = _OBJECT * text.count(b"{") + _ARRAY * text.count(b"[")
    return containers + _STR * strings + _ITEM * (text.count(b",") + text.count(b":")) + 2 * (len(text) + cut)


def is_json(content_type: str | None) -> bool:
    """No Content-Type is taken as JSON (curl -d, most clients); else application/json or */*+json."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse(raw: bytes) -> ParsedBody:
    """Raises RecursionError for nesting deeper than the interpreter's stack (the gate answers 422)."""
    try:
        return ParsedBody(raw, json.loads(raw))
    except UnicodeDecodeError as exc:
        return ParsedBody(raw, error=f"the body is not UTF-8 ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return ParsedBody(raw, error=f"malformed JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")


class JSONBodyRoute(APIRoute):
    """A route whose JSON body the gate parsed: FastAPI validates that document, with no second
    parse; a body that is not JSON is 400, one of another media type 415."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def handle(request: Request) -> Response:
            parsed: ParsedBody | None = request.scope.get(PARSED)
            if parsed is not None:
                if parsed.error is not None:
                    raise Problem(400, parsed.error)
                request._body, request._json = parsed.raw, parsed.doc  # what Request.body()/.json() return
            elif not is_json(request.headers.get("content-type")) and await request.body():
                raise Problem(415, "send the body as application/json")
            return await handler(request)

        return handle
