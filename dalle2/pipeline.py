"""Text -> image with the whole unCLIP cascade: CLIP text encoder -> prior -> decoder -> upsamplers.

    pipe = UnCLIPPipeline.from_checkpoints(clip="clip.ckpt", prior="prior.ckpt", decoder="decoder.ckpt",
                                           upsamplers=["sr.ckpt"], device="cuda")
    images = pipe(["a red circle", "a blue square"], seed=0)        # (2, 3, H, W) in [0, 1]
    small = pipe(["a red circle"], seed=0, size=pipe.sizes[0])      # stop the cascade after the decoder
    var = pipe.variations(images)                                   # image -> CLIP embedding -> decoder (no prior)
    frames = pipe.interpolate("a red circle", "a blue square", num=5)  # slerp of the two image embeddings

Every stage uses its EMA weights.  Classifier-free guidance, steps, sampler and eta are set per stage with
:class:`SamplingSettings`.

**Determinism.**  Image ``i`` of a call draws all of its noise (the prior's initial noise for its
``n_prior_samples`` candidates, the decoder's ``x_T``, each upsampler's low-res augmentation noise and ``x_T``,
and any stochastic sampler noise: ddpm, ddim with eta > 0) from its own CPU ``torch.Generator``, one per stage,
seeded by :func:`sample_seed` ``(seed_i, index_i, stage)``.  ``seed`` is one int (shared) or one per prompt;
``indices`` default to ``range(B)``; an index may be an int ``i`` or a pair ``(i, k)`` (``i`` is the same as
``(i, 0)``; ``eval/sample.py`` uses ``(prompt line, sample number)``).  So an image depends only on its prompt,
seed, index and settings, never on the other prompts of its batch (up to float rounding of batched matmuls, which
in practice leaves the 8-bit PNG unchanged), nor on the device the noise ends up on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.clip.model import CLIP
from dalle2.sampling_settings import SamplingSettings, StageSettings
from dalle2.seeding import mix_seed
from dalle2.stages import DecoderStage, PriorStage, UpsamplerStage, load_clip_model, load_stage

__all__ = [
    "stage_paths",
    "StageSettings",
    "SamplingSettings",
    "UnCLIPPipeline",
    "sample_seed",
    "sample_generators",
    "slerp",
]

Index = int | tuple[int, ...]
PIPELINE_FILE = "pipeline.json"  # a directory that loads as a whole (UnCLIPPipeline.from_dir)

# generator streams: one independent noise stream per stage and image
STREAM_PRIOR, STREAM_DECODER, STREAM_UPSAMPLER = 1, 2, 3


def _as_index(index: Any) -> tuple[int, ...]:
    if isinstance(index, Tensor):
        index = index.tolist()
    if isinstance(index, (tuple, list)):
        return tuple(int(v) for v in index)
    return (int(index),)


def sample_seed(seed: int, index: Index, stream: int = 0) -> int:
    """A 63-bit generator seed for ``(seed, index, stream)`` (:func:`dalle2.seeding.mix_seed`: the same in every
    process).  ``index`` is an int ``i`` (= ``(i, 0)``) or a tuple ``(i, k)``."""
    idx = _as_index(index)
    idx = (*idx, *([0] * (2 - len(idx))))  # i == (i,) == (i, 0)
    return mix_seed(int(stream), int(seed), *idx)


def sample_generators(seeds: Sequence[int], indices: Sequence[Index], stream: int) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded by :func:`sample_seed` ``(seeds[i], indices[i], stream)``."""
    return [torch.Generator().manual_seed(sample_seed(s, i, stream)) for s, i in zip(seeds, indices)]


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of unit vectors ``a, b: (D,)`` at ``t: (N,)`` -> ``(N, D)`` unit vectors
    (linear interpolation, renormalised, when they are (anti)parallel)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    t = t.float().reshape(-1, 1).to(a.device)
    omega = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if float(torch.sin(omega)) < 1e-4:
        return F.normalize((1 - t) * a + t * b, dim=-1)
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b
    return F.normalize(out, dim=-1)


