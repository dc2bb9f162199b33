"""The text conditioning both diffusion networks (the prior and the UNet) build from CLIP's per-token states:
padded positions zeroed before the projection, and classifier-free guidance's dropped rows replaced by one learned
null token with the other positions masked, so the unconditional branch does not depend on the (padded or trimmed)
text length of the batch it is in."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["project_text", "substitute_null_text"]


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


def substitute_null_text(
    drop: torch.Tensor | None,
    text_embed: torch.Tensor | None,
    text_tokens: torch.Tensor,
    valid: torch.Tensor,
    *,
    null_embed: torch.Tensor,
    null_tokens: torch.Tensor,
    null_valid: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Rows where ``drop`` is True take a *fixed* null text — pooled ``null_embed (D,)``, token states ``null_tokens
    (Lmax, Dt)`` and mask ``null_valid (Lmax,)`` cut to the batch's length L (e.g. the CLIP encoding of the empty
    prompt, Karlo's unconditional branch) — instead of one learned token: ``text_embed (B, D) | None, text_tokens
    (B, L, Dt), valid (B, L)`` -> the same with those rows replaced.  L must hold the null text's valid tokens (the
    empty prompt's start and end token: any tokenized text is at least that long).  No host sync: the rows are chosen
    with ``where``."""
    if drop is None:
        return text_embed, text_tokens, valid
    b, length = text_tokens.shape[:2]
    d = torch.as_tensor(drop, device=text_tokens.device).to(torch.bool).reshape(b)
    if text_embed is not None:
        text_embed = torch.where(d[:, None], null_embed.to(text_embed.dtype)[None], text_embed)
    text_tokens = torch.where(d[:, None, None], null_tokens[:length].to(text_tokens.dtype)[None], text_tokens)
    valid = torch.where(d[:, None], null_valid[:length].to(valid.device)[None], valid)
    return text_embed, text_tokens, valid
