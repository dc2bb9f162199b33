"""COCO zero-shot FID (eval/coco_fid.py) on a tiny fake COCO layout made here: the caption draw, the clean resize,
precision/recall on synthetic features, the whole run (captions, samples, metrics JSON), the reference cache hit on
a second run, resuming after lost / broken PNGs, settings checks, and the same PNGs with 2 DDP CPU processes (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from dalle2.metrics.coco import CocoCaptions, ReferenceCache, draw_captions, reference_files
from dalle2.metrics.fid import frechet_distance, frechet_distance_from_stats, gaussian_stats
from dalle2.metrics.precision_recall import knn_radii, precision_recall
from dalle2.metrics.resize import clean_resize, inception_input, resize_center_crop
from dalle2.pipeline import SamplingSettings
from helpers.cascade import build_tiny_checkpoints
from helpers.scripts import compose_conf, load_script

SIZES = [(48, 36), (36, 48), (40, 40), (64, 30), (33, 45), (50, 38), (44, 44), (30, 60), (52, 39), (41, 31)]
N = 8  # captions drawn (of 10 images)


def make_fake_coco(root: Path, *, corrupt: int | None = None) -> dict:
    """``root/annotations/captions_val2014.json`` (COCO schema) and ``root/val2014/*.jpg``: 10 images of varied sizes
    and aspect ratios, 1 to 5 captions each (annotation ids not in image order); image ``corrupt`` is a broken JPEG."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, anns, ann_id = [], [], 1000
    for j, (w, h) in enumerate(SIZES):
        image_id = 100 + 7 * j
        name = f"COCO_val2014_{image_id:012d}.jpg"
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "val2014" / name, quality=90)
        if j == corrupt:
            data = (root / "val2014" / name).read_bytes()
            (root / "val2014" / name).write_bytes(data[: len(data) // 3])
        images.append({"id": image_id, "file_name": name, "height": h, "width": w, "license": 1})
        for c in range(1 + j % 5):
            ann_id += 37
            anns.append({"image_id": image_id, "id": ann_id, "caption": f" a picture number {j} caption {c}\n"})
    rng.shuffle(anns)
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    return {"captions": root / "annotations" / "captions_val2014.json", "images": root / "val2014"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    return make_fake_coco(tmp_path_factory.mktemp("coco"), corrupt=9)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("coco_ckpts")
    paths = build_tiny_checkpoints(root)
    from helpers.fid_reference import spread_inception

    paths["inception"] = str(root / "pt_inception-2015-12-05-6726825d.pth")
    # random weights with O(1) features (the default init gives ~1e-8: every figure would be ~0 and pass any
    # tolerance); the real file is a download away
    torch.save(spread_inception(0).state_dict(), paths["inception"])
    return paths


def overrides(coco: dict, ckpts: dict, out: Path, extra=()) -> list[str]:
    keys = {e.split("=", 1)[0] for e in extra}
    base = [
        f"captions={coco['captions']}",
        f"images={coco['images']}",
        f"n={N}",
        "seed=3",
        f"out={out}",
        f"ckpt.clip={ckpts['clip']}",
        f"ckpt.prior={ckpts['prior']}",
        f"ckpt.decoder={ckpts['decoder']}",
        f"ckpt.upsamplers=[{ckpts['upsampler']}]",
        "batch_size=3",
        "steps.prior=2",
        "steps.decoder=2",
        "steps.upsampler=2",
        "image_size=32",
        f"ref_cache={out.parent / 'cache'}",
        "kid.subsets=5",
        "eval.num_workers=0",
        "eval.batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


def run_in_process(args: list[str]) -> dict | None:
    """eval/coco_fid.py's ``run(cfg)`` on conf/coco.yaml + ``args`` in this process, with one intra-op thread (as
    each of 2 DDP CPU processes gets on 2 cores: the same float summation order)."""
    cfg = compose_conf("coco", list(args))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_script("eval", "coco_fid").run(cfg)
    finally:
        torch.set_num_threads(threads)


def pngs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / "samples").glob("*.png")) if p.name != "grid.png"}


@pytest.fixture(scope="module")
def first_run(coco, ckpts, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("coco_run") / "out"
    return out, run_in_process(overrides(coco, ckpts, out, [f"inception={ckpts['inception']}"]))


# ------------------------------------------------------------------------------------------------ captions


def test_caption_draw_is_seeded_one_per_image_and_nested(coco):
    c = CocoCaptions(coco["captions"])
    rows = draw_captions(c, n=N, seed=3)
    assert rows == draw_captions(CocoCaptions(coco["captions"]), n=N, seed=3)  # deterministic
    assert [r["index"] for r in rows] == list(range(N))
    assert len({r["image_id"] for r in rows}) == N  # one caption per image id
    for r in rows:  # the caption is one of that image's own, whitespace-normalised
        assert (r["caption_id"], r["caption"]) in c.captions[r["image_id"]]
        assert r["file_name"] == c.files[r["image_id"]] and r["caption"] == r["caption"].strip()
    assert draw_captions(c, n=4, seed=3) == rows[:4]  # a smaller n is a prefix: a partial run resumes
    other = draw_captions(c, n=N, seed=4)
    assert [(r["image_id"], r["caption_id"]) for r in other] != [(r["image_id"], r["caption_id"]) for r in rows]
    # images with several captions do not always get their first one
    many = [r for r in draw_captions(c, n=10, seed=3) if len(c.captions[r["image_id"]]) > 1]
    assert any(r["caption_id"] != c.captions[r["image_id"]][0][0] for r in many)
    with pytest.raises(ValueError, match="n=11"):
        draw_captions(c, n=11, seed=3)


def test_bad_coco_inputs_are_clear_errors(coco, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="file_name"):
        CocoCaptions(bad)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        CocoCaptions(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        CocoCaptions(tmp_path / "nope.json")
    c = CocoCaptions(coco["captions"])
    with pytest.raises(FileNotFoundError, match=r"10 of 10 reference images .* are not under"):
        reference_files(c, tmp_path)
    refs = reference_files(c, coco["images"])
    assert [p.name for _, p in refs] == sorted(c.files.values())
    assert reference_files(c, coco["images"], n_ref=4, seed=3) == sorted(
        ((i, coco["images"] / c.files[i]) for i in c.seeded_order(3)[:4]), key=lambda t: t[1].name
    )


# ------------------------------------------------------------------------------------------------ resize


def test_resize_is_pil_bicubic_shorter_side_then_centre_crop():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 47, 3)).astype(np.uint8)  # H=30, W=47
    got = resize_center_crop(Image.fromarray(img), 16)
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    # documented: shorter side 30 -> 16, width round(47 * 16 / 30) = 25; each channel a float32 PIL image resized
    # with BICUBIC (clean-fid's make_resizer("PIL", False, "bicubic")), clipped, rounded; crop at (25 - 16) // 2 = 4
    want = np.stack(
        [
            np.asarray(
                Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((25, 16), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ],
        axis=2,
    )
    want = np.rint(np.clip(want, 0, 255)).astype(np.uint8)[:, 4:20]
    np.testing.assert_array_equal(got, want)
    # and close to PIL's ordinary 8-bit bicubic, which rounds to 8 bits between its horizontal and vertical passes
    # (the quantisation clean-fid avoids): on noise, a few levels at most, rarely more than one
    pil8 = np.asarray(Image.fromarray(img).resize((25, 16), Image.Resampling.BICUBIC))[:, 4:20]
    diff = np.abs(got.astype(int) - pil8)
    assert diff.max() <= 4 and (diff > 1).mean() < 0.01 and diff.mean() < 0.5
    # portrait: the crop is vertical; an image already at the size passes unchanged
    assert resize_center_crop(img.transpose(1, 0, 2).copy(), 16).shape == (16, 16, 3)
    np.testing.assert_array_equal(resize_center_crop(got, 16), got)
    # Inception input: clean-fid's float resize to 299, [0, 1]
    x = inception_input(got)
    assert x.shape == (3, 299, 299) and 0 <= float(x.min()) and float(x.max()) <= 1
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, clean_resize(got, (299, 299)), atol=1e-3)


# ------------------------------------------------------------------------------------------------ metrics


def test_precision_recall_known_outcomes():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=g)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    far = torch.randn(200, 16, generator=g) + 100.0
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    # mode collapse: fakes crowd around 5 real points -> every fake is realistic, most real points are not covered
    collapsed = real[:5].repeat(20, 1) + 0.01 * torch.randn(100, 16, generator=g)
    pr = precision_recall(real, collapsed, equal_sizes=False)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.2
    # equal sizes (the default): the 300 real rows cut to 100 by a seeded draw; the 5 crowded points may be cut too
    from dalle2.metrics.precision_recall import equal_size_rows

    rows, none = equal_size_rows(300, 100, seed=0)
    assert none is None and len(rows) == 100 and len(set(rows.tolist())) == 100
    assert precision_recall(real, collapsed) == precision_recall(real[rows], collapsed, equal_sizes=False)
    assert not torch.equal(equal_size_rows(300, 100, seed=1)[0], rows)  # another seed, another draw
    # a wider fake distribution covers the real one but many fakes are off it
    wide = torch.randn(300, 16, generator=g) * 3
    pr = precision_recall(real, wide)
    assert pr["recall"] > 0.8 and pr["precision"] < 0.3
    # chunked = one block = brute force
    assert precision_recall(real, wide, chunk_size=7) == precision_recall(real, wide, chunk_size=10_000)
    brute = torch.cdist(real.double(), real.double()).kthvalue(4, dim=1).values  # self (0) + 3 neighbours
    torch.testing.assert_close(knn_radii(real, k=3, chunk_size=13), brute, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="k < N"):
        knn_radii(real[:3], k=3)


def test_fid_from_cached_statistics_equals_fid_from_features():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, generator=g), torch.randn(50, 8, generator=g) * 1.5 + 0.3
    ma, sa = gaussian_stats(a)
    mb, sb = gaussian_stats(b)
    assert frechet_distance_from_stats(ma, sa, mb, sb) == pytest.approx(frechet_distance(a, b), rel=1e-9)


# ------------------------------------------------------------------------------------------------ the whole run


def test_run_writes_captions_samples_and_a_self_describing_json(first_run, coco):
    out, res = first_run
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert rows == draw_captions(CocoCaptions(coco["captions"]), n=N, seed=3)
    assert sorted(pngs(out)) == [f"{j:05d}.png" for j in range(N)]
    assert Image.open(out / "samples" / "00000.png").size == (32, 32)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(res))
    assert res["counts"] == {
        "captions": N,
        "samples": N,
        "samples_skipped": 0,
        "reference": 9,
        "reference_skipped": 1,
        "kid_subset_size": 8,
    }  # the broken JPEG: skipped, counted
    for key in ("fid", "kid_mean", "precision", "recall", "clip_score"):
        assert np.isfinite(res[key]), key
    assert res["fid"] > 0 and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1 and 0 <= res["clip_score"] <= 100
    assert "bicubic" in res["resize"] and "centre crop" in res["resize"] and res["image_size"] == 32
    assert res["seeds"]["caption_draw"] == 3 and res["steps"]["decoder"] == 2 and res["guidance"]["decoder"] == 3.0
    assert res["sampler"]["decoder"] == SamplingSettings().decoder.sampler  # the default, as run
    assert res["sampling"]["decoder"]["steps"] == 2
    assert len(res["sha256"]["decoder"]) == 64 and len(res["sha256"]["upsamplers"]) == 1
    assert res["checkpoints"]["inception"].endswith(".pth") and "torchmetrics" in res["implementation"]["fid"]
    assert res["reference_cache"]["hit"] is False and Path(res["reference_cache"]["file"]).is_file()


@pytest.mark.slow
def test_metrics_equal_an_independent_computation(first_run, coco, ckpts):
    """FID, KID and precision/recall of the run recomputed from the image files the reference way: our shorter-side
    crop (checked against PIL above), clean-fid's own resizer to 299, the Inception (sample features all recomputed,
    reference features read from the run's cache and two of them recomputed), scipy's sqrtm FID, the MMD formula,
    brute-force k-NN balls on equal-size sets."""
    from cleanfid.resize import make_resizer

    from dalle2.metrics.inception import load_fid_inception
    from helpers.fid_reference import scipy_fid, unbiased_mmd2

    out, res = first_run
    net = load_fid_inception(ckpts["inception"])
    resize = make_resizer("PIL", False, "bicubic", (299, 299))

    def features(paths) -> torch.Tensor:
        x = [torch.from_numpy(resize(resize_center_crop(Image.open(p), 32)) / 255).permute(2, 0, 1) for p in paths]
        return net(torch.stack(x).float()).double()

    fake = features(sorted(p for p in (out / "samples").glob("0*.png")))
    # the reference features the run cached (9 readable images; one JPEG is truncated), two of them recomputed here
    cached = np.load(res["reference_cache"]["file"], allow_pickle=False)
    real = torch.from_numpy(cached["features"]).double()
    refs = [p for _, p in reference_files(CocoCaptions(coco["captions"]), coco["images"]) if _readable(p)]
    assert len(fake) == N and len(real) == len(refs) == 9 and float(fake.std(0).mean()) > 0.01
    torch.testing.assert_close(features([refs[0], refs[5]]), real[[0, 5]], rtol=1e-5, atol=1e-5)
    assert res["fid"] == pytest.approx(scipy_fid(real, fake), rel=1e-5)
    # KID: 5 subsets of min(1000, 9, 8) = 8 rows; with 8 of 9 reference rows per subset, each subset's MMD lies
    # within the range of the whole-set statistic's leave-one-out values
    loo = [unbiased_mmd2(np.delete(real.numpy(), i, 0), fake.numpy()) for i in range(9)]
    assert min(loo) - 1e-9 <= res["kid_mean"] <= max(loo) + 1e-9
    # precision/recall on equal sizes: the reference set cut to 8 rows by the seeded draw
    from dalle2.metrics.precision_recall import equal_size_rows

    rows, _ = equal_size_rows(9, 8, seed=0)
    r = real[rows]
    rad_r = torch.cdist(r, r).kthvalue(4, dim=1).values
    rad_f = torch.cdist(fake, fake).kthvalue(4, dim=1).values
    precision = float((torch.cdist(fake, r) <= rad_r[None, :]).any(1).double().mean())
    recall = float((torch.cdist(r, fake) <= rad_f[None, :]).any(1).double().mean())
    assert (res["precision"], res["recall"]) == pytest.approx((precision, recall))
    assert res["preprocessing"]["image_size"] == 32 and "smaller's size" in res["implementation"]["precision_recall"]


def _readable(path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except OSError:
        return False


def test_second_run_hits_the_reference_cache(first_run, coco, ckpts, tmp_path):
    out, res = first_run
    cache_file = Path(res["reference_cache"]["file"])
    before = cache_file.stat().st_mtime_ns
    # another out folder, same reference set: the reference images are not read again
    other = out.parent / "out2"
    again = run_in_process(overrides(coco, ckpts, other, [f"inception={ckpts['inception']}"]))
    assert again["reference_cache"] == {"file": str(cache_file), "hit": True}
    assert cache_file.stat().st_mtime_ns == before
    assert pngs(other) == pngs(out)
    for key in ("fid", "kid_mean", "precision", "recall", "clip_score"):
        assert again[key] == pytest.approx(res[key], rel=1e-9, abs=1e-12), key
    assert again["counts"] == res["counts"]
    # another reference set (n_ref) or another resize -> another key
    cache = ReferenceCache(cache_file.parent)
    assert len(list(cache.directory.glob("*.npz"))) == 1
    sub = run_in_process(overrides(coco, ckpts, other, [f"inception={ckpts['inception']}", "n_ref=5"]))
    assert sub["reference_cache"]["hit"] is False and sub["counts"]["reference"] <= 5
    assert len(list(cache.directory.glob("*.npz"))) == 2
    # a damaged cache file is recomputed, never trusted
    cache_file.write_bytes(b"not an npz")
    third = run_in_process(overrides(coco, ckpts, other, [f"inception={ckpts['inception']}"]))
    assert third["reference_cache"]["hit"] is False and third["fid"] == pytest.approx(res["fid"], rel=1e-9)


def test_resume_rewrites_only_missing_or_broken_pngs(first_run, coco, ckpts, tmp_path, capsys):
    out, _ = first_run
    ref = pngs(out)
    # a run stopped after 6 of the 8 images (two whole batches of 3): n=6 first, then the full n
    part = tmp_path / "part"
    run_in_process(overrides(coco, ckpts, part, ["n=6"]))
    assert pngs(part) == {k: v for k, v in ref.items() if k < "00006.png"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (part / "samples").glob("0*.png")}
    capsys.readouterr()
    run_in_process(overrides(coco, ckpts, part))
    assert pngs(part) == ref  # the same bytes as an uninterrupted run
    assert all((part / "samples" / k).stat().st_mtime_ns == t for k, t in mtimes.items())
    assert "2 batches already done, 2 images written" in capsys.readouterr().out
    # a lost PNG (batch 0) and a truncated one (batch 2): those batches are sampled again whole (same batch mates,
    # same bytes), and only the two files are written
    (part / "samples" / "00001.png").unlink()
    broken = part / "samples" / "00006.png"
    broken.write_bytes(broken.read_bytes()[:40])
    mtimes = {p.name: p.stat().st_mtime_ns for p in (part / "samples").glob("0*.png") if p.name != "00006.png"}
    capsys.readouterr()
    run_in_process(overrides(coco, ckpts, part))
    assert pngs(part) == ref
    assert "1 batches already done, 2 images written" in capsys.readouterr().out
    assert all((part / "samples" / k).stat().st_mtime_ns == t for k, t in mtimes.items())


def test_other_settings_in_the_same_out_stop_with_a_message(first_run, coco, ckpts):
    out, _ = first_run
    copy = out.parent / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(SystemExit, match=r"other settings \(seed differ\)"):
        run_in_process(overrides(coco, ckpts, copy, ["seed=4"]))
    with pytest.raises(SystemExit, match=r"other settings \(settings differ\)"):
        run_in_process(overrides(coco, ckpts, copy, ["steps.decoder=3"]))
    with pytest.raises(SystemExit, match="does not hold the FID Inception weights"):
        bad = copy / "bad.pth"
        torch.save({"x": torch.zeros(1)}, bad)
        run_in_process(overrides(coco, ckpts, copy, [f"inception={bad}"]))


def test_force_moves_the_old_run_aside_and_the_identity_names_what_ran(first_run, coco, ckpts):
    """force=true with other settings: the old PNGs (and the files describing them) go to out/replaced-<time>/, the
    new run starts in an empty samples folder; run twice, both old runs are still there. generation.json names the
    tokenizer, the precision and the accelerator that made the images."""
    out, _ = first_run
    copy = out.parent / "forced"
    shutil.copytree(out, copy)
    old = pngs(copy)
    ident = json.loads((copy / "generation.json").read_text())
    assert ident["precision"] == "32-true" and ident["accelerator"] == "cpu"
    assert len(ident["tokenizer"]["sha256"]) == 64 and ident["tokenizer"]["context_length"] > 0
    run_in_process(overrides(coco, ckpts, copy, ["seed=4", "force=true"]))
    [moved] = sorted(copy.glob("replaced-*"))
    assert {p.name: p.read_bytes() for p in sorted((moved / "samples").glob("0*.png"))} == old  # kept, intact
    assert json.loads((moved / "generation.json").read_text())["seed"] == 3
    new = pngs(copy)
    assert sorted(new) == sorted(old) and all(new[k] != old[k] for k in new)  # every PNG made anew, none mixed in
    assert json.loads((copy / "generation.json").read_text())["seed"] == 4
    run_in_process(overrides(coco, ckpts, copy, ["seed=3", "force=true"]))  # and back: two old runs kept
    replaced = sorted(copy.glob("replaced-*"))
    assert len(replaced) == 2 and pngs(copy) == old
    assert {p.name: p.read_bytes() for p in sorted((replaced[1] / "samples").glob("0*.png"))} == new


@pytest.mark.slow
def test_two_ddp_processes_write_the_same_pngs(first_run, coco, ckpts, tmp_path):
    out, res = first_run
    two = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "eval/coco_fid.py",
        *overrides(coco, ckpts, two, ["trainer.devices=2", "trainer.strategy=ddp"]),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pngs(two) == pngs(out)
    got = json.loads((two / "metrics.json").read_text())
    assert got["counts"]["samples"] == N and got["clip_score"] == pytest.approx(res["clip_score"], rel=1e-6)
    assert got["fid"] is None  # no inception= here
