"""Zero-shot classification (open_clip's ImageNet protocol): class weights and top-k known by construction with
controlled text/image embeddings, labels from sample json, shipped class/template files, the validation metric of a
CLIP trained a few steps, and eval/zeroshot.py on the built-in data."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from dalle2.clip.zeroshot import (
    ZeroShotTask,
    class_labels,
    read_lines,
    resolve_file,
    topk_accuracy,
    zeroshot_classifier,
    zeroshot_metrics,
)
from dalle2.data.synthetic import ATTRIBUTES
from helpers.tiny_runs import run, tiny_clip_ckpt

CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5"]
TEMPLATES = ["big {}", "{} small"]


class FakeText:
    """A tokenizer + text encoder whose embeddings are chosen: text "big cK" -> 10 * e_K (a long vector),
    "cK small" -> 0.1 * e_(K+1 mod C) (a short one).  Tokens: (B, 2) = (class, template)."""

    dim = len(CLASSES)

    def tokenize(self, texts):
        rows = []
        for t in texts:
            name = next(c for c in CLASSES if c in t.split())
            rows.append([CLASSES.index(name), 0 if t.startswith("big") else 1])
        return torch.tensor(rows)

    def encode(self, tokens):
        cls, tpl = tokens[:, 0], tokens[:, 1]
        target = torch.where(tpl == 0, cls, (cls + 1) % len(CLASSES))
        return F.one_hot(target, self.dim).float() * torch.where(tpl == 0, 10.0, 0.1)[:, None]


def test_class_weight_is_mean_of_normalised_template_embeddings():
    fake = FakeText()
    w = zeroshot_classifier(fake.encode, fake.tokenize, CLASSES, TEMPLATES, batch_size=5)
    assert w.shape == (6, 6)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6))
    # each template counts equally whatever its norm: class K points half-way between e_K and e_(K+1)
    for k in range(6):
        assert w[k, k] == pytest.approx(2**-0.5) and w[k, (k + 1) % 6] == pytest.approx(2**-0.5)


def test_topk_known_by_construction():
    fake = FakeText()
    w = zeroshot_classifier(fake.encode, fake.tokenize, CLASSES, TEMPLATES)
    # class K's weight is (e_K + e_(K+1)) / sqrt2; dot products with these images (unnormalised):
    e = torch.eye(6)
    images = torch.stack(
        [
            e[0] + e[1],  # label 0: c0 2, c5 1, c1 1, others 0             -> rank 1
            e[2] + 0.9 * e[1],  # label 2: c1 1.9, c2 1, c0 0.9, c3 0                  -> rank 2
            e[4] + e[5] + e[0],  # label 2: c4 2, c5 2, c3 1, c0 1, c2 0 = c1 0 (tie) -> rank 5 or 6
            e[1] + e[2] + e[3] + e[4],  # label 5: c1 2, c2 2, c3 2, c0 1, c4 1, c5 0     -> rank 6
        ]
    )
    labels = torch.tensor([0, 2, 2, 5])
    got = zeroshot_metrics(images, labels, w, ks=(1, 2, 5, 6, 7))
    logits = F.normalize(images) @ w.t()
    ranks = [(1 + (logits[i] > logits[i, labels[i]]).sum()).item() for i in range(4)]
    assert ranks == [1, 2, 5, 6]  # by construction (the comments above; row 2's tie taken in its favour)
    # row 2 ties with c1 for places 5 and 6: a random tie-break puts it within the top 5 half the time
    assert got["top1"] == 0.25 and got["top2"] == 0.5 and got["top5"] == 0.625 and got["top6"] == 1.0
    assert "top7" not in got  # k above the number of classes is left out
    assert got["num_samples"] == 4 and got["num_classes"] == 6 and got["num_unlabelled"] == 0
    # the same in chunks, and unlabelled rows skipped and counted
    chunked = zeroshot_metrics(
        torch.cat([images, e[:2]]), torch.cat([labels, torch.tensor([-1, -1])]), w, ks=(1, 2, 5), chunk_size=3
    )
    assert chunked["top1"] == 0.25 and chunked["top2"] == 0.5 and chunked["top5"] == 0.625
    assert chunked["num_unlabelled"] == 2 and chunked["num_samples"] == 4


def test_ties_count_as_a_random_tie_break():
    """Each row's label ties with one other class for first place: half a hit each (formerly a whole one)."""
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert topk_accuracy(logits, torch.tensor([1, 1]), ks=(1, 2)) == {1: 0.5, 2: 1.0}


