"""Commands in the docs cannot rot: every ``python …`` / ``make …`` command in README.md and docs/*.md code blocks is
checked, in one pass and in this process —

* the script (``python path.py``) or module (``python -m pkg.mod``) exists;
* a Hydra entry point's overrides compose against ``conf/`` (Hydra's compose API, with the hydra node, so
  ``hydra.*`` keys and launcher groups are checked too); a sweep (``-m``, ``a=1,2``) composes once per value;
  ``train/train_all.py``'s stage overrides (``decoder.trainer.devices=8``) compose against that stage's own
  entry point's config, as plain ``key=value`` (a renamed key there fails instead of being silently added);
* ``torchrun … train/train.py …`` and ``sbatch scripts/slurm/train.sbatch …`` overrides compose as train.py's;
* options of other scripts exist: ``--flag`` and ``key=value`` names appear in the script's source (argparse) or in
  its ``DEFAULTS`` (bench's ``key=value`` scripts); lower-case words (sub-commands) appear in its source;
* ``make TARGET`` names a target (``make -n TARGET``).

Placeholders: values in capitals (``CLIP``, ``RUN/...``) and ``<run>`` are paths the reader fills in; ``[...]``
marks optional arguments (checked too), ``...`` / ``…`` stand for more arguments (skipped).  Plus: every results
file under ``results/`` is listed in docs/results.md, and every file listed there exists.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.tiny_runs import REPO_ROOT

ROOT = Path(REPO_ROOT)
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
# train/train_all.py's stage sections -> the config (under conf/) of the command that stage runs, and its fixed keys
TRAIN_ALL_STAGES = {
    "clip": ("config", []),
    "prior": ("config", []),
    "decoder": ("config", []),
    "upsampler": ("config", []),
    "retrieval": ("evaluate", ["task=retrieval"]),
    "evaluate": ("evaluate", ["task=samples"]),
    "embeddings": ("precompute", []),
    "sample": ("sample", []),
}


@dataclass
class Command:
    doc: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text[:160]}"


@dataclass
class Job:
    cmd: Command
    overrides: list[str]
    stage: str | None = None  # a train_all stage section composed against that stage's config


# ------------------------------------------------------------------------------------------------- extraction
def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf, start = "", None
    for n, line in lines:
        if start is None:
            start = n
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        out.append((start, buf + stripped))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the shell code in a markdown text: fenced blocks in a shell language (or none) and
    indented code blocks; continuation lines joined."""
    lines = text.splitlines()
    found: list[tuple[int, str]] = []
    fence: str | None = None
    block: list[tuple[int, str]] = []
    prev_blank = True
    for i, line in enumerate(lines, 1):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, block = m.group(2), m.group(3).lower(), []
            keep = lang in SHELL_LANGS
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                if keep:
                    found += _join_continuations(block)
                fence = None
            else:
                block.append((i, line))
            continue
        if line.startswith("    ") and prev_blank and not line.lstrip().startswith(("-", "*", "|")):
            indented = [(i, line[4:])]
            found += _join_continuations(indented)
            # a following indented continuation line stays part of this block
            continue
        prev_blank = not line.strip() or (line.startswith("    ") and prev_blank)
    return _merge_indented(found, lines)


def _merge_indented(found, lines):
    """Indented code blocks span several lines: re-read them whole (a line ending in a backslash continues)."""
    out, skip = [], set()
    for n, text in found:
        if n in skip:
            continue
        raw = lines[n - 1]
        if raw.startswith("    ") and raw[4:].rstrip() == text.rstrip() and text.rstrip().endswith("\\"):
            parts, j = [], n
            while j <= len(lines) and lines[j - 1].startswith("    "):
                parts.append((j, lines[j - 1][4:]))
                skip.add(j)
                if not lines[j - 1].rstrip().endswith("\\"):
                    break
                j += 1
            out += _join_continuations(parts)
        else:
            out.append((n, text))
    return out


def _split_commands(line: str) -> list[str]:
    return [part.strip() for part in re.split(r"\s(?:&&|;|\|\|)\s", line) if part.strip()]


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]


