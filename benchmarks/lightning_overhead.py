"""Benchmark: what Lightning costs. A training step of one of the project's modules under `lightning.Trainer`
against a plain PyTorch loop doing the same math: both sides call the module's own `loss(batch)`.

    --module csd    CSDModule, conf/model/csd.yaml with model/backbone=resnet18 and embed_dim 128, 64 px,
                    batch 32 of 2 views with multi-hot labels
    --module ddpm   DDPMModule, conf/model/ddpm.yaml with model/unet=tiny, 32 px, batch 32
    --module t2i    Text2ImageModule, conf/model/text2img.yaml with model/cond_unet=tiny, 32 px, batch 16
                    images with a caption each (as the embedded captioned faces write them); no mitigation

Each side trains its own copy of the module, built from the config as `src.train` builds it (further Hydra
overrides on the command line, weights always random) from the same seeded initial weights, on the same fixed
batch served by a DataLoader over `SameBatch`, so data loading is identical and negligible.

- Lightning: `Trainer.fit(max_steps=1 + steps)` with no logger, checkpointing, progress bar, model summary or
  validation, and `gradient_clip_val=1.0` for the diffusion modules as in their experiments. Everything the
  module does per step is included: `training_step` with its logging and non-finite loss guard, the module's
  clipping hook, the LR scheduler, the EMA update in `on_train_batch_end`.
- Plain: per step `module.loss(batch)["loss"]` under the autocast of Lightning's precision plugin,
  `zero_grad`, `backward` (through a GradScaler for 16-mixed), the clipping (CSD: the module's own
  per-parameter `configure_gradient_clipping`; diffusion: `clip_grad_norm_(1.0)` over the optimizer's
  parameters, as Lightning), the optimizer and LR schedule of the module's `configure_optimizers`, the
  scheduler step and, for the diffusion modules, the EMA `update_parameters`. There is no non-finite loss
  guard: on CUDA the guard's `bool(torch.isfinite(loss).all())` is one host sync per step that only the
  Lightning side pays.

Each window is one `Trainer.fit` on the Lightning side, so each builds a fresh optimizer and LR schedule; the
plain side does the same and moves its module to the CPU after a window, as Lightning's teardown does (so on
CUDA neither side's model sits in the other's peak memory). Both sides reseed torch before the first step of
every window, so they draw the same noise, timesteps and prompt dropout: the first-step losses, and after the
warm-up window the weights of every submodule (the trained network, the EMA copy, the frozen text encoder),
must agree, which the report checks.

Timing (benchmarks/harness.py): one warm-up window per side, then `--repeats` windows per side, interleaved.
Each window runs 1 + `--steps` steps and the first is not timed; a step is the full loop period, from the end
of one step to the end of the next. The report gives the median over single steps on the CPU, over window
means on CUDA. The CPU peak RSS is that of the one process running both sides, both models included: compare
it, don't add it.

Reference runs on 2 AMD EPYC vCPUs, with the per-module scripts this one replaces (same sides, same
statistics): csd idle, 2 threads: median step 370-430 ms on both sides, ratio 0.975-1.004 over six runs; the
module's `self.log` calls cost 1.2 ms per step and its non-finite loss guard 0.06 ms. ddpm, CPUs 99% busy with
three training processes, 1 thread: 738-791 ms (Lightning) and 750-772 ms (plain), ratio 0.984 and 1.025 over
two runs. t2i, 1 thread: 403.3 and 407.9 ms, ratio 0.989. First-step losses and warm-up weights bitwise equal.
Not yet run on CUDA.

    python -m benchmarks.lightning_overhead --module csd       # about 1 min on 2 CPU cores
    python -m benchmarks.lightning_overhead --module ddpm --device cuda --precision bf16-mixed \\
        --image-size 64 --batch-size 64 --steps 20 model/unet=ddpm_64
    python -m benchmarks.lightning_overhead --module csd --device cuda --precision bf16-mixed \\
        --image-size 224 --batch-size 64 --steps 20 model/backbone=clip_vitb16 model.embed_dim=null
"""

import logging
import statistics
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import (
    MIB,
    PeakMemory,
    StepTimer,
    argument_parser,
    autocast,
    build_model,
    check_positive,
    image_batch,
    interleave,
    optimizers_outside_trainer,
    print_table,
    setup,
)

# model config, its network override, image size, batch size, the Trainer's gradient_clip_val
MODULES = {
    "csd": ("csd", ["model/backbone=resnet18", "model.embed_dim=128"], 64, 32, None),
    "ddpm": ("ddpm", ["model/unet=tiny"], 32, 32, 1.0),
    "t2i": ("text2img", ["model/cond_unet=tiny"], 32, 16, 1.0),
}
CSD_LABELS = 100  # size of the multi-hot label vocabulary of the CSD batch


