"""notebooks/: stored without outputs (fast), and both executed top to bottom with nbclient on the tiny built-in
shards with a couple of steps per stage (slow): the quickstart trains CLIP -> prior -> decoder, samples, evaluates,
and the explore notebook loads what it wrote."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from helpers.notebooks import kernel_spec_dir

NOTEBOOKS = Path(REPO_ROOT) / "notebooks"
NAMES = ("quickstart", "explore_checkpoints")


def read(name: str):
    import nbformat

    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_stored_without_outputs(name):
    import nbformat

    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and nb.cells[0].cell_type == "markdown"
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}.ipynb has outputs in code cells {dirty}: run python notebooks/strip_outputs.py"
    assert nb.metadata.kernelspec.name == "python3"
    # parameterised through the environment, so CI can shrink it
    assert "DALLE2_NB_SMOKE" in code[0].source


def execute(name: str, *, timeout: int = 600):
    """Run the notebook in a fresh kernel from the repository root; returns the executed notebook."""
    from nbclient import NotebookClient

    nb = read(name)
    client = NotebookClient(nb, timeout=timeout, kernel_name="dalle2-test", resources={"metadata": {"path": REPO_ROOT}})
    client.execute()
    return nb


def text_of(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def images_of(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def nb_env(builtin_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebooks")
    env = {
        "JUPYTER_PATH": str(kernel_spec_dir(tmp)),
        "DALLE2_NB_SMOKE": "1",
        "DALLE2_NB_STEPS": "2",
        "DALLE2_NB_OUT": str(tmp / "quickstart"),
        "DALLE2_NB_RUN": str(tmp / "quickstart"),
        "DALLE2_NB_TRAIN_URLS": builtin_shards["train"],
        "DALLE2_NB_VAL_URLS": builtin_shards["val"],
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel (and the CLIs it starts) inherit this process's environment
    yield tmp / "quickstart"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def quickstart(nb_env):
    t0 = time.time()
    nb = execute("quickstart")
    return nb, nb_env, time.time() - t0


@pytest.mark.slow
def test_quickstart_trains_samples_evaluates_and_shows_the_grid(quickstart):
    nb, out, wall = quickstart
    for stage in ("clip", "prior", "decoder"):
        assert (out / stage / "checkpoints" / "last.ckpt").is_file(), stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 4 and 0.0 <= metrics["clip_score"] <= 100.0
    assert set(metrics["checker"]) >= {"accuracy/all", "accuracy/mean"}
    assert len((out / "samples" / "manifest.jsonl").read_text().splitlines()) == 4
    text = text_of(nb)
    assert "$ python train/train.py experiment=clip_tiny" in text and "checker, in process" in text
    assert images_of(nb) >= 4  # data, losses, samples, grid
    print(f"quickstart: {wall:.0f} s")


@pytest.mark.slow
def test_explore_loads_the_quickstart_checkpoints(quickstart):
    t0 = time.time()
    nb = execute("explore_checkpoints")
    text = text_of(nb)
    assert "'has_prior': True" in text and "guidance 3.0: checker all-correct" in text
    assert "mean cosine, matching" in text
    assert images_of(nb) >= 6  # guidance x seed, 2 x candidates, variations, 2 x interpolation, cosines
    print(f"explore: {time.time() - t0:.0f} s")
