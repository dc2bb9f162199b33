"""Inception features and CLIP scores of image files under Lightning ``Trainer.predict``, and the COCO metrics.

:class:`ImageFilesData` serves one predict loader per named source (``"samples"``: generated PNGs with their
captions; ``"reference"``: real images, only when their statistics are not cached).  Item ``j`` of a source is read
by rank ``j % W`` only (``dalle2.metrics.samples``' split), decoded and preprocessed with the project's one FID
preprocessing, :func:`~dalle2.metrics.resize.fid_inputs`, in the loader workers.  :class:`FileFeatures` computes Inception pool3 features (and, for captioned items, the CLIP score), then at
the end of the epoch gathers every per-item tensor from all ranks and sorts it by item id: the same arrays at any
world size.  An unreadable image is skipped and counted (``skipped``), never fatal.

:func:`reference_arrays` turns reference features into what the cache holds; :func:`coco_metrics` computes FID, KID,
precision/recall and the CLIP score from them.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from dalle2.distributed import gather_ragged
from dalle2.metrics.clip_score import ClipScorer
from dalle2.metrics.fid import frechet_distance_from_stats, gaussian_stats, kernel_distance
from dalle2.metrics.inception import FID_INPUT_SIZE, FIDInceptionV3
from dalle2.metrics.precision_recall import knn_radii, precision_recall
from dalle2.metrics.resize import fid_inputs, load_image
from dalle2.metrics.samples import reads_item

__all__ = ["ImageFiles", "ImageFilesData", "FileFeatures", "reference_arrays", "coco_metrics"]


class ImageFiles(torch.utils.data.IterableDataset):
    """Yields ``{"pixels": (3, S, S) uint8, "inception": (3, 299, 299) float in [0, 1] (when ``inception``),
    "id", "text", "valid"}`` for this rank's items (``{"path", "text"}`` dicts; id = position in ``items``)."""

    def __init__(
        self, items: Sequence[dict], *, image_size: int, inception: bool = True, rank: int = 0, world_size: int = 1
    ):
        super().__init__()
        self.items, self.image_size, self.inception = list(items), int(image_size), bool(inception)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        s = self.image_size
        for j, item in enumerate(self.items):
            if not reads_item(j, self.rank, self.world_size):
                continue
            out = {
                "pixels": torch.zeros(3, s, s, dtype=torch.uint8),
                "id": j,
                "text": item.get("text") or "",
                "valid": False,
            }
            if self.inception:
                out["inception"] = torch.zeros(3, FID_INPUT_SIZE, FID_INPUT_SIZE)
            try:
                out.update(fid_inputs(load_image(item["path"]), s, inception=self.inception))
                out["valid"] = True
            except Exception as exc:  # counted as skipped; raising here would leave the other ranks waiting
                warnings.warn(
                    f"image {item['path']} could not be read ({type(exc).__name__}: {exc}); skipped", stacklevel=2
                )
            yield out


class ImageFilesData(L.LightningDataModule):
    """One predict loader per source (``{name: items}``, in the given order), split over ranks."""

    def __init__(
        self,
        sources: dict[str, Sequence[dict]],
        *,
        image_size: int,
        inception: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
    ):
        super().__init__()
        self.sources = {k: list(v) for k, v in sources.items()}
        self.image_size, self.inception = int(image_size), bool(inception)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)

    def predict_dataloader(self) -> list[DataLoader]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return [
            DataLoader(
                ImageFiles(items, image_size=self.image_size, inception=self.inception, rank=rank, world_size=world),
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                persistent_workers=False,
            )
            for items in self.sources.values()
        ]