def test_degenerate_features_score_chance_or_raise():
    """A collapsed image tower (every image the same vector) scores chance (1/C), not 100 %; a shuffled labelling
    scores about chance; NaN/inf features are an error naming the metric and the number of rows."""
    fake = FakeText()
    w = zeroshot_classifier(fake.encode, fake.tokenize, CLASSES, TEMPLATES)
    labels = torch.arange(60) % 6
    got = zeroshot_metrics(torch.ones(60, 6), labels, w, ks=(1, 5))
    assert got["top1"] == pytest.approx(1 / 6) and got["top5"] == pytest.approx(5 / 6)
    assert zeroshot_metrics(torch.zeros(60, 6), labels, w, ks=(1,))["top1"] == pytest.approx(1 / 6)
    assert zeroshot_metrics(w[labels] * 0 + w[0], labels, w, ks=(1,))["top1"] == pytest.approx(1 / 6)
    good = w[labels] + 0.01 * torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
    assert zeroshot_metrics(good, labels, w, ks=(1,))["top1"] == 1.0
    shuffled = labels[torch.randperm(60, generator=torch.Generator().manual_seed(1))]
    assert zeroshot_metrics(good, shuffled, w, ks=(1,))["top1"] < 0.4
    nan = good.clone()
    nan[[3, 7, 9]] = float("nan")
    with pytest.raises(ValueError, match=r"zeroshot_metrics: 3 of 60 image embedding rows hold NaN/inf"):
        zeroshot_metrics(nan, labels, w)
    with pytest.raises(ValueError, match=r"zeroshot_metrics: 6 of 6 class weight rows hold NaN/inf"):
        zeroshot_metrics(good, labels, torch.full_like(w, float("inf")))
    with pytest.raises(ValueError, match=r"1 of 2 class-score rows hold NaN/inf"):
        topk_accuracy(torch.tensor([[1.0, float("nan")], [1.0, 0.0]]), torch.tensor([0, 0]), ks=(1,))


def test_labels_from_sample_json():
    task = ZeroShotTask(classnames=["red circle", "blue square"], templates=["a {}"], label="{color} {shape}")
    metas = [{"color": "blue", "shape": "square"}, {"color": "red", "shape": "cross"}, {"shape": "circle"}, None]
    assert class_labels(metas, task).tolist() == [1, -1, -1, -1]


def test_shipped_files_cover_the_builtin_attributes(tmp_path):
    assert read_lines("builtin_shapes") == ATTRIBUTES["shape"]
    assert read_lines("builtin_colors") == ATTRIBUTES["color"]
    assert len(read_lines("builtin_color_shapes")) == 20
    assert all(t.count("{}") == 1 for t in read_lines("builtin_templates"))
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file.*builtin_shapes"):
        resolve_file("nope.txt")
    bad = tmp_path / "t.txt"
    bad.write_text("# comment\n\na photo\n")
    with pytest.raises(ValueError, match="exactly one '{}'"):
        ZeroShotTask.from_files("builtin_shapes", bad)
    empty = tmp_path / "e.txt"
    empty.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no lines"):
        read_lines(empty)


