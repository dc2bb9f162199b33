"""Sharded training (FSDP2) for every stage, on Lightning's ``ModelParallelStrategy``.

``trainer=fsdp`` picks :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` (the one Lightning strategy
built on FSDP2, ``torch.distributed.fsdp.fully_shard``; its FSDP1 ``FSDPStrategy`` refuses ``accelerator=cpu``, so it
could be neither tested here nor debugged on a laptop) with

* a 1-D data-parallel mesh over every process (``ModelParallelStrategy`` alone splits a node's GPUs into a
  tensor-parallel dimension, which no network here uses);
* the sharding options of ``conf/trainer/fsdp.yaml``: ``param_dtype`` / ``reduce_dtype`` (FSDP2's
  ``MixedPrecisionPolicy``: bf16 compute and all-gathers, fp32 or bf16 gradient reductions, fp32 sharded master
  weights and optimizer state), ``activation_checkpointing`` (each network's own per-block checkpointing),
  ``reshard_after_forward``;
* atomic sharded checkpoints: a checkpoint directory (``last.ckpt/``: the DCP shards + Lightning's ``meta.pt``) is
  written beside its target under a hidden name and renamed into place, so a kill mid-save leaves the previous one.

The stage modules call :func:`shard_module` from ``configure_model``: :func:`shard_network` shards each block
(:data:`SHARD_UNITS`: transformer blocks, UNet residual and attention blocks), then the network's root, for the
trained network and for its EMA copy alike — the EMA's tensors are DTensors with the same placements as the
parameters they average, so its update is local (:class:`dalle2.nn.EMA`) and it is saved in shards with them.

Every rank must run the same forward passes of a sharded network (each one all-gathers): sampling previews run on
every rank (rank 0 writes them), and evaluation loaders yield the same number of batches on every rank — the
smallest rank's, agreed batch by batch (:class:`~dalle2.lit.distributed.SameBatchCount`), so a rank whose val shards
are shorter or empty neither hangs the others nor meets them in a different collective.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import RunningStage
from torch import nn

from dalle2.checkpoint import SHARDED_META, is_sharded_checkpoint
from dalle2.clip.model import Bottleneck
from dalle2.decoder.blocks import PixelAttention, ResBlock
from dalle2.lit.distributed import FailFast, SameBatchCount
from dalle2.nn.transformer import ResidualAttentionBlock
from dalle2.prior.network import PriorBlock
from dalle2.safe_load import load_dcp_into, torch_load
from dalle2.torch_private import require as require_private_torch

__all__ = ["DTYPES", "FSDP2Strategy", "SHARD_UNITS", "compile_network", "is_sharded", "shard_module", "shard_network"]

# the units of sharding (each one all-gathered for its forward and freed after): blocks of every network here
SHARD_UNITS: tuple[type[nn.Module], ...] = (PriorBlock, ResidualAttentionBlock, ResBlock, PixelAttention, Bottleneck)
# methods other than forward that the stages call on a network (they all-gather its root parameters too)
FORWARD_METHODS = (
    "encode_text",
    "encode_image",
    "embed_images",
    "encode_text_features",
    "clamped_logit_scale",
    "regression_mean",
    "mean_residual",
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)} or null")
    return DTYPES[name]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded parameters (every rank must then run its forward passes)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_network(net: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each :data:`SHARD_UNITS` block of ``net`` (innermost first), then ``net`` itself; methods of
    :data:`FORWARD_METHODS` it has are registered as forward methods. Idempotent."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(net, FSDPModule):
        return net
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(), reshard_after_forward=reshard_after_forward)
    _vectorize_scalars(net)
    for m in reversed(list(net.modules())):  # a child comes after its parent in modules(): reversed, children first
        if isinstance(m, SHARD_UNITS) and m is not net:
            fully_shard(m, **kw)
    fully_shard(net, **kw)
    _track_forward(net)
    for name in FORWARD_METHODS:
        if callable(getattr(type(net), name, None)):
            _register_forward_method(net, name)
    return net


def _vectorize_scalars(net: nn.Module) -> None:
    """fully_shard shards dim 0, so a 0-d parameter (CLIP's ``logit_scale``) becomes a 1-element vector (it
    broadcasts as before; CLIP loads either shape)."""
    for module in net.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def _track_forward(net: nn.Module) -> None:
    """Count the calls of ``net``'s forward (and forward methods) under way in ``net._dalle2_in_forward``."""
    net._dalle2_in_forward = 0

    def enter(module, args):
        module._dalle2_in_forward += 1

    def leave(module, args, output):
        module._dalle2_in_forward -= 1

    net.register_forward_pre_hook(enter)
    net.register_forward_hook(leave, always_call=True)