class FileFeatures(L.LightningModule):
    """Per item: Inception pool3 features (``inception`` given) and the CLIP score of captioned items (``scorer``
    given).  After predict, ``results[source]`` holds ``id`` (N,), ``inception`` (N, 2048), ``clip_score`` (N,)
    (NaN without a caption) sorted by id, and ``skipped`` (int), on every rank."""

    def __init__(
        self, sources: Sequence[str], *, inception: FIDInceptionV3 | None = None, scorer: ClipScorer | None = None
    ):
        super().__init__()
        self.source_names = list(sources)
        self.inception = inception.eval().requires_grad_(False) if inception is not None else None
        self.scorer = scorer.requires_grad_(False).eval() if scorer is not None else None
        self._store: dict[str, dict[str, list]] = {s: defaultdict(list) for s in self.source_names}
        self.results: dict[str, dict] = {}

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        store = self._store[self.source_names[dataloader_idx]]
        valid = batch["valid"].bool()
        store["skipped"].append(int((~valid).sum()))
        if not bool(valid.any()):
            return
        keep = valid.nonzero().flatten().tolist()
        store["id"].append(batch["id"][valid].long())
        if self.inception is not None:
            store["inception"].append(self.inception(batch["inception"][valid].float()).float())
        scores = torch.full((len(keep),), float("nan"), device=self.device)
        texts = [batch["text"][i] for i in keep]
        has = [i for i, t in enumerate(texts) if t]
        if self.scorer is not None and has:
            images = batch["pixels"][valid][has].float() / 127.5 - 1.0
            scores[has] = self.scorer(images, [texts[i] for i in has]).float()
        store["clip_score"].append(scores)

    def on_predict_epoch_end(self) -> None:
        results = {}
        for name in self.source_names:
            store = self._store[name]
            parts = {
                "id": (torch.long, ()),
                "clip_score": (torch.float32, ()),
                **({"inception": (torch.float32, (int(self.inception.num_features),))} if self.inception else {}),
            }
            out = {}
            for key, (dtype, tail) in parts.items():
                x = torch.cat(store[key]) if store.get(key) else torch.zeros((0, *tail), dtype=dtype)
                out[key] = gather_ragged(x.to(self.device)).cpu()
            order = torch.argsort(out["id"])
            out = {k: v[order] for k, v in out.items()}
            skipped = torch.tensor([sum(store.get("skipped", []))], device=self.device)
            out["skipped"] = int(gather_ragged(skipped).sum())
            results[name] = out
        self._store = {s: defaultdict(list) for s in self.source_names}
        self.results = results


def reference_arrays(ids: torch.Tensor, feats: torch.Tensor, *, k: int = 3, chunk_size: int = 1024) -> dict:
    """What the reference cache holds: ``ids``, ``features`` (float32), ``mu``, ``sigma`` (float64) and the k-NN
    ``radii`` of the features (precision/recall), as numpy arrays."""
    mu, sigma = gaussian_stats(feats)
    radii = knn_radii(feats, k=k, chunk_size=chunk_size)
    return {
        "ids": ids.cpu().numpy(),
        "features": feats.float().cpu().numpy(),
        "mu": mu.cpu().numpy(),
        "sigma": sigma.cpu().numpy(),
        "radii": radii.cpu().numpy(),
    }


def coco_metrics(
    ref: dict,
    fake: torch.Tensor | None,
    clip_scores: torch.Tensor,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
    k: int = 3,
    chunk_size: int = 1024,
    equal_sizes: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """FID (from the cached reference mean/covariance), KID, precision/recall (reference radii from the cache, unless
    ``equal_sizes`` cuts the larger set to the smaller's size: seeded with ``kid_seed``) on Inception features
    ``fake`` (None: those are null), and the mean/std CLIP score of ``clip_scores`` (NaN: none)."""
    res: dict = {"fid": None, "kid_mean": None, "kid_std": None, "precision": None, "recall": None}
    if fake is not None and ref is not None:
        fake = fake.double().to(device)
        real = torch.from_numpy(np.asarray(ref["features"])).double().to(device)
        mu, sigma = gaussian_stats(fake)
        res["fid"] = frechet_distance_from_stats(
            torch.from_numpy(ref["mu"]).to(device), torch.from_numpy(ref["sigma"]).to(device), mu, sigma
        )
        res["kid_mean"], res["kid_std"] = kernel_distance(
            real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=kid_seed
        )
        radii = torch.from_numpy(np.asarray(ref["radii"])).to(device)
        res.update(
            precision_recall(
                real, fake, k=k, chunk_size=chunk_size, real_radii=radii, equal_sizes=equal_sizes, seed=kid_seed
            )
        )
    scores = clip_scores[~torch.isnan(clip_scores)].double()
    res["clip_score"] = float(scores.mean()) if len(scores) else None
    res["clip_score_std"] = float(scores.std(unbiased=False)) if len(scores) else None
    return res
