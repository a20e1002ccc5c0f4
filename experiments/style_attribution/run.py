"""Which styles did a small text-to-image model learn? GSS against prototypes, end to end on a CPU
(docs/style.md#style-attribution):

    python experiments/style_attribution/run.py                      # about 40 min on 2 cores
    python experiments/style_attribution/run.py --csd <csd last.ckpt> --t2i <t2i last.ckpt>

1. The embedded style benchmark (16 procedural styles over photographs): half of the styles are "learned", the
   other half never shown to the generator.
2. A text-conditional diffusion model (`experiment=t2i_quickstart`, 32 px) trained on the learned styles' training
   images with the captions "a <subject> in the style of <style>" (the subject is the source photograph's).
3. For every style, learned or not: the simple prompt "a painting in the style of <style>" (10 seeds) and
   content-constrained prompts "a <subject> in the style of <style>" for three subjects of the training photos
   (4 seeds each), under OUT/generated/<setting>/<style>/.
4. `python -m src.attribute` with prototypes from held-out real images of each style (the benchmark's database
   split: photographs the generator never saw) and three descriptors: the quickstart CSD (`experiment=
   csd_quickstart`), an untrained ResNet (the copy descriptor's network with random weights) and the colour
   histogram.
5. OUT/results.md: per descriptor, GSS of learned against unseen styles (means, the difference with a 95%
   bootstrap interval over styles), the correlation of the content-constrained similarity with GSS across styles,
   the share of simple-prompt generations attributed to their style; OUT/gss.png: GSS per style.

Each step is skipped when its output exists, so an interrupted run resumes.
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from src.data.embedded.style_bench import build_style_bench  # noqa: E402
from src.data.embedded.styles import STYLES  # noqa: E402
from src.plots import save_figure  # noqa: E402
from src.replication.study import bootstrap_difference, mean, run_once  # noqa: E402

# What each training photograph shows, for the captions.
SUBJECTS = {
    "astronaut": "astronaut",
    "brick": "brick wall",
    "camera": "photographer",
    "cell": "cell",
    "clock": "clock",
    "immunohistochemistry": "tissue",
    "moon": "moon",
    "motorcycle": "motorcycle",
    "retina": "eye",
    "rocket": "rocket",
}
CONTENT = ("astronaut", "rocket", "clock")  # the content-constrained subjects (the paper: woman, dog, house)
SIMPLE_SEEDS, CONTENT_SEEDS = 10, 4
DESCRIPTORS = {
    "csd_quickstart": None,  # filled with the checkpoint
    "untrained_resnet": ["extractor=copy_descriptor", "extractor.image_size=64"],
    "color_hist": ["extractor=color_hist"],
}


def split_styles() -> tuple[list[str], list[str]]:
    """(learned, unseen): every other style in the benchmark's order, so both halves mix kinds of style."""
    names = list(STYLES)
    return names[::2], names[1::2]


