"""Train one stage of the unCLIP stack.

    python train/train.py stage=clip data.train_urls='/data/{00000..00099}.tar' data.val_urls=... trainer.max_steps=10000
    python train/train.py -m stage=decoder module.diffusion.objective=eps,v       # a sweep (Hydra multirun)

Thin on purpose: compose -> seed -> instantiate data, module, loggers, callbacks, trainer -> fit.
Everything a stage needs is in conf/stage/<stage>.yaml and the classes it names.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from dalle2.data.resolution import ResolutionError, check_config_resolution  # noqa: E402
from dalle2.lit.checkpoints import (  # noqa: E402
    CHECKPOINT_ERRORS,
    RunDirInUseError,
    WrongStageError,
    checkpoint_stage,
    resolve_ckpt_path,
)
from dalle2.lit.distributed import releases_process_group  # noqa: E402
from dalle2.lit.fault_tolerance import AtomicCheckpointIO, CheckpointSaveError, Preemption  # noqa: E402
from dalle2.lit.precision import resolve_precision  # noqa: E402


def hydra_job() -> dict:
    """This job's overrides and, in a multirun, the sweep's name and job number (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"overrides": [], "sweep": None, "num": None}
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    return {
        "overrides": list(hc.overrides.task),
        "sweep": os.path.basename(os.path.normpath(hc.sweep.dir)) if multirun else None,
        "num": hc.job.num if multirun else None,
    }


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None or "_target_" not in conf:
            continue
        kw = {}
        if name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline" if conf.get("offline", True) else "online")
            job = hydra_job()
            if conf.get("group") is None:  # a sweep's jobs share a group; a single run is grouped by stage
                kw["group"] = job["sweep"] or cfg.get("stage_name")
            if conf.get("name") is None and job["sweep"]:
                kw["name"] = f"{job['sweep']}/{job['num']}:" + ",".join(job["overrides"])[:100]
        loggers.append(instantiate(conf, **kw))
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def build_plugins(cfg: DictConfig) -> list:
    """``trainer.plugins`` (instantiated) plus atomic local checkpoint writes, unless a plugin does checkpoint IO."""
    from lightning.pytorch.plugins.io import CheckpointIO

    plugins = [instantiate(p) if isinstance(p, DictConfig) else p for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def git_state() -> dict:
    """The checkout this script runs from (not the working directory): full commit sha and whether it has
    uncommitted changes; "unknown" outside a git checkout."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha or "unknown", "git_dirty": None if sha is None or dirty is None else bool(dirty)}


def log_run_config(loggers: list, cfg: DictConfig, trainer=None) -> None:
    """Record the resolved config, the code version (git sha, dirty flag) and what actually runs with every logger:
    ``resolved_precision`` is the trainer's precision after ``bf16-mixed-if-native`` was resolved for this machine
    (``bf16-mixed`` or ``32-true``; the config keeps what was asked)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params.update(git_state())
    if trainer is not None:
        params["resolved_precision"] = str(trainer.precision)
    for lg in loggers:
        lg.log_hyperparams(params)


class StartLoggers(L.Callback):
    """Hands the loggers to the trainer when fit starts, after the data is set up, and records the run's config with
    them: Lightning starts every logger's run (a wandb offline run folder, a csv folder) before the datamodule's
    setup, so a run that fails before training would leave a logger run behind for nothing."""

    def __init__(self, loggers: list, cfg: DictConfig):
        self.loggers, self.cfg = loggers, cfg

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.loggers:
            trainer.loggers = self.loggers
            log_run_config(self.loggers, self.cfg, trainer)


def check_shards(cfg: DictConfig) -> None:
    """Stop before anything is built when a shard pattern names a local file that is not there, in one line that
    names the fix: ``make data`` for the built-in shards, the config key for the user's own."""
    from dalle2.data.urls import expand_urls

    data = cfg.get("data")
    if data is None:
        return
    commands = OmegaConf.to_container(data.url_commands, resolve=True) if data.get("url_commands") else None
    builtin = os.path.abspath(str(cfg.paths.data_dir)) if cfg.get("paths") else None
    for key in ("train_urls", "val_urls"):
        if key not in data or OmegaConf.is_missing(data, key) or not data.get(key):
            continue
        urls = data.get(key)
        try:
            expand_urls(OmegaConf.to_container(urls) if OmegaConf.is_config(urls) else urls, url_commands=commands)
        except (FileNotFoundError, ValueError) as exn:
            first = (urls if isinstance(urls, str) else str(list(urls)[0])).split("::")[0]
            if builtin and os.path.abspath(first).startswith(builtin + os.sep):
                fix = f"run `make data` (or set data.{key}=... to your own shards)"
            else:
                fix = f"check data.{key}=..."
            raise SystemExit(f"error: data.{key}: {exn}: {fix}") from None


def instantiate_module(cfg: DictConfig):
    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(cfg.module, optimizer=optimizer, scheduler=scheduler, _convert_="all")


def load_checkpoints(cfg: DictConfig, module, ckpt_path: str | None, trust: bool):
    """Check the resume checkpoint (safe load, stage) and give a prior/decoder its frozen CLIP, safely loaded.
    Returns the tokenizer the data must use: the CLIP's vocabulary (None: the data config's own)."""
    if ckpt_path:
        found = checkpoint_stage(ckpt_path, trust_checkpoint=trust)
        if found != module.stage:
            what = f"a {found!r} checkpoint" if found else "not a dalle2 checkpoint"
            raise WrongStageError(f"ckpt_path={ckpt_path} is {what}, but this run trains a {module.stage!r}")
    clip_ckpt = module.hparams.get("clip_ckpt") if hasattr(module, "set_clip") else None
    if not clip_ckpt:
        return None
    from dalle2.lit.clip_module import load_clip

    clip = load_clip(clip_ckpt, trust_checkpoint=trust)
    module.set_clip(clip)
    return clip.tokenizer(cfg.data.get("tokenizer_path"))


def apply_init_from(cfg: DictConfig, trust: bool):
    """``init_from=<stage file>``: the module config takes the file's network, diffusion and structural settings (and a
    decoder's data its image size); returns the file (its weights are loaded once the module exists) or None."""
    if not cfg.get("init_from"):
        return None
    from omegaconf import open_dict

    from dalle2.lit.init_from import init_module_config, read_init

    try:
        found = read_init(str(cfg.init_from), str(cfg.get("stage_name")), trust_checkpoint=trust)
    except (*CHECKPOINT_ERRORS, ValueError) as e:
        raise SystemExit(f"error: init_from: {e}") from None
    with open_dict(cfg):
        for key, value in init_module_config(found).items():
            cfg.module[key] = value
        if found.stage == "decoder" and "image_size" in found.hparams:
            cfg.data.image_size = int(found.hparams["image_size"])
    return found


def check_data_resolution(cfg: DictConfig) -> None:
    """Stop before anything is built when the training pictures are smaller than the stage's resolution (a 256 px
    upsampler on 64 px pictures would learn upsampled, blurred targets): dalle2.data.resolution."""
    try:
        check_config_resolution(cfg)
    except ResolutionError as exn:
        sys.exit(f"[dalle2] error: {exn}")


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    try:
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    except RunDirInUseError as exn:
        sys.exit(f"[dalle2] {exn}")
    check_shards(cfg)
    trust = bool(cfg.get("trust_checkpoint", False))
    init = apply_init_from(cfg, trust)
    check_data_resolution(cfg)
    module = instantiate_module(cfg)
    if init is not None:
        from dalle2.lit.init_from import load_init_weights

        try:
            load_init_weights(module, init)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        tokenizer = load_checkpoints(cfg, module, ckpt_path, trust)
    except CHECKPOINT_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    if tokenizer is None and init is not None and init.vocabulary is not None:
        tokenizer = init.vocabulary.tokenizer()  # the data is tokenized as the stage's CLIP was
    datamodule = instantiate(cfg.data, _convert_="all", **({"tokenizer": tokenizer} if tokenizer is not None else {}))
    loggers = build_loggers(cfg)
    callbacks = [StartLoggers(loggers, cfg), *build_callbacks(cfg)]  # first: the others may use the loggers
    trainer = instantiate(
        cfg.trainer,
        logger=False,  # StartLoggers hands them over once the data is set up
        callbacks=callbacks,
        plugins=build_plugins(cfg),
        precision=resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto")),
        _convert_="all",
    )
    try:
        # weights_only: our check above read it safely; Lightning must not fall back to torch's (overridable) default
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
    except SIGTERMException:
        pre = next((c for c in callbacks if isinstance(c, Preemption)), None)
        if trainer.is_global_zero:
            saved = pre.saved_path if pre else "nothing (no Preemption callback)"
            print(
                f"[dalle2] preempted at step {trainer.global_step}: saved {saved}; "
                f"continue with ckpt_path=last hydra.run.dir={cfg.paths.output_dir}"
            )
        sys.exit(pre.exit_code if pre else 143)
    except CheckpointSaveError as exn:
        sys.exit(f"[dalle2] stopped: {exn}")

    ckpt_cb = trainer.checkpoint_callback
    result = {
        "output_dir": cfg.paths.output_dir,
        "step": trainer.global_step,
        "last_ckpt": getattr(ckpt_cb, "last_model_path", None) or None,
        "best_ckpt": getattr(ckpt_cb, "best_model_path", None) or None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "overrides": hydra_job()["overrides"],
    }
    if trainer.is_global_zero:
        print(f"[dalle2] last checkpoint: {result['last_ckpt']}")
        if result["best_ckpt"]:
            print(f"[dalle2] best checkpoint: {result['best_ckpt']}")
        # what train/sweep_table.py gathers from each job of a sweep
        with open(os.path.join(cfg.paths.output_dir, "final_metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


# releases_process_group: an orderly gloo/NCCL shutdown, not one by static destructors at exit
@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@releases_process_group
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    # the sweep/hparams_search objective, when the config names one
    objective = cfg.get("optimized_metric")
    return result["metrics"].get(objective) if objective else None


if __name__ == "__main__":
    main()
