"""Dataloader throughput: images/s through decode + resize/crop + tokenize + batch (warm-up excluded).

    python bench/dataloader.py --image-size 64 --workers 2 --batch-size 64 --batches 50 --out bench/dataloader.json
    python bench/dataloader.py --image-size 64,256 --workers 0,1,2      # every combination, one JSON object
    python bench/dataloader.py --urls '/data/{00000..00099}.tar' --image-size 256 --workers 8

One size and one worker count print the single result; lists print ``{"results": [...]}``.

Without --urls, built-in synthetic shards are written to a temp dir (at --source-size px, default 2x the
image size, so the resize path is exercised).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import emit  # noqa: E402  (bench/common.py, beside this script)
from dalle2.data.synthetic import write_shards  # noqa: E402
from dalle2.data.webdataset import make_dataset  # noqa: E402


class _WordHashTokenizer:
    """Fallback when the shipped BPE vocab is unavailable (tokenizing is a small part of the cost)."""

    def __call__(self, texts, context_length=77):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [hash(w) % 49000 + 1 for w in t.split()][:context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def _tokenizer(path: str | None):
    try:
        from dalle2.clip.tokenizer import get_tokenizer

        return get_tokenizer(path), "bpe"
    except Exception as exn:  # vocab not shipped yet, or module missing
        if path is not None:
            raise
        print(f"[bench] BPE tokenizer unavailable ({exn}); using a word-hash stand-in", file=sys.stderr)
        return _WordHashTokenizer(), "word-hash"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--urls", default=None, help="shard urls; default: synthetic shards in a temp dir")
    p.add_argument("--image-size", default="64", help="side in px, or a comma list (e.g. 64,256)")
    p.add_argument("--source-size", type=int, default=None, help="synthetic image size (default 2x --image-size)")
    p.add_argument("--workers", default="2", help="DataLoader workers, or a comma list (e.g. 0,1,2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)

    sizes = [int(x) for x in str(a.image_size).split(",")]
    workers = [int(x) for x in str(a.workers).split(",")]
    results = [run_one(a, size, k) for size in sizes for k in workers]
    result = results[0] if len(results) == 1 else {"results": results}
    return emit(result, a.out)


def run_one(a: argparse.Namespace, image_size: int, workers: int) -> dict:
    tmp = None
    urls = a.urls
    if urls is None:
        tmp = tempfile.TemporaryDirectory()
        n = max(1024, 4 * a.batch_size * max(1, workers))
        urls = write_shards(
            tmp.name, num_train=n, num_val=0, image_size=a.source_size or 2 * image_size, samples_per_shard=256
        )["train"]
    tok, tok_kind = _tokenizer(a.tokenizer_path)
    total = a.warmup + a.batches
    ds = make_dataset(
        urls,
        image_size=image_size,
        tokenizer=tok,
        train=True,
        batch_size=a.batch_size,
        epoch_size=total * a.batch_size,
        num_workers=workers,
        shuffle_buffer=500,
    )
    kw = {"prefetch_factor": 2} if workers > 0 else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, **kw)
    it = iter(loader)
    for _ in range(a.warmup):
        next(it)
    t0 = time.perf_counter()
    images = 0
    for _ in range(a.batches):
        images += len(next(it)["key"])
    dt = time.perf_counter() - t0
    result = {
        "images_per_s": images / dt,
        "seconds": dt,
        "images": images,
        "image_size": image_size,
        "source_size": None if a.urls else (a.source_size or 2 * image_size),
        "workers": workers,
        "batch_size": a.batch_size,
        "tokenizer": tok_kind,
        "urls": a.urls or "synthetic",
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"[bench] {image_size} px, {workers} workers: {result['images_per_s']:.0f} images/s", file=sys.stderr)
    del it, loader
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
