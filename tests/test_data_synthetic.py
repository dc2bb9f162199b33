"""Built-in synthetic data: captions parse back, the pixel checker scores clean renders ~1 and shuffles ~chance."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.data.synthetic import (
    ATTRIBUTES,
    check_images,
    make_caption,
    parse_caption,
    random_captions,
    render,
    sample_attributes,
    write_shards,
)


def _attrs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_attributes(rng) for _ in range(n)], rng


def test_every_template_parses_back():
    attrs, rng = _attrs(200)
    for a in attrs:
        assert parse_caption(make_caption(a, rng)) == a


def test_parse_caption_errors_and_synonyms():
    assert parse_caption("a big grey square", strict=False) == {
        "shape": "square",
        "background": "gray",
        "size": "large",
    }
    with pytest.raises(ValueError, match="does not name"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="two values for color"):
        parse_caption("a red blue circle", strict=False)


def test_render_shapes_and_bad_attrs():
    attrs, rng = _attrs(1)
    img = render(attrs[0], 32, rng)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="shape='hexagon'"):
        render({**attrs[0], "shape": "hexagon"}, 32)


@pytest.mark.parametrize("size", [32, 64])
def test_checker_clean_is_perfect_and_shuffled_is_chance(size):
    attrs, rng = _attrs(120, seed=size)
    imgs = np.stack([render(a, size, rng) for a in attrs])
    clean = check_images(imgs, attrs)
    assert clean["accuracy/all"] == 1.0 and clean["accuracy/mean"] == 1.0
    shuffled = list(attrs)
    np.random.default_rng(1).shuffle(shuffled)
    bad = check_images(imgs, shuffled)
    assert bad["accuracy/all"] < 0.1
    assert bad["accuracy/shape"] < 0.45 and bad["accuracy/color"] < 0.4


def test_checker_float_input_and_mild_noise():
    attrs, rng = _attrs(80, seed=3)
    imgs = np.stack([render(a, 32, rng) for a in attrs])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert check_images(x, attrs)["accuracy/all"] == 1.0
    assert check_images((x + 1) / 2, attrs, value_range=(0, 1))["accuracy/all"] == 1.0
    noisy = (x + 0.08 * torch.randn_like(x)).clamp(-1, 1)
    assert check_images(noisy, attrs)["accuracy/mean"] > 0.97
    with pytest.raises(ValueError, match="images but"):
        check_images(x, attrs[:3])


def test_write_shards_layout(builtin_shards):
    assert builtin_shards["train"].endswith("train/{00000..00003}.tar")
    assert builtin_shards["val"].endswith("val/{00000..00000}.tar")
    path = builtin_shards["root"] + "/train/00000.tar"
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        meta = json.loads(tar.extractfile("000000000.json").read())
        caption = tar.extractfile("000000000.txt").read().decode()
        img = np.asarray(Image.open(io.BytesIO(tar.extractfile("000000000.jpg").read())))
    assert meta["key"] == "000000000" and meta["status"] == "success" and meta["width"] == 32
    assert parse_caption(caption) == {a: meta[a] for a in ATTRIBUTES}
    assert check_images(img[None], [meta])["accuracy/all"] == 1.0


def test_write_shards_deterministic(tmp_path):
    a = write_shards(tmp_path / "a", num_train=10, num_val=3, image_size=16, samples_per_shard=4, seed=5)
    write_shards(tmp_path / "b", num_train=10, num_val=3, image_size=16, samples_per_shard=4, seed=5)
    assert a["train"].endswith("{00000..00002}.tar")
    assert (tmp_path / "a/train/00002.tar").read_bytes() == (tmp_path / "b/train/00002.tar").read_bytes()


def test_random_captions():
    caps = random_captions(50, seed=1)
    assert len(caps) == 50 and caps == random_captions(50, seed=1) and len(set(caps)) > 30


def test_cli_writes_shards(tmp_path, capsys):
    from dalle2.data.synthetic import main

    main(
        ["--out", str(tmp_path), "--num-train", "5", "--num-val", "2", "--image-size", "16", "--samples-per-shard", "3"]
    )
    out = capsys.readouterr().out
    assert "train: " in out and "{00000..00001}.tar" in out
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["00000.tar", "00001.tar"]
    with pytest.raises(ValueError, match="image_format"):
        write_shards(tmp_path, num_train=1, num_val=0, image_format="gif")


def test_jitter_option_scales_the_variation(tmp_path):
    from dalle2.data.synthetic import main, strict_verdicts

    kw = dict(num_train=6, num_val=2, image_size=32, samples_per_shard=8, seed=5)
    write_shards(tmp_path / "a", **kw)
    write_shards(tmp_path / "b", **kw, jitter=1.0)
    main(
        [
            "--out",
            str(tmp_path / "c"),
            "--num-train",
            "6",
            "--num-val",
            "2",
            "--image-size",
            "32",
            "--samples-per-shard",
            "8",
            "--seed",
            "5",
            "--jitter",
            "1.2",
        ]
    )
    same = (tmp_path / "a/train/00000.tar").read_bytes()
    assert same == (tmp_path / "b/train/00000.tar").read_bytes()  # jitter 1 = the built-in data, byte for byte
    with tarfile.open(tmp_path / "a/train/00000.tar") as ta, tarfile.open(tmp_path / "c/train/00000.tar") as tc:
        assert [ta.extractfile(n).read() for n in ta.getnames() if n.endswith(".txt")] == [
            tc.extractfile(n).read() for n in tc.getnames() if n.endswith(".txt")
        ]  # same captions
        assert ta.extractfile("000000000.jpg").read() != tc.extractfile("000000000.jpg").read()  # other pictures
    # the largest jitter the CLI help promises keeps every shape off the border of a 32 px picture
    rng = np.random.default_rng(0)
    attrs = [{**sample_attributes(rng), "size": "large", "position": p} for p in ("left", "right") * 40]
    imgs = np.stack([render(a, 32, rng, jitter=1.2) for a in attrs])
    v = strict_verdicts(imgs, attrs)
    assert not v["touches_border"].any() and v["ok"].all()


def _members(url_pattern_dir):
    out = {}
    for tar_path in sorted(url_pattern_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                out[name] = tar.extractfile(name).read()
    return out


def test_cli_writes_disjoint_train_val_test_splits(tmp_path, capsys):
    """Choose on val, report on test: the CLI writes three held-apart splits; test draws from its own stream, and
    adding it leaves train and val byte for byte as before."""
    from dalle2.data.synthetic import main

    main(["--out", str(tmp_path / "a"), "--num-train", "6", "--num-val", "5", "--image-size", "16"])
    out = capsys.readouterr().out
    assert "test: " in out and (tmp_path / "a/test/00000.tar").is_file()
    train, val, test = (_members(tmp_path / "a" / s) for s in ("train", "val", "test"))
    assert len(test) == len(val) == 15  # --num-test defaults to --num-val (3 members per sample)
    keys = [{n.split(".")[0] for n in m} for m in (train, val, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    images = [{v for n, v in m.items() if n.endswith(".jpg")} for m in (train, val, test)]
    assert not (images[2] & images[1]) and not (images[2] & images[0])  # no test picture is a val/train picture
    # another seed stream: test sample i is not val sample i (captions differ somewhere)
    caps = [[m[n] for n in sorted(m) if n.endswith(".txt")] for m in (val, test)]
    assert caps[0] != caps[1]
    main(["--out", str(tmp_path / "b"), "--num-train", "6", "--num-val", "5", "--num-test", "9", "--image-size", "16"])
    assert _members(tmp_path / "b/train") == train and _members(tmp_path / "b/val") == val
    assert len(_members(tmp_path / "b/test")) == 27
    urls = write_shards(tmp_path / "c", num_train=2, num_val=2, num_test=0, image_size=16)
    assert set(urls) == {"train", "val"} and not (tmp_path / "c/test").exists()
    with pytest.raises(ValueError, match="num_test"):
        write_shards(tmp_path / "d", num_train=2, num_val=2, num_test=-1)


def test_reuse_keeps_shards_of_the_size_asked_and_rewrites_others(tmp_path, capsys):
    """`make demo` / `make data` pass --reuse: shards already there at --image-size are kept (not rewritten), shards
    of another size (the 64 px built-in data of older versions) or an incomplete set are written again."""
    from dalle2.data.synthetic import main

    args = ["--out", str(tmp_path), "--num-train", "6", "--num-val", "5", "--samples-per-shard", "4", "--reuse"]
    main([*args, "--image-size", "16"])
    shard = tmp_path / "train/00001.tar"
    before = shard.stat().st_mtime_ns
    capsys.readouterr()
    main([*args, "--image-size", "16"])
    assert "kept" in capsys.readouterr().out and shard.stat().st_mtime_ns == before
    main([*args, "--image-size", "24"])  # another size: rewritten
    assert "kept" not in capsys.readouterr().out
    from dalle2.data.resolution import probe_image_sizes

    assert probe_image_sizes(str(shard))[1][0] == (24, 24)
    (tmp_path / "test/00001.tar").unlink()  # incomplete: rewritten
    main([*args, "--image-size", "24"])
    assert "kept" not in capsys.readouterr().out and (tmp_path / "test/00001.tar").is_file()
