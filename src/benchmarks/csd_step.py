"""Benchmark: Lightning overhead of a CSD training step against a plain PyTorch loop doing the same math.

Both sides train the same network from the same initial weights on the same fixed batch: a seeded random
(B, 2, 3, H, W) image tensor and multi-hot labels, served by a DataLoader over a dataset that returns that
batch, so data loading is identical and negligible.

- Lightning: `CSDModule` under a real `lightning.Trainer.fit(max_steps=...)` with no logger, no checkpointing,
  no progress bar, no model summary and no validation. Everything the module does each step is included
  (logging, the non-finite loss guard, per-parameter clipping through `configure_gradient_clipping`, the LR
  scheduler).
- Plain: the forward of `CSDModule.training_step` written out, the module's own `csd_loss` (same supcon losses
  and weights), `zero_grad`, `backward`, `clip_gradients_per_parameter`, SGD with the parameter groups of
  `CSDModule.configure_optimizers`, and the LR scheduler step; autocast (and a GradScaler for 16-mixed) as
  Lightning's precision plugin does.

Timing: one warm-up window per side, then `--repeats` windows per side, interleaved (L P P L L P ...). Each
window is one `Trainer.fit` (or one pass of the plain loop) of 1 + `--steps` steps; the first step carries the
fit's one-off setup and is not timed. A step is the full loop period, from the end of one step to the end of
the next: data fetch, forward, backward, clipping, optimizer and scheduler. On CPU each step is timed on its
own and the report gives the median over all timed steps (robust to other processes sharing the CPU); on CUDA
each window gives one mean step time (a sync per step would hide the host/device overlap) and the report gives
the median window. Peak memory is taken within the windows: CUDA `max_memory_allocated`, or on CPU the peak
RSS (VmHWM, reset per window through /proc/self/clear_refs; the process-lifetime peak where that is
unavailable). Both sides run in one process with the same torch thread count.

Reference runs (2 AMD EPYC vCPUs, otherwise idle, defaults): median step 370-430 ms on both sides, ratio
0.975-1.004 over six runs. Timed directly, the module's three `self.log` calls cost 1.2 ms per step and its
non-finite loss guard 0.06 ms on CPU; on CUDA the guard's `bool(torch.isfinite(loss).all())` is one host sync
per step, which the plain loop does not have.

    python -m src.benchmarks.csd_step        # timm resnet18 at 64 px, batch 32: about 1 min on 2 CPU cores
    python -m src.benchmarks.csd_step --backbone ViT-B-16 --source open_clip --image-size 224 \\
        --embed-dim none --device cuda --precision bf16-mixed --batch-size 64 --steps 20
"""

import argparse
import contextlib
import logging
import resource
import statistics
import sys
import time
import types
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from src.benchmarks.retrieval_metrics import warn_if_busy
from src.losses import dann_alpha
from src.models.csd import CSDModule, clip_gradients_per_parameter

MIB = 2**20
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class SameBatch(Dataset):
    """`length` times the same batch dict; DataLoader(batch_size=None) hands it over as it is."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def make_batch(batch_size: int, image_size: int, num_labels: int, seed: int) -> dict:
    """{"images": (B, 2, 3, S, S) float32, "labels": (B, L) float32 multi-hot with 1 to 3 labels a row}."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 2, 3, image_size, image_size, generator=g)
    labels = torch.zeros(batch_size, num_labels)
    for row in range(batch_size):
        n = int(torch.randint(1, 4, (1,), generator=g))
        labels[row, torch.randperm(num_labels, generator=g)[:n]] = 1.0
    return {"images": images, "labels": labels}


def build_module(args) -> CSDModule:
    """The CSD module under test, with seeded (hence identical on both sides) random initial weights."""
    torch.manual_seed(args.seed)
    backbone = {
        "name": args.backbone,
        "source": args.source,
        "pretrained": None,
        "image_size": args.image_size,
    }
    return CSDModule(backbone=backbone, embed_dim=args.embed_dim, batch_size=args.batch_size)


