"""Collect the caption-mitigation runs (docs/memorization.md#caption-mitigations) into one study: table,
figure, gallery and claim checks.

    python experiments/caption_mitigations/aggregate.py logs/train/multiruns/<multirun> [more folders] [--out OUT]

Every folder given may be a multirun folder or a run folder; the runs are the folders below it holding
`replication/summary.json` (src.callbacks.diffusion.ReplicationAnalysis). A run is one arm of the study, named by
its config (`config_resolved.yaml`):

- conditioning arms: `data.conditioning` (nolevel, classlevel, instancelevel_random, instancelevel_blip) with
  mitigation none; the instance-level run is the reference `none` of the two other groups too;
- train-time arms: instance-level captions with `mitigation.name` (mc, gn, rc, rt, cwr;
  docs/memorization.md#train-time-mitigations);
- inference-time arms: the generations of the reference run repeated with each inference mitigation
  (`replication/inference_<name>/`: gni, rt, cwr, rna; docs/memorization.md#inference-time-mitigations).

Every figure is recomputed from the reports' matches.csv (each generation's top-1 similarity to the training
images), with a 95% percentile-bootstrap interval (2,000 resamples): mean and 95th percentile of the top-1
similarity, the share above 0.5 (the paper's SSCD threshold) and above the run's threshold, and the share of
generations whose nearest training image is the very image their prompt is the caption of (`source_top1`, only
where prompts come from images: instance-level arms). FID and CLIP score come from the reports when the runs
computed them (`callbacks.replication.fid` / `clip_score`, which need local weights), else "-".

Written to OUT (default: the first folder given): study.csv (every arm; kind, arm, statistics and intervals),
study.md (one table per group and the findings of `check_claims`), study.png (one panel per statistic, bars with
intervals, the reference dashed), study_gallery.png (per arm, its most replicated generations beside their nearest
training image). The tables and findings are printed too.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import yaml

from src.mitigations import mitigation_tag
from src.plots import draw_image_rows, save_figure
from src.replication import study
from src.replication.study import (
    bootstrap_difference,
    bootstrap_interval,
    find_runs,
    markdown_table,
    mean,
    percentile_95,
    read_json,
    read_matches,
    share_above,
    write_csv,
)

REFERENCE = "instancelevel_blip"  # the conditioning of the train- and inference-time arms
CONDITIONING_ORDER = ("nolevel", "classlevel", "instancelevel_random", "instancelevel_blip")
TRAIN_ORDER = ("none", "mc", "gn", "rc", "rt", "cwr")
INFERENCE_ORDER = (
    "none",
    "gni",
    "rt",
    "cwr",
    "rna",
    "prompt_embedding",
    "delayed_guidance",
    "attention_rescale",
)
KINDS = ("conditioning", "train", "inference")
# the share the paper reports (SSCD similarity > 0.5, docs/replication.md#dcr-measurement)
PAPER_THRESHOLD = 0.5
STATS = ("sim_mean", "sim_95pc", "share_gt_0.5", "share_gt_thr", "source_top1")
COLUMNS = (
    "kind",
    "arm",
    "conditioning",
    "train_mitigation",
    "inference_mitigation",
    "seed",
    "n",
    "threshold",
    *(f"{s}{suffix}" for s in STATS for suffix in ("", "_low", "_high")),
    "control_sim_95pc",
    "fid",
    "clip_score",
    "steps",
    "num_train",
    "extractor",
    "run",
)
TABLE_COLUMNS = (
    "arm",
    "n",
    "sim_mean",
    "sim_95pc",
    "sim_95pc_ci",
    "share_gt_0.5",
    "share_gt_thr",
    "share_gt_thr_ci",
    "source_top1",
    "source_top1_ci",
    "control_sim_95pc",
    "fid",
    "clip_score",
)
CLAIM_STATS = (
    "sim_mean",
    "sim_95pc",
    "share_gt_thr",
    "source_top1",
)  # the statistics `check_claims` compares
GALLERY_PAIRS = 4


@dataclass
class Arm:
    """One arm of the study: kind ("conditioning" | "train" | "inference"), name (the conditioning level, or the
    mitigation with its options, e.g. "rc (p=0.1)"), method (the level or mitigation alone), its generations' top-1
    similarities (`top1`, (G,)) and, where known, whether each one's nearest training image is its prompt's source
    image (`source_hit`, (G,) bool). seed: the run's training seed; base: the name without it (`name` gets
    " [seed N]" when a study holds several seeds). row: the table row (keys `COLUMNS`)."""

    kind: str
    name: str
    run_dir: Path
    top1: np.ndarray
    threshold: float
    matches: list[dict]
    generated_dir: Path
    train_root: Path
    source_hit: np.ndarray | None = None
    method: str = ""
    seed: int | None = None
    base: str = ""
    row: dict = field(default_factory=dict)


def arm_label(options: dict) -> str:
    """ "rc (p=0.1)" for {"name": "rc", "p": 0.1}; the bare name when there are no options (a `label` is a
    folder tag, not an option)."""
    extra = ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("name", "label"))
    return f"{options['name']} ({extra})" if extra else options["name"]


def statistic_of(name: str, threshold: float):
    return {
        "sim_mean": mean,
        "sim_95pc": percentile_95,
        "share_gt_0.5": share_above(PAPER_THRESHOLD),
        "share_gt_thr": share_above(threshold),
    }[name]


def values_of(arm: Arm, name: str) -> np.ndarray | None:
    """The per-generation values a statistic is computed on: top-1 similarities, or source hits as 0/1."""
    if name == "source_top1":
        return None if arm.source_hit is None else arm.source_hit.astype(np.float64)
    return arm.top1


def stat_function(arm: Arm, name: str):
    return mean if name == "source_top1" else statistic_of(name, arm.threshold)


def prompt_sources(run_dir: Path, config: dict, num_images: int) -> list[str | None] | None:
    """The training image each generation's prompt was drawn from (None entries: not from an image), rebuilt with
    the run's datamodule exactly as the callback drew the prompts (`train_prompts(num_images, prompt_seed)`).
    None when the data cannot be set up again (moved or deleted): the statistic is then left out."""
    from hydra.utils import instantiate

    data = dict(config.get("data") or {})
    if "_target_" not in data:
        return None
    data["weights_file"] = None  # do not rewrite the run's sampling weights
    try:
        datamodule = instantiate(data)
        seed = config.get("callbacks", {}).get("replication", {}).get("prompt_seed", 42)
        return datamodule.train_prompts(num_images, seed=seed)[1]
    except (FileNotFoundError, ValueError) as error:
        print(f"{run_dir}: cannot rebuild the prompts' source images ({error}); source_top1 left out")
        return None


def source_hits(matches: list[dict], sources: list[str | None] | None) -> np.ndarray | None:
    """(G,) bool in matches.csv order: the generation's top-1 training image is its prompt's source; None when any
    generation has no source (nolevel, classlevel) or the sources are unknown. Generation i is file {i:06d}.png."""
    if sources is None:
        return None
    hits = []
    for row in matches:
        source = sources[int(Path(row["generated"]).stem)]
        if source is None:
            return None
        hits.append(row["match_1"] == source)
    return np.array(hits, dtype=bool)


def load_arms(run_dir: Path) -> list[Arm]:
    """The arms of one run: its train-time (or conditioning) arm, plus one per inference mitigation it ran.
    Raises ValueError naming the run when its config or replication reports are missing."""
    config_path = run_dir / "config_resolved.yaml"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: no config_resolved.yaml; is this a src.train run folder?")
    config = yaml.safe_load(config_path.read_text()) or {}
    conditioning = config.get("data", {}).get("conditioning", REFERENCE)
    mitigation = dict(config.get("mitigation") or {"name": "none"})
    summary = read_json(run_dir / "replication" / "summary.json")
    report = read_json(run_dir / "replication" / "train" / "report.json")
    train_matches = read_matches(run_dir / "replication" / "train" / "matches.csv")
    if not report or train_matches is None:
        raise ValueError(
            f"{run_dir}: replication/train/report.json or matches.csv is missing; the replication "
            "analysis of this run did not finish (rerun it, or leave the run out)"
        )
    control = summary.get("metrics", {}).get("replication/control/sim_95pc")
    sources = prompt_sources(run_dir, config, int(summary.get("num_generated") or len(train_matches)))
    train_root = Path(report.get("folders", {}).get("train", ""))
    none = {"name": "none"}
    if conditioning != REFERENCE:
        first = [("conditioning", {"name": conditioning})]
    elif mitigation["name"] != "none":
        first = [("train", mitigation)]
    else:
        first = [("conditioning", {"name": conditioning}), ("train", none), ("inference", none)]
    sets = [(kind, options, "train", "final") for kind, options in first]
    sets += [
        ("inference", m, f"inference_{mitigation_tag(m)}", f"final_{mitigation_tag(m)}")
        for m in summary.get("inference_mitigations", [])
    ]
    arms = []
    for kind, options, report_dir, samples_dir in sets:
        name = arm_label(options)
        set_report = read_json(run_dir / "replication" / report_dir / "report.json")
        matches = read_matches(run_dir / "replication" / report_dir / "matches.csv")
        if matches is None:
            raise ValueError(f"{run_dir}: replication/{report_dir}/matches.csv is missing")
        threshold = float(set_report.get("threshold", report.get("threshold", 0.5)))
        arm = Arm(
            kind,
            name,
            run_dir,
            np.array([float(r["sim_1"]) for r in matches]),
            threshold,
            matches,
            run_dir / "samples" / samples_dir,
            train_root,
            source_hits(matches, sources),
            options["name"],
            config.get("seed"),
            name,
        )
        stats = set_report.get("stats", {})
        arm.row = {
            "kind": kind,
            "arm": name,
            "conditioning": conditioning,
            "train_mitigation": arm_label(mitigation),
            "inference_mitigation": name if kind == "inference" else "none",
            "seed": arm.seed,
            "n": len(matches),
            "threshold": threshold,
            "control_sim_95pc": control,
            "fid": stats.get("fid"),
            "clip_score": stats.get("clip_score"),
            "steps": summary.get("step"),
            "num_train": summary.get("num_train"),
            "extractor": set_report.get("extractor"),
            "run": f"{run_dir.parent.name}/{run_dir.name}",
        }
        for stat in STATS:
            values = values_of(arm, stat)
            if values is None:
                continue
            function = stat_function(arm, stat)
            arm.row[stat] = float(function(values))
            arm.row[f"{stat}_low"], arm.row[f"{stat}_high"] = bootstrap_interval(values, function)
        arms.append(arm)
    return arms


def order_key(arm: Arm) -> tuple:
    order = {"conditioning": CONDITIONING_ORDER, "train": TRAIN_ORDER, "inference": INFERENCE_ORDER}[arm.kind]
    position = order.index(arm.method) if arm.method in order else len(order)
    return KINDS.index(arm.kind), position, arm.name, str(arm.run_dir)


def seeds_of(arms: list[Arm]) -> list:
    return sorted({a.seed for a in arms}, key=str)


def load_study(folders) -> list[Arm]:
    """Every arm of every run under `folders`, ordered by kind then as the paper lists them. When the runs were
    trained with several seeds (`seed=0,1` in the sweep), each arm's name ends with " [seed N]"."""
    hint = "train with experiment=t2i_mitigations (or any text-conditional run with the replication callback)"
    arms = [arm for run_dir in find_runs(folders, hint) for arm in load_arms(run_dir)]
    if len(seeds_of(arms)) > 1:
        for arm in arms:
            arm.name = arm.row["arm"] = f"{arm.base} [seed {arm.seed}]"
    return sorted(arms, key=order_key)


