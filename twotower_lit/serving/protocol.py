"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for request heads, and a lingering close.

uvicorn times out a keep-alive connection between requests, but not a new connection that sends
nothing, nor a client that sends its request line and headers a byte at a time: either holds its
connection for ever. Here a connection that has sent nothing is closed after the keep-alive
timeout, like an idle one, and a request head must be complete within ``header_timeout`` seconds
of its first byte, else the client gets a 408 and the connection is closed. (The body's deadline
is the app's: `twotower_lit.serving.app`.)

A connection closed while its client is still sending (a 413 or 408 before the body is read, a
malformed request) is closed the way nginx and Apache do it: the answer is sent and the write
side shut, then what the client still sends is read and dropped for up to ``LINGER_SECONDS``.
Closing at once would make the kernel answer the unread bytes with a reset, which can destroy
the answer before the client reads it.

This subclass uses `H11Protocol` internals (``conn``, ``cycle``, ``timeout_keep_alive_task``) of
the uvicorn pinned in requirements/base.txt; tests/serving/test_slow_clients.py and
test_adversarial.py fail if an upgrade changes them.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from twotower_lit.serving.errors import RequestError

LINGER_SECONDS = 2.0
_STILL_SENDING = (h11.SEND_BODY, h11.ERROR)  # h11 states of a client that may have more on the way


def _timeout_response(header_timeout: float) -> bytes:
    body = RequestError(408, "headers", f"request line and headers not received within {header_timeout:g} s").body()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class _LingeringTransport:
    """The connection's transport as uvicorn's code sees it: `close` goes through the protocol."""

    def __init__(self, transport, protocol: "HeaderTimeoutProtocol") -> None:
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class HeaderTimeoutProtocol(H11Protocol):
    """`H11Protocol` with a deadline for the request head; pass as uvicorn's ``http`` with
    ``functools.partial(HeaderTimeoutProtocol, header_timeout=...)``."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timing_head = False  # the timer runs for a request head (not for a silent connection)
        self._raw = None
        self._lingering = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        self.transport = _LingeringTransport(transport, self)  # what the request cycles close
        self._timer = self.loop.call_later(self.timeout_keep_alive, self._expired)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the answer is out; the rest of the request is dropped
            return
        if not self._timing_head:
            self._cancel()
        super().data_received(data)
        self._watch_head()

    def send_400_response(self, msg: str) -> None:
        # Bytes after a request's head that break the framing (a bad chunk, say) arrive while the
        # app serves that request: the 400 is its answer, and the app's own is dropped rather than
        # sent on a connection h11 has closed.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        super().send_400_response(msg)

    def _close(self, still_sending: bool = False) -> None:
        still_sending = still_sending or self.conn.their_state in _STILL_SENDING
        if self._lingering or self._raw.is_closing() or not still_sending or not self._raw.can_write_eof():
            self._raw.close()
            return
        self._cancel()
        self._lingering = True
        self._raw.write_eof()  # once the answer is written
        self._raw.resume_reading()
        self._timer = self.loop.call_later(LINGER_SECONDS, self._raw.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()  # the next request's head may already be partly here

    def _watch_head(self) -> None:
        """Time a request head from its first byte until h11 has parsed all of it; time a connection
        with nothing to read and no keep-alive timer of uvicorn's as an idle one."""
        if self.conn.their_state is not h11.IDLE:  # a request is being read or answered
            if self._timing_head:
                self._cancel()
        elif self.conn.trailing_data[0]:
            if not self._timing_head:
                self._cancel()
                self._timing_head = True
                self._timer = self.loop.call_later(self.header_timeout, self._expired)
        elif self._timer is None and self.timeout_keep_alive_task is None:
            self._timer = self.loop.call_later(self.timeout_keep_alive, self._expired)

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
        self._close(still_sending=timing_head)
