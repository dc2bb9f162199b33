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


def sharded_checkpoint(path, source=None, *, stage: str | None = "clip", extra: dict | None = None) -> Path:
    """A sharded checkpoint directory as ``trainer=fsdp`` writes one (Lightning's ``meta.pt``, DCP's ``.metadata``
    index and one ``__0_0.distcp`` shard), written in this process: from the ``.ckpt`` ``source`` (a loadable stage:
    its state_dict goes into the shard, the rest into ``meta.pt``) or, without one, a minimal ``stage`` checkpoint.
    ``extra``: more top-level entries of the shard (``{"state_dict": {...}}`` entries are merged in); a value that is
    not a tensor is stored as a byte entry (DCP pickles it with ``torch.save``)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if source is not None:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    else:
        ckpt = {"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": L.__version__}
        if stage is not None:
            ckpt[STAGE_KEY] = stage
    shard = {"state_dict": ckpt.pop("state_dict")}
    ckpt.pop("optimizer_states", None)
    for key, value in (extra or {}).items():
        shard[key] = {**shard[key], **value} if key == "state_dict" else value
    path.mkdir(parents=True)
    torch.save(ckpt, path / "meta.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp.save(shard, checkpoint_id=path, no_dist=True)
    return path


def malicious_sharded_checkpoint(path, marker, source=None, *, stage: str | None = "clip", entry="state_dict") -> str:
    """A sharded checkpoint directory whose ``.metadata`` holds nothing but DCP's own records (it passes the index
    allowlist) while its shard ``__0_0.distcp`` holds a byte entry whose unpickling runs ``touch marker``: under
    ``state_dict`` (what reading the weights loads) or, with ``entry="optimizer"``, as an optimizer's learning rate
    (what resuming loads)."""
    evil = Payload(marker)
    if entry == "state_dict":
        extra = {"state_dict": {"payload": evil}}
    else:
        extra = {"optimizer_0": {"state": {}, "param_groups": [{"lr": evil, "params": []}]}}
    return str(sharded_checkpoint(path, source, stage=stage, extra=extra))


def set_storage_paths(ckpt_dir, relative_path) -> None:
    """Rewrite every shard path in ``ckpt_dir/.metadata`` to ``relative_path`` (the index is ours: unpickled as is)."""
    index = Path(ckpt_dir) / ".metadata"
    metadata = pickle.loads(index.read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = str(relative_path)
    index.write_bytes(pickle.dumps(metadata))
