"""Sampling the diffusion prior: k candidates per prompt in one batched call, classifier-free guidance, reranking.

``sample_prior`` = ``sample_prior_candidates`` (repeat the conditioning k times, run one sampler over the
``(B * k, D)`` batch through the CFG wrapper, unscale back to unit-norm CLIP space) followed by
``rerank_by_similarity`` (keep, per prompt, the candidate with the highest dot product with the normalised text
embedding, as in the DALL-E 2 paper).  No Python loops over batch elements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.diffusion.gaussian import GaussianDiffusion
from dalle2.diffusion.guidance import cfg_model_fn
from dalle2.diffusion.samplers import Generators, SamplerName, sample
from dalle2.nn import eval_mode
from dalle2.prior.network import CachedTextPrior, EmbeddingScaler, PriorNetwork

__all__ = ["rerank_by_similarity", "sample_prior", "sample_prior_candidates"]


def rerank_by_similarity(candidates: Tensor, text_embed: Tensor) -> tuple[Tensor, Tensor]:
    """candidates: (B, k, D) image embeddings; text_embed: (B, D) -> (best (B, D), index (B,) long).

    Score = dot product of each candidate with the L2-normalised text embedding (candidates are used as given;
    ``sample_prior_candidates`` returns them unit-norm, which makes the score a cosine similarity).
    """
    if candidates.dim() != 3 or text_embed.shape != (candidates.shape[0], candidates.shape[2]):
        raise ValueError(
            f"rerank expects candidates (B, k, D) and text_embed (B, D); got {tuple(candidates.shape)} "
            f"and {tuple(text_embed.shape)}"
        )
    text = F.normalize(text_embed.float(), dim=-1)
    scores = torch.einsum("bkd,bd->bk", candidates.float(), text)
    index = scores.argmax(dim=1)
    best = candidates[torch.arange(candidates.shape[0], device=candidates.device), index]
    return best, index


@torch.no_grad()
def sample_prior_candidates(
    network: nn.Module | Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    *,
    text_embed: Tensor,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    n_samples_per_prompt: int = 2,
    steps: int = 64,
    sampler: SamplerName = "ddim",
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: Generators = None,
    scaler: EmbeddingScaler,
    renormalize: bool = True,
    x0_transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """-> (B, k, D) candidate CLIP image embeddings (unit norm if ``renormalize``), k = ``n_samples_per_prompt``.

    text_embed: (B, D); text_tokens: (B, L, Dt) | None; text_mask: (B, L) bool | None.  Noise for all B * k
    samples is drawn from ``generator`` (so a seed fixes the result): one ``torch.Generator``, or a sequence of B
    generators, one per prompt, that draws that prompt's k candidates (so a prompt's embedding does not depend on
    the other prompts in the batch).  ``network`` is called as
    ``network(x, t, text_embed=, text_tokens=, text_mask=, drop_text=)``; it is in eval mode for the call.
    ``x0_transform`` (e.g. Karlo's clip of x0 to [-5, 5]) is applied to every x0 prediction.
    """
    if n_samples_per_prompt < 1:
        raise ValueError(f"n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
    b, d = text_embed.shape
    k = n_samples_per_prompt
    device = text_embed.device

    def rep(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.repeat_interleave(k, dim=0)

    model_kwargs = {
        "text_embed": rep(text_embed),
        "drop_text": torch.zeros(b * k, dtype=torch.bool, device=device),
    }
    if text_tokens is not None:
        model_kwargs["text_tokens"] = rep(text_tokens)
        if text_mask is not None:
            model_kwargs["text_mask"] = rep(text_mask)
    # a PriorNetwork computes the text positions once for the whole run (causal attention: they do not change)
    net_fn = CachedTextPrior(network) if isinstance(network, PriorNetwork) else network
    model_fn = (
        net_fn
        if guidance_scale == 1.0
        else cfg_model_fn(net_fn, guidance_scale=guidance_scale, learned_variance=diffusion.learned_variance)
    )
    with eval_mode(network if isinstance(network, nn.Module) else None):
        x = sample(
            model_fn,
            (b * k, d),
            diffusion=diffusion,
            sampler=sampler,
            steps=steps,
            eta=eta,
            generator=generator,
            model_kwargs=model_kwargs,
            x0_transform=x0_transform,
            device=device,
        )
    return scaler.unscale_embed(x, renormalize=renormalize).reshape(b, k, d)


@torch.no_grad()
def sample_prior(
    network: nn.Module | Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    *,
    text_embed: Tensor,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    n_samples_per_prompt: int = 2,
    steps: int = 64,
    sampler: SamplerName = "ddim",
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: Generators = None,
    scaler: EmbeddingScaler,
    renormalize: bool = True,
    x0_transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Text conditioning -> (B, D) CLIP image embeddings: k candidates per prompt, keep the one most similar to
    the text embedding.  Arguments as in :func:`sample_prior_candidates`."""
    candidates = sample_prior_candidates(
        network,
        diffusion,
        text_embed=text_embed,
        text_tokens=text_tokens,
        text_mask=text_mask,
        n_samples_per_prompt=n_samples_per_prompt,
        steps=steps,
        sampler=sampler,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=generator,
        scaler=scaler,
        renormalize=renormalize,
        x0_transform=x0_transform,
    )
    best, _ = rerank_by_similarity(candidates, text_embed)
    return best
