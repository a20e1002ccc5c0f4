"""Tests for src/metrics/replication.py: hand-computed DCR statistics, the background, thresholds, errors."""

import math

import numpy as np
import pytest
import torch

from src.metrics import replication_stats
from src.metrics.replication import stats_from_similarities, top1_similarities, train_background

# Training set in 2-D: e_x, e_y, -e_x and (0.6, 0.8).
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
# Generations: (0.8, 0.6) is nearest to train 3 (0.48 + 0.48 = 0.96); (-0.6, -0.8) to train 2 (0.6);
# (1, 0) is an exact copy of train 0 (1.0).
GENERATED = torch.tensor([[0.8, 0.6], [-0.6, -0.8], [1.0, 0.0]], dtype=torch.float64)


def normalized(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def test_top1_and_background_by_hand():
    sims, indices = top1_similarities(GENERATED, TRAIN)
    assert indices.tolist() == [3, 2, 0]
    assert sims.tolist() == pytest.approx([0.96, 0.6, 1.0], abs=1e-12)

    # Nearest OTHER training image: train 0 -> train 3 (0.6), train 1 -> train 3 (0.8),
    # train 2 -> train 1 (0.0, ahead of -0.6 and -1), train 3 -> train 1 (0.8).
    bg, bg_indices = train_background(TRAIN)
    assert bg_indices.tolist() == [3, 3, 1, 1]
    assert bg.tolist() == pytest.approx([0.6, 0.8, 0.0, 0.8], abs=1e-12)


def test_replication_stats_by_hand():
    stats = replication_stats(GENERATED, TRAIN, threshold=0.5)
    # top1 = 24/25, 3/5, 1: mean 64/75; deviations 8/75, -19/75, 11/75 -> population variance 546/5625 / 3,
    # std sqrt(182)/75 (the sample std, ddof=1, would be sqrt(273)/75 = 0.2203).
    # Sorted 0.6, 0.96, 1.0; numpy linear percentile at position 2q/100: 75 -> 1.5 -> 0.98, 90 -> 1.8 ->
    # 0.992, 95 -> 1.9 -> 0.996.
    # Background 0.6, 0.8, 0.0, 0.8: mean 0.55, deviations 0.05, 0.25, -0.55, 0.25 -> variance 0.43 / 4,
    # std sqrt(43)/20; sorted 0, 0.6, 0.8, 0.8 -> positions 2.25, 2.7, 2.85 all land between the two 0.8s.
    expected = {
        "sim_mean": 64 / 75,
        "sim_std": math.sqrt(182) / 75,
        "sim_75pc": 0.98,
        "sim_90pc": 0.992,
        "sim_95pc": 0.996,
        "sim_gt_thr": 1.0,
        "bg_mean": 0.55,
        "bg_std": math.sqrt(43) / 20,
        "bg_75pc": 0.8,
        "bg_90pc": 0.8,
        "bg_95pc": 0.8,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-12), key
        assert isinstance(stats[key], float)


def test_threshold_is_strictly_greater():
    # 1.0 (the exact copy) is not > 1.0; 0.96 and 1.0 are > 0.9; all three are > 0.
    assert replication_stats(GENERATED, TRAIN, threshold=1.0)["sim_gt_thr"] == 0.0
    assert replication_stats(GENERATED, TRAIN, threshold=0.9)["sim_gt_thr"] == pytest.approx(2 / 3)
    assert replication_stats(GENERATED, TRAIN, threshold=0.0)["sim_gt_thr"] == 1.0
    # A similarity equal to the threshold does not count (official: np.sum(x0 > 0.5) / len(x0)).
    stats = stats_from_similarities(torch.tensor([0.5, 0.75, 0.25, 0.5]), torch.tensor([0.1, 0.2]), 0.5)
    assert stats["sim_gt_thr"] == 0.25


def test_exact_duplicates_in_train_give_background_one():
    train = torch.cat([TRAIN, TRAIN[:1], TRAIN[:1]])  # rows 0, 4, 5 are the same image
    bg, indices = train_background(train)
    assert bg[[0, 4, 5]].tolist() == [1.0, 1.0, 1.0]
    assert all(indices[i].item() in {0, 4, 5} - {i} for i in (0, 4, 5))  # another copy, never itself
    assert (indices != torch.arange(len(train))).all()
    assert replication_stats(GENERATED, train)["bg_95pc"] == 1.0


def test_matches_the_official_full_matrix_computation():
    """Random features: equal to DCR `diff_retrieval.py` (full matrices, topk(2)[:, -1], numpy statistics)."""
    generated, train = normalized(37, 16, seed=0), normalized(53, 16, seed=1)
    sim = train @ generated.T  # (N, G), as in the official code
    x0 = sim.T.topk(1, dim=1).values[:, 0].numpy()
    x1 = (train @ train.T).topk(2, dim=1).values[:, -1].numpy()
    official = {"sim_gt_thr": np.sum(x0 > 0.5) / x0.shape[0]}
    for prefix, x in (("sim", x0), ("bg", x1)):
        official[f"{prefix}_mean"], official[f"{prefix}_std"] = np.mean(x), np.std(x)
        for q in (75, 90, 95):
            official[f"{prefix}_{q}pc"] = np.percentile(x, q)
    ours = replication_stats(generated, train, threshold=0.5, chunk_size=5)
    assert set(ours) == set(official)
    for key, value in official.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-6), key
    # numpy input gives the same result.
    assert replication_stats(generated.numpy(), train.numpy(), chunk_size=5) == ours


def test_background_matches_brute_force_excluding_the_diagonal():
    train = normalized(41, 8, seed=2)
    full = train @ train.T
    full.fill_diagonal_(float("-inf"))
    expected = full.max(dim=1)
    for chunk_size in (1, 7, 100):
        sims, indices = train_background(train, chunk_size=chunk_size)
        assert torch.equal(indices, expected.indices)
        assert torch.allclose(sims, expected.values, atol=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 3\)"):
        replication_stats(GENERATED, torch.nn.functional.normalize(torch.randn(4, 3), dim=1))
    with pytest.raises(ValueError, match="generated is empty"):
        replication_stats(torch.zeros(0, 2), TRAIN)
    with pytest.raises(ValueError, match="train is empty"):
        replication_stats(GENERATED, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="needs >= 2 training images"):
        replication_stats(GENERATED, TRAIN[:1])
    with pytest.raises(ValueError, match="train row 1 has L2 norm 2.0000.*normalize"):
        replication_stats(GENERATED, TRAIN * torch.tensor([[1.0], [2.0], [1.0], [1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="generated has non-finite values"):
        replication_stats(torch.full((2, 2), float("nan")), TRAIN)
    with pytest.raises(ValueError, match="2-D"):
        replication_stats(GENERATED[0], TRAIN)
    with pytest.raises(ValueError, match="floating-point"):
        replication_stats(GENERATED.long(), TRAIN)


def test_statistics_run_on_the_device_asked_for():
    on_cpu = replication_stats(GENERATED.numpy(), TRAIN.numpy(), device="cpu")
    assert on_cpu == replication_stats(GENERATED, TRAIN)
    sims, _ = train_background(TRAIN, device="cpu")
    assert sims.device.type == "cpu"
