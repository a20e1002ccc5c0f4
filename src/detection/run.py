"""Running the detectors of memorized prompts on a loaded text-to-image module and its training run's datamodule:
the prompts, their ground truth from the model's own generations, the scores, the report (docs/detection.md). What
`python -m src.detect` and the end-of-training callback (src/callbacks/detection.py) share."""

import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from src.attacks.extraction import load_generations
from src.attacks.membership import draw_roc, membership_prompts
from src.data.images import read_list
from src.detection.detectors import (
    DETECTORS,
    attention_entropy,
    end_token_positions,
    generation_similarity,
    noise_norm,
    score_anisotropy,
)
from src.generation import generate_to_folder, image_name
from src.metrics.membership import roc_curve, roc_summary
from src.metrics.replication import top1_similarities
from src.models.diffusion import sampling_network
from src.nn.attention import cross_attention_layers
from src.nn.diffusion import build_sampler, initial_noise
from src.nn.embed import embed_images
from src.plots import save_figure

log = logging.getLogger(__name__)


# ---- prompts and ground truth --------------------------------------------------------------------------------
def detection_prompts(source, datamodule) -> dict:
    """{prompts, sources (index into the training images, -1 for the others)}: `source` "training" (every training
    image's prompt, then every held-out image's, when the run holds some out) or a .txt / .json file of prompts
    (duplicates dropped); `datamodule` is the training run's, set up."""
    if source == "training":
        train, held_out = datamodule.train_files, list(getattr(datamodule, "control_files", []))
        prompts = membership_prompts(datamodule, train) + membership_prompts(datamodule, held_out)
        return {"prompts": prompts, "sources": list(range(len(train))) + [-1] * len(held_out)}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts={source!r}: no such file (a .txt with one prompt per line, a .json list, or 'training')"
        )
    prompts = list(dict.fromkeys(read_list(path)))
    return {"prompts": prompts, "sources": [-1] * len(prompts)}


def generate_per_prompt(
    module, prompts: list[str], k: int, folder: Path, seed: int, steps, batch_size
) -> None:
    """`k` generations of each prompt written to `folder` (seeded and resumable, `generate_to_folder`): image
    p * k + j from prompt p and seed `seed` + p * k + j."""
    repeated = [prompt for prompt in prompts for _ in range(k)]
    generate_to_folder(
        module, folder, len(repeated), seed=seed, steps=steps, batch_size=int(batch_size), prompts=repeated
    )


def copy_shares(
    module, prompts: list[str], sources: list[int], datamodule, extractor, options: dict, folder: Path, device
) -> np.ndarray:
    """The copy share of each prompt: the ground truth of the module docstring, from `options["generations"]`
    generations per prompt written to `folder` (image p * K + k from prompt p and seed `options["seed"]` + p * K +
    k), each matched with the training images of `datamodule` by the features of `extractor`."""
    k = int(options["generations"])
    generate_per_prompt(
        module, prompts, k, folder, int(options["seed"]), options.get("steps"), options["batch_size"]
    )
    extractor = extractor.to(device).eval()
    names = [image_name(i) for i in range(len(prompts) * k)]
    generated, _, _ = embed_images(extractor, folder, names, device=device, desc="ground-truth generations")
    train, readable, _ = embed_images(extractor, datamodule.root, datamodule.train_files, device=device)
    similarity, nearest = top1_similarities(generated, train)
    own = torch.tensor([s for s in sources for _ in range(k)])
    copies = (similarity >= float(options["threshold"])) & ((own < 0) | (readable[nearest] == own))
    return copies.view(len(prompts), k).float().mean(1).numpy()


# ---- detectors -----------------------------------------------------------------------------------------------
def unet_scores(
    module, name: str, prompts: list[str], options: dict, seed: int, batch_size: int, use_ema: bool
):
    """(P,) scores of a detector that reads the network: `options["generations"]` rows per prompt (x_T seeded by
    seed + p * G + g), in batches of `batch_size` rows, averaged per prompt."""
    options = dict(options)
    generations = int(options.pop("generations", 1))
    network = sampling_network(module, use_ema).eval()
    sampler = build_sampler(options.pop("sampler", None) or "ddim", module.noise_scheduler)
    guidance = options.pop("guidance_scale", None) or module.hparams.guidance_scale
    rows = [(p, g) for p in range(len(prompts)) for g in range(generations)]
    channels, size = network.config.in_channels, module.latent_size()
    uncond = module.empty_prompt()
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=name, unit="batch", leave=False):
        batch = rows[start : start + batch_size]
        texts = [prompts[p] for p, _ in batch]
        cond = module.encode_prompts(texts)
        seeds = [seed + p * generations + g for p, g in batch]
        noise = initial_noise((len(batch), channels, size, size), seeds, module.device)
        if name == "noise_norm":
            scores = noise_norm(network, sampler, cond, uncond, noise, guidance_scale=guidance, **options)
        elif name == "score_anisotropy":
            scores = score_anisotropy(network, sampler, cond, uncond, noise, **options)["score"]
        else:
            ids = module.text_encoder.tokenize(texts)
            ends = end_token_positions(ids, module.text_encoder.end_token_id)
            scores = attention_entropy(
                network, sampler, cond, uncond, noise, ends, guidance_scale=guidance, **options
            )
        out.append(scores.float().cpu())
    return torch.cat(out).view(len(prompts), generations).mean(1).numpy()


