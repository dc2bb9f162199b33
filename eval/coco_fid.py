"""COCO-style zero-shot FID: sample one image per drawn COCO caption with the whole cascade, then score the samples
against the real images (FID, KID, precision/recall on Inception features; CLIP score against the captions).

    python eval/coco_fid.py captions=annotations/captions_val2014.json images=val2014/ n=30000 seed=0 \
        ckpt.clip=CLIP ckpt.prior=PRIOR ckpt.decoder=DEC "ckpt.upsamplers=[SR1]" \
        inception=pt_inception-2015-12-05-6726825d.pth out=DIR [trainer.devices=8 trainer.strategy=ddp n_ref=null \
        guidance.decoder=3 steps.decoder=50 sampler.decoder=ddim ...]

Writes ``DIR/captions.jsonl`` (the drawn captions), ``DIR/generation.json`` (what the images depend on),
``DIR/samples/{j:05d}.png`` (+ ``manifest.jsonl``, ``grid.png``) and ``DIR/metrics.json``.  Image j is exactly
``eval/sample.py``'s image for prompt line j (noise from ``(seed, j, 0)``, fixed batches spread over ranks): the
same PNGs at any ``trainer.devices``.  A rerun resumes: batches whose PNGs are all present and decode completely
are skipped, the others are sampled again whole (same batch mates, same bytes) and only their missing or broken
files written.  Reference statistics are cached in ``ref_cache`` by a hash of the reference file list, the resize
and the Inception weights: a sweep computes them once.  See docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.io import write_json_atomic  # noqa: E402
from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.lit.clip_module import clip_source, load_clip  # noqa: E402
from dalle2.lit.distributed import releases_process_group  # noqa: E402
from dalle2.lit.pipeline_module import PipelineModule, PromptBatches, SampleWriter, make_items, valid_image  # noqa: E402
from dalle2.lit.precision import resolve_precision  # noqa: E402
from dalle2.metrics.clip_score import ClipScorer  # noqa: E402
from dalle2.metrics.coco import (  # noqa: E402
    CocoCaptions,
    ReferenceCache,
    draw_captions,
    file_list_digest,
    file_sha256,
    reference_files,
    write_jsonl_atomic,
)
from dalle2.metrics.coco_eval import FileFeatures, ImageFilesData, coco_metrics, reference_arrays  # noqa: E402
from dalle2.metrics.inception import InceptionWeightsError, load_fid_inception  # noqa: E402
from dalle2.metrics.precision_recall import PR_FEATURES  # noqa: E402
from dalle2.metrics.resize import RESIZE_DESCRIPTION, fid_preprocessing  # noqa: E402
from dalle2.pipeline import SamplingSettings, UnCLIPPipeline, resolve_stages  # noqa: E402

PROTOCOL_VERSION = 1  # bump when the features a cache holds would change


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _trainer(cfg: DictConfig, callbacks=()) -> L.Trainer:
    # fixed batches (samples) and ImageFilesData (features) are dealt to ranks by us: no distributed sampler
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"))
    return instantiate(cfg.trainer, use_distributed_sampler=False, callbacks=list(callbacks), precision=precision)


def _clip_score_path(cfg: DictConfig) -> str:
    """The CLIP of the CLIP score: ``clip_score.ckpt``, else the cascade's own ``ckpt.clip``."""
    return str((cfg.get("clip_score") or {}).get("ckpt") or cfg.ckpt.clip)


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (before any process group exists)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# what a run writes in out= (moved aside together by force=true when the settings changed)
OUTPUTS = ("samples", "captions.jsonl", "generation.json", "metrics.json")


