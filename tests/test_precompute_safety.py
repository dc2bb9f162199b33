"""train/precompute_embeddings.py never exits 0 with a shard missing, and a short shard never counts as done:
sub-folder members, keys that do not match, a corrupt sample, and a crash that left a short shard."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers.tiny_runs import REPO_ROOT, run, tiny_clip_ckpt

pytestmark = pytest.mark.slow


def write_tar(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip_ckpt(tmp_path_factory.mktemp("clip") / "clip.ckpt")


def precompute(clip, urls, out_dir):
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train" / "precompute_embeddings.py"),
        f"clip_ckpt={clip}",
        f"data.urls='{urls}'",
        f"out_dir={out_dir}",
        "trainer.accelerator=cpu",
        "data.batch_size=4",
    ]
    return run(cmd, timeout=240)


def samples_in(path) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})


def test_members_in_a_sub_folder_are_embedded(clip, tmp_path):
    src = write_tar(
        tmp_path / "00000.tar",
        {
            f"part/{i:03d}.{ext}": jpeg(i) if ext == "jpg" else b"a red circle"
            for i in range(5)
            for ext in ("jpg", "txt")
        },
    )
    proc = precompute(clip, src, tmp_path / "emb")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert samples_in(tmp_path / "emb" / "00000.tar") == 5  # was: exit 0 with no shard written


def test_keys_that_do_not_match_are_a_clear_error(clip, tmp_path):
    src = write_tar(
        tmp_path / "00000.tar",
        {**{f"{i:03d}.jpg": jpeg(i) for i in range(3)}, **{f"cap{i:03d}.txt": b"a red circle" for i in range(3)}},
    )
    proc = precompute(clip, src, tmp_path / "emb")
    assert proc.returncode != 0
    assert "has both an image and a caption" in proc.stderr and "00000.tar" in proc.stderr
    assert not (tmp_path / "emb" / "00000.tar.json").exists()  # never marked complete


def test_corrupt_sample_is_skipped_and_counted_and_a_short_shard_is_redone(clip, tmp_path):
    members = {
        f"{i:03d}.{ext}": jpeg(i) if ext == "jpg" else b"a red circle" for i in range(6) for ext in ("jpg", "txt")
    }
    members["002.jpg"] = b"not a jpeg"
    src = write_tar(tmp_path / "00000.tar", members)
    out = tmp_path / "emb"
    proc = precompute(clip, src, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "00000.tar.json").read_text())
    assert info["source_samples"] == 6 and info["samples"] == 5 and info["skipped"] == {"corrupt_image": 1}
    assert samples_in(out / "00000.tar") == 5
    # a crash that left a short shard (here: 2 of 5 samples) with its sidecar from before: redone, not skipped
    with tarfile.open(out / "00000.tar") as tar:
        keep = {m.name: tar.extractfile(m).read() for m in tar if m.name.startswith(("000.", "001."))}
    write_tar(out / "00000.tar", keep)
    proc = precompute(clip, src, out)
    assert proc.returncode == 0 and "0 shards already complete" in proc.stdout, proc.stderr[-2000:]
    assert samples_in(out / "00000.tar") == 5
    proc = precompute(clip, src, out)
    assert "1 shards already complete" in proc.stdout


def test_a_source_shard_cut_short_gives_what_it_holds_and_counts_as_done(clip, tmp_path):
    members = {
        f"{i:03d}.{ext}": jpeg(i) if ext == "jpg" else b"a red circle" for i in range(6) for ext in ("jpg", "txt")
    }
    src = write_tar(tmp_path / "00000.tar", members)
    data = open(src, "rb").read()
    open(src, "wb").write(data[: len(data) // 2])  # a download cut in the middle
    out = tmp_path / "emb"
    proc = precompute(clip, src, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "00000.tar.json").read_text())
    assert info["skipped"].get("bad_shard") == 1 and 0 < info["samples"] < 6 == len(members) // 2
    assert samples_in(out / "00000.tar") == info["samples"]
    assert "1 shards already complete" in precompute(clip, src, out).stdout
