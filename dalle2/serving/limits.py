"""What one request may cost the server (:class:`ServeLimits`), and the ASGI middleware that caps request bodies
while they are read (:class:`BodyLimit`).

The body limit is counted on the bytes actually received, not on what ``Content-Length`` claims: a declared length
over the limit is refused before a byte is read; a chunked body, or one whose length lies, is refused as soon as the
bytes read pass the limit.  Either way the answer is 413 with ``Connection: close``, so the server stops reading
(uvicorn would otherwise read and discard the rest of a body it answered early).  A body that has not fully
arrived ``read_timeout_s`` after its headers gets 408 the same way (slow clients hold no connection for long)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from dalle2.serving.images import DEFAULT_MAX_PIXELS
from dalle2.serving.validation import APIError


@dataclass(frozen=True)
class ServeLimits:
    """Resource limits of :func:`~dalle2.serving.create_app`; each is checked before the work it guards.

    - ``max_upload_bytes``: an uploaded image file (variations); the multipart body may be ``max_json_bytes`` more.
    - ``max_json_bytes``: any other request body (the JSON of ``/v1/images/generations``).
    - ``max_image_pixels``: width x height of an upload, read from its header before decoding.
    - ``max_queue``: requests waiting for the worker; one more gets 429 with ``Retry-After``.
    - ``request_timeout_s``: from queued to answered; not started by then -> 429, started -> 504.
    - ``read_timeout_s``: from the request's headers to the end of its body; later -> 408. Also from a connection's
      opening (or its last response) to a whole request head; later, the connection is closed
      (:func:`~dalle2.serving.server.request_head_deadline`, set by :func:`~dalle2.serving.make_server`).
    - ``shutdown_timeout_s``: how long running work may take to finish once shutdown begins.
    - ``max_decodes``: uploads decoded at the same time (each may take ~4 bytes x ``max_image_pixels`` briefly).
    - ``max_connections``: open HTTP connections (uvicorn's ``limit_concurrency``, set by
      :func:`~dalle2.serving.make_server`): a request that finds this many open (idle keep-alive ones included) is
      answered 503 at once and its connection closed; it bounds the sockets and the requests in flight.
    """

    max_upload_bytes: int = 4 * 1024 * 1024
    max_json_bytes: int = 64 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_queue: int = 64
    request_timeout_s: float = 300.0
    read_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0
    max_decodes: int = 2
    max_connections: int = 256

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServeLimits.{f.name} must be a positive number, got {value!r}")
            if f.type in (int, "int") and int(value) != value:
                raise ValueError(f"ServeLimits.{f.name} must be an integer, got {value!r}")

    def body_limit(self, path: str) -> int:
        """The most body bytes a request to ``path`` may send."""
        if path.rstrip("/").endswith("/images/variations"):
            return int(self.max_upload_bytes) + int(self.max_json_bytes)  # the file, plus form fields and boundaries
        return int(self.max_json_bytes)


class BodyRefused(Exception):
    """Raised inside the app by ``receive()`` once a body is over its limit (413) or late (408)."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


def too_large(limit: int, what: str = "request body") -> APIError:
    return APIError(413, f"the {what} is larger than {limit} bytes", code="request_too_large")


def too_slow(timeout: float) -> APIError:
    return APIError(
        408, f"the request body did not arrive within {timeout:g} s (read_timeout_s)", code="request_timeout"
    )


async def send_error(send, error: APIError) -> None:
    """Answer with OpenAI's error body and close the connection (the rest of the body is never read)."""
    body = json.dumps(error.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def declared_length(scope: dict[str, Any]) -> int | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


class BodyLimit:
    """Pure ASGI middleware: each HTTP request's body may hold ``limit_for(path)`` bytes and must arrive within
    ``read_timeout_s``.  Past either, ``receive()`` raises :class:`BodyRefused` into the app, whatever the app
    answers is replaced by 413 / 408 (``Connection: close``), and nothing more is read.  Any answer that goes out
    before the body was read (401, 429...) closes the connection too."""

    def __init__(self, app, *, limit_for: Callable[[str], int], read_timeout_s: float):
        self.app, self.limit_for, self.read_timeout_s = app, limit_for, float(read_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            return await send_error(send, too_large(limit))
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope.get("headers", ()))
        deadline = time.monotonic() + self.read_timeout_s
        read, refused, started = 0, None, False
        done = not (chunked or declared)  # no body to read

        async def limited_receive():
            nonlocal read, done, refused
            if done:  # the body is in: what follows is the wait for a disconnect, not limited
                return await receive()
            if refused is not None:
                raise BodyRefused(refused)
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                refused = too_slow(self.read_timeout_s)
                raise BodyRefused(refused) from None
            if msg["type"] == "http.request":
                read += len(msg.get("body", b""))
                if read > limit:
                    refused = too_large(limit)
                    raise BodyRefused(refused)
                done = not msg.get("more_body", False)
            else:
                done = True  # http.disconnect
            return msg

        async def guarded_send(msg):
            nonlocal started
            if refused is not None:
                return  # the app's own answer to a refused body: ours goes out instead
            if msg["type"] == "http.response.start":
                started = True
                if not done:  # answered before the body was read (401, 429...): close rather than read the rest
                    msg = {**msg, "headers": [*msg.get("headers", ()), (b"connection", b"close")]}
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyRefused:
            if started:
                raise
        if refused is not None and not started:
            await send_error(send, refused)
