"""Collect the attack runs (docs/attacks.md) into one study: which training images an attacker gets back, and how
well membership inference separates the training faces from held-out ones, per subset size and model size.

    python experiments/extraction/aggregate.py logs/train/multiruns/<multirun> [more folders] [--out OUT]

The runs are the folders holding `attacks/` (written by `src.callbacks.attacks.AttacksAtEnd`), sorted by
model size, then training subset size. Written to OUT (default: the first folder given):
- study.csv / study.md: one row per run: the extraction counts at each edge threshold (flagged cliques, verified,
  precision with its 95% bootstrap interval, unique training images extracted), the adaptive attack (unique
  training images extracted with a 95% bootstrap interval over the generations, precision), and per membership
  attack the ROC AUC and TPR at 1% FPR with their intervals;
- study.png: extracted training images and membership AUC against the subset size (one line per model size);
- heatmap.png (when the runs span several model sizes and subset sizes): extracted images and the best
  membership AUC per (model size, subset size);
- study_gallery.png: per run, the closest flagged candidates of both extraction attacks (one per extracted training
  image) beside their nearest training image;
- mitigations.csv / .md / .png (text-to-image runs): per training arm and inference mitigation, the prompts whose
  generations hold a copy, flagged prompts, precision and training images extracted at each edge threshold, and
  the arm's membership AUC.
"""

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from src.plots import draw_image_rows, save_figure  # noqa: E402
from src.replication import study  # noqa: E402
from src.replication.study import bootstrap_interval, read_json  # noqa: E402
from src.utils.checkpoints import load_checkpoint  # noqa: E402

MEMBERSHIP = ("loss", "secmi", "pia", "pian")


def unet_parameters(run: Path) -> int | None:
    """Parameters of the run's UNet, counted in its last checkpoint (EMA copy excluded)."""
    path = run / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    state = load_checkpoint(path, mmap=True)["state_dict"]
    return sum(v.numel() for k, v in state.items() if k.startswith("unet."))


