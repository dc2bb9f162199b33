"""Results files: every figure the docs quote, together with what made it.

A results file is JSON under ``results/`` written by the command that measured it::

    write_result("results/demo.json", {"strict/all": 0.961, "fid": 12.3, "rows": [...]},
                 checkpoints={"decoder": "demo_out/decoder/last.ckpt"}, split="test", seeds=[0, 1, 2])

records the figures, the command line, the git sha (and whether the checkout had uncommitted changes), the date,
the machine (CPU model, cores, native bf16, torch, GPU) and the sha256 of every checkpoint named.

Docs cite figures so that a test can compare them with their file (``python -m dalle2.results check``):

* one figure: an HTML comment right after the number, ``96.1 %<!-- fig results/demo.json strict/all x100 -->``
  — the number is the last one before the marker on its line; ``x100`` (any ``xK``) scales the stored value
  (fractions shown as percent); the stored value rounded to the number of decimals written must equal it.
* a table: ``<!-- table results/demo.json rows -->`` … ``<!-- /table -->``, whose body is generated from
  ``figures["rows"]`` (a list of row dicts, or a dict of row dicts whose keys become the first column);
  ``python -m dalle2.results render README.md docs`` rewrites the bodies, ``check`` fails when one is stale.
  Optional ``fmt=.1f`` formats floats (default ``.4g``); ``cols=a,b,c`` picks and orders the columns.

Markers inside code (fenced blocks, `inline code`) are examples, not markers.
Keys address nested figures with ``/``: ``strict/all`` is ``figures["strict/all"]`` if that key exists, otherwise
``figures["strict"]["all"]``; list items by index (``rows/0/fid``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dalle2.io import atomic_write

__all__ = ["write_result", "read_result", "lookup", "check_docs", "render_docs", "machine_info", "sha256_file"]


# ----------------------------------------------------------------------------------------------------- writing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _git(*args: str, cwd: str | os.PathLike | None = None) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(cwd: str | os.PathLike | None = None) -> dict:
    """Full commit sha of the checkout at ``cwd`` (default: the one this package lives in) and whether it has
    uncommitted changes to tracked files; ``"unknown"`` outside a git checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    sha = _git("rev-parse", "HEAD", cwd=cwd)
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return {"git_sha": sha or "unknown", "git_dirty": None if sha is None or dirty is None else bool(dirty)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    """What the figures were measured on: CPU model and cores, native bf16 (AVX512-BF16 / AMX), torch, GPU."""
    import torch

    flags = _cpu_flags()
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return info


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        try:
            argv[0] = os.path.relpath(argv[0])
        except ValueError:
            pass
        return "python " + shlex.join(argv)
    return shlex.join(argv) if argv else ""


def _jsonable(value: Any) -> Any:
    """numpy / torch scalars and arrays → plain JSON; NaN/inf kept as strings so the file stays valid JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_result(
    path: str | os.PathLike,
    figures: Mapping[str, Any],
    *,
    command: str | Sequence[str] | None = None,
    checkpoints: Mapping[str, str | os.PathLike] | None = None,
    split: str | None = None,
    seeds: Sequence[int] | None = None,
    notes: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``figures`` and their provenance to ``path`` (atomically) and return the path.

    ``command`` defaults to this process's command line; ``checkpoints`` maps a name to a file whose sha256 is
    recorded (a missing file is an error: a figure must name what it was computed from); ``split`` says which data
    split the figures are reported on (``"val"`` for choices, ``"test"`` for reported figures)."""
    if not isinstance(figures, Mapping) or not figures:
        raise ValueError("write_result: figures must be a non-empty mapping")
    if command is None:
        command = _command()
    elif not isinstance(command, str):
        command = shlex.join([str(c) for c in command])
    ckpts = {}
    for name, p in (checkpoints or {}).items():
        if not Path(p).is_file():
            raise FileNotFoundError(f"write_result: checkpoint {name!r} not found: {p}")
        ckpts[str(name)] = {"path": str(p), "sha256": sha256_file(p), "bytes": Path(p).stat().st_size}
    record = {
        "figures": _jsonable(dict(figures)),
        "command": command,
        **git_state(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "checkpoints": ckpts,
        "split": split,
        "seeds": list(seeds) if seeds is not None else None,
        "notes": notes,
    }
    if extra:
        record["extra"] = _jsonable(dict(extra))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------------------------------- reading
def read_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    record = json.loads(path.read_text())
    missing = [k for k in ("figures", "command", "git_sha", "date", "machine") if k not in record]
    if missing:
        raise ValueError(f"{path}: not a results file (missing {', '.join(missing)})")
    return record


def lookup(figures: Any, key: str) -> Any:
    """``figures[key]`` where ``/`` in ``key`` descends into nested dicts/lists (an exact key wins)."""
    if isinstance(figures, Mapping) and key in figures:
        return figures[key]
    parts = key.split("/")
    for i in range(len(parts) - 1, 0, -1):
        head, rest = "/".join(parts[:i]), "/".join(parts[i:])
        if isinstance(figures, Mapping) and head in figures:
            try:
                return lookup(figures[head], rest)
            except KeyError:
                continue
        if isinstance(figures, list) and head.isdigit() and int(head) < len(figures):
            return lookup(figures[int(head)], rest)
    if isinstance(figures, list) and key.isdigit() and int(key) < len(figures):
        return figures[int(key)]
    raise KeyError(key)


# --------------------------------------------------------------------------------------------- docs checking
_FIG = re.compile(r"<!--\s*fig\s+(?P<file>\S+)\s+(?P<key>\S+)(?:\s+x(?P<scale>[0-9.eE+-]+))?\s*-->")
_TABLE = re.compile(r"<!--\s*table\s+(?P<file>\S+)\s+(?P<key>\S+)(?P<opts>(?:\s+\w+=\S+)*)\s*-->")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_TABLE_END = re.compile(r"<!--\s*/table\s*-->")
_NUMBER = re.compile(r"(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)(?:[eE][+-]?\d+)?")


def _doc_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        out.extend(sorted(p.rglob("*.md")) if p.is_dir() else [p])
    return out


class _Results:
    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, file: str, key: str) -> Any:
        if file not in self.cache:
            self.cache[file] = read_result(self.root / file)
        return lookup(self.cache[file]["figures"], key)


def _format(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return format(value, fmt)
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v, fmt) for v in value)
    return str(value)


