"""Serving: dalle2.generate(), the batch worker (with a fake pipeline), and the real HTTP server (uvicorn on
127.0.0.1, tiny random checkpoints written here) called with the real ``openai`` client.

The tiny cascade: CLIP (16 px images), prior, 16 px decoder, 16 -> 32 upsampler, so ``sizes == (16, 32)``;
2-3 sampling steps per stage.  Weights are random (perturbed so every output depends on its input)."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.pipeline import SamplingSettings, StageSettings, UnCLIPPipeline
from dalle2.serving import APIError, Batcher, Job, create_app, generate, load_image, parse_size
from helpers.cascade import build_tiny_checkpoints  # the same tiny cascade as the pipeline tests
from helpers.serving import FakePipeline, ServerThread

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers.tiny_runs import REPO_ROOT as REPO  # noqa: E402

API_KEY = "sk-test-123"
FAST = SamplingSettings(
    prior=StageSettings(steps=2),
    decoder=StageSettings(steps=3, guidance_scale=2.0),
    upsampler=StageSettings(steps=2),
    n_prior_samples=2,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("serving_ckpts"))


@pytest.fixture(scope="module")
def pipe(ckpts):
    return UnCLIPPipeline.from_checkpoints(
        clip=ckpts["clip"], prior=ckpts["prior"], decoder=ckpts["decoder"], upsamplers=[ckpts["upsampler"]]
    )


@pytest.fixture(scope="module")
def server(pipe):
    app = create_app(pipe, api_key=API_KEY, settings=FAST, max_n=4, max_batch_size=8, max_wait_ms=300)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def decode_b64(resp) -> list[Image.Image]:
    out = []
    for d in resp.data:
        raw = base64.b64decode(d.b64_json)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out.append(Image.open(io.BytesIO(raw)))
    return out


def png_of(tensor_img: torch.Tensor) -> np.ndarray:
    return (tensor_img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def assert_close_8bit(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding of batched matmuls (a rare pixel one 8-bit level off)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


# --------------------------------------------------------------------------------------------------- units


def test_parse_size():
    assert parse_size("32x32", (16, 32)) == 32 and parse_size(16, (16, 32)) == 16
    assert parse_size(None, (16, 32)) == 32 and parse_size("auto", (16, 32)) == 32
    for bad, match in (("32x16", "not square"), ("64x64", "not supported"), ("big", "must be 'WxH'"), (True, "WxH")):
        with pytest.raises(APIError, match=match) as e:
            parse_size(bad, (16, 32))
        assert e.value.status == 400 and e.value.body()["error"]["param"] == "size"


def test_load_image_crops_resizes_and_rejects_garbage():
    img = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # transparent -> white
    img.paste((0, 0, 255, 255), (10, 0, 30, 20))  # opaque blue square in the middle
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = load_image(buf.getvalue(), 16)
    assert x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([0.0, 0.0, 1.0]))  # centre crop kept the blue square
    with pytest.raises(APIError, match="could not be decoded"):
        load_image(b"not an image at all", 16)
    with pytest.raises(APIError, match="empty"):
        load_image(b"", 16)


def test_batcher_groups_compatible_requests_and_slices_results():
    fake = FakePipeline()
    b = Batcher(fake, max_batch_size=4, max_wait_ms=200)
    jobs = [
        Job(kind="generation", size=8, seed=1, n=2, prompt="ab"),
        Job(kind="generation", size=4, seed=2, n=1, prompt="abc"),  # other size: its own batch
        Job(kind="generation", size=8, seed=3, n=1, prompt="abcd"),
        Job(kind="variation", size=8, seed=4, n=2, image=torch.full((3, 4, 4), 0.5)),
        Job(kind="generation", size=8, seed=5, n=3, prompt="a"),
    ]  # does not fit beside the first two
    for j in jobs:  # queued before the worker starts: batching is deterministic
        b.submit(j)
    b.start()
    outs = [j.future.result(timeout=30) for j in jobs]
    b.stop()
    # first come first served; a job that does not fit closes its batch
    assert fake.calls == [("generation", 3, 8), ("generation", 1, 4), ("variation", 2, 8), ("generation", 3, 8)]
    for j, out in zip(jobs, outs):
        key = len(j.prompt) if j.prompt is not None else 5.0
        expect = [FakePipeline.value(key, j.seed, k) for k in range(j.n)]
        assert out.shape == (j.n, 3, j.size, j.size)
        torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor(expect))
    s = b.stats()
    assert s["batches"] == 4 and s["requests"] == 5 and s["images"] == 9 and s["max_batch_requests"] == 2


def test_batcher_splits_big_requests_and_reports_errors():
    fake = FakePipeline()
    b = Batcher(fake, max_batch_size=2, max_wait_ms=0).start()
    out = b.submit(Job(kind="generation", size=4, seed=0, n=5, prompt="x")).result(timeout=30)
    assert out.shape == (5, 3, 4, 4) and [c[1] for c in fake.calls] == [2, 2, 1]
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([FakePipeline.value(1, 0, k) for k in range(5)]))
    fut = b.submit(Job(kind="generation", size=5, seed=0, n=1, prompt="x"))  # the fake raises on a bad size
    with pytest.raises(Exception):  # noqa: B017  (whatever the pipeline raised reaches the caller)
        fut.result(timeout=30)
    assert b.stats()["errors"] == 1
    assert b.submit(Job(kind="generation", size=4, seed=0, n=1, prompt="x")).result(timeout=30).shape[0] == 1
    b.stop()


def test_import_dalle2_stays_light():
    code = (
        "import sys, dalle2; assert 'fastapi' not in sys.modules and 'dalle2.serving' not in sys.modules; "
        "g = dalle2.generate; assert callable(g) and 'fastapi' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------- generate()


def test_generate_returns_pil_images_deterministically(pipe):
    imgs = generate("a red circle", n=3, size="16x16", seed=7, pipeline=pipe, settings=FAST)
    assert len(imgs) == 3 and all(isinstance(i, Image.Image) and i.size == (16, 16) and i.mode == "RGB" for i in imgs)
    again = generate("a red circle", n=2, size=16, seed=7, pipeline=pipe, settings=FAST)
    assert [np.asarray(i).tobytes() for i in again] == [np.asarray(i).tobytes() for i in imgs[:2]]
    # image k of a request is the pipeline's image for (seed, index k)
    ref = pipe(["a red circle"], seed=7, indices=[2], size=16, settings=FAST)[0]
    assert np.array_equal(np.asarray(imgs[2]), png_of(ref))
    big = generate("a red circle", seed=7, pipeline=pipe, settings=FAST)  # size=None: the largest
    assert big[0].size == (32, 32)
    with pytest.raises(ValueError, match="not supported"):
        generate("a red circle", size="256x256", pipeline=pipe)
    with pytest.raises(ValueError, match="empty"):
        generate("  ", pipeline=pipe)


# --------------------------------------------------------------------------------------------------- the server


def test_openai_client_generations_b64_and_seed(client):
    r = client.images.generate(
        prompt="a red circle", n=3, size="32x32", response_format="b64_json", extra_body={"seed": 11}
    )
    imgs = decode_b64(r)
    assert len(imgs) == 3 and all(i.size == (32, 32) and i.format == "PNG" for i in imgs)
    assert isinstance(r.created, int) and r.model_extra.get("seed") == 11
    r2 = client.images.generate(
        prompt="a red circle", n=3, size="32x32", response_format="b64_json", extra_body={"seed": 11}
    )
    assert [d.b64_json for d in r2.data] == [d.b64_json for d in r.data]  # same seed -> same bytes
    assert len({d.b64_json for d in r.data}) == 3  # the images of one request differ
    r3 = client.images.generate(
        prompt="a red circle", n=1, size="32x32", response_format="b64_json", extra_body={"seed": 12}
    )
    assert r3.data[0].b64_json != r.data[0].b64_json
    small = client.images.generate(prompt="two green squares", size="16x16", response_format="b64_json", model="dalle2")
    assert [i.size for i in decode_b64(small)] == [(16, 16)] and isinstance(small.model_extra.get("seed"), int)


def test_openai_client_url_response(client, server):
    r = client.images.generate(prompt="a blue square", n=2, size="16x16", extra_body={"seed": 3})  # url: default
    b64 = client.images.generate(
        prompt="a blue square", n=2, size="16x16", response_format="b64_json", extra_body={"seed": 3}
    )
    for d, ref in zip(r.data, b64.data):
        assert d.url.startswith(server.url + "/v1/images/files/") and d.b64_json is None
        got = httpx.get(d.url, timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == base64.b64decode(ref.b64_json)
    missing = httpx.get(server.url + "/v1/images/files/nope.png", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_openai_client_variations(client):
    src = Image.fromarray((np.random.default_rng(0).random((24, 30, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    png = buf.getvalue()
    kw = dict(n=2, size="32x32", response_format="b64_json", extra_body={"seed": 5})
    r = client.images.create_variation(image=("in.png", png, "image/png"), **kw)
    imgs = decode_b64(r)
    assert len(imgs) == 2 and all(i.size == (32, 32) for i in imgs) and r.model_extra.get("seed") == 5
    r2 = client.images.create_variation(image=("in.png", png, "image/png"), **kw)
    assert [d.b64_json for d in r2.data] == [d.b64_json for d in r.data]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.create_variation(image=("in.png", b"garbage bytes", "image/png"), n=1, size="16x16")
    assert e.value.status_code == 400 and e.value.body["param"] == "image" and e.value.body["code"] == "invalid_image"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(prompt="x", size="64x64"), "size"),
        (dict(prompt="x", size="32x16"), "size"),
        (dict(prompt="x", size="huge"), "size"),
        (dict(prompt=""), "prompt"),
        (dict(prompt="   "), "prompt"),
        (dict(prompt="x", n=0), "n"),
        (dict(prompt="x", n=5), "n"),
        (dict(prompt="x" * 1001), "prompt"),
        (dict(prompt="x", response_format="gif"), "response_format"),
        (dict(prompt="x", extra_body={"seed": -1}), "seed"),
        (dict(prompt="x", extra_body={"n": "two"}), "n"),
    ],
)
def test_bad_requests_are_400_with_openai_error_shape(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(**kwargs)
    assert e.value.status_code == 400
    body = e.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert body["error"]["message"] and e.value.body == body["error"]


def test_auth_models_health_and_raw_http(server, client):
    no_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        no_key.images.generate(prompt="x", size="16x16")
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert [m.id for m in client.models.list()] == ["dalle2"]
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="x", model="gpt-image-1")
    assert e.value.body["code"] == "model_not_found"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    bad_json = httpx.post(server.url + "/v1/images/generations", content=b"{nope", headers=auth, timeout=30)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    no_image = httpx.post(server.url + "/v1/images/variations", data={"n": "1"}, headers=auth, timeout=30)
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    h = httpx.get(server.url + "/health", timeout=30).json()  # no key needed
    assert h["status"] == "ok" and h["sizes"] == ["16x16", "32x32"] and h["max_n"] == 4


def test_concurrent_requests_are_batched_and_isolated(server, client, pipe):
    before = httpx.get(server.url + "/health", timeout=30).json()
    prompts = [f"prompt number {i} with {'many ' * i}words" for i in range(8)]

    def call(i):
        r = client.images.generate(
            prompt=prompts[i], n=1 + i % 2, size="16x16", response_format="b64_json", extra_body={"seed": 100 + i}
        )
        return [np.asarray(im) for im in decode_b64(r)]

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(call, range(8)))
    after = httpx.get(server.url + "/health", timeout=30).json()
    assert after["requests"] - before["requests"] == 8
    assert after["max_batch_requests"] > 1 and after["batches"] - before["batches"] < 8
    for i, imgs in enumerate(results):  # each request got its own images: those of the request made alone
        n = 1 + i % 2
        alone = pipe([prompts[i]] * n, seed=100 + i, indices=list(range(n)), size=16, settings=FAST)
        assert len(imgs) == n
        for got, ref in zip(imgs, alone):
            assert_close_8bit(got, png_of(ref))


def test_serve_cli(ckpts, tmp_path):
    """eval/serve.py loads the checkpoints and answers on the asked port (subprocess, as a user would start it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        str(REPO / "eval/serve.py"),
        f"ckpt.clip={ckpts['clip']}",
        f"ckpt.prior={ckpts['prior']}",
        f"ckpt.decoder={ckpts['decoder']}",
        f"ckpt.upsamplers=[{ckpts['upsampler']}]",
        "host=127.0.0.1",
        f"port={port}",
        "api_key=sk-cli",
        "steps.prior=2",
        "steps.decoder=2",
        "steps.upsampler=2",
        "device=cpu",
        "limits.max_queue=5",
        "limits.max_image_pixels=4096",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 180:
                raise AssertionError(
                    f"server did not come up:\n{proc.stdout.read() if proc.poll() is not None else ''}"
                )
            time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0, timeout=120)
        r = c.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json")
        assert [i.size for i in decode_b64(r)] == [(32, 32)] * 2
        h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()  # the limits reached the app
        assert h["max_queue"] == 5 and h["limits"]["max_image_pixels"] == 4096
        with pytest.raises(openai.BadRequestError) as e:  # 65 x 65 > 4096 pixels
            c.images.create_variation(image=("a.png", _png(Image.new("RGB", (65, 65))), "image/png"), n=1)
        assert e.value.body["code"] == "image_too_large"
    finally:
        proc.terminate()
        proc.wait(30)


