"""Shared fixtures: a tiny embedded style benchmark, Hydra configs composed with tiny overrides, and one tiny
run of each experiment, shared by the tests that read it."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import src.utils  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
TINY_BENCH = {"seed": 0, "image_size": 48, "images_per_style": 6}

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers: one torch thread each (and in the entry points they start), so
    # the two do not fight over the cores with OpenMP threads waiting for descheduled peers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture
def quiet_cpu(monkeypatch):
    """Benchmarks set torch's thread count (restored afterwards); skip their one-second CPU load probe."""
    from benchmarks import harness

    threads = torch.get_num_threads()
    monkeypatch.setattr(harness, "busy_cpu_fraction", lambda: 0.0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def digest_table(tmp_path_factory) -> Path:
    """The tests' own table of file digests (src/utils/checkpoints.py), never the user's ~/.cache/copyscope."""
    folder = tmp_path_factory.mktemp("copyscope_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COPYSCOPE_CACHE_DIR", str(folder))
        # study scripts run their steps in the test's process (src.replication.study.run_once), not in new ones
        patch.setenv("COPYSCOPE_IN_PROCESS", "1")
        yield folder / "file_digests.json"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding the tiny style benchmark (built once per test session)."""
    from src.data.embedded.style_bench import build_style_bench

    root = tmp_path_factory.mktemp("data")
    build_style_bench(root, num_workers=1, **TINY_BENCH)
    return root


def bench_overrides(data_dir: Path) -> list[str]:
    """`src.evaluate` overrides that score the tiny style benchmark of `data_dir` without loader processes."""
    return [
        f"paths.data_dir={data_dir}",
        f"benchmark.image_size={TINY_BENCH['image_size']}",
        f"benchmark.images_per_style={TINY_BENCH['images_per_style']}",
        "num_workers=0",
        "batch_size=16",
    ]


def tiny_overrides(data_dir: Path, bench: bool = True, devices: int = 1) -> list[str]:
    """Overrides that make any CSD config run a few CPU steps (on the tiny benchmark when `bench`)."""
    overrides = [
        f"paths.data_dir={data_dir}",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_model_summary=false",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "logger=csv",
    ]
    if bench:
        overrides += [
            f"data.bench_image_size={TINY_BENCH['image_size']}",
            f"data.bench_images_per_style={TINY_BENCH['images_per_style']}",
        ]
    return overrides


def tiny_copy_overrides(data_dir: Path) -> list[str]:
    """Any copy-descriptor config for two CPU steps: 24 photo crops and 24 dead-leaves pictures at 32 px (whatever `data.root` the
    experiment asks for), a 16-d ResNet-10-T, validation on the planted copies."""
    return [
        *tiny_overrides(data_dir, bench=False),
        "data.root=null",
        "data.crops=24",
        "data.dead_leaves=24",
        "data.crops_image_size=48",
        "data.image_size=32",
        "data.benchmark_image_size=32",
        "model.backbone=resnet10t",
        "model.dim=16",
        "model.scheduler.warmup_steps=1",
        "++trainer.sync_batchnorm=false",
    ]


# Two CPU steps, 2-step sampling (also where an experiment sets the callbacks' own steps), a six-image
# replication analysis with pixel features: any diffusion config.
TINY_DIFFUSION_RUN = [
    "model.sample_steps=2",
    "callbacks.replication.steps=2",
    "++callbacks.sample_grid.steps=2",
    "model.scheduler.warmup_steps=1",
    "extractor=pixels",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.sample_grid.num_images=4",
    "callbacks.replication.num_images=6",
    "callbacks.replication.batch_size=6",
]


# open_clip.create_model's config overrides: a 2-layer, 64-wide image tower (32 px, 8 px patches) and a
# 1-layer text tower, whatever model name the experiment builds.
TINY_OPEN_CLIP = [
    "+model.backbone.embed_dim=32",
    "+model.backbone.vision_cfg={image_size: 32, layers: 2, width: 64, patch_size: 8}",
    "+model.backbone.text_cfg={context_length: 8, vocab_size: 64, width: 32, heads: 2, layers: 1}",
]


def tiny_diffusion_overrides(data_dir: Path, subset_size: int = 8) -> list[str]:
    """Overrides that make any DDPM config run a few CPU steps on the embedded faces, with a tiny replication
    analysis (pixels extractor, a handful of 2-step DDIM samples)."""
    return [
        f"paths.data_dir={data_dir}",
        "data.root=embedded_faces",
        f"data.subset_size={subset_size}",
        "data.control_size=8",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model/unet=tiny",
        *TINY_DIFFUSION_RUN,
    ]


def tiny_text2img_overrides(data_dir: Path, subset_size: int = 8) -> list[str]:
    """Overrides that make any text-conditional config run a few CPU steps on the embedded captioned faces."""
    return [
        f"paths.data_dir={data_dir}",
        "data.root=embedded_faces",
        f"data.subset_size={subset_size}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model/cond_unet=tiny",
        "model.text_encoder.width=32",
        "model.text_encoder.heads=2",
        *TINY_DIFFUSION_RUN,
    ]


def load_script(path: Path, name: str):
    """Import a script that is not in a package (experiments/*/aggregate.py) as module `name`."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_unet(conditional: bool = False) -> dict:
    """UNet2DModel / UNet2DConditionModel keyword arguments of a ~50k-parameter UNet at 16 px."""
    attention = "CrossAttn" if conditional else "Attn"
    return {
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", f"{attention}DownBlock2D"],
        "up_block_types": [f"{attention}UpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
    }


CAPTIONS = ["a red car on a road", "a car", "red automobile parked"]


@pytest.fixture(scope="module")
def tokenizer():
    from src.mitigations import clip_tokenizer

    return clip_tokenizer()


TINY_SD = {"image_size": 16, "text_dim": 32, "max_length": 16, "scaling_factor": 0.18215}


def _clip_byte_chars() -> list[str]:
    """The 256 printable stand-ins of the bytes in byte-level BPE (GPT-2 / CLIP `bytes_to_unicode`)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_clip_tokenizer(folder: Path, max_length: int) -> int:
    """A minimal CLIP BPE tokenizer in the layout of a Stable Diffusion `tokenizer/` folder (vocab.json,
    merges.txt, tokenizer_config.json): the 256 byte characters, each also with the end-of-word `</w>`, a few
    merges, `<|startoftext|>` and `<|endoftext|>`. Returns the vocabulary size."""
    import json

    chars = _clip_byte_chars()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("a", "n</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(tokens)


def write_tiny_stable_diffusion(root: Path) -> Path:
    """A random, tiny diffusers Stable Diffusion directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/) laid out
    as `stabilityai/stable-diffusion-2-1`: v-prediction DDPM scheduler with SD's scaled-linear betas, a 2-level VAE
    (16 px images -> 4 x 8 x 8 latents), a 2-level UNet2DConditionModel cross-attending to a 2-layer CLIP text
    model of width 32 (16 tokens)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch = __import__("torch")
    torch.manual_seed(0)
    vocab_size = write_tiny_clip_tokenizer(root / "tokenizer", TINY_SD["max_length"])
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_SD["text_dim"],
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_SD["max_length"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_SD["image_size"],
        scaling_factor=TINY_SD["scaling_factor"],
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=TINY_SD["image_size"] // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_SD["text_dim"],
        norm_num_groups=8,
        attention_head_dim=8,
    ).save_pretrained(root / "unet")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion 2.1-like diffusers directory (built once per test session)."""
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


def tiny_sd_overrides(data_dir: Path, sd_dir: Path, subset_size: int = 8) -> list[str]:
    """Overrides that make any Stable Diffusion fine-tuning config (`sd_*`) run a few CPU steps of the tiny SD
    directory on the embedded captioned faces at 16 px, with a tiny replication analysis (pixels extractor)."""
    return [
        f"paths.data_dir={data_dir}",
        f"model.pretrained={sd_dir}",
        "data.root=embedded_faces",
        "data.captions=null",
        f"data.subset_size={subset_size}",
        f"data.image_size={TINY_SD['image_size']}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.pin_memory=false",
        *TINY_DIFFUSION_RUN,
    ]


def experiment_kind(cfg) -> str:
    """What a composed experiment trains, read from its model's class: "csd", "ddpm", "t2i" or "copy"."""
    from hydra.utils import get_class

    from src.models.copy_descriptor import CopyDescriptorModule
    from src.models.csd import CSDModule
    from src.models.ddpm import DDPMModule
    from src.models.text2img import Text2ImageModule

    kinds = {CSDModule: "csd", DDPMModule: "ddpm", Text2ImageModule: "t2i", CopyDescriptorModule: "copy"}
    return kinds[get_class(cfg.model._target_)]


@dataclass
class TinyRun:
    run_dir: Path
    metrics: dict[str, float]
    kind: str


@pytest.fixture(scope="session")
def tiny_run(request, data_dir, tmp_path_factory):
    """`tiny_run(experiment)` trains an experiment for two CPU steps with the tiny overrides of its kind, once
    per session, and returns a TinyRun. Tests that only read a run, or resume it into a folder of their own,
    share it. The tiny cluster data and the tiny Stable Diffusion directory are built only for the experiments
    that need them: CSD on webdataset shards (`data.train_shards`), text-to-image without its own UNet."""
    from src.train import train

    runs: dict[str, TinyRun] = {}

    def overrides_for(kind: str, cfg) -> list[str]:
        if kind == "ddpm":
            return tiny_diffusion_overrides(data_dir)
        if kind == "copy":
            return tiny_copy_overrides(data_dir)
        if kind == "t2i" and cfg.model.get("cond_unet") is None:
            return tiny_sd_overrides(data_dir, request.getfixturevalue("tiny_sd_dir"))
        if kind == "t2i":
            return tiny_text2img_overrides(data_dir)
        if "train_shards" not in cfg.data:
            return tiny_overrides(data_dir)
        # the experiment's open_clip ViT at a tiny width and depth, on tiny shards and the WikiArt layout
        cluster = request.getfixturevalue("tiny_cluster_data")
        return [
            *tiny_overrides(data_dir, bench=False),
            "model.backbone.pretrained=null",
            *TINY_OPEN_CLIP,
            "data.image_size=32",
            "model.scheduler.warmup_steps=1",
            f"data.train_shards='{cluster['shards']}'",
            f"data.val_root={cluster['wikiart']}",
            f"data.vocab_file={cluster['vocab']}",
            "data.epoch_length=16",
        ]

    def run(experiment: str) -> TinyRun:
        if experiment not in runs:
            run_dir = tmp_path_factory.mktemp(experiment)
            declared = compose_config("train.yaml", [f"experiment={experiment}"], run_dir)
            kind = experiment_kind(declared)
            overrides = [f"experiment={experiment}", *overrides_for(kind, declared)]
            runs[experiment] = TinyRun(run_dir, train(compose_config("train.yaml", overrides, run_dir)), kind)
        return runs[experiment]

    return run


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    """Compose a config as `python -m src.<entry>` would, with the run directory set to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.override_dirname = ""
        cfg.paths.log_dir = str(output_dir / "logs")
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run, the job config does not hold the hydra node
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture(scope="session")
def bench_dir(data_dir) -> Path:
    """The folder of the tiny style benchmark inside `data_dir`."""
    from src.data.embedded.style_bench import build_style_bench

    return build_style_bench(data_dir, num_workers=1, **TINY_BENCH)


@pytest.fixture(scope="session")
def tiny_cluster_data(bench_dir, tmp_path_factory) -> dict:
    """The cluster experiments' data layouts made from the tiny benchmark: LAION-Styles-like webdataset shards
    (image + JSON tags) with a tag vocabulary file, and a WikiArt folder with the official `wikiart.csv` columns."""
    import csv
    import json

    import webdataset as wds

    root = tmp_path_factory.mktemp("cluster_data")
    with open(bench_dir / "train.csv") as f:
        rows = list(csv.DictReader(f))
    (root / "shards").mkdir()
    tags = set()
    for shard in range(2):
        with wds.TarWriter(str(root / "shards" / f"{shard:06d}.tar")) as sink:
            for i, row in enumerate(rows[shard::2]):
                row_tags = row["tags"].split("|")
                tags.update(row_tags)
                sink.write(
                    {
                        "__key__": f"{shard}_{i:05d}",
                        "png": (bench_dir / row["path"]).read_bytes(),
                        "json": json.dumps({"tags": row_tags}).encode(),
                    }
                )
    (root / "tags.txt").write_text("\n".join(sorted(tags)) + "\n")
    wikiart = root / "wikiart"
    wikiart.mkdir()
    with open(bench_dir / "retrieval.csv") as f, open(wikiart / "wikiart.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["name", "path", "artist", "split"])
        for row in csv.DictReader(f):
            writer.writerow(
                [Path(row["path"]).name, str(bench_dir / row["path"]), row["label"], row["split"]]
            )
    return {
        "shards": str(root / "shards" / "{000000..000001}.tar"),
        "vocab": str(root / "tags.txt"),
        "wikiart": str(wikiart),
    }


@pytest.fixture(scope="session")
def attacked_run(data_dir, tmp_path_factory) -> TinyRun:
    """A tiny DDPM run that ends with its attacks (extraction, adaptive, loss), trained once per session in
    <tmp>/study/0 so that <tmp>/study reads as a study folder."""
    from src.train import train

    overrides = [
        "experiment=ddpm_quickstart",
        *tiny_diffusion_overrides(data_dir),
        "callbacks.replication=null",
    ]
    overrides += [
        "callbacks.attacks.names=[extraction,adaptive,loss]",
        "callbacks.attacks.options={extraction: {edge_threshold: [0.3, 0.6], num_images: 6, min_clique_size: 2,"
        " steps: 2, neighbours: 3}, adaptive: {num_images: 6, steps: 2, neighbours: 3, threshold: 2.0},"
        " loss: {timesteps: [10, 100], draws: 1, bootstrap: 0}}",
    ]
    run_dir = tmp_path_factory.mktemp("attacked") / "study" / "0"
    return TinyRun(run_dir, train(compose_config("train.yaml", overrides, run_dir)), "ddpm")


@pytest.fixture(scope="session")
def detected_run(data_dir, tmp_path_factory) -> TinyRun:
    """A tiny text-to-image run that ends with two detectors of memorized prompts (src/callbacks/detection.py),
    trained once per session."""
    from src.train import train

    settings = (
        "{bootstrap: 0, options: {truth: {generations: 2, steps: 2}, noise_norm: {steps: 2, generations: 1},"
        " score_anisotropy: {steps: 4}}}"
    )
    overrides = [
        "experiment=t2i_quickstart",
        *tiny_text2img_overrides(data_dir),
        "callbacks.replication=null",
        "callbacks.detect.detectors=[noise_norm,score_anisotropy]",
        f"callbacks.detect.settings={settings}",
    ]
    run_dir = tmp_path_factory.mktemp("detected")
    return TinyRun(run_dir, train(compose_config("train.yaml", overrides, run_dir)), "t2i")
