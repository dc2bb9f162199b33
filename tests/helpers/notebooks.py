"""Execute the repository's notebooks with nbclient in a kernel of *this* interpreter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from helpers.scripts import REPO_ROOT

NOTEBOOKS = Path(REPO_ROOT) / "notebooks"


def kernel_spec_dir(tmp_path: Path) -> Path:
    """A kernel spec running *this* interpreter (a fresh CI clone's venv may have no registered python3 kernel, or
    one that points at another Python); found through JUPYTER_PATH."""
    spec = Path(tmp_path) / "jupyter" / "kernels" / "dalle2-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "dalle2 test",
                "language": "python",
            }
        )
    )
    return spec.parent.parent


def execute_notebook(name: str, *, env: dict, tmp_path: Path, timeout: int = 600):
    """Run ``notebooks/<name>.ipynb`` top to bottom with ``env`` added to the kernel's environment; returns the
    executed notebook (a failing cell raises nbclient's ``CellExecutionError``)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    full = {
        "JUPYTER_PATH": str(kernel_spec_dir(tmp_path)),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **env,
    }
    saved = {k: os.environ.get(k) for k in full}
    os.environ.update(full)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="dalle2-test", resources={"metadata": {"path": str(REPO_ROOT)}}
        )
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb
