"""Replication report of generations against a training set: `python -m src.replicate generated=DIR train=DIR`
(or `train_store=STORE`, a feature store of the training set extracted beforehand, `python -m src.extract`).

The DCR measurement (somepago/DCR `diff_retrieval.py`, docs/replication.md#dcr-measurement) with any extractor
of conf/extractor/, done by `src.replication.analysis.analyse_replication`: this entry instantiates the
extractor, reads the optional file lists, calls it with the config's options, and saves metrics.json and the
W&B log.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import src.utils  # noqa: F401  (registers the config resolvers)
from src.data.images import read_list
from src.replication.analysis import analyse_replication
from src.replication.report import log_report_to_wandb
from src.utils.run import claim_run_dir, instantiate, print_config_tree, resolve_device, save_metrics

log = logging.getLogger(__name__)


def _switched_on(node) -> dict | None:
    """An optional extra's options without its `enabled` switch, or None when it is off."""
    options = OmegaConf.to_container(node, resolve=True)
    return options if options.pop("enabled") else None


def replicate(cfg: DictConfig) -> dict[str, float]:
    output_dir = Path(cfg.paths.output_dir)
    claim_run_dir(output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    if cfg.train is None and cfg.train_store is None:
        raise ValueError(
            "give train=<image folder>, or train_store=<feature store folder> (python -m src.extract) for a "
            "training set extracted beforehand"
        )
    device = resolve_device(cfg.device)
    extractor = instantiate(cfg.extractor).to(device).eval()
    stats = analyse_replication(
        extractor,
        cfg.generated,
        cfg.train,
        output_dir,
        train_files=read_list(cfg.train_files, cfg.train_files_key) if cfg.train_files else None,
        k=cfg.k,
        threshold=cfg.threshold,
        gallery_size=cfg.gallery_size,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        cache_dir=cfg.cache_dir,
        extractor_config=OmegaConf.to_container(cfg.extractor, resolve=True),
        prompts=cfg.prompts,
        sampling_weights=cfg.sampling_weights,
        complexity=cfg.complexity,
        fid=_switched_on(cfg.fid),
        clip_score=_switched_on(cfg.clip_score),
        train_store=cfg.train_store,
        background_anchors=cfg.background_anchors,
    )
    save_metrics(stats, output_dir / "metrics.json")
    log_report_to_wandb(output_dir, stats)
    return stats


@hydra.main(version_base="1.3", config_path="../conf", config_name="replicate.yaml")
def main(cfg: DictConfig) -> float:
    return replicate(cfg)["sim_95pc"]


if __name__ == "__main__":
    main()
