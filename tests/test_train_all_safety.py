"""train_all never loses work: a changed unfinished stage resumes (or stops before touching anything), force
moves old outputs aside, the interpreter and checkout paths are not part of a run's identity, folders train_all
did not make are never touched, and its markers are written atomically. The stages' commands are replaced by a
stand-in that writes what a training run writes (checkpoints with their step), so each case takes milliseconds."""

from __future__ import annotations

import json
import os
import re
import time
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
    ``kill_at`` is set, at that step and is then "killed") with fresh random weights, as a real run would; the
    embeddings stage writes shards, the others a metrics file. It records what it found when it started."""

    def __init__(self, out: Path):
        self.out, self.calls, self.kill_at = out, [], None

    def __call__(self, stage, *, cwd):
        argv = stage.commands[0]
        opts = override_pairs(argv[2:])  # ++key=value: a stage key
        d = Path(opts["hydra.run.dir"])
        last = d / "checkpoints" / "last.ckpt"
        found = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
        self.calls.append({"stage": stage.name, "argv": list(argv), "found_step": found})
        if stage.name in train_all.TRAINED:
            last.parent.mkdir(parents=True, exist_ok=True)
            step = self.kill_at if self.kill_at is not None else int(opts.get("trainer.max_steps", 10))
            torch.save({"global_step": step, "weights": torch.randn(4)}, last)
        elif stage.name == "embeddings":
            for split in ("train", "val"):
                (d / split).mkdir(parents=True, exist_ok=True)
                (d / split / "00000.tar").write_bytes(os.urandom(64))
        else:
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps({"score": float(torch.rand(1))}))
        if self.kill_at is not None:
            raise Killed(stage.name)


@pytest.fixture
def setup(tmp_path, builtin_shards, monkeypatch):
    out = tmp_path / "out"
    fake = FakeStages(out)
    monkeypatch.setattr(train_all, "run_commands", fake)

    def run(*extra, kill_at=None, stages="[decoder]", out_dir=None):
        """train_all on ``stages`` (the decoder); with ``kill_at`` the stage is killed at that step (checkpoint
        written)."""
        args = [
            f"out_dir={out_dir or out}",
            "experiment=demo",
            "report=false",
            f"stages={stages}",
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
    for marker in (done_path, out / "decoder" / "STARTED.json"):  # as if the 10 steps took 100 s
        rec = json.loads(marker.read_text())
        rec["attempts"][0].update(wall_s=100.0, cpu_s=150.0)
        marker.write_text(json.dumps(rec))
    summary = run("decoder.trainer.max_steps=20")
    assert summary["decoder"]["status"] == "ran" and fake.calls[-1]["found_step"] == 10
    assert "ckpt_path=last" in fake.calls[-1]["argv"]
    # the continued stage's times are the whole run's (the report sums them), each part kept as an attempt
    done = json.loads(done_path.read_text())
    assert [a["ended"] for a in done["attempts"]] == ["finished", "finished"]
    assert done["attempts"][0]["wall_s"] == 100.0 and done["cpu_s"] >= 150.0
    assert done["wall_s"] == pytest.approx(100.0 + done["attempts"][1]["wall_s"], abs=0.011)
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


def statuses(summary: dict) -> dict[str, str]:
    return {s: v["status"] for s, v in summary.items()}


UPSTREAM = "[clip,embeddings,prior]"


def test_a_stage_built_from_an_older_upstream_reruns_never_skipped(setup, tmp_path):
    """The reproduced case: stages=[clip] force=[clip], then the full run skipped embeddings and prior, which were
    built from the old CLIP."""
    out, fake, run = setup
    assert set(statuses(run(stages=UPSTREAM)).values()) == {"ran"}
    assert set(statuses(run(stages=UPSTREAM)).values()) == {"skipped"}  # nothing changed: nothing reruns
    old_prior = snapshot(out / "prior")
    assert statuses(run("force=[clip]", stages="[clip]")) == {"clip": "ran"}
    summary = run(stages=UPSTREAM)
    assert statuses(summary) == {"clip": "skipped", "embeddings": "ran", "prior": "ran"}
    assert [c["stage"] for c in fake.calls[-2:]] == ["embeddings", "prior"]
    moved = [p for p in out.iterdir() if p.name.startswith("prior.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == old_prior  # the stale prior is kept, not deleted
    # what a stage consumed is in its DONE.json: the sha256 of the upstream's checkpoint
    import hashlib

    done = json.loads((out / "embeddings" / "DONE.json").read_text())
    clip_sha = hashlib.sha256((out / "clip" / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    assert done["inputs"]["clip"] == clip_sha
    assert set(statuses(run(stages=UPSTREAM)).values()) == {"skipped"}

    # a given checkpoint that changed on disk makes its dependents rerun too
    given = tmp_path / "given_clip.ckpt"
    given.write_bytes(b"clip weights, first version")
    stages = "[clip,embeddings]"
    assert statuses(run(f"ckpt.clip={given}", "force=[embeddings]", stages=stages))["embeddings"] == "ran"
    assert statuses(run(f"ckpt.clip={given}", stages=stages))["embeddings"] == "skipped"
    given.write_bytes(b"clip weights, second version")
    assert statuses(run(f"ckpt.clip={given}", stages=stages))["embeddings"] == "ran"


def test_a_stage_is_not_rerun_on_an_out_of_date_upstream_left_out_of_stages(setup):
    out, fake, run = setup
    run(stages=UPSTREAM)
    run("force=[clip]", stages="[clip]")
    before, calls = snapshot(out), len(fake.calls)
    # the prior must rerun (clip changed), but it would read embeddings made from the old CLIP
    with pytest.raises(SystemExit, match=r"prior: would read embeddings.*older than clip.*Add embeddings to stages="):
        run(stages="[prior]")
    assert snapshot(out) == before and len(fake.calls) == calls
    assert statuses(run(stages="[embeddings,prior]")) == {"embeddings": "ran", "prior": "ran"}


def test_an_unfinished_stage_whose_upstream_changed_starts_afresh(setup):
    out, fake, run = setup
    run(stages="[clip,embeddings]")
    assert run(stages="[prior]", kill_at=5) is None
    run("force=[clip]", stages="[clip]")
    summary = run(stages=UPSTREAM)
    assert statuses(summary) == {"clip": "skipped", "embeddings": "ran", "prior": "ran"}
    assert fake.calls[-1]["found_step"] is None and "ckpt_path=last" not in fake.calls[-1]["argv"]
    assert any(p.name.startswith("prior.old-") for p in out.iterdir())


def test_every_stage_is_planned_before_anything_runs(setup, capsys):
    """The reproduced case: with force=[prior] and a changed decoder setting, the prior was retrained (and the old
    one moved aside) before the decoder refused."""
    out, fake, run = setup
    run(stages="[prior,decoder]")
    before, calls = snapshot(out), len(fake.calls)
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"decoder.*model\.model_channels: \(unset\) -> 64") as e:
        run("force=[prior]", "decoder.model.model_channels=64", stages="[prior,decoder]")
    assert "Nothing was changed" in str(e.value)
    assert snapshot(out) == before and len(fake.calls) == calls  # the prior did not run, nothing moved aside
    printed = capsys.readouterr().out
    plan = [line.split() for line in printed.splitlines() if line.startswith("[train_all]   ")]
    assert [row[1:3] for row in plan] == [["prior", "run"], ["decoder", "refuse"]], printed
    assert "forced" in printed

    # every refusal is named at once, and a plan with none prints each stage's action and reason, then runs
    with pytest.raises(SystemExit) as e:
        run("prior.optimizer.lr=0.5", "decoder.model.model_channels=64", stages="[prior,decoder]")
    assert "prior" in str(e.value) and "optimizer.lr" in str(e.value) and "model_channels" in str(e.value)
    capsys.readouterr()
    run("force=[prior]", stages="[prior,decoder]")
    printed = capsys.readouterr().out
    assert re.search(r"prior +run +forced", printed) and re.search(r"decoder +skip +done", printed), printed


def test_a_moved_out_dir_keeps_its_identity(setup, tmp_path):
    """Paths inside out_dir are recorded relative to it: a run moved (or copied) elsewhere skips what is done
    and resumes what is not, rather than refusing every stage."""
    out, fake, run = setup
    run(stages=UPSTREAM)
    assert run(stages="[decoder]", kill_at=5) is None
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    summary = run(stages="[clip,embeddings,prior,decoder]", out_dir=moved)
    assert statuses(summary) == {"clip": "skipped", "embeddings": "skipped", "prior": "skipped", "decoder": "ran"}
    assert fake.calls[-1]["found_step"] == 5 and "ckpt_path=last" in fake.calls[-1]["argv"]
    assert f"hydra.run.dir={moved}/decoder" in fake.calls[-1]["argv"]


def test_a_resumed_stage_starts_without_the_temp_files_of_a_killed_save(setup):
    import subprocess
    import sys
    import time

    out, fake, run = setup
    assert run(stages="[embeddings]", kill_at=5) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shard, marker = out / "embeddings" / "train" / f".00001.tar.tmp-{dead.pid}", out / "embeddings" / "mine.tmp-1"
    for p in (shard, marker):
        p.write_bytes(b"\0" * 1000)
        os.utime(p, (time.time() - 3600,) * 2)
    assert statuses(run(stages="[embeddings]")) == {"embeddings": "ran"}
    assert not shard.exists() and marker.exists()  # a user's file of another name stays


def test_a_stage_killed_and_resumed_accounts_every_attempt(setup):
    """The reproduced case: the demo's decoder killed at ~3250 steps and resumed had a DONE.json with only the
    resumed part's time (20 of ~66 minutes)."""
    out, fake, run = setup
    assert run(kill_at=700) is None  # the stage's process died
    started = out / "decoder" / "STARTED.json"
    rec = json.loads(started.read_text())
    assert [a["ended"] for a in rec["attempts"]] == ["failed (Killed)"]
    # then train_all itself was killed -9 during a second attempt: what its last heartbeat wrote stays
    rec["attempts"].append({"started": "2026-01-01 00:00:00", "wall_s": 3600.0, "cpu_s": 7000.0, "ended": "running"})
    started.write_text(json.dumps(rec))
    assert run()["decoder"]["status"] == "ran" and fake.calls[-1]["found_step"] == 700
    done = json.loads((out / "decoder" / "DONE.json").read_text())
    assert [a["ended"] for a in done["attempts"]] == ["failed (Killed)", "killed", "finished"]
    assert done["wall_s"] == pytest.approx(sum(a["wall_s"] for a in done["attempts"]), abs=0.02)
    assert done["wall_s"] >= 3600.0 and done["cpu_s"] >= 7000.0


