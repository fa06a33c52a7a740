"""The HTTP layer: an OpenAI-compatible API and the web chat page, on FastAPI.

    GET  /                      the chat page (static files in kfoundry/serve/static, no build step)
    GET  /health                liveness, load and engine counters (503 while the engine is down or draining)
    GET  /openapi.json          the API's schema (what the schema-fuzzing test checks every answer against)
    GET  /v1/models             the one model this server holds
    POST /v1/completions        text in, text out (`prompt` may be a list, or token ids)
    POST /v1/chat/completions   a conversation rendered with the tokenizer's chat template, one assistant turn out

Both POST endpoints take `stream: true` and then answer with server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`. Every error, ours or FastAPI's, uses OpenAI's error body (errors.py): 400 bad
input, 401 API key, 404 unknown model or path, 408 slow body, 413 body too large, 429 queue full (with
Retry-After), 503 shutting down, 504 timeout, 500 a failure in generation.

A request passes through small parts, each testable alone:

    guard.py          Host, draining, API key and body size/time — before the body is parsed
    schemas.py        the body's types and ranges, each error naming its field
    plan.py           request -> GenerationPlan (tokens, sampling settings), checked against the limits
    generation.py     the plan's tickets on the engine (engine.py), token events -> text pieces
    openai_format.py  pieces and texts -> OpenAI's JSON and stream chunks

Requests never touch the model: the engine's own thread batches them with everyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.errors import CheckpointError, ConfigError
from kfoundry.model.quantize import quantize_int8
from kfoundry.serve import openai_format as fmt
from kfoundry.serve.engine import Engine, QueueFull
from kfoundry.serve.errors import APIError, error_event
from kfoundry.serve.generation import Aborted, Generation, GenerationError
from kfoundry.serve.guard import Drain, Guard, GuardConfig
from kfoundry.serve.hosts import LOOPBACK_NAMES
from kfoundry.serve.plan import GenerationPlan, Limits, check_model, plan_request
from kfoundry.serve.scheduler import Scheduler
from kfoundry.serve.schemas import (ChatCompletionResponse, ChatRequest, CompletionRequest, CompletionResponse,
                                    ErrorResponse, Health, ModelCard, ModelList)

STATIC_DIR = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.25  # pause between reads of a body the route left unread, while waiting for a disconnect
# Bodies up to this size are planned (tokenized) on the event loop: that takes about half a millisecond, less
# than the two thread switches of `asyncio.to_thread`, which on a busy machine each wait for a time slice.
INLINE_PLAN_BYTES = 1024


@dataclass
class ServeConfig:
    """Server policy (the model's own limits come from the engine)."""

    model_name: str
    api_key: str | None = None
    request_timeout: float = 600.0  # seconds from arrival to the last token, queueing included
    max_tokens: int | None = None  # the largest max_tokens a request may ask for (default: the context)
    default_max_tokens: int = 256  # when a request does not say
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 1
    # Host names accepted in the Host header; None accepts any. The default suits a server bound to loopback
    # (DNS rebinding, guard.py); `kfoundry serve --host 0.0.0.0` sets None unless --allow-host is given.
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    body_timeout: float = 60.0  # seconds for a request body to arrive (then 408)
    header_timeout: float = 10.0  # seconds for a request's headers to arrive (then the connection is closed)
    max_connections: int = 512  # open connections; one more is answered 503 and closed
    shutdown_grace: float = 10.0  # seconds requests in flight may still take after SIGTERM


def app_from_checkpoint(path: str | Path, cfg: ServeConfig | None = None, *, device: str = "cpu", max_batch: int = 8,
                        max_queue: int = 64, start: bool = True, quantize: str | None = None) -> tuple[FastAPI, Engine]:
    """Load a checkpoint directory and build its app and scheduler (started unless `start=False`).
    quantize="int8" serves int8 weight-only matrices (kfoundry/model/quantize.py): a quarter of the weight memory."""
    model = load_model(path, device=device)
    if quantize == "int8":
        quantize_int8(model)
    elif quantize is not None:
        raise ConfigError(f"unknown quantization {quantize!r} (use int8)")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.cfg.vocab_size}")
    cfg = cfg or ServeConfig(model_name=Path(path).resolve().name)
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, vocab_size=tokenizer.vocab_size)
    if start:
        scheduler.start()
    return create_app(scheduler, tokenizer, cfg), scheduler