def render_table(rows: Any, *, fmt: str = ".4g", cols: Sequence[str] | None = None) -> str:
    """Markdown table from a list of row dicts, or a dict ``{name: row dict}`` (the name becomes column one)."""
    if isinstance(rows, Mapping):
        rows = [{"": name, **dict(row)} for name, row in rows.items()]
    rows = list(rows)
    if not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("a table needs a non-empty list of row dicts (or a dict of row dicts)")
    if cols is None:
        cols = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_format(r.get(c, ""), fmt) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _table_opts(opts: str) -> dict:
    out = {}
    for item in opts.split():
        k, v = item.split("=", 1)
        out[k] = v.split(",") if k == "cols" else v
    return out


def _process(doc: Path, results: _Results, *, render: bool) -> tuple[list[str], str]:
    """Problems found in ``doc`` and (if ``render``) its text with table bodies regenerated."""
    problems: list[str] = []
    lines = doc.read_text().splitlines(keepends=True)
    out: list[str] = []
    i = 0
    fenced = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if fenced or line.lstrip().startswith(("```", "~~~")):  # examples inside code blocks are not markers
            out.append(line)
            i += 1
            continue
        line_code_free = _INLINE_CODE.sub(lambda c: " " * len(c.group()), line)
        for m in _FIG.finditer(line_code_free):
            where = f"{doc}:{i + 1}"
            before = _FIG.sub("", line[: m.start()])
            nums = _NUMBER.findall(before)
            if not nums:
                problems.append(f"{where}: no number before the marker for {m['file']} {m['key']}")
                continue
            written = nums[-1].replace(",", "")
            try:
                value = float(results.get(m["file"], m["key"])) * float(m["scale"] or 1)
            except (OSError, KeyError, ValueError, TypeError) as e:
                problems.append(f"{where}: cannot read {m['file']} {m['key']}: {type(e).__name__}: {e}")
                continue
            decimals = len(written.split(".")[1]) if "." in written else 0
            if not math.isfinite(value) or round(value, decimals) != round(float(written), decimals):
                problems.append(f"{where}: docs say {written}, {m['file']} {m['key']} gives {value:.{decimals}f}")
        out.append(line)
        tm = _TABLE.search(line_code_free)
        if tm is None:
            i += 1
            continue
        where = f"{doc}:{i + 1}"
        end = next((j for j in range(i + 1, len(lines)) if _TABLE_END.search(lines[j])), None)
        if end is None:
            problems.append(f"{where}: table marker without <!-- /table -->")
            i += 1
            continue
        body = "".join(lines[i + 1 : end])
        try:
            opts = _table_opts(tm["opts"] or "")
            table = render_table(results.get(tm["file"], tm["key"]), fmt=opts.get("fmt", ".4g"), cols=opts.get("cols"))
        except (OSError, KeyError, ValueError, TypeError) as e:
            problems.append(f"{where}: cannot render {tm['file']} {tm['key']}: {type(e).__name__}: {e}")
            out.extend(lines[i + 1 : end + 1])
            i = end + 1
            continue
        if body.strip() != table.strip():
            if not render:
                problems.append(
                    f"{where}: table from {tm['file']} {tm['key']} is stale (python -m dalle2.results render)"
                )
            body = table + "\n"
        out.append(body if render else "".join(lines[i + 1 : end]))
        out.append(lines[end])
        i = end + 1
    return problems, "".join(out)


def check_docs(paths: Iterable[str | os.PathLike], *, root: str | os.PathLike = ".") -> list[str]:
    """Every figure marker and generated table in the markdown files under ``paths`` compared with its results file
    (files named relative to ``root``); returns one line per problem (empty: all figures match)."""
    results = _Results(Path(root))
    problems: list[str] = []
    for doc in _doc_files(paths):
        problems += _process(doc, results, render=False)[0]
    return problems


def render_docs(paths: Iterable[str | os.PathLike], *, root: str | os.PathLike = ".") -> list[Path]:
    """Regenerate the bodies of ``<!-- table … -->`` blocks; returns the files that changed."""
    results = _Results(Path(root))
    changed = []
    for doc in _doc_files(paths):
        _, text = _process(doc, results, render=True)
        if text != doc.read_text():
            with atomic_write(doc, "w") as f:
                f.write(text)
            changed.append(doc)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle2.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "render"])
    parser.add_argument("paths", nargs="*", default=["README.md", "docs"], help="markdown files or folders")
    parser.add_argument("--root", default=".", help="folder the results paths in markers are relative to")
    args = parser.parse_args(argv)
    if args.action == "render":
        for p in render_docs(args.paths, root=args.root):
            print(f"rendered {p}")
        return 0
    problems = check_docs(args.paths, root=args.root)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
