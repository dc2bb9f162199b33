"""Sample evaluation under Lightning ``Trainer.predict``: FID/KID, CLIP-FD/CLIP-KID, CLIP score, attribute checker.

:class:`SampleEvalData` serves two predict loaders (0: the samples directory, 1: reference shards), each item read
by exactly one rank (see ``dalle2.metrics.samples``).  :class:`SampleEvaluator.predict_step` computes per item: our
CLIP's image embedding, its CLIP score against the prompt/caption, Inception pool3 features (when an Inception is
given) and, for samples whose prompt is a built-in synthetic caption, the verdicts of the lenient attribute checker and
of the strict one (``checker``: ``accuracy/*`` and ``strict/*``).  Every image, sample or reference, is preprocessed
once by :func:`dalle2.metrics.resize.fid_inputs` (the project's one FID preprocessing, named in the results as
``preprocessing``).  At the end
of the epoch every per-item tensor is gathered from all ranks and sorted by item id, then the distances are
computed once on the whole sets (:mod:`dalle2.metrics.fid`): identical results at any ``trainer.devices``.
``evaluator.results`` holds the metrics dict on every rank.
"""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch
from torch.utils.data import DataLoader

from dalle2.data.checker import CHECKER_COLUMNS, checker_rows, summarize_rows
from dalle2.data.strict_checker import STRICT, StrictThresholds
from dalle2.data.synthetic import parse_caption
from dalle2.distributed import gather_ragged
from dalle2.imaging import to_uint8
from dalle2.metrics.clip_score import ClipScorer, clip_score
from dalle2.metrics.fid import frechet_distance, kernel_distance
from dalle2.metrics.inception import FIDInceptionV3
from dalle2.metrics.precision_recall import PR_FEATURES, precision_recall
from dalle2.metrics.resize import fid_preprocessing
from dalle2.metrics.samples import ReferenceImages, SampleFiles, read_manifest, samples_image_size

__all__ = ["SampleEvalData", "SampleEvaluator", "caption_attributes", "samples_summary_line"]

SOURCES = ("samples", "reference")
# the per-sample checker verdicts gathered over ranks: dalle2.data.checker.CHECKER_COLUMNS (the lenient reader's
# attributes, then every strict verdict, strict/all, the IoU and the edge width)


def caption_attributes(prompt: str) -> dict[str, str] | None:
    """The built-in synthetic attributes a prompt names (all of them), or None for any other prompt."""
    try:
        return parse_caption(prompt, strict=True)
    except ValueError:
        return None


class SampleEvalData(L.LightningDataModule):
    """Predict loaders over ``samples_dir`` (manifest + PNGs) and the first ``max_reference`` samples of
    ``reference_urls``, all preprocessed at ``image_size`` (default: the samples' own size); ``inception``: also the
    299 px Inception input of each image."""

    def __init__(
        self,
        *,
        samples_dir: str,
        reference_urls: str,
        image_size: int | None = None,
        max_reference: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        inception: bool = False,
    ):
        super().__init__()
        self.inception = bool(inception)
        self.samples_dir = str(samples_dir)
        self.rows = read_manifest(samples_dir)
        self.image_size = int(image_size or samples_image_size(samples_dir, self.rows))
        self.reference_urls, self.max_reference = reference_urls, max_reference
        ReferenceImages(reference_urls, image_size=self.image_size)  # checks the urls now (missing shard -> error)
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> list[DataLoader]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        samples = SampleFiles(
            self.samples_dir,
            self.rows,
            image_size=self.image_size,
            rank=rank,
            world_size=world,
            inception=self.inception,
        )
        reference = ReferenceImages(
            self.reference_urls,
            image_size=self.image_size,
            max_samples=self.max_reference,
            rank=rank,
            world_size=world,
            inception=self.inception,
        )
        kw = dict(batch_size=self.batch_size, num_workers=self.num_workers, persistent_workers=False)
        return [DataLoader(samples, **kw), DataLoader(reference, **kw)]