# ---- findings --------------------------------------------------------------------------------------------------------
def judge(a: Arm, b: Arm, stat: str) -> tuple[str, str]:
    """(verdict, sentence) for arm a against arm b from one bootstrap of a - b: "lower" / "higher" when its 95%
    interval excludes 0, else "not different"; "<stat> 0.91 vs 0.73 (difference +0.18, 95% CI [+0.12, +0.25])"."""
    low, high = bootstrap_difference(values_of(a, stat), values_of(b, stat), stat_function(a, stat))
    verdict = "lower" if high < 0 else "higher" if low > 0 else "not different"
    diff = a.row[stat] - b.row[stat]
    sentence = (
        f"{stat} {a.row[stat]:.3f} vs {b.row[stat]:.3f} (difference {diff:+.3f}, "
        f"95% CI [{low:+.3f}, {high:+.3f}])"
    )
    return verdict, sentence


NO_REFERENCE = "no instance-level run without mitigation (the reference): nothing to compare"


def comparisons(arms: list[Arm]) -> list[tuple[str, Arm, Arm]] | None:
    """What the claims compare among the arms of one training seed, as (label, a, b), a - b being the difference:
    the instance-level reference against each other conditioning level, then each train- and inference-time
    mitigation against the reference. None without a reference."""
    reference = next((a for a in arms if a.kind == "conditioning" and a.method == REFERENCE), None)
    if reference is None:
        return None
    pairs = [
        (f"instance-level vs {level}", reference, other)
        for level in ("nolevel", "classlevel", "instancelevel_random")
        for other in arms
        if other.kind == "conditioning" and other.method == level
    ]
    pairs += [
        (f"{kind}-time {arm.base} vs none", arm, reference)
        for kind in ("train", "inference")
        for arm in arms
        if arm.kind == kind and arm.method != "none"
    ]
    return pairs


