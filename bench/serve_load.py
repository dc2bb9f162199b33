"""Load test of the HTTP server on loopback, abuse mixed in: is every request answered, is memory bounded, is the
server healthy afterwards?  Prints one JSON object.

    python bench/serve_load.py clients=200 duration=30 [max_queue=64 batch_ms=20 image_ms=2 --out r.json]

The server is a subprocess (this file with ``serve=1``): ``dalle2.serving.create_app`` over a fake pipeline that
sleeps ``batch_ms + image_ms`` per image and returns grey images, served by ``run_server`` (uvicorn, draining
shutdown).  The HTTP layer and its limits are what is measured, not a model.  ``clients`` asyncio clients speak raw
HTTP/1.1 (one connection per request) for ``duration`` seconds, each drawing a kind per request:

- ``generate`` (JSON, n 1-3, b64) and ``variation`` (a 16 px PNG): 200;
- ``png_bomb`` (13000 x 13000 px, 164 KB) and ``jpeg_bomb`` (12000 x 12000 px, 1.7 MB): 400 from the header;
- ``big_json`` (declares 8 MB), ``big_upload`` (a 5 MB file), ``chunked`` (1 MB chunks without end, no
  Content-Length): 413 while reading;  ``bad_json``: 400;
- ``slow_ok`` (the body over ~``read_timeout_s`` / 4): 200;  ``slow_stall`` (half a body, then nothing): 408;
- ``gone`` (sends a request and hangs up at once): no answer expected, counted apart.

Any kind may also get 429 (a full queue is checked before the body is read) and 408 (a body slower than
``read_timeout_s``, which a starved machine can make of a big upload); ``big_json`` gets 413 from its header alone.

Reported: requests, status counts (all and per kind), latency p50 / p99, requests the server did not answer
(connection error or no answer within ``client_timeout``), the server's RSS (start, peak = VmHWM, end), ``/health``
after the load, and how long SIGTERM took to stop it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULTS = {
    "clients": 200,
    "duration": 30.0,
    "max_queue": 64,
    "max_batch_size": 8,
    "max_wait_ms": 10.0,
    "batch_ms": 20.0,
    "image_ms": 2.0,
    "request_timeout_s": 20.0,
    "read_timeout_s": 3.0,
    "think_ms": 10.0,
    "client_timeout": 60.0,
    "seed": 0,
    "serve": False,
    "port": 0,
    "out": None,
}
KINDS = {
    "generate": 30,
    "variation": 10,
    "png_bomb": 8,
    "jpeg_bomb": 4,
    "big_json": 6,
    "big_upload": 4,
    "chunked": 6,
    "bad_json": 6,
    "slow_ok": 8,
    "slow_stall": 6,
    "gone": 6,
}
# what each kind may get: its own answer, 429 (the queue was full: checked before the body is read) or 408 (the body
# took longer than read_timeout_s to arrive: on a starved machine, a big upload too); anything else (a 5xx, another
# status, no answer) is a failure of the server.  big_json is refused from its Content-Length, before anything else.
EXPECTED = {
    "generate": {200},
    "variation": {200},
    "png_bomb": {400},
    "jpeg_bomb": {400},
    "big_upload": {413},
    "chunked": {413},
    "bad_json": {400},
    "slow_ok": {200},
    "slow_stall": {408},
}
EXPECTED = {k: v | {408, 429} for k, v in EXPECTED.items()} | {"big_json": {413}}
MB = 1 << 20


# --------------------------------------------------------------------------------------------------- the server


class SleepyPipeline:
    """UnCLIPPipeline's serving interface at a fixed cost: ``batch_ms + image_ms * images`` of sleep per call."""

    sizes = (8, 16)

    def __init__(self, batch_ms: float, image_ms: float):
        self.batch_s, self.image_s = batch_ms / 1000, image_ms / 1000

    def _make(self, b: int, size):
        import torch

        time.sleep(self.batch_s + self.image_s * b)
        return torch.full((b, 3, size or self.sizes[-1], size or self.sizes[-1]), 0.5)

    def __call__(self, prompts, *, seed=0, indices=None, size=None, settings=None):
        return self._make(len(prompts), size)

    def variations(self, images, *, seed=0, indices=None, size=None, settings=None):
        return self._make(images.shape[0], size)


def serve(o: dict) -> None:
    import torch

    from dalle2.serving import ServeLimits, create_app, run_server

    torch.set_num_threads(1)
    limits = ServeLimits(
        max_queue=o["max_queue"],
        request_timeout_s=o["request_timeout_s"],
        read_timeout_s=o["read_timeout_s"],
        shutdown_timeout_s=10.0,
    )
    app = create_app(
        SleepyPipeline(o["batch_ms"], o["image_ms"]),
        max_batch_size=o["max_batch_size"],
        max_wait_ms=o["max_wait_ms"],
        max_n=4,
        limits=limits,
    )
    run_server(app, host="127.0.0.1", port=o["port"], log_level="error")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes (Linux)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------------------------------- payloads


