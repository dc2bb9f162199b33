"""Unhappy data streams (issue 17, "never spin silently"): a training stream with no usable sample fails within
seconds naming why (skip reasons and counts, shards, a hint), also from DataLoader workers and through
train/train.py; validation tolerates bad shards and warns when it yields nothing; a ``pipe:`` shard whose command
fails is a counted bad shard; ``s3://`` / ``gs://`` / configured schemes read through commands; an unknown scheme
fails before training, naming the url."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import time

import pytest

from dalle2.data.datamodule import WebDataModule
from dalle2.data.webdataset import expand_urls, make_dataset
from helpers.shards import TOK, fake_command, png, tar_keys, write_tar
from helpers.tiny_runs import empty_tar, run

HANG_S = 60  # pytest-timeout fails a stream that spins (today's main spun forever)
FAST_S = 20  # a stream with no usable sample must fail faster than this (2 busy shared cores)
_DEFAULTS = inspect.signature(WebDataModule).parameters


def _dm(train, val=None, *, workers=0, **kw):
    kw = {
        "image_size": 32,
        "batch_size": 8,
        "num_workers": workers,
        "epoch_size": 64,
        "shuffle_buffer": 20,
        "tokenizer": TOK,
        **kw,
    }
    dm = WebDataModule(train_urls=train, val_urls=val, **kw)
    dm.setup("fit")
    return dm


def _raises_fast(loader, match):
    """Iterate ``loader``; it must raise a RuntimeError matching ``match`` within FAST_S seconds."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=match) as info:
        for _ in loader:
            pass
    elapsed = time.monotonic() - t0
    assert elapsed < FAST_S, f"took {elapsed:.1f} s to fail"
    return str(info.value)


def _skipped(batches):
    total = {}
    for b in batches:
        for r, n in b["skipped"].items():
            total[r] = total.get(r, 0) + n
    return total


def _garbage(path):
    path.write_bytes(b"this is not a tar file" * 50)
    return str(path)


# --------------------------------------------------------------------------------------------- never spin silently


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("workers", [0, 2])
def test_embeddings_on_image_shards_fails_fast_naming_why(builtin_shards, workers):
    """data=embeddings pointed at image shards: every sample lacks *.npy members (default bounds)."""
    dm = _dm(builtin_shards["train"], workers=workers, load_embeddings=True)
    msg = _raises_fast(dm.train_dataloader(), "consecutive samples skipped")
    bound = _DEFAULTS["max_consecutive_skips"].default
    assert f"missing_embedding={bound}" in msg and "data.max_consecutive_skips" in msg
    assert "data=embeddings" in msg and "img_emb.npy" in msg  # the hint
    assert any(url in msg for url in expand_urls(builtin_shards["train"]))  # names the shards


@pytest.mark.timeout(HANG_S)
def test_wrong_image_extension_fails_fast_naming_extensions(tmp_path):
    members = [m for i in range(20) for m in ((f"{i:04d}.bmp", png()), (f"{i:04d}.txt", b"a red square"))]
    url = write_tar(tmp_path / "bmp.tar", members)
    ds = make_dataset(url, image_size=32, tokenizer=TOK, train=True, batch_size=4, epoch_size=16, shuffle_buffer=10)
    msg = _raises_fast(ds, "consecutive samples skipped")
    assert "missing_image=" in msg and "bmp" in msg and url in msg


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("workers", [0, 2])
def test_all_shards_empty_or_unreadable_fails_fast(tmp_path, workers):
    """A resampled stream over shards that never yield a sample draws shards forever unless bounded."""
    urls = [empty_tar(tmp_path / "e0.tar"), empty_tar(tmp_path / "e1.tar"), _garbage(tmp_path / "junk.tar")]
    dm = _dm(urls, workers=workers)
    msg = _raises_fast(dm.train_dataloader(), "consecutive shards yielded no sample")
    assert f"max_consecutive_bad_shards={_DEFAULTS['max_consecutive_bad_shards'].default}" in msg
    assert "empty" in msg and "unreadable" in msg and any(u in msg for u in urls)