def _register_forward_method(net: nn.Module, name: str) -> None:
    """FSDP2's ``register_fsdp_forward_method`` (gather the root's parameters around the method), except when the
    method is called from inside the root's forward (the prior's ``forward`` calls ``encode_text``, CLIP's calls
    ``encode_image``): the parameters are gathered already, and resharding them there would break the rest of it.
    Uses FSDP2's private per-module state, checked at :class:`FSDP2Strategy` start (:mod:`dalle2.torch_private`)."""
    import functools

    orig = getattr(net, name)

    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        if self._dalle2_in_forward:
            return orig(*args, **kwargs)
        state = self._get_fsdp_state()
        self._dalle2_in_forward += 1
        try:
            args, kwargs = state._pre_forward(self, args, kwargs)
            return state._post_forward(self, args, orig(*args, **kwargs))
        finally:
            self._dalle2_in_forward -= 1

    setattr(net, name, method.__get__(net, type(net)))


class FSDP2Strategy(FailFast, ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2 over all processes, with the sharding options and atomic saves; a failing
    rank ends the job (:class:`~dalle2.lit.distributed.FailFast`).

    Args (keyword-only):
        param_dtype: dtype of the all-gathered parameters the forward/backward compute in (``bfloat16``; null: the
            parameters' own, fp32). The sharded parameters (the master weights), gradients, AdamW moments and EMA
            stay fp32.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32`` or ``bfloat16``; null: ``param_dtype``).
        activation_checkpointing: recompute each block's activations in the backward pass (the networks'
            ``grad_checkpointing``: transformer blocks, UNet stages).
        reshard_after_forward: free the gathered parameters after each block's forward (ZeRO-3); false keeps them
            until the backward (ZeRO-2: less communication, more memory).
        save_distributed_checkpoint: true: each rank writes its shards (a checkpoint is a directory); false: rank 0
            gathers full weights and optimizer state into one ``.ckpt`` file (only for what fits one process).
        trust_checkpoint: resume from a checkpoint that holds more than weights (runs its code); default false: a
            sharded checkpoint is read through :func:`dalle2.safe_load.load_dcp_into` (the index through the
            allowlist, byte entries weights-only) and a ``.ckpt`` file weights-only, whichever path Lightning
            resumes from (``ckpt_path``, or the ``hpc_ckpt_*.ckpt`` it finds by itself under SLURM).
    """

    def __init__(
        self,
        *,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        require_private_torch("fsdp_forward_method")  # FSDPModule._get_fsdp_state & co: fail now, not mid-run
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.param_dtype, self.reduce_dtype = _dtype(param_dtype), _dtype(reduce_dtype)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.trust_checkpoint = bool(trust_checkpoint)

    def setup_environment(self) -> None:
        # one data-parallel dimension over every process (no tensor parallelism)
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    @property
    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)

    def shard(self, net: nn.Module, *, trainable: bool = True) -> nn.Module:
        """Shard ``net`` over the data-parallel mesh (with activation checkpointing when asked and ``trainable``)."""
        if trainable and self.activation_checkpointing:
            for m in net.modules():
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = True
        return shard_network(
            net,
            self.device_mesh["data_parallel"],
            mp_policy=self.mp_policy,
            # a network without a backward pass (the EMA copy) must reshard after its forward: FSDP2 reshards a
            # reshard_after_forward=False module only in backward, so its weights would stay gathered (and unsharded)
            reshard_after_forward=self.reshard_after_forward if trainable else True,
        )

    def process_dataloader(self, dataloader: object) -> object:
        """Evaluation loaders (validation, test, predict) yield the same number of batches on every rank (the smallest
        rank's, :class:`~dalle2.lit.distributed.SameBatchCount`): every forward of a sharded network all-gathers."""
        dataloader = super().process_dataloader(dataloader)
        trainer = getattr(self.lightning_module, "_trainer", None)
        stage = getattr(getattr(trainer, "state", None), "stage", None)
        if stage is None or stage == RunningStage.TRAINING:
            return dataloader  # training streams give every rank the same batches by construction
        what = {"val": "validation", "test": "test", "predict": "prediction"}.get(stage.dataloader_prefix, "evaluation")
        return SameBatchCount(dataloader, device=self.root_device, what=what)

    # -- reading checkpoints safely ------------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's resume (``ckpt_path``, or SLURM's ``hpc_ckpt_*.ckpt``), reading nothing that could run code
        unless ``trust_checkpoint``: Lightning would read a sharded directory with torch's own DCP reader (its index
        and byte entries unpickled with no restriction) and ``meta.pt`` / a ``.ckpt`` file with torch's default
        ``weights_only``, which an environment variable can turn off (and the ``weights_only`` given to ``fit`` does
        not reach this strategy). The sharded branch is Lightning's ``_load_checkpoint``, with our reader."""
        trust = self.trust_checkpoint or weights_only is False
        path = Path(self.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=not trust)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module_state = {"state_dict": get_model_state_dict(self.model)}
        load_dcp_into(module_state, path, trust_checkpoint=trust)
        self.model.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load_dcp_into(optim_state, path, trust_checkpoint=trust)
            options = StateDictOptions(cpu_offload=True)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key], options=options)
        return torch_load(path / SHARDED_META, trust_checkpoint=trust)  # the rest: loops, callbacks, hparams...

    # -- atomic sharded checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(os.fspath(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # what a killed save left
        self.barrier("fsdp_save_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("fsdp_save_written")
        if self.is_global_zero:
            replace_dir(partial, path)
        self.barrier("fsdp_save_done")


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory ``src`` at ``dst``. An existing ``dst`` (directory or file) is first renamed aside to a name
    resume still finds (``<stem>-prev<suffix>``) and removed once ``src`` is in place; an older ``-prev`` left by a
    killed save is first renamed to a hidden name. Only hidden names are ever deleted, and only once the new
    checkpoint is in place: at every moment a complete checkpoint is visible to resume."""
    prev = dst.with_name(f"{dst.stem}-prev{dst.suffix}")
    trash = dst.with_name(f".{dst.name}.trash")
    _remove(trash)
    if dst.exists():
        if prev.exists():
            os.replace(prev, trash)
        os.replace(dst, prev)
    os.replace(src, dst)
    _remove(prev)
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def compile_network(net: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` ``net`` in place (``nn.Module.compile``: parameter names, state_dict and checkpoints unchanged):
    the whole network, or, when it is sharded (FSDP2 hooks between blocks), each :data:`SHARD_UNITS` block (the
    torchtitan recipe) with the glue around them eager. ``options`` go to ``torch.compile`` (``backend``, ``mode``).
    Idempotent."""
    if getattr(net, "_dalle2_compiled", False):
        return net
    targets = [m for m in net.modules() if isinstance(m, SHARD_UNITS)] if is_sharded(net) else [net]
    for m in targets:
        m.compile(**options)
    net._dalle2_compiled = True
    return net


def shard_module(module, networks: list[tuple[nn.Module, bool]]) -> None:
    """From a LightningModule's ``configure_model``: shard each ``(network, trainable)`` when the trainer runs
    :class:`FSDP2Strategy` (nothing otherwise)."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, FSDP2Strategy):
        for net, trainable in networks:
            strategy.shard(net, trainable=trainable)
