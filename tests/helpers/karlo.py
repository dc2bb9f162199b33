"""Tiny random Karlo-shaped unCLIP pipelines in diffusers' format, for the conversion and parity tests.

``make_karlo_dir(path, config)`` builds every component with diffusers / transformers (test-only references) from a
small :class:`TinyKarlo` configuration, randomises all weights (diffusers initialises several to zero: positions,
the prd token, clip_std...), and saves the whole ``UnCLIPPipeline`` with ``save_pretrained`` (safetensors).  The
tokenizer is the package's shipped BPE vocabulary written as ``vocab.json`` + ``merges.txt`` with end-token padding,
as OpenAI's CLIP tokenizer is published for ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinyKarlo:
    name: str = "a"
    text_width: int = 32  # = CLIP embedding width (Karlo's text projection takes both at one width)
    text_layers: int = 2
    text_heads: int = 4
    prior_heads: int = 2
    prior_head_dim: int = 16
    prior_layers: int = 2
    decoder_channels: tuple[int, ...] = (32, 64)
    decoder_blocks: int = 1
    decoder_attention: tuple[bool, ...] = (False, True)
    decoder_head_dim: int = 16
    cross_dim: int = 48
    groups: int = 8
    decoder_size: int = 8
    sr_channels: tuple[int, ...] = (16, 32)
    sr_blocks: int = 1
    sr_size: int = 16
    sr_time_shift: str = "scale_shift"  # Karlo's own super-resolution UNets use "default" (the embedding is added)
    pad_token: str = "<|endoftext|>"  # transformers' CLIP default; Karlo's own tokenizer pads with "!" (id 0)
    prior_clip: float = 5.0


CONFIGS = [
    TinyKarlo(),
    TinyKarlo(
        name="b",
        text_width=24,
        text_layers=1,
        text_heads=2,
        prior_heads=4,
        prior_head_dim=8,
        prior_layers=3,
        decoder_channels=(16, 32, 48),
        decoder_blocks=2,
        decoder_attention=(False, True, True),
        decoder_head_dim=8,
        cross_dim=32,
        decoder_size=8,
        sr_channels=(16, 32, 32),
        sr_blocks=2,
        sr_size=32,
        sr_time_shift="default",
        pad_token="!",
        prior_clip=10.0,
    ),
]


def write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    from dalle2.clip.tokenizer import Tokenizer

    tok = Tokenizer.default()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(tok._vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tok.merges))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": pad_token}))
    cfg = {**specials, "pad_token": pad_token, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("clip_std"):
            p.copy_(0.5 + noise.abs())
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() > 1:  # fan-in scaled: activations stay O(1), so guided sampling stays well conditioned
            p.copy_(noise * 0.7 * p[0].numel() ** -0.5)
        else:
            p.copy_(noise * 0.05)


def make_karlo_dir(path: str | Path, cfg: TinyKarlo = TinyKarlo(), *, seed: int = 0) -> Path:
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    write_tokenizer_files(path / "_tok", cfg.pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "_tok"))
    vocab = len(tokenizer)
    w = cfg.text_width
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            projection_dim=w,
            hidden_act="quick_gelu",
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    prior = PriorTransformer(
        num_attention_heads=cfg.prior_heads,
        attention_head_dim=cfg.prior_head_dim,
        num_layers=cfg.prior_layers,
        embedding_dim=w,
        num_embeddings=77,
        additional_embeddings=4,
    )
    c0 = cfg.decoder_channels[0]
    down = tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in cfg.decoder_attention)
    up = tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(cfg.decoder_attention))
    decoder = UNet2DConditionModel(
        sample_size=cfg.decoder_size,
        in_channels=3,
        out_channels=6,
        block_out_channels=cfg.decoder_channels,
        layers_per_block=cfg.decoder_blocks,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        class_embed_type="identity",
        resnet_time_scale_shift="scale_shift",
        cross_attention_dim=cfg.cross_dim,
        attention_head_dim=cfg.decoder_head_dim,
        norm_num_groups=cfg.groups,
    )
    text_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=4, clip_embeddings_dim=w, time_embed_dim=4 * c0, cross_attention_dim=cfg.cross_dim
    )

    def sr():
        n = len(cfg.sr_channels)
        return UNet2DModel(
            sample_size=cfg.sr_size,
            in_channels=6,
            out_channels=3,
            block_out_channels=cfg.sr_channels,
            layers_per_block=cfg.sr_blocks,
            down_block_types=("ResnetDownsampleBlock2D",) * n,
            up_block_types=("ResnetUpsampleBlock2D",) * n,
            resnet_time_scale_shift=cfg.sr_time_shift,
            norm_num_groups=cfg.groups,
            add_attention=False,
        )

    first, last = sr(), sr()
    for i, m in enumerate((text_encoder, prior, decoder, text_proj, first, last)):
        randomize_(m, seed * 100 + i)
    pipe = UnCLIPPipeline(
        prior=prior,
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_proj=text_proj,
        super_res_first=first,
        super_res_last=last,
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=cfg.prior_clip
        ),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )
    pipe.save_pretrained(str(path / "karlo"), safe_serialization=True)
    return path / "karlo"


def write_karlo_shards(root: str | Path, out: str | Path, *, n: int = 16, image_size: int = 16, seed: int = 0) -> str:
    """Embedding shards (img2dataset layout + ``img_emb`` / ``txt_emb`` / ``txt_tokens`` npy, as
    ``train/precompute_embeddings.py`` writes them) for a converted tiny Karlo ``out``: text features from its text
    tower, image embeddings random at CLIP-like norms (the text-only CLIP has no image tower).  Returns the urls."""
    import io

    import numpy as np
    from PIL import Image

    from dalle2.stages import load_clip_model
    from helpers.shards import write_tar

    clip, vocab = load_clip_model(str(Path(out) / "clip.safetensors"))
    tok = vocab.tokenizer()
    g = torch.Generator().manual_seed(seed)
    captions = [
        f"a {c} {s} on a table" for c in ("red", "blue", "green", "white") for s in ("cube", "ball", "cone", "cup")
    ]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    members: list[list] = [[], []]  # two shards: one per rank of a 2-process run
    feats = clip.encode_text_features(tok(captions[:n]))
    for i in range(n):
        key = f"{i:06d}"
        pixels = (torch.rand(image_size, image_size, 3, generator=g) * 255).byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")

        def npy(a) -> bytes:
            b = io.BytesIO()
            np.save(b, np.asarray(a, dtype=np.float16))
            return b.getvalue()

        members[i % 2] += [
            (f"{key}.png", buf.getvalue()),
            (f"{key}.txt", captions[i % len(captions)].encode()),
            (f"{key}.img_emb.npy", npy(torch.randn(clip.embed_dim, generator=g) * 0.5)),
            (f"{key}.txt_emb.npy", npy(feats.embed[i].detach())),
            (f"{key}.txt_tokens.npy", npy(feats.tokens[i].detach())),
        ]
    for j, m in enumerate(members):
        write_tar(root / f"{j:05d}.tar", m)
    return str(root / "{00000..00001}.tar")
