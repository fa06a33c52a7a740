"""Running the app on uvicorn, hardened against slow clients and stopped gracefully.

uvicorn alone waits forever for a request's headers and accepts any number of connections, so a few hundred
"slowloris" sockets that send a header byte now and then hold the server's attention for as long as they
like. Here uvicorn's HTTP/1.1 protocol (h11) gets two limits of its own:

- `header_timeout`: a connection that has not finished sending a request's headers this many seconds after
  it opened (or after its previous answer) is closed with 408. The body has its own limit in guard.py.
- `max_connections`: one connection more than this is answered 503 and closed at once, so file descriptors
  and memory stay bounded while the slow ones time out.

Both are taken from the app's `ServeConfig` (app.state.serve_config). An idle connection between requests
is closed by uvicorn's own keep-alive timeout (5 s).

On SIGTERM (or SIGINT) `Server` starts the app's `Drain` (guard.py) before uvicorn's own shutdown: uvicorn
stops accepting connections, requests in flight get `shutdown_grace` seconds to finish, and the app then ends
what is left with a 503 or a stream error event; uvicorn's hard deadline comes a few seconds after that.

`serve()` runs in the foreground (`kfoundry serve`); `BackgroundServer` runs in a thread (tests, notebooks,
benchmarks). Its listening socket is bound before the thread starts (port 0 lets the OS pick a free port), so
`url` is valid as soon as the context is entered and no other process can take the port in between.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Self

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kfoundry.serve.errors import error_body

HARD_STOP_AFTER_GRACE_S = 3.0  # uvicorn cancels whatever is left this long after the app's grace period


def _raw_response(status: int, reason: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


TOO_MANY = _raw_response(503, "Service Unavailable", error_body(
    "too many open connections; retry shortly", "server_error", code="too_many_connections"))
HEADER_TIMEOUT = _raw_response(408, "Request Timeout", error_body(
    "the request headers did not arrive in time", code="header_timeout"))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read deadline and a cap on open connections."""

    def __init__(self, config: uvicorn.Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        serve = getattr(config, "serve_config", None)
        self.header_timeout = serve.header_timeout if serve else None
        self.max_connections = serve.max_connections if serve else None
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.write(TOO_MANY)
            transport.close()
            return
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in: the body has its own limit
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self.header_timeout is not None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(HEADER_TIMEOUT)
            self.transport.close()


class _Config(uvicorn.Config):
    """uvicorn's Config, with the app kept at hand for the protocol (which reads its ServeConfig)."""

    def __init__(self, app, **kwargs) -> None:
        super().__init__(app, http=GuardedH11Protocol, **kwargs)
        self.serve_config = getattr(getattr(app, "state", None), "serve_config", None)


class Server(uvicorn.Server):
    """uvicorn's Server whose exit signal first starts the app's drain (see the module docstring)."""

    def __init__(self, app, **kwargs) -> None:
        cfg = getattr(getattr(app, "state", None), "serve_config", None)
        grace = cfg.shutdown_grace if cfg else 5.0
        super().__init__(_Config(app, timeout_graceful_shutdown=grace + HARD_STOP_AFTER_GRACE_S, **kwargs))
        self.drain = getattr(getattr(app, "state", None), "drain", None)

    def handle_exit(self, sig, frame) -> None:
        if self.drain is not None:
            self.drain.begin()
        super().handle_exit(sig, frame)


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` in the foreground until SIGTERM/SIGINT, then drain."""
    Server(app, host=host, port=port, log_level=log_level).run()


class BackgroundServer:
    """`with BackgroundServer(app) as srv: ... srv.url ...` serves `app` on 127.0.0.1 until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = Server(app, log_level=log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="kfoundry-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """What SIGTERM does to `kfoundry serve`: drain, then stop (returns when the server has stopped)."""
        self.server.handle_exit(15, None)
        self.thread.join(timeout)

    def __exit__(self, *exc) -> None:
        if self.server.drain is not None:
            self.server.drain.begin()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
