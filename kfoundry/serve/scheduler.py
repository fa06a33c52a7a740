"""The continuous-batching scheduler: one thread owns the model and runs every request's decode steps together.

Requests (`Ticket`s) wait in a bounded FIFO queue. Between two decode steps the scheduler:

1. drops the sequences whose ticket was cancelled (client gone, timeout, stop string found) and compacts the
   slots, so their rows leave the batch at once;
2. admits waiting tickets while there are free slots: each prompt is prefilled into a slot, then copied into
   one more slot per extra choice (`n`), and its first token is sampled from the prefill logits;
3. runs one decode step for every running sequence in a single forward pass (`batch.decode_step`), samples
   each row with its own settings and random generator, and reports the new tokens to each ticket.

A request therefore joins the running batch as soon as a slot is free and leaves it the moment it finishes,
instead of waiting for a whole batch to drain (Orca, OSDI 2022). Sampling is per row, so a request's output
does not depend on who else is in the batch: greedy rows are identical to decoding alone, and a `seed` gives
the same sample however the batch is composed.

Tokens are reported through the ticket's `on_events` callback from the scheduler thread; turning them into
text (and the asyncio side) is the web layer's job. The queue bound keeps memory and latency bounded: a full
queue raises `QueueFull`, which the API turns into HTTP 429. Any error in a forward pass fails the tickets
involved and the loop goes on, so a bad request never stops the server.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kfoundry.errors import ConfigError
from kfoundry.model.generate import SamplingParams
from kfoundry.model.llama import Transformer
from kfoundry.serve.batch import make_slots
from kfoundry.serve.sampling import sample_rows

# One report: (choice index, token id or None, finish reason or None). A finish reason ends that choice:
# "stop" (a stop token), "length" (max_new_tokens or the context), "cancelled", or "error: ...".
Event = tuple[int, int | None, str | None]


class QueueFull(Exception):
    """The waiting queue is at its bound; retry later."""


@dataclass
class Ticket:
    """One request to the scheduler: a tokenized prompt continued `n` times with the same settings."""

    prompt: list[int]
    params: SamplingParams
    on_events: Callable[[list[Event]], None]
    n: int = 1
    stop_ids: frozenset[int] = frozenset()
    # False: the client reads the answer only once it is whole. An engine may then deliver all tokens in one
    # report (the forwarding engines ask their upstream for one answer instead of a token stream).
    stream: bool = True
    id: int = field(default_factory=itertools.count().__next__)
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cancelled_choices: set[int] = field(default_factory=set)
    finished: int = 0  # choices done (written by the scheduler thread only)
    cancel_hooks: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def cancel(self, choice: int | None = None) -> None:
        """Ask the scheduler to stop this ticket (or one of its choices) before its next decode step."""
        if choice is None:
            self.cancelled = True
        else:
            self.cancelled_choices.add(choice)
        for hook in list(self.cancel_hooks):
            hook()

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Call `hook()` from the cancelling thread at every `cancel` (at once if something is cancelled already):
        an engine that waits on its own (forward.py) learns of a cancel without polling `wants`."""
        self.cancel_hooks.append(hook)
        if self.cancelled or self.cancelled_choices:
            hook()

    def wants(self, choice: int) -> bool:
        return not self.cancelled and choice not in self.cancelled_choices


def check_tickets(tickets: list[Ticket], max_len: int, max_batch: int) -> None:
    """What every engine refuses with a ValueError before queueing anything: `n` outside 1..max_batch, an
    empty prompt, prompt + max_new_tokens past the context, or sampling settings out of range."""
    for t in tickets:
        if not 1 <= t.n <= max_batch:
            raise ConfigError(f"n={t.n} must be between 1 and the batch size {max_batch}")
        if not t.prompt or len(t.prompt) + t.params.max_new_tokens > max_len:
            raise ConfigError(f"prompt ({len(t.prompt)}) + max_new_tokens ({t.params.max_new_tokens}) must be "
                              f"between 1 and the context ({max_len})")
        t.params.validate()


