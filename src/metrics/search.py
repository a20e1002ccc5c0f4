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

Scores are inner products: pass L2-normalised features for cosine similarity. `as_features` is the one check of
feature matrices for every function of `src.metrics`.
"""

import numpy as np
import torch

BACKENDS = ("auto", "torch", "faiss")
# backend="auto" hands CPU float32 searches over databases at least this large to faiss (when installed).
FAISS_MIN_DATABASE = 50_000
# How far from 1 a row's L2 norm may be before `as_features(unit_norm=True)` rejects it as not normalised. Loose
# enough for features normalised in float16 (relative precision ~1e-3), tight enough to catch raw features.
NORM_TOLERANCE = 1e-2


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

    Returns:
        scores (Q, k') float32 (float64 if both inputs are float64 on the torch backend), sorted descending, and
        indices (Q, k') int64 into the database, k' = clipped k; on `device` (torch) or the CPU (faiss).
        Equal scores keep torch.topk's order within a tile and come from earlier database blocks first across
        tiles (faiss: faiss's order).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    query = as_features(query, "query")
    database = as_features(database, "database")
    k = _check_pair(query, database, k, exclude_self)
    database_chunk_size = database.shape[0] if database_chunk_size is None else database_chunk_size
    if chunk_size < 1 or database_chunk_size < 1:
        raise ValueError(
            f"chunk_size and database_chunk_size must be >= 1, got {chunk_size} and {database_chunk_size}"
        )
    device = torch.device(device) if device is not None else query.device
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
    """Blocked top-k; see `search_topk`. `k` is already clipped to the number of candidates."""
    n_queries, n_database = query.shape[0], database.shape[0]
    on_cuda = device.type == "cuda"
    if half:
        compute_dtype = torch.float16 if on_cuda else torch.float32
        database = database.to(device=device, dtype=torch.float16)
        query = query.to(device=device, dtype=compute_dtype)
    else:
        # float32 unless both inputs are float64: float16 inputs without half=True are upcast, as fp16 scores
        # create spurious ties and fp16 matmul is slow on CPU.
        compute_dtype = torch.promote_types(query.dtype, database.dtype)
        compute_dtype = compute_dtype if compute_dtype == torch.float64 else torch.float32
        database = database.to(device=device, dtype=compute_dtype)
        query = query.to(device=device, dtype=compute_dtype)
    score_dtype = torch.float32 if half else compute_dtype

    best_scores = torch.full((n_queries, k), float("-inf"), dtype=score_dtype, device=device)
    best_indices = torch.full((n_queries, k), -1, dtype=torch.long, device=device)
    # Database blocks outside, query chunks inside: each block is moved / upcast once.
    for d0 in range(0, n_database, database_chunk_size):
        block = database[d0 : d0 + database_chunk_size]  # (n, D)
        if block.dtype != compute_dtype:
            block = block.to(compute_dtype)  # float16 storage upcast per block on CPU
        n = block.shape[0]
        for q0 in range(0, n_queries, chunk_size):
            chunk = query[q0 : q0 + chunk_size]  # (c, D)
            if half and on_cuda:
                sims = torch.mm(chunk, block.T, out_dtype=torch.float32)  # float16 in, float32 accumulate/out
            else:
                sims = chunk @ block.T  # (c, n)
            if exclude_self:
                rows = torch.arange(chunk.shape[0], device=device)
                cols = rows + q0 - d0  # column of each query's own row in this block
                inside = (cols >= 0) & (cols < n)
                sims[rows[inside], cols[inside]] = float("-inf")
            top = torch.topk(sims, min(k, n), dim=1)
            del sims
            if d0 == 0 and n >= k:  # the first block fills the running top k
                best_scores[q0 : q0 + chunk_size], best_indices[q0 : q0 + chunk_size] = top
                continue
            # Merge into the running top k. A stable sort keeps the running entries (earlier blocks) ahead of
            # equal scores of this block, and this block's ties in torch.topk's order.
            merged_scores = torch.cat([best_scores[q0 : q0 + chunk_size], top.values], dim=1)  # (c, k + k_b)
            merged_indices = torch.cat([best_indices[q0 : q0 + chunk_size], top.indices + d0], dim=1)
            keep = merged_scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (c, k)
            best_scores[q0 : q0 + chunk_size] = merged_scores.gather(1, keep)
            best_indices[q0 : q0 + chunk_size] = merged_indices.gather(1, keep)
    return best_scores, best_indices


def faiss_topk(query, database, k: int, exclude_self: bool = False):
    """Exact top-k inner-product search with faiss (faiss.IndexFlatIP, CPU), for large databases.

    Args:
        query: (Q, D) features, torch or numpy; searched in float32 (faiss's only precision).
        database: (N, D) features.
        k: neighbours per query, clipped to the number of candidates.
        exclude_self: as in `search_topk` (k + 1 are searched and each row's own index dropped).

    Returns:
        scores (Q, k') float32, sorted descending, and indices (Q, k') int64, as CPU torch tensors.
    """
    try:
        import faiss
    except ImportError as error:
        raise ImportError("faiss is not installed: pip install faiss-cpu, or use backend='torch'") from error
    query = as_features(query, "query")
    database = as_features(database, "database")
    k = _check_pair(query, database, k, exclude_self)
    query_np = np.ascontiguousarray(query.detach().cpu().float().numpy())
    database_np = np.ascontiguousarray(database.detach().cpu().float().numpy())
    flat = faiss.IndexFlatIP(database_np.shape[1])
    flat.add(database_np)
    n_search = k + 1 if exclude_self else k
    scores, indices = flat.search(query_np, n_search)  # (Q, n_search) each
    if exclude_self:
        # Drop each row's own index; when it is not among the k + 1 (exact duplicates outscored it), drop the
        # last, so k remain either way.
        is_self = indices == np.arange(indices.shape[0])[:, None]
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), n_search - 1)
        keep = np.arange(n_search)[None, :] != drop[:, None]
        scores = scores[keep].reshape(-1, k)
        indices = indices[keep].reshape(-1, k)
    return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))
