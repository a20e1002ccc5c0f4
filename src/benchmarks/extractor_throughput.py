"""Benchmark: images per second of the descriptor extractors of conf/extractor/ on the CPU.

The replication report (`python -m src.replicate`) spends most of its time extracting features; this says how
long a folder takes with each extractor. Every extractor is built from its own config file with its weights
switched off (`pretrained: null` for timm / open_clip, `checkpoint: null` for SSCD: random initialisation), so
nothing is downloaded; a network's speed does not depend on its weight values. Configs that still have a
required value (`???`, e.g. csd's trained checkpoint) are listed as skipped.

For each extractor, `--batch-size` copies of a 512 x 512 RGB image (skimage's astronaut) go through its
`transform()` at its own preprocessing size (timed: preprocessing images/s in this one process; `src.replicate`
spreads it over DataLoader workers, and file decoding is not included), then `--warmup` untimed and `--batches`
timed forward passes of the stacked (B, 3, H, W) batch. The table gives the median batch time and the forward
images/s, the network's multiply-add FLOPs per image (torch.utils.flop_counter on one image: matrix products,
convolutions and attention; elementwise work is not counted), the GFLOP/s they reach and that rate as a share of
this machine's float32 torch.mm throughput (a 2048^3 product, measured in the same run).

Reference run (2 AMD EPYC vCPUs shared with a training job, torch.mm at 85 GFLOP/s; an idle machine is faster),
images/s at batch 32: pixels 1001, color_hist 320, SSCD ResNet-50 4.2, DINO ViT-B/16 2.2, CLIP ViT-B/16 1.3, VGG16
Gram 1.5; preprocessing 12-18 images/s per process for the 224 px networks.

    python -m src.benchmarks.extractor_throughput                       # the default extractors, 3-6 minutes
    python -m src.benchmarks.extractor_throughput --small               # batch 8, 1 warm-up, 2 timed batches
    python -m src.benchmarks.extractor_throughput --extractors all      # also ViT-L/14, ViT-B/8, ResNeXt-101
"""

import argparse
import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from src.benchmarks.retrieval_metrics import warn_if_busy

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTRACTOR_CONF = REPO_ROOT / "conf" / "extractor"
DEFAULT_EXTRACTORS = ("pixels", "color_hist", "sscd", "dino_vitb16", "clip_vitb16", "vgg_gram")


def available_configs() -> list[str]:
    """Names of the config files under conf/extractor/."""
    return sorted(path.stem for path in EXTRACTOR_CONF.glob("*.yaml"))


def build_without_downloads(config_name: str):
    """The extractor of conf/extractor/<config_name>.yaml with random weights; (extractor, None), or (None, why)
    when the config needs a file to exist (a required `???` value other than the weights)."""
    path = EXTRACTOR_CONF / f"{config_name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no extractor config {path}; choose from {available_configs()}")
    cfg = OmegaConf.load(path)
    keys = set(cfg.keys())  # `key in cfg` is False for a `???` value
    if "pretrained" in keys:
        cfg.pretrained = None  # timm / open_clip: random initialisation
    if "checkpoint" in keys and cfg._target_.endswith("SSCDExtractor"):
        cfg.checkpoint = None  # SSCD: the architecture with random weights
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        return None, f"needs {', '.join(missing)} (a file; no random-weight build)"
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg).eval(), None


def source_image() -> Image.Image:
    """A 512 x 512 RGB photograph shipped with scikit-image."""
    from skimage import data

    return Image.fromarray(data.astronaut()).convert("RGB")


