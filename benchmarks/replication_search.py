"""Benchmark: exact top-1 search of generations in a training set against this machine's matrix-product
throughput and against the DCR code's full similarity matrix: time, throughput, peak memory.

The replication report (`python -m src.replicate`, docs/replication.md#dcr-measurement) needs each
generation's most similar training image. Every exact method computes the same G x N x D inner products, so
the fastest any of them can be is the time of those products alone. Variants, measured in the same run on the
same seeded random features (G generations, N training images, D dims, float32, L2-normalised):

- matmul, matmul_numpy: the throughput references. The (chunk_size x database_chunk_size) products that
  `search_topk`'s torch backend computes, into a preallocated tile, and nothing else: no top-k, no merge, no
  allocation; `torch.mm` (torch's BLAS, MKL in the PyPI wheels) and `np.matmul` (numpy's OpenBLAS, the kind of
  BLAS faiss-cpu links). Their GFLOP/s (2 G N D / time) is what this machine's float32 matrix product reaches
  on these shapes; the faster of the two is the reference, and "% of matmul" of a search is reference time /
  search time (the target is >= 60%). On AMD CPUs MKL can trail OpenBLAS, so faiss may beat torch.mm.
- auto: `search_topk(generated, train, k=1)` with default settings, as `src.replicate` calls it. On CPU
  backend="auto" hands float32 searches with N >= 50,000 to faiss, so at the default sizes it is the faiss
  row.
- matmul_tf32 (CUDA only): the float32 products with TF32 tensor cores allowed (10-bit mantissa inputs): the
  GPU's fast float32 path, which the exact searches do not take.
- matmul_bf16: the same products from bf16 copies of both inputs (float32 accumulation; bf16 output on the
  CPU, float32 on CUDA): the reference of the bf16 search, "% bf16 matmul".
- torch, torch_half: `search_topk(backend="torch", precision="float32")`, and with `half=True` (the database
  stored in float16; on CPU each block is upcast to float32 once, so the products stay float32).
- bf16_rerank: `bf16_rerank_topk` (`search_topk(precision="bf16_rerank")`, docs/replication.md#exact-search-at-
  bf16-speed): bf16 candidates, float64 re-scoring, a proof per query, float32 for the queries without one; the
  table gives the queries searched again in float32 and whether every top-1 equals the float32 search's.
- faiss: `search_topk(backend="faiss")`, exact faiss.IndexFlatIP (CPU only).
- dcr: the official DCR code (somepago/DCR `diff_retrieval.py`): `sim = torch.mm(train, generated.T)`, the
  full (N, G) float32 matrix, then `sim.T.topk(1, dim=1)`. At 10k x 100k that matrix is 4 GB: when it would
  take more than a quarter of the available memory, the baseline runs on the first `--baseline-queries`
  generations and its time and memory are extrapolated linearly in G (both are dominated by the N x G matrix),
  and the table says so.

Each variant runs in a fresh Python process with the same torch / faiss thread count, after one warm-up call
on 8 generations. Peak memory is the rise of the peak RSS above the RSS just before the call on CPU, of the
CUDA allocator's peak on GPU. The top-1 indices and scores of every variant are compared with the DCR
baseline's on the generations they share.

Reference run at the default sizes (2 AMD EPYC vCPUs, otherwise idle, before the numpy reference was added):
torch.mm 8.5 s (121 GFLOP/s); search_topk default (-> faiss) 6.1 s, faster than torch.mm (faiss's OpenBLAS
beats MKL on this AMD CPU); search_topk torch float32 10.0 s (85% of torch.mm), half storage 10.8 s; DCR 34.5
s. Peak memory: 375 MiB for the torch search (one 1024 x 65536 tile plus top-k buffers), 520 MiB with half
storage on CPU (the float16 copy and each upcast block come on top of the caller's float32 features), DCR 3.8
GiB. The same commands on the CPU shared with other jobs run 3-4x slower (about 6 minutes in all instead of
1.5).

bf16 + re-rank (2026-11-27): on one H200, 10,000 x 100,000 x 512, 0.06 s against 0.08 s for the float32 search
(float32 product 17 TFLOP/s, TF32 279, bf16 68), no query searched again, every top-1 equal to float32's; on 2 AMD
EPYC Zen 3 vCPUs without native bf16 (torch emulates it: 14 GFLOP/s against 80 in float32), 2,000 generations,
15.75 s against 2.97 s, 92% of the bf16 product's own time, one query searched again, every top-1 equal.

    python -m benchmarks.replication_search              # 10,000 x 100,000 x 512
    python -m benchmarks.replication_search --small      # 1,000 x 10,000 x 512, under half a minute
    python -m benchmarks.replication_search --device cuda
"""

import importlib.util
import time

import numpy as np
import torch

from benchmarks.harness import (
    MIB,
    PeakMemory,
    argument_parser,
    check_positive,
    print_result,
    print_table,
    run_worker,
    setup,
)
from src.metrics.search import (
    AUTO_BF16_MIN_PRODUCTS,
    FAISS_MIN_DATABASE,
    bf16_is_native,
    bf16_rerank_topk,
    search_topk,
)
from src.replication.store_search import available_memory

SIZES = {"generated": 10_000, "train": 100_000, "dim": 512}
SMALL_SIZES = {"generated": 1_000, "train": 10_000, "dim": 512}
VARIANTS = (
    "matmul",
    "matmul_numpy",
    "matmul_tf32",
    "matmul_bf16",
    "auto",
    "torch",
    "torch_half",
    "bf16_rerank",
    "faiss",
    "dcr",
)
LABELS = {
    "matmul": "matmul reference torch.mm (no top-k)",
    "matmul_numpy": "matmul reference numpy (no top-k)",
    "matmul_tf32": "matmul reference torch.mm TF32 (no top-k, CUDA)",
    "matmul_bf16": "matmul reference torch.mm bf16 (no top-k)",
    "auto": "search_topk default",
    "torch": "search_topk torch float32",
    "torch_half": "search_topk torch half storage",
    "bf16_rerank": "search_topk bf16 + float64 re-rank",
    "faiss": "faiss IndexFlatIP",
    "dcr": "DCR full matrix + topk",
}
# Tile of search_topk's torch backend at its defaults (chunk_size, database_chunk_size), used by `matmul`.
CHUNK_SIZE, DATABASE_CHUNK_SIZE = 1024, 65536


def make_features(n_generated: int, n_train: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random unit vectors: generated (G, D) and train (N, D) float32 on the CPU (normalised in
    place)."""
    g = torch.Generator().manual_seed(seed)
    generated = torch.randn(n_generated, dim, generator=g)
    train = torch.randn(n_train, dim, generator=g)
    generated /= generated.norm(dim=1, keepdim=True)
    train /= train.norm(dim=1, keepdim=True)
    return generated, train


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def auto_backend(args) -> str:
    """What `search_topk` picks at its defaults (precision="auto", backend="auto"; mirrors its rules, for the
    table)."""
    if bf16_is_native(args.device) and args.generated * args.train * args.dim >= AUTO_BF16_MIN_PRODUCTS:
        # top-1: k = 1 <= AUTO_BF16_MAX_K
        return "bf16_rerank"
    cpu = torch.device(args.device).type == "cpu"
    return "faiss" if cpu and args.train >= FAISS_MIN_DATABASE and faiss_installed() else "torch"


def matmul_only(
    generated: torch.Tensor, train: torch.Tensor, numpy: bool = False, bf16: bool = False
) -> None:
    """The products of search_topk's torch backend, tile by tile into a preallocated tile, without the top-k;
    with `numpy`, through numpy's BLAS (OpenBLAS in the numpy wheels, as faiss-cpu's; torch uses MKL); with
    `bf16`, from bf16 copies (bf16 tile on the CPU, float32 accumulation and tile on CUDA)."""
    if numpy:
        generated, train = generated.numpy(), train.numpy()
    if bf16:
        generated, train = generated.bfloat16(), train.bfloat16()
    cuda_bf16 = bf16 and train.is_cuda
    for d0 in range(0, len(train), DATABASE_CHUNK_SIZE):
        block = train[d0 : d0 + DATABASE_CHUNK_SIZE]  # (n, D)
        if numpy:  # one tile per block width
            tile, product = np.empty((CHUNK_SIZE, len(block)), dtype=np.float32), np.matmul
        elif cuda_bf16:
            tile = torch.empty(CHUNK_SIZE, len(block), device=block.device)

            def product(a, b, out):
                out.copy_(torch.mm(a, b, out_dtype=torch.float32))  # the copy is a small share of the product
        else:
            tile = torch.empty(CHUNK_SIZE, len(block), device=block.device, dtype=block.dtype)
            product = torch.mm
        for q0 in range(0, len(generated), CHUNK_SIZE):
            chunk = generated[q0 : q0 + CHUNK_SIZE]  # (c, D)
            product(chunk, block.T, out=tile[: len(chunk)])  # (c, n), rows of a contiguous tile


def dcr_top1(generated: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DCR `diff_retrieval.py`: the full (N, G) similarity matrix, then the top 1 of each generation."""
    sim = torch.mm(train, generated.T)  # (N, G)
    scores, indices = sim.T.topk(1, dim=1)  # (G, 1) each
    return scores, indices


def run_search(variant: str, generated: torch.Tensor, train: torch.Tensor):
    """One variant's top-1 search; (scores (G, 1), indices (G, 1)[, stats of bf16_rerank]), or None for the
    matmul references."""
    if variant == "matmul_tf32":
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return matmul_only(generated, train)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed
    if variant.startswith("matmul"):
        return matmul_only(generated, train, numpy=variant == "matmul_numpy", bf16=variant == "matmul_bf16")
    if variant == "dcr":
        return dcr_top1(generated, train)
    if variant == "auto":
        return search_topk(generated, train, k=1)
    if variant == "bf16_rerank":
        return bf16_rerank_topk(generated, train, k=1)
    if variant == "torch_half":
        return search_topk(generated, train, k=1, backend="torch", half=True, precision="float32")
    return search_topk(generated, train, k=1, backend=variant, precision="float32")


def measure(variant: str, args) -> dict:
    """Time and peak memory of one variant in this process; its top-1 scores and indices (none for matmul)."""
    if faiss_installed():
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    device = torch.device(args.device)
    generated, train = make_features(args.generated, args.train, args.dim, args.seed)
    n_generated = args.baseline_queries if variant == "dcr" else args.generated
    generated, train = generated[:n_generated].clone().to(device), train.to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    # warm-up: BLAS / kernel / thread-pool start-up stays out (the default search on 8 generations would take
    # the float32 path: warm up the path it takes on all of them)
    warm = "bf16_rerank" if variant == "auto" and auto_backend(args) == "bf16_rerank" else variant
    run_search(warm, generated[:8], train)
    sync()
    memory = PeakMemory(device)
    memory.reset()
    start = time.perf_counter()
    found = run_search(variant, generated, train)
    sync()
    result = {"variant": variant, "generated": n_generated, "seconds": time.perf_counter() - start}
    result.update(peak_bytes=memory.rise(), note=memory.note, threads=torch.get_num_threads())
    if found is not None:
        scores, indices = found[:2]
        if len(found) == 3:
            result["recomputed"] = found[2]["recomputed"]
        result["scores"] = scores[:, 0].float().cpu().tolist()
        result["indices"] = indices[:, 0].cpu().tolist()
    return result


def default_baseline_queries(args) -> int:
    """All generations when the baseline's (N, G) float32 matrix fits in a quarter of the available memory
    (MemAvailable on CPU, free memory on CUDA); otherwise as many as fit, for a linear extrapolation."""
    available = available_memory(torch.device(args.device)) or 8 * 2**30  # no /proc: assume 8 GiB
    fits = int(available / 4 / (4 * args.train))
    return max(1, min(args.generated, fits))


def summarise(args, results: dict[str, dict]) -> list[dict]:
    """One table row per variant at G = --generated: seconds, GFLOP/s, % of matmul, peak memory, the ratios to
    the DCR baseline (extrapolated linearly in G when it ran on fewer generations) and top-1 agreement with
    it."""
    flop = 2.0 * args.generated * args.train * args.dim
    base = results["dcr"]
    scale = args.generated / base["generated"]
    base_seconds, base_bytes = base["seconds"] * scale, base["peak_bytes"] * scale
    matmul_seconds = min(results[v]["seconds"] for v in ("matmul", "matmul_numpy") if v in results)
    bf16_seconds = results["matmul_bf16"]["seconds"] if "matmul_bf16" in results else None
    float32 = results.get("torch")
    rows = []
    for variant, result in results.items():
        seconds = base_seconds if variant == "dcr" else result["seconds"]
        peak = base_bytes if variant == "dcr" else result["peak_bytes"]
        label = LABELS[variant] + (f" (-> {auto_backend(args)})" if variant == "auto" else "")
        extrapolated = variant == "dcr" and scale != 1
        label += (" EXTRAPOLATED" if extrapolated else "") + (
            f" ({result['note']})" if result["note"] else ""
        )
        row = {
            "variant": variant,
            "label": label,
            "generated": args.generated,
            "measured_generated": result["generated"],
            "seconds": seconds,
            "gflops": flop / seconds / 1e9,
            "of_matmul": matmul_seconds / seconds,
            "of_bf16_matmul": None if bf16_seconds is None else bf16_seconds / seconds,
            "recomputed": result.get("recomputed"),
            "peak_mib": peak / MIB,
            "dcr_time_ratio": base_seconds / seconds,
            "dcr_memory_ratio": base_bytes / max(peak, 1),
            "extrapolated": extrapolated,
        }
        if "indices" in result:
            shared = min(base["generated"], len(result["indices"]))
            indices = zip(result["indices"][:shared], base["indices"][:shared], strict=True)
            scores = zip(result["scores"][:shared], base["scores"][:shared], strict=True)
            agree = sum(a == b for a, b in indices)
            diff = max(abs(a - b) for a, b in scores)
            row.update(agree=agree, compared=shared, top1=f"{agree}/{shared}", max_score_diff=diff)
            if float32 is not None and variant != "dcr":
                same = sum(a == b for a, b in zip(result["indices"], float32["indices"], strict=True))
                row["float32_top1"] = f"{same}/{len(result['indices'])}"
        rows.append(row)
    return rows


def print_report(args, rows: list[dict], threads: int) -> None:
    print(
        f"\nReplication search benchmark: top-1 of G={args.generated} generations in N={args.train} training "
        f"images, D={args.dim}, float32 L2-normalised random features, device={args.device}, "
        f"threads={threads}"
    )
    columns = [
        ("label", "variant", ""),
        ("measured_generated", "measured G", "d"),
        ("seconds", "time (s)", ".2f"),
        ("gflops", "GFLOP/s", ".0f"),
        ("of_matmul", "% matmul", ".0%"),
        ("of_bf16_matmul", "% bf16 matmul", ".0%"),
        ("peak_mib", "peak (MiB)", ".1f"),
        ("dcr_time_ratio", "DCR time/", ".1f"),
        ("dcr_memory_ratio", "DCR mem/", ".1f"),
        ("top1", "top-1 = DCR", ""),
        ("float32_top1", "= float32", ""),
        ("recomputed", "float32 again", "d"),
        ("max_score_diff", "max |ds|", ".1e"),
    ]
    print_table(rows, columns)
    base = next(row for row in rows if row["variant"] == "dcr")
    if base["extrapolated"]:
        print(
            f"  DCR baseline measured on {base['measured_generated']} of the {args.generated} generations "
            f"(--baseline-queries; its full (N, G) matrix would take "
            f"{4 * args.train * args.generated / MIB:.0f} MiB): its time and memory are extrapolated "
            "linearly in G"
        )
    print(
        "  % matmul: the faster float32 matmul reference's time / variant time (target >= 60% for "
        "search_topk); % bf16 matmul: the bf16 reference's; DCR time/ and DCR mem/: the DCR baseline's time and "
        "peak memory over the variant's; top-1 = DCR: top-1 indices equal to the baseline's on the generations "
        "both searched; max |ds|: largest top-1 score difference there; = float32: top-1 indices equal to the "
        "torch float32 search's; float32 again: queries the bf16 search could not prove, searched in float32"
    )


def parse_args(argv=None):
    parser = argument_parser(__doc__, workers=VARIANTS)
    parser.add_argument(
        "--small", action="store_true", help=f"quick run at {SMALL_SIZES} unless sizes are given"
    )
    parser.add_argument("--generated", type=int, help=f"G (default {SIZES['generated']})")
    parser.add_argument("--train", type=int, help=f"N (default {SIZES['train']})")
    parser.add_argument("--dim", type=int, help=f"D (default {SIZES['dim']})")
    parser.add_argument(
        "--baseline-queries",
        type=int,
        help="generations searched by the DCR baseline (default: all when its matrix fits in a quarter of "
        "the available memory); its time and memory are extrapolated linearly to G",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="variants to run (matmul and dcr are always run: the ratios need them)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every variant in this process (quick checks; memory peaks less isolated)",
    )
    args = parser.parse_args(argv)
    for name, value in (SMALL_SIZES if args.small else SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_positive(parser, args, ("generated", "train", "dim"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.baseline_queries is None:
        args.baseline_queries = default_baseline_queries(args)
    if not 1 <= args.baseline_queries <= args.generated:
        parser.error(
            f"--baseline-queries must be in [1, --generated={args.generated}], got {args.baseline_queries}"
        )
    return args


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows (see `summarise`)."""
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        print_result(measure(args.worker, args))
        return []
    setup(args)
    variants = [v for v in VARIANTS if v in {"matmul", "dcr", *args.variants}]
    if args.device.startswith("cuda"):
        variants = [v for v in variants if v not in ("faiss", "matmul_numpy")]
        print("faiss and numpy matmul skipped: they run on the CPU only", flush=True)
    else:
        variants = [v for v in variants if v != "matmul_tf32"]
    options = {
        name: getattr(args, name) for name in ("generated", "train", "dim", "baseline_queries", "device")
    }
    options.update(seed=args.seed, threads=torch.get_num_threads())
    results = {}
    for variant in variants:
        n = args.baseline_queries if variant == "dcr" else args.generated
        print(f"running {LABELS[variant]} on {n} generations ...", flush=True)
        if args.in_process:
            results[variant] = measure(variant, args)
        else:
            results[variant] = run_worker("replication_search", variant, options)
    rows = summarise(args, results)
    print_report(args, rows, torch.get_num_threads())
    return rows


if __name__ == "__main__":
    main()