def similarity_scores(module, prompts: list[str], options: dict, seed: int, folder: Path, batch_size: int):
    """(P,) `generation_similarity` of `options["generations"]` generations per prompt, written to `folder`."""
    k = int(options["generations"])
    generate_per_prompt(module, prompts, k, folder, seed, options.get("steps"), batch_size)
    images, _ = load_generations(folder, module.hparams.image_size)
    grid = tuple(options.get("grid", (4, 4)))
    return np.array([generation_similarity(images[p * k : (p + 1) * k], grid) for p in range(len(prompts))])


def base_detector(name: str) -> str:
    """The detector of a name: `noise_norm:first_step` is a variant of `noise_norm`."""
    return name.partition(":")[0]


def detector_options(options: dict, name: str) -> dict:
    """The options of detector `name`: its base detector's (`options[base]`), updated by the variant's own
    (`options[name]`), so `noise_norm:first_step: {generations: 1, scored_steps: 1}` changes only those two."""
    base = base_detector(name)
    return {**options.get(base, {}), **(options.get(name) or {})} if name != base else dict(options[base])


def check_detectors(module, names: list[str]) -> None:
    """ValueError for an unknown detector, an unconditional model, or an attention detector on a UNet without
    cross-attention, listing what applies."""
    unknown = [name for name in names if base_detector(name) not in DETECTORS]
    if unknown:
        raise ValueError(
            f"unknown detector(s) {unknown}; valid: {', '.join(DETECTORS)}, each optionally with a variant "
            "name after a colon (noise_norm:first_step) whose options override the detector's"
        )
    if not hasattr(module, "encode_prompts"):
        raise ValueError(
            f"{type(module).__name__} is an unconditional model: the detectors score prompts and need a "
            "text-conditional model (Text2ImageModule); for an unconditional model, `python -m src.attack "
            "attack=extraction` finds the training images it reproduces"
        )
    if "attention_entropy" in map(base_detector, names) and not cross_attention_layers(module.unet):
        applies = [name for name in DETECTORS if name != "attention_entropy"]
        raise ValueError(
            f"detector attention_entropy reads cross-attention, which this UNet does not have; the detectors that "
            f"apply: {', '.join(applies)}"
        )


# ---- report --------------------------------------------------------------------------------------------------
def detector_table(
    scores: dict[str, np.ndarray], shares: np.ndarray, memorized: np.ndarray, costs: dict, bootstrap: int
):
    """{detector: {auc, auc_ci, tpr@1%fpr, tpr@1%fpr_ci, spearman, ms_per_prompt, cost_vs_generation}}: ROC
    against the memorized labels (ROC figures are NaN when one class is empty), Spearman against the share."""
    from scipy.stats import spearmanr

    table = {}
    for name, values in scores.items():
        row = {"ms_per_prompt": costs[name]["ms_per_prompt"], "cost_vs_generation": costs[name]["ratio"]}
        if memorized.any() and (~memorized).any():
            summary = roc_summary(values[memorized], values[~memorized], bootstrap=bootstrap)
            row.update(
                {k: summary[k] for k in ("auc", "tpr@1%fpr", "auc_ci", "tpr@1%fpr_ci") if k in summary}
            )
        else:
            row.update({"auc": float("nan"), "tpr@1%fpr": float("nan")})
        row["spearman"] = float(spearmanr(values, shares).statistic) if np.ptp(shares) > 0 else float("nan")
        table[name] = row
    return table


