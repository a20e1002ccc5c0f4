"""Replication analysis of a folder of generations against a training folder, as one library call.

`analyse_replication` is the DCR measurement (somepago/DCR `diff_retrieval.py`;
docs/replication.md#dcr-measurement) with any extractor of `src.nn.extractors`: features of both folders (the
training set's cached on disk), exact top-k search of each generation in the training set, the `sim_*` /
`bg_*` statistics and the report folder (`src.replication.report`), plus the extras of the DCR evaluation:
- the top-1 statistics split by whether the matched training image was up-weighted in training
  (docs/memorization.md#duplication);
- the correlation of top-1 similarity with the matched training image's complexity (`src.metrics.complexity`);
- FID between the training and the generated folder (`src.replication.fid`);
- the CLIP score of the generations against their prompts, and of the training images against their caption 0
  (`src.replication.clip_score`).
`python -m src.replicate` is its Hydra entry; a training callback calls it once against the training subset and
once against held-out images (`train_files=`).
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from src.data.images import folder_files, load_rgb
from src.metrics.complexity import MEASURES, complexity_correlations, complexity_image, image_complexity
from src.metrics.replication import stats_from_similarities, train_background, upweighted_split_stats
from src.metrics.search import search_topk
from src.replication.clip_score import clip_score_of_files, load_clip
from src.replication.features import FolderFeatures, cached_folder_features, extract_folder
from src.replication.fid import build_fid_inception, fid_between_folders
from src.replication.report import write_complexity, write_report
from src.replication.store import FeatureStore, StoreError
from src.replication.store_search import search_store, store_background
from src.utils.checkpoints import load_checkpoint, state_digest
from src.utils.checks import check_number, clip_count
from src.utils.files import read_json, read_text

log = logging.getLogger(__name__)

FID_KEYS = ("weights", "feature", "batch_size")
CLIP_KEYS = ("model", "pretrained", "tokenizer", "batch_size", "train_captions")


def load_prompts(prompts, generated_paths: list[str], folder=None) -> list[str] | None:
    """Prompts aligned with the readable generations `generated_paths`.

    prompts: None; a list (already aligned); a dict or a .json file {path relative to the generated folder: prompt}
    (every generation needs one); or a .txt file with one prompt per line for the readable generations in order.
    With the generated `folder`, a key that names no file of it is an error (a key of an unreadable generation,
    skipped, is fine).
    """
    if prompts is None or isinstance(prompts, list):
        if prompts is not None and len(prompts) != len(generated_paths):
            raise ValueError(
                f"{len(prompts)} prompts for {len(generated_paths)} readable generations; give one "
                "prompt per readable generation or a dict {relative path: prompt}"
            )
        return prompts
    source, mapping = "prompts", prompts
    if not isinstance(prompts, dict):
        source = path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file '{path}' does not exist (expected a .json or .txt file)")
        if path.suffix != ".json":
            lines = read_text(path, "prompts file").splitlines()
            if len(lines) != len(generated_paths):
                raise ValueError(
                    f"prompts file '{path}' has {len(lines)} lines for {len(generated_paths)} readable "
                    "generations; give one line per generation or a .json {relative path: prompt}"
                )
            return lines
        mapping = read_json(path, "prompts file")
        if not isinstance(mapping, dict):
            raise ValueError(
                f"prompts file '{path}' must hold a JSON object {{path relative to the generated folder: prompt}}, "
                f"not {type(mapping).__name__}"
            )
    if folder is not None:
        readable = set(generated_paths)
        unknown = [key for key in mapping if key not in readable and not (Path(folder) / key).is_file()]
        if unknown:
            raise ValueError(
                f"prompts file '{source}' names {len(unknown)} generation(s) that are not files of the generated "
                f"folder '{folder}', e.g. {unknown[:3]}; keys must be paths relative to that folder"
            )
    missing = [p for p in generated_paths if p not in mapping]
    if missing:
        raise ValueError(
            f"prompts file '{source}' has no prompt for {len(missing)} generation(s), e.g. {missing[:3]}"
        )
    return [mapping[p] for p in generated_paths]


def load_sampling_weights(source, train_listing: list[str]) -> dict[str, float]:
    """Per-image sampling weights {relative path: weight} of a training run
    (docs/memorization.md#duplication).

    source: a .json file or dict {path relative to the training folder: weight}, or a .npy / .pt file (or an array)
    of weights aligned with `train_listing`, the training files in the order the run listed them (the `train_files`
    given to the analysis, or else the sorted folder listing).
    """
    name = source if isinstance(source, (str, Path)) else type(source).__name__
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"sampling weights file '{path}' does not exist (.json, .npy or .pt)")
        if path.suffix == ".json":
            source = read_json(path, "sampling weights file")
        elif path.suffix == ".npy":
            with open(path, "rb") as file:
                if file.read(6) != b"\x93NUMPY":
                    raise ValueError(
                        f"sampling weights file '{path}' is not a numpy array file (no .npy header); it must be "
                        "a .npy written by numpy.save, one weight per training file"
                    )
            try:
                source = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise ValueError(
                    f"sampling weights file '{path}' cannot be read as a numpy array ({type(error).__name__}: "
                    f"{error}); it must be a .npy of numbers written by numpy.save, one weight per training file"
                ) from None
        elif path.suffix == ".pt":
            source = load_checkpoint(path, "sampling weights file")
        else:
            raise ValueError(f"sampling weights file '{path}': unknown suffix; use .json, .npy or .pt")
    if isinstance(source, dict):
        weights = {str(k): float(v) for k, v in source.items()}
    else:
        values = torch.as_tensor(np.asarray(source), dtype=torch.float64).flatten()
        if len(values) != len(train_listing):
            raise ValueError(
                f"sampling weights '{name}' hold {len(values)} values for {len(train_listing)} training "
                "files: an array must be aligned with the training file list (or use a .json by path)"
            )
        weights = dict(zip(train_listing, values.tolist(), strict=True))
    bad = [k for k, v in weights.items() if not np.isfinite(v) or v < 0]
    if bad:
        raise ValueError(
            f"sampling weights '{name}' must be finite and >= 0; {len(bad)} are not, e.g. {bad[:3]}"
        )
    return weights


def open_train_store(path, extractor) -> FeatureStore:
    """The training set's feature store, refused when another extractor or other weights made it."""
    store = FeatureStore(path)
    made_by = store.manifest["extractor"]
    if made_by["name"] != extractor.name or made_by["weights"] != state_digest(extractor):
        raise StoreError(
            f"store '{path}' holds features of {made_by['name']} (weights {made_by['weights'][:12]}), the report "
            f"runs {extractor.name} (weights {state_digest(extractor)[:12]}): extract the store with this "
            "extractor (python -m src.extract) or pick the store's extractor"
        )
    return store


def match_generations(generated: torch.Tensor, train: torch.Tensor, k: int, device, chunk: int = 4096):
    """Exact top-k of each generation in the training set, chunk by chunk under a progress bar. (G, k') each."""
    scores, indices = [], []
    train = train.to(device)  # once, not per chunk
    for start in tqdm(range(0, len(generated), chunk), desc="search", unit="chunk"):
        s, i = search_topk(generated[start : start + chunk], train, k=k, device=device)
        scores.append(s.cpu()), indices.append(i.cpu())
    return torch.cat(scores), torch.cat(indices)


def matched_complexity(train_dir, matched_paths: list[str]) -> dict[str, np.ndarray]:
    """{measure: (G,) values} of the training image matched by each generation (each image scored once)."""
    scores = {}
    for path in tqdm(sorted(set(matched_paths)), desc="complexity", unit="image"):
        scores[path] = image_complexity(complexity_image(load_rgb(Path(train_dir) / path)))
    return {m: np.array([scores[p][m] for p in matched_paths]) for m in MEASURES}


def _options(spec, keys: tuple[str, ...], what: str) -> dict:
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; expected some of {list(keys)}")
    return dict(spec)


def _prepare_clip(spec: dict, device):
    """(CLIP model on `device`, tokenizer) from the clip_score options."""
    model, tokenizer = spec.get("model", "ViT-B-16"), spec.get("tokenizer")
    if isinstance(model, str):
        model, tokenizer = load_clip(model, spec.get("pretrained", "openai"))
    elif tokenizer is None:
        raise ValueError(
            "clip_score: a CLIP model given as a module needs its tokenizer (clip_score['tokenizer'])"
        )
    return model.to(device), tokenizer


def _train_captions(path, train_paths: list[str]) -> list[str]:
    """Caption 0 of each training image from a .json {relative path: caption or [captions]} (DCR `clipscore_bg`)."""
    mapping = json.loads(Path(path).read_text())
    missing = [p for p in train_paths if p not in mapping]
    if missing:
        raise ValueError(
            f"train captions '{path}' have no caption for {len(missing)} training image(s), "
            f"e.g. {missing[:3]}"
        )
    return [mapping[p][0] if isinstance(mapping[p], list) else mapping[p] for p in train_paths]


def _split_by_sampling_weights(source, train_listing, train_paths, top1, matched, threshold):
    """(`upweighted_split_stats` of the top-1 similarities, a summary for report.json) from the sampling weights."""
    weights = load_sampling_weights(source, train_listing)
    missing = [p for p in train_paths if p not in weights]
    if missing:
        raise ValueError(
            f"sampling weights have no weight for {len(missing)} training image(s), e.g. {missing[:3]}"
        )
    min_weight = min(weights[p] for p in train_paths)
    upweighted = sum(weights[p] > min_weight for p in train_paths)
    if upweighted == 0:
        log.warning("all training images have the same sampling weight: no up-weighted images to split by")
    stats = upweighted_split_stats(top1, [weights[p] for p in matched], min_weight, threshold)
    info = {
        "source": str(source) if isinstance(source, (str, Path)) else type(source).__name__,
        "min_weight": min_weight,
        "num_upweighted_train": upweighted,
        "num_train": len(train_paths),
    }
    return stats, info


def _clip_scores(
    clip, options, generated_dir, generated_paths, prompts, train_dir, train_paths, num_workers, device
):
    """({clip_score[, clip_score_train]}, a summary for report.json) with the prepared (model, tokenizer)."""
    model, tokenizer = clip
    args = {"batch_size": options.get("batch_size", 64), "num_workers": num_workers, "device": device}
    stats = {
        "clip_score": clip_score_of_files(model, tokenizer, generated_dir, generated_paths, prompts, **args)
    }
    if options.get("train_captions"):
        captions = _train_captions(options["train_captions"], train_paths)
        stats["clip_score_train"] = clip_score_of_files(
            model, tokenizer, train_dir, train_paths, captions, **args
        )
    name = options.get("model", "ViT-B-16")
    info = {
        "model": name if isinstance(name, str) else type(name).__name__,
        "pretrained": options.get("pretrained", "openai") if isinstance(name, str) else None,
        "num_generated": len(prompts),
        "num_train": len(train_paths) if options.get("train_captions") else 0,
    }
    return stats, info


def analyse_replication(
    extractor,
    generated_dir,
    train_dir,
    output_dir,
    *,
    train_files: list[str] | None = None,
    generated_files: list[str] | None = None,
    k: int = 5,
    threshold: float = 0.5,
    gallery_size: int = 8,
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    cache_dir=None,
    extractor_config: dict | None = None,
    prompts=None,
    sampling_weights=None,
    complexity: bool = True,
    fid: dict | None = None,
    clip_score: dict | None = None,
    train_store=None,
    background_anchors: int | None = None,
) -> dict:
    """Compare generations with their training images and write the report folder `output_dir`.

    Args:
        extractor: an `src.nn.extractors.Extractor` on `device` (global (B, D) descriptors; `name` keys the cache).
        generated_dir, train_dir: image folders, read recursively; `generated_files` / `train_files` restrict them
            to listed paths relative to the folder (a training subset, held-out images).
        k: training matches per generation in matches.csv. threshold: `sim_gt_thr` counts top-1 similarities
            strictly above it (0.5 with SSCD in the papers). gallery_size: generations shown in gallery.png.
        cache_dir: where the training features are cached (None: no cache); extractor_config: its config, part of
            the cache key.
        prompts: None, a list aligned with the readable generations, a dict or a .json / .txt file (`load_prompts`).
        sampling_weights: the training run's per-image sampling weights (`load_sampling_weights`): splits the
            top-1 statistics by whether the match was up-weighted (`sim_upweighted_*`, `sim_not_upweighted_*`).
        complexity: correlate top-1 similarity with the matched training image's complexity (`cc_*`, `pval_*`,
            complexity.csv, complexity.png).
        fid: None (off) or options of `fid_between_folders`: {"weights": local Inception file, "batch_size": 50,
            "feature": a custom network}; gives `fid`.
        clip_score: None (off) or {"model": "ViT-B-16" or an open_clip module, "pretrained": "openai" or a file,
            "tokenizer" (with a module), "batch_size": 64, "train_captions": .json {path: caption or [captions]}};
            needs `prompts`; gives `clip_score` and, with train captions, `clip_score_train`.
        train_store: a feature store of the training set (`src.replication.store`, e.g. from `python -m
            src.extract` on N GPUs) searched block by block instead of extracting `train_dir`; made by the same
            extractor with the same weights. `train_dir` then only serves the images the report shows (default:
            the store's source folder; a webdataset store has none: gallery, complexity, FID and the training
            CLIP score are off).
        background_anchors: the train-train background over a seeded sample of this many training rows (with
            `train_store`; None: every row, N x N products).

    Returns:
        The statistics: `sim_*` / `bg_*` (`src.metrics.replication`), then those of each extra switched on. They are
        also in `output_dir/report.json` beside report.json's counts, skipped files and settings, matches.csv,
        histogram.png, gallery.png.
    """
    check_number("threshold", threshold, low=-1, high=1)  # a cosine similarity
    check_number("k", k, low=1, integer=True)
    check_number("gallery_size", gallery_size, low=0, integer=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("num_workers", num_workers, low=0, integer=True)
    output_dir, device = Path(output_dir), torch.device(device)
    fid = _options(fid, FID_KEYS, "fid") if fid is not None else None
    clip_score = _options(clip_score, CLIP_KEYS, "clip_score") if clip_score is not None else None
    if clip_score is not None and prompts is None:
        raise ValueError(
            "clip_score needs the generations' prompts: pass prompts= (or switch clip_score off)"
        )
    for what, source in (
        ("prompts", prompts),
        ("sampling weights", sampling_weights),
        ("train captions", (clip_score or {}).get("train_captions")),
    ):
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            raise FileNotFoundError(f"{what} file '{source}' does not exist")
    # The extras' networks are built first, so a missing weights file fails before the long extraction.
    fid_network = clip = None
    if fid is not None:
        fid_network = fid.get("feature")
        if fid_network is None:
            fid_network = build_fid_inception(fid.get("weights"))
    if clip_score is not None:
        clip = _prepare_clip(clip_score, device)

    store = None
    if train_store is not None:
        store = open_train_store(train_store, extractor)
        if train_dir is None and store.manifest["source"]["kind"] == "folder":
            train_dir = store.manifest["source"]["root"]
        if train_dir is None:
            log.info(
                "the training store has no image folder: no gallery, complexity, FID or training CLIP score"
            )
            gallery_size, complexity, fid = 0, False, None
        train_files = None
    folders = [(generated_dir, generated_files)] + ([(train_dir, train_files)] if store is None else [])
    for folder, files in folders:
        folder_files(
            folder, files
        )  # a missing or empty folder, or a file given as one, fails before extraction
    loader_args = {"batch_size": batch_size, "num_workers": num_workers, "device": device}
    if store is None:
        train = cached_folder_features(
            extractor,
            train_dir,
            cache_dir,
            extractor_config,
            files=train_files,
            desc="train features",
            **loader_args,
        )
    else:
        train = FolderFeatures(str(train_dir or store.root), store.paths, None, store.skipped, cache="store")
    generated = extract_folder(
        extractor, generated_dir, files=generated_files, desc="generated features", **loader_args
    )
    prompts = load_prompts(prompts, generated.paths, generated_dir)
    train_dim = store.dim if store is not None else train.features.shape[1]
    if generated.features.shape[1] != train_dim:
        raise ValueError(
            f"generated features {tuple(generated.features.shape)} and train features "
            f"({len(train.paths)}, {train_dim}) differ in dimension: the cache and the extractor disagree"
        )
    k = clip_count("k", k, len(train.paths), "training images")
    if store is None:
        scores, indices = match_generations(generated.features, train.features, k, device)
        background, _ = train_background(train.features, device=device)
    else:
        scores, indices = search_store(generated.features, store, k, device=device)
        scores, indices = scores.cpu(), indices.cpu()
        _, background, _ = store_background(store, background_anchors, device=device)
    top1, matched = scores[:, 0], [train.paths[i] for i in indices[:, 0].tolist()]
    stats = stats_from_similarities(top1, background, threshold)
    extra = {
        "extractor": extractor.name,
        "train_cache": train.cache,
        "background_rows": len(background),
        "train_files": None if train_files is None else len(train_files),
        "generated_files": None if generated_files is None else len(generated_files),
    }

    if sampling_weights is not None:
        split, extra["sampling_weights"] = _split_by_sampling_weights(
            sampling_weights, folder_files(train_dir, train_files), train.paths, top1, matched, threshold
        )
        stats.update(split)
    if complexity:
        measures = matched_complexity(train_dir, matched)
        correlations = complexity_correlations(top1, measures)
        stats.update(correlations)
        write_complexity(output_dir, generated.paths, matched, top1, measures, correlations)
    if fid is not None:
        result = fid_between_folders(
            train_dir,
            generated_dir,
            real_files=train.paths,
            fake_files=generated.paths,
            feature=fid_network,
            batch_size=fid.get("batch_size", 50),
            num_workers=num_workers,
            device=device,
        )
        stats["fid"] = result.pop("fid")
        extra["fid"] = result
    if clip is not None:
        clip_stats, extra["clip_score"] = _clip_scores(
            clip,
            clip_score,
            generated_dir,
            generated.paths,
            prompts,
            train_dir,
            train.paths,
            num_workers,
            device,
        )
        stats.update(clip_stats)

    write_report(
        output_dir,
        stats,
        generated,
        train,
        scores,
        indices,
        background,
        threshold,
        gallery_size,
        prompts,
        extra=extra,
    )
    log.info(
        f"Replication report in {output_dir}: sim_95pc={stats['sim_95pc']:.4f}, "
        f"sim_gt_thr={stats['sim_gt_thr']:.4f} (threshold {threshold}), bg_95pc={stats['bg_95pc']:.4f}"
    )
    return stats
