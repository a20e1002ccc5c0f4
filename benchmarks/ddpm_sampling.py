"""Benchmark: sampling throughput (images/s) of `DDPMModule.generate` with DDPM-1000 and DDIM-50.

The module is `DDPMModule` (src/models/ddpm.py) as conf/model/ddpm.yaml builds it with `model/unet=tiny`
(further Hydra overrides on the command line) and seeded random weights; `generate` samples from its EMA copy
with the diffusers `DDPMScheduler` / `DDIMScheduler` on the training schedule (src/nn/diffusion.py
`sample_loop`): one UNet forward and one scheduler step per timestep, seeded per-image noise, uint8 images
back on the CPU. The weights do not change the cost, so untrained ones do.

Timing: one untimed warm-up call per sampler (2 steps), then `--repeats` timed calls per sampler, interleaved
(DDPM DDIM DDIM DDPM ...). A call is one `generate(seeds, sampler, steps)` of `--batch-size` images, from the
noise draw to the uint8 images on the CPU (the copy back synchronises CUDA). The report gives the median call:
images/s = batch / median seconds, and ms per denoising step = median / steps. Peak memory per call: CUDA
`max_memory_allocated`, or the process's peak RSS on CPU (`PeakMemory` of benchmarks/harness.py).

DDPM-1000 is 1,000 UNet forwards a batch, minutes on a CPU. `--ddpm-steps N` (default 1000 on CUDA, 20 on CPU)
runs DDPM with N of the 1,000 timesteps (`DDPMScheduler.set_timesteps(N)`, same work per step) and the report
also gives DDPM-1000 extrapolated linearly in the number of steps: images/s x N / 1000, marked as such.

Reference run (2 AMD EPYC vCPUs, 100% busy with three other training processes, defaults, hence 1 torch
thread): 279 ms per denoising step for both samplers, DDIM-50 2.30 images/s, DDPM-20 5.74 images/s, DDPM-1000
0.115 images/s (extrapolated), peak RSS 1.0 GiB; about 70 s in all.

On one NVIDIA H200 (tiny UNet, 32 px, batch 32): 32-true: DDIM-50 78.3 images/s (8.2 ms per step), DDPM-1000
2.8 images/s (11.4 ms per step), CUDA peak 102 MiB; bf16-mixed is slower on this 1.1M-parameter UNet (DDIM-50 54.7
images/s, 11.7 ms per step; peak 84 MiB): each step is a few hundred small kernels, and autocast adds casts without
any matrix product large enough to gain. bf16 pays on Stable-Diffusion-sized UNets, not on the testbed's.

    python -m benchmarks.ddpm_sampling      # tiny UNet, 32 px, batch 32, DDPM-20 + DDIM-50: about 1 min
    python -m benchmarks.ddpm_sampling --image-size 64 --batch-size 256 --device cuda \\
        --precision bf16-mixed model/unet=ddpm_64
"""

import statistics
import time

import torch

from benchmarks.harness import (
    MIB,
    PeakMemory,
    argument_parser,
    autocast,
    build_model,
    check_positive,
    interleave,
    print_table,
    setup,
)

DDPM_TRAIN_STEPS = 1000


def time_generate(module, sampler: str, steps: int, args, memory: PeakMemory) -> dict:
    """One timed `generate` of `args.batch_size` images: seconds, peak memory (bytes), the uint8 images."""
    seeds = list(range(args.seed, args.seed + args.batch_size))
    memory.reset()
    start = time.perf_counter()
    with autocast(memory.device, args.precision):
        images = module.generate(seeds, sampler=sampler, steps=steps)  # (B, H, W, C) uint8 on the CPU
    return {"seconds": time.perf_counter() - start, "peak": memory.peak(), "images": images}


