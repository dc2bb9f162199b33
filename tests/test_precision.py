"""trainer.precision: bf16-mixed-if-native resolves to bf16 autocast only where the device computes bf16 natively;
train.py releases the process group before exit."""

from __future__ import annotations

import pytest
import torch

from dalle2.lit import precision
from dalle2.lit.precision import IF_NATIVE, resolve_precision


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", 32])
def test_lightning_precisions_pass_through(value):
    assert resolve_precision(value, "cpu") == value


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")]
)
def test_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(IF_NATIVE, "cpu") == expected
    assert resolve_precision(IF_NATIVE, "auto") == expected


def test_a_gpu_asks_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert resolve_precision(IF_NATIVE, "gpu") == expected
    assert precision.native_bf16("mps") is False


def test_release_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    """train.py's exit path: an orderly destroy (not static destructors at exit), harmless outside a distributed run."""
    import torch.distributed as dist

    from dalle2.lit.distributed import release_process_group

    release_process_group()  # none yet: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()
    release_process_group()


def test_every_entry_point_that_runs_a_trainer_releases_the_group_on_return_raise_and_exit(tmp_path):
    """The decorator releases on every way out; each script with a Lightning trainer wears it on its ``main``."""
    import re
    from pathlib import Path

    import torch.distributed as dist

    from dalle2.lit.distributed import releases_process_group

    def init(name):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / name}", rank=0, world_size=1)

    @releases_process_group
    def returns():
        init("a")
        return 7

    @releases_process_group
    def exits():
        init("b")
        raise SystemExit("error: refused")

    assert returns() == 7 and not dist.is_initialized()
    with pytest.raises(SystemExit):
        exits()
    assert not dist.is_initialized()

    root = Path(__file__).resolve().parent.parent
    scripts = [p for d in ("train", "eval") for p in sorted((root / d).glob("*.py"))]
    with_trainer = [p for p in scripts if re.search(r"instantiate\(\s*cfg\.trainer|Trainer\(", p.read_text())]
    assert len(with_trainer) >= 6, with_trainer  # train, precompute, sample, evaluate, zeroshot, coco_fid at least
    for p in with_trainer:
        text = p.read_text()
        assert re.search(r"@hydra\.main\([^\n]*\)\n@releases_process_group\ndef main", text), p.name


def test_the_logged_config_names_the_precision_that_ran():
    """bf16-mixed-if-native is resolved per machine: the hyperparameters a run logs say which precision it got."""
    import lightning as L
    from omegaconf import OmegaConf

    from dalle2.lit.precision import resolve_precision
    from helpers.scripts import load_script

    class Recorder:
        params = None

        def log_hyperparams(self, params):
            self.params = params

    train = load_script("train", "train")
    cfg = OmegaConf.create({"trainer": {"precision": "bf16-mixed-if-native", "accelerator": "cpu"}})
    resolved = resolve_precision("bf16-mixed-if-native", "cpu")
    trainer = L.Trainer(accelerator="cpu", precision=resolved, logger=False, enable_progress_bar=False)
    rec = Recorder()
    train.StartLoggers([rec], cfg).on_fit_start(trainer, None)
    assert rec.params["resolved_precision"] == resolved in ("bf16-mixed", "32-true")
    assert rec.params["trainer"]["precision"] == "bf16-mixed-if-native"  # what was asked stays as asked
