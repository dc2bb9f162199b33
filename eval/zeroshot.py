"""Zero-shot image classification of a CLIP on labelled image shards; writes the metrics as JSON.

    python eval/zeroshot.py clip_ckpt=runs/clip/.../last.ckpt "data.urls='data_builtin/val/{00000..00001}.tar'" \
        classnames=builtin_shapes templates=builtin_templates "label='{shape}'" out=zeroshot.json [trainer.devices=N]

open_clip's ImageNet protocol (dalle2/clip/zeroshot.py): class names and prompt templates from files, each class's
weight the mean of its templates' normalised text embeddings (renormalised), top-1 / top-5 accuracy.  A sample's class
is its ``.json`` formatted with ``label`` ("{shape}", "{color} {shape}"); samples naming no known class are counted
(``num_unlabelled``), not scored.  Runs as the CLIP's own validation: image features gathered from all ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.clip.zeroshot import ZeroShotTask  # noqa: E402
from dalle2.data.datamodule import WebDataModule  # noqa: E402
from dalle2.io import write_json_atomic  # noqa: E402
from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.lit.clip_module import load_clip  # noqa: E402
from dalle2.lit.distributed import releases_process_group  # noqa: E402


def run(cfg: DictConfig) -> dict:
    try:
        task = ZeroShotTask.from_files(cfg.classnames, cfg.templates, label=cfg.label, ks=tuple(cfg.ks))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    module = load_clip(cfg.clip_ckpt, trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
    tokenizer = module.tokenizer(cfg.data.tokenizer_path)
    module.set_zeroshot(task, tokenizer=tokenizer)
    dm = WebDataModule(
        train_urls=None,
        val_urls=cfg.data.urls,
        image_size=cfg.data.image_size or module.model.image_size,
        val_batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        tokenizer=tokenizer,
        context_length=module.model.context_length,
    )
    trainer = instantiate(cfg.trainer)
    [metrics] = trainer.validate(module, datamodule=dm, verbose=False)
    if not trainer.is_global_zero:
        return None  # every rank holds the gathered result; rank 0 writes it
    result = {k.removeprefix("val/zeroshot/"): v for k, v in metrics.items() if k.startswith("val/zeroshot/")}
    for k in ("num_samples", "num_unlabelled", "num_classes"):
        result[k] = int(result.get(k, 0))
    result.update(
        clip_ckpt=str(cfg.clip_ckpt),
        urls=str(cfg.data.urls),
        classnames=str(cfg.classnames),
        templates=str(cfg.templates),
        num_templates=len(task.templates),
        label=task.label,
    )
    return result


@hydra.main(config_path="../conf", config_name="zeroshot", version_base="1.3")
@releases_process_group
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except CHECKPOINT_ERRORS as e:  # a refused / wrong-stage / missing checkpoint, a mismatched vocabulary: one line
        raise SystemExit(f"error: {e}") from None
    if result is None:  # a non-zero rank of a multi-process run
        return
    if result["num_samples"] == 0:
        raise SystemExit(
            f"error: no sample of {cfg.data.urls} has a class of {cfg.classnames} "
            f"(label={cfg.label!r} over each sample's .json)"
        )
    text = json.dumps(result, indent=2, sort_keys=True)
    if cfg.out:
        write_json_atomic(cfg.out, result)
        print(f"[dalle2] wrote {cfg.out}")
    print(text)


if __name__ == "__main__":
    main()
