"""Benchmark: chunked top-k `retrieval_metrics` against a full-argsort baseline: time, peak memory, phases.

The baseline is the search of the official CSD evaluation (CSD/train_csd.py `evaluate`): the full (Q, N)
float32 similarity matrix `query @ database.T`, then `torch.argsort(sims, dim=1, descending=True)` of every
full row; its first max(ks) columns then go through the same metric math as ours (`hit_matrix`,
`count_relevant`, `metrics_from_hits`), so only the search strategy differs. The official code also builds a
dense (Q, N) label overlap `q_labels @ db_labels.T` and gathers it row by row in Python; the baseline leaves
that out, so it understates the official code's cost.

Each method runs in a fresh process with the same torch thread count, so its peak memory is its own: the rise
of the peak RSS above the RSS just before the call on CPU, of the CUDA allocator's peak on GPU. At 10k x 100k
the baseline needs a 4 GB float32 matrix plus an 8 GB int64 argsort, so on CPU it runs on the first
`--baseline-queries` queries and its time and memory are extrapolated linearly in Q (both are dominated by the
Q x N matrices; the scaling also multiplies count_relevant's per-database part, about 0.05 s, which overstates
the baseline by under 1%). The synthetic data is seeded and identical in both processes, and the metrics of
the two methods are compared on the queries they share.

After the timed call, each worker times its phases one by one (matrix product, top-k or argsort, hits,
count_relevant, metrics). Both methods compute the same Q x N x D matrix product, so the baseline's total over
our matrix-product time is the largest speed-up any exact float32 method could reach: the report prints it as
the ceiling next to the measured speed-up.

The third method, `chunked_bf16`, is the same search with `precision="bf16_rerank"`
(docs/replication.md#exact-search-at-bf16-speed: bf16 candidates, float64 re-scoring, a proof per query, float32
for the queries without one): its time against the float32 chunked search and against the bf16 and float32
matrix products alone (each timed in its worker), the queries it searched again in float32, and whether its top
max(ks) of every query equals the float32 search's (indices, in order).

Reference runs (2 AMD EPYC vCPUs, float32 MKL matrix product at 145-155 GFLOP/s, otherwise idle): chunked
10.8-12.0 s and 407 MiB, baseline 52-53 s and ~15 GiB (extrapolated from 1000 queries), 4.5-4.8x faster. The
matrix product is ~90% of our time and ~20% of the baseline's, which caps any exact float32 method at ~5x
here: a 10x speed-up cannot be had on this CPU without giving up float32 exactness.

bf16 + re-rank (2026-11-27): on one H200 at the defaults, 0.10 s against 0.10 s in float32 (bf16 product alone
553 TFLOP/s, float32 47), 3,433 of 10,000 queries searched again in float32 for near-ties, every top 100 equal to
float32's; on 2 AMD EPYC Zen 3 vCPUs without native bf16, 1,000 queries, 13.44 s against 2.08 s (353 queries
searched again), every top 100 equal.

    python -m benchmarks.retrieval_metrics                       # CPU defaults, about 1 min on 2 cores
    python -m benchmarks.retrieval_metrics --device cuda         # GPU; baseline on all queries by default
    python -m benchmarks.retrieval_metrics --queries 2000 --database 20000 --dim 128
"""

import time

import torch

from benchmarks.harness import MIB, PeakMemory, argument_parser, print_result, print_table, run_worker, setup
from src.metrics.retrieval import (
    count_relevant,
    hit_matrix,
    metrics_from_hits,
    retrieval_metrics,
    retrieval_topk,
)
from src.metrics.search import bf16_rerank_topk

WORKER_OPTIONS = (
    "queries",
    "database",
    "dim",
    "labels",
    "ks",
    "chunk_size",
    "baseline_queries",
    "device",
    "seed",
)


