"""eval/sample.py: files, manifest and grid; same bytes for a seed; the CLI image (i, k) is the pipeline's image for
index (i, k); byte-identical PNGs with 1 process and 2 DDP CPU processes (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT
from dalle2.lit.pipeline_module import PromptBatches, make_items
from test_pipeline import assert_same_8bit, tiny_ckpts  # noqa: F401  (session fixture)

PROMPT_LINES = ["a red circle", "two green squares", "", "x", "a small yellow triangle at the top left"]
OVERRIDES = ["n_per_prompt=2", "batch_size=3", "seed=5", "steps.prior=3", "steps.decoder=3", "steps.upsampler=2",
             "guidance.prior=2.0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]  # fmt: skip


def _load_sample_cli():
    spec = importlib.util.spec_from_file_location("eval_sample", os.path.join(REPO_ROOT, "eval", "sample.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(ckpts: dict, prompts: Path, out_dir: Path, extra=()) -> list[str]:
    return [f"ckpt.clip={ckpts['clip']}", f"ckpt.prior={ckpts['prior']}", f"ckpt.decoder={ckpts['decoder']}",
            f"ckpt.upsamplers=[{ckpts['upsampler']}]", f"prompts={prompts}", f"out_dir={out_dir}",
            *OVERRIDES, *extra]  # fmt: skip


def run_in_process(ckpts: dict, prompts: Path, out_dir: Path, extra=()) -> Path:
    """The CLI's ``run(cfg)`` on conf/sample.yaml + overrides, in this process (no Hydra job), with ONE intra-op
    thread: CPU matmuls reduce in a thread-count-dependent order, and Lightning gives each of the 2 DDP CPU processes
    cpu_count // 2 threads (1 here); at equal threads per process the outputs must be byte-identical."""
    cfg = OmegaConf.load(os.path.join(REPO_ROOT, "conf", "sample.yaml"))
    cfg.pop("hydra"), cfg.pop("defaults")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(_args(ckpts, prompts, out_dir, extra)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _load_sample_cli().run(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPT_LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_ckpts, prompts_file, tmp_path_factory):  # noqa: F811
    return run_in_process(tiny_ckpts, prompts_file, tmp_path_factory.mktemp("sample_ref"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".png", ".jsonl")}


def test_items_and_fixed_batches_over_ranks():
    items = make_items(["a", None, "b"], n_per_prompt=2, seed=3)
    assert [it["file"] for it in items] == ["00000.png", "00000_1.png", "00002.png", "00002_1.png"]
    assert [(it["index"], it["k"]) for it in items] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    dm = PromptBatches(make_items([str(i) for i in range(10)]), batch_size=3)
    for world in (1, 2, 3, 5):
        got = sorted(j for r in range(world) for j in dm.batches_for_rank(r, world))
        assert got == [0, 1, 2, 3]  # every fixed batch exactly once, whatever the world size
    with pytest.raises(ValueError, match="n_per_prompt"):
        make_items(["a"], n_per_prompt=0)


def test_files_manifest_grid_and_deterministic(reference, tiny_ckpts, prompts_file, tmp_path):  # noqa: F811
    names = sorted(p.name for p in reference.iterdir())
    want = [f"{i:05d}{'' if k == 0 else f'_{k}'}.png" for i in (0, 1, 3, 4) for k in (0, 1)]
    assert names == sorted(want + ["grid.png", "manifest.jsonl"])
    rows = [json.loads(line) for line in (reference / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == want  # prompt order
    assert all(r["prompt"] == PROMPT_LINES[r["index"]] and r["seed"] == 5 and r["size"] == 32 for r in rows)
    assert rows[0]["settings"]["decoder"]["steps"] == 3 and rows[0]["settings"]["prior"]["guidance_scale"] == 2.0
    img = np.asarray(Image.open(reference / "00003_1.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 1
    grid = Image.open(reference / "grid.png")
    assert grid.size[0] > 3 * 32 and grid.size[1] > 3 * 32
    # same seed -> same bytes
    again = run_in_process(tiny_ckpts, prompts_file, tmp_path / "again")
    assert _files(again) == _files(reference)
    # another seed -> other images
    other = run_in_process(tiny_ckpts, prompts_file, tmp_path / "other", extra=["seed=6"])
    assert (other / "00000.png").read_bytes() != (reference / "00000.png").read_bytes()


def test_cli_image_is_the_pipeline_image_for_index_i_k(reference, tiny_ckpts):  # noqa: F811
    from dalle2.pipeline import SamplingSettings, UnCLIPPipeline

    pipe = UnCLIPPipeline.from_checkpoints(clip=tiny_ckpts["clip"], prior=tiny_ckpts["prior"],
                                           decoder=tiny_ckpts["decoder"], upsamplers=[tiny_ckpts["upsampler"]])  # fmt: skip
    row = json.loads((reference / "manifest.jsonl").read_text().splitlines()[5])
    assert (row["index"], row["k"]) == (3, 1)
    st = SamplingSettings.from_dict(row["settings"])
    img = pipe([row["prompt"]], seed=row["seed"], indices=[(3, 1)], settings=st)[0]
    png = torch.from_numpy(np.array(Image.open(reference / row["file"]))).permute(2, 0, 1).float() / 255
    assert_same_8bit(img, png)
    first = pipe([PROMPT_LINES[0]], seed=5, indices=[0], settings=st)[0]  # k = 0 is index i
    assert_same_8bit(first, torch.from_numpy(np.array(Image.open(reference / "00000.png"))).permute(2, 0, 1) / 255)


def test_bad_size_and_wrong_stage_are_clear_errors(tiny_ckpts, prompts_file, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"size=48 .* one of \[16, 32\]"):
        run_in_process(tiny_ckpts, prompts_file, tmp_path / "a", extra=["size=48"])
    from dalle2.lit.checkpoints import WrongStageError

    with pytest.raises(WrongStageError, match="a 'decoder' checkpoint was expected"):
        run_in_process({**tiny_ckpts, "decoder": tiny_ckpts["upsampler"]}, prompts_file, tmp_path / "b")
    assert run_in_process(tiny_ckpts, prompts_file, tmp_path / "c", extra=["size=16"]).joinpath("00000.png").exists()
    assert Image.open(tmp_path / "c" / "00000.png").size == (16, 16)


@pytest.mark.slow
def test_two_ddp_processes_give_byte_identical_pngs(reference, tiny_ckpts, prompts_file, tmp_path):  # noqa: F811
    out = tmp_path / "ddp2"
    cmd = [sys.executable, "eval/sample.py", *_args(tiny_ckpts, prompts_file, out),
           "trainer.devices=2", "trainer.strategy=ddp"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # as the reference (see run_in_process)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 images (32 px)" in proc.stdout
    assert _files(out) == _files(reference)  # every PNG and the manifest, byte for byte
    assert (out / "grid.png").exists()
