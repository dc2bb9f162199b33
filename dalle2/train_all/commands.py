"""The stages' command lines: Python values as Hydra override text, a stage section as overrides of the stage's own
command, command-line stage overrides, a readable shell line, and the paths of the embedding shards and prompts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dalle2.train_all import STAGES, TRAINED

# The config groups of train/train.py's config (conf/<group>/, and model from dalle2/presets): `<stage>.<group>=x`
# selects an option of the group rather than setting a key (tests/test_train_all.py checks the list against conf/).
TRAIN_GROUPS = (
    "callbacks",
    "data",
    "debug",
    "experiment",
    "hparams_search",
    "logger",
    "model",
    "paths",
    "stage",
    "trainer",
)
_SAFE = re.compile(r"^[\w./\-+@:~%]+$")


# --------------------------------------------------------------------------------------------- overrides


def format_value(v) -> str:
    """A Python value as Hydra override-grammar text (strings quoted when they hold special characters)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _SAFE.match(s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"trainer": {"max_steps": 5}, "experiment": "clip_tiny"}`` -> ``{"trainer.max_steps": 5, "experiment": ...}``.

    An empty dict leaf is kept as ``{}``; keys may already be dotted.
    """
    flat: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def overrides(defaults: dict[str, object], section: dict) -> list[str]:
    """Hydra overrides: the orchestrator's ``defaults`` (data paths, run dir), then the stage section on top.

    ``section["groups"]`` holds config-group choices (``{"trainer": "gpu"}`` -> ``trainer=gpu``), so that a group
    and keys inside it (``trainer.devices``) can both be set.
    """
    section = dict(section)
    groups = section.pop("groups", None) or {}
    merged = {k: (k, v) for k, v in defaults.items()}
    for k, v in flatten(section).items():
        # a key of the stage's config: ``++`` sets it whether or not the config has it yet (a new scheduler's
        # ``total_steps``); a config-group choice (``experiment``, ``trainer``) and ``hydra.*`` stay plain
        plain = k in TRAIN_GROUPS or k.startswith("hydra.")
        merged[k] = (k if plain else f"++{k}", v)
    merged.update({k: (k, v) for k, v in groups.items()})
    return [f"{name}={format_value(v)}" for name, v in merged.values()]


def stage_override_argv(argv: list[str]) -> list[str]:
    """Command-line stage overrides as additions to the stage sections (no ``+`` needed for new keys):
    ``clip.trainer.max_steps=5`` -> ``++clip.trainer.max_steps=5``, and a config-group choice of a training stage
    ``decoder.trainer=gpu`` (``trainer`` is one of ``TRAIN_GROUPS``) -> ``++decoder.groups.trainer=gpu``."""
    pattern = re.compile(rf"^({'|'.join(STAGES)})\.([^=]+)=")
    out = []
    for a in argv:
        m = pattern.match(a)
        if m and m.group(1) in TRAINED and m.group(2) in TRAIN_GROUPS:
            a = f"{m.group(1)}.groups.{a[len(m.group(1)) + 1 :]}"
        out.append(f"++{a}" if m else a)
    return out


def shell_join(argv: list[str]) -> str:
    """A command line to copy into a shell, readable (``"data.urls='/d/{0..9}.tar'"`` rather than shlex's '"'"')."""
    out = []
    for a in argv:
        if re.match(r"^[\w./\-+@:%=,\[\]]+$", a):
            out.append(a)
        elif not re.search(r'["$`\\!]', a):
            out.append(f'"{a}"')
        else:
            out.append(shlex.quote(a))
    return " ".join(out)


# --------------------------------------------------------------------------------------------- shards


def shard_names(urls: str) -> list[str]:
    from dalle2.data.webdataset import expand_urls

    names = [Path(u).name for u in expand_urls(urls)]
    if len(set(names)) != len(names):
        raise SystemExit(f"shards of {urls!r} share file names; embedding shards are named after them")
    return names


def train_halves(urls: str) -> tuple[str, str]:
    """The shards of ``urls`` (braces and ``::`` expanded; not checked) cut into two halves, each a ``::``-joined url
    string: with a score_clip stage, the generator's CLIP trains on the first half and the scoring CLIP on the
    second, so that neither saw the other's images."""
    from braceexpand import braceexpand

    parts = list(urls) if isinstance(urls, (list, tuple)) else str(urls).split("::")
    shards = [u for part in parts for u in braceexpand(part)]
    if len(shards) < 2:
        raise SystemExit(
            f"score_clip trains on half of the train shards and the generator's CLIP on the other half: "
            f"data.train_urls={urls!r} has {len(shards)} shard (give more shards, or ckpt.score_clip=A_CLIP_FILE)"
        )
    half = len(shards) // 2
    return "::".join(shards[:half]), "::".join(shards[half:])


def mirrored_urls(urls: str, out_dir: Path) -> str:
    """Where train/precompute_embeddings.py puts the embedding shards of ``urls`` (same file names in out_dir)."""
    if isinstance(urls, str) and "::" not in urls and "{" not in os.path.dirname(urls):
        return str(out_dir / os.path.basename(urls))
    return "::".join(str(out_dir / n) for n in shard_names(urls))


def write_prompts(path: Path, *, file: str | None, num: int, val_urls: str) -> Path:
    """The prompt file: a copy of ``file``, or the first ``num`` captions of the held-out shards ``val_urls``
    (train_all passes its report split's: test, or val while choosing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if file:
        shutil.copyfile(file, path)
        return path
    from dalle2.data.webdataset import expand_urls, iter_raw_samples

    captions: list[str] = []
    for url in expand_urls(val_urls):
        for sample in iter_raw_samples(url):
            if isinstance(sample.get("txt"), bytes):
                captions.append(" ".join(sample["txt"].decode("utf-8").split()))
            if len(captions) >= num:
                break
        if len(captions) >= num:
            break
    if not captions:
        raise SystemExit(f"no captions found in {val_urls!r} for the prompt file (give prompts.file=...)")
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return path


@dataclass
class Stage:
    """One stage's commands (each an argv), an optional ``prepare()`` run before them (e.g. writes the prompt file)
    and the outputs later stages read."""

    name: str
    commands: list[list[str]] = field(default_factory=list)
    prepare: object = None
    outputs: dict[str, str] = field(default_factory=dict)
