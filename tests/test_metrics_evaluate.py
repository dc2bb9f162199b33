"""Sample evaluation: CLIP score ranks matched prompt/image pairs above shuffled ones for a trained tiny CLIP, and
eval/evaluate.py task=samples writes the metrics JSON (FID skipped with a message without Inception weights, a
clear error for a wrong weights file, the same numbers with 2 DDP processes as with 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from dalle2.clip.loss import ClipLoss
from dalle2.clip.model import clip_preset
from dalle2.clip.pretrained import save_safetensors
from dalle2.clip.tokenizer import get_tokenizer
from dalle2.data.checker_calibration import calibration_images
from dalle2.data.synthetic import make_caption, render, sample_attributes
from dalle2.lit.clip_module import CLIPModule, load_clip
from dalle2.metrics.clip_score import ClipScorer, clip_score
from helpers.scripts import compose_conf, load_script

NET = clip_preset(
    "tiny",
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    vision_patch_size=8,
    text_width=32,
    text_layers=1,
    text_heads=2,
    embed_dim=32,
)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n rendered 32 px pictures (B,3,32,32) in [-1,1] and their captions."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    caps = [make_caption(a, rng) for a in attrs]
    imgs = np.stack([render(a, 32, rng) for a in attrs])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0, caps


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory) -> Path:
    """A tiny CLIP trained for a few seconds on rendered pictures (a plain loop on preloaded tensors), saved as
    safetensors (``load_clip`` reads it)."""
    torch.manual_seed(0)
    images, caps = synthetic(512, seed=0)
    tokens = get_tokenizer(None)(caps)
    module = CLIPModule(network=NET)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(images), (64,), generator=g)
        out = module(images[idx], tokens[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("evalclip") / "clip.safetensors"
    save_safetensors(module.model, path)
    return path


def write_samples_dir(root: Path, images: torch.Tensor, prompts: list[str]) -> Path:
    """A samples directory as eval/sample.py writes it: {i:05d}.png + manifest.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with open(root / "manifest.jsonl", "w") as f:
        for i, (img, prompt) in enumerate(zip(pixels, prompts)):
            Image.fromarray(img).save(root / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": prompt, "index": i, "k": 0, "seed": 0}) + "\n")
    return root


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory) -> Path:
    images, caps = synthetic(16, seed=7)
    return write_samples_dir(tmp_path_factory.mktemp("samples") / "s", images, caps)


def _overrides(clip: Path, samples: Path, urls: str, extra=()) -> list[str]:
    return [
        "task=samples",
        f"clip_ckpt={clip}",
        f"samples={samples}",
        f"reference.urls='{urls}'",
        "reference.max_samples=48",
        "data.num_workers=0",
        "data.batch_size=16",
        "kid.subsets=10",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def run_in_process(overrides: list[str]) -> dict:
    """evaluate_samples(cfg) on conf/evaluate.yaml + overrides, in this process, with one intra-op thread (as each
    of 2 DDP CPU processes gets on 2 cores)."""
    cfg = compose_conf("evaluate", overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_script("eval", "evaluate").evaluate_samples(cfg)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ CLIP score


def test_clip_score_closed_form():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [4.0, 3.0]])
    torch.testing.assert_close(clip_score(a, b), torch.tensor([100.0, 0.0, 0.0, 96.0]))
    with pytest.raises(ValueError, match="two \\(B, D\\) embeddings"):
        clip_score(a, b[:2])


def test_clip_score_ranks_matched_pairs_above_shuffled(trained_clip):
    scorer = ClipScorer(clip=load_clip(str(trained_clip)), tokenizer=get_tokenizer(None))
    images, caps = synthetic(48, seed=11)  # held out: other seed than training
    matched = scorer(images, caps)
    shuffled = scorer(images, caps[1:] + caps[:1])
    assert matched.shape == (48,) and ((matched >= 0) & (matched <= 100)).all()
    assert matched.mean() > shuffled.mean() + 10
    assert (matched > shuffled).float().mean() > 0.7
    # an untrained CLIP does not tell them apart
    untrained = ClipScorer(clip=CLIPModule(network=NET).eval(), tokenizer=get_tokenizer(None))
    assert abs(float(untrained(images, caps).mean() - untrained(images, caps[1:] + caps[:1]).mean())) < 5


