"""``generate()`` (Python) and :func:`create_app` (the OpenAI Images-compatible FastAPI app) over a loaded pipeline.

A request's path through the app, each limit checked before the work it guards (see ``limits.ServeLimits``):
auth -> queue room (429 / 503 before the body is read) -> body, capped while read (413 / 408, ``BodyLimit``) ->
fields -> image header (400 for a bomb or another format) -> decode (at most ``max_decodes`` at once) -> queue
(429 if full) -> wait for the worker, for at most ``request_timeout_s``, while watching for the client to hang up
(then the work is taken back before it starts) -> PNG encoding."""

# no `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotations, imported
# inside create_app, at definition time
import asyncio
import base64
import dataclasses
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from PIL import Image

from dalle2.serving.batcher import Batcher, Job, QueueFull, ShuttingDown
from dalle2.serving.images import clip_side, load_image, png_bytes, to_pil
from dalle2.serving.limits import BodyLimit, BodyRefused, ServeLimits, too_large
from dalle2.serving.server import normalize_api_key
from dalle2.serving.validation import (
    MAX_SEED,
    APIError,
    check_int,
    check_prompt,
    check_response_format,
    parse_size,
    random_seed,
)

# --------------------------------------------------------------------------------------------------- python API


def generate(
    prompt: str, *, n: int = 1, size: str | int | None = None, seed: int | None = None, pipeline, settings=None
) -> list[Image.Image]:
    """``n`` images of ``prompt`` as PIL images, exactly what the server returns for the same request.

    ``size``: ``"WxH"`` (square) or an int side, one of ``pipeline.sizes`` (None: the largest); ``seed``: image
    ``k`` uses ``(seed, k)`` (None: a random seed); ``settings``: a ``SamplingSettings`` (None: its defaults).
    """
    prompt = check_prompt(prompt, max_chars=10**9)
    n = check_int(n, name="n", lo=1, hi=10**6)
    side = parse_size(size, pipeline.sizes)
    seed = random_seed() if seed is None else check_int(seed, name="seed", lo=0, hi=MAX_SEED)
    return to_pil(pipeline([prompt] * n, seed=seed, indices=list(range(n)), size=side, settings=settings))


# --------------------------------------------------------------------------------------------------- url store


