"""Replication report of generations against a training set: `python -m src.replicate generated=DIR train=DIR`.

The DCR measurement (somepago/DCR `diff_retrieval.py`, PAPERS.md §1.5, §1.9, §2.8) with any extractor of
conf/extractor/: features of both folders (the training set's cached on disk), exact top-k search of each generation
in the training set, the `sim_*` / `bg_*` statistics, and the report folder written by `src.replication.report`.
"""

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import src.utils  # noqa: F401  (registers the config resolvers)
from src.metrics.replication import stats_from_similarities, train_background
from src.replication.features import cached_folder_features, extract_folder
from src.replication.report import log_report_to_wandb, write_report
from src.replication.search import search_topk
from src.utils.run import print_config_tree, resolve_device, save_metrics

log = logging.getLogger(__name__)


def load_prompts(path, generated_paths: list[str]) -> list[str]:
    """Prompts of the generations: a .json {path relative to the generated folder: prompt} (every generation needs
    one), or a .txt with one prompt per line for the readable generations in sorted order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file '{path}' does not exist (expected a .json or .txt file)")
    if path.suffix == ".json":
        mapping = json.loads(path.read_text())
        missing = [p for p in generated_paths if p not in mapping]
        if missing:
            raise ValueError(f"prompts file '{path}' has no prompt for {len(missing)} generation(s), e.g. {missing[:3]}")
        return [mapping[p] for p in generated_paths]
    lines = path.read_text().splitlines()
    if len(lines) != len(generated_paths):
        raise ValueError(f"prompts file '{path}' has {len(lines)} lines for {len(generated_paths)} readable "
                         "generations; give one line per generation or a .json {relative path: prompt}")
    return lines


def match_generations(generated: torch.Tensor, train: torch.Tensor, k: int, device, chunk: int = 4096):
    """Exact top-k of each generation in the training set, chunk by chunk under a progress bar. (G, k') each."""
    scores, indices = [], []
    train = train.to(device)  # once, not per chunk
    for start in tqdm(range(0, len(generated), chunk), desc="search", unit="chunk"):
        s, i = search_topk(generated[start:start + chunk], train, k=k, device=device)
        scores.append(s.cpu()), indices.append(i.cpu())
    return torch.cat(scores), torch.cat(indices)


def replicate(cfg: DictConfig) -> dict[str, float]:
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    device = resolve_device(cfg.device)
    extractor = hydra.utils.instantiate(cfg.extractor).to(device).eval()
    args = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "device": device}
    train = cached_folder_features(extractor, cfg.train, cfg.cache_dir, OmegaConf.to_container(cfg.extractor,
                                   resolve=True), desc="train features", **args)
    generated = extract_folder(extractor, cfg.generated, desc="generated features", **args)
    prompts = load_prompts(cfg.prompts, generated.paths) if cfg.get("prompts") else None
    if generated.features.shape[1] != train.features.shape[1]:
        raise ValueError(f"generated features {tuple(generated.features.shape)} and train features "
                         f"{tuple(train.features.shape)} differ in dimension: the cache and the extractor disagree")
    scores, indices = match_generations(generated.features, train.features, cfg.k, device)
    background, _ = train_background(train.features)
    stats = stats_from_similarities(scores[:, 0], background, cfg.threshold)
    files = write_report(output_dir, stats, generated, train, scores, indices, background, cfg.threshold,
                         cfg.gallery_size, prompts, extra={"extractor": extractor.name, "train_cache": train.cache})
    save_metrics(stats, output_dir / "metrics.json")
    log_report_to_wandb(files, stats)
    log.info(f"Replication report in {output_dir}: sim_95pc={stats['sim_95pc']:.4f}, "
             f"sim_gt_thr={stats['sim_gt_thr']:.4f} (threshold {cfg.threshold}), bg_95pc={stats['bg_95pc']:.4f}")
    return stats


@hydra.main(version_base="1.3", config_path="../conf", config_name="replicate.yaml")
def main(cfg: DictConfig) -> float:
    return replicate(cfg)["sim_95pc"]


if __name__ == "__main__":
    main()