class PeakMemory:
    """Peak memory within a window: CUDA allocator peak, or peak RSS (VmHWM) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.note = ""

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.note = "process-lifetime peak: /proc/self/clear_refs is not writable here"

    def read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class StepTimer:
    """Step durations within one window, from the end of its first step to the end of its last.

    The first step carries one-off setup (the fit's, or a fresh DataLoader iterator's), so it is never timed.
    On CPU every later step is timed on its own. On CUDA the clock synchronises only at the window's two ends,
    since a sync per step would hide the host/device overlap being measured, so a window yields one mean step
    time.
    """

    def __init__(self, memory: PeakMemory, device: torch.device):
        self.memory, self.device = memory, device
        self.stamps: list[float] = []

    def step_end(self, index: int, last_index: int) -> None:
        cuda = self.device.type == "cuda"
        if index == 0 or index == last_index or not cuda:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.stamps.append(time.perf_counter())
        if index == 0:
            self.memory.reset()

    def durations(self) -> list[float]:
        if self.device.type == "cuda":
            return [(self.stamps[-1] - self.stamps[0]) / self.steps]
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]

    @property
    def steps(self) -> int:
        return self.count - 1

    def window(self, count: int) -> "StepTimer":
        self.count, self.stamps = count, []
        return self


class LightningClock(L.Callback):
    """Feeds the end of every training batch to a StepTimer and keeps the first step's loss."""

    def __init__(self, timer: StepTimer):
        self.timer = timer
        self.first_loss = None
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first_loss = float(outputs["loss"])  # before the clock starts
        self.timer.step_end(batch_idx, trainer.max_steps - 1)
        self.batches += 1


