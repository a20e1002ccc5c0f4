"""Benchmark: images per second of each membership inference attack against one plain UNet forward pass per
image, on a tiny DDPM: forward passes per image, time in units of the forward, peak memory.

The module is `DDPMModule` as conf/model/ddpm.yaml builds it with `model/unet=tiny` at --image-size px and
seeded random weights (the weights do not change the cost); the images are --images seeded uniform random
images in [-1, 1], scored in batches of --batch-size by the attacks of src/attacks/membership.py
(docs/attacks.md#membership-inference), EMA weights:

- forward (the baseline, the cost unit): one forward of the EMA UNet per image at t = 100, no_grad, as
  `NoisePredictor.eps` runs it;
- loss, 1 timestep: `loss_scores` at t = 100 with 1 noise draw (the module's `DEFAULT_OPTIONS`);
- loss, defaults: `loss_scores` with the timesteps and draws of conf/attack/loss.yaml (5 x 4);
- SecMI: `secmi_scores` with t_sec and k of conf/attack/secmi.yaml (100, 10);
- PIA: `pia_scores` with t and p of conf/attack/pia.yaml (200, 4).

"forwards / image" is counted (a forward hook on the UNet), not assumed. "x forward" is an attack's time per
image over the baseline's; "x forward / pass" divides it by the forwards per image, so 1.00 means the attack
costs its forward passes and nothing else (the rest: noise draws, DDIM arithmetic, the error).

The baseline runs once untimed (every attack runs the same UNet at the same batch), then every row runs in
windows interleaved A B C D E E D C B A ... (benchmarks/harness.py), and the table gives medians. Peak memory
is the peak during a call, as `harness.PeakMemory` reads it: the process's peak RSS on the CPU (the model, the
images and the Python runtime included), the CUDA allocator's peak on a GPU; the largest over the calls.

Reference run at the defaults (2 AMD EPYC vCPUs shared with a running study, so 1 torch thread; the
interleaved rounds differed by up to 15%): the forward 55 images/s (18.2 ms per image); loss at one timestep 57
images/s (1 forward, 0.96 forwards' time), the loss defaults 3.0 images/s (20 forwards, 18.3), SecMI 5.8
images/s (11 forwards, 9.5), PIA 33 images/s (2 forwards, 1.65): each attack costs its forward passes and no
measurable more; peak RSS 1.13-1.16 GiB for every row (the runtime and the model; one forward at batch 64).

On one NVIDIA H200 at the defaults: the forward 7,304 images/s; loss at one timestep 1,533 images/s (4.8 forwards'
time: at batch 64 the tiny UNet is launch bound and the attack's own small operations show), the loss defaults
355 images/s (20 forwards, 20.6), SecMI 653 (11, 11.2), PIA 3,309 (2, 2.2); CUDA peak 164 MiB. At 64 px: forward
3,797 images/s, loss defaults 191, SecMI 385, PIA 1,854 (each within 10% of its forwards' time), peak 532 MiB.

    python -m benchmarks.membership_throughput                  # 64 images at 32 px, batch 64: about 90 s
    python -m benchmarks.membership_throughput --device cuda --images 1024
"""

import statistics
import time

import torch

from benchmarks.harness import (
    MIB,
    PeakMemory,
    argument_parser,
    build_model,
    check_positive,
    image_batch,
    interleave,
    load_config,
    print_table,
    setup,
)
from src.attacks.membership import DEFAULT_OPTIONS, loss_scores, pia_scores, secmi_scores
from src.models.diffusion import sampling_network

LOSS, SECMI, PIA = (load_config("attack", name) for name in ("loss", "secmi", "pia"))
ONE_STEP = DEFAULT_OPTIONS["loss"]
BASELINE_T = 100
ATTACKS = ("forward", "loss_one", "loss_default", "secmi", "pia")
LABELS = {
    "forward": f"UNet forward, t={BASELINE_T} (baseline)",
    "loss_one": f"loss, t={ONE_STEP['timesteps'][0]}, {ONE_STEP['draws']} draw",
    "loss_default": f"loss, {len(LOSS['timesteps'])} t x {LOSS['draws']} draws (conf/attack/loss.yaml)",
    "secmi": f"SecMI, t_sec={SECMI['t_sec']}, k={SECMI['k']}",
    "pia": f"PIA, t={PIA['t']}, p={PIA['p']}",
}


def build_module(args):
    """The tiny DDPM module with seeded random weights, on the device, in eval mode."""
    overrides = ["model/unet=tiny", f"data.image_size={args.image_size}"]
    return build_model("ddpm", overrides, args.seed).to(args.device).eval()


