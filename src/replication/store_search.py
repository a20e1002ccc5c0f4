"""Search over a feature store (`src.replication.store`) with the project's one engine, in bounded memory.

- `search_store`: exact top-k of queries against every row of a store. Shards are read block by block
  (`block_rows` rows at a time, from the memory map), moved to the device and scored against the queries in
  chunks with `src.metrics.search.stream_topk`, keeping a running top k: extra memory is one block
  (block_rows x D) plus one score tile (chunk_size x block_rows float32), whatever the store's size N.
- `store_background`: each training row's similarity to its nearest OTHER row (the DCR background), for every
  row or for a seeded sample of `anchors` rows (the statistics of the sample estimate the exact ones; their
  error is measured in `benchmarks/store_search.py`), query blocks of `query_rows` at a time.
- `approximate_search`: a faiss index (any factory string, e.g. "IVF4096,PQ64" or "HNSW32"), built from the store
  shard by shard and saved beside it, its candidates re-scored exactly from the store; reports its recall@1
  against exact search on a seeded sample of the queries.
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch

from src.metrics.search import _faiss_available, as_features, faiss_stream_topk, stream_topk
from src.replication.store import FeatureStore, StoreError

log = logging.getLogger(__name__)


def _store_blocks(store: FeatureStore, block_rows: int):
    """(first global row, (n, D) tensor) blocks of the store in row order; each block is copied out of the
    memory map, and each shard's map is dropped when done (resident memory stays one shard's pages at most)."""
    for start, array in store.shard_arrays():
        for d0 in range(0, len(array), block_rows):
            yield start + d0, torch.from_numpy(np.array(array[d0 : d0 + block_rows]))
        del array


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device`: the CUDA allocator's free memory, or the CPU's MemAvailable (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_tile_memory(chunk_size: int, block_rows: int, dim: int, device: torch.device) -> None:
    """MemoryError naming chunk_size and block_rows when one block of the store (float16 and float32 copies)
    plus one score tile would not fit in the device's free memory: the search's memory is set by these two."""
    need = block_rows * dim * (2 + 4) + chunk_size * block_rows * 4 + chunk_size * dim * 4
    free = available_memory(device)
    if free is not None and need > free:
        raise MemoryError(
            f"chunk_size={chunk_size} and block_rows={block_rows} need about {need / 2**30:.1f} GiB per step on "
            f"{device} ({block_rows} x {dim} block + {chunk_size} x {block_rows} score tile), {free / 2**30:.1f} "
            "GiB are free: lower them (memory grows with block_rows and with chunk_size x block_rows)"
        )


def _check_query(query, store: FeatureStore) -> torch.Tensor:
    query = as_features(query, "query")
    if query.shape[1] != store.dim:
        raise StoreError(
            f"query features have {query.shape[1]} dims and store '{store.root}' has {store.dim}: extract both "
            f"with the same extractor (the store's is {store.manifest['extractor']['name']})"
        )
    return query


def search_store(
    query,
    store: FeatureStore,
    k: int = 1,
    chunk_size: int = 1024,
    block_rows: int = 65536,
    device=None,
    exclude=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search of each query row against every row of `store`.

    Args:
        query: (Q, D) features (torch or numpy), D the store's dim.
        k: neighbours per query, clipped to the store's rows (minus one with `exclude`).
        chunk_size: queries per score tile; block_rows: store rows per block. Peak extra memory is about
            block_rows * D * 4 bytes (the block in float32) + chunk_size * block_rows * 4 bytes (the tile):
            160 MiB at the defaults for D = 512.
        device: where the products run (default: the query's device); a float16 store is multiplied in float16
            with float32 accumulation on CUDA, upcast block by block on the CPU.
        exclude: None, or a (Q,) tensor of one global row each query excludes (itself, for the background).
        backend: "torch" (`stream_topk`, any device), "faiss" (`faiss_stream_topk`, CPU: faiss's OpenBLAS
            products, 1.5x torch's MKL on AMD CPUs), or "auto": faiss on the CPU when installed, torch otherwise.
            Ties may be ordered differently by the two.

    Returns:
        scores (Q, k) float32 and indices (Q, k) int64 (global rows), on `device`.
    """
    query = _check_query(query, store)
    if chunk_size < 1 or block_rows < 1:
        raise ValueError(f"chunk_size and block_rows must be >= 1, got {chunk_size} and {block_rows}")
    candidates = len(store) - (exclude is not None)
    if candidates < 1:
        raise StoreError(f"store '{store.root}' has {len(store)} rows: nothing to search")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, candidates)
    half = store.dtype == "float16"
    exclude_self = False if exclude is None else torch.as_tensor(exclude, dtype=torch.long)
    device = torch.device(device) if device is not None else query.device
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    check_tile_memory(chunk_size, block_rows, store.dim, device)
    if backend == "auto":
        backend = "faiss" if device.type == "cpu" and _faiss_available() else "torch"
    if backend == "faiss":
        if device.type != "cpu":
            raise ValueError(f"the faiss backend (faiss-cpu) runs on the CPU, got device={device}")
        return faiss_stream_topk(query, _store_blocks(store, block_rows), k, exclude_self)
    return stream_topk(query, _store_blocks(store, block_rows), k, chunk_size, device, half, exclude_self)


