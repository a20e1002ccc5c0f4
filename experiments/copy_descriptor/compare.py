"""Score every copy detector that runs without downloaded weights on the planted-copy benchmark, side by side
(docs/replication.md#scoring-a-copy-detector):

    python experiments/copy_descriptor/compare.py --checkpoint logs/train/runs/sscd_quickstart_<time>/checkpoints/last.ckpt

Each descriptor is one `python -m src.evaluate benchmark=planted_copies extractor=<name>` run under OUT/runs/<name>
(a finished run, one with metrics.json, is read again rather than re-run): raw pixels with each normalisation,
the colour histogram, the copy descriptor's network with random weights and, given --checkpoint, the trained
copy descriptor; each once on whole images and once with region matching (`region_scales=`, run <name>_regions,
docs/replication.md#region-matching). Written to OUT (default experiments/copy_descriptor):

- descriptors.csv (every figure) / descriptors.md (`src.evaluate.copy_table_row`: uAP, recall at precision 0.9,
  precision and recall at the thresholds 0.9 and 0.75, the precision-0.9 threshold, mAP@100), with their 95%
  bootstrap intervals over queries;
- edits.csv / edits.md: per edit of the copies, the share whose nearest database image is their source (top-1)
  and the share found at the descriptor's own precision-0.9 threshold;
- margins.csv / margins.md: the trained descriptor's uAP minus each other descriptor's, matched alike (whole
  images / regions), with paired 95% bootstrap intervals (`src.metrics.uap_difference`);
- descriptors.png: uAP and recall at precision 0.9 with their intervals.
"""

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.evaluate import copy_table_row  # noqa: E402
from src.metrics import top1_predictions, uap_difference  # noqa: E402
from src.plots import save_figure  # noqa: E402
from src.replication.study import run_once  # noqa: E402
from src.utils.embeddings import load_embeddings  # noqa: E402

WEIGHT_FREE = ("pixels", "pixels_channel", "pixels_gray", "color_hist")
THRESHOLDS = (0.9, 0.75)  # the precision / recall columns of the table (src.evaluate.copy_table_row)
REGIONS = "_regions"  # the suffix of a descriptor's region-matching run


def label(name: str) -> str:
    """A run's name in the tables: `pixels_regions` -> `pixels + regions` (as src.evaluate names its row)."""
    return name.removesuffix(REGIONS) + " + regions" if name.endswith(REGIONS) else name


def run_evaluation(name: str, overrides: list[str], out: Path, extra: list[str]) -> dict:
    command = ["benchmark=planted_copies", *overrides, f"name={name.removesuffix(REGIONS)}", *extra]
    return json.loads((run_once("evaluate", command, out / "runs" / name) / "metrics.json").read_text())


def predictions(run_dir: Path) -> tuple[list[str], tuple]:
    """The run's query paths and (top-1 score, right, has copy) per query, from its embeddings."""
    saved = load_embeddings(run_dir / "embeddings.npz")
    keys = ("query", "database", "query_labels", "database_labels")
    return saved["query_paths"], top1_predictions(*(saved[k] for k in keys))


def per_edit(predicted: tuple, threshold: float) -> dict[str, dict[str, float]]:
    """Per edit: (count, top-1 right share, share found at `threshold`) from a run's `predictions`."""
    paths, (best, right, _) = predicted
    out = {}
    for q, path in enumerate(paths):
        edit = Path(path).stem.split("__")[-1]
        if edit == "none":
            continue
        row = out.setdefault(edit, {"copies": 0, "top1": 0, "found": 0})
        row["copies"] += 1
        row["top1"] += int(right[q])
        row["found"] += int(right[q] and float(best[q]) >= threshold)
    return {
        e: {"copies": r["copies"], "top1": r["top1"] / r["copies"], "found": r["found"] / r["copies"]}
        for e, r in out.items()
    }


