"""ROC statistics of a membership inference attack (docs/attacks.md#newer-membership-inference-attacks).

Scores: higher means "member". A threshold s calls every image with score >= s a member; the ROC curve runs
over all distinct scores, so tied scores move together (no randomised tie-breaking). The AUC is the
Mann-Whitney statistic P(member score > non-member score) + 1/2 P(equal), which equals the trapezoidal area
under that curve. TPR at a target FPR is the best TPR among the operating points whose FPR does not exceed the
target (no interpolation), as low-FPR reporting asks (Carlini et al. 2023,
docs/attacks.md#cifar-10-and-membership-inference).
"""

import numpy as np
import torch

TARGET_FPRS = {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}


def as_scores(scores, name: str) -> np.ndarray:
    """A 1-D float64 array of finite scores; ValueError naming `name` otherwise."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError(f"{name}: no scores")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name}: {int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return scores


def count_at_least(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the (ascending) scores are >= each threshold."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of every threshold at a distinct score, from (0, 0) to (1, 1), FPR non-decreasing."""
    members = np.sort(as_scores(member_scores, "member_scores"))
    nonmembers = np.sort(as_scores(nonmember_scores, "nonmember_scores"))
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    tpr = count_at_least(members, thresholds) / members.size
    fpr = count_at_least(nonmembers, thresholds) / nonmembers.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def auc_score(members: np.ndarray, sorted_nonmembers: np.ndarray) -> float:
    """Mann-Whitney AUC: share of (member, non-member) pairs ranked right, ties counted 1/2."""
    below = np.searchsorted(sorted_nonmembers, members, side="left")
    not_above = np.searchsorted(sorted_nonmembers, members, side="right")
    wins = below.sum() + 0.5 * (not_above - below).sum()
    return float(wins / (members.size * sorted_nonmembers.size))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR among operating points with FPR <= target (the (0, 0) point is always one)."""
    return float(tpr[fpr <= target + 1e-12].max())


def point_estimates(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """AUC and TPR at each target FPR of one sample of scores."""
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    out = {"auc": auc_score(member_scores, np.sort(nonmember_scores))}
    for key, target in TARGET_FPRS.items():
        out[key] = tpr_at_fpr(fpr, tpr, target)
    return out


def bootstrap_intervals(members: np.ndarray, nonmembers: np.ndarray, bootstrap: int, seed: int) -> dict:
    """95% percentile intervals of the AUC and of TPR at 1% FPR, members and non-members resampled
    independently with replacement `bootstrap` times."""
    rng = np.random.default_rng(seed)
    draws = {"auc": [], "tpr@1%fpr": []}
    for _ in range(bootstrap):
        m = members[rng.integers(0, members.size, members.size)]
        n = nonmembers[rng.integers(0, nonmembers.size, nonmembers.size)]
        estimates = point_estimates(m, n)
        for key in draws:
            draws[key].append(estimates[key])
    return {f"{key}_ci": np.percentile(values, [2.5, 97.5]).tolist() for key, values in draws.items()}


def roc_summary(member_scores, nonmember_scores, bootstrap: int = 1000, seed: int = 0) -> dict:
    """AUC, TPR at 1% and 0.1% FPR, counts and bootstrap 95% intervals of a membership attack's scores.

    Keys: `auc`, `tpr@1%fpr`, `tpr@0.1%fpr`, `num_members`, `num_nonmembers`, `fpr_resolution`
    (1 / num_nonmembers, the smallest FPR step), `tpr@0.1%fpr_meaningful`, and with `bootstrap` > 0 `auc_ci`
    and `tpr@1%fpr_ci` ([low, high], 2.5th and 97.5th percentiles; `bootstrap=0` leaves them out; `seed` seeds
    the resampling). TPR at 0.1% FPR is meaningful only with at least 1,000 non-members: with fewer, the only
    operating point at FPR <= 0.1% is the one with no false positive at all, and the flag is False.
    """
    members = as_scores(member_scores, "member_scores")
    nonmembers = as_scores(nonmember_scores, "nonmember_scores")
    if bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap}: must be >= 0 (0 switches the intervals off)")
    summary = point_estimates(members, nonmembers)
    summary.update(
        {
            "num_members": int(members.size),
            "num_nonmembers": int(nonmembers.size),
            "fpr_resolution": 1.0 / nonmembers.size,
            "tpr@0.1%fpr_meaningful": bool(nonmembers.size >= 1000),
        }
    )
    if bootstrap:
        summary.update(bootstrap_intervals(members, nonmembers, bootstrap, seed))
    return summary
