"""``trainer.precision: bf16-mixed-if-native``: bf16 autocast where the device computes bf16 natively, else fp32.

A CPU with AVX512-BF16 or AMX (recent Xeon / EPYC) runs a bf16-autocast training step of the demo's decoder ~1.4x
faster than fp32 and its CLIP ~1.35x (``bench/train_step.py compare=precision``); one without emulates bf16 and is
slower than fp32.  A GPU with bf16 (Ampere and later) takes ``bf16-mixed``.  Lightning's own precision strings pass
through unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["IF_NATIVE", "native_bf16", "resolve_precision"]

IF_NATIVE = "bf16-mixed-if-native"


def native_bf16(accelerator: str) -> bool:
    """Whether the device that ``accelerator`` (Lightning's: cpu, gpu, cuda, auto) picks computes bf16 natively."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if accelerator in ("cpu", "auto"):
        cpu = torch.cpu
        return any(
            getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def resolve_precision(precision, accelerator: str = "auto"):
    """``bf16-mixed-if-native`` -> ``bf16-mixed`` or ``32-true`` for this machine; anything else unchanged."""
    if str(precision) != IF_NATIVE:
        return precision
    return "bf16-mixed" if native_bf16(str(accelerator)) else "32-true"
