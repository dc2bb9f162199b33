"""The strict checker (dalle2.data.synthetic.strict_verdicts): clean renders pass, JPEG mostly, shuffled prompts at
chance, skewed / blurred / two-object / border-cut pictures are rejected, for the reason they are wrong."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dalle2.data.checker_calibration import calibration_images, calibration_table, draw_scene
from dalle2.data.synthetic import STRICT_IOU_THRESHOLD, check_images, render, strict_verdicts

N = 48


@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_pass_and_the_fit_finds_the_drawn_shape(size):
    images, attrs = calibration_images("clean", N, size, seed=1)
    v = strict_verdicts(images, attrs)
    assert v["ok"].all(), v["iou"].min()
    assert (v["num_objects"] == 1).all() and not v["touches_border"].any()
    assert np.quantile(v["iou"], 0.05) > STRICT_IOU_THRESHOLD + 0.05  # a margin, not a scrape
    # the fitted centre lands on the object: left / centre / right in the prompted third
    cx = v["fit"][:, 0] / size
    want = np.array([{"left": 0.27, "center": 0.5, "right": 0.73}[a["position"]] for a in attrs])
    assert np.abs(cx - want).max() < 0.05


@pytest.mark.parametrize("size", [32, 64])
def test_jpeg_and_noise_mostly_pass(size):
    for case, floor in (("jpeg95", 0.88), ("noise", 0.95)):
        images, attrs = calibration_images(case, N, size, seed=2)
        assert strict_verdicts(images, attrs)["ok"].mean() >= floor, case


@pytest.mark.parametrize("size", [32, 64])
def test_shuffled_prompts_pass_only_when_the_shape_happens_to_match(size):
    images, attrs = calibration_images("shuffled", 2 * N, size, seed=3)
    clean, drawn = calibration_images("clean", 2 * N, size, seed=3)  # same draws before the shuffle
    assert (clean == images).all()
    v = strict_verdicts(images, attrs)
    rng_same = np.array([a["shape"] == d["shape"] for a, d in zip(attrs, drawn)])
    assert v["ok"][~rng_same].sum() == 0  # no wrong kind of shape passes (circle vs square is the close call)
    assert v["ok"].mean() == pytest.approx(rng_same.mean(), abs=0.03)  # = chance
    assert 0.1 < rng_same.mean() < 0.45


@pytest.mark.parametrize("size", [32, 64])
def test_distorted_pictures_are_rejected_for_their_fault(size):
    for case in ("skew", "blur", "two_objects", "cut_by_border"):
        images, attrs = calibration_images(case, N, size, seed=4)
        v = strict_verdicts(images, attrs)
        assert v["ok"].mean() <= 0.05, (case, v["ok"].mean())
        lenient = check_images(images, attrs)["accuracy/shape"]
        if case == "two_objects":
            assert (v["num_objects"] == 2).mean() > 0.95
            assert lenient > 0.9  # the lenient reader looks at the largest object only: it passes these
        elif case == "cut_by_border":
            assert v["touches_border"].all()
        else:
            assert (v["iou"] < STRICT_IOU_THRESHOLD).mean() > 0.95


def test_a_little_rotation_is_allowed_a_wrong_kind_is_not():
    bg, fg = (128, 128, 128), (225, 35, 35)
    square = draw_scene(64, bg, [{"shape": "square", "color": fg, "cx": 32.3, "cy": 31.6, "r": 12.0, "angle": 11.0}])
    circle = draw_scene(64, bg, [{"shape": "circle", "color": fg, "cx": 30.0, "cy": 33.0, "r": 12.0}])
    attrs = {"color": "red", "background": "gray", "size": "large", "position": "center"}
    v = strict_verdicts(
        np.stack([square, circle, square, circle]),
        [{**attrs, "shape": s} for s in ("square", "circle", "circle", "square")],
    )
    assert v["ok"].tolist() == [True, True, False, False]
    assert abs(abs(v["fit"][0, 3]) - 11.0) <= 3.0  # the angle found
    assert v["iou"][2] > 0.7 and v["iou"][3] > 0.7  # close calls, still below the bar


def test_blank_pictures_and_missing_shape_attribute():
    blank = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    v = strict_verdicts(blank, [{"shape": "circle"}, {}])
    assert v["num_objects"].tolist() == [0, 0] and not v["ok"].any() and (v["iou"] == 0).all()
    # without a shape attribute: the best ideal shape of any kind
    img = render({"shape": "cross", "color": "blue", "background": "white", "size": "large", "position": "left"}, 64)
    assert strict_verdicts(img[None], [{}])["ok"].all()


def test_check_images_strict_keys_and_float_input():
    images, attrs = calibration_images("clean", 16, 32, seed=5)
    lenient = check_images(images, attrs)
    assert not any(k.startswith("strict/") for k in lenient)  # today's keys, unchanged
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    both = check_images(x, attrs, strict=True)
    assert {k: v for k, v in both.items() if k.startswith("accuracy/")} == lenient
    assert both["strict/accuracy"] == 1.0 and both["strict/all"] == 1.0 and both["strict/one_object"] == 1.0
    assert both["strict/inside"] == 1.0 and 0.9 < both["strict/iou_mean"] <= 1.0
    # a stricter bar lowers the score: the threshold is honoured
    assert check_images(x, attrs, strict=True, threshold=0.999)["strict/accuracy"] < 1.0


def test_scoring_512_pictures_takes_seconds():
    images, attrs = calibration_images("clean", 512, 64, seed=6)  # the rendering is not timed
    t0 = time.process_time()
    strict_verdicts(images, attrs)
    assert time.process_time() - t0 < 30.0  # ~2-4 s of CPU on one core when measured


def test_calibration_table_rows():
    rows = calibration_table(sizes=(32,), n=8, cases=("clean", "two_objects"))
    assert [(r["case"], r["image_size"]) for r in rows] == [("clean", 32), ("two_objects", 32)]
    assert rows[0]["strict/accuracy"] == 1.0 and rows[1]["strict/accuracy"] == 0.0
    assert rows[1]["accuracy/shape"] > 0.5  # the lenient reader is fooled
    with pytest.raises(ValueError, match="unknown calibration case"):
        calibration_images("smudge", 2, 32)


def test_a_speck_on_the_border_is_not_an_object_touching_it():
    """Generated pictures often carry a stray off-colour pixel or two on the frame: that is no object cut by the
    border (an object is a part larger than 0.3 % of the picture); a real object reaching the frame is."""
    images, attrs = calibration_images("clean", 8, 64, seed=7)
    far = np.where(images[:, :1, :1].mean(axis=-1, keepdims=True) < 100, 255, 0).astype(np.uint8)  # off the bg
    specked = images.copy()
    specked[:, 0:1, 5:7] = far  # 2 px on the top edge
    v = strict_verdicts(specked, attrs)
    assert not v["touches_border"].any() and v["ok"].all()
    blob = images.copy()
    blob[:, 0:4, 0:5] = far  # 20 px in a corner
    v = strict_verdicts(blob, attrs)
    assert v["touches_border"].all() and (v["num_objects"] == 2).all() and not v["ok"].any()