def test_a_stage_still_running_from_a_killed_train_all_is_refused_not_doubled(setup, tmp_path):
    """A stage whose train_all was killed (where the parent-death signal does not reach it, or a second train_all on
    the same out_dir) may still be training: rerunning must not start a second trainer in its folder, nor move it
    aside (force=) under it."""
    import socket
    import subprocess
    import sys

    from dalle2.train_all.runner import cmdline

    out, fake, run = setup
    assert run(kill_at=700) is None
    started = out / "decoder" / "STARTED.json"
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(100):  # its cmdline is readable once exec is done
            if cmdline(orphan.pid) and "sleep" in cmdline(orphan.pid):
                break
            time.sleep(0.05)
        rec = json.loads(started.read_text())
        rec["attempts"][-1].update(
            ended="running", host=socket.gethostname(), pids={str(orphan.pid): cmdline(orphan.pid)}
        )
        started.write_text(json.dumps(rec))
        before = snapshot(out / "decoder")
        for extra in ((), ("force=[decoder]",)):
            with pytest.raises(SystemExit, match=rf"decoder: still running .*pid {orphan.pid}.*Nothing was changed"):
                run(*extra)
            assert snapshot(out / "decoder") == before and len(fake.calls) == 1
    finally:
        orphan.kill()
        orphan.wait()
    assert run()["decoder"]["status"] == "ran"  # once it is gone, the rerun resumes it
    assert fake.calls[-1]["found_step"] == 700


