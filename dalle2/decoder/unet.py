"""The cascaded decoder's networks: one parametrised UNet for the base decoder and the super-resolution upsamplers.

Base decoder (DALL-E 2 sec. 2.1): the CLIP image embedding is projected and ADDED to the timestep embedding, and
projected into ``num_image_tokens`` (4) extra context tokens that are concatenated to the (optional) text-encoder
tokens.  Attention layers are GLIDE style: each pixel attends over ``[pixels ; context tokens]`` in one softmax (the
context has its own key/value projection per attention layer).  Optionally a pooled text embedding is added to the
timestep embedding too.

Upsamplers: ``lowres_cond=True`` resizes the low-res image (bilinear) to ``x``'s size and concatenates it to ``x`` in
channels; the augmentation level (a timestep-like scalar per sample) is embedded and added to the timestep embedding.
No attention and no CLIP conditioning by default; the network is fully convolutional, so it trains on random crops
and samples at full size (any H, W divisible by ``2 ** (len(channel_mult) - 1)``).

``coord_input=True`` (off by default; not in the paper) concatenates the pixel coordinates (x, y in [-1, 1]) to the
input: a convolutional network otherwise only learns where it is from the zero padding, which a small, briefly
trained decoder does not manage (it puts every object in the centre; see docs/decoder.md).

``patch_size=p`` (1 by default; not in the paper, "simple diffusion"'s patching, Hoogeboom et al. 2023) runs the whole
UNet at ``H / p``: the input conv reads each ``p x p`` patch as ``p * p * C`` channels (pixel unshuffle) and the output
conv predicts them back (pixel shuffle).  A 64 px base decoder then costs about what a 32 px one does, and draws edges
at 64 px precision (docs/changelog.md).

``narrow_upsample=True`` (off by default; not in the paper) makes each up-path upsampling conv output the width of the
level it enters, not the width of the level it leaves: at a cheap, narrow full-resolution level (the CPU ``tiny64``
preset: 16 channels at 64 px, 32 at 32 px) its two most expensive convolutions then read 16 + 16 channels instead of
32 + 16, and the upsampling conv writes 16 channels at 64 px instead of 32.

Classifier-free guidance: where ``drop_image_embed`` / ``drop_text`` is True the image embedding (its time-embedding
term and its tokens) / the text (its tokens and pooled embedding) are replaced by LEARNED null embeddings.  A dropped
text row becomes a single null token (other positions masked), so it does not depend on the text length.  Guidance
itself is a wrapper around the model function (``dalle2.diffusion.guidance``), not a flag here.

This network knows nothing of noise: ``forward(x_t, t, **cond) -> prediction`` (eps / x0 / v is the diffusion's
business); with ``learned_variance=True`` the output has ``2 * in_channels`` channels (prediction, variance values).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle2.decoder.blocks import Downsample, PixelAttention, ResBlock, Stage, Upsample, group_norm, zero_init
from dalle2.nn import TimestepEmbedding
from dalle2.nn.text_cond import project_text
from dalle2.presets import load_preset, preset_names

# Constructor kwargs per preset: dalle2/presets/model/{decoder,upsampler}/*.yaml (defined there only).  ``clip_dim`` /
# ``text_dim`` are the CLIP's (``unet_from_preset(..., clip_dim=...)``); the SR presets have no CLIP conditioning.
# ``attention_levels`` index ``channel_mult``: level i runs at (H / 2**i, W / 2**i).  The upsampler preset ``bench``
# is ``sr_bench`` here (the decoder has a ``bench`` too).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    **{name: load_preset("decoder", name) for name in preset_names("decoder")},
    **{("sr_bench" if name == "bench" else name): load_preset("upsampler", name) for name in preset_names("upsampler")},
}

# image size each preset is meant for (for benchmarks and demos; the network itself takes any divisible size)
PRESET_IMAGE_SIZES: dict[str, int] = {
    "tiny32": 32,
    "tiny64": 64,
    "tiny64_lite": 64,
    "tiny_sr32_64": 64,
    "tiny_sr64_256": 256,
    "base64": 64,
    "sr64_256": 256,
    "sr256_1024": 1024,
    "bench": 64,
    "sr_bench": 128,
}


def _bool_rows(flags: torch.Tensor | None, b: int, name: str, device: torch.device) -> torch.Tensor | None:
    if flags is None:
        return None
    flags = torch.as_tensor(flags, device=device)
    if flags.shape != (b,):
        raise ValueError(f"{name} must have shape (B,) = ({b},), got {tuple(flags.shape)}")
    return flags.to(torch.bool)


def _check_shape(value: torch.Tensor, expected: tuple, name: str, meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}")


class UNet(nn.Module):
    """Base decoder / super-resolution UNet (see the module docstring).

    forward(x: (B, C, H, W), t: (B,), *, image_embed: (B, clip_dim) | None, text_tokens: (B, L, text_dim) | None,
            text_mask: (B, L) bool | None, text_embed: (B, text_embed_dim) | None, lowres_image: (B, C, h, w) | None,
            lowres_aug_level: (B,) | None, drop_image_embed: (B,) bool | None, drop_text: (B,) bool | None)
        -> (B, C * (2 if learned_variance else 1), H, W)
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 4, 8),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (),
        mid_attention: bool = True,
        head_channels: int = 64,
        dropout: float = 0.0,
        learned_variance: bool = False,
        clip_dim: int | None = None,
        num_image_tokens: int = 4,
        text_dim: int | None = None,
        text_embed_dim: int | None = None,
        cond_dim: int | None = None,
        lowres_cond: bool = False,
        coord_input: bool = False,
        patch_size: int = 1,
        narrow_upsample: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        channel_mult, attention_levels = tuple(channel_mult), tuple(attention_levels)
        bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise ValueError(
                f"attention_levels {bad} out of range for {len(channel_mult)} levels (0..{len(channel_mult) - 1})"
            )
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.in_channels, self.model_channels, self.patch_size = in_channels, model_channels, patch_size
        self.channel_mult, self.num_res_blocks = channel_mult, num_res_blocks
        self.learned_variance, self.lowres_cond, self.coord_input = learned_variance, lowres_cond, coord_input
        self.clip_dim, self.text_dim, self.text_embed_dim = clip_dim, text_dim, text_embed_dim
        has_attention = bool(attention_levels) or mid_attention
        if text_dim is not None and not has_attention:
            raise ValueError(
                "text_dim needs attention layers to attend to the text tokens (attention_levels / mid_attention)"
            )
        # without attention layers the CLIP embedding conditions through the time embedding only
        self.num_image_tokens = num_image_tokens if clip_dim is not None and has_attention else 0
        self.out_channels = in_channels * (2 if learned_variance else 1)
        self.grad_checkpointing = grad_checkpointing
        time_dim = 4 * model_channels
        self.time_dim = time_dim

        # ---- conditioning -> time embedding (B, time_dim) and context tokens (B, M, cond_dim)
        self.time_embed = TimestepEmbedding(time_dim, freq_dim=model_channels)
        has_context = self.num_image_tokens > 0 or text_dim is not None
        self.cond_dim = (cond_dim or time_dim) if has_context else None
        if clip_dim is not None:
            self.image_to_time = nn.Linear(clip_dim, time_dim)
            self.null_image_time = nn.Parameter(torch.zeros(time_dim))
            if self.num_image_tokens:
                self.image_to_tokens = nn.Linear(clip_dim, self.num_image_tokens * self.cond_dim)
                self.null_image_tokens = nn.Parameter(torch.randn(self.num_image_tokens, self.cond_dim) * 0.02)
        if text_dim is not None:
            self.text_proj = nn.Linear(text_dim, self.cond_dim)
            self.null_text_token = nn.Parameter(torch.randn(self.cond_dim) * 0.02)
        if text_embed_dim is not None:
            self.text_embed_to_time = nn.Linear(text_embed_dim, time_dim)
            self.null_text_time = nn.Parameter(torch.zeros(time_dim))
        self.context_norm = nn.LayerNorm(self.cond_dim) if has_context else None
        if lowres_cond:
            self.aug_embed = TimestepEmbedding(time_dim, freq_dim=model_channels)

        # ---- the UNet
        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, out_channels=cout, emb_dim=time_dim, dropout=dropout)

        def attn(ch: int) -> PixelAttention:
            return PixelAttention(ch, head_channels=head_channels, context_dim=self.cond_dim)

        input_channels = in_channels * (2 if lowres_cond else 1) + (2 if coord_input else 0)
        # patch_size: see the module docstring (pixel unshuffle in, pixel shuffle out)
        self.input_conv = nn.Conv2d(input_channels * patch_size**2, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    blocks.append(attn(ch))
                self.down.append(Stage(blocks))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle = Stage([res(ch, ch), *([attn(ch)] if mid_attention else []), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    blocks.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    # narrow_upsample: the upsampling conv already outputs the next level's width, so the first
                    # up block there reads (next width + skip) channels, not (this width + skip)
                    out = model_channels * channel_mult[level - 1] if narrow_upsample else ch
                    blocks.append(Upsample(ch, out))
                    ch = out
                self.up.append(Stage(blocks))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, self.out_channels * patch_size**2, 3, padding=1))
        )

    # ----------------------------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def _image_cond(
        self, image_embed: torch.Tensor | None, drop: torch.Tensor | None, b: int, ref: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (time term (B, time_dim), tokens (B, n, cond_dim) | None)."""
        if image_embed is None:
            if drop is None or not bool(drop.all()):
                raise ValueError(
                    f"image_embed (B, clip_dim) = ({b}, {self.clip_dim}) is required by this UNet "
                    "(or pass drop_image_embed all True for the unconditional branch)"
                )
            time = self.null_image_time.expand(b, -1)
            tokens = self.null_image_tokens.expand(b, -1, -1) if self.num_image_tokens else None
            return time, tokens
        _check_shape(image_embed, (b, self.clip_dim), "image_embed", "(B, clip_dim)")
        image_embed = image_embed.to(device=ref.device, dtype=self.image_to_time.weight.dtype)
        time = self.image_to_time(image_embed)
        tokens = None
        if self.num_image_tokens:
            tokens = self.image_to_tokens(image_embed).view(b, self.num_image_tokens, self.cond_dim)
        if drop is not None:
            time = torch.where(drop[:, None], self.null_image_time.to(time.dtype), time)
            if tokens is not None:
                tokens = torch.where(drop[:, None, None], self.null_image_tokens.to(tokens.dtype), tokens)
        return time, tokens

    def _text_cond(
        self,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        drop: torch.Tensor | None,
        b: int,
        ref: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens (B, L, cond_dim), valid (B, L) bool); a dropped row is one null token, the rest masked."""
        if text_tokens is None:
            if drop is None or not bool(drop.all()):
                raise ValueError(
                    f"text_tokens (B, L, text_dim) = ({b}, L, {self.text_dim}) is required by this UNet "
                    "(or pass drop_text all True for the unconditional branch)"
                )
            tokens = self.null_text_token.expand(b, 1, -1)
            return tokens, torch.ones(b, 1, dtype=torch.bool, device=ref.device)
        if text_tokens.dim() != 3 or text_tokens.shape[0] != b or text_tokens.shape[2] != self.text_dim:
            raise ValueError(
                f"text_tokens must have shape (B, L, text_dim) = ({b}, L, {self.text_dim}), got {tuple(text_tokens.shape)}"
            )
        length = text_tokens.shape[1]
        if text_mask is None:
            valid = torch.ones(b, length, dtype=torch.bool, device=ref.device)
        else:
            _check_shape(text_mask, (b, length), "text_mask", "(B, L)")
            valid = text_mask.to(device=ref.device, dtype=torch.bool)
        return project_text(self.text_proj, text_tokens, valid, drop, self.null_text_token)

    def _conditioning(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        image_embed,
        text_tokens,
        text_mask,
        text_embed,
        lowres_aug_level,
        drop_image_embed,
        drop_text,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> emb (B, time_dim), context (B, M, cond_dim) | None, context_mask (B, M) bool | None."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        _check_shape(t, (b,), "t", "(B,)")
        drop_image_embed = _bool_rows(drop_image_embed, b, "drop_image_embed", x.device)
        drop_text = _bool_rows(drop_text, b, "drop_text", x.device)

        emb = self.time_embed(t)
        ctx, ctx_valid = [], []
        if self.clip_dim is not None:
            time, tokens = self._image_cond(image_embed, drop_image_embed, b, x)
            emb = emb + time.to(emb.dtype)
            if tokens is not None:
                ctx.append(tokens)
                ctx_valid.append(torch.ones(b, tokens.shape[1], dtype=torch.bool, device=x.device))
        elif image_embed is not None:
            raise ValueError("image_embed given but this UNet has no CLIP conditioning (clip_dim=None)")
        if self.text_dim is not None:
            tokens, valid = self._text_cond(text_tokens, text_mask, drop_text, b, x)
            ctx.append(tokens)
            ctx_valid.append(valid)
        elif text_tokens is not None:
            raise ValueError("text_tokens given but this UNet has no text conditioning (text_dim=None)")
        if self.text_embed_dim is not None:
            if text_embed is None:
                if drop_text is None or not bool(drop_text.all()):
                    raise ValueError(f"text_embed (B, text_embed_dim) = ({b}, {self.text_embed_dim}) is required")
                emb = emb + self.null_text_time.to(emb.dtype)
            else:
                _check_shape(text_embed, (b, self.text_embed_dim), "text_embed", "(B, text_embed_dim)")
                term = self.text_embed_to_time(text_embed.to(self.text_embed_to_time.weight.dtype))
                if drop_text is not None:
                    term = torch.where(drop_text[:, None], self.null_text_time.to(term.dtype), term)
                emb = emb + term.to(emb.dtype)
        elif text_embed is not None:
            raise ValueError("text_embed given but this UNet has no pooled-text conditioning (text_embed_dim=None)")
        if self.lowres_cond:
            if lowres_aug_level is None:
                raise ValueError(
                    f"lowres_aug_level (B,) = ({b},) is required by this SR UNet (zeros for no augmentation)"
                )
            level = torch.as_tensor(lowres_aug_level, device=x.device)
            if level.dim() == 0:
                level = level.expand(b)
            _check_shape(level, (b,), "lowres_aug_level", "(B,)")
            emb = emb + self.aug_embed(level).to(emb.dtype)

        if not ctx:
            return emb, None, None
        context = self.context_norm(torch.cat([c.to(self.context_norm.weight.dtype) for c in ctx], dim=1))
        return emb, context, torch.cat(ctx_valid, dim=1)

    def _lowres_input(self, x: torch.Tensor, lowres_image: torch.Tensor | None) -> torch.Tensor:
        b, c, height, width = x.shape
        if not self.lowres_cond:
            if lowres_image is not None:
                raise ValueError("lowres_image given but this UNet is not a super-resolution UNet (lowres_cond=False)")
            return x
        if lowres_image is None:
            raise ValueError(f"lowres_image (B, C, h, w) = ({b}, {c}, h, w) is required by this SR UNet")
        if lowres_image.dim() != 4 or lowres_image.shape[:2] != (b, c):
            raise ValueError(
                f"lowres_image must have shape (B, C, h, w) = ({b}, {c}, h, w), got {tuple(lowres_image.shape)}"
            )
        lowres = lowres_image.to(x.dtype)
        if lowres.shape[-2:] != (height, width):
            lowres = F.interpolate(lowres, size=(height, width), mode="bilinear", align_corners=False)
        return torch.cat([x, lowres], dim=1)

    def _run(self, stage: Stage, h, emb, context, context_mask) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, context, context_mask, use_reentrant=False)
        return stage(h, emb, context, context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        image_embed: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_embed: torch.Tensor | None = None,
        lowres_image: torch.Tensor | None = None,
        lowres_aug_level: torch.Tensor | None = None,
        drop_image_embed: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) noised image; t: (B,) timesteps (int or float); image_embed: (B, clip_dim) CLIP image
        embedding; text_tokens: (B, L, text_dim) text-encoder outputs with text_mask: (B, L) True for real tokens;
        text_embed: (B, text_embed_dim) pooled text embedding; lowres_image: (B, C, h, w) low-res image (SR only,
        resized here to H, W); lowres_aug_level: (B,) its augmentation level; drop_image_embed / drop_text: (B,) True
        to use the learned null conditioning.  Returns (B, out_channels, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = {self.in_channels}, got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"x spatial size {tuple(x.shape[-2:])} must be divisible by {f} (patch_size * 2 ** (levels - 1))"
            )
        emb, context, context_mask = self._conditioning(
            x, t, image_embed, text_tokens, text_mask, text_embed, lowres_aug_level, drop_image_embed, drop_text
        )
        h = self._lowres_input(x, lowres_image)
        if self.coord_input:
            h = torch.cat([h, coordinate_grid(h)], dim=1)
        h = self.input_conv(F.pixel_unshuffle(h, self.patch_size) if self.patch_size > 1 else h)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, context_mask)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        out = self.out(h)
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` pixel-centre coordinates in [-1, 1] (x then y), in ``x``'s dtype and device."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W)
    return grid[None].expand(b, -1, -1, -1)


def unet_from_preset(name: str, **overrides: Any) -> UNet:
    """Build a ``UNet`` from ``UNET_PRESETS[name]``; any kwarg (e.g. ``clip_dim``/``text_dim`` from CLIP) overrides."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; expected one of {sorted(UNET_PRESETS)}")
    return UNet(**{**UNET_PRESETS[name], **overrides})


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