class SameBatch(Dataset):
    """`length` times the same batch dict; DataLoader(batch_size=None) hands it over as it is."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def csd_batch(batch_size: int, image_size: int, num_labels: int, seed: int) -> dict:
    """{"images": (B, 2, 3, S, S) float32, "labels": (B, L) float32 multi-hot with 1 to 3 labels a row}."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 2, 3, image_size, image_size, generator=g)
    labels = torch.zeros(batch_size, num_labels)
    for row in range(batch_size):
        n = int(torch.randint(1, 4, (1,), generator=g))
        labels[row, torch.randperm(num_labels, generator=g)[:n]] = 1.0
    return {"images": images, "labels": labels}


def make_batch(args) -> dict:
    if args.module == "csd":
        return csd_batch(args.batch_size, args.image_size, CSD_LABELS, args.seed)
    return image_batch(args.batch_size, args.image_size, args.seed, captions=args.module == "t2i")


def build_module(args):
    """The module under test, with seeded (hence identical on both sides) random initial weights."""
    model, network, _, _, _ = MODULES[args.module]
    sizes = [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}"]
    weights = ["model.backbone.pretrained=null"] if args.module == "csd" else []
    return build_model(model, [*network, *sizes, *args.overrides, *weights], args.seed)


class Clock(L.Callback):
    """Reseeds torch before a window's first step (as `PlainLoop.window`), feeds the end of every step to the
    timer and keeps the first step's loss."""

    def __init__(self, timer: StepTimer, seed: int):
        self.timer, self.seed = timer, seed
        self.first_loss, self.batches = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first_loss = float(outputs["loss"])  # before the clock starts
        self.timer.step_end(batch_idx)
        self.batches += 1


def lightning_window(module, batch: dict, steps: int, args, timer: StepTimer) -> dict:
    """One `Trainer.fit` of 1 + `steps` steps: timed step durations (s), peak memory, first-step loss."""
    clock = Clock(timer.window(steps), args.seed)
    cuda = args.device.startswith("cuda")
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=[torch.device(args.device).index or 0] if cuda else 1,
        precision=args.precision,
        max_steps=1 + steps,
        gradient_clip_val=MODULES[args.module][4],
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
    return timer.result(loss=clock.first_loss)


class PlainLoop:
    """The same training step in plain PyTorch, on its own copy of the module (same initial weights)."""

    def __init__(self, module, args):
        self.module, self.device = module, torch.device(args.device)
        self.precision, self.seed = args.precision, args.seed
        self.gradient_clip_val = MODULES[args.module][4]
        # 16-mixed scales the loss, as Lightning's MixedPrecision plugin does (CUDA only, see check_device).
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "16-mixed" else None
        self.optimizer = self.scheduler = None

    def clip(self) -> None:
        if self.gradient_clip_val:  # Lightning's norm clipping: the parameters in parameter-group order
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
        else:  # the module's own hook (CSD: per-parameter clipping), as Lightning calls it
            self.module.configure_gradient_clipping(self.optimizer)

    def step(self, batch: dict) -> torch.Tensor:
        batch = {
            key: value.to(self.device) if torch.is_tensor(value) else value for key, value in batch.items()
        }
        with autocast(self.device, self.precision):
            loss = self.module.loss(batch)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.clip()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self.clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        if getattr(self.module, "ema", None) is not None:  # the diffusion modules' on_train_batch_end
            self.module.ema.update_parameters(self.module.unet)
        return loss

    def window(self, batch: dict, steps: int, timer: StepTimer) -> dict:
        """What one `Trainer.fit` does: 1 + `steps` steps over a fresh DataLoader with a fresh optimizer and
        LR schedule, timed like `lightning_window`; the module goes back to the CPU at the end."""
        self.module.to(self.device).train()
        self.optimizer, self.scheduler = optimizers_outside_trainer(self.module, 1 + steps)
        timer.window(steps)
        first_loss = None
        for index, item in enumerate(DataLoader(SameBatch(batch, 1 + steps), batch_size=None)):
            if index == 0:
                torch.manual_seed(self.seed)
            loss = self.step(item)
            if index == 0:
                first_loss = float(loss.detach())  # before the clock starts
            timer.step_end(index)
        result = timer.result(loss=first_loss)
        self.optimizer = self.scheduler = None  # Lightning's teardown frees them too
        self.module.cpu()
        return result


