"""The diffusion prior's LightningModule: CLIP text (embedding + token states) -> CLIP image embedding.

Thin: the network is :class:`dalle2.prior.PriorNetwork`, the maths is :mod:`dalle2.diffusion`, sampling with
rerank is :func:`dalle2.prior.sample_prior`; EMA, optimisers, quartile logging and the stage tag come from
:class:`~dalle2.lit.diffusion_base.DiffusionStageModule`.

Batches are ``WebDataModule`` dicts.  From embedding shards (``data=embeddings``): ``img_emb`` (B, D), ``txt_emb``
(B, D), ``txt_tokens`` (B, L, Dt) and ``tokens`` (B, 77) (the text mask is ``tokens != 0``).  Without them a frozen
CLIP (``clip_ckpt``, never saved in this checkpoint) embeds ``image`` and ``tokens`` on the fly.

The diffusion runs in a scaled space: image embeddings are L2-normalised and multiplied by ``embed_scale`` (default
sqrt(D), the paper's 17.2 for D = 768 ~ sqrt(768) * 0.62; see :class:`~dalle2.prior.EmbeddingScaler`); samples are
divided by it and re-normalised.

Validation (EMA weights, fixed noise): ``val/loss`` and three cosine similarities against the true image embedding:
``val/cos_sampled`` (prior samples with rerank), ``val/cos_text_baseline`` (the text embedding itself) and
``val/cos_shuffled`` (prior samples conditioned on another sample's caption: the control).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle2.clip.model import text_mask
from dalle2.lit.diffusion_base import DiffusionStageModule, FrozenClipMixin
from dalle2.prior.stage import PriorStage, build_prior_network, network_scaler, prior_diffusion_config, trim_text
from dalle2.seeding import mix_seed

__all__ = ["PriorModule", "load_prior", "trim_text"]


class PriorModule(FrozenClipMixin, DiffusionStageModule):
    """``p(CLIP image embedding | CLIP text)``.

    Args (keyword-only):
        network: keyword dict of :class:`~dalle2.prior.PriorNetwork` (dalle2/presets/model/prior/*.yaml); ``embed_dim`` /
            ``text_token_dim`` must be the CLIP's embedding size / text width.
        diffusion: dict for ``build_diffusion`` (schedule, num_timesteps, objective x0 | eps | v, loss, weighting).
        clip_ckpt: CLIP used to embed ``image`` / ``tokens`` on the fly when a batch has no ``img_emb``.
        embed_scale: multiplier of the unit-norm image embedding in diffusion space (None: sqrt(embed_dim)).
        cond_drop_prob: classifier-free guidance: probability of dropping the text (tokens and embedding).
        use_text_tokens: attend to the CLIP text-encoder token states (False: text embedding only).
        val_sample_steps / val_candidates / val_sampler: how validation samples (few DDIM steps, rerank).
        compile: ``torch.compile`` the network and its EMA copy (training and sampling; see ``configure_model``).
        x0_clip: clip the x0 prediction to ``[-x0_clip, x0_clip]`` when sampling (Karlo's prior: 5); None: no clip.
    """

    stage = "prior"

    def __init__(
        self,
        *,
        network: dict,
        diffusion: dict | None = None,
        clip_ckpt: str | None = None,
        embed_scale: float | None = None,
        cond_drop_prob: float = 0.1,
        use_text_tokens: bool = True,
        ema_decay: float = 0.9999,
        ema_warmup: int = 10,
        ema_update_every: int = 1,
        val_sample_steps: int = 16,
        val_candidates: int = 2,
        val_sampler: str = "ddim",
        compile: bool = False,
        x0_clip: float | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ):
        super().__init__(
            diffusion=prior_diffusion_config(diffusion),
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            ema_update_every=ema_update_every,
            optimizer=optimizer,
            scheduler=scheduler,
            compile=compile,
            default_lr=1.1e-4,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.net = build_prior_network(network)
        if not use_text_tokens:
            # never used: frozen, so that DDP does not wait for their gradients (and AdamW leaves them alone)
            self.net.text_token_proj.requires_grad_(False)
            self.net.null_text_token.requires_grad_(False)
        self._init_ema()
        self.embed_dim = int(self.net.embed_dim)
        self.scaler = network_scaler(self.net, embed_scale)  # Karlo's prior standardises with its own statistics
        self.cond_drop_prob, self.use_text_tokens = float(cond_drop_prob), bool(use_text_tokens)

    @property
    def clip_ckpt(self) -> str | None:
        """The CLIP checkpoint this prior was trained with (its embedding space), as given at construction."""
        return self.hparams.clip_ckpt

    def _require_clip(self, what: str):
        if self.clip is None:
            raise ValueError(
                f"batch has no {what!r} and no clip_ckpt was given to embed on the fly "
                "(use data=embeddings shards or set clip_ckpt=...)"
            )
        return self.clip

    # -- conditioning -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embeddings(self, batch: dict) -> dict:
        """``{"image_embed" (B, D) unit-norm, "text_embed" (B, D), "text_tokens" (B, L, Dt) | None,
        "text_mask" (B, L) | None}`` from embedding shards or the frozen CLIP."""
        tokens = batch["tokens"]
        if batch.get("img_emb") is not None:
            img = batch["img_emb"]
        else:
            img = self._require_clip("img_emb").encode_image(batch["image"])
        states = batch.get("txt_tokens")
        txt = batch.get("txt_emb")
        if txt is None or (self.use_text_tokens and states is None):
            txt, states, _ = self._require_clip("txt_emb").encode_text_features(tokens)
        raw = getattr(self.net, "raw_image_embed", False)  # Karlo's prior standardises raw CLIP embeddings
        out = {
            "image_embed": img.float() if raw else F.normalize(img.float(), dim=-1),
            "text_embed": txt.float(),
            "text_tokens": None,
            "text_mask": None,
        }
        if self.use_text_tokens:
            states = states.float()
            out["text_tokens"], out["text_mask"] = trim_text(states, text_mask(tokens, states.shape[1]))
        return out

    @staticmethod
    def _text_kwargs(emb: dict) -> dict:
        return {"text_embed": emb["text_embed"], "text_tokens": emb["text_tokens"], "text_mask": emb["text_mask"]}

    def drop_text_mask(self, batch_size: int, *, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Classifier-free guidance training drop: ``(B,)`` bool, True with p = ``cond_drop_prob`` per sample
        (the text tokens and the text embedding are then both replaced by the network's learned null text)."""
        gen_device = generator.device if generator is not None else device
        return (torch.rand(batch_size, generator=generator, device=gen_device) < self.cond_drop_prob).to(device)

    # -- training -----------------------------------------------------------------------------------------------
    def training_inputs(
        self, batch: dict, *, train: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        """``(x0, model_kwargs)``: the scaled image embedding and the text conditioning (``train``: with the CFG text
        drop drawn from ``generator``; else nothing dropped). The training step and ``bench/train_step.py`` are built on it."""
        emb = self.embeddings(batch)
        x0 = self.scaler.scale_embed(emb["image_embed"])
        kwargs = self._text_kwargs(emb)
        kwargs["drop_text"] = (
            self.drop_text_mask(x0.shape[0], device=x0.device, generator=generator)
            if train
            else torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        )
        return x0, kwargs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, kwargs = self.training_inputs(batch, train=True)
        losses, per_sample = self.diffusion.training_losses(self.net, x0, model_kwargs=kwargs, return_per_sample=True)
        self.log_losses(losses, per_sample)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        seed = mix_seed(batch_idx, self.global_rank)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        emb = self.embeddings(batch)
        true = emb["image_embed"]
        x0 = self.scaler.scale_embed(true)
        B = x0.shape[0]
        kwargs = self._text_kwargs(emb)
        losses = self.diffusion.training_losses(self.ema_net, x0, generator=gen, model_kwargs=kwargs)
        opts = dict(
            steps=self.hparams.val_sample_steps,
            sampler=self.hparams.val_sampler,
            n_samples_per_prompt=self.hparams.val_candidates,
        )
        sample_seed = seed + 1  # the same noise for the real and the shuffled captions: only the text differs
        sampled = self.sample(**kwargs, generator=torch.Generator(self.device).manual_seed(sample_seed), **opts)
        # control: each embedding sampled from another sample's caption (the batch rolled by one)
        shuffled_kwargs = {k: (None if v is None else v.roll(1, dims=0)) for k, v in kwargs.items()}
        shuffled = self.sample(
            **shuffled_kwargs, generator=torch.Generator(self.device).manual_seed(sample_seed), **opts
        )
        metrics = {
            "val/loss": losses["loss"],
            "val/cos_sampled": F.cosine_similarity(sampled, true, dim=-1).mean(),
            "val/cos_text_baseline": F.cosine_similarity(emb["text_embed"], true, dim=-1).mean(),
            "val/cos_shuffled": F.cosine_similarity(shuffled, true, dim=-1).mean(),
        }
        self.log_val(metrics, B)

    # -- sampling -----------------------------------------------------------------------------------------------
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
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Unit-norm CLIP image embeddings ``(B, D)`` for text conditioning ``text_embed (B, D)``, ``text_tokens
        (B, L, Dt)``, ``text_mask (B, L)`` bool: ``n_samples_per_prompt`` candidates per prompt, the one with the
        highest dot product with the text embedding kept.  ``guidance_scale != 1``: classifier-free guidance."""
        return self.sampling_stage(use_ema=use_ema).sample(
            text_embed=text_embed,
            text_tokens=text_tokens,
            text_mask=text_mask,
            n_samples_per_prompt=n_samples_per_prompt,
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
        )

    def sampling_stage(self, *, use_ema: bool = True) -> PriorStage:
        """This prior as the pipeline samples it (:class:`dalle2.prior.stage.PriorStage`; shares the network)."""
        return PriorStage(
            net=self.ema_net if use_ema else self.net,
            diffusion=self.diffusion,
            scaler=self.scaler,
            use_text_tokens=self.use_text_tokens,
            vocabulary=self.vocabulary,
            x0_clip=self.hparams.get("x0_clip"),
        )


def load_prior(path: str, *, map_location="cpu") -> PriorModule:
    """A ``PriorModule`` in eval mode from a stage=prior ``.ckpt`` (another stage's raises ``WrongStageError``)."""
    from dalle2.lit.checkpoints import load_stage_module

    return load_stage_module(path, "prior", map_location=map_location).eval().requires_grad_(False)
