"""Exact top-k inner-product search in bounded memory: the one nearest-neighbour engine of the project.

Retrieval metrics (`src.metrics.retrieval`), the replication statistics (`src.metrics.replication`) and the
replication report search with it. The DCR code builds the full G x N similarity matrix (and the N x N train matrix)
on the GPU (somepago/DCR `diff_retrieval.py`), which does not fit for LAION-scale training sets. Here:

- `search_topk(backend="torch")`: blocked matrix products on CPU or GPU. The database is cut into blocks and the
  queries into chunks; each (chunk, block) score tile is reduced to its top k and merged into a running top k,
  so peak extra memory is one chunk_size x database_chunk_size tile plus the (Q, k) results. `half=True`
  stores the database in float16 (half the memory); on CUDA the products take float16 inputs and accumulate
  into float32 outputs, on CPU (where float16 matmul is slow) each block is upcast to float32 once.
- `faiss_topk` (`backend="faiss"`): faiss.IndexFlatIP, exact inner-product search with faiss's own blocked
  BLAS + heap loop (bounded memory too), on CPU.
- `bf16_rerank_topk` (`precision="bf16_rerank"`): the same blocked search in bfloat16 keeps k + m candidates per
  query, re-scores them exactly, and proves per query that no other database row can enter the top k (the bound
  of `bf16_score_bound`, derived in docs/replication.md#exact-search-at-bf16-speed); queries without the proof,
  or whose re-scored top k holds a near-tie that float32's own rounding decides, are searched again in float32.

- `region_topk`: region matching (docs/replication.md#region-matching): features of each image and its regions,
  an image pair scored by its best whole-to-region match, with the same engine.

Scores are inner products: pass L2-normalised features for cosine similarity. `as_features` is the one check of
feature matrices for every function of `src.metrics`.
"""

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
# backend="auto" hands CPU float32 searches over databases at least this large to faiss (when installed).
FAISS_MIN_DATABASE = 50_000
# How far from 1 a row's L2 norm may be before `as_features(unit_norm=True)` rejects it as not normalised. Loose
# enough for features normalised in float16 (relative precision ~1e-3), tight enough to catch raw features.
NORM_TOLERANCE = 1e-2
PRECISIONS = ("float32", "bf16_rerank", "auto")
BF16_ROUNDOFF = 2.0**-8  # unit roundoff of bfloat16: 8 significant bits, round to nearest even
FLOAT32_ROUNDOFF = 2.0**-24
FLOAT64_ROUNDOFF = 2.0**-53
# Re-scored candidates closer than this (times |q| max |x|) are in float32's own rounding noise (float32 matrix
# products of unit vectors at D = 512-768 err by up to ~1e-7 in practice): such a query is left to the float32
# engine, so that its order is float32's.
NEAR_TIE = 2.0**-20
# precision="auto" picks bf16_rerank when bf16 is native on the device, Q * N * D is at least
# AUTO_BF16_MIN_PRODUCTS and k is at most AUTO_BF16_MAX_K: with more neighbours the re-ranking, and the queries
# whose top k holds a near-tie (a third of them at k = 100 on clustered features), cost more than bf16 saves
# (docs/replication.md#exact-search-at-bf16-speed).
AUTO_BF16_MIN_PRODUCTS = 2**32
AUTO_BF16_MAX_K = 16


