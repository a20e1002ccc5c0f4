"""Collect the memorized-prompt detection study (docs/detection.md): how well each detector finds the prompts
that make the model copy, and what each inference-time mitigation does to copying and to quality.

    python experiments/memorization_detection/aggregate.py logs/train/multiruns/<multirun> [more] [--out OUT]

The runs are the `src.train` run folders below the folders given: those holding `detection/detectors.csv`
(written by `callbacks.detect`; one per arm of the study, `data.duplication`: nodup, dup_image) give detector
rows, those that generated with inference mitigations give mitigation rows (the study's `nodup` run; the run of
conf/sweep/memorization_mitigation_settings.yaml, further settings of the newer mitigations). Written to OUT
(default: the first folder given):

- detectors.csv / .md: per arm and detector, ROC AUC and TPR at 1% FPR with their 95% bootstrap intervals
  (memorized prompts against the others, the run's ground truth), the Spearman correlation of the score with the
  prompt's copy share, the AUC on the clear cases alone (share >= 0.75 against share <= 0.125: the labels that
  the noise of a few generations per prompt cannot flip), milliseconds per prompt and the cost against one
  generation; detectors.png: the AUCs with their intervals beside the costs;
- mitigations.csv / .md (the runs that generated with inference mitigations): per mitigation, the caption
  study's statistics of its generations (experiments/caption_mitigations/aggregate.py: share of copies, source_top1,
  mean and 95th percentile of the top-1 similarity, with intervals), the quality measure `realism` (below) with
  its interval, and the seconds per image against plain sampling (`timing.json` of the generation folder);
  mitigations.png: share of copies against realism, one point per mitigation, with both intervals.

Realism: the similarity of each generation to its nearest held-out face (the run's control images, never trained
on), in the run's own copy-detection features (raw-pixel Pearson correlation on the CPU testbed). A face of the
training distribution, copied or new, sits as close to its nearest held-out face as a held-out face does to the
others (the reference rows: held-out faces to their nearest other held-out face, training faces to their nearest
held-out one; images of uniform noise give the floor); noise, washed-out or broken images sit far below. It needs
no downloaded weights. It does not see detail a blur removes (an average face correlates well with many faces,
and can score above the held-out faces themselves): the galleries are the check on that.
"""

import csv
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from PIL import Image  # noqa: E402

from src.generation import run_datamodule  # noqa: E402
from src.metrics.membership import roc_summary  # noqa: E402
from src.metrics.replication import top1_similarities, train_background  # noqa: E402
from src.nn.embed import embed_images  # noqa: E402
from src.plots import save_figure  # noqa: E402
from src.replication.study import (  # noqa: E402
    bootstrap_interval,
    find_runs,
    markdown_table,
    mean,
    parse_study_args,
    read_json,
    write_csv,
)

CAPTION_AGGREGATE = Path(__file__).resolve().parents[1] / "caption_mitigations" / "aggregate.py"
# What each paper reports on Stable Diffusion 1.4 with its 500 "memorized" prompts (docs/detection.md)
PAPER_FIGURES = {
    "noise_norm": "AUC 0.960, TPR@1%FPR 0.760 (first step, 1 generation); ~0.998 with more (Wen et al.)",
    "attention_entropy": "AUC 0.966 SD 1.4, 0.948 SD 2.1 (Ren et al.)",
    "score_anisotropy": "AUC 0.992-0.999, TPR@1%FPR 0.934-0.984 (Asthana and Belagiannis)",
    "generation_similarity": "AUC 0.934, TPR@1%FPR 0.523 in 39 s per prompt (Wen et al.'s baseline)",
}
DETECTOR_COLUMNS = (
    "arm",
    "detector",
    "memorized",
    "prompts",
    "auc",
    "auc_low",
    "auc_high",
    "tpr@1%fpr",
    "tpr_low",
    "tpr_high",
    "spearman",
    "clear_cases",
    "auc_clear",
    "auc_clear_low",
    "auc_clear_high",
    "ms_per_prompt",
    "cost_vs_generation",
    "paper",
    "run",
)
# The clear cases: prompts that copy in at least 3 in 4 of their generations against those that copy in at most 1 in 8
CLEAR = (0.125, 0.75)
MITIGATION_COLUMNS = (
    "mitigation",
    "n",
    "share_gt_thr",
    "share_gt_thr_low",
    "share_gt_thr_high",
    "source_top1",
    "source_top1_low",
    "source_top1_high",
    "sim_mean",
    "sim_mean_low",
    "sim_mean_high",
    "sim_95pc",
    "sim_95pc_low",
    "sim_95pc_high",
    "realism",
    "realism_low",
    "realism_high",
    "seconds_per_image",
    "cost_vs_plain",
    "run",
)


