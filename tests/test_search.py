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


# ---- bf16 products, exact re-ranking, a proof per query ---------------------------------------------------------------
def bf16_scores(query, database, bf16_output=True):
    """What the bf16 pass computes: the bf16 roundings' products accumulated in float32 (rounded to bf16 on the
    CPU)."""
    scores = query.bfloat16().float() @ database.bfloat16().float().T
    return scores.bfloat16().float() if bf16_output else scores


def test_bf16_score_bound_holds_on_adversarial_and_random_vectors():
    # Adversarial: every entry just below a bf16 rounding midpoint, all products positive: both roundings lose
    # almost u per entry, in the same direction, so the error approaches 2u |q| |x|.
    dim = 256
    v = (1 + 2.0**-8 - 2.0**-20) / 16  # rounds down to 1/16 in bf16
    worst = torch.full((1, dim), v)
    error = (bf16_scores(worst, worst) - (worst.double() @ worst.double().T)).abs().item()
    bound = search.bf16_score_bound(dim, bf16_output=True)
    relative = error / worst.double().norm().item() ** 2
    assert 1.9 * 2.0**-8 < relative <= bound  # the bound is met and nearly reached (2u of its 3u)
    # Random and near-tied vectors: measured errors stay inside, the float32-output bound too.
    query, database = features(64, 512, seed=3), features(2000, 512, seed=4)
    database[1000:] = database[:1000] + 1e-4 * features(1000, 512, seed=5)  # near-ties
    exact = query.double() @ database.double().T
    norms = query.double().norm(dim=1)[:, None] * database.double().norm(dim=1)[None, :]
    for bf16_output in (True, False):
        measured = ((bf16_scores(query, database, bf16_output).double() - exact).abs() / norms).max().item()
        assert measured <= search.bf16_score_bound(512, bf16_output)
    assert search.bf16_score_bound(512, False) < search.bf16_score_bound(512, True) < 0.012
    with pytest.raises(ValueError, match="dim must be"):
        search.bf16_score_bound(0, True)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_bf16_rerank_equals_float32_search(k, exclude_self):
    query, database = features(300, 64, seed=6), features(3000, 64, seed=7)
    if exclude_self:
        query = database
    expected = search_topk(
        query, database, k, database_chunk_size=700, exclude_self=exclude_self, backend="torch"
    )
    scores, indices, stats = search.bf16_rerank_topk(
        query, database, k, chunk_size=128, database_chunk_size=700, exclude_self=exclude_self
    )
    assert torch.equal(indices, expected[1])
    assert (scores - expected[0]).abs().max() <= 1e-6 and scores.dtype == torch.float32
    assert stats["queries"] == len(query) and stats["candidates"] == search.default_candidates(k)
    assert stats["recomputed"] < len(query) // 4  # most queries are proven from their candidates
    # through search_topk at the default tiles: float32's answer at those tiles (float32's own order of two
    # scores within its rounding can depend on the tile shape)
    via_search = search_topk(query, database, k, exclude_self=exclude_self, precision="bf16_rerank")
    float32 = search_topk(query, database, k, exclude_self=exclude_self, precision="float32")
    assert torch.equal(via_search[1], float32[1])


def test_a_wrong_bf16_neighbour_is_caught_and_recomputed():
    # Plant two rows whose true scores differ by less than the bf16 error, in the order bf16 gets wrong.
    normalize = torch.nn.functional.normalize
    generator = torch.Generator().manual_seed(8)
    query = features(1, 128, seed=9)
    base = normalize(0.1 * query + features(1, 128, seed=10), dim=1)  # scores ~0.1
    for _ in range(10_000):
        other = normalize(base + 3e-4 * torch.randn(1, 128, generator=generator), dim=1)
        pair = torch.cat([base, other])
        true = (query.double() @ pair.double().T)[0]
        wrong = bf16_scores(query, pair)[0]
        if (true[1] - true[0]) > 1e-4 and wrong[0] > wrong[1]:
            break
    else:
        raise AssertionError("no planted pair found")
    others = features(50, 128, seed=11)
    others = normalize(others - (others @ query.T) * query, dim=1)  # orthogonal to the query: scores ~0
    database = torch.cat([others, pair])  # the pair are the two best rows: 50, 51
    assert bf16_scores(query, database).argmax().item() == 50  # bf16 alone picks the wrong neighbour
    # With one candidate the bf16 winner is the only one kept: its proof fails, float32 answers.
    scores, indices, stats = search.bf16_rerank_topk(query, database, 1, candidates=1)
    assert indices.item() == 51 and stats["unproven"] == 1 and stats["recomputed"] == 1
    # With the default candidates both are kept and the exact re-scoring orders them.
    scores, indices, stats = search.bf16_rerank_topk(query, database, 1)
    assert indices.item() == 51 and stats["recomputed"] == 0
    assert scores.item() == pytest.approx(true[1].item(), abs=1e-7)


