"""Generate-and-filter extraction (docs/attacks.md#generate-and-filter) and the adaptive-score attack
(docs/attacks.md#extraction-definitions) on a trained diffusion module.

Extraction: K generations per prompt (or N unconditional ones) are drawn with the project's seeded, resumable
generation; the generations of a prompt are compared by tiled l2; a graph joins those within `edge_threshold`;
a prompt whose largest clique has at least `min_clique_size` members is flagged, and the clique's medoid is the
candidate. Unconditional models: the same over the whole set, clique after clique. Verification: the candidate's
nearest training image by normalised l2, extracted when it is within `delta`; the adaptive score is reported
beside it. The project knows the training set, so precision (flagged candidates that verify) and recall (prompts
that do produce a copy, found by the filter) are measured, not estimated.

Adaptive attack (the CIFAR-10 variant): every generation scored by `adaptive_extraction_score`, extracted when
the score is below 1.
"""

import csv
import json
import logging
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from src.attacks.membership import load_images
from src.data.images import load_rgb, read_list
from src.generation import generate_to_folder
from src.metrics.extraction import adaptive_extraction_score, clique_summary, tiled_l2
from src.metrics.search import search_topk
from src.nn.embed import embed_images
from src.plots import draw_image_rows, save_figure
from src.replication.study import bootstrap_interval
from src.utils.checkpoints import state_digest
from src.utils.checks import check_number

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("training", "duplicated", "file")


def check_extraction_options(options: dict, conditional: bool) -> dict:
    """The extraction options with their ranges checked (`attack.<key>` in messages); `edge_threshold` becomes a
    sorted list. Raises ValueError for a missing threshold or K below the clique size."""
    thresholds = options.get("edge_threshold")
    if thresholds is None:
        raise ValueError(
            "attack.edge_threshold is required: the tiled-l2 distance under which two generations count as the "
            "same image. Carlini et al. did not publish theirs (docs/attacks.md#generate-and-filter), so there "
            "is no default; give one (attack.edge_threshold=0.1) or several "
            "(attack.edge_threshold='[0.05,0.1,0.15]') to see the counts at each."
        )
    thresholds = [thresholds] if isinstance(thresholds, (int, float)) else list(thresholds)
    for value in thresholds:
        check_number("attack.edge_threshold", value, low=0)
    options = dict(options, edge_threshold=sorted(thresholds))
    check_number("attack.min_clique_size", options["min_clique_size"], low=2, integer=True)
    check_number("attack.delta", options["delta"], low=0)
    grid = options.get("grid", (4, 4))
    for value in grid:
        check_number("attack.grid", value, low=1, integer=True)
    if conditional:
        check_number("attack.num_prompts", options["num_prompts"], low=1, integer=True)
        per_prompt = check_number("attack.per_prompt", options["per_prompt"], low=1, integer=True)
        if per_prompt < options["min_clique_size"]:
            raise ValueError(
                f"attack.per_prompt={per_prompt} is below attack.min_clique_size={options['min_clique_size']}: no "
                "prompt could ever be flagged; generate at least min_clique_size images per prompt"
            )
    else:
        check_number("attack.num_images", options["num_images"], low=1, integer=True)
    return options


