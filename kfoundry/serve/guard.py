"""The gate in front of the app: what is checked before a request body is read, and how the server drains.

`Guard` is plain ASGI middleware. For every HTTP request, in this order and before any route code runs:

1. **Host header** (when `allowed_hosts` is set, as it is by default when the server is bound to loopback).
   A web page on another site can make a browser send requests to `http://127.0.0.1:8000` by pointing its own
   domain name at 127.0.0.1 (DNS rebinding); the browser then sends that site's name as `Host`. Refusing
   unknown names keeps such a page away from a loopback server that has no API key.
2. **Draining**: after SIGTERM, new requests get an OpenAI-style 503 (`/health` still answers, with 503).
3. **API key** on `/v1/*`: checked from the headers alone, so a client without the key cannot make the
   server read, buffer or parse a byte of its body.
4. **Body**: read here, counting bytes as they arrive, whatever `Content-Length` or chunked encoding claims:
   past `max_body_bytes` the answer is 413 at once, and a body that does not arrive within `body_timeout`
   seconds gets 408. The route then reads the buffered body as usual.

`Drain` is the graceful-shutdown state shared with the server (server.py calls `begin()` on SIGTERM): from
then on new requests are refused, requests in flight have `grace` seconds to finish, and what is still
running then is ended — a full answer becomes a 503 in OpenAI's error shape, a stream gets a last
`data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from kfoundry.serve.errors import APIError
from kfoundry.serve.generation import Generation
from kfoundry.serve.hosts import LOOPBACK_NAMES, host_name

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class GuardConfig:
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES  # None: any Host
    max_body_bytes: int = 4 * 2**20
    body_timeout: float = 60.0  # seconds for the whole body to arrive


class Drain:
    """Graceful shutdown: refuse new requests, give requests in flight `grace` seconds, then end them."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self.expired = False
        self._active: set[Generation] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """FastAPI lifespan: remember the server's event loop, so `begin()` may be called from any thread."""
        self.attach()
        yield

    def attach(self) -> None:
        """Remember the running event loop (the Guard calls this too, for servers run without lifespan)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    def begin(self) -> None:
        """Start draining (thread- and signal-safe; later calls do nothing)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._loop.call_later(self.grace, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for gen in list(self._active):
            gen.abort(f"the server is shutting down; the request did not finish within the {self.grace:g} s "
                      "grace period")

    @contextlib.contextmanager
    def track(self, gen: Generation) -> Iterator[None]:
        """Hold `gen` as in flight for the duration of the block."""
        self._active.add(gen)
        if self.expired:  # raced with the end of the grace period
            gen.abort("the server is shutting down")
        try:
            yield
        finally:
            self._active.discard(gen)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica or after it restarts",
                    "server_error", code="server_shutting_down", headers={"Connection": "close", "Retry-After": "1"})


class Guard:
    """ASGI middleware: Host, draining, API key and body checks (see the module docstring)."""

    def __init__(self, app, cfg: GuardConfig, drain: Drain) -> None:
        self.app, self.cfg, self.drain = app, cfg, drain
        self.allowed = None if cfg.allowed_hosts is None else frozenset(h.lower() for h in cfg.allowed_hosts)
        self.key = cfg.api_key.encode() if cfg.api_key is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.drain.attach()
        try:
            self._check_headers(scope)
            if scope["method"] in BODY_METHODS:
                body = await self._read_body(scope, receive)
                if body is None:
                    return  # the client left while sending; there is nobody to answer
                receive = _replay(body, receive)
        except APIError as e:
            await e.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope) -> None:
        headers = dict(scope.get("headers") or [])
        if self.allowed is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                raise APIError(400, f"Host {host!r} is not served here; allowed: {', '.join(sorted(self.allowed))} "
                               "(kfoundry serve --allow-host NAME adds one)", code="invalid_host")
        if self.drain.draining and scope["path"] != "/health":
            raise shutting_down()
        if self.key is not None and scope["path"].startswith("/v1/"):
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.key):
                raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cfg.max_body_bytes):
            raise self._too_large()

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, counted as it arrives; None if the client disconnected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.cfg.body_timeout:g} s",
                               code="body_timeout", headers={"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body larger than {self.cfg.max_body_bytes} bytes", code="body_too_large",
                        headers={"Connection": "close"})


def _replay(body: bytes, receive):
    """A `receive` that hands the route the buffered body, then passes through (to see disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
