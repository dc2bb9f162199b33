"""WebDataset reading: batch contract, workers, crops, embeddings, bad input skipped and counted, missing shards."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.data.datamodule import WebDataModule
from dalle2.data.synthetic import ATTRIBUTES, parse_caption
from dalle2.data.webdataset import expand_urls, load_rgb, make_dataset
from helpers.shards import TOK, png, write_tar


def _loader(ds, workers):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def _read_all(urls, workers=0, **kw):
    kw = {"image_size": 32, "tokenizer": TOK, "train": False, "batch_size": 16, **kw}
    return list(_loader(make_dataset(urls, num_workers=workers, **kw), workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_val_reads_every_sample_once_with_contract(builtin_shards, workers):
    batches = _read_all(builtin_shards["train"], workers=workers)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 256 and len(set(keys)) == 256
    b = batches[0]
    assert b["image"].dtype == torch.float32 and b["image"].shape == (16, 3, 32, 32)
    assert -1.0 <= b["image"].min() < -0.5 and 0.5 < b["image"].max() <= 1.0
    assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (16, 77)
    assert isinstance(b["caption"][0], str) and b["skipped"] == {}
    for cap, meta in zip(b["caption"], b["meta"]):
        assert parse_caption(cap) == {a: meta[a] for a in ATTRIBUTES}


def test_train_stream_is_resampled_and_sized(builtin_shards):
    ds = make_dataset(
        builtin_shards["val"],
        image_size=32,
        tokenizer=TOK,
        train=True,
        batch_size=8,
        epoch_size=40,
        num_workers=2,
        shuffle_buffer=50,
    )
    batches = list(_loader(ds, 2))
    # 1 shard of 64 samples, 2 workers, epoch of 40 samples/rank: ceil(40/(8*2)) = 3 batches per worker
    assert len(batches) == ds.batches_per_epoch == 6
    assert all(b["image"].shape == (8, 3, 32, 32) for b in batches)


def test_random_vs_center_crop():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = 255  # left half white
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    data = buf.getvalue()
    center = load_rgb(data, image_size=16)
    assert center.shape == (3, 16, 16) and center.dtype == torch.float32
    assert torch.allclose(center, load_rgb(data, image_size=16))  # deterministic
    import random

    rng = random.Random(0)
    means = {round(load_rgb(data, image_size=16, random_crop=True, rng=rng).mean().item(), 2) for _ in range(20)}
    assert len(means) > 3  # different crops show different amounts of white
    grey = load_rgb(png((128, 128, 128), (50, 20)), image_size=8)
    assert grey.shape == (3, 8, 8) and abs(grey.mean().item()) < 0.01


def test_bad_samples_skipped_and_counted(tmp_path):
    good = [("a.png", png()), ("a.txt", b"a red picture"), ("a.json", b'{"x": 1}')]
    bad = [
        ("b.jpg", b"not a jpeg at all"),
        ("b.txt", b"corrupt image"),
        ("c.png", png()),
        ("c.txt", b"   \n"),
        ("d.txt", b"no image here"),
        ("e.png", png()),
        ("f.webp", png()),
        ("f.txt", b"png bytes under .webp still decode"),
    ]
    url = write_tar(tmp_path / "bad.tar", good + bad)
    batches = _read_all(url)
    assert sorted(k for b in batches for k in b["key"]) == ["a", "f"]
    assert batches[0]["meta"][batches[0]["key"].index("a")] == {"x": 1}
    assert batches[-1]["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1, "missing_caption": 1}


def test_truncated_tar_warns_and_keeps_flowing(builtin_shards, tmp_path):
    src = os.path.join(builtin_shards["root"], "train", "00000.tar")
    data = open(src, "rb").read()
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(data[: len(data) // 2 + 300])
    good = os.path.join(builtin_shards["root"], "train", "00001.tar")
    with pytest.warns(UserWarning, match="unreadable shard"):
        batches = _read_all([str(trunc), good])
    keys = [k for b in batches for k in b["key"]]
    assert 64 + 20 < len(keys) < 128 and len(set(keys)) == len(keys)
    skipped = {}
    for b in batches:
        for r, n in b["skipped"].items():
            skipped[r] = skipped.get(r, 0) + n
    assert skipped.get("bad_shard", 0) >= 1


def test_missing_shard_is_named(builtin_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing shard '.*00004\.tar'"):
        expand_urls(builtin_shards["train"].replace("00003", "00009"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(str(tmp_path / "*.tar"))
    assert expand_urls("pipe:curl -s http://x/{0..1}.tar::s3://b/a.tar") == [
        "pipe:curl -s http://x/0.tar",
        "pipe:curl -s http://x/1.tar",
        "s3://b/a.tar",
    ]
    assert len(expand_urls([builtin_shards["val"], builtin_shards["train"]])) == 5
    dm = WebDataModule(train_urls=str(tmp_path / "nope/{00000..00001}.tar"), tokenizer=TOK, num_workers=0)
    with pytest.raises(FileNotFoundError, match="nope/00000.tar"):
        dm.setup("fit")


def test_embedding_shards(tmp_path):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    members = []
    for i in range(5):
        k = f"{i:09d}"
        members += [
            (f"{k}.png", png()),
            (f"{k}.txt", f"caption {i}".encode()),
            (f"{k}.img_emb.npy", npy(np.full(8, i, np.float16))),
            (f"{k}.txt_emb.npy", npy(np.ones(8, np.float32))),
            (f"{k}.txt_tokens.npy", npy(np.zeros((77, 6), np.float16))),
        ]
    members += [("000000009.png", png()), ("000000009.txt", b"no embeddings")]
    url = write_tar(tmp_path / "emb.tar", members)
    (b,) = _read_all(url, load_embeddings=True, batch_size=8)
    assert b["img_emb"].shape == (5, 8) and b["img_emb"].dtype == torch.float32
    assert b["txt_emb"].shape == (5, 8) and b["txt_tokens"].shape == (5, 77, 6)
    assert b["img_emb"][3, 0] == 3 and b["image"].shape == (5, 3, 32, 32)
    assert b["skipped"] == {"missing_embedding": 1}
    (b,) = _read_all(url, load_embeddings=True, load_image=False, batch_size=8)
    assert "image" not in b and b["txt_tokens"].shape == (5, 77, 6)


def test_datamodule_pops_skipped_and_state(builtin_shards):
    dm = WebDataModule(
        train_urls=builtin_shards["train"],
        val_urls=builtin_shards["val"],
        image_size=32,
        batch_size=16,
        num_workers=0,
        epoch_size=32,
        tokenizer=TOK,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch["skipped"] = {"corrupt_image": 2}
    batch = dm.on_before_batch_transfer(batch, 0)
    assert "skipped" not in batch and dm.skipped == {"corrupt_image": 2}
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 64
    dm.epoch = 3
    state = dm.state_dict()
    dm2 = WebDataModule(train_urls=builtin_shards["train"], tokenizer=TOK)
    dm2.load_state_dict(state)
    assert dm2.epoch == 3 and dm2.skipped == {"corrupt_image": 2}
