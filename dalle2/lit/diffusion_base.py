"""What the prior, decoder and upsampler LightningModules share: the diffusion built from a plain dict, the
EMA copy of the network, optimisers, a frozen CLIP for on-the-fly embeddings, per-quartile loss logging and
the stage tag that makes a wrong-stage checkpoint a clear error.

A subclass builds ``self.net`` and then calls ``self._init_ema()``; it implements ``training_step`` with
``self.diffusion.training_losses(self.net, x0, model_kwargs=...)``.  ``configure_model`` (called by the Trainer, or by
hand) shards both networks under ``trainer=fsdp`` and, with ``compile=True`` (``module.compile=true``), compiles them
in place with ``torch.compile`` (training and sampling).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from dalle2.clip.tokenizer import Tokenizer, resolve_tokenizer
from dalle2.diffusion import build_diffusion
from dalle2.lit.checkpoints import StageCheckpointMixin
from dalle2.lit.distributed import MeanAccumulator, log_reduced
from dalle2.lit.fsdp import compile_network, shard_module
from dalle2.lit.optim import build_optimizers
from dalle2.nn import EMA


def loss_by_quartile(per_sample_loss: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> dict[str, torch.Tensor]:
    """Mean loss of the samples whose timestep falls in each quarter of [0, T): ``{"loss_q0": ..., ...}``
    (quartiles with no sample in the batch are left out)."""
    q = (t * 4 // num_timesteps).clamp(0, 3)
    sums = torch.zeros(4, device=t.device).scatter_add_(0, q, per_sample_loss.detach().float())
    counts = torch.bincount(q, minlength=4)
    return {f"loss_q{i}": sums[i] / counts[i] for i in range(4) if counts[i] > 0}


class DiffusionStageModule(StageCheckpointMixin, L.LightningModule):
    stage: str = "diffusion"

    def __init__(
        self,
        *,
        diffusion: dict | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: int = 10,
        ema_update_every: int = 1,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        default_lr: float = 1e-4,
        compile: bool = False,
    ):
        super().__init__()
        self.compile_networks = bool(compile)
        self.diffusion = build_diffusion(diffusion)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self._default_lr = default_lr
        self._ema_args = dict(decay=ema_decay, warmup=ema_warmup, update_every=ema_update_every)
        self.ema: EMA | None = None
        self._val_metrics = MeanAccumulator()

    def _init_ema(self) -> None:
        self.ema = EMA(self.net, **self._ema_args)

    @property
    def ema_net(self) -> torch.nn.Module:
        """The EMA network (what validation and sampling use)."""
        return self.ema.module if self.ema is not None else self.net

    def optimizer_step(self, *args, **kwargs) -> None:
        # right after the step, before callbacks' on_train_batch_end (where ModelCheckpoint saves): a checkpoint
        # then holds this step's EMA, so a resumed run's EMA matches an uninterrupted one
        super().optimizer_step(*args, **kwargs)
        # a step NonFiniteGuard skipped has no gradients left: the EMA stays where it was too
        if self.ema is not None and any(p.grad is not None for p in self.net.parameters()):
            self.ema.update(self.net, self.global_step)

    def log_losses(self, losses: dict, per_sample: dict | None, prefix: str = "train") -> None:
        self.log(f"{prefix}/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in losses.items() if k != "loss"})
        if per_sample is not None:
            quart = loss_by_quartile(per_sample["loss"], per_sample["t"], self.diffusion.num_timesteps)
            self.log_dict({f"{prefix}/{k}": v for k, v in quart.items()})

    def log_val(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Accumulate validation metrics of one batch; :meth:`on_validation_epoch_end` logs their means over all
        ranks' samples (``self.log(sync_dist=True)`` would leave the other ranks waiting for a rank without batches)."""
        self._val_metrics.add(metrics, batch_size)

    def on_validation_epoch_end(self) -> None:
        means = self._val_metrics.reduce()  # a collective every rank reaches, with or without val batches
        log_reduced(self, means, prog_bar=("val/loss", "val/cos_sampled"))

    def configure_model(self) -> None:
        # trainer=fsdp: the network and its EMA copy sharded alike (dalle2/lit/fsdp.py); other strategies: nothing
        nets = [(self.net, True), *([(self.ema.module, False)] if self.ema is not None else [])]
        shard_module(self, nets)
        if self.compile_networks:  # module.compile=true: the trained network, and the EMA copy sampling uses
            for net, _ in nets:
                compile_network(net)

    def configure_optimizers(self):
        return build_optimizers(self.net, self.optimizer_factory, self.scheduler_factory, default_lr=self._default_lr)


class FrozenClipMixin:
    """A frozen CLIP for on-the-fly embeddings, loaded from ``hparams.clip_ckpt`` at first use (or given with
    ``set_clip``).  It lives outside the registered submodules: never trained, never in the state_dict or the
    checkpoint (only its path is, as a hyperparameter).  Mixed into the prior and the base decoder.

    The CLIP's vocabulary is bound to this module (and so stored in its checkpoints): the text features it learns
    from are that vocabulary's, and the data must be tokenized with it (checked in ``setup``)."""

    _clip = None  # the instance's CLIP is set in __dict__ (not a submodule)

    def setup(self, stage: str) -> None:
        clip = self.clip  # load the frozen CLIP now (the property loads it lazily) so a bad path fails before training
        tok = self._datamodule_tokenizer()
        if clip is not None and self.vocabulary is None:  # a CLIP that records no vocabulary: the data's it is
            self.bind_tokenizer(tok, source="the data's tokenizer")
        elif self.vocabulary is not None and isinstance(tok, Tokenizer):
            resolve_tokenizer(self.vocabulary, tok, owner=f"this {self.stage}'s CLIP")

    def set_clip(self, clip_module) -> None:
        """Use ``clip_module`` (a ``CLIPModule``) as the frozen on-the-fly embedder (not saved); its vocabulary
        becomes this module's."""
        if clip_module is not None:
            clip_module = clip_module.eval().requires_grad_(False)
            self.bind_vocabulary(getattr(clip_module, "vocabulary", None), source="the CLIP")
        self.__dict__["_clip"] = clip_module

    @property
    def clip(self):
        """The frozen CLIP (loaded from ``clip_ckpt`` at first use), or None."""
        if self._clip is None and self.hparams.clip_ckpt:
            self.set_clip(load_frozen_clip(self.hparams.clip_ckpt))
        if self._clip is not None and self._clip.device != self.device:
            self._clip.to(self.device)
        return self._clip


def load_frozen_clip(path: str | None):
    """The frozen CLIP (a ``CLIPModule`` in eval mode, no grads) for on-the-fly embeddings, or None."""
    if not path:
        return None
    from dalle2.lit.clip_module import load_clip

    return load_clip(path)