def test_a_stage_running_on_another_machine_is_refused_while_its_heartbeat_is_fresh(setup):
    """The same out_dir on a shared disk, seen from a second machine (a login node while the SLURM job runs): its pids
    mean nothing here, so only the attempt's heartbeat tells that it runs. A fresh one refuses the stage (no second
    trainer in its folder, nothing moved aside or tidied under it, also with force=); a stale one (that machine's
    train_all died) resumes it."""
    out, fake, run = setup
    assert run(kill_at=700) is None
    started = out / "decoder" / "STARTED.json"
    rec = json.loads(started.read_text())
    assert rec["attempts"][-1]["beat"] == pytest.approx(time.time(), abs=60) and rec["attempts"][-1]["every_s"] > 0
    rec["attempts"][-1].update(ended="running", host="gpu-node-17", pids={"4242": "python train/train.py"})
    rec["attempts"][-1].update(beat=time.time() - 5, every_s=30.0)
    started.write_text(json.dumps(rec))
    tmp = out / "decoder" / "checkpoints" / ".last.ckpt.tmp-4242"  # that machine's save in progress
    tmp.write_bytes(b"\0" * 10)
    os.utime(tmp, (time.time() - 3600,) * 2)
    before = snapshot(out / "decoder")
    for extra in ((), ("force=[decoder]",)):
        with pytest.raises(SystemExit, match=r"decoder: still running .*on gpu-node-17.*Nothing was changed"):
            run(*extra)
        assert snapshot(out / "decoder") == before and len(fake.calls) == 1
    rec["attempts"][-1]["beat"] = time.time() - 3600  # its train_all died an hour ago
    started.write_text(json.dumps(rec))
    assert run()["decoder"]["status"] == "ran" and fake.calls[-1]["found_step"] == 700