def stage_paths(cfg: Any) -> dict[str, Any]:
    """The stage files an entry point's config names (``eval/sample.py``, ``eval/coco_fid.py``, ``eval/serve.py``):
    ``pipeline=DIR`` (a directory with ``pipeline.json``, e.g. a converted Karlo: its files and its own sampling
    settings) or ``ckpt.clip`` / ``ckpt.prior`` / ``ckpt.decoder`` / ``ckpt.upsamplers`` (no settings of their own)
    -> ``{"clip", "prior", "decoder", "upsamplers", "sampling": dict | None}``; neither is a ``ValueError``."""
    if cfg.get("pipeline"):
        return UnCLIPPipeline.read_manifest(str(cfg.get("pipeline")))
    ckpt = cfg.get("ckpt") or {}
    missing = [k for k in ("clip", "decoder") if not ckpt.get(k)]
    if missing:
        raise ValueError(
            "give pipeline=DIR (a cascade with pipeline.json, e.g. python -m dalle2.convert karlo's output) or "
            f"the stage files ckpt.clip= ckpt.decoder= [ckpt.prior= ckpt.upsamplers=[...]] (missing: {', '.join(missing)})"
        )
    return {
        "clip": ckpt.get("clip"),
        "prior": ckpt.get("prior") or None,
        "decoder": ckpt.get("decoder"),
        "upsamplers": list(ckpt.get("upsamplers") or []),
        "sampling": None,
    }


