"""Benchmark: sampling throughput (images/s) of `DDPMModule.generate` with DDPM-1000 and DDIM-50.

The module is `DDPMModule` (src/models/ddpm.py) with seeded random weights and one of conf/model/unet/*.yaml
(`--unet`); `generate` samples from its EMA copy with the diffusers `DDPMScheduler` / `DDIMScheduler` on the
training schedule (src/nn/diffusion.py `sample_loop`): one UNet forward and one scheduler step per timestep,
seeded per-image noise, uint8 images back on the CPU. The weights do not change the cost, so untrained ones
do.

Timing: one untimed warm-up call per sampler (2 steps), then `--repeats` timed calls per sampler, interleaved
(DDPM DDIM DDIM DDPM ...). A call is one `generate(seeds, sampler, steps)` of `--batch-size` images, from the
noise draw to the uint8 images on the CPU (the copy back synchronises CUDA). The report gives the median call:
images/s = batch / median seconds, and ms per denoising step = median / steps. Peak memory per call: CUDA
`max_memory_allocated`, or the process's peak RSS on CPU (`PeakMemory` of src/benchmarks/csd_step.py).

DDPM-1000 is 1,000 UNet forwards a batch, minutes on a CPU. `--ddpm-steps N` (default 1000 on CUDA, 20 on CPU)
runs DDPM with N of the 1,000 timesteps (`DDPMScheduler.set_timesteps(N)`, same work per step) and the report
also gives DDPM-1000 extrapolated linearly in the number of steps: images/s x N / 1000, marked as such.

Reference run (2 AMD EPYC vCPUs, 100% busy with three other training processes, defaults, hence 1 torch
thread): 279 ms per denoising step for both samplers, DDIM-50 2.30 images/s, DDPM-20 5.74 images/s, DDPM-1000
0.115 images/s (extrapolated), peak RSS 1.0 GiB; about 70 s in all. Not yet run on CUDA.

    python -m src.benchmarks.ddpm_sampling      # tiny UNet, 32 px, batch 32, DDPM-20 + DDIM-50: about 1 min
    python -m src.benchmarks.ddpm_sampling --unet ddpm_64 --image-size 64 --batch-size 256 --device cuda \\
        --precision bf16-mixed
"""

import argparse
import statistics
import time

import torch

from src.benchmarks.csd_step import MIB, PRECISIONS, PeakMemory
from src.benchmarks.ddpm_step import autocast_context, build_module, check_device_and_precision, set_threads
from src.benchmarks.retrieval_metrics import warn_if_busy
from src.models.ddpm import DDPMModule

DDPM_TRAIN_STEPS = 1000


def time_generate(module: DDPMModule, sampler: str, steps: int, args, memory: PeakMemory) -> dict:
    """One timed `generate` of `args.batch_size` images: seconds, peak memory (bytes), the uint8 images."""
    seeds = list(range(args.seed, args.seed + args.batch_size))
    autocast = autocast_context(torch.device(args.device), args.precision)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize(args.device)
    memory.reset()
    start = time.perf_counter()
    with autocast():
        images = module.generate(seeds, sampler=sampler, steps=steps)  # (B, H, W, C) uint8 on the CPU
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": memory.read(), "images": images}


