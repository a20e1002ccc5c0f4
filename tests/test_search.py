"""Tests for src/replication/search.py: blocked and faiss top-k equal brute force; split-product by hand."""

import math

import pytest
import torch

import src.replication.search as search
from src.replication import faiss_topk, search_topk, split_product_similarity


def features(rows: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=1)


QUERY, DATABASE = features(45, 16, seed=0), features(203, 16, seed=1)


def brute_force(query, database, k, exclude_self=False):
    full = query @ database.T  # (Q, N)
    if exclude_self:
        full.fill_diagonal_(float("-inf"))
    top = full.topk(k, dim=1)
    return top.values, top.indices


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("chunk_size, database_chunk_size", [(1, 1), (7, 5), (64, 33), (1000, 10_000)])
def test_blocked_search_equals_brute_force(k, chunk_size, database_chunk_size):
    expected_scores, expected_indices = brute_force(QUERY, DATABASE, k)
    scores, indices = search_topk(
        QUERY, DATABASE, k, chunk_size=chunk_size, database_chunk_size=database_chunk_size, backend="torch"
    )
    assert torch.equal(indices, expected_indices)
    assert (scores - expected_scores).abs().max() <= 1e-6
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64


@pytest.mark.parametrize("database_chunk_size", [1, 10, 64, 10_000])
def test_exclude_self_equals_brute_force(database_chunk_size):
    expected_scores, expected_indices = brute_force(DATABASE, DATABASE, 4, exclude_self=True)
    scores, indices = search_topk(
        DATABASE, DATABASE, 4, chunk_size=17, database_chunk_size=database_chunk_size, exclude_self=True
    )
    assert torch.equal(indices, expected_indices)
    assert (scores - expected_scores).abs().max() <= 1e-6


def test_exclude_self_keeps_exact_duplicates():
    database = torch.cat([DATABASE[:10], DATABASE[:1]])  # row 10 duplicates row 0
    for backend in ("torch", "faiss"):
        scores, indices = search_topk(database, database, 1, exclude_self=True, backend=backend)
        assert indices[0, 0] == 10 and indices[10, 0] == 0, backend
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-6) and scores[10, 0] == pytest.approx(1.0, abs=1e-6)
        assert (indices[:, 0] != torch.arange(len(database))).all()


def test_exclude_self_with_three_copies():
    # With three equal rows, the row itself may tie with or trail its copies; it is excluded by index anyway.
    database = torch.cat([DATABASE[:1].repeat(3, 1), DATABASE[1:6]])
    for backend in ("torch", "faiss"):
        scores, indices = search_topk(database, database, 2, exclude_self=True, backend=backend)
        for row in range(3):
            assert sorted(indices[row].tolist()) == sorted({0, 1, 2} - {row}), backend
            assert scores[row].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_k_is_clipped_to_the_candidates():
    scores, indices = search_topk(QUERY, DATABASE[:5], k=50)
    assert scores.shape == indices.shape == (45, 5)
    scores, _ = search_topk(DATABASE[:5], DATABASE[:5], k=50, exclude_self=True, database_chunk_size=2)
    assert scores.shape == (5, 4) and torch.isfinite(scores).all()


def test_faiss_equals_torch():
    for exclude_self in (False, True):
        query = DATABASE if exclude_self else QUERY
        expected_scores, expected_indices = search_topk(query, DATABASE, 5, exclude_self=exclude_self)
        scores, indices = faiss_topk(query, DATABASE, 5, exclude_self=exclude_self)
        assert torch.equal(indices, expected_indices)
        assert (scores - expected_scores).abs().max() <= 1e-6
        scores, indices = search_topk(query, DATABASE, 5, exclude_self=exclude_self, backend="faiss")
        assert torch.equal(indices, expected_indices)


