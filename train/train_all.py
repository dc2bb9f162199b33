"""Train, sample and score the whole unCLIP stack with one command.

    python train/train_all.py experiment=demo out_dir=demo_out
    python train/train_all.py out_dir=runs/mine "data.train_urls='/data/{00000..00099}.tar'" \
        "data.val_urls='/data/val/{00000..00001}.tar'" clip.trainer.max_steps=10000 prior.trainer.max_steps=20000
    python train/train_all.py experiment=demo out_dir=demo_out force=[prior,decoder]     # retrain two stages
    python train/train_all.py experiment=demo out_dir=demo_out stages=[clip,retrieval]   # only some stages

Stages, in order, each a subprocess of the command a researcher would type (so every stage composes its own
Hydra config, and its progress bars stream to this terminal):

    clip        train/train.py (clip section)                     -> out_dir/clip/checkpoints/last.ckpt
    retrieval   eval/evaluate.py task=retrieval on the val shards -> out_dir/retrieval/metrics.json
    embeddings  train/precompute_embeddings.py, train + val      -> out_dir/embeddings/{train,val}/*.tar
    prior       train/train.py on the embedding shards            -> out_dir/prior/checkpoints/last.ckpt
    decoder     train/train.py on the embedding shards            -> out_dir/decoder/checkpoints/last.ckpt
    upsampler   train/train.py on the image shards                -> out_dir/upsampler/checkpoints/last.ckpt
    sample      eval/sample.py on a prompt file (val captions)    -> out_dir/sample/{00000.png,manifest.jsonl,grid.png}
    evaluate    eval/evaluate.py task=samples                     -> out_dir/evaluate/metrics.json

then train/demo_report.py writes out_dir/report.md (+ report.html). A stage that succeeded leaves
out_dir/<stage>/DONE.json (wall time, commands, settings) and is skipped next time unless forced; a stage that
runs makes the later stages that use its output run again. conf/train_all/config.yaml has every option.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dalle2.io import atomic_write, write_json_atomic  # noqa: E402
from dalle2.lit.checkpoints import run_checkpoints  # noqa: E402
from dalle2.sweep import override_pairs  # noqa: E402

STAGES = ("clip", "retrieval", "embeddings", "prior", "decoder", "upsampler", "sample", "evaluate")
TRAINED = ("clip", "prior", "decoder", "upsampler")  # stages that end in checkpoints/last.ckpt
# Which earlier stages' outputs a stage reads (a stage that reruns makes these dependents rerun too).
DEPENDS = {
    "clip": (),
    "retrieval": ("clip",),
    "embeddings": ("clip",),
    "prior": ("embeddings",),
    "decoder": ("embeddings",),
    "upsampler": (),
    "sample": ("clip", "prior", "decoder", "upsampler"),
    "evaluate": ("clip", "sample"),
}
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


# --------------------------------------------------------------------------------------------- shards


def shard_names(urls: str) -> list[str]:
    from dalle2.data.webdataset import expand_urls

    names = [Path(u).name for u in expand_urls(urls)]
    if len(set(names)) != len(names):
        raise SystemExit(f"shards of {urls!r} share file names; embedding shards are named after them")
    return names


def mirrored_urls(urls: str, out_dir: Path) -> str:
    """Where train/precompute_embeddings.py puts the embedding shards of ``urls`` (same file names in out_dir)."""
    if isinstance(urls, str) and "::" not in urls and "{" not in os.path.dirname(urls):
        return str(out_dir / os.path.basename(urls))
    return "::".join(str(out_dir / n) for n in shard_names(urls))


def write_prompts(path: Path, *, file: str | None, num: int, val_urls: str) -> Path:
    """The prompt file: a copy of ``file``, or the first ``num`` captions of the val shards (held out)."""
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


# --------------------------------------------------------------------------------------------- stages


def container(node) -> dict:
    """A config section as a plain dict (``{}`` for a missing or empty one)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


