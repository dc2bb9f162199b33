"""Serve a cascade: ``dalle2.generate()`` in Python and an OpenAI Images-compatible HTTP API.

    from dalle2 import generate
    images = generate("a red circle", n=4, size="64x64", seed=0, pipeline=pipe)    # list of PIL.Image

    app = create_app(pipe, api_key="sk-local", max_batch_size=8, max_wait_ms=25)   # FastAPI; run with uvicorn
    # POST /v1/images/generations   {"prompt", "n", "size": "WxH", "response_format": "url"|"b64_json", "seed"}
    # POST /v1/images/variations    multipart: image=@file.png, n, size, response_format, seed
    # GET  /v1/models, GET /health, GET /v1/images/files/{id}.png (response_format=url)

**Determinism.**  Image ``k`` of a request with seed ``s`` is ``pipe([prompt], seed=s, indices=[k])`` (variations:
``pipe.variations(image, seed=s, indices=[k])``), whatever else shares its batch; a request without ``seed`` draws
a random one and returns it in the response (``"seed"``), so any image can be made again.

**Batching.**  Requests go to one worker thread that owns the pipeline (loaded once).  It takes the first waiting
request, then keeps collecting requests of the same kind and size for up to ``max_wait_ms`` or until
``max_batch_size`` images, runs them as one pipeline call (a request bigger than ``max_batch_size`` is cut into
several calls), and hands each request its own slice.  The event loop only parses, validates and encodes.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (size,
prompt, n, image, JSON), 401 for a missing or wrong ``Authorization: Bearer`` key when ``api_key`` is set, 404 for
an unknown model / route / expired file, 500 when sampling fails.  FastAPI is imported by :func:`create_app` only.
"""

# no `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotations, imported
# inside create_app, at definition time
import base64
import hmac
import io
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["APIError", "Batcher", "create_app", "generate", "parse_size", "to_pil", "png_bytes", "load_image"]

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
MAX_SEED = 2**63 - 1


class APIError(ValueError):
    """A request error with OpenAI's error body; a ``ValueError`` for Python callers of :func:`generate`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = int(status), message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------------- validation


def parse_size(size: str | int | None, sizes: Sequence[int]) -> int:
    """``"WxH"`` (square), an int side, or None / ``"auto"`` (the largest) -> a side in ``sizes``; else APIError 400."""
    sizes = [int(s) for s in sizes]
    choices = ", ".join(f"'{s}x{s}'" for s in sizes)
    if size is None or (isinstance(size, str) and size.strip().lower() == "auto"):
        return max(sizes)
    if isinstance(size, bool):
        side = None
    elif isinstance(size, int):
        side = size
    elif isinstance(size, str) and (m := _SIZE_RE.match(size)):
        w, h = int(m.group(1)), int(m.group(2))
        if w != h:
            raise APIError(400, f"size {size!r} is not square; this model makes {choices}", param="size",
                           code="invalid_size")  # fmt: skip
        side = w
    else:
        side = None
    if side is None:
        raise APIError(400, f"size must be 'WxH' (one of {choices}), got {size!r}", param="size", code="invalid_size")
    if side not in sizes:
        raise APIError(400, f"size {side}x{side} is not supported by this cascade; expected one of {choices}",
                       param="size", code="invalid_size")  # fmt: skip
    return side


def check_prompt(prompt: Any, *, max_chars: int = 1000) -> str:
    if not isinstance(prompt, str):
        raise APIError(400, f"prompt must be a string, got {type(prompt).__name__}", param="prompt",
                       code="invalid_prompt" if prompt is not None else "missing_required_parameter")  # fmt: skip
    if not prompt.strip():
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_prompt")
    if len(prompt) > max_chars:
        raise APIError(400, f"prompt is {len(prompt)} characters long; the maximum is {max_chars}", param="prompt",
                       code="invalid_prompt")  # fmt: skip
    return prompt


def check_int(value: Any, *, name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    """An int (JSON number or form string) in ``[lo, hi]``; None -> ``default``."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise APIError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_value") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_value")
    if not lo <= value <= hi:
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name, code="invalid_value")
    return value


