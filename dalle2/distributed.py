"""Small torch.distributed helpers that are no-ops in a single process (for the metrics and the LightningModules)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_ragged", "is_distributed", "local_shard"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP2-sharded parameter or gradient); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def gather_ragged(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) from every rank in rank order; N_r may differ between ranks (incl. 0)."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])
