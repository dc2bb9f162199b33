"""CLIPModule: trains through Lightning on built-in shards, save -> load gives identical embeddings, stage checks,
and eval/evaluate.py task=retrieval writes the metrics JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import REPO_ROOT
from dalle2.clip.model import clip_preset
from dalle2.data.datamodule import WebDataModule
from dalle2.lit.checkpoints import WrongStageError, load_stage_module
from dalle2.lit.clip_module import CLIPModule, load_clip

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


@pytest.fixture(scope="module")
def trained_ckpt(builtin_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clipmod")
    dm = WebDataModule(
        train_urls=builtin_shards["train"], val_urls=builtin_shards["val"], image_size=32, batch_size=32, num_workers=0
    )
    module = CLIPModule(network=NET)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    path = out / "clip.ckpt"
    trainer.save_checkpoint(path)
    return path, module, trainer.callback_metrics


def test_training_logs_retrieval_over_whole_val_set(trained_ckpt):
    _, _, metrics = trained_ckpt
    assert int(metrics["val/num_samples"]) == 64
    for k in ("val/text_to_image_R@1", "val/image_to_text_R@5", "val/loss"):
        assert torch.isfinite(metrics[k])


def test_save_load_identical_embeddings(trained_ckpt):
    path, module, _ = trained_ckpt
    loaded = load_clip(str(path))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = torch.randint(1, 100, (3, 77))
    tokens[:, 10] = NET["vocab_size"] - 1
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), module.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.model.encode_text(tokens), module.model.encode_text(tokens), rtol=0, atol=0)


def test_wrong_stage_is_a_clear_error(trained_ckpt, tmp_path):
    path, _, _ = trained_ckpt
    with pytest.raises(WrongStageError, match="'clip' checkpoint, but a 'decoder'"):
        load_stage_module(path, "decoder")
    other = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(WrongStageError, match="not a dalle2 Lightning checkpoint"):
        load_clip(str(other))


def test_evaluate_cli_writes_retrieval_json(trained_ckpt, builtin_shards, tmp_path):
    path, _, _ = trained_ckpt
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            "eval/evaluate.py",
            "task=retrieval",
            f"clip_ckpt={path}",
            f"data.urls='{builtin_shards['val']}'",
            f"out={out}",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["num_samples"] == 64
    assert 0.0 <= result["text_to_image_R@1"] <= 1.0 and 1.0 <= result["image_to_text_mean_rank"] <= 64


def test_precompute_embeddings_shards_are_readable_and_resumable(trained_ckpt, builtin_shards, tmp_path):
    path, module, _ = trained_ckpt
    out_dir = tmp_path / "emb"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    cmd = [
        sys.executable,
        "train/precompute_embeddings.py",
        f"clip_ckpt={path}",
        f"data.urls='{builtin_shards['val']}'",
        f"out_dir={out_dir}",
        "trainer.accelerator=cpu",
        "dtype=float32",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "64 samples embedded" in proc.stdout
    shards = sorted(p.name for p in out_dir.glob("*.tar"))
    dm = WebDataModule(
        train_urls=None,
        val_urls=[str(out_dir / s) for s in shards],
        image_size=32,
        batch_size=64,
        num_workers=0,
        load_embeddings=True,
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["img_emb"].shape == (64, NET["embed_dim"]) and batch["txt_emb"].shape == (64, NET["embed_dim"])
    assert batch["txt_tokens"].shape == (64, 77, NET["text_width"])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(batch["img_emb"], module.encode_image(batch["image"]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch["txt_emb"], module.model.encode_text(batch["tokens"]), rtol=1e-4, atol=1e-4)
    # rerun: complete shards are skipped
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and f"{len(shards)} shards already complete" in proc.stdout


class _ChosenFeatures(CLIPModule):
    """A CLIPModule whose towers return chosen features: image i (all pixels = i) -> ``features(i, tower)``."""

    features = None

    def forward(self, images, tokens):
        idx = images[:, 0, 0, 0].round().long()
        return {
            "image_features": self.features(idx, "image"),
            "text_features": self.features(idx, "text"),
            "logit_scale": torch.tensor(10.0),
        }


def _validate(features, n: int = 24) -> dict:
    module = _ChosenFeatures(network=NET)
    module.features = features
    items = [
        {"image": torch.full((3, 32, 32), float(i)), "tokens": torch.zeros(77, dtype=torch.long)} for i in range(n)
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    [metrics] = trainer.validate(module, dataloaders=torch.utils.data.DataLoader(items, batch_size=8), verbose=False)
    return metrics


def test_validation_of_a_collapsed_clip_scores_chance_and_warns():
    """Every embedding equal: formerly val R@1 = 1.0 and nothing said; now chance (1/N), the spread is logged and a
    warning names the collapsed towers."""
    with pytest.warns(UserWarning, match=r"CLIP image embeddings collapsed: mean pairwise cosine 1\.0000 > 0\.95"):
        got = _validate(lambda idx, tower: torch.ones(len(idx), 32))
    assert got["val/image_to_text_R@1"] == pytest.approx(1 / 24) and got["val/text_to_image_R@1"] == pytest.approx(
        1 / 24
    )
    assert got["val/image_to_text_mean_rank"] == pytest.approx(12.5)
    assert got["val/spread/image_mean_cosine"] == pytest.approx(1.0) and got["val/spread/text_std"] < 1e-6


def test_validation_of_a_healthy_clip_does_not_warn():
    import warnings

    table = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _validate(lambda idx, tower: table[idx])
    assert not [w for w in caught if "collapsed" in str(w.message)]
    assert got["val/image_to_text_R@1"] == 1.0 and abs(got["val/spread/image_mean_cosine"]) < 0.1
    assert got["val/spread/image_std"] > 0.8


def test_validation_with_nan_embeddings_is_an_error():
    def features(idx, tower):
        out = torch.randn(len(idx), 32)
        if tower == "text":
            out[idx % 4 == 0] = float("nan")  # 6 of 24
        return out

    with pytest.raises(ValueError, match=r"CLIP validation retrieval: 6 of 24 text embedding rows hold NaN/inf"):
        _validate(features)
