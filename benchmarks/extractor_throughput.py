"""Benchmark: images per second of the descriptor extractors of conf/extractor/.

The replication report (`python -m src.replicate`) spends most of its time extracting features; this says how
long a folder takes with each extractor. Every extractor is built from its own config file with its weights
switched off (`pretrained: null` for timm / open_clip, `checkpoint: null` for SSCD: random initialisation), so
nothing is downloaded; a network's speed does not depend on its weight values. Configs that still have a
required value (`???`, e.g. csd's trained checkpoint) are listed as skipped.

For each extractor, `--batch-size` copies of a 512 x 512 RGB image (skimage's astronaut) go through its
`transform()` at its own preprocessing size (timed: preprocessing images/s in this one process;
`src.replicate` spreads it over DataLoader workers, and file decoding is not included), then `--warmup`
untimed and `--batches` timed forward passes of the stacked (B, 3, H, W) batch. The table gives the median
batch time and the forward images/s, the network's multiply-add FLOPs per image (torch.utils.flop_counter on
one image: matrix products, convolutions and attention; elementwise work is not counted), the GFLOP/s they
reach and that rate as a share of this machine's float32 torch.mm throughput on the same device (a 2048^3
product, measured in the same run).

Reference run (2 AMD EPYC vCPUs shared with a training job, torch.mm at 85 GFLOP/s; an idle machine is
faster), images/s at batch 32: pixels 1001, color_hist 320, SSCD ResNet-50 4.2, DINO ViT-B/16 2.2, CLIP
ViT-B/16 1.3, VGG16 Gram 1.5; preprocessing 12-18 images/s per process for the 224 px networks.

    python -m benchmarks.extractor_throughput                       # the default extractors, 3-6 minutes
    python -m benchmarks.extractor_throughput --small               # batch 8, 1 warm-up, 2 timed batches
    python -m benchmarks.extractor_throughput --extractors all      # also ViT-L/14, ViT-B/8, ResNeXt-101
"""

import statistics
import time

import hydra
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import argument_parser, check_positive, config_names, load_config, print_table, setup

DEFAULT_EXTRACTORS = ("pixels", "color_hist", "sscd", "dino_vitb16", "clip_vitb16", "vgg_gram")


def build_without_downloads(config_name: str):
    """The extractor of conf/extractor/<config_name>.yaml with random weights; (extractor, None), or (None,
    why) when the config needs a file to exist (a required `???` value other than the weights)."""
    cfg = OmegaConf.create(load_config("extractor", config_name))
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


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the two products of attention, Q K^T and softmax(.) V: (B, H, L, E) queries, (B, H, S, E)
    keys, (B, H, S, Ev) values."""
    batch, heads, length, dim = query_shape
    return 2 * batch * heads * length * key_shape[-2] * (dim + value_shape[-1])


def flops_per_image(extractor, image: torch.Tensor) -> float:
    """Multiply-add FLOPs (2 per multiply-accumulate) of one forward pass on one (3, H, W) image.

    nn.MultiheadAttention's inference fast path (open_clip's attention) is one fused op the counter does not
    see, so it is switched off while counting: the same math then runs as matrix products and
    `scaled_dot_product_attention`, whose CPU kernel has no formula in torch's counter: `attention_flops` is
    it.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    try:
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            extractor(image.unsqueeze(0))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of float32 torch.mm on `device`: the best of `repeats` (size x size) @ (size x size)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    return 2.0 * size**3 / best_seconds(lambda: torch.mm(a, b, out=out), 1, repeats, device) / 1e9