# ------------------------------------------------------------------------------------------------ evaluate CLI


def test_evaluate_samples_cli_writes_json(trained_clip, samples_dir, builtin_shards, tmp_path):
    out = tmp_path / "m.json"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            "eval/evaluate.py",
            *_overrides(trained_clip, samples_dir, builtin_shards["val"], [f"out={out}"]),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FID/KID skipped: no Inception weights given" in proc.stdout
    result = json.loads(out.read_text())
    for key in (
        "fid",
        "kid_mean",
        "kid_std",
        "clip_fd",
        "clip_kid_mean",
        "clip_kid_std",
        "clip_score",
        "clip_score_std",
        "reference_clip_score",
        "checker",
        "num_samples",
        "num_reference",
    ):
        assert key in result, key
    assert result["fid"] is None and result["kid_mean"] is None
    assert result["num_samples"] == 16 and result["num_reference"] == 48 and result["reference_skipped"] == 0
    assert result["clip_fd"] > 0 and np.isfinite(result["clip_kid_mean"])
    assert 0 < result["clip_score"] <= 100
    assert result["checker"]["num_samples"] == 16 and result["checker"]["accuracy/all"] == 1.0  # clean renders
    assert result["checker"]["strict/all"] >= 0.9 and result["checker"]["strict/sharp"] == 1.0  # and strictly
    assert "strict" in proc.stdout  # the summary line names both scores


def test_evaluate_samples_metrics_respond_to_the_samples(trained_clip, samples_dir, builtin_shards, tmp_path):
    """Samples whose prompts are shuffled score lower on CLIP score and the checker; noise samples are far from the
    reference in CLIP-FD; prompts that are not synthetic captions get no checker entry."""
    base = run_in_process(_overrides(trained_clip, samples_dir, builtin_shards["val"]))
    images, caps = synthetic(16, seed=7)
    shuffled = write_samples_dir(tmp_path / "shuffled", images, caps[1:] + caps[:1])
    res = run_in_process(_overrides(trained_clip, shuffled, builtin_shards["val"]))
    assert res["clip_score"] < base["clip_score"] - 5
    assert res["checker"]["accuracy/all"] < 0.5
    assert res["checker"]["strict/all"] < 0.2 and res["checker"]["strict/shape"] < 0.6
    assert res["checker"]["strict/one_object"] == 1.0  # the pictures are fine; only their prompts are wrong
    assert res["clip_fd"] == pytest.approx(base["clip_fd"], rel=1e-5)  # same images, same distance
    # a second object: the lenient reader still names the shape right, the strict checker refuses the pictures
    pics, attrs = calibration_images("two_objects", 16, 32, seed=0)
    rng = np.random.default_rng(0)
    two = write_samples_dir(
        tmp_path / "two",
        torch.from_numpy(pics).permute(0, 3, 1, 2).float() / 127.5 - 1,
        [make_caption(a, rng) for a in attrs],
    )
    res = run_in_process(_overrides(trained_clip, two, builtin_shards["val"]))["checker"]
    assert res["accuracy/shape"] > 0.8 and res["strict/one_object"] == 0.0 and res["strict/all"] == 0.0
    noise = write_samples_dir(tmp_path / "noise", torch.rand(16, 3, 32, 32) * 2 - 1, ["a photo of a dog"] * 16)
    res = run_in_process(_overrides(trained_clip, noise, builtin_shards["val"]))
    assert res["clip_fd"] > 2 * base["clip_fd"] and res["clip_kid_mean"] > base["clip_kid_mean"]
    assert res["checker"] is None


