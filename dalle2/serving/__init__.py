"""Serve a cascade: ``dalle2.generate()`` in Python and an OpenAI Images-compatible HTTP API.

    from dalle2 import generate
    images = generate("a red circle", n=4, size="64x64", seed=0, pipeline=pipe)    # list of PIL.Image

    app = create_app(pipe, api_key="sk-local", max_batch_size=8, max_wait_ms=25,
                     limits=ServeLimits(max_queue=64, max_image_pixels=4096 * 4096))
    run_server(app, host="127.0.0.1", port=8000)    # uvicorn; SIGTERM drains the worker first
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

**Abuse.**  Every limit (:class:`ServeLimits`) is checked before the work it guards: the queue bound before a body
is read (429 + ``Retry-After``), body sizes while they are read (413) and their arrival time (408), an image's
format and pixel count from its header before decoding (400), a waiting request's time (429 / 504), open
connections (``max_connections``: 503); a client that hangs up, or a request that times out, has its work taken back
(waiting: never started; running: its pipeline call stops at the next network call once no live request shares it,
and the batch's remaining calls are skipped); ``/health`` turns 503 when the last batches all failed; a public bind
needs an ``api_key`` (:func:`check_bind`).  ``response_format=url`` files live in memory, bounded in bytes and count
(the oldest go first), behind unguessable names that expire (``url_ttl_s``): the name is the capability, no key is
asked for a file (as OpenAI's URLs).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (size,
prompt, n, image, JSON), 401 for a missing or wrong ``Authorization: Bearer`` key when ``api_key`` is set, 404 for
an unknown model / route / expired file, 408 / 413 for a slow / large body, 429 when the queue is full, 500 when
sampling fails, 503 while shutting down, 504 when sampling outlives ``request_timeout_s``.  FastAPI and uvicorn are
imported by :func:`create_app` / :func:`make_server` only.

Modules: ``validation`` (request fields, :class:`APIError`), ``images`` (upload -> tensor, checked), ``batcher``
(the worker and its bounded queue), ``limits`` (:class:`ServeLimits`, the body-limit middleware), ``api``
(``generate``, ``create_app``), ``server`` (bind check, draining uvicorn server).
"""

from dalle2.serving.api import ImageStore, create_app, generate
from dalle2.serving.batcher import Abandoned, Batcher, Job, QueueFull, ShuttingDown
from dalle2.serving.images import clip_side, load_image, open_checked, png_bytes, to_pil
from dalle2.serving.limits import BodyLimit, ServeLimits
from dalle2.serving.server import check_bind, is_loopback, make_server, normalize_api_key, run_server
from dalle2.serving.validation import MAX_SEED, APIError, check_int, check_prompt, check_response_format, parse_size

__all__ = [
    "APIError",
    "Abandoned",
    "Batcher",
    "BodyLimit",
    "ImageStore",
    "Job",
    "MAX_SEED",
    "QueueFull",
    "ServeLimits",
    "ShuttingDown",
    "check_bind",
    "check_int",
    "check_prompt",
    "check_response_format",
    "clip_side",
    "create_app",
    "generate",
    "is_loopback",
    "load_image",
    "make_server",
    "normalize_api_key",
    "open_checked",
    "parse_size",
    "png_bytes",
    "run_server",
    "to_pil",
]