@pytest.mark.timeout(HANG_S)
def test_skip_bound_is_exact_and_configurable(tmp_path):
    """A shard of 30 caption-less samples then 8 good ones, read in order: runs of exactly 30 skips."""
    members = [(f"a{i:03d}.png", png()) for i in range(30)]
    members += [m for i in range(8) for m in ((f"b{i:03d}.png", png()), (f"b{i:03d}.txt", b"a red square"))]
    url = write_tar(tmp_path / "runs.tar", members)

    def stream(bound):
        return make_dataset(
            url,
            image_size=32,
            tokenizer=TOK,
            train=True,
            batch_size=4,
            epoch_size=32,
            shuffle_buffer=0,
            max_consecutive_skips=bound,
        )

    batches = list(stream(31))
    assert len(batches) == 8 and _skipped(batches)["missing_caption"] >= 90  # 4 runs of 30 crossed
    msg = _raises_fast(stream(30), "30 consecutive samples skipped")
    assert "missing_caption=30" in msg
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        stream(0)


def _mostly_bad_shard(path, *, good_every: int, n: int = 100) -> str:
    """``n`` samples in order; every ``good_every``-th has an image and a caption, the others a caption only
    (``missing_image``): never many skips in a row, but most samples unusable."""
    members = []
    for i in range(n):
        if i % good_every == 0:
            members.append((f"{i:04d}.png", png()))
        members.append((f"{i:04d}.txt", b"a red square"))
    return write_tar(path, members)


@pytest.mark.timeout(HANG_S)
def test_a_stream_of_mostly_bad_samples_fails_by_ratio_with_the_defaults(tmp_path):
    """9 of 10 samples unusable, but never more than 9 in a row: the bound on skips in a row never trips, so the
    stream used to train on 1 sample in 10 without a word. The ratio over the last ``skip_window`` samples stops it."""
    url = _mostly_bad_shard(tmp_path / "mostly_bad.tar", good_every=10)
    dm = _dm(url, epoch_size=100_000, shuffle_buffer=0)
    msg = _raises_fast(dm.train_dataloader(), "of the last")
    window, frac = _DEFAULTS["skip_window"].default, _DEFAULTS["max_skipped_fraction"].default
    assert f"{int(window * 0.9)} of the last {window} samples skipped" in msg
    assert f"data.max_skipped_fraction={frac}" in msg and f"data.skip_window={window}" in msg
    assert f"missing_image={int(window * 0.9)}" in msg and url in msg and "usable" in msg


@pytest.mark.timeout(HANG_S)
def test_skip_ratio_bound_is_configurable_and_spares_a_tolerable_stream(tmp_path):
    url = _mostly_bad_shard(tmp_path / "mostly_bad.tar", good_every=10)

    def stream(**kw):
        return make_dataset(
            url, image_size=32, tokenizer=TOK, train=True, batch_size=4, epoch_size=40, shuffle_buffer=0, **kw
        )

    msg = _raises_fast(stream(max_skipped_fraction=0.8, skip_window=50), "45 of the last 50 samples skipped")
    assert "max_skipped_fraction=0.8" in msg
    assert len(list(stream(max_skipped_fraction=0.95, skip_window=50))) == 10  # 90 % < 95 %: a whole epoch
    assert len(list(stream(max_skipped_fraction=None))) == 10  # null: unbounded
    tolerable = _mostly_bad_shard(tmp_path / "half_bad.tar", good_every=2)  # exactly half bad: not more than 0.5
    ds = make_dataset(
        tolerable,
        image_size=32,
        tokenizer=TOK,
        train=True,
        batch_size=4,
        epoch_size=200,
        shuffle_buffer=0,
        skip_window=20,
    )
    assert len(list(ds)) == 50
    for bad in (dict(max_skipped_fraction=0.0), dict(max_skipped_fraction=1.0), dict(skip_window=0)):
        with pytest.raises(ValueError, match="max_skipped_fraction|skip_window"):
            stream(**bad)


