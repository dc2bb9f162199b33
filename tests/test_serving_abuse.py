"""The server holds under abuse (issue 18), uploads and bodies: decompression bombs and other image formats
(refused from the header, little memory), bodies too large (413 while read, whatever Content-Length says) or too
slow (408).

Body limits are tested at the ASGI level (a receive() that counts what the app pulled, with a lying Content-Length
or none) and over real HTTP on 127.0.0.1 (a raw socket streaming a chunked body); memory is the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs).  Overload, shutdown and auth: tests/test_serving_overload.py."""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import json
import select
import socket
import time

import pytest
from PIL import Image

from dalle2.serving import APIError, create_app, load_image
from helpers.scripts import load_script
from helpers.serving import FakePipeline, ServerThread, assert_error_shape, raw_request, timed

pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

MB = 1 << 20


# --------------------------------------------------------------------------------------------------- helpers


# A valid all-black 8-bit grayscale PNG of side x side pixels, written row by row: 13000 px -> 164 KB that decode to
# 169 MB (and to 0.5-2 GB once converted to RGB(A)); the load test sends the same bombs.
png_bomb = functools.lru_cache(maxsize=None)(load_script("bench", "serve_load").png_bomb)


@functools.cache
def encoded(fmt: str, size: tuple[int, int], mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, format=fmt)
    return buf.getvalue()


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def peak_rss_delta(fn):
    """``fn()`` and how far the process's peak RSS rose above its RSS before the call (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("peak RSS needs Linux /proc/self/clear_refs")
    before = _vm("VmRSS")
    out = fn()
    return out, _vm("VmHWM") - before


def raises_api_error(fn) -> APIError:
    with pytest.raises(APIError) as e:
        fn()
    return e.value


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 response (read until the body is complete or the peer closes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                if len(rest) >= int(hdrs.get("content-length", 1 << 62)):
                    return int(lines[0].split()[1]), hdrs, rest
            d = sock.recv(65536)
            if not d:
                break
            data += d
    except (TimeoutError, ConnectionResetError):
        pass
    if b"\r\n\r\n" not in data:
        return None, {}, data
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return (
        int(lines[0].split()[1]),
        {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])},
        rest,
    )


def stream_until_refused(port: int, head: bytes, chunks, *, timeout: float = 30):
    """Send ``head`` then ``chunks`` (on, even after an answer came) until the server stops reading (the connection
    breaks) -> (status, body, bytes of body sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sent = 0
    try:
        sock.sendall(head)
        for c in chunks:
            try:
                sock.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(c)
        status, _, body = read_response(sock, timeout)
        return status, body, sent
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------------- image bombs


def test_png_bomb_is_refused_from_its_header_quickly_and_with_little_memory():
    bomb = png_bomb()
    assert len(bomb) < 400_000  # far under the 4 MB upload limit
    (err, seconds), peak = peak_rss_delta(lambda: timed(lambda: raises_api_error(lambda: load_image(bomb, 16))))
    assert err.status == 400 and err.code == "image_too_large" and err.param == "image"
    assert "13000x13000" in err.message
    assert seconds < 1.0, seconds
    assert peak < 32 * MB, f"peak RSS rose {peak / MB:.0f} MB"


def test_jpeg_bomb_is_refused_from_its_header():
    bomb = encoded("JPEG", (12000, 12000), "L")  # a real 144 Mpx JPEG of 1.7 MB
    (err, seconds), peak = peak_rss_delta(lambda: timed(lambda: raises_api_error(lambda: load_image(bomb, 16))))
    assert err.status == 400 and err.code == "image_too_large"
    assert seconds < 1.0 and peak < 32 * MB, (seconds, peak / MB)


def test_large_jpeg_under_the_cap_is_decoded_with_draft():
    """A 16 Mpx photo is allowed; JPEG's DCT scaling decodes it at 1/8 (500 px) instead of 48 MB of RGB."""
    data = encoded("JPEG", (4000, 4000), "RGB", (10, 200, 30))
    x, peak = peak_rss_delta(lambda: load_image(data, 16))
    assert x.shape == (3, 16, 16)
    assert abs(float(x[1].mean()) - 200 / 255) < 0.03 and float(x[0].mean()) < 0.1  # the colour survived
    assert peak < 16 * MB, f"peak RSS rose {peak / MB:.0f} MB"


def test_pixel_cap_is_configurable():
    data = encoded("PNG", (100, 100))
    assert load_image(data, 16, max_pixels=10_000).shape == (3, 16, 16)
    err = raises_api_error(lambda: load_image(data, 16, max_pixels=9_999))
    assert err.status == 400 and err.code == "image_too_large" and "9999" in err.message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "PPM"])