def write_captions(bench: Path, learned: list[str], path: Path) -> int:
    """{image path relative to images/train: ["a <subject> in the style of <style>"]} for the learned styles."""
    captions = {}
    with (bench / "images.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "train" and row["style"] in learned:
                relative = Path(row["path"]).relative_to("images/train").as_posix()
                captions[relative] = [f"a {SUBJECTS[row['source']]} in the style of {row['style']}"]
    path.write_text(json.dumps(captions, indent=0))
    return len(captions)


def train_t2i(bench: Path, captions: Path, out: Path, steps: int, size: int) -> Path:
    overrides = [
        "experiment=t2i_quickstart",
        "data=captioned_folder",
        f"data.root={bench / 'images' / 'train'}",
        f"data.captions={captions}",
        "data.allow_missing_captions=true",  # the unseen styles' images have no caption: left out
        f"data.image_size={size}",
        "data.batch_size=16",
        "data.num_workers=2",
        "data.pin_memory=false",
        "callbacks.replication=null",
        f"trainer.max_steps={steps}",
        "run_name=t2i_styles",
    ]
    return run_once("train", overrides, out, done="checkpoints/last.ckpt") / "checkpoints" / "last.ckpt"


def prompts_for(style: str, simple: int = SIMPLE_SEEDS, content: int = CONTENT_SEEDS) -> dict[str, list]:
    """{setting: [(seed, prompt)]}: the simple prompt and the content-constrained ones for `style`."""
    settings = {"simple": [(s, f"a painting in the style of {style}") for s in range(simple)]}
    for subject in CONTENT:
        settings[subject] = [(100 + s, f"a {subject} in the style of {style}") for s in range(content)]
    return settings


def write_real_column(bench: Path, generated: Path, size: int, per_style: int = 10) -> None:
    """generated/real/<style>/: real training images of every style at the generation size, the control column:
    what the descriptor reads of a style at that size when the images are the style itself."""
    with (bench / "images.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == "train"]
    for style in STYLES:
        folder = generated / "real" / style
        folder.mkdir(parents=True, exist_ok=True)
        for row in [r for r in rows if r["style"] == style][:per_style]:
            image = Image.open(bench / row["path"]).convert("RGB")
            image.resize((size, size), Image.Resampling.BICUBIC).save(folder / Path(row["path"]).name)


def generate(
    ckpt: Path, out: Path, simple: int = SIMPLE_SEEDS, content: int = CONTENT_SEEDS, steps: int | None = None
) -> None:
    """Every style's simple and content-constrained prompts, `steps` sampling steps (None: the model's own)."""
    from src.generation import load_module

    if (out / "done.json").is_file():
        return
    module = load_module(str(ckpt), "cpu")
    jobs = [
        (setting, style, seed, prompt)
        for style in STYLES
        for setting, pairs in prompts_for(style, simple, content).items()
        for seed, prompt in pairs
    ]
    for start in range(0, len(jobs), 64):
        batch = jobs[start : start + 64]
        images = module.generate([j[2] for j in batch], [j[3] for j in batch], steps=steps)
        for (setting, style, seed, _), image in zip(batch, images.numpy(), strict=True):
            folder = out / setting / style
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{seed:04d}.png")
        print(f"generated {start + len(batch)} / {len(jobs)}", flush=True)
    (out / "done.json").write_text(json.dumps({"images": len(jobs)}))


def attribute(name: str, overrides: list[str], references: Path, generated: Path, out: Path) -> list[dict]:
    # num_workers=0: ~100 folders of a few dozen images each, where starting loader workers per folder costs
    # more than reading the images (the figures do not depend on it)
    command = [f"references={references}", f"generated={generated}", "num_workers=0", *overrides]
    run_dir = run_once("attribute", command, out / "attribution" / name, done="gss.csv")
    with (run_dir / "gss.csv").open(newline="") as f:
        return [
            {k: (v if k in ("column", "artist") else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def summarise(rows: list[dict], learned: list[str], seed: int = 0) -> dict:
    simple = {r["artist"]: r for r in rows if r["column"] == "simple"}
    gss = np.array([simple[s]["gss_raw"] for s in STYLES])
    is_learned = np.array([s in learned for s in STYLES])
    low, high = bootstrap_difference(gss[is_learned], gss[~is_learned], mean, seed=seed)
    content = np.array(
        [np.mean([r["gss_raw"] for r in rows if r["artist"] == s and r["column"] in CONTENT]) for s in STYLES]
    )
    real = {r["artist"]: r for r in rows if r["column"] == "real"}
    real_gss = np.array([real[s]["gss_raw"] for s in STYLES]) if real else None
    return {
        "attributed_real": float(np.mean([real[s]["attributed"] for s in STYLES])) if real else float("nan"),
        "generated_vs_real_r": float(np.corrcoef(gss, real_gss)[0, 1]) if real else float("nan"),
        "gss_learned": float(gss[is_learned].mean()),
        "gss_unseen": float(gss[~is_learned].mean()),
        "difference": float(gss[is_learned].mean() - gss[~is_learned].mean()),
        "difference_lo": low,
        "difference_hi": high,
        "content_vs_simple_r": float(np.corrcoef(gss, content)[0, 1]),
        "attributed_learned": float(np.mean([simple[s]["attributed"] for s in learned])),
        "attributed_unseen": float(np.mean([simple[s]["attributed"] for s in STYLES if s not in learned])),
        "gss": dict(zip(STYLES, gss.tolist(), strict=True)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csd", help="a trained CSD checkpoint (default: train experiment=csd_quickstart)")
    parser.add_argument("--t2i", help="a trained text-to-image checkpoint on the learned styles")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the text-to-image model")
    parser.add_argument("--image-size", type=int, default=32, help="the text-to-image model's image size")
    parser.add_argument(
        "--sample-steps", type=int, default=None, help="sampling steps (default: the model's)"
    )
    parser.add_argument("--simple-seeds", type=int, default=SIMPLE_SEEDS)
    parser.add_argument("--content-seeds", type=int, default=CONTENT_SEEDS)
    parser.add_argument(
        "--descriptors",
        default=",".join(DESCRIPTORS),
        help=f"a comma-separated subset of {', '.join(DESCRIPTORS)}",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--bench", nargs=2, type=int, default=(96, 250), metavar=("SIZE", "PER_STYLE"))
    parser.add_argument("--out", type=Path, default=Path("experiments/style_attribution"))
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bench = build_style_bench(args.data_dir, image_size=args.bench[0], images_per_style=args.bench[1])
    learned, unseen = split_styles()
    chosen = args.descriptors.split(",")
    unknown = set(chosen) - set(DESCRIPTORS)
    if unknown:
        parser.error(f"--descriptors: unknown {sorted(unknown)}; choose from {', '.join(DESCRIPTORS)}")
    csd = args.csd
    if csd is None and "csd_quickstart" in chosen:
        csd_dir = run_once(
            "train", ["experiment=csd_quickstart"], out / "train" / "csd", done="checkpoints/last.ckpt"
        )
        csd = str(csd_dir / "checkpoints" / "last.ckpt")
    t2i = args.t2i
    if t2i is None:
        captions = out / "train" / "captions.json"
        captions.parent.mkdir(parents=True, exist_ok=True)
        print(
            f"{write_captions(bench, learned, captions)} captioned training images of {len(learned)} styles"
        )
        t2i = str(train_t2i(bench, captions, out / "train" / "t2i", args.steps, args.image_size))
    generated = out / "generated"
    generate(Path(t2i), generated, args.simple_seeds, args.content_seeds, args.sample_steps)
    write_real_column(bench, generated, args.image_size)
    every = dict(DESCRIPTORS, csd_quickstart=["extractor=csd", f"extractor.checkpoint={csd}"])
    descriptors = {name: every[name] for name in chosen}
    references = bench / "images" / "database"
    summary = {"learned": learned, "unseen": unseen}
    for name, overrides in descriptors.items():
        summary[name] = summarise(attribute(name, overrides, references, generated, out), learned)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "| descriptor | GSS learned | GSS unseen | difference [95% CI] | content vs simple r | attributed learned | "
        "attributed unseen | real images attributed | generated vs real r |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in descriptors:
        s = summary[name]
        lines.append(
            f"| {name} | {s['gss_learned']:.3f} | {s['gss_unseen']:.3f} | {s['difference']:+.3f} "
            f"[{s['difference_lo']:+.3f}, {s['difference_hi']:+.3f}] | {s['content_vs_simple_r']:.2f} | "
            f"{100 * s['attributed_learned']:.0f}% | {100 * s['attributed_unseen']:.0f}% | "
            f"{100 * s['attributed_real']:.0f}% | {s['generated_vs_real_r']:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, len(descriptors), figsize=(4.2 * len(descriptors), 4.5), sharey=False)
    for ax, name in zip(np.atleast_1d(axes), descriptors, strict=True):
        values = [summary[name]["gss"][s] for s in STYLES]
        colours = ["tab:blue" if s in learned else "tab:gray" for s in STYLES]
        ax.barh(range(len(STYLES)), values, color=colours)
        ax.set_yticks(range(len(STYLES)), list(STYLES))
        ax.invert_yaxis()
        ax.set_title(f"{name}: GSS (blue: learned)")
    fig.tight_layout()
    save_figure(fig, out / "gss.png")
    return summary


if __name__ == "__main__":
    main()