def check_response_format(value: Any) -> Literal["url", "b64_json"]:
    if value is None or value == "":
        return "url"
    if value not in ("url", "b64_json"):
        raise APIError(400, f"response_format must be 'url' or 'b64_json', got {value!r}", param="response_format",
                       code="invalid_value")  # fmt: skip
    return value


# --------------------------------------------------------------------------------------------------- images


def to_pil(images: Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] -> B RGB PIL images (rounded to 8 bits)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_image(data: bytes, side: int) -> Tensor:
    """Uploaded bytes (any format PIL reads) -> ``(3, side, side)`` in [0, 1]: RGB (alpha over white), centre crop
    to a square, bicubic resize.  Not an image -> APIError 400."""
    if not data:
        raise APIError(400, "image is empty", param="image", code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"image could not be decoded ({type(e).__name__}); send a PNG, JPEG or WebP file",
                       param="image", code="invalid_image") from None  # fmt: skip
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != side:
        img = img.resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def clip_side(pipeline) -> int:
    """The CLIP image tower's input side (uploads are resized to it, so requests of any size batch together)."""
    try:
        return int(pipeline.clip.model.image_size)
    except AttributeError:
        return int(pipeline.sizes[0])


def random_seed() -> int:
    return secrets.randbits(31)


# --------------------------------------------------------------------------------------------------- python API


def generate(prompt: str, *, n: int = 1, size: str | int | None = None, seed: int | None = None, pipeline,
             settings=None) -> list[Image.Image]:  # fmt: skip
    """``n`` images of ``prompt`` as PIL images, exactly what the server returns for the same request.

    ``size``: ``"WxH"`` (square) or an int side, one of ``pipeline.sizes`` (None: the largest); ``seed``: image
    ``k`` uses ``(seed, k)`` (None: a random seed); ``settings``: a ``SamplingSettings`` (None: its defaults).
    """
    prompt = check_prompt(prompt, max_chars=10**9)
    n = check_int(n, name="n", lo=1, hi=10**6)
    side = parse_size(size, pipeline.sizes)
    seed = random_seed() if seed is None else check_int(seed, name="seed", lo=0, hi=MAX_SEED)
    return to_pil(pipeline([prompt] * n, seed=seed, indices=list(range(n)), size=side, settings=settings))


# --------------------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One request: ``n`` images of one prompt (``kind="generation"``) or one image (``"variation"``)."""

    kind: Literal["generation", "variation"]
    size: int
    seed: int
    n: int
    prompt: str | None = None
    image: Tensor | None = None  # (3, s, s) in [0, 1]
    future: Future = field(default_factory=Future)

    def key(self) -> tuple[str, int]:
        return self.kind, self.size


