"""The project's one FID preprocessing and its FID Inception against the reference implementations' own code
(test-only dependencies, see tests/helpers/fid_reference.py): clean-fid's ``make_resizer("PIL", False, "bicubic",
(299, 299))`` gives the same floats as our resize; pytorch-fid's ``InceptionV3``, loaded with the same random
weights through its own ``fid_inception_v3``, gives the same pool3 features (within 1e-5)."""

from __future__ import annotations

import numpy as np
import torch
from cleanfid.resize import make_resizer
from PIL import Image

from dalle2.metrics.resize import clean_resize, fid_inputs, fid_preprocessing, inception_input, resize_center_crop
from dalle2.metrics.samples import SampleFiles
from helpers.fid_reference import pytorch_fid_features, spread_inception


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in [(32, 32), (64, 64), (48, 80), (300, 200), (256, 256), (17, 23)]:
        base = rng.integers(0, 256, 3)
        noise = rng.normal(0, 60, (h, w, 3))
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2)[..., None] * 90.0
        out.append(np.clip(base + noise + disc, 0, 255).astype(np.uint8))
    return out


def test_resize_equals_clean_fids_resizer():
    clean = make_resizer("PIL", False, "bicubic", (299, 299))
    for img in _images():
        ref = clean(img)  # clean-fid: float32 (299, 299, 3), clipped, not rounded
        np.testing.assert_array_equal(clean_resize(img, (299, 299)), ref)
        if img.shape[0] == img.shape[1]:  # a square image skips our crop: the Inception input is clean-fid's exactly
            size = img.shape[0]
            np.testing.assert_array_equal(
                inception_input(resize_center_crop(img, size)).permute(1, 2, 0).numpy(), ref / 255
            )
    # the shorter-side step uses the same resampler at another size (no clean-fid counterpart: it stretches)
    img = _images()[2]
    np.testing.assert_array_equal(clean_resize(img, (53, 32)), make_resizer("PIL", False, "bicubic", (53, 32))(img))


def test_sample_files_feed_the_inception_clean_fids_input(tmp_path):
    """A 64 px sample PNG as the evaluator reads it (SampleFiles) -> the Inception sees clean-fid's resize of it."""
    img = _images()[1]
    Image.fromarray(img).save(tmp_path / "00000.png")
    rows = [{"file": "00000.png", "prompt": "a red circle"}]
    [item] = list(SampleFiles(tmp_path, rows, image_size=64, inception=True))
    want = make_resizer("PIL", False, "bicubic", (299, 299))(np.asarray(Image.open(tmp_path / "00000.png")))
    np.testing.assert_array_equal(item["inception"].permute(1, 2, 0).numpy(), want / 255)
    np.testing.assert_array_equal(((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), img)
    got = fid_inputs(Image.open(tmp_path / "00000.png"), 64)
    assert torch.equal(got["inception"], item["inception"])
    pre = fid_preprocessing(64)
    assert pre["image_size"] == 64 and "Pillow" in pre["library"] and "uint8" in pre["quantisation"]
    assert "make_resizer('PIL', False, 'bicubic', (299, 299))" in pre["inception_input"]


def test_inception_features_equal_pytorch_fid_with_the_same_weights(tmp_path):
    net = spread_inception(seed=1)
    state = net.state_dict()
    g = torch.Generator().manual_seed(2)
    pictures = torch.stack([inception_input(resize_center_crop(img, 64)) for img in _images(3)[:2]])  # our path
    inputs = {"clean_299": pictures, "raw_64": torch.rand(1, 3, 64, 64, generator=g)}  # raw_64: both bilinear to 299
    ref = pytorch_fid_features(state, inputs, tmp_path)
    # the same weights landed in the same places: pytorch-fid groups the layers into blocks
    blocks = {
        "Conv2d_1a_3x3": "blocks.0.0",
        "Conv2d_2a_3x3": "blocks.0.1",
        "Conv2d_2b_3x3": "blocks.0.2",
        "Conv2d_3b_1x1": "blocks.1.0",
        "Conv2d_4a_3x3": "blocks.1.1",
        **{f"Mixed_{m}": f"blocks.2.{i}" for i, m in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"])},
        **{f"Mixed_{m}": f"blocks.3.{i}" for i, m in enumerate(["7a", "7b", "7c"])},
    }
    mapped = {
        blocks[k.split(".")[0]] + k[len(k.split(".")[0]) :]: v for k, v in state.items() if not k.startswith("fc.")
    }
    assert set(mapped) == set(ref["state_dict"])
    assert all(torch.equal(mapped[k], ref["state_dict"][k]) for k in mapped)
    for name, x in inputs.items():
        ours = net(x)
        assert ours.shape == ref["features"][name].shape == (len(x), 2048)
        assert float(ours.abs().mean()) > 0.1  # O(1) features (the default init gives ~1e-8: any match would pass)
        if len(x) > 1:
            assert float(ours.std(0).mean()) > 100 * 1e-5  # and the images differ by far more than the tolerance
        torch.testing.assert_close(ours, ref["features"][name], rtol=0, atol=1e-5, msg=name)


def test_the_parity_check_sees_a_wrong_network(monkeypatch):
    """The parity test can fail: either FID-specific detail of the network, changed, moves the features by far
    more than the tolerance."""
    import torch.nn.functional as F

    import dalle2.metrics.inception as inc

    net = spread_inception(seed=1)
    x = inception_input(resize_center_crop(_images(3)[0], 64))[None]
    good = net(x)
    net.Mixed_7c.pool = "avg"  # the last block max-pools in the FID graph
    assert (net(x) - good).abs().max() > 1e-3
    net.Mixed_7c.pool = "max"
    monkeypatch.setattr(inc, "_tf_avg_pool", lambda t: F.avg_pool2d(t, 3, stride=1, padding=1))  # counts the padding
    assert (net(x) - good).abs().max() > 1e-3