def lightning_window(module: CSDModule, batch: dict, steps: int, args, timer: StepTimer) -> dict:
    """One `Trainer.fit` of 1 + `steps` steps: timed step durations (s), peak memory, first-step loss."""
    clock = LightningClock(timer.window(1 + steps))
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=[torch.device(args.device).index or 0] if args.device.startswith("cuda") else 1,
        precision=args.precision,
        max_steps=1 + steps,
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
    """The same training step in plain PyTorch, on its own copy of the module (same initial weights)."""

    def __init__(self, module: CSDModule, args, total_steps: int):
        self.module, self.device = module.to(args.device), torch.device(args.device)
        self.module.train()
        # configure_optimizers reads only these three attributes of its trainer: the same SGD parameter
        # groups, LR scaling and LambdaLR schedule as under Lightning.
        module.trainer = types.SimpleNamespace(
            world_size=1, accumulate_grad_batches=1, estimated_stepping_batches=total_steps
        )
        config = module.configure_optimizers()
        module.trainer = None
        self.optimizer, self.scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        self.total_steps = total_steps
        self.step_count = 0
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        )
        # 16-mixed scales the loss, as Lightning's MixedPrecision plugin does (CUDA only, see parse_args).
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "16-mixed" else None

    def step(self, batch: dict) -> torch.Tensor:
        module = self.module
        images = batch["images"].to(self.device)  # (B, V, 3, H, W)
        labels = batch["labels"].to(self.device).float()  # (B, L)
        alpha = dann_alpha(self.step_count / self.total_steps) if module.loss_cfg["adversarial"] else None
        with self.autocast():
            _, style, _ = module.net(images.flatten(0, 1), with_content=False, reverse_alpha=alpha)
            style = style.unflatten(0, images.shape[:2])  # (B, V, P)
            loss = module.csd_loss(style, None, labels)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            clip_gradients_per_parameter(module.parameters(), module.hparams.clip_grad)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            clip_gradients_per_parameter(module.parameters(), module.hparams.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.step_count += 1
        return loss

    def window(self, batch: dict, steps: int, timer: StepTimer) -> dict:
        """1 + `steps` steps over a fresh DataLoader, timed like `lightning_window`."""
        timer.window(1 + steps)
        first_loss = None
        for index, item in enumerate(DataLoader(SameBatch(batch, 1 + steps), batch_size=None)):
            loss = self.step(item)
            if index == 0:
                first_loss = float(loss.detach())  # before the clock starts
            timer.step_end(index, steps)
        return {"steps": timer.durations(), "peak": timer.memory.read(), "loss": first_loss}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18", help="timm or open_clip model name")
    parser.add_argument("--source", default="timm", choices=["timm", "open_clip"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (each with 2 views)")
    parser.add_argument(
        "--embed-dim",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=128,
        help="style/content head size; 'none' keeps CLIP's projection size (open_clip only)",
    )
    parser.add_argument("--labels", type=int, default=100, help="size of the multi-hot label vocabulary")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per side, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="steps of the untimed warm-up window per side")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.precision == "16-mixed" and not args.device.startswith("cuda"):
        raise SystemExit(
            "--precision 16-mixed: Lightning replaces it with bf16-mixed on CPU, so the two sides would "
            "differ; pass --precision bf16-mixed (or run on --device cuda)"
        )
    if min(args.steps, args.repeats, args.warmup) < 1:
        raise SystemExit(
            f"--steps, --repeats and --warmup must be >= 1, got {args.steps}, {args.repeats}, {args.warmup}"
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Lightning's notes about the missing validation loader, few dataloader workers and the like.
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    device = torch.device(args.device)
    timer = StepTimer(PeakMemory(device), device)
    batch = make_batch(args.batch_size, args.image_size, args.labels, args.seed)
    lightning_module = build_module(args)
    total_steps = (1 + args.warmup) + args.repeats * (1 + args.steps)
    plain = PlainLoop(build_module(args), args, total_steps=total_steps)

    print(
        f"CSD training step: {args.source} {args.backbone} at {args.image_size} px, "
        f"batch {args.batch_size} x 2 views, embed_dim {args.embed_dim}, device {args.device}, "
        f"precision {args.precision}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    warn_if_busy()
    warm_l = lightning_window(lightning_module, batch, args.warmup, args, timer)
    warm_p = plain.window(batch, args.warmup, timer)
    results = interleaved_windows(
        lambda: lightning_window(lightning_module, batch, args.steps, args, timer),
        lambda: plain.window(batch, args.steps, timer),
        args.repeats,
    )
    print_report(args, results, warm_l["loss"], warm_p["loss"], timer.memory)


def interleaved_windows(lightning, plain, repeats: int) -> dict[str, list[dict]]:
    """Runs `repeats` timed windows per side, interleaved L P P L L P ... (alternating which side goes first cancels
    any bias of running first or second), printing each pair's mean step times. lightning / plain: callables running
    one window and returning its result ({"steps": [seconds], ...}). Returns {"lightning": [...], "plain": [...]}."""
    results = {"lightning": [], "plain": []}
    run = {"lightning": lightning, "plain": plain}
    for repeat in range(repeats):
        for name in ("lightning", "plain") if repeat % 2 == 0 else ("plain", "lightning"):
            results[name].append(run[name]())
        means = {name: statistics.mean(windows[-1]["steps"]) * 1e3 for name, windows in results.items()}
        print(
            f"  window {repeat + 1}/{repeats}: Lightning {means['lightning']:.1f} ms, "
            f"plain {means['plain']:.1f} ms per step (mean)",
            flush=True,
        )
    return results


def print_report(args, results: dict, loss_lightning: float, loss_plain: float, memory: PeakMemory) -> None:
    memory_kind = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS"
    unit = "window means (one per window, CUDA)" if args.device.startswith("cuda") else "single steps"
    print(
        f"\n{args.repeats} windows per side, interleaved L P P L ..., each timing {args.steps} steps "
        f"after 1 untimed step (plus one {args.warmup}-step warm-up window per side); statistics over {unit}"
    )
    header = (
        f"{'method':<34}{'median step (ms)':>18}{'min (ms)':>10}{'max (ms)':>10}{memory_kind + ' (MiB)':>26}"
    )
    print(header)
    labels = {"lightning": "Lightning Trainer.fit (CSDModule)", "plain": "plain PyTorch loop"}
    median = {}
    for name, windows in results.items():
        steps = [step * 1e3 for window in windows for step in window["steps"]]
        median[name] = statistics.median(steps)
        peak = max(window["peak"] for window in windows) / MIB
        print(f"{labels[name]:<34}{median[name]:>18.1f}{min(steps):>10.1f}{max(steps):>10.1f}{peak:>26.1f}")
    if not args.device.startswith("cuda"):
        print(
            "  peak RSS is of the one process running both sides (both models included): compare, don't add"
        )
    if memory.note:
        print(f"  memory: {memory.note}")
    ratio = median["lightning"] / median["plain"]
    verdict = "meets" if ratio <= 1.05 else "MISSES"
    print(f"ratio Lightning / plain (median step): {ratio:.3f} ({verdict} the target <= 1.05)")
    print(
        f"same math check, first-step loss from the same initial weights: Lightning {loss_lightning:.6f}, "
        f"plain {loss_plain:.6f} (|diff| {abs(loss_lightning - loss_plain):.1e})"
    )


if __name__ == "__main__":
    main()