def test_bf16_near_ties_and_duplicates_get_float32s_answer():
    database = features(400, 32, seed=12)
    database = torch.cat([database, database[:50], database[:50] + 1e-8])  # exact and near-exact duplicates
    query = features(80, 32, seed=13)
    query[:50] = database[:50]
    expected = search_topk(query, database, 3, database_chunk_size=100, backend="torch")
    scores, indices, stats = search.bf16_rerank_topk(query, database, 3, database_chunk_size=100)
    assert torch.equal(indices, expected[1]) and torch.equal(scores[:50], expected[0][:50])
    assert stats["near_ties"] >= 50 and stats["recomputed"] >= 50
    # exclude_self on a set with copies: the queries searched again keep excluding their own row
    expected = search_topk(database, database, 2, exclude_self=True, backend="torch")
    _, indices, stats = search.bf16_rerank_topk(database, database, 2, exclude_self=True)
    assert torch.equal(indices, expected[1]) and stats["recomputed"] > 0
    assert (indices != torch.arange(len(database))[:, None]).all()


def test_bf16_float64_inputs_and_small_databases():
    query, database = QUERY.double(), DATABASE.double()
    scores, indices, stats = search.bf16_rerank_topk(query, database, 4)
    expected = brute_force(query, database, 4)
    assert scores.dtype == torch.float64 and torch.equal(indices, expected[1])
    assert torch.allclose(scores, expected[0], atol=1e-12)
    # every row a candidate: nothing is left out, so every query is proven
    _, indices, stats = search.bf16_rerank_topk(QUERY, DATABASE[:10], 3, candidates=50)
    assert stats["candidates"] == 10 and stats["unproven"] == 0
    assert torch.equal(indices, brute_force(QUERY, DATABASE[:10], 3)[1])


def test_precision_auto_and_bad_precision_options(monkeypatch):
    calls = []
    real = (
        search._bf16_rerank
    )  # the bf16 path search_topk takes (bf16_rerank_topk checks inputs, then calls it)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "_bf16_rerank", spy)
    monkeypatch.setattr(search, "bf16_is_native", lambda device: False)
    search_topk(QUERY, DATABASE, 2, precision="auto")
    assert not calls  # no native bf16: float32
    monkeypatch.setattr(search, "bf16_is_native", lambda device: True)
    search_topk(QUERY, DATABASE, 2, precision="auto")
    assert not calls  # too small to gain: float32
    monkeypatch.setattr(search, "AUTO_BF16_MIN_PRODUCTS", 1)
    _, indices = search_topk(QUERY, DATABASE, 2, precision="auto")
    assert len(calls) == 1 and torch.equal(indices, brute_force(QUERY, DATABASE, 2)[1])
    search_topk(QUERY, DATABASE, search.AUTO_BF16_MAX_K + 1, precision="auto")
    assert len(calls) == 1  # many neighbours: float32
    with pytest.raises(ValueError, match="precision must be one of"):
        search_topk(QUERY, DATABASE, precision="bf16")
    with pytest.raises(ValueError, match="half=False"):
        search_topk(QUERY, DATABASE, precision="bf16_rerank", half=True)
    with pytest.raises(ValueError, match="candidates must be >= k = 5"):
        search.bf16_rerank_topk(QUERY, DATABASE, 5, candidates=2)
    assert isinstance(search.bf16_is_native("cpu"), bool)