def test_only_png_jpeg_and_webp_are_accepted(fmt):
    err = raises_api_error(lambda: load_image(encoded(fmt, (20, 20)), 16))
    assert err.status == 400 and err.code == "invalid_image_format" and "PNG, JPEG or WebP" in err.message
    for ok in ("PNG", "JPEG", "WEBP"):
        assert load_image(encoded(ok, (20, 20)), 16).shape == (3, 16, 16)


def test_bomb_upload_over_http_is_400_at_once():
    fake = FakePipeline()
    with TestClient(create_app(fake, max_wait_ms=0)) as tc:
        r, seconds = timed(
            lambda: tc.post(
                "/v1/images/variations", data={"size": "4x4"}, files={"image": ("bomb.png", png_bomb(), "image/png")}
            )
        )
        assert r.status_code == 400 and seconds < 2.0, (r.status_code, seconds)
        assert_error_shape(r.json(), "image_too_large")
    assert fake.calls == []


# --------------------------------------------------------------------------------------------------- body limits


def _scope(path: str, headers: dict[str, str]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


def call_asgi(app, path: str, headers: dict[str, str], chunk: bytes, n_chunks: int, first: bytes = b""):
    """POST ``first`` + ``n_chunks`` x ``chunk`` to the ASGI app, one receive() per chunk, counting what it pulls.
    -> (status, response headers, body, bytes pulled, bytes pulled when the response started)."""
    pulled, calls, at_start, out = 0, 0, [None], []

    async def receive():
        nonlocal pulled, calls
        if calls > n_chunks:
            await asyncio.sleep(3600)  # the body has ended: a client that waits for its answer
        body = first if calls == 0 else chunk
        calls += 1
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": calls <= n_chunks}

    async def send(msg):
        if msg["type"] == "http.response.start":
            at_start[0] = pulled
        out.append(msg)

    asyncio.run(asyncio.wait_for(app(_scope(path, headers), receive, send), 60))
    start = out[0]
    body = b"".join(m.get("body", b"") for m in out[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, pulled, at_start[0]


def test_json_body_with_lying_content_length_is_413_once_the_limit_is_read():
    app = create_app(FakePipeline())
    # says 20 bytes, sends 16 MB
    headers = {"content-type": "application/json", "content-length": "20"}
    status, hdrs, body, pulled, at_start = call_asgi(
        app, "/v1/images/generations", headers, b" " * 65536, 256, b'{"prompt": "x"'
    )
    assert status == 413, (status, body[:200])
    assert_error_shape(json.loads(body), "request_too_large")
    assert at_start < 1 * MB and pulled < 2 * MB, (at_start, pulled)  # answered after reading at most the limit
    assert hdrs.get("connection") == "close"


def test_chunked_json_body_without_content_length_is_413():
    app = create_app(FakePipeline())
    status, _, body, pulled, at_start = call_asgi(
        app,
        "/v1/images/generations",
        {"content-type": "application/json", "transfer-encoding": "chunked"},
        b" " * 65536,
        256,
        b"{",
    )
    assert status == 413 and at_start < 1 * MB, (status, at_start)
    assert_error_shape(json.loads(body), "request_too_large")


def test_declared_content_length_over_the_limit_is_413_without_reading():
    app = create_app(FakePipeline())
    status, _, body, pulled, at_start = call_asgi(
        app,
        "/v1/images/generations",
        {"content-type": "application/json", "content-length": str(10**10)},
        b" " * 65536,
        256,
    )
    assert status == 413 and at_start == 0, (status, at_start)
    assert_error_shape(json.loads(body), "request_too_large")


def test_multipart_body_over_the_upload_limit_is_413_before_it_is_all_read():
    """A 64 MB upload: refused after ~4 MB (so no more than that reached memory or a spooled temporary file)."""
    app = create_app(FakePipeline())
    boundary = "XyZ"
    first = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode()
    status, _, body, pulled, at_start = call_asgi(
        app,
        "/v1/images/variations",
        {"content-type": f"multipart/form-data; boundary={boundary}", "transfer-encoding": "chunked"},
        b"\x00" * 65536,
        1024,
        first,
    )
    assert status == 413, (status, body[:300])
    assert_error_shape(json.loads(body), "request_too_large")
    assert at_start < 6 * MB and pulled < 8 * MB, (at_start, pulled)


def test_chunked_body_over_real_http_stops_the_read():
    """uvicorn on 127.0.0.1; a raw client streams a 128 MB chunked JSON body, and goes on after the answer: 413, the
    server hung up long before the end, and its memory did not grow with the body."""
    with ServerThread(create_app(FakePipeline())) as srv:
        head = (
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b" " * MB
        chunks = itertools.chain((b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(128)), [b"0\r\n\r\n"])
        (status, body, sent), peak = peak_rss_delta(lambda: stream_until_refused(srv.port, head, chunks))
    assert status == 413, (status, body[:200])
    assert_error_shape(json.loads(body), "request_too_large")
    assert sent < 32 * MB, f"the server read {sent / MB:.0f} MB"
    assert peak < 64 * MB, f"peak RSS rose {peak / MB:.0f} MB"


def test_an_answer_before_the_body_is_read_closes_the_connection():
    """401 (no key) to a 128 MB chunked upload: the server answers at once and stops reading, rather than reading
    and discarding the rest to keep the connection alive."""
    with ServerThread(create_app(FakePipeline(), api_key="sk-x")) as srv:
        head = (
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b" " * MB
        chunks = itertools.chain((b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(128)), [b"0\r\n\r\n"])
        status, body, sent = stream_until_refused(srv.port, head, chunks)
    assert status == 401 and sent < 32 * MB, (status, sent)


def test_slow_body_is_408_after_the_read_timeout():
    from dalle2.serving import ServeLimits

    fake = FakePipeline()
    with ServerThread(create_app(fake, max_wait_ms=0, limits=ServeLimits(read_timeout_s=1.0))) as srv:
        # stalls: 10 of 100 bytes, then nothing
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(raw_request("/v1/images/generations", b"x" * 100)[:-90])
        (status, hdrs, body), seconds = timed(lambda: read_response(sock, 10))
        sock.close()
        assert status == 408 and 0.8 < seconds < 5, (status, seconds)
        assert_error_shape(json.loads(body), "request_timeout")
        # trickles: one byte every 0.15 s, still arriving after the timeout
        payload = raw_request("/v1/images/generations", json.dumps({"prompt": "slow " * 4, "size": "4x4"}).encode())
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(payload[: payload.index(b"\r\n\r\n") + 4])
        status = None
        for b in payload[payload.index(b"\r\n\r\n") + 4 :]:
            if select.select([sock], [], [], 0.15)[0]:
                break
            sock.sendall(bytes([b]))
        status, _, body = read_response(sock, 10)
        sock.close()
        assert status == 408, status
        # a slow client inside the limit is served
        sock = socket.create_connection(("127.0.0.1", srv.port))
        body = {"prompt": "x", "size": "4x4", "response_format": "b64_json"}
        payload = raw_request("/v1/images/generations", json.dumps(body).encode())
        sock.sendall(payload[:-5])
        time.sleep(0.5)
        sock.sendall(payload[-5:])
        status, _, body = read_response(sock, 10)
        sock.close()
        assert status == 200 and len(json.loads(body)["data"]) == 1
    assert [c[1] for c in fake.calls] == [1]  # only the one that arrived in time ran
