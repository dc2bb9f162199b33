"""Builders for tiny training runs through the real entry point (``train/train.py`` as a subprocess): one
command per stage with models small enough for a few CPU steps, and an untrained tiny CLIP checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CLIP_DIM = 32

# per stage: the experiment and the model overrides that make it tiny (CLIP_DIM-wide CLIP embeddings)
_TINY = {
    "clip": [
        "experiment=clip_tiny",
        f"model.embed_dim={CLIP_DIM}",
        "model.vision_width=32",
        "model.vision_layers=1",
        "model.vision_heads=2",
        "model.vision_patch_size=8",
        "model.text_width=32",
        "model.text_layers=1",
        "model.text_heads=2",
    ],
    "prior": [
        "experiment=prior_tiny",
        "data=builtin",
        f"model.embed_dim={CLIP_DIM}",
        f"model.text_token_dim={CLIP_DIM}",
        "model.width=32",
        "model.depth=1",
        "model.heads=2",
        "model.dim_head=16",
        "module.val_sample_steps=2",
    ],
    "decoder": [
        "experiment=decoder_tiny",
        f"model.clip_dim={CLIP_DIM}",
        "model.model_channels=16",
        "model.head_channels=16",
        f"model.cond_dim={CLIP_DIM}",
        "~callbacks.sample_grid",
    ],
    "upsampler": ["experiment=upsampler_tiny", "model.model_channels=8", "~callbacks.sample_grid"],
}


def tiny_clip_ckpt(path: str | Path) -> str:
    """An untrained tiny CLIP ``.ckpt`` (embed_dim ``CLIP_DIM``, text width ``CLIP_DIM``) written as train.py would."""
    import lightning as L
    import torch

    from dalle2.clip.model import clip_preset
    from dalle2.lit.checkpoints import STAGE_KEY
    from dalle2.lit.clip_module import CLIPModule

    net = clip_preset(
        "tiny",
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        vision_patch_size=8,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=CLIP_DIM,
    )
    clip = CLIPModule(network=net)
    torch.save(
        {
            "state_dict": clip.state_dict(),
            "hyper_parameters": dict(clip.hparams),
            STAGE_KEY: "clip",
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return str(path)


def empty_tar(path: str | Path) -> str:
    """A valid tar with no members (what img2dataset writes when every download of a shard failed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tarfile.open(path, "w").close()
    return str(path)


def stage_cmd(
    stage: str,
    run_dir: str | Path,
    *,
    train_urls: str,
    val_urls: str | None = None,
    clip_ckpt: str | None = None,
    image_size: int = 32,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``python train/train.py`` for a tiny ``stage`` run on image shards (prior/decoder embed on the fly with
    ``clip_ckpt``): 1 data worker, batch 4, csv logs in ``run_dir/csv``, no progress bar."""
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train" / "train.py"),
        *_TINY[stage],
        f"data.train_urls='{train_urls}'",
        f"data.val_urls='{val_urls}'" if val_urls else "data.val_urls=null",
        f"data.image_size={image_size}",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.epoch_size=64",
        "data.shuffle_buffer=10",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]
    if stage in ("prior", "decoder"):
        cmd.append(f"clip_ckpt={clip_ckpt}")
    if stage == "prior":
        cmd.append("data.load_image=true")
    return cmd + list(extra)


def run_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess run: the checkout and tests/ importable, 1 intra-op thread, wandb offline."""
    path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", WANDB_MODE="offline", **extra)


def run(cmd: list[str], *, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the checkout; a run past ``timeout`` is killed (with its process group) and returned
    with returncode -9 and whatever it printed, so a hang fails the test instead of the suite."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=kw.pop("env", run_env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, err + f"\n[test] killed after {timeout} s (hang)")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def decoder_cmd(shards, clip_ckpt, run_dir, *extra):
    """A tiny decoder run on the built-in shards: 2 workers, 6 batches per epoch, per-step csv loss."""
    return [
        sys.executable,
        "train/train.py",
        "experiment=decoder_tiny",
        f"clip_ckpt={clip_ckpt}",
        f"data.train_urls='{shards['train']}'",
        "data.val_urls=null",
        "data.batch_size=8",
        "data.num_workers=2",
        "data.epoch_size=40",
        "data.shuffle_buffer=50",
        "data.random_crop=true",
        "model.clip_dim=32",
        "model.model_channels=16",
        "model.head_channels=16",
        "model.cond_dim=32",
        "module.ema_decay=0.9",
        "module.sample_every_n_steps=100000",
        "~callbacks.sample_grid",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "optimizer.lr=3e-3",
        "scheduler.warmup_steps=2",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
