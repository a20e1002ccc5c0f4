"""Image folder -> L2-normalised features, skipping (and listing) unreadable files, with an on-disk cache.

The DCR code re-extracts the whole training set for every analysis (somepago/DCR `diff_retrieval.py`). Here the
training-set features are cached under `cache_dir`, keyed by a hash of the folder's content (sorted relative
paths, sizes and modification times), the extractor's `name` and its config: a second analysis against the same
folder extracts nothing, while another extractor or another version of the folder (a file added, removed,
rewritten or touched) gets a new key and is never served a stale cache.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.images import UnreadableImage, list_images, load_rgb
from src.data.multilabel import collate_skip_none
from src.data.retrieval import RetrievalImageDataset

log = logging.getLogger(__name__)

# Bump when the cached file layout or the extraction changes, so old caches are not read.
CACHE_VERSION = 1


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
    extractor, folder, batch_size: int = 32, num_workers: int = 0, device="cpu", desc: str | None = None
) -> FolderFeatures:
    """Extract features of every image under `folder` (recursive, `list_images`) with a progress bar.

    Each image goes through `extractor.transform()` then `extractor(...)`. Unreadable files (corrupt, truncated,
    unsupported mode) are skipped, logged and listed in `.skipped`. Raises FileNotFoundError naming the folder and
    the extensions searched when the folder is missing or holds no image, and RuntimeError when none is readable.
    """
    folder = Path(folder)
    files = list_images(folder)
    relative = [f.relative_to(folder).as_posix() for f in files]
    loader = DataLoader(
        RetrievalImageDataset(folder, relative, extractor.transform()),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
    )
    rows, chunks = [], []
    for batch in tqdm(loader, desc=desc or f"features {folder.name}", unit="batch"):
        if "image" in batch:
            features = extractor(batch["image"].to(device)).float().cpu()
            if features.ndim != 2:
                raise ValueError(
                    f"{extractor.name} gives features of shape {tuple(features.shape)}; the replication "
                    "report needs global (B, D) descriptors (token features are not supported here)"
                )
            chunks.append(features)
            rows.extend(batch["index"].tolist())
    skipped = [
        {"path": relative[i], "reason": _unreadable_reason(files[i])}
        for i in sorted(set(range(len(files))) - set(rows))
    ]
    if not chunks:
        raise RuntimeError(
            f"none of the {len(files)} image files under '{folder}' is readable: {skipped[:3]}"
        )
    paths = [files[i].relative_to(folder).as_posix() for i in rows]
    return FolderFeatures(str(folder), paths, torch.cat(chunks), skipped)


def _unreadable_reason(path: Path) -> str:
    """Why `load_rgb` rejects a file (read again for the few skipped files only, to list the reason in the report)."""
    try:
        load_rgb(path)
    except UnreadableImage as error:
        return error.reason
    return "unreadable while extracting"


def cache_key(folder, extractor_name: str, extractor_config: dict | None = None) -> str:
    """sha256 of (sorted relative paths, sizes, mtimes in ns) of the folder's images + extractor name + config."""
    folder = Path(folder)
    content = [
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in list_images(folder)
    ]
    blob = json.dumps(
        [CACHE_VERSION, extractor_name, extractor_config or {}, content], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_folder_features(
    extractor, folder, cache_dir, extractor_config: dict | None = None, **extract_kwargs
) -> FolderFeatures:
    """`extract_folder`, read from / written to `cache_dir/<extractor name>_<key>.pt` (see `cache_key`).

    `cache_dir=None` switches the cache off. `.cache` of the result says "hit" or "miss".
    """
    if cache_dir is None:
        return extract_folder(extractor, folder, **extract_kwargs)
    key = cache_key(folder, extractor.name, extractor_config)
    path = Path(cache_dir) / f"{extractor.name}_{key[:24]}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            log.info(
                f"Feature cache hit: {path} ({len(saved['paths'])} images of '{folder}', nothing extracted)"
            )
            return FolderFeatures(
                str(folder), saved["paths"], saved["features"], saved["skipped"], cache="hit"
            )
        log.warning(f"Feature cache {path} holds another key (hash prefix collision); re-extracting")
    result = extract_folder(extractor, folder, **extract_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(
        ".tmp"
    )  # write then rename, so an interrupted run never leaves a half-written cache
    torch.save(
        {"key": key, "paths": result.paths, "features": result.features, "skipped": result.skipped}, tmp
    )
    tmp.replace(path)
    log.info(f"Feature cache written: {path}")
    result.cache = "miss"
    return result
