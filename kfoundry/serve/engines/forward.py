"""One forwarding engine for any upstream server that continues token ids over HTTP (llama.cpp, vLLM).

The front (app.py) does everything a client sees: API key, limits, NFC, tokenizing with our tokenizer and
its chat template, text decoding, stop strings, `n` choices, usage, error shapes and /health. A forwarding
engine only takes over the scheduler's job: each choice of each `Ticket` becomes one request to the upstream
with the prompt as *token ids*, and the token ids that come back are reported through the ticket's
`on_events`, exactly as our scheduler reports them. So the same prompt tokens go in whatever the engine, and
the same text comes out for the same tokens. The upstream batches the requests of all its slots itself.

What differs between upstreams is an `Upstream` object (llama_cpp.py, vllm.py): how its process is started,
health-checked and stopped, and its request dialect (`body` and `parse`; llama-server answers token ids only
on its native `/completion`, vLLM on `/v1/completions` with `return_token_ids`).

- A streaming request is forwarded as a stream: each upstream chunk's tokens are reported as they arrive.
- A non-streaming request (`ticket.stream` False) is forwarded as one non-streamed upstream request and all
  its tokens are reported in one event list: no per-token HTTP chunk, JSON parse or thread hop. The ticket's
  cancel hook wakes the waiting task (no polling), which drops the request (closing its connection, which
  frees the upstream slot) when the client is gone or the request timed out.
- Cancellation of a stream (a stop string found, the client gone, a timeout) closes that stream.
- A failure (the upstream answered an error, or died) ends the choice with "error: ...", which the front
  turns into its 500 error shape; /health turns 503 when the upstream process is gone.
- The queue bound is ours: more than `max_batch + max_queue` choices in flight raises `QueueFull` (HTTP 429),
  the same as the torch engine.

A request submitted from inside an event loop (the front's: every API request) is forwarded on that very
loop, so its tokens reach the request without crossing threads; a request submitted from a plain thread runs
on the engine's own loop thread. Each loop has one `aiohttp.ClientSession` whose pool keeps its connections
alive (one per upstream slot in use), so no request pays for a new connection. (On a busy machine every
thread hop waits for the OS to schedule the other thread: forwarding on the caller's loop saves two per
request, or two per token when streaming.)

Why aiohttp and not httpx: on 2 cores the front's Python competes with the upstream for CPU, and every
millisecond it spends per request is a millisecond the upstream's slots wait (bench/serve_engines.py prints
the front's CPU per request). aiohttp's C parser takes about 0.2 ms of CPU per loopback request where httpx
takes about 1.2 ms (measured on this machine, 800 POSTs at 8 in flight).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Protocol, Self

import aiohttp

from kfoundry.errors import ConfigError
from kfoundry.model.generate import SamplingParams
from kfoundry.serve.engines.process import ServerProcess
from kfoundry.serve.scheduler import Event, QueueFull, SchedulerStats, Ticket, check_tickets, report

READ_BUFSIZE = 2**22  # the longest upstream line we accept (a final llama.cpp chunk echoes its settings)


class UpstreamError(RuntimeError):
    """The upstream server answered an error, or broke off."""


class Upstream(Protocol):
    """A server process that continues token ids (see the module docstring)."""

    name: str  # the engine's name in /health
    path: str  # the completion endpoint, e.g. "/completion"

    @property
    def url(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    def start(self) -> Self: ...

    def close(self) -> None: ...

    def body(self, prompt: list[int], params: SamplingParams, seed: int | None, banned: list[int],
             stop_ids: frozenset[int], stream: bool) -> dict:
        """The upstream request for one choice."""

    def parse(self, data: dict) -> tuple[list[int], str | None]:
        """One answer or stream chunk -> (new token ids, "stop" / "length" when the upstream ended, else None).
        Raises UpstreamError when the chunk is an error."""


class ProcessUpstream:
    """An `Upstream` whose server is a child process (process.ServerProcess); subclasses give `name`, `path`,
    `body` and `parse`."""

    name = "upstream"
    path = "/"

    def __init__(self, server: ServerProcess):
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def alive(self) -> bool:
        return self.server.alive

    def start(self) -> Self:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.close()


def error_message(body: str | dict) -> str:
    """An upstream error body {"error": {"message": ...}} or {"error": "..."} (JSON text or parsed) as one
    line; text that is not JSON, shortened."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:300]
    err = body.get("error", body) if isinstance(body, dict) else body
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


