"""Retrieval metrics for style / copy retrieval: chunked exact top-k search and the CSD paper's metrics.

The metric definitions follow the official CSD code exactly (learn2phoenix/CSD `metrics/metrics.py`,
`Metrics.get_*_bin`; docs/style.md#metric-definitions), so numbers compare with the paper's tables:

- recall@k: success@k, the fraction of queries with at least one hit in the top k.
- mAP@k: (1/k) * sum_{i=1..k} P@i per query (precision at EVERY rank, not only at relevant ranks, and not
  divided by the number of relevant items), averaged over all queries; queries with no hit count 0.
  Hence mAP@1 == P@1 == recall@1.
- MRR@k: mean of 1/rank of the first hit, averaged only over the queries that have a hit in the top k
  (the official code's quirk); 0.0 when no query has one (the official code would return NaN).
- standardAP@k (ours, not in the paper): the usual AP truncated at k, logged alongside for reference.

A hit is a database item that shares at least one label with the query (`--multilabel` in the official code;
for single-label data, one-hot labels give "same artist").
"""

import numpy as np
import torch

from src.metrics.search import as_features, search_topk

# Cap on the (label pairs, k) block gathered at once when checking hits, so that a large k or densely labelled
# queries never blow up memory: 2**26 elements.
_MAX_GATHER_ELEMENTS = 2**26


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _as_labels(x, name: str) -> torch.Tensor:
    x = _as_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be multi-hot (rows, L) labels, got shape {tuple(x.shape)}; for integer class ids use "
            "torch.nn.functional.one_hot(ids, num_classes)"
        )
    return x if x.dtype == torch.bool else x != 0


