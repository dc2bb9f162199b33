"""The server holds under overload and misuse (issue 18): a bounded queue (429 + Retry-After), request timeouts,
clients that go away, batches that fail (/health), shutdown, a public bind without a key, and the limits' config.

A fake pipeline whose calls wait on a gate lets each test decide when work ends; multi-request tests run uvicorn on
127.0.0.1 in a thread (tests/test_serving.py's ServerThread).  Uploads and bodies: tests/test_serving_abuse.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from omegaconf import OmegaConf

from dalle2.serving import create_app
from helpers.serving import FakePipeline, ServerThread, assert_error_shape, raw_request, timed
from helpers.tiny_runs import REPO_ROOT as REPO

pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

# --------------------------------------------------------------------------------------------------- helpers


class GatedPipeline(FakePipeline):
    """Each call records its prompts, sets ``entered`` and waits for ``gate``: the test decides when work ends."""

    def __init__(self):
        super().__init__()
        self.gate, self.entered, self.prompts = threading.Event(), threading.Event(), []

    def __call__(self, prompts, **kw):
        self.prompts.extend(prompts)
        self.entered.set()
        self.gate.wait(30)
        return super().__call__(prompts, **kw)


def gen(srv, prompt: str, *, timeout: float = 30, **extra) -> httpx.Response:
    body = {"prompt": prompt, "size": "4x4", "response_format": "b64_json", **extra}
    return httpx.post(srv.url + "/v1/images/generations", json=body, timeout=timeout)


def health(srv) -> dict:
    return httpx.get(srv.url + "/health", timeout=10).json()


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------- the queue


def test_full_queue_is_429_with_retry_after_in_openai_shape():
    from dalle2.serving import ServeLimits

    fake = GatedPipeline()
    app = create_app(fake, max_batch_size=1, max_wait_ms=0, limits=ServeLimits(max_queue=2))
    with ServerThread(app) as srv, ThreadPoolExecutor(3) as ex:
        try:
            running = ex.submit(gen, srv, "running")
            assert fake.entered.wait(10)
            queued = [ex.submit(gen, srv, f"queued {i}") for i in range(2)]
            wait_for(lambda: health(srv)["queued"] == 2, what="two queued")
            r, seconds = timed(lambda: gen(srv, "one too many", timeout=5))
            assert r.status_code == 429 and seconds < 2, (r.status_code, seconds)
            assert int(r.headers["retry-after"]) >= 1
            err = assert_error_shape(r.json(), "queue_full")
            assert err["type"] == "rate_limit_error"
            h = health(srv)
            assert h["queued"] == 2 and h["max_queue"] == 2 and h["rejected"] == 1
        finally:
            fake.gate.set()
        assert [f.result(30).status_code for f in [running, *queued]] == [200, 200, 200]
    assert "one too many" not in fake.prompts


def test_request_timeout_answers_and_drops_work_that_had_not_started():
    from dalle2.serving import ServeLimits

    fake = GatedPipeline()
    app = create_app(fake, max_batch_size=1, max_wait_ms=0, limits=ServeLimits(request_timeout_s=1.0))
    with ServerThread(app) as srv, ThreadPoolExecutor(2) as ex:
        try:
            started = ex.submit(timed, lambda: gen(srv, "started", timeout=10))
            assert fake.entered.wait(10)
            waiting = ex.submit(timed, lambda: gen(srv, "never started", timeout=10))
            (ra, ta), (rb, tb) = started.result(15), waiting.result(15)
            assert ra.status_code == 504 and 0.9 < ta < 5, (ra.status_code, ta)
            assert assert_error_shape(ra.json(), "timeout")["type"] == "server_error"
            assert rb.status_code == 429 and 0.9 < tb < 5 and int(rb.headers["retry-after"]) >= 1, (rb.status_code, tb)
            assert_error_shape(rb.json(), "queue_timeout")
            h = health(srv)
            assert h["queued"] == 0 and h["timed_out"] == 2
        finally:
            fake.gate.set()
        wait_for(lambda: health(srv)["batches"] == 1, what="the started batch to end")
        assert gen(srv, "after").status_code == 200
    assert "never started" not in fake.prompts and "after" in fake.prompts


def test_work_for_a_client_that_went_away_is_dropped_before_it_starts():
    fake = GatedPipeline()
    with ServerThread(create_app(fake, max_batch_size=1, max_wait_ms=0)) as srv, ThreadPoolExecutor(1) as ex:
        try:
            running = ex.submit(gen, srv, "running")
            assert fake.entered.wait(10)
            sock = socket.create_connection(("127.0.0.1", srv.port))  # asks, then hangs up without waiting
            sock.sendall(raw_request("/v1/images/generations", json.dumps({"prompt": "gone", "size": "4x4"}).encode()))
            wait_for(lambda: health(srv)["queued"] == 1, what="the request to be queued")
            sock.close()
            wait_for(lambda: health(srv)["queued"] == 0, 5, what="the abandoned request to leave the queue")
        finally:
            fake.gate.set()
        assert running.result(30).status_code == 200
        assert gen(srv, "after").status_code == 200
        assert health(srv)["dropped"] == 1
    assert "gone" not in fake.prompts and fake.prompts == ["running", "after"]


def test_health_reports_failures_and_turns_unhealthy_when_every_batch_fails():
    class Flaky(FakePipeline):
        broken = True

        def __call__(self, prompts, **kw):
            if self.broken:
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().__call__(prompts, **kw)

    flaky = Flaky()
    with TestClient(create_app(flaky, max_wait_ms=0)) as tc:
        h = tc.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["recent_failures"] == 0
        assert tc.post("/v1/images/generations", json={"prompt": "x", "size": "4x4"}).status_code == 500
        h = tc.get("/health")
        assert h.status_code == 200 and h.json()["recent_failures"] == 1  # one failure is not yet a dead server
        for _ in range(2):
            assert tc.post("/v1/images/generations", json={"prompt": "x", "size": "4x4"}).status_code == 500
        h = tc.get("/health")
        assert h.status_code == 503, h.json()
        assert h.json()["status"] == "unhealthy" and h.json()["recent_failures"] == 3
        assert "out of memory" in h.json()["last_error"] and h.json()["queued"] == 0
        flaky.broken = False
        assert tc.post("/v1/images/generations", json={"prompt": "x", "size": "4x4"}).status_code == 200
        h = tc.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["recent_failures"] == 3


# --------------------------------------------------------------------------------------------------- shutdown


def test_shutdown_finishes_in_flight_work_and_refuses_the_rest():
    from dalle2.serving import ServeLimits, make_server

    fake = GatedPipeline()
    app = create_app(fake, max_batch_size=1, max_wait_ms=0, limits=ServeLimits(shutdown_timeout_s=20))
    srv = ServerThread(app, server=make_server(app, log_level="warning"))
    with srv, ThreadPoolExecutor(2) as ex:
        try:
            in_flight = ex.submit(gen, srv, "in flight")
            assert fake.entered.wait(10)
            queued = ex.submit(gen, srv, "queued")
            wait_for(lambda: health(srv)["queued"] == 1, what="one queued")
            srv.server.should_exit = True  # what SIGTERM / Ctrl-C does
            rq = queued.result(5)
            assert rq.status_code == 503 and int(rq.headers["retry-after"]) >= 1
            assert_error_shape(rq.json(), "shutting_down")
            try:  # a new request while the in-flight one finishes: refused (or the port is already closed)
                late = gen(srv, "late", timeout=5).status_code
            except httpx.TransportError:
                late = "closed"
            assert late in (503, "closed")
        finally:
            fake.gate.set()
        ra = in_flight.result(10)
        assert ra.status_code == 200 and len(ra.json()["data"]) == 1
        srv.thread.join(10)
        assert not srv.thread.is_alive()
    assert fake.prompts == ["in flight"]


def test_shutdown_timeout_bounds_the_wait_for_in_flight_work():
    from dalle2.serving import ServeLimits, make_server

    fake = GatedPipeline()
    app = create_app(fake, max_batch_size=1, max_wait_ms=0, limits=ServeLimits(shutdown_timeout_s=1.0))
    srv = ServerThread(app, server=make_server(app, log_level="warning"))
    try:
        with srv, ThreadPoolExecutor(1) as ex:
            in_flight = ex.submit(gen, srv, "stuck")
            assert fake.entered.wait(10)
            t0 = time.monotonic()
            srv.server.should_exit = True
            r = in_flight.result(10)
            assert r.status_code == 503 and assert_error_shape(r.json(), "shutting_down")
            srv.thread.join(10)
            assert not srv.thread.is_alive() and time.monotonic() - t0 < 6
    finally:
        fake.gate.set()


# --------------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_public_bind_needs_a_key_or_an_explicit_opt_out(host):
    from dalle2.serving import check_bind

    for key in (None, "", "   "):  # an empty key is no key
        with pytest.raises(ValueError, match="allow_unauthenticated"):
            check_bind(host, key, allow_unauthenticated=False)
        with pytest.warns(UserWarning, match="without an api_key"):
            assert check_bind(host, key, allow_unauthenticated=True) is None
    assert check_bind(host, "sk-x", allow_unauthenticated=False) == "sk-x"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_bind_needs_no_key(host):
    from dalle2.serving import check_bind

    assert check_bind(host, None, allow_unauthenticated=False) is None
    assert check_bind(host, "", allow_unauthenticated=False) is None
    assert check_bind(host, " sk-x ", allow_unauthenticated=False) == "sk-x"


def test_empty_api_key_is_no_key():
    for key in ("", "  "):
        with TestClient(create_app(FakePipeline(), api_key=key, max_wait_ms=0)) as tc:
            r = tc.post("/v1/images/generations", json={"prompt": "x", "size": "4x4", "response_format": "b64_json"})
            assert r.status_code == 200, r.text


def _serve_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "eval/serve.py"),
        "ckpt.clip=/nonexistent/clip.ckpt",
        "ckpt.decoder=/nonexistent/decoder.ckpt",
        "port=9",
        "device=cpu",
        f"hydra.run.dir={tmp_path}",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)


def test_serve_cli_refuses_a_public_bind_without_a_key_before_loading_anything(tmp_path):
    refused = _serve_cli(["host=0.0.0.0", "api_key="], tmp_path)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "allow_unauthenticated" in out and "nonexistent" not in out, out[-2000:]
    allowed = _serve_cli(["host=0.0.0.0", "allow_unauthenticated=true"], tmp_path)
    out = allowed.stdout + allowed.stderr
    assert allowed.returncode != 0 and "nonexistent" in out, out[-2000:]  # went on to load the (missing) checkpoint


# --------------------------------------------------------------------------------------------------- config


def _load_script(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_limit_is_reachable_from_the_serve_config():
    from dalle2.serving import ServeLimits

    mod = _load_script("eval_serve", REPO / "eval" / "serve.py")
    cfg = OmegaConf.load(REPO / "conf" / "serve.yaml")
    assert set(cfg.limits) == {f.name for f in dataclasses.fields(ServeLimits)}
    assert cfg.allow_unauthenticated is False
    assert mod.limits_from_cfg(cfg) == ServeLimits()  # the yaml's defaults are the library's
    values = {
        "max_queue": 3,
        "request_timeout_s": 7.5,
        "read_timeout_s": 2.0,
        "shutdown_timeout_s": 4.0,
        "max_image_pixels": 1000,
        "max_upload_bytes": 4096,
        "max_json_bytes": 2048,
        "max_decodes": 1,
        "max_connections": 5,
    }
    assert set(values) == set(cfg.limits)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"limits.{k}={v}" for k, v in values.items()]))
    assert mod.limits_from_cfg(cfg) == ServeLimits(**values)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_queue", 0),
        ("max_image_pixels", -1),
        ("read_timeout_s", 0.0),
        ("max_json_bytes", 1.5),
        ("max_decodes", True),
    ],
)
def test_a_bad_limit_is_an_error_naming_it(field, value):
    from dalle2.serving import ServeLimits

    with pytest.raises(ValueError, match=f"ServeLimits.{field} must be"):
        ServeLimits(**{field: value})