def test_auto_backend_uses_faiss_for_large_databases(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return faiss_topk(*args, **kwargs)

    monkeypatch.setattr(search, "faiss_topk", spy)
    search_topk(QUERY, DATABASE, 2)
    assert not calls  # 203 rows < FAISS_MIN_DATABASE: torch
    monkeypatch.setattr(search, "FAISS_MIN_DATABASE", 100)
    search_topk(QUERY, DATABASE, 2)
    assert len(calls) == 1
    search_topk(QUERY, DATABASE, 2, half=True)  # half storage is a torch-backend feature
    assert len(calls) == 1


def test_half_storage_is_within_1e3():
    expected_scores, expected_indices = brute_force(QUERY, DATABASE, 3)
    scores, indices = search_topk(QUERY, DATABASE, 3, chunk_size=8, database_chunk_size=50, half=True)
    assert scores.dtype == torch.float32
    assert (scores - expected_scores).abs().max() <= 1e-3
    # Ranks can only swap between near-ties: where the top-1 leads the runner-up by > 2e-3, it is the same.
    clear = (expected_scores[:, 0] - expected_scores[:, 1]) > 2e-3
    assert clear.sum() > 30 and torch.equal(indices[clear, 0], expected_indices[clear, 0])


def test_float64_and_numpy_inputs():
    query, database = QUERY.double(), DATABASE.double()
    expected_scores, expected_indices = brute_force(query, database, 2)
    scores, indices = search_topk(query.numpy(), database.numpy(), 2, chunk_size=10, database_chunk_size=30)
    assert scores.dtype == torch.float64
    assert torch.equal(indices, expected_indices) and torch.allclose(scores, expected_scores, atol=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(45, 16\).*\(203, 8\)"):
        search_topk(QUERY, DATABASE[:, :8])
    with pytest.raises(ValueError, match="exclude_self.*differ in rows"):
        search_topk(QUERY, DATABASE, exclude_self=True)
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        search_topk(DATABASE[:1], DATABASE[:1], exclude_self=True)
    with pytest.raises(ValueError, match="database .* has no candidates"):
        search_topk(QUERY, DATABASE[:0])
    with pytest.raises(ValueError, match="backend must be one of"):
        search_topk(QUERY, DATABASE, backend="annoy")
    with pytest.raises(ValueError, match="half=True"):
        search_topk(QUERY, DATABASE, half=True, backend="faiss")
    with pytest.raises(ValueError, match="index must be 'flat'"):
        faiss_topk(QUERY, DATABASE, 1, index="hnsw")
    with pytest.raises(ValueError, match="query has non-finite values \\(first in row 3\\)"):
        bad = QUERY.clone()
        bad[3, 0] = float("nan")
        search_topk(bad, DATABASE)


def split_product_by_loop(query_tokens, database_tokens):
    """Direct per-token computation: global L2 normalisation, then max over positions of token dot products."""
    out = torch.zeros(len(query_tokens), len(database_tokens), dtype=torch.float64)
    for i, q in enumerate(query_tokens.double()):
        q = q / q.flatten().norm()
        for j, v in enumerate(database_tokens.double()):
            v = v / v.flatten().norm()
            out[i, j] = max(float((q[t] * v[t]).sum()) for t in range(q.shape[0]))
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_split_product_equals_per_token_loop(chunk_size):
    generator = torch.Generator().manual_seed(3)
    query_tokens = torch.randn(7, 5, 6, generator=generator) * 3  # raw, unnormalised tokens
    database_tokens = torch.randn(11, 5, 6, generator=generator)
    sims = split_product_similarity(query_tokens, database_tokens, chunk_size=chunk_size)
    assert sims.shape == (7, 11) and sims.dtype == torch.float32
    assert torch.allclose(sims.double(), split_product_by_loop(query_tokens, database_tokens), atol=1e-6)


def test_split_product_normalises_globally_not_per_token():
    # T = 2, D = 2. The query (1, 0 | 0, 0) has norm 1; the database image (1, 0 | 0, 5) has norm sqrt(26).
    # Position 0: 1 * 1 / sqrt(26); position 1: 0. Per-token normalisation would give 1 at position 0.
    query = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    database = torch.tensor([[[1.0, 0.0], [0.0, 5.0]]])
    assert split_product_similarity(query, database).item() == pytest.approx(1 / math.sqrt(26), abs=1e-7)
    # One token: the split-product is the dot product of L2-normalised global descriptors.
    sims = split_product_similarity(QUERY[:, None, :] * 2, DATABASE[:, None, :])
    assert torch.allclose(sims, QUERY @ DATABASE.T, atol=1e-6)


def test_split_product_bad_inputs():
    with pytest.raises(ValueError, match=r"differ in \(T, D\)"):
        split_product_similarity(torch.randn(2, 5, 6), torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match="query_tokens must be a floating-point \\(rows, T, D\\)"):
        split_product_similarity(torch.randn(2, 30), torch.randn(3, 5, 6))
    with pytest.raises(ValueError, match="database_tokens row 1 has norm 0.0"):
        split_product_similarity(
            torch.randn(2, 5, 6), torch.cat([torch.randn(1, 5, 6), torch.zeros(1, 5, 6)])
        )


def test_metrics_and_replication_import_in_either_order():
    """src.metrics.replication uses src.replication.search; neither package may import the other at init time."""
    import subprocess
    import sys

    for first, second in (("src.metrics", "src.replication"), ("src.replication", "src.metrics")):
        code = f"import {first}, {second}, src.replication.analysis, src.benchmarks.replication_search"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
