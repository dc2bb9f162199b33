"""The private torch APIs dalle2 relies on, and the startup check that they still are what they were.

torch promises nothing about underscore names: a release may remove one (an ``AttributeError`` deep in a run) or,
worse, keep the name and change what it does. Two features need them:

* ``"fsdp_forward_method"`` (``trainer=fsdp``, :mod:`dalle2.lit.fsdp`): ``FSDPModule._get_fsdp_state()`` and the
  state's ``_pre_forward(module, args, kwargs)`` / ``_post_forward(module, input, output)`` gather a sharded
  network's root parameters around its methods other than ``forward`` (CLIP's ``encode_text``, ...), and skip that
  when the method runs inside ``forward`` (where torch's public ``register_fsdp_forward_method`` would reshard
  mid-forward).
* ``"dcp_read"`` (reading a sharded checkpoint directory in one process, :mod:`dalle2.safe_load`):
  ``state_dict_loader._load_state_dict(..., planner=, no_dist=)``, ``default_planner._EmptyStateDictLoadPlanner
  (keys=)`` whose ``load_bytes(read_item, value)`` is where a byte entry is unpickled (overridden there to unpickle
  weights-only: if torch stopped calling it, a shard could run code again), and ``filesystem._StorageInfo``
  (``relative_path``, ``offset``, ``length``: checked to stay inside the directory).

:func:`require` runs when such a feature starts (``FSDP2Strategy()``, a sharded checkpoint read). It checks that each
API exists with the parameters it had, and that torch is not newer than :data:`TESTED_UP_TO`, the newest release
these were checked on (tests/test_fsdp.py, tests/test_safe_load.py, tests/test_torch_private.py). Otherwise it
raises :class:`UntestedTorchError` saying what to do: pin ``torch<=`` that release, or run those tests on the new
torch and raise :data:`TESTED_UP_TO`; ``DALLE2_UNTESTED_TORCH=1`` runs anyway (with a warning) where the APIs are
present.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import warnings
from collections.abc import Callable

import torch

__all__ = ["ALLOW_ENV", "FEATURES", "TESTED_UP_TO", "UntestedTorchError", "require", "torch_version"]

TESTED_UP_TO = (2, 13)  # the newest torch (major, minor) the private APIs below were checked on
ALLOW_ENV = "DALLE2_UNTESTED_TORCH"
_CHECKS = "tests/test_fsdp.py, tests/test_safe_load.py and tests/test_torch_private.py"


class UntestedTorchError(RuntimeError):
    """The installed torch is newer than the one dalle2's private-API uses were checked on, or one has changed."""


def torch_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the installed torch), e.g. ``"2.14.0a0+git1234"`` -> ``(2, 14)``."""
    m = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    if m is None:
        raise UntestedTorchError(f"cannot read the torch version {version or torch.__version__!r}")
    return int(m.group(1)), int(m.group(2))


def _attr(path: str):
    """The object at the dotted ``path`` (``module.Class.attr``), importing the longest module prefix."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _has_params(*names: str) -> Callable[[object], str | None]:
    def check(fn) -> str | None:
        params = list(inspect.signature(fn).parameters)
        missing = [n for n in names if n not in params]
        return f"parameters {params}, expected {list(names)}" if missing else None

    return check


def _fields(*names: str) -> Callable[[object], str | None]:
    def check(cls) -> str | None:
        have = set(getattr(cls, "__dataclass_fields__", {}))
        missing = [n for n in names if n not in have]
        return f"fields {sorted(have)}, expected {list(names)}" if missing else None

    return check


def _fsdp_state_path() -> str:
    # where FSDP2's per-module state class lives (torch >= 2.6; before, under torch.distributed._composable.fsdp)
    for path in (
        "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState",
        "torch.distributed._composable.fsdp._fsdp_state.FSDPState",
    ):
        try:
            _attr(path)
            return path
        except (ImportError, AttributeError):
            pass
    return "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState"


# feature -> [(dotted path, check of the object or None)]: what each feature calls, and the shape it relies on
FEATURES: dict[str, list[tuple[str | Callable[[], str], Callable[[object], str | None] | None]]] = {
    "fsdp_forward_method": [
        ("torch.distributed.fsdp.FSDPModule._get_fsdp_state", _has_params("self")),
        (lambda: _fsdp_state_path() + "._pre_forward", _has_params("self", "module", "args", "kwargs")),
        (lambda: _fsdp_state_path() + "._post_forward", _has_params("self", "module", "input", "output")),
    ],
    "dcp_read": [
        (
            "torch.distributed.checkpoint.state_dict_loader._load_state_dict",
            _has_params("state_dict", "storage_reader", "planner", "no_dist"),
        ),
        ("torch.distributed.checkpoint.default_planner._EmptyStateDictLoadPlanner", _has_params("keys")),
        (
            "torch.distributed.checkpoint.default_planner._EmptyStateDictLoadPlanner.load_bytes",
            _has_params("self", "read_item", "value"),
        ),
        ("torch.distributed.checkpoint.filesystem._StorageInfo", _fields("relative_path", "offset", "length")),
    ],
}


def _problems(feature: str) -> list[str]:
    out = []
    for path, check in FEATURES[feature]:
        path = path() if callable(path) else path
        try:
            obj = _attr(path)
        except (ImportError, AttributeError):
            out.append(f"{path}: missing")
            continue
        why = check(obj) if check is not None else None
        if why:
            out.append(f"{path}: {why}")
    return out


def require(feature: str, *, version: str | None = None) -> None:
    """Check the private torch APIs ``feature`` (a key of :data:`FEATURES`) uses: raise :class:`UntestedTorchError`
    if one is missing or changed shape, or if torch (``version``: the installed one) is newer than
    :data:`TESTED_UP_TO` — unless ``DALLE2_UNTESTED_TORCH=1`` (then a warning, if the APIs are all there)."""
    if feature not in FEATURES:
        raise KeyError(f"unknown feature {feature!r}; expected one of {sorted(FEATURES)}")
    installed = version or torch.__version__
    problems = _problems(feature)
    tested = ".".join(map(str, TESTED_UP_TO))
    newer = torch_version(installed) > TESTED_UP_TO
    if not problems and not newer:
        return
    names = ", ".join(p() if callable(p) else p for p, _ in FEATURES[feature])
    what = (
        f"these private torch APIs changed on torch {installed}: {'; '.join(problems)}"
        if problems
        else f"torch {installed} is newer than {tested}, the newest release they were checked on"
    )
    msg = (
        f"dalle2's {feature} relies on private torch APIs ({names}), which torch may change without notice; {what}. "
        f"Install torch<={tested}.*, or run {_CHECKS} on this torch and, if they pass, raise TESTED_UP_TO in "
        f"dalle2/torch_private.py"
    )
    if not problems and os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{msg} ({ALLOW_ENV}=1: running anyway)", stacklevel=2)
        return
    raise UntestedTorchError(msg + (f"; {ALLOW_ENV}=1 runs anyway at your own risk" if not problems else ""))