def test_a_stage_dies_with_its_train_all(tmp_path):
    """kill -9 of train_all: its running stage gets SIGTERM (saves last.ckpt and exits) instead of training on as an
    orphan that a rerun would double."""
    import signal
    import subprocess
    import sys

    term, ready = tmp_path / "term", tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).write_text('term'), sys.exit(0)))\n"
        "pathlib.Path(sys.argv[2]).write_text('up')\n"
        "time.sleep(60)\n"
    )
    driver = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dalle2.train_all.commands import Stage\n"
        "from dalle2.train_all.runner import run_commands\n"
        f"run_commands(Stage('decoder', commands=[[sys.executable, '-c', {child!r}, {str(term)!r}, {str(ready)!r}]]),"
        f" cwd=Path({str(tmp_path)!r}))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")] if p
        ),
    }
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env)
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the stage did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while not term.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert term.exists() and term.read_text() == "term"
    finally:
        proc.kill()


def test_a_folder_fingerprint_reads_big_files_only_at_their_edges(tmp_path, monkeypatch):
    """An embedding folder at LAION scale holds hundreds of GB: its fingerprint must not read every byte, yet still
    change when a shard is rewritten (a new size, mtime or edge) or one is added."""
    from dalle2.train_all import identity

    monkeypatch.setattr(identity, "WHOLE_FILE_BYTES", 3 << 20)
    d = tmp_path / "emb" / "train"
    d.mkdir(parents=True)
    big = d / "00000.tar"
    big.write_bytes(os.urandom(8 << 20))
    (d / "00001.tar").write_bytes(b"small")
    read = []
    real_open = open

    def counting_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "b" in mode and Path(path) == big:
            orig = f.read
            f.read = lambda n=-1: read.append(len(chunk := orig(n))) or chunk
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    first = identity.fingerprint(tmp_path / "emb", ("train",))
    assert sum(read) <= 2 << 20  # its two edges, not its 8 MiB
    data = bytearray(big.read_bytes())
    data[4 << 20] ^= 0xFF  # a byte in the middle: same size and edges, but a rewrite moves the mtime
    big.write_bytes(bytes(data))
    os.utime(big, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert identity.fingerprint(tmp_path / "emb", ("train",)) != first
    (d / "00002.tar").write_bytes(b"more")
    assert identity.fingerprint(tmp_path / "emb", ("train",)) not in (first, None)


def test_a_stage_larger_than_its_pictures_is_refused_before_anything_runs(setup):
    """Goal 4 of the cascade issue: a 64 -> 256 px upsampler on 32 px shards stops the run while it plans, naming
    the sizes found — the CLIP planned before it never starts."""
    out, fake, run = setup
    with pytest.raises(SystemExit) as e:
        run(
            "upsampler.experiment=upsampler_tiny",
            "upsampler.module.image_size=256",
            "upsampler.module.lowres_size=64",
            stages="[clip,upsampler]",
        )
    msg = str(e.value)
    assert "upsampler" in msg and "256 px" in msg and "32x32" in msg, msg
    assert fake.calls == [] and not (out / "clip").exists()
    # a stage at a size the pictures have runs
    run(stages="[clip]")
    assert [c["stage"] for c in fake.calls] == ["clip"]
