"""Benchmark: the filter of the generate-and-filter extraction attack against the generation it filters, per
prompt: time of each filter stage, its share of the time to generate the prompt's K images, peak memory.

Generate and filter (docs/attacks.md#generate-and-filter) draws K generations per prompt (500 in Carlini et
al. 2023) and then, per prompt, as `src.attacks.extraction.run_extraction` does:

- tiled l2: `tiled_l2` of the K generations against themselves, all K x K pairs (4 x 4 tiles);
- clique: `group_result` at one edge threshold, the maximum clique search (Bron-Kerbosch) with its medoid;
- verification: `verify` on all K generations against the M training images: the nearest training image by
  normalised l2 and the adaptive score over the n = 50 nearest (`adaptive_extraction_score`, which also gives
  what `nearest_training` gives), the whole training set searched once per prompt.

The generations are K seeded uniform random images of 3 x S x S pixels in [0, 1], of which the first
--copies are near-copies of one image (uniform noise of +-(--noise) added, clamped): the cluster that a
memorised prompt produces, so the clique search finds a clique of that size at the threshold and flags the
prompt. The training set is M seeded uniform random images. Options of the attack (minimum clique size, grid,
alpha, neighbours) are those of conf/attack/extraction.yaml.

The baseline is the generation itself: `DDPMModule.generate` (the EMA UNet of conf/model/unet/tiny.yaml at S
px, seeded random weights) of --gen-batch images with DDIM at --steps steps, extrapolated linearly to K
images; PNG writing (`generate_to_folder`) is left out. Larger batches cost less per image (on 1 CPU thread
batch 16 took about 14% less per image than batch 8), so the share of the filter is a little higher at the
attack's batch size of 64.

With --timed-train-size below --train-size, verification is timed on that many training images and
extrapolated linearly to M (its cost is one pass over the training set), marked as such in the table.

Every stage runs once untimed (generation with 2 steps), then in windows interleaved A B C D D C B A ...
(benchmarks/harness.py), and the table gives medians. Peak memory is the rise of the peak RSS (CPU) or of the
CUDA allocator's peak (GPU) during that first, untimed call of each stage, not counting its inputs (the
training set, the generations, the model); a generation step frees its memory before the next, so 2 steps
peak as 50 do. The stages share this process: the C heap's free pages are handed back before each first call
(`malloc_trim`), so memory freed by an earlier stage counts again when a later one reuses it, but one-off
allocations (thread pools, kernel caches) made by an earlier stage do not. --fresh-processes measures each
stage in a fresh process instead (`harness.run_worker`), at the cost of four more imports of torch and
Lightning (about 15 s each on a busy CPU); at the defaults it gave within 3 MiB of this for the filter stages
and 44 MiB instead of 33 for the generation.

Reference run at the defaults (2 AMD EPYC vCPUs shared with a running study, so 1 torch thread), per prompt:
tiled l2 0.048 s, clique 0.049 s, verification 7.31 s, the filter 7.41 s in all, 1.8% of the 409 s that
generating the 500 images takes (DDIM-50, 0.82 s per image); verification is 99% of the filter (K x M x d =
1.5e11 multiply-adds, about 42 GFLOP/s); peak rise 177 MiB (verification's blocks of 256 x 65,536 squared
distances) over the 1,172 MiB training set, 33 MiB for the generation.

On one NVIDIA H200 at the defaults: tiled l2 0.002 s, clique 0.041 s, verification 0.026 s, the filter 0.069 s in
all, 0.19% of the 36.6 s that generating the 500 images takes with the tiny UNet (DDIM-50, batches of 8, launch
bound); the clique search (networkx, on the CPU) is now the largest stage.

    python -m benchmarks.extraction_pipeline                       # K = 500, M = 100,000 at 32 px: about 70 s
    python -m benchmarks.extraction_pipeline --device cuda --size 64
"""

import ctypes
import statistics
import time

import torch

from benchmarks.harness import (
    MIB,
    PeakMemory,
    argument_parser,
    build_model,
    check_positive,
    interleave,
    load_config,
    print_result,
    print_table,
    run_worker,
    setup,
)
from src.attacks.extraction import group_result, verify
from src.metrics.extraction import tiled_l2

ATTACK = load_config("attack", "extraction")
FILTER_STAGES = ("tiled_l2", "clique", "verify")
STAGES = (*FILTER_STAGES, "generate")
FIRST_CALL_STEPS = 2  # DDIM steps of the untimed generation call that measures its peak memory


def make_generations(args, device: torch.device) -> torch.Tensor:
    """K seeded uniform random images (K, 3, S, S) in [0, 1], the first `args.copies` of them near-copies of
    one image (uniform noise of +-`args.noise`, clamped to [0, 1])."""
    g = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.k, 3, args.size, args.size, generator=g)
    noise = (torch.rand(args.copies, 3, args.size, args.size, generator=g) * 2 - 1) * args.noise
    images[: args.copies] = (images[0] + noise).clamp_(0, 1)
    return images.to(device)


