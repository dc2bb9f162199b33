"""Score a samples directory (``eval/sample.py``'s output) in-process: the ``SampleEvaluator`` metrics (CLIP-FD,
CLIP-KID, CLIP score, the lenient and strict attribute checkers, FID/KID with Inception weights) through
``Trainer.predict`` — what ``eval/evaluate.py task=samples`` computes, callable from another entry point (each job of
an ``eval/sample.py -m`` sweep scores its own samples)."""

from __future__ import annotations

import warnings

import lightning as L

from dalle2.lit.clip_module import load_clip
from dalle2.metrics.evaluator import SampleEvalData, SampleEvaluator
from dalle2.metrics.inception import load_fid_inception

__all__ = ["score_samples_dir"]


def score_samples_dir(samples_dir: str, *, reference_urls: str, clip_ckpt: str, max_reference: int | None = 10000,
                      inception: str | None = None, tokenizer_path: str | None = None, batch_size: int = 64,
                      num_workers: int = 0, trust_checkpoint: bool = False, trainer_kwargs: dict | None = None) -> dict:  # fmt: skip
    """The metrics dict (every rank holds it) of ``samples_dir`` against the first ``max_reference`` samples of
    ``reference_urls``, with the CLIP of ``clip_ckpt`` (and FID/KID when ``inception`` names the weights file)."""
    data = SampleEvalData(samples_dir=samples_dir, reference_urls=reference_urls, max_reference=max_reference,
                          batch_size=batch_size, num_workers=num_workers)  # fmt: skip
    clip = load_clip(clip_ckpt, trust_checkpoint=trust_checkpoint)
    module = SampleEvaluator(clip=clip, tokenizer=clip.tokenizer(tokenizer_path),
                             inception=load_fid_inception(inception) if inception else None)  # fmt: skip
    kw = dict(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
              use_distributed_sampler=False)  # fmt: skip
    trainer = L.Trainer(**{**kw, **(trainer_kwargs or {})})
    with warnings.catch_warnings():  # predict_step returns nothing on purpose: results are gathered at epoch end
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        trainer.predict(module, datamodule=data, return_predictions=False)
    return dict(module.results)