@dataclass
class Stage:
    name: str
    commands: list[list[str]] = field(default_factory=list)
    prepare: object = None  # optional callable run before the commands (e.g. writes the prompt file)
    outputs: dict[str, str] = field(default_factory=dict)


class Plan:
    """The commands of every stage, from the train_all config; paths of earlier stages' outputs are fixed by out_dir."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir).resolve()
        self.py = sys.executable
        self.section = {s: container(cfg.get(s)) for s in STAGES}
        self.data = OmegaConf.to_container(cfg.data, resolve=True)
        self.given = {k: v for k, v in OmegaConf.to_container(cfg.ckpt, resolve=True).items() if v}

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def ckpt(self, stage: str) -> str:
        return str(self.given.get(stage) or self.dir(stage) / "checkpoints" / "last.ckpt")

    def emb_urls(self, split: str) -> str:
        return mirrored_urls(self.data[f"{split}_urls"], self.dir("embeddings") / split)

    def train_cmd(self, stage: str, defaults: dict) -> list[str]:
        base = {"hydra.run.dir": str(self.dir(stage)), **defaults}
        return [self.py, str(ROOT / "train" / "train.py"), *overrides(base, self.section[stage])]

    def build(self, stage: str) -> Stage:
        d, data = self.dir(stage), self.data
        if stage == "clip":
            return Stage(
                stage,
                [self.train_cmd(stage, {"data.train_urls": data["train_urls"], "data.val_urls": data["val_urls"]})],
            )
        if stage == "retrieval":
            base = {
                "task": "retrieval",
                "clip_ckpt": self.ckpt("clip"),
                "data.urls": data["val_urls"],
                "out": str(d / "metrics.json"),
                "hydra.run.dir": str(d),
            }
            return Stage(stage, [[self.py, str(ROOT / "eval" / "evaluate.py"), *overrides(base, self.section[stage])]])
        if stage == "embeddings":
            cmds = []
            for split in ("train", "val"):
                base = {
                    "clip_ckpt": self.ckpt("clip"),
                    "data.urls": data[f"{split}_urls"],
                    "out_dir": str(d / split),
                    "hydra.run.dir": str(d),
                }
                cmds.append(
                    [self.py, str(ROOT / "train" / "precompute_embeddings.py"), *overrides(base, self.section[stage])]
                )
            return Stage(stage, cmds, outputs={"train_urls": self.emb_urls("train"), "val_urls": self.emb_urls("val")})
        if stage == "prior":
            return Stage(
                stage,
                [
                    self.train_cmd(
                        stage,
                        {
                            "data.train_urls": self.emb_urls("train"),
                            "data.val_urls": self.emb_urls("val"),
                            "clip_ckpt": self.ckpt("clip"),
                        },
                    )
                ],
            )
        if stage == "decoder":
            return Stage(
                stage,
                [
                    self.train_cmd(
                        stage,
                        {
                            "data.train_urls": self.emb_urls("train"),
                            "data.val_urls": self.emb_urls("val"),
                            "data.load_embeddings": True,
                            "clip_ckpt": self.ckpt("clip"),
                        },
                    )
                ],
            )
        if stage == "upsampler":
            return Stage(
                stage,
                [self.train_cmd(stage, {"data.train_urls": data["train_urls"], "data.val_urls": data["val_urls"]})],
            )
        if stage == "sample":
            prompts = d / "prompts.txt"
            base = {
                "ckpt.clip": self.ckpt("clip"),
                "ckpt.prior": self.ckpt("prior"),
                "ckpt.decoder": self.ckpt("decoder"),
                "ckpt.upsamplers": [self.ckpt("upsampler")] if "upsampler" in self.enabled_models() else [],
                "prompts": str(prompts),
                "out_dir": str(d),
                "hydra.run.dir": str(d),
            }
            cmd = [self.py, str(ROOT / "eval" / "sample.py"), *overrides(base, self.section[stage])]
            pcfg = self.cfg.prompts

            def prepare() -> None:
                write_prompts(prompts, file=pcfg.file, num=int(pcfg.num), val_urls=data["val_urls"])

            return Stage(stage, [cmd], prepare=prepare)
        if stage == "evaluate":
            base = {
                "task": "samples",
                "samples": str(self.dir("sample")),
                "reference.urls": data["val_urls"],
                "clip_ckpt": self.ckpt("clip"),
                "out": str(d / "metrics.json"),
                "hydra.run.dir": str(d),
            }
            return Stage(stage, [[self.py, str(ROOT / "eval" / "evaluate.py"), *overrides(base, self.section[stage])]])
        raise SystemExit(f"unknown stage {stage!r}; expected some of {list(STAGES)}")

    def enabled_models(self) -> set[str]:
        """Trained stages whose checkpoint exists or will be made in this run (an upsampler is optional)."""
        listed = set(self.cfg.stages)
        return {
            s for s in TRAINED if s in listed or s in self.given or Path(self.ckpt(s)).exists()
        }  # a file, or a sharded (fsdp) checkpoint dir


# --------------------------------------------------------------------------------------------- running


def done_path(plan: Plan, stage: str) -> Path:
    return plan.dir(stage) / "DONE.json"


def forced_stages(force) -> set[str]:
    if force is True:
        return set(STAGES)
    if not force:
        return set()
    if isinstance(force, str):
        force = [force]
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise SystemExit(f"force names unknown stages {unknown}; expected some of {list(STAGES)}")
    return set(force)


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished subprocesses so far: a load-independent cost of a stage."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


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


def run_commands(stage: Stage, *, cwd: Path) -> None:
    for argv in stage.commands:
        print(f"[train_all] {stage.name}: {shell_join(argv)}", flush=True)
        proc = subprocess.Popen(argv, cwd=cwd)
        # SIGTERM (a scheduler's preemption) goes on to the stage, which saves last.ckpt; a rerun resumes it.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
        try:
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            raise SystemExit(
                f"[train_all] stage {stage.name} failed (exit status {rc}); fix it and rerun the same "
                "command: finished stages are skipped"
            )


# Overrides whose change a run can be resumed across (how long, how often to validate/save/log, on how many devices);
# any other difference means another experiment, which a resume would silently mix with the first.
RESUMABLE = re.compile(
    r"^(trainer\.(max_steps|max_epochs|max_time|val_check_interval|check_val_every_n_epoch|limit_val_batches"
    r"|log_every_n_steps|devices|num_nodes|accelerator|strategy(\..+)?|enable_progress_bar|num_sanity_val_steps)"
    r"|trainer|logger(\..+)?|tags|callbacks\.model_checkpoint\.(every_n_train_steps|keep_last)"
    r"|callbacks\.(lr_monitor|throughput|skipped_samples|sample_grid)\..+|module\.sample_every_n_steps"
    r"|data\.(num_workers|prefetch_factor|val_batch_size|pin_memory|persistent_workers))$"
)
STAGE_RESUMABLE = {"embeddings": re.compile(r"^data\.batch_size$")}  # shards already written stay valid
EXTENDS = re.compile(r"^trainer\.(max_steps|max_epochs|max_time)$")  # a finished run continues when these change


def identity(commands: list[list[str]]) -> list[dict]:
    """What a stage's commands mean, independent of the interpreter and of where the checkout lies: per command
    the script (``train/train.py``) and its overrides as ``{key: value}`` (``++key`` and ``key`` are one key: runs
    recorded before stage keys were passed as ``++key=value`` compare equal)."""
    out = []
    for argv in commands:
        script = Path(argv[1])
        out.append({"script": f"{script.parent.name}/{script.name}", "overrides": override_pairs(argv[2:])})
    return out


def differences(old: list[dict], new: list[dict]) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` over every command (``None`` where a key is absent; a changed script or
    number of commands shows as the key ``<script>``)."""
    if [c["script"] for c in old] != [c["script"] for c in new]:
        return {"<script>": ([c["script"] for c in old], [c["script"] for c in new])}
    diff: dict[str, tuple] = {}
    for a, b in zip(old, new):
        for k in sorted(set(a["overrides"]) | set(b["overrides"])):
            va, vb = a["overrides"].get(k), b["overrides"].get(k)
            if va != vb:
                diff[k] = (va, vb)
    return diff


