"""Benchmark: Lightning overhead of a DDPM training step against a plain diffusers + PyTorch loop (same math).

Both sides train the same `DDPMModule` (src/models/ddpm.py) from the same seeded initial weights on the same
fixed batch: a seeded (B, 3, S, S) image tensor in [-1, 1] served by a DataLoader over a dataset that returns
that batch (`SameBatch` of src/benchmarks/csd_step.py), so data loading is identical and negligible. The
module's hyperparameters are its defaults, which are those of conf/model/ddpm.yaml: DDPM linear betas over
1,000 steps, ε-prediction, AdamW lr 1e-4 with `constant_with_warmup` (500 steps), EMA decay 0.9999; the UNet
is one of conf/model/unet/*.yaml (`--unet`).

- Lightning: `DDPMModule` under a real `lightning.Trainer.fit(max_steps=...)` with `gradient_clip_val=1.0` (as
  in conf/experiment/ddpm_celebahq.yaml), no logger, no checkpointing, no progress bar, no model summary and
  no validation. Everything the module does each step is included: `self.log`, the non-finite loss guard, the
  LR scheduler, and the EMA update in `on_train_batch_end`.
- Plain: the DDPM step written out with the diffusers pieces (noise, timesteps, `DDPMScheduler.add_noise`, the
  `UNet2DModel` forward, `training_target`, MSE), `zero_grad`, `backward`, `clip_grad_norm_(1.0)`, the
  module's own AdamW parameter groups and diffusers LR schedule (`configure_optimizers`), the scheduler step,
  and the EMA update (`AveragedModel` with `src.nn.diffusion.ema_with_warmup`) after the optimizer step;
  autocast (and a GradScaler for 16-mixed) as Lightning's precision plugin does. It has no non-finite loss
  guard: on CUDA the guard's `bool(torch.isfinite(loss).all())` is one host sync per step that only the
  Lightning side pays.

Each window is one `Trainer.fit` on the Lightning side, so each builds a fresh AdamW and LR schedule; the
plain side does the same per window, and moves its module to the CPU after a window as Lightning's teardown
does (so on CUDA neither side's model sits in the other's peak memory). Both sides reseed torch's RNG before
the first step of every window, so they draw the same noise and timesteps: the first-step losses and the
weights after the warm-up window (trained and EMA) must agree, which the report checks.

Timing (`StepTimer`, `PeakMemory` of src/benchmarks/csd_step.py): one warm-up window per side, then
`--repeats` windows per side, interleaved (L P P L L P ...). Each window runs 1 + `--steps` steps; the first
carries the one-off setup and is not timed. A step is the full loop period, from the end of one step to the
end of the next. On CPU each step is timed on its own and the report gives the median over all timed steps
(robust to other processes sharing the CPU); on CUDA each window gives one mean step time and the report gives
the median window. Peak memory within the windows: CUDA `max_memory_allocated`, or on CPU the peak RSS of the
one process running both sides (both models included, so its ratio is near 1 by construction).

Reference runs (2 AMD EPYC vCPUs, 99% busy with three other training processes, defaults, hence 1 torch
thread): median step 738-791 ms (Lightning) and 750-772 ms (plain), ratio 0.984 and 1.025 over two runs;
first-step losses and warm-up weights bitwise equal. With 2 threads on the same busy CPUs single steps ranged
from 0.45 to 19 s: on a busy machine keep 1 thread, and rerun on an idle one before trusting a ratio. Not yet
run on CUDA.

    python -m src.benchmarks.ddpm_step          # tiny UNet at 32 px, batch 32: about 1 min on 2 CPU cores
    python -m src.benchmarks.ddpm_step --unet ddpm_64 --image-size 64 --batch-size 64 --device cuda \\
        --precision bf16-mixed --steps 20
"""

