"""Benchmark: the partial-copy benchmark's cost: building each set, the RePaint fill against plain sampling, and
scoring against the retrieval metrics.

1. Build time per 100 sources of each kind (`src.data.partial_copies.build_partial_copies`, 4 copies a source,
   the embedded content at `--image-size`; the inpainting kinds with a RePaint fill of `--repaint-steps` steps,
   jump 10 / 2 as conf/benchmark/copy_diagonal.yaml, on a tiny DDPM with seeded random weights: the weights do not
   change the cost). Each set is built from scratch in a temporary folder and limited to `--sources` sources.
2. RePaint against plain sampling: seconds per image of `RePaintFill` and of `DDPMModule.generate` with DDIM at
   the same number of steps, same UNet and batch, interleaved; the ratio is what RePaint's resampling and
   known-region blending cost on top of sampling (about jump_n_sample UNet calls per step).
3. Scoring: `partial_copy_metrics` (a full ranking of the database per query, as the revisited-Oxford code) against
   `retrieval_metrics` (chunked exact top-k) on the same seeded synthetic embeddings: queries per second.

Reference run (2 AMD EPYC vCPUs, defaults, 2026-11-28): segmix 3.1 / hard 4.8 / resized 5.7 s per 100 sources,
diagonal and patch about 217 s per 100 sources (RePaint 25 steps); RePaint 0.479 s per image against DDIM's 0.239
(2.01x); scoring 1,000 x 20,000 x 512: full ranking 2.12 s, chunked top-k 0.37 s (5.7x).

    python -m benchmarks.partial_copies                  # about 2 min on 2 cores
    python -m benchmarks.partial_copies --sources 40 --queries 2000 --database 50000
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import argument_parser, build_model, check_positive, interleave, print_table, setup
from src.data.partial_copies import KINDS, SEGMIX_KINDS, build_partial_copies
from src.metrics.copy_detection import partial_copy_metrics
from src.metrics.retrieval import retrieval_metrics


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sources", type=int, default=20, help="sources per set built (reported per 100)")
    parser.add_argument("--source", default="embedded", help="the content: embedded, or an image folder")
    parser.add_argument("--repaint-steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=16, help="images per RePaint / sampling call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--database", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    check_positive(
        parser, args, ("image_size", "sources", "repaint_steps", "batch_size", "repeats", "queries")
    )
    return args


def build_times(args, module) -> list[dict]:
    from src.nn.inpainting import RePaintFill

    rows = []
    for kind in KINDS:
        fill = filler = None
        if kind not in SEGMIX_KINDS:
            fill = {"kind": "repaint", "steps": args.repaint_steps}
            filler = RePaintFill(module=module, steps=args.repaint_steps)  # random weights
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build_partial_copies(
                Path(tmp),
                kind,
                args.source,
                image_size=args.image_size,
                fill=fill,
                max_sources=args.sources,
                filler=filler,
            )
            seconds = time.perf_counter() - start
        rows.append({"name": f"build {kind}", "seconds": seconds, "per_100": seconds * 100 / args.sources})
        print(f"  {kind}: {seconds:.1f} s for {args.sources} sources", flush=True)
    return rows


def repaint_against_sampling(args, module) -> list[dict]:
    from src.nn.inpainting import RePaintFill

    fill = RePaintFill(module=module, steps=args.repaint_steps, batch_size=args.batch_size)
    n, size = args.batch_size, args.image_size
    images = torch.rand(n, 3, size, size) * 2 - 1
    keep = torch.zeros(n, 1, size, size)
    keep[:, :, : size // 2] = 1  # the top half known
    seeds = list(range(n))

    def repaint() -> dict:
        start = time.perf_counter()
        fill.raw(images, keep, seeds)
        return {"seconds": time.perf_counter() - start}

    def sample() -> dict:
        start = time.perf_counter()
        module.generate(seeds, sampler="ddim", steps=args.repaint_steps)
        return {"seconds": time.perf_counter() - start}

    calls = interleave({"repaint": repaint, "ddim": sample}, args.repeats, lambda r: f"{r['seconds']:.2f} s")
    base = statistics.median(r["seconds"] for r in calls["ddim"]) / n
    rows = []
    for name, results in calls.items():
        per_image = statistics.median(r["seconds"] for r in results) / n
        rows.append(
            {
                "name": f"{name} ({args.repaint_steps} steps)",
                "per_image": per_image,
                "ratio": per_image / base,
            }
        )
    return rows


def scoring(args) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    sources = args.queries
    database = torch.nn.functional.normalize(torch.randn(args.database, args.dim, generator=g), dim=1)
    labels = torch.zeros(args.database, sources, dtype=torch.bool)
    copies = torch.arange(min(4 * sources, args.database))
    labels[copies, copies // 4] = True
    query = torch.nn.functional.normalize(
        database[torch.arange(sources) * 4] + 0.5 * torch.randn(sources, args.dim, generator=g), dim=1
    )
    query_labels = torch.eye(sources, dtype=torch.bool)
    rows = []
    runs = {
        "retrieval_metrics (top-k)": lambda: retrieval_metrics(
            query, database, query_labels, labels, ks=(1, 4, 10)
        ),
        "partial_copy_metrics (full ranking)": lambda: partial_copy_metrics(
            query, database, query_labels, labels, bootstrap=0
        ),
    }
    base = None
    for name, call in runs.items():
        call()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        base = base or seconds
        rows.append({"name": name, "seconds": seconds, "qps": sources / seconds, "ratio": seconds / base})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = setup(args)
    module = build_model("ddpm", ["model/unet=tiny", f"data.image_size={args.image_size}"], args.seed).eval()
    print(f"Partial-copy benchmark cost: {args.image_size} px, {threads}", flush=True)
    with torch.no_grad():
        built = build_times(args, module)
    print("\nBuild time (4 copies a source):")
    print_table(built, [("name", "set", ""), ("seconds", "s", ".1f"), ("per_100", "s / 100 sources", ".1f")])
    with torch.no_grad():
        fills = repaint_against_sampling(args, module)
    print(f"\nRePaint against DDIM sampling (tiny UNet, batch {args.batch_size}):")
    print_table(
        fills, [("name", "method", ""), ("per_image", "s / image", ".3f"), ("ratio", "x DDIM", ".2f")]
    )
    scored = scoring(args)
    print(f"\nScoring {args.queries} queries against {args.database} x {args.dim}:")
    print_table(
        scored,
        [
            ("name", "method", ""),
            ("seconds", "s", ".2f"),
            ("qps", "queries / s", ".0f"),
            ("ratio", "x top-k", ".2f"),
        ],
    )
    return {"build": built, "repaint": fills, "scoring": scored}


if __name__ == "__main__":
    main()
