"""Embed image files with an extractor, batch by batch: the one loop that retrieval evaluation (`src.evaluate`)
and the replication features (`src.replication.features`) share."""

import torch

from src.data.images import image_batches


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
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features of the readable images `root / paths[i]`, each through `extractor.transform()` then `extractor`.

    `project` (e.g. a fitted PCA) is applied to each batch's features, so that only its output is held.
    Unreadable files are logged and skipped. Returns (features (M, D) float32 on the CPU, indices into `paths`
    of the M readable images (M,), number of files skipped); RuntimeError when no image is readable.
    """
    chunks, rows = [], []
    for images, index in image_batches(root, paths, extractor.transform(), batch_size, num_workers, desc):
        features = extractor(images.to(device)).float().cpu()
        chunks.append(features if project is None else project(features))
        rows.append(index)
    if not chunks:
        raise RuntimeError(f"none of the {len(paths)} image files under '{root}' is readable ({desc})")
    indices = torch.cat(rows)
    return torch.cat(chunks), indices, len(paths) - len(indices)
