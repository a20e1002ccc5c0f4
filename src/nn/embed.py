"""Embed image files with an extractor, batch by batch: the one loop that retrieval evaluation (`src.evaluate`)
and the replication features (`src.replication.features`) share; with `regions`, each image's sub-regions too
(docs/replication.md#region-matching)."""

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.images import ImageListDataset, ImageRegionsDataset, collate_skip_none


@torch.no_grad()
def embed_images(
    extractor,
    root,
    paths: list[str],
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    desc: str = "images",
    project=None,
    regions: tuple[tuple[float, ...], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features of the readable images `root / paths[i]`, each through `extractor.transform()` then `extractor`.

    `project` (e.g. a fitted PCA) is applied to each batch's features, so that only its output is held.
    `regions` = (scales, grid): features (M, 1 + R, D) of each whole image and its R `region_boxes` crops (a
    batch of `batch_size` images then runs (1 + R) x batch_size crops through the extractor).
    Unreadable files are logged and skipped. Returns (features (M, D) float32 on the CPU, indices into `paths`
    of the M readable images (M,), number of files skipped); RuntimeError when no image is readable.
    """
    if regions:
        dataset = ImageRegionsDataset(root, paths, extractor.transform(), *regions)
    else:
        dataset = ImageListDataset(root, paths, extractor.transform())
    features, indices = embed_dataset(extractor, dataset, batch_size, num_workers, device, desc, project)
    if features is None:
        raise RuntimeError(f"none of the {len(paths)} image files under '{root}' is readable ({desc})")
    return features, indices, len(paths) - len(indices)


@torch.no_grad()
def embed_dataset(
    extractor, dataset, batch_size=32, num_workers=0, device="cpu", desc="images", project=None
):
    """(features (M, D) float32 on the CPU, indices (M,) of the readable items) of a dataset whose items are
    {"image", "index"} or None (unreadable, dropped by `collate_skip_none`), under a progress bar; features are
    None when no item is readable. Items of several images each ((R, C, H, W), `ImageRegionsDataset`) give
    features (M, R, D)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none)
    chunks, rows = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        if "image" not in batch:
            continue
        images = batch["image"].to(device)
        shape = images.shape[:-3]  # (B,) or (B, R)
        features = extractor(images.flatten(0, -4)).float().cpu()
        features = features if project is None else project(features)
        chunks.append(features.reshape(*shape, features.shape[-1]))
        rows.append(batch["index"])
    if not chunks:
        return None, torch.zeros(0, dtype=torch.long)
    return torch.cat(chunks), torch.cat(rows)
