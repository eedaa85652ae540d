"""What stands between protege's servers and a hostile or broken network: connection and read timeouts, a
connection cap, a request-body limit, an API key, and logging that cannot flood.

uvicorn arms no timer on a fresh connection, and a client that trickles its request headers resets the keep-alive
timer with every byte, so an idle or slow connection is held forever; 1,100 of them exhausted the file descriptors of
an earlier server. `GuardedH11Protocol` closes a connection whose request headers do not arrive within
`header_timeout_s` of connecting (or of its previous answer), and past `max_connections` closes the connection idle
the longest (or, when every one is busy, the new one);
`RequestGuard` gives a request body `body_timeout_s` between chunks and `max_body_bytes` in all, and checks the API
key before the route runs.

A 413 or 408 is sent before the client has finished sending its body. Closing the socket with that body unread makes
the kernel reset the connection, and a reset can destroy the answer in flight, so the client sees "connection closed"
instead of the 413. `GuardedH11Protocol` closes such a connection gracefully: it sends the answer and a FIN, reads and
discards what the client still sends for up to `LINGER_S`, and then closes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_log = logging.getLogger("protege.server")
OPEN_PATHS = ("/health/", "/health")  # answered without the API key: liveness probes carry none
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_open(host: str, port: int, api_key: str | None, role: str, variable: str) -> None:
    """Say so when a server listens beyond this machine with no key: anyone who reaches the port may use it."""
    if api_key is None and host not in LOOPBACK:
        _log.warning(
            "serving on %s without an API key: anyone who reaches port %d can use this %s; set --api-key or %s",
            host,
            port,
            role,
            variable,
        )


LINGER_S = 5.0  # the longest a refused body is read and discarded after its answer, before the socket closes


class _LingeringTransport:
    """The connection's transport, whose `close` lingers while the client is still sending a request body."""

    def __init__(self, transport, protocol: GuardedH11Protocol):
        self._transport, self._protocol, self._lingering = transport, protocol, False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        transport = self._transport
        unread_body = self._protocol.conn.their_state is h11.SEND_BODY
        if self._lingering or transport.is_closing() or not unread_body or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()  # the FIN follows the queued answer, so the client reads all of it
        transport.resume_reading()
        self._protocol.loop.call_later(LINGER_S, transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers and a cap on open connections."""

    header_timeout_s = 10.0  # set per server by `guarded_protocol`
    max_connections = 1024

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self)
        self._connected_at = time.monotonic()
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections if c is not self and c._waiting_for_headers()]
            if idle:  # make room: the connection idle the longest goes, so a new client (a health probe) gets in
                oldest = min(idle, key=lambda c: c._connected_at)
                oldest.transport.close()
                _log.warning("%d connections are open: closed the longest idle one", self.max_connections)
            else:
                _log.warning("refused a connection: %d connections are open and busy", self.max_connections)
                transport.close()
                return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # the rest of a refused body, read while lingering: discarded
            return
        super().data_received(data)

    def _waiting_for_headers(self) -> bool:
        """No request in progress: connected (or answered) and waiting for the next request's headers."""
        cycle = getattr(self, "cycle", None)
        return (cycle is None or cycle.response_complete) and not self.transport.is_closing()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request's headers get the same deadline

    def connection_lost(self, exc) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
        waiting_after = self.cycle  # a new request replaces the cycle once its headers are complete
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_overdue, waiting_after)

    def _headers_overdue(self, waiting_after) -> None:
        self._header_deadline = None
        no_new_request = self.cycle is waiting_after and (self.cycle is None or self.cycle.response_complete)
        if no_new_request and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A protocol class with these limits (uvicorn takes a class, and builds one per connection)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )


class RequestGuard:
    """ASGI middleware: the API key (when set), then the body's size and pace; and a JSON 500 for any error of ours,
    where Starlette's outermost handler would answer and then drop the keep-alive connection.

    A body over `max_bytes` gets 413, whether it declares its length or arrives in chunks; a body whose next chunk
    does not arrive within `body_timeout_s` gets 408. Waiting for the client to hang up, after the body, has no limit.
    """

    def __init__(self, app, max_bytes: int, body_timeout_s: float = 30.0, api_key: str | None = None):
        self.app, self.max_bytes, self.body_timeout_s = app, max_bytes, body_timeout_s
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):
                return await _answer(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _answer(send, 413, self._message(declared.decode("latin-1")))
        received, body_done, answered = 0, False, False

        async def guarded_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyError(408, f"the request body stalled for {self.body_timeout_s:g} s") from None
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > self.max_bytes:
                raise BodyError(413, self._message(f"{received} or more"))
            return message

        async def tracking_send(message):
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except BodyError as error:
            if not answered:
                await _answer(send, error.status, error.detail)
        except Exception as error:  # a bug of ours: answer in JSON, log it, and keep the connection
            _log.exception("error while answering %s %s", scope["method"], scope["path"])
            if not answered:
                await _answer(send, 500, f"internal error ({type(error).__name__}); the server log has the details")

    def _message(self, size: str) -> str:
        return f"request body of {size} bytes is over the limit of {self.max_bytes}"


class BodyError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


async def _answer(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RateLimitFilter(logging.Filter):
    """Let each distinct message through at most once per `interval_s`; the next one that passes says how many were
    dropped (an exhausted file-descriptor table once logged 280,559 identical lines in seconds)."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self.last: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = self.clock()
        last, dropped = self.last.get(key, (-float("inf"), 0))
        if now - last < self.interval_s:
            self.last[key] = (last, dropped + 1)
            return False
        if len(self.last) > 10_000:
            self.last.clear()
        self.last[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like it in the last {now - last:.0f} s]"
        return True


def limit_logging(interval_s: float = 10.0) -> None:
    """Rate-limit the server's loggers (uvicorn's, asyncio's and ours)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "protege.server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(RateLimitFilter(interval_s))


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit, so that the connection cap binds before the OS's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def uvicorn_config(
    app,
    host: str,
    port: int,
    *,
    header_timeout_s: float = 10.0,
    max_connections: int = 1024,
    log_level: str = "info",
    **ssl,
):
    """uvicorn's settings for protege's servers: the guarded h11 protocol with its header timeout and connection cap,
    TLS (`ssl_certfile`, `ssl_keyfile`, ... as uvicorn names them), and rate-limited logs."""
    import uvicorn

    limit_logging()
    raise_open_file_limit()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(header_timeout_s, max_connections),
        timeout_keep_alive=5,
        **{key: value for key, value in ssl.items() if value is not None},
    )
