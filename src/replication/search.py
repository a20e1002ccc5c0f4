"""Exact nearest-neighbour search of generations against training images, in bounded memory.

The DCR code builds the full G x N similarity matrix (and the N x N train matrix) on the GPU
(somepago/DCR `diff_retrieval.py`), which does not fit for LAION-scale training sets. Here:

- `search_topk(backend="torch")`: blocked matrix products on CPU or GPU. The database is cut into blocks and the
  queries into chunks; each (chunk, block) score tile is reduced to its top k and merged into a running top k,
  so peak extra memory is one chunk_size x database_chunk_size tile plus the (Q, k) results. `half=True`
  stores the database in float16 (half the memory); on CUDA the products take float16 inputs and accumulate
  into float32 outputs, on CPU (where float16 matmul is slow) each block is upcast to float32 once.
- `faiss_topk` (`backend="faiss"`): faiss.IndexFlatIP, exact inner-product search with faiss's own blocked
  BLAS + heap loop (bounded memory too), on CPU.
- `split_product_similarity`: the DINO split-product similarity of PAPERS.md §1.5 between token features.

Scores are inner products: pass L2-normalised features for cosine similarity.
"""

import numpy as np
import torch

BACKENDS = ("auto", "torch", "faiss")
# backend="auto" hands CPU float32 searches over databases at least this large to faiss (when installed).
FAISS_MIN_DATABASE = 50_000


def as_feature_matrix(x, name: str) -> torch.Tensor:
    """Validate a (rows, D) floating-point, finite feature matrix (torch or numpy) and return it as a tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D) features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floating-point features, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero()[0].item()
        raise ValueError(f"{name} has non-finite values (first in row {bad})")
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
    database_chunk_size: int = 65536,
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
        database_chunk_size: database rows per score tile; peak extra memory is about
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
        Ties are ordered as torch.topk / faiss order them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    query = as_feature_matrix(query, "query")
    database = as_feature_matrix(database, "database")
    k = _check_pair(query, database, k, exclude_self)
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
            merged_scores = torch.cat([best_scores[q0 : q0 + chunk_size], top.values], dim=1)
            merged_indices = torch.cat([best_indices[q0 : q0 + chunk_size], top.indices + d0], dim=1)
            keep = torch.topk(merged_scores, k, dim=1)
            best_scores[q0 : q0 + chunk_size] = keep.values
            best_indices[q0 : q0 + chunk_size] = merged_indices.gather(1, keep.indices)
    return best_scores, best_indices


def faiss_topk(query, database, k: int, index: str = "flat", exclude_self: bool = False):
    """Exact top-k inner-product search with faiss (faiss.IndexFlatIP, CPU), for large databases.

    Args:
        query: (Q, D) features, torch or numpy; searched in float32 (faiss's only precision).
        database: (N, D) features.
        k: neighbours per query, clipped to the number of candidates.
        index: "flat" (IndexFlatIP, exact); the only option, approximate indexes are not supported.
        exclude_self: as in `search_topk` (k + 1 are searched and each row's own index dropped).

    Returns:
        scores (Q, k') float32, sorted descending, and indices (Q, k') int64, as CPU torch tensors.
    """
    if index != "flat":
        raise ValueError(f"index must be 'flat' (faiss.IndexFlatIP, exact search), got {index!r}")
    try:
        import faiss
    except ImportError as error:
        raise ImportError("faiss is not installed: pip install faiss-cpu, or use backend='torch'") from error
    query = as_feature_matrix(query, "query")
    database = as_feature_matrix(database, "database")
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


def split_product_similarity(query_tokens, database_tokens, chunk_size: int = 256) -> torch.Tensor:
    """DINO split-product similarity between token features (PAPERS.md §1.5; DCR `diff_retrieval.py`).

    Each image's tokens are flattened to one T*D vector and L2-normalised as a whole (global normalisation,
    not per token), as the DCR code does before splitting them back into T chunks; the similarity is the
    largest per-position dot product: sim(q, v) = max_t <q_t, v_t>. One strongly matching position (a copied
    object) is enough to score high.

    Args:
        query_tokens: (Q, T, D) token features (e.g. CLS + patch tokens of a ViT), raw or normalised.
        database_tokens: (N, T, D) token features from the same extractor.
        chunk_size: queries per step; peak extra memory ~ chunk_size * N floats plus one (T, N, D) copy of
            the database.

    Returns:
        (Q, N) similarities, float32 (float64 for float64 inputs), on the device of `query_tokens`.
    """
    tokens = []
    for x, name in ((query_tokens, "query_tokens"), (database_tokens, "database_tokens")):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"{name} must be a floating-point (rows, T, D) tensor, got {shape}")
        flat = x.reshape(x.shape[0], -1)
        norms = flat.norm(dim=1)
        if x.shape[0] > 0 and not (torch.isfinite(norms).all() and (norms > 0).all()):
            row = (~(torch.isfinite(norms) & (norms > 0))).nonzero()[0].item()
            raise ValueError(f"{name} row {row} has norm {norms[row].item()}: all-zero or non-finite tokens")
        tokens.append(x)
    query_tokens, database_tokens = tokens
    if query_tokens.shape[1:] != database_tokens.shape[1:]:
        raise ValueError(
            f"query_tokens {tuple(query_tokens.shape)} and database_tokens {tuple(database_tokens.shape)} "
            "differ in (T, D): extract both with the same extractor at the same input size"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(query_tokens.dtype, database_tokens.dtype)
    dtype = dtype if dtype == torch.float64 else torch.float32
    device = query_tokens.device

    def normalise(x: torch.Tensor) -> torch.Tensor:  # global L2 over all T*D values of each image
        x = x.to(device=device, dtype=dtype)
        return x / x.reshape(x.shape[0], -1).norm(dim=1)[:, None, None]

    database_by_position = normalise(database_tokens).transpose(0, 1).contiguous()  # (T, N, D)
    out = torch.empty(query_tokens.shape[0], database_tokens.shape[0], dtype=dtype, device=device)
    for q0 in range(0, query_tokens.shape[0], chunk_size):
        chunk = normalise(query_tokens[q0 : q0 + chunk_size]).transpose(0, 1)  # (T, c, D)
        best = chunk[0] @ database_by_position[0].T  # (c, N) position 0
        for t in range(1, chunk.shape[0]):
            torch.maximum(best, chunk[t] @ database_by_position[t].T, out=best)
        out[q0 : q0 + chunk_size] = best
    return out
