"""Measure finished diffusion runs again with other copy detectors: how do a study's figures move when the
descriptor changes? (docs/replication.md#which-descriptor-and-threshold-for-each-study)

    python experiments/copy_descriptor/restudy.py RUN [RUN ...] --out OUT \\
        --descriptor pixels:0.9 --descriptor pixels_channel:0.9 \\
        --descriptor copy_descriptor:0.7:extractor.checkpoint=<sscd run>/checkpoints/last.ckpt

RUN is a run folder of `src.train` that ended with its replication analysis (`replication/summary.json`, the
generations in `samples/final/`), or a multirun folder holding such runs. Each run's training and held-out
images are read back from its own config (the datamodule is rebuilt from `config_resolved.yaml`, so the subset
is the run's, drawn by its seed), and `analyse_replication` runs again on the same generations for each
`--descriptor NAME:THRESHOLD[:OVERRIDE,...]` (NAME a conf/extractor/ config). Written to OUT:

- runs/<run>/<descriptor>/{train,control}/: the replication reports;
- restudy.csv / restudy.md: per run and descriptor, the share of generations above the threshold against the
  training images and against the held-out images (with 95% bootstrap intervals), and the 95th percentile of
  top-1 similarity.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.replication.analysis import analyse_replication
from src.replication.study import read_json

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def find_runs(folders: list[str]) -> list[Path]:
    runs = []
    for folder in folders:
        runs += sorted(p.parents[1] for p in Path(folder).rglob("replication/summary.json"))
    if not runs:
        raise SystemExit(f"no run with replication/summary.json under {folders}")
    return runs


def parse_descriptor(spec: str) -> tuple[str, str, float, list[str]]:
    """'name:threshold[:override,override]' -> (label, name, threshold, overrides)."""
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(
            f"--descriptor {spec!r}: expected NAME:THRESHOLD[:OVERRIDES], e.g. pixels_channel:0.9"
        )
    name, threshold = parts[0], float(parts[1])
    overrides = parts[2].split(",") if len(parts) == 3 else []
    return f"{name}@{threshold:g}", name, threshold, overrides


def build_extractor(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("replicate.yaml", [f"extractor={name}", "generated=.", "train=.", *overrides])
    return instantiate(cfg.extractor).eval()


def run_files(run: Path):
    """(root, training files, held-out files) of a finished run, from its own datamodule config."""
    cfg = OmegaConf.load(run / "config_resolved.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return Path(datamodule.root), list(datamodule.train_files), list(getattr(datamodule, "control_files", []))


def share_interval(
    top1: np.ndarray, threshold: float, bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float]:
    above = (top1 > threshold).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = above[rng.integers(0, len(above), (bootstrap, len(above)))].mean(axis=1)
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--descriptor", action="append", required=True, help="NAME:THRESHOLD[:OVERRIDES]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    descriptors = [parse_descriptor(spec) for spec in args.descriptor]
    extractors = {label: build_extractor(name, overrides) for label, name, _, overrides in descriptors}
    rows = []
    for run in find_runs(args.runs):
        root, train_files, control_files = run_files(run)
        summary = read_json(run / "replication" / "summary.json")
        name = f"{run.parent.name}/{run.name}"
        for label, _, threshold, _ in descriptors:
            row = {"run": name, "subset_size": len(train_files), "descriptor": label, "threshold": threshold}
            for target, files in (("train", train_files), ("control", control_files)):
                if not files:
                    continue
                out = args.out / "runs" / run.parent.name / run.name / label / target
                stats = analyse_replication(
                    extractors[label],
                    run / "samples" / "final",
                    root,
                    out,
                    train_files=files,
                    threshold=threshold,
                    batch_size=args.batch_size,
                    device="cpu",
                    cache_dir=None,
                )
                top1 = np.array([float(r["sim_1"]) for r in csv.DictReader((out / "matches.csv").open())])
                low, high = share_interval(top1, threshold)
                row.update(
                    {
                        f"{target}_share": stats["sim_gt_thr"],
                        f"{target}_share_low": low,
                        f"{target}_share_high": high,
                        f"{target}_sim_95pc": stats["sim_95pc"],
                    }
                )
            row["generated"] = summary["num_generated"]
            rows.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with (args.out / "restudy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| run | training images | descriptor @ threshold | share > threshold vs training [95% CI] | vs held-out [95% CI] | sim_95pc vs training |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        held_out = (
            f"{r['control_share']:.2f} [{r['control_share_low']:.2f}, {r['control_share_high']:.2f}]"
            if "control_share" in r
            else "-"
        )
        lines.append(
            f"| {r['run']} | {r['subset_size']} | {r['descriptor']} | {r['train_share']:.2f} "
            f"[{r['train_share_low']:.2f}, {r['train_share_high']:.2f}] | {held_out} | {r['train_sim_95pc']:.4f} |"
        )
    (args.out / "restudy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
