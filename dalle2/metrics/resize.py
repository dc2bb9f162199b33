"""The ONE image preprocessing of every FID, KID and precision/recall the project prints (``eval/coco_fid.py``,
``eval/evaluate.py task=samples``, the ``eval/sample.py`` sweeps, the demo): clean-fid's PIL bicubic, with a
shorter-side resize and centre crop.  :func:`fid_preprocessing` describes it; every metrics JSON carries that dict as
``preprocessing``.  Parity with clean-fid's own code: ``tests/test_fid_reference_parity.py``.

clean-fid (Parmar et al. 2022, ``cleanfid/resize.py``, mode ``"clean"``) resizes every image with
``make_resizer("PIL", quantize_after=False, "bicubic", (299, 299))``: each RGB channel becomes a float32 PIL image
(mode ``"F"``), is resized with ``Image.BICUBIC`` (PIL's resampler widens the kernel when it shrinks, so downsampling
is antialiased) and clipped to [0, 255], with no rounding to 8 bits; the Inception net then sees that 299x299 float
image.  clean-fid itself stretches any image to 299x299 (no crop).  The zero-shot COCO protocol (GLIDE, DALL-E 2,
Imagen) compares 256x256 images, so here:

1. :func:`resize_center_crop` (``size`` = 256): the image (converted to RGB as clean-fid does) is resized with the
   clean-fid channel-wise float bicubic so that its SHORTER side is ``size`` (the other side ``round(side * size /
   shorter)``), then centre-cropped (offset ``(new - size) // 2``) and rounded to uint8 (``np.rint``: half to even).
   Generated 256 px samples pass unchanged; real COCO images become the 8-bit 256x256 pictures a sample is.
2. :func:`inception_input`: clean-fid's own step, the 256x256 uint8 image to 299x299 float with the same resampler,
   scaled to [0, 1]; ``FIDInceptionV3`` skips its bilinear resize for 299 px input.

:func:`torch_bilinear_input` is the other common path (pytorch-fid, torchmetrics): ``F.interpolate(mode="bilinear")``
straight to 299 (torchmetrics >= 1.4 passes ``antialias=True``); kept for eval/fid_resize_gap.py's comparison.
"""

from __future__ import annotations

import io

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from dalle2.metrics.inception import FID_INPUT_SIZE

__all__ = [
    "RESIZE_DESCRIPTION",
    "fid_preprocessing",
    "fid_inputs",
    "decode_image",
    "clean_resize",
    "resize_center_crop",
    "inception_input",
    "torch_bilinear_input",
    "load_image",
]

RESIZE_DESCRIPTION = (
    "RGB; shorter side to {size} px then centre crop ((new - {size}) // 2), clean-fid's PIL bicubic on float32 "
    "channels (Image.BICUBIC, mode 'F', clipped to [0, 255]), rounded to uint8; then clean-fid's resize of the "
    "{size}x{size} uint8 image to 299x299 (same resampler, no rounding) as the Inception input, scaled to [0, 1]"
)


def clean_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W, 3) uint8 or float in [0, 255] -> (h, w, 3) float32 in [0, 255] for ``size = (w, h)``:
    clean-fid's ``make_resizer("PIL", False, "bicubic", size)`` (each channel a float32 PIL image, BICUBIC, clip)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    w, h = size
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32)).resize((w, h), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


def resize_center_crop(image: Image.Image | np.ndarray, size: int = 256) -> np.ndarray:
    """A PIL image (any mode) or (H, W, 3) uint8 array -> (size, size, 3) uint8: shorter side to ``size`` with
    :func:`clean_resize`, centre crop, rounding (see the module docstring).  An image already ``size`` x ``size``
    comes back unchanged."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        arr = np.rint(clean_resize(arr, (nw, nh))).astype(np.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size]).astype(np.uint8, copy=False)


def inception_input(image: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, 299, 299) float32 in [0, 1]: clean-fid's resize to the Inception input size."""
    x = clean_resize(image, (FID_INPUT_SIZE, FID_INPUT_SIZE)) if image.shape[:2] != (FID_INPUT_SIZE,) * 2 else image
    return torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def torch_bilinear_input(images: torch.Tensor, *, antialias: bool = False) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, 299, 299) float in [0, 1] by ``F.interpolate(mode="bilinear",
    align_corners=False)`` on the 8-bit values (pytorch-fid; torchmetrics' default adds ``antialias=True``)."""
    x = F.interpolate(
        images.float(), size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False, antialias=antialias
    )
    return (x / 255.0).clamp(0.0, 1.0)


def fid_preprocessing(image_size: int) -> dict:
    """What :func:`fid_inputs` does at ``image_size``, as the ``preprocessing`` entry of a metrics JSON."""
    size = int(image_size)
    return {
        "name": "clean-fid PIL bicubic, shorter side + centre crop (dalle2.metrics.resize.fid_inputs)",
        "library": f"Pillow {PIL.__version__}",
        "decode": "PIL, fully decoded (no JPEG draft mode), converted to RGB",
        "resize": f"shorter side to {size} px (other side round(side * {size} / shorter)), centre crop at "
        f"(new - {size}) // 2; PIL Image.BICUBIC on each channel as a float32 image (mode F), clipped to [0, 255]",
        "image_size": size,
        "quantisation": f"rounded to uint8 (np.rint, half to even) at {size} px, as a PNG sample is; no rounding after",
        "inception_input": "the uint8 image to 299x299 by clean-fid's make_resizer('PIL', False, 'bicubic', "
        "(299, 299)) (float32, no rounding), / 255 -> [0, 1]; FIDInceptionV3 maps it to [-1, 1]",
        "description": RESIZE_DESCRIPTION.format(size=size),
    }


def fid_inputs(image: Image.Image | np.ndarray, image_size: int, *, inception: bool = True) -> dict[str, torch.Tensor]:
    """A decoded image -> ``{"pixels": (3, S, S) uint8}`` (:func:`resize_center_crop`) and, with ``inception``,
    ``{"inception": (3, 299, 299) float32 in [0, 1]}`` (:func:`inception_input`): the preprocessing of
    :func:`fid_preprocessing`.  CLIP features and the checker read ``pixels``; the FID Inception reads
    ``inception``."""
    pixels = np.array(resize_center_crop(image, int(image_size)), dtype=np.uint8)  # a writable copy
    out = {"pixels": torch.from_numpy(pixels).permute(2, 0, 1).contiguous()}
    if inception:
        out["inception"] = inception_input(pixels)
    return out


def decode_image(data: bytes) -> Image.Image:
    """Image file bytes fully decoded, as RGB (what :func:`load_image` does for a path)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def load_image(path) -> Image.Image:
    """The image file at ``path`` fully decoded, as RGB (clean-fid: ``Image.open(path).convert("RGB")``)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")
