"""Figures come from files: dalle2.results writes provenance, and the docs' figures are checked against their files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from dalle2.results import check_docs, lookup, read_result, render_docs, write_result

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_result_records_provenance(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"weights")
    path = write_result(
        tmp_path / "results" / "r.json",
        {"strict/all": 0.961, "fid": float("nan"), "nested": {"a": [1, 2]}},
        command="python eval/x.py a=1",
        checkpoints={"decoder": ckpt},
        split="test",
        seeds=[0, 1, 2],
    )
    rec = read_result(path)
    assert rec["figures"]["strict/all"] == 0.961 and rec["figures"]["fid"] == "nan"
    assert rec["command"] == "python eval/x.py a=1" and rec["split"] == "test" and rec["seeds"] == [0, 1, 2]
    assert rec["checkpoints"]["decoder"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert len(rec["git_sha"]) == 40 or rec["git_sha"] == "unknown"
    assert rec["machine"]["cpu_count"] >= 1 and "torch" in rec["machine"]
    json.loads(path.read_text())  # valid JSON despite the NaN


def test_write_result_refuses_missing_checkpoint_and_empty_figures(tmp_path):
    with pytest.raises(FileNotFoundError, match="decoder"):
        write_result(tmp_path / "r.json", {"a": 1}, checkpoints={"decoder": tmp_path / "nope.ckpt"})
    with pytest.raises(ValueError, match="non-empty"):
        write_result(tmp_path / "r.json", {})
    assert not (tmp_path / "r.json").exists()


def test_lookup_exact_key_wins_then_nested():
    figs = {"strict/all": 1, "strict": {"all": 2, "shape": 3}, "rows": [{"fid": 4.5}]}
    assert lookup(figs, "strict/all") == 1
    assert lookup(figs, "strict/shape") == 3
    assert lookup(figs, "rows/0/fid") == 4.5
    with pytest.raises(KeyError):
        lookup(figs, "strict/color")


@pytest.fixture
def results_dir(tmp_path):
    write_result(
        tmp_path / "results" / "demo.json",
        {
            "strict": {"all": 0.9614},
            "fid": 12.345,
            "rows": [{"stage": "real", "psnr": 31.25}, {"stage": "sr", "psnr": 33.5}],
        },
        command="python demo.py",
    )
    return tmp_path


def _doc(root, text):
    doc = root / "docs" / "page.md"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)
    return doc


def test_matching_figures_pass(results_dir):
    _doc(
        results_dir,
        "Strict: **96.1 %**<!-- fig results/demo.json strict/all x100 --> and FID 12.3<!-- fig results/demo.json fid -->.\n",
    )
    assert check_docs([results_dir / "docs"], root=results_dir) == []


@pytest.mark.parametrize(
    "text, why",
    [
        ("Strict 96.2 %<!-- fig results/demo.json strict/all x100 -->\n", "docs say 96.2"),  # a wrong figure
        ("FID 12.4<!-- fig results/demo.json fid -->\n", "docs say 12.4"),  # rounded the wrong way
        ("FID 12.3<!-- fig results/other.json fid -->\n", "cannot read"),  # missing file
        ("FID 12.3<!-- fig results/demo.json kid -->\n", "cannot read"),  # missing key (a renamed figure)
        ("no number <!-- fig results/demo.json fid -->\n", "no number"),
    ],
)
def test_wrong_figures_are_caught(results_dir, text, why):
    _doc(results_dir, text)
    problems = check_docs([results_dir / "docs"], root=results_dir)
    assert len(problems) == 1 and why in problems[0] and "page.md:1" in problems[0]


def test_tables_render_and_stale_tables_fail(results_dir):
    doc = _doc(results_dir, "Table:\n<!-- table results/demo.json rows fmt=.1f -->\n| old |\n<!-- /table -->\nafter\n")
    assert "stale" in check_docs([doc], root=results_dir)[0]
    assert render_docs([doc], root=results_dir) == [doc]
    text = doc.read_text()
    assert "| stage | psnr |" in text and "| sr | 33.5 |" in text and "| real | 31.2 |" in text
    assert text.endswith("<!-- /table -->\nafter\n")
    assert check_docs([doc], root=results_dir) == []
    # the file changes (a new measurement) -> the table is stale again
    write_result(results_dir / "results" / "demo.json", {"rows": [{"stage": "sr", "psnr": 20.0}]}, command="x")
    assert "stale" in check_docs([doc], root=results_dir)[0]


def test_repository_docs_match_their_results_files():
    """Every figure marker and generated table in README.md and docs/ agrees with its file under results/."""
    paths = [p for p in ("README.md", "docs") if os.path.exists(os.path.join(REPO_ROOT, p))]
    proc = subprocess.run(
        [sys.executable, "-m", "dalle2.results", "check", *paths], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_markers_inside_code_are_examples(results_dir):
    doc = _doc(
        results_dir,
        "Write `1.0<!-- fig results/none.json x -->` like this:\n```\n2<!-- fig results/none.json y -->\n"
        "<!-- table results/none.json z -->\n```\nreal: 12.3<!-- fig results/demo.json fid -->\n",
    )
    assert check_docs([doc], root=results_dir) == []
    doc.write_text(doc.read_text().replace("12.3<!--", "12.9<!--"))
    assert len(check_docs([doc], root=results_dir)) == 1
