"""Temperature, top-k and top-p over a batch of logits, with a setting per row: the one filter behind sampling.

`kfoundry.model.generate` applies one setting to every row of a batch; the server (`kfoundry.serve.sampling`)
gives every row, a different request, its own. Both shape the distribution here and only then draw, each in its
own way (one generator for a batch, one generator per request).

- Temperature divides the logits: below 1 sharpens the distribution, above 1 flattens it. Greedy decoding
  (temperature 0) never reaches this filter: it is an argmax.
- Top-k (Fan et al. 2018) keeps each row's k largest logits (0 = off). Ties with the k-th value are kept.
- Top-p, nucleus sampling (Holtzman et al. 2020), keeps each row's smallest set of best tokens whose probability
  reaches p (1 = off); the best token always stays, so no row is left empty.
Top-k is applied first, and top-p measures mass after it (the order Hugging Face and vLLM use).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_row(value: float | Sequence[float], rows: int, name: str) -> list:
    values = [value] * rows if isinstance(value, (int, float)) else list(value)
    if len(values) != rows:
        raise ValueError(f"{name}: {len(values)} settings for {rows} rows")
    return values


def filter_logits(logits: torch.Tensor, temperature: float | Sequence[float] = 1.0,
                  top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0) -> torch.Tensor:
    """logits [B, V] -> float32 logits [B, V] divided by each row's temperature, with the tokens that top-k
    and top-p drop set to -inf. Each setting is one value for every row or a sequence of B values.

    `softmax` of the result is the distribution to sample from.
    """
    B, V = logits.shape
    temps, ks, ps = (_per_row(temperature, B, "temperature"), _per_row(top_k, B, "top_k"),
                     _per_row(top_p, B, "top_p"))
    if any(t <= 0 for t in temps):
        raise ValueError("temperature must be > 0 to sample (temperature 0 is greedy: take the argmax)")
    x = logits.float() / torch.tensor(temps, dtype=torch.float32, device=logits.device)[:, None]
    if any(k > 0 for k in ks):
        # Compare with each row's k-th largest value (k = 0: all V, so the smallest, and nothing is dropped).
        k = [min(k, V) if k > 0 else V for k in ks]
        best = torch.topk(x, max(k), dim=-1).values  # sorted, best first
        kth = best.gather(-1, torch.tensor(k, device=x.device)[:, None] - 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p < 1 for p in ps):
        # A sorted token is dropped when the mass of the better ones already exceeds p (so the best always stays).
        p = torch.tensor(ps, dtype=torch.float32, device=x.device)[:, None]
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x
