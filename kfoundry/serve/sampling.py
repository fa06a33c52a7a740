"""Sampling many rows at once, each with its own temperature, top-p, top-k and random generator.

`kfoundry.model.generate.sample_next` applies one setting to a whole batch and draws with
`torch.multinomial`. In a server every row is a different request, so here the settings are per row (the
filter itself, temperature then top-k then top-p, is the shared `kfoundry.model.sampling.filter_logits`), and
the draw uses the exponential-race form of sampling: with E_i ~ Exp(1) independent,
argmax_i p_i / E_i is distributed exactly as Categorical(p) (the "Gumbel-max" trick in another guise; vLLM
samples the same way). The noise for each row comes from that row's own generator, so a seeded request
draws the same tokens whichever other requests share its batch, and the rest is one vectorised pass.
"""

from __future__ import annotations

import torch

from kfoundry.model.generate import SamplingParams
from kfoundry.model.sampling import filter_logits


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token id per row of `logits` [B, V]; temperature 0 means greedy for that row."""
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    # Every row's argmax in one pass: the answer for greedy rows (the common case for every row at once),
    # and a placeholder that the sampled rows overwrite.
    out = logits.argmax(dim=-1).tolist()
    if not rows:
        return out
    x = logits[rows] if len(rows) < len(params) else logits
    chosen = [params[i] for i in rows]
    probs = filter_logits(x, [p.temperature for p in chosen], [p.top_k for p in chosen],
                          [p.top_p for p in chosen]).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()  # rows without a seed share one draw from torch's generator
    for j, i in enumerate(rows):
        if generators[i] is not None:  # a seeded row draws from its own generator: the same whatever the batch
            noise[j].exponential_(generator=generators[i])
    for i, t in zip(rows, (probs / noise).argmax(dim=-1).tolist()):
        out[i] = t
    return out
