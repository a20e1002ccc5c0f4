"""Benchmark: region matching's cost (docs/replication.md#region-matching): the search, and the extraction.

1. Search. `region_topk` (three exact top-k searches of the project's engine over whole images and regions,
   merged per database image) against the dense computation one would write first (`region_scores`): the (Q, N, R) tensors of
   whole-query x database-region and query-region x whole-database products, their maxima with the whole x whole
   scores, then a top-k of the (Q, N) matrix. Both on the same seeded synthetic features (each query a noisy copy
   of a region of one database image); the whole-image search alone (`retrieval_topk`) is the floor. Each method
   runs in a fresh process, so its peak memory (resident set on the CPU) is its own; the top-k indices of
   region_topk and of the dense computation are compared.
2. Extraction. `embed_images` with regions (3 scales x 4 x 4 positions: 49 crops an image) against whole images,
   on `--images` seeded random 64-px pictures with the copy descriptor's network (random weights) at 32 px:
   images per second and the ratio, interleaved.

Reference run (2 AMD EPYC vCPUs, defaults, 2026-11-28): region_topk 2.21 s (452 queries / s), 1.43x faster than the
dense computation (3.17 s) with 0.28x its peak memory (299 against 1,064 MiB), the same top-1 for every query; the
whole-image search alone 0.03 s. Extraction with regions 48x slower than whole images (13.9 against 667.5 images / s):
49 crops an image, each decoded, resized and run through the network.

    python -m benchmarks.region_matching                  # about 1 min on 2 cores
    python -m benchmarks.region_matching --queries 2000 --database 20000 --regions 48 --dim 128
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
from src.metrics.retrieval import retrieval_topk
from src.metrics.search import region_scores, region_topk

WORKERS = ("whole", "region_topk", "dense")
OPTIONS = ("queries", "database", "regions", "dim", "k", "seed", "threads")


def parse_args(argv=None):
    parser = argument_parser(__doc__, workers=WORKERS)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--database", type=int, default=5000)
    parser.add_argument("--regions", type=int, default=48, help="regions an image (3 scales x 4 x 4: 48)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--images", type=int, default=64, help="images embedded in the extraction part")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    check_positive(parser, args, ("queries", "database", "regions", "dim", "k", "images", "repeats"))
    return args


def features(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, 1 + R, D) queries and (N, 1 + R, D) database images; query i's whole image is a noisy copy of region
    i % R of database image i."""
    g = torch.Generator().manual_seed(args.seed)
    database = F.normalize(torch.randn(args.database, 1 + args.regions, args.dim, generator=g), dim=-1)
    query = F.normalize(torch.randn(args.queries, 1 + args.regions, args.dim, generator=g), dim=-1)
    rows = torch.arange(args.queries)
    copied = database[rows % args.database, 1 + rows % args.regions]
    query[:, 0] = F.normalize(copied + 0.3 * torch.randn(args.queries, args.dim, generator=g), dim=-1)
    return query, database


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    query, database = features(args)
    memory = PeakMemory(torch.device("cpu"))
    calls = {
        "whole": lambda: retrieval_topk(query[:, 0], database[:, 0], args.k),
        "region_topk": lambda: region_topk(query, database, args.k),
        "dense": lambda: region_scores(query, database).topk(args.k, dim=1),
    }
    memory.reset()
    start = time.perf_counter()
    _, index = calls[args.worker]()
    seconds = time.perf_counter() - start
    peak = memory.peak()
    print_result(
        {
            "seconds": seconds,
            "peak_mib": (peak - memory.before) / MIB,
            "index": index[:, :1].flatten().tolist(),
        }
    )


def search(args, threads: int) -> list[dict]:
    options = {name: getattr(args, name) for name in OPTIONS if name != "threads"}
    options["threads"] = threads
    runs = {name: (lambda name=name: run_worker("region_matching", name, options)) for name in WORKERS}
    results = interleave(runs, args.repeats, lambda r: f"{r['seconds']:.2f} s")
    base = results["dense"]
    base_seconds = statistics.median(r["seconds"] for r in base)
    base_peak = statistics.median(r["peak_mib"] for r in base)
    rows = []
    for name, calls in results.items():
        seconds, peak = (
            statistics.median(r["seconds"] for r in calls),
            statistics.median(r["peak_mib"] for r in calls),
        )
        same = None if name == "whole" else calls[0]["index"] == base[0]["index"]
        rows.append(
            {
                "name": name,
                "seconds": seconds,
                "qps": args.queries / seconds,
                "speed": base_seconds / seconds,
                "peak": peak,
                "memory": peak / max(base_peak, 1e-9),
                "same": None if same is None else str(same),
            }
        )
    return rows


def extraction(args) -> list[dict]:
    from src.nn.embed import embed_images
    from src.nn.extractors import CopyDescriptorExtractor

    extractor = CopyDescriptorExtractor(None, backbone="resnet10t", dim=128, image_size=32).eval()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(Path(tmp) / f"{i}.png")
            paths.append(f"{i}.png")

        def run(regions):
            def call() -> dict:
                start = time.perf_counter()
                embed_images(extractor, tmp, paths, batch_size=64, desc="embed", regions=regions)
                return {"seconds": time.perf_counter() - start}

            return call

        results = interleave(
            {"whole images": run(None), "regions (49 crops)": run(((0.85, 0.7, 0.55), 4))},
            args.repeats,
            lambda r: f"{r['seconds']:.2f} s",
        )
    base = statistics.median(r["seconds"] for r in results["whole images"])
    return [
        {
            "name": name,
            "per_second": args.images / statistics.median(r["seconds"] for r in calls),
            "ratio": statistics.median(r["seconds"] for r in calls) / base,
        }
        for name, calls in results.items()
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    threads = setup(args)
    print(
        f"Region matching: {args.queries} queries x {args.database} database images, {args.regions} regions, "
        f"{args.dim} dims, top {args.k}; {threads}",
        flush=True,
    )
    searched = search(args, torch.get_num_threads())
    print("\nSearch (each method in its own process; peak: resident set above the features):")
    print_table(
        searched,
        [
            ("name", "method", ""),
            ("seconds", "s", ".2f"),
            ("qps", "queries / s", ".0f"),
            ("speed", "x dense", ".2f"),
            ("peak", "peak MiB", ".0f"),
            ("memory", "x dense memory", ".2f"),
            ("same", "top-1 = dense", ""),
        ],
    )
    with torch.no_grad():
        embedded = extraction(args)
    print(f"\nExtraction ({args.images} images of 64 px, copy-descriptor network at 32 px):")
    print_table(
        embedded, [("name", "method", ""), ("per_second", "images / s", ".1f"), ("ratio", "x time", ".1f")]
    )
    return {"search": searched, "extraction": embedded}


if __name__ == "__main__":
    main()
