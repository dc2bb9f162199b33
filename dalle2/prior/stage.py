"""The prior as sampling needs it: its network (the EMA weights), diffusion and embedding scale, built from the
hyperparameters a prior checkpoint stores — the same builders :class:`dalle2.lit.prior_module.PriorModule` uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dalle2.diffusion import GaussianDiffusion, build_diffusion
from dalle2.diffusion.samplers import Generators
from dalle2.prior.karlo import KarloPrior
from dalle2.prior.network import EmbeddingScaler, PriorNetwork
from dalle2.prior.sampling import sample_prior

__all__ = [
    "PriorStage",
    "build_prior_network",
    "embedding_scaler",
    "network_scaler",
    "prior_diffusion_config",
    "trim_text",
]


def build_prior_network(network: Mapping[str, Any]) -> nn.Module:
    """The prior network of a network dict: ``{"arch": "karlo", ...}`` is Karlo's (:class:`KarloPrior`), anything
    else our :class:`PriorNetwork` — for the stage and the LightningModule alike."""
    kwargs = dict(network)
    arch = kwargs.get("arch")
    if arch is None:
        return PriorNetwork(**kwargs)
    if arch != "karlo":
        raise ValueError(f"unknown prior network arch {arch!r}; expected 'karlo' (or none: our PriorNetwork)")
    kwargs.pop("grad_checkpointing", None)
    return KarloPrior(**kwargs)


def network_scaler(net: nn.Module, embed_scale: float | None):
    """The embedding scaler of ``net``: its own when it has one (Karlo's standardisation), else
    :func:`embedding_scaler`."""
    own = getattr(net, "embedding_scaler", None)
    return own() if callable(own) else embedding_scaler(int(net.embed_dim), embed_scale)


def prior_diffusion_config(diffusion: Mapping[str, Any] | None) -> dict[str, Any]:
    """The prior's diffusion dict: the x0 objective unless it says otherwise (DALL-E 2's prior predicts x0)."""
    return {"objective": "x0", **(diffusion or {})}


def embedding_scaler(embed_dim: int, embed_scale: float | None) -> EmbeddingScaler:
    """``embed_scale`` (None: sqrt(embed_dim)) -> the scaler between unit-norm CLIP space and diffusion space."""
    return EmbeddingScaler.for_dim(int(embed_dim)) if embed_scale is None else EmbeddingScaler(float(embed_scale))


def trim_text(text_tokens: Tensor | None, text_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Drop the trailing token columns that are padding in every row: ``(B, L, Dt), (B, L)`` -> ``(B, L', Dt),
    (B, L')`` with L' the longest valid length in the batch.  The network's output does not change (padded keys are
    never attended and the trailing tokens' positions do not depend on L), but the sequence is ~5x shorter for
    short captions padded to 77."""
    if text_tokens is None or text_mask is None:
        return text_tokens, text_mask
    valid_cols = text_mask.any(dim=0).nonzero()
    length = int(valid_cols.max()) + 1 if valid_cols.numel() else 1
    return text_tokens[:, :length], text_mask[:, :length]


class PriorStage(nn.Module):
    """A prior network with its diffusion and embedding scale; :meth:`sample` gives unit-norm CLIP image
    embeddings.  ``use_text_tokens=False``: conditioned on the text embedding only (the tokens are ignored)."""

    def __init__(
        self,
        *,
        net: PriorNetwork,
        diffusion: GaussianDiffusion,
        scaler: EmbeddingScaler,
        use_text_tokens: bool = True,
        vocabulary=None,
        x0_clip: float | None = None,
    ) -> None:
        super().__init__()
        self.net, self.diffusion, self.scaler = net, diffusion, scaler
        self.use_text_tokens, self.vocabulary = bool(use_text_tokens), vocabulary
        self.x0_clip = None if x0_clip is None else float(x0_clip)  # clip x0 samples to [-x0_clip, x0_clip]
        self.embed_dim = int(net.embed_dim)
        self.text_token_dim = int(net.text_token_dim)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], *, vocabulary=None) -> PriorStage:
        """From a prior checkpoint's hyperparameters (``network``, ``diffusion``, ``embed_scale``, ``use_text_tokens``,
        ``x0_clip``); the weights are to be loaded into ``.net``."""
        net = build_prior_network(hparams["network"])
        return cls(
            net=net,
            diffusion=build_diffusion(prior_diffusion_config(hparams.get("diffusion"))),
            scaler=network_scaler(net, hparams.get("embed_scale")),
            use_text_tokens=bool(hparams.get("use_text_tokens", True)),
            vocabulary=vocabulary,
            x0_clip=hparams.get("x0_clip"),
        )

    @property
    def max_text_len(self) -> int:
        return int(self.net.max_text_len)

    @torch.no_grad()
    def sample(
        self,
        *,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        n_samples_per_prompt: int = 2,
        steps: int = 64,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: Generators = None,
        trim: bool = True,
    ) -> Tensor:
        """Unit-norm CLIP image embeddings ``(B, D)`` for text conditioning ``text_embed (B, D)``, ``text_tokens
        (B, L, Dt)``, ``text_mask (B, L)`` bool: ``n_samples_per_prompt`` candidates per prompt, the one with the
        highest dot product with the text embedding kept.  ``guidance_scale != 1``: classifier-free guidance.
        ``trim``: cut the text to the batch's longest prompt (same result; False keeps the float summation order,
        hence the bytes, independent of the other prompts of the batch)."""
        dev = next(self.net.parameters()).device
        if not self.use_text_tokens:
            text_tokens, text_mask = None, None
        elif trim:
            text_tokens, text_mask = trim_text(text_tokens, text_mask)
        return sample_prior(
            self.net,
            self.diffusion,
            text_embed=text_embed.to(dev).float(),
            text_tokens=None if text_tokens is None else text_tokens.to(dev).float(),
            text_mask=None if text_mask is None else text_mask.to(dev),
            n_samples_per_prompt=n_samples_per_prompt,
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            scaler=self.scaler,
            x0_transform=None if self.x0_clip is None else (lambda x0: x0.clamp(-self.x0_clip, self.x0_clip)),
        )
