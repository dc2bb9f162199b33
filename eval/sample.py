"""Sample images for a file of prompts with the whole cascade, on any number of devices.

    python eval/sample.py ckpt.clip=clip.ckpt ckpt.prior=prior.ckpt ckpt.decoder=decoder.ckpt \
        "ckpt.upsamplers=[sr.ckpt]" prompts=prompts.txt out_dir=samples [seed=0 n_per_prompt=4 batch_size=8 \
        trainer.devices=8 trainer.strategy=ddp steps.decoder=50 guidance.decoder=3 size=64]

Writes ``out_dir/{i:05d}.png`` for prompt line ``i`` (``{i:05d}_{k}.png`` for its sample ``k > 0``; with
``seed=[0,1,2]`` every image once per seed, ``{i:05d}[_{k}]_s{seed}.png``: headline figures over seeds),
``out_dir/manifest.jsonl`` (one JSON per image, prompt order: file, prompt, index i, k, seed, size, settings,
checkpoints), ``out_dir/grid.png`` and ``out_dir/final_metrics.json`` (settings, the job's overrides, seconds per
image and, with ``score.reference_urls=SHARDS``, the scores of ``eval/evaluate.py task=samples``: CLIP-FD, CLIP
score, lenient and strict checkers, FID with ``score.inception=``).  ``out_dir`` defaults to the run dir; in a
multirun (``-m guidance.decoder=1,2,3 sampler.decoder=ddim,dpmpp_2m steps.decoder=10,50``) each job samples and scores
into its own ``<sweep dir>/<n>/``; ``eval/sweep_gather.py`` gathers them.  Sample ``k`` of prompt line ``i`` is exactly
``UnCLIPPipeline(...)([prompt], seed=seed, indices=[(i, k)])`` (``indices=[i]`` for k = 0): its noise comes from
``(seed, i, k)`` alone, so it does not change with ``n_per_prompt``, ``batch_size``'s batch mates (up to float
rounding) or the number of devices (batches are fixed, then spread over ranks: identical PNGs at any N).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.io import write_json_atomic  # noqa: E402
from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.lit.distributed import releases_process_group  # noqa: E402
from dalle2.lit.pipeline_module import PipelineModule, PromptBatches, SampleWriter, make_items  # noqa: E402
from dalle2.pipeline import SamplingSettings, UnCLIPPipeline, resolve_stages  # noqa: E402


def read_prompts(path: str) -> list[str | None]:
    """One prompt a line; blank lines -> None (skipped, but the line numbers of the others are kept)."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"prompts file not found: {path}")
    lines = p.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() or None for line in lines]
    if not any(prompts):
        raise SystemExit(f"no prompts in {path} (expected one prompt a line)")
    return prompts


