"""Lightning DDP (2 CPU processes, 2 workers each) over fewer shards than workers x ranks, uneven shards:
training finishes, and validation sees every val sample exactly once across ranks (both split modes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import lightning.pytorch as pl
    import torch
    from dalle2.data.datamodule import SkippedSamplesLogger, WebDataModule

    class Tok:
        def __call__(self, texts, context_length=77):
            return torch.ones(len(texts), context_length, dtype=torch.long)

    class Tiny(pl.LightningModule):
        def __init__(self, out):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.out = out
            self.keys = []

        def training_step(self, batch, batch_idx):
            return self.lin(batch["image"].mean((2, 3))).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.keys += batch["key"]
            loss = self.lin(batch["image"].mean((2, 3))).pow(2).mean()
            self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["key"]))

        def on_validation_epoch_end(self):
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, self.keys)
            if self.trainer.is_global_zero:
                with open(self.out, "a") as f:
                    f.write(json.dumps([len(g) for g in gathered] + [k for g in gathered for k in g]) + "\\n")
            self.keys = []

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    root, out = sys.argv[1], sys.argv[2]
    def trainer(**kw):
        return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          callbacks=[SkippedSamplesLogger()], **kw)
    # train: 2 uneven shards (64 + 36) < 2 workers x 2 ranks; val: 1 shard (50) < 2 ranks -> split by sample
    dm = WebDataModule(train_urls=f"{root}/a/train/{{00000..00001}}.tar", val_urls=f"{root}/a/val/{{00000..00000}}.tar",
                       image_size=16, batch_size=8, num_workers=2, epoch_size=16, tokenizer=Tok())
    trainer(max_steps=3).fit(Tiny(out), datamodule=dm)
    # val: 3 uneven shards (20 + 20 + 5) >= 2 ranks -> split by shard
    dm = WebDataModule(train_urls=f"{root}/a/train/{{00000..00001}}.tar", val_urls=f"{root}/b/val/{{00000..00002}}.tar",
                       image_size=16, batch_size=8, num_workers=2, tokenizer=Tok())
    trainer().validate(Tiny(out), datamodule=dm)
    """
)


@pytest.mark.timeout(300)
def test_ddp_two_ranks_few_uneven_shards(tmp_path):
    from dalle2.data.synthetic import write_shards

    write_shards(tmp_path / "a", num_train=100, num_val=50, image_size=16, samples_per_shard=64, seed=0)
    write_shards(tmp_path / "b", num_train=1, num_val=45, image_size=16, samples_per_shard=20, seed=1)
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "keys.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[data] no samples skipped" in proc.stdout
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(runs) == 2
    (n0, n1, *keys_a), (m0, m1, *keys_b) = runs
    assert n0 > 0 and n1 > 0 and abs(n0 - n1) <= 1  # by-sample split: balanced
    assert sorted(keys_a) == [f"{100 + i:09d}" for i in range(50)]
    assert m0 > 0 and m1 > 0 and m0 + m1 == 45  # by-shard split: uneven but non-empty
    assert sorted(keys_b) == [f"{1 + i:09d}" for i in range(45)]
