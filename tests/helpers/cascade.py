"""The tiny random unCLIP cascade (CLIP, prior, 16 px decoder with text, 16 -> 32 upsampler) written as Lightning-style
``.ckpt`` files; the weights are perturbed so that every network's output depends on its input (no zero-init heads)
and each stage's EMA differs from its raw weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from dalle2.lit.checkpoints import STAGE_KEY

TINY_CLIP = dict(
    embed_dim=8,
    image_size=16,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    vision_patch_size=8,
    context_length=77,
    vocab_size=8192,
    text_width=32,
    text_layers=1,
    text_heads=2,
)
PRIOR_NET = dict(embed_dim=8, text_token_dim=32, width=32, depth=1, heads=2, dim_head=16, max_text_len=77)
DEC_NET = dict(
    model_channels=16,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_levels=[1],
    head_channels=16,
    cond_dim=32,
    clip_dim=8,
    text_dim=32,
)
SR_NET = dict(
    model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[], mid_attention=False, lowres_cond=True
)
DIFFUSION = {"num_timesteps": 100}
NET_NO_TEXT = {k: v for k, v in DEC_NET.items() if k != "text_dim"}  # the decoder UNet without text conditioning


def perturb(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def save_module(module, path, seed: int | None = None) -> str:
    """``module``'s checkpoint as Lightning writes it (state dict, hyperparameters, and what the module's
    ``on_save_checkpoint`` adds: the stage, the vocabulary), after perturbing its weights with ``seed``."""
    if seed is not None:
        perturb(module, seed)
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        STAGE_KEY: module.stage,
        "pytorch-lightning_version": L.__version__,
    }
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def save_tiny_clip(path, **network):
    """A fresh tiny CLIP (``TINY_CLIP`` updated by ``network``) saved to ``path`` as train.py would; the module."""
    from dalle2.lit.clip_module import CLIPModule

    clip = CLIPModule(network={**TINY_CLIP, **network})
    save_module(clip, path)
    return clip


def tiny_decoder(**kw):
    """A tiny 32 px decoder without text conditioning; ``kw``: DecoderModule's arguments to change."""
    from dalle2.lit.decoder_module import DecoderModule

    return DecoderModule(**{"network": NET_NO_TEXT, "diffusion": DIFFUSION, "image_size": 32, **kw})


def tiny_upsampler(**kw):
    """A tiny 16 -> 32 px upsampler; ``kw``: UpsamplerModule's arguments to change."""
    from dalle2.lit.decoder_module import UpsamplerModule

    return UpsamplerModule(
        **{
            "network": SR_NET,
            "diffusion": DIFFUSION,
            "lowres_size": 16,
            "image_size": 32,
            "lowres_aug": {"num_levels": 100, "max_train_level": 30},
            "sample_aug_level": 5,
            **kw,
        }
    )


def tiny_modules(*, image_size: int = 16, use_text: bool = True) -> dict:
    """Fresh tiny modules of the four stages (not yet perturbed): CLIP and decoder at ``image_size`` px, the
    upsampler to twice that (16 -> 32 for the pipeline tests; 32 -> 64, the built-in data's sizes, for fidelity)."""
    from dalle2.lit.clip_module import CLIPModule
    from dalle2.lit.decoder_module import DecoderModule, UpsamplerModule
    from dalle2.lit.prior_module import PriorModule

    return {
        "clip": CLIPModule(network={**TINY_CLIP, "image_size": image_size}),
        "prior": PriorModule(network=PRIOR_NET, diffusion=DIFFUSION),
        "decoder": DecoderModule(
            network={**DEC_NET, **({} if use_text else {"text_dim": None})},
            diffusion=DIFFUSION,
            use_text=use_text,
            image_size=image_size,
        ),
        "upsampler": UpsamplerModule(
            network=SR_NET,
            diffusion=DIFFUSION,
            lowres_size=image_size,
            image_size=2 * image_size,
            lowres_aug={"num_levels": 100},
            sample_aug_level=5,
        ),
    }


def save_run_dir(root, modules: dict) -> Path:
    """Each module as ``root/<stage>/checkpoints/last.ckpt``, the layout ``train/train_all.py`` leaves."""
    for stage, m in modules.items():
        path = Path(root) / stage / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_module(m, path)
    return Path(root)


def build_tiny_checkpoints(root) -> dict:
    """Writes clip/prior/decoder/upsampler ``.ckpt`` files of tiny random stages into ``root``; returns the paths."""
    root = Path(root)
    torch.manual_seed(0)
    names = {"clip": "clip.ckpt", "prior": "prior.ckpt", "decoder": "decoder.ckpt", "upsampler": "up.ckpt"}
    return {
        stage: save_module(m, root / names[stage], seed) for seed, (stage, m) in enumerate(tiny_modules().items(), 1)
    }
