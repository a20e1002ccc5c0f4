"""Features of a training set into a feature store: `python -m src.extract source=DIR_OR_TARS store=DIR`.

The store (`src.replication.store`) holds float16 .npy shards and a manifest; parts of the work run as N
processes (torchrun, whose RANK / WORLD_SIZE pick the part) or as SLURM array tasks (`part=` / `parts=`, Hydra's
submitit launcher), each resumable shard by shard. `python -m src.replicate train_store=DIR` searches it.
"""

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

import src.utils  # noqa: F401  (registers the config resolvers)
from src.data.images import read_list
from src.replication.store import extract_store
from src.utils.run import instantiate, print_config_tree, resolve_device

log = logging.getLogger(__name__)


def extract(cfg: DictConfig):
    """The store when this call finished it (None while other parts are still extracting)."""
    print_config_tree(cfg)
    device = resolve_device(cfg.device)
    extractor = instantiate(cfg.extractor).to(device).eval()
    source = OmegaConf.to_container(cfg.source) if OmegaConf.is_list(cfg.source) else cfg.source
    store = extract_store(
        extractor,
        source,
        cfg.store,
        files=read_list(cfg.files, cfg.files_key) if cfg.files else None,
        shard_size=cfg.shard_size,
        dtype=cfg.dtype,
        part=cfg.part,
        parts=cfg.parts,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        extractor_config=OmegaConf.to_container(cfg.extractor, resolve=True),
    )
    if store is not None:
        log.info(f"feature store {cfg.store}: {len(store)} rows x {store.dim} ({store.dtype}), complete")
    return store


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract.yaml")
def main(cfg: DictConfig) -> None:
    extract(cfg)


if __name__ == "__main__":
    main()