def summarize(calls: dict, steps: dict, batch_size: int) -> list[dict]:
    """One row per sampler, and a DDPM-1000 row extrapolated linearly when DDPM ran fewer steps.

    Row keys: name, steps, seconds (median call), images_per_s (batch / median), ms_per_step, peak_mib
    (None for the extrapolated row), extrapolated (bool).
    """
    rows = []
    for sampler, results in calls.items():
        seconds = statistics.median(result["seconds"] for result in results)
        row = {"name": f"{sampler.upper()}-{steps[sampler]}", "steps": steps[sampler], "seconds": seconds}
        row.update(images_per_s=batch_size / seconds, ms_per_step=seconds / steps[sampler] * 1e3)
        rows.append(
            row | {"peak_mib": max(result["peak"] for result in results) / MIB, "extrapolated": False}
        )
        if sampler == "ddpm" and steps["ddpm"] != DDPM_TRAIN_STEPS:
            full = seconds * DDPM_TRAIN_STEPS / steps["ddpm"]
            rows.append(
                row
                | {"name": f"DDPM-{DDPM_TRAIN_STEPS}", "steps": DDPM_TRAIN_STEPS, "seconds": full}
                | {"images_per_s": batch_size / full, "peak_mib": None, "extrapolated": True}
            )
    return rows


def parse_args(argv=None):
    parser = argument_parser(__doc__, precision=True, overrides="model/unet=ddpm_64")
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
    args = parser.parse_args(argv)
    if args.ddpm_steps is None:
        args.ddpm_steps = DDPM_TRAIN_STEPS if args.device.startswith("cuda") else 20
    if not 1 <= args.ddpm_steps <= DDPM_TRAIN_STEPS or not 1 <= args.ddim_steps <= DDPM_TRAIN_STEPS:
        parser.error(
            f"--ddpm-steps {args.ddpm_steps} / --ddim-steps {args.ddim_steps}: each must be in "
            f"1..{DDPM_TRAIN_STEPS} (the training schedule's length)"
        )
    check_positive(parser, args, ("repeats", "batch_size"))
    return args


def build_module(args):
    """The DDPM module with seeded random weights, on the device, in eval mode."""
    overrides = ["model/unet=tiny", f"data.image_size={args.image_size}", *args.overrides]
    return build_model("ddpm", overrides, args.seed).to(args.device).eval()


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows (see `summarize`)."""
    args = parse_args(argv)
    threads = setup(args)
    memory = PeakMemory(torch.device(args.device))
    module = build_module(args)
    parameters = sum(p.numel() for p in module.unet.parameters())
    steps = {"ddpm": args.ddpm_steps, "ddim": args.ddim_steps}
    print(
        f"DDPM sampling: UNet {' '.join(args.overrides) or 'tiny'} ({parameters / 1e6:.2f}M parameters, EMA "
        f"copy) at {args.image_size} px, batch {args.batch_size}, device {args.device}, precision "
        f"{args.precision}, {threads}",
        flush=True,
    )
    if args.ddpm_steps != DDPM_TRAIN_STEPS:
        print(
            f"DDPM runs {args.ddpm_steps} of the {DDPM_TRAIN_STEPS} timesteps (--ddpm-steps; 20 by default "
            f"on CPU, where DDPM-{DDPM_TRAIN_STEPS} takes minutes); DDPM-{DDPM_TRAIN_STEPS} is extrapolated "
            "linearly from it (same work per step)",
            flush=True,
        )
    for sampler in steps:
        time_generate(module, sampler, 2, args, memory)
    calls = interleave(
        {
            sampler: lambda sampler=sampler: time_generate(module, sampler, steps[sampler], args, memory)
            for sampler in steps
        },
        args.repeats,
        describe=lambda call: f"{call['seconds']:.2f} s",
    )
    rows = summarize(calls, steps, args.batch_size)
    for row in rows:
        row["label"] = row["name"] + (" (extrapolated)" if row["extrapolated"] else "")
    print(f"\nmedian of {args.repeats} calls per sampler, {args.batch_size} images a call")
    columns = [("label", "sampler", ""), ("seconds", "s / call", ".2f"), ("images_per_s", "images/s", ".3f")]
    print_table(
        rows, columns + [("ms_per_step", "ms / step", ".1f"), ("peak_mib", f"{memory.kind()} (MiB)", ".1f")]
    )
    if memory.note:
        print(f"  memory: {memory.note}")
    return rows


if __name__ == "__main__":
    main()
