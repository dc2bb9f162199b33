"""Where does the cascade lose fidelity?  Strict and lenient checker scores of each stage on captioned val data.

:func:`stage_fidelity` takes an :class:`~dalle2.pipeline.UnCLIPPipeline` (decoder + one upsampler, with a prior)
and the first N val samples (:func:`load_val`: captions naming built-in attributes, images at the decoder's and
the upsampler's sizes), and scores with ``check_images(..., strict=True)``:

- ``real``: the val images themselves at each size (the ceiling);
- ``a``: decoder samples from the val images' own CLIP image embeddings (decoder size);
- ``b``: those samples upsampled by the upsampler, and by bicubic (upsampler size);
- ``c``: decoder samples from the prior's embeddings of the captions (decoder size);
- ``d``: the full pipeline, text -> prior -> decoder -> upsampler (= ``c`` upsampled; and ``c`` by bicubic);
- ``sweep``: ``d`` again for each decoder setting given (sampler / steps / guidance scale), from the same prior
  embeddings.

Noise: image ``i`` draws from ``sample_generators([seed], [i], stream)`` as the pipeline does, so a row does not
depend on the batch size, and ``d`` is exactly ``pipe(captions, seed=seed)``.  Library code: no Hydra, no entry
point; ``eval/fidelity_ablation.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle2.data.checker import CHECKER_COLUMNS, checker_rows, summarize_rows
from dalle2.data.strict_checker import VERDICTS
from dalle2.data.synthetic import parse_caption
from dalle2.data.webdataset import make_dataset
from dalle2.imaging import to_uint8
from dalle2.metrics.bootstrap import over_seeds
from dalle2.pipeline import STREAM_UPSAMPLER, SamplingSettings, UnCLIPPipeline, sample_generators

__all__ = ["load_val", "derangement", "stage_fidelity", "stage_fidelity_seeds", "fidelity_table", "SCORE_KEYS"]

# the columns of a row, in table order: the strict checker's headline and verdicts, then the lenient reader's
SCORE_KEYS = (
    "strict/all",
    *(f"strict/{v}" for v in VERDICTS),
    "strict/iou_mean",
    "accuracy/all",
    "accuracy/shape",
    "accuracy/color",
    "accuracy/background",
)
_ALL = CHECKER_COLUMNS.index("strict/all")


def load_val(
    urls: str,
    *,
    image_size: int,
    num: int | None = None,
    load_embeddings: bool = False,
    batch_size: int = 256,
    context_length: int = 77,
) -> dict:
    """The first ``num`` val samples of ``urls`` (one deterministic pass) as one batch dict:
    ``image (N, 3, S, S)`` in [-1, 1], ``tokens (N, L)``, ``caption`` (N strings) [, ``img_emb``, ``txt_tokens``]."""
    from dalle2.clip.tokenizer import get_tokenizer

    ds = make_dataset(
        urls,
        image_size=image_size,
        tokenizer=get_tokenizer(),
        train=False,
        batch_size=batch_size,
        context_length=context_length,
        load_embeddings=load_embeddings,
        rank=0,
        world_size=1,
    )
    parts: list[dict] = []
    n = 0
    for batch in ds:
        parts.append(batch)
        n += len(batch["caption"])
        if num is not None and n >= num:
            break
    if not parts:
        raise ValueError(f"no samples in {urls!r}")
    out: dict = {"caption": [c for p in parts for c in p["caption"]][:num]}
    for k in ("image", "tokens", "img_emb", "txt_tokens"):
        if parts[0].get(k) is not None:
            out[k] = torch.cat([p[k] for p in parts])[:num]
    return out


def derangement(n: int, *, seed: int = 0) -> Tensor:
    """A random permutation of ``range(n)`` with no fixed point (n >= 2): a random order, each index sent to the
    next one in that order."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield list(range(i, min(n, i + batch_size)))


@torch.no_grad()
def _decode(
    pipe: UnCLIPPipeline, emb: Tensor, text: dict | None, settings: SamplingSettings, seed: int, batch_size: int
) -> Tensor:
    """Decoder samples (N, 3, s, s) in [0, 1], image i seeded as the pipeline seeds index i."""
    out = []
    for idx in _batches(len(emb), batch_size):
        t = {k: v[idx] for k, v in text.items()} if text is not None else None
        out.append(
            pipe.decode(
                emb[idx], seeds=[seed] * len(idx), indices=idx, settings=settings, num_upsamplers=0, text=t
            ).cpu()
        )
    return torch.cat(out)


