"""Collect the DDPM memorization runs (docs/memorization.md#ddpm-on-nested-subsets) into one study: figure,
gallery, table and trend check.

    python experiments/ddpm_memorization/aggregate.py logs/train/multiruns/<multirun> [more folders] [--out OUT]

Every folder given may be a multirun folder or a single run folder; the runs are the folders below it holding
`replication/summary.json` (written by `src.callbacks.diffusion.ReplicationAnalysis`), sorted by training subset
size. Written to OUT (default: the first folder given):
- study.png: one panel per run, "(a) 10 points, (b) 30 points, ..." as in the talk's CelebA-HQ figure: densities
  (bin width 0.005 on [0, 1]) of each generation's top-1 similarity to its training subset (red) and to the
  held-out control images (blue), and the copy threshold;
- study_gallery.png: per run, its 4 most replicated generations, each beside its nearest training image;
- study.csv and study.md: one row per run (the columns of `COLUMNS`), and in study.md the findings of
  `check_trend`. The markdown table and the findings are printed too.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from src.plots import draw_image_rows, plot_similarity_histograms, save_figure  # noqa: E402
from src.replication import study  # noqa: E402
from src.replication.study import read_json, read_matches  # noqa: E402

SETS = ("train", "control")  # the two report folders of a run: vs its training subset, vs held-out images
STATS = ("sim_mean", "sim_95pc", "sim_gt_thr")
COLUMNS = (
    "run",
    "subset_size",
    "control_size",
    "steps",
    "num_generated",
    "extractor",
    "threshold",
    *(f"{s}_{stat}" for s in SETS for stat in STATS),
    "bg_95pc",
)
TREND_STATS = ("sim_95pc", "sim_gt_thr")  # the statistics `check_trend` follows over subset sizes
GALLERY_PAIRS = 4  # generations per run in study_gallery.png


@dataclass
class StudyRun:
    """One training run of the study, as read from its folder.

    row: its table row (keys `COLUMNS`). matches: {"train" / "control": the rows of matches.csv, most replicated
    first} (no "control" when the run had no control set). train_root: the image folder that matches.csv's
    `match_i` paths are relative to. generated_dir: the folder of the generations (matches.csv's `generated`).
    num_files: images in that folder (the subset is "all points" when it takes them all), None when unknown.
    """

    run_dir: Path
    row: dict
    threshold: float
    matches: dict[str, list[dict]]
    train_root: Path
    generated_dir: Path
    num_files: int | None

    def top1(self, name: str) -> np.ndarray | None:
        """(G,) each generation's top-1 similarity to the set `name` ("train" or "control"); None when absent."""
        rows = self.matches.get(name)
        return None if rows is None else np.array([float(r["sim_1"]) for r in rows])


def find_runs(folders) -> list[Path]:
    """Run folders (those holding replication/summary.json) at or below each folder, without duplicates."""
    return study.find_runs(
        folders, "train with the ReplicationAnalysis callback (experiment=ddpm_quickstart or ddpm_celebahq)"
    )


def load_run(run_dir) -> StudyRun:
    """Read one run: its config, replication summary and reports, metrics.json and subset_index.json.

    The statistics come from replication/summary.json (full precision), else from metrics.json; the threshold and
    the extractor from replication/train/report.json, else from the config. Raises ValueError naming the file when
    the statistics against the training subset are missing.
    """
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "replication" / "summary.json")
    metrics = {**read_json(run_dir / "metrics.json"), **summary.get("metrics", {})}
    config_path = run_dir / "config_resolved.yaml"
    config = (yaml.safe_load(config_path.read_text()) if config_path.is_file() else None) or {}
    index = read_json(run_dir / "subset_index.json")
    report = read_json(run_dir / "replication" / "train" / "report.json")

    missing = [
        f"replication/train/{s}" for s in (*STATS, "bg_95pc") if metrics.get(f"replication/train/{s}") is None
    ]
    if missing:
        raise ValueError(
            f"{run_dir}: no {missing} in replication/summary.json or metrics.json; the replication analysis of "
            "this run did not finish (rerun it, or leave the run out)"
        )
    threshold = report.get("threshold", config.get("callbacks", {}).get("replication", {}).get("threshold"))
    if threshold is None:
        raise ValueError(
            f"{run_dir}: no threshold in replication/train/report.json nor in config_resolved.yaml "
            "(callbacks.replication.threshold)"
        )
    data = config.get("data", {})
    row = {
        "run": f"{run_dir.parent.name}/{run_dir.name}",
        "subset_size": int(data.get("subset_size", summary.get("num_train", 0))),
        "control_size": summary.get("num_control", len(index.get("control", []))),
        "steps": summary.get("step", config.get("trainer", {}).get("max_steps")),
        "num_generated": summary.get("num_generated"),
        "extractor": report.get("extractor", "?"),
        "threshold": float(threshold),
        **{f"{s}_{stat}": metrics.get(f"replication/{s}/{stat}") for s in SETS for stat in STATS},
        "bg_95pc": metrics["replication/train/bg_95pc"],
    }
    matches = {}
    for name in SETS:
        rows = read_matches(run_dir / "replication" / name / "matches.csv")
        if rows is not None:
            matches[name] = rows
    if "train" not in matches:
        raise ValueError(
            f"{run_dir}: replication/train/matches.csv is missing; the report folder is incomplete"
        )
    # subset_index.json's root is where the images were at training time; report.json's copy is the fallback
    train_root = Path(index.get("root") or report.get("folders", {}).get("train", ""))
    generated_dir = run_dir / "samples" / "final"
    if not generated_dir.is_dir():
        generated_dir = Path(report.get("folders", {}).get("generated", generated_dir))
    return StudyRun(
        run_dir, row, float(threshold), matches, train_root, generated_dir, index.get("num_files")
    )


def load_study(folders) -> list[StudyRun]:
    """Every run under `folders`, sorted by subset size (then by folder)."""
    runs = [load_run(run_dir) for run_dir in find_runs(folders)]
    return sorted(runs, key=lambda r: (r.row["subset_size"], str(r.run_dir)))


# ---- table -------------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table with the columns of `COLUMNS` (missing values as "-")."""
    return study.markdown_table(rows, COLUMNS)


def write_csv(rows: list[dict], path: Path) -> None:
    study.write_csv(rows, path, [*COLUMNS, "run_dir"])


# ---- trend -------------------------------------------------------------------------------------------------------
def check_trend(rows: list[dict]) -> list[str]:
    """Findings, one sentence each, on what the study expects (docs/memorization.md#ddpm-on-nested-subsets:
    replication falls as the subset grows):

    - for each of `TREND_STATS` against the training subset, whether it decreases strictly and monotonically with the
      subset size (runs sharing a size are averaged);
    - whether, for the smallest subset, each of them exceeds the same statistic against the held-out control set
      (a model that copies its training images is closer to them than to images it never saw).

    rows: dicts with `subset_size`, `train_<stat>` and `control_<stat>` (None or missing: not measured).
    """
    if not rows:
        return ["no runs: nothing to check"]
    sizes = sorted({int(r["subset_size"]) for r in rows})
    findings = []
    for stat in TREND_STATS:
        key = f"train_{stat}"
        means = {}
        for size in sizes:
            values = [r.get(key) for r in rows if int(r["subset_size"]) == size]
            values = [v for v in values if v is not None and math.isfinite(v)]
            if values:
                means[size] = sum(values) / len(values)
        if len(means) < 2:
            findings.append(f"{stat} vs train: measured for {len(means)} subset size(s), no trend to check")
            continue
        sequence = ", ".join(f"{v:.4f} (n={n})" for n, v in means.items())
        values = list(means.values())
        steps = list(zip(values[:-1], values[1:], strict=True))  # (smaller subset, next larger subset)
        if all(b < a for a, b in steps):
            verdict = "decreases monotonically"
        elif all(b <= a for a, b in steps):
            verdict = "does not increase, but has ties (not strictly decreasing)"
        else:
            verdict = "does NOT decrease monotonically"
        findings.append(f"{stat} vs train {verdict} with subset size n: {sequence}")
    smallest = sizes[0]
    for stat in TREND_STATS:
        pairs = [
            (r.get(f"train_{stat}"), r.get(f"control_{stat}"))
            for r in rows
            if int(r["subset_size"]) == smallest
        ]
        pairs = [(t, c) for t, c in pairs if t is not None and c is not None]
        if not pairs:
            findings.append(f"smallest subset ({smallest} images): no control set, {stat} not compared")
            continue
        train, control = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        verdict = "exceeds" if train > control else "does NOT exceed"
        findings.append(
            f"smallest subset ({smallest} images): {stat} vs train {train:.4f} {verdict} vs control {control:.4f}"
        )
    return findings