def write_margins(predicted: dict, out: Path) -> None:
    """margins.csv / margins.md: the trained descriptor against each other one, matched alike, from each run's
    `predictions`."""
    rows = []
    for suffix in ("", REGIONS):
        trained = predicted[f"copy_descriptor{suffix}"][1]
        for name, (_, other) in predicted.items():
            if name.endswith(REGIONS) == bool(suffix) and name != f"copy_descriptor{suffix}":
                diff = uap_difference(trained[:2], other[:2], trained[2])
                rows.append({"trained": label(f"copy_descriptor{suffix}"), "against": label(name), **diff})
    with (out / "margins.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "The trained copy descriptor's uAP minus each other descriptor's, both on whole images or both with region "
        "matching, in points, with paired 95% bootstrap intervals over queries (1,000 draws) and the share of "
        "draws in which the trained descriptor is ahead.",
        "",
        "| trained | against | uAP difference [95% CI] | draws ahead |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trained']} | {r['against']} | {100 * r['difference']:+.1f} "
            f"[{100 * r['difference_lo']:+.1f}, {100 * r['difference_hi']:+.1f}] | {100 * r['share_above_zero']:.1f}% |"
        )
    (out / "margins.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="the trained copy descriptor (<run>/checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, default=Path("experiments/copy_descriptor"))
    parser.add_argument(
        "--region-scales", type=float, nargs="+", default=[0.85, 0.7, 0.55], help="region matching's scales"
    )
    parser.add_argument("--region-grid", type=int, default=4, help="region positions per side")
    parser.add_argument("overrides", nargs="*", help="more src.evaluate overrides, e.g. paths.data_dir=...")
    args = parser.parse_args()
    descriptors = {name: [f"extractor={name}"] for name in WEIGHT_FREE}
    descriptors["copy_descriptor_random"] = ["extractor=copy_descriptor"]
    if args.checkpoint:
        descriptors["copy_descriptor"] = [
            "extractor=copy_descriptor",
            f"extractor.checkpoint={args.checkpoint}",
        ]
    scales = "[" + ",".join(f"{x:g}" for x in args.region_scales) + "]"
    for name in list(descriptors):
        descriptors[name + REGIONS] = [
            *descriptors[name],
            f"region_scales={scales}",
            f"region_grid={args.region_grid}",
        ]
    results = {name: run_evaluation(name, o, args.out, args.overrides) for name, o in descriptors.items()}

    with (args.out / "descriptors.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["descriptor", *sorted(next(iter(results.values())))])
        for name, m in results.items():
            writer.writerow([name, *(m[k] for k in sorted(m))])
    rows = [copy_table_row(label(name), m, THRESHOLDS) for name, m in results.items()]
    table = [rows[0][0], "|" + "---|" * (rows[0][0].count("|") - 1), *(row for _, row in rows)]
    (args.out / "descriptors.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    # no threshold reaches precision 0.9 (metrics.json: null): nothing is found at it
    thresholds = {
        name: m["threshold@p90"] if m["threshold@p90"] is not None else math.inf
        for name, m in results.items()
    }
    predicted = {name: predictions(args.out / "runs" / name) for name in results}  # each run searched once
    edits = {name: per_edit(predicted[name], thresholds[name]) for name in results}
    names = sorted(next(iter(edits.values())))
    with (args.out / "edits.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["descriptor", "edit", "copies", "top1", "found_at_p90_threshold"])
        for name, by_edit in edits.items():
            for edit in names:
                r = by_edit[edit]
                writer.writerow([name, edit, r["copies"], r["top1"], r["found"]])
    lines = [
        "| descriptor | "
        + " | ".join(f"{e} (n={edits[next(iter(edits))][e]['copies']})" for e in names)
        + " |"
    ]
    lines.append("|" + "---|" * (len(names) + 1))
    for name, by_edit in edits.items():
        cells = [f"{100 * by_edit[e]['top1']:.0f} / {100 * by_edit[e]['found']:.0f}" for e in names]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    (args.out / "edits.md").write_text(
        "Per edit: % of copies whose nearest database image is their source / % found at the descriptor's "
        "precision-0.9 threshold.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))

    if args.checkpoint:
        write_margins(predicted, args.out)

    fig, axes = plt.subplots(1, 2, figsize=(11, 6.5), sharey=True)
    y = np.arange(len(results))
    for ax, key in zip(axes, ("uAP", "recall@p90"), strict=True):
        values = np.array([m[key] for m in results.values()])
        lo = values - np.array([m[key + "_lo"] for m in results.values()])
        hi = np.array([m[key + "_hi"] for m in results.values()]) - values
        colours = ["tab:orange" if name.endswith(REGIONS) else "tab:blue" for name in results]
        ax.barh(y, values, xerr=[lo, hi], color=colours, capsize=3)
        ax.set_yticks(y, [label(name) for name in results])
        ax.tick_params(axis="y", labelleft=ax is axes[0])
        ax.set_xlim(0, 1)
        ax.set_title(f"{key} on the planted copies (95% CI; orange: region matching)", fontsize=9)
    axes[0].invert_yaxis()
    fig.tight_layout()
    save_figure(fig, args.out / "descriptors.png")


if __name__ == "__main__":
    main()
