"""The Forgery paper's Stable Diffusion replication study at its size (docs/replication.md#stable-diffusion-study):
10,000 generations of SD 1.4 prompted with captions of LAION-Aesthetics v2 6+, searched with SSCD against that
set's 12 million images; a generation whose top-1 similarity is above 0.5 is a potential copy (paper: 1.88 %).

    python experiments/sd_replication/run.py --shards '/data/laion6plus/{00000..01241}.tar' \\
        --pretrained /weights/stable-diffusion-v1-4 --out runs/sd_replication --nproc 8 \\
        --extractor extractor=sscd extractor.checkpoint=/weights/sscd_disc_mixup.torchscript.pt

1. Captions: --generations captions drawn with --seed from the training captions (img2dataset's .parquet beside
   each tar, column `caption`, else the tars' .txt members) -> OUT/prompts.txt.
2. Generation: `python -m src.sample pretrained=<dir> prompts=OUT/prompts.txt` into OUT/generated/ (image i from
   seed i and caption i; --nproc N runs N processes under torchrun, each an index range; resumable).
3. Features: `python -m src.extract source=<shards> store=OUT/store` (--nproc processes, one tar per shard,
   resumable), or --store, a store extracted beforehand with the same extractor.
4. Search and report: `python -m src.replicate train_store=OUT/store threshold=0.5 background_anchors=...`
   into OUT/report/ (matches.csv, histogram.png, report.json).
5. OUT/results.md: the share of generations above the threshold with its 95 % bootstrap interval, beside the
   paper's 1.88 %, and the DCR statistics.

Every step is skipped when its output exists.
"""

import argparse
import csv
import json
import random
from pathlib import Path

import numpy as np

from src.data.images import list_images
from src.replication.store import expand_shards
from src.replication.study import bootstrap_interval, format_cell, markdown_table, run_once, share_above

PAPER_SHARE = 0.0188  # potential copies among SD 1.4 generations, SSCD > 0.5 (docs/replication.md#stable-diffusion-study)


def training_captions(urls: list[str]) -> list[str]:
    """Every caption of the training set, shard by shard: img2dataset's <shard>.parquet when present (the
    `caption` column), else the .txt member of each sample of the tar."""
    import webdataset as wds

    captions = []
    for url in urls:
        parquet = Path(url).with_suffix(".parquet")
        if parquet.is_file():
            import pandas  # reads parquet through pyarrow (pip install pyarrow)

            captions += [c for c in pandas.read_parquet(parquet, columns=["caption"])["caption"] if c]
            continue

        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            text = sample.get("txt")
            if text:
                captions.append(text.decode("utf-8").strip())
    return captions


def write_prompts(args, path: Path) -> list[str]:
    if path.is_file():
        return path.read_text().splitlines()
    captions = training_captions(expand_shards(args.shards))
    if len(captions) < args.generations:
        print(f"note: {len(captions)} captions for {args.generations} generations: drawing with replacement")
        prompts = random.Random(args.seed).choices(captions, k=args.generations)
    else:
        prompts = random.Random(args.seed).sample(captions, args.generations)
    prompts = [" ".join(p.split()) for p in prompts]  # one line each
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return prompts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", required=True, help="the training set's webdataset tars (brace pattern)")
    parser.add_argument(
        "--pretrained", required=True, type=Path, help="a diffusers Stable Diffusion directory"
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--generations", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--background-anchors", type=int, default=100_000)
    parser.add_argument(
        "--store", type=Path, default=None, help="a feature store of the shards made beforehand"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per step, under torchrun")
    parser.add_argument("--seed", type=int, default=0, help="draws the captions")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--extractor", nargs="+", default=["extractor=sscd"], help="Hydra overrides choosing the descriptor"
    )
    args = parser.parse_args(argv)
    out = args.out
    prompts = write_prompts(args, out / "prompts.txt")
    print(f"{len(prompts)} captions drawn from the training set")

    generated = out / "generated"
    if len(list_images(generated)) < args.generations if generated.is_dir() else True:
        sample = [
            f"pretrained={args.pretrained}",
            f"prompts={out / 'prompts.txt'}",
            f"output_folder={generated}",
            f"num_images={args.generations}",
            f"image_size={args.image_size}",
            f"steps={args.steps}",
            f"batch_size={args.batch_size}",
            f"device={args.device}",
        ]
        attempt = out / "runs" / f"sample_{len(list((out / 'runs').glob('sample_*')))}"
        run_once("sample", sample, attempt, done=None, nproc=args.nproc)

    store = args.store or out / "store"
    if not (store / "manifest.json").is_file():
        extract = [f"source='{args.shards}'", f"store={store}", f"device={args.device}", *args.extractor]
        run_once("extract", extract, out / "runs" / "extract", done=None, nproc=args.nproc)

    report = out / "report"
    if not (report / "metrics.json").is_file():
        replicate = [
            f"generated={generated}",
            f"train_store={store}",
            f"threshold={args.threshold}",
            f"background_anchors={args.background_anchors}",
            f"device={args.device}",
            *args.extractor,
        ]
        run_once("replicate", replicate, report)
    return summarise(args, report, out)


def summarise(args, report: Path, out: Path) -> dict:
    stats = json.loads((report / "metrics.json").read_text())
    with (report / "matches.csv").open(newline="") as f:
        top1 = np.array([float(row["sim_1"]) for row in csv.DictReader(f)])
    share = float((top1 > args.threshold).mean())
    low, high = bootstrap_interval(top1, share_above(args.threshold))
    summary = {
        "generations": len(top1),
        "training_rows": json.loads((report / "report.json").read_text())["counts"]["train"],
        "share_above": share,
        "share_low": float(low),
        "share_high": float(high),
        "paper_share": PAPER_SHARE,
        **{k: stats[k] for k in ("sim_mean", "sim_95pc", "bg_mean", "bg_95pc")},
    }
    rows = [
        {
            "": "potential copies (top-1 > threshold)",
            "measured": f"{100 * share:.2f} % [{100 * low:.2f}, {100 * high:.2f}]",
            "paper": f"{100 * PAPER_SHARE:.2f} %",
        },
        *(
            {"": key, "measured": format_cell(summary[key]), "paper": "-"}
            for key in ("sim_mean", "sim_95pc", "bg_mean", "bg_95pc")
        ),
    ]
    text = (
        f"# Stable Diffusion replication study\n\n{summary['generations']} generations against "
        f"{summary['training_rows']} training images, threshold {args.threshold} "
        "(95 % bootstrap interval over generations).\n\n"
        + markdown_table(rows, ["", "measured", "paper"])
        + "\n"
    )
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(text)
    return summary


if __name__ == "__main__":
    main()
