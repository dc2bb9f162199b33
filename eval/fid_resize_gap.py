"""How much the resize protocol moves FID, measured on the built-in synthetic pictures (docs/evaluation.md).

    python eval/fid_resize_gap.py --image-size 64 --num 128 [--inception pt_inception-2015-12-05-6726825d.pth] \
        --out runs/eval/fid_resize_gap_64.json

Renders 2 x ``num`` built-in pictures (``dalle2.data.synthetic``, lossless) at ``image-size``: halves A and B, and B
re-encoded as JPEG (quality ``--jpeg-quality``).  Each set goes to the Inception input by two protocols:

- ``clean``: :func:`dalle2.metrics.resize.resize_center_crop` to 256 then :func:`inception_input` (clean-fid's PIL
  bicubic on float channels, the protocol of eval/coco_fid.py);
- ``bilinear``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` for the shorter side to 256,
  the same centre crop and 8-bit rounding, then ``F.interpolate`` bilinear to 299 (pytorch-fid's resize; what a
  torch pipeline feeding torchmetrics usually does).

and prints FID(A, B), FID(A, B-JPEG) under each, and with A and B under different protocols (reference statistics
made one way, samples the other).  Without ``--inception`` the network is a randomly initialised FIDInceptionV3
(He-normal convolutions, seed ``--seed``): the FID values are then NOT comparable with published ones, only with
each other.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.synthetic import render, sample_attributes  # noqa: E402
from dalle2.io import write_json_atomic  # noqa: E402
from dalle2.metrics.fid import frechet_distance  # noqa: E402
from dalle2.metrics.inception import FIDInceptionV3, load_fid_inception  # noqa: E402
from dalle2.metrics.resize import inception_input, resize_center_crop, torch_bilinear_input  # noqa: E402

SIZE = 256


def renders(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render(sample_attributes(rng), size, rng) for _ in range(n)]


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def clean(img: np.ndarray) -> torch.Tensor:
    return inception_input(resize_center_crop(img, SIZE))


def bilinear(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    nh, nw = max(SIZE, round(h * SIZE / min(h, w))), max(SIZE, round(w * SIZE / min(h, w)))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
    x = x[..., top : top + SIZE, left : left + SIZE].round().clamp(0, 255).to(torch.uint8)
    return torch_bilinear_input(x)[0]


@torch.no_grad()
def features(net: nn.Module, images: list[np.ndarray], prep, batch: int = 16) -> torch.Tensor:
    out = []
    for s in range(0, len(images), batch):
        out.append(net(torch.stack([prep(im) for im in images[s : s + batch]])))
    return torch.cat(out)


def random_inception(seed: int) -> FIDInceptionV3:
    """FIDInceptionV3 with He-normal convolutions (the default init shrinks activations to ~1e-9 over 90 layers)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return net.eval().requires_grad_(False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num", type=int, default=128, help="images per half")
    p.add_argument("--jpeg-quality", type=int, default=75)
    p.add_argument("--inception", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    t0 = time.time()
    net = load_fid_inception(a.inception) if a.inception else random_inception(a.seed)
    imgs = renders(2 * a.num, a.image_size, a.seed)
    sets = {"A": imgs[: a.num], "B": imgs[a.num :]}
    sets["B_jpeg"] = [jpeg(im, a.jpeg_quality) for im in sets["B"]]
    feats = {
        (name, proto): features(net, ims, prep)
        for name, ims in sets.items()
        for proto, prep in (("clean", clean), ("bilinear", bilinear))
    }
    fid = {
        "A_vs_B": {p_: frechet_distance(feats["A", p_], feats["B", p_]) for p_ in ("clean", "bilinear")},
        "A_vs_B_jpeg": {p_: frechet_distance(feats["A", p_], feats["B_jpeg", p_]) for p_ in ("clean", "bilinear")},
        "A_clean_vs_B_bilinear": frechet_distance(feats["A", "clean"], feats["B", "bilinear"]),
        "A_clean_vs_A_bilinear": frechet_distance(feats["A", "clean"], feats["A", "bilinear"]),
    }
    res = {
        "image_size": a.image_size,
        "num_per_set": a.num,
        "jpeg_quality": a.jpeg_quality,
        "seed": a.seed,
        "inception": a.inception or f"random init (He-normal convs, seed {a.seed})",
        "fid": fid,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(res, indent=2))
    if a.out:
        write_json_atomic(a.out, res)
    return res


if __name__ == "__main__":
    main()
