"""Sample grids during training, and the sanity check that a run is not silently producing pure noise.

:class:`SampleGrid` (a Lightning callback for the decoder / upsampler modules) every ``every_n_steps`` training
steps samples from a FIXED set of conditioning rows (the first validation batch seen, or until then the first
training batch) with the EMA network and a few DDIM steps, and on rank zero:

- writes ``<out_dir>/samples/step_XXXXXXX.png`` (rows: reference images, samples [, bicubic baseline]) and
  ``step_XXXXXXX.txt`` with the captions of the columns (``out_dir``: the callback's, else
  ``trainer.default_root_dir``, else the logger's log dir);
- logs the grid to wandb when a ``WandbLogger`` is attached (key ``samples``, captioned with the columns' captions);
- logs ``sanity/noise_like`` (1 when at least half the samples look like Gaussian noise: see :func:`noise_like`,
  with a loud warning), ``sanity/autocorr`` and the module's preview metrics (the upsampler's ``val/psnr`` and
  ``val/psnr_bicubic``).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor

from dalle2.imaging import to_uint8
from dalle2.lit.fsdp import is_sharded

__all__ = ["SampleGrid", "noise_like", "spatial_autocorrelation", "make_grid", "save_grid"]


def spatial_autocorrelation(images: Tensor) -> Tensor:
    """Mean lag-1 (horizontal and vertical) Pearson autocorrelation per image ``(B,)`` of ``images (B, C, H, W)``
    (per channel, then averaged).  ~0 for i.i.d. noise, close to 1 for natural or rendered images; 0 for a
    constant image."""
    x = images.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    var = x.pow(2).mean(dim=(-2, -1))
    h = (x[..., :, 1:] * x[..., :, :-1]).mean(dim=(-2, -1))
    v = (x[..., 1:, :] * x[..., :-1, :]).mean(dim=(-2, -1))
    r = torch.where(var > 1e-8, 0.5 * (h + v) / var.clamp(min=1e-8), torch.zeros_like(var))
    return r.mean(dim=1)


def noise_like(images: Tensor, *, max_autocorr: float = 0.25, min_std: float = 0.25) -> Tensor:
    """``(B,)`` bool: which images are statistically indistinguishable from (possibly clipped) Gaussian noise:
    no spatial structure (lag-1 autocorrelation below ``max_autocorr``) and not flat (per-image std above
    ``min_std``).  N(0, 1) noise (clipped to [-1, 1] or not) passes; real images, even sharp synthetic ones,
    have autocorrelation well above 0.5 at 32 px."""
    std = images.float().flatten(1).std(dim=1)
    return (spatial_autocorrelation(images) < max_autocorr) & (std > min_std)


def make_grid(rows: list[Tensor], *, pad: int = 2) -> np.ndarray:
    """Rows of images ``(N, 3, H, W)`` in [-1, 1] (same N, H, W) -> a uint8 ``(rows*H+pad.., N*W+pad.., 3)`` grid."""
    n, _, H, W = rows[0].shape
    grid = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for r, imgs in enumerate(rows):
        arr = to_uint8(imgs, (-1.0, 1.0)).numpy()
        for c in range(n):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            grid[y : y + H, x : x + W] = arr[c]
    return grid


def save_grid(path: str | Path, rows: list[Tensor], captions: list[str] | None = None) -> Path:
    """Write the grid PNG (and the column captions beside it as ``.txt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(rows)).save(path)
    if captions:
        path.with_suffix(".txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))
    return path


def _take(batch: dict, n: int) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.ndim > 0:
            out[k] = v[:n].detach().cpu().clone()
        elif isinstance(v, (list, tuple)):
            out[k] = list(v[:n])
    return out


class SampleGrid(L.Callback):
    """See the module docstring.

    Args (keyword-only):
        every_n_steps: period in training steps (None: the module's ``sample_every_n_steps``; 0/None: off).
        num_samples: grid width; steps / sampler / guidance_scale: sampling settings; seed: the fixed noise seed.
        out_dir: where ``samples/`` goes (default: trainer.default_root_dir, else the logger's log dir).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        num_samples: int = 8,
        steps: int = 20,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        seed: int = 0,
        out_dir: str | None = None,
    ):
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.steps, self.sampler, self.guidance_scale, self.seed = steps, sampler, guidance_scale, seed
        self.out_dir = out_dir
        self._batch: dict | None = None
        self._from_val = False
        self.last: dict | None = None  # the last preview's metrics and file (for tests and scripts)

    def _period(self, pl_module) -> int:
        n = self.every_n_steps
        if n is None:
            n = getattr(pl_module, "hparams", {}).get("sample_every_n_steps")
        return int(n or 0)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not self._from_val and isinstance(batch, dict):
            self._batch, self._from_val = _take(batch, self.num_samples), True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._batch is None and isinstance(batch, dict):
            self._batch = _take(batch, self.num_samples)
        n = self._period(pl_module)
        step = trainer.global_step
        # a sharded network (trainer=fsdp) samples on every rank (each forward gathers its weights); rank 0 writes
        if n > 0 and step > 0 and step % n == 0 and (trainer.is_global_zero or is_sharded(pl_module)):
            self.run(trainer, pl_module, step)

    def _root(self, trainer) -> Path:
        root = self.out_dir or trainer.default_root_dir or trainer.log_dir or "."
        return Path(root) / "samples"

    @torch.no_grad()
    def run(self, trainer, pl_module, step: int) -> dict:
        batch = {k: v.to(pl_module.device) if isinstance(v, Tensor) else v for k, v in self._batch.items()}
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with trainer.precision_plugin.forward_context():
            out = pl_module.preview(
                batch, steps=self.steps, sampler=self.sampler, guidance_scale=self.guidance_scale, generator=gen
            )
        if not trainer.is_global_zero:
            return {}
        samples = out["samples"].float()
        rows = [r.float() for r in (out.get("reference"), samples, out.get("baseline")) if r is not None]
        rows = [r for r in rows if r.shape[-2:] == samples.shape[-2:]]
        path = save_grid(self._root(trainer) / f"step_{step:07d}.png", rows, out.get("captions"))

        flags = noise_like(samples)
        bad = bool(flags.float().mean() >= 0.5)
        metrics = {
            "sanity/noise_like": float(bad),
            "sanity/autocorr": float(spatial_autocorrelation(samples).mean()),
            **out.get("metrics", {}),
        }
        if bad or not math.isfinite(float(samples.sum())):
            rank_zero_warn(
                f"\n{'!' * 80}\n[dalle2] step {step}: {int(flags.sum())}/{len(flags)} {pl_module.stage} samples look like "
                f"PURE GAUSSIAN NOISE (lag-1 autocorrelation {metrics['sanity/autocorr']:.3f}); the model is not "
                f"denoising yet, or the run is broken. Grid: {path}\n{'!' * 80}"
            )
        for k, v in metrics.items():
            pl_module.log(k, v, rank_zero_only=True)
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                caption = "  ".join(f"{i}: {c}" for i, c in enumerate(out.get("captions") or []))
                lg.log_image(key="samples", images=[str(path)], step=step, caption=[caption or f"step {step}"])
        self.last = {"path": str(path), "metrics": metrics}
        return self.last
