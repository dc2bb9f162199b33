"""LightningModule for contrastive CLIP training with zero-shot retrieval (and optional zero-shot classification)
validation."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from dalle2.clip.loss import ClipLoss
from dalle2.clip.model import CLIP, preprocess_for_clip
from dalle2.clip.retrieval import check_finite, embedding_spread, metrics_from_ranks, pair_losses, pair_rank_counts
from dalle2.clip.tokenizer import Tokenizer, resolve_tokenizer
from dalle2.clip.zeroshot import ZeroShotTask, class_labels, zeroshot_classifier, zeroshot_metrics
from dalle2.distributed import is_distributed
from dalle2.lit.checkpoints import StageCheckpointMixin
from dalle2.lit.distributed import gather_ragged, log_reduced
from dalle2.lit.fsdp import shard_module
from dalle2.lit.optim import build_optimizers


class CLIPModule(StageCheckpointMixin, L.LightningModule):
    """Batches are dicts from ``WebDataModule``: ``image`` (B,3,S,S) in [-1,1], ``tokens`` (B,L) long.

    ``network`` is the plain keyword dict of ``dalle2.clip.model.CLIP`` (dalle2/presets/model/clip/*.yaml), stored in the
    checkpoint so ``CLIPModule.load_from_checkpoint(path)`` rebuilds the model with no config at hand.

    The BPE vocabulary the batches were tokenized with (the datamodule's tokenizer, bound in ``setup``) is stored in
    the checkpoint (``vocabulary``): :meth:`tokenizer` gives it back to every consumer of this CLIP.

    Validation (the whole val set, gathered over ranks): image<->text R@1/5/10, mean rank and the symmetric InfoNCE
    ``val/loss``, each rank computing the similarity rows ``rank::world`` in chunks of ``val_chunk_size`` (never an
    N x N matrix); with ``zeroshot={"classnames": FILE, "templates": FILE, "label": "{shape}"}`` (or
    :meth:`set_zeroshot`) also ``val/zeroshot/top1`` / ``top5`` (:mod:`dalle2.clip.zeroshot`; the files are read
    here and not stored in the checkpoint's hyperparameters).

    Ties in the ranking count as a random tie-break would in expectation and NaN/inf embeddings stop validation with
    an error (:mod:`dalle2.clip.retrieval`).  A collapse is flagged loudly: ``val/spread/{image,text}_mean_cosine``
    (mean pairwise cosine) and ``val/spread/{image,text}_std`` (per-dimension std of the unit embeddings x sqrt(D);
    ~1 spread evenly, 0 collapsed) are logged, and a warning names the tower whose mean cosine exceeds
    ``collapse_cosine``.
    """

    stage = "clip"

    def __init__(
        self,
        *,
        network: dict,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        image_key: str = "image",
        val_chunk_size: int = 256,
        collapse_cosine: float = 0.95,
        zeroshot: dict | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "zeroshot"])
        self.model = CLIP(**network)
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self._val_image: list[torch.Tensor] = []
        self._val_text: list[torch.Tensor] = []
        self._val_label: list[torch.Tensor] = []
        self.zeroshot: ZeroShotTask | None = None
        self._zeroshot_tokenizer: Tokenizer | None = None
        if zeroshot and zeroshot.get("classnames"):
            self.set_zeroshot(
                ZeroShotTask.from_files(
                    zeroshot["classnames"],
                    zeroshot["templates"],
                    label=zeroshot.get("label", "{shape}"),
                    ks=tuple(zeroshot.get("ks", (1, 5))),
                )
            )

    def set_zeroshot(self, task: ZeroShotTask | None, tokenizer: Tokenizer | None = None) -> None:
        """Score zero-shot classification at validation (None: off); ``tokenizer`` for the prompts (default: this
        CLIP's own, :meth:`tokenizer`)."""
        self.zeroshot, self._zeroshot_tokenizer = task, tokenizer

    # -- the vocabulary ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        tok, rows = self._datamodule_tokenizer(), int(self.model.config["vocab_size"])
        if isinstance(tok, Tokenizer):
            if tok.vocab_size > rows:
                raise ValueError(
                    f"the data's tokenizer {tok.name} has {tok.vocab_size} ids but the CLIP's text "
                    f"embedding only {rows}: set model.vocab_size={tok.vocab_size}"
                )
            self.bind_tokenizer(tok, source="the data's tokenizer")

    def tokenizer(self, path=None) -> Tokenizer:
        """The tokenizer of this CLIP's vocabulary (``path``: a merges file, checked against it; for a CLIP that
        records none, its size must match the text embedding)."""
        return resolve_tokenizer(
            self.vocabulary,
            path,
            context_length=self.model.context_length,
            model_vocab_size=int(self.model.config["vocab_size"]),
        )

    # -- encoders used by the later stages -------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B,3,H,W) in [-1,1] -> unnormalised image embeddings (B,D)."""
        return self.model.embed_images(images)

    def encode_text_features(self, tokens: torch.Tensor):
        """tokens (B, L) -> :class:`dalle2.clip.model.TextFeatures` (embedding, per-token states, mask)."""
        return self.model.encode_text_features(tokens)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        return self.model(preprocess_for_clip(images, self.model.image_size), tokens)

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch[self.hparams.image_key], batch["tokens"])
        losses = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"})
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch[self.hparams.image_key], batch["tokens"])
        self._val_image.append(out["image_features"].float())
        self._val_text.append(out["text_features"].float())
        if self.zeroshot is not None:
            metas = batch.get("meta") or [None] * len(out["image_features"])
            self._val_label.append(class_labels(metas, self.zeroshot).to(self.device))

    def _gather_val(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # every rank gathers, also one whose val shard was empty (it contributes 0 rows): no rank is left waiting
        empty = torch.zeros(0, self.model.embed_dim, device=self.device)
        img = gather_ragged(torch.cat(self._val_image) if self._val_image else empty)
        txt = gather_ragged(torch.cat(self._val_text) if self._val_text else empty)
        labels = None
        if self.zeroshot is not None:
            none = torch.zeros(0, dtype=torch.long, device=self.device)
            labels = gather_ragged(torch.cat(self._val_label) if self._val_label else none)
        self._val_image.clear(), self._val_text.clear(), self._val_label.clear()
        return img, txt, labels

    def on_validation_epoch_end(self) -> None:
        img, txt, labels = self._gather_val()
        if len(img) == 0:
            return
        # this rank's share of the similarity rows (each per-row value is then gathered): 1/W of the work and
        # memory O(val_chunk_size x N), never an N x N matrix
        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        rows = torch.arange(rank, len(img), world, device=img.device)
        chunk = int(self.hparams.get("val_chunk_size") or 256)
        # every rank holds the same gathered features: all raise together (no rank is left waiting in a gather)
        check_finite(img, metric="CLIP validation retrieval", what="image embedding")
        check_finite(txt, metric="CLIP validation retrieval", what="text embedding")
        scale = self.model.clamped_logit_scale().detach().float()
        i2t = gather_ragged(pair_rank_counts(img, txt, rows=rows, chunk_size=chunk))
        t2i = gather_ragged(pair_rank_counts(txt, img, rows=rows, chunk_size=chunk))
        loss_terms = gather_ragged(
            torch.cat(
                [
                    pair_losses(img, txt, scale, rows=rows, chunk_size=chunk),
                    pair_losses(txt, img, scale, rows=rows, chunk_size=chunk),
                ]
            )
        )
        log = {f"val/{k}": float(v) for k, v in metrics_from_ranks(i2t, t2i).items()}
        log["val/loss"] = float(loss_terms.mean())  # = (CE(s I T^T) + CE(s T I^T)) / 2: equal counts per direction
        log.update(self._spread(img, txt))
        if self.zeroshot is not None:
            log.update({f"val/zeroshot/{k}": float(v) for k, v in self.zeroshot_scores(img, labels).items()})
        log_reduced(self, log)  # every rank holds the same gathered values: no further reduction needed

    def _spread(self, img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
        """``val/spread/*`` of both towers, and a warning for each tower that collapsed (see the class docstring)."""
        if len(img) < 2:
            return {}
        out, limit = {}, float(self.hparams.get("collapse_cosine") or 0.95)
        for tower, feats in (("image", img), ("text", txt)):
            spread = embedding_spread(feats)
            out.update({f"val/spread/{tower}_{k}": v for k, v in spread.items()})
            if spread["mean_cosine"] > limit:
                rank_zero_warn(
                    f"CLIP {tower} embeddings collapsed: mean pairwise cosine {spread['mean_cosine']:.4f} > "
                    f"{limit} over {len(feats)} validation samples (per-dimension spread {spread['std']:.4f}; "
                    "~1 when spread evenly): retrieval and zero-shot scores of this model mean little"
                )
        return out

    @torch.no_grad()
    def zeroshot_scores(self, image_features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Top-k accuracy of ``image_features`` (N, D) against :attr:`zeroshot`'s class weights."""
        task = self.zeroshot
        tokenizer = self._zeroshot_tokenizer or self.tokenizer()
        classifier = zeroshot_classifier(
            self.model.encode_text, tokenizer, task.classnames, task.templates, device=self.device
        )
        return zeroshot_metrics(image_features, labels, classifier, ks=task.ks)

    def configure_model(self) -> None:
        shard_module(self, [(self.model, True)])  # trainer=fsdp (dalle2/lit/fsdp.py); other strategies: nothing

    def configure_optimizers(self):
        return build_optimizers(self.model, self.optimizer_factory, self.scheduler_factory, default_lr=5e-4)


def load_clip(path: str, *, map_location="cpu", trust_checkpoint: bool = False) -> CLIPModule:
    """A ``CLIPModule`` in eval mode from a stage=clip ``.ckpt`` or export, or from CLIP weights (OpenAI /
    open_clip / ``save_safetensors``).  Nothing is unpickled beyond weights unless ``trust_checkpoint``
    (``UntrustedCheckpointError``); a checkpoint of another stage raises ``WrongStageError``."""
    from dalle2.clip.pretrained import load_clip_checkpoint, load_safetensors
    from dalle2.lit.checkpoints import is_export, load_stage_module

    if str(path).endswith(".ckpt") or is_export(path):
        module = load_stage_module(path, "clip", map_location=map_location, trust_checkpoint=trust_checkpoint)
    else:
        if str(path).endswith(".safetensors"):
            model = load_safetensors(path)
        else:
            model = load_clip_checkpoint(path, trust_checkpoint=trust_checkpoint)
        module = CLIPModule(network=model.config)
        module.model.load_state_dict(model.state_dict())
    return module.eval().requires_grad_(False)


def clip_source(path: str) -> dict:
    """What a CLIP file is, for a metrics JSON: ``{"path", "sha256", "kind"}``, ``kind`` one of ``dalle2 checkpoint``
    (a stage=clip ``.ckpt``), ``dalle2 export`` (``python -m dalle2.export``), ``dalle2 CLIP safetensors``
    (``save_safetensors``), ``OpenAI TorchScript archive`` or ``OpenAI/open_clip state dict`` (any other weights file
    ``load_clip`` reads)."""
    import os

    from dalle2.checkpoint import _safetensors_metadata, is_export
    from dalle2.clip.pretrained import CONFIG_METADATA_KEY
    from dalle2.metrics.coco import file_sha256
    from dalle2.safe_load import is_torchscript_archive

    p = str(path)
    if p.endswith(".ckpt") or os.path.isdir(p):
        kind = "dalle2 checkpoint"
    elif is_export(p):
        kind = "dalle2 export"
    elif p.endswith(".safetensors"):
        try:
            ours = CONFIG_METADATA_KEY in _safetensors_metadata(p)
        except ValueError:
            ours = False
        kind = "dalle2 CLIP safetensors" if ours else "OpenAI/open_clip state dict"
    elif is_torchscript_archive(p):
        kind = "OpenAI TorchScript archive"
    else:
        kind = "OpenAI/open_clip state dict"
    return {"path": p, "sha256": file_sha256(p), "kind": kind}