def judgements(arms: list[Arm]) -> list[tuple[str, str, str, str, float]] | None:
    """Every comparison of one training seed's arms on every statistic both arms have, as (label, stat, verdict,
    sentence, difference); None without a reference."""
    pairs = comparisons(arms)
    if pairs is None:
        return None
    return [
        (label, stat, *judge(a, b, stat), a.row[stat] - b.row[stat])
        for label, a, b in pairs
        for stat in CLAIM_STATS
        if values_of(a, stat) is not None and values_of(b, stat) is not None
    ]


def judgements_by_seed(arms: list[Arm]) -> dict:
    """{seed: `judgements` of that seed's arms}, every arm compared with the reference of its own seed."""
    return {seed: judgements([a for a in arms if a.seed == seed]) for seed in seeds_of(arms)}


def check_claims(arms: list[Arm], by_seed: dict | None = None) -> list[str]:
    """Findings, one sentence each, on the paper's claims (docs/memorization.md#caption-mitigations):
    instance-level captions replicate more than class-level or no captions; each train-time and inference-time
    mitigation lowers the replication statistics of instance-level captions. A difference counts when its 95%
    bootstrap interval excludes 0. With several training seeds every arm is compared with the reference of its
    own seed ("seed N: ...").
    by_seed: `judgements_by_seed(arms)` when already computed."""
    by_seed = judgements_by_seed(arms) if by_seed is None else by_seed
    if not by_seed:
        return [NO_REFERENCE]
    prefix = len(by_seed) > 1
    lines = []
    for seed, judged in by_seed.items():
        head = f"seed {seed}: " if prefix else ""
        lines += (
            [f"{head}{NO_REFERENCE}"]
            if judged is None
            else [f"{head}{label}: {verdict}: {sentence}" for label, _, verdict, sentence, _ in judged]
        )
    return lines


