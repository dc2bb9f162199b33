"""Uploaded bytes -> a CLIP input tensor, with the format and the pixel count checked from the header before a single
pixel is decoded; generated tensors -> PIL images / PNG bytes.

A PNG of 13000 x 13000 black pixels is 164 KB on the wire and 0.2-2 GB once decoded: :func:`open_checked` reads
only the header (``Image.open`` is lazy) and refuses it at once.  JPEGs are decoded through ``draft()``: libjpeg's DCT
scaling decodes a 16 Mpx photo at 1/8 of its side when CLIP only needs ~224 px."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dalle2.imaging import to_uint8
from dalle2.serving.validation import APIError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_PIXELS = 4096 * 4096


def to_pil(images: Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] -> B RGB PIL images (rounded to 8 bits)."""
    arr = to_uint8(images).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _invalid(message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param="image", code=code)


def open_checked(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image's header only (nothing decoded yet): a PNG, JPEG or WebP of at most ``max_pixels`` pixels, else
    APIError 400 (``invalid_image``, ``invalid_image_format`` or ``image_too_large``)."""
    if not data:
        raise _invalid("image is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap comes next
        try:
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as e:  # PIL's own hard cap (2 x MAX_IMAGE_PIXELS), above ours
            raise _invalid(f"image is too large ({e})", "image_too_large") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            other = _format_name(data)
            if other is not None:
                raise _invalid(
                    f"images must be PNG, JPEG or WebP files; this one is {other}", "invalid_image_format"
                ) from None
            raise _invalid(f"image could not be decoded ({type(e).__name__}); send a PNG, JPEG or WebP file") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise _invalid(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise _invalid(
            f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels (max_image_pixels)", "image_too_large"
        )
    return img


def _format_name(data: bytes) -> str | None:
    """The format PIL would read ``data`` as (header only), for the error message; None if none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - only naming a format we refuse anyway
        return None


def load_image(data: bytes, side: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Uploaded PNG / JPEG / WebP bytes -> ``(3, side, side)`` in [0, 1]: RGB (alpha over white), centre crop to a
    square, bicubic resize.  Checked from the header first (:func:`open_checked`); not an image -> APIError 400."""
    img = open_checked(data, max_pixels=max_pixels)
    try:
        if img.format == "JPEG":
            img.draft(None, (side, side))  # decode at 1/2, 1/4 or 1/8 scale, never below side
        img.load()
        w, h = img.size
        s = min(w, h)
        if w != h:  # crop first: the pointwise conversions below then touch only the square
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
            del rgba
        img = img.convert("RGB")
        if s != side:
            img = img.resize((side, side), Image.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _invalid(f"image could not be decoded ({type(e).__name__}: {e}); send a PNG, JPEG or WebP file") from None
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def clip_side(pipeline) -> int:
    """The CLIP image tower's input side (uploads are resized to it, so requests of any size batch together)."""
    try:
        return int(pipeline.clip.image_size)
    except AttributeError:
        return int(pipeline.sizes[0])