def test_without_prior_only_variations(ckpts):
    """In-process (TestClient): a cascade without a prior refuses text-to-image with a 400 and still does variations;
    no api_key -> no auth needed."""
    from fastapi.testclient import TestClient

    pipe = UnCLIPPipeline.from_checkpoints(clip=ckpts["clip"], decoder=ckpts["decoder"])
    with TestClient(create_app(pipe, settings=FAST)) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "a red circle"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
        r = tc.post(
            "/v1/images/variations",
            files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")},
            data={"n": "2", "response_format": "b64_json", "seed": "1"},
        )
        assert r.status_code == 200, r.text
        assert [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in r.json()["data"]] == [
            (16, 16)
        ] * 2
        assert tc.get("/v1/nothing").json()["error"]["code"] == "not_found"


def test_sampling_failure_is_500_with_error_shape():
    from fastapi.testclient import TestClient

    class Broken(FakePipeline):
        def __call__(self, prompts, **kw):
            raise RuntimeError("CUDA out of memory (simulated)")

    with TestClient(create_app(Broken(), max_wait_ms=0)) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "x", "size": "8x8"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and "out of memory" in err["message"]
        ok = tc.post(
            "/v1/images/variations",
            files={"image": ("a.png", _png(Image.new("RGB", (5, 5))), "image/png")},
            data={"size": "4x4", "response_format": "b64_json"},
        )  # the worker survived
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1
        assert tc.get("/health").json()["errors"] == 1


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
