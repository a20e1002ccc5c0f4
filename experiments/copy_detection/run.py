"""Rank every descriptor that runs without downloaded weights on the five partial-copy sets, as the Forgery paper
ranks its extractors (docs/replication.md#the-partial-copy-benchmark):

    python experiments/copy_detection/run.py                                   # trains what it needs first
    python experiments/copy_detection/run.py --ddpm <ddpm last.ckpt> --copy-descriptor <sscd last.ckpt>

The RePaint fill of the inpainting sets is a DDPM of this project (`experiment=ddpm_quickstart` on the 80 LFW
faces, trained first when --ddpm is not given), and the trained copy descriptor comes from
`experiment=sscd_quickstart` (trained first when --copy-descriptor is not given; --no-train leaves it out). Each
(descriptor, set) is one `src.evaluate` run under OUT/runs/<set>/<descriptor> (a finished run, one with
metrics.json, is read again, so an interrupted study resumes). `aggregate` writes to OUT (default
experiments/copy_detection):

- results.csv: every figure with its 95% bootstrap interval; results.md: mAP [CI] per descriptor and set;
- rank.md: the average rank of each descriptor over every (set, metric) pair, in the paper's layout (type,
  method, average rank), lower is better;
- results.png: mAP with intervals per set.

Hydra multiruns aggregate the same way: `python experiments/copy_detection/run.py --aggregate <multirun dir>`.
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from src.metrics import average_rank  # noqa: E402
from src.plots import save_figure  # noqa: E402
from src.replication.study import run_once  # noqa: E402

SETS = ("copy_segmix", "copy_segmix_hard", "copy_segmix_resized", "copy_diagonal", "copy_patch")
INPAINT_SETS = ("copy_diagonal", "copy_patch")
METRICS = ("mAP", "MRR", "precision@1", "precision@4", "precision@10", "recall@1", "recall@4", "recall@10")
RANKED = ("mAP", "MRR", "precision@4", "recall@10")  # one precision and one recall: R@1 is P@1 / copies


def random_net(model: str, pool: str, size: int = 64) -> list[str]:
    return [
        "extractor=dino_vitb16",
        f"extractor.model={model}",
        "extractor.pretrained=null",
        f"extractor.pool={pool}",
        f"extractor.image_size={size}",
        f"extractor.resize_size={size}",
    ]


# name -> (type in the paper's table, src.evaluate overrides)
DESCRIPTORS = {
    "pixels": ("pixels", ["extractor=pixels"]),
    "pixels_channel": ("pixels", ["extractor=pixels_channel"]),
    "pixels_gray": ("pixels", ["extractor=pixels_gray"]),
    "color_hist": ("histogram", ["extractor=color_hist"]),
    "resnet18_random": ("random network", random_net("resnet18", "avg")),
    "resnet18_random_split": ("random network, split-product", random_net("resnet18", "tokens")),
    "vit_tiny_random": ("random network", random_net("vit_tiny_patch16_224", "token")),
    "vit_tiny_random_split": ("random network, split-product", random_net("vit_tiny_patch16_224", "tokens")),
    "copy_descriptor_random": ("random network", ["extractor=copy_descriptor", "extractor.image_size=32"]),
}


def train(experiment: str, out: Path, overrides: list[str], best: bool = False) -> Path:
    """`python -m src.train experiment=<experiment>` into out (skipped when its last.ckpt exists); its last
    checkpoint, or with `best` its best validated one."""
    run_once("train", [f"experiment={experiment}", *overrides], out, done="checkpoints/last.ckpt")
    found = sorted((out / "checkpoints").glob("best_*.ckpt")) if best else []
    return found[-1] if found else out / "checkpoints" / "last.ckpt"


def evaluate_one(name: str, bench: str, overrides: list[str], out: Path, extra: list[str]) -> dict:
    command = [f"benchmark={bench}", *overrides, f"name={name}", "save_embeddings=false", *extra]
    return json.loads(
        (run_once("evaluate", command, out / "runs" / bench / name) / "metrics.json").read_text()
    )


def collect(folders: list[Path]) -> dict[str, dict[str, dict]]:
    """{descriptor: {set: metrics}} from finished `src.evaluate` runs (their metrics.json and
    config_resolved.yaml) anywhere under `folders`."""
    table: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for metrics_path in sorted(Path(folder).rglob("metrics.json")):
            config = metrics_path.parent / "config_resolved.yaml"
            if not config.is_file():
                continue
            cfg = OmegaConf.load(config)
            kind = OmegaConf.select(cfg, "benchmark.kind")
            if kind is None:
                continue
            table.setdefault(str(cfg.name), {})[f"copy_{kind}"] = json.loads(metrics_path.read_text())
    if not table:
        raise SystemExit(
            f"no finished partial-copy evaluation (metrics.json with its config) under {folders}"
        )
    return table


def aggregate(table: dict[str, dict[str, dict]], out: Path, types: dict[str, str] | None = None) -> dict:
    """Write results.csv / results.md / rank.md / results.png to `out`; returns the average ranks."""
    types = types or {}
    out.mkdir(parents=True, exist_ok=True)
    sets = [s for s in SETS if any(s in row for row in table.values())]
    complete = {name: row for name, row in table.items() if all(s in row for s in sets)}
    left_out = sorted(set(table) - set(complete))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["descriptor", "set", "metric", "value", "lo", "hi"])
        for name, row in table.items():
            for bench, m in row.items():
                for key in METRICS:
                    if key in m:
                        writer.writerow(
                            [name, bench, key, m[key], m.get(f"{key}_lo", ""), m.get(f"{key}_hi", "")]
                        )
    head = "| descriptor | " + " | ".join(s.removeprefix("copy_") for s in sets) + " |"
    lines = [head, "|" + "---|" * (len(sets) + 1)]
    for name, row in table.items():
        cells = []
        for s in sets:
            m = row.get(s)
            cells.append(
                "-"
                if m is None
                else f"{100 * m['mAP']:.1f} [{100 * m['mAP_lo']:.1f}, {100 * m['mAP_hi']:.1f}]"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text(
        "mAP (%, 95% bootstrap interval over sources) per set.\n\n" + "\n".join(lines) + "\n"
    )
    ranks = average_rank(
        {n: {f"{s}/{k}": row[s][k] for s in sets for k in RANKED} for n, row in complete.items()}
    )
    order = sorted(ranks, key=ranks.get)
    rank_lines = ["| Type | Method | Avg. rank ↓ |", "|---|---|---|"]
    rank_lines += [f"| {types.get(n, '-')} | {n} | {ranks[n]:.1f} |" for n in order]
    note = (
        f"Average rank over {len(sets)} sets x {len(RANKED)} metrics ({', '.join(RANKED)}); ties share their mean "
        "rank."
    )
    if left_out:
        note += f" Left out (not run on every set): {', '.join(left_out)}."
    (out / "rank.md").write_text(note + "\n\n" + "\n".join(rank_lines) + "\n")
    print("\n".join(lines) + "\n\n" + note + "\n" + "\n".join(rank_lines))

    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 0.35 * len(order) + 1.5), sharey=True)
    axes = np.atleast_1d(axes)
    y = np.arange(len(order))
    for ax, s in zip(axes, sets, strict=True):
        values = np.array([complete[n][s]["mAP"] for n in order])
        lo = values - np.array([complete[n][s]["mAP_lo"] for n in order])
        hi = np.array([complete[n][s]["mAP_hi"] for n in order]) - values
        ax.barh(y, values, xerr=[lo, hi], color="tab:blue", capsize=2)
        ax.set_yticks(y, order)
        ax.set_xlim(0, 1)
        ax.set_title(f"{s.removeprefix('copy_')}: mAP")
    axes[0].invert_yaxis()
    fig.tight_layout()
    save_figure(fig, out / "results.png")
    return ranks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddpm", help="the DDPM of the RePaint fill (<run>/checkpoints/last.ckpt)")
    parser.add_argument("--copy-descriptor", help="a trained copy descriptor (<run>/checkpoints/last.ckpt)")
    parser.add_argument("--csd", help="a trained CSD checkpoint to rank as well")
    parser.add_argument("--no-train", action="store_true", help="train nothing: leave out what is not given")
    parser.add_argument(
        "--max-sources", type=int, default=100, help="sources of the inpainting sets (RePaint cost)"
    )
    parser.add_argument("--aggregate", nargs="+", type=Path, help="only aggregate these finished runs")
    parser.add_argument("--out", type=Path, default=Path("experiments/copy_detection"))
    parser.add_argument("overrides", nargs="*", help="more src.evaluate overrides, e.g. paths.data_dir=...")
    args = parser.parse_args(argv)
    types = {name: kind for name, (kind, _) in DESCRIPTORS.items()}
    if args.aggregate:
        return aggregate(collect(args.aggregate), args.out, types)
    descriptors = {name: overrides for name, (_, overrides) in DESCRIPTORS.items()}
    ddpm = args.ddpm
    if ddpm is None and not args.no_train:
        ddpm = str(train("ddpm_quickstart", args.out / "train" / "ddpm", ["data.subset_size=80"]))
    copy_descriptor = args.copy_descriptor
    if copy_descriptor is None and not args.no_train:
        copy_descriptor = str(train("sscd_quickstart", args.out / "train" / "copy_descriptor", [], best=True))
    if copy_descriptor:
        descriptors["copy_descriptor"] = [
            "extractor=copy_descriptor",
            f"extractor.checkpoint={copy_descriptor}",
        ]
        types["copy_descriptor"] = "trained here, copy detection"
    if args.csd:
        descriptors["csd"] = ["extractor=csd", f"extractor.checkpoint={args.csd}"]
        types["csd"] = "trained here, style"
    table: dict[str, dict[str, dict]] = {}
    for bench in SETS:
        extra = list(args.overrides)
        if bench in INPAINT_SETS:
            if ddpm is None:
                print(f"{bench}: left out (no DDPM for the RePaint fill; give --ddpm)")
                continue
            extra += [f"benchmark.fill.checkpoint={ddpm}", f"benchmark.max_sources={args.max_sources}"]
        for name, overrides in descriptors.items():
            table.setdefault(name, {})[bench] = evaluate_one(name, bench, overrides, args.out, extra)
    return aggregate(table, args.out, types)


if __name__ == "__main__":
    main()