def run(cfg: DictConfig) -> Path:
    prompts = read_prompts(cfg.prompts)
    settings = SamplingSettings.from_config(cfg, base=resolve_stages(cfg))
    upsamplers = list(cfg.ckpt.upsamplers or [])
    pipe = UnCLIPPipeline.from_checkpoints(
        clip=cfg.ckpt.clip,
        prior=cfg.ckpt.prior,
        decoder=cfg.ckpt.decoder,
        upsamplers=upsamplers,
        tokenizer=cfg.tokenizer_path,
        trust_checkpoint=bool(cfg.get("trust_checkpoint", False)),
    )
    module = PipelineModule(pipe, settings=settings, size=cfg.size)
    size = cfg.size or pipe.sizes[-1]
    seed = cfg.seed if isinstance(cfg.seed, int) else list(cfg.seed)  # a list: every image once per seed
    items = make_items(prompts, n_per_prompt=int(cfg.n_per_prompt), seed=seed)
    out_dir = Path(cfg.out_dir)
    extra = {
        "size": int(size),
        "settings": settings.to_dict(),
        "ckpt": {
            "clip": cfg.ckpt.clip,
            "prior": cfg.ckpt.prior,
            "decoder": cfg.ckpt.decoder,
            "upsamplers": upsamplers[: pipe.sizes.index(size)],
        },
        "tokenizer": pipe.tokenizer.vocabulary.to_dict(with_merges=False),
    }
    writer = SampleWriter(
        out_dir,
        items,
        extra=extra,
        grid_max=int(cfg.grid.max_images),
        grid_ncol=cfg.grid.ncol,
        grid_captions=bool(cfg.grid.captions),
    )
    # the writer names files from the items themselves, not from Lightning's batch indices
    warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
    # PromptBatches deals batch j to rank j % world itself: no distributed sampler
    trainer = instantiate(cfg.trainer, use_distributed_sampler=False, callbacks=[writer])
    start = time.perf_counter()
    trainer.predict(module, datamodule=PromptBatches(items, batch_size=int(cfg.batch_size)), return_predictions=False)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        print(f"[dalle2] {len(items)} images ({size} px) -> {out_dir}/ (manifest.jsonl, grid.png)")
    metrics = {
        "num_images": len(items),
        "seconds": seconds,
        "seconds_per_image": seconds / max(len(items), 1),
        "devices": trainer.world_size,
    }
    score = cfg.get("score") or {}
    described: dict = {}
    if score.get("reference_urls"):
        from dalle2.lit.clip_module import clip_source, load_clip
        from dalle2.metrics.inception import load_fid_inception
        from dalle2.metrics.score_samples import score_samples_dir

        trainer.strategy.barrier()  # every rank's PNGs and the manifest are written
        trust = bool(cfg.get("trust_checkpoint", False))
        clip_path = score.get("clip") or cfg.ckpt.clip
        clip = load_clip(clip_path, trust_checkpoint=trust)
        if not clip.model.has_image_tower:
            raise SystemExit(
                "error: scoring needs a CLIP with an image tower; the pipeline's has none (a converted Karlo's text "
                "encoder): give score.clip= (e.g. OpenAI's ViT-L-14.pt)"
            )
        score_cfg = score.get("clip_score") or {}
        score_clip = load_clip(score_cfg.ckpt, trust_checkpoint=trust) if score_cfg.get("ckpt") else None
        scorer = instantiate(cfg.trainer, use_distributed_sampler=False, enable_progress_bar=False)
        scores = score_samples_dir(
            str(out_dir),
            reference_urls=score.reference_urls,
            clip=clip,
            tokenizer=clip.tokenizer(cfg.tokenizer_path),
            trainer=scorer,
            score_clip=score_clip,
            score_tokenizer=score_clip.tokenizer(score_cfg.get("tokenizer_path")) if score_clip is not None else None,
            inception=load_fid_inception(score.inception) if score.get("inception") else None,
            max_reference=score.get("max_reference"),
            batch_size=int(score.get("batch_size", 64)),
            num_workers=int(score.get("num_workers", 0)),
        )
        described = {  # strings: flatten keeps numbers only
            "clip_score_clip": clip_source(score_cfg.get("ckpt") or clip_path),
            "preprocessing": scores.get("preprocessing"),
            "precision_recall": scores.get("precision_recall"),
        }
        metrics.update(flatten(scores))
    if trainer.is_global_zero:
        write_json_atomic(
            out_dir / "final_metrics.json",
            {
                "metrics": metrics,
                "overrides": job_overrides(),
                "step": None,
                "settings": settings.to_dict(),
                "size": int(size),
                **described,
            },
        )
        print(
            "[dalle2] "
            + ", ".join(
                f"{k} {v:.4g}"
                for k, v in metrics.items()
                if isinstance(v, float) and k.count("/") <= 2 and "std" not in k
            )
        )
    return out_dir


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested scores -> ``{"checker/accuracy/all": ...}``; numbers and None only."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif v is None or isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def job_overrides() -> list[str]:
    """This Hydra job's command-line overrides (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
@releases_process_group
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except CHECKPOINT_ERRORS as e:  # a refused / wrong-stage / missing checkpoint, a mismatched vocabulary: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