# ---- figures -----------------------------------------------------------------------------------------------------
def panel_title(index: int, run: StudyRun) -> str:
    """ "(a) 10 points", or "(c) all points (100)" when the subset is the whole folder, as in the talk's figure."""
    size = run.row["subset_size"]
    points = f"all points ({size})" if run.num_files == size else f"{size} points"
    return f"({chr(ord('a') + index % 26)}) {points}"


def draw_study(runs: list[StudyRun]):
    """One panel per run, side by side: densities of top-1 sim(gen, train subset) in red and sim(gen, control) in
    blue on [0, 1] (`src.plots.plot_similarity_histograms`), and the threshold."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False, sharey=False)
    for i, (run, ax) in enumerate(zip(runs, axes[0], strict=True)):
        series = [
            (run.top1("control"), "vs held-out control", "tab:blue"),
            (run.top1("train"), "vs training subset", "tab:red"),
        ]
        plot_similarity_histograms(ax, series, run.threshold)
        ax.set_xlabel("top-1 similarity of a generation")
        ax.set_title(f"{panel_title(i, run)}, {run.row['steps']} steps", fontsize=10)
    axes[0][0].set_ylabel("density")
    fig.suptitle(f"Replication vs training subset size ({runs[0].row['extractor']} similarity)", fontsize=11)
    fig.tight_layout()
    return fig


def match_cells(run: StudyRun, row: dict, name: str = "train", k: int = 1) -> list[tuple]:
    """The cells of one matches.csv row: the generation (black frame), then its k best matches in the set `name`
    titled with their similarity, framed green above the threshold (as src/replication/report.py's gallery)."""
    cells = [(run.generated_dir / row["generated"], row["generated"][:14], "black")]
    for i in range(1, k + 1):
        if f"match_{i}" not in row:
            break
        sim = float(row[f"sim_{i}"])
        colour = "tab:green" if sim > run.threshold else "tab:gray"
        cells.append((run.train_root / row[f"match_{i}"], f"{name} {sim:.3f}", colour))
    return cells


def draw_study_gallery(runs: list[StudyRun], pairs: int = GALLERY_PAIRS):
    """One row per run: its `pairs` most replicated generations, each beside its nearest training image.
    Returns (figure, number of unreadable images)."""
    rows = [sum((match_cells(run, row) for row in run.matches["train"][:pairs]), []) for run in runs]
    labels = [f"{run.row['subset_size']} images" for run in runs]
    fig, unreadable = draw_image_rows(rows, labels)
    fig.suptitle(
        "Most replicated generations (black) and their nearest training image (green: above threshold)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig, unreadable


# ---- entry -------------------------------------------------------------------------------------------------------
def write_study(runs: list[StudyRun], out: Path) -> dict[str, Path]:
    """study.png, study_gallery.png, study.csv and study.md in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("study.png", "study_gallery.png", "study.csv", "study.md")}
    rows = [{**run.row, "run_dir": str(run.run_dir)} for run in runs]
    save_figure(draw_study(runs), files["study.png"], dpi=120)
    gallery, unreadable = draw_study_gallery(runs)
    save_figure(gallery, files["study_gallery.png"])
    if unreadable:
        print(f"study_gallery.png: {unreadable} image(s) unreadable (data moved?); their cells are empty")
    write_csv(rows, files["study.csv"])
    findings = check_trend(rows)
    files["study.md"].write_text(
        "# DDPM memorization study (docs/memorization.md#ddpm-on-nested-subsets)\n\n"
        "Top-1 similarity of each generation to its training subset (`train_*`) and to held-out control images "
        "(`control_*`); `sim_gt_thr` is the fraction above the threshold, `bg_95pc` the 95th percentile of the "
        "training subset's nearest-other-image similarities.\n\n"
        f"{markdown_table(rows)}\n\n## Findings\n\n" + "".join(f"- {f}\n" for f in findings)
    )
    return files


def main(argv=None) -> list[StudyRun]:
    args = study.parse_study_args(argv, __doc__)
    runs = load_study(args.folders)
    files = write_study(runs, args.out)
    print(markdown_table([run.row for run in runs]))
    print()
    for finding in check_trend([run.row for run in runs]):
        print(f"- {finding}")
    print(f"\nWrote {', '.join(str(p) for p in files.values())}")
    return runs


if __name__ == "__main__":
    main()
