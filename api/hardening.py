"""What keeps one hostile request from taking the API process down.

- `BodyLimitMiddleware` (pure ASGI): counts request body bytes as they stream in, whatever the transfer
  encoding (Content-Length or chunked), and answers 413 past the limit before the app sees anything. It
  also refuses bodies nested deeper than `MAX_JSON_DEPTH` with 400 before anything parses them, and
  oversized payment headers with 413.
- `json_depth`: a cheap scan of brackets outside strings, so nesting is measured without parsing.
- `restore_recursion_limit`: py_ecc (imported through eth-account) raises the interpreter's recursion
  limit to 100,000, which lets a deeply nested JSON document overflow the C stack (SIGSEGV) instead of
  raising RecursionError. The API puts the default limit back once everything is imported."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

MAX_BODY_BYTES = 16 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32
DEFAULT_RECURSION_LIMIT = 1000  # CPython's own default
PAYMENT_HEADERS = (b"payment-signature", b"x-payment")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def restore_recursion_limit() -> int:
    """Undo what py_ecc does at import time. Imports py_ecc first, so no later import can raise the limit
    again, and returns the limit now in force."""
    import py_ecc  # noqa: F401  (imported for its side effect, which is then undone)

    if sys.getrecursionlimit() > DEFAULT_RECURSION_LIMIT:
        sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
    return sys.getrecursionlimit()


def json_depth(data: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest, counting brackets outside strings. An
    unterminated string leaves its brackets counted, which only errs on the side of refusing."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub(b'""', data)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest


def _reply(status: int, error: str, message: str) -> tuple[Message, Message]:
    body = json.dumps({"error": error, "message": message}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class BodyLimitMiddleware:
    """Reads the whole request body (at most `max_body` bytes) before the app runs, then replays it."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES, max_header: int = MAX_HEADER_BYTES,
                 max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_body = max_body
        self.max_header = max_header
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._check_headers(scope)
        if refusal is None:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    refusal = (413, "request_too_large", f"bodies are limited to {self.max_body} bytes")
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if refusal is None:
            body = b"".join(chunks)
            if body and json_depth(body) > self.max_depth:
                refusal = (400, "json_too_deep", f"JSON may nest at most {self.max_depth} levels")
        if refusal is not None:
            for message in _reply(*refusal):
                await send(message)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_headers(self, scope: Scope) -> tuple[int, str, str] | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    return 400, "invalid_request", "Content-Length is not a number"
                if len(value) > 12 or int(value) > self.max_body:
                    return 413, "request_too_large", f"bodies are limited to {self.max_body} bytes"
            elif name in PAYMENT_HEADERS and len(value) > self.max_header:
                return 413, "request_too_large", f"{name.decode()} is limited to {self.max_header} bytes"
        return None