class Batcher:
    """A single worker thread owning the pipeline; :meth:`submit` returns a ``Future`` of ``(n, 3, S, S)`` images.

    Jobs of the same (kind, size) that arrive within ``max_wait_ms`` of the first waiting one share a pipeline call
    of up to ``max_batch_size`` images.  ``stats()``: batches run, requests, images, requests per batch."""

    def __init__(self, pipeline, *, settings=None, max_batch_size: int = 8, max_wait_ms: float = 25.0):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.pipeline, self.settings = pipeline, settings
        self.max_batch_size, self.max_wait = int(max_batch_size), float(max_wait_ms) / 1000.0
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"batches": 0, "pipeline_calls": 0, "requests": 0, "images": 0,
                                       "max_batch_requests": 0, "errors": 0}  # fmt: skip
        self._per_batch: Counter[int] = Counter()

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> "Batcher":
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="dalle2-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            left, self._waiting = self._waiting, []
        for job in left:
            job.future.set_exception(RuntimeError("server is shutting down"))

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stop:
                raise RuntimeError("the batcher is stopped")
            self._waiting.append(job)
            self._cond.notify_all()
        return job.future

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._stats)
            out["requests_per_batch"] = {str(k): v for k, v in sorted(self._per_batch.items())}
        with self._cond:
            out["queued"] = len(self._waiting)
        return out

    # -- worker ---------------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        """Blocks for the first job, then gathers compatible ones until the deadline or the batch is full."""
        with self._cond:
            while not self._waiting and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            first = self._waiting[0]
            deadline = time.monotonic() + self.max_wait
            while True:
                same = [j for j in self._waiting if j.key() == first.key()]
                batch, total = [], 0
                for j in same:
                    if batch and total + j.n > self.max_batch_size:
                        break
                    batch.append(j)
                    total += j.n
                left = deadline - time.monotonic()
                if total >= self.max_batch_size or len(batch) < len(same) or left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            taken = {id(j) for j in batch}
            self._waiting = [j for j in self._waiting if id(j) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outs = self.run(live)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
                with self._lock:
                    self._stats["errors"] += 1
                for j in live:
                    j.future.set_exception(e)
                continue
            for j, out in zip(live, outs):
                j.future.set_result(out)

    def run(self, jobs: list[Job]) -> list[Tensor]:
        """Runs jobs of one (kind, size) as pipeline calls of at most ``max_batch_size`` images; one tensor per job."""
        kind, size = jobs[0].key()
        seeds = [j.seed for j in jobs for _ in range(j.n)]
        indices = [k for j in jobs for k in range(j.n)]
        if kind == "generation":
            inputs: list[Any] = [j.prompt for j in jobs for _ in range(j.n)]
        else:
            inputs = [j.image for j in jobs for _ in range(j.n)]
        chunks, bs = [], self.max_batch_size
        for a in range(0, len(seeds), bs):
            kw = dict(seed=seeds[a : a + bs], indices=indices[a : a + bs], size=size, settings=self.settings)
            if kind == "generation":
                chunks.append(self.pipeline(inputs[a : a + bs], **kw).detach().cpu())
            else:
                chunks.append(self.pipeline.variations(torch.stack(inputs[a : a + bs]), **kw).detach().cpu())
        images = torch.cat(chunks)
        with self._lock:
            s = self._stats
            s["batches"] += 1
            s["pipeline_calls"] += len(chunks)
            s["requests"] += len(jobs)
            s["images"] += len(seeds)
            s["max_batch_requests"] = max(s["max_batch_requests"], len(jobs))
            self._per_batch[len(jobs)] += 1
        return list(images.split([j.n for j in jobs]))


# --------------------------------------------------------------------------------------------------- url store


class ImageStore:
    """In-memory PNGs behind unguessable ids, for ``response_format=url``; oldest dropped past ``max_items`` or
    ``ttl_s`` seconds (OpenAI's URLs also expire)."""

    def __init__(self, *, max_items: int = 512, ttl_s: float = 3600.0):
        self.max_items, self.ttl_s = int(max_items), float(ttl_s)
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        key = secrets.token_urlsafe(18)
        with self._lock:
            self._items[key] = (time.monotonic() + self.ttl_s, data)
            self._evict()
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._evict()
            item = self._items.get(key)
        return None if item is None else item[1]

    def _evict(self) -> None:
        now = time.monotonic()
        while self._items and (len(self._items) > self.max_items or next(iter(self._items.values()))[0] < now):
            self._items.popitem(last=False)


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
    max_upload_bytes: int = 4 * 1024 * 1024,
    public_url: str | None = None,
    url_ttl_s: float = 3600.0,
    url_store_max: int = 512,
):
    """The FastAPI app over a loaded pipeline (see the module docstring).  ``api_key``: required as
    ``Authorization: Bearer <key>`` on ``/v1/images/*`` and ``/v1/models`` (None: no check).  ``model_name``
    (and ``model_aliases``) are the accepted ``model`` values; ``public_url``: base of the returned URLs (None:
    the request's own).  The batch worker starts and stops with the app's lifespan."""
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = Batcher(pipeline, settings=settings, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    store = ImageStore(max_items=url_store_max, ttl_s=url_ttl_s)
    sizes = [int(s) for s in pipeline.sizes]
    side_in = clip_side(pipeline)
    accepted_models = {model_name, *model_aliases}
    has_prior = getattr(pipeline, "prior", True) is not None
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="dalle2 images API", version="1", lifespan=lifespan)
    app.state.batcher, app.state.store, app.state.pipeline = batcher, store, pipeline

    def error(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc)

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
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="missing_api_key")  # fmt: skip
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(model: Any) -> None:
        if model is None or model == "":
            return
        if model not in accepted_models:
            raise APIError(404, f"The model {model!r} does not exist; this server has {sorted(accepted_models)}",
                           param="model", code="model_not_found")  # fmt: skip

    async def respond(request: Request, job: Job, response_format: str) -> dict[str, Any]:
        try:
            images = await asyncio.wrap_future(job.future)
        except Exception as e:  # noqa: BLE001
            raise APIError(500, f"sampling failed: {type(e).__name__}: {e}", type="server_error") from e
        pngs = await run_in_threadpool(lambda: [png_bytes(im) for im in to_pil(images)])
        if response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs]
        else:
            base = (public_url or str(request.base_url)).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{store.put(p)}.png"} for p in pngs]
        return {"created": int(time.time()), "data": data, "seed": job.seed}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        authorize(request)
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise APIError(400, "the request body must be JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        check_model(body.get("model"))
        if not has_prior:
            raise APIError(400, "this server was started without a prior checkpoint: only /v1/images/variations "
                           "works", code="unsupported")  # fmt: skip
        prompt = check_prompt(body.get("prompt"), max_chars=max_prompt_chars)
        n = check_int(body.get("n"), name="n", lo=1, hi=max_n, default=1)
        side = parse_size(body.get("size"), sizes)
        fmt = check_response_format(body.get("response_format"))
        seed = check_int(body.get("seed"), name="seed", lo=0, hi=MAX_SEED)
        job = Job(kind="generation", size=side, seed=random_seed() if seed is None else seed, n=n, prompt=prompt)
        batcher.submit(job)
        return await respond(request, job, fmt)

    @app.post("/v1/images/variations")
    async def variations(request: Request):
        authorize(request)
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001
            raise APIError(400, f"the request body must be multipart/form-data with an image file ({e})",
                           param="image", code="invalid_image") from None  # fmt: skip
        check_model(form.get("model"))
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "an image file is required (multipart field 'image')", param="image",
                           code="missing_required_parameter")  # fmt: skip
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise APIError(400, f"image is larger than {max_upload_bytes} bytes", param="image", code="invalid_image")
        n = check_int(form.get("n"), name="n", lo=1, hi=max_n, default=1)
        side = parse_size(form.get("size") or None, sizes)
        fmt = check_response_format(form.get("response_format"))
        seed = check_int(form.get("seed"), name="seed", lo=0, hi=MAX_SEED)
        image = await run_in_threadpool(load_image, data, side_in)
        job = Job(kind="variation", size=side, seed=random_seed() if seed is None else seed, n=n, image=image)
        batcher.submit(job)
        return await respond(request, job, fmt)

    @app.get("/v1/images/files/{name}")
    async def files(name: str):
        key = name[:-4] if name.endswith(".png") else name
        data = store.get(key)
        if data is None:
            raise APIError(404, "no such image (URLs expire)", code="not_found")
        return Response(content=data, media_type="image/png")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "dalle2"}]}  # fmt: skip

    @app.get("/v1/models/{model}")
    async def model(model: str, request: Request):
        authorize(request)
        check_model(model)
        return {"id": model_name, "object": "model", "created": started, "owned_by": "dalle2"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "sizes": [f"{s}x{s}" for s in sizes], "max_n": max_n,
                "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, **batcher.stats()}  # fmt: skip

    return app