def write_report(
    out_dir: Path, prompts, sources, shares, memorized, scores, table, num_generations: int
) -> None:
    """scores.csv, detectors.csv, detectors.md, roc.png and scatter.png (see the module docstring)."""
    with (out_dir / "scores.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["prompt", "source", "copy_share", "memorized", *scores])
        for i, prompt in enumerate(prompts):
            writer.writerow(
                [
                    prompt,
                    sources[i],
                    repr(float(shares[i])),
                    int(memorized[i]),
                    *(repr(float(v[i])) for v in scores.values()),
                ]
            )
    keys = ["auc", "auc_ci", "tpr@1%fpr", "tpr@1%fpr_ci", "spearman", "ms_per_prompt", "cost_vs_generation"]
    with (out_dir / "detectors.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["detector", *keys])
        for name, row in table.items():
            writer.writerow([name, *(row.get(k, "") for k in keys)])
    lines = [
        f"{int(memorized.sum())} memorized of {len(prompts)} prompts (copy share from {num_generations} generations each)",
        "",
        "| detector | ROC AUC [95% CI] | TPR@1%FPR | Spearman vs share | ms / prompt | cost / generation |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        ci = row.get("auc_ci")
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        lines.append(
            f"| {name} | {row['auc']:.3f}{interval} | {row['tpr@1%fpr']:.3f} | {row['spearman']:.3f} | "
            f"{row['ms_per_prompt']:.1f} | {row['cost_vs_generation']:.3f} |"
        )
    (out_dir / "detectors.md").write_text("\n".join(lines) + "\n")
    if memorized.any() and (~memorized).any():
        curves = {name: roc_curve(v[memorized], v[~memorized]) for name, v in scores.items()}
        save_figure(draw_roc(curves, table, int((~memorized).sum())), out_dir / "roc.png")
    save_figure(draw_scatter(scores, shares, memorized), out_dir / "scatter.png")


def draw_scatter(scores: dict[str, np.ndarray], shares: np.ndarray, memorized: np.ndarray) -> Figure:
    """One panel per detector: its score against the prompt's copy share, memorized prompts in red."""
    fig = Figure(figsize=(3.2 * len(scores), 3.0))
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    for ax, (name, values) in zip(axes, scores.items(), strict=True):
        ax.scatter(shares[~memorized], values[~memorized], s=12, c="tab:blue", label="not memorized")
        ax.scatter(shares[memorized], values[memorized], s=12, c="tab:red", label="memorized")
        ax.set_xlabel("copy share of its generations")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("detector score")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- running ---------------------------------------------------------------------------------------------------
def one_generation_seconds(module, prompt: str, steps, repeats: int = 2) -> float:
    """Seconds to generate one image of `prompt` alone (the best of `repeats`): the unit of the detectors' cost."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        module.generate([0], [prompt], steps=steps)
        best = min(best, time.perf_counter() - start)
    return best


def detect_module(module, datamodule, settings: dict, out_dir, samples_dir, extractor, device) -> dict:
    """Score the prompts of `settings["prompts"]` with each detector of `settings["detectors"]` on a loaded
    text-to-image module and its training run's datamodule, measure the ground truth, and write the report to
    `out_dir` (the generations go to folders in `samples_dir`). `settings`: the keys of conf/detect.yaml below
    `detectors`. What `python -m src.detect` and the end-of-training callback share."""
    out_dir, samples_dir = Path(out_dir), Path(samples_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, options = list(settings["detectors"]), settings["options"]
    seed, batch_size = int(settings["seed"]), int(settings["batch_size"])
    check_detectors(module, names)
    found = detection_prompts(settings["prompts"], datamodule)
    prompts, sources = found["prompts"], found["sources"]
    cut = module.text_encoder.too_long(prompts)
    if cut:
        log.warning(
            "%d of %d prompts are longer than the tokenizer's limit and are cut to it, e.g. %r",
            len(cut),
            len(prompts),
            prompts[cut[0]],
        )
    truth = options["truth"]
    shares = copy_shares(
        module,
        prompts,
        sources,
        datamodule,
        extractor,
        {**truth, "batch_size": batch_size},
        samples_dir / f"detect_truth_seed{truth['seed']}",
        device,
    )
    memorized = shares >= float(truth["memorized_share"])
    generation = one_generation_seconds(module, prompts[0], None)
    scores, costs = {}, {}
    for name in names:
        start = time.perf_counter()
        base, chosen = base_detector(name), detector_options(options, name)
        if base == "generation_similarity":
            variant = name.partition(":")[2]
            folder = samples_dir / f"detect_similarity{'_' + variant if variant else ''}_seed{seed}"
            scores[name] = similarity_scores(module, prompts, chosen, seed, folder, batch_size)
        else:
            scores[name] = unet_scores(module, base, prompts, chosen, seed, batch_size, settings["use_ema"])
        per_prompt = (time.perf_counter() - start) / len(prompts)
        costs[name] = {"ms_per_prompt": 1000 * per_prompt, "ratio": per_prompt / generation}
        log.info(
            "%s: %.1f ms per prompt (%.3f of one generation)",
            name,
            1000 * per_prompt,
            per_prompt / generation,
        )
    table = detector_table(scores, shares, memorized, costs, int(settings["bootstrap"]))
    write_report(out_dir, prompts, sources, shares, memorized, scores, table, int(truth["generations"]))
    summary = {
        "num_prompts": len(prompts),
        "num_memorized": int(memorized.sum()),
        "generation_seconds": generation,
        **{
            f"{name}/{k}": v for name, row in table.items() for k, v in row.items() if not isinstance(v, list)
        },
    }
    log.info("Detection: %d of %d prompts memorized; report in %s", memorized.sum(), len(prompts), out_dir)
    return {"summary": summary, "table": table, "shares": shares, "scores": scores}