def unique_extracted_interval(rows: list[dict], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the number of distinct training images among the flagged generations of the
    adaptive attack, resampling the generations."""
    if not rows:
        return math.nan, math.nan
    codes = {path: i + 1 for i, path in enumerate(sorted({r["nearest_train"] for r in rows}))}
    values = np.array([codes[r["nearest_train"]] if r["flagged"] == "True" else 0 for r in rows])

    def distinct(draws: np.ndarray) -> np.ndarray:
        return np.array([len(set(row[row > 0].tolist())) for row in draws])

    return bootstrap_interval(values, distinct, resamples=resamples)


def read_run(run: Path) -> dict:
    """One row of the study table."""
    cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
    unet = cfg["model"].get("unet") or {}
    row = {
        "run": run.name,
        "subset_size": cfg["data"]["subset_size"],
        "control_size": cfg["data"].get("control_size"),
        "width": (unet.get("block_out_channels") or [None])[0],
        "depth": unet.get("layers_per_block"),
        "params": unet_parameters(run),
        "steps": cfg["trainer"]["max_steps"],
    }
    extraction = read_json(run / "attacks" / "extraction" / "report.json")
    for threshold, entry in extraction.get("thresholds", {}).items():
        ci = entry.get("precision_ci") or [math.nan, math.nan]
        row.update(
            {
                f"extr@{threshold}_flagged": entry["flagged"],
                f"extr@{threshold}_unique": entry["unique_extracted"],
                f"extr@{threshold}_precision": entry["precision"],
                f"extr@{threshold}_precision_ci": f"[{ci[0]:.2f}, {ci[1]:.2f}]",
            }
        )
    adaptive = read_json(run / "attacks" / "adaptive" / "report.json")
    if adaptive:
        rows = study.read_matches(run / "attacks" / "adaptive" / "extracted.csv") or []
        low, high = unique_extracted_interval(rows)
        row.update(
            {
                "adaptive_flagged": adaptive["flagged"],
                "adaptive_unique": adaptive["unique_extracted"],
                "adaptive_unique_ci": f"[{low:.0f}, {high:.0f}]",
                "adaptive_precision": adaptive["precision"],
                "num_generated": adaptive["num_generated"],
            }
        )
    for attack in MEMBERSHIP:
        record = read_json(run / "attacks" / attack / "membership.json")
        for name, summary in record.get("summary", {}).items():
            ci = summary.get("auc_ci") or [math.nan, math.nan]
            row[f"{name}_auc"] = summary["auc"]
            row[f"{name}_auc_ci"] = f"[{ci[0]:.2f}, {ci[1]:.2f}]"
            row[f"{name}_tpr@1%fpr"] = summary["tpr@1%fpr"]
        if record:
            row["num_members"], row["num_nonmembers"] = record["num_members"], record["num_nonmembers"]
    return row


def columns_of(rows: list[dict]) -> list[str]:
    """Every key met, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def auc_keys(rows: list[dict]) -> list[str]:
    return [k for k in columns_of(rows) if k.endswith("_auc")]


def best_auc(row: dict) -> float:
    values = [v for k, v in row.items() if k.endswith("_auc") and isinstance(v, float)]
    return max(values) if values else math.nan


def draw_study(rows: list[dict], thresholds: list[str]):
    """Left: training images extracted (adaptive, and clique-based at each edge threshold) against the subset
    size; right: membership AUC per attack against the subset size. One line per model size."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    sizes = sorted({r["subset_size"] for r in rows})
    for params in sorted({r["params"] for r in rows}, key=lambda p: p or 0):
        group = sorted((r for r in rows if r["params"] == params), key=lambda r: r["subset_size"])
        x = [r["subset_size"] for r in group]
        label = f"{params / 1e6:.2f}M params" if params else "model"
        if "adaptive_unique" in group[0]:
            left.plot(x, [r["adaptive_unique"] for r in group], "o-", label=f"adaptive, {label}")
        for threshold in thresholds:
            key = f"extr@{threshold}_unique"
            left.plot(x, [r.get(key, math.nan) for r in group], "s--", label=f"cliques @{threshold}, {label}")
        for key in auc_keys(group):
            right.plot(x, [r.get(key, math.nan) for r in group], "o-", label=f"{key[:-4]}, {label}")
    left.plot(sizes, sizes, ":", color="grey", label="all training images")
    left.set(xlabel="training images", ylabel="training images extracted", xscale="log")
    right.axhline(0.5, color="grey", linestyle=":")
    right.set(xlabel="training images", ylabel="membership ROC AUC", xscale="log", ylim=(-0.02, 1.02))
    for ax in (left, right):
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
    left.legend(fontsize=6)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def draw_heatmap(rows: list[dict]):
    """Extracted images (adaptive) and the best membership AUC per (model size, subset size)."""
    params = sorted({r["params"] for r in rows})
    sizes = sorted({r["subset_size"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.6 * len(params) + 2.2))
    shapes = {r["params"]: f"{r['params'] / 1e6:.2f}M (w{r['width']}, d{r['depth']})" for r in rows}
    for ax, title, value, text in (
        (
            axes[0],
            "training images extracted (adaptive)",
            lambda r: r.get("adaptive_unique", math.nan),
            lambda v, size: "-" if np.isnan(v) else f"{int(v)} of {size}",
        ),
        (axes[1], "best membership AUC", best_auc, lambda v, size: "-" if np.isnan(v) else f"{v:.2f}"),
    ):
        grid = np.full((len(params), len(sizes)), np.nan)
        for r in rows:
            grid[params.index(r["params"]), sizes.index(r["subset_size"])] = value(r)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i in range(len(params)):
            for j in range(len(sizes)):
                ax.text(j, i, text(grid[i, j], sizes[j]), ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_yticks(range(len(params)), [shapes[p] for p in params])
        ax.set(xlabel="training images", ylabel="UNet parameters", title=title)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def draw_study_gallery(runs: list[Path], rows: list[dict], path: Path, per_attack: int = 3) -> Path | None:
    """Per run (labelled by its subset size), the most convincing flagged candidates of the clique filter and of
    the adaptive attack, each beside its nearest training image, redrawn from the runs' extracted.csv."""
    pairs, labels = [], []
    size_of = {row["run"]: row["subset_size"] for row in rows}
    for run in runs:
        index = read_json(run / "subset_index.json")
        generations = sorted((run / "samples").glob("attack_*"))
        if not index or not generations:
            continue
        for attack in ("extraction", "adaptive"):
            found = [
                r
                for r in study.read_matches(run / "attacks" / attack / "extracted.csv") or []
                if r["flagged"] == "True"
            ]
            unique = {}
            for r in sorted(found, key=lambda r: float(r["l2"])):
                unique.setdefault(r["nearest_train"], r)  # one candidate per extracted training image
            for r in list(unique.values())[:per_attack]:
                verified = r["verified"] == "True"
                pairs.append(
                    [
                        (
                            generations[0] / r["candidate"],
                            f"{attack} {float(r['adaptive_score']):.2f}",
                            "tab:blue",
                        ),
                        (
                            Path(index["root"]) / r["nearest_train"],
                            f"l2 {float(r['l2']):.3f}",
                            "tab:green" if verified else "tab:red",
                        ),
                    ]
                )
                labels.append(f"{size_of.get(run.name, '?')} faces")
    if not pairs:
        return None
    fig, _ = draw_image_rows(pairs, labels)
    return save_figure(fig, path)


def mitigation_rows(runs: list[Path]) -> list[dict]:
    """One row per (training arm, inference mitigation) of text-to-image runs: the training mitigation of the run
    (`mitigation.name`), the inference mitigation of each extraction report (attacks/extraction_<name>), prompts
    attacked and prompts whose generations hold a copy (within δ), and per edge threshold the flagged prompts,
    precision and distinct training images extracted; membership AUC (loss at its best timestep, PIAN) on the
    `none` row of each arm."""
    rows = []
    for run in runs:
        cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
        arm = (cfg.get("mitigation") or {}).get("name")
        if arm is None:
            continue
        for folder in sorted((run / "attacks").glob("extraction*")):
            report = read_json(folder / "report.json")
            if not report:
                continue
            inference = folder.name.partition("_")[2] or "none"
            row = {
                "train_mitigation": arm,
                "inference_mitigation": inference,
                "prompts": report.get("num_groups"),
                "prompts_with_a_copy": report.get("groups_with_a_copy"),
            }
            for threshold, entry in report.get("thresholds", {}).items():
                row[f"flagged@{threshold}"] = entry["flagged"]
                row[f"precision@{threshold}"] = entry["precision"]
                row[f"extracted@{threshold}"] = entry["unique_extracted"]
            if inference == "none":
                for attack in MEMBERSHIP:
                    record = read_json(run / "attacks" / attack / "membership.json")
                    aucs = {k: v["auc"] for k, v in record.get("summary", {}).items()}
                    if aucs:
                        best = max(aucs, key=aucs.get)
                        row[f"{attack}_auc"] = aucs[best]
                        if attack == "loss":
                            row["loss_best_t"] = best.partition("=")[2]
            rows.append(row)
    return rows


def draw_mitigations(rows: list[dict], thresholds: list[str]):
    """Distinct training images extracted per (training arm, inference mitigation), one bar per edge threshold."""
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 3.6))
    labels = [f"{r['train_mitigation']} / {r['inference_mitigation']}" for r in rows]
    width = 0.8 / max(len(thresholds), 1)
    for i, threshold in enumerate(thresholds):
        values = [r.get(f"extracted@{threshold}", math.nan) for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, values, width, label=f"edge threshold {threshold}")
    ax.set_xticks(np.arange(len(rows)) + width * (len(thresholds) - 1) / 2, labels, rotation=30, ha="right")
    ax.set(ylabel="training images extracted", title="training mitigation / inference mitigation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def aggregate(folders, out: Path) -> list[dict]:
    runs = study.find_runs(
        folders, "train with callbacks.attacks.names=[...] (conf/sweep/extraction_*.yaml)", "attacks/*"
    )
    rows = sorted((read_run(run) for run in runs), key=lambda r: (r["params"] or 0, r["subset_size"]))
    out.mkdir(parents=True, exist_ok=True)
    columns = columns_of(rows)
    study.write_csv(rows, out / "study.csv", columns)
    thresholds = sorted({k.split("@")[1].split("_")[0] for k in columns if k.startswith("extr@")}, key=float)
    shown = [
        c
        for c in columns
        if not c.startswith("extr@") or any(c.startswith(f"extr@{t}_") for t in thresholds[1:2])
    ]
    table = study.markdown_table(rows, shown)
    (out / "study.md").write_text(table + "\n")
    print(table)
    save_figure(draw_study(rows, thresholds), out / "study.png")
    if len({r["params"] for r in rows}) > 1 and len({r["subset_size"] for r in rows}) > 1:
        save_figure(draw_heatmap(rows), out / "heatmap.png")
    draw_study_gallery(runs, rows, out / "study_gallery.png")
    arms = mitigation_rows(runs)
    if arms:
        columns = columns_of(arms)
        study.write_csv(arms, out / "mitigations.csv", columns)
        table = study.markdown_table(arms, columns)
        (out / "mitigations.md").write_text(table + "\n")
        print(table)
        found = sorted({k.partition("@")[2] for k in columns if k.startswith("extracted@")}, key=float)
        save_figure(draw_mitigations(arms, found), out / "mitigations.png")
    return rows


def main(argv=None) -> None:
    args = study.parse_study_args(argv if argv is not None else sys.argv[1:], __doc__)
    torch.set_num_threads(1)
    aggregate(args.folders, args.out)


if __name__ == "__main__":
    main()
