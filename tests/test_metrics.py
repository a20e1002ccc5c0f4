"""Tests for src/metrics/retrieval.py: the CSD metric definitions on hand-worked cases, chunking, errors."""

import math

import numpy as np
import pytest
import torch

from src.metrics import retrieval_metrics, retrieval_topk
from src.metrics.retrieval import count_relevant, hit_matrix, metrics_from_hits, per_label_precision


def toy_example():
    """docs/style.md#metric-definitions toy example: three queries whose top-5 hit patterns are [0,1,0,1,0],
    [0]*5 and [1]*5.

    Database item i is the basis vector e_i and every query is (5, 4, 3, 2, 1), so every query ranks the
    database as items 0, 1, 2, 3, 4. Labels (A, B, C): items 1 and 3 carry A, every item carries C, none
    carries B; the queries carry A, B and C.
    """
    database = torch.eye(5)
    query = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]).repeat(3, 1)
    database_labels = torch.tensor([[0, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    query_labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    return query, database, query_labels, database_labels


def test_toy_example_matches_official_definitions():
    query, database, query_labels, database_labels = toy_example()
    _, indices = retrieval_topk(query, database, k=5)
    expected_hits = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(hit_matrix(query_labels, database_labels, indices), expected_hits)

    m = retrieval_metrics(query, database, query_labels, database_labels, ks=(1, 5))
    # Row 1: P@1..5 = 0, 1/2, 1/3, 2/4, 2/5 -> mean 0.34667; row 2: 0; row 3: 1.
    row1 = (0 + 1 / 2 + 1 / 3 + 2 / 4 + 2 / 5) / 5
    assert row1 == pytest.approx(0.347, abs=1e-3)
    assert m["mAP@5"] == pytest.approx((row1 + 0 + 1) / 3, abs=1e-9)
    assert m["mAP@5"] == pytest.approx(0.4489, abs=1e-4)
    assert m["recall@5"] == pytest.approx(2 / 3)
    # MRR quirk: averaged only over the two queries with a hit (ranks 2 and 1), not over all three.
    assert m["MRR@5"] == pytest.approx((1 / 2 + 1) / 2)
    # mAP@1 == P@1 == recall@1 (only query 3 hits at rank 1).
    assert m["mAP@1"] == pytest.approx(1 / 3)
    assert m["recall@1"] == m["mAP@1"]
    assert m["MRR@1"] == pytest.approx(1.0)
    # Standard AP: row 1 = (1/2 + 2/4) / min(5, 2 relevant) = 0.5; row 2 has no relevant item -> 0; row 3 = 1.
    assert m["standardAP@5"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["standardAP@1"] == pytest.approx(1 / 3)


def test_mrr_is_zero_when_no_query_hits():
    query, database, query_labels, database_labels = toy_example()
    m = retrieval_metrics(query[1:2], database, query_labels[1:2], database_labels, ks=(1, 5))
    assert m == {
        "mAP@1": 0.0,
        "recall@1": 0.0,
        "MRR@1": 0.0,
        "standardAP@1": 0.0,
        "mAP@5": 0.0,
        "recall@5": 0.0,
        "MRR@5": 0.0,
        "standardAP@5": 0.0,
    }


def test_k_larger_than_database_is_clipped():
    query, database, query_labels, database_labels = toy_example()
    m = retrieval_metrics(query, database, query_labels, database_labels, ks=(5, 100))
    for name in ("mAP", "recall", "MRR", "standardAP"):
        assert m[f"{name}@100"] == m[f"{name}@5"]
    scores, indices = retrieval_topk(query, database, k=100)
    assert scores.shape == indices.shape == (3, 5)


def reference_metrics(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, float]:
    """Per-query Python loops over the ranked hits, written straight from the definitions."""
    maps, recalls, rrs, aps = [], [], [], []
    for row, n_rel in zip(hits, n_relevant, strict=True):
        row = row[:k]
        precisions = [row[: i + 1].sum() / (i + 1) for i in range(len(row))]
        maps.append(sum(precisions) / len(row))
        recalls.append(float(row.any()))
        if row.any():
            rrs.append(1.0 / (int(np.argmax(row)) + 1))
        relevant_precisions = [p for p, h in zip(precisions, row, strict=True) if h]
        aps.append(sum(relevant_precisions) / min(len(row), n_rel) if n_rel > 0 else 0.0)
    return {
        f"mAP@{k}": float(np.mean(maps)),
        f"recall@{k}": float(np.mean(recalls)),
        f"MRR@{k}": float(np.mean(rrs)) if rrs else 0.0,
        f"standardAP@{k}": float(np.mean(aps)),
    }


def random_problem(seed=0, n_query=23, n_database=57, dim=8, n_labels=6):
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    database = torch.nn.functional.normalize(torch.randn(n_database, dim, generator=g), dim=1)
    # Multi-hot with ~30% density, so some rows have several labels and a few have none.
    query_labels = torch.rand(n_query, n_labels, generator=g) < 0.3
    database_labels = torch.rand(n_database, n_labels, generator=g) < 0.3
    return query, database, query_labels, database_labels


def test_matches_loop_reference_on_random_data():
    query, database, query_labels, database_labels = random_problem()
    ks = (1, 3, 10)
    m = retrieval_metrics(query, database, query_labels, database_labels, ks=ks)

    order = np.argsort(-(query @ database.T).numpy(), axis=1)
    shared = (query_labels.float() @ database_labels.float().T).numpy() > 0  # (Q, N) brute force relevance
    hits = np.take_along_axis(shared, order, axis=1)
    n_relevant = shared.sum(axis=1)
    for k in ks:
        for key, value in reference_metrics(hits, n_relevant, k).items():
            assert m[key] == pytest.approx(value, abs=1e-12), key
    assert torch.equal(count_relevant(query_labels, database_labels), torch.from_numpy(n_relevant))


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunking_does_not_change_results(chunk_size):
    query, database, query_labels, database_labels = random_problem(seed=1)
    full = retrieval_metrics(query, database, query_labels, database_labels, chunk_size=len(query))
    chunked = retrieval_metrics(query, database, query_labels, database_labels, chunk_size=chunk_size)
    assert chunked == full
    scores_a, idx_a = retrieval_topk(query, database, 10, chunk_size=chunk_size)
    scores_b, idx_b = retrieval_topk(query, database, 10, chunk_size=len(query))
    assert torch.equal(idx_a, idx_b)
    # Scores may differ in the last bit: BLAS blocks a 1-row product differently from a 23-row one.
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-6)


def test_numpy_and_half_inputs():
    query, database, query_labels, database_labels = random_problem(seed=2)
    expected = retrieval_metrics(query, database, query_labels, database_labels)
    from_numpy = retrieval_metrics(
        query.numpy(), database.numpy(), query_labels.numpy(), database_labels.numpy().astype(np.int64)
    )
    assert from_numpy == expected
    # float16 embeddings (as the official code stores them) are upcast and still work on CPU.
    from_half = retrieval_metrics(
        query.half(), database.half().numpy(), query_labels, database_labels.float()
    )
    assert set(from_half) == set(expected)


def test_values_in_unit_interval_and_keys():
    query, database, query_labels, database_labels = random_problem(seed=3)
    m = retrieval_metrics(query, database, query_labels, database_labels, ks=(1, 10, 100))
    assert set(m) == {f"{n}@{k}" for n in ("mAP", "recall", "MRR", "standardAP") for k in (1, 10, 100)}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())
    assert m["mAP@1"] == m["recall@1"]


def test_bad_shapes_raise_clear_errors():
    query, database, query_labels, database_labels = random_problem()
    with pytest.raises(
        ValueError, match=r"query \(23, 8\) and database \(57, 7\) have different feature dims"
    ):
        retrieval_metrics(query, database[:, :7], query_labels, database_labels)
    with pytest.raises(ValueError, match=r"query_labels \(23, 6\) and database_labels \(57, 5\)"):
        retrieval_metrics(query, database, query_labels, database_labels[:, :5])
    with pytest.raises(ValueError, match=r"query \(23, 8\) and query_labels \(22, 6\) differ in rows"):
        retrieval_metrics(query, database, query_labels[:22], database_labels)
    with pytest.raises(ValueError, match=r"database \(57, 8\) and database_labels \(50, 6\) differ in rows"):
        retrieval_metrics(query, database, query_labels, database_labels[:50])
    with pytest.raises(ValueError, match="one_hot"):
        retrieval_metrics(query, database, torch.zeros(23, dtype=torch.long), database_labels)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_topk(query[0], database, 5)
    with pytest.raises(TypeError, match="list"):
        retrieval_topk(query.tolist(), database, 5)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(query, database, query_labels, database_labels, ks=(0, 5))


def test_metrics_from_hits_validates():
    with pytest.raises(ValueError, match=r"n_relevant must be \(Q,\)"):
        metrics_from_hits(torch.zeros(3, 4, dtype=torch.bool), torch.zeros(2))


def test_per_label_precision_hand_worked():
    query, database, query_labels, database_labels = toy_example()
    _, indices = retrieval_topk(query, database, k=5)
    # P@5 per query: 2/5, 0, 1; each query carries one label (A, B, C).
    assert per_label_precision(query_labels, database_labels, indices, k=5) == pytest.approx(
        {0: 0.4, 1: 0.0, 2: 1.0}
    )
    # A query with labels {A, C} counts towards both labels; label C's mean is then over two queries.
    two_labels = torch.cat([query_labels, torch.tensor([[1, 0, 1]], dtype=torch.bool)])
    indices = torch.cat([indices, indices[:1]])
    result = per_label_precision(two_labels, database_labels, indices, k=2)
    assert result == pytest.approx({0: (0.5 + 1.0) / 2, 1: 0.0, 2: (1.0 + 1.0) / 2})
    with pytest.raises(ValueError, match="K >= k"):
        per_label_precision(query_labels, database_labels, indices[:, :2], k=5)


def test_count_relevant_unlabelled_query():
    database_labels = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    query_labels = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    assert count_relevant(query_labels, database_labels).tolist() == [0, 2, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    query, database, query_labels, database_labels = random_problem(seed=4, n_query=300, n_database=2000)
    cpu = retrieval_metrics(query, database, query_labels, database_labels, chunk_size=64)
    gpu = retrieval_metrics(
        query.cuda(), database.cuda(), query_labels.cuda(), database_labels, chunk_size=64
    )
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        assert math.isclose(gpu[key], cpu[key], abs_tol=1e-6), key


def test_count_relevant_over_several_row_blocks():
    # With 2**21 labels the per-label count reads 2 database rows per block, so 5 rows span 3 blocks.
    n_labels = 2**21
    database_labels = torch.zeros(5, n_labels, dtype=torch.bool)
    database_labels[[0, 1, 2, 3, 4], [7, 7, 9, 7, n_labels - 1]] = True
    database_labels[1, 9] = True
    query_labels = torch.zeros(4, n_labels, dtype=torch.bool)
    query_labels[[0, 1, 2, 3], [7, 9, n_labels - 1, 3]] = True
    query_labels[3, 9] = True  # a two-label query: {3, 9}
    brute = (query_labels.float() @ database_labels.float().T > 0).sum(dim=1)  # (Q,)
    assert count_relevant(query_labels, database_labels).tolist() == brute.tolist() == [3, 2, 1, 2]
