"""Replication statistics of generations against their training set, as the official DCR code computes them.

Follows somepago/DCR `diff_retrieval.py` (docs/replication.md#dcr-measurement): features are L2-normalised and
compared by dot product; each generation's top-1 similarity to the training set gives the `sim_*` statistics,
each training image's similarity to its nearest other training image gives the background `bg_*` statistics.

Statistics exactly as the official code computes them with numpy:
- mean: `np.mean`; std: `np.std`, i.e. the population std (ddof=0), not the sample std;
- percentiles: `np.percentile(x, q)` with numpy's default "linear" interpolation (sorted values v_0..v_{n-1},
  position (n - 1) * q / 100, linear between the two neighbours);
- `sim_gt_thr`: `np.sum(x > thr) / len(x)`, a share in [0, 1] with a STRICT "greater than" (a top-1 similarity
  equal to the threshold does not count). The official key is `sim_gt_05pc` for the fixed threshold 0.5.

Two deliberate differences, both below float32 rounding for normalised features:
- The official background takes the 2nd-largest value of each row of the full train x train matrix
  (`topk(2)[:, -1]`), assuming the largest is the image itself. We exclude the image itself by index, so an
  exact duplicate still counts as similarity 1.0 (as it does in the official code) but a rounding error that
  makes a near-duplicate score above the self-similarity cannot shift the result. We also never build the
  full G x N or N x N matrix (blocked search, `src.metrics.search.search_topk`).
- The statistics are computed in float64 (the official code runs numpy on float32 arrays).
"""

import numpy as np
import torch

from src.metrics.search import as_features, search_topk

PERCENTILES = (75, 90, 95)