class ForwardingEngine:
    """Answers scheduler `Ticket`s through an `Upstream` (see the module docstring).

    `max_len` is the context per slot (the checkpoint's), `max_batch` the number of upstream slots; `banned_ids`
    are the model's ids past the tokenizer's vocabulary, which must never be sampled.
    """

    def __init__(self, upstream: Upstream, *, max_len: int, max_batch: int = 8, max_queue: int = 64, banned_ids=()):
        if max_batch < 1 or max_queue < 0:
            raise ConfigError("max_batch must be >= 1 and max_queue >= 0")
        self.upstream = upstream
        self.name = upstream.name
        self.max_len, self.max_batch, self.max_queue = max_len, max_batch, max_queue
        self.banned = list(banned_ids)
        self.stats = SchedulerStats()
        self._inflight = 0  # choices sent or about to be sent upstream
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the engine's own loop, for callers without one
        self._clients: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}  # one pool per loop
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------------------------ public side

    def start(self) -> Self:
        """Start the upstream (waits until its model is loaded) and the thread that talks to it."""
        if self._thread is not None:
            return self
        self.upstream.start()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name=f"kfoundry-{self.name}",
                                        daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self._close_clients(timeout)
            if self._loop is not None and self._loop.is_running():
                self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)
        finally:  # whatever happened above, the upstream process goes
            self.upstream.close()

    @property
    def alive(self) -> bool:
        return self.upstream.alive and self._thread is not None and self._thread.is_alive()

    def submit(self, tickets: list[Ticket]) -> None:
        """Send every choice of every ticket, or none (QueueFull) when that would pass the queue bound."""
        check_tickets(tickets, self.max_len, self.max_batch)
        choices = sum(t.n for t in tickets)
        with self._lock:
            if self._inflight + choices > self.max_batch + self.max_queue:
                self.stats.rejected_queue_full += len(tickets)
                waiting = max(0, self._inflight - self.max_batch)
                raise QueueFull(f"{waiting} requests already waiting (max {self.max_queue})")
            self._inflight += choices
            self.stats.submitted += len(tickets)
        if self._loop is None or not self.alive:
            with self._lock:
                self._inflight -= choices
            for t in tickets:
                report(t, [(c, None, f"error: RuntimeError: the {self.name} engine is not running")
                            for c in range(t.n)])
            return
        try:
            caller = asyncio.get_running_loop()
        except RuntimeError:
            caller = None
        for t in tickets:
            if caller is not None:
                self._spawn(caller, t)
            else:
                self._loop.call_soon_threadsafe(self._spawn, self._loop, t)

    def load(self) -> dict:
        with self._lock:
            inflight = self._inflight
        return {"engine": self.name, "running": min(inflight, self.max_batch),
                "waiting": max(0, inflight - self.max_batch), "max_batch": self.max_batch, "max_queue": self.max_queue}

    # ------------------------------------------------------------------------------------ engine side

    def _run_loop(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        self._loop.run_forever()
        self._loop.close()

    def _client_for(self, loop: asyncio.AbstractEventLoop) -> aiohttp.ClientSession:
        """This loop's connection pool (made on first use, in the loop's own thread)."""
        client = self._clients.get(loop)
        if client is None:
            connector = aiohttp.TCPConnector(limit=self.max_batch + self.max_queue, limit_per_host=0)
            client = aiohttp.ClientSession(base_url=self.upstream.url, connector=connector,
                                           timeout=aiohttp.ClientTimeout(total=None), read_bufsize=READ_BUFSIZE,
                                           auto_decompress=False)
            self._clients[loop] = client
        return client

    async def close_loop_client(self) -> None:
        """Close the running loop's connection pool (the front calls this as its server shuts down, so the pool
        is closed on its own loop instead of left to the garbage collector, which warns about it)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    def _close_clients(self, timeout: float) -> None:
        """Close each pool on its own loop: waiting for loops in other threads, scheduling it on the caller's."""
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, client in list(self._clients.items()):
            if loop is current:
                loop.create_task(client.close())
            elif loop.is_running():
                try:
                    asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout)
                except Exception:  # noqa: BLE001 - the upstream goes anyway; its sockets close with it
                    pass
        self._clients.clear()

    def _spawn(self, loop: asyncio.AbstractEventLoop, ticket: Ticket) -> None:
        for c in range(ticket.n):
            task = loop.create_task(self._choice(ticket, c))
            self._tasks.add(task)  # the loop keeps only weak references to running tasks
            task.add_done_callback(self._tasks.discard)

    async def _choice(self, ticket: Ticket, choice: int) -> None:
        p = ticket.params
        # Choice c of a seeded request uses seed + c, as in our scheduler. llama.cpp seeds are uint32 and
        # 0xFFFFFFFF means "random": fold our int64 seeds into the rest (harmless for vLLM's Python ints).
        seed = None if p.seed is None else (p.seed + choice) % 0xFFFFFFFF
        body = self.upstream.body(ticket.prompt, p, seed, self.banned, ticket.stop_ids, ticket.stream)
        counter = _Choice(ticket, choice)
        reason: str | None = None
        try:
            if not ticket.wants(choice):
                reason = "cancelled"
            elif ticket.stream:
                reason = await self._streamed(body, counter)
            else:
                reason = await self._whole(body, counter)
            if reason is None:
                raise UpstreamError(f"{self.name} closed the stream before the end of the answer")
            if reason != "length" or counter.generated < p.max_new_tokens:  # else the last token said "length"
                report(ticket, [(choice, None, reason)])
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the engine
            reason = f"error: {type(e).__name__}: {e}"
            self.stats.failed += 1
            report(ticket, [(choice, None, reason)])
        finally:
            self.stats.tokens_generated += counter.generated
            with self._lock:
                self._inflight -= 1
            ticket.finished += 1
            if ticket.finished == ticket.n:
                if ticket.cancelled:
                    self.stats.cancelled += 1
                elif not str(reason).startswith("error"):
                    self.stats.completed += 1

    async def _streamed(self, body: dict, counter: _Choice) -> str | None:
        """Forward as a stream: report each chunk's tokens as they come; the choice's end reason."""
        client = self._client_for(asyncio.get_running_loop())
        # Leaving this block before the end of the answer closes the connection: the upstream frees the slot.
        async with client.post(self.upstream.path, json=body) as resp:
            if resp.status != 200:
                detail = (await resp.read()).decode(errors="replace")
                raise UpstreamError(f"{self.name} answered {resp.status}: {error_message(detail)}")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                tokens, end = self.upstream.parse(json.loads(line[6:]))
                reason = counter.take(tokens)
                if reason is not None:
                    return reason
                if end is not None:
                    return end
                if not counter.ticket.wants(counter.choice):
                    return "cancelled"
        return None

    async def _whole(self, body: dict, counter: _Choice) -> str | None:
        """Forward as one request and report all its tokens at once; drop it when the ticket gives up."""
        loop = asyncio.get_running_loop()
        request = asyncio.ensure_future(self._post(self._client_for(loop), body))
        ticket, choice = counter.ticket, counter.choice
        woken = [loop.create_future()]  # settled by the ticket's cancel hook, from whichever thread cancels
        ticket.on_cancel(lambda: _settle_soon(loop, woken))
        try:
            while True:
                await asyncio.wait({request, woken[0]}, return_when=asyncio.FIRST_COMPLETED)
                if request.done():
                    break
                if not ticket.wants(choice):
                    return "cancelled"  # `finally` cancels the request: its connection closes, the slot frees
                woken[0] = loop.create_future()  # another choice of the ticket was cancelled: wait again
        finally:
            if not request.done():
                request.cancel()
        status, data = request.result()
        if status != 200:
            raise UpstreamError(f"{self.name} answered {status}: {error_message(data.decode(errors='replace'))}")
        tokens, end = self.upstream.parse(json.loads(data))
        return counter.take(tokens) or end

    async def _post(self, client: aiohttp.ClientSession, body: dict) -> tuple[int, bytes]:
        """One non-streamed upstream request: its status and body (cancelling it closes its connection)."""
        async with client.post(self.upstream.path, json=body) as resp:
            return resp.status, await resp.read()


def _settle_soon(loop: asyncio.AbstractEventLoop, holder: list[asyncio.Future]) -> None:
    """Settle the future in `holder` on its loop (thread-safe; a closed loop has nobody left to wake)."""
    def settle() -> None:
        if not holder[0].done():
            holder[0].set_result(None)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


class _Choice:
    """One choice's tokens on their way to its ticket: stop ids end it, `max_new_tokens` ends it with "length"."""

    def __init__(self, ticket: Ticket, choice: int):
        self.ticket, self.choice, self.generated = ticket, choice, 0

    def take(self, tokens: list[int]) -> str | None:
        """Report `tokens` (one event list); the end reason if they end the choice, else None."""
        events: list[Event] = []
        reason = None
        limit = self.ticket.params.max_new_tokens
        for tok in tokens:
            if tok in self.ticket.stop_ids:
                reason = "stop"
                break
            self.generated += 1
            done = self.generated >= limit
            events.append((self.choice, tok, "length" if done else None))
            if done:
                reason = "length"
                break
        if events:
            report(self.ticket, events)
        return reason