def create_app(engine: Engine, tokenizer, cfg: ServeConfig) -> FastAPI:
    """The ASGI app over `engine` (engine.py). The caller owns the engine (starts it; stops it at shutdown).
    `app.state.serve_config` and `app.state.drain` are what server.py reads to run it."""
    drain = Drain(cfg.shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with drain.lifespan(app):
            yield
        # A forwarding engine keeps a connection pool on this loop; close it here, while the loop still runs.
        close = getattr(engine, "close_loop_client", None)
        if close is not None:
            await close()

    app = FastAPI(title="kfoundry serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serve_config, app.state.drain = cfg, drain
    app.add_middleware(Guard, cfg=GuardConfig(api_key=cfg.api_key, allowed_hosts=cfg.allowed_hosts,
                                              max_body_bytes=cfg.max_body_bytes, body_timeout=cfg.body_timeout),
                       drain=drain)
    install_error_handlers(app)
    answer = Answerer(engine, tokenizer, cfg, drain)
    created = int(time.time())

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        status = "draining" if drain.draining else "ok" if engine.alive else "unavailable"
        body = {"status": status, "model": cfg.model_name, "context": engine.max_len, "auth": cfg.api_key is not None,
                **engine.load(), "stats": engine.stats.as_dict()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models():
        return {"object": "list", "data": [fmt.model_card(cfg.model_name, created, engine.max_len)]}

    @app.get("/v1/models/{name}", response_model=ModelCard, responses=ERRORS)
    async def model(name: str):
        check_model(name, cfg.model_name)
        return fmt.model_card(cfg.model_name, created, engine.max_len)

    @app.post("/v1/completions", responses=post_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request):
        return await answer(request, body)

    @app.post("/v1/chat/completions", responses=post_responses(ChatCompletionResponse))
    async def chat_completions(body: ChatRequest, request: Request):
        return await answer(request, body)

    app.openapi = lambda: openapi_schema(app, bearer=cfg.api_key is not None)
    return app


class Answerer:
    """Runs one POST request: plan it, queue it on the engine, and answer in full or as a stream."""

    def __init__(self, engine: Engine, tokenizer, cfg: ServeConfig, drain: Drain) -> None:
        self.engine, self.tokenizer, self.cfg, self.drain = engine, tokenizer, cfg, drain
        self.limits = Limits(model_name=cfg.model_name, context=engine.max_len, max_batch=engine.max_batch,
                             max_tokens=cfg.max_tokens, default_max_tokens=cfg.default_max_tokens,
                             max_prompts=cfg.max_prompts)
        self.stop_ids = frozenset({tokenizer.eos_id, tokenizer.eot_id})

    async def __call__(self, request: Request, body: CompletionRequest | ChatRequest) -> Response:
        if int(request.headers.get("content-length") or INLINE_PLAN_BYTES + 1) <= INLINE_PLAN_BYTES:
            plan = plan_request(body, self.tokenizer, self.limits)
        else:  # tokenizing a long text takes time: off the event loop, so other requests go on meanwhile
            plan = await asyncio.to_thread(plan_request, body, self.tokenizer, self.limits)
        gen = Generation(self.engine, self.tokenizer, plan.prompts, plan.params, n=plan.n, stop_ids=self.stop_ids,
                         stop=plan.stop, timeout=self.cfg.request_timeout, stream=plan.stream)
        try:
            gen.submit()
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry after {self.cfg.retry_after_s}s", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        rid = f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex}"
        if plan.stream:
            return CancellingStream(self.events(gen, plan, rid), on_close=gen.cancel, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        with self.drain.track(gen):
            texts = await self.collect_unless_gone(request, gen)
        if texts is None:
            return Response(status_code=499)  # the client left; nobody will read this
        return JSONResponse(fmt.completion(rid, self.cfg.model_name, plan.chat, texts, gen.finish_reasons,
                                           fmt.usage(gen.prompt_tokens, gen.completion_tokens)))

    async def collect_unless_gone(self, request: Request, gen: Generation) -> list[str] | None:
        """The whole answer, or None when the client hangs up first (the generation is then cancelled)."""
        task = asyncio.ensure_future(gen.collect())
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            gen.cancel()
            return None
        except TimeoutError:
            raise self.timed_out() from None
        except GenerationError as e:
            raise APIError(500, str(e), "server_error") from None
        except Aborted as e:
            raise APIError(503, str(e), "server_error", code="server_shutting_down",
                           headers={"Connection": "close"}) from None
        finally:
            for t in (task, gone):
                if not t.done():
                    t.cancel()
            if not gen.done:
                gen.cancel()

    async def events(self, gen: Generation, plan: GenerationPlan, rid: str) -> AsyncIterator[str]:
        name, chat = self.cfg.model_name, plan.chat
        with self.drain.track(gen):
            try:
                if chat:
                    yield fmt.chunk(rid, name, chat, fmt.role_choices(len(gen.streams)))
                async for p in gen.pieces():
                    yield fmt.chunk(rid, name, chat, [fmt.piece_choice(p, chat)])
                if plan.include_usage:
                    yield fmt.chunk(rid, name, chat, [], fmt.usage(gen.prompt_tokens, gen.completion_tokens))
                yield fmt.DONE
            except TimeoutError:
                yield error_event(self.timed_out().message, "timeout_error", code="timeout")
            except GenerationError as e:
                yield error_event(str(e))
            except Aborted as e:
                yield error_event(str(e), code="server_shutting_down")

    def timed_out(self) -> APIError:
        return APIError(504, f"request timed out after {self.cfg.request_timeout:g}s", "timeout_error",
                        code="timeout")


async def until_disconnected(receive) -> None:
    """Return when the client has gone. Once the body is read, the server's `receive` blocks until the
    connection drops (or the answer is sent), so a waiting request costs nothing until then: no polling."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(DISCONNECT_POLL_S)  # body data the route did not read: do not spin on it


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


# ------------------------------------------------------------------------------------------------ errors


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation errors, unknown paths, and crashes."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind,
                        headers=exc.headers).response()  # keeps `Allow` on a 405

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()


# Union members and wrappers that pydantic adds to an error's location; they are not fields the client sent.
_NOT_A_FIELD = ("[", "(", "-", "json-or-python")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal", "is-instance"})


def param_of(loc) -> str | None:
    """The client's field path in a pydantic error location: ('body', 'messages', 0, 'content', 'str') ->
    'messages.0.content'."""
    parts = [str(x) for x in loc[1:] if isinstance(x, int) or
             (isinstance(x, str) and x not in _TYPE_NAMES and not any(c in x for c in _NOT_A_FIELD))]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """One 400 for FastAPI's validation errors: the first field at fault, its problems, and the others' names."""
    if not errors:
        return APIError(400, "invalid request", code="invalid_value")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}",
                        code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: absent, or not an object
        if first.get("type") == "missing":
            return APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    # A value that matches no member of a union (`prompt`, `stop`) gives one error per member. The deepest
    # location is the member that got furthest (["ok", "\ud800"] is a list of strings, wrong at item 1);
    # the errors of that field are then said together.
    params = [param_of(e.get("loc", ())) for e in errors]
    param = max(params, key=lambda p: -1 if p is None else p.count("."))
    same = [e for e, p in zip(errors, params) if p == param]
    ours = [e for e in same if e.get("type") == "value_error"]  # our own checks say more than "wrong type"
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid")).removeprefix("Value error, ") for e in ours or same))
    top = (param or "").split(".")[0]
    others = list(dict.fromkeys(p for p in params if p is not None and p.split(".")[0] != top))
    more = f" (also invalid: {', '.join(str(p) for p in others)})" if others else ""
    return APIError(400, f"{param + ': ' if param else ''}{'; or '.join(msgs)}{more}", param=param,
                    code="invalid_value")


# ----------------------------------------------------------------------------------------------- schema

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 503)}
# One server-sent event of a stream: `data` is a JSON chunk (or an error body) and the last one "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": 'a JSON chunk or error body, or "[DONE]"'}}}


def post_responses(model) -> dict:
    """A POST endpoint answers JSON, or server-sent events when `stream` is true; and errors as OpenAI does."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
            **ERRORS, **{s: {"model": ErrorResponse} for s in (429, 500, 504)}}


def openapi_schema(app: FastAPI, bearer: bool) -> dict:
    """FastAPI's schema, less its 422 answers (validation errors here are OpenAI's 400s), and with the API key
    declared on /v1 when the server has one (the key is checked in guard.py, not by FastAPI)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        if bearer:
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for name, path in schema.get("paths", {}).items():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
                if bearer and name.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