def summarize(calls: dict, steps: dict, batch_size: int) -> list[dict]:
    """One row per sampler, and a DDPM-1000 row extrapolated linearly when DDPM ran fewer steps.

    Row keys: name, steps, seconds (median call), images_per_s (batch / median), ms_per_step, peak_mib
    (None for the extrapolated row), extrapolated (bool).
    """
    rows = []
    for sampler, results in calls.items():
        seconds = statistics.median(result["seconds"] for result in results)
        rows.append({
            "name": f"{sampler.upper()}-{steps[sampler]}",
            "steps": steps[sampler],
            "seconds": seconds,
            "images_per_s": batch_size / seconds,
            "ms_per_step": seconds / steps[sampler] * 1e3,
            "peak_mib": max(result["peak"] for result in results) / MIB,
            "extrapolated": False,
        })  # fmt: skip
        if sampler == "ddpm" and steps["ddpm"] != DDPM_TRAIN_STEPS:
            full = seconds * DDPM_TRAIN_STEPS / steps["ddpm"]
            rows.append({
                "name": f"DDPM-{DDPM_TRAIN_STEPS}",
                "steps": DDPM_TRAIN_STEPS,
                "seconds": full,
                "images_per_s": batch_size / full,
                "ms_per_step": rows[-1]["ms_per_step"],
                "peak_mib": None,
                "extrapolated": True,
            })  # fmt: skip
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", default="tiny", help="name of a conf/model/unet/*.yaml")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="images per generate call")
    parser.add_argument(
        "--ddpm-steps",
        type=int,
        default=None,
        help=f"DDPM timesteps per image (default {DDPM_TRAIN_STEPS} on CUDA, 20 on CPU; fewer than "
        f"{DDPM_TRAIN_STEPS} adds a DDPM-{DDPM_TRAIN_STEPS} row extrapolated linearly)",
    )
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per sampler, interleaved")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument(
        "--precision", default="32-true", choices=PRECISIONS, help="mixed: generate under autocast"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: see ddpm_step.set_threads)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (weights and noise)")
    args = parser.parse_args(argv)
    check_device_and_precision(args)
    if args.ddpm_steps is None:
        args.ddpm_steps = DDPM_TRAIN_STEPS if args.device.startswith("cuda") else 20
    if not 1 <= args.ddpm_steps <= DDPM_TRAIN_STEPS or not 1 <= args.ddim_steps <= DDPM_TRAIN_STEPS:
        raise SystemExit(
            f"--ddpm-steps {args.ddpm_steps} / --ddim-steps {args.ddim_steps}: each must be in "
            f"1..{DDPM_TRAIN_STEPS} (the training schedule's length)"
        )
    if min(args.repeats, args.batch_size) < 1:
        raise SystemExit(f"--repeats and --batch-size must be >= 1, got {args.repeats}, {args.batch_size}")
    return args


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows (see `summarize`)."""
    args = parse_args(argv)
    threads = set_threads(args)
    device = torch.device(args.device)
    memory = PeakMemory(device)
    module = build_module(args).to(device).eval()
    parameters = sum(p.numel() for p in module.unet.parameters())
    steps = {"ddpm": args.ddpm_steps, "ddim": args.ddim_steps}
    print(
        f"DDPM sampling: UNet {args.unet} ({parameters / 1e6:.2f}M parameters, EMA copy) at "
        f"{args.image_size} px, batch {args.batch_size}, device {args.device}, precision {args.precision}, "
        f"torch threads {torch.get_num_threads()} ({threads})",
        flush=True,
    )
    if args.ddpm_steps != DDPM_TRAIN_STEPS:
        print(
            f"DDPM runs {args.ddpm_steps} of the {DDPM_TRAIN_STEPS} timesteps (--ddpm-steps; 20 by default "
            f"on CPU, where DDPM-{DDPM_TRAIN_STEPS} takes minutes); DDPM-{DDPM_TRAIN_STEPS} is extrapolated "
            "linearly from it (same work per step)",
            flush=True,
        )
    warn_if_busy()
    for sampler in steps:
        time_generate(module, sampler, 2, args, memory)
    calls = {"ddpm": [], "ddim": []}
    for repeat in range(args.repeats):
        for sampler in ("ddpm", "ddim") if repeat % 2 == 0 else ("ddim", "ddpm"):
            calls[sampler].append(time_generate(module, sampler, steps[sampler], args, memory))
        print(
            f"  call {repeat + 1}/{args.repeats}: DDPM-{steps['ddpm']} {calls['ddpm'][-1]['seconds']:.2f} s, "
            f"DDIM-{steps['ddim']} {calls['ddim'][-1]['seconds']:.2f} s",
            flush=True,
        )
    rows = summarize(calls, steps, args.batch_size)
    print_report(args, rows, memory)
    return rows


def print_report(args, rows: list[dict], memory: PeakMemory) -> None:
    memory_kind = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\nmedian of {args.repeats} calls per sampler, {args.batch_size} images a call")
    print(f"{'sampler':<26}{'s / call':>10}{'images/s':>12}{'ms / step':>11}{memory_kind + ' (MiB)':>26}")
    for row in rows:
        name = row["name"] + (" (extrapolated)" if row["extrapolated"] else "")
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        print(
            f"{name:<26}{row['seconds']:>10.2f}{row['images_per_s']:>12.3f}{row['ms_per_step']:>11.1f}"
            f"{peak:>26}"
        )
    if memory.note:
        print(f"  memory: {memory.note}")


if __name__ == "__main__":
    main()
