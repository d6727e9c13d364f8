"""Limits uvicorn's HTTP/1.1 protocol lacks: time to send the headers, time to send the body,
and the size of the headers.

uvicorn closes an idle keep-alive connection, but a client that opened a connection and sends its
headers a byte at a time, or never finishes its body, holds the connection (and its buffers)
forever; and httptools buffers a header of any size. `LimitedHttpToolsProtocol` adds, per request:
- the headers must be complete `header_timeout_s` after the connection opened or the request's
  first byte arrived, else 408 and close (a connection that sent nothing is just closed);
- the body must be complete `body_timeout_s` after the headers, else 408 and close (the app sees
  a disconnect, counted as 499);
- the headers (request line included) may be at most `max_header_bytes`, else 431 and close,
  checked as bytes arrive, so no more than two reads (256 KiB each) past the limit are ever
  buffered (a read that also holds the end of an earlier request's body is not counted).
A refusal is written, then the write side shut (FIN) and the client's further bytes read and
dropped for up to LINGER_S: closing at once with unread bytes would send a reset that destroys the
answer. `uvicorn_config` builds the uvicorn.Config `codelen serve` (and the tests' server) runs with.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from codelen.settings import Settings

LINGER_S = 2.0  # after a refusal, how long the client's further bytes are read and dropped


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self, *args: Any, header_timeout_s: float, body_timeout_s: float, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.max_header_bytes = max_header_bytes
        self._reading_headers = True  # from the connection or a request's end to the next one's headers' end
        self._header_bytes = 0
        self._completed = False  # a request ended within the read being parsed
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def _done(self) -> bool:
        return self._refused or self.transport.is_closing()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: read and drop, so the answer is not lost to a reset
        # A read that starts in a request's headers or between requests, and in which no request
        # ends, is all header. One that starts in a body (a request answered before its body was
        # read, or pipelined) may end with the next request's first header bytes: how many is not
        # known, so that read (at most 256 KiB) is not counted, rather than counting the body.
        counts, self._completed = self._reading_headers, False
        super().data_received(data)
        if self._reading_headers and self.parser is not None and not self._done():
            self._header_bytes += len(data) if counts and not self._completed else 0
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"request headers over {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers, self._header_bytes = True, 0
        if self._deadline is None:  # a request on a kept-alive connection: its headers' clock starts now
            self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:  # all of them came in one read
            self._refuse(431, f"request headers over {self.max_header_bytes} bytes")
            return
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._done():
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._reading_headers, self._header_bytes, self._completed = True, 0, True  # the next bytes: a new request's
        if not self._done():
            self._disarm()
            super().on_message_complete()

    def _expired(self) -> None:
        self._deadline = None
        if self._done():
            return
        if self._reading_headers:
            if self._header_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # nothing of a request was sent: nothing to answer
                return
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s")
        else:
            self._refuse(408, f"request body not received within {self.body_timeout_s:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        """A problem+json answer straight to the socket, then close (unless the app has answered)."""
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:
                self.transport.close()
                return
            self.cycle.response_started = self.cycle.response_complete = True  # the app's answer, if any, is dropped
            self.cycle.disconnected = True
            self.cycle.message_event.set()  # the app's receive() returns http.disconnect
        from service.problems import problem_body

        body = problem_body(status, detail)
        head = b"content-type: application/problem+json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(STATUS_LINE[status] + head + body)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing now, with the client's unread bytes in the socket, would send a reset that can
        # destroy the answer before the client reads it: send FIN, drop what still comes, close
        # when the client does or after LINGER_S.
        self._refused = True
        self.transport.write_eof()
        self.transport.resume_reading()  # uvicorn may have paused it (a large body): drop, don't leave unread
        self._deadline = self.loop.call_later(LINGER_S, self.transport.close)


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config with the limits above (kwargs: host, port, log_level, ...)."""
    protocol = functools.partial(
        LimitedHttpToolsProtocol,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
    )
    return uvicorn.Config(app, http=protocol, **kwargs)  # type: ignore[arg-type]