@torch.no_grad()
def _upsample(pipe: UnCLIPPipeline, low: Tensor, settings: SamplingSettings, seed: int, batch_size: int) -> Tensor:
    """``low`` (N, 3, s, s) in [0, 1] through the first upsampler exactly as :meth:`UnCLIPPipeline.decode` does."""
    up, su, out = pipe.upsamplers[0], settings.upsampler, []
    for idx in _batches(len(low), batch_size):
        gen = sample_generators([seed] * len(idx), idx, STREAM_UPSAMPLER)
        x = up.upsample(
            low[idx].to(pipe.device) * 2.0 - 1.0,
            steps=int(su.steps),
            sampler=su.sampler,
            eta=float(su.eta),
            aug_level=settings.upsampler_aug_level,
            threshold=settings.threshold,
            generator=gen,
        )
        out.append(((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
    return torch.cat(out)


def _bicubic(low: Tensor, size: int) -> Tensor:
    return F.interpolate(low.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def _row(stage: str, what: str, images01: Tensor, attrs: list[dict], seconds: float | None = None, **extra) -> dict:
    """Scores of ``images01`` (N, 3, S, S) in [0, 1]; ``_verdicts`` holds the per-image checker rows (for the
    intervals and the aggregation over seeds: :func:`stage_fidelity_seeds`)."""
    verdicts = checker_rows(to_uint8(images01.float(), (0.0, 1.0)).numpy(), attrs)
    res = summarize_rows(verdicts)
    row = {"stage": stage, "what": what, "size": int(images01.shape[-1]), **extra}
    row.update({k: res[k] for k in SCORE_KEYS if k in res})
    est = over_seeds([verdicts[:, _ALL]])
    row["strict/all_ci"], row["n"], row["seeds"] = [est["lo"], est["hi"]], len(verdicts), 1
    row["_verdicts"] = verdicts
    if seconds is not None:
        row["sample_seconds"] = round(seconds, 1)
    return row


@torch.no_grad()
def stage_fidelity(
    pipe: UnCLIPPipeline,
    val_low: dict,
    val_high: dict | None,
    *,
    settings: SamplingSettings | None = None,
    sweep: Sequence[dict] = (),
    sweep_num: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    log=print,
    keep_verdicts: bool = False,
) -> list[dict]:
    """Rows of strict / lenient scores per stage (see the module docstring).  ``val_low`` / ``val_high``:
    :func:`load_val` dicts of the same samples at the decoder's and the upsampler's size (``val_high`` None for a
    pipeline without upsampler: no (b), and (d) is (c)'s images, the cascade's output); ``sweep``: decoder
    settings for ``d``, e.g. ``{"sampler": "dpmpp_2m", "steps": 25}`` (fields of ``StageSettings``), each on the
    first ``sweep_num`` captions (default all) with their prior embeddings of ``c``.  Each row holds ``strict/all``
    (the headline) with ``strict/all_ci`` (bootstrap 95 % interval over its ``n`` pictures), every strict verdict and
    the lenient figures; ``keep_verdicts`` keeps the per-image checker rows (``_verdicts``)."""
    if pipe.prior is None:
        raise ValueError("stage_fidelity needs a pipeline with a prior")
    upsampled = bool(pipe.upsamplers)
    if upsampled != (val_high is not None):
        raise ValueError("val_high must be given exactly when the pipeline has an upsampler")
    settings = settings or SamplingSettings()
    captions = list(val_low["caption"])
    if upsampled and list(val_high["caption"]) != captions:
        raise ValueError("val_low and val_high must hold the same samples in the same order")
    attrs = [parse_caption(c) for c in captions]
    rows = [_row("real", "val images", (v["image"].float() + 1) / 2, attrs) for v in (val_low, val_high) if v]
    log(f"[fidelity] {len(captions)} captions; real images scored")

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # text conditioning (the decoder's, when it uses text, and the prior's)
    text = {
        k: torch.cat(
            [pipe.encode_prompts([captions[i] for i in idx])[k].cpu() for idx in _batches(len(captions), batch_size)]
        )
        for k in ("text_embed", "text_tokens", "text_mask")
    }
    dec_text = text if pipe.decoder.use_text else None
    # (a) + (b): from the val images' own CLIP image embeddings
    emb_true = torch.cat(
        [
            pipe.encode_images((val_low["image"][idx].float() + 1) / 2).cpu()
            for idx in _batches(len(captions), batch_size)
        ]
    )
    dec_true, t = timed(lambda: _decode(pipe, emb_true, dec_text, settings, seed, batch_size))
    rows.append(_row("a", "decoder <- true CLIP image embedding", dec_true, attrs, t))
    log(f"[fidelity] (a) strict {rows[-1]['strict/all']:.3f}")
    if upsampled:
        hi = int(pipe.sizes[1])
        up_true, t = timed(lambda: _upsample(pipe, dec_true, settings, seed, batch_size))
        rows.append(_row("b", "(a) + upsampler", up_true, attrs, t))
        rows.append(_row("b", "(a) + bicubic", _bicubic(dec_true, hi), attrs))
        log(f"[fidelity] (b) upsampler {rows[-2]['strict/all']:.3f} vs bicubic {rows[-1]['strict/all']:.3f}")
    # (c) + (d): from the prior's embeddings of the captions
    emb_prior, t_prior = timed(
        lambda: torch.cat(
            [
                pipe.prior_embeddings(
                    {k: v[idx].to(pipe.device) for k, v in text.items()},
                    seeds=[seed] * len(idx),
                    indices=idx,
                    settings=settings,
                ).cpu()
                for idx in _batches(len(captions), batch_size)
            ]
        )
    )
    cos = float(F.cosine_similarity(emb_prior, emb_true, dim=-1).mean())
    dec_prior, t = timed(lambda: _decode(pipe, emb_prior, dec_text, settings, seed, batch_size))
    row_c = _row("c", "decoder <- prior embedding", dec_prior, attrs, t + t_prior, prior_cos_true=round(cos, 4))
    if upsampled:
        up_prior, t = timed(lambda: _upsample(pipe, dec_prior, settings, seed, batch_size))
        row_d = _row("d", "full pipeline (c) + upsampler", up_prior, attrs, t)
        rows += [row_c, row_d, _row("d", "(c) + bicubic", _bicubic(dec_prior, hi), attrs)]
    else:
        row_d = {**row_c, "stage": "d", "what": "full pipeline = (c) (no upsampler)"}
        rows += [row_c, row_d]
    log(f"[fidelity] (c) strict {row_c['strict/all']:.3f}, (d) {row_d['strict/all']:.3f}")
    m = len(captions) if sweep_num is None else min(int(sweep_num), len(captions))
    sub_text = {k: v[:m] for k, v in dec_text.items()} if dec_text is not None else None
    for change in sweep:
        dec = dataclasses.replace(settings.decoder, **change)
        st = dataclasses.replace(settings, decoder=dec)
        low, t1 = timed(lambda: _decode(pipe, emb_prior[:m], sub_text, st, seed, batch_size))
        up, t2 = timed(lambda: _upsample(pipe, low, st, seed, batch_size)) if upsampled else (low, 0.0)
        label = f"{dec.sampler}, {dec.steps} steps, guidance {dec.guidance_scale:g}"
        rows.append(
            _row(
                "sweep",
                f"(d) decoder {label}",
                up,
                attrs[:m],
                t1 + t2,
                decoder=dataclasses.asdict(dec),
                decoder_strict=_row("", "", low, attrs[:m])["strict/all"],
            )
        )
        log(f"[fidelity] sweep {label}: strict {rows[-1]['strict/all']:.3f}")
    return rows if keep_verdicts else [_public(r) for r in rows]


def stage_fidelity_seeds(pipe: UnCLIPPipeline, val_low: dict, val_high: dict | None, *, seeds=(0, 1, 2), **kw):
    """:func:`stage_fidelity` for each of ``seeds`` (>= 3 for reported figures), merged: one row per stage whose
    figures are the mean over seeds of each seed's fractions, ``strict/all_ci`` the bootstrap 95 % interval over
    the pictures of all seeds (:func:`~dalle2.metrics.bootstrap.over_seeds`), ``n`` the pictures and ``seeds``
    the seeds (``per_seed``: each seed's ``strict/all``)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("stage_fidelity_seeds needs at least one seed")
    runs = [stage_fidelity(pipe, val_low, val_high, seed=s, keep_verdicts=True, **kw) for s in seeds]
    rows = []
    for group in zip(*runs):
        row = dict(group[0])
        for k in SCORE_KEYS:
            if all(k in r for r in group):
                row[k] = float(sum(r[k] for r in group) / len(group))
        est = over_seeds([r["_verdicts"][:, _ALL] for r in group])
        row["strict/all"], row["strict/all_ci"] = est["mean"], [est["lo"], est["hi"]]
        row["n"], row["seeds"], row["per_seed"] = est["n"], seeds, est["per_seed"]
        if "decoder_strict" in row:
            row["decoder_strict"] = float(sum(r["decoder_strict"] for r in group) / len(group))
        if "sample_seconds" in row:
            row["sample_seconds"] = round(sum(r["sample_seconds"] for r in group), 1)
        rows.append(row)
    return [_public(r) for r in rows]


def _public(row: dict) -> dict:
    """A row without its per-image arrays (what goes into JSON)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def fidelity_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`stage_fidelity` (or calibration) rows: ``strict/all`` (the headline, with its
    95 % interval, n pictures and seeds), each strict verdict, then the lenient reader's figures."""
    head = ["stage", "what", "px", "strict/all [95 % CI]", "n (seeds)"]
    head += [v.replace("_", " ") for v in VERDICTS] + ["IoU mean", "lenient all", "lenient shape", "colour"]
    keys = [f"strict/{v}" for v in VERDICTS] + ["strict/iou_mean", "accuracy/all", "accuracy/shape", "accuracy/color"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get("stage", "")), str(r.get("what", "")), str(r.get("size", ""))]
        v, ci = r.get("strict/all"), r.get("strict/all_ci")
        cells.append(
            "" if v is None else f"**{100 * v:.1f}**" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
        )
        seeds = r.get("seeds")
        nseeds = len(seeds) if isinstance(seeds, (list, tuple)) else seeds
        cells.append(f"{r.get('n', '')} ({nseeds})" if nseeds else str(r.get("n", "")))
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None else (f"{v:.3f}" if k.endswith("iou_mean") else f"{100 * v:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