@torch.no_grad()
def plain_forwards(network, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The predicted noise: one forward of `network` per image at t = BASELINE_T, batch by batch."""
    device, outputs = next(network.parameters()).device, []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        t = torch.full((len(x),), BASELINE_T, device=device, dtype=torch.long)
        outputs.append(network(x, t).sample)
    return torch.cat(outputs)


def attack_calls(module, images: torch.Tensor, batch_size: int) -> dict:
    """{attack: a call scoring `images`}."""
    return {
        "forward": lambda: plain_forwards(sampling_network(module), images, batch_size),
        "loss_one": lambda: loss_scores(module, images, batch_size=batch_size, **ONE_STEP),
        "loss_default": lambda: loss_scores(
            module, images, LOSS["timesteps"], LOSS["draws"], LOSS["seed"], batch_size=batch_size
        ),
        "secmi": lambda: secmi_scores(module, images, SECMI["t_sec"], SECMI["k"], batch_size=batch_size),
        "pia": lambda: pia_scores(module, images, PIA["t"], PIA["p"], batch_size=batch_size),
    }


class ForwardCounter:
    """Counts the images that pass through `network`'s forward (a forward hook)."""

    def __init__(self, network: torch.nn.Module):
        self.images = 0
        network.register_forward_hook(self.count)

    def count(self, module, inputs, output) -> None:
        self.images += len(inputs[0])


def timed(call, memory: PeakMemory, counter: ForwardCounter) -> dict:
    """{"seconds", "peak": bytes, "forwards": images through the UNet} of one call (synchronised on CUDA)."""
    memory.reset()
    counter.images = 0
    start = time.perf_counter()
    call()
    if memory.device.type == "cuda":
        torch.cuda.synchronize(memory.device)
    return {"seconds": time.perf_counter() - start, "peak": memory.peak(), "forwards": counter.images}


def summarise(results: dict[str, list[dict]], images: int) -> list[dict]:
    """One row per attack: forwards per image, images/s, ms per image, x forward, x forward per pass, peak."""
    rows = []
    for name, calls in results.items():
        seconds = statistics.median(call["seconds"] for call in calls)
        rows.append(
            {
                "attack": name,
                "label": LABELS[name],
                "forwards": calls[-1]["forwards"] / images,
                "images_per_s": images / seconds,
                "ms_per_image": seconds / images * 1e3,
                "peak_mib": max(call["peak"] for call in calls) / MIB,
            }
        )
    baseline = rows[0]["ms_per_image"]
    for row in rows:
        row["x_forward"] = row["ms_per_image"] / baseline
        row["x_per_pass"] = row["x_forward"] / row["forwards"]
    return rows


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="images scored per call (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per UNet batch (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of each attack (default 2)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("image_size", "images", "batch_size", "repeats"))
    return args


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the table and returns its rows (see `summarise`)."""
    args = parse_args(argv)
    threads = setup(args)
    memory = PeakMemory(torch.device(args.device))
    module = build_module(args)
    network = sampling_network(module)
    counter = ForwardCounter(network)
    images = image_batch(args.images, args.image_size, args.seed)["image"]
    parameters = sum(p.numel() for p in network.parameters())
    print(
        f"Membership attacks: tiny DDPM UNet ({parameters / 1e6:.2f}M parameters, EMA copy) at "
        f"{args.image_size} px, {args.images} images in batches of {args.batch_size}, device {args.device}, "
        f"{threads}",
        flush=True,
    )
    calls = attack_calls(module, images, args.batch_size)
    calls["forward"]()  # untimed
    runs = {name: (lambda call=call: timed(call, memory, counter)) for name, call in calls.items()}
    results = interleave(runs, args.repeats, lambda result: f"{result['seconds']:.2f} s")
    rows = summarise(results, args.images)
    print(f"\nmedian of {args.repeats} calls per attack, {args.images} images a call")
    columns = [
        ("label", "attack", ""),
        ("forwards", "forwards / image", ".1f"),
        ("images_per_s", "images/s", ".2f"),
        ("ms_per_image", "ms / image", ".2f"),
        ("x_forward", "x forward", ".2f"),
        ("x_per_pass", "x forward / pass", ".2f"),
        ("peak_mib", f"{memory.kind()} (MiB)", ".1f"),
    ]
    print_table(rows, columns)
    if memory.note:
        print(f"  memory: {memory.note}")
    return rows


if __name__ == "__main__":
    main()
