"""Tests for src/metrics/extraction.py: distances equal plain loops, the tiled maximum, shape errors, a planted
clique, hand-worked adaptive scores, the nearest training image; and the benchmark at tiny sizes."""

import math

import numpy as np
import pytest
import torch

from benchmarks import extraction_distance
from src.metrics.extraction import (
    adaptive_extraction_score,
    clique_summary,
    max_clique,
    nearest_training,
    normalized_l2,
    tiled_l2,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(count: int, shape=(3, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))


def loop_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised l2 of every pair, one pair at a time, in float64."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = ((a[i].double() - b[j].double()) ** 2).mean().sqrt()
    return out


def loop_tiled_l2(a: torch.Tensor, b: torch.Tensor, grid) -> torch.Tensor:
    """Tiled l2 of every pair: the largest normalised l2 over the tiles, one tile at a time, in float64."""
    rows, columns = grid
    height, width = a.shape[2] // rows, a.shape[3] // columns
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            for r in range(rows):
                for c in range(columns):
                    window = (
                        slice(None),
                        slice(r * height, (r + 1) * height),
                        slice(c * width, (c + 1) * width),
                    )
                    tile = ((a[i][window].double() - b[j][window].double()) ** 2).mean().sqrt()
                    out[i, j] = max(out[i, j], tile)
    return out


# ---- distances -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid, shape", [((4, 4), (3, 8, 8)), ((2, 2), (3, 8, 8)), ((2, 3), (1, 8, 12))])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_tiled_l2_equals_a_loop_over_pairs_and_tiles(device, grid, shape, chunk):
    a, b = images(5, shape, seed=0), images(7, shape, seed=1)
    got = tiled_l2(a.to(device), b.to(device), grid, chunk=chunk)
    assert got.shape == (5, 7) and got.device.type == device and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), loop_tiled_l2(a, b, grid), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 2, 256])
def test_normalized_l2_equals_a_loop(device, chunk):
    a, b = images(5, seed=0), images(7, seed=1)
    got = normalized_l2(a.to(device), b.to(device), chunk=chunk)
    assert got.shape == (5, 7) and got.device.type == device
    torch.testing.assert_close(got.cpu().double(), loop_l2(a, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("distance", [normalized_l2, tiled_l2])
def test_distances_of_a_set_to_itself_are_symmetric_with_zero_diagonal(distance):
    x = images(9)
    within = distance(x, x)
    torch.testing.assert_close(within, within.T, atol=1e-5, rtol=0)
    assert torch.equal(within.diagonal(), torch.zeros(9))  # `b is a`: exact zeros
    # Against a copy the diagonal comes from the float32 expansion: near 0, not exactly 0.
    assert distance(x, x.clone()).diagonal().max() < 1e-3


def test_tiled_l2_is_the_largest_tile_distance():
    x = images(1, (3, 32, 32))
    y = x.clone()
    y[0, :, 8:16, 24:32] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))  # tile (1, 3)
    tile = ((x[0, :, 8:16, 24:32] - y[0, :, 8:16, 24:32]) ** 2).mean().sqrt()
    torch.testing.assert_close(tiled_l2(x, y)[0, 0], tile, atol=1e-5, rtol=0)
    # Over the whole image the same squared error is spread over 16 times as many values.
    torch.testing.assert_close(normalized_l2(x, y)[0, 0], tile / 4, atol=1e-5, rtol=0)


def test_bad_shapes_are_refused_with_sizes_and_grid():
    with pytest.raises(ValueError, match=r"10 x 8 pixels do not split into a 4 x 4 grid"):
        tiled_l2(torch.rand(2, 3, 10, 8), torch.rand(2, 3, 10, 8))
    with pytest.raises(ValueError, match=r"8 x 8 pixels do not split into a 3 x 2 grid"):
        tiled_l2(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), grid=(3, 2))
    with pytest.raises(ValueError, match=r"a \(2, 3, 8, 8\) and b \(2, 3, 8, 16\) differ in \(C, H, W\)"):
        tiled_l2(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 16))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) images, got a \(2, 64\)"):
        tiled_l2(torch.rand(2, 64), torch.rand(2, 64))
    with pytest.raises(ValueError, match=r"a \(2, 3, 4, 4\) and b \(2, 3, 4, 5\) differ in values per image"):
        normalized_l2(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5))
    with pytest.raises(TypeError, match="floating-point pixels"):
        normalized_l2(torch.zeros(2, 4, dtype=torch.uint8), torch.rand(2, 4))


