"""Reading weight files without running code.

* :func:`torch_load` — ``torch.load(..., weights_only=True)``: torch's restricted unpickler builds tensors, plain
  containers and numbers, nothing else.  A file that names anything more (``os.system`` in a ``__reduce__``, any class
  of its own) is refused with :class:`UntrustedCheckpointError`: one line naming the file, what it would have called,
  and ``trust_checkpoint=true`` — the explicit (warned) way to unpickle it anyway.
* :func:`read_dcp_metadata` — the ``.metadata`` index of a sharded (torch.distributed.checkpoint) checkpoint
  directory, which torch itself unpickles with no restriction: here only DCP's own metadata records, ``torch.Size``,
  dtypes and paths may be built, and every shard file it names must lie inside the directory.
  :func:`read_dcp_state` then reads the shards through it: tensors as torch does, byte entries (any non-tensor value,
  which torch's planner unpickles with ``weights_only=False``) with the weights-only unpickler;
  :func:`check_dcp_checkpoint` reads all of that but the tensors (train.py, before it builds anything);
  :func:`load_dcp_into` is ``torch.distributed.checkpoint.load`` into a (sharded) state dict with the same reader and
  planner (Lightning's resume under ``FSDP2Strategy``).
* :func:`read_torchscript_state_dict` — the tensors of a TorchScript archive (OpenAI's CLIP ``.pt`` files) without
  ``torch.jit.load``, which would run the archive's code: ``data.pkl`` goes through the same weights-only unpickler,
  TorchScript's own classes (``__torch__.*``) become inert attribute records, and the tensors' bytes are read from
  the zip.

Needs torch >= 2.6: earlier ``weights_only=True`` could be bypassed (CVE-2025-32434).  Imports torch only, so every
package may use it.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from dalle2.torch_private import require as require_private_torch

__all__ = [
    "TRUST_HINT",
    "UntrustedCheckpointError",
    "check_dcp_checkpoint",
    "is_torchscript_archive",
    "load_dcp_into",
    "read_dcp_metadata",
    "read_dcp_state",
    "read_torchscript_state_dict",
    "refusal",
    "torch_load",
    "warn_trusted",
]

TRUST_HINT = "trust_checkpoint=true"
MIN_TORCH = (2, 6)


class UntrustedCheckpointError(ValueError):
    """Loading this file would run code (or build objects beyond weights); refused unless it is trusted."""


def refusal(path, why: str) -> UntrustedCheckpointError:
    """The one-line error for a file that cannot be read without running code."""
    why = " ".join(str(why).split())
    return UntrustedCheckpointError(
        f"{path}: refused to load: {why}; if you trust where this file came from, pass {TRUST_HINT} "
        "(or share the weights as safetensors: python -m dalle2.export)"
    )


def warn_trusted(path, what: str = "unpickling it with weights_only=False") -> None:
    warnings.warn(f"{path}: {TRUST_HINT}: {what} runs whatever code the file holds", UserWarning, stacklevel=3)


def _check_torch() -> None:
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_TORCH:
        raise RuntimeError(
            f"torch {torch.__version__}: weights-only loading can be bypassed before torch 2.6 "
            "(CVE-2025-32434); install torch>=2.6 to load checkpoints safely"
        )


def is_torchscript_archive(path) -> bool:
    """A zip written by ``torch.jit.save`` (it holds ``constants.pkl`` / ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _weights_only_reason(exc: BaseException) -> str:
    """The informative part of torch's long 'Weights only load failed' message."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, flags=re.S)
    reason = m.group(1) if m else text
    reason = " ".join(reason.split()) or type(exc).__name__
    return reason.split(" was not an allowed global")[0].split(". Please use")[0].strip()


# what the weights-only unpickler says when a pickle asks for code or objects (not a corrupt or foreign file)
_CODE_WORDS = re.compile(r"global|reduce|build|new object|blocked|persistent", re.IGNORECASE)


def _load_weights_only(f, where, *, entry: str | None = None, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(f, weights_only=True)`` with its failures as our one-line errors naming ``where`` (the file) and
    ``entry`` (a byte entry inside it, for a DCP shard)."""
    it = f"its entry {entry!r}" if entry else "it"
    try:
        return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:
            if hasattr(f, "seek"):
                f.seek(0)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f if hasattr(f, "read") else str(f))
        except Exception:  # noqa: BLE001 - legacy (non-zip) files: fall back to torch's own message
            names = []
        reason = _weights_only_reason(e)
        if names:
            more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
            what = "unpickling it" if entry is None else f"unpickling {it}"
            raise refusal(where, f"{what} would call or build {', '.join(names[:4])}{more}") from None
        if _CODE_WORDS.search(reason):
            raise refusal(where, f"{it} holds more than weights ({reason})") from None
        raise ValueError(f"{where}: {_unreadable(entry)} ({reason})") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{where}: {_unreadable(entry)} ({type(e).__name__}: {first})") from None