def resumable(stage: str, diff: dict) -> bool:
    extra = STAGE_RESUMABLE.get(stage)
    return all(RESUMABLE.match(k) or (extra is not None and extra.match(k)) for k in diff)


def describe(diff: dict) -> str:
    return "; ".join(
        f"{k}: {a if a is not None else '(unset)'} -> {b if b is not None else '(unset)'}"
        for k, a, b in ((k, *v) for k, v in diff.items())
    )


def read_marker(path: Path) -> dict | None:
    """A DONE.json / STARTED.json of ours, or None (absent, or unreadable: a crash mid-write of an old version)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "commands" in data else None


def made_by_train_all(d: Path) -> bool:
    return read_marker(d / "STARTED.json") is not None or read_marker(d / "DONE.json") is not None


def move_aside(d: Path) -> Path:
    """Rename ``out_dir/<stage>`` to ``out_dir/<stage>.old-<time>`` (never delete: it may hold checkpoints)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = d.with_name(f"{d.name}.old-{stamp}")
    n = 1
    while target.exists():
        target, n = d.with_name(f"{d.name}.old-{stamp}-{n}"), n + 1
    d.rename(target)
    return target


def refuse(name: str, d: Path, state: str, diff: dict) -> SystemExit:
    return SystemExit(
        f"[train_all] {name}: {d} holds {'an' if state[0] in 'aeiou' else 'a'} {state} run made with other settings, which a resume cannot carry over "
        f"({describe(diff)}). Nothing was changed. To redo the stage with the new settings use force=[{name}] "
        f"(the old outputs move to {d.name}.old-<time>/, nothing is deleted), or choose another out_dir."
    )


