"""Tests for src/metrics/search.py: blocked and faiss top-k equal brute force, ties, the feature check."""

import numpy as np
import pytest
import torch

import src.metrics.search as search
from src.metrics.search import as_features, faiss_topk, search_topk


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
    with pytest.raises(ValueError, match="query has non-finite values \\(first in row 3\\)"):
        bad = QUERY.clone()
        bad[3, 0] = float("nan")
        search_topk(bad, DATABASE)


def test_ties_follow_torch_topk_in_one_block_and_earlier_blocks_first():
    # Integer-valued features with duplicated rows: many exactly equal scores.
    generator = torch.Generator().manual_seed(5)
    database = torch.randint(-2, 3, (60, 3), generator=generator).float()
    database = torch.cat([database, database[:20]])
    query = database[:30]
    for chunk_size in (7, 1000):
        scores, indices = search_topk(query, database, 9, chunk_size=chunk_size, database_chunk_size=None)
        expected = (query @ database.T).topk(9, dim=1)
        assert torch.equal(scores, expected.values) and torch.equal(indices, expected.indices)
    # One row per block: equal scores come in database order.
    same = torch.ones(6, 4)
    _, indices = search_topk(same[:2], same, 4, database_chunk_size=1, backend="torch")
    assert indices.tolist() == [[0, 1, 2, 3]] * 2
    _, indices = search_topk(same, same, 3, database_chunk_size=1, exclude_self=True, backend="torch")
    assert indices[0].tolist() == [1, 2, 3] and indices[4].tolist() == [0, 1, 2]


def test_as_features_checks_unit_norm_only_when_asked():
    raw = np.full((3, 4), 2.0, dtype=np.float32)
    assert torch.equal(as_features(raw, "raw"), torch.from_numpy(raw))
    with pytest.raises(ValueError, match="raw row 0 has L2 norm 4.0000.*normalize"):
        as_features(raw, "raw", unit_norm=True)
    with pytest.raises(ValueError, match="empty is empty"):
        as_features(torch.zeros(0, 4), "empty", unit_norm=True)
    with pytest.raises(TypeError, match="list"):
        as_features([[1.0]], "rows")


def test_the_engine_is_reachable_from_its_public_paths():
    from src.metrics import retrieval_topk
    from src.replication.search import search_topk as replication_search_topk

    assert replication_search_topk is search_topk
    scores, indices = retrieval_topk(QUERY, DATABASE, 3)
    assert torch.equal(indices, brute_force(QUERY, DATABASE, 3)[1])
