"""CLIP: an image tower (ViT or CLIP's modified ResNet) and a causal text transformer in one embedding space.

Parameter names follow OpenAI CLIP's (``visual.conv1``, ``visual.ln_pre``, ``ln_1``/``attn``/``ln_2``/``mlp`` ...)
so that ``dalle2.clip.pretrained`` maps OpenAI / open_clip weights onto it with a short rename table.
The text tower lives under ``text.`` (OpenAI keeps it at the top level).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dalle2.nn import Transformer
from dalle2.presets import load_preset, preset_names

# CLIP's image normalisation (RGB, applied to pixels in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)

# Size presets: the keyword dicts of ``CLIP(**preset)``, defined in dalle2/presets/model/clip/*.yaml only.
# "tiny" trains in minutes on 2 CPU cores; its vocab is the shipped BPE's (override ``vocab_size`` for another).
CLIP_PRESETS: dict[str, dict[str, Any]] = {name: load_preset("clip", name) for name in preset_names("clip")}


def clip_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``CLIP_PRESETS[name]`` with ``overrides`` applied (e.g. ``vocab_size=tokenizer.vocab_size``)."""
    if name not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; expected one of {sorted(CLIP_PRESETS)}")
    return {**CLIP_PRESETS[name], **overrides}


def preprocess_for_clip(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """images: (B, 3, H, W) in [-1, 1] -> (B, 3, image_size, image_size) CLIP-normalised.

    Resizes the shorter side to ``image_size`` (bicubic, antialiased) and centre-crops when the size differs.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = (images.float() + 1.0) * 0.5
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        x = x[..., top : top + image_size, left : left + image_size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).to(images.dtype)


def init_transformer_(transformer: Transformer) -> None:
    """CLIP's normal-std schedule: attention in ``width^-1/2``, residual outputs ``width^-1/2 (2 layers)^-1/2``."""
    width, layers = transformer.width, max(transformer.layers, 1)
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.zeros_(block.attn.qkv.bias)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.proj.bias)
        nn.init.normal_(block.mlp.fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """ViT image tower: patch conv (no bias) + class token + positions -> ln_pre -> transformer -> ln_post(cls) @ proj.

    forward(images: (B, 3, image_size, image_size)) -> (B, output_dim)
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: str = "gelu",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(
            width=width, layers=layers, heads=heads, activation=activation, grad_checkpointing=grad_checkpointing
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        init_transformer_(self.transformer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of size {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])} "
                "(use preprocess_for_clip to resize)"
            )
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: strided convs replaced by an avgpool before the last 1x1 conv.

    forward(x: (B, inplanes, H, W)) -> (B, 4 planes, H / stride, W / stride)
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean feature (plus positions) over the feature map; returns the pooled token.

    forward(x: (B, C, H, W)) -> (B, output_dim)
    """

    def __init__(self, *, spacial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        h, d = self.heads, c // self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, h, d).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, d)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem + avgpool, four stages of anti-aliased bottlenecks, attention pooling.

    forward(images: (B, 3, image_size, image_size)) -> (B, output_dim)
    """

    def __init__(self, *, layers: Sequence[int], output_dim: int, heads: int, image_size: int, width: int = 64):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stage depths, got {list(layers)}")
        if image_size % 32:
            raise ValueError(f"ModifiedResNet image_size must be a multiple of 32, got {image_size}")
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, depth in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            blocks = [Bottleneck(inplanes, planes, stride=stride)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes) for _ in range(1, depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(
            spacial_dim=image_size // 32, embed_dim=embed_dim, heads=heads, output_dim=output_dim
        )
        std = embed_dim**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for name, p in self.named_parameters():
            if name.endswith("bn3.weight"):
                nn.init.zeros_(p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class TextTransformer(nn.Module):
    """Causal text tower; the sequence feature is taken at the end-of-text token (the highest id: ``argmax``).

    forward(tokens: (B, L) long, L <= context_length) -> (states (B, L, width) after ln_final, pooled (B, output_dim))
    """

    def __init__(
        self,
        *,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: str = "gelu",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(
            width=width,
            layers=layers,
            heads=heads,
            causal=True,
            activation=activation,
            grad_checkpointing=grad_checkpointing,
        )
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=width**-0.5)
        init_transformer_(self.transformer)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected tokens (B, L<={self.context_length}), got {tuple(tokens.shape)}")
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        states = self.ln_final(self.transformer(x))
        eot = states[torch.arange(states.shape[0], device=states.device), tokens.argmax(dim=-1)]
        return states, eot @ self.proj


class TextFeatures(NamedTuple):
    """What CLIP's text tower gives the later stages, from one call (:meth:`CLIP.encode_text_features`).

    ``embed`` (B, D): the pooled, projected text embedding (not normalised); ``tokens`` (B, L, W): the per-token
    states after the final layer norm; ``mask`` (B, L) bool: the real tokens (:func:`text_mask`).
    """

    embed: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


def text_mask(tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """The one rule for which text positions are real: everything but the padding — the trailing run of pad ids,
    which is a run of 0s (OpenAI's padding) or of end tokens after the text's own end token (``transformers``' CLIP
    tokenizers pad with the end token) — the start token always on (never an all-masked row), cut or padded (False)
    to ``length`` positions (the token states' length; default the ids').  Equals the reference tokenizers'
    attention masks, whichever the padding."""
    length = tokens.shape[1] if length is None else int(length)
    last = tokens[:, -1:]
    run = (tokens == last).flip(1).long().cumprod(1).sum(1)  # length of the trailing run of the last id
    first_of_run = tokens.shape[1] - run
    end = torch.where(last[:, 0] == 0, first_of_run - 1, first_of_run)  # an end-token run keeps its first token
    mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] <= end[:, None])[:, :length]
    if mask.shape[1] < length:
        mask = F.pad(mask, (0, length - mask.shape[1]), value=False)
    mask[:, 0] = True
    return mask


def _logit_scale_shape(module, state_dict, prefix, *args) -> None:
    """Load a 1-element ``logit_scale`` (sharded training keeps it as a vector: FSDP shards dim 0) into either shape."""
    key, mine = prefix + "logit_scale", module.logit_scale
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.shape != mine.shape:
        state_dict[key] = value.reshape(mine.shape)


class CLIP(nn.Module):
    """Contrastive image-text model (``vision_layers`` as an int: ViT; as 4 stage depths: ModifiedResNet; 0: no image
    tower, a text encoder alone, as converted from a pipeline that ships only CLIP's text tower, e.g. Karlo).

    ``self.config`` holds the constructor keywords (plain JSON types) so a checkpoint can rebuild the model:
    ``CLIP.from_config(model.to_config())``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_size: int,
        vision_width: int,
        vision_layers: int | Sequence[int],
        vision_heads: int,
        vision_patch_size: int | None = None,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int,
        text_layers: int,
        text_heads: int,
        activation: str = "gelu",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        is_vit = isinstance(vision_layers, int)
        if not is_vit:
            vision_layers = [int(n) for n in vision_layers]
        self.config: dict[str, Any] = dict(
            embed_dim=embed_dim,
            image_size=image_size,
            vision_width=vision_width,
            vision_layers=vision_layers,
            vision_heads=vision_heads,
            vision_patch_size=vision_patch_size,
            context_length=context_length,
            vocab_size=vocab_size,
            text_width=text_width,
            text_layers=text_layers,
            text_heads=text_heads,
            activation=activation,
            grad_checkpointing=grad_checkpointing,
        )
        self.embed_dim, self.image_size, self.context_length = embed_dim, image_size, context_length
        if is_vit and vision_layers == 0:
            self.visual: nn.Module | None = None  # text tower only: encode_image raises
        elif is_vit:
            if vision_patch_size is None:
                raise ValueError("a ViT image tower (vision_layers: int) needs vision_patch_size")
            self.visual = VisionTransformer(
                image_size=image_size,
                patch_size=vision_patch_size,
                width=vision_width,
                layers=vision_layers,
                heads=vision_heads,
                output_dim=embed_dim,
                activation=activation,
                grad_checkpointing=grad_checkpointing,
            )
        else:
            self.visual = ModifiedResNet(
                layers=vision_layers,
                output_dim=embed_dim,
                heads=vision_heads,
                image_size=image_size,
                width=vision_width,
            )
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            layers=text_layers,
            heads=text_heads,
            output_dim=embed_dim,
            activation=activation,
            grad_checkpointing=grad_checkpointing,
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self._register_load_state_dict_pre_hook(_logit_scale_shape, with_module=True)

    # -- config ---------------------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        return dict(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CLIP":
        return cls(**config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.config["grad_checkpointing"] = enable
        for m in self.modules():
            if isinstance(m, Transformer):
                m.grad_checkpointing = enable

    # -- encoders -------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, image_size, image_size) CLIP-normalised -> (B, embed_dim), not normalised."""
        return self._visual()(images)

    @property
    def has_image_tower(self) -> bool:
        return self.visual is not None

    def _visual(self) -> nn.Module:
        if self.visual is None:
            raise ValueError(
                "this CLIP has no image tower (a text encoder converted alone, e.g. Karlo's): image embeddings "
                "need a full CLIP (e.g. OpenAI's ViT-L/14 weights for Karlo)"
            )
        return self.visual

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures as the rest of the stack holds them — (B, 3, H, W) in [-1, 1], any size — -> (B, embed_dim),
        not normalised (:func:`preprocess_for_clip`, then :meth:`encode_image`)."""
        return self._visual()(preprocess_for_clip(images, self.image_size))

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (B, L) long -> (states (B, L, text_width) after ln_final, pooled (B, embed_dim) unnormalised)."""
        return self.text(tokens)

    def encode_text_features(self, tokens: torch.Tensor) -> TextFeatures:
        """tokens: (B, L) long -> :class:`TextFeatures` (embedding, per-token states and their mask): what the prior,
        the decoder, the pipeline and the embedding shards use."""
        states, pooled = self.text(tokens)
        return TextFeatures(embed=pooled, tokens=states, mask=text_mask(tokens, states.shape[1]))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) long -> (B, embed_dim), not normalised."""
        return self.text(tokens)[1]

    def clamped_logit_scale(self) -> torch.Tensor:
        """``exp(min(logit_scale, ln 100))`` (a scalar tensor)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) CLIP-normalised, tokens: (B, L) long ->
        ``{"image_features": (B, D) unit norm, "text_features": (B, D) unit norm, "logit_scale": ()}``."""
        return {
            "image_features": F.normalize(self.encode_image(images), dim=-1),
            "text_features": F.normalize(self.encode_text(tokens), dim=-1),
            "logit_scale": self.clamped_logit_scale(),
        }
