"""FID Inception-v3: the pt_inception-2015-12-05 key layout, strict save -> load round trip, forward shape, and
clear errors for files that are not those weights."""

from __future__ import annotations

import pytest
import torch

from dalle2.metrics.inception import FIDInceptionV3, InceptionWeightsError, load_fid_inception


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FIDInceptionV3()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that a load that skipped buffers would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_key_layout_is_the_fid_weights_file(model):
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 472  # 94 conv+bn units x 5 tensors + fc weight/bias
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.bias": (192,),
        "fc.weight": (1008, 2048),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


@pytest.mark.parametrize("with_nbt", [True, False])
def test_save_load_round_trip(model, tmp_path, with_nbt):
    sd = model.state_dict()
    if not with_nbt:  # the published file may or may not carry num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    loaded = load_fid_inception(path)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    loaded.train()  # a Trainer may ask: batch norm must keep using the stored statistics
    assert not loaded.training


def test_forward_shape_and_input_scaling(model):
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average of ReLU outputs
    u8 = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model.preprocess(u8), model.preprocess(u8.float() / 255))
    pre = model.preprocess(torch.ones(1, 3, 299, 299))
    assert pre.shape == (1, 3, 299, 299) and torch.all(pre == 1.0)  # [0, 1] -> [-1, 1]
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.rand(2, 1, 32, 32))


def test_wrong_files_are_clear_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="FID Inception weights not found: .*nope.pth"):
        load_fid_inception(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(InceptionWeightsError, match="could not be read as a torch state dict"):
        load_fid_inception(junk)
    other = tmp_path / "other.pth"
    torch.save({"visual.conv1.weight": torch.zeros(3), "text.proj": torch.zeros(2)}, other)
    with pytest.raises(InceptionWeightsError, match=r"does not hold the FID Inception weights.*472 missing keys"):
        load_fid_inception(other)
    listy = tmp_path / "list.pth"
    torch.save([1, 2, 3], listy)
    with pytest.raises(InceptionWeightsError, match="not an Inception state dict"):
        load_fid_inception(listy)
    sd = dict(model.state_dict())
    sd["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet Inception, not the FID one
    sd["fc.bias"] = torch.zeros(1000)
    bad = tmp_path / "bad_shape.pth"
    torch.save(sd, bad)
    with pytest.raises(InceptionWeightsError, match=r"wrong shape.*fc.weight \(1000, 2048\) != \(1008, 2048\)"):
        load_fid_inception(bad)
