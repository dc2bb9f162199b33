"""The server's memory and its work stay bounded (issue 32): the url image store is bounded in bytes (oldest out
first), its files are capabilities (unguessable names that expire; no key needed, nothing cached or leaked on the
way), the number of open connections is capped (uvicorn's ``limit_concurrency``, ``limits.max_connections``), and a
request that times out (504) or whose client hangs up stops the work that was only for it — the remaining sampling
steps of its pipeline call, the pipeline calls of its batch still to come."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch
from torch import nn

from dalle2.serving import Batcher, ImageStore, Job, ServeLimits, create_app, make_server
from helpers.serving import FakePipeline, ServerThread, assert_error_shape

pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------ the url store


def test_image_store_is_bounded_in_bytes_and_evicts_the_oldest():
    store = ImageStore(max_items=100, max_bytes=1000, ttl_s=60)
    keys = [store.put(bytes([i]) * 300) for i in range(5)]
    assert store.nbytes <= 1000 and len(store) == 3
    assert [store.get(k) is not None for k in keys] == [False, False, True, True, True]  # oldest out first
    assert store.get(keys[-1]) == bytes([4]) * 300
    with pytest.raises(ValueError, match="max_bytes"):  # one response larger than the whole store
        store.put_many([b"x" * 600, b"y" * 600])
    assert store.nbytes <= 1000 and store.get(keys[-1]) is not None  # a refused put evicts nothing
    store.put(b"z" * 1000)
    assert store.nbytes == 1000 and len(store) == 1


def test_url_responses_keep_the_store_under_its_byte_bound():
    from dalle2.serving import png_bytes, to_pil

    bound = 5 * len(png_bytes(to_pil(torch.full((1, 3, 8, 8), 0.5))[0]))  # room for about 5 images
    app = create_app(FakePipeline(), max_wait_ms=0, url_store_max_bytes=bound)
    with TestClient(app) as tc:
        urls = []
        for i in range(12):
            r = tc.post("/v1/images/generations", json={"prompt": f"p{i}", "n": 2, "size": "8x8", "seed": i})
            assert r.status_code == 200, r.text
            urls += [d["url"] for d in r.json()["data"]]
            assert app.state.store.nbytes <= bound
        assert tc.get(urls[-1]).status_code == 200 and tc.get(urls[0]).status_code == 404  # the oldest went first


def test_a_response_larger_than_the_store_is_an_error_pointing_to_b64():
    with TestClient(create_app(FakePipeline(), max_wait_ms=0, url_store_max_bytes=100)) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "big", "n": 2, "size": "8x8"})
        assert r.status_code == 500 and "b64_json" in assert_error_shape(r.json(), "url_store_too_small")["message"]


def test_files_are_unguessable_expiring_capabilities():
    """No key is needed for a file (like OpenAI's URLs), so its name is the secret: >= 128 random bits, never
    cached by shared caches or sent on as a Referer, gone after ``url_ttl_s``; the API itself still needs the key."""
    app = create_app(FakePipeline(), api_key="sk-x", max_wait_ms=0, url_ttl_s=0.5)
    auth = {"Authorization": "Bearer sk-x"}
    with TestClient(app) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "p", "n": 2, "size": "4x4"}, headers=auth)
        url = r.json()["data"][0]["url"]
        name = url.rsplit("/", 1)[1].removesuffix(".png")
        assert len(name) * 6 >= 128 and name != r.json()["data"][1]["url"].rsplit("/", 1)[1].removesuffix(".png")
        f = tc.get(url)  # no key
        assert f.status_code == 200 and f.content.startswith(b"\x89PNG")
        assert "no-store" in f.headers["cache-control"] and "private" in f.headers["cache-control"]
        assert f.headers["referrer-policy"] == "no-referrer" and f.headers["x-content-type-options"] == "nosniff"
        assert tc.get(url.replace(name, name[:-1] + ("A" if name[-1] != "A" else "B"))).status_code == 404
        assert tc.post("/v1/images/generations", json={"prompt": "p"}).status_code == 401
        time.sleep(0.6)
        assert tc.get(url).status_code == 404  # expired
        assert len(app.state.store) == 0


# ----------------------------------------------------------------------------------------------- connections


def test_open_connections_are_capped_by_max_connections():
    app = create_app(FakePipeline(), max_wait_ms=0, limits=ServeLimits(max_connections=3))
    with ServerThread(app, server=make_server(app, log_level="critical")) as srv:
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]  # hold connections open
        try:
            time.sleep(0.2)
            r = httpx.get(srv.url + "/health", timeout=10)
            assert r.status_code == 503, r.status_code  # refused at once, nothing queued
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: httpx.get(srv.url + "/health", timeout=10).status_code == 200, what="room again")


def test_connections_that_send_no_request_give_their_place_back():
    """The cap counts open connections, so connections that never send a whole request (a client that connected and
    vanished, a half-open socket, a slowloris trickling header bytes) held it forever: 3 of them made every other
    request 503 for as long as they stayed open. A connection must now send its request head within
    ``read_timeout_s`` of opening (or of its last response), else it is closed; a request that takes longer to
    answer than that is not cut."""
    app = create_app(FakePipeline(delay=1.5), max_wait_ms=0, limits=ServeLimits(max_connections=3, read_timeout_s=1.0))
    with ServerThread(app, server=make_server(app, log_level="critical")) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        try:
            slowloris = idle[0]
            slowloris.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head never finished
            time.sleep(0.2)
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 503  # the cap holds
            trickled, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 10:  # a byte every 0.1 s does not keep it open
                time.sleep(0.1)
                try:
                    slowloris.sendall(b"X")
                except OSError:  # closed by the server
                    break
                trickled += 1
            assert trickled >= 2 and time.monotonic() - t0 < 10
            for s in idle[1:]:  # closed by the server while the clients still hold their ends
                s.settimeout(5)
                assert s.recv(1024) == b""
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        finally:
            for s in idle:
                s.close()
        # a request whose answer takes longer than read_timeout_s is answered, on a connection that stays usable
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            body = {"prompt": "slow", "size": "4x4", "response_format": "b64_json"}
            assert client.post("/v1/images/generations", json=body).status_code == 200
            assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------------ a timed-out request's work


class StepPipeline(nn.Module, FakePipeline):
    """A pipeline of ``steps`` network calls (``delay`` s each), like a sampler's: records when each step ran."""

    def __init__(self, steps: int = 40, delay: float = 0.05):
        nn.Module.__init__(self)
        FakePipeline.__init__(self)
        self.net, self.steps, self.step_delay, self.step_times = nn.Identity(), steps, delay, []

    __call__ = FakePipeline.__call__  # not nn.Module's

    def _make(self, keys, seed, indices, size):
        x = torch.zeros(len(keys))
        for _ in range(self.steps):
            x = self.net(x)  # a network call: where a sampler can be stopped
            self.step_times.append(time.monotonic())
            time.sleep(self.step_delay)
        return FakePipeline._make(self, keys, seed, indices, size)


def _gen(tc_or_url, prompt, n=1, **kw):
    body = {"prompt": prompt, "n": n, "size": "4x4", "response_format": "b64_json"}
    return httpx.post(tc_or_url + "/v1/images/generations", json=body, timeout=30, **kw)


def test_a_timed_out_request_stops_its_remaining_sampling_steps():
    pipe = StepPipeline(steps=40, delay=0.05)  # 2 s of work
    app = create_app(pipe, max_wait_ms=0, limits=ServeLimits(request_timeout_s=0.5))
    with ServerThread(app) as srv:
        r = _gen(srv.url, "slow")
        answered = time.monotonic()
        assert r.status_code == 504 and assert_error_shape(r.json(), "timeout")
        wait_for(lambda: app.state.batcher.stats()["running"] == 0, 5, what="the worker to stop")
        after = [t for t in pipe.step_times if t > answered + 0.01]
        assert len(after) <= 1, f"{len(after)} sampling steps ran after the 504 (of {pipe.steps})"
        assert len(pipe.step_times) < pipe.steps
        assert app.state.batcher.stats()["aborted"] == 1
        pipe.steps = 2
        assert _gen(srv.url, "next").status_code == 200  # the worker is free and healthy
        assert httpx.get(srv.url + "/health", timeout=10).json()["status"] == "ok"


def test_a_timed_out_request_skips_the_rest_of_its_batch():
    """A plain pipeline (no network to stop inside) still loses no more than the call in flight: a request cut into
    several pipeline calls (n > max_batch_size) makes no further call once it timed out."""
    pipe = FakePipeline(delay=0.3)
    app = create_app(pipe, max_batch_size=1, max_wait_ms=0, limits=ServeLimits(request_timeout_s=0.45))
    with ServerThread(app) as srv:
        r = _gen(srv.url, "four", n=4)
        assert r.status_code == 504
        wait_for(lambda: app.state.batcher.stats()["running"] == 0, 5, what="the worker to stop")
        time.sleep(0.4)
        assert 1 <= len(pipe.calls) <= 2, pipe.calls  # the call in flight at the timeout ends; 3 and 4 never start


def test_work_shared_with_a_live_request_goes_on():
    """Only work that is for nobody stops: a batch whose other request still waits runs to the end and that request
    gets its exact images; once every request of the running call is gone, the call stops."""
    pipe = StepPipeline(steps=30, delay=0.02)
    batcher = Batcher(pipe, max_batch_size=4, max_wait_ms=200).start()
    try:
        a = Job(kind="generation", size=4, seed=1, n=1, prompt="a")
        b = Job(kind="generation", size=4, seed=2, n=2, prompt="bb")
        batcher.submit(a), batcher.submit(b)
        wait_for(lambda: len(pipe.step_times) >= 3, what="the batch to start")
        assert batcher.cancel(a, "dropped") is False  # running: taken back too late to skip
        images = b.future.result(10)
        assert len(pipe.step_times) == 30 and images.shape == (2, 3, 4, 4)
        assert torch.allclose(images[:, 0, 0, 0], torch.tensor([pipe.value(2, 2, k) for k in range(2)]))
        assert batcher.stats()["aborted"] == 0

        pipe.step_times.clear()
        c = Job(kind="generation", size=4, seed=3, n=1, prompt="c")
        batcher.submit(c)
        wait_for(lambda: len(pipe.step_times) >= 3, what="the next batch to start")
        batcher.cancel(c, "timed_out")
        wait_for(lambda: batcher.stats()["running"] == 0, 5, what="the call to stop")
        assert len(pipe.step_times) < 10 and batcher.stats()["aborted"] == 1
    finally:
        batcher.stop(5)


def test_the_interrupt_only_fires_in_the_worker_thread():
    """The same pipeline used elsewhere (generate() in another thread) while a call is being stopped is untouched."""
    pipe = StepPipeline(steps=20, delay=0.02)
    batcher = Batcher(pipe, max_batch_size=1, max_wait_ms=0).start()
    try:
        job = Job(kind="generation", size=4, seed=1, n=1, prompt="x")
        batcher.submit(job)
        wait_for(lambda: len(pipe.step_times) >= 2, what="the call to start")
        out = {}
        other = threading.Thread(target=lambda: out.setdefault("images", pipe(["y"], seed=[0], indices=[0], size=4)))
        other.start()
        batcher.cancel(job, "timed_out")
        other.join(10)
        assert out["images"].shape == (1, 3, 4, 4)
    finally:
        batcher.stop(5)


def test_serve_config_reaches_the_new_bounds():
    from helpers.scripts import compose_conf, load_script

    cfg = compose_conf("serve", ["ckpt.clip=x", "ckpt.decoder=y", "limits.max_connections=7", "url_store_max_bytes=99"])
    assert load_script("eval", "serve").limits_from_cfg(cfg).max_connections == 7
    assert cfg.url_store_max_bytes == 99
