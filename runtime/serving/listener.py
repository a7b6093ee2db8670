"""uvicorn set up for clients that may be hostile: the h11 protocol with a bounded request head, a deadline to send
a whole request, a cap on open connections below the file-descriptor limit, the keep-alive timeout, and a shutdown
that gives the engines their deadline before it waits for the connections.

uvicorn's own `limit_concurrency` is not used: it counts idle and half-open connections too, so a client holding
that many half-sent requests would turn every other client away with 503. Requests in progress are limited in
the app instead (limits.ConcurrencyLimit), where a half-sent request never arrives."""

from __future__ import annotations

import logging
import resource
import time
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ListenerSettings

log = logging.getLogger("runtime.serving.app")

MAX_REQUEST_HEAD = 64 * 1024  # bytes of request line and headers (h11's limit; uvicorn's httptools has none)
# asyncio accepts up to `backlog` connections at a time before any of them reaches connection_made, so the
# connection cap leaves that many file descriptors free, and some for the rest (engine files, pipes, logs).
BACKLOG = 128
FD_RESERVE = BACKLOG + 64
ANSWER_MARGIN = 1.0  # seconds of the shutdown timeout left to send the answers of the requests the drain ended


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what uvicorn lacks (Kludex/uvicorn#157, its keep-alive timer starts only after a
    response): a connection must send a whole request, head and body, within `timeout_read` seconds of opening or
    of its request's first byte, or it is closed; and a connection past `max_connections` is closed at once, so the
    process never reaches its file-descriptor limit (there the accept loop fails, logging a traceback each try)."""

    timeout_read: float = 30.0
    max_connections: int = 1024
    _closed_since_log = 0
    _last_log = 0.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_deadline = None
        if len(self.connections) > self.max_connections:
            self._close("the server has too many open connections")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # a whole request arrived (or the connection ends)
        elif self._read_deadline is None:  # the first bytes of another request on a kept-alive connection
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._read_deadline = self.loop.call_later(self.timeout_read, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_read_deadline", None) is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _expire(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self._close(f"no whole request came within {self.timeout_read:g} s (--timeout-read)")

    def _close(self, reason: str) -> None:
        self.transport.close()
        cls = GuardedH11Protocol
        cls._closed_since_log += 1
        now = time.monotonic()
        if now - cls._last_log >= 10:  # one line per 10 s, whatever the number of connections
            log.warning("closed %d connection(s) in the last %.0f s: %s", cls._closed_since_log,
                        now - cls._last_log if cls._last_log else 0, reason)
            cls._closed_since_log, cls._last_log = 0, now


class Server(uvicorn.Server):
    """uvicorn's server that calls `before_shutdown()` when shutdown starts, before it waits for the connections."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], None]):
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets=None) -> None:
        self.before_shutdown()
        await super().shutdown(sockets)


def connection_budget() -> int:
    """Client connections that fit under the process's file-descriptor limit with FD_RESERVE to spare, once the soft
    limit is raised to the hard one (up to 65536), as servers do: a soft `ulimit -n` of 1024 is common."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return max(16, min(soft, 65536) - FD_RESERVE)


def make_server(app, settings: ListenerSettings, stop_engines: Callable[[float], None]) -> Server:
    """The uvicorn server for `app`. On SIGTERM, stop_engines(seconds) gives the running requests the shutdown
    timeout less ANSWER_MARGIN to finish (what is left is answered with an error); uvicorn then waits for the
    connections for the whole timeout, which is over by then."""
    max_connections = connection_budget()
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,),
                    {"timeout_read": settings.timeout_read, "max_connections": max_connections})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, http=protocol, loop="asyncio",
                            log_level="info", backlog=BACKLOG, timeout_keep_alive=settings.timeout_keep_alive,
                            h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
                            timeout_graceful_shutdown=settings.shutdown_timeout)
    drain = max(0.0, settings.shutdown_timeout - ANSWER_MARGIN)
    return Server(config, lambda: stop_engines(drain))