DEFAULT_URL_STORE_BYTES = 256 * 2**20  # ~100 images of 1024 px (a 1024 px PNG is ~1.5-3 MB)
# a file URL is a capability (no key is asked for it, like OpenAI's): keep it out of shared caches and Referer headers
FILE_HEADERS = {
    "Cache-Control": "private, no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class ImageStore:
    """In-memory PNGs behind unguessable names, for ``response_format=url``.  Bounded in bytes (``max_bytes``) and in
    count (``max_items``): past either, the oldest go first; each expires ``ttl_s`` seconds after it was stored.

    A name is 144 random bits (``secrets.token_urlsafe(18)``) and is the only thing that gives the file: at a
    billion guesses a second for an hour against a full store the odds of a hit are ~1e-28."""

    def __init__(self, *, max_items: int = 512, max_bytes: int = DEFAULT_URL_STORE_BYTES, ttl_s: float = 3600.0):
        self.max_items, self.max_bytes, self.ttl_s = int(max_items), int(max_bytes), float(ttl_s)
        for name in ("max_items", "max_bytes", "ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImageStore.{name} must be positive, got {getattr(self, name)!r}")
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def put_many(self, items: Sequence[bytes]) -> list[str]:
        """Store one response's images together: their names.  ValueError (nothing stored, nothing evicted) if they
        alone exceed ``max_bytes`` or ``max_items``."""
        total = sum(len(d) for d in items)
        if total > self.max_bytes or len(items) > self.max_items:
            raise ValueError(
                f"{len(items)} images of {total} bytes do not fit in the url store (max_bytes={self.max_bytes}, "
                f"max_items={self.max_items})"
            )
        keys = [secrets.token_urlsafe(18) for _ in items]
        with self._lock:
            expires = time.monotonic() + self.ttl_s
            for key, data in zip(keys, items):
                self._items[key] = (expires, data)
                self._bytes += len(data)
            self._evict()
        return keys

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._evict()
            item = self._items.get(key)
        return None if item is None else item[1]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:  # under self._lock; insertion order is expiry order (one ttl for all)
        now = time.monotonic()
        while self._items and (
            len(self._items) > self.max_items
            or self._bytes > self.max_bytes
            or next(iter(self._items.values()))[0] < now
        ):
            _, (_, data) = self._items.popitem(last=False)
            self._bytes -= len(data)


class ClientGone(Exception):
    """The client hung up while its request waited."""


async def wait_disconnect(receive) -> bool:
    """Returns True once the client has hung up (``http.disconnect``); call after the body has been read."""
    try:
        while True:
            if (await receive())["type"] == "http.disconnect":
                return True
    except Exception:  # noqa: BLE001 - no way to tell: assume the client is still there
        return False


async def wait_for_job(batcher: Batcher, job: Job, receive, timeout_s: float):
    """The job's images; meanwhile, a client that hangs up (:class:`ClientGone`) or a timeout takes the job back
    from the queue if it has not started (429 ``queue_timeout``), or its work stops if it was running (504
    ``timeout``; :meth:`Batcher.cancel`)."""
    fut = asyncio.wrap_future(job.future)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may read it: no "never retrieved" log
    gone = asyncio.ensure_future(wait_disconnect(receive))
    waiting, deadline = {fut, gone}, time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            if gone in done:
                if gone.result():
                    batcher.cancel(job, "dropped")
                    raise ClientGone()
                waiting = {fut}
    finally:
        gone.cancel()
    if batcher.cancel(job, "timed_out"):
        ra = batcher.retry_after()
        raise APIError(
            429,
            f"the request waited {timeout_s:g} s (request_timeout_s) without starting: the server is "
            f"busy; retry after {ra} s",
            type="rate_limit_error",
            code="queue_timeout",
            headers={"Retry-After": str(ra)},
        )
    raise APIError(
        504, f"sampling did not finish within {timeout_s:g} s (request_timeout_s)", type="server_error", code="timeout"
    )


# --------------------------------------------------------------------------------------------------- the app


def create_app(
    pipeline,
    *,
    api_key: str | None = None,
    model_name: str = "dalle2",
    model_aliases: Sequence[str] = ("dall-e-2",),
    settings=None,
    max_n: int = 10,
    max_batch_size: int = 8,
    max_wait_ms: float = 25.0,
    max_prompt_chars: int = 1000,
    public_url: str | None = None,
    url_ttl_s: float = 3600.0,
    url_store_max: int = 512,
    url_store_max_bytes: int = DEFAULT_URL_STORE_BYTES,
    limits: ServeLimits | None = None,
):
    """The FastAPI app over a loaded pipeline (see the package docstring).  ``api_key``: required as
    ``Authorization: Bearer <key>`` on ``/v1/images/generations|variations`` and ``/v1/models`` (None or empty: no
    check); the files of ``response_format=url`` need no key: their unguessable names, which expire after
    ``url_ttl_s``, are the capability (as OpenAI's URLs), and the store holds at most ``url_store_max`` images and
    ``url_store_max_bytes`` bytes (the oldest go first).  ``model_name``
    (and ``model_aliases``) are the accepted ``model`` values; ``public_url``: base of the returned URLs (None:
    the request's own); ``limits``: :class:`ServeLimits` (None: its defaults).  The batch worker starts and stops
    with the app's lifespan; serve it with :func:`~dalle2.serving.run_server` so that a shutdown drains it first."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    api_key = normalize_api_key(api_key)
    batcher = Batcher(
        pipeline, settings=settings, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=limits.max_queue
    )
    store = ImageStore(max_items=url_store_max, max_bytes=url_store_max_bytes, ttl_s=url_ttl_s)
    sizes = [int(s) for s in pipeline.sizes]
    side_in = clip_side(pipeline)
    accepted_models = {model_name, *model_aliases}
    has_prior = getattr(pipeline, "prior", True) is not None
    started = int(time.time())
    decode_slots = asyncio.Semaphore(limits.max_decodes)

    @asynccontextmanager
    async def lifespan(app):
        nonlocal decode_slots
        decode_slots = asyncio.Semaphore(limits.max_decodes)  # bound to this event loop
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop, limits.shutdown_timeout_s)

    app = FastAPI(title="dalle2 images API", version="1", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit_for=limits.body_limit, read_timeout_s=limits.read_timeout_s)
    app.state.batcher, app.state.store, app.state.pipeline, app.state.limits = batcher, store, pipeline, limits

    def error(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
        return JSONResponse(e.body(), status_code=e.status, headers={**headers, **e.headers})

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        return error(
            APIError(
                429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            )
        )

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request, exc: ShuttingDown):
        return error(
            APIError(
                503, str(exc), type="server_error", code="shutting_down", headers={"Retry-After": str(exc.retry_after)}
            )
        )

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc: ClientGone):  # nobody reads it; nginx's "client closed request"
        return error(APIError(499, "the client closed the connection", code="client_closed"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        loc = errs[0].get("loc", ()) if errs else ()
        param = str(loc[-1]) if loc else None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in errs)
        return error(APIError(400, msg or "invalid request", param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return error(APIError(exc.status_code, str(exc.detail), code=kind))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(model: Any) -> None:
        if model is None or model == "":
            return
        if model not in accepted_models:
            raise APIError(
                404,
                f"The model {model!r} does not exist; this server has {sorted(accepted_models)}",
                param="model",
                code="model_not_found",
            )

    async def respond(request: Request, job: Job, response_format: str) -> dict[str, Any]:
        batcher.submit(job)
        try:
            images = await wait_for_job(batcher, job, request.receive, limits.request_timeout_s)
        except (APIError, ClientGone, ShuttingDown):
            raise
        except Exception as e:  # noqa: BLE001
            raise APIError(500, f"sampling failed: {type(e).__name__}: {e}", type="server_error") from e
        pngs = await run_in_threadpool(lambda: [png_bytes(im) for im in to_pil(images)])
        if response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs]
        else:
            base = (public_url or str(request.base_url)).rstrip("/")
            try:
                keys = store.put_many(pngs)
            except ValueError as e:
                raise APIError(
                    500,
                    f"{e}: ask for response_format=b64_json (or raise url_store_max_bytes)",
                    type="server_error",
                    code="url_store_too_small",
                ) from None
            data = [{"url": f"{base}/v1/images/files/{key}.png"} for key in keys]
        return {"created": int(time.time()), "data": data, "seed": job.seed}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        authorize(request)
        batcher.admit()  # a full queue answers before the body is read
        raw = await request.body()  # capped while read (BodyLimit)
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "the request body must be JSON", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        check_model(body.get("model"))
        if not has_prior:
            raise APIError(
                400,
                "this server was started without a prior checkpoint: only /v1/images/variations works",
                code="unsupported",
            )
        prompt = check_prompt(body.get("prompt"), max_chars=max_prompt_chars)
        n = check_int(body.get("n"), name="n", lo=1, hi=max_n, default=1)
        side = parse_size(body.get("size"), sizes)
        fmt = check_response_format(body.get("response_format"))
        seed = check_int(body.get("seed"), name="seed", lo=0, hi=MAX_SEED)
        job = Job(kind="generation", size=side, seed=random_seed() if seed is None else seed, n=n, prompt=prompt)
        return await respond(request, job, fmt)

    @app.post("/v1/images/variations")
    async def variations(request: Request):
        authorize(request)
        batcher.admit()
        try:
            form = await request.form(max_files=1, max_fields=16)  # capped while read (BodyLimit)
        except BodyRefused:
            raise
        except Exception as e:  # noqa: BLE001
            detail = getattr(e, "detail", None) or e
            raise APIError(
                400,
                f"the request body must be multipart/form-data with an image file ({detail})",
                param="image",
                code="invalid_image",
            ) from None
        try:
            check_model(form.get("model"))
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise APIError(
                    400,
                    "an image file is required (multipart field 'image')",
                    param="image",
                    code="missing_required_parameter",
                )
            n = check_int(form.get("n"), name="n", lo=1, hi=max_n, default=1)
            side = parse_size(form.get("size") or None, sizes)
            fmt = check_response_format(form.get("response_format"))
            seed = check_int(form.get("seed"), name="seed", lo=0, hi=MAX_SEED)
            async with decode_slots:  # the bytes enter memory, and are decoded, a few uploads at a time
                data = await upload.read(limits.max_upload_bytes + 1)
                if len(data) > limits.max_upload_bytes:
                    raise too_large(limits.max_upload_bytes, "image file")
                image = await run_in_threadpool(load_image, data, side_in, max_pixels=limits.max_image_pixels)
                del data
        finally:
            await form.close()
        job = Job(kind="variation", size=side, seed=random_seed() if seed is None else seed, n=n, image=image)
        return await respond(request, job, fmt)

    @app.get("/v1/images/files/{name}")
    async def files(name: str):
        key = name[:-4] if name.endswith(".png") else name
        data = store.get(key)
        if data is None:
            raise APIError(404, "no such image (URLs expire)", code="not_found")
        return Response(content=data, media_type="image/png", headers=FILE_HEADERS)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "dalle2"}],
        }

    @app.get("/v1/models/{model}")
    async def model(model: str, request: Request):
        authorize(request)
        check_model(model)
        return {"id": model_name, "object": "model", "created": started, "owned_by": "dalle2"}

    @app.get("/health")
    async def health():
        """200 while the server works; 503 when the last batches all failed (``unhealthy``) or it is shutting down
        (``draining``).  Queue depth, recent failures, counters, limits."""
        stats = batcher.stats()
        body = {
            "status": stats.pop("status"),
            "model": model_name,
            "sizes": [f"{s}x{s}" for s in sizes],
            "max_n": max_n,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            **stats,
            "limits": dataclasses.asdict(limits),
        }
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    return app
