"""Checkpoints that run code when unpickled: a dict holding an object whose ``__reduce__`` calls ``os.system`` to
write a marker file.  Whoever loads one unsafely creates the marker; a safe loader refuses it and the marker never
appears."""

from __future__ import annotations

import io
import os
import pickle
import shlex
import zipfile
from pathlib import Path

import lightning as L
import torch

from dalle2.lit.checkpoints import STAGE_KEY


class Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def malicious_checkpoint(path, marker, *, stage: str | None = "clip") -> str:
    """A Lightning-looking ``.ckpt`` of ``stage`` whose unpickling runs ``touch marker``."""
    ckpt = {
        "state_dict": {"w": torch.zeros(2)},
        "hyper_parameters": {"network": {}},
        "payload": Payload(marker),
        "pytorch-lightning_version": L.__version__,
    }
    if stage is not None:
        ckpt[STAGE_KEY] = stage
    torch.save(ckpt, path)
    return str(path)


def malicious_torchscript(path, marker) -> str:
    """A TorchScript archive (zip with ``code/`` and ``constants.pkl``) whose ``data.pkl`` runs ``touch marker``."""
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"weight": Payload(marker)}, protocol=2)
            out.writestr(info, data)
    return str(path)


def assert_refused(message: str, path, marker) -> None:
    """The refusal names the file and the way to override it, on one line, and nothing ran."""
    assert not Path(marker).exists(), "the checkpoint's payload ran"
    lines = [line for line in str(message).splitlines() if str(path) in line and "trust_checkpoint=true" in line]
    assert lines, f"no one-line refusal naming {path} and trust_checkpoint=true in:\n{str(message)[-3000:]}"
