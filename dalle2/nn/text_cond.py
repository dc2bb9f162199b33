"""The text conditioning both diffusion networks (the prior and the UNet) build from CLIP's per-token states:
padded positions zeroed before the projection, and classifier-free guidance's dropped rows replaced by one learned
null token with the other positions masked, so the unconditional branch does not depend on the (padded or trimmed)
text length of the batch it is in."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["project_text"]


def project_text(
    proj: nn.Module, text_tokens: torch.Tensor, valid: torch.Tensor, drop: torch.Tensor | None, null_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """text_tokens (B, L, Dt), valid (B, L) bool, drop (B,) bool | None, null_token (W,) ->
    (tokens (B, L, W), valid (B, L) bool)."""
    # where() rather than multiply: garbage (even NaN) in padded slots cannot leak
    raw = text_tokens.to(device=valid.device, dtype=proj.weight.dtype)
    tokens = proj(torch.where(valid[..., None], raw, torch.zeros_like(raw)))
    if drop is not None:
        tokens = torch.where(drop[:, None, None], null_token.to(tokens.dtype), tokens)
        first_only = torch.arange(tokens.shape[1], device=valid.device)[None] == 0
        valid = torch.where(drop[:, None], first_only, valid)
    return tokens, valid