def store_background(
    store: FeatureStore,
    anchors: int | None = None,
    seed: int = 0,
    query_rows: int = 65536,
    chunk_size: int = 1024,
    block_rows: int = 65536,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor row's similarity to its nearest other row of the store (the DCR train-train background).

    anchors: None (every row, N x N products) or a count: a seeded uniform sample of rows without replacement,
    whose background statistics estimate the exact ones at anchors / N of the cost.

    Returns:
        (anchor rows (A,) int64, their similarities (A,) float32, their nearest other rows (A,) int64), on the
        CPU. Queries are read `query_rows` at a time, so no N-sized buffer is built.
    """
    n = len(store)
    if n < 2:
        raise StoreError(f"store '{store.root}' has {n} row(s): the background needs >= 2")
    if anchors is None or anchors >= n:
        rows = torch.arange(n)
    else:
        if anchors < 1:
            raise ValueError(f"anchors must be >= 1 (or None for every row), got {anchors}")
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=generator)[:anchors].sort().values
    sims, nearest = [], []
    for q0 in range(0, len(rows), query_rows):
        block = rows[q0 : q0 + query_rows]
        s, i = search_store(store.rows_at(block), store, 1, chunk_size, block_rows, device, exclude=block)
        sims.append(s[:, 0].cpu()), nearest.append(i[:, 0].cpu())
    return rows, torch.cat(sims), torch.cat(nearest)


def build_index(store: FeatureStore, factory: str, train_rows: int = 200_000, seed: int = 0) -> Path:
    """A faiss index of the store (inner product), built once and saved as `<store>/index/<factory>.faiss`.

    factory: a faiss index factory string ("IVF4096,PQ64", "IVF1024,Flat", "HNSW32", ...). Indexes that need
    training are trained on a seeded sample of `train_rows` rows; rows are added shard by shard (float32 one
    shard at a time). The file is tied to the store's key (a store rebuilt under another key rebuilds it).
    """
    if not _faiss_available():
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)")
    import faiss

    folder = store.root / "index"
    folder.mkdir(exist_ok=True)
    name = "".join(c if c.isalnum() or c in ",_-" else "_" for c in factory)
    path = folder / f"{name}_{store.key[:12]}_{train_rows}_{seed}.faiss"
    if path.is_file():
        return path
    try:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"faiss cannot build index {factory!r}: {error}") from None
    started = time.perf_counter()
    if not index.is_trained:
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(store), generator=generator)[: min(train_rows, len(store))].sort().values
        index.train(np.ascontiguousarray(store.rows_at(sample).numpy()))
    for _, array in store.shard_arrays():
        index.add(np.ascontiguousarray(array, dtype=np.float32))
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    log.info(
        f"faiss index {factory} of {len(store)} rows built in {time.perf_counter() - started:.0f} s: {path}"
    )
    return path


def approximate_search(
    query,
    store: FeatureStore,
    factory: str,
    k: int = 1,
    nprobe: int = 32,
    rerank: int = 16,
    recall_queries: int = 256,
    seed: int = 0,
    train_rows: int = 200_000,
    **exact_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Top-k from a faiss index of the store (`build_index`), re-scored exactly, with its measured recall@1.

    Each query takes max(k, rerank) candidates from the index, re-scored from the store's features (the exact
    inner products of the stored rows) and sorted; nprobe sets IVF's lists visited per query (ignored by other
    indexes). recall@1 is the share of a seeded sample of `recall_queries` queries whose top-1 row equals exact
    search's (`search_store`, with `exact_kwargs`).

    Returns:
        scores (Q, k) float32, indices (Q, k) int64 on the CPU, and {"index", "recall_at_1", "recall_queries",
        "seconds"}.
    """
    import faiss

    query = _check_query(query, store)
    index = faiss.read_index(str(build_index(store, factory, train_rows, seed)))
    if hasattr(faiss, "extract_index_ivf"):
        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:
            pass  # not an IVF index
    k = min(k, len(store))
    wanted = min(max(k, rerank), len(store))
    started = time.perf_counter()
    _, candidates = index.search(np.ascontiguousarray(query.float().cpu().numpy()), wanted)
    candidates = torch.from_numpy(candidates.astype(np.int64))
    valid = candidates >= 0  # faiss pads with -1 when a query's visited lists hold fewer rows
    scores = torch.empty(candidates.shape, dtype=torch.float32)
    step = max(1, 2**22 // (wanted * store.dim))  # re-score a few queries at a time (bounded memory)
    for q0 in range(0, len(query), step):
        ids = candidates[q0 : q0 + step]
        rows = store.rows_at(ids.clamp(min=0).reshape(-1)).reshape(*ids.shape, store.dim)
        scores[q0 : q0 + step] = torch.einsum("qd,qcd->qc", query[q0 : q0 + step].float().cpu(), rows)
    scores = scores.masked_fill(~valid, float("-inf"))
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    scores, indices = scores.gather(1, order), candidates.gather(1, order)
    seconds = time.perf_counter() - started
    sample = torch.randperm(len(query), generator=torch.Generator().manual_seed(seed))[:recall_queries]
    _, exact = search_store(query[sample], store, 1, **exact_kwargs)
    recall = float((exact[:, 0].cpu() == indices[sample, 0]).float().mean())
    info = {"index": factory, "recall_at_1": recall, "recall_queries": len(sample), "seconds": seconds}
    log.info(f"faiss {factory}: recall@1 {recall:.3f} against exact search on {len(sample)} queries")
    return scores, indices, info
