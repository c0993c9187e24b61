"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for connections that have not sent a request head.

uvicorn times out a keep-alive connection between requests, but not a new connection that sends
nothing, nor a client that sends its request line and headers a byte at a time: either holds its
connection for ever. Here a connection that has sent nothing is closed after the keep-alive
timeout, like an idle one, and a request head must be complete within ``header_timeout`` seconds
of its first byte, else the client gets a 408 and the connection is closed. (The body's deadline
is the app's: `twotower_lit.serving.app`.)
"""
from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from twotower_lit.serving.errors import RequestError


def _timeout_response(header_timeout: float) -> bytes:
    body = RequestError(408, "headers", f"request line and headers not received within {header_timeout:g} s").body()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class HeaderTimeoutProtocol(H11Protocol):
    """`H11Protocol` with a deadline for the request head; pass as uvicorn's ``http`` with
    ``functools.partial(HeaderTimeoutProtocol, header_timeout=...)``."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timing_head = False  # the timer runs for a request head (not for a silent connection)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.timeout_keep_alive, self._expired)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._timing_head:
            self._cancel()
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()  # the next request's head may already be partly here

    def _watch_head(self) -> None:
        """Time a request head from its first byte until h11 has parsed all of it."""
        waiting = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if waiting and not self._timing_head:
            self._cancel()
            self._timing_head = True
            self._timer = self.loop.call_later(self.header_timeout, self._expired)
        elif not waiting and self._timing_head:
            self._cancel()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timing_head = None, False

    def _expired(self) -> None:
        timing_head, self._timer, self._timing_head = self._timing_head, None, False
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if timing_head:
            self.transport.write(_timeout_response(self.header_timeout))
        self.transport.close()
