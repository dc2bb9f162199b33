"""Train one stage of the unCLIP stack.

    python train/train.py stage=clip data.train_urls='/data/{00000..00099}.tar' data.val_urls=... trainer.max_steps=10000
    python train/train.py -m stage=decoder module.diffusion.objective=eps,v       # a sweep (Hydra multirun)

Thin on purpose: compose -> seed -> instantiate data, module, loggers, callbacks, trainer -> fit.
Everything a stage needs is in conf/stage/<stage>.yaml and the classes it names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None or "_target_" not in conf:
            continue
        if name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline" if conf.get("offline", True) else "online")
        loggers.append(instantiate(conf))
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def log_run_config(loggers: list, cfg: DictConfig) -> None:
    """Record the resolved config and the code version (git sha) with every logger."""
    sha = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "unknown"
    params = OmegaConf.to_container(cfg, resolve=True)
    params["git_sha"] = sha
    for lg in loggers:
        lg.log_hyperparams(params)


def instantiate_module(cfg: DictConfig):
    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(cfg.module, optimizer=optimizer, scheduler=scheduler, _convert_="all")


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate_module(cfg)
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, _convert_="all")
    log_run_config(loggers, cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    ckpt_cb = trainer.checkpoint_callback
    result = {
        "output_dir": cfg.paths.output_dir,
        "last_ckpt": getattr(ckpt_cb, "last_model_path", None) or None,
        "best_ckpt": getattr(ckpt_cb, "best_model_path", None) or None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    if trainer.is_global_zero:
        print(f"[dalle2] last checkpoint: {result['last_ckpt']}")
        if result["best_ckpt"]:
            print(f"[dalle2] best checkpoint: {result['best_ckpt']}")
    return result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    # the sweep/hparams_search objective, when the config names one
    objective = cfg.get("optimized_metric")
    return result["metrics"].get(objective) if objective else None


if __name__ == "__main__":
    main()
