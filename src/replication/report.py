"""The replication report folder: `report.json`, `matches.csv`, `histogram.png`, `gallery.png`
(docs/replication.md#report-and-histogram), and with the complexity diagnostic
(docs/replication.md#dcr-measurement) `complexity.csv` and `complexity.png`.

The histogram and the gallery are the two figures of the DCR studies (somepago/DCR `diff_retrieval.py`): the
distribution of each generation's top-1 similarity to the training set against the training set's own
nearest-other-image similarities, and the most-replicated generations beside their best matches. The complexity
scatter plots put each generation's top-1 similarity against the complexity of its matched training image
(DCR `simplicityscatter_*.png`).
"""

import csv
import json
import math
import sys
from pathlib import Path

import torch

from src.plots import draw_complexity, draw_retrieval_gallery, draw_similarity_histogram, save_figure


def write_matches(path, generated_paths, train_paths, scores, indices, prompts=None) -> list[dict]:
    """matches.csv: one row per generation, sorted by top-1 similarity (most replicated first), with its k training
    matches `match_i` (path relative to the training folder) and `sim_i`. Returns the rows."""
    scores, indices = scores.double().cpu(), indices.cpu()
    order = torch.argsort(scores[:, 0], descending=True, stable=True).tolist()
    k = scores.shape[1]
    rows = []
    for g in order:
        row = {"generated": generated_paths[g]}
        if prompts is not None:
            row["prompt"] = prompts[g]
        for i in range(k):
            row[f"match_{i + 1}"] = train_paths[indices[g, i]]
            row[f"sim_{i + 1}"] = round(float(scores[g, i]), 6)
        rows.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_report(
    output_dir,
    stats: dict,
    generated,
    train,
    scores,
    indices,
    background,
    threshold: float,
    gallery_size: int = 8,
    prompts=None,
    extra: dict | None = None,
) -> dict[str, Path]:
    """Write the four report files into `output_dir` and return their paths.

    generated, train: `FolderFeatures` of the two folders. scores, indices: (G, k) top-k similarities and training
    row indices of each generation, best first. background: (N,) each training image's nearest-other similarity.
    report.json holds `stats`, the counts, the skipped files of both folders and `extra` (e.g. the cache state).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        name: output_dir / name for name in ("report.json", "matches.csv", "histogram.png", "gallery.png")
    }
    report = {
        "stats": {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in stats.items()
        },
        "threshold": threshold,
        "counts": {
            "generated": len(generated.paths),
            "train": len(train.paths),
            "generated_skipped": len(generated.skipped),
            "train_skipped": len(train.skipped),
            "above_threshold": int((scores[:, 0] > threshold).sum()),
        },
        "folders": {"generated": generated.folder, "train": train.folder},
        "skipped": {"generated": generated.skipped, "train": train.skipped},
        **(extra or {}),
    }
    files["report.json"].write_text(json.dumps(report, indent=2))
    rows = write_matches(files["matches.csv"], generated.paths, train.paths, scores, indices, prompts)

    series = [
        (background, "sim(train, train)", "tab:gray"),
        (scores[:, 0], "top-1 sim(gen, train)", "tab:red"),
    ]
    save_figure(draw_similarity_histogram(series, threshold), files["histogram.png"], dpi=120)

    shown = rows[:gallery_size]
    if not shown:  # gallery_size=0, or no training images to show (a webdataset store)
        del files["gallery.png"]
        return files
    cols = min(scores.shape[1], 5)
    fig = draw_retrieval_gallery(
        Path(),  # absolute paths below
        [str(Path(generated.folder).resolve() / r["generated"]) for r in shown],
        [[str(Path(train.folder).resolve() / r[f"match_{i + 1}"]) for i in range(cols)] for r in shown],
        [[r[f"sim_{i + 1}"] > threshold for i in range(cols)] for r in shown],  # green: above the threshold
        titles=[f"{r['generated'][:24]} {r['sim_1']:.3f}" for r in shown],
    )
    save_figure(fig, files["gallery.png"], dpi=100)
    return files


def write_complexity(output_dir, generated_paths, matched_paths, top1, complexity: dict, correlations: dict):
    """complexity.csv (per generation: its top-1 training match, the similarity and the match's complexity
    measures of `src.metrics.complexity`, in the generations' order) and complexity.png (`src.plots.draw_complexity`) in
    `output_dir`. Returns the two paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_figure(draw_complexity(top1, complexity, correlations), output_dir / "complexity.png", dpi=100)
    top1 = torch.as_tensor(top1).double().cpu().tolist()
    with open(output_dir / "complexity.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["generated", "match_1", "sim_1", *complexity])
        for g, name in enumerate(generated_paths):
            writer.writerow(
                [
                    name,
                    matched_paths[g],
                    round(top1[g], 6),
                    *(round(float(values[g]), 6) for values in complexity.values()),
                ]
            )
    return output_dir / "complexity.csv", output_dir / "complexity.png"


def log_report_to_wandb(
    output_dir, stats: dict, prefix: str = "replication", table: str = "matches.csv"
) -> bool:
    """Log the stats, every figure (*.png) of the report folder and the CSV `table` (when there) to the active W&B
    run, under `prefix/`; False when no run is active."""
    if "wandb" not in sys.modules:  # never imported, so no run can be active (and importing it costs ~1.4 s)
        return False
    import wandb

    if wandb.run is None:
        return False
    output_dir = Path(output_dir)
    logged = {
        **{f"{prefix}/{k}": v for k, v in stats.items()},
        **{f"{prefix}/{png.stem}": wandb.Image(str(png)) for png in sorted(output_dir.glob("*.png"))},
    }
    if (output_dir / table).is_file():
        with open(output_dir / table) as f:
            rows = list(csv.reader(f))
        logged[f"{prefix}/{Path(table).stem}"] = wandb.Table(columns=rows[0], data=rows[1:])
    wandb.log(logged)
    return True
