"""Does a converted Karlo directory compute what diffusers' ``UnCLIPPipeline`` computes from the source directory?

    python -m dalle2.convert karlo src=<diffusers dir> out=<converted dir> check=true

Each component gets the same inputs in both (fp32, seeded random tensors and the prompts' real text features) and
the largest absolute difference of their outputs is recorded: the tokenizer (ids that differ), the CLIP text tower
(pooled embedding and token states), the prior, the decoder (with its text projection), both super-resolution
networks — each conditional and unconditional (classifier-free guidance's null branch) — and end to end: the same
prompts, weights and generator give images (in [0, 1]) through both pipelines, with prior and decoder guidance and
the super-resolution last-step switch.  ``ok`` is False when a module differs by more than ``module_tol`` (1e-4) or
the images by more than ``image_tol`` (1e-3).

This module imports ``diffusers`` and ``transformers`` (test-only references); nothing else in ``dalle2`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["check_karlo"]

PROMPTS = ("a red cube on a wooden table", "an astronaut riding a horse, oil painting", "")


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


def _reference(src: Path):
    """diffusers' ``UnCLIPPipeline`` of ``src``, component by component (``model_index.json`` may name the text
    projection's library ``unclip``, as Karlo's does, which newer diffusers cannot resolve by name)."""
    try:
        from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError as e:  # pragma: no cover - the check needs the references installed
        raise RuntimeError(f"check=true needs diffusers and transformers installed ({e})") from None
    return UnCLIPPipeline(
        prior=PriorTransformer.from_pretrained(str(src / "prior")),
        decoder=UNet2DConditionModel.from_pretrained(str(src / "decoder")),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(str(src / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(src / "tokenizer")),
        text_proj=UnCLIPTextProjModel.from_pretrained(str(src / "text_proj")),
        super_res_first=UNet2DModel.from_pretrained(str(src / "super_res_first")),
        super_res_last=UNet2DModel.from_pretrained(str(src / "super_res_last")),
        prior_scheduler=UnCLIPScheduler.from_pretrained(str(src / "prior_scheduler")),
        decoder_scheduler=UnCLIPScheduler.from_pretrained(str(src / "decoder_scheduler")),
        super_res_scheduler=UnCLIPScheduler.from_pretrained(str(src / "super_res_scheduler")),
    )


@torch.no_grad()
def check_karlo(
    src: str | Path,
    out: str | Path,
    *,
    prompts: tuple[str, ...] = PROMPTS,
    seed: int = 0,
    prior_steps: int = 25,
    decoder_steps: int = 25,
    sr_steps: int = 7,
    prior_guidance: float = 4.0,
    decoder_guidance: float = 8.0,
    module_tol: float = 1e-4,
    image_tol: float = 1e-3,
) -> dict[str, Any]:
    """-> ``{"modules": {name: max abs diff}, "end_to_end": max abs diff, "ok": bool, ...}`` (see the module doc)."""
    from dalle2.diffusion.samplers import randn
    from dalle2.pipeline import SamplingSettings, UnCLIPPipeline

    ref = _reference(Path(src))
    ref.set_progress_bar_config(disable=True)
    for m in (ref.prior, ref.decoder, ref.text_proj, ref.super_res_first, ref.super_res_last, ref.text_encoder):
        m.float().eval()
    pipe = UnCLIPPipeline.from_dir(str(out))
    g = torch.Generator().manual_seed(seed)
    prompts = list(prompts)
    B = len(prompts)
    modules: dict[str, float] = {}

    # -- tokenizer and text tower
    L = ref.tokenizer.model_max_length
    ids_ref = ref.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    ids = pipe.tokenizer(prompts)
    modules["tokenizer (ids differing)"] = float((ids_ref.input_ids != ids).sum())
    enc = ref.text_encoder(ids_ref.input_ids)
    ours = pipe.clip.encode_text_features(ids_ref.input_ids)
    modules["text_encoder.embed"] = _diff(ours.embed, enc.text_embeds)
    modules["text_encoder.tokens"] = _diff(ours.tokens, enc.last_hidden_state)
    mask_ref = ids_ref.attention_mask.bool()
    modules["text_mask (positions differing)"] = float((ours.mask != mask_ref).sum())
    text_embed, states = enc.text_embeds, enc.last_hidden_state
    empty = ref.tokenizer([""] * B, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    enc0 = ref.text_encoder(empty.input_ids)

    # -- prior (conditional, and the unconditional branch = the empty prompt's encoding)
    D = text_embed.shape[1]
    x = randn((B, D), generator=g)
    t = torch.linspace(999, 0, B).round().long()
    p = ref.prior(x, timestep=t, proj_embedding=text_embed, encoder_hidden_states=states, attention_mask=mask_ref)
    mine = pipe.prior.net(x, t, text_embed=text_embed, text_tokens=states, text_mask=mask_ref)
    modules["prior"] = _diff(mine, p.predicted_image_embedding)
    p0 = ref.prior(
        x,
        timestep=t,
        proj_embedding=enc0.text_embeds,
        encoder_hidden_states=enc0.last_hidden_state,
        attention_mask=empty.attention_mask.bool(),
    )
    mine0 = pipe.prior.net(
        x, t, text_embed=text_embed, text_tokens=states, text_mask=mask_ref, drop_text=torch.ones(B, dtype=torch.bool)
    )
    modules["prior (null text)"] = _diff(mine0, p0.predicted_image_embedding)
    scaled = randn((B, D), generator=g)
    modules["prior.post_process"] = _diff(
        pipe.prior.scaler.unscale_embed(scaled), ref.prior.post_process_latents(scaled)
    )

    # -- decoder with its text projection
    dec = ref.decoder
    C, S = dec.config.in_channels, dec.config.sample_size
    xd, img = randn((B, C, S, S), generator=g), randn((B, D), generator=g)
    n_tok = ref.text_proj.clip_extra_context_tokens
    for name, cfg in (("decoder", False), ("decoder (null image + text)", True)):
        hidden, additive = ref.text_proj(
            image_embeddings=img,
            prompt_embeds=torch.cat([enc0.text_embeds, text_embed]) if cfg else text_embed,
            text_encoder_hidden_states=torch.cat([enc0.last_hidden_state, states]) if cfg else states,
            do_classifier_free_guidance=cfg,
        )
        m = torch.cat([empty.attention_mask.bool(), mask_ref]) if cfg else mask_ref
        xin, tin = (torch.cat([xd, xd]), torch.cat([t, t])) if cfg else (xd, t)
        r = dec(
            xin,
            tin,
            encoder_hidden_states=hidden,
            class_labels=additive,
            attention_mask=F.pad(m, (n_tok, 0), value=True),
        ).sample
        drop = torch.ones(B, dtype=torch.bool) if cfg else None
        mine = pipe.decoder.net(
            xd,
            t,
            image_embed=img,
            text_embed=text_embed,
            text_tokens=states,
            text_mask=mask_ref,
            drop_image_embed=drop,
            drop_text=drop,
        )
        modules[name] = _diff(mine, r[:B])

    # -- super-resolution pair
    up = pipe.upsamplers[0]
    Hs = ref.super_res_first.config.sample_size
    xs, lo = randn((B, C, Hs, Hs), generator=g), randn((B, C, S, S), generator=g).clamp(-1, 1)
    lo_up = F.interpolate(lo, size=(Hs, Hs), mode="bicubic", align_corners=False, antialias=True)
    ts = torch.full((B,), 500)
    modules["super_res_first"] = _diff(
        up.net(xs, ts, lowres_image=lo), ref.super_res_first(torch.cat([xs, lo_up], 1), ts).sample
    )
    t0 = torch.zeros(B, dtype=torch.long)
    modules["super_res_last (t = 0)"] = _diff(
        up.net(xs, t0, lowres_image=lo), ref.super_res_last(torch.cat([xs, lo_up], 1), t0).sample
    )

    # -- end to end: the same prompts, weights and generator
    images_ref = ref(
        prompts,
        generator=torch.Generator().manual_seed(seed),
        prior_num_inference_steps=prior_steps,
        decoder_num_inference_steps=decoder_steps,
        super_res_num_inference_steps=sr_steps,
        prior_guidance_scale=prior_guidance,
        decoder_guidance_scale=decoder_guidance,
        output_type="np",
    ).images
    base = pipe.default_settings.to_dict()
    base["prior"].update(steps=prior_steps, guidance_scale=prior_guidance, sampler="unclip")
    base["decoder"].update(steps=decoder_steps, guidance_scale=decoder_guidance, sampler="unclip")
    base["upsampler"].update(steps=sr_steps, sampler="unclip")
    base.update(n_prior_samples=1, threshold="static", upsampler_aug_level=0)
    images = pipe(prompts, settings=SamplingSettings.from_dict(base), generator=torch.Generator().manual_seed(seed))
    end_to_end = _diff(images.permute(0, 2, 3, 1), torch.from_numpy(images_ref))
    exact = {k: v for k, v in modules.items() if "differing" in k}
    close = {k: v for k, v in modules.items() if k not in exact}
    ok = (
        all(v == 0 for v in exact.values()) and all(v <= module_tol for v in close.values()) and end_to_end <= image_tol
    )
    return {
        "modules": modules,
        "end_to_end": end_to_end,
        "ok": bool(ok),
        "tolerances": {"module": module_tol, "images": image_tol},
        "settings": {
            "prompts": prompts,
            "seed": seed,
            "steps": {"prior": prior_steps, "decoder": decoder_steps, "super_res": sr_steps},
            "guidance": {"prior": prior_guidance, "decoder": decoder_guidance},
            "image_size": list(images.shape[-2:]),
        },
    }