def weight_differences(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """Largest |a - b| over the parameters and buffers of each submodule: {"unet": ..., "ema": ...}."""
    differences = {}
    for (name, child_a), child_b in zip(a.named_children(), b.children(), strict=True):
        pairs = zip(child_a.state_dict().values(), child_b.state_dict().values(), strict=True)
        differences[name] = max(
            (float((x.cpu().double() - y.cpu().double()).abs().max()) for x, y in pairs if x.numel()),
            default=0.0,
        )
    return differences


def time_training_step(lightning_module, plain: PlainLoop, batch: dict, args, timer: StepTimer) -> dict:
    """One warm-up window per side, the same-math check, `args.repeats` interleaved timed windows per side.

    Returns {"lightning" / "plain": {"median_ms", "min_ms", "max_ms", "peak_mib"}, "ratio" (median step,
    Lightning / plain), "memory_ratio" (peak), "loss": {"lightning", "plain"} (first step), "weight_diff"
    (`weight_differences` after the warm-up window), "module": the module's class name}.
    """
    warm = {"lightning": lightning_window(lightning_module, batch, args.warmup, args, timer)}
    warm["plain"] = plain.window(batch, args.warmup, timer)
    weight_diff = weight_differences(lightning_module, plain.module)
    windows = interleave(
        {
            "lightning": lambda: lightning_window(lightning_module, batch, args.steps, args, timer),
            "plain": lambda: plain.window(batch, args.steps, timer),
        },
        args.repeats,
        describe=lambda window: f"{statistics.mean(window['steps']) * 1e3:.1f} ms per step (mean)",
    )
    summary = {}
    for name, results in windows.items():
        steps = [step * 1e3 for window in results for step in window["steps"]]
        summary[name] = {
            "median_ms": statistics.median(steps),
            "min_ms": min(steps),
            "max_ms": max(steps),
            "peak_mib": max(window["peak"] for window in results) / MIB,
        }
    summary["ratio"] = summary["lightning"]["median_ms"] / summary["plain"]["median_ms"]
    summary["memory_ratio"] = summary["lightning"]["peak_mib"] / summary["plain"]["peak_mib"]
    summary["loss"] = {name: window["loss"] for name, window in warm.items()}
    summary["weight_diff"] = weight_diff
    summary["module"] = type(lightning_module).__name__
    return summary


def print_report(args, summary: dict, memory: PeakMemory) -> None:
    unit = "window means (one per window, CUDA)" if args.device.startswith("cuda") else "single steps"
    print(
        f"\n{args.repeats} windows per side, interleaved, each timing {args.steps} steps after 1 untimed "
        f"step (plus one {args.warmup}-step warm-up window per side); statistics over {unit}"
    )
    rows = [
        {"method": f"Lightning Trainer.fit ({summary['module']})", **summary["lightning"]},
        {"method": "plain PyTorch loop", **summary["plain"]},
    ]
    columns = [
        ("method", "method", ""),
        ("median_ms", "median step (ms)", ".1f"),
        ("min_ms", "min (ms)", ".1f"),
    ]
    columns += [("max_ms", "max (ms)", ".1f"), ("peak_mib", f"{memory.kind()} (MiB)", ".1f")]
    print_table(rows, columns)
    verdict = "meets" if summary["ratio"] <= 1.05 else "MISSES"
    print(f"ratio Lightning / plain (median step): {summary['ratio']:.3f} ({verdict} the target <= 1.05)")
    print(f"ratio Lightning / plain ({memory.kind()}): {summary['memory_ratio']:.3f}")
    if memory.note:
        print(f"  memory: {memory.note}")
    loss = summary["loss"]
    weights = ", ".join(f"{name} {diff:.1e}" for name, diff in summary["weight_diff"].items())
    print(
        f"same math check, first-step loss from the same weights and noise: Lightning "
        f"{loss['lightning']:.6f}, plain {loss['plain']:.6f} (|diff| "
        f"{abs(loss['lightning'] - loss['plain']):.1e}); after the warm-up window max |weight diff| {weights}"
    )


def quiet_lightning() -> None:
    """Silence Lightning's notes about the missing validation loader, few dataloader workers and the like."""
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_args(argv=None):
    parser = argument_parser(__doc__, precision=True, overrides="model/unet=ddpm_64 model.ema_decay=0")
    parser.add_argument("--module", required=True, choices=list(MODULES))
    parser.add_argument("--image-size", type=int, help="default: csd 64, ddpm and t2i 32")
    parser.add_argument("--batch-size", type=int, help="default: csd 32 (of 2 views each), ddpm 32, t2i 16")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per side, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="steps of the untimed warm-up window per side")
    args = parser.parse_args(argv)
    _, _, image_size, batch_size, _ = MODULES[args.module]
    args.image_size = image_size if args.image_size is None else args.image_size
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    check_positive(parser, args, ("steps", "repeats", "warmup", "batch_size"))
    return args


def main(argv=None) -> dict:
    """Runs the benchmark, prints the report and returns its numbers (see `time_training_step`)."""
    args = parse_args(argv)
    threads = setup(args)
    quiet_lightning()
    memory = PeakMemory(torch.device(args.device))
    lightning_module, plain = build_module(args), PlainLoop(build_module(args), args)
    parameters = sum(p.numel() for p in lightning_module.parameters() if p.requires_grad)
    print(
        f"Training step of {type(lightning_module).__name__} ({parameters / 1e6:.2f}M trained parameters) at "
        f"{args.image_size} px, batch {args.batch_size}, "
        f"{' '.join(args.overrides) or 'no further overrides'}, device {args.device}, precision "
        f"{args.precision}, {threads}",
        flush=True,
    )
    summary = time_training_step(lightning_module, plain, make_batch(args), args, StepTimer(memory))
    print_report(args, summary, memory)
    return summary


if __name__ == "__main__":
    main()