def retrieval_topk(
    query, database, k: int, chunk_size: int = 1024, precision: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search for retrieval: `search_topk` with the torch backend, one chunk_size x N
    score tile at a time, on the query's device.

    Args:
        query: (Q, D) embeddings, torch or numpy. Scores are inner products (higher = closer), so pass
            L2-normalised embeddings for cosine similarity, as the official code does with faiss.IndexFlatIP.
        database: (N, D) embeddings; moved to the query's device.
        k: neighbours per query; clipped to N.
        chunk_size: queries per chunk; peak extra memory is about chunk_size * N scores.
        precision: "float32", "bf16_rerank" or "auto" (`search_topk`: bf16 products with exact re-ranking where
            bf16 is native and the search is large; the same indices either way).

    Returns:
        scores (Q, min(k, N)) float, sorted descending, and indices (Q, min(k, N)) int64 into `database`, on the
        query's device. Ties are ordered as torch.topk orders them.
    """
    return search_topk(
        query,
        database,
        k,
        chunk_size=chunk_size,
        database_chunk_size=None,
        backend="torch",
        precision=precision,
    )


def hit_matrix(query_labels, database_labels, indices) -> torch.Tensor:
    """Whether each retrieved item shares a label with its query.

    Args:
        query_labels: (Q, L) multi-hot labels (bool, or any dtype where nonzero = label present).
        database_labels: (N, L) multi-hot labels.
        indices: (Q, k) int indices into the database, e.g. from `retrieval_topk`.

    Returns:
        (Q, k) bool on the device of `indices`.
    """
    query_labels = _as_labels(query_labels, "query_labels")
    database_labels = _as_labels(database_labels, "database_labels")
    indices = _as_tensor(indices, "indices").long()
    if query_labels.shape[1] != database_labels.shape[1]:
        raise ValueError(
            f"query_labels {tuple(query_labels.shape)} and database_labels {tuple(database_labels.shape)} "
            "have different label counts L"
        )
    if indices.dim() != 2 or indices.shape[0] != query_labels.shape[0]:
        raise ValueError(
            f"indices must be (Q, k) with Q = {query_labels.shape[0]} rows of query_labels, "
            f"got {tuple(indices.shape)}"
        )
    device = indices.device
    query_labels, database_labels = query_labels.to(device), database_labels.to(device)
    n_queries, k = indices.shape
    # Sparse over the queries' labels: for every (query, label) pair, look up whether each of the query's k
    # retrieved items carries that label. Cost O(pairs * k) instead of a dense O(Q * k * L) comparison.
    query_index, label_index = query_labels.nonzero(as_tuple=True)  # (P,), (P,)
    counts = torch.zeros(n_queries, k, dtype=torch.int32, device=device)
    step = max(1, _MAX_GATHER_ELEMENTS // max(1, k))
    for start in range(0, query_index.numel(), step):
        q, lab = query_index[start : start + step], label_index[start : start + step]
        carries = database_labels[indices[q], lab[:, None]]  # (p, k): retrieved item has this label
        counts.index_add_(0, q, carries.to(torch.int32))
    return counts > 0


def count_relevant(query_labels, database_labels) -> torch.Tensor:
    """Number of database items sharing at least one label with each query.

    Args:
        query_labels: (Q, L) multi-hot labels.
        database_labels: (N, L) multi-hot labels.

    Returns:
        (Q,) int64 on the device of `query_labels`.

    Single-label queries read a per-label column count; each distinct multi-label set reads only its own label
    columns of the database. The cost is thus about N * (labels over distinct multi-label sets), not a dense
    Q x N x L product.
    """
    query_labels = _as_labels(query_labels, "query_labels")
    database_labels = _as_labels(database_labels, "database_labels").to(query_labels.device)
    if query_labels.shape[1] != database_labels.shape[1]:
        raise ValueError(
            f"query_labels {tuple(query_labels.shape)} and database_labels {tuple(database_labels.shape)} "
            "have different label counts L"
        )
    # (L,) items carrying each label, by bincount over the label entries of row blocks: 4-8x faster on CPU
    # than a column sum of the bool matrix, which first converts it to int64 (0.1 s instead of 0.6 s for
    # 100k x 1000 one-hot labels). The block bounds the nonzero() list to 2**22 entries (64 MiB) when dense.
    n_labels = database_labels.shape[1]
    per_label = torch.zeros(n_labels, dtype=torch.long, device=query_labels.device)
    rows = max(1, 2**22 // max(1, n_labels))
    for start in range(0, database_labels.shape[0], rows):
        _, block_labels = database_labels[start : start + rows].nonzero(as_tuple=True)
        per_label += torch.bincount(block_labels, minlength=n_labels)
    query_index, label_index = query_labels.nonzero(as_tuple=True)  # (P,): the queries' (query, label) pairs
    n_query_labels = torch.bincount(query_index, minlength=query_labels.shape[0])  # (Q,)
    counts = torch.zeros(query_labels.shape[0], dtype=torch.long, device=query_labels.device)
    single = n_query_labels[query_index] == 1  # (P,) pairs of single-label queries
    counts[query_index[single]] = per_label[label_index[single]]
    multi = (n_query_labels > 1).nonzero().squeeze(1)
    if multi.numel() > 0:
        label_sets, inverse = torch.unique(query_labels[multi], dim=0, return_inverse=True)
        set_counts = torch.stack(
            [database_labels[:, label_set.nonzero().squeeze(1)].any(dim=1).sum() for label_set in label_sets]
        )
        counts[multi] = set_counts[inverse]
    return counts


def metrics_from_hits(hits: torch.Tensor, n_relevant: torch.Tensor, ks=(1, 10, 100)) -> dict[str, float]:
    """The CSD metrics (and standard AP) from a ranked hit matrix; see the module docstring for definitions.

    Args:
        hits: (Q, K) bool, hit at rank i (0-based column) of each query's ranked list.
        n_relevant: (Q,) number of relevant database items per query (only standardAP uses it).
        ks: cut-offs; each k is evaluated at min(k, K) ranks, so a k larger than the database (K = N) is
            computed at N while the key keeps the requested k.

    Returns:
        {"mAP@k", "recall@k", "MRR@k", "standardAP@k"} for each k, as Python floats in [0, 1].
    """
    if hits.dim() != 2:
        raise ValueError(f"hits must be (Q, K), got shape {tuple(hits.shape)}")
    if n_relevant.shape != (hits.shape[0],):
        raise ValueError(f"n_relevant must be (Q,) = ({hits.shape[0]},), got {tuple(n_relevant.shape)}")
    n_queries, max_rank = hits.shape
    if n_queries == 0:
        raise ValueError("no queries: retrieval metrics are undefined for Q = 0")
    hits = hits.double()
    ranks = torch.arange(1, max_rank + 1, dtype=torch.float64, device=hits.device)
    precision = hits.cumsum(dim=1) / ranks  # (Q, K) P@i
    has_hit = hits.bool()
    first_hit = torch.where(has_hit.any(dim=1), has_hit.double().argmax(dim=1), max_rank)  # (Q,) 0-based rank
    n_relevant = n_relevant.to(hits.device).double()

    out = {}
    for k_req in ks:
        if k_req < 1:
            raise ValueError(f"ks must be >= 1, got {tuple(ks)}")
        k = min(int(k_req), max_rank)
        found = first_hit < k  # (Q,)
        out[f"mAP@{k_req}"] = (precision[:, :k].sum(dim=1) / k).mean().item()
        out[f"recall@{k_req}"] = found.double().mean().item()
        out[f"MRR@{k_req}"] = (1.0 / (first_hit[found] + 1).double()).mean().item() if found.any() else 0.0
        norm = torch.clamp(n_relevant, max=k)
        ap = (precision[:, :k] * hits[:, :k]).sum(dim=1) / norm.clamp(min=1)
        out[f"standardAP@{k_req}"] = torch.where(norm > 0, ap, 0.0).mean().item()
    return out


def retrieval_metrics(
    query,
    database,
    query_labels,
    database_labels,
    ks=(1, 10, 100),
    chunk_size: int = 1024,
    precision: str = "auto",
) -> dict[str, float]:
    """mAP@k, recall@k and MRR@k as in the official CSD code, plus standardAP@k, by chunked exact top-k search.

    Args:
        query: (Q, D) embeddings (torch or numpy), ranked against the database by inner product.
        database: (N, D) embeddings.
        query_labels: (Q, L) multi-hot labels; a hit is any label shared with the database item.
        database_labels: (N, L) multi-hot labels.
        ks: cut-offs. A k larger than N is evaluated at N (the key keeps the requested k).
        chunk_size: queries per similarity chunk (peak extra memory ~ chunk_size * N floats).
        precision: the search's precision (`retrieval_topk`).

    Returns:
        {"mAP@k", "recall@k", "MRR@k", "standardAP@k"} for each k, floats in [0, 1].
        - mAP@k, recall@k, MRR@k: exactly the official definitions (docs/style.md#metric-definitions, module
          docstring).
        - standardAP@k: sum over relevant ranks i <= k of P@i, divided by min(k, number of relevant items in
          the whole database); queries with no relevant item in the database count 0 (they stay in the mean).

    Everything runs on the query's device (CPU or CUDA). The query set is not removed from the database: when
    they overlap, pass disjoint splits (as WikiArt's query / database split is).
    """
    query = as_features(query, "query")
    database = as_features(database, "database")
    query_labels = _as_labels(query_labels, "query_labels")
    database_labels = _as_labels(database_labels, "database_labels")
    if query.shape[0] != query_labels.shape[0]:
        raise ValueError(
            f"query {tuple(query.shape)} and query_labels {tuple(query_labels.shape)} differ in rows"
        )
    if database.shape[0] != database_labels.shape[0]:
        raise ValueError(
            f"database {tuple(database.shape)} and database_labels {tuple(database_labels.shape)} differ in rows"
        )
    if query_labels.shape[1] != database_labels.shape[1]:
        raise ValueError(
            f"query_labels {tuple(query_labels.shape)} and database_labels {tuple(database_labels.shape)} "
            "have different label counts L"
        )
    if len(ks) == 0 or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive ints, got {ks}")
    _, indices = retrieval_topk(query, database, max(ks), chunk_size, precision)
    hits = hit_matrix(query_labels, database_labels, indices)
    n_relevant = count_relevant(query_labels.to(query.device), database_labels)
    return metrics_from_hits(hits, n_relevant, ks)


def per_label_precision(query_labels, database_labels, indices, k: int) -> dict[int, float]:
    """Mean P@k over the queries carrying each label, for per-style analysis.

    Args:
        query_labels: (Q, L) multi-hot labels.
        database_labels: (N, L) multi-hot labels.
        indices: (Q, K) retrieved database indices, best first, with K >= k (e.g. from `retrieval_topk`).
        k: cut-off.

    Returns:
        {label index: mean over queries with that label of (#hits in top k) / k}. Labels that no query carries
        are absent. A hit is any shared label, so a multi-label query's P@k counts towards each of its labels.
    """
    indices = _as_tensor(indices, "indices")
    if indices.dim() != 2 or indices.shape[1] < k or k < 1:
        raise ValueError(f"indices must be (Q, K) with K >= k = {k} >= 1, got shape {tuple(indices.shape)}")
    hits = hit_matrix(query_labels, database_labels, indices[:, :k])
    precision = hits.double().mean(dim=1)  # (Q,) P@k
    labels = _as_labels(query_labels, "query_labels").to(hits.device).double()
    sums = labels.T @ precision  # (L,)
    counts = labels.sum(dim=0)  # (L,)
    present = counts.nonzero().squeeze(1).tolist()
    return {label: (sums[label] / counts[label]).item() for label in present}
