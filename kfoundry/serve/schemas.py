"""Request and response bodies of the OpenAI API subset we serve.

The rules, the same on both POST endpoints:

- Types are strict: a string where a number belongs is an error, not coerced.
- Every error names its field (`param`), nested ones with dots (`messages.0.content`): checks live on the
  field they are about, never on the body as a whole.
- Text must be valid Unicode. JSON can carry a lone UTF-16 surrogate (`"\\ud800"`), which no UTF-8 encoder,
  tokenizer or JSON response can hold; it is refused by name, as any other bad value.
- OpenAI options that change what is generated and that we do not implement (`logprobs`, `tools`,
  `response_format`, `best_of`, penalties, ...; `UNSUPPORTED` below) are accepted only at their neutral value
  and otherwise refused with a 400 naming the option — never silently ignored, since the answer would not be
  what the client asked for. OpenAI options that do not change the answer (`user`, `store`, `metadata`,
  `service_tier`, `parallel_tool_calls`; `IGNORED`) are accepted and ignored. Fields OpenAI does not define
  are ignored too: clients and proxies add their own.

Responses are built as plain dicts by openai_format.py; the response models here only describe them in the
OpenAPI schema (`/openapi.json`), which the schema-fuzzing test holds every response to.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kfoundry.errors import ConfigError, DataError

INT64 = 2**63  # seeds are int64, as in OpenAI's API; torch generators take any of them


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"not valid Unicode: a lone surrogate {s[e.start]!r} at character {e.start}") from None
    return s


Text = Annotated[str, AfterValidator(_valid_unicode)]

# Options OpenAI defines that we do not implement, with the values that ask for nothing (accepted).
UNSUPPORTED_COMMON: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
}
UNSUPPORTED_COMPLETION: dict[str, tuple] = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, "")}
UNSUPPORTED_CHAT: dict[str, tuple] = {
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
# OpenAI options that do not change the answer: accepted and ignored (documented in docs/serve.md).
IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")


def _refuse_unless_neutral(value: Any, info: ValidationInfo, table: dict[str, tuple]) -> Any:
    neutral = table[info.field_name]
    # `0 == False` in Python; compare with the type too, so `logprobs: 0.0` or `true` is not taken for neutral.
    if not any(value == v and type(value) is type(v) for v in neutral):
        allowed = " or ".join(json.dumps(v, ensure_ascii=False) for v in neutral)
        raise ConfigError(f"not supported by this server (leave it out, or send {allowed})")
    return value


def neutral_only(table: dict[str, tuple]):
    """The validator a model declares for the options of `table` (declared as `Any = None` fields): each is
    accepted only at one of its neutral values, and otherwise refused with an error naming it."""

    def check(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unless_neutral(value, info, table)

    return field_validator(*table, mode="before")(classmethod(check))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "use the default"."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 (or below 1e-5) is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    # Accepted and ignored (IGNORED): they do not change the answer.
    user: Text | None = None
    store: bool | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None
    # Not implemented: accepted only at their neutral values (UNSUPPORTED_COMMON).
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None

    _unsupported_common = neutral_only(UNSUPPORTED_COMMON)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ConfigError(f"at most 4 stop sequences, got {len(v)}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: text (or token ids) continued as text."""

    prompt: Text | list[Text] | list[int] | list[list[int]]
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ConfigError("must not be an empty list")
        return v

    _unsupported_completion = neutral_only(UNSUPPORTED_COMPLETION)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions: a conversation continued by one assistant turn."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name for max_tokens; wins")
    parallel_tool_calls: bool | None = None  # ignored: without tools there are no tool calls
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    _unsupported_chat = neutral_only(UNSUPPORTED_CHAT)

    @model_validator(mode="after")
    def _newer_name_wins(self):  # never raises: a check here could not name its field
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


# ------------------------------------------------------------------ responses (for the OpenAPI schema only)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")  # the engine's load and counters follow
    status: Literal["ok", "unavailable", "draining"]
    model: str
    context: int
    auth: bool
