"""What the benchmarks share: device and thread options, timers, peak memory, subprocess workers, the results
table, and the modules and batches under test, built from the project's own configs.

Timing. A benchmark compares a method with a baseline measured in the same run, never with a number from
another day: both run after an untimed warm-up, in windows interleaved A B B A A B ... (`interleave`: which
side goes first alternates, so neither gains from running first or second), and the report gives medians,
which other processes sharing the CPU disturb less than means. On CUDA the clock synchronises only at the ends
of a window (`StepTimer`), since a sync per step would hide the host/device overlap being measured.

Memory. `PeakMemory` is the CUDA allocator's peak, or on the CPU the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs, with a sampling thread as a floor where the kernel does not keep VmHWM), so a
method run in a fresh process (`run_worker`) has a peak of its own.

Threads. On a CPU shared with other processes OpenMP threads wait for descheduled peers: on 2 vCPUs shared
with three training processes a tiny-UNet forward at batch 32 took 2.6 s with 2 threads and 0.27 s with 1.
`setup` therefore uses one thread when the CPUs are busy, unless `--threads` says otherwise, and warns that
the timings are unreliable.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from src.data.embedded.captioned_faces import (
    BRIGHTNESS,
    CONTRAST,
    HAIR,
    NUM_FACES,
    POSITION,
    SIDE,
    face_captions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"
MIB = 2**20
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
BUSY_FRACTION = 0.2  # CPU time taken by other processes above which timings are flagged and threads set to 1


# ---- options ---------------------------------------------------------------------------------------------
def argument_parser(
    doc: str, precision: bool = False, workers=None, overrides: str | None = None
) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring `doc`, with --device, --threads, --seed; with
    `precision` also --precision (Lightning's names), with `workers` the hidden --worker that `run_worker`
    passes, and with `overrides` (an example) positional Hydra overrides of the model config."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if overrides:
        parser.add_argument("overrides", nargs="*", help=f"Hydra overrides of the model, e.g. {overrides}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    if precision:
        parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all, or 1 when other processes keep the CPUs busy)",
    )
    parser.add_argument("--seed", type=int, default=0)
    if workers:
        parser.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    return parser


def check_positive(parser: argparse.ArgumentParser, args, names) -> None:
    """Stops with a usage error naming each option of `names` whose value is below 1."""
    low = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in names if getattr(args, name) < 1]
    if low:
        parser.error(f"{', '.join(low)}: must be >= 1")


def check_device(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if getattr(args, "precision", None) == "16-mixed" and not args.device.startswith("cuda"):
        raise SystemExit(
            "--precision 16-mixed: Lightning replaces it with bf16-mixed on CPU, so the two sides would "
            "differ; pass --precision bf16-mixed (or run on --device cuda)"
        )


def busy_cpu_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent busy over the next `seconds` (from /proc/stat; None off Linux)."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values[:8]) - idle, sum(values[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def setup(args) -> str:
    """Checks --device and --precision, warns when other processes keep the CPUs busy, sets torch's thread
    count (--threads, or all threads, or 1 on a busy CPU) and returns a line saying which and why."""
    check_device(args)
    busy = busy_cpu_fraction()
    busy = busy is not None and busy > BUSY_FRACTION
    if busy:
        print(
            "warning: other processes kept the CPUs busy just before the run. Timings will be noisy, and "
            "OpenMP threads waiting for a descheduled peer can make a step several times slower: rerun on an "
            "idle machine before trusting the ratios.",
            flush=True,
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        how = "--threads"
    elif busy and args.device == "cpu":
        torch.set_num_threads(1)
        how = "auto: the CPUs are busy with other processes; pass --threads N to override"
    else:
        how = "auto: all"
    return f"{torch.get_num_threads()} torch threads ({how})"


# ---- timers and memory -----------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    """Resident set size now, from /proc (Linux); the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory since `reset()`: the CUDA allocator's, or on the CPU the peak resident set.

    On the CPU two readings are combined, and the larger wins: the kernel's VmHWM, reset through
    /proc/self/clear_refs (exact, where the kernel supports both), and a thread that samples the resident set
    every `interval` seconds (a floor that holds everywhere, sandboxed kernels included, but can miss a spike
    shorter than the interval). `note` says when VmHWM could not be reset and only the samples count.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.note, self.before = device, "", 0
        self.interval, self.sampled, self.hwm_valid = interval, 0, False
        self.sampler: threading.Thread | None = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_valid = True
        except OSError:
            self.hwm_valid = False
            self.note = (
                f"peak RSS sampled every {self.interval * 1000:.0f} ms: /proc/self/clear_refs is not writable"
            )
        self.before = current_rss_bytes()
        self.sampled = self.before
        if self.sampler is None:
            self.sampler = threading.Thread(target=self._sample, daemon=True, name="peak-rss-sampler")
            self.sampler.start()

    def _sample(self) -> None:
        while True:
            self.sampled = max(self.sampled, current_rss_bytes())
            time.sleep(self.interval)

    def peak(self) -> int:
        """Bytes: the peak since `reset`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        self.sampled = max(self.sampled, current_rss_bytes())
        return max(self.sampled, vm_hwm_bytes() if self.hwm_valid else 0)

    def rise(self) -> int:
        """Bytes: how far the peak rose above the memory in use at `reset`."""
        return max(self.peak() - self.before, 0)

    def kind(self) -> str:
        return "CUDA peak allocated" if self.device.type == "cuda" else "peak RSS"


def vm_hwm_bytes() -> int:
    """The kernel's peak resident set (VmHWM) in bytes, or 0 where /proc/self/status lacks it."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