import argparse
import contextlib
import logging
import statistics
import types
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from src.benchmarks.csd_step import (
    MIB,
    PRECISIONS,
    LightningClock,
    PeakMemory,
    SameBatch,
    StepTimer,
    interleaved_windows,
)
from src.benchmarks.retrieval_metrics import busy_cpu_fraction, warn_if_busy
from src.models.ddpm import DDPMModule
from src.nn.diffusion import training_target

UNET_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "model" / "unet"
GRADIENT_CLIP_VAL = 1.0
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
BUSY_FRACTION = 0.2  # as warn_if_busy


def load_unet_config(name: str) -> dict:
    """The `UNet2DModel` keyword arguments of conf/model/unet/<name>.yaml."""
    path = UNET_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in UNET_CONFIGS.glob("*.yaml")))
        raise SystemExit(f"--unet {name}: {path} does not exist; choose one of {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build_module(args) -> DDPMModule:
    """The DDPM module under test, with seeded (hence identical on both sides) random initial weights."""
    torch.manual_seed(args.seed)
    return DDPMModule(unet=load_unet_config(args.unet), image_size=args.image_size)


def make_batch(batch_size: int, image_size: int, seed: int) -> dict:
    """{"image": (B, 3, S, S) float32 uniform in [-1, 1]}, the batch format of the image datamodules."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1}


def autocast_context(device: torch.device, precision: str):
    """A factory of the autocast context Lightning's precision plugin puts around `training_step`."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext


class SeededClock(LightningClock):
    """`LightningClock` that also reseeds torch's RNG before a window's first step, as `PlainLoop.window`."""

    def __init__(self, timer: StepTimer, seed: int):
        super().__init__(timer)
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.seed)


def lightning_window(module: DDPMModule, batch: dict, steps: int, args, timer: StepTimer) -> dict:
    """One `Trainer.fit` of 1 + `steps` steps: timed step durations (s), peak memory, first-step loss."""
    clock = SeededClock(timer.window(1 + steps), args.seed)
    cuda = args.device.startswith("cuda")
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=[torch.device(args.device).index or 0] if cuda else 1,
        precision=args.precision,
        max_steps=1 + steps,
        gradient_clip_val=GRADIENT_CLIP_VAL,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, DataLoader(SameBatch(batch, 1 + steps), batch_size=None))
    if clock.batches != 1 + steps:
        raise RuntimeError(
            f"Lightning ran {clock.batches} steps, expected {1 + steps}: the fit stopped early"
        )
    return {"steps": timer.durations(), "peak": timer.memory.read(), "loss": clock.first_loss}


class PlainLoop:
    """The same training step in plain diffusers + PyTorch, on its own copy of the module (same weights)."""

    def __init__(self, module: DDPMModule, args):
        self.module, self.device, self.seed = module, torch.device(args.device), args.seed
        self.module.train()
        self.autocast = autocast_context(self.device, args.precision)
        # 16-mixed scales the loss, as Lightning's MixedPrecision plugin does (CUDA only, see parse_args).
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "16-mixed" else None

    def start(self, total_steps: int) -> None:
        """What `Trainer.fit` sets up: the module on the device, a fresh AdamW and LR schedule."""
        self.module.to(self.device)
        # configure_optimizers reads only `trainer.estimated_stepping_batches` (the schedule's length).
        self.module.trainer = types.SimpleNamespace(estimated_stepping_batches=total_steps)
        config = self.module.configure_optimizers()
        self.module.trainer = None
        self.optimizer, self.scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        # Lightning clips `main_params(optimizer)`: the parameters in parameter-group order.
        self.clip_params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, batch: dict) -> torch.Tensor:
        unet, noise_scheduler = self.module.unet, self.module.noise_scheduler
        clean = batch["image"].to(self.device)  # (B, C, H, W)
        with self.autocast():
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device)  # fmt: skip
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps).sample
            target = training_target(noise_scheduler, clean, noise, timesteps)
            loss = F.mse_loss(prediction.float(), target.float())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.clip_params, GRADIENT_CLIP_VAL)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.clip_params, GRADIENT_CLIP_VAL)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.module.ema.update_parameters(unet)
        return loss

    def window(self, batch: dict, steps: int, timer: StepTimer) -> dict:
        """1 + `steps` steps over a fresh DataLoader, timed like `lightning_window`."""
        self.start(1 + steps)
        timer.window(1 + steps)
        first_loss = None
        for index, item in enumerate(DataLoader(SameBatch(batch, 1 + steps), batch_size=None)):
            if index == 0:
                torch.manual_seed(self.seed)
            loss = self.step(item)
            if index == 0:
                first_loss = float(loss.detach())  # before the clock starts
            timer.step_end(index, steps)
        result = {"steps": timer.durations(), "peak": timer.memory.read(), "loss": first_loss}
        self.optimizer = self.scheduler = self.clip_params = None  # Lightning's teardown frees them too
        self.module.cpu()
        return result