def move_outputs_aside(out: Path) -> Path:
    """Move the previous run's outputs (:data:`OUTPUTS`) into ``out/replaced-<time>/``: nothing is deleted, and new
    PNGs never sit beside old ones."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out / f"replaced-{stamp}", 1
    while target.exists():
        target, n = out / f"replaced-{stamp}-{n}", n + 1
    target.mkdir(parents=True)
    for name in OUTPUTS:
        if (out / name).exists():
            (out / name).rename(target / name)
    return target


def _check_identity(path: Path, identity: dict, force: bool) -> None:
    """A rerun in ``out`` must make the same images (``n`` may change: the draw for a smaller n is a prefix);
    ``force`` moves a previous run with other settings aside (rank 0; the other ranks wait for its new identity)."""
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff and not force:
            raise SystemExit(
                f"error: {path.parent} holds samples made with other settings ({', '.join(diff)} "
                "differ); choose another out= (or force=true to move them aside into out/replaced-<time>/ and "
                "start afresh)"
            )
        if diff and _launch_rank() != 0:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(identity)):
                    return
                time.sleep(0.5)
            raise SystemExit(f"error: rank {_launch_rank()}: rank 0 did not move {path.parent}'s old samples aside")
        if diff:
            moved = move_outputs_aside(path.parent)
            print(f"[dalle2] force=true: the previous run's outputs ({', '.join(diff)} differ) moved to {moved}/")
    write_json_atomic(path, identity)


def generate(
    cfg: DictConfig, rows: list[dict], out: Path, ckpt_hashes: dict, base: SamplingSettings | None = None
) -> dict:
    """Samples ``out/samples/{j:05d}.png`` for the drawn captions (resuming); returns the generation identity."""
    settings = SamplingSettings.from_config(cfg, base=base)
    upsamplers = list(cfg.ckpt.upsamplers or [])
    pipe = UnCLIPPipeline.from_checkpoints(
        clip=cfg.ckpt.clip,
        prior=cfg.ckpt.prior,
        decoder=cfg.ckpt.decoder,
        upsamplers=upsamplers,
        tokenizer=cfg.tokenizer_path,
        trust_checkpoint=bool(cfg.trust_checkpoint),
    )
    size = int(cfg.size or pipe.sizes[-1])
    items = make_items([r["caption"] for r in rows], seed=int(cfg.seed))
    samples = out / "samples"
    writer = SampleWriter(
        samples,
        items,
        extra={"size": size, "settings": settings.to_dict(), "ckpt": ckpt_hashes},
        keep=lambda p: valid_image(p, size),
    )
    trainer = _trainer(cfg, [writer])  # before the identity: it names the precision and device that will run
    tok = pipe.tokenizer
    identity = {
        "seed": int(cfg.seed),
        "captions_sha256": file_sha256(cfg.captions),
        "size": size,
        "batch_size": int(cfg.batch_size),
        "settings": settings.to_dict(),
        "checkpoints": {k: ckpt_hashes[k] for k in ("clip", "prior", "decoder", "upsamplers")},
        "tokenizer": {"name": tok.name, "sha256": tok.vocabulary.sha256, "context_length": tok.context_length},
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
    }
    _check_identity(out / "generation.json", identity, bool(cfg.force))
    write_jsonl_atomic(out / "captions.jsonl", rows)

    def done(batch: list[dict]) -> bool:
        return all(valid_image(samples / it["file"], size) for it in batch)

    batches = PromptBatches(items, batch_size=int(cfg.batch_size), skip=done)
    warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
    trainer.predict(PipelineModule(pipe, settings=settings, size=size), datamodule=batches, return_predictions=False)
    print(
        f"[dalle2] rank {trainer.global_rank}: {batches.skipped_batches} batches already done, "
        f"{writer.written} images written -> {samples}/"
    )
    return identity


def evaluate(cfg: DictConfig, rows: list[dict], refs: list, out: Path, hashes: dict, identity: dict) -> dict | None:
    """FID / KID / precision / recall / CLIP score of ``out/samples`` against ``refs``; the dict on rank 0."""
    inception = load_fid_inception(cfg.inception) if cfg.inception else None
    score_path = _clip_score_path(cfg)
    clip = load_clip(score_path, trust_checkpoint=bool(cfg.trust_checkpoint))
    if not clip.model.has_image_tower:
        raise SystemExit(
            f"error: the CLIP score needs a CLIP with an image tower; {score_path} has none "
            "(a converted Karlo's text encoder): give clip_score.ckpt= (e.g. OpenAI's ViT-L-14.pt)"
        )
    own = score_path == str(cfg.ckpt.clip)  # the cascade's CLIP: the cascade's tokenizer choice applies
    tok_path = cfg.tokenizer_path if own else (cfg.get("clip_score") or {}).get("tokenizer_path")
    scorer = ClipScorer(clip=clip, tokenizer=clip.tokenizer(tok_path))
    size, k = int(cfg.image_size), int(cfg.precision_recall.k)
    cache = ReferenceCache(cfg.ref_cache)
    resize = RESIZE_DESCRIPTION.format(size=size)
    key = ReferenceCache.key(
        files_digest=file_list_digest([p for _, p in refs]),
        identity={
            "image_size": size,
            "resize": resize,
            "inception_sha256": hashes["inception"],
            "k": k,
            "version": PROTOCOL_VERSION,
        },
    )
    # rank 0 decides hit or miss for every rank (a concurrent job or a lagging shared file system could otherwise
    # show ranks different caches, and their gathers would go out of step); only rank 0 keeps the arrays
    ref = cache.load(key) if inception is not None and _rank() == 0 else None
    need_reference = [inception is not None and ref is None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(need_reference, src=0)
    sources = {"samples": [{"path": out / "samples" / f"{r['index']:05d}.png", "text": r["caption"]} for r in rows]}
    if need_reference[0]:
        sources["reference"] = [{"path": p, "text": ""} for _, p in refs]
    module = FileFeatures(list(sources), inception=inception, scorer=scorer)
    data = ImageFilesData(
        sources,
        image_size=size,
        inception=inception is not None,
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.eval.num_workers),
    )
    trainer = _trainer(cfg)
    with warnings.catch_warnings():  # predict_step returns nothing on purpose: results are gathered at epoch end
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        trainer.predict(module, datamodule=data, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    fake = module.results["samples"]
    ref_skipped = 0
    if "reference" in module.results:
        got = module.results["reference"]
        ref_skipped = got["skipped"]
        ref = reference_arrays(
            got["id"], got["inception"].to(module.device), k=k, chunk_size=int(cfg.precision_recall.chunk_size)
        )
        ref_meta = {
            "num_reference": int(len(got["id"])),
            "reference_skipped": ref_skipped,
            "images": str(cfg.images),
            "resize": resize,
            "inception_sha256": hashes["inception"],
            "k": k,
        }
        cache.save(key, ref, ref_meta)
        ref["meta"] = ref_meta
    if inception is not None and len(fake["id"]) < 2:
        raise SystemExit(f"error: {len(fake['id'])} readable samples in {out / 'samples'}; FID needs at least 2")
    res = coco_metrics(
        ref,
        fake.get("inception"),
        fake["clip_score"],
        kid_subsets=int(cfg.kid.subsets),
        kid_subset_size=int(cfg.kid.subset_size),
        kid_seed=int(cfg.kid.seed),
        k=k,
        chunk_size=int(cfg.precision_recall.chunk_size),
        equal_sizes=bool(cfg.precision_recall.equal_sizes),
        device=module.device,
    )
    n_ref = int(ref["meta"]["num_reference"]) if ref is not None else 0
    res.update(
        {
            "protocol": "COCO zero-shot FID (dalle2 eval/coco_fid.py)",
            "implementation": {
                "inception": "dalle2.metrics.inception.FIDInceptionV3 (pt_inception-2015-12-05 port, pool3 2048-d)",
                "fid": "Frechet distance of float64 mean / unbiased covariance; tr sqrt(S1 S2) from eigvals (torchmetrics' "
                "formula); reference statistics cached",
                "kid": f"unbiased MMD^2, kernel (x.y/d + 1)^3, {cfg.kid.subsets} subsets of min({cfg.kid.subset_size}, "
                "N, M) rows, seeded after a canonical row order",
                "precision_recall": f"Kynkaenniemi et al. 2019, k={k}, Euclidean, on {PR_FEATURES}; "
                + (
                    "the larger set cut to the smaller's size (seeded with kid.seed)"
                    if cfg.precision_recall.equal_sizes
                    else "unequal set sizes as given"
                ),
                "clip_score": "100 * max(cos(CLIP image emb, CLIP text emb), 0), mean over samples (Hessel et al. 2021)",
            },
            "resize": resize,
            "preprocessing": fid_preprocessing(size),
            "image_size": size,
            "counts": {
                "captions": len(rows),
                "samples": int(len(fake["id"])),
                "samples_skipped": fake["skipped"],
                "reference": n_ref,
                "reference_skipped": int(ref["meta"].get("reference_skipped", 0)) if ref else 0,
                "kid_subset_size": min(int(cfg.kid.subset_size), n_ref, len(fake["id"])) if ref else None,
            },
            "seeds": {
                "caption_draw": int(cfg.seed),
                "sampling": int(cfg.seed),
                "kid": int(cfg.kid.seed),
                "reference_subset": int(cfg.seed) if cfg.n_ref else None,
            },
            "sampling": identity["settings"],
            "sample_size": identity["size"],
            "batch_size": identity["batch_size"],
            "guidance": {s: identity["settings"][s]["guidance_scale"] for s in ("prior", "decoder", "upsampler")},
            "steps": {s: identity["settings"][s]["steps"] for s in ("prior", "decoder", "upsampler")},
            "sampler": {s: identity["settings"][s]["sampler"] for s in ("prior", "decoder", "upsampler")},
            "checkpoints": {
                "clip": str(cfg.ckpt.clip),
                "prior": str(cfg.ckpt.prior),
                "decoder": str(cfg.ckpt.decoder),
                "upsamplers": [str(u) for u in cfg.ckpt.upsamplers or []],
                "inception": str(cfg.inception) if cfg.inception else None,
                "clip_score": str(score_path),
            },
            "sha256": hashes,
            "clip_score_clip": {**clip_source(score_path), "generator_clip": bool(own)},
            "data": {"captions": str(cfg.captions), "images": str(cfg.images), "n": len(rows), "n_ref": cfg.n_ref},
            "reference_cache": {"file": str(cache.path(key)), "hit": cache.hits > 0},
            "out": str(out),
        }
    )
    return res


def run(cfg: DictConfig) -> dict | None:
    try:
        coco = CocoCaptions(cfg.captions)
        rows = draw_captions(coco, n=cfg.n, seed=int(cfg.seed))
        refs = reference_files(coco, cfg.images, n_ref=cfg.n_ref, seed=int(cfg.seed))
        if cfg.inception:
            load_fid_inception(cfg.inception)  # a wrong weights file fails now, not after hours of sampling
    except (FileNotFoundError, ValueError, InceptionWeightsError) as exc:
        raise SystemExit(f"error: {exc}") from None
    base = resolve_stages(cfg)
    out = Path(cfg.out)
    names = {
        "clip": cfg.ckpt.clip,
        "prior": cfg.ckpt.prior,
        "decoder": cfg.ckpt.decoder,
        "inception": cfg.inception,
        "clip_score": _clip_score_path(cfg),
    }
    hashes = {k: file_sha256(v) for k, v in names.items()}
    hashes["upsamplers"] = [file_sha256(u) for u in cfg.ckpt.upsamplers or []]
    identity = generate(cfg, rows, out, hashes, base)
    result = evaluate(cfg, rows, refs, out, hashes, identity)
    if result is not None:
        write_json_atomic(out / "metrics.json", result)
        print(
            f"[dalle2] FID {result['fid']}  KID {result['kid_mean']}  precision {result['precision']}  recall "
            f"{result['recall']}  CLIP score {result['clip_score']} -> {out / 'metrics.json'}"
        )
    return result


@hydra.main(config_path="../conf", config_name="coco", version_base="1.3")
@releases_process_group
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except CHECKPOINT_ERRORS as e:  # a refused / wrong-stage / missing checkpoint, a mismatched vocabulary: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