def training_images(datamodule, files: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """The run's training images (or `files` of its root) as the model saw them (its transform without flips),
    in [0, 1], (N, C, H, W), and their paths."""
    files = list(datamodule.train_files if files is None else files)
    images = load_images(Path(datamodule.root), files, datamodule.image_transform(), "training images")
    return (images + 1) / 2, files


def load_generations(folder, image_size: int, resize: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The PNGs of a generation folder in [0, 1], (N, C, H, W), and their names. Images of another size than
    `image_size` are refused, naming both sizes, unless `resize` (then resized with bicubic interpolation)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.glob("*.png"))
    tensors = []
    for name in names:
        image = load_rgb(folder / name)
        if image.size != (image_size, image_size):
            if not resize:
                raise ValueError(
                    f"{folder / name} is {image.size[0]}x{image.size[1]} but the training images are "
                    f"{image_size}x{image_size}; pass attack.resize=true to resize the generations"
                )
            image = image.resize((image_size, image_size), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(tensors), names


def duplicated_prompts(datamodule, prompts: dict[str, str], count: int, threshold: float, extractor, device):
    """The prompts of the `count` training images with the most near-duplicates (feature cosine similarity above
    `threshold` with `extractor`, docs/attacks.md#generate-and-filter), most duplicated first; ties keep the
    training order. Returns [(prompt, path, duplicates)]."""
    files = datamodule.train_files
    features, rows, _ = embed_images(extractor, datamodule.root, files, 32, 0, device, "duplicate mining")
    duplicates = [0] * len(rows)
    if len(rows) > 1:  # near-duplicates among the 200 nearest others of each image
        scores, _ = search_topk(features, features, min(len(rows) - 1, 200), device=device, exclude_self=True)
        duplicates = (scores > threshold).sum(dim=1).tolist()
    order = sorted(range(len(rows)), key=lambda i: (-duplicates[i], i))
    chosen = [(prompts[files[rows[i]]], files[rows[i]], duplicates[i]) for i in order]
    unique, seen = [], set()
    for prompt, path, dup in chosen:
        if prompt not in seen:
            seen.add(prompt)
            unique.append((prompt, path, dup))
    return unique[:count]


def candidate_prompts(source: str, datamodule, count: int, prompts_file=None, duplicates=None):
    """[(prompt, source training image or None)] for the attack: the training prompts (one per training image,
    repeated prompts once), those of the most-duplicated images (`duplicates`: a callable as
    `duplicated_prompts`), or a file's prompts; the first `count`."""
    if source == "file":
        return [(p, None) for p in dict.fromkeys(read_list(prompts_file))][:count]
    if not hasattr(datamodule, "image_prompts"):
        raise ValueError(
            f"attack.prompts={source} needs a text-conditional run; this run's data ({type(datamodule).__name__}) "
            "has no captions"
        )
    by_image = datamodule.image_prompts()
    if source == "duplicated":
        return [(prompt, path) for prompt, path, _ in duplicates(datamodule, by_image, count)]
    first = {}
    for path, prompt in by_image.items():
        first.setdefault(prompt, path)
    return list(first.items())[:count]


def group_result(distances: torch.Tensor, thresholds: list[float], min_clique_size: int) -> list[dict]:
    """clique_summary per threshold, with the clique's medoid (smallest mean distance to the other members)."""
    rows = clique_summary(distances, thresholds, min_clique_size=min_clique_size)
    for row in rows:
        members = row["clique"]
        inner = distances[members][:, members]
        row["medoid"] = members[int(inner.sum(dim=1).argmin())]
    return rows


def unconditional_cliques(distances: torch.Tensor, threshold: float, min_clique_size: int) -> list[dict]:
    """Cliques of at least `min_clique_size` among all generations, largest first: the maximum clique, its
    members removed, again, until the largest left is smaller."""
    remaining = list(range(len(distances)))
    found = []
    while len(remaining) >= min_clique_size:
        sub = distances[remaining][:, remaining]
        (row,) = group_result(sub, [threshold], min_clique_size)
        if not row["flagged"]:
            break
        members = [remaining[i] for i in row["clique"]]
        found.append({**row, "clique": members, "medoid": remaining[row["medoid"]]})
        remaining = [i for i in remaining if i not in set(members)]
    return found


def verify(candidates: torch.Tensor, train: torch.Tensor, alpha: float, neighbours: int) -> dict:
    """Nearest training image (normalised l2) and adaptive score of each candidate."""
    scores, index, l2 = adaptive_extraction_score(
        candidates.flatten(1), train.flatten(1), alpha=alpha, n=neighbours
    )
    return {"l2": l2, "index": index, "adaptive": scores}


def precision_interval(flags: list[bool]) -> list[float] | None:
    """95% bootstrap interval of the share of True, None without data."""
    if not flags:
        return None
    low, high = bootstrap_interval(np.asarray(flags, dtype=float), lambda x: x.mean(axis=-1))
    return [float(low), float(high)]


def summarise(rows: list[dict], thresholds: list[float], delta: float, weights: dict | None) -> dict:
    """Counts at each threshold: flagged, verified, precision (with its bootstrap interval), recall against the
    prompts that do produce a copy, unique training images extracted and, with sampling weights, how many of
    those were up-weighted."""
    summary = {"delta": delta, "num_groups": len({r["group"] for r in rows}), "thresholds": {}}
    copying = {r["group"] for r in rows if r["min_l2_any"] <= delta}
    summary["groups_with_a_copy"] = len(copying)
    for threshold in thresholds:
        at = [r for r in rows if r["edge_threshold"] == threshold and r["flagged"]]
        verified = [r for r in at if r["verified"]]
        extracted = sorted({r["nearest_train"] for r in verified})
        entry = {
            "flagged": len(at),
            "verified": len(verified),
            "precision": len(verified) / len(at) if at else math.nan,
            "precision_ci": precision_interval([r["verified"] for r in at]),
            "recall": len({r["group"] for r in at} & copying) / len(copying) if copying else math.nan,
            "unique_extracted": len(extracted),
        }
        if weights:
            up = [p for p in extracted if weights.get(p, 1.0) > 1]
            entry["extracted_upweighted"] = len(up)
            entry["upweighted_in_training"] = sum(w > 1 for w in weights.values())
        summary["thresholds"][str(threshold)] = entry
    return summary


CSV_COLUMNS = [
    "group",
    "prompt",
    "source_image",
    "edge_threshold",
    "clique_size",
    "mean_clique_distance",
    "flagged",
    "exact",
    "candidate",
    "nearest_train",
    "l2",
    "adaptive_score",
    "verified",
    "min_l2_any",
]


def write_rows(path: Path, rows: list[dict], columns=CSV_COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def label_of(row: dict) -> str:
    if "clique_size" in row:
        return f"clique {row['clique_size']}"
    return f"score {row['adaptive_score']:.2f}"


def draw_extraction_gallery(rows: list[dict], generated_root: Path, train_root: Path, path: Path, limit=12):
    """Flagged candidates beside their nearest training image, most convincing (smallest l2) first; a candidate
    flagged at several thresholds is shown once (at its largest clique)."""
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -(r.get("clique_size") or 0))
    unique = {}
    for row in flagged:
        unique.setdefault(row["candidate"], row)
    shown = sorted(unique.values(), key=lambda r: r["l2"])[:limit]
    if not shown:
        return None
    pairs = [
        [
            (generated_root / r["candidate"], label_of(r), "tab:blue"),
            (
                train_root / r["nearest_train"],
                f"l2 {r['l2']:.3f}",
                "tab:green" if r["verified"] else "tab:red",
            ),
        ]
        for r in shown
    ]
    fig, _ = draw_image_rows(pairs, [str(r["prompt"] or r["candidate"])[:28] for r in shown])
    return save_figure(fig, path)


def draw_score_histograms(rows: list[dict], delta: float, path: Path):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, line, title in (
        (axes[0], "l2", delta, "candidate to nearest training image (l2)"),
        (axes[1], "adaptive_score", 1.0, "adaptive score"),
    ):
        values = [r[key] for r in rows if r["flagged"]]
        others = [r[key] for r in rows if not r["flagged"]]
        if others:
            ax.hist(others, bins=30, alpha=0.5, label="not flagged")
        if values:
            ax.hist(values, bins=30, alpha=0.7, label="flagged")
        ax.axvline(line, color="k", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run_extraction(
    module,
    datamodule,
    out_dir,
    options: dict,
    prompts: list[tuple[str, str | None]] | None,
    generations=None,
    weights: dict | None = None,
    progress: bool = True,
) -> dict:
    """Generate, filter and verify; write extracted.csv, report.json, gallery.png and scores.png into `out_dir`.
    `prompts`: [(prompt, source image)] for a text-conditional module, None for an unconditional one.
    Generations go to `generations`/<group>/ (default out_dir/generations), one resumable folder with a manifest
    per group: an interrupted attack given the same folder generates only what is missing."""
    out_dir = Path(out_dir)
    generations = Path(generations or out_dir / "generations")
    options = check_extraction_options(options, conditional=prompts is not None)
    thresholds, delta = options["edge_threshold"], options["delta"]
    size = module.hparams.image_size
    train, train_files = training_images(datamodule)
    if train.shape[-1] != size:
        raise ValueError(
            f"the training images are {train.shape[-1]}x{train.shape[-2]} after the run's transform but the model "
            f"generates {size}x{size}"
        )
    generation = {k: options[k] for k in ("sampler", "steps", "batch_size", "use_ema")}
    generation["weights_sha256"] = state_digest(module)  # once, not once per prompt folder
    groups = []  # (group id, prompt, source image, folder)
    if prompts is None:
        folder = generations / "all"
        generate_to_folder(
            module, folder, options["num_images"], seed=options["seed"], progress=progress, **generation
        )
        groups.append(("all", None, None, folder))
    else:
        for j, (prompt, source) in enumerate(tqdm(prompts, desc="prompts", disable=not progress)):
            folder = generations / f"{j:05d}"
            seed = options["seed"] + j * options["per_prompt"]
            generate_to_folder(
                module,
                folder,
                options["per_prompt"],
                seed=seed,
                prompts=[prompt] * options["per_prompt"],
                progress=False,
                inference_mitigation={"name": options.get("inference_mitigation") or "none"},
                **generation,
            )
            groups.append((f"{j:05d}", prompt, source, folder))

    rows = []
    for group, prompt, source, folder in tqdm(groups, desc="filtering", disable=not progress):
        images, names = load_generations(folder, size, options.get("resize", False))
        distances = tiled_l2(images, images, grid=tuple(options["grid"]))
        found = verify(images, train, options["alpha"], options["neighbours"])
        min_l2_any = float(found["l2"].min())
        cliques = []
        for threshold in thresholds:
            found_cliques = []
            if prompt is None:
                found_cliques = unconditional_cliques(distances, threshold, options["min_clique_size"])
            if not found_cliques:  # the largest clique, flagged or not, so every group has a row
                found_cliques = group_result(distances, [threshold], options["min_clique_size"])
            cliques += [(threshold, clique) for clique in found_cliques]
        for threshold, clique in cliques:
            medoid = clique["medoid"]
            l2 = float(found["l2"][medoid])
            rows.append(
                {
                    "group": group,
                    "prompt": prompt,
                    "source_image": source,
                    "edge_threshold": threshold,
                    "clique_size": clique["clique_size"],
                    "mean_clique_distance": clique["mean_distance"],
                    "flagged": bool(clique["flagged"]),
                    "exact": clique.get("exact", True),  # False: the clique search hit its limit
                    "candidate": f"{group}/{names[medoid]}",
                    "nearest_train": train_files[int(found["index"][medoid])],
                    "l2": l2,
                    "adaptive_score": float(found["adaptive"][medoid]),
                    "verified": bool(clique["flagged"]) and l2 <= delta,
                    "min_l2_any": min_l2_any,
                }
            )
    rows.sort(key=lambda r: (not r["flagged"], r.get("mean_clique_distance") or math.inf))
    summary = summarise(rows, thresholds, delta, weights)
    summary.update(attack="extraction", options=options, num_train=len(train_files))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / "extracted.csv", rows)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    primary = [r for r in rows if r["edge_threshold"] == thresholds[0]]
    draw_extraction_gallery(rows, generations, Path(datamodule.root), out_dir / "gallery.png")
    if primary:
        draw_score_histograms(primary, delta, out_dir / "scores.png")
    return summary


def run_adaptive(module, datamodule, out_dir, options: dict, generations=None, progress: bool = True) -> dict:
    """The adaptive-score attack: `num_images` generations (unconditional; a text-conditional module is given
    no prompt here), each scored against the training set; extracted when the score is below `threshold` (1).
    Generations go to `generations`/all (default out_dir/generations), resumable."""
    out_dir = Path(out_dir)
    generations = Path(generations or out_dir / "generations")
    check_number("attack.num_images", options["num_images"], low=1, integer=True)
    check_number("attack.alpha", options["alpha"], low=0)
    check_number("attack.neighbours", options["neighbours"], low=1, integer=True)
    size = module.hparams.image_size
    train, train_files = training_images(datamodule)
    folder = generations / "all"
    generation = {k: options[k] for k in ("sampler", "steps", "batch_size", "use_ema")}
    generate_to_folder(
        module, folder, options["num_images"], seed=options["seed"], progress=progress, **generation
    )
    images, names = load_generations(folder, size, options.get("resize", False))
    found = verify(images, train, options["alpha"], options["neighbours"])
    rows = [
        {
            "group": "all",
            "prompt": None,
            "candidate": f"all/{name}",
            "nearest_train": train_files[int(found["index"][i])],
            "l2": float(found["l2"][i]),
            "adaptive_score": float(found["adaptive"][i]),
            "flagged": bool(found["adaptive"][i] < options["threshold"]),
        }
        for i, name in enumerate(names)
    ]
    for row in rows:
        row["verified"] = row["flagged"] and row["l2"] <= options["delta"]
    rows.sort(key=lambda r: r["adaptive_score"])
    flagged = [r for r in rows if r["flagged"]]
    summary = {
        "attack": "adaptive",
        "options": options,
        "num_generated": len(rows),
        "num_train": len(train_files),
        "flagged": len(flagged),
        "unique_extracted": len({r["nearest_train"] for r in flagged}),
        "verified_within_delta": sum(r["verified"] for r in flagged),
        "precision": sum(r["verified"] for r in flagged) / len(flagged) if flagged else math.nan,
        "precision_ci": precision_interval([r["verified"] for r in flagged]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / "extracted.csv", rows)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    draw_extraction_gallery(rows, generations, Path(datamodule.root), out_dir / "gallery.png")
    draw_score_histograms(rows, options["delta"], out_dir / "scores.png")
    return summary
