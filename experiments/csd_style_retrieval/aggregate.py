"""Collect the metrics.json of every run under a folder into one markdown table (Table 1 / Table 4 columns).

python experiments/csd_style_retrieval/aggregate.py logs/train/multiruns/<sweep> [--prefix test/]
"""

import argparse
import json
from pathlib import Path

COLUMNS = ["mAP@1", "mAP@10", "mAP@100", "recall@1", "recall@10", "recall@100"]


def run_name(metrics_file: Path) -> str:
    """The run's command-line overrides (Hydra writes them to .hydra/overrides.yaml), else its folder name."""
    overrides = metrics_file.parent / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        lines = [
            line.removeprefix("- ").strip() for line in overrides.read_text().splitlines() if line.strip()
        ]
        return ", ".join(lines) or metrics_file.parent.name
    return metrics_file.parent.name


def aggregate(folder: Path, prefix: str = "test/") -> str:
    files = sorted(folder.rglob("metrics.json"))
    if not files:
        raise FileNotFoundError(f"No metrics.json under {folder}: point at a run or sweep directory.")
    header = "| run | " + " | ".join(c.replace("recall", "R") for c in COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for file in files:
        metrics = json.loads(file.read_text())
        cells = [
            f"{100 * metrics[prefix + c]:.2f}" if metrics.get(prefix + c) is not None else "-"
            for c in COLUMNS
        ]
        rows.append(f"| {run_name(file)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--prefix", default="test/", help="metric prefix: test/ (training runs) or '' (evaluate runs)"
    )
    args = parser.parse_args()
    print(aggregate(args.folder, args.prefix))