class SampleEvaluator(L.LightningModule):
    """Metrics of generated samples against reference images (see the module docstring).

    Args:
        clip: a ``CLIPModule`` (``load_clip``), frozen: CLIP-FD / CLIP-KID features, and the CLIP score unless
            ``score_clip`` is given.
        tokenizer: the CLIP's tokenizer (``get_tokenizer``).
        score_clip, score_tokenizer: the CLIP (and its tokenizer) of the CLIP score, when it should not be ``clip``
            (e.g. a CLIP that did not make the images: the generator's own CLIP scores its samples too kindly).
        inception: an ``FIDInceptionV3`` with the FID weights (``load_fid_inception``), or None to skip FID/KID and
            precision/recall (any module mapping (B, 3, 299, 299) in [0, 1] to (B, ``num_features``) serves).
        kid_subsets, kid_subset_size, kid_seed: KID subsets (size clamped to the smaller set) and their seed (also
            the seed of the equal-size subset precision/recall draw from the larger set).
        pr_k: the k of precision/recall's k-NN radii (Kynkäänniemi et al. 2019: 3).
        strict_thresholds: the strict checker's bars (``dalle2.data.strict_checker.STRICT``, the calibrated ones).
    """

    def __init__(
        self,
        *,
        clip: torch.nn.Module,
        tokenizer,
        score_clip: torch.nn.Module | None = None,
        score_tokenizer=None,
        inception: FIDInceptionV3 | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_seed: int = 0,
        pr_k: int = 3,
        strict_thresholds: StrictThresholds = STRICT,
    ):
        super().__init__()
        self.pr_k = int(pr_k)
        self.strict_thresholds = strict_thresholds
        self.scorer = ClipScorer(clip=clip.eval().requires_grad_(False), tokenizer=tokenizer)
        self.score_scorer = (
            ClipScorer(clip=score_clip.eval().requires_grad_(False), tokenizer=score_tokenizer or tokenizer)
            if score_clip is not None
            else self.scorer
        )
        self.inception = inception.eval().requires_grad_(False) if inception is not None else None
        self.kid = dict(subsets=int(kid_subsets), subset_size=int(kid_subset_size), seed=int(kid_seed))
        self._store: dict[str, dict[str, list[torch.Tensor]]] = {s: defaultdict(list) for s in SOURCES}
        self.results: dict | None = None

    # -- per batch ---------------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """batch: ``image`` (B,3,S,S) in [-1,1], ``id`` (B,), ``text`` B strings, ``valid`` (B,) bool, ``inception``
        (B,3,299,299) in [0,1] (when an Inception is given)."""
        store = self._store[SOURCES[dataloader_idx]]
        valid = batch["valid"].bool()
        store["skipped"].append(torch.tensor([int((~valid).sum())], device=self.device))
        if not bool(valid.any()):
            return
        keep = valid.nonzero().flatten().tolist()
        images = batch["image"][valid]
        texts = [batch["text"][i] for i in keep]
        has_text = torch.tensor([bool(t) for t in texts], device=self.device)
        img_emb = self.scorer.encode_images(images)
        scores = torch.zeros(len(keep), device=self.device)
        if bool(has_text.any()):
            score_emb = img_emb if self.score_scorer is self.scorer else self.score_scorer.encode_images(images)
            txt_emb = self.score_scorer.encode_texts([t for t in texts if t])
            scores[has_text] = clip_score(score_emb[has_text], txt_emb)
        store["id"].append(batch["id"][valid].long())
        store["clip"].append(img_emb.float())
        store["score"].append(scores)
        store["has_text"].append(has_text)
        if self.inception is not None:
            store["inception"].append(self.inception(batch["inception"][valid].float()).float())
        if dataloader_idx == 0:
            store["checker"].append(self._check(images, texts))

    def _check(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B, len(CHECKER_COLUMNS)) per-image verdicts (``dalle2.data.checker.checker_rows``: the lenient reader's
        attributes, every strict verdict, the IoU, the edge width); -1 rows when the prompt is not a synthetic
        caption."""
        out = torch.full((len(prompts), len(CHECKER_COLUMNS)), -1.0, device=self.device)
        pixels = to_uint8(images, (-1.0, 1.0))
        wants = [caption_attributes(p) for p in prompts]
        rows = [i for i, want in enumerate(wants) if want is not None]
        if rows:
            got = checker_rows(pixels[rows].numpy(), [wants[i] for i in rows], thresholds=self.strict_thresholds)
            out[rows] = torch.from_numpy(got).float().to(self.device)
        return out

    # -- end of epoch: gather, sort by id, compute ------------------------------------------------------------
    def _gathered(self, source: str) -> dict[str, torch.Tensor]:
        store = self._store[source]
        dims = {
            "clip": (int(self.scorer.clip.model.embed_dim),),
            "inception": (int(getattr(self.inception, "num_features", FIDInceptionV3.num_features)),),
            "checker": (len(CHECKER_COLUMNS),),
            "id": (),
            "score": (),
            "has_text": (),
        }
        dtypes = {"id": torch.long, "has_text": torch.bool}
        out = {}
        for key, tail in dims.items():
            if key == "inception" and self.inception is None or key == "checker" and source != "samples":
                continue
            empty = torch.zeros((0, *tail), dtype=dtypes.get(key, torch.float32), device=self.device)
            x = torch.cat(store.get(key) or [empty]).to(self.device)
            out[key] = gather_ragged(x.to(torch.uint8) if x.dtype == torch.bool else x)
        order = torch.argsort(out["id"])
        out = {k: v[order] for k, v in out.items()}
        out["has_text"] = out["has_text"].bool()
        skipped = torch.cat(store.get("skipped") or [torch.zeros(1, dtype=torch.long, device=self.device)]).sum()
        out["skipped"] = gather_ragged(skipped.view(1)).sum()
        return out

    def on_predict_epoch_end(self) -> None:
        fake, real = self._gathered("samples"), self._gathered("reference")
        self._store = {s: defaultdict(list) for s in SOURCES}
        n_fake, n_real = len(fake["id"]), len(real["id"])
        if n_fake < 2 or n_real < 2:
            raise ValueError(f"need >= 2 samples and >= 2 reference images, got {n_fake} and {n_real}")
        res: dict = {
            "num_samples": n_fake,
            "num_reference": n_real,
            "samples_skipped": int(fake["skipped"]),
            "reference_skipped": int(real["skipped"]),
        }
        kid = dict(self.kid)
        res["kid_subset_size"] = min(kid["subset_size"], n_fake, n_real)
        res["clip_fd"] = frechet_distance(real["clip"], fake["clip"])
        res["clip_kid_mean"], res["clip_kid_std"] = kernel_distance(real["clip"], fake["clip"], **kid)
        res["fid"] = res["kid_mean"] = res["kid_std"] = res["precision"] = res["recall"] = None
        if self.inception is not None:
            res["fid"] = frechet_distance(real["inception"], fake["inception"])
            res["kid_mean"], res["kid_std"] = kernel_distance(real["inception"], fake["inception"], **kid)
            n_pr = min(n_fake, n_real)
            if n_pr > self.pr_k:
                pr = precision_recall(real["inception"], fake["inception"], k=self.pr_k, seed=kid["seed"])
                res["precision"], res["recall"] = pr["precision"], pr["recall"]
            res["precision_recall"] = {"k": self.pr_k, "num_each": n_pr, "features": PR_FEATURES}
        scores = fake["score"].double()
        res["clip_score"], res["clip_score_std"] = float(scores.mean()), float(scores.std(unbiased=False))
        ref_scores = real["score"][real["has_text"]].double()
        res["reference_clip_score"] = float(ref_scores.mean()) if len(ref_scores) else None
        res["checker"] = _checker_summary(fake["checker"])
        size = getattr(getattr(self.trainer, "datamodule", None), "image_size", None)
        res["preprocessing"] = fid_preprocessing(size) if size else None
        self.results = res


def _checker_summary(verdicts: torch.Tensor) -> dict | None:
    """(N, len(CHECKER_COLUMNS)) verdicts (-1 rows: prompt not a synthetic caption) -> ``check_images(...,
    strict=True)``'s figures (lenient ``accuracy/*``, strict ``strict/*`` with ``strict/all`` the headline) and
    ``num_samples``, or None."""
    rows = verdicts[(verdicts[:, 0] >= 0)].double().cpu().numpy()
    if len(rows) == 0:
        return None
    return {"num_samples": int(len(rows)), **summarize_rows(rows)}


def samples_summary_line(results: dict) -> str:
    """One human line for the log."""
    parts = [f"{results['num_samples']} samples vs {results['num_reference']} reference images"]
    if results.get("fid") is not None:
        parts.append(f"FID {results['fid']:.2f}")
    parts += [f"CLIP-FD {results['clip_fd']:.3f}", f"CLIP score {results['clip_score']:.2f}"]
    if results.get("checker"):
        parts.append(
            f"checker all-correct {results['checker']['accuracy/all']:.3f} (lenient), "
            f"strict/all {results['checker']['strict/all']:.3f}"
        )
    return ", ".join(parts)
