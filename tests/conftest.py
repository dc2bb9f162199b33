"""Shared fixtures. Tests are CPU-only, build tiny models and data themselves, and need no network."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def builtin_shards64(tmp_path_factory):
    """The same small built-in shards at 64 px, for stages that train at 64 px (a 32 -> 64 upsampler): training one
    on 32 px pictures is refused (dalle2.data.resolution)."""
    from dalle2.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("builtin64")
    urls = write_shards(root, num_train=256, num_val=64, image_size=64, samples_per_shard=64, seed=0)
    return {"train": urls["train"], "val": urls["val"], "test": urls["test"], "root": str(root)}


@pytest.fixture(scope="session")
def builtin_shards(tmp_path_factory):
    """Small built-in captioned shards (img2dataset layout) at 32 px: {"train", "val", "test": urls, "root": dir}."""
    from dalle2.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("builtin")
    urls = write_shards(root, num_train=256, num_val=64, image_size=32, samples_per_shard=64, seed=0)
    return {"train": urls["train"], "val": urls["val"], "test": urls["test"], "root": str(root)}


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Tiny random cascade checkpoints (CLIP, prior, 16 px decoder with text, 16 -> 32 upsampler), written once:
    ``{"clip", "prior", "decoder", "upsampler": path}`` (helpers.cascade.build_tiny_checkpoints)."""
    from helpers.cascade import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("pipeline_ckpts"))


@pytest.fixture(scope="session")
def tiny_karlo(tmp_path_factory):
    """A tiny random Karlo-shaped unCLIP in diffusers' format and its conversion (helpers.karlo, config "a"):
    ``{"src": diffusers dir, "out": converted dir}``.  Needs diffusers and transformers (skipped without)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from dalle2.convert.karlo import convert_karlo
    from helpers.karlo import CONFIGS, make_karlo_dir

    root = tmp_path_factory.mktemp("karlo")
    src = make_karlo_dir(root, CONFIGS[0])
    convert_karlo(src, root / "out")
    return {"src": src, "out": root / "out", "config": CONFIGS[0]}
