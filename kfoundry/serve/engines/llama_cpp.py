"""The llama.cpp engine: our front, llama.cpp's `llama-server` doing the arithmetic.

`LlamaCppEngine` is the forwarding engine (forward.py) over a `LlamaCppUpstream`: llama-server on a GGUF
export (llama_server.py starts, health-checks and stops it), spoken to in its native `/completion` dialect —
the prompt as token ids and `return_tokens`, so llama.cpp never tokenizes or detokenizes (its OpenAI endpoint
does not return token ids). llama-server batches the requests of all its slots into one forward pass per step
(continuous batching), in C++.

Sampling is mapped onto llama.cpp's chain so that it means what it means in our engine: temperature 0 is
greedy; otherwise temperature, then top-k (0 = off), then top-p, then a draw, and every llama.cpp extra
(min-p, repetition and DRY penalties, XTC, typical) is off. A `seed` makes a choice reproducible, but
llama.cpp's random generator is not ours, so seeded samples differ between engines; greedy outputs agree
wherever the top two logits are not within rounding of each other (tests/test_serve_engines.py measures that
margin before comparing). A slot reuses the KV of a prompt prefix it has already evaluated (`cache_prompt`,
llama-server's default). A non-streaming request is one non-streamed `/completion` request; a closed
connection makes llama-server free the slot in both cases.
"""

from __future__ import annotations

from pathlib import Path

from kfoundry.errors import ConfigError
from kfoundry.model.generate import SamplingParams
from kfoundry.serve.engines.forward import ForwardingEngine, ProcessUpstream, UpstreamError, error_message
from kfoundry.serve.engines.llama_server import LlamaServer

# llama.cpp samplers off: defaults that would change what temperature / top-k / top-p mean.
NEUTRAL = {"min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "repeat_last_n": 0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "top_n_sigma": -1.0,
           "dynatemp_range": 0.0, "mirostat": 0}


def completion_body(prompt: list[int], p: SamplingParams, seed: int | None, banned: list[int],
                    stream: bool = True) -> dict:
    """The llama-server /completion request for one choice: token ids in, token ids out."""
    body = {"prompt": prompt, "n_predict": p.max_new_tokens, "stream": stream, "return_tokens": True,
            # llama-server's default, as for anyone calling it directly: a slot keeps the KV of its last prompt and
            # evaluates only what a new prompt does not share with it (the last token at least). Re-evaluating
            # every prompt cost 25 % more llama-server CPU per request in bench/serve_engines.py. Reused KV was
            # computed in another batch shape, so logits may differ from a fresh evaluation by F32 rounding:
            # greedy parity holds where the top-two margin is wider (tests/test_serve_engines.py).
            "cache_prompt": True,
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "seed": -1 if seed is None else seed,
            "samplers": ["temperature", "top_k", "top_p"], **NEUTRAL}
    if banned:  # ids our tokenizer cannot decode (a padded vocabulary) are never chosen, as in our scheduler
        body["logit_bias"] = [[i, False] for i in banned]
    return body


class LlamaCppUpstream(ProcessUpstream):
    """llama-server as a forwarding engine's upstream (see forward.Upstream)."""

    name = "llama.cpp"
    path = "/completion"

    def body(self, prompt: list[int], params: SamplingParams, seed: int | None, banned: list[int],
             stop_ids: frozenset[int], stream: bool) -> dict:
        # Stop ids need not be sent: llama-server ends at the GGUF's end-of-generation tokens, which our export
        # writes from the same tokenizer, and the forwarding engine ends a choice at any of `stop_ids` anyway.
        return completion_body(prompt, params, seed, banned, stream)

    def parse(self, data: dict) -> tuple[list[int], str | None]:
        if "error" in data:
            raise UpstreamError(f"llama-server: {error_message(data)}")
        end = None
        if data.get("stop"):
            # The end without our token limit reached: an end-of-generation token we were not told about
            # (llama.cpp's own EOG list), or the context.
            end = "stop" if data.get("stop_type") == "eos" else "length"
        return data.get("tokens") or [], end


class LlamaCppEngine(ForwardingEngine):
    """Runs `llama-server` on `gguf` with `max_batch` slots of `max_len` positions and answers tickets through it."""

    def __init__(self, gguf: str | Path, *, max_len: int, max_batch: int = 8, max_queue: int = 64,
                 threads: int | None = None, binary: str | Path | None = None, banned_ids=()):
        if max_batch < 1 or max_queue < 0:
            raise ConfigError("max_batch must be >= 1 and max_queue >= 0")
        self.server = LlamaServer(gguf, slots=max_batch, ctx=max_len, threads=threads, binary=binary)
        super().__init__(LlamaCppUpstream(self.server), max_len=max_len, max_batch=max_batch, max_queue=max_queue,
                         banned_ids=banned_ids)