def test_evaluate_samples_clear_errors(trained_clip, samples_dir, builtin_shards, tmp_path):
    bad = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(SystemExit, match=r"error: .*not_inception.pth does not hold the FID Inception weights"):
        run_in_process(_overrides(trained_clip, samples_dir, builtin_shards["val"], [f"inception={bad}"]))
    with pytest.raises(SystemExit, match="FID Inception weights not found"):
        run_in_process(_overrides(trained_clip, samples_dir, builtin_shards["val"], [f"inception={tmp_path}/x.pth"]))
    with pytest.raises(SystemExit, match="manifest.jsonl not found"):
        run_in_process(_overrides(trained_clip, tmp_path, builtin_shards["val"]))
    with pytest.raises(SystemExit, match="missing.tar"):
        run_in_process(_overrides(trained_clip, samples_dir, str(tmp_path / "missing.tar")))


@pytest.mark.slow
def test_evaluate_with_inception_weights(trained_clip, samples_dir, builtin_shards, tmp_path):
    """FID/KID/precision/recall with an Inception weights file (random weights with O(1) features here: the real
    file is a download away)."""
    from helpers.fid_reference import spread_inception

    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(spread_inception(0).state_dict(), path)
    res = run_in_process(
        _overrides(trained_clip, samples_dir, builtin_shards["val"], [f"inception={path}", "reference.max_samples=8"])
    )
    assert res["num_reference"] == 8 and res["inception"] == str(path)
    assert res["fid"] > 1.0 and np.isfinite(res["kid_mean"])  # 16 samples vs 8 other pictures: clearly apart
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1 and res["precision_recall"]["num_each"] == 8
    assert res["preprocessing"]["image_size"] == 32


@pytest.mark.slow
def test_two_ddp_processes_equal_one(trained_clip, samples_dir, builtin_shards, tmp_path):
    one = run_in_process(_overrides(trained_clip, samples_dir, builtin_shards["val"]))
    out = tmp_path / "ddp2.json"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "eval/evaluate.py",
        *_overrides(
            trained_clip,
            samples_dir,
            builtin_shards["val"],
            [f"out={out}", "trainer.devices=2", "trainer.strategy=ddp"],
        ),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["num_samples"] == one["num_samples"] == 16 and two["num_reference"] == one["num_reference"] == 48
    for key, value in one.items():
        if isinstance(value, float):
            assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert two["checker"] == one["checker"]


