"""The private torch APIs dalle2 uses (FSDP2's per-module state for forward methods, DCP's in-process reader and its
byte-entry hook) are checked when the feature starts: a torch newer than the one they were checked on, or one where
they changed shape, stops ``trainer=fsdp`` and sharded-checkpoint reading with a message saying what to do, instead of
running with APIs whose meaning may have changed."""

from __future__ import annotations

import pytest
import torch

from dalle2.torch_private import ALLOW_ENV, FEATURES, TESTED_UP_TO, UntestedTorchError, require, torch_version

NEWER = f"{TESTED_UP_TO[0]}.{TESTED_UP_TO[1] + 1}.0"


@pytest.fixture
def newer_torch(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.setattr(torch, "__version__", NEWER)


def test_the_installed_torch_has_every_private_api_as_used():
    assert torch_version() <= TESTED_UP_TO, "a torch newer than TESTED_UP_TO: run the checks, then raise it"
    for feature in FEATURES:
        require(feature)
    assert torch_version("2.14.0a0+git1234") == (2, 14) and torch_version("2.13.0+cpu") == (2, 13)


def test_fsdp_refuses_to_start_on_a_newer_torch(newer_torch):
    from dalle2.lit.fsdp import FSDP2Strategy

    with pytest.raises(UntestedTorchError) as info:
        FSDP2Strategy()
    msg = str(info.value)
    assert f"torch {NEWER} is newer than {TESTED_UP_TO[0]}.{TESTED_UP_TO[1]}" in msg
    assert "FSDPModule._get_fsdp_state" in msg and "_pre_forward" in msg
    assert f"torch<={TESTED_UP_TO[0]}.{TESTED_UP_TO[1]}.*" in msg and "TESTED_UP_TO" in msg and ALLOW_ENV in msg


def test_reading_a_sharded_checkpoint_refuses_a_newer_torch(newer_torch, tmp_path):
    import torch.distributed.checkpoint as dcp

    from dalle2.safe_load import read_dcp_state

    dcp.save({"w": torch.ones(3)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "ckpt")), no_dist=True)
    with pytest.raises(UntestedTorchError, match=r"dcp_read.*_load_state_dict"):
        read_dcp_state(tmp_path / "ckpt")


def test_the_override_runs_a_newer_torch_with_a_warning(newer_torch, monkeypatch, tmp_path):
    import torch.distributed.checkpoint as dcp

    from dalle2.safe_load import read_dcp_state

    monkeypatch.setenv(ALLOW_ENV, "1")
    dcp.save({"w": torch.ones(3)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "ckpt")), no_dist=True)
    with pytest.warns(UserWarning, match=f"{ALLOW_ENV}=1: running anyway"):
        state = read_dcp_state(tmp_path / "ckpt")
    torch.testing.assert_close(state["w"], torch.ones(3))


def test_a_changed_private_api_is_refused_even_with_the_override(monkeypatch):
    """Same name, other parameters: what a torch release may do to a private method; the override does not cover it."""
    from dalle2.lit.fsdp import FSDP2Strategy
    from dalle2.torch_private import _attr, _fsdp_state_path

    state_cls = _attr(_fsdp_state_path())
    monkeypatch.setattr(state_cls, "_pre_forward", lambda self, module, args: (args, {}))
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.raises(UntestedTorchError, match=r"_pre_forward: parameters \['self', 'module', 'args'\]"):
        FSDP2Strategy()
    monkeypatch.delattr("torch.distributed.checkpoint.filesystem._StorageInfo")
    with pytest.raises(UntestedTorchError, match="_StorageInfo: missing"):
        require("dcp_read")
