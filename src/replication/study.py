"""Pieces shared by the study scripts of experiments/: running an entry point once, finding the runs of a multirun,
reading their reports, tables and bootstrap confidence intervals (figures: `src.plots`)."""

import argparse
import csv
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Written by src.callbacks.diffusion.ReplicationAnalysis in every run folder.
SUMMARY = "replication/summary.json"


def parse_study_args(argv, description: str) -> argparse.Namespace:
    """The command line of a study aggregate: `folders` (multirun or run folders) and `--out` (default: the first
    folder)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", type=Path, nargs="+", help="multirun or run folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first folder)")
    args = parser.parse_args(argv)
    args.out = args.out or args.folders[0]
    return args


def find_runs(
    folders, hint: str = "train with the ReplicationAnalysis callback", marker: str = SUMMARY
) -> list[Path]:
    """Run folders (those holding `marker`, a path of depth 2 inside the run: replication/summary.json by
    default) at or below each folder, without duplicates, sorted. Raises FileNotFoundError naming a folder that
    is missing or holds no run (`hint`: how to make one)."""
    runs = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder: give a multirun folder or a run folder")
        found = sorted(p.parent.parent for p in folder.rglob(marker))
        if not found:
            raise FileNotFoundError(
                f"no run under {folder} holds {marker}: {hint}, or point at its multirun folder"
            )
        runs.update({run.resolve(): None for run in found})
    return list(runs)


def run_once(
    entry: str, overrides: list[str], run_dir: Path, done: str | None = "metrics.json", nproc: int = 1
) -> Path:
    """`python -m src.<entry> <overrides> hydra.run.dir=<run_dir>`, unless `run_dir/<done>` exists: a finished run is
    read again rather than re-run, so a study script resumes where it stopped (done=None: always run). Returns
    run_dir.

    nproc > 1 runs it under torchrun with that many processes (each takes its part of the work from its rank).
    With the environment variable COPYSCOPE_IN_PROCESS=1 a one-process entry runs in this process (Hydra's main
    called with the overrides as its command line), which saves an interpreter start-up per step: the tests set it.
    """
    run_dir = Path(run_dir)
    if done is None or not (run_dir / done).is_file():
        argv = [*overrides, f"hydra.run.dir={run_dir}"]
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        print("+", *launcher, "-m", f"src.{entry}", " ".join(argv), flush=True)
        if nproc == 1 and os.environ.get("COPYSCOPE_IN_PROCESS") == "1":
            _run_in_process(entry, argv)
        else:
            subprocess.run([*launcher, "-m", f"src.{entry}", *argv], check=True)
    return run_dir


def _run_in_process(entry: str, argv: list[str]) -> None:
    """Hydra's `main` of src.<entry> with `argv` as its command line; a failed run raises (Hydra exits with 1)."""
    from hydra.core.global_hydra import GlobalHydra

    module = importlib.import_module(f"src.{entry}")
    saved, saved_module = sys.argv, os.environ.get("HYDRA_MAIN_MODULE")
    GlobalHydra.instance().clear()
    sys.argv = [f"src/{entry}.py", *argv]
    # As under `python -m`: Hydra finds conf/ beside the entry's file, not as a Python package "conf".
    os.environ["HYDRA_MAIN_MODULE"] = "__main__"
    try:
        module.main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"src.{entry} failed (exit code {exit_.code}); its log is above") from None
    finally:
        sys.argv = saved
        if saved_module is None:
            os.environ.pop("HYDRA_MAIN_MODULE", None)
        else:
            os.environ["HYDRA_MAIN_MODULE"] = saved_module
        GlobalHydra.instance().clear()


def read_json(path: Path) -> dict:
    """The JSON object in `path`, {} when the file does not exist."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def read_matches(path: Path) -> list[dict] | None:
    """The rows of a report's matches.csv (most replicated first), None when the file does not exist."""
    if not Path(path).is_file():
        return None
    with open(path) as f:
        return list(csv.DictReader(f))


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns) -> str:
    """The rows as a markdown table with `columns` (missing values as "-")."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, columns) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---- uncertainty ---------------------------------------------------------------------------------------------------
def bootstrap_interval(values, statistic, resamples: int = 2000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval (low, high) of `statistic(values)`: `resamples` draws of len(values) with
    replacement, seeded. values: (n,) array; statistic: maps an (R, n) array to (R,) (e.g. `percentile_95`)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    estimates = statistic(values[draws])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_difference(a, b, statistic, resamples: int = 2000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval (low, high) of statistic(a) - statistic(b), a and b resampled independently
    (conservative when they are paired, e.g. the same seeds)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    diff = statistic(a[rng.integers(0, a.size, size=(resamples, a.size))]) - statistic(
        b[rng.integers(0, b.size, size=(resamples, b.size))]
    )
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diff, [tail, 100 - tail])
    return float(low), float(high)


def percentile_95(values: np.ndarray) -> np.ndarray:
    """The 95th percentile along the last axis (numpy's linear interpolation, as the replication reports)."""
    return np.percentile(values, 95, axis=-1)


def mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def share_above(threshold: float):
    """A statistic: the fraction of values strictly above `threshold`, along the last axis."""
    return lambda values: (values > threshold).mean(axis=-1)
