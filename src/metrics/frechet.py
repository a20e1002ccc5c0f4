"""Fréchet distance between two feature sets, the formula of FID (docs/replication.md#dcr-measurement).

Folder-level FID (the Inception network, DCR's preprocessing, image folders) is `src.replication.fid`.
"""

import logging

import numpy as np
import torch
from scipy import linalg

log = logging.getLogger(__name__)


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, as pytorch-fid `calculate_frechet_distance`
    (DCR `metrics/fid.py`): mean and `np.cov` (ddof=1) of each, scipy `sqrtm` of S_a S_b, `eps` added to the
    diagonals when the product is singular.

    Args:
        features_a: (N, D) features, N >= 2. features_b: (M, D) features, M >= 2.
    """
    a = np.asarray(torch.as_tensor(features_a).detach().cpu().double())
    b = np.asarray(torch.as_tensor(features_b).detach().cpu().double())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"frechet_distance needs two (rows >= 2, D) feature sets of the same D, got {a.shape} and {b.shape}"
        )
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        log.warning(f"frechet_distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(len(sigma_a)) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real  # rounding can leave a tiny imaginary part
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))
