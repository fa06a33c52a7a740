"""The llama.cpp engine: our front, llama.cpp's `llama-server` doing the arithmetic.

The front (app.py) does everything a client sees: API key, limits, NFC, tokenizing with our tokenizer and
its chat template, text decoding, stop strings, `n` choices, usage, error shapes and /health. This engine only
takes over the scheduler's job: each choice of each `Ticket` becomes one request to llama-server's native
`/completion` endpoint with the prompt as *token ids* and `stream: true`, and the token ids it streams back
are reported through the ticket's `on_events`, exactly as our scheduler reports them. So the same prompt
tokens go in whatever the engine, and the same text comes out for the same tokens. llama-server batches the
requests of all its slots into one forward pass per step (continuous batching), in C++.

Sampling is mapped onto llama.cpp's chain so that it means what it means in our engine: temperature 0 is
greedy; otherwise temperature, then top-k (0 = off), then top-p, then a draw, and every llama.cpp extra
(min-p, repetition and DRY penalties, XTC, typical) is off. A `seed` makes a choice reproducible (choice c
uses seed + c, as in our scheduler), but llama.cpp's random generator is not ours, so seeded samples differ
between engines; greedy outputs agree wherever the top two logits are not within rounding of each other
(tests/test_serve_engines.py measures that margin before comparing).

Cancellation (a stop string found, the client gone, a timeout) closes that choice's stream; llama-server
notices the closed connection and frees the slot. A failure (llama-server answered an error, or died) ends
the choice with "error: ...", which the front turns into its 500 error shape; /health turns 503 when the
llama-server process is gone. The queue bound is ours: more than `max_batch + max_queue` choices in flight
raises `QueueFull` (HTTP 429), the same as the torch engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx

from kfoundry.model.generate import SamplingParams
from kfoundry.serve.engines.llama_server import LlamaServer
from kfoundry.serve.scheduler import QueueFull, SchedulerStats, Ticket

# llama.cpp samplers off: defaults that would change what temperature / top-k / top-p mean.
NEUTRAL = {"min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "repeat_last_n": 0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "top_n_sigma": -1.0,
           "dynatemp_range": 0.0, "mirostat": 0}


def completion_body(prompt: list[int], p: SamplingParams, seed: int | None, banned: list[int]) -> dict:
    """The llama-server /completion request for one choice: token ids in, token ids streamed out."""
    body = {"prompt": prompt, "n_predict": p.max_new_tokens, "stream": True, "return_tokens": True,
            "cache_prompt": False,  # a fresh evaluation every time: results do not depend on earlier requests
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "seed": -1 if seed is None else seed,
            "samplers": ["temperature", "top_k", "top_p"], **NEUTRAL}
    if banned:  # ids our tokenizer cannot decode (a padded vocabulary) are never chosen, as in our scheduler
        body["logit_bias"] = [[i, False] for i in banned]
    return body


class LlamaCppEngine:
    """Runs `llama-server` on `gguf` and answers scheduler `Ticket`s through it (see the module docstring).

    `max_len` is the context per slot (the checkpoint's), `max_batch` the number of slots; `banned_ids` are
    the model's ids past the tokenizer's vocabulary, which must never be sampled.
    """

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, *, max_len: int, max_batch: int = 8, max_queue: int = 64,
                 threads: int | None = None, binary: str | Path | None = None, banned_ids=()):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.max_len, self.max_batch, self.max_queue = max_len, max_batch, max_queue
        self.server = LlamaServer(gguf, slots=max_batch, ctx=max_len, threads=threads, binary=binary)
        self.banned = list(banned_ids)
        self.stats = SchedulerStats()
        self._inflight = 0  # choices sent or about to be sent to llama-server
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------------------------ public side

    def start(self) -> LlamaCppEngine:
        """Start llama-server (waits until its model is loaded) and the thread that talks to it."""
        if self._thread is not None:
            return self
        self.server.start()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="kfoundry-llama-cpp", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        try:
            if self._loop is not None and self._loop.is_running():
                asyncio.run_coroutine_threadsafe(self._close_client(), self._loop).result(timeout)
                self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)
        finally:  # whatever happened above, the llama-server process goes
            self.server.close()

    @property
    def alive(self) -> bool:
        return self.server.alive and self._thread is not None and self._thread.is_alive()

    def submit(self, tickets: list[Ticket]) -> None:
        """Send every choice of every ticket, or none (QueueFull) when that would pass the queue bound."""
        for t in tickets:
            if not 1 <= t.n <= self.max_batch:
                raise ValueError(f"n={t.n} must be between 1 and the batch size {self.max_batch}")
            if not t.prompt or len(t.prompt) + t.params.max_new_tokens > self.max_len:
                raise ValueError(f"prompt ({len(t.prompt)}) + max_new_tokens ({t.params.max_new_tokens}) must be "
                                 f"between 1 and the context ({self.max_len})")
            t.params.validate()
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
                self._report(t, [(c, None, "error: RuntimeError: the llama.cpp engine is not running")
                                 for c in range(t.n)])
            return
        for t in tickets:
            self._loop.call_soon_threadsafe(self._spawn, t)

    def load(self) -> dict:
        with self._lock:
            inflight = self._inflight
        return {"engine": self.name, "running": min(inflight, self.max_batch),
                "waiting": max(0, inflight - self.max_batch), "max_batch": self.max_batch, "max_queue": self.max_queue}

    # ------------------------------------------------------------------------------------ engine side

    def _run_loop(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        limits = httpx.Limits(max_connections=self.max_batch + self.max_queue, max_keepalive_connections=self.max_batch)
        self._client = httpx.AsyncClient(base_url=self.server.url, limits=limits, timeout=httpx.Timeout(None))
        self._loop.call_soon(ready.set)
        self._loop.run_forever()
        self._loop.close()

    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _spawn(self, ticket: Ticket) -> None:
        for c in range(ticket.n):
            task = self._loop.create_task(self._choice(ticket, c))
            self._tasks.add(task)  # the loop keeps only weak references to running tasks
            task.add_done_callback(self._tasks.discard)

    async def _choice(self, ticket: Ticket, choice: int) -> None:
        p = ticket.params
        # llama.cpp seeds are uint32 and 0xFFFFFFFF means "random": fold our int64 seeds into the rest.
        seed = None if p.seed is None else (p.seed + choice) % 0xFFFFFFFF
        body = completion_body(ticket.prompt, p, seed, self.banned)
        reason: str | None = None
        generated = 0
        try:
            if not ticket.wants(choice):
                reason = "cancelled"
            else:
                async with self._client.stream("POST", "/completion", json=body) as resp:
                    if resp.status_code != 200:
                        detail = (await resp.aread()).decode(errors="replace")
                        raise RuntimeError(f"llama-server answered {resp.status_code}: {_error_message(detail)}")
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = json.loads(line[6:])
                        if "error" in data:
                            raise RuntimeError(f"llama-server: {_error_message(json.dumps(data))}")
                        events = []
                        for tok in data.get("tokens") or []:
                            if tok in ticket.stop_ids:
                                reason = "stop"
                                break
                            generated += 1
                            self.stats.tokens_generated += 1
                            done = generated >= p.max_new_tokens
                            events.append((choice, tok, "length" if done else None))
                            if done:
                                reason = "length"
                                break
                        if events:
                            self._report(ticket, events)
                        if reason is not None:
                            break
                        if data.get("stop"):
                            # The end without a token limit reached on our side: an end-of-generation token
                            # we were not told about (llama.cpp's own EOG list), or the context.
                            reason = "stop" if data.get("stop_type") == "eos" else "length"
                            break
                        if not ticket.wants(choice):
                            reason = "cancelled"
                            break
                if reason is None:
                    raise RuntimeError("llama-server closed the stream before the end of the answer")
                if reason != "length" or generated < p.max_new_tokens:  # else the last token said "length"
                    self._report(ticket, [(choice, None, reason)])
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the engine
            reason = f"error: {type(e).__name__}: {e}"
            self.stats.failed += 1
            self._report(ticket, [(choice, None, reason)])
        finally:
            with self._lock:
                self._inflight -= 1
            ticket.finished += 1
            if ticket.finished == ticket.n:
                if ticket.cancelled:
                    self.stats.cancelled += 1
                elif not str(reason).startswith("error"):
                    self.stats.completed += 1

    @staticmethod
    def _report(ticket: Ticket, events: list) -> None:
        try:
            ticket.on_events(events)
        except Exception:  # noqa: BLE001 - a broken listener (closed event loop) only loses its own events
            ticket.cancel()


def _error_message(text: str) -> str:
    """llama-server's error body {"error": {"message": ...}} as one line (or the raw text, shortened)."""
    try:
        err = json.loads(text).get("error", {})
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return text.strip()[:300]
