"""train_all never loses work: a changed unfinished stage resumes (or stops before touching anything), force
moves old outputs aside, the interpreter and checkout paths are not part of a run's identity, folders train_all
did not make are never touched, and its markers are written atomically. The stages' commands are replaced by a
stand-in that writes what a training run writes (checkpoints with their step), so each case takes milliseconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dalle2.sweep import override_pairs
from helpers.scripts import compose_train_all, load_script

train_all = load_script("train", "train_all")


class Killed(Exception):
    pass


class FakeStages:
    """Stands in for ``run_commands``: a trained stage writes ``checkpoints/last.ckpt`` at its max_steps (or, when
    ``kill_at`` is set, at that step and is then "killed"); it records what it found when it started."""

    def __init__(self, out: Path):
        self.out, self.calls, self.kill_at = out, [], None

    def __call__(self, stage, *, cwd):
        argv = stage.commands[0]
        opts = override_pairs(argv[2:])  # ++key=value: a stage key
        last = self.out / stage.name / "checkpoints" / "last.ckpt"
        found = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
        self.calls.append({"stage": stage.name, "argv": list(argv), "found_step": found})
        if stage.name in train_all.TRAINED:
            last.parent.mkdir(parents=True, exist_ok=True)
            step = self.kill_at if self.kill_at is not None else int(opts["trainer.max_steps"])
            torch.save({"global_step": step}, last)
        if self.kill_at is not None:
            raise Killed(stage.name)


@pytest.fixture
def setup(tmp_path, builtin_shards, monkeypatch):
    out = tmp_path / "out"
    fake = FakeStages(out)
    monkeypatch.setattr(train_all, "run_commands", fake)

    def run(*extra, kill_at=None):
        """train_all on the decoder stage; with ``kill_at`` the stage is killed at that step (checkpoint written)."""
        args = [
            f"out_dir={out}",
            "experiment=demo",
            "report=false",
            "stages=[decoder]",
            f"data.train_urls='{builtin_shards['train']}'",
            f"data.val_urls='{builtin_shards['val']}'",
            *extra,
        ]
        fake.kill_at = kill_at
        try:
            return train_all.run(compose_train_all(args))
        except Killed:
            return None
        finally:
            fake.kill_at = None

    return out, fake, run


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_killed_stage_rerun_with_more_steps_resumes_from_its_checkpoint(setup):
    """The reproduced case: max_steps raised on a half-trained stage used to rmtree it, last.ckpt included."""
    out, fake, run = setup
    assert run("decoder.trainer.max_steps=1500", kill_at=700) is None
    summary = run("decoder.trainer.max_steps=3000")
    assert summary["decoder"]["status"] == "ran"
    assert fake.calls[-1]["found_step"] == 700  # the checkpoint was there when the stage started
    assert "ckpt_path=last" in fake.calls[-1]["argv"]
    done = json.loads((out / "decoder" / "DONE.json").read_text())
    assert done["resumed"] is True and not any("ckpt_path" in a for a in done["commands"][0])


def test_incompatible_change_stops_before_touching_anything(setup):
    out, fake, run = setup
    assert run(kill_at=700) is None
    before = snapshot(out / "decoder")
    with pytest.raises(
        SystemExit, match=r"model\.model_channels: \(unset\) -> 64.*force=\[decoder\].*another out_dir"
    ) as e:
        run("decoder.model.model_channels=64")
    assert "Nothing was changed" in str(e.value)
    assert snapshot(out / "decoder") == before and len(fake.calls) == 1


def test_finished_stage_with_more_steps_continues_and_other_changes_stop(setup):
    out, fake, run = setup
    run("decoder.trainer.max_steps=10")
    assert run("decoder.trainer.max_steps=10")["decoder"]["status"] == "skipped"
    assert run("decoder.trainer.max_steps=10", "decoder.trainer.log_every_n_steps=3")["decoder"]["status"] == "skipped"
    done_path = out / "decoder" / "DONE.json"
    first = {**json.loads(done_path.read_text()), "wall_s": 100.0, "cpu_s": 150.0}  # as if the 10 steps took 100 s
    done_path.write_text(json.dumps(first))
    summary = run("decoder.trainer.max_steps=20")
    assert summary["decoder"]["status"] == "ran" and fake.calls[-1]["found_step"] == 10
    assert "ckpt_path=last" in fake.calls[-1]["argv"]
    # the continued stage's times are the whole run's (the report sums them), the last part's kept beside them
    done = json.loads(done_path.read_text())
    assert done["wall_s"] >= 100.0 and done["cpu_s"] >= 150.0
    assert done["wall_s"] - 100.0 == pytest.approx(done["continued"]["this_wall_s"], abs=0.011)
    with pytest.raises(SystemExit, match=r"finished run.*optimizer\.lr"):
        run("decoder.trainer.max_steps=20", "decoder.optimizer.lr=0.5")


def test_force_moves_the_old_outputs_aside(setup):
    out, fake, run = setup
    run("decoder.trainer.max_steps=10")
    old = snapshot(out / "decoder")
    run("decoder.trainer.max_steps=10", "force=[decoder]")
    moved = [p for p in out.iterdir() if p.name.startswith("decoder.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == old  # every file kept, checkpoint included
    assert fake.calls[-1]["found_step"] is None and "ckpt_path=last" not in fake.calls[-1]["argv"]


def test_interpreter_and_checkout_paths_are_not_part_of_the_identity(setup):
    out, fake, run = setup
    assert run(kill_at=5) is None
    started = out / "decoder" / "STARTED.json"
    rec = json.loads(started.read_text())
    rec["commands"] = [
        ["/other/venv/bin/python", "/elsewhere/checkout/train/train.py", *argv[2:]] for argv in rec["commands"]
    ]
    started.write_text(json.dumps(rec))
    run()
    assert fake.calls[-1]["found_step"] == 5 and "ckpt_path=last" in fake.calls[-1]["argv"]


def test_folders_train_all_did_not_make_are_never_touched(setup):
    out, fake, run = setup
    (out / "decoder").mkdir(parents=True)
    (out / "decoder" / "mine.txt").write_text("a user's file")
    (out / "notes.txt").write_text("notes")
    with pytest.raises(SystemExit, match="was not made by train_all"):
        run()
    with pytest.raises(SystemExit, match="was not made by train_all"):
        run("force=[decoder]")
    assert (out / "decoder" / "mine.txt").read_text() == "a user's file" and (out / "notes.txt").exists()
    assert fake.calls == []


def test_markers_are_written_atomically(tmp_path, monkeypatch):
    from dalle2 import io as dio

    path = tmp_path / "DONE.json"
    dio.write_json_atomic(path, {"stage": "old"})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        dio.write_json_atomic(path, {"stage": Unserialisable()})
    with pytest.raises(OSError):
        with dio.atomic_write(path, "w") as f:
            f.write('{"stage": "ne')  # half written, then the disk fails
            raise OSError(28, "No space left on device")
    assert json.loads(path.read_text()) == {"stage": "old"} and os.listdir(tmp_path) == ["DONE.json"]