@pytest.mark.timeout(HANG_S)
def test_bad_shard_bound_is_configurable(tmp_path):
    urls = [empty_tar(tmp_path / "e0.tar")]
    ds = make_dataset(
        urls, image_size=32, tokenizer=TOK, train=True, batch_size=4, epoch_size=16, max_consecutive_bad_shards=3
    )
    assert "3 consecutive shards yielded no sample" in _raises_fast(ds, "consecutive shards")


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("workers", [0, 2])
def test_validation_tolerates_bad_shards_under_tight_bounds(builtin_shards, tmp_path, workers):
    good = expand_urls(builtin_shards["val"])[0]
    # with 2 workers, worker 0 reads the two empty shards (no batch: it warns) and worker 1 the good one and the junk
    urls = [empty_tar(tmp_path / "e.tar"), good, empty_tar(tmp_path / "e2.tar"), _garbage(tmp_path / "junk.tar")]
    dm = _dm(builtin_shards["train"], urls, workers=workers, max_consecutive_skips=1, max_consecutive_bad_shards=1)
    with pytest.warns(UserWarning, match="unreadable") if workers == 0 else contextlib.nullcontext():
        batches = list(dm.val_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == sorted(tar_keys(good))
    assert _skipped(batches).get("bad_shard") == 1


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("workers", [0, 2])
def test_validation_that_yields_nothing_warns(builtin_shards, workers, capfd):
    dm = _dm(builtin_shards["train"], builtin_shards["val"], workers=workers, load_embeddings=True)
    if workers == 0:
        with pytest.warns(UserWarning, match=r"no usable sample.*missing_embedding=64"):
            batches = list(dm.val_dataloader())
    else:
        batches = list(dm.val_dataloader())
        err = capfd.readouterr().err
        assert "no usable sample" in err and "missing_embedding=" in err
    assert batches == []


def test_train_py_embeddings_on_image_shards_exits_fast(builtin_shards, tmp_path):
    """The reproduced case end to end: `experiment=prior_tiny` (data=embeddings) on image shards, 2 workers."""
    cmd = [
        sys.executable,
        "train/train.py",
        "experiment=prior_tiny",
        f"data.train_urls='{builtin_shards['train']}'",
        f"data.val_urls='{builtin_shards['val']}'",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.epoch_size=64",
        "data.shuffle_buffer=10",
        "model.embed_dim=32",
        "model.text_token_dim=32",
        "model.width=32",
        "model.depth=1",
        "model.heads=2",
        "model.dim_head=16",
        "module.val_sample_steps=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    t0 = time.monotonic()
    proc = run(cmd, timeout=2 * HANG_S)
    elapsed = time.monotonic() - t0
    assert proc.returncode not in (0, -9), proc.stderr[-3000:]
    assert elapsed < HANG_S, f"took {elapsed:.1f} s"
    assert "consecutive samples skipped" in proc.stderr and "missing_embedding=" in proc.stderr
    assert "data=embeddings" in proc.stderr
    print(f"train.py failed after {elapsed:.1f} s")


# --------------------------------------------------------------------------------------------- pipe: shards that fail


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("workers", [0, 2])
def test_failing_pipe_is_a_counted_bad_shard_in_validation(builtin_shards, workers):
    good0, good1 = expand_urls(builtin_shards["train"])[:2]
    urls = [good0, f"pipe:cat {good1}; exit 3", "pipe:false"]  # 2 workers: each has samples to carry its count
    dm = _dm(builtin_shards["train"], urls, workers=workers)
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) and set(keys) == tar_keys(good0) | tar_keys(good1)
    assert _skipped(batches).get("bad_shard") == 2


@pytest.mark.timeout(HANG_S)
def test_failing_pipe_is_a_counted_bad_shard_in_training(builtin_shards):
    good0, good1 = expand_urls(builtin_shards["train"])[:2]
    dm = _dm([good0, "pipe:false", f"pipe:cat {good1}; exit 3"], workers=2, epoch_size=256)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == loader.dataset.batches_per_epoch
    keys = {k for b in batches for k in b["key"]}
    assert keys & tar_keys(good0) and keys & tar_keys(good1)  # the failing command's complete samples flow too
    assert _skipped(batches).get("bad_shard", 0) >= 2


@pytest.mark.timeout(HANG_S)
def test_pipe_left_mid_shard_at_epoch_end_is_not_a_bad_shard(builtin_shards):
    """Epochs of 16 samples end inside a 64-sample shard: the command is stopped, and that is no failure."""
    good = expand_urls(builtin_shards["train"])[0]
    dm = _dm(f"pipe:cat {good}", workers=0, epoch_size=16, shuffle_buffer=0)
    loader = dm.train_dataloader()
    batches = [b for _ in range(3) for b in loader]
    assert len(batches) == 3 * loader.dataset.batches_per_epoch
    assert _skipped(batches) == {}


# ---------------------------------------------------------------------------------------- object stores and schemes


@pytest.fixture
def fake_stores(builtin_shards, tmp_path, monkeypatch):
    """`aws` and `gcloud` stand-ins on PATH serving BUCKET/<split>/<shard> from a local folder."""
    root = tmp_path / "store"
    for split in ("train", "val"):
        shutil.copytree(os.path.join(builtin_shards["root"], split), root / "bucket" / split)
    bin_dir = tmp_path / "bin"
    fake_command(
        bin_dir,
        "aws",
        """
[ "$1 $2 $4" = "s3 cp -" ] || { echo "fake aws: unexpected arguments: $*" >&2; exit 2; }
f="$FAKE_STORE/${3#s3://}"; [ -f "$f" ] || { echo "fake aws: no such key $3" >&2; exit 1; }
exec cat "$f"
""",
    )
    fake_command(
        bin_dir,
        "gcloud",
        """
[ "$1 $2" = "storage cat" ] || { echo "fake gcloud: unexpected arguments: $*" >&2; exit 2; }
f="$FAKE_STORE/${3#gs://}"; [ -f "$f" ] || { echo "fake gcloud: no such object $3" >&2; exit 1; }
exec cat "$f"
""",
    )
    fake_command(bin_dir, "mystore", 'exec cat "$FAKE_STORE/${2#*://}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STORE", str(root))
    return root


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("workers", [0, 2])
def test_s3_urls_read_through_aws_cli(fake_stores, workers):
    local = fake_stores / "bucket"
    # 2 workers: worker 0 reads val/00000 and the missing key, worker 1 train/00000
    val = "s3://bucket/val/00000.tar::s3://bucket/train/00000.tar::s3://bucket/val/missing.tar"
    dm = _dm("s3://bucket/train/{00000..00003}.tar", val, workers=workers)
    batches = list(dm.val_dataloader())
    expected = tar_keys(local / "val/00000.tar") | tar_keys(local / "train/00000.tar")
    assert {k for b in batches for k in b["key"]} == expected
    assert _skipped(batches).get("bad_shard") == 1  # the missing key: `aws` exits 1
    it = iter(dm.train_dataloader())
    train_keys = set().union(*(tar_keys(p) for p in (fake_stores / "bucket" / "train").glob("*.tar")))
    batch = next(it)
    assert batch["image"].shape == (8, 3, 32, 32) and set(batch["key"]) <= train_keys


@pytest.mark.timeout(HANG_S)
def test_gs_and_configured_schemes(fake_stores, monkeypatch):
    local = fake_stores / "bucket"
    dm = _dm("gs://bucket/train/00000.tar", "gs://bucket/val/00000.tar")
    assert {k for b in dm.val_dataloader() for k in b["key"]} == tar_keys(local / "val/00000.tar")
    # a template given to the datamodule (data.url_commands) overrides the default; {url} is the quoted url
    dm = _dm("s3://bucket/train/00000.tar", "s3://bucket/train/00001.tar", url_commands={"s3": "mystore get {url}"})
    assert {k for b in dm.val_dataloader() for k in b["key"]} == tar_keys(local / "train/00001.tar")
    # ... and DALLE2_URL_COMMANDS (json) adds schemes for every reader, e.g. hf://
    monkeypatch.setenv("DALLE2_URL_COMMANDS", json.dumps({"hf": "mystore get {url}"}))
    assert expand_urls("hf://bucket/val/00000.tar") == ["hf://bucket/val/00000.tar"]
    dm = _dm("hf://bucket/train/00000.tar", "hf://bucket/val/00000.tar")
    assert {k for b in dm.val_dataloader() for k in b["key"]} == tar_keys(local / "val/00000.tar")


@pytest.mark.parametrize("url", ["ftp://host/{00000..00001}.tar", "foo://bucket/a.tar", "hf://datasets/x/a.tar"])
def test_unknown_scheme_fails_fast_naming_the_url(builtin_shards, url):
    first = url.replace("{00000..00001}", "00000")
    with pytest.raises(ValueError, match="no reader for") as info:
        expand_urls(url)
    assert first in str(info.value) and "url_commands" in str(info.value)
    dm = WebDataModule(train_urls=f"{builtin_shards['train']}::{url}", tokenizer=TOK, num_workers=0)
    with pytest.raises(ValueError, match="no reader for"):
        dm.setup("fit")  # before any training step
