"""``eval_mode(*modules)``: put modules in eval mode for a block and restore each one's previous mode after it
(sampling from a network that is also being trained, e.g. the EMA copy inside a LightningModule)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    mods = [m for m in modules if isinstance(m, nn.Module)]
    was = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(mods, was):
            m.train(training)