def plan_stage(cfg: DictConfig, plan: Plan, name: str, stage: Stage, *, forced: bool, stale: list[str]) -> str:
    """What to do with one stage: ``"skip"``, ``"resume"`` (continue the run in its dir), ``"fresh"`` (start in an
    empty dir; an old one is moved aside first). Raises ``SystemExit`` — before anything is touched — when the dir
    is not train_all's, or holds a run whose settings differ in a way a resume cannot carry over."""
    d = plan.dir(name)
    if not d.exists() or not any(d.iterdir()):
        return "fresh"
    if not made_by_train_all(d):
        raise SystemExit(
            f"[train_all] {name}: {d} exists and was not made by train_all (no DONE.json/STARTED.json); "
            "nothing was changed. Move it away or choose another out_dir."
        )
    if forced or stale:
        return "fresh"
    new = identity(stage.commands)
    done, started = read_marker(d / "DONE.json"), read_marker(d / "STARTED.json")
    if done is not None:
        diff = differences(identity(done["commands"]), new)
        if not diff:
            return "skip"
        if not resumable(name, diff):
            raise refuse(name, d, "finished", diff)
        if name in TRAINED and any(EXTENDS.match(k) for k in diff):
            print(f"[train_all] {name}: finished before; continuing it with {describe(diff)}", flush=True)
            return "resume"
        print(f"[train_all] {name}: finished before; kept ({describe(diff)} does not change a finished run)")
        return "skip"
    if not cfg.resume:
        return "fresh"
    diff = differences(identity(started["commands"]), new) if started is not None else {}
    if diff and not resumable(name, diff):
        raise refuse(name, d, "unfinished", diff)
    if name in (*TRAINED, "embeddings"):
        return "resume"
    return "fresh" if diff else "rerun"


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run the listed stages in order.

    Returns ``{stage: {"status": "ran" | "skipped" | "given" | "would run" (dry_run), "wall_s": seconds}}``.
    Never deletes anything: a stage started afresh over an old run of its own has the old dir moved aside.
    """
    plan = Plan(cfg)
    stages = [s for s in STAGES if s in set(cfg.stages)]
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"stages= lists unknown stages {unknown}; expected some of {list(STAGES)}")
    force = forced_stages(cfg.force)
    plan.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(plan.out / "train_all.yaml", "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    ran: set[str] = set()
    summary: dict[str, dict] = {}
    for name in stages:
        if name in plan.given:
            print(f"[train_all] {name}: using the given checkpoint {plan.given[name]}", flush=True)
            summary[name] = {"status": "given"}
            continue
        stage = plan.build(name)
        stale = [s for s in DEPENDS[name] if s in ran]
        action = plan_stage(cfg, plan, name, stage, forced=name in force, stale=stale)
        if action == "skip":
            prev = read_marker(done_path(plan, name)) or {}
            print(f"[train_all] {name}: done ({prev.get('wall_s', 0):.0f} s), skipped", flush=True)
            summary[name] = {"status": "skipped", "wall_s": prev.get("wall_s")}
            continue
        why = (
            "forced"
            if name in force
            else f"{', '.join(stale)} reran"
            if stale
            else {"resume": "resuming", "rerun": "rerunning an unfinished run", "fresh": "not done yet"}[action]
        )
        print(f"\n[train_all] ===== {name} ({why}) =====", flush=True)
        if cfg.dry_run:
            for argv in stage.commands:
                print(shell_join(argv))
            ran.add(name)
            summary[name] = {"status": "would run"}
            continue
        commands = [list(argv) for argv in stage.commands]  # as recorded (without a resume's ckpt_path)
        d = plan.dir(name)
        if action == "fresh" and d.exists() and any(d.iterdir()):
            print(f"[train_all] {name}: the previous outputs are kept in {move_aside(d)}", flush=True)
        resumed = action == "resume" and name in TRAINED and bool(run_checkpoints(d))
        # a finished stage continued to more steps: its DONE.json times cover the whole run, not the last part
        before = (read_marker(done_path(plan, name)) or {}) if resumed else {}
        if resumed:
            print(f"[train_all] {name}: resuming from {run_checkpoints(d)[0][1]}", flush=True)
            stage.commands[0].append("ckpt_path=last")  # the newest checkpoint of the stage's run dir
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / "STARTED.json", {"stage": name, "commands": commands})
        t0, cpu0 = time.time(), children_cpu_s()
        if stage.prepare is not None:
            stage.prepare()
        run_commands(stage, cwd=Path.cwd())
        wall, cpu = time.time() - t0, children_cpu_s() - cpu0
        record = {
            "stage": name,
            "wall_s": round(wall + float(before.get("wall_s", 0.0)), 2),
            "cpu_s": round(cpu + float(before.get("cpu_s", 0.0)), 2),
            "resumed": bool(resumed),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "commands": commands,
            "settings": plan.section[name],
            "outputs": stage.outputs,
        }
        if before:
            record["continued"] = {"this_wall_s": round(wall, 2), "this_cpu_s": round(cpu, 2)}
        if name in TRAINED:
            record["outputs"]["ckpt"] = plan.ckpt(name)
            if not Path(plan.ckpt(name)).exists():  # a file, or a sharded (fsdp) checkpoint directory
                raise SystemExit(f"[train_all] stage {name} ended without {plan.ckpt(name)}")
        write_json_atomic(done_path(plan, name), record)
        print(f"[train_all] {name}: done in {wall:.0f} s ({cpu:.0f} CPU-s)", flush=True)
        ran.add(name)
        summary[name] = {"status": "ran", "wall_s": wall}
    if cfg.report and not cfg.dry_run:
        rc = subprocess.call([sys.executable, str(ROOT / "train" / "demo_report.py"), str(plan.out)])
        if rc != 0:
            raise SystemExit(f"[train_all] train/demo_report.py failed (exit status {rc})")
        print(f"[train_all] report: {plan.out / 'report.md'} (and report.html)", flush=True)
    return summary


@hydra.main(config_path="../conf/train_all", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    sys.argv[1:] = stage_override_argv(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
