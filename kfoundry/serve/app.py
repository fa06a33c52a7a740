"""The HTTP layer: an OpenAI-compatible API and the web chat page, on FastAPI.

    GET  /                      the chat page (static files in kfoundry/serve/static, no build step)
    GET  /health                liveness, load and scheduler counters (503 while the scheduler is not running)
    GET  /v1/models             the one model this server holds
    POST /v1/completions        text in, text out (`prompt` may be a list, or token ids)
    POST /v1/chat/completions   a conversation rendered with the tokenizer's chat template, one assistant turn out

Both POST endpoints take `stream: true` and then answer with server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`. Every error, ours or FastAPI's, uses OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` so OpenAI clients raise their usual exceptions:
400 bad input (malformed JSON and wrong types included), 401 API key, 404 unknown model or path,
413 body too large, 429 queue full (with Retry-After), 504 timeout, 500 a failure in generation.

Requests never touch the model: they are tokenized here (NFC first), validated against the context, and
handed to the `Scheduler`, whose thread batches them with everyone else's.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kfoundry.model.generate import SamplingParams
from kfoundry.serve.generation import Generation, GenerationError, Piece
from kfoundry.serve.scheduler import QueueFull, Scheduler
from kfoundry.serve.schemas import ChatRequest, CompletionRequest, SamplingRequest, error_body
from kfoundry.text import nfc

STATIC_DIR = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there


@dataclass
class ServeConfig:
    """Server policy (the model's own limits come from the scheduler)."""

    model_name: str
    api_key: str | None = None
    request_timeout: float = 600.0  # seconds from arrival to the last token, queueing included
    max_tokens: int | None = None  # the largest max_tokens a request may ask for (default: the context)
    default_max_tokens: int = 256  # when a request does not say
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


class BodyLimit:
    """ASGI middleware: refuse a body whose Content-Length is over the limit before reading it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                err = APIError(413, f"request body larger than {self.max_bytes} bytes", code="body_too_large")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CancellingStream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however the stream ends: finished, failed or disconnected."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def app_from_checkpoint(path: str | Path, cfg: ServeConfig | None = None, *, device: str = "cpu", max_batch: int = 8,
                        max_queue: int = 64, start: bool = True, quantize: str | None = None) -> tuple[FastAPI, Scheduler]:
    """Load a checkpoint directory and build its app and scheduler (started unless `start=False`).
    quantize="int8" serves int8 weight-only matrices (kfoundry/model/quantize.py): a quarter of the weight memory."""
    from kfoundry.checkpoint import load_model, load_tokenizer

    model = load_model(path, device=device)
    if quantize == "int8":
        from kfoundry.model.quantize import quantize_int8

        quantize_int8(model)
    elif quantize is not None:
        raise ValueError(f"unknown quantization {quantize!r} (use int8)")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.cfg.vocab_size}")
    cfg = cfg or ServeConfig(model_name=Path(path).resolve().name)
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, vocab_size=tokenizer.vocab_size)
    if start:
        scheduler.start()
    return create_app(scheduler, tokenizer, cfg), scheduler


def create_app(scheduler: Scheduler, tokenizer, cfg: ServeConfig) -> FastAPI:
    """The ASGI app. The caller owns the scheduler (starts it; stops it at shutdown)."""
    app = FastAPI(title="kfoundry serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    created = int(time.time())
    stop_ids = frozenset({tokenizer.eos_id, tokenizer.eot_id})

    # ----------------------------------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}",
                            code="invalid_json").response()
        if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: absent, or not an object
            if first.get("type") == "missing":
                return APIError(400, "the request body is empty; send a JSON object", code="invalid_json").response()
            return APIError(400, "the request body must be a JSON object", code="invalid_value").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return APIError(400, f"{param + ': ' if param else ''}{msg}{more}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    # ---------------------------------------------------------------------------------------- helpers

    def require_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != cfg.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {cfg.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    def sampling(body: SamplingRequest, prompts: list[list[int]]) -> SamplingParams:
        ctx = scheduler.max_len
        limit = min(cfg.max_tokens or ctx, ctx)
        if body.max_tokens is not None and body.max_tokens > limit:
            raise APIError(400, f"max_tokens is {body.max_tokens}, above this server's limit of {limit}",
                           param="max_tokens", code="max_tokens_too_large")
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise APIError(400, f"the prompt is {longest} tokens; the model's context is {ctx} tokens, which must "
                           "also hold the answer", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if body.max_tokens is not None and longest + body.max_tokens > ctx:
            raise APIError(400, f"prompt ({longest} tokens) + max_tokens ({body.max_tokens}) exceeds the model's "
                           f"context of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
        n = body.n or 1
        if n > scheduler.max_batch:
            raise APIError(400, f"n={n} is above this server's batch size {scheduler.max_batch}", param="n")
        max_new = body.max_tokens or min(cfg.default_max_tokens, limit, ctx - longest)
        return SamplingParams(max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)

    def encode_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
            prompt = [prompt]  # one prompt, as text or as token ids
        if len(prompt) > cfg.max_prompts:
            raise APIError(400, f"{len(prompt)} prompts in one request; the limit is {cfg.max_prompts}",
                           param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(tokenizer.encode(p, bos=True))  # BOS as in pretraining; encode applies NFC
                continue
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if not p or bad:
                raise APIError(400, f"token-id prompts must be non-empty with ids in [0, {tokenizer.vocab_size})",
                               param="prompt")
            out.append(list(p))
        return out

    async def run(request: Request, body: SamplingRequest, prompts: list[list[int]], chat: bool):
        params = sampling(body, prompts)
        gen = Generation(scheduler, tokenizer, prompts, params, n=body.n or 1, stop_ids=stop_ids,
                         stop=[nfc(s) for s in body.stop_list()], timeout=cfg.request_timeout)
        try:
            gen.submit()
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry after {cfg.retry_after_s}s", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(cfg.retry_after_s)}) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(gen, rid, chat, include_usage)
            return CancellingStream(events, on_close=gen.cancel, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = await collect_unless_gone(request, gen)
        if texts is None:
            return Response(status_code=499)  # the client left; nobody will read this
        return JSONResponse(full_response(gen, rid, chat, texts))

    async def collect_unless_gone(request: Request, gen: Generation) -> list[str] | None:
        task = asyncio.ensure_future(gen.collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    gen.cancel()
                    return None
        except TimeoutError:
            raise APIError(504, f"request timed out after {cfg.request_timeout:g}s", "timeout_error",
                           code="timeout") from None
        except GenerationError as e:
            raise APIError(500, str(e), "server_error") from None
        finally:
            if not task.done():
                task.cancel()
            if not gen.done:
                gen.cancel()

    def usage(gen: Generation) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    def full_response(gen: Generation, rid: str, chat: bool, texts: list[str]) -> dict:
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": gen.finish_reasons[i]} for i, t in enumerate(texts)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": gen.finish_reasons[i]}
                       for i, t in enumerate(texts)]
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": cfg.model_name,
                "system_fingerprint": None, "choices": choices, "usage": usage(gen)}

    def chunk(rid: str, chat: bool, choices: list[dict], extra: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": cfg.model_name, "system_fingerprint": None,
                "choices": choices, **(extra or {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def piece_choice(p: Piece, chat: bool) -> dict:
        if chat:
            delta = {"content": p.text} if p.text or p.finish_reason is None else {}
            return {"index": p.index, "delta": delta, "logprobs": None, "finish_reason": p.finish_reason}
        return {"index": p.index, "text": p.text, "logprobs": None, "finish_reason": p.finish_reason}

    async def sse_events(gen: Generation, rid: str, chat: bool, include_usage: bool):
        try:
            if chat:  # OpenAI opens each choice with its role
                yield chunk(rid, chat, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None} for i in range(len(gen.streams))])
            async for p in gen.pieces():
                yield chunk(rid, chat, [piece_choice(p, chat)])
            if include_usage:
                yield chunk(rid, chat, [], {"usage": usage(gen)})
            yield "data: [DONE]\n\n"
        except TimeoutError:
            err = error_body(f"request timed out after {cfg.request_timeout:g}s", "timeout_error", code="timeout")
            yield f"data: {json.dumps(err)}\n\n"
        except GenerationError as e:
            yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"

    # ----------------------------------------------------------------------------------------- routes

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health():
        alive = scheduler.alive
        body = {"status": "ok" if alive else "unavailable", "model": cfg.model_name, "context": scheduler.max_len,
                "auth": cfg.api_key is not None, **scheduler.load(), "stats": scheduler.stats.as_dict()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}", dependencies=[Depends(require_key)])
    async def model(name: str):
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "kfoundry",
                "context_length": scheduler.max_len}

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = await asyncio.to_thread(encode_prompts, body.prompt)
        return await run(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        # OpenAI's newer "developer" role plays the part of "system" for models trained before it existed.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": nfc(m.text())}
                    for m in body.messages]
        ids = await asyncio.to_thread(tokenizer.encode_chat, messages, add_generation_prompt=True)
        return await run(request, body, [ids], chat=True)

    return app
