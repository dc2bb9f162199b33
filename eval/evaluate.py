"""Evaluate checkpoints and write metrics as JSON.

    python eval/evaluate.py task=retrieval clip_ckpt=runs/clip/.../last.ckpt data.urls='val/{00000..00001}.tar' out=r.json

    python eval/evaluate.py task=samples samples=DIR "reference.urls='val/{00000..00001}.tar'" clip_ckpt=clip.ckpt \
        [clip_score.ckpt=ViT-B-32.pt clip_score.tokenizer_path=bpe_simple_vocab_16e6.txt.gz] \
        [inception=pt_inception-2015-12-05-6726825d.pth] out=m.json [trainer.devices=N]

task=retrieval: zero-shot image->text and text->image R@1/5/10 and mean rank over every sample of the shards,
features gathered from all ranks (trainer.devices=N) before ranking.

task=samples: a samples directory (eval/sample.py) against reference shards: FID and KID (with a local FID Inception
weights file; skipped with a message without one), CLIP-FD and CLIP-KID on our CLIP's image features, the mean CLIP
score of each sample against its prompt (and of the references against their captions, a ceiling), and the attribute
checker's accuracy when the prompts are built-in synthetic captions.  ``clip_score.ckpt`` scores the CLIP score
(samples and references) with another CLIP than ``clip_ckpt`` -- any CLIP ``load_clip`` reads: OpenAI / open_clip
weights, one of ours as ``.ckpt``, export or safetensors; the JSON names it (``clip_score_clip``: path, sha256,
kind). Features are gathered from all ranks and
sorted before any distance is computed: the same numbers at any trainer.devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.datamodule import WebDataModule  # noqa: E402
from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.lit.clip_module import clip_source, load_clip  # noqa: E402
from dalle2.lit.distributed import releases_process_group  # noqa: E402
from dalle2.metrics.evaluator import samples_summary_line  # noqa: E402
from dalle2.metrics.inception import InceptionWeightsError, load_fid_inception  # noqa: E402
from dalle2.metrics.score_samples import score_samples_dir  # noqa: E402


def load_checked_clip(cfg: DictConfig, tokenizer_path, path=None):
    """The CLIP at ``path`` (default ``clip_ckpt``; safe load) and its tokenizer (its own vocabulary; a named one
    must match it)."""
    clip = load_clip(path or cfg.clip_ckpt, trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
    return clip, clip.tokenizer(tokenizer_path)


def evaluate_retrieval(cfg: DictConfig) -> dict:
    module, tokenizer = load_checked_clip(cfg, cfg.data.tokenizer_path)
    dm = WebDataModule(
        train_urls=None,
        val_urls=cfg.data.urls,
        image_size=cfg.data.image_size or module.model.image_size,
        val_batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        tokenizer=tokenizer,
        context_length=module.model.context_length,
    )
    trainer = instantiate(cfg.trainer)
    [metrics] = trainer.validate(module, datamodule=dm, verbose=False)
    result = {k.removeprefix("val/"): v for k, v in metrics.items()}
    result["num_samples"] = int(result["num_samples"])
    return result


def evaluate_samples(cfg: DictConfig) -> dict | None:
    """Metrics of ``cfg.samples`` against ``cfg.reference.urls``; the dict on rank 0, None on the other ranks."""
    if not cfg.samples or not cfg.reference.urls:
        raise SystemExit("task=samples needs samples=DIR and reference.urls=SHARDS")
    try:
        inception = load_fid_inception(cfg.inception) if cfg.inception else None
    except (FileNotFoundError, InceptionWeightsError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    clip, tokenizer = load_checked_clip(cfg, cfg.data.tokenizer_path)
    score_cfg = cfg.get("clip_score") or {}
    score_path = score_cfg.get("ckpt") or None
    score_clip, score_tokenizer = (
        load_checked_clip(cfg, score_cfg.get("tokenizer_path"), score_path) if score_path else (None, None)
    )
    trainer = instantiate(cfg.trainer, use_distributed_sampler=False)  # SampleEvalData splits by rank itself
    if inception is None and trainer.is_global_zero:
        print(
            "[dalle2] FID/KID skipped: no Inception weights given (inception=/path/to/"
            "pt_inception-2015-12-05-6726825d.pth, a local file); CLIP-FD and CLIP-KID are reported instead"
        )
    try:
        result = score_samples_dir(
            cfg.samples,
            reference_urls=cfg.reference.urls,
            clip=clip,
            tokenizer=tokenizer,
            trainer=trainer,
            score_clip=score_clip,
            score_tokenizer=score_tokenizer,
            inception=inception,
            image_size=cfg.reference.image_size,
            max_reference=cfg.reference.max_samples,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            kid_subsets=cfg.kid.subsets,
            kid_subset_size=cfg.kid.subset_size,
            kid_seed=cfg.kid.seed,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    result.update(
        samples=str(cfg.samples),
        reference_urls=str(cfg.reference.urls),
        clip_ckpt=str(cfg.clip_ckpt),
        inception=str(cfg.inception) if cfg.inception else None,
        clip_score_clip=clip_source(score_path or cfg.clip_ckpt),
    )
    if not trainer.is_global_zero:
        return None
    print(f"[dalle2] {samples_summary_line(result)}")
    return result


TASKS = {"retrieval": evaluate_retrieval, "samples": evaluate_samples}


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@releases_process_group
def main(cfg: DictConfig) -> None:
    if cfg.task not in TASKS:
        raise SystemExit(f"unknown task {cfg.task!r}; expected one of {sorted(TASKS)}")
    try:
        result = TASKS[cfg.task](cfg)
    except CHECKPOINT_ERRORS as e:  # a refused / wrong-stage / missing checkpoint, a mismatched vocabulary: one line
        raise SystemExit(f"error: {e}") from None
    if result is None:  # a non-zero rank of a multi-process run: rank 0 writes
        return
    text = json.dumps(result, indent=2, sort_keys=True)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(text + "\n")
        print(f"[dalle2] wrote {cfg.out}")
    print(text)


if __name__ == "__main__":
    main()