def flops_per_image(extractor, image: torch.Tensor) -> float:
    """Multiply-add FLOPs (2 per multiply-accumulate) of one forward pass on one (3, H, W) image.

    nn.MultiheadAttention's inference fast path (open_clip's attention) is one fused op the counter does not
    see, so it is switched off while counting: the same math then runs as counted matrix products.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            extractor(image.unsqueeze(0))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """This machine's float32 torch.mm throughput: the best of `repeats` (size x size) @ (size x size) products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def measure(config_name: str, extractor, args, reference_gflops: float) -> dict:
    """Preprocessing and forward throughput of one extractor at batch size `args.batch_size`."""
    transform = extractor.transform()
    image = source_image()
    start = time.perf_counter()
    batch = torch.stack([transform(image) for _ in range(args.batch_size)])  # (B, 3, H, W)
    preprocess_seconds = time.perf_counter() - start
    for _ in range(args.warmup):
        extractor(batch)
    times = []
    for _ in range(args.batches):
        start = time.perf_counter()
        features = extractor(batch)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = flops_per_image(extractor, batch[0])
    images_per_s = args.batch_size / seconds
    achieved = flops * images_per_s / 1e9
    return {
        "extractor": config_name,
        "name": extractor.name,
        "input": tuple(batch.shape[-2:]),
        "dim": features.shape[-1],
        "params_m": sum(p.numel() for p in extractor.parameters()) / 1e6,
        "ms_per_batch": 1000 * seconds,
        "images_per_s": images_per_s,
        "preprocess_images_per_s": args.batch_size / preprocess_seconds,
        "gflops_per_image": flops / 1e9,
        "achieved_gflops": achieved,
        "of_matmul": achieved / reference_gflops,
    }


def print_table(args, rows: list[dict], skipped: dict[str, str], reference_gflops: float) -> None:
    print(
        f"\nExtractor throughput on the CPU: batch {args.batch_size}, {args.warmup} warm-up + {args.batches} timed "
        f"batches (median), {torch.get_num_threads()} torch threads, random weights; float32 torch.mm "
        f"reference {reference_gflops:.0f} GFLOP/s"
    )
    print(
        f"{'config':<17}{'extractor':<44}{'input':>9}{'dim':>8}{'params (M)':>11}{'ms/batch':>10}{'images/s':>10}"
        f"{'prep img/s':>11}{'GFLOP/img':>10}{'GFLOP/s':>9}{'% mm':>7}"
    )
    for row in rows:
        size = "x".join(map(str, row["input"]))
        print(
            f"{row['extractor']:<17}{row['name'][:43]:<44}{size:>9}{row['dim']:>8}{row['params_m']:>11.1f}"
            f"{row['ms_per_batch']:>10.1f}{row['images_per_s']:>10.1f}{row['preprocess_images_per_s']:>11.1f}"
            f"{row['gflops_per_image']:>10.2f}{row['achieved_gflops']:>9.1f}{row['of_matmul']:>7.0%}"
        )
    for name, reason in skipped.items():
        print(f"{name:<17}skipped: {reason}")
    print(
        "  images/s: forward passes on preprocessed batches; prep img/s: transform() of a 512x512 image in one "
        "process; GFLOP/img: matrix-product, convolution and attention FLOPs; % mm: GFLOP/s over the torch.mm "
        "reference"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--extractors",
        nargs="+",
        default=list(DEFAULT_EXTRACTORS),
        help=f"config names under conf/extractor/, or 'all' (default: {' '.join(DEFAULT_EXTRACTORS)})",
    )
    parser.add_argument("--small", action="store_true", help="batch 8, 1 warm-up and 2 timed batches")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 32; 8 with --small)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default 1)")
    parser.add_argument("--batches", type=int, help="timed batches (default 3; 2 with --small)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args(argv)
    defaults = (
        {"batch_size": 8, "warmup": 1, "batches": 2}
        if args.small
        else {"batch_size": 32, "warmup": 1, "batches": 3}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size < 1 or args.batches < 1 or args.warmup < 0:
        parser.error(
            f"--batch-size and --batches must be >= 1 and --warmup >= 0, got {args.batch_size}, "
            f"{args.batches}, {args.warmup}"
        )
    configs = available_configs()
    if args.extractors == ["all"]:
        args.extractors = configs
    unknown = [name for name in args.extractors if name not in configs]
    if unknown:
        parser.error(
            f"--extractors {unknown}: no such config under {EXTRACTOR_CONF}; choose from {configs} or all"
        )
    return args


def main(argv=None) -> tuple[list[dict], dict[str, str]]:
    """Run the benchmark, print the table; return its rows (see `measure`) and the skipped configs with why."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warn_if_busy()
    reference = matmul_gflops()
    rows, skipped = [], {}
    for config_name in args.extractors:
        extractor, reason = build_without_downloads(config_name)
        if extractor is None:
            skipped[config_name] = reason
            continue
        print(f"timing {config_name} ({extractor.name}) ...", flush=True)
        rows.append(measure(config_name, extractor, args, reference))
        del extractor
    print_table(args, rows, skipped, reference)
    return rows, skipped


if __name__ == "__main__":
    main()