def max_weight_difference(a: DDPMModule, b: DDPMModule) -> dict:
    """Largest |a - b| over the trained UNet's parameters and over the EMA copy's."""

    def largest(params_a, params_b) -> float:
        pairs = zip(params_a, params_b, strict=True)
        return max(float((x.detach().cpu().float() - y.detach().cpu().float()).abs().max()) for x, y in pairs)

    return {
        "unet": largest(a.unet.parameters(), b.unet.parameters()),
        "ema": largest(a.ema.module.parameters(), b.ema.module.parameters()),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", default="tiny", help="name of a conf/model/unet/*.yaml")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per side, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="steps of the untimed warm-up window per side")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads, both sides (default: see set_threads)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_device_and_precision(args)
    if min(args.steps, args.repeats, args.warmup) < 1:
        raise SystemExit(
            f"--steps, --repeats and --warmup must be >= 1, got {args.steps}, {args.repeats}, {args.warmup}"
        )
    return args


def check_device_and_precision(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.precision == "16-mixed" and not args.device.startswith("cuda"):
        raise SystemExit(
            "--precision 16-mixed: Lightning replaces it with bf16-mixed on CPU, so the two sides would "
            "differ; pass --precision bf16-mixed (or run on --device cuda)"
        )


def set_threads(args) -> str:
    """Sets torch's thread count and says how it was chosen: `--threads`, or by default all of torch's
    threads, except 1 on a CPU device whose CPUs are busy with other processes. There OpenMP threads wait for
    descheduled peers: on 2 vCPUs shared with three training processes, a tiny-UNet forward at batch 32 took
    2.6 s with 2 threads and 0.27 s with 1."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        return "--threads"
    busy = busy_cpu_fraction() if args.device == "cpu" else None
    if busy is not None and busy > BUSY_FRACTION:
        torch.set_num_threads(1)
        return f"auto: the CPUs are {busy:.0%} busy with other processes; pass --threads N to override"
    return "auto: all"


def quiet_lightning() -> None:
    """Silence Lightning's notes about the missing validation loader, few dataloader workers and the like."""
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> dict:
    """Runs the benchmark, prints the report and returns its numbers (see `summarize`)."""
    args = parse_args(argv)
    threads = set_threads(args)
    quiet_lightning()
    device = torch.device(args.device)
    timer = StepTimer(PeakMemory(device), device)
    batch = make_batch(args.batch_size, args.image_size, args.seed)
    lightning_module = build_module(args)
    plain = PlainLoop(build_module(args), args)
    parameters = sum(p.numel() for p in lightning_module.unet.parameters())

    print(
        f"DDPM training step: UNet {args.unet} ({parameters / 1e6:.2f}M parameters) at {args.image_size} px, "
        f"batch {args.batch_size}, device {args.device}, precision {args.precision}, gradient clip "
        f"{GRADIENT_CLIP_VAL}, EMA on both sides, torch threads {torch.get_num_threads()} ({threads})",
        flush=True,
    )
    warn_if_busy()
    summary = time_training_step(lightning_module, plain, batch, args, timer)
    print_report(args, summary, timer.memory)
    return summary


def time_training_step(lightning_module, plain, batch: dict, args, timer: StepTimer) -> dict:
    """One warm-up window per side (then the same-math check on the weights), `args.repeats` interleaved timed
    windows per side; returns `summarize`'s dict. plain: a `PlainLoop` (or subclass) on its own copy of the module."""
    warm_l = lightning_window(lightning_module, batch, args.warmup, args, timer)
    warm_p = plain.window(batch, args.warmup, timer)
    weight_diff = max_weight_difference(lightning_module, plain.module)
    results = interleaved_windows(
        lambda: lightning_window(lightning_module, batch, args.steps, args, timer),
        lambda: plain.window(batch, args.steps, timer),
        args.repeats,
    )
    return summarize(results, warm_l["loss"], warm_p["loss"], weight_diff)


def summarize(results: dict, loss_lightning: float, loss_plain: float, weight_diff: dict) -> dict:
    """{"lightning" / "plain": {"median_ms", "min_ms", "max_ms", "peak_mib"}, "ratio" (median step,
    Lightning / plain), "memory_ratio" (peak), "loss": {"lightning", "plain"},
    "weight_diff": {"unet", "ema"}}."""
    summary = {}
    for name, windows in results.items():
        steps = [step * 1e3 for window in windows for step in window["steps"]]
        summary[name] = {
            "median_ms": statistics.median(steps),
            "min_ms": min(steps),
            "max_ms": max(steps),
            "peak_mib": max(window["peak"] for window in windows) / MIB,
        }
    summary["ratio"] = summary["lightning"]["median_ms"] / summary["plain"]["median_ms"]
    summary["memory_ratio"] = summary["lightning"]["peak_mib"] / summary["plain"]["peak_mib"]
    summary["loss"] = {"lightning": loss_lightning, "plain": loss_plain}
    summary["weight_diff"] = weight_diff
    return summary


def print_report(args, summary: dict, memory: PeakMemory, module_name: str = "DDPMModule") -> None:
    """The step table, the ratios and the same-math check; `module_name` names the Lightning side."""
    cuda = args.device.startswith("cuda")
    memory_kind = "CUDA peak allocated" if cuda else "peak RSS"
    unit = "window means (one per window, CUDA)" if cuda else "single steps"
    print(
        f"\n{args.repeats} windows per side, interleaved L P P L ..., each timing {args.steps} steps "
        f"after 1 untimed step (plus one {args.warmup}-step warm-up window per side); statistics over {unit}"
    )
    print(
        f"{'method':<42}{'median step (ms)':>18}{'min (ms)':>10}{'max (ms)':>10}{memory_kind + ' (MiB)':>26}"
    )
    labels = {
        "lightning": f"Lightning Trainer.fit ({module_name})",
        "plain": "plain diffusers + PyTorch loop",
    }
    for name, label in labels.items():
        row = summary[name]
        print(
            f"{label:<42}{row['median_ms']:>18.1f}{row['min_ms']:>10.1f}{row['max_ms']:>10.1f}"
            f"{row['peak_mib']:>26.1f}"
        )
    verdict = "meets" if summary["ratio"] <= 1.05 else "MISSES"
    print(f"ratio Lightning / plain (median step): {summary['ratio']:.3f} ({verdict} the target <= 1.05)")
    print(f"ratio Lightning / plain ({memory_kind}): {summary['memory_ratio']:.3f}")
    if not cuda:
        print(
            "  peak RSS is of the one process running both sides (both models included): compare, don't add"
        )
    if memory.note:
        print(f"  memory: {memory.note}")
    loss, diff = summary["loss"], summary["weight_diff"]
    print(
        f"same math check, first-step loss from the same weights and noise: Lightning "
        f"{loss['lightning']:.6f}, "
        f"plain {loss['plain']:.6f} (|diff| {abs(loss['lightning'] - loss['plain']):.1e}); after the warm-up "
        f"window max |weight diff| UNet {diff['unet']:.1e}, EMA {diff['ema']:.1e}"
    )


if __name__ == "__main__":
    main()
