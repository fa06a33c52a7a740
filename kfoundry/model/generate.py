"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, batches.

Prompts of different lengths are left-padded so that every row's next token sits in the same column; padded
positions are masked out of attention and each row keeps its own position ids, so a padded row computes
exactly what it would alone. The cache is filled once by a prefill pass, then each decode step feeds one token
per row and attends to everything cached. Temperature, top-k and top-p are the shared filter of sampling.py
(the server uses it too, with a setting per row).

A single sequence on the CPU (the chat, the CLI, an edge device) decodes through `SequenceDecoder`
(decode.py), which runs the same weights with matrix-vector products and a fraction of the operators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from kfoundry.errors import ConfigError
from kfoundry.model import masks
from kfoundry.model.decode import SequenceDecoder
from kfoundry.model.llama import KVCache, Transformer
from kfoundry.model.sampling import filter_logits


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0")


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One token id per row from logits [B, V]."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, p.temperature, p.top_k, p.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | None = None, *,
             stop_ids: Iterable[int] = (), pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new token ids per row (a stop token ends its row and is not returned).

    on_token(row, token_id) is called as each token is chosen, for streaming.
    """
    params = params or SamplingParams()
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (start it with BOS)")
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    total = T + params.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ConfigError(f"prompt ({T}) + max_new_tokens ({params.max_new_tokens}) exceeds the model context "
                          f"({model.cfg.max_seq_len})")
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    valid = torch.arange(T, device=device)[None, :] >= (T - lengths)[:, None]  # [B, T] real (non-pad) positions
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    padded = bool((lengths != T).any())

    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stop = set(stop_ids)

    if B == 1 and SequenceDecoder.supports(model):
        decoder = SequenceDecoder(model, total)
        logits = decoder.prefill(prompts[0])[None]

        def forward_step(tok: torch.Tensor) -> torch.Tensor:
            return decoder.step(int(tok[0]))[None]
    else:
        cache = KVCache(model.cfg, B, total, device, dtype)
        # Prefill: causal within the prompt, and never attend to padding.
        mask = masks.left_padded_causal(valid) if padded else None
        logits = model(idx, positions=positions, attn_mask=mask, cache=cache)[:, -1]
        next_pos = lengths.clone()
        key_valid = valid

        def forward_step(tok: torch.Tensor) -> torch.Tensor:
            nonlocal next_pos, key_valid
            step_mask = None
            if padded:  # keys: the prompt's real positions plus every generated one
                key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
                step_mask = masks.key_padding(key_valid)
            out = model(tok[:, None], positions=next_pos[:, None], attn_mask=step_mask, cache=cache)[:, -1]
            next_pos = next_pos + 1
            return out

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(params.max_new_tokens):
        tok = sample_next(logits, params, gen)
        for i, t in enumerate(tok.tolist()):  # one device->host copy per step, not one per row
            if done[i]:
                continue
            if t in stop:
                done[i] = True
                continue
            out[i].append(t)
            if on_token:
                on_token(i, t)
        if all(done) or step == params.max_new_tokens - 1:
            break  # no forward pass for a token nobody will use
        logits = forward_step(tok)
    return out
