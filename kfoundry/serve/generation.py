"""The asyncio side of one API request: submit its tickets, turn their token events into text, cancel.

The scheduler thread calls each ticket's `on_events` with token ids; here those calls are handed over to
the request's event loop (`call_soon_threadsafe`) and decoded per choice by a `TextStream`, which also
applies the request's stop strings. A request with several prompts (completions) or `n` choices becomes one
ticket per prompt, each with `n` choices; choice indices are numbered prompt-major, as OpenAI does.

Whatever ends the request first — all choices finished, the deadline, the client going away — cancels
what is still running, so the scheduler frees the slots before its next decode step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kfoundry.model.generate import SamplingParams
from kfoundry.serve.scheduler import Event, Ticket
from kfoundry.serve.textstream import TextStream


class GenerationError(RuntimeError):
    """The engine failed a sequence (a forward pass raised, or it is shutting down)."""


class Aborted(RuntimeError):
    """The server ended this request from outside (`Generation.abort`): it is shutting down."""


@dataclass
class Piece:
    """New text for one choice; `finish_reason` is set on the choice's last piece ("stop" or "length")."""

    index: int
    text: str
    finish_reason: str | None = None


class Generation:
    """One request's choices, from `submit()` to the last piece. `engine` is anything with the `Engine`
    interface (kfoundry/serve/engine.py); only its `submit` is used here."""

    def __init__(self, engine, tokenizer, prompts: list[list[int]], params: SamplingParams, *,
                 n: int = 1, stop_ids: frozenset[int] = frozenset(), stop: list[str] | None = None,
                 timeout: float | None = None, stream: bool = True) -> None:
        """`stream=False`: the caller reads only the whole answer (`collect`), so an engine may deliver it at once."""
        self.engine = engine
        self.n = n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.deadline = time.monotonic() + timeout if timeout else None
        self.stop = stop or []
        self.streams = [TextStream(tokenizer, self.stop) for _ in range(len(prompts) * n)]
        self.finish_reasons: list[str | None] = [None] * len(self.streams)
        # Items are (ticket index, events) from the engine, or an exception put there by abort().
        self._queue: asyncio.Queue[tuple[int, list[Event]] | BaseException] = asyncio.Queue()
        self._loop = loop = asyncio.get_running_loop()

        def listener(i: int):
            return lambda events: loop.call_soon_threadsafe(self._queue.put_nowait, (i, events))

        self.tickets = [Ticket(prompt=p, params=params, n=n, stop_ids=stop_ids, on_events=listener(i), stream=stream)
                        for i, p in enumerate(prompts)]

    def submit(self) -> None:
        """Queue every ticket (raises QueueFull when there is no room)."""
        self.engine.submit(self.tickets)

    def cancel(self) -> None:
        for t in self.tickets:
            t.cancel()

    def abort(self, message: str) -> None:
        """End the request now from any thread: cancel its tickets and make `pieces()` raise `Aborted`."""
        self.cancel()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, Aborted(message))

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    async def pieces(self) -> AsyncIterator[Piece]:
        """Text as it is generated; raises TimeoutError at the deadline, GenerationError on a failure and
        Aborted after `abort()`."""
        try:
            while not self.done:
                timeout = None if self.deadline is None else self.deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError("request timed out")
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    raise TimeoutError("request timed out") from None
                if isinstance(item, BaseException):
                    raise item
                ticket_index, events = item
                for piece in self._apply(ticket_index, events):
                    yield piece
        finally:
            if not self.done:
                self.cancel()

    async def collect(self) -> list[str]:
        """Run to the end; the full text of every choice."""
        async for _ in self.pieces():
            pass
        return [s.text for s in self.streams]

    def _apply(self, ticket_index: int, events: list[Event]) -> list[Piece]:
        if len(events) > 1 and not self.stop:
            events = merge_runs(events)
        out = []
        for choice, token, reason in events:
            index = ticket_index * self.n + choice
            stream = self.streams[index]
            if self.finish_reasons[index] is not None:
                continue  # already ended by a stop string; late tokens are dropped
            text = ""
            if isinstance(token, list):  # a run of ids (merge_runs)
                self.completion_tokens += len(token)
                text = stream.extend(token)
            elif token is not None:
                self.completion_tokens += 1
                text = stream.push(token)
                if stream.stopped:  # a stop string: end this choice here and free its slot
                    self.tickets[ticket_index].cancel(choice)
                    reason = "stop"
            if reason is not None:
                if reason not in ("stop", "length"):
                    self.cancel()
                    raise GenerationError(f"generation failed ({reason})")
                text += stream.finish()
                if stream.stopped:  # the held-back tail completed a stop string
                    reason = "stop"
                self.finish_reasons[index] = reason
            if text or reason:
                out.append(Piece(index, text, reason))
        return out


def merge_runs(events: list[Event]) -> list[tuple[int, list[int] | None, str | None]]:
    """Consecutive token events of one choice as one event whose token is a list of ids, decoded with one
    `TextStream.extend` (a forwarding engine reports a whole answer in one list); a finish reason stays on the
    run it ends. For requests without stop strings only: a stop string ends a choice at its token, and only the
    tokens up to it count."""
    merged: list = []
    for choice, token, reason in events:
        last = merged[-1] if merged else None
        if token is not None and last is not None and last[0] == choice and last[2] is None and last[1] is not None:
            last[1].append(token)
            merged[-1] = (choice, last[1], reason)
        else:
            merged.append((choice, None if token is None else [token], reason))
    return merged