def top1_similarities(
    generated, train, chunk_size: int = 1024, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each generation's similarity to its nearest training image (`main_v, main_l` in DCR `diff_retrieval.py`).

    Args:
        generated: (G, D) L2-normalised features, torch or numpy.
        train: (N, D) L2-normalised features.
        chunk_size: generations per score tile (`search_topk`, torch backend).
        device: where the search runs (default: the device of `generated`); the results come back there.

    Returns:
        sims (G,) float, the top-1 cosine similarity, and indices (G,) int64 into `train`.
    """
    generated = as_features(generated, "generated", unit_norm=True)
    train = as_features(train, "train", unit_norm=True)
    if generated.shape[1] != train.shape[1]:
        raise ValueError(
            f"generated features {tuple(generated.shape)} and train features {tuple(train.shape)} have "
            "different dims D: extract both with the same extractor"
        )
    scores, indices = search_topk(generated, train, 1, chunk_size=chunk_size, device=device, backend="torch")
    return scores[:, 0], indices[:, 0]


def train_background(train, chunk_size: int = 1024, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training image's similarity to its nearest OTHER training image (the DCR `bg_v` baseline).

    The image itself is excluded by index, not by value: an exact duplicate elsewhere in the set counts, with
    similarity 1.0.

    Args:
        train: (N, D) L2-normalised features, N >= 2.
        chunk_size: rows per score tile (`search_topk`, torch backend).
        device: where the search runs (default: the device of `train`); the results come back there.

    Returns:
        sims (N,) float and indices (N,) int64 of the nearest other image.
    """
    train = as_features(train, "train", unit_norm=True)
    if train.shape[0] < 2:
        raise ValueError(f"train has {train.shape[0]} image(s): the background needs >= 2 training images")
    scores, indices = search_topk(
        train, train, 1, chunk_size=chunk_size, device=device, exclude_self=True, backend="torch"
    )
    return scores[:, 0], indices[:, 0]


def summary_stats(values, prefix: str) -> dict[str, float]:
    """`{prefix}_mean`, `_std` (ddof=0), `_75pc`, `_90pc`, `_95pc` (numpy linear percentiles) of a 1-D vector."""
    values = torch.as_tensor(values).detach().cpu().double().numpy()
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{prefix} similarities must be a non-empty 1-D vector, got shape {values.shape}")
    out = {f"{prefix}_mean": float(np.mean(values)), f"{prefix}_std": float(np.std(values))}
    for q in PERCENTILES:
        out[f"{prefix}_{q}pc"] = float(np.percentile(values, q))
    return out


def stats_from_similarities(top1, background, threshold: float = 0.5) -> dict[str, float]:
    """The DCR statistics from precomputed similarity vectors (any similarity, not only the dot product).

    Args:
        top1: (G,) each generation's top-1 similarity to the training set.
        background: (N,) each training image's similarity to its nearest other training image.
        threshold: a generation counts in `sim_gt_thr` when its top-1 similarity is STRICTLY greater.

    Returns:
        {sim_mean, sim_std, sim_75pc, sim_90pc, sim_95pc, sim_gt_thr, bg_mean, bg_std, bg_75pc, bg_90pc,
        bg_95pc} as Python floats; see the module docstring for the exact definitions.
    """
    out = summary_stats(top1, "sim")
    top1 = torch.as_tensor(top1).detach().cpu().double()
    out["sim_gt_thr"] = float((top1 > threshold).double().mean())
    out.update(summary_stats(background, "bg"))
    return out


def replication_stats(
    generated, train, threshold: float = 0.5, chunk_size: int = 1024, device=None
) -> dict[str, float]:
    """Replication statistics of generations against a training set, as DCR `diff_retrieval.py` logs them.

    Args:
        generated: (G, D) L2-normalised features of the generations, torch or numpy.
        train: (N, D) L2-normalised features of the training images (same extractor), N >= 2.
        threshold: top-1 similarity above which (strictly) a generation counts as a potential copy; 0.5 with
            SSCD in both papers (docs/replication.md#replication-statistics).
        chunk_size: rows per score tile of the search.
        device: where the searches run (default: the device of each input).

    Returns:
        {sim_mean, sim_std, sim_75pc, sim_90pc, sim_95pc, sim_gt_thr, bg_mean, bg_std, bg_75pc, bg_90pc,
        bg_95pc}: `sim_*` over the G top-1 similarities, `sim_gt_thr` the share of generations above the
        threshold, `bg_*` over the N nearest-other-training-image similarities. `sim_95pc` is the papers'
        headline "Sim" score.
    """
    top1, _ = top1_similarities(generated, train, chunk_size, device)
    background, _ = train_background(train, chunk_size, device)
    return stats_from_similarities(top1, background, threshold)


def upweighted_split_stats(
    top1, matched_weights, min_weight: float, threshold: float = 0.5
) -> dict[str, float]:
    """Top-1 similarities split by whether the matched training image was up-weighted in training.

    The DCR `dup_image` / `dup_both` runs sample 5% of the training images with weight 5 and the rest with weight 1
    (docs/memorization.md#duplication); `diff_retrieval.py` then splits each generation's top-1 similarity by
    `weights[match] > 1` (`weightplot.png`). Here "up-weighted" means a weight above `min_weight`, the
    smallest weight over the whole training set, so weights saved as probabilities or on another scale split
    the same way.

    Args:
        top1: (G,) each generation's top-1 similarity to the training set.
        matched_weights: (G,) the sampling weight of each generation's top-1 training image.
        min_weight: the smallest sampling weight of the training set (not only of the matched images).
        threshold: the `_gt_thr` share counts similarities STRICTLY above it, as `sim_gt_thr`.

    Returns:
        {sim_upweighted_count, _mean, _95pc, _gt_thr} and the same for `sim_not_upweighted_`: the number of
        generations whose match is (not) up-weighted and their top-1 statistics (numpy mean, linear 95th
        percentile, share above the threshold); NaN statistics for an empty group.
    """
    top1 = torch.as_tensor(top1).detach().cpu().double().numpy()
    weights = torch.as_tensor(matched_weights).detach().cpu().double().numpy()
    if top1.ndim != 1 or weights.shape != top1.shape:
        raise ValueError(
            f"top1 {top1.shape} and matched_weights {weights.shape} must be 1-D vectors of the same length"
        )
    if top1.size == 0:
        raise ValueError("top1 is empty: the up-weighted split needs >= 1 generation")
    if (weights < min_weight).any():
        raise ValueError(
            f"matched weight {weights.min()} is below min_weight={min_weight}: pass the training set's smallest weight"
        )
    upweighted = weights > min_weight
    out = {}
    for name, values in (("upweighted", top1[upweighted]), ("not_upweighted", top1[~upweighted])):
        empty = values.size == 0
        out[f"sim_{name}_count"] = int(values.size)
        out[f"sim_{name}_mean"] = float("nan") if empty else float(np.mean(values))
        out[f"sim_{name}_95pc"] = float("nan") if empty else float(np.percentile(values, 95))
        out[f"sim_{name}_gt_thr"] = float("nan") if empty else float(np.mean(values > threshold))
    return out