def as_features(x, name: str, unit_norm: bool = False) -> torch.Tensor:
    """Check a (rows, D) floating-point, finite feature matrix (torch or numpy) and return it as a tensor.

    unit_norm: also require >= 1 row, D >= 1 and rows of L2 norm 1 (within `NORM_TOLERANCE`), as similarity
    statistics of normalised descriptors do. Raises TypeError or ValueError naming `name` and what is wrong.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D) features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floating-point features, got dtype {x.dtype}")
    # A finite sum implies finite entries (NaN and inf propagate); only a non-finite sum, or a sum that overflows,
    # needs the elementwise check, which is several times slower.
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero()[0].item()
        raise ValueError(f"{name} has non-finite values (first in row {bad})")
    if not unit_norm:
        return x
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): similarity statistics need >= 1 feature")
    norms = (x if x.dtype == torch.float64 else x.float()).norm(dim=1)
    off = ((norms - 1).abs() > NORM_TOLERANCE).nonzero()
    if off.numel() > 0:
        row = off[0].item()
        raise ValueError(
            f"{name} row {row} has L2 norm {norms[row].item():.4f} ({off.numel()} rows off by more than "
            f"{NORM_TOLERANCE}); L2-normalised features are expected: pass "
            "torch.nn.functional.normalize(features, dim=1)"
        )
    return x


def as_region_features(query, database) -> tuple[torch.Tensor, torch.Tensor]:
    """Check region-matching features, (rows, 1 + R, D) on both sides with the same R and D (each image whole,
    then its regions), each row `as_features`-checked; returns them as tensors."""
    query, database = torch.as_tensor(query), torch.as_tensor(database)
    if query.dim() != 3 or database.dim() != 3 or query.shape[1:] != database.shape[1:]:
        raise ValueError(
            f"query {tuple(query.shape)} and database {tuple(database.shape)}: region features must be "
            "(rows, 1 + R, D) on both sides with the same regions R and D (embed both with the same region scales and grid)."
        )
    as_features(query.reshape(-1, query.shape[-1]), "query")
    as_features(database.reshape(-1, database.shape[-1]), "database")
    return query, database


def _check_pair(query: torch.Tensor, database: torch.Tensor, k: int, exclude_self: bool) -> int:
    """Validate a search and return k clipped to the number of candidates per query."""
    if query.shape[1] != database.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and database {tuple(database.shape)} have different feature dims D"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_candidates = database.shape[0] - int(exclude_self)
    if exclude_self and query.shape[0] != database.shape[0]:
        raise ValueError(
            f"exclude_self=True searches a set against itself (query row i is database row i), but query "
            f"{tuple(query.shape)} and database {tuple(database.shape)} differ in rows"
        )
    if n_candidates < 1:
        raise ValueError(
            f"database {tuple(database.shape)} has no candidates"
            + (" other than the query itself (exclude_self=True needs >= 2 rows)" if exclude_self else "")
        )
    return min(k, n_candidates)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def search_topk(
    query,
    database,
    k: int = 1,
    chunk_size: int = 1024,
    database_chunk_size: int | None = 65536,
    device=None,
    half: bool = False,
    exclude_self: bool = False,
    backend: str = "auto",
    precision: str = "auto",
    candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search of each query row against the database, in bounded memory.

    Args:
        query: (Q, D) features, torch or numpy.
        database: (N, D) features.
        k: neighbours per query, clipped to the number of candidates (N, or N - 1 with exclude_self).
        chunk_size: queries per score tile.
        database_chunk_size: database rows per score tile (None: the whole database); peak extra memory is about
            chunk_size * database_chunk_size float32 scores (256 MiB at the defaults).
        device: where the torch backend computes (default: the query's device); results come back there.
        half: store the database in float16 (torch backend only). Scores then differ from float32 by up to
            ~1e-3 for normalised features, and near-ties may swap.
        exclude_self: the query set IS the database (Q == N, query row i is database row i); each row's own
            index is excluded, so an exact duplicate at another index still counts with its full score.
        backend: "torch"; "faiss" (CPU, float32, exact IndexFlatIP); or "auto": faiss for CPU float32 searches
            with N >= FAISS_MIN_DATABASE when faiss is installed, torch otherwise.
        precision: "float32" (the products in float32, or float64 when both inputs are); "bf16_rerank"
            (`bf16_rerank_topk`: bf16 products, exact re-scoring, a proof per query, float32 for the queries
            without one; torch backend); "auto" (default): bf16_rerank where bf16 is native on the device (CUDA;
            CPUs with AVX512-BF16 or AMX), half is off, the backend is not forced to faiss, k <= AUTO_BF16_MAX_K
            and Q * N * D >= AUTO_BF16_MIN_PRODUCTS; float32 otherwise (every search of the CPU studies).
        candidates: bf16_rerank only: candidates kept per query (default `default_candidates(k)`).

    Returns:
        scores (Q, k') float32 (float64 if both inputs are float64 on the torch backend), sorted descending, and
        indices (Q, k') int64 into the database, k' = clipped k; on `device` (torch) or the CPU (faiss).
        Equal scores keep torch.topk's order within a tile and come from earlier database blocks first across
        tiles (faiss: faiss's order). bf16_rerank returns the same indices, with scores re-computed in float64
        (they may differ from the float32 products by float32 rounding, ~1e-7).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    query = as_features(query, "query")
    database = as_features(database, "database")
    k = _check_pair(query, database, k, exclude_self)
    database_chunk_size = database.shape[0] if database_chunk_size is None else database_chunk_size
    if chunk_size < 1 or database_chunk_size < 1:
        raise ValueError(
            f"chunk_size and database_chunk_size must be >= 1, got {chunk_size} and {database_chunk_size}"
        )
    device = torch.device(device) if device is not None else query.device
    if precision == "auto":
        products = query.shape[0] * database.shape[0] * query.shape[1]
        fast = not half and backend != "faiss" and k <= AUTO_BF16_MAX_K and bf16_is_native(device)
        precision = "bf16_rerank" if fast and products >= AUTO_BF16_MIN_PRODUCTS else "float32"
    if precision == "bf16_rerank":
        if half or backend == "faiss":
            raise ValueError(
                "precision='bf16_rerank' runs its own bf16 products on the torch backend: leave half=False and "
                f"backend='auto' or 'torch' (got half={half}, backend={backend!r})"
            )
        scores, indices, stats = _bf16_rerank(
            query, database, k, candidates, chunk_size, database_chunk_size, device, exclude_self
        )
        log.info(
            "bf16 search: %d candidates per query; %d of %d queries searched again in float32 (%d without the "
            "proof, %d near-ties)",
            stats["candidates"],
            stats["recomputed"],
            stats["queries"],
            stats["unproven"],
            stats["near_ties"],
        )
        return scores, indices
    if backend == "auto":
        use_faiss = (
            device.type == "cpu"
            and not half
            and database.shape[0] >= FAISS_MIN_DATABASE
            and _faiss_available()
        )
        backend = "faiss" if use_faiss else "torch"
    if backend == "faiss":
        if half:
            raise ValueError(
                "half=True stores the database in float16 for the torch backend; faiss is float32"
            )
        if device.type != "cpu":
            raise ValueError(f"the faiss backend (faiss-cpu) runs on the CPU, got device={device}")
        return faiss_topk(query, database, k, exclude_self=exclude_self)
    return _torch_topk(query, database, k, chunk_size, database_chunk_size, device, half, exclude_self)


def _torch_topk(query, database, k, chunk_size, database_chunk_size, device, half, exclude_self):
    """Blocked top-k; see `search_topk`. `k` is already clipped to the number of candidates. `exclude_self`:
    True (query row i is database row i) or a (Q,) tensor of the database row to exclude for each query."""
    dtype = _compute_dtype(query, database)
    database = database.to(device=device, dtype=torch.float16 if half else dtype)
    blocks = (
        (d0, database[d0 : d0 + database_chunk_size])
        for d0 in range(0, database.shape[0], database_chunk_size)
    )
    return stream_topk(query, blocks, k, chunk_size, device, half, exclude_self, dtype)


def _compute_dtype(query, database) -> torch.dtype:
    """float32 unless both inputs are float64: float16 inputs without half=True are upcast, as fp16 scores create
    spurious ties and fp16 matmul is slow on CPU."""
    dtype = torch.promote_types(query.dtype, database.dtype)
    return dtype if dtype == torch.float64 else torch.float32


def stream_topk(
    query,
    blocks,
    k: int,
    chunk_size: int = 1024,
    device=None,
    half: bool = False,
    exclude_self=False,
    dtype=None,
):
    """Exact top-k of each query row over a database given as consecutive blocks, in memory bounded by one block.

    The engine of `search_topk` (its database cut into blocks) and of the feature store's search (shards read
    block by block from disk, `src.replication.store_search`).

    Args:
        query: (Q, D) checked features (`as_features`).
        blocks: iterable of (first database row, (n, D) tensor), in row order, together the whole database.
        k: neighbours per query, already clipped to the number of candidates.
        half: the blocks are float16 storage: on CUDA the products take float16 inputs and accumulate in
            float32, on CPU each block is upcast to float32.
        exclude_self: False, True (query row i is database row i) or a (Q,) tensor of the database row each
            query excludes.
        dtype: the products' dtype without half (default float32; float64 for float64 inputs).

    Returns:
        scores (Q, k) and indices (Q, k) int64 on `device` (default: the query's).
    """
    device = torch.device(device) if device is not None else query.device
    on_cuda = device.type == "cuda"
    if half:
        compute_dtype = torch.float16 if on_cuda else torch.float32
        score_dtype = torch.float32
    else:
        compute_dtype = score_dtype = dtype or torch.float32
    query = query.to(device=device, dtype=compute_dtype)

    def product(chunk, block):
        if half and on_cuda:
            return torch.mm(chunk, block.T, out_dtype=torch.float32)  # float16 in, float32 accumulate/out
        return chunk @ block.T  # (c, n)

    return _blocked_topk(query, blocks, k, chunk_size, product, score_dtype, exclude_self, compute_dtype)


def faiss_stream_topk(query, blocks, k: int, exclude_self=False) -> tuple[torch.Tensor, torch.Tensor]:
    """`stream_topk` on the CPU with faiss: each block (any float dtype, upcast to float32) is searched by an
    exact faiss.IndexFlatIP (faiss's BLAS tiles and heaps; faster than torch.mm where MKL trails OpenBLAS, as
    on AMD CPUs) and merged into the running top k. A query's excluded row is searched one deeper and masked.
    Returns CPU tensors, scores float32."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("faiss is not installed: pip install faiss-cpu, or use backend='torch'") from error

    q = np.ascontiguousarray(query.detach().cpu().float().numpy())
    exclude = None
    if exclude_self is True:
        exclude = np.arange(len(q))
    elif exclude_self is not False:
        exclude = torch.as_tensor(exclude_self).cpu().numpy()
    best_scores = torch.full((len(q), k), float("-inf"))
    best_indices = torch.full((len(q), k), -1, dtype=torch.long)
    for d0, block in blocks:
        block = np.ascontiguousarray(torch.as_tensor(block).cpu().float().numpy())
        n = len(block)
        if n == 0:
            continue
        flat = faiss.IndexFlatIP(block.shape[1])
        flat.add(block)
        inside = exclude is not None and bool(((exclude >= d0) & (exclude < d0 + n)).any())
        scores, indices = flat.search(q, min(k + int(inside), n))
        if inside:
            scores[indices == (exclude - d0)[:, None]] = float("-inf")
        merged_scores = torch.cat([best_scores, torch.from_numpy(scores)], dim=1)
        merged_indices = torch.cat([best_indices, torch.from_numpy(indices.astype(np.int64)) + d0], dim=1)
        keep = merged_scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_indices = merged_scores.gather(1, keep), merged_indices.gather(1, keep)
    return best_scores, best_indices


def _blocked_topk(query, blocks, k, chunk_size, product, score_dtype, exclude_self, block_dtype=None):
    """The blocked loop of every torch search: score tiles `product(chunk, block)` (c, n), each reduced to its
    top k and merged into a running top k. blocks: (first row, (n, D) block) in order. exclude_self: False, True
    (query row i is database row i) or a (Q,) tensor of the database row each query excludes. block_dtype: each
    block is moved to the query's device and cast to it once (the float16 storage of half=True, upcast on CPU)."""
    n_queries, device = query.shape[0], query.device
    if exclude_self is True:
        exclude_self = torch.arange(n_queries, device=device)
    elif exclude_self is not False:
        exclude_self = torch.as_tensor(exclude_self, device=device)
    best_scores = torch.full((n_queries, k), float("-inf"), dtype=score_dtype, device=device)
    best_indices = torch.full((n_queries, k), -1, dtype=torch.long, device=device)
    filled = False
    # Database blocks outside, query chunks inside: each block is moved / upcast once.
    for d0, block in blocks:
        block = block.to(device=device, dtype=block_dtype or block.dtype)  # (n, D)
        n = block.shape[0]
        if n == 0:
            continue
        for q0 in range(0, n_queries, chunk_size):
            chunk = query[q0 : q0 + chunk_size]  # (c, D)
            sims = product(chunk, block)  # (c, n)
            if exclude_self is not False:
                rows = torch.arange(chunk.shape[0], device=device)
                cols = exclude_self[q0 : q0 + chunk_size] - d0  # column of each query's own row in this block
                inside = (cols >= 0) & (cols < n)
                sims[rows[inside], cols[inside]] = float("-inf")
            top = torch.topk(sims, min(k, n), dim=1)
            del sims
            values = top.values.to(score_dtype)
            if not filled and n >= k:  # the first block fills the running top k
                best_scores[q0 : q0 + chunk_size], best_indices[q0 : q0 + chunk_size] = (
                    values,
                    top.indices + d0,
                )
                continue
            # Merge into the running top k. A stable sort keeps the running entries (earlier blocks) ahead of
            # equal scores of this block, and this block's ties in torch.topk's order.
            merged_scores = torch.cat([best_scores[q0 : q0 + chunk_size], values], dim=1)  # (c, k + k_b)
            merged_indices = torch.cat([best_indices[q0 : q0 + chunk_size], top.indices + d0], dim=1)
            keep = merged_scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (c, k)
            best_scores[q0 : q0 + chunk_size] = merged_scores.gather(1, keep)
            best_indices[q0 : q0 + chunk_size] = merged_indices.gather(1, keep)
        filled = True
    return best_scores, best_indices


def _row_norms(x: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """(rows,) float64 L2 norms of x, computed a block of rows at a time (no float64 copy of x)."""
    return torch.cat([x[i : i + block].double().norm(dim=1) for i in range(0, x.shape[0], block)])


def bf16_is_native(device) -> bool:
    """Whether bfloat16 matrix products are fast on `device`: CUDA devices that support bf16, CPUs with
    AVX512-BF16 or AMX (elsewhere torch emulates them, several times slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_score_bound(dim: int, bf16_output: bool) -> float:
    """c such that |bf16 score - q.x| <= c |q| |x| for float32 vectors q, x of `dim` entries, where the bf16
    score is the product of their bf16 roundings accumulated in float32 (and, with `bf16_output`, rounded to
    bf16 at the end, as CPU bf16 matrix products return it). docs/replication.md#exact-search-at-bf16-speed
    derives it: rounding both inputs costs (1 + u)^2 - 1 relative to sum |q_i x_i| <= |q| |x|, the float32 sum
    gamma_D = D u32 / (1 - D u32) of the (exact) products' absolute sum, the output rounding u of the result."""
    if dim < 1 or dim * FLOAT32_ROUNDOFF >= 1:
        raise ValueError(f"dim must be in [1, 2**24), got {dim}")
    u = BF16_ROUNDOFF
    gamma = dim * FLOAT32_ROUNDOFF / (1 - dim * FLOAT32_ROUNDOFF)
    bound = (1 + u) ** 2 - 1 + gamma * (1 + u) ** 2
    if bf16_output:
        bound += u * (1 + u) ** 2 * (1 + gamma)
    return bound


def default_candidates(k: int) -> int:
    """Candidates kept per query by bf16_rerank: 4k + 16. The bf16 scores err by up to ~0.012 (D <= 1024,
    CPU); the candidates must reach that far below the k-th score (at 100,000 random unit vectors of D = 768
    about 180 rows lie within it below the 100th, about 2 below the 1st)."""
    return 4 * k + 16


def bf16_rerank_topk(
    query,
    database,
    k: int = 1,
    candidates: int | None = None,
    chunk_size: int = 1024,
    database_chunk_size: int | None = 65536,
    device=None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`search_topk` with bf16 products and a proof of exactness per query.

    1. The blocked search of `search_topk` on bf16 copies of the inputs (float32 accumulation) keeps the
       `candidates` best rows per query; t is the lowest bf16 score kept, so every row left out scored <= t.
    2. The candidates are re-scored in float64 from the float32 inputs (exact to ~1e-13) and sorted (equal
       scores: lower index first).
    3. Proof: a row left out has a true score <= t + delta, delta = bf16_score_bound(D) |q| max|x|. When the
       k-th re-scored candidate is above t + delta, the top k is exactly the top k of the true inner products.
       A query without the proof, or whose re-scored top k + 1 holds two scores within NEAR_TIE |q| max|x| of
       each other (an order float32 rounding decides), is searched again with the float32 engine.

    Args and returned scores / indices: as `search_topk` (scores from the float64 re-scoring, float32 unless
    both inputs are float64). stats: {queries, candidates, bound (c of `bf16_score_bound`), unproven,
    near_ties, recomputed (queries searched again in float32)}.
    """
    query = as_features(query, "query")
    database = as_features(database, "database")
    k = _check_pair(query, database, k, exclude_self)
    database_chunk_size = database.shape[0] if database_chunk_size is None else database_chunk_size
    device = torch.device(device) if device is not None else query.device
    return _bf16_rerank(query, database, k, candidates, chunk_size, database_chunk_size, device, exclude_self)


def _bf16_rerank(query, database, k, candidates, chunk_size, database_chunk_size, device, exclude_self):
    """`bf16_rerank_topk` on checked features, k already clipped, the tile sizes and device resolved."""
    n_candidates = database.shape[0] - int(exclude_self)
    m = default_candidates(k) if candidates is None else int(candidates)
    if m < k:
        raise ValueError(f"candidates must be >= k = {k}, got {m}")
    m = min(m, n_candidates)
    out_dtype = torch.float64 if query.dtype == database.dtype == torch.float64 else torch.float32
    query = query.to(device=device, dtype=out_dtype)
    database = database.to(device=device, dtype=out_dtype)
    on_cuda = device.type == "cuda"

    def product(chunk, block):
        if on_cuda:
            return torch.mm(chunk, block.T, out_dtype=torch.float32)  # bf16 in, float32 accumulate and out
        return chunk @ block.T  # bf16 out on the CPU: the bound counts its rounding

    low = database.to(torch.bfloat16)
    blocks = ((d0, low[d0 : d0 + database_chunk_size]) for d0 in range(0, low.shape[0], database_chunk_size))
    cand_scores, cand_indices = _blocked_topk(
        query.to(torch.bfloat16), blocks, m, chunk_size, product, torch.float32, exclude_self
    )
    # Re-score the candidates exactly, a few queries at a time (bounded memory).
    rescored = torch.empty(cand_indices.shape, dtype=torch.float64, device=device)
    # 4M elements per step on the CPU; 64M on CUDA, where small steps would be bound by kernel launches
    step = max(1, (2**26 if on_cuda else 2**22) // (m * query.shape[1]))
    for q0 in range(0, query.shape[0], step):
        rows = database[cand_indices[q0 : q0 + step]].double()  # (s, m, D)
        rescored[q0 : q0 + step] = torch.bmm(rows, query[q0 : q0 + step].double().unsqueeze(2)).squeeze(2)
    by_index = cand_indices.argsort(dim=1)
    cand_indices, rescored = cand_indices.gather(1, by_index), rescored.gather(1, by_index)
    order = rescored.sort(dim=1, descending=True, stable=True).indices
    cand_indices, rescored = cand_indices.gather(1, order), rescored.gather(1, order)

    dim = query.shape[1]
    scale = _row_norms(query) * _row_norms(database).max() * (1 + 1e-6)  # (Q,) |q| max|x|, rounded up
    bound = bf16_score_bound(dim, bf16_output=not on_cuda)
    delta = bound * scale
    rounding = 2 * dim * FLOAT64_ROUNDOFF * scale  # the float64 re-scoring's own error
    if m < n_candidates:
        threshold = cand_scores[:, -1].double() + delta + rounding
        proven = rescored[:, k - 1] > threshold
    else:  # every row is a candidate: nothing is left out
        proven = torch.ones(query.shape[0], dtype=torch.bool, device=device)
    span = min(k + 1, m)
    gaps = rescored[:, : span - 1] - rescored[:, 1:span]  # consecutive gaps of the top k (+ 1)
    near = (gaps <= NEAR_TIE * scale[:, None]).any(dim=1)
    scores, indices = rescored[:, :k].to(out_dtype), cand_indices[:, :k].clone()
    again = (~proven | near).nonzero().squeeze(1)
    if again.numel() > 0:
        own = again if exclude_self else False  # the database row of each query searched again
        scores[again], indices[again] = _torch_topk(
            query[again], database, k, chunk_size, database_chunk_size, device, False, own
        )
    stats = {
        "queries": query.shape[0],
        "candidates": m,
        "bound": bound,
        "unproven": int((~proven).sum()),
        "near_ties": int(near.sum()),
        "recomputed": int(again.numel()),
    }
    return scores, indices, stats


def faiss_topk(query, database, k: int, exclude_self: bool = False):
    """Exact top-k inner-product search with faiss (faiss.IndexFlatIP, CPU), for large databases.

    Args:
        query: (Q, D) features, torch or numpy; searched in float32 (faiss's only precision).
        database: (N, D) features.
        k: neighbours per query, clipped to the number of candidates.
        exclude_self: as in `search_topk` (k + 1 are searched and each row's own index masked).

    Returns:
        scores (Q, k') float32, sorted descending, and indices (Q, k') int64, as CPU torch tensors.
    """
    query = as_features(query, "query")
    database = as_features(database, "database")
    k = _check_pair(query, database, k, exclude_self)
    return faiss_stream_topk(query, [(0, database)], k, exclude_self)


def region_scores(query: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    """The dense (Q, N) scores of region matching (`region_topk`): for features (Q, 1 + R, D) and (N, 1 + R, D),
    the largest of whole . whole, whole query . each database region and each query region . whole database
    image. Memory grows as Q x N x R: for whole rankings of small sets (the partial-copy benchmarks)."""
    query, database = as_region_features(query, database)
    whole = query[:, 0] @ database[:, 0].T
    if query.shape[1] == 1:  # no regions
        return whole
    crop = torch.einsum("qd,nrd->qnr", query[:, 0], database[:, 1:]).amax(-1)
    paste = torch.einsum("qrd,nd->qnr", query[:, 1:], database[:, 0]).amax(-1)
    return torch.maximum(whole, torch.maximum(crop, paste))


def region_topk(query, database, k: int, **search) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k search by region matching (docs/replication.md#region-matching).

    query (Q, 1 + R, D) and database (N, 1 + R, D): each image's whole-image features, then its R regions'
    (`src.data.images.region_boxes`, the same boxes on both sides). An image pair scores the largest of
    whole . whole, whole query . each database region (the query copies part of the database image: a crop) and
    each query region . whole database image (the query holds the database image: a paste): `region_scores`
    without its (Q, N, R) tensors, as three `search_topk` calls (keyword arguments passed on) merged per database
    image. Returns scores (Q, k') descending and indices (Q, k') into the database, k' = min(k, N), on the CPU.
    """
    query, database = as_region_features(query, database)
    rows, regions, dim = query.shape[0], query.shape[1] - 1, query.shape[2]
    k = min(k, database.shape[0])
    whole_q, whole_d = query[:, 0], database[:, 0]
    candidates = [search_topk(whole_q, whole_d, k, **search)]
    if regions:
        scores, index = search_topk(whole_q, database[:, 1:].reshape(-1, dim), k * regions, **search)
        candidates.append((scores, index // regions))  # a database region's row -> its image
        scores, index = search_topk(query[:, 1:].reshape(-1, dim), whole_d, k, **search)
        candidates.append((scores.reshape(rows, -1), index.reshape(rows, -1)))
    scores = torch.cat([c[0].cpu() for c in candidates], dim=1).numpy()
    index = torch.cat([c[1].cpu() for c in candidates], dim=1).numpy()
    # keep each database image's best candidate: sort by score, then stably by image, and take each run's first
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, index = np.take_along_axis(scores, order, 1), np.take_along_axis(index, order, 1)
    by_image = np.argsort(index, axis=1, kind="stable")
    grouped = np.take_along_axis(index, by_image, 1)
    first = np.ones_like(grouped, dtype=bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    keep = np.zeros_like(first)
    np.put_along_axis(keep, by_image, first, 1)
    scores = np.where(keep, scores, -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (
        torch.from_numpy(np.take_along_axis(scores, top, 1)),
        torch.from_numpy(np.take_along_axis(index, top, 1)),
    )