def make_data(n_queries: int, n_database: int, dim: int, n_labels: int, seed: int):
    """Seeded synthetic embeddings with a label signal: unit vectors of (class centre * 0.3 + N(0, 1) noise).

    Returns query (Q, D), database (N, D) float32 and one-hot bool labels (Q, L), (N, L), all on CPU. Built in
    place and in blocks so that generating the data does not raise the process's peak RSS above its final
    size.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_labels, dim, generator=g) * 0.3

    def embed(n):
        ids = torch.randint(n_labels, (n,), generator=g)
        x = torch.randn(n, dim, generator=g)
        for start in range(0, n, 65536):
            x[start : start + 65536] += centres[ids[start : start + 65536]]
        x /= x.norm(dim=1, keepdim=True)
        labels = torch.zeros(n, n_labels, dtype=torch.bool)
        labels[torch.arange(n), ids] = True
        return x, labels

    query, query_labels = embed(n_queries)
    database, database_labels = embed(n_database)
    return query, database, query_labels, database_labels


def full_argsort_metrics(query, database, query_labels, database_labels, ks):
    """Baseline: full (Q, N) similarity matrix and a full argsort of every row, then the shared metric
    math."""
    sims = query @ database.T  # (Q, N)
    order = torch.argsort(sims, dim=1, descending=True)  # (Q, N) int64
    indices = order[:, : max(ks)]
    hits = hit_matrix(query_labels, database_labels, indices)
    return metrics_from_hits(hits, count_relevant(query_labels, database_labels), ks)


def chunked_bf16_metrics(query, database, query_labels, database_labels, ks, chunk_size):
    """`retrieval_metrics(precision="bf16_rerank")` step by step, keeping the search's statistics: (metrics,
    top-k indices, stats)."""
    k = min(max(ks), database.shape[0])
    _, indices, stats = bf16_rerank_topk(query, database, k, chunk_size=chunk_size, database_chunk_size=None)
    hits = hit_matrix(query_labels, database_labels, indices)
    metrics = metrics_from_hits(hits, count_relevant(query_labels, database_labels), ks)
    return metrics, indices, stats


def row_keys(indices: torch.Tensor) -> list[int]:
    """One integer per query that changes when any of its retrieved indices or their order does."""
    weights = torch.randint(1, 2**20, (indices.shape[1],), generator=torch.Generator().manual_seed(0))
    return (indices.cpu().long() * weights).sum(dim=1).tolist()


def bf16_matmul_seconds(query, database, chunk_size: int) -> float:
    """The bf16 products of the chunked search alone (bf16 copies made outside the clock)."""
    query, database = query.bfloat16(), database.bfloat16()
    sync = torch.cuda.synchronize if query.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for q0 in range(0, query.shape[0], chunk_size):
        if query.is_cuda:
            torch.mm(query[q0 : q0 + chunk_size], database.T, out_dtype=torch.float32)
        else:
            query[q0 : q0 + chunk_size] @ database.T
    sync()
    return time.perf_counter() - start


def time_phases(method: str, query, database, query_labels, database_labels, ks, chunk_size: int) -> dict:
    """Seconds spent in each phase of `method` ("chunked" or "full"), run step by step, a clock around each.

    "chunked" repeats `retrieval_metrics` chunk by chunk (one matrix product and one torch.topk per chunk),
    "full" repeats `full_argsort_metrics`. The phases add up to about the timed call.
    """
    sync = torch.cuda.synchronize if query.is_cuda else (lambda: None)
    phases = {"matmul": 0.0, "select": 0.0}
    k = min(max(ks), database.shape[0])
    parts = []
    step = chunk_size if method == "chunked" else query.shape[0]
    for start in range(0, query.shape[0], step):
        sync()
        t0 = time.perf_counter()
        sims = query[start : start + step] @ database.T  # (c, N)
        sync()
        t1 = time.perf_counter()
        if method == "chunked":
            parts.append(torch.topk(sims, k, dim=1, largest=True, sorted=True).indices)
        else:
            parts.append(torch.argsort(sims, dim=1, descending=True)[:, :k])
        sync()
        phases["matmul"] += t1 - t0
        phases["select"] += time.perf_counter() - t1
        del sims
    indices = torch.cat(parts)
    t0 = time.perf_counter()
    hits = hit_matrix(query_labels, database_labels, indices)
    sync()
    t1 = time.perf_counter()
    n_relevant = count_relevant(query_labels, database_labels)
    sync()
    t2 = time.perf_counter()
    metrics_from_hits(hits, n_relevant, ks)
    phases.update(hits=t1 - t0, count_relevant=t2 - t1, metrics=time.perf_counter() - t2)
    return phases


def measure(args) -> dict:
    """One method (`args.worker`) in this fresh process: time, peak memory rise, metrics and phase times."""
    device = torch.device(args.device)
    n_queries = args.baseline_queries if args.worker == "full" else args.queries
    query, database, query_labels, database_labels = make_data(
        args.queries, args.database, args.dim, args.labels, args.seed
    )
    query, query_labels = query[:n_queries].clone().to(device), query_labels[:n_queries].clone().to(device)
    database, database_labels = database.to(device), database_labels.to(device)
    ks = tuple(args.ks)

    found = {}

    def method(q, ql):
        if args.worker == "chunked":
            kwargs = {"ks": ks, "chunk_size": args.chunk_size, "precision": "float32"}
            return retrieval_metrics(q, database, ql, database_labels, **kwargs)
        if args.worker == "chunked_bf16":
            metrics, found["indices"], found["stats"] = chunked_bf16_metrics(
                q, database, ql, database_labels, ks, args.chunk_size
            )
            return metrics
        return full_argsort_metrics(q, database, ql, database_labels, ks)

    method(query[:8], query_labels[:8])  # warm-up: kernel / BLAS initialisation stays out of the timing
    memory = PeakMemory(device)
    memory.reset()
    start = time.perf_counter()
    metrics = method(query, query_labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {"queries": n_queries, "seconds": time.perf_counter() - start, "peak_bytes": memory.rise()}
    result.update(note=memory.note, metrics=metrics, threads=torch.get_num_threads())
    if args.worker == "chunked_bf16":
        result["recomputed"] = found["stats"]["recomputed"]
        result["row_keys"] = row_keys(found["indices"])
        result["matmul_bf16"] = bf16_matmul_seconds(query, database, args.chunk_size)
        return result
    result["phases"] = time_phases(
        args.worker, query, database, query_labels, database_labels, ks, args.chunk_size
    )
    if args.worker == "chunked":
        k = min(max(ks), database.shape[0])
        _, indices = retrieval_topk(query, database, k, args.chunk_size, precision="float32")
        result["row_keys"] = row_keys(indices)
    if args.worker == "chunked":  # reference values on the baseline's queries, outside the measurement
        n_shared = min(args.baseline_queries, n_queries)
        result["shared_metrics"] = method(query[:n_shared], query_labels[:n_shared])
    return result


def print_phases(args, ours: dict, base: dict, scale: float) -> None:
    """Per-phase seconds of both methods at Q = --queries, their shares, and the matrix-product ceiling."""
    names = {
        "matmul": "matrix product Q x N x D",
        "select": "top-k (ours) / full argsort (baseline)",
        "hits": "hit_matrix",
        "count_relevant": "count_relevant",
        "metrics": "metrics_from_hits",
    }
    ours_phases = ours["phases"]
    base_phases = {name: seconds * scale for name, seconds in base["phases"].items()}
    ours_total, base_total = sum(ours_phases.values()), sum(base_phases.values())
    rows = [
        {
            "phase": label,
            "ours": ours_phases[key],
            "ours_share": ours_phases[key] / ours_total,
            "base": base_phases[key],
            "base_share": base_phases[key] / base_total,
        }
        for key, label in names.items()
    ]
    rows.append({"phase": "sum of phases", "ours": ours_total, "base": base_total})
    print(f"\nphases at Q={args.queries} (timed one by one after the measured call; baseline x{scale:.1f}):")
    columns = [("phase", "phase", ""), ("ours", "chunked (s)", ".2f"), ("ours_share", "share", ".0%")]
    print_table(rows, columns + [("base", "baseline (s)", ".2f"), ("base_share", "share", ".0%")])
    flop = 2.0 * args.queries * args.database * args.dim
    print(
        f"matrix product throughput: chunked {flop / ours_phases['matmul'] / 1e9:.0f} GFLOP/s, "
        f"baseline {flop / base_phases['matmul'] / 1e9:.0f} GFLOP/s (float32, {ours['threads']} torch "
        "threads)"
    )
    print(
        f"ceiling for any exact float32 method, baseline time / our matrix product alone: "
        f"{base_total / ours_phases['matmul']:.1f}x from the phases, "
        f"{base['seconds'] * scale / ours_phases['matmul']:.1f}x from the measured baseline call (the two "
        "baseline timings differ when other processes share the CPU)"
    )


def print_bf16(args, ours: dict, bf16: dict) -> None:
    """The bf16 search against the float32 one and against both matrix-product references."""
    flop = 2.0 * args.queries * args.database * args.dim
    same = sum(a == b for a, b in zip(bf16["row_keys"], ours["row_keys"], strict=True))
    diff = max(abs(bf16["metrics"][key] - ours["metrics"][key]) for key in ours["metrics"])
    rows = [
        {"method": "float32 matrix product alone", "seconds": ours["phases"]["matmul"]},
        {"method": "bf16 matrix product alone", "seconds": bf16["matmul_bf16"]},
        {"method": "chunked top-k float32", "seconds": ours["seconds"]},
        {"method": "chunked top-k bf16 + re-rank", "seconds": bf16["seconds"]},
    ]
    for row in rows:
        row["gflops"] = flop / row["seconds"] / 1e9
        row["speedup"] = ours["seconds"] / row["seconds"]
    print(f"\nbf16 + exact re-ranking at Q={args.queries} (peak rise {bf16['peak_bytes'] / MIB:.1f} MiB):")
    columns = [("method", "method", ""), ("seconds", "time (s)", ".2f"), ("gflops", "GFLOP/s", ".0f")]
    print_table(rows, columns + [("speedup", "float32 search / this", ".2f")])
    print(
        f"bf16 search: {bf16['matmul_bf16'] / bf16['seconds']:.0%} of the bf16 product alone, "
        f"{ours['phases']['matmul'] / bf16['seconds']:.0%} of the float32 one; {bf16['recomputed']} of "
        f"{args.queries} queries searched again in float32; top {max(args.ks)} equal to float32's (indices, in "
        f"order) for {same} of {args.queries} queries; max |metric difference| {diff:.1e}"
    )


def print_report(args, ours: dict, base: dict) -> None:
    scale = args.queries / base["queries"]
    base_seconds, base_bytes = base["seconds"] * scale, base["peak_bytes"] * scale
    memory_kind = "CUDA peak allocated rise" if args.device.startswith("cuda") else "peak RSS rise"
    print(
        f"\nRetrieval metrics benchmark: Q={args.queries} queries, N={args.database} database, D={args.dim}, "
        f"L={args.labels} one-hot labels, ks={tuple(args.ks)}, device={args.device}, "
        f"chunk_size={args.chunk_size}, torch threads={ours['threads']}"
    )
    rows = [
        {"method": "chunked top-k (retrieval_metrics)", **ours},
        {"method": "full argsort baseline, measured", **base},
    ]
    if scale != 1:
        rows.append(
            {
                "method": f"full argsort baseline, EXTRAPOLATED x{scale:.1f}",
                "queries": args.queries,
                "seconds": base_seconds,
                "peak_bytes": base_bytes,
            }
        )
    for row in rows:
        row["peak_mib"] = row["peak_bytes"] / MIB
        row["method"] += f" ({row['note']})" if row.get("note") else ""
    columns = [("method", "method", ""), ("queries", "queries", "d"), ("seconds", "wall time (s)", ".2f")]
    print_table(rows, columns + [("peak_mib", f"{memory_kind} (MiB)", ".1f")])
    if scale != 1:
        print(
            f"  baseline time and memory extrapolated linearly from {base['queries']} to {args.queries} "
            "queries (both are dominated by the Q x N similarity and argsort matrices)"
        )
    print(f"speed-up (baseline / chunked) at Q={args.queries}: {base_seconds / ours['seconds']:.1f}x")
    memory_ratio = base_bytes / max(ours["peak_bytes"], 1)
    print(f"memory ratio (baseline / chunked) at Q={args.queries}: {memory_ratio:.1f}x")
    print_phases(args, ours, base, scale)
    shared = ours["shared_metrics"]
    diff = max(abs(shared[key] - base["metrics"][key]) for key in shared)
    print(f"\nmetrics agree on the {base['queries']} shared queries: max |chunked - baseline| = {diff:.2e}")
    print("chunked metrics on all queries:")
    for k in args.ks:
        values = "  ".join(
            f"{name}@{k}={ours['metrics'][f'{name}@{k}']:.4f}" for name in ("mAP", "recall", "MRR")
        )
        print(f"  {values}  standardAP@{k}={ours['metrics'][f'standardAP@{k}']:.4f}")


def parse_args(argv=None):
    parser = argument_parser(__doc__, workers=("chunked", "chunked_bf16", "full"))
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--database", type=int, default=100000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--labels", type=int, default=1000, help="number of one-hot classes")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 + re-rank search")
    parser.add_argument(
        "--baseline-queries",
        type=int,
        default=None,
        help="queries of the full-argsort baseline (default 1000 on CPU, all on CUDA), extrapolated linearly",
    )
    args = parser.parse_args(argv)
    if args.baseline_queries is None:
        args.baseline_queries = args.queries if args.device.startswith("cuda") else min(1000, args.queries)
    if not 1 <= args.baseline_queries <= args.queries:
        parser.error(
            f"--baseline-queries must be in [1, --queries={args.queries}], got {args.baseline_queries}"
        )
    return args


def main(argv=None) -> tuple[dict, dict]:
    """Runs both methods, each in a fresh process, prints the report and returns (chunked, baseline)
    results."""
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        print_result(measure(args))
        return {}, {}
    setup(args)
    options = {name: getattr(args, name) for name in WORKER_OPTIONS} | {"threads": torch.get_num_threads()}
    print(f"running chunked top-k on {args.queries} queries ...", flush=True)
    ours = run_worker("retrieval_metrics", "chunked", options)
    print(f"running full-argsort baseline on {args.baseline_queries} queries ...", flush=True)
    base = run_worker("retrieval_metrics", "full", options)
    print_report(args, ours, base)
    if not args.no_bf16:
        print(f"\nrunning chunked top-k, bf16 + re-rank, on {args.queries} queries ...", flush=True)
        bf16 = run_worker("retrieval_metrics", "chunked_bf16", options)
        print_bf16(args, ours, bf16)
        ours["bf16"] = bf16
    return ours, base


if __name__ == "__main__":
    main()
