"""Image folder -> L2-normalised features, skipping (and listing) unreadable files, with an on-disk cache.

The DCR code re-extracts the whole training set for every analysis (somepago/DCR `diff_retrieval.py`). Here the
training-set features are cached under `cache_dir` as a float32 feature store (`src.replication.store`), keyed by a hash of the images read (relative paths, sizes and
modification times), the extractor's `name` and config, and the content of its weights (`state_digest`: every
parameter and buffer, wherever they were loaded from): a second analysis against the same folder extracts nothing,
while another extractor, other weights behind the same checkpoint path (a run's `last.ckpt` during and after
training) or another version of the folder (a file added, removed, rewritten or touched) gets a new key and is
never served a stale cache. `files=` restricts a folder to listed images (a training subset of a
larger folder, e.g. 300 of the 30,000 CelebA-HQ images, docs/memorization.md#ddpm-on-nested-subsets); the key
then covers exactly those files, so a subset and the whole folder never share a cache.
"""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.data.images import folder_files
from src.replication.store import (
    MANIFEST,
    FeatureStore,
    StoreError,
    extract_store,
    extract_unit,
    source_units,
    store_key,
)
from src.utils.checkpoints import state_digest

log = logging.getLogger(__name__)


@dataclass
class FolderFeatures:
    """Features of the readable images of a folder.

    paths: relative paths (str, sorted as `list_images` lists them) of the M readable images.
    features: (M, D) float32 L2-normalised features, row i for paths[i].
    skipped: one {"path", "reason"} per unreadable file (path relative to the folder).
    cache: "hit", "miss" (extracted, then written) or "off" (no cache used).
    """

    folder: str
    paths: list[str]
    features: torch.Tensor
    skipped: list[dict] = field(default_factory=list)
    cache: str = "off"


@torch.no_grad()
def extract_folder(
    extractor,
    folder,
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    desc: str | None = None,
    files: list[str] | None = None,
) -> FolderFeatures:
    """Extract features of every image under `folder` (recursive, `list_images`), or of the listed `files` only
    (paths relative to `folder`, see `folder_files`), with a progress bar.

    Each image goes through `extractor.transform()` then `extractor(...)`. Unreadable files (corrupt, truncated,
    unsupported mode) are skipped, logged and listed in `.skipped`. Raises FileNotFoundError naming the folder and
    the extensions searched when the folder is missing or holds no image (or naming the listed files that do not
    exist), and RuntimeError when none is readable.
    """
    folder = Path(folder)
    relative = folder_files(folder, files)
    desc = desc or f"features {folder.name}"
    features, paths, skipped = extract_unit(
        extractor, folder, relative, "folder", batch_size, num_workers, device, desc
    )
    if features is None:
        raise RuntimeError(f"none of the {len(relative)} image files under '{folder}' is readable ({desc})")
    if skipped:
        log.warning(f"{len(skipped)} of {len(relative)} files under '{folder}' are unreadable and skipped")
    return FolderFeatures(str(folder), paths, features, skipped)


def cache_key(
    folder,
    extractor_name: str,
    extractor_config: dict | None = None,
    files: list[str] | None = None,
    weights: str = "",
) -> str:
    """The cache's store key (`src.replication.store.store_key`, float32): sha256 over (relative path, size, mtime
    in ns) of each image read (`folder_files(folder, files)`: the sorted folder listing, or the listed files in
    their order), the extractor's name and config and `weights` (the extractor's `state_digest`)."""
    description, _ = source_units(folder, files)
    return store_key(description, extractor_name, extractor_config, weights, "float32")


def cached_folder_features(
    extractor,
    folder,
    cache_dir,
    extractor_config: dict | None = None,
    files: list[str] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    desc: str | None = None,
) -> FolderFeatures:
    """`extract_folder` through a float32 feature store `cache_dir/<extractor name>_<key>/` (see `cache_key` and
    `src.replication.store`): read when it holds this key, written (or resumed shard by shard after an
    interruption) otherwise; a store whose files no longer match its manifest is deleted and written again.

    `files` restricts the folder to the listed relative paths (see `folder_files`). `cache_dir=None` switches the
    cache off. `.cache` of the result says "hit" or "miss".
    """
    if cache_dir is None:
        return extract_folder(extractor, folder, batch_size, num_workers, device, desc, files)
    key = cache_key(folder, extractor.name, extractor_config, files, weights=state_digest(extractor))
    path = Path(cache_dir) / f"{extractor.name}_{key[:24]}"
    cache = "miss"
    if (path / MANIFEST).is_file():
        try:
            store = FeatureStore(path)
            cache = "hit" if store.key == key else "miss"
            if cache == "miss":
                log.warning(f"Feature cache {path} holds another key (hash prefix collision); re-extracting")
        except StoreError as error:
            log.warning(f"{error} Re-extracting and writing it again.")
        if cache == "miss":
            shutil.rmtree(path)
    if cache == "miss":
        store = extract_store(
            extractor,
            folder,
            path,
            files=files,
            dtype="float32",
            part=0,
            parts=1,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            extractor_config=extractor_config,
        )
        log.info(f"Feature cache written: {path}")
    else:
        log.info(f"Feature cache hit: {path} ({len(store)} images of '{folder}', nothing extracted)")
    return FolderFeatures(str(folder), list(store.paths), store.features(), store.skipped, cache=cache)
