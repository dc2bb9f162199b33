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
    score_clip  train/train.py: an independent CLIP for the CLIP score (another seed, the other half of the train
                shards; the generator's CLIP then trains on the first half) -> out_dir/score_clip/checkpoints/last.ckpt
    evaluate    eval/evaluate.py task=samples (CLIP score by score_clip when there is one) -> out_dir/evaluate/metrics.json

then train/demo_report.py writes out_dir/report.md (+ report.html). A stage that succeeded leaves
out_dir/<stage>/DONE.json (wall time, commands, settings) and is skipped next time unless forced; a stage that
runs makes the later stages that use its output run again. conf/train_all/config.yaml has every option.

This file turns the config into each stage's commands and runs them in order; the plain logic (command lines,
a run's identity, what to do with each stage, running it) lives in dalle2/train_all/.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dalle2.io import atomic_write, write_json_atomic  # noqa: E402
from dalle2.lit.checkpoints import remove_stale_temp_files, run_checkpoints  # noqa: E402
from dalle2.train_all import DEPENDS, STAGES, TRAINED  # noqa: E402,F401
from dalle2.train_all.commands import (  # noqa: E402,F401
    TRAIN_GROUPS,
    Stage,
    flatten,
    format_value,
    mirrored_urls,
    overrides,
    shell_join,
    stage_override_argv,
    train_halves,
    write_prompts,
)
from dalle2.train_all.identity import OUTPUTS, fingerprint, read_marker  # noqa: E402
from dalle2.train_all.planning import (  # noqa: E402
    RUNS,
    Decision,
    Upstream,
    forced_stages,
    format_plan,
    plan_stages,
    refusals,
)
from dalle2.train_all.runner import Attempt, earlier_attempts, move_aside, run_commands, total  # noqa: E402

# --------------------------------------------------------------------------------------------- stages


def container(node) -> dict:
    """A config section as a plain dict (``{}`` for a missing or empty one)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


class Plan:
    """The commands of every stage, from the train_all config; paths of earlier stages' outputs are fixed by out_dir."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir).resolve()
        self.started = time.time()
        self.py = sys.executable
        self.section = {s: container(cfg.get(s)) for s in STAGES}
        self.data = OmegaConf.to_container(cfg.data, resolve=True)
        self.given = {k: v for k, v in OmegaConf.to_container(cfg.ckpt, resolve=True).items() if v}

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def ckpt(self, stage: str) -> str:
        return str(self.given.get(stage) or self.dir(stage) / "checkpoints" / "last.ckpt")

    def report_urls(self) -> str:
        """The held-out shards the reported figures use (``report_split``: test, or val while choosing)."""
        split = str(self.cfg.get("report_split") or "test")
        if split not in ("val", "test"):
            raise SystemExit(f"report_split must be val or test, got {split!r}")
        urls = self.data.get(f"{split}_urls")
        if not urls:
            raise SystemExit(f"report_split={split} but data.{split}_urls is not set (give it, or report_split=val)")
        return urls

    def emb_urls(self, split: str) -> str:
        return mirrored_urls(self.data[f"{split}_urls"], self.dir("embeddings") / split)

    def train_cmd(self, stage: str, defaults: dict) -> list[str]:
        base = {"hydra.run.dir": str(self.dir(stage)), **defaults}
        return [self.py, str(ROOT / "train" / "train.py"), *overrides(base, self.section[stage])]

    def build(self, stage: str) -> Stage:
        d, data = self.dir(stage), self.data
        if stage in ("clip", "score_clip"):
            urls = data["train_urls"]
            if self.trains_score_clip():  # the two CLIPs see disjoint halves of the train shards
                urls = train_halves(urls)[stage == "score_clip"]
            return Stage(stage, [self.train_cmd(stage, {"data.train_urls": urls, "data.val_urls": data["val_urls"]})])
        if stage == "retrieval":
            base = {
                "task": "retrieval",
                "clip_ckpt": self.ckpt("clip"),
                "data.urls": self.report_urls(),
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
                write_prompts(prompts, file=pcfg.file, num=int(pcfg.num), val_urls=self.report_urls())

            return Stage(stage, [cmd], prepare=prepare)
        if stage == "evaluate":
            base = {
                "task": "samples",
                "samples": str(self.dir("sample")),
                "reference.urls": self.report_urls(),
                "clip_ckpt": self.ckpt("clip"),
                "out": str(d / "metrics.json"),
                "hydra.run.dir": str(d),
            }
            if "score_clip" in self.enabled_models():  # the CLIP score from a CLIP that did not make the images
                base["clip_score.ckpt"] = self.ckpt("score_clip")
            return Stage(stage, [[self.py, str(ROOT / "eval" / "evaluate.py"), *overrides(base, self.section[stage])]])
        raise SystemExit(f"unknown stage {stage!r}; expected some of {list(STAGES)}")

    def trains_score_clip(self) -> bool:
        """Whether this run trains the independent scoring CLIP (listed, not given as a file)."""
        return "score_clip" in set(self.cfg.stages) and "score_clip" not in self.given

    def enabled_models(self) -> set[str]:
        """Trained stages whose checkpoint exists or will be made in this run (an upsampler is optional)."""
        listed = set(self.cfg.stages)
        return {
            s for s in TRAINED if s in listed or s in self.given or Path(self.ckpt(s)).exists()
        }  # a file, or a sharded (fsdp) checkpoint dir


# --------------------------------------------------------------------------------------------- running


def done_path(plan: Plan, stage: str) -> Path:
    return plan.dir(stage) / "DONE.json"


def uses(plan: Plan, stages: list[str]) -> dict[str, tuple[str, ...]]:
    """The earlier stages whose outputs each stage reads (an upsampler only when the cascade has one)."""
    enabled = plan.enabled_models()
    return {s: tuple(u for u in DEPENDS[s] if u not in TRAINED or u in enabled) for s in stages}


def resolution_errors(commands: dict[str, list[str]], conf_dir: Path) -> dict[str, str]:
    """``{stage: error}`` for the stages (name -> train/train.py argv) that would train on pictures smaller than
    their resolution: each command line composed as train.py composes it (Hydra's compose API, with train_all's own
    Hydra state put back after) and checked by ``check_config_resolution``, the check train.py makes at its start.
    A command line that does not compose here is left to the stage (it fails with Hydra's own message)."""
    if not commands:
        return {}
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from dalle2.data.resolution import ResolutionError, check_config_resolution

    errors: dict[str, str] = {}
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            for stage, argv in commands.items():
                overrides = [a for a in argv[2:] if not a.lstrip("+").startswith("hydra.")]
                try:
                    cfg = compose(config_name="config", overrides=overrides)
                except Exception:  # noqa: BLE001 - the stage reports its own composition error
                    continue
                try:
                    check_config_resolution(cfg)
                except ResolutionError as exn:
                    errors[stage] = str(exn)
    finally:
        restore_gh_from_backup(backup)
    return errors


def run(cfg: DictConfig) -> dict[str, dict]:
    """Plan every listed stage (print what each will do and why), refuse before anything runs when a stage must,
    else run the stages that need it, in order.

    Returns ``{stage: {"status": "ran" | "skipped" | "given" | "would run" (dry_run), "wall_s": seconds}}``.
    Never deletes anything: a stage started afresh over an old run of its own has the old dir moved aside.
    """
    plan = Plan(cfg)
    stages = [s for s in STAGES if s in set(cfg.stages)]
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"stages= lists unknown stages {unknown}; expected some of {list(STAGES)}")
    force = forced_stages(cfg.force)
    built = {s: plan.build(s) for s in stages if s not in plan.given}
    reads = uses(plan, list(STAGES))
    upstream = Upstream({s: plan.dir(s) for s in STAGES}, plan.given)
    decisions = plan_stages(
        stages,
        dirs={s: plan.dir(s) for s in STAGES},
        commands={s: stage.commands for s, stage in built.items()},
        uses=reads,
        given=plan.given,
        force=force,
        resume=bool(cfg.resume),
        out_dir=plan.out,
        upstream=upstream,
    )
    too_small = resolution_errors(
        {d.stage: built[d.stage].commands[0] for d in decisions if d.action in RUNS and d.stage in TRAINED},
        ROOT / "conf",
    )
    decisions = [
        Decision(d.stage, "refuse", "pictures smaller than its resolution", message=f"[train_all] {too_small[d.stage]}")
        if d.stage in too_small
        else d
        for d in decisions
    ]
    print(format_plan(decisions, plan.out), flush=True)
    refused = refusals(decisions)
    if refused is not None:
        raise refused
    if not cfg.dry_run:
        plan.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(plan.out, started=plan.started)  # e.g. a train_all.yaml whose write was killed
        with atomic_write(plan.out / "train_all.yaml", "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    summary: dict[str, dict] = {}
    for dec in decisions:
        name = dec.stage
        if dec.action == "given":
            summary[name] = {"status": "given"}
            continue
        if dec.action == "skip":
            prev = read_marker(done_path(plan, name)) or {}
            summary[name] = {"status": "skipped", "wall_s": prev.get("wall_s")}
            continue
        stage = built[name]
        print(f"\n[train_all] ===== {name} ({dec.reason}) =====", flush=True)
        if cfg.dry_run:
            for argv in stage.commands:
                print(shell_join(argv))
            summary[name] = {"status": "would run"}
            continue
        summary[name] = run_stage(
            plan, stage, dec, uses=reads[name], upstream=upstream, heartbeat_s=float(cfg.get("heartbeat_s", 30))
        )
        upstream.forget(name)
    if cfg.report and not cfg.dry_run:
        rc = subprocess.call([sys.executable, str(ROOT / "train" / "demo_report.py"), str(plan.out)])
        if rc != 0:
            raise SystemExit(f"[train_all] train/demo_report.py failed (exit status {rc})")
        print(f"[train_all] report: {plan.out / 'report.md'} (and report.html)", flush=True)
    return summary


def run_stage(
    plan: Plan, stage: Stage, dec: Decision, *, uses: tuple[str, ...], upstream: Upstream, heartbeat_s: float = 30.0
) -> dict:
    """Run one stage as decided (``run``: from the start, an old dir moved aside; ``resume``: from its newest
    checkpoint), then write its DONE.json: every attempt at the stage and their summed wall and CPU time (a stage
    killed and resumed cost all of its attempts), commands, settings, the sha256 of what it consumed (``inputs``)
    and of what it made (``fingerprint``)."""
    name, d = stage.name, plan.dir(stage.name)
    commands = [list(argv) for argv in stage.commands]  # as recorded (without a resume's ckpt_path)
    if dec.move_aside and d.exists() and any(d.iterdir()):
        print(f"[train_all] {name}: the previous outputs are kept in {move_aside(d)}", flush=True)
    elif d.exists():  # what a killed attempt's saves left half-written (a checkpoint, a shard, a marker)
        remove_stale_temp_files(d, started=plan.started, recursive=True)
    # the attempts so far at this run of the stage (STARTED.json holds every one since the run began; a DONE.json
    # written before attempts were recorded counts as one)
    started = read_marker(d / "STARTED.json")
    attempts = earlier_attempts(started if started and "attempts" in started else read_marker(done_path(plan, name)))
    resumed = dec.action == "resume" and name in TRAINED and bool(run_checkpoints(d))
    if resumed:
        print(f"[train_all] {name}: resuming from {run_checkpoints(d)[0][1]}", flush=True)
        stage.commands[0].append("ckpt_path=last")  # the newest checkpoint of the stage's run dir
    inputs = upstream.inputs(uses)
    d.mkdir(parents=True, exist_ok=True)
    marker = {"stage": name, "out_dir": str(plan.out), "commands": commands, "inputs": inputs, "attempts": attempts}
    with Attempt(d / "STARTED.json", marker, every_s=heartbeat_s) as attempt:
        if stage.prepare is not None:
            stage.prepare()
        run_commands(stage, cwd=Path.cwd())
    if name in TRAINED and not Path(plan.ckpt(name)).exists():  # a file, or a sharded (fsdp) checkpoint directory
        raise SystemExit(f"[train_all] stage {name} ended without {plan.ckpt(name)}")
    attempts = marker["attempts"]
    record = {
        "stage": name,
        "wall_s": total(attempts, "wall_s"),
        "cpu_s": total(attempts, "cpu_s"),
        "attempts": attempts,
        "resumed": bool(resumed),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "out_dir": str(plan.out),
        "commands": commands,
        "settings": plan.section[name],
        "inputs": inputs,
        "fingerprint": fingerprint(d, OUTPUTS[name]),
        "outputs": {**stage.outputs, **({"ckpt": plan.ckpt(name)} if name in TRAINED else {})},
    }
    write_json_atomic(done_path(plan, name), record)
    this = attempt.record
    more = f"; {len(attempts)} attempts, {record['wall_s']:.0f} s in all" if len(attempts) > 1 else ""
    print(f"[train_all] {name}: done in {this['wall_s']:.0f} s ({this['cpu_s']:.0f} CPU-s){more}", flush=True)
    return {"status": "ran", "wall_s": this["wall_s"]}


@hydra.main(config_path="../conf/train_all", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    sys.argv[1:] = stage_override_argv(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
