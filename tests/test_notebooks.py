"""The analysis notebooks: committed without outputs, and executed end to end on a tiny training run."""

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from tests.conftest import ROOT, compose_config

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


class ThisInterpreterKernel(AsyncKernelManager):
    """Starts the kernel with the interpreter that runs the tests (the venv's), whichever `python3` kernelspec
    Jupyter would otherwise find first (a user-level one may point at another Python without our packages)."""

    def format_kernel_cmd(self, extra_arguments=None):
        return [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            self.connection_file,
            *(extra_arguments or []),
        ]


def execute_notebook(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in the notebook's folder (as Jupyter does); raises
    nbclient's CellExecutionError, with the failing cell and its traceback, when a cell fails."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        kernel_manager_class=ThisInterpreterKernel,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return notebook


def outputs_of(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def run_notebook(name: str, monkeypatch, **env) -> tuple[list[dict], str, list[dict]]:
    """Execute notebooks/<name> with `env` set (the kernel inherits the environment); returns its outputs, the
    text it printed and its figures, after checking that no cell raised."""
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    outputs = outputs_of(execute_notebook(ROOT / "notebooks" / name))
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    return outputs, text, figures


def test_there_are_notebooks():
    assert ROOT / "notebooks" / "style_retrieval.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs != [] or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"


def test_style_retrieval_takes_run_dir_as_its_first_parameter():
    notebook = nbformat.read(ROOT / "notebooks" / "style_retrieval.ipynb", as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])  # papermill injects its values after this cell
    assert 'RUN_DIR = os.environ.get("RUN_DIR"' in first.source


@pytest.mark.slow
def test_style_retrieval_notebook_runs_on_a_tiny_training_run(tiny_run, monkeypatch):
    run_dir = tiny_run("csd_quickstart").run_dir
    assert (run_dir / "embeddings" / "test.npz").is_file()

    outputs, text, figures = run_notebook("style_retrieval.ipynb", monkeypatch, RUN_DIR=run_dir)
    assert f"Run:        {run_dir}" in text
    assert "compared metrics match metrics.json" in text
    # per-style precision bars, retrieval gallery, top-1 confusion matrix, 2-D PCA scatter
    assert len(figures) == 4, f"expected 4 figures, got {len(figures)}"
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("mAP@10" in t["data"]["text/html"] for t in tables), "no metrics table was shown"


def test_replication_analysis_takes_report_dir_as_its_first_parameter():
    notebook = nbformat.read(ROOT / "notebooks" / "replication_analysis.ipynb", as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    assert 'REPORT_DIR = os.environ.get("REPORT_DIR", "")' in first.source


def tiny_replication_folders(root: Path) -> tuple[Path, Path]:
    """train/: 6 skimage images at 48 px; generated/: 2 exact copies, a darkened copy, a mirrored image, 2 noise
    images and one corrupt file."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "camera", "rocket", "coins"]
    train = {n: Image.fromarray(getattr(data, n)()).convert("RGB").resize((48, 48)) for n in names}
    rng = np.random.default_rng(0)
    generated = {
        "copy_astronaut": train["astronaut"],
        "copy_coffee": train["coffee"],
        "dark_coins": ImageEnhance.Brightness(train["coins"]).enhance(0.8),
        "mirror_chelsea": ImageOps.mirror(train["chelsea"]),
        **{f"noise{i}": Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for i in range(2)},
    }
    for folder, images in (("train", train), ("generated", generated)):
        (root / folder).mkdir(parents=True)
        for name, image in images.items():
            image.save(root / folder / f"{name}.png")
    (root / "generated" / "broken.png").write_bytes(b"not an image")
    return root / "generated", root / "train"


@pytest.mark.slow
def test_replication_analysis_notebook_runs_on_a_tiny_report(tmp_path, monkeypatch):
    import json

    from src.replicate import replicate

    generated, train = tiny_replication_folders(tmp_path)
    report_dir = tmp_path / "report"
    overrides = [
        f"generated={generated}",
        f"train={train}",
        "extractor=pixels",
        "threshold=0.9",
        "k=3",
        "cache_dir=null",
        "num_workers=0",
        "device=cpu",
    ]
    replicate(compose_config("replicate.yaml", overrides, report_dir))
    # pixels (thumbnail correlations) see the exact and the darkened copies, not the mirrored image
    assert json.loads((report_dir / "report.json").read_text())["counts"]["above_threshold"] == 3

    outputs, text, figures = run_notebook("replication_analysis.ipynb", monkeypatch, REPORT_DIR=report_dir)
    assert f"Report:     {report_dir}" in text
    assert "statistics match report.json" in text
    # recomputed + saved histogram, saved gallery, top-N image grid, and complexity.png when the run wrote one
    expected = 3 + (report_dir / "complexity.png").is_file()
    assert len(figures) == expected, f"expected {expected} figures, got {len(figures)}"
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("top-1 sim(gen, train)" in t and "background sim(train, train)" in t for t in tables)
    assert any("copy_astronaut.png" in t and "mirror_chelsea.png" in t for t in tables), "no top-N table"
    assert any("broken.png" in t for t in tables), "the skipped file is not listed"


@pytest.mark.slow
def test_extraction_notebook_runs_on_a_tiny_attacked_run(attacked_run, monkeypatch):
    study = attacked_run.run_dir.parent
    outputs, text, figures = run_notebook("extraction.ipynb", monkeypatch, STUDY_DIR=study)
    assert f"Study: {study}" in text and "8 training images" in text
    # the study figure, at least one gallery (adaptive flags below 2.0), the ROC curves; one model size: no heat map
    assert len(figures) >= 3 and "no heat map" in text
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("loss@t=10_auc" in t for t in tables)


@pytest.mark.slow
def test_memorization_detection_notebook_runs_on_a_tiny_detected_run(detected_run, monkeypatch):
    report = detected_run.run_dir / "detection"
    outputs, text, figures = run_notebook("memorization_detection.ipynb", monkeypatch, REPORT_DIR=report)
    assert f"Report: {report}" in text and "8 prompts" in text
    assert len(figures) == 2  # ROC and scatters, cost bars
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("cost_vs_generation" in t for t in tables) and any("copy_share" in t for t in tables)