# ---- cliques ---------------------------------------------------------------------------------------------
def planted_points(seed: int = 0):
    """62 points of 16 values: 50 uniform random ones and 12 copies of one point with 1e-3 noise, shuffled.
    Returns (points (62, 1, 4, 4), sorted planted indices)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(62, 1, 4, 4, generator=g)
    points[50:] = points[50] + 1e-3 * torch.randn(12, 1, 4, 4, generator=g)
    order = torch.randperm(62, generator=g)
    planted = sorted(torch.nonzero(order >= 50).flatten().tolist())
    return points[order], planted


def test_max_clique_recovers_a_planted_clique():
    points, planted = planted_points()
    distances = normalized_l2(points, points)
    inside = distances[planted][:, planted]
    outside = distances + torch.diag(torch.full((62,), math.inf))  # every pair but a point with itself
    outside = outside[~torch.isin(torch.arange(62), torch.tensor(planted))]
    assert inside.max() < 0.05 < outside.min()  # the threshold lies between the two scales
    assert max_clique(distances, 0.05) == planted


def test_clique_summary_flags_the_planted_clique_at_each_threshold():
    points, planted = planted_points()
    distances = normalized_l2(points, points)
    rows = clique_summary(distances, [1e-9, 0.05, 2.0], min_clique_size=10)
    assert [row["edge_threshold"] for row in rows] == [1e-9, 0.05, 2.0]
    none, found, everything = rows
    assert none["clique"] == [0] and none["clique_size"] == 1 and math.isnan(none["mean_distance"])
    assert not none["flagged"]
    assert found["clique"] == planted and found["clique_size"] == 12 and found["flagged"] and found["exact"]
    upper = torch.triu_indices(12, 12, 1)
    expected_mean = distances[planted][:, planted][upper[0], upper[1]].double().mean().item()
    assert found["mean_distance"] == pytest.approx(expected_mean, rel=1e-6)
    assert everything["clique_size"] == 62 and everything["flagged"]
    assert not clique_summary(distances, [0.05], min_clique_size=13)[0]["flagged"]


def test_max_clique_breaks_ties_by_mean_distance_then_lowest_indices():
    # Two triangles, {0, 1, 2} at distance 0.3 and {3, 4, 5} at 0.1; vertex 6 isolated.
    distances = np.full((7, 7), 9.0)
    distances[np.ix_([0, 1, 2], [0, 1, 2])] = 0.3
    distances[np.ix_([3, 4, 5], [3, 4, 5])] = 0.1
    np.fill_diagonal(distances, 0.0)
    assert max_clique(distances, 0.5) == [3, 4, 5]
    distances[np.ix_([3, 4, 5], [3, 4, 5])] = 0.3  # equal means: the lowest indices win
    assert max_clique(torch.tensor(distances), 0.5) == [0, 1, 2]
    assert max_clique(distances, 0.01) == [0]  # no edges: every vertex is a clique of size 1
    assert max_clique(np.zeros((0, 0)), 0.1) == []
    with pytest.raises(ValueError, match=r"square \(N, N\) matrix, got shape \(2, 3\)"):
        max_clique(np.zeros((2, 3)), 0.1)


def test_clique_search_past_its_limit_says_so():
    distances = np.zeros((6, 6))
    distances[0, 5] = distances[5, 0] = 1.0  # two maximal cliques: without 0 and without 5
    assert max_clique(distances, 0.5, limit=2) == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="more than 1 maximal cliques at edge_threshold 0.5"):
        max_clique(distances, 0.5, limit=1)
    (row,) = clique_summary(distances, [0.5], min_clique_size=3, limit=1)
    assert not row["exact"] and row["clique_size"] == 5 and row["flagged"]


# ---- nearest training images -----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_score_by_hand(device):
    # One-pixel images, so that normalised l2 is |a - b|; dyadic values, exact in float32.
    train = torch.tensor([0.0, 0.125, 0.5, 0.875], device=device).reshape(4, 1, 1, 1)
    generated = torch.tensor([0.1875, 0.8125], device=device).reshape(2, 1, 1, 1)
    # g = 0.1875: distances 0.1875, 0.0625, 0.3125, 0.6875; the 3 nearest 0.0625 (index 1), 0.1875, 0.3125,
    #   mean 0.1875: score 0.0625 / (0.5 * 0.1875) = 2/3.
    # g = 0.8125: distances 0.8125, 0.6875, 0.3125, 0.0625; the 3 nearest 0.0625 (index 3), 0.3125, 0.6875,
    #   mean 1.0625 / 3: score 0.0625 / (0.5 * 1.0625 / 3) = 6/17.
    scores, nearest, nearest_l2 = adaptive_extraction_score(generated, train, alpha=0.5, n=3)
    assert scores.device.type == device
    torch.testing.assert_close(scores.cpu(), torch.tensor([2 / 3, 6 / 17]), atol=1e-6, rtol=0)
    assert nearest.tolist() == [1, 3] and nearest_l2.tolist() == [0.0625, 0.0625]
    # n = 2: means 0.125 and 0.1875: scores 1 (on the threshold: not extracted) and 2/3.
    scores, _, _ = adaptive_extraction_score(generated, train, n=2)
    torch.testing.assert_close(scores.cpu(), torch.tensor([1.0, 2 / 3]), atol=1e-6, rtol=0)
    # n = 50 is clipped to the 4 training images: means 1.25 / 4 and 1.875 / 4: scores 0.4 and 4/15.
    scores, _, _ = adaptive_extraction_score(generated, train, n=50, train_chunk=3)
    torch.testing.assert_close(scores.cpu(), torch.tensor([0.4, 4 / 15]), atol=1e-6, rtol=0)
    assert torch.equal(scores, adaptive_extraction_score(generated, train, n=4)[0])


def test_adaptive_score_of_an_exact_copy_is_zero_and_bad_arguments_are_refused():
    train = torch.tensor([0.5, 0.5, 1.0]).reshape(3, 1, 1, 1)
    scores, nearest, nearest_l2 = adaptive_extraction_score(train[:1], train, n=2)
    assert scores.tolist() == [0.0] and nearest_l2.tolist() == [0.0] and nearest.item() in (0, 1)
    with pytest.raises(ValueError, match="alpha must be > 0 and n >= 1"):
        adaptive_extraction_score(train, train, alpha=0.0)
    with pytest.raises(ValueError, match="train is empty"):
        nearest_training(train, train[:0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk, train_chunk", [(1, 1), (4, 5), (256, 65_536)])
def test_nearest_training_is_the_argmin_of_a_loop(device, chunk, train_chunk):
    generated, train = images(11, (3, 4, 4), seed=2), images(23, (3, 4, 4), seed=3)
    expected = loop_l2(generated, train).min(dim=1)
    l2, index = nearest_training(generated.to(device), train.to(device), chunk=chunk, train_chunk=train_chunk)
    assert l2.device.type == device and index.tolist() == expected.indices.tolist()
    torch.testing.assert_close(l2.cpu().double(), expected.values, atol=1e-5, rtol=0)


# ---- benchmark -------------------------------------------------------------------------------------------


def test_extraction_distance_benchmark_table(capsys, quiet_cpu):
    argv = ["--generations", "12", "--size", "16", "--loop-pairs", "20", "--repeats", "1", "--threads", "1"]
    argv.append("--in-process")  # fresh processes would take seconds each
    rows = extraction_distance.main(argv)
    assert [row["variant"] for row in rows] == ["batched", "loop", "matmul"]
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["loop"]["x_loop"] == 1.0 and by_variant["loop"]["measured_pairs"] == 20
    assert by_variant["batched"]["measured_pairs"] == by_variant["matmul"]["measured_pairs"] == 144
    assert by_variant["loop"]["max_diff"] < 1e-5
    assert all(row["pairs_per_s"] > 0 and row["peak_mib"] >= 0 for row in rows)
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("variant"))) :]
    assert [line.split("  ")[0].strip() for line in table[1:4]] == [
        "tiled_l2 batched",
        "per-pair loop EXTRAPOLATED",
        "matmul bound (torch.mm)",
    ]


def test_extraction_distance_benchmark_rejects_a_grid_that_does_not_divide():
    with pytest.raises(SystemExit):
        extraction_distance.parse_args(["--size", "16", "--grid", "3", "3"])
    with pytest.raises(SystemExit):
        extraction_distance.parse_args(["--generations", "0"])