def resolve_stages(cfg: Any, *, error_prefix: str = "error: ", need_prior: bool = True) -> SamplingSettings | None:
    """An entry point's ``pipeline=DIR`` or ``ckpt.*`` -> ``cfg.ckpt.*`` filled with the stage files (exits with one
    line, ``error_prefix`` first, for neither; likewise without a prior when ``need_prior``); returns the
    directory's own sampling settings (the base that ``steps.*`` / ``guidance.*`` ... override)."""
    try:
        paths = stage_paths(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{error_prefix}{e}") from None
    for key in ("clip", "prior", "decoder", "upsamplers"):  # every entry point's config has these keys
        cfg.ckpt[key] = paths[key]
    if need_prior and not cfg.ckpt.prior:
        raise SystemExit(f"{error_prefix}text-to-image needs a prior: ckpt.prior= (or pipeline=DIR)")
    return SamplingSettings.from_dict(paths["sampling"]) if paths["sampling"] else None


# --------------------------------------------------------------------------------------------------- pipeline


def _clip_and_vocabulary(clip) -> tuple[CLIP, Any]:
    """A plain ``CLIP``, or anything holding one as ``.model`` (a trained CLIP's LightningModule) with its
    ``.vocabulary``."""
    if isinstance(clip, CLIP):
        return clip, None
    model = getattr(clip, "model", None)
    if isinstance(model, CLIP):
        return model, getattr(clip, "vocabulary", None)
    raise TypeError(f"clip must be a dalle2.clip.model.CLIP (or hold one as .model), got {type(clip).__name__}")


def _stage(x, kind: type, name: str):
    """A plain stage, or the one a LightningModule samples with (its ``sampling_stage()``: the EMA network)."""
    if x is None or isinstance(x, kind):
        return x
    if callable(getattr(x, "sampling_stage", None)):
        return x.sampling_stage()
    raise TypeError(
        f"{name} must be a {kind.__name__} (dalle2.stages.load_stage) or a module with "
        f"sampling_stage(), got {type(x).__name__}"
    )


class UnCLIPPipeline(nn.Module):
    """The composed cascade, made of plain networks (:mod:`dalle2.stages`).  Build it with :meth:`from_checkpoints`,
    or from loaded stages (or trained LightningModules: their EMA networks are used):

    Args (keyword-only):
        clip: a ``dalle2.clip.model.CLIP`` (text encoder for prompts, image encoder for variations), or a module
            holding one as ``.model`` with its ``.vocabulary``.
        decoder: a ``DecoderStage``; ``upsamplers``: ``UpsamplerStage`` s, in order (each one's ``lowres_size`` must be
            the previous stage's output size).
        prior: a ``PriorStage`` (None: only :meth:`variations` and embedding/image :meth:`interpolate` work).
        tokenizer: a ``Tokenizer`` or a merges file (default: the vocabulary the CLIP was trained with, as stored in
            its checkpoint — or in the prior's / text decoder's; the shipped one when none records it).  One that
            does not match (hash, or size for a CLIP that records none) is a ``VocabularyMismatchError``, as is a
            prior or text decoder trained on another vocabulary's text features.
        vocabulary: the CLIP's vocabulary when ``clip`` is a plain ``CLIP`` (``load_clip_model`` returns it).
    """

    def __init__(self, *, clip, decoder, prior=None, upsamplers: Sequence = (), tokenizer=None, vocabulary=None):
        super().__init__()
        from dalle2.clip.tokenizer import VocabularyMismatchError, resolve_tokenizer

        clip, clip_vocab = _clip_and_vocabulary(clip)
        decoder = _stage(decoder, DecoderStage, "decoder")
        prior = _stage(prior, PriorStage, "prior")
        upsamplers = [_stage(u, UpsamplerStage, f"upsampler {j}") for j, u in enumerate(upsamplers)]
        self.clip, self.decoder, self.prior = clip.eval(), decoder.eval(), None if prior is None else prior.eval()
        self.upsamplers = nn.ModuleList([u.eval() for u in upsamplers])
        self.requires_grad_(False)
        clip_cfg = clip.config
        embed_dim, text_width = int(clip_cfg["embed_dim"]), int(clip_cfg["text_width"])
        if decoder.clip_dim != embed_dim:
            raise ValueError(f"decoder expects CLIP embeddings of size {decoder.clip_dim}, the CLIP gives {embed_dim}")
        if decoder.use_text and decoder.text_dim != text_width:
            raise ValueError(f"decoder expects CLIP text states of width {decoder.text_dim}, the CLIP has {text_width}")
        if prior is not None:
            if prior.embed_dim != embed_dim:
                raise ValueError(f"prior samples embeddings of size {prior.embed_dim}, the CLIP's are {embed_dim}")
            if prior.use_text_tokens and prior.text_token_dim != text_width:
                raise ValueError(
                    f"prior expects CLIP text states of width {prior.text_token_dim}, the CLIP has {text_width}"
                )
        sizes = [decoder.image_size]
        for j, up in enumerate(self.upsamplers):
            if up.lowres_size != sizes[-1]:
                raise ValueError(
                    f"upsampler {j} takes {up.lowres_size} px images but the stage before it makes {sizes[-1]} px"
                )
            sizes.append(up.image_size)
        self.sizes: tuple[int, ...] = tuple(sizes)
        # what calls without settings= use: SamplingSettings(), or a converted directory's own (from_dir)
        self.default_settings = SamplingSettings()
        vocab, owner = vocabulary if vocabulary is not None else clip_vocab, "the CLIP"
        for name, stage in (("prior", prior), ("decoder", decoder if decoder.use_text else None)):
            v = getattr(stage, "vocabulary", None)
            if v is None:
                continue
            if vocab is None:  # a CLIP that records no vocabulary: the stage trained on its text says which
                vocab, owner = v, f"the {name}'s CLIP"
            elif v.sha256 != vocab.sha256:
                raise VocabularyMismatchError(
                    f"the {name} was trained on text features of a CLIP with vocabulary {v.describe()}, but this "
                    f"CLIP's is {vocab.describe()}: not its CLIP"
                )
        self.tokenizer = resolve_tokenizer(
            vocab,
            tokenizer,
            context_length=clip.context_length,
            model_vocab_size=int(clip_cfg["vocab_size"]),
            owner=owner,
        )

    @classmethod
    def from_checkpoints(
        cls,
        *,
        clip: str,
        prior: str | None = None,
        decoder: str,
        upsamplers: Sequence[str] = (),
        device: str | torch.device = "cpu",
        tokenizer: str | None = None,
        trust_checkpoint: bool = False,
    ) -> "UnCLIPPipeline":
        """Load each stage from a ``.ckpt`` (weights-only unpickling) or a safetensors export (``python -m
        dalle2.export``), with a stage check (``WrongStageError`` naming the file), through :mod:`dalle2.stages`.
        ``clip``: a stage=clip ``.ckpt`` / export or CLIP weights (OpenAI / open_clip / safetensors).  A file that
        would run code raises ``UntrustedCheckpointError`` unless ``trust_checkpoint``.  ``tokenizer``: a BPE merges
        file (None: the CLIP's own vocabulary)."""
        if isinstance(upsamplers, str):
            upsamplers = [upsamplers]
        trust = {"trust_checkpoint": bool(trust_checkpoint)}
        clip_model, vocab = load_clip_model(clip, **trust)
        return cls(
            clip=clip_model,
            vocabulary=vocab,
            prior=load_stage(prior, "prior", **trust) if prior else None,
            decoder=load_stage(decoder, "decoder", **trust),
            tokenizer=tokenizer,
            upsamplers=[load_stage(p, "upsampler", **trust) for p in upsamplers],
        ).to(device)

    @staticmethod
    def read_manifest(path: str) -> dict[str, Any]:
        """``<dir>/pipeline.json`` with its stage files as paths: ``{"clip", "prior", "decoder", "upsamplers",
        "sampling"}`` (see :meth:`from_dir`)."""
        import json
        from pathlib import Path

        root = Path(path)
        manifest = root / PIPELINE_FILE
        if not manifest.is_file():
            raise FileNotFoundError(f"{path}: no {PIPELINE_FILE} (write one with python -m dalle2.convert karlo)")
        try:
            spec = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest}: not JSON ({e})") from None
        if not isinstance(spec, dict) or spec.get("format") != "dalle2.pipeline":
            raise ValueError(f"{manifest}: not a dalle2 pipeline manifest (format {spec.get('format')!r})")
        missing = [k for k in ("clip", "decoder") if not spec.get(k)]
        if missing:
            raise ValueError(f"{manifest}: names no {', '.join(missing)}")
        return {
            "clip": str(root / spec["clip"]),
            "prior": str(root / spec["prior"]) if spec.get("prior") else None,
            "decoder": str(root / spec["decoder"]),
            "upsamplers": [str(root / u) for u in spec.get("upsamplers") or []],
            "sampling": spec.get("sampling"),
        }

    @classmethod
    def from_dir(
        cls, path: str, *, device: str | torch.device = "cpu", tokenizer: str | None = None
    ) -> "UnCLIPPipeline":
        """A whole cascade from a directory with ``pipeline.json`` (e.g. ``python -m dalle2.convert karlo``'s output):
        its stage files (exports), and its sampling settings as :attr:`default_settings`."""
        spec = cls.read_manifest(path)
        pipe = cls.from_checkpoints(
            clip=spec["clip"],
            prior=spec["prior"],
            decoder=spec["decoder"],
            upsamplers=spec["upsamplers"],
            device=device,
            tokenizer=tokenizer,
        )
        if spec.get("sampling"):
            pipe.default_settings = SamplingSettings.from_dict(spec["sampling"])
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # -- helpers --------------------------------------------------------------------------------------------------
    def _num_upsamplers(self, size: int | None) -> int:
        if size is None:
            return len(self.upsamplers)
        if int(size) not in self.sizes:
            raise ValueError(f"size={size} is not one this cascade can produce; expected one of {list(self.sizes)}")
        return self.sizes.index(int(size))

    @staticmethod
    def _seeds_indices(n: int, seed: int | Sequence[int], indices: Sequence[Index] | None) -> tuple[list, list]:
        if isinstance(seed, (int,)) or (isinstance(seed, Tensor) and seed.ndim == 0):
            seeds = [int(seed)] * n
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != n:
                raise ValueError(f"got {len(seeds)} seeds for {n} images (give one int or one seed per image)")
        if indices is None:
            idx: list[Index] = list(range(n))
        else:
            idx = [_as_index(i) for i in indices]
            if len(idx) != n:
                raise ValueError(f"got {len(idx)} indices for {n} images")
        return seeds, idx

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Prompts -> ``{"text_embed" (B, D), "text_tokens" (B, L, Dt), "text_mask" (B, L) bool}`` (CLIP text
        encoder; the mask is ``tokens != 0`` with the start token always on, as in training)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        tokens = self.tokenizer(list(prompts)).to(self.device)
        text = self.clip.encode_text_features(tokens)
        return {"text_embed": text.embed.float(), "text_tokens": text.tokens.float(), "text_mask": text.mask}

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, h, w)`` in [0, 1] -> unit-norm CLIP image embeddings ``(B, D)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.device).float() * 2.0 - 1.0
        return F.normalize(self.clip.embed_images(x).float(), dim=-1)

    @torch.no_grad()
    def prior_embeddings(
        self,
        text: dict[str, Tensor],
        *,
        seeds: list[int],
        indices: list[Index],
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Text conditioning (from :meth:`encode_prompts`) -> unit-norm image embeddings ``(B, D)`` via the prior."""
        if self.prior is None:
            raise ValueError(
                "text-to-image needs a prior checkpoint (from_checkpoints(prior=...)); without one, "
                "use variations() or interpolate() between images/embeddings"
            )
        st, prior = settings.prior, self.prior
        # The text keeps the CLIP's full context length (fixed, the same for every batch): with padded keys masked
        # and one null token for the CFG branch the result does not depend on the length, but a fixed length keeps
        # the float summation order, hence the bytes, independent of the other prompts in the batch.
        length = min(text["text_tokens"].shape[1], prior.max_text_len)
        return prior.sample(
            text_embed=text["text_embed"],
            text_tokens=text["text_tokens"][:, :length],
            text_mask=text["text_mask"][:, :length],
            n_samples_per_prompt=int(settings.n_prior_samples),
            steps=int(st.steps),
            sampler=st.sampler,
            guidance_scale=float(st.guidance_scale),
            eta=float(st.eta),
            generator=generator or sample_generators(seeds, indices, STREAM_PRIOR),
            trim=False,
        )

    @torch.no_grad()
    def decode(
        self,
        image_embed: Tensor,
        *,
        seeds: list[int],
        indices: list[Index],
        settings: SamplingSettings,
        num_upsamplers: int,
        text: dict[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Image embeddings ``(B, D)`` -> images ``(B, 3, S, S)`` in [0, 1] (decoder, then ``num_upsamplers``)."""
        st = settings.decoder
        text_tokens = text_mask = text_embed = None
        if self.decoder.use_text and text is not None:
            text_tokens, text_mask, text_embed = text["text_tokens"], text["text_mask"], text["text_embed"]
        x = self.decoder.sample(
            image_embed.to(self.device),
            steps=int(st.steps),
            sampler=st.sampler,
            guidance_scale=float(st.guidance_scale),
            eta=float(st.eta),
            text_tokens=text_tokens,
            text_mask=text_mask,
            text_embed=text_embed,
            threshold=settings.threshold,
            generator=generator or sample_generators(seeds, indices, STREAM_DECODER),
        )
        su = settings.upsampler
        for j in range(num_upsamplers):
            x = self.upsamplers[j].upsample(
                x,
                steps=int(su.steps),
                sampler=su.sampler,
                eta=float(su.eta),
                aug_level=settings.upsampler_aug_level,
                threshold=settings.threshold,
                generator=generator or sample_generators(seeds, indices, STREAM_UPSAMPLER + j),
            )
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- the three entry points -----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        prompts: Sequence[str],
        *,
        seed: int | Sequence[int] = 0,
        indices: Sequence[Index] | None = None,
        size: int | None = None,
        settings: SamplingSettings | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prompts (B) -> images ``(B, 3, size, size)`` in [0, 1] (``size`` in :attr:`sizes`; None: the largest).

        ``generator``: one generator for every stage and image, drawn in stage order (each stage's starting noise,
        then its steps' noise) — the order Karlo's / diffusers' pipeline draws in, for comparisons with it; the
        default (None) is the per-image streams of ``seed`` / ``indices`` (see the module docstring)."""
        settings = settings or self.default_settings
        n_up = self._num_upsamplers(size)
        prompts = list(prompts)
        if not prompts:
            s = self.sizes[n_up]
            return torch.empty(0, 3, s, s, device=self.device)
        seeds, idx = self._seeds_indices(len(prompts), seed, indices)
        text = self.encode_prompts(prompts)
        emb = self.prior_embeddings(text, seeds=seeds, indices=idx, settings=settings, generator=generator)
        return self.decode(
            emb, seeds=seeds, indices=idx, settings=settings, num_upsamplers=n_up, text=text, generator=generator
        )

    @torch.no_grad()
    def variations(
        self,
        images: Tensor,
        *,
        seed: int | Sequence[int] = 0,
        indices: Sequence[Index] | None = None,
        size: int | None = None,
        settings: SamplingSettings | None = None,
    ) -> Tensor:
        """Image variations: images ``(B, 3, h, w)`` in [0, 1] -> CLIP image embedding -> decoder (+ upsamplers)
        -> ``(B, 3, size, size)`` in [0, 1].  No prior and no text (a text-conditioned decoder drops its text)."""
        settings = settings or self.default_settings
        n_up = self._num_upsamplers(size)
        seeds, idx = self._seeds_indices(images.shape[0], seed, indices)
        emb = self.encode_images(images)
        return self.decode(emb, seeds=seeds, indices=idx, settings=settings, num_upsamplers=n_up)

    def _endpoint_embedding(self, x: str | Tensor, *, seed: int, index: Index, settings: SamplingSettings) -> Tensor:
        if isinstance(x, str):
            text = self.encode_prompts([x])
            return self.prior_embeddings(text, seeds=[seed], indices=[index], settings=settings)[0]
        if not isinstance(x, Tensor):
            raise TypeError(
                f"interpolate endpoints are prompts (str), embeddings (D,) or images (3, H, W); got {type(x)}"
            )
        if x.ndim == 2 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 1:
            return F.normalize(x.to(self.device).float(), dim=-1)
        if x.ndim == 3:
            x = x[None]
        if x.ndim == 4 and x.shape[0] == 1:
            return self.encode_images(x)[0]
        raise ValueError(f"interpolate endpoints must be (D,), (1, D), (3, H, W) or (1, 3, H, W); got {tuple(x.shape)}")

    @torch.no_grad()
    def interpolate(
        self,
        a: str | Tensor,
        b: str | Tensor,
        *,
        num: int = 5,
        seed: int = 0,
        index: Index = 0,
        size: int | None = None,
        settings: SamplingSettings | None = None,
    ) -> Tensor:
        """Decode ``num`` points of the slerp between two image embeddings -> ``(num, 3, S, S)`` in [0, 1].

        Endpoints: CLIP image embeddings ``(D,)``, images ``(3, H, W)`` in [0, 1] (CLIP-encoded) or prompts (their
        prior embedding for ``(seed, index)``; needs a prior).  Every frame uses the same noise (``seed``,
        ``index``), so only the embedding changes along the path; text conditioning of the decoder is dropped.
        """
        if num < 2:
            raise ValueError(f"num must be >= 2, got {num}")
        settings = settings or self.default_settings
        n_up = self._num_upsamplers(size)
        ea = self._endpoint_embedding(a, seed=seed, index=index, settings=settings)
        eb = self._endpoint_embedding(b, seed=seed, index=index, settings=settings)
        if ea.shape != eb.shape:
            raise ValueError(f"endpoint embeddings differ in shape: {tuple(ea.shape)} vs {tuple(eb.shape)}")
        emb = slerp(ea, eb, torch.linspace(0.0, 1.0, num))
        return self.decode(emb, seeds=[seed] * num, indices=[index] * num, settings=settings, num_upsamplers=n_up)

    def describe(self) -> dict[str, Any]:
        """What the pipeline is made of (for manifests and servers)."""
        return {
            "sizes": list(self.sizes),
            "has_prior": self.prior is not None,
            "decoder_use_text": bool(self.decoder.use_text),
            "embed_dim": int(self.clip.config["embed_dim"]),
        }