def load_caption_aggregate():
    """experiments/caption_mitigations/aggregate.py as a module: its arms are this study's mitigation rows."""
    spec = importlib.util.spec_from_file_location("caption_mitigations_aggregate", CAPTION_AGGREGATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_config(run: Path) -> dict:
    return yaml.safe_load((run / "config_resolved.yaml").read_text()) or {}


def arm_of(config: dict) -> str:
    """The study arm of a run: its data.duplication (nodup, dup_image, ...)."""
    return str((config.get("data") or {}).get("duplication", "nodup"))


def interval(row: dict, key: str, low: str, high: str, ci) -> None:
    row[low], row[high] = (ci[0], ci[1]) if ci else (math.nan, math.nan)


def clear_case_auc(scores: list[dict], shares: np.ndarray, name: str) -> tuple[float, list | None]:
    """ROC AUC [95% CI] of detector `name` on the clear cases of a report's scores.csv (rows `scores`, copy
    shares `shares`): prompts whose share is at least CLEAR[1] against those at most CLEAR[0] (NaN when either
    side is empty)."""
    values = np.array([float(r[name]) for r in scores])
    positive, negative = values[shares >= CLEAR[1]], values[shares <= CLEAR[0]]
    if not len(positive) or not len(negative):
        return math.nan, None
    summary = roc_summary(positive, negative, bootstrap=1000)
    return summary["auc"], summary.get("auc_ci")


def detector_rows(run: Path) -> list[dict]:
    """One row per detector of the run's detection report (detection/detectors.csv and scores.csv)."""
    folder = run / "detection"
    with (folder / "scores.csv").open() as file:
        scores = list(csv.DictReader(file))
    memorized = sum(int(r["memorized"]) for r in scores)
    shares = np.array([float(r["copy_share"]) for r in scores])
    clear = f"{int((shares >= CLEAR[1]).sum())} / {int((shares <= CLEAR[0]).sum())}"
    arm = arm_of(run_config(run))
    rows = []
    with (folder / "detectors.csv").open() as file:
        for entry in csv.DictReader(file):
            name = entry["detector"]
            row = {
                "arm": arm,
                "detector": name,
                "memorized": memorized,
                "prompts": len(scores),
                "auc": float(entry["auc"]),
                "tpr@1%fpr": float(entry["tpr@1%fpr"]),
                "spearman": float(entry["spearman"]),
                "ms_per_prompt": float(entry["ms_per_prompt"]),
                "cost_vs_generation": float(entry["cost_vs_generation"]),
                "paper": PAPER_FIGURES.get(name.partition(":")[0], ""),
                "run": f"{run.parent.name}/{run.name}",
            }
            interval(row, "auc", "auc_low", "auc_high", yaml.safe_load(entry["auc_ci"] or "null"))
            interval(row, "tpr", "tpr_low", "tpr_high", yaml.safe_load(entry["tpr@1%fpr_ci"] or "null"))
            row["clear_cases"] = clear
            row["auc_clear"], ci = clear_case_auc(scores, shares, name)
            interval(row, "auc_clear", "auc_clear_low", "auc_clear_high", ci)
            rows.append(row)
    return rows


def heldout_features(run: Path, extractor) -> tuple:
    """(held-out features, training features) of a run, in `extractor`'s features."""
    datamodule = run_datamodule(run, "the realism measure", "give the folder of a `python -m src.train` run")
    control = list(getattr(datamodule, "control_files", []))
    if len(control) < 2:
        raise ValueError(
            f"{run}: {len(control)} held-out image(s); realism needs a control set (data.control_size=<n>)"
        )
    heldout, _, _ = embed_images(extractor, datamodule.root, control, desc="held-out images")
    train, _, _ = embed_images(extractor, datamodule.root, datamodule.train_files, desc="training images")
    return heldout, train


def noise_images(folder: Path, count: int, size: int) -> list[str]:
    """`count` seeded images of uniform noise written to `folder` as PNG: the floor of the realism measure."""
    rng = np.random.default_rng(0)
    names = [f"noise_{i:03d}.png" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return names


def realism_row(name: str, values: np.ndarray) -> dict:
    row = {"mitigation": name, "n": len(values), "realism": float(values.mean())}
    row["realism_low"], row["realism_high"] = bootstrap_interval(values, mean)
    return row


def mitigation_rows(run: Path, caption) -> list[dict]:
    """The rows of a run that generated with inference mitigations: the reference rows (held-out and training
    faces against the held-out ones), then the unmitigated generations and each mitigation."""
    arms = [a for a in caption.load_arms(run) if a.kind == "inference"]
    config = run_config(run)
    extractor = instantiate(config["extractor"])
    heldout, train = heldout_features(run, extractor)
    with tempfile.TemporaryDirectory() as folder:
        noise = noise_images(Path(folder), len(heldout), int(config["data"]["image_size"]))
        noise, _, _ = embed_images(extractor, folder, noise, desc="noise images")
    rows = [
        realism_row("held-out faces (reference)", train_background(heldout)[0].numpy()),
        realism_row("training faces (reference)", top1_similarities(train, heldout)[0].numpy()),
        realism_row("uniform noise (reference)", top1_similarities(noise, heldout)[0].numpy()),
    ]
    plain = None
    for arm in arms:
        names = [r["generated"] for r in arm.matches]
        generated, _, _ = embed_images(extractor, arm.generated_dir, names, desc=f"generations ({arm.name})")
        row = realism_row(arm.name, top1_similarities(generated, heldout)[0].numpy())
        row.update(
            {k: arm.row.get(k) for k in MITIGATION_COLUMNS if k.startswith(("share", "source", "sim"))}
        )
        timing = read_json(arm.generated_dir / "timing.json")
        row["seconds_per_image"] = timing.get("seconds_per_image")
        if arm.method == "none":
            plain = row["seconds_per_image"]
        row["run"] = f"{run.parent.name}/{run.name}"
        row["label"] = arm.method if arm.method == "none" else arm.generated_dir.name.removeprefix("final_")
        rows.append(row)
    for row in rows:
        seconds = row.get("seconds_per_image")
        row["cost_vs_plain"] = seconds / plain if seconds and plain else None
    return rows


def draw_detectors(rows: list[dict]):
    """Per arm: each detector's ROC AUC with its interval (left) and its cost against one generation (right)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * len(detectors) * len(arms) + 2))
    height = 0.8 / max(len(arms), 1)
    for a, arm in enumerate(arms):
        for d, name in enumerate(detectors):
            row = next((r for r in rows if r["arm"] == arm and r["detector"] == name), None)
            if row is None:
                continue
            y = d + a * height
            error = [[row["auc"] - row["auc_low"]], [row["auc_high"] - row["auc"]]]
            left.barh(
                y,
                row["auc"],
                height,
                xerr=None if math.isnan(row["auc_low"]) else error,
                color=f"C{a}",
                label=arm if d == 0 else None,
            )
            right.barh(y, row["cost_vs_generation"], height, color=f"C{a}")
    for axis in (left, right):
        axis.set_yticks([d + 0.4 - height / 2 for d in range(len(detectors))], detectors)
        axis.invert_yaxis()
    left.axvline(0.5, color="grey", linestyle=":")
    left.axvline(0.9, color="grey", linestyle="--")
    left.set_xlim(0, 1)
    left.set_xlabel("ROC AUC, memorized prompts vs the others [95% CI]")
    left.legend(
        title="arm", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=max(len(arms), 1), frameon=False
    )
    right.set_xscale("log")
    right.axvline(0.1, color="grey", linestyle="--")
    right.set_xlabel("cost per prompt / one generation (log)")
    fig.tight_layout()
    return fig


def draw_mitigations(rows: list[dict]):
    """Share of copies against realism, one point per mitigation (short names), both with their intervals; the
    face references as vertical lines, the noise floor in the axis label."""
    fig, axis = plt.subplots(figsize=(7, 5))
    floor = ""
    short = [row["mitigation"].split(" (")[0] for row in rows]
    for row, name in zip(rows, short, strict=True):
        if short.count(name) > 1:  # two settings of one mitigation: their folder labels tell them apart
            name = row.get("label", name)
        if row.get("share_gt_thr") is None:
            if name.startswith("uniform noise"):
                floor = f"; uniform noise: {row['realism']:.2f}"
                continue
            axis.axvline(row["realism"], color="grey", linestyle=":")
            axis.text(row["realism"], 0.98, name, rotation=90, va="top", ha="right", fontsize=7, color="grey")
            continue
        x, y = row["realism"], row["share_gt_thr"]
        axis.errorbar(
            x,
            y,
            xerr=[[x - row["realism_low"]], [row["realism_high"] - x]],
            yerr=[[y - row["share_gt_thr_low"]], [row["share_gt_thr_high"] - y]],
            fmt="o",
            capsize=3,
        )
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(6, 3), fontsize=8)
    axis.set_xlabel(f"realism: similarity to the nearest held-out face [95% CI]{floor}")
    axis.set_ylabel("share of generations that copy [95% CI]")
    axis.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return fig


def with_interval(value, low, high) -> str | None:
    """ "0.912 [0.85, 0.97]", the value alone without an interval, None (printed "-") without a value."""
    finite = [v is not None and math.isfinite(v) for v in (value, low, high)]
    if not finite[0]:
        return None
    return f"{value:.3f} [{low:.2f}, {high:.2f}]" if all(finite) else f"{value:.3f}"


def write_study(detectors: list[dict], mitigations: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if detectors:
        write_csv(detectors, out / "detectors.csv", DETECTOR_COLUMNS)
        lines = ["# Detectors of memorized prompts", ""]
        table = [
            {
                **r,
                "memorized / prompts": f"{r['memorized']} / {r['prompts']}",
                "auc [95% CI]": with_interval(r["auc"], r["auc_low"], r["auc_high"]),
                "tpr@1%fpr [95% CI]": with_interval(r["tpr@1%fpr"], r["tpr_low"], r["tpr_high"]),
                "clear cases (+ / -)": r["clear_cases"],
                "auc, clear cases [95% CI]": with_interval(
                    r["auc_clear"], r["auc_clear_low"], r["auc_clear_high"]
                ),
            }
            for r in detectors
        ]
        columns = (
            "arm",
            "detector",
            "memorized / prompts",
            "auc [95% CI]",
            "tpr@1%fpr [95% CI]",
            "spearman",
            "clear cases (+ / -)",
            "auc, clear cases [95% CI]",
            "ms_per_prompt",
            "cost_vs_generation",
        )
        lines += [markdown_table(table, columns), ""]
        save_figure(draw_detectors(detectors), out / "detectors.png")
        (out / "detectors.md").write_text("\n".join(lines) + "\n")
    if mitigations:
        write_csv(mitigations, out / "mitigations.csv", MITIGATION_COLUMNS)
        columns = (
            "mitigation",
            "n",
            "share_gt_thr",
            "source_top1",
            "sim_mean",
            "sim_95pc",
            "realism",
            "seconds_per_image",
            "cost_vs_plain",
        )
        table = [
            {
                **r,
                **{
                    k: with_interval(r.get(k), r.get(k + "_low"), r.get(k + "_high"))
                    for k in ("share_gt_thr", "source_top1", "sim_mean", "sim_95pc", "realism")
                },
            }
            for r in mitigations
        ]
        text = "# Inference-time mitigations: copying and realism\n\n" + markdown_table(table, columns) + "\n"
        (out / "mitigations.md").write_text(text)
        save_figure(draw_mitigations(mitigations), out / "mitigations.png")


def main(argv=None) -> tuple[list[dict], list[dict]]:
    args = parse_study_args(argv, __doc__)
    runs = find_runs(
        args.folders,
        "train with callbacks.detect.detectors=[...] or callbacks.replication.inference_mitigations=[...] "
        "(conf/sweep/memorization_detection.yaml, conf/sweep/memorization_mitigation_settings.yaml)",
    )
    caption = load_caption_aggregate()
    detectors, mitigations = [], []
    for run in runs:
        if (run / "detection" / "detectors.csv").is_file():
            detectors += detector_rows(run)
        summary = read_json(run / "replication" / "summary.json")
        if summary.get("inference_mitigations"):
            mitigations += mitigation_rows(run, caption)
    if not detectors and not mitigations:
        raise FileNotFoundError(
            f"{', '.join(map(str, args.folders))}: no run holds a detection report or generations with inference "
            "mitigations; see conf/sweep/memorization_detection.yaml"
        )
    out = Path(args.out)
    write_study(detectors, mitigations, out)
    if detectors:
        print((out / "detectors.md").read_text())
    if mitigations:
        print((out / "mitigations.md").read_text())
    return detectors, mitigations


if __name__ == "__main__":
    main()