def report(ticket: Ticket, events: list[Event]) -> None:
    """Hand `events` to the ticket's listener; a broken listener (its event loop closed) only cancels its ticket."""
    try:
        ticket.on_events(events)
    except Exception:  # noqa: BLE001 - one request's listener must not stop an engine
        ticket.cancel()


@dataclass
class _Seq:
    """A running sequence: one choice of a ticket, living in one slot."""

    ticket: Ticket
    choice: int
    length: int  # tokens in the cache (prompt + generated, minus the last sampled token not yet fed)
    generated: int
    last: int  # last sampled token, fed at the next decode step
    gen: torch.Generator | None


@dataclass
class SchedulerStats:
    """Counters for /health and the load benchmark. `rows_per_step` shows how much batching happened."""

    submitted: int = 0
    rejected_queue_full: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prefills: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    max_rows_in_step: int = 0
    tokens_generated: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_rows_per_step"] = round(self.decode_rows / self.decode_steps, 3) if self.decode_steps else 0.0
        return d


class Scheduler:
    """Owns `model` and a `SlotCache` of `max_batch` rows; call `start()` to run the loop in a daemon thread."""

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 vocab_size: int | None = None):
        """`vocab_size`: the tokenizer's, when smaller than the model's (a vocabulary padded for speed, or a
        tokenizer that ran out of merges); ids at or above it are never sampled, as nothing could decode them."""
        if max_batch < 1 or max_queue < 0:
            raise ConfigError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model.eval()
        self.vocab_size = vocab_size if vocab_size and vocab_size < model.cfg.vocab_size else None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = max_len or model.cfg.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.slots = make_slots(model, max_batch, self.max_len)
        self.stats = SchedulerStats()
        self._waiting: deque[Ticket] = deque()
        self._running: list[_Seq] = []  # _running[i] lives in slot i
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------------------------ public side

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kfoundry-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, tickets: list[Ticket]) -> None:
        """Queue `tickets` all together, or none of them (QueueFull) when the queue has no room for all."""
        check_tickets(tickets, self.max_len, self.max_batch)
        with self._cond:
            self._drop_cancelled_waiting()  # requests that gave up while waiting hold no place in the queue
            if len(self._waiting) + len(tickets) > self.max_queue:
                self.stats.rejected_queue_full += len(tickets)
                raise QueueFull(f"{len(self._waiting)} requests already waiting (max {self.max_queue})")
            self._waiting.extend(tickets)
            self.stats.submitted += len(tickets)
            self._cond.notify_all()

    def load(self) -> dict:
        """Running sequences and waiting tickets right now."""
        with self._cond:
            return {"engine": "torch", "running": len(self._running), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue}

    # ---------------------------------------------------------------------------------- scheduler side

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._drop_cancelled_waiting()
                    while not self._stop and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        break
                self._drop_cancelled_running()
                self._admit()
                if self._running:
                    self._step()
        for seq in self._running:  # shutting down: tell everyone
            self._finish(seq.ticket, seq.choice, "cancelled")
        with self._cond:
            for t in self._waiting:
                self._finish_all(t, "cancelled")
            self._waiting.clear()

    def _drop_cancelled_waiting(self) -> None:
        kept = deque()
        for t in self._waiting:
            if t.cancelled:
                self._finish_all(t, "cancelled")
                self.stats.cancelled += 1
            else:
                kept.append(t)
        self._waiting = kept

    def _drop_cancelled_running(self) -> None:
        for i in reversed(range(len(self._running))):
            seq = self._running[i]
            if not seq.ticket.wants(seq.choice):
                self._release(i)
                self._finish(seq.ticket, seq.choice, "cancelled")
                if seq.ticket.finished == seq.ticket.n:
                    # Choices ended one by one (a stop string found by the caller) complete the request;
                    # a whole-ticket cancel (client gone, timeout) does not.
                    if seq.ticket.cancelled:
                        self.stats.cancelled += 1
                    else:
                        self.stats.completed += 1

    def _release(self, slot: int) -> None:
        """Free `slot`: the last running sequence moves into it, so slots 0..n-1 stay the occupied ones."""
        last = len(self._running) - 1
        if slot != last:
            moved = self._running[last]
            self.slots.move(last, slot, moved.length)
            self._running[slot] = moved
        self._running.pop()

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or self._waiting[0].n > self.max_batch - len(self._running):
                    return
                ticket = self._waiting.popleft()
            try:
                self._start(ticket)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
                self.stats.failed += 1
                while self._running and self._running[-1].ticket is ticket:
                    self._running.pop()
                self._finish_all(ticket, f"error: {type(e).__name__}: {e}")

    def _start(self, ticket: Ticket) -> None:
        """Prefill the ticket's prompt, fork it into n slots and report each choice's first token."""
        first = len(self._running)
        logits = self.slots.prefill(first, ticket.prompt)
        self.stats.prefills += 1
        p = ticket.params
        seqs = []
        for c in range(ticket.n):
            gen = None
            if p.seed is not None:  # one generator per choice, so choices differ and each is reproducible
                gen = torch.Generator(device=self.device).manual_seed(p.seed + c)
            if c:
                self.slots.move(first, first + c, len(ticket.prompt))
            seqs.append(_Seq(ticket, c, len(ticket.prompt), 0, -1, gen))
        self._running.extend(seqs)
        rows = logits[None].expand(ticket.n, -1)
        self._accept(list(range(first, first + ticket.n)), self._sample(seqs, rows))

    def _step(self) -> None:
        n = len(self._running)
        tokens = torch.tensor([s.last for s in self._running], dtype=torch.long, device=self.device)
        try:
            logits = self.slots.step(tokens)  # each slot knows its own length
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving
            for i in reversed(range(n)):
                seq = self._running[i]
                self._release(i)
                self._finish(seq.ticket, seq.choice, f"error: {type(e).__name__}: {e}")
                self.stats.failed += 1
            return
        self.stats.decode_steps += 1
        self.stats.decode_rows += n
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, n)
        for s in self._running:
            s.length += 1
        self._accept(list(range(n)), self._sample(self._running, logits))

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """One token per row, each with its request's settings and its own random generator."""
        if self.vocab_size is not None:  # ids past the tokenizer's: a prefix of the columns excludes them, no copy
            logits = logits[:, : self.vocab_size]
        return sample_rows(logits, [s.ticket.params for s in seqs], [s.gen for s in seqs])

    def _accept(self, slots: list[int], tokens: list[int]) -> None:
        """Record each slot's new token; report it and finish the sequences that are done."""
        reports: dict[int, list[Event]] = {}
        done: list[int] = []
        for slot, tok in zip(slots, tokens):
            seq = self._running[slot]
            events = reports.setdefault(id(seq.ticket), [])
            if tok in seq.ticket.stop_ids:
                events.append((seq.choice, None, "stop"))
                done.append(slot)
                continue
            seq.generated += 1
            seq.last = tok
            self.stats.tokens_generated += 1
            # Out of room when the token just sampled could not be fed back: its position would be max_len.
            full = seq.generated >= seq.ticket.params.max_new_tokens or seq.length >= self.max_len
            events.append((seq.choice, tok, "length" if full else None))
            if full:
                done.append(slot)
        tickets = {id(self._running[s].ticket): self._running[s].ticket for s in slots}
        for slot in sorted(done, reverse=True):  # release from the end so earlier slot numbers stay valid
            seq = self._running[slot]
            self._release(slot)
            seq.ticket.finished += 1
            if seq.ticket.finished == seq.ticket.n:
                self.stats.completed += 1
        for key, events in reports.items():
            report(tickets[key], events)

    def _finish(self, ticket: Ticket, choice: int, reason: str) -> None:
        ticket.finished += 1
        report(ticket, [(choice, None, reason)])

    def _finish_all(self, ticket: Ticket, reason: str) -> None:
        done = {s.choice for s in self._running if s.ticket is ticket}
        report(ticket, [(c, None, reason) for c in range(ticket.n) if c not in done])
        ticket.finished = ticket.n
