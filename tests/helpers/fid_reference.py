"""Test helpers for the FID path: an FID Inception with random weights whose features have real spread, and the
reference implementations the project is checked against (clean-fid's resizer, pytorch-fid's ``InceptionV3``).

The reference packages are test-only dependencies (pyproject's ``fid-reference`` extra, installed by ``make`` with
``--no-deps``): both declare torchvision, which must not be installed here (its wheel does not work beside this
torch, and pip would let it pull another torch).  clean-fid's ``cleanfid.resize`` imports only numpy, torch and PIL.
pytorch-fid's ``pytorch_fid.inception`` subclasses torchvision's ``Inception3`` blocks, so :func:`pytorch_fid_inception`
runs it in a subprocess on the real torchvision source: ``torchvision/models/inception.py`` (and the few pure-Python
modules it imports) read from the torchvision wheel that ``make`` downloads, never installs, into
``<venv>/share/fid-reference/``.  The package ``__init__`` files of ``torchvision`` and ``torchvision.models`` (which
load the compiled ops and every other model) are skipped by registering those two packages as bare module objects
over the wheel's folders; nothing is stubbed or copied.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from dalle2.metrics.inception import FIDInceptionV3

TORCHVISION_WHEEL_DIR = Path(sys.prefix) / "share" / "fid-reference"


def spread_inception(seed: int = 0) -> FIDInceptionV3:
    """FIDInceptionV3 with random weights whose pool3 features are O(1) and vary between images: He-normal
    convolutions (the default init shrinks them to ~1e-8 over 90 layers) and random batch-norm statistics and
    affine parameters (so that a wrong name mapping or a dropped batch norm would show)."""
    g = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
                m.bias.zero_()
    return net.eval().requires_grad_(False)


def torchvision_wheel() -> Path:
    """The torchvision wheel ``make`` downloads for its source (a clear error naming the fix when absent)."""
    wheels = sorted(TORCHVISION_WHEEL_DIR.glob("torchvision-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"no torchvision wheel in {TORCHVISION_WHEEL_DIR}: `make venv` downloads it (pip download --no-deps; "
            "it is read as source by the pytorch-fid parity test, never installed)"
        )
    return wheels[-1]


_PYTORCH_FID_RUNNER = r"""
import importlib, re, sys, types
from pathlib import Path

import torch

tv_root, weights, inputs, out = (Path(a) for a in sys.argv[1:5])
# torchvision's source without its package __init__ files (compiled ops, every other model): bare packages over the
# wheel's folders, then the real models/inception.py
tv = types.ModuleType("torchvision")
tv.__path__ = [str(tv_root)]
tv.__version__ = re.search(r"^__version__ = '([^']+)'", (tv_root / "version.py").read_text(), re.M).group(1)
models = types.ModuleType("torchvision.models")
models.__path__ = [str(tv_root / "models")]
sys.modules["torchvision"], sys.modules["torchvision.models"], tv.models = tv, models, models
inception = importlib.import_module("torchvision.models.inception")
models.inception, models.inception_v3 = inception, inception.inception_v3

import pytorch_fid.inception as pfi  # noqa: E402

state = torch.load(weights, weights_only=True)
pfi.load_state_dict_from_url = lambda url, progress=True: state  # the FID weights "download": our random weights
net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
x = torch.load(inputs, weights_only=True)
with torch.no_grad():
    feats = {name: net(t)[0].flatten(1) for name, t in x.items()}
torch.save({"features": feats, "state_dict": net.state_dict(), "torchvision": tv.__version__}, out)
"""


def pytorch_fid_features(weights: dict, inputs: dict, tmp_path: Path) -> dict:
    """pytorch-fid's ``InceptionV3`` (pool3, its own bilinear resize and [-1, 1] scaling) built by pytorch-fid's
    ``fid_inception_v3`` with ``weights`` as the FID weights file, run on each (B, 3, H, W) [0, 1] tensor of
    ``inputs`` in a subprocess -> ``{"features": {name: (B, 2048)}, "state_dict": its state dict, "torchvision"}``."""
    import subprocess
    import zipfile

    src = tmp_path / "torchvision_src"
    with zipfile.ZipFile(torchvision_wheel()) as wheel:
        wheel.extractall(src, [n for n in wheel.namelist() if n.startswith("torchvision/") and n.endswith(".py")])
    torch.save(weights, tmp_path / "weights.pth")
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "run_pytorch_fid.py").write_text(_PYTORCH_FID_RUNNER)
    proc = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "run_pytorch_fid.py"),
            str(src / "torchvision"),
            str(tmp_path / "weights.pth"),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pytorch-fid reference run failed:\n{proc.stderr[-3000:]}")
    return torch.load(tmp_path / "out.pt", weights_only=True)


class PixelProjection(nn.Module):
    """A cheap feature network with real spread, for end-to-end FID/KID/precision-recall tests: the Inception input
    (B, 3, 299, 299) in [0, 1] average-pooled to 16x16, then a fixed Gaussian projection to ``num_features``."""

    def __init__(self, num_features: int = 8, seed: int = 0):
        super().__init__()
        self.num_features = int(num_features)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 16 * 16, self.num_features, generator=g) / 16.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (299, 299):
            raise ValueError(f"expected the 299 px Inception input, got {tuple(x.shape)}")
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 16).flatten(1) @ self.proj


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The reference formula (pytorch-fid's): |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """KID's statistic on whole sets: unbiased MMD^2 with the kernel (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )
