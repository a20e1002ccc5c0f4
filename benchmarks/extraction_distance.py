"""Benchmark: the batched tiled l2 of the extraction attack against a per-pair loop and against this machine's
matrix-product throughput: pairs per second, time, peak memory.

Generate and filter (docs/attacks.md#generate-and-filter) compares every pair of the K generations of one
prompt (500 in Carlini et al. 2023) by tiled l2: a 4 x 4 grid of tiles, the maximum over the tiles of their
normalised l2. Rows, measured in the same run on K seeded uniform random images of 3 x S x S pixels:

- batched: `src.metrics.extraction.tiled_l2(x, x)`, all K x K ordered pairs, by batched matrix products over
  the tile axis;
- loop: the per-pair reference one writes first, one pair at a time (the difference, cut into tiles, the mean
  square of each tile, its square root, the maximum), timed on --loop-pairs seeded random pairs and
  extrapolated to K x K;
- matmul bound: the pairs per second that the matrix products alone allow (2 T t = 2 d FLOPs per pair, T tiles
  of t values, d = 3 S^2), at the throughput of a plain torch.mm of (K, d) x (d, K) on the same device: the
  ceiling of any method built on the expansion ||a||^2 + ||b||^2 - 2 a.b.

"x loop" is pairs per second over the loop's. Every row runs once untimed, then in windows interleaved
A B C C B A ... (benchmarks/harness.py), and the table gives medians. Peak memory is the rise of the peak RSS
(CPU) or of the CUDA allocator's peak (GPU) during one call on fresh inputs, each variant in a fresh process
(`harness.run_worker`; in this process with --in-process, where memory freed by earlier calls hides part of
the rise). The loop's distances are compared with the batched ones on the loop's pairs (max |d - loop|).

Reference run at the defaults (2 AMD EPYC vCPUs shared with other jobs, so 1 torch thread): batched 0.117 s
for the 250,000 pairs, 2.1e6 pairs/s, 134x the loop (1.6e4 pairs/s, 15.7 s extrapolated) and 73% of the
matmul bound (2.9e6 pairs/s, 72 GFLOP/s); peak 48 MiB (the tiles' copy of the images and one 16 x 500 x 500
block of products); batched and loop agree within 3e-7.

On one NVIDIA H200 (torch 2.11, CUDA 13; 2026-11-27): at 512 px, batched 0.030 s for the 250,000 pairs, 8.3e6
pairs/s, 803x the loop (1.0e4 pairs/s, 24.1 s extrapolated: one pair is a few kernel launches) and 29% of the
matmul bound (2.8e7 pairs/s: torch.mm at 44.7 TFLOP/s in float32); peak 1,548 MiB; agreement 7.7e-6.
At 64 px: 1.3 ms, 1.7e8 pairs/s, 9,907x the loop, 19% of the bound (launch overheads dominate at this size).

    python -m benchmarks.extraction_distance                              # K = 500 at 64 px, CPU, about 20 s
    python -m benchmarks.extraction_distance --size 512 --device cuda     # the paper's image size
"""

import statistics
import time

import torch

from benchmarks.harness import (
    MIB,
    PeakMemory,
    argument_parser,
    check_positive,
    interleave,
    print_result,
    print_table,
    run_worker,
    setup,
)
from src.metrics.extraction import tiled_l2

VARIANTS = ("batched", "loop", "matmul")
LABELS = {
    "batched": "tiled_l2 batched",
    "loop": "per-pair loop",
    "matmul": "matmul bound (torch.mm)",
}


def make_images(count: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded uniform random images (count, 3, size, size) in [0, 1], float32 on `device`."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=g).to(device)


def loop_pairs(count: int, pairs: int, seed: int) -> list[tuple[int, int]]:
    """`pairs` seeded random ordered pairs (i, j) of range(count)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, count, (pairs, 2), generator=g).tolist()


def pair_tiled_l2(a: torch.Tensor, b: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tiled l2 of one pair of (C, H, W) images: the maximum over the tiles of their normalised l2."""
    channels, height, width = a.shape
    rows, columns = grid
    tiles = (a - b).reshape(channels, rows, height // rows, columns, width // columns)
    return tiles.pow(2).mean(dim=(0, 2, 4)).sqrt().max()


def loop_tiled_l2(images: torch.Tensor, pairs: list[tuple[int, int]], grid: tuple[int, int]) -> torch.Tensor:
    """(P,) tiled l2 of each pair, one pair at a time."""
    out = torch.empty(len(pairs), device=images.device)
    for index, (i, j) in enumerate(pairs):
        out[index] = pair_tiled_l2(images[i], images[j], grid)
    return out


def plain_matmul(images: torch.Tensor) -> torch.Tensor:
    """(K, K) products of the flattened images: the same 2 K^2 d FLOPs as the batched tiled l2."""
    flat = images.reshape(len(images), -1)
    return torch.mm(flat, flat.T)


def variant_calls(args, images: torch.Tensor, pairs: list) -> dict:
    """{variant: a call computing its distances or products}."""
    grid = tuple(args.grid)
    return {
        "batched": lambda: tiled_l2(images, images, grid),
        "loop": lambda: loop_tiled_l2(images, pairs, grid),
        "matmul": lambda: plain_matmul(images),
    }


def timed(call, device: torch.device) -> dict:
    """{"seconds"} of one call (synchronised on CUDA)."""
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start}


def time_variants(args, images: torch.Tensor, pairs: list) -> dict[str, list[dict]]:
    """Each variant once untimed, then `args.repeats` interleaved timed calls: {variant: [{"seconds"}]}."""
    calls = variant_calls(args, images, pairs)
    for call in calls.values():
        call()
    runs = {name: (lambda call=call: timed(call, images.device)) for name, call in calls.items()}
    return interleave(runs, args.repeats, lambda result: f"{result['seconds'] * 1e3:.1f} ms")


def peak_of(variant: str, args) -> dict:
    """{"peak": bytes, "note"}: the rise of peak memory during one call of `variant`, on fresh inputs."""
    device = torch.device(args.device)
    images = make_images(args.generations, args.size, args.seed, device)
    call = variant_calls(args, images, loop_pairs(args.generations, args.loop_pairs, args.seed))[variant]
    memory = PeakMemory(device)
    memory.reset()
    timed(call, device)
    return {"peak": memory.rise(), "note": memory.note}


def peaks(args) -> dict[str, dict]:
    """{variant: peak_of(variant)}, each in a fresh process (`run_worker`) unless --in-process."""
    if args.in_process:
        return {name: peak_of(name, args) for name in VARIANTS}
    options = {name: getattr(args, name) for name in ("generations", "size", "grid", "loop_pairs", "device")}
    options.update(seed=args.seed, threads=torch.get_num_threads())
    return {name: run_worker("extraction_distance", name, options) for name in VARIANTS}


def summarise(args, results: dict[str, list[dict]], memory: dict[str, dict], max_diff: float) -> list[dict]:
    """One row per variant: pairs measured, seconds for all K x K pairs, pairs/s, x loop, GFLOP/s, peak MiB."""
    all_pairs = args.generations**2
    measured = {"batched": all_pairs, "loop": args.loop_pairs, "matmul": all_pairs}
    flop_per_pair = 2 * 3 * args.size**2
    rates = {
        name: measured[name] / statistics.median(r["seconds"] for r in calls)
        for name, calls in results.items()
    }
    rows = []
    for name in results:
        rows.append(
            {
                "variant": name,
                "label": LABELS[name] + (" EXTRAPOLATED" if name == "loop" else ""),
                "measured_pairs": measured[name],
                "seconds": all_pairs / rates[name],
                "pairs_per_s": rates[name],
                "x_loop": rates[name] / rates["loop"],
                "gflops": rates[name] * flop_per_pair / 1e9,
                "peak_mib": memory[name]["peak"] / MIB,
                "max_diff": max_diff if name == "loop" else None,
            }
        )
    return rows


def print_report(args, rows: list[dict], threads: str) -> None:
    size, (grid_rows, grid_columns) = args.size, args.grid
    print(
        f"\nExtraction distance benchmark: tiled l2 of all K x K = {args.generations**2} pairs of "
        f"K={args.generations} random 3 x {size} x {size} images, {grid_rows} x {grid_columns} tiles of "
        f"{size // grid_rows} x {size // grid_columns} px, float32, device={args.device}, {threads}, median of "
        f"{args.repeats}"
    )
    columns = [
        ("label", "variant", ""),
        ("measured_pairs", "pairs measured", "d"),
        ("seconds", "time K x K (s)", ".3f"),
        ("pairs_per_s", "pairs/s", ".3g"),
        ("x_loop", "x loop", ".1f"),
        ("gflops", "GFLOP/s", ".1f"),
        ("peak_mib", "peak (MiB)", ".1f"),
        ("max_diff", "max |d - loop|", ".1e"),
    ]
    print_table(rows, columns)
    print(
        f"  loop: timed on {args.loop_pairs} random pairs, extrapolated to K x K; matmul bound: K x K pairs at "
        "the throughput of torch.mm of (K, d) x (d, K), 2 d FLOPs per pair; max |d - loop|: batched against "
        "loop on the loop's pairs"
    )


def parse_args(argv=None):
    parser = argument_parser(__doc__, workers=VARIANTS)
    parser.add_argument(
        "--generations", type=int, default=500, help="K, images compared pairwise (default 500)"
    )
    parser.add_argument(
        "--size", type=int, default=64, help="S, image side in pixels (default 64; paper 512)"
    )
    parser.add_argument("--grid", type=int, nargs=2, default=[4, 4], metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--loop-pairs", type=int, default=2000, help="pairs timed in the loop (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each variant (default 5)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure peak memory in this process (quick checks; peaks less isolated)",
    )
    args = parser.parse_args(argv)
    check_positive(parser, args, ("generations", "size", "loop_pairs", "repeats"))
    if min(args.grid) < 1 or args.size % args.grid[0] or args.size % args.grid[1]:
        parser.error(f"--grid {args.grid[0]} {args.grid[1]} does not divide --size {args.size}")
    return args


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows (see `summarise`)."""
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        print_result(peak_of(args.worker, args))
        return []
    threads = setup(args)
    device = torch.device(args.device)
    images = make_images(args.generations, args.size, args.seed, device)
    pairs = loop_pairs(args.generations, args.loop_pairs, args.seed)
    index = torch.tensor(pairs, device=device)
    batched = tiled_l2(images, images, tuple(args.grid))[index[:, 0], index[:, 1]]
    max_diff = (batched - loop_tiled_l2(images, pairs, tuple(args.grid))).abs().max().item()
    print(f"timing {', '.join(LABELS.values())} ...", flush=True)
    results = time_variants(args, images, pairs)
    where = "in this process" if args.in_process else "each in a fresh process"
    print(f"measuring peak memory: one call of each variant, {where} ...", flush=True)
    rows = summarise(args, results, peaks(args), max_diff)
    print_report(args, rows, threads)
    return rows


if __name__ == "__main__":
    main()
