"""Log-likelihood of continuations, batched, with each shared context run through the model once.

This is the arithmetic under the lm-eval adapter (`kfoundry.eval.lm`) and bits-per-byte (`kfoundry.eval.bpb`),
kept free of lm-eval so it can be read and tested on its own.

A request is `(context, continuation)` as token ids. Its score is the sum of log p(continuation[j] | context,
continuation[:j]) and whether every continuation token is the model's argmax ("greedy").

Off-by-one, stated once: the logits at input position i predict token i + 1. The model therefore reads
`context + continuation[:-1]`, and continuation[j] is scored by the logits at position len(context) - 1 + j.
The context must hold at least one token (lm-eval conditions an empty context on BOS before it gets here).

Sharing contexts. A multiple-choice question asks for the same context with 2-5 continuations. Instead of
running the context once per choice, the choices are packed behind one copy of it:

    tokens     c0 c1 c2 c3 | a0 a1 | b0 b1 b2          (context c, choice a = a0 a1 a2, choice b = b0 b1 b2 b3)
    positions   0  1  2  3 |  4  5 |  4  5  6          each choice continues the context's positions
    segment     0  0  0  0 |  1  1 |  2  2  2

and a mask lets a token see an earlier token only if that one is in the context or in its own segment, so each
choice computes exactly what it would alone. a0 is scored by the logits at c3 (shared by every choice), a1 by
those at a0, and so on; the last token of a choice is never an input. For a KoBEST BoolQ item (a long
paragraph, two one-word answers) this halves the work; for HellaSwag (four endings) it cuts about 3/4 of the
context cost. Truncation follows lm-eval exactly (keep the last max_len + 1 tokens of context + continuation),
so two choices share a context only when they were truncated identically. A continuation longer than the model's
context, which lm-eval's `hf` model refuses, is scored in pieces (`split_request`).

The model runs as its backbone (`Transformer.hidden`), and only the positions that are scored go through the
output head (`lm_head`): with a large vocabulary the head costs more than a transformer layer, and a packed
context has one scored position in hundreds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kfoundry.model import masks
from kfoundry.model.llama import Transformer


@dataclass(frozen=True)
class Group:
    """One model row: a context and the continuations that share it (with the request index of each)."""

    context: tuple[int, ...]
    members: tuple[tuple[int, tuple[int, ...]], ...]  # (request index, continuation)

    @property
    def length(self) -> int:
        """Tokens the row feeds the model: the context, then every continuation but its last token."""
        return len(self.context) + sum(len(c) - 1 for _, c in self.members)


def split_request(context: Sequence[int], continuation: Sequence[int],
                  max_len: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(context, continuation) pieces the model can read, each at most max_len tokens of input.

    A continuation that fits is one piece, truncated as lm-eval's `hf` model does: the last max_len + 1 tokens of
    context + continuation, of which the model reads all but the last. A longer continuation (which lm-eval's
    `hf` model refuses) is scored in consecutive chunks of max_len tokens, each conditioned on as much of the
    text before it as fits; by the chain rule the chunks' log-likelihoods add up to the continuation's.
    """
    if not context:
        raise ValueError("a request needs a non-empty context (condition an empty one on BOS)")
    full = tuple(context) + tuple(continuation)
    c = len(context)
    pieces = []
    for a in range(0, len(continuation), max_len):
        b = min(a + max_len, len(continuation))
        start = max(0, c + b - max_len - 1)
        pieces.append((full[start:c + a], tuple(continuation[a:b])))
    return pieces


def group_requests(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> list[Group]:
    """Group the pieces of non-empty continuations by their (truncated) context, in first-seen order."""
    by_context: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        for c, k in split_request(ctx, cont, max_len):
            by_context.setdefault(c, []).append((i, k))
    return [Group(c, tuple(m)) for c, m in by_context.items()]


def batches(groups: list[Group], token_budget: int, max_rows: int) -> list[list[Group]]:
    """Longest rows first (padding stays small and an out-of-memory error shows up at once), each batch at most
    `max_rows` rows and `token_budget` padded tokens (a single longer row still gets a batch of its own)."""
    out: list[list[Group]] = []
    for g in sorted(groups, key=lambda g: -g.length):
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * out[-1][0].length <= token_budget:
            out[-1].append(g)
        else:
            out.append([g])
    return out


def _layout(batch: list[Group], device: torch.device):
    """Token ids, positions and segment ids of a padded batch, plus, per request, the flat indices of the hidden
    states that score it and its continuation."""
    B, T = len(batch), batch[0].length
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1 = padding
    scored: list[tuple[int, list[int], tuple[int, ...]]] = []
    for b, g in enumerate(batch):
        p = len(g.context)
        idx[b, :p] = torch.tensor(g.context)
        pos[b, :p] = torch.arange(p)
        seg[b, :p] = 0
        at = p
        for s, (req, cont) in enumerate(g.members, start=1):
            n = len(cont) - 1  # the last continuation token is predicted, never read
            if n:
                idx[b, at:at + n] = torch.tensor(cont[:-1])
                pos[b, at:at + n] = torch.arange(p, p + n)
                seg[b, at:at + n] = s
            # continuation[0] from the last context position, continuation[j] from the segment's token j-1
            rows = [b * T + p - 1] + [b * T + at + j for j in range(n)]
            scored.append((req, rows, cont))
            at += n
    return idx.to(device), pos.to(device), seg.to(device), scored


@torch.inference_mode()
def score(model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_len: int | None = None,
          token_budget: int = 8192, max_rows: int = 64,
          on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) per request, in request order. An empty continuation scores (0.0, True).

    token_budget bounds a batch's padded tokens (memory ~ budget x width); max_rows bounds its rows.
    on_batch(n_requests) is called after each batch, for progress bars.
    """
    model.eval()
    max_len = max_len or model.cfg.max_seq_len
    device = model.lm_head.weight.device
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    for batch in batches(group_requests(requests, max_len), token_budget, max_rows):
        idx, pos, seg, scored = _layout(batch, device)
        shared = any(len(g.members) > 1 for g in batch)
        # One continuation per row: right padding never reaches a real token under a causal mask, so the fast
        # causal attention path needs no mask at all. Shared contexts need the segment mask.
        mask = masks.shared_context(seg) if shared else None
        h = model.hidden(idx, positions=pos, attn_mask=mask).flatten(0, 1)
        flat = torch.tensor([r for _, rows, _ in scored for r in rows], device=device)
        logp = F.log_softmax(model.lm_head(h[flat]).float(), dim=-1)
        targets = torch.tensor([t for _, _, cont in scored for t in cont], device=device)
        token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
        greedy = logp.argmax(-1) == targets
        at = 0
        for req, _, cont in scored:  # a long continuation's pieces add up (log-likelihood) and must all be greedy
            n = len(cont)
            logp, was_greedy = results[req]
            results[req] = (logp + float(token_logp[at:at + n].double().sum()),
                            was_greedy and bool(greedy[at:at + n].all()))
            at += n
        if on_batch:
            on_batch(len(scored))
    return results


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together predict every token of `tokens` exactly once.

    The first window starts from `prefix` (BOS) alone; every later window predicts up to max_len new tokens and
    fills the rest of the model context with the tokens just before them, so no token is predicted with less
    context than necessary. Windows are disjoint in what they predict (lm-eval's rolling log-likelihood).
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + max_len, len(tokens))
        windows.append((tokens[max(0, end - max_len - 1):done], tokens[done:end]))
        done = end
    return windows