class StepTimer:
    """Step durations within one window of 1 + `steps` steps, from the end of its first step to its last.

    The first step carries one-off setup (a fit's, or a fresh DataLoader iterator's), so it is never timed;
    the memory peak is reset after it. On the CPU every later step is timed on its own; on CUDA the clock
    synchronises only at the window's two ends, so a window yields one mean step time.
    """

    def __init__(self, memory: PeakMemory):
        self.memory, self.device = memory, memory.device
        self.stamps: list[float] = []
        self.count = 0

    def window(self, steps: int) -> "StepTimer":
        self.count, self.stamps = 1 + steps, []
        return self

    def step_end(self, index: int) -> None:
        cuda = self.device.type == "cuda"
        if index == 0 or index == self.count - 1 or not cuda:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.stamps.append(time.perf_counter())
        if index == 0:
            self.memory.reset()

    def result(self, **extra) -> dict:
        """{"steps": step seconds (one mean per window on CUDA), "peak": peak bytes, **extra}."""
        if self.device.type == "cuda":
            steps = [(self.stamps[-1] - self.stamps[0]) / (self.count - 1)]
        else:
            steps = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]
        return {"steps": steps, "peak": self.memory.peak(), **extra}


def interleave(runs: dict[str, Callable[[], dict]], repeats: int, describe: Callable[[dict], str]) -> dict:
    """`repeats` calls of each run, interleaved A B B A A B ..., printing one line per round with `describe`
    of each result. Returns {name: [results]}."""
    results = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in list(runs) if repeat % 2 == 0 else reversed(list(runs)):
            results[name].append(runs[name]())
        line = ", ".join(f"{name} {describe(calls[-1])}" for name, calls in results.items())
        print(f"  round {repeat + 1}/{repeats}: {line}", flush=True)
    return results


def time_calls(function: Callable, repeats: int, device: torch.device) -> tuple[float, list]:
    """(median microseconds, outputs) of `function(draw)` for draws 1..`repeats`, after an untimed draw 0."""
    function(0)
    durations, outputs = [], []
    for draw in range(1, repeats + 1):
        start = time.perf_counter()
        outputs.append(function(draw))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations) * 1e6, outputs


