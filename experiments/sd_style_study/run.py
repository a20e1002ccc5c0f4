"""The CSD paper's Stable Diffusion style study (docs/style.md#stable-diffusion-style-study): generations of a
Stable Diffusion model prompted with artists' names, retrieved against a style-tagged database; a hit is a database
image tagged with a style the prompt names. Scored as Tables 2 and 3 (mAP and recall at 1 / 10 / 100).

    python experiments/sd_style_study/run.py --pretrained /weights/stable-diffusion-2-1 --image-size 768 \\
        --artists artists.txt --database laion_styles.csv --user-prompts sd_prompts_test.txt \\
        --extractor extractor=csd extractor.checkpoint=/weights/csd_vit_l.pth --device cuda

1. Prompts (`src.data.style.prompts`) under OUT/prompts/: `simple` ("A painting in the style of <artist>", each
   artist --simple-repeats times: 10 in the paper), `woman`, `dog`, `house` (five templates each, --content-repeats
   times: 2), and with --user-prompts the user prompts naming an artist (at most --max-user-prompts: 4,000).
2. Generation: `python -m src.sample pretrained=<dir> prompts=<setting>.txt` into OUT/generated/<setting>/ (image i
   from seed i and prompt i; resumable).
3. Scoring: per setting a CSV of the generations (queries, labelled with the artists their prompt names) and the
   database (--database: a `path,label` CSV, labels joined by "|", paths relative to its folder or absolute),
   scored by `python -m src.evaluate benchmark=csv` with the --extractor overrides into OUT/scores/<name>/<setting>/.
4. OUT/results.md: one row per setting, mAP@1/10/100 and R@1/10/100 in percent, the layout of Tables 2 and 3.

Every step is skipped when its output exists. The artist list is a text file, one name per line, written as the
database's labels write them.
"""

import argparse
import csv
import json
from pathlib import Path

from src.data.images import list_images
from src.data.style.prompts import TEMPLATES, style_prompts, user_prompts
from src.replication.study import run_once

KS = (1, 10, 100)


def attempt_dir(parent: Path, setting: str) -> Path:
    """A new run folder per attempt (a resumed generation must not write into the interrupted run's folder)."""
    return parent / f"{setting}_{len(list(parent.glob(f'{setting}_*')))}"


def write_prompts(args, out: Path) -> dict[str, list]:
    """{setting: [(prompt, labels)]}, also written to OUT/prompts/<setting>.txt and .json."""
    artists = [line.strip() for line in args.artists.read_text().splitlines() if line.strip()]
    settings = {"simple": style_prompts(artists, "simple", args.simple_repeats)}
    for subject in TEMPLATES:
        settings[subject] = style_prompts(artists, subject, args.content_repeats)
    if args.user_prompts:
        lines = args.user_prompts.read_text().splitlines()
        settings["user"] = user_prompts(lines, artists, args.max_user_prompts, args.seed)
        print(f"user prompts: {len(settings['user'])} of {len(lines)} name an artist of the list")
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for setting, rows in settings.items():
        (folder / f"{setting}.txt").write_text("\n".join(prompt for prompt, _ in rows) + "\n")
        (folder / f"{setting}.json").write_text(json.dumps([labels for _, labels in rows]))
    return settings


def read_database(path: Path) -> list[tuple[str, str]]:
    """(absolute image path, labels) rows of a `path,label` CSV."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise SystemExit(
            f"--database {path}: expected a CSV with the columns path,label (labels joined by |)"
        )
    return [(str((path.parent / row["path"]).resolve()), row["label"]) for row in rows]


def scoring_csv(
    generated: Path, labels: list[list[str]], database: list[tuple[str, str]], path: Path
) -> Path:
    images = list_images(generated)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for image in images:
            index = int(image.stem)  # src.sample names image i 000000i.png
            writer.writerow([str(image.resolve()), "|".join(labels[index % len(labels)]), "query"])
        writer.writerows([[p, label, "database"] for p, label in database])
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", required=True, help="a diffusers Stable Diffusion directory")
    parser.add_argument("--artists", type=Path, required=True, help="one artist per line")
    parser.add_argument(
        "--database", type=Path, required=True, help="path,label CSV of the style-tagged database"
    )
    parser.add_argument("--user-prompts", type=Path, help="user prompts, one per line")
    parser.add_argument("--max-user-prompts", type=int, default=4000)
    parser.add_argument("--settings", default="simple,woman,dog,house,user", help="a comma-separated subset")
    parser.add_argument("--simple-repeats", type=int, default=10)
    parser.add_argument("--content-repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="descriptor", help="the descriptor's name in the scores")
    parser.add_argument(
        "--extractor", nargs="+", default=["extractor=csd"], help="src.evaluate extractor overrides"
    )
    parser.add_argument("--out", type=Path, default=Path("experiments/sd_style_study"))
    args = parser.parse_args(argv)
    out = args.out
    settings = write_prompts(args, out)
    chosen = args.settings.split(",")
    settings = {name: rows for name, rows in settings.items() if name in chosen}
    database = read_database(args.database)
    rows = {}
    for setting, prompts in settings.items():
        if not prompts:
            print(f"{setting}: no prompt, left out")
            continue
        generated = out / "generated" / setting
        done = generated.is_dir() and len([p for p in generated.glob("*.png")]) >= len(prompts)
        if not done:
            sample = [
                f"pretrained={args.pretrained}",
                f"prompts={out / 'prompts' / f'{setting}.txt'}",
                f"num_images={len(prompts)}",
                f"output_folder={generated}",
                f"image_size={args.image_size}",
                f"steps={args.steps}",
                f"batch_size={args.batch_size}",
                f"device={args.device}",
                f"seed={args.seed}",
            ]
            run_once("sample", sample, attempt_dir(out / "sample_runs", setting), done=None)
        labels = [labels for _, labels in prompts]
        table = scoring_csv(generated, labels, database, out / "prompts" / f"{setting}_scoring.csv")
        command = ["benchmark=csv", f"benchmark.csv_path={table}", *args.extractor, f"name={args.name}"]
        run_dir = run_once(
            "evaluate", [*command, f"device={args.device}"], out / "scores" / args.name / setting
        )
        rows[setting] = json.loads((run_dir / "metrics.json").read_text())
    lines = [
        "| Setting | " + " | ".join(f"mAP@{k}" for k in KS) + " | " + " | ".join(f"R@{k}" for k in KS) + " |",
        "|---|" + "---|" * (2 * len(KS)),
    ]
    for setting, m in rows.items():
        cells = [f"{100 * m[f'mAP@{k}']:.2f}" for k in KS] + [f"{100 * m[f'recall@{k}']:.2f}" for k in KS]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    text = f"{args.name}: generations of {args.pretrained} retrieved against {args.database}\n\n" + "\n".join(
        lines
    )
    (out / "results.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
