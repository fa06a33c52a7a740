"""From a validated request body to a generation plan: the one place where a request is checked against the
model and the server's limits, and turned into token ids and sampling settings.

`plan_request` is a plain function of the body, the tokenizer and the `Limits`; it needs no FastAPI and no
running engine, so every rule below is testable on its own. It raises `APIError` (a 400 or 404 naming the
field at fault) for anything the request asks that cannot be done:

- a model name other than the one served (404);
- more prompts than `max_prompts`, token-id prompts that are empty or outside the vocabulary;
- a prompt that fills the context (the answer needs room too), or prompt + `max_tokens` past it;
- `max_tokens` above the server's limit, `n` above the engine's batch.

Text is NFC-normalised here (macOS sends NFD Hangul) before it is tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfoundry.model.generate import SamplingParams
from kfoundry.serve.errors import APIError
from kfoundry.serve.schemas import ChatRequest, CompletionRequest
from kfoundry.text import nfc

# Temperatures below this sample greedily. Dividing logits by a temperature under ~1e-38 overflows float32 to
# inf and the softmax to NaN; long before that the distribution is a point mass on the best token. vLLM uses
# the same cut-off (its _SAMPLING_EPS).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the engine's shape and the server's policy."""

    model_name: str
    context: int  # tokens the engine holds per sequence: prompt + answer
    max_batch: int  # the most choices (n) one request may have
    max_tokens: int | None = None  # the largest max_tokens a request may ask for (None: the context)
    default_max_tokens: int = 256
    max_prompts: int = 16


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the engine and the response need, decided before anything is queued."""

    chat: bool
    prompts: list[list[int]]  # token ids, one list per prompt
    params: SamplingParams
    n: int  # choices per prompt
    stop: list[str]  # stop strings, NFC
    stream: bool
    include_usage: bool

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def plan_request(body: CompletionRequest | ChatRequest, tokenizer, limits: Limits) -> GenerationPlan:
    """Check `body` against `limits`, tokenize it, and decide how to generate (raises APIError)."""
    if body.model is not None:
        check_model(body.model, limits.model_name)
    chat = isinstance(body, ChatRequest)
    prompts = [chat_prompt(body, tokenizer)] if chat else completion_prompts(body.prompt, tokenizer, limits)
    params = sampling_params(body, prompts, limits, prompt_param="messages" if chat else "prompt")
    return GenerationPlan(chat=chat, prompts=prompts, params=params, n=body.n or 1,
                          stop=[nfc(s) for s in body.stop_list()], stream=bool(body.stream),
                          include_usage=bool(body.stream_options and body.stream_options.include_usage))


def check_model(name: str, served: str) -> None:
    """404 unless `name` is the model this server serves."""
    if name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}", "not_found_error",
                       param="model", code="model_not_found")


def chat_prompt(body: ChatRequest, tokenizer) -> list[int]:
    # OpenAI's newer "developer" role plays the part of "system" for models trained before it existed.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": nfc(m.text())}
                for m in body.messages]
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def completion_prompts(prompt, tokenizer, limits: Limits) -> list[list[int]]:
    if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
        prompt = [prompt]  # one prompt, as text or as token ids
    if len(prompt) > limits.max_prompts:
        raise APIError(400, f"{len(prompt)} prompts in one request; the limit is {limits.max_prompts}",
                       param="prompt", code="invalid_value")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(tokenizer.encode(p, bos=True))  # BOS as in pretraining; encode applies NFC
            continue
        if not p or not all(0 <= t < tokenizer.vocab_size for t in p):
            raise APIError(400, f"token-id prompts must be non-empty with ids in [0, {tokenizer.vocab_size})",
                           param="prompt", code="invalid_value")
        out.append(list(p))
    return out


def sampling_params(body: CompletionRequest | ChatRequest, prompts: list[list[int]], limits: Limits,
                    prompt_param: str) -> SamplingParams:
    ctx = limits.context
    cap = min(limits.max_tokens or ctx, ctx)
    asked = body.max_tokens
    if asked is not None and asked > cap:
        raise APIError(400, f"max_tokens is {asked}, above this server's limit of {cap}",
                       param="max_tokens", code="max_tokens_too_large")
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise APIError(400, f"the prompt is {longest} tokens; the model's context is {ctx} tokens, which must "
                       "also hold the answer", param=prompt_param, code="context_length_exceeded")
    if asked is not None and longest + asked > ctx:
        raise APIError(400, f"prompt ({longest} tokens) + max_tokens ({asked}) exceeds the model's context of "
                       f"{ctx} tokens", param="max_tokens", code="context_length_exceeded")
    n = body.n or 1
    if n > limits.max_batch:
        raise APIError(400, f"n={n} is above this server's batch size {limits.max_batch}", param="n",
                       code="invalid_value")
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    return SamplingParams(max_new_tokens=asked or min(limits.default_max_tokens, cap, ctx - longest),
                          temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)