def autocast(device: torch.device, precision: str):
    """The autocast context Lightning's precision plugin puts around `training_step` (none for 32-true)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---- workers in fresh processes --------------------------------------------------------------------------
def print_result(result: dict) -> None:
    """What a worker prints for `run_worker`."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script: str, worker: str, options: dict) -> dict:
    """Runs `python -m benchmarks.<script> --worker <worker> --<option> <value> ...` in a fresh process, so
    that its peak memory is its own, and returns the dict it printed with `print_result`."""
    command = [sys.executable, "-m", f"benchmarks.{script}", "--worker", worker]
    for name, value in options.items():
        command += [
            f"--{name.replace('_', '-')}",
            *map(str, value if isinstance(value, list | tuple) else [value]),
        ]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        killed = (
            " (killed: likely out of memory; lower --baseline-queries)"
            if proc.returncode in (-9, 137)
            else ""
        )
        raise RuntimeError(
            f"benchmark worker '{worker}' exited with code {proc.returncode}{killed}; stderr tail:\n"
            + proc.stderr[-3000:]
        )
    return json.loads(lines[-1][len("RESULT ") :])


# ---- the report ------------------------------------------------------------------------------------------
def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """`rows` under `columns` [(key, title, format spec)], each column as wide as its widest cell: text
    columns (format spec "") left-aligned, numbers right-aligned; a missing or None value prints as '-'."""
    cells = [[title for _, title, _ in columns]]
    cells += [
        ["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        padded = [
            cell.ljust(width) if spec == "" else cell.rjust(width)
            for cell, width, (_, _, spec) in zip(line, widths, columns, strict=True)
        ]
        print("  ".join(padded).rstrip())


# ---- what is measured ------------------------------------------------------------------------------------
def config_names(group: str) -> list[str]:
    """The options of a config group: the file names under conf/<group>/."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def load_config(group: str, name: str) -> dict:
    """conf/<group>/<name>.yaml as a dict (interpolations left as they are)."""
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {path}; choose one of {', '.join(config_names(group))}")
    return OmegaConf.to_container(OmegaConf.load(path))


def build_model(model: str, overrides: list[str], seed: int):
    """The LightningModule that `python -m src.train model=<model> <overrides>` trains, with random initial
    weights drawn after `torch.manual_seed(seed)`, so equal seeds build equal modules."""
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config = hydra.compose("train", overrides=[f"model={model}", *overrides])
    torch.manual_seed(seed)
    return hydra.utils.instantiate(config.model)


def optimizers_outside_trainer(module, total_steps: int) -> tuple:
    """(optimizer, LR scheduler) of `module.configure_optimizers()` for `total_steps` steps without a Trainer:
    the modules read only these three attributes of theirs."""
    module.trainer = types.SimpleNamespace(
        world_size=1, accumulate_grad_batches=1, estimated_stepping_batches=total_steps
    )
    try:
        config = module.configure_optimizers()
    finally:
        module.trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def caption_lists(batch_size: int, seed: int) -> list[list[str]]:
    """B caption lists of 5 (caption 0 naming the face, 4 paraphrases), written by `face_captions` of the
    embedded captioned faces from seeded attribute bins."""
    rng = np.random.default_rng(seed)
    bins = {
        "brightness_bin": BRIGHTNESS,
        "contrast_bin": CONTRAST,
        "hair_bin": HAIR,
        "side_bin": SIDE,
        "position_bin": POSITION,
    }
    lists = []
    for index in range(batch_size):
        attributes = {key: int(rng.integers(0, len(values))) for key, values in bins.items()}
        lists.append(face_captions(index % NUM_FACES, attributes))
    return lists


def image_batch(batch_size: int, image_size: int, seed: int, captions: bool = False) -> dict:
    """{"image": (B, 3, S, S) float32 uniform in [-1, 1]} as the image datamodules yield it; with `captions`
    also "caption": caption 0 of each of `caption_lists`, as the captioned datamodule yields it."""
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1}
    if captions:
        batch["caption"] = [texts[0] for texts in caption_lists(batch_size, seed)]
    return batch