@pytest.mark.slow
def test_fewer_samples_than_processes(trained_clip, builtin_shards, tmp_path):
    """2 samples on 3 processes: rank 2 reads no sample (and the loaders no batch) yet reaches every gather."""
    images, caps = synthetic(2, seed=9)
    few = write_samples_dir(tmp_path / "few", images, caps)
    one = run_in_process(_overrides(trained_clip, few, builtin_shards["val"]))
    out = tmp_path / "ddp3.json"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "eval/evaluate.py",
        *_overrides(
            trained_clip,
            few,
            builtin_shards["val"],
            [f"out={out}", "trainer.devices=3", "trainer.strategy=ddp", "reference.max_samples=2"],
        ),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    three = json.loads(out.read_text())
    assert three["num_samples"] == 2 and three["num_reference"] == 2
    assert three["checker"] == one["checker"] and three["clip_score"] == pytest.approx(one["clip_score"], rel=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_items_split_over_ranks_exactly_once(samples_dir, builtin_shards, world):
    from dalle2.metrics.samples import ReferenceImages, SampleFiles, read_manifest

    rows = read_manifest(samples_dir)
    got = [
        it["id"] for r in range(world) for it in SampleFiles(samples_dir, rows, image_size=16, rank=r, world_size=world)
    ]
    assert sorted(got) == list(range(16))
    if world == 2:  # and over DataLoader workers within a rank
        loaders = [
            torch.utils.data.DataLoader(
                SampleFiles(samples_dir, rows, image_size=16, rank=r, world_size=2), batch_size=3, num_workers=2
            )
            for r in range(2)
        ]
        assert sorted(int(i) for dl in loaders for b in dl for i in b["id"]) == list(range(16))
    ref = [
        (it["id"], it["text"])
        for r in range(world)
        for it in ReferenceImages(builtin_shards["val"], image_size=16, max_samples=40, rank=r, world_size=world)
    ]
    assert sorted(i for i, _ in ref) == list(range(40)) and all(t for _, t in ref)
    first = next(iter(ReferenceImages(builtin_shards["val"], image_size=16, max_samples=1)))
    assert first["image"].shape == (3, 16, 16) and first["valid"]
    assert -1 <= first["image"].min() < first["image"].max() <= 1


def test_corrupt_reference_images_are_skipped_and_counted(trained_clip, samples_dir, tmp_path):
    import io
    import tarfile

    images, caps = synthetic(6, seed=3)
    shard = tmp_path / "ref.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (img, cap) in enumerate(zip(images, caps)):
            buf = io.BytesIO()
            Image.fromarray(((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
            data = b"\x89PNG garbage" if i == 2 else buf.getvalue()
            for name, payload in ((f"{i:04d}.png", data), (f"{i:04d}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    res = run_in_process(_overrides(trained_clip, samples_dir, str(shard)))
    assert res["num_reference"] == 5 and res["reference_skipped"] == 1


# ------------------------------------------------------------------------------------------------ FID/KID/P&R end to end


def _shard(path: Path, images: torch.Tensor, caps: list[str]) -> str:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, (img, cap) in enumerate(zip(images, caps)):
            for ext, data in (("png", _png_bytes(img)), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png_bytes(img: torch.Tensor) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(((img + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _independent_features(files: list[Path], net) -> torch.Tensor:
    """Features of image files the reference way: PIL decode, clean-fid's own resizer to 299, / 255, ``net``."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    x = [torch.from_numpy(resize(np.asarray(Image.open(f).convert("RGB"))) / 255).permute(2, 0, 1) for f in files]
    return net(torch.stack(x).float()).double()


N_E2E = 48


def test_fid_kid_precision_recall_end_to_end_can_fail(tmp_path):
    """Samples against reference shards through the evaluator, with a feature network whose features have real
    spread: a set against itself gives FID ~0, KID at its identical-set value and precision = recall = 1; a
    brightness-shifted set gives the FID and KID computed independently (clean-fid's resizer, scipy's sqrtm, the
    MMD formula); a disjoint set gives precision and recall near 0.  The JSON names its preprocessing."""
    from lightning import Trainer

    from dalle2.metrics.score_samples import score_samples_dir
    from helpers.fid_reference import PixelProjection, scipy_fid, unbiased_mmd2

    images, caps = synthetic(N_E2E, seed=21)
    shard = _shard(tmp_path / "ref.tar", images, caps)
    net = PixelProjection(num_features=16)
    clip = CLIPModule(network=NET).eval()

    def score(samples: Path) -> dict:
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return score_samples_dir(
                str(samples),
                reference_urls=shard,
                clip=clip,
                tokenizer=get_tokenizer(None),
                trainer=trainer,
                inception=net,
                kid_subsets=1,
                kid_subset_size=1000,  # clamped to N: one subset = the whole sets, KID = the MMD formula
                batch_size=8,
            )

    same = score(write_samples_dir(tmp_path / "same", images, caps))
    ref_feats = _independent_features([tmp_path / "same" / f"{i:05d}.png" for i in range(N_E2E)], net)
    assert float(ref_feats.std(0).mean()) > 0.05  # real spread
    assert abs(same["fid"]) < 1e-6 * float(ref_feats.var(0).sum())
    assert same["kid_mean"] == pytest.approx(unbiased_mmd2(ref_feats.numpy(), ref_feats.numpy()), rel=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["preprocessing"]["image_size"] == 32 and "BICUBIC" in same["preprocessing"]["resize"]
    assert "Inception" in same["precision_recall"]["features"] and same["precision_recall"]["num_each"] == N_E2E

    brighter = (images + 0.25).clamp(-1, 1)
    shifted = score(write_samples_dir(tmp_path / "shifted", brighter, caps))
    fake_feats = _independent_features([tmp_path / "shifted" / f"{i:05d}.png" for i in range(N_E2E)], net)
    want = scipy_fid(ref_feats, fake_feats)
    assert want > 100 * abs(same["fid"]) + 1e-3
    assert shifted["fid"] == pytest.approx(want, rel=1e-5)
    kid = unbiased_mmd2(ref_feats.numpy(), fake_feats.numpy())
    assert shifted["kid_mean"] == pytest.approx(kid, rel=1e-5) and kid > same["kid_mean"] + 0.3

    # a disjoint set: flat pictures of a colour no built-in picture is mostly made of
    g = torch.Generator().manual_seed(0)
    flat = torch.tensor([0.2, -0.9, 0.9])[:, None, None] + 0.05 * torch.randn(N_E2E, 3, 32, 32, generator=g)
    far = score(write_samples_dir(tmp_path / "far", flat.clamp(-1, 1), caps))
    assert far["precision"] <= 0.05 and far["recall"] <= 0.05
    assert far["fid"] > want and far["kid_mean"] > kid


# ------------------------------------------------------------------------------------------------ CLIP score's CLIP


def test_clip_score_under_another_clip_is_named_in_the_json(trained_clip, samples_dir, builtin_shards, tmp_path):
    """clip_score.ckpt= scores samples and references with another CLIP (here an untrained one: it cannot tell
    matching prompts, so the score drops); CLIP-FD stays on clip_ckpt; the JSON names the scoring CLIP."""
    import hashlib

    other = tmp_path / "other_clip.safetensors"
    torch.manual_seed(1)
    save_safetensors(CLIPModule(network=NET).model, other)
    base = run_in_process(_overrides(trained_clip, samples_dir, builtin_shards["val"]))
    got = run_in_process(_overrides(trained_clip, samples_dir, builtin_shards["val"], [f"clip_score.ckpt={other}"]))
    assert base["clip_score_clip"]["path"] == str(trained_clip)  # default: clip_ckpt, named as well
    assert got["clip_score_clip"] == {
        "path": str(other),
        "sha256": hashlib.sha256(other.read_bytes()).hexdigest(),
        "kind": "dalle2 CLIP safetensors",
    }
    assert got["clip_fd"] == pytest.approx(base["clip_fd"], rel=1e-6)
    assert (
        abs(got["clip_score"] - base["clip_score"]) > 5 and got["reference_clip_score"] != base["reference_clip_score"]
    )


def test_clip_source_names_every_kind_of_clip_file(trained_clip, tmp_path):
    from safetensors.torch import save_file

    from dalle2.lit.clip_module import clip_source

    sd = {"visual.proj": torch.randn(4, 4), "text_projection": torch.randn(4, 4)}  # only the container matters here
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), str(tmp_path / "ViT-B-32.pt"))
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "last.ckpt").write_bytes(b"x")
    kinds = {
        p: clip_source(str(tmp_path / p))["kind"]
        for p in ("open_clip_pytorch_model.bin", "ViT-B-32.pt", "open_clip_model.safetensors", "last.ckpt")
    }
    assert kinds == {
        "open_clip_pytorch_model.bin": "OpenAI/open_clip state dict",
        "ViT-B-32.pt": "OpenAI TorchScript archive",
        "open_clip_model.safetensors": "OpenAI/open_clip state dict",
        "last.ckpt": "dalle2 checkpoint",
    }
    assert clip_source(str(trained_clip))["kind"] == "dalle2 CLIP safetensors"
