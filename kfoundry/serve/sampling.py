"""Sampling many rows at once, each with its own temperature, top-p, top-k and random generator.

`kfoundry.model.generate.sample_next` applies one setting to a whole batch and draws with
`torch.multinomial`. In a server every row is a different request, so here the settings are per row,
and the draw uses the exponential-race form of sampling: with E_i ~ Exp(1) independent,
argmax_i p_i / E_i is distributed exactly as Categorical(p) (the "Gumbel-max" trick in another guise; vLLM
samples the same way). The noise for each row comes from that row's own generator, so a seeded request
draws the same tokens whichever other requests share its batch, and the rest is one vectorised pass.
"""

from __future__ import annotations

import torch

from kfoundry.model.generate import SamplingParams


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token id per row of `logits` [B, V]; temperature 0 means greedy for that row."""
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    # Every row's argmax in one pass: the answer for greedy rows (the common case for every row at once),
    # and a placeholder that the sampled rows overwrite.
    out = logits.argmax(dim=-1).tolist()
    if not rows:
        return out
    x = logits[rows].float() if len(rows) < len(params) else logits.float()
    x = x / torch.tensor([params[i].temperature for i in rows], device=x.device)[:, None]
    if any(params[i].top_k > 0 for i in rows):
        # Keep each row's k best (k = 0: all): compare with the row's k-th largest value.
        k = torch.tensor([params[i].top_k or x.shape[-1] for i in rows], device=x.device).clamp(max=x.shape[-1])
        kth = x.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if any(params[i].top_p < 1 for i in rows):
        # Keep the smallest set of best tokens whose mass reaches top_p (the best one always stays).
        top_p = torch.tensor([params[i].top_p for i in rows], device=x.device)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p[:, None]
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()  # rows without a seed share one draw from torch's generator
    for j, i in enumerate(rows):
        if generators[i] is not None:  # a seeded row draws from its own generator: the same whatever the batch
            noise[j].exponential_(generator=generators[i])
    for i, t in zip(rows, (probs / noise).argmax(dim=-1).tolist()):
        out[i] = t
    return out