def extract_commands(root: Path = ROOT) -> list[Command]:
    cmds = []
    for doc in doc_files(root):
        rel = str(doc.relative_to(root))
        for n, line in code_lines(doc.read_text()):
            for part in _split_commands(line):
                try:
                    tokens = shlex.split(part, comments=True)
                except ValueError:
                    continue
                while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value before the command
                    tokens = tokens[1:]
                if tokens and (tokens[0] in ("make", "torchrun", "sbatch") or re.search(r"(^|/)python3?$", tokens[0])):
                    cmds.append(Command(rel, n, shlex.join(tokens)))
    return cmds


# ------------------------------------------------------------------------------------------------- checking
def _args(tokens: list[str]) -> list[str]:
    """Optional-argument brackets dropped, ``...`` placeholders removed, ``<run>`` made a plain value."""
    out = []
    for t in tokens:
        if t in ("...", "…") or t.strip("[]") in ("...", "…", "") or re.search(r"=(\.\.\.|…)$", t):
            continue
        if t.startswith("[") and "=" in t:
            t = t[1:]
        if t.endswith("]") and t.count("]") > t.count("["):
            t = t[:-1]
        t = re.sub(r"<[^<>]*>", "X", t).replace("…", "X")
        out.append(t)
    return out


def _hydra_entry(source: str) -> tuple[str, str] | None:
    m = re.search(r"@hydra\.main\(([^)]*)\)", source)
    if not m:
        return None
    path = re.search(r"config_path\s*=\s*['\"]([^'\"]+)['\"]", m.group(1))
    name = re.search(r"config_name\s*=\s*['\"]([^'\"]+)['\"]", m.group(1))
    return (path.group(1) if path else ".", name.group(1) if name else "config")


def _module_source(root: Path, module: str) -> tuple[Path | None, str]:
    base = root.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if cand.is_file():
            files = sorted(cand.parent.glob("*.py")) if cand.name in ("__main__.py", "__init__.py") else [cand]
            return cand, "\n".join(f.read_text() for f in files)
    return None, ""


