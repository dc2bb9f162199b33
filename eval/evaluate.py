"""Evaluate checkpoints and write metrics as JSON.

    python eval/evaluate.py task=retrieval clip_ckpt=runs/clip/.../last.ckpt data.urls='val/{00000..00001}.tar' out=r.json

task=retrieval: zero-shot image->text and text->image R@1/5/10 and mean rank over every sample of the shards,
features gathered from all ranks (trainer.devices=N) before ranking.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.datamodule import WebDataModule  # noqa: E402
from dalle2.lit.clip_module import load_clip  # noqa: E402


def evaluate_retrieval(cfg: DictConfig) -> dict:
    module = load_clip(cfg.clip_ckpt)
    dm = WebDataModule(
        train_urls=None,
        val_urls=cfg.data.urls,
        image_size=cfg.data.image_size or module.model.image_size,
        val_batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        tokenizer_path=cfg.data.tokenizer_path,
        context_length=module.model.context_length,
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    [metrics] = trainer.validate(module, datamodule=dm, verbose=False)
    result = {k.removeprefix("val/"): v for k, v in metrics.items()}
    result["num_samples"] = int(result["num_samples"])
    return result


TASKS = {"retrieval": evaluate_retrieval}


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.task not in TASKS:
        raise SystemExit(f"unknown task {cfg.task!r}; expected one of {sorted(TASKS)}")
    result = TASKS[cfg.task](cfg)
    text = json.dumps(result, indent=2, sort_keys=True)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(text + "\n")
        print(f"[dalle2] wrote {cfg.out}")
    print(text)


if __name__ == "__main__":
    main()
