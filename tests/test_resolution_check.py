"""A stage whose resolution is larger than the pictures in its shards stops at once, naming the sizes found
(dalle2.data.resolution; train/train.py), instead of quietly training on upsampled, blurred targets."""

from __future__ import annotations

import io
import tarfile
import warnings

import pytest
from PIL import Image

from dalle2.data.resolution import ResolutionError, check_resolution, probe_image_sizes
from dalle2.data.synthetic import write_shards
from helpers.scripts import run_script


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("res64")
    return write_shards(root, num_train=8, num_val=4, image_size=64, samples_per_shard=8)


def test_probe_reads_the_picture_sizes(shards64):
    shard, sizes = probe_image_sizes(shards64["train"], max_samples=5)
    assert shard.endswith("00000.tar") and sizes == [(64, 64)] * 5


def test_too_small_pictures_are_an_error_naming_the_sizes(shards64):
    with pytest.raises(ResolutionError, match=r"256 px.*64x64 \(x8\)"):
        check_resolution(shards64["train"], 256, what="the upsampler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # large enough: no error, no warning
        assert check_resolution(shards64["train"], 64, what="the decoder") == [(64, 64)] * 8


def mixed_shard(path, sides) -> str:
    """A shard of plain JPEG pictures of the given sides (img2dataset layout)."""
    with tarfile.open(path, "w") as tar:
        for i, side in enumerate(sides):
            buf = io.BytesIO()
            Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a red picture")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_some_small_pictures_warn(tmp_path):
    urls = mixed_shard(tmp_path / "00000.tar", [32, 64, 32, 96])
    with pytest.warns(UserWarning, match="2 of the first 4 pictures .* are smaller \\(32x32 \\(x2\\)\\)"):
        assert len(check_resolution(urls, 64, what="the decoder")) == 4


def test_remote_shards_are_not_probed():
    assert probe_image_sizes("pipe:cat /nonexistent/{0..3}.tar") == (None, [])


def test_train_py_stops_at_once_naming_the_sizes(shards64, tmp_path):
    # a 64 -> 256 upsampler on 64 px pictures: stops before building anything
    proc = run_script(
        "train/train.py",
        "experiment=upsampler_tiny",
        "module.image_size=256",
        "module.lowres_size=64",
        f"data.train_urls='{shards64['train']}'",
        f"data.val_urls='{shards64['val']}'",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode != 0
    assert "upsampler" in proc.stderr and "256 px" in proc.stderr and "64x64" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
