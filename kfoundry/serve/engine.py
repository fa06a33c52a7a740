"""The interface between the HTTP layer and a generation backend ("engine").

The app never touches a model. It tokenizes and checks a request (plan.py), then hands `Ticket`s to an
engine and listens for token ids. Today's engine is `kfoundry.serve.scheduler.Scheduler` (continuous batching
on PyTorch); another backend (llama.cpp, vLLM, ...) plugs in by providing the same few members:

    engine.max_len     int   tokens one sequence may hold: prompt + answer (the model's context)
    engine.max_batch   int   the most sequences decoded together; a request's `n` may not exceed it
    engine.alive       bool  the engine can make progress (False: /health answers 503)
    engine.submit(tickets)   queue all of `tickets` or none of them; raise `QueueFull` when there is no room
                             (HTTP 429). Must not block on generation; may raise ValueError for a ticket
                             outside max_len / max_batch (the app checks both first).
    engine.load()      dict  JSON-able snapshot for /health, e.g. {"running", "waiting", "max_batch", ...}
    engine.stats.as_dict()   dict  JSON-able counters for /health and bench/serve_load.py
                             (bench reads "decode_steps" and "decode_rows" when present)
    engine.start() / engine.stop()   begin and end serving (called by app_from_checkpoint and the CLI)

The ticket contract (kfoundry.serve.scheduler.Ticket), which an engine must honour:

- `ticket.prompt` (token ids, BOS included) is continued `ticket.n` times with `ticket.params`
  (`SamplingParams`: max_new_tokens, temperature — 0 is greedy, top_p, top_k, seed — an int64; choice c uses
  seed + c) until a token in `ticket.stop_ids`, max_new_tokens, or the context.
- The engine reports with `ticket.on_events(events)`, from any thread, where each event is
  `(choice, token_id | None, finish_reason | None)`. Every choice ends with exactly one event whose reason is
  "stop" (a stop id; its token is not reported), "length", "cancelled", or "error: <text>".
  A token reported together with "length" is the choice's last token.
- `ticket.wants(choice)` turns False when the client is gone, a stop string was found or the request timed
  out; the engine should stop that choice soon after (between decode steps) and report "cancelled".

The app calls nothing else, so anything satisfying `Engine` below can be passed to `create_app`.
"""

from __future__ import annotations

from typing import Protocol

from kfoundry.serve.scheduler import QueueFull, Ticket

__all__ = ["Engine", "QueueFull", "Ticket"]


class EngineStats(Protocol):
    def as_dict(self) -> dict: ...


class Engine(Protocol):
    max_len: int
    max_batch: int
    stats: EngineStats

    @property
    def alive(self) -> bool: ...

    def submit(self, tickets: list[Ticket]) -> None: ...

    def load(self) -> dict: ...

    def start(self) -> object: ...

    def stop(self, timeout: float = ...) -> None: ...