def seed_agreement(arms: list[Arm], by_seed: dict | None = None) -> list[str]:
    """With several training seeds, one line per comparison and statistic: how many seeds give each verdict, and
    each seed's difference ("train-time rc (p=0.1) vs none, share_gt_thr: lower in 2 of 2 seeds (seed 0: -0.250,
    seed 1: -0.180)"). The bootstrap intervals cover the sampling of generations; the seeds show whether a verdict
    survives retraining. Empty with one seed. by_seed: `judgements_by_seed(arms)` when already computed."""
    by_seed = judgements_by_seed(arms) if by_seed is None else by_seed
    if len(by_seed) < 2:
        return []
    results = {}  # (label, stat) -> [(seed, verdict, difference)], in the first seed's order
    for seed, judged in by_seed.items():
        for label, stat, verdict, _, difference in judged or []:
            results.setdefault((label, stat), []).append((seed, verdict, difference))
    lines = []
    for (label, stat), entries in results.items():
        counts = Counter(v for _, v, _ in entries)
        verdicts = ", ".join(f"{v} in {n}" for v, n in counts.most_common())
        differences = ", ".join(f"seed {seed}: {d:+.3f}" for seed, _, d in entries)
        lines.append(f"{label}, {stat}: {verdicts} of {len(entries)} seeds ({differences})")
    return lines


