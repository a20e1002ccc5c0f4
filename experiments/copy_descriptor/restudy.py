"""Measure finished diffusion runs again with other copy detectors: how do a study's figures move when the
descriptor changes? (docs/replication.md#which-descriptor-and-threshold-for-each-study)

    python experiments/copy_descriptor/restudy.py RUN [RUN ...] --out OUT \\
        --descriptor pixels:0.9 --descriptor pixels_channel:0.9 \\
        --descriptor copy_descriptor:0.7:extractor.checkpoint=<sscd run>/checkpoints/last.ckpt

RUN is a run folder of `src.train` that ended with its replication analysis (`replication/summary.json`, the
generations in `samples/final/`), or a multirun folder holding such runs. Each run's training and held-out
images are read back from its own config (`src.generation.run_datamodule`: the datamodule rebuilt from
`config_resolved.yaml`, so the subset is the run's, drawn by its seed), and `analyse_replication` runs again on
the same generations for each `--descriptor NAME:THRESHOLD[:OVERRIDE,...]` (NAME a conf/extractor/ config; one
descriptor at several thresholds is built once, and the training features are cached, content-keyed, under
OUT/feature_cache). NAME+regions (e.g. `copy_descriptor+regions:0.75:...`) scores each generation by region
matching instead (docs/replication.md#region-matching; `--region-scales`, `--region-grid`): its top-1 against the
training and held-out images, without the report. Written to OUT:

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

from src.callbacks.diffusion import read_top1
from src.data.images import list_images
from src.generation import run_datamodule
from src.metrics.search import region_topk
from src.nn.embed import embed_images
from src.replication.analysis import analyse_replication
from src.replication.study import bootstrap_interval, find_runs, percentile_95, read_json, share_above

CONF = str(Path(__file__).resolve().parents[2] / "conf")
REGIONS = "+regions"


def region_top1(extractor, run: Path, root, targets: dict, regions, batch_size: int) -> dict[str, np.ndarray]:
    """{target: each generation of the run (samples/final) scored by its best region match against the images
    `root / files`} for targets {name: files}; the generations are embedded once."""
    folder = run / "samples" / "final"
    paths = [str(p.relative_to(folder)) for p in list_images(folder)]
    generations = embed_images(extractor, folder, paths, batch_size, desc="generations", regions=regions)[0]
    out = {}
    for target, files in targets.items():
        images = embed_images(extractor, root, files, batch_size, desc=target, regions=regions)[0]
        out[target] = region_topk(generations, images, 1)[0][:, 0].double().numpy()
    return out


def parse_descriptor(spec: str) -> tuple[str, str, float, list[str]]:
    """'name[+regions]:threshold[:override,override]' -> (label, name, threshold, overrides)."""
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(
            f"--descriptor {spec!r}: expected NAME:THRESHOLD[:OVERRIDES], e.g. pixels_channel:0.9"
        )
    name, threshold = parts[0].removesuffix(REGIONS), float(parts[1])
    overrides = parts[2].split(",") if len(parts) == 3 else []
    return f"{parts[0]}@{threshold:g}", name, threshold, overrides


def build_extractor(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("replicate.yaml", [f"extractor={name}", "generated=.", "train=.", *overrides])
    return instantiate(cfg.extractor).eval()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--descriptor", action="append", required=True, help="NAME:THRESHOLD[:OVERRIDES]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--region-scales", type=float, nargs="+", default=[0.85, 0.7, 0.55])
    parser.add_argument("--region-grid", type=int, default=4)
    args = parser.parse_args(argv)
    regions = (tuple(args.region_scales), args.region_grid)
    descriptors = [parse_descriptor(spec) for spec in args.descriptor]
    built, extractors = {}, {}  # a descriptor named at several thresholds is built once
    for label, name, _, overrides in descriptors:
        key = (name, tuple(overrides))
        if key not in built:
            built[key] = build_extractor(name, overrides)
        extractors[label] = built[key]
    rows = []
    for run in find_runs(args.runs):
        datamodule = run_datamodule(run, "restudy.py", "give the run folders of `python -m src.train`")
        root, train_files = Path(datamodule.root), list(datamodule.train_files)
        control_files = list(getattr(datamodule, "control_files", []))
        summary = read_json(run / "replication" / "summary.json")
        name = f"{run.parent.name}/{run.name}"
        region_top = {}  # descriptor -> {target: each generation's top-1 by region matching}
        for label, _, threshold, _ in descriptors:
            row = {"run": name, "subset_size": len(train_files), "descriptor": label, "threshold": threshold}
            targets = {t: f for t, f in (("train", train_files), ("control", control_files)) if f}
            if (
                REGIONS in label and id(extractors[label]) not in region_top
            ):  # once per descriptor, any threshold
                region_top[id(extractors[label])] = region_top1(
                    extractors[label], run, root, targets, regions, args.batch_size
                )
            for target, files in targets.items():
                if REGIONS in label:
                    top1 = region_top[id(extractors[label])][target]
                    share, sim_95pc = share_above(threshold)(top1), percentile_95(top1)
                else:
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
                        cache_dir=args.out / "feature_cache",
                    )
                    top1, share, sim_95pc = read_top1(out), stats["sim_gt_thr"], stats["sim_95pc"]
                low, high = bootstrap_interval(top1, share_above(threshold), resamples=1000)
                row.update(
                    {
                        f"{target}_share": float(share),
                        f"{target}_share_low": low,
                        f"{target}_share_high": high,
                        f"{target}_sim_95pc": float(sim_95pc),
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
