"""Score a samples directory (``eval/sample.py``'s output) in-process: the ``SampleEvaluator`` metrics (CLIP-FD,
CLIP-KID, CLIP score, the lenient and strict attribute checkers, FID/KID with Inception weights) through
``Trainer.predict``.  ``eval/evaluate.py task=samples`` calls it, and so does each job of an ``eval/sample.py -m``
sweep on its own samples."""

from __future__ import annotations

import warnings

import lightning as L

from dalle2.metrics.evaluator import SampleEvalData, SampleEvaluator
from dalle2.metrics.inception import FIDInceptionV3

__all__ = ["score_samples_dir"]


def score_samples_dir(
    samples_dir: str,
    *,
    reference_urls: str,
    clip,
    tokenizer,
    trainer: L.Trainer,
    score_clip=None,
    score_tokenizer=None,
    inception: FIDInceptionV3 | None = None,
    image_size: int | None = None,
    max_reference: int | None = 10000,
    batch_size: int = 64,
    num_workers: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> dict:
    """The metrics dict (every rank holds it) of ``samples_dir`` against the first ``max_reference`` samples of
    ``reference_urls`` decoded at ``image_size`` (default: the samples' size), with ``clip`` (a CLIP LightningModule)
    and its ``tokenizer`` (the CLIP score under ``score_clip`` / ``score_tokenizer`` when given); FID/KID when
    ``inception`` is given.  ``trainer`` must not use a distributed sampler
    (``SampleEvalData`` splits the items over ranks itself)."""
    data = SampleEvalData(
        samples_dir=samples_dir,
        reference_urls=reference_urls,
        image_size=image_size,
        max_reference=max_reference,
        batch_size=batch_size,
        num_workers=num_workers,
        inception=inception is not None,
    )
    module = SampleEvaluator(
        clip=clip,
        tokenizer=tokenizer,
        score_clip=score_clip,
        score_tokenizer=score_tokenizer,
        inception=inception,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        kid_seed=kid_seed,
    )
    with warnings.catch_warnings():  # predict_step returns nothing on purpose: results are gathered at epoch end
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        trainer.predict(module, datamodule=data, return_predictions=False)
    return {**module.results, "image_size": data.image_size}