# ---- tables and figures ----------------------------------------------------------------------------------------------
def table_rows(arms: list[Arm], kind: str) -> list[dict]:
    """The rows of one group for the markdown table, intervals as "[low, high]"."""
    rows = []
    for arm in (a for a in arms if a.kind == kind):
        row = dict(arm.row)
        for stat in ("sim_95pc", "share_gt_thr", "source_top1"):
            if stat in row:
                row[f"{stat}_ci"] = f"[{row[f'{stat}_low']:.3f}, {row[f'{stat}_high']:.3f}]"
        rows.append(row)
    return rows


PANELS = (
    ("sim_mean", "mean top-1 similarity"),
    ("sim_95pc", "95th pct. of top-1 similarity"),
    ("share_gt_0.5", "share of top-1 > 0.5"),
    ("share_gt_thr", "share of top-1 > threshold"),
    ("source_top1", "share matching its caption's image"),
    ("fid", "FID"),
    ("clip_score", "CLIP score"),
)
COLOURS = {"conditioning": "tab:blue", "train": "tab:orange", "inference": "tab:green"}
SHORT_KIND = {"conditioning": "cond", "train": "train", "inference": "infer"}


def draw_study(arms: list[Arm]):
    """One panel per statistic (FID and CLIP score only when measured): a bar per arm, grouped and coloured by kind,
    with its 95% bootstrap interval; the instance-level reference's value dashed (with several training seeds, a
    dashed tick on each bar at the reference of the arm's own seed)."""
    panels = [(s, t) for s, t in PANELS if any(a.row.get(s) is not None for a in arms)]
    labels = [f"{SHORT_KIND[a.kind]}: {a.name}" for a in arms]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.3 * len(panels), 0.32 * len(arms) + 1.6), squeeze=False
    )
    references = {a.seed: a for a in arms if a.kind == "conditioning" and a.method == REFERENCE}
    several_seeds = len(seeds_of(arms)) > 1
    for ax, (stat, title) in zip(axes[0], panels, strict=True):
        y = np.arange(len(arms))[::-1]
        values = [a.row.get(stat) for a in arms]
        for yi, arm, value in zip(y, arms, values, strict=True):
            if value is None:
                continue
            low, high = arm.row.get(f"{stat}_low"), arm.row.get(f"{stat}_high")
            xerr = None if low is None else [[value - low], [high - value]]
            ax.barh(yi, value, color=COLOURS[arm.kind], alpha=0.75, xerr=xerr, capsize=2)
            reference = references.get(arm.seed)
            if several_seeds and reference is not None and reference.row.get(stat) is not None:
                ax.plot([reference.row[stat]] * 2, [yi - 0.45, yi + 0.45], "k--", linewidth=1)
        reference = next(iter(references.values()), None)
        if not several_seeds and reference is not None and reference.row.get(stat) is not None:
            ax.axvline(reference.row[stat], color="black", linestyle="--", linewidth=1)
        ax.set_yticks(y, labels if ax is axes[0][0] else [""] * len(arms), fontsize=8)
        ax.set_ylim(-0.6, len(arms) - 0.4)  # the same rows in every panel, also where some arms have no value
        ax.set_title(title, fontsize=9)
    threshold = arms[0].threshold
    of_seed = " of the arm's seed" if several_seeds else ""
    fig.suptitle(
        f"Caption mitigations: replication of the training images ({arms[0].row.get('extractor')} "
        f"similarity, threshold {threshold}; bars: 95% bootstrap intervals; dashed: instance-level, "
        f"no mitigation{of_seed})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def match_cells(arm: Arm, row: dict) -> list[tuple]:
    """A generation (black frame) and its nearest training image titled with the similarity (green above the
    threshold)."""
    sim = float(row["sim_1"])
    return [
        (arm.generated_dir / row["generated"], row["generated"][:10], "black"),
        (arm.train_root / row["match_1"], f"{sim:.3f}", "tab:green" if sim > arm.threshold else "tab:gray"),
    ]


def draw_study_gallery(arms: list[Arm], pairs: int = GALLERY_PAIRS):
    """One row per arm: its `pairs` most replicated generations, each beside its nearest training image.
    Returns (figure, number of unreadable images)."""
    rows = [sum((match_cells(arm, row) for row in arm.matches[:pairs]), []) for arm in arms]
    fig, unreadable = draw_image_rows(rows, [f"{a.kind}\n{a.name}" for a in arms])
    fig.suptitle(
        "Most replicated generations (black) and their nearest training image (green: above threshold)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    return fig, unreadable


def unique_arms(arms: list[Arm]) -> list[Arm]:
    """The arms without the reference's repeats (it is listed once per group): for the figures."""
    seen, unique = set(), []
    for arm in arms:
        key = (str(arm.run_dir), arm.row["inference_mitigation"])
        if key not in seen:
            seen.add(key)
            unique.append(arm)
    return unique


def markdown_report(arms: list[Arm], findings: list[str], agreement: list[str] = ()) -> str:
    titles = {
        "conditioning": "Conditioning (docs/memorization.md#conditioning), no mitigation",
        "train": (
            "Train-time mitigations (docs/memorization.md#train-time-mitigations), instance-level captions"
        ),
        "inference": (
            "Inference-time mitigations (docs/memorization.md#inference-time-mitigations), "
            "on the instance-level model without mitigation"
        ),
    }
    parts = [
        "# Caption-mitigation study (docs/memorization.md#caption-mitigations)\n",
        "Top-1 similarity of each generation to the training images; `*_ci`: 95% bootstrap intervals; "
        "`share_gt_thr`: above the run's threshold; `source_top1`: nearest training image is the image the "
        "prompt was written for; `control_sim_95pc`: the same run's generations against held-out images.\n",
    ]
    for kind in KINDS:
        rows = table_rows(arms, kind)
        if rows:
            parts.append(f"## {titles[kind]}\n\n{markdown_table(rows, TABLE_COLUMNS)}\n")
    parts.append("## Findings\n\n" + "".join(f"- {f}\n" for f in findings))
    if agreement:
        parts.append("## Across training seeds\n\n" + "".join(f"- {line}\n" for line in agreement))
    return "\n".join(parts)


def write_study(arms: list[Arm], out: Path) -> dict[str, Path]:
    """study.csv, study.md, study.png and study_gallery.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("study.csv", "study.md", "study.png", "study_gallery.png")}
    write_csv([a.row for a in arms], files["study.csv"], COLUMNS)
    by_seed = judgements_by_seed(arms)  # one bootstrap per comparison, for the findings and the agreement
    files["study.md"].write_text(
        markdown_report(arms, check_claims(arms, by_seed), seed_agreement(arms, by_seed))
    )
    shown = unique_arms(arms)
    save_figure(draw_study(shown), files["study.png"], dpi=120)
    gallery, unreadable = draw_study_gallery(shown)
    save_figure(gallery, files["study_gallery.png"])
    if unreadable:
        print(f"study_gallery.png: {unreadable} image(s) unreadable (data moved?); their cells are empty")
    return files


def main(argv=None) -> list[Arm]:
    args = study.parse_study_args(argv, __doc__)
    arms = load_study(args.folders)
    files = write_study(arms, args.out)
    print(files["study.md"].read_text())
    print(f"Wrote {', '.join(str(p) for p in files.values())}")
    return arms


if __name__ == "__main__":
    main()
