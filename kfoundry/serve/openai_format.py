"""OpenAI's response format, as pure functions: a finished generation in, the JSON OpenAI clients expect out.

Nothing here knows about HTTP, FastAPI or the scheduler; each function takes plain values and returns a dict
(or an SSE line), field for field in the order of OpenAI's API reference, so a diff against that reference is
easy to read. `chat` switches between the two endpoints' shapes: /v1/chat/completions puts text in
`message`/`delta`, /v1/completions in `text`.
"""

from __future__ import annotations

import json
import time

from kfoundry.serve.generation import Piece


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, chat: bool, texts: list[str], finish_reasons: list[str | None],
               usage_: dict, created: int | None = None) -> dict:
    """The whole answer of a non-streaming request: one choice per text."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, finish_reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, finish_reasons))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()) if created is None else created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def chunk(rid: str, model: str, chat: bool, choices: list[dict], usage_: dict | None = None,
          created: int | None = None) -> str:
    """One server-sent event of a stream (`data: {...}` and a blank line)."""
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()) if created is None else created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def role_choices(n: int) -> list[dict]:
    """A chat stream opens each choice with its role, as OpenAI does."""
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)]


def piece_choice(p: Piece, chat: bool) -> dict:
    """One choice of a stream chunk: new text for choice `p.index`, and its finish reason on the last piece."""
    if chat:
        delta = {"content": p.text} if p.text or p.finish_reason is None else {}
        return {"index": p.index, "delta": delta, "logprobs": None, "finish_reason": p.finish_reason}
    return {"index": p.index, "text": p.text, "logprobs": None, "finish_reason": p.finish_reason}


DONE = "data: [DONE]\n\n"


def model_card(name: str, created: int, context_length: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "kfoundry",
            "context_length": context_length}