def best_seconds(function, warmup: int, repeats: int, device: torch.device, reduce=min) -> float:
    """`reduce` (min, or statistics.median) of the seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return reduce(times)


def measure(config_name: str, extractor, args, reference_gflops: float) -> dict:
    """Preprocessing and forward throughput of one extractor at batch size `args.batch_size`."""
    device = torch.device(args.device)
    transform = extractor.to(device).transform()
    image = source_image()
    start = time.perf_counter()
    batch = torch.stack([transform(image) for _ in range(args.batch_size)]).to(device)  # (B, 3, H, W)
    preprocess_seconds = time.perf_counter() - start
    seconds = best_seconds(lambda: extractor(batch), args.warmup, args.batches, device, statistics.median)
    flops = flops_per_image(extractor, batch[0])
    images_per_s = args.batch_size / seconds
    achieved = flops * images_per_s / 1e9
    return {
        "extractor": config_name,
        "name": extractor.name[:43],
        "input": "x".join(map(str, batch.shape[-2:])),
        "dim": extractor(batch[:1]).shape[-1],
        "params_m": sum(p.numel() for p in extractor.parameters()) / 1e6,
        "ms_per_batch": 1000 * seconds,
        "images_per_s": images_per_s,
        "preprocess_images_per_s": args.batch_size / preprocess_seconds,
        "gflops_per_image": flops / 1e9,
        "achieved_gflops": achieved,
        "of_matmul": achieved / reference_gflops,
    }


def print_report(args, rows: list[dict], skipped: dict[str, str], reference_gflops: float) -> None:
    print(
        f"\nExtractor throughput on {args.device}: batch {args.batch_size}, {args.warmup} warm-up + "
        f"{args.batches} timed batches (median), {torch.get_num_threads()} torch threads, random weights; "
        f"float32 torch.mm reference {reference_gflops:.0f} GFLOP/s"
    )
    columns = [
        ("extractor", "config", ""),
        ("name", "extractor", ""),
        ("input", "input", ""),
        ("dim", "dim", "d"),
        ("params_m", "params (M)", ".1f"),
        ("ms_per_batch", "ms/batch", ".1f"),
        ("images_per_s", "images/s", ".1f"),
        ("preprocess_images_per_s", "prep img/s", ".1f"),
        ("gflops_per_image", "GFLOP/img", ".2f"),
        ("achieved_gflops", "GFLOP/s", ".1f"),
        ("of_matmul", "% mm", ".0%"),
    ]
    print_table(rows, columns)
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    print(
        "  images/s: forward passes on preprocessed batches; prep img/s: transform() of a 512x512 image in "
        "one process; GFLOP/img: matrix-product, convolution and attention FLOPs; % mm: GFLOP/s over the "
        "torch.mm reference"
    )


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--extractors",
        nargs="+",
        default=list(DEFAULT_EXTRACTORS),
        help=f"config names under conf/extractor/, or 'all' (default: {' '.join(DEFAULT_EXTRACTORS)})",
    )
    parser.add_argument("--small", action="store_true", help="batch 8, 1 warm-up and 2 timed batches")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 32; 8 with --small)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--batches", type=int, help="timed batches (default 3; 2 with --small)")
    args = parser.parse_args(argv)
    for name, default, small in (("batch_size", 32, 8), ("batches", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else default)
    check_positive(parser, args, ("batch_size", "batches"))
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be >= 0")
    configs = config_names("extractor")
    if args.extractors == ["all"]:
        args.extractors = configs
    unknown = [name for name in args.extractors if name not in configs]
    if unknown:
        parser.error(
            f"--extractors {unknown}: no such config under conf/extractor/; choose from {configs} or all"
        )
    return args


def main(argv=None) -> tuple[list[dict], dict[str, str]]:
    """Runs the benchmark, prints the table; returns its rows (see `measure`) and {skipped config: why}."""
    args = parse_args(argv)
    setup(args)
    reference = matmul_gflops(torch.device(args.device))
    rows, skipped = [], {}
    for config_name in args.extractors:
        extractor, reason = build_without_downloads(config_name)
        if extractor is None:
            skipped[config_name] = reason
            continue
        print(f"timing {config_name} ({extractor.name}) ...", flush=True)
        rows.append(measure(config_name, extractor, args, reference))
        del extractor
    print_report(args, rows, skipped, reference)
    return rows, skipped


if __name__ == "__main__":
    main()