def test_clip_module_validation_scores_zeroshot(builtin_shards):
    """A tiny CLIP whose image tower is replaced by a controlled one: the validation's zero-shot top-1 equals the
    fraction predicted right, computed here from the same embeddings."""
    import lightning as L

    from dalle2.clip.model import clip_preset
    from dalle2.data.datamodule import WebDataModule
    from dalle2.lit.clip_module import CLIPModule

    net = clip_preset(
        "tiny",
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        vision_patch_size=8,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=32,
    )
    module = CLIPModule(
        network=net,
        val_chunk_size=7,
        zeroshot={"classnames": "builtin_shapes", "templates": "builtin_templates", "label": "{shape}"},
    )
    dm = WebDataModule(
        train_urls=builtin_shards["train"], val_urls=builtin_shards["val"], image_size=32, batch_size=16, num_workers=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    [metrics] = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val/zeroshot/num_samples"] == 64 and metrics["val/zeroshot/num_classes"] == 4
    assert 0.0 <= metrics["val/zeroshot/top1"] <= 1.0 and "val/zeroshot/top5" not in metrics  # 4 classes

    # the expected value from the module's own embeddings, outside Lightning
    with torch.no_grad():
        task = module.zeroshot
        tok = module.tokenizer()
        w = F.normalize(
            torch.stack(
                [
                    F.normalize(
                        module.model.encode_text(tok([t.replace("{}", c) for t in task.templates])), dim=-1
                    ).mean(0)
                    for c in task.classnames
                ]
            ),
            dim=-1,
        )
        feats, labels = [], []
        for batch in dm.val_dataloader():
            feats.append(module(batch["image"], batch["tokens"])["image_features"])
            labels.append(class_labels(batch["meta"], task))
        logits = torch.cat(feats) @ w.t()
        want = (logits.argmax(dim=1) == torch.cat(labels)).float().mean().item()
    assert metrics["val/zeroshot/top1"] == pytest.approx(want, abs=1e-6)


def test_eval_zeroshot_cli_on_builtin_data(builtin_shards, tmp_path):
    out = tmp_path / "zs.json"
    proc = run(
        [
            sys.executable,
            "eval/zeroshot.py",
            f"clip_ckpt={tiny_clip_ckpt(tmp_path / 'clip.ckpt')}",
            f"data.urls='{builtin_shards['val']}'",
            "classnames=builtin_color_shapes",
            "label='{color} {shape}'",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
            f"out={out}",
        ],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["num_samples"] == 64 and result["num_classes"] == 20 and result["num_unlabelled"] == 0
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["num_templates"] == len(read_lines("builtin_templates"))

    bad = run(
        [
            sys.executable,
            "eval/zeroshot.py",
            f"clip_ckpt={tmp_path / 'clip.ckpt'}",
            f"data.urls='{builtin_shards['val']}'",
            "classnames=builtin_shapes",
            "label='{nope}'",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
        ],
        timeout=120,
    )
    assert bad.returncode != 0 and "no sample" in bad.stderr and "label='{nope}'" in bad.stderr


def test_train_clip_tiny_logs_zeroshot(builtin_shards, tmp_path):
    """experiment=clip_tiny turns the metric on (module.zeroshot): a 2-step run logs val/zeroshot/top1 and top5."""
    import csv

    from helpers.tiny_runs import stage_cmd

    cmd = stage_cmd(
        "clip",
        tmp_path / "run",
        train_urls=builtin_shards["train"],
        val_urls=builtin_shards["val"],
        extra=("trainer.max_steps=2", "trainer.val_check_interval=2", "module.val_chunk_size=5"),
    )
    proc = run(cmd, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")) if r.get("val/zeroshot/top1")]
    assert (
        rows and float(rows[-1]["val/zeroshot/num_classes"]) == 20 and float(rows[-1]["val/zeroshot/num_samples"]) == 64
    )
    assert 0.0 <= float(rows[-1]["val/zeroshot/top1"]) <= float(rows[-1]["val/zeroshot/top5"]) <= 1.0
