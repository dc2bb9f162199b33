"""One way to derive seeds: :func:`mix_seed` folds integers through splitmix64 (no Python ``hash``, so the same in
every process and every run). The sampling noise of an image (:func:`dalle2.pipeline.sample_seed`), the training
stream of a (rank, worker, epoch), the random draws of a training step and the fixed noise of a validation batch
all come from it, each from its own tuple of integers."""

from __future__ import annotations

__all__ = ["mix_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int, bits: int = 63) -> int:
    """A ``bits``-bit seed of the integers ``values`` (order matters): splitmix64 folded over them.

    ``bits``: 63 for ``torch.Generator.manual_seed`` / ``random.Random``, 32 for ``numpy.random.seed``."""
    h = 0x5DA1_1E2D
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << bits) - 1)
