"""eval/sample.py: files, manifest and grid; same bytes for a seed; the CLI image (i, k) is the pipeline's image for
index (i, k); byte-identical PNGs with 1 process and 2 DDP CPU processes (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from dalle2.lit.pipeline_module import PipelineModule, PromptBatches, make_items
from helpers.images import assert_same_8bit
from helpers.scripts import compose_conf, load_script

PROMPT_LINES = ["a red circle", "two green squares", "", "x", "a small yellow triangle at the top left"]
OVERRIDES = [
    "n_per_prompt=2",
    "batch_size=3",
    "seed=5",
    "steps.prior=3",
    "steps.decoder=3",
    "steps.upsampler=2",
    "guidance.prior=2.0",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


def _args(ckpts: dict, prompts: Path, out_dir: Path, extra=()) -> list[str]:
    """The CLI overrides: OVERRIDES, with the keys ``extra`` sets replaced (Hydra refuses a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [
        f"ckpt.clip={ckpts['clip']}",
        f"ckpt.prior={ckpts['prior']}",
        f"ckpt.decoder={ckpts['decoder']}",
        f"ckpt.upsamplers=[{ckpts['upsampler']}]",
        f"prompts={prompts}",
        f"out_dir={out_dir}",
        *(o for o in OVERRIDES if o.split("=", 1)[0] not in keys),
        *extra,
    ]


def run_in_process(ckpts: dict, prompts: Path, out_dir: Path, extra=()) -> Path:
    """The CLI's ``run(cfg)`` on conf/sample.yaml + overrides, in this process (no Hydra job), with ONE intra-op
    thread: CPU matmuls reduce in a thread-count-dependent order, and Lightning gives each of the 2 DDP CPU processes
    cpu_count // 2 threads (1 here); at equal threads per process the outputs must be byte-identical."""
    cfg = compose_conf("sample", _args(ckpts, prompts, out_dir, extra))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_script("eval", "sample").run(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPT_LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_ckpts, prompts_file, tmp_path_factory):
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
    # fewer batches than ranks: the rank left over loads ONE EMPTY batch (it must run the loop and reach the
    # writer's barriers; Lightning refuses a zero-length loader), and predicts no image from it
    dm = PromptBatches(make_items(["a", "b"]), batch_size=8)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    assert list(dm.predict_dataloader()) == [[]]
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    assert [[it["prompt"] for it in b] for b in dm.predict_dataloader()] == [["a", "b"]]
    assert PipelineModule.predict_step(SimpleNamespace(), [])["images"].shape[0] == 0


def test_files_manifest_grid_and_deterministic(reference, tiny_ckpts, prompts_file, tmp_path):
    names = sorted(p.name for p in reference.iterdir())
    want = [f"{i:05d}{'' if k == 0 else f'_{k}'}.png" for i in (0, 1, 3, 4) for k in (0, 1)]
    assert names == sorted(want + ["final_metrics.json", "grid.png", "manifest.jsonl"])  # + timing (no score.*)
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
    # a list of seeds: every image once per seed; seed 5's are the single-seed run's, seed 6's other images
    seeds = run_in_process(tiny_ckpts, prompts_file, tmp_path / "seeds", extra=["seed=[5,6]"])
    rows = [json.loads(line) for line in (seeds / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"]) for r in rows] == [
        (w.replace(".png", f"_s{s}.png"), s) for s in (5, 6) for w in want
    ]

    def load(path):
        return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255

    for w in want:
        assert_same_8bit(load(seeds / w.replace(".png", "_s5.png")), load(reference / w))
        assert (load(seeds / w.replace(".png", "_s6.png")) - load(reference / w)).abs().mean() > 0.01
    with pytest.raises(ValueError, match="distinct"):
        make_items(["a"], seed=[1, 1])


def test_cli_image_is_the_pipeline_image_for_index_i_k(reference, tiny_ckpts):
    from dalle2.pipeline import SamplingSettings, UnCLIPPipeline

    pipe = UnCLIPPipeline.from_checkpoints(
        clip=tiny_ckpts["clip"],
        prior=tiny_ckpts["prior"],
        decoder=tiny_ckpts["decoder"],
        upsamplers=[tiny_ckpts["upsampler"]],
    )
    row = json.loads((reference / "manifest.jsonl").read_text().splitlines()[5])
    assert (row["index"], row["k"]) == (3, 1)
    st = SamplingSettings.from_dict(row["settings"])
    img = pipe([row["prompt"]], seed=row["seed"], indices=[(3, 1)], settings=st)[0]
    png = torch.from_numpy(np.array(Image.open(reference / row["file"]))).permute(2, 0, 1).float() / 255
    assert_same_8bit(img, png)
    first = pipe([PROMPT_LINES[0]], seed=5, indices=[0], settings=st)[0]  # k = 0 is index i
    assert_same_8bit(first, torch.from_numpy(np.array(Image.open(reference / "00000.png"))).permute(2, 0, 1) / 255)


def test_bad_size_and_wrong_stage_are_clear_errors(tiny_ckpts, prompts_file, tmp_path):
    with pytest.raises(ValueError, match=r"size=48 .* one of \[16, 32\]"):
        run_in_process(tiny_ckpts, prompts_file, tmp_path / "a", extra=["size=48"])
    from dalle2.lit.checkpoints import WrongStageError

    with pytest.raises(WrongStageError, match="a 'decoder' checkpoint was expected"):
        run_in_process({**tiny_ckpts, "decoder": tiny_ckpts["upsampler"]}, prompts_file, tmp_path / "b")
    assert run_in_process(tiny_ckpts, prompts_file, tmp_path / "c", extra=["size=16"]).joinpath("00000.png").exists()
    assert Image.open(tmp_path / "c" / "00000.png").size == (16, 16)


def test_two_ddp_processes_give_byte_identical_pngs(reference, tiny_ckpts, prompts_file, tmp_path):
    out = tmp_path / "ddp2"
    cmd = [
        sys.executable,
        "eval/sample.py",
        *_args(tiny_ckpts, prompts_file, out),
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # as the reference (see run_in_process)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 images (32 px)" in proc.stdout
    assert _files(out) == _files(reference)  # every PNG and the manifest, byte for byte
    assert (out / "grid.png").exists()


@pytest.mark.slow
def test_fewer_batches_than_processes_idle_rank_writes_nothing(tiny_ckpts, tmp_path):
    """6 prompts in one batch of 8 on 2 processes: rank 1 gets no batch. It used to die with "`DataLoader` within
    local rank has zero length"; now rank 1 idles and the files are those of 1 process."""
    prompts = tmp_path / "six.txt"
    prompts.write_text(
        "".join(
            f"a {c} circle on the left of a gray background\n"
            for c in ("red", "green", "blue", "yellow", "purple", "red")
        )
    )
    extra = ["n_per_prompt=1", "batch_size=8"]
    one = run_in_process(tiny_ckpts, prompts, tmp_path / "one", extra=extra)
    assert PromptBatches(make_items(["p"] * 6), batch_size=8).batches_for_rank(1, 2) == []
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "eval/sample.py",
        *_args(tiny_ckpts, prompts, out, extra),
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 images (32 px)" in proc.stdout
    assert sorted(_files(out)) == [f"{i:05d}.png" for i in range(6)] + ["grid.png", "manifest.jsonl"]
    assert _files(out) == _files(one)  # byte for byte
    assert (out / "grid.png").exists()


def test_grid_captions_show_every_attribute():
    """Each built-in caption, laid out under a 64 px cell, still names all five attributes (the grid used to cut
    every caption to its first ~14 characters: "an image of a")."""
    from PIL import ImageFont

    from dalle2.data.synthetic import parse_caption, random_captions
    from dalle2.lit.pipeline_module import caption_lines

    font = ImageFont.load_default()
    for caption in random_captions(300, seed=4):
        lines = caption_lines(caption, 64, font=font, max_lines=4)
        assert 1 <= len(lines) <= 4 and all(font.getlength(x) <= 64 for x in lines), lines
        assert parse_caption(" ".join(lines)) == parse_caption(caption), (caption, lines)
    assert caption_lines("a red circle", 64) == ["a red circle"]  # short captions stay as they are
    long = caption_lines("word " * 40, 64, max_lines=3)
    assert len(long) == 3 and long[-1].endswith("\u2026")


def test_grid_draws_the_wrapped_lines():
    from PIL import ImageFont

    from dalle2.lit.pipeline_module import caption_lines, image_grid

    caption = "an image of a small yellow triangle on the left on gray"
    img = np.full((32, 32, 3), 128, dtype=np.uint8)
    grid = np.asarray(image_grid([img], [caption]).convert("L"))
    below = grid[2 + 32 :]  # the caption area under the (only) cell
    ink = (below < 128).any(axis=1)
    bands = int(ink[0]) + int((ink[1:] & ~ink[:-1]).sum())  # runs of rows holding text
    lines = caption_lines(caption, 64, font=ImageFont.load_default())
    assert len(lines) >= 3 and bands == len(lines)
    assert grid.shape[1] >= 64  # a 32 px picture gets a cell wide enough for its words
