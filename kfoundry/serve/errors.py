"""The one error type of the HTTP layer, and OpenAI's error body.

Every failure a client can see — ours, FastAPI's, or the connection guard's — is answered with the body
OpenAI's own API uses, `{"error": {"message", "type", "param", "code"}}`, so the official clients raise
their usual exceptions (`BadRequestError`, `AuthenticationError`, `RateLimitError`, ...). `param` names the
request field at fault, with dots for nesting (`messages.0.content`), so a user can fix the right thing.
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """{"error": {...}}: what every OpenAI endpoint returns with a 4xx/5xx status."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_event(message: str, type: str = "server_error", code: str | None = None) -> str:
    """The last server-sent event of a stream that cannot finish: OpenAI's error body as a `data:` line."""
    return f"data: {json.dumps(error_body(message, type, code=code), ensure_ascii=False)}\n\n"


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape. Raise it anywhere below a route; the app's handler answers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