def make_training(count: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` seeded uniform random training images (count, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(count, 3, size, size, generator=g).to(device)


def build_module(args):
    """The tiny DDPM module at --size px with seeded random weights, on the device, in eval mode."""
    overrides = ["model/unet=tiny", f"data.image_size={args.size}"]
    return build_model("ddpm", overrides, args.seed).to(args.device).eval()


def build_inputs(args, stages) -> dict:
    """What `stages` need: the generations, their distances, the training set, the module."""
    device = torch.device(args.device)
    inputs = {}
    if set(stages) & set(FILTER_STAGES):
        inputs["generations"] = make_generations(args, device)
    if "clique" in stages:
        inputs["distances"] = tiled_l2(inputs["generations"], inputs["generations"], tuple(ATTACK["grid"]))
    if "verify" in stages:
        inputs["train"] = make_training(args.timed_train_size, args.size, args.seed, device)
    if "generate" in stages:
        inputs["module"] = build_module(args)
    return inputs


def stage_calls(args, inputs: dict, steps: int | None = None) -> dict:
    """{stage: a call running it} for the stages whose inputs are in `inputs`; `steps` shortens the
    generation (its first, untimed call)."""
    calls, generations = {}, inputs.get("generations")
    if generations is not None:
        calls["tiled_l2"] = lambda: tiled_l2(generations, generations, tuple(ATTACK["grid"]))
    if "distances" in inputs:
        distances = inputs["distances"]
        calls["clique"] = lambda: group_result(distances, [args.threshold], ATTACK["min_clique_size"])
    if "train" in inputs:
        train = inputs["train"]
        calls["verify"] = lambda: verify(generations, train, ATTACK["alpha"], ATTACK["neighbours"])
    if "module" in inputs:
        seeds = list(range(args.seed, args.seed + args.gen_batch))
        module, steps = inputs["module"], steps or args.steps
        calls["generate"] = lambda: module.generate(seeds, sampler="ddim", steps=steps)
    return calls


def timed(call, device: torch.device) -> dict:
    """{"seconds"} of one call (synchronised on CUDA)."""
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start}


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the system (glibc `malloc_trim`; nothing elsewhere), so that a
    call reusing memory freed by an earlier one shows it as a rise of the resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def first_call_peak(call, device: torch.device) -> dict:
    """{"peak": bytes, "note"}: the rise of peak memory during one call."""
    release_free_memory()
    memory = PeakMemory(device)
    memory.reset()
    timed(call, device)
    return {"peak": memory.rise(), "note": memory.note}


def time_stages(args, inputs: dict) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Each stage once untimed, its peak memory measured (generation with 2 steps), then `args.repeats`
    interleaved timed calls. Returns ({stage: [{"seconds"}]}, {stage: {"peak", "note"}})."""
    device = torch.device(args.device)
    first_calls = stage_calls(args, inputs, steps=FIRST_CALL_STEPS)
    memory = {name: first_call_peak(call, device) for name, call in first_calls.items()}
    runs = {name: (lambda call=call: timed(call, device)) for name, call in stage_calls(args, inputs).items()}
    return interleave(runs, args.repeats, lambda result: f"{result['seconds']:.3f} s"), memory


def peak_of(stage: str, args) -> dict:
    """{"peak": bytes, "note"}: the rise of peak memory during one call of `stage`, on fresh inputs."""
    device = torch.device(args.device)
    inputs = build_inputs(args, [stage])
    return first_call_peak(stage_calls(args, inputs, steps=FIRST_CALL_STEPS)[stage], device)


def fresh_process_peaks(args) -> dict[str, dict]:
    """{stage: peak_of(stage)}, each in a fresh process (`run_worker`)."""
    names = (
        "k",
        "size",
        "train_size",
        "timed_train_size",
        "copies",
        "noise",
        "threshold",
        "steps",
        "gen_batch",
    )
    options = {name: getattr(args, name) for name in names}
    options.update(device=args.device, seed=args.seed, threads=torch.get_num_threads())
    return {name: run_worker("extraction_pipeline", name, options) for name in STAGES}


def summarise(args, results: dict[str, list[dict]], memory: dict[str, dict]) -> list[dict]:
    """One row per filter stage, the filter's total and the generation: seconds per prompt (extrapolated
    where marked), share of the generation's seconds, peak MiB."""
    median = {name: statistics.median(r["seconds"] for r in calls) for name, calls in results.items()}
    scale = {"verify": args.train_size / args.timed_train_size, "generate": args.k / args.gen_batch}
    seconds = {name: median[name] * scale.get(name, 1.0) for name in STAGES}
    peak = {name: memory[name]["peak"] / MIB for name in STAGES}
    peak["filter"] = max(peak[name] for name in FILTER_STAGES)
    verify_label = f"verify, K x M={args.train_size} (adaptive score, n={ATTACK['neighbours']})"
    if args.timed_train_size < args.train_size:
        verify_label += f" EXTRAPOLATED from M={args.timed_train_size}"
    labels = {
        "tiled_l2": f"tiled l2, K x K = {args.k**2} pairs",
        "clique": f"max clique at threshold {args.threshold}",
        "verify": verify_label,
        "generate": f"generate K, DDIM-{args.steps} EXTRAPOLATED from {args.gen_batch} images",
    }
    rows = [{"stage": name, "label": labels[name], "seconds": seconds[name]} for name in FILTER_STAGES]
    filter_seconds = sum(seconds[name] for name in FILTER_STAGES)
    rows.append({"stage": "filter", "label": "filter total", "seconds": filter_seconds})
    rows.append({"stage": "generate", "label": labels["generate"], "seconds": seconds["generate"]})
    for row in rows:
        row.update(share=row["seconds"] / seconds["generate"], peak_mib=peak[row["stage"]])
    return rows


def print_report(args, rows: list[dict], threads: str, clique: dict, parameters: int) -> None:
    size = args.size
    train_mib = args.train_size * 3 * size * size * 4 / MIB
    print(
        f"\nExtraction pipeline benchmark, per prompt: K={args.k} generations and M={args.train_size} training "
        f"images of 3 x {size} x {size} px, float32, device={args.device}, {threads}, median of {args.repeats}"
    )
    columns = [
        ("label", "stage", ""),
        ("seconds", "time / prompt (s)", ".3f"),
        ("share", "of generation", ".2%"),
        ("peak_mib", "peak (MiB)", ".1f"),
    ]
    print_table(rows, columns)
    print(
        f"  clique: {clique['clique_size']} members at threshold {args.threshold} ({args.copies} planted "
        f"near-copies), flagged {clique['flagged']} (min size {ATTACK['min_clique_size']})"
    )
    print(
        f"  generate: tiny DDPM UNet ({parameters / 1e6:.2f}M parameters, EMA copy), batches of "
        f"{args.gen_batch}, time x K / {args.gen_batch}; PNG writing not included"
    )
    where = "each in a fresh process" if args.fresh_processes else "in this process"
    print(
        f"  peak: rise during the first call of each stage ({where}; generation with {FIRST_CALL_STEPS} steps), "
        f"not counting its inputs (training set {train_mib:.0f} MiB at M={args.train_size}); filter total: the "
        "largest stage's"
        + ("" if args.timed_train_size == args.train_size else f"; verify's at M={args.timed_train_size}")
    )


def parse_args(argv=None):
    parser = argument_parser(__doc__, workers=STAGES)
    parser.add_argument("--k", type=int, default=500, help="K, generations per prompt (default 500)")
    parser.add_argument("--size", type=int, default=32, help="S, image side in pixels (default 32)")
    parser.add_argument("--train-size", type=int, default=100_000, help="M, training images (default 100000)")
    parser.add_argument(
        "--timed-train-size",
        type=int,
        default=None,
        help="training images verification is timed on, extrapolated linearly to M (default M)",
    )
    parser.add_argument("--copies", type=int, default=100, help="near-copies among the K (default 100)")
    parser.add_argument("--noise", type=float, default=0.02, help="their noise amplitude (default 0.02)")
    parser.add_argument("--threshold", type=float, default=0.1, help="edge threshold (default 0.1)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per generation (default 50)")
    parser.add_argument("--gen-batch", type=int, default=8, help="generations timed per call (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each stage (default 3)")
    parser.add_argument(
        "--fresh-processes",
        action="store_true",
        help="measure each stage's peak memory in a fresh process (isolated peaks; adds the imports of four "
        "processes, about 15 s each on a busy CPU)",
    )
    args = parser.parse_args(argv)
    if args.timed_train_size is None:
        args.timed_train_size = args.train_size
    check_positive(
        parser, args, ("k", "size", "train_size", "timed_train_size", "steps", "gen_batch", "repeats")
    )
    rows, columns = ATTACK["grid"]
    if args.size % rows or args.size % columns:
        parser.error(f"--size {args.size}: must be a multiple of the attack's grid {rows} x {columns}")
    if not 0 <= args.copies <= args.k:
        parser.error(f"--copies {args.copies}: must be between 0 and --k {args.k}")
    if args.timed_train_size > args.train_size:
        parser.error(
            f"--timed-train-size {args.timed_train_size}: must be at most --train-size {args.train_size}"
        )
    return args


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows (see `summarise`)."""
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        print_result(peak_of(args.worker, args))
        return []
    threads = setup(args)
    print(
        f"building K={args.k} generations, M={args.timed_train_size} training images, the module ...",
        flush=True,
    )
    inputs = build_inputs(args, STAGES)
    (clique,) = group_result(inputs["distances"], [args.threshold], ATTACK["min_clique_size"])
    print(f"peak memory of a first call, then timing {', '.join(STAGES)} ...", flush=True)
    results, memory = time_stages(args, inputs)
    parameters = sum(p.numel() for p in inputs["module"].unet.parameters())
    if args.fresh_processes:
        del inputs
        print("measuring peak memory: one call of each stage, each in a fresh process ...", flush=True)
        memory = fresh_process_peaks(args)
    rows = summarise(args, results, memory)
    print_report(args, rows, threads, clique, parameters)
    return rows


if __name__ == "__main__":
    main()