def png_bomb(side: int = 13000) -> bytes:
    comp, row = zlib.compressobj(9), b"\x00" * (side + 1)
    idat = b"".join(
        [comp.compress(row * 64) for _ in range(side // 64)] + [comp.compress(row * (side % 64)), comp.flush()]
    )

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def multipart(fields: dict[str, str], file: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def head(path: str, content_type: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{size}\r\n\r\n".encode()


class Payloads:
    def __init__(self):
        self.png_bomb = png_bomb()
        self.jpeg_bomb = encoded("JPEG", (12000, 12000), "L")
        self.small_png = encoded("PNG", (16, 16))
        self.big_file = os.urandom(5 * MB)
        self.mb = b" " * MB


def gen_json(rng: random.Random) -> bytes:
    return json.dumps(
        {
            "prompt": f"load test {rng.randrange(10**6)}",
            "n": rng.randint(1, 3),
            "size": "8x8",
            "response_format": "b64_json",
        }
    ).encode()


def plan(kind: str, rng: random.Random, p: Payloads, read_timeout: float):
    """-> (head, body pieces, seconds to wait before each piece, hang up without reading?)"""
    gen, var = "/v1/images/generations", "/v1/images/variations"
    if kind in ("generate", "gone", "slow_ok", "slow_stall"):
        body = gen_json(rng)
        if kind == "slow_ok":  # ten pieces over a quarter of the read timeout
            step = max(1, len(body) // 10)
            pieces = [body[i : i + step] for i in range(0, len(body), step)]
            return head(gen, "application/json", len(body)), pieces, read_timeout / 4 / len(pieces), False
        if kind == "slow_stall":
            return head(gen, "application/json", len(body)), [body[: len(body) // 2]], 0.0, False
        return head(gen, "application/json", len(body)), [body], 0.0, kind == "gone"
    if kind in ("variation", "png_bomb", "jpeg_bomb", "big_upload"):
        file = {"variation": p.small_png, "png_bomb": p.png_bomb, "jpeg_bomb": p.jpeg_bomb, "big_upload": p.big_file}
        body, ctype = multipart({"n": "1", "size": "8x8", "response_format": "b64_json"}, file[kind])
        return head(var, ctype, len(body)), [body[i : i + MB] for i in range(0, len(body), MB)], 0.0, False
    if kind == "big_json":
        return head(gen, "application/json", 8 * MB), [p.mb] * 8, 0.0, False
    if kind == "chunked":
        return head(gen, "application/json", None), (b"%x\r\n%s\r\n" % (MB, p.mb) for _ in range(1024)), 0.0, False
    if kind == "bad_json":
        body = b'{"prompt": "x", "size": "8x8"' if rng.random() < 0.5 else b'{"prompt": "x", "size": "9x9"}'
        return head(gen, "application/json", len(body)), [body], 0.0, False
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------------- the clients


async def read_status(loop, sock: socket.socket) -> int:
    """The status of one response, read to its end (Content-Length) or to the peer's close.  Reads the socket itself
    (not an asyncio stream, which forgets received bytes once a write fails): an answer the server sent before it
    hung up on a body is still read, as httpcore and curl do."""
    data, status, need = b"", None, None
    while True:
        if status is None and b"\r\n\r\n" in data:
            head_, _, rest = data.partition(b"\r\n\r\n")
            lines = head_.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    need = len(head_) + 4 + int(v)
        if status is not None and need is not None and len(data) >= need:
            return status
        try:
            chunk = await loop.sock_recv(sock, 65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if status is not None:
                return status
            raise ConnectionError("closed without an answer")
        data += chunk


async def one_request(port: int, kind: str, rng: random.Random, p: Payloads, o: dict) -> tuple[int | str | None, float]:
    """-> (status, or "gone" / "no_answer" / "error:<name>"; seconds)."""
    hd, pieces, pause, hang_up = plan(kind, rng, p, o["read_timeout_s"])
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    tasks: list[asyncio.Future] = []
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        answer = asyncio.ensure_future(read_status(loop, sock))
        tasks.append(answer)
        try:
            await loop.sock_sendall(sock, hd)
            for piece in pieces:  # keep sending until the body ends, the server answers or it stops reading
                if answer.done():
                    break
                if pause:
                    await asyncio.sleep(pause)
                sent = asyncio.ensure_future(loop.sock_sendall(sock, piece))
                tasks.append(sent)
                await asyncio.wait({sent, answer}, timeout=o["client_timeout"], return_when=asyncio.FIRST_COMPLETED)
                if not sent.done():
                    sent.cancel()
                    break
                sent.result()  # raises if the server hung up
        except (ConnectionError, OSError):
            pass  # the server hung up mid-body: its answer may still be there to read
        if hang_up:
            return "gone", time.monotonic() - t0
        try:
            return await asyncio.wait_for(answer, o["client_timeout"]), time.monotonic() - t0
        except asyncio.TimeoutError:
            return "no_answer", time.monotonic() - t0
        except (ConnectionError, OSError, ValueError, IndexError) as e:
            return f"error:{type(e).__name__}", time.monotonic() - t0
    finally:
        for t in tasks:  # unregistered from the selector before the fd is closed (and maybe reused)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close()


async def client(i: int, port: int, until: float, p: Payloads, o: dict, records: list) -> None:
    rng = random.Random(o["seed"] * 100003 + i)
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        try:
            status, seconds = await one_request(port, kind, rng, p, o)
        except (ConnectionError, OSError) as e:  # could not even connect
            status, seconds = f"error:{type(e).__name__}", 0.0
        records.append((kind, status, seconds))
        await asyncio.sleep(rng.random() * o["think_ms"] / 1000)


async def run_clients(port: int, p: Payloads, o: dict, pid: int) -> tuple[list, list[int]]:
    records: list = []
    rss: list[int] = []
    until = time.monotonic() + o["duration"]

    async def sample_rss():
        while time.monotonic() < until:
            rss.append(proc_status(pid).get("VmRSS", 0))
            await asyncio.sleep(0.25)

    await asyncio.gather(sample_rss(), *(client(i, port, until, p, o, records) for i in range(o["clients"])))
    return records, rss


# --------------------------------------------------------------------------------------------------- main


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def get_health(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_, _, body = data.partition(b"\r\n\r\n")
    return {"code": int(head_.split()[1]), **json.loads(body)}


def summarize(records: list, rss: list[int], start_rss: int, peak: int, o: dict) -> dict:
    answered = [(k, s, t) for k, s, t in records if s != "gone"]
    statuses = Counter(str(s) for _, s, _ in answered)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    lat_kind: dict[str, list[float]] = defaultdict(list)
    for k, s, t in answered:
        by_kind[k][str(s)] += 1
        lat_kind[k].append(t)
    lat = [t for _, s, t in answered if isinstance(s, int)]
    unexpected = {
        k: {s: n for s, n in c.items() if not (s.isdigit() and int(s) in EXPECTED[k])} for k, c in by_kind.items()
    }
    return {
        "clients": o["clients"],
        "duration_s": o["duration"],
        "requests": len(records),
        "answered": len(answered),
        "hung_up_on_purpose": len(records) - len(answered),
        "requests_per_s": round(len(answered) / o["duration"], 1),
        "status_counts": dict(sorted(statuses.items())),
        "status_5xx": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500),
        "unanswered": sum(n for s, n in statuses.items() if not s.isdigit()),
        "unexpected": {k: v for k, v in unexpected.items() if v},
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat) if lat else None},
        "by_kind": {
            k: {
                "statuses": dict(sorted(by_kind[k].items())),
                "p50_s": percentile(lat_kind[k], 50),
                "p99_s": percentile(lat_kind[k], 99),
            }
            for k in sorted(by_kind)
        },
        "server_rss_mb": {
            "start": round(start_rss / MB, 1),
            "peak": round(peak / MB, 1),
            "max_sampled": round(max(rss, default=0) / MB, 1),
            "growth": round((peak - start_rss) / MB, 1),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    from common import emit, machine_info, parse_kv  # bench/common.py

    o = parse_kv(sys.argv[1:] if argv is None else argv, DEFAULTS)
    if o["serve"]:
        serve(o)
        return {}
    port = o["port"]
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    args = [f"{k}={v}" for k, v in o.items() if k not in ("serve", "port", "out") and v is not None]
    log = tempfile.TemporaryFile("w+")  # the server's stderr (a pipe could fill up and stall it)
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve=1", f"port={port}", *args],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_up(port, proc)
        payloads = Payloads()
        time.sleep(0.5)
        start_rss = proc_status(proc.pid).get("VmRSS", 0)
        records, rss = asyncio.run(run_clients(port, payloads, o, proc.pid))
        time.sleep(1.0)  # the last answers go out
        peak = proc_status(proc.pid).get("VmHWM", 0)
        result = summarize(records, rss, start_rss, peak, o)
        result["health_after"] = get_health(port)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done: -15 is a clean exit here
        result["shutdown"] = {"signal": "SIGTERM", "returncode": code, "seconds": round(time.monotonic() - t0, 2)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        lines = log.read().splitlines()
        log.close()
    # uvicorn logs at level error: a traceback here is an exception the app did not turn into an answer
    result["server_log"] = {
        "lines": len(lines),
        "tracebacks": sum("Traceback" in ln for ln in lines),
        "tail": lines[-10:],
    }
    result["settings"] = {k: v for k, v in o.items() if k not in ("serve", "out")}
    import torch

    result["machine"] = machine_info(torch.device("cpu"))
    return emit(result, o["out"])


if __name__ == "__main__":
    main()
