"""The serving tests' shared pieces: a uvicorn server in a thread, a fake pipeline with the real one's interface,
and raw-HTTP / error-shape helpers."""

from __future__ import annotations

import socket
import threading
import time

import torch
import uvicorn


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a background thread; ``server``: a ready
    ``uvicorn.Server`` for ``app`` (default: a plain one)."""

    def __init__(self, app, server=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = server or uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FakePipeline:
    """Same interface as UnCLIPPipeline; image i is a constant encoding (prompt, seed_i, index_i) so a wrong slice
    shows.  Records the batch of each call."""

    sizes = (4, 8)

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, int, int]] = []
        self.delay = delay

    @staticmethod
    def value(key: float, seed: int, index: int) -> float:
        return (key * 7 + seed * 3 + index) % 251 / 255.0

    def _make(self, keys, seed, indices, size):
        time.sleep(self.delay)
        size = size or self.sizes[-1]
        if size not in self.sizes:
            raise ValueError(f"bad size {size}")
        vals = [self.value(k, s, i) for k, s, i in zip(keys, seed, indices)]
        return torch.tensor(vals).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()

    def __call__(self, prompts, *, seed=0, indices=None, size=None, settings=None):
        self.calls.append(("generation", len(prompts), size))
        return self._make([len(p) for p in prompts], seed, indices, size)

    def variations(self, images, *, seed=0, indices=None, size=None, settings=None):
        self.calls.append(("variation", images.shape[0], size))
        return self._make([float(images[b].mean() * 10) for b in range(images.shape[0])], seed, indices, size)


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def assert_error_shape(body: dict, code: str) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def raw_request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