class Checker:
    """Checks commands against the repository at ``root`` (its scripts, ``conf/`` and Makefile)."""

    def __init__(self, root: Path = ROOT):
        self.root = root
        self.compose_jobs: dict[tuple[str, str], list[Job]] = {}
        self.problems: list[str] = []
        self.make_targets: set[str] | None = None

    # --- per command
    def check(self, cmd: Command) -> None:
        tokens = shlex.split(cmd.text)
        if tokens[0] == "make":
            return self._make(cmd, tokens[1:])
        if tokens[0] == "torchrun":
            script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
            if script is None:
                return self.problems.append(f"{cmd.where()}: torchrun without a script")
            return self._script(cmd, tokens[script], tokens[script + 1 :])
        if tokens[0] == "sbatch":
            script = next((i for i, t in enumerate(tokens) if t.endswith(".sbatch")), None)
            if script is None or not (self.root / tokens[script]).is_file():
                return self.problems.append(f"{cmd.where()}: sbatch script not found")
            return self._script(cmd, "train/train.py", tokens[script + 1 :])  # it runs train.py with these overrides
        rest = tokens[1:]
        if rest[:1] == ["-m"]:
            if len(rest) < 2:
                return self.problems.append(f"{cmd.where()}: python -m without a module")
            path, source = _module_source(self.root, rest[1])
            if path is None:
                return self.problems.append(f"{cmd.where()}: no module {rest[1]!r} in the repository")
            return self._options(cmd, source, rest[2:])
        if not rest or not rest[0].endswith(".py"):
            return  # `python -c …`, an interpreter alone: nothing to check
        return self._script(cmd, rest[0], rest[1:])

    def _script(self, cmd: Command, script: str, args: list[str]) -> None:
        path = self.root / script
        if not path.is_file():
            return self.problems.append(f"{cmd.where()}: no script {script!r}")
        source = path.read_text()
        entry = _hydra_entry(source)
        if entry is None:
            return self._options(cmd, source, args)
        conf_dir = str((path.parent / entry[0]).resolve())
        overrides = [a for a in _args(args) if a not in ("-m", "--multirun")]
        if "--cfg" in overrides:  # --cfg job / --cfg hydra: only the overrides matter
            i = overrides.index("--cfg")
            overrides = overrides[:i] + overrides[i + 2 :]
        if path.resolve() == (self.root / "train" / "train_all.py").resolve():
            return self._train_all(cmd, conf_dir, entry[1], overrides)
        self.compose_jobs.setdefault((conf_dir, entry[1]), []).append(Job(cmd, overrides))

    def _train_all(self, cmd: Command, conf_dir: str, name: str, overrides: list[str]) -> None:
        own, staged = [], {}
        for o in overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            stage = key.split(".", 1)[0]
            if stage in TRAIN_ALL_STAGES and "." in key:
                staged.setdefault(stage, []).append(o.lstrip("+~").split(".", 1)[1])
            else:
                own.append(o)
        self.compose_jobs.setdefault((conf_dir, name), []).append(Job(cmd, own))
        for stage, stage_overrides in staged.items():
            conf, fixed = TRAIN_ALL_STAGES[stage]
            # the stage's experiment (train_all's default or the given one) is read after train_all's compose
            job = Job(cmd, [*fixed, *stage_overrides], stage)
            self.compose_jobs.setdefault((str(self.root / "conf"), conf), []).append(job)

    def _options(self, cmd: Command, source: str, args: list[str]) -> None:
        defaults = _defaults_keys(source)
        value_next = False
        for a in _args(args):
            if value_next and not a.startswith("-"):  # the value of the option before it
                value_next = False
                continue
            value_next = a.startswith("--") and "=" not in a
            if a.startswith("--"):
                name = a[2:].split("=", 1)[0]
                if defaults is not None:
                    ok = name.replace("-", "_") in defaults
                else:
                    ok = re.search(rf"['\"]--{re.escape(name)}['\"]", source) is not None
                if not ok:
                    self.problems.append(f"{cmd.where()}: option --{name} not found in the script")
            elif "=" in a and re.match(r"^[A-Za-z_][\w.]*=", a):
                key = a.split("=", 1)[0]
                ok = key in defaults if defaults is not None else re.search(rf"['\"]{re.escape(key)}['\"]", source)
                if not ok:
                    self.problems.append(f"{cmd.where()}: argument {key}= not found in the script")
            elif re.fullmatch(r"[a-z][a-z_]*", a) and not re.search(rf"['\"]{re.escape(a)}['\"]", source):
                self.problems.append(f"{cmd.where()}: word {a!r} (a sub-command?) not found in the script")

    def _make(self, cmd: Command, args: list[str]) -> None:
        targets = [a for a in args if not a.startswith("-") and "=" not in a] or ["all"]
        variables = [a for a in args if "=" in a]
        for target in targets:
            proc = subprocess.run(
                ["make", "-n", "-C", str(self.root), target, *variables], capture_output=True, text=True, timeout=60
            )
            if proc.returncode != 0:
                self.problems.append(f"{cmd.where()}: make -n {target}: {proc.stderr.strip()[:200]}")

    # --- the compose pass
    def _is_group(self, conf_dir: str, key: str) -> bool:
        key = key.lstrip("+~").split("@", 1)[0]
        return "/" in key or key == "model" or ("." not in key and (Path(conf_dir) / key).is_dir())

    def compose_all(self) -> None:
        """Compose once per distinct set of config-group choices (cached across checkers), then check every other
        override's key against the composed config as Hydra would: ``key=`` must exist, ``+key=`` must not,
        ``++key=`` may; a sweep over a group composes each choice, a sweep over a value checks the key once."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        train_all_cfgs: dict[int, object] = {}
        # train_all's own configs first: the stage jobs read the stage's experiment from them
        for conf_dir, name in sorted(self.compose_jobs, key=lambda k: not k[0].endswith("train_all")):
            for job in self.compose_jobs[(conf_dir, name)]:
                cmd, extra = job.cmd, []
                what = f" (stage {job.stage})" if job.stage else ""
                if job.stage is not None and name == "config":
                    section = train_all_cfgs[id(cmd)].get(job.stage) if id(cmd) in train_all_cfgs else None
                    if section is not None and section.get("experiment"):
                        extra = [f"experiment={section.experiment}"]
                try:
                    parsed = parser.parse_overrides([*extra, *job.overrides])
                except Exception as e:  # noqa: BLE001 - Hydra's parse errors name the bad override
                    self.problems.append(f"{cmd.where()}{what}: {type(e).__name__}: {str(e).splitlines()[0]}")
                    continue
                groups, values = [], []
                for o in parsed:
                    (groups if self._is_group(conf_dir, o.get_key_element()) else values).append(o)
                choices = [list(o.sweep_string_iterator()) if o.is_sweep_override() else None for o in groups]
                n = max((len(c) for c in choices if c), default=1)
                for i in range(n):
                    chosen = tuple(
                        o.input_line if c is None else f"{o.get_key_element()}={c[min(i, len(c) - 1)]}"
                        for o, c in zip(groups, choices)
                    )
                    cfg = _compose(conf_dir, name, chosen)
                    if isinstance(cfg, str):
                        self.problems.append(f"{cmd.where()}{what}: {cfg}")
                        break
                    bad = [msg for o in values if (msg := _value_problem(cfg, o))]
                    if bad:
                        self.problems.append(f"{cmd.where()}{what}: {'; '.join(bad)}")
                        break
                    if conf_dir.endswith("train_all") and i == 0:
                        train_all_cfgs[id(cmd)] = cfg

    def run(self, cmds: list[Command]) -> list[str]:
        for cmd in cmds:
            self.check(cmd)
        self.compose_all()
        return self.problems


def _defaults_keys(source: str) -> set[str] | None:
    """Keys of a module-level ``DEFAULTS = {...}`` (bench's ``key=value`` scripts), else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return None


_COMPOSED: dict[tuple, object] = {}


def _compose(conf_dir: str, name: str, groups: tuple[str, ...]):
    """The config for these group choices (with the hydra node), or the error's first line; cached."""
    key = (conf_dir, name, groups)
    if key not in _COMPOSED:
        from hydra import compose, initialize_config_dir

        try:
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
                _COMPOSED[key] = compose(name, overrides=list(groups), return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - any compose error is the finding
            _COMPOSED[key] = (str(e).splitlines() or [type(e).__name__])[0]
    return _COMPOSED[key]


def _value_problem(cfg, override) -> str | None:
    """Why Hydra would refuse this value override on ``cfg`` (None: it would apply)."""
    from omegaconf import DictConfig, OmegaConf

    key = override.get_key_element()
    plain = key.lstrip("+~")
    parent_key, _, leaf = plain.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    exists = isinstance(parent, DictConfig) and leaf in parent.keys()  # `in` alone misses ??? values
    if key.startswith("++"):
        ok = isinstance(parent, DictConfig) or parent is None
    elif key.startswith("~"):
        ok = exists
    elif key.startswith("+"):
        ok = not exists
    else:
        ok = exists
    if ok:
        return None
    if key.startswith("+") and not key.startswith("++"):
        return f"Could not append to config. An item is already at {plain!r}"
    return f"Could not override {plain!r}: no such key"


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def commands() -> list[Command]:
    return extract_commands()


def test_the_docs_hold_commands_of_every_kind(commands):
    """The extractor finds the commands a reader runs (a broken extractor would check nothing)."""
    texts = [c.text for c in commands]
    assert len(commands) >= 40, texts
    for needle in (
        "make test",
        "make demo",
        "train/train.py",
        "train/train_all.py",
        "eval/sample.py",
        "eval/evaluate.py",
        "eval/coco_fid.py",
        "eval/serve.py",
        "-m dalle2.export",
        "torchrun",
        "sbatch",
    ):
        assert any(needle in t for t in texts), needle
    assert {c.doc for c in commands} >= {"README.md", "docs/training.md", "docs/evaluation.md", "docs/sweeps.md"}


def test_every_documented_command_checks(commands):
    problems = Checker(ROOT).run(commands)
    assert not problems, "\n".join(problems)


def _tree_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for d in ("conf", "train", "eval", "bench", "scripts", "dalle2"):
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "Makefile", root / "Makefile")
    return root


@pytest.mark.parametrize(
    "command, why",
    [
        ("python train/train.py stage=decoder trainer=fsdp trainer.strategy.param_dtyp=bfloat16", "param_dtyp"),
        ("python eval/sample.py ckpt.clip=C ckpt.prior=P ckpt.decoder=D prompts=p.txt steps.decodr=50", "decodr"),
        ("python train/train.py -m experiment=clip_tiny hparams_search=clip_lrr", "clip_lrr"),
        ("python train/train_all.py out_dir=o decoder.trainer.devicez=8", "devicez"),
        ("python train/train_all.py out_dir=o clip.model=clip/vit_b99", "vit_b99"),
        ("python train/train_all.py out_dir=o stagez=[clip]", "stagez"),
        ("python train/train.py -m stage=prior,decodr", "decodr"),
        ("python train/trian.py stage=clip", "trian.py"),
        ("python -m dalle2.exprt ckpt=a out=b", "dalle2.exprt"),
        ("python bench/scale_plan.py stage=decoder gpuz=8", "gpuz"),
        ("python bench/dataloader.py --image-sise 64", "image-sise"),
        ("make tset", "tset"),
        ("sbatch scripts/slurm/train.sbatch experiment=prior_vit_l14_laion data.trian_dir=/x", "trian_dir"),
    ],
)
def test_a_wrong_command_is_caught(command, why):
    problems = Checker(ROOT).run([Command("case.md", 1, command)])
    assert problems and why in problems[0], problems


def test_a_renamed_config_key_breaks_the_docs(tmp_path, commands):
    """Rename a key the README uses in the config (data.train_urls -> data.train_shards) in a copy of the
    repository: the README's commands that name it fail, each naming the key."""
    root = _tree_copy(tmp_path)
    builtin = root / "conf" / "data" / "builtin.yaml"
    text = builtin.read_text()
    assert "\ntrain_urls:" in text
    builtin.write_text(text.replace("\ntrain_urls:", "\ntrain_shards:"))
    for f in (root / "conf" / "data").glob("*.yaml"):
        f.write_text(f.read_text().replace("\ntrain_urls:", "\ntrain_shards:"))
    readme = [c for c in commands if c.doc == "README.md"]
    naming = [c for c in readme if "data.train_urls" in c.text and "train/train.py" in c.text]
    assert naming, "the README no longer names data.train_urls in a train.py command: pick another key"
    problems = Checker(root).run(readme)
    assert len([p for p in problems if "train_urls" in p]) >= len(naming), "\n".join(problems)
    assert Checker(ROOT).run(naming) == []  # the same commands pass against the real tree


def test_results_page_lists_every_results_file():
    listed = set(re.findall(r"`(results/[^`\s]+\.json)`", (ROOT / "docs" / "results.md").read_text()))
    present = (
        {str(p.relative_to(ROOT)) for p in (ROOT / "results").glob("**/*.json")}
        if (ROOT / "results").is_dir()
        else set()
    )
    assert present <= listed, f"results files missing from docs/results.md: {sorted(present - listed)}"
    assert listed <= present, f"docs/results.md lists files that do not exist: {sorted(listed - present)}"


def test_extractor_reads_fences_indented_blocks_and_continuations():
    text = (
        "Intro `python not/inline.py`\n\n```bash\npython a.py x=1 \\\n    y=2   # comment\nmake test && make demo\n```\n"
        '\n```python\npython_code = 1\n```\n\n    python b.py --flag\n\n```json\n{"python": 1}\n```\n'
    )
    got = [(n, shlex.split(line, comments=True)) for n, line in code_lines(text)]
    flat = [" ".join(t) for _, t in got]
    assert "python a.py x=1 y=2" in flat and "python b.py --flag" in flat
    assert "make test && make demo" in flat
    assert not any("inline" in f or "python_code" in f for f in flat)


def _anchors(md: Path) -> set[str]:
    """The heading ids of a markdown file, as the site's toc extension makes them."""
    heads = re.findall(r"^#+ (.+)$", md.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def test_readme_links_resolve():
    """README.md is read on the code host, outside the site's --strict build: its relative links must name files that
    exist, and their anchors headings that exist."""
    readme = ROOT / "README.md"
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", readme.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        md = ROOT / path if path else readme
        if not md.exists() or (anchor and md.suffix == ".md" and anchor not in _anchors(md)):
            bad.append(target)
    assert not bad, bad


def test_the_site_build_fails_on_a_broken_link(tmp_path):
    """`make docs`'s own command (its flags: a --quiet build would pass with warnings) on a copy of the site with one
    broken link exits non-zero naming the link; the same copy without it builds."""
    import sys

    recipe = subprocess.run(["make", "-n", "-C", str(ROOT), "docs"], capture_output=True, text=True, check=True)
    line = next(x for x in recipe.stdout.splitlines() if "mkdocs build" in x)
    args = shlex.split(line.split("mkdocs", 1)[1])  # after `.../bin/mkdocs`
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    cmd = [sys.executable, "-m", "mkdocs", *args, "-f", str(tmp_path / "mkdocs.yml"), "-d", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    page = tmp_path / "docs" / "karlo.md"
    page.write_text(page.read_text() + "\n\nSee [the missing page](missing-page.md).\n")
    broken = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode != 0 and "missing-page.md" in broken.stderr, broken.stderr[-2000:]