def _unreadable(entry: str | None) -> str:
    return "not a readable torch checkpoint" if entry is None else f"its entry {entry!r} is not readable"


def torch_load(path, *, trust_checkpoint: bool = False, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """``torch.load`` that never runs code unless ``trust_checkpoint``.

    ``mmap`` (default: for zip-format files) maps the tensors instead of reading them into memory.  Raises
    ``FileNotFoundError``, :class:`UntrustedCheckpointError` (pickled code or objects, a TorchScript archive), or
    ``ValueError`` for a file torch cannot read at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if mmap is None:
        mmap = zipfile.is_zipfile(path)
    if trust_checkpoint:
        warn_trusted(path)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    _check_torch()
    if is_torchscript_archive(path):
        raise refusal(path, "it is a TorchScript archive (torch.jit.load runs its code), not a pickled checkpoint")
    return _load_weights_only(path, path, map_location=map_location, mmap=mmap)


# -- sharded (DCP) checkpoint directories ---------------------------------------------------------------------

_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},  # a layout by its name (torch.strided)
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if name in _DCP_GLOBALS.get(module, ()):
            obj = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return obj


def read_dcp_metadata(path, *, trust_checkpoint: bool = False):
    """The ``Metadata`` of the DCP checkpoint directory ``path`` (its ``.metadata`` file), unpickled with nothing but
    DCP's metadata records allowed; anything else is an :class:`UntrustedCheckpointError` (unless trusted).  Every
    shard file it names must lie inside ``path`` (no ``..``, absolute path or symlink leading out: refused) and exist
    (``FileNotFoundError``)."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401 - the classes the allowlist names

    file = Path(path) / ".metadata"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a sharded checkpoint (no .metadata)")
    with open(file, "rb") as f:
        if trust_checkpoint:
            warn_trusted(file)
            return pickle.load(f)
        try:
            metadata = _DCPMetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise refusal(file, f"unpickling it would call or build {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{file}: not a readable checkpoint index ({type(e).__name__}: {e})") from None
    _check_dcp_storage(Path(path), metadata)
    return metadata


def _check_dcp_storage(path: Path, metadata) -> None:
    """The index is DCP's ``Metadata``, and every shard it names is a file inside ``path``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    file = path / ".metadata"
    storage = getattr(metadata, "storage_data", None)
    if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)):
        raise ValueError(f"{file}: not a checkpoint index (a {type(metadata).__name__})")
    if not isinstance(storage, dict):
        raise ValueError(f"{file}: not a checkpoint index (its storage_data is a {type(storage).__name__})")
    root, checked = path.resolve(), set()
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not (isinstance(info, _StorageInfo) and isinstance(rel, str) and rel):
            raise ValueError(f"{file}: not a checkpoint index (a shard entry {info!r})")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise ValueError(f"{file}: a shard entry with offset {info.offset!r}, length {info.length!r}")
        if rel in checked:
            continue
        checked.add(rel)
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or target == root:
            raise refusal(
                path / rel, f"this shard file lies outside the checkpoint directory {root} (it resolves to {target})"
            )
        if not target.is_file():
            raise FileNotFoundError(f"{path / rel}: a shard file of this checkpoint is missing (named by {file})")


def check_dcp_checkpoint(path, *, trust_checkpoint: bool = False):
    """Everything that reading or resuming from the DCP checkpoint directory ``path`` would unpickle, read safely
    without its tensors: the index (:func:`read_dcp_metadata`) and every byte entry of the shards (a non-tensor value,
    which torch's own planner unpickles with ``weights_only=False``: here the weights-only unpickler).  Returns the
    ``Metadata``.  Run it before handing the directory to anything that reads it with torch's planner (Lightning's
    resume)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(path, trust_checkpoint=trust_checkpoint)
    entries = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    if entries and not trust_checkpoint:
        _read_dcp(Path(path), metadata, entries, trust_checkpoint=False)
    return metadata


def read_dcp_state(path, keys: set[str] | None = None, *, trust_checkpoint: bool = False) -> dict:
    """The tensors (and other entries) of the DCP checkpoint directory ``path`` as one nested dict, in this process
    (no process group), optionally only the top-level ``keys``; the index is read by :func:`read_dcp_metadata`, the
    byte entries (non-tensor values) with the weights-only unpickler — both with no restriction if
    ``trust_checkpoint`` (torch's own behaviour)."""
    path = Path(path)
    metadata = read_dcp_metadata(path, trust_checkpoint=trust_checkpoint)
    return _read_dcp(path, metadata, keys, trust_checkpoint=trust_checkpoint)


def load_dcp_into(state: dict, path, *, trust_checkpoint: bool = False) -> None:
    """``torch.distributed.checkpoint.load(state, checkpoint_id=path)`` — ``state``'s tensors (DTensors too) filled in
    place from the DCP checkpoint directory ``path``, its other entries replaced, collectively over the default process
    group when there is one — with the index read by :func:`read_dcp_metadata` and every byte entry with the
    weights-only unpickler (torch's own reader, unrestricted, when ``trust_checkpoint``). What resuming a sharded run
    reads through (:class:`dalle2.lit.fsdp.FSDP2Strategy`), so that Lightning's resume is no second, unchecked read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    path = Path(path)
    if trust_checkpoint:
        warn_trusted(path, "reading its shards with torch's own reader")
        dcp.load(state, checkpoint_id=str(path))
        return
    require_private_torch("dcp_read")  # the planner's load_bytes hook: still where byte entries are unpickled
    reader = _safe_reader(path)
    _raise_from_dcp(
        path, reader, lambda: dcp.load(state, storage_reader=reader, planner=_planner(DefaultLoadPlanner, path)())
    )


def _safe_reader(path: Path, metadata=None):
    """A ``FileSystemReader`` of ``path`` whose index is ``metadata`` or, read when DCP asks (on every rank, inside
    its collective: a refusal reaches every rank), :func:`read_dcp_metadata`'s."""
    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        error: Exception | None = None  # why the index was refused (DCP reports it only as text)

        def read_metadata(self, *args, **kwargs):
            try:
                found = metadata if metadata is not None else read_dcp_metadata(path)
            except Exception as e:
                self.error = e
                raise
            if getattr(found, "storage_meta", None) is not None:
                found.storage_meta.load_id = self.load_id
            return found

    return _Reader(str(path))


def _planner(base, path: Path):
    """``base`` (a DCP load planner class) whose byte entries are unpickled weights-only: torch's planner uses
    ``weights_only=False``; here the planner gets a re-pickle of what the weights-only unpickler built (plain values
    and tensors), never the file's own bytes."""

    class _WeightsOnlyPlanner(base):
        def load_bytes(self, read_item, value) -> None:
            info = self.metadata.storage_data[read_item.storage_index]
            obj = _load_weights_only(value, path / info.relative_path, entry=read_item.dest_index.fqn)
            safe = io.BytesIO()
            torch.save(obj, safe)
            safe.seek(0)
            super().load_bytes(read_item, safe)

    return _WeightsOnlyPlanner


def _raise_from_dcp(path: Path, reader, load) -> None:
    """Run ``load``; the error DCP wraps a reader's or planner's in (``CheckpointException``) comes out as itself, on
    one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load()
    except CheckpointException as e:
        failure = next(iter(e.failures.values()), None)
        exc = reader.error or (failure[0] if isinstance(failure, tuple) else failure)
        if isinstance(exc, (UntrustedCheckpointError, FileNotFoundError, ValueError)):
            raise exc from None
        first = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
        raise ValueError(f"{path}: not a readable sharded checkpoint ({type(exc).__name__}: {first})") from None


def _read_dcp(path: Path, metadata, keys: set[str] | None, *, trust_checkpoint: bool) -> dict:
    require_private_torch("dcp_read")  # _load_state_dict, the planner's load_bytes hook: still what they were
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    planner = (_EmptyStateDictLoadPlanner if trust_checkpoint else _planner(_EmptyStateDictLoadPlanner, path))(
        keys=keys
    )
    state: dict = {}
    reader = _safe_reader(path, metadata)
    _raise_from_dcp(path, reader, lambda: _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True))
    return state


# -- TorchScript archives without torch.jit -------------------------------------------------------------------


class _ScriptObject:
    """Inert stand-in for an instance of a TorchScript class: its attributes, no methods, no code."""


def _pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` of every GLOBAL opcode (parsing only: nothing is built or called)."""
    out = []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            out.append(".".join(str(arg).split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            out.append("<STACK_GLOBAL>")
    return out


def _walk(obj: _ScriptObject, prefix: str, out: dict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _walk(value, f"{prefix}{name}.", out, seen)


def read_torchscript_state_dict(path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's modules, by dotted name (``torch.jit.load(path)
    .state_dict()``'s keys and values) — read with torch's weights-only unpickler, never running the archive.

    Raises :class:`UntrustedCheckpointError` when ``data.pkl`` needs anything beyond tensors, containers and
    TorchScript's own module records."""
    path = Path(path)
    _check_torch()
    try:
        from torch._weights_only_unpickler import Unpickler
    except ImportError:  # pragma: no cover - every torch >= 2.6 has it
        raise refusal(path, "this torch has no weights-only unpickler to read TorchScript archives with") from None
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a TorchScript archive (no top-level data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(zf.namelist())
        order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if order != sys.byteorder:
            raise ValueError(f"{path}: {order}-endian tensors cannot be read on this {sys.byteorder}-endian machine")
        data = zf.read(pkl[0])
        classes = sorted({g for g in _pickle_globals(data) if g.startswith("__torch__.")})

        def persistent_load(pid):
            _, storage_type, key, _location, numel = pid
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"{path}: data.pkl refers to a missing tensor file {member}")
            raw = zf.read(member)
            nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
            if len(raw) < nbytes:
                raise ValueError(f"{path}: tensor file {member} is truncated ({len(raw)} < {nbytes} bytes)")
            storage = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

        unpickler = Unpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = persistent_load
        try:
            with torch.serialization.safe_globals([(_ScriptObject, name) for name in classes]):
                root = unpickler.load()
        except pickle.UnpicklingError as e:
            raise refusal(
                path, f"its data.pkl holds more than TorchScript modules and tensors ({_weights_only_reason(e)})"
            ) from None
    if not isinstance(root, _ScriptObject):
        raise refusal(path, f"its data.pkl is a {type(root).__name__}, not a TorchScript module")
    out: dict[str, torch.Tensor] = {}
    _walk(root, "", out, set())
    return out
