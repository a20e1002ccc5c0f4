"""Benchmark: Lightning overhead of a text-conditional diffusion training step, and the cost of the caption
mitigations (PAPERS.md §2.5, §2.6) against that step.

1. Training step. Both sides train the same `Text2ImageModule` (src/models/text2img.py) from the same seeded
   initial weights on the same fixed batch: seeded (B, 3, S, S) images in [-1, 1] with B instance-level captions
   written as the embedded captioned faces write them (`face_captions` of src/data/captioned_faces.py, caption 0
   of each image), served by a DataLoader over `SameBatch`. The module's settings are those of
   conf/model/text2img.yaml (frozen random open_clip text transformer of context 32 and width 128, prompt dropout
   0.1, DDPM linear betas, ε-prediction, AdamW lr 1e-4 with weight decay 0.01 and `constant_with_warmup`, EMA
   0.9999) with no train-time mitigation; the UNet2DConditionModel is one of conf/model/cond_unet/*.yaml
   (`--unet`).

   - Lightning: the module under a real `lightning.Trainer.fit(max_steps=...)` with `gradient_clip_val=1.0` (as
     conf/experiment/t2i_quickstart.yaml), no logger, checkpointing, progress bar, model summary or validation
     (`lightning_window` of src/benchmarks/ddpm_step.py). Everything the module does per step is included:
     tokenising and encoding the captions, prompt dropout, `self.log`, the non-finite loss guard, the LR
     scheduler and the EMA update in `on_train_batch_end`.
   - Plain: the same step written out (`PlainLoop.step`): the frozen text encoder on the tokenised captions under
     `no_grad`, prompt dropout (`torch.rand` < p swaps in the empty prompt's embedding, computed once), noise,
     timesteps, `DDPMScheduler.add_noise`, the `UNet2DConditionModel` forward, `training_target`, MSE,
     `zero_grad`, `backward`, `clip_grad_norm_(1.0)`, the module's own `configure_optimizers`, the scheduler step
     and the EMA `update_parameters`; autocast (and a GradScaler for 16-mixed) as Lightning's precision plugin.
     Like ddpm_step's plain loop it has no non-finite loss guard (one host sync per step on CUDA).

   Windows, interleaving (L P P L ...), reseeding before each window's first step, and the statistics are those
   of src/benchmarks/ddpm_step.py: the first-step losses and the weights after the warm-up window (trained and
   EMA) must agree, which the report checks; the step time is the median over single steps on CPU, over window
   means on CUDA.

2. Mitigation cost per batch. Train-time (`TRAIN_MITIGATIONS`: none, mc, gn, rc, rt, cwr): the time to make the B
   training captions of one batch as `CaptionedDataset.caption` does, i.e. per image a NumPy generator seeded by
   (seed, draw, index) and `apply_train_mitigation(name, its 5 captions, rng, clip_tokenizer(), **options)`, with
   the options of conf/mitigation/<name>.yaml (p=0.1) and, for rc / rt / cwr, also p=1 (every caption
   transformed, the worst case). `gn` leaves the text alone and adds λ·N(0, 1) to the (B, L, D) text embedding
   in the step (`text + lam * torch.randn_like(text)`, as `Text2ImageModule.diffusion_loss`): its embedding
   column. The ratio is to the median Lightning step. In training the caption part runs in the DataLoader
   workers (num_workers 4 in conf/data), overlapping the step; with num_workers=0 it adds to it. Inference-time
   (`INFERENCE_MITIGATIONS`: none, gni, rt, cwr, rna, options of conf/inference_mitigation/*.yaml): the prompt
   text of one batch of B prompts (`src.sample.mitigated_prompts`) and, for gni, the per-image seeded noise on
   the (uncond, cond) embeddings as `Text2ImageModule.generate` draws it; the ratio is to one classifier-free
   guidance denoising step (EMA UNet forward on 2B), of which a generation runs `sample_steps` (50). Each time is
   the median over `--mitigation-repeats` calls after one untimed call (on CUDA every call synchronises).

Reference runs (`--threads 1`, all else at the defaults: tiny UNet, 1.45M parameters, at 32 px, batch 16,
32-true, CPU; 2 AMD EPYC vCPUs shared with the lead's experiments and other workers, hence 1 thread; about 1 min
each). Run 1 (the busy check found the CPUs under 20% busy): median step 403.3 ms (Lightning) and 407.9 ms
(plain), ratio 0.989; first-step losses (1.072331) and warm-up weights, trained and EMA, bitwise equal. Train-time
captions of one batch: 339 us with no mitigation (the per-image generators and `apply_train_mitigation` calls),
372 us mc, 437 / 660 us rc at p=0.1 / 1, 439 / 821 us rt, 401 / 526 us cwr; gn 367 us of captions plus 250 us of
embedding noise. The worst, rt at p=1, is 0.20% of the step; gn's embedding noise, the only cost inside the step, 0.06%.
Inference-time, per batch of 16 prompts: rt 488 us, cwr 282 us, rna 272 us, gni 784 us (the per-image seeded
noise), at most 0.28% of one CFG denoising step (278 ms), which a generation runs 50 times. Run 2 (CPUs 98% busy
with other processes): windows from 481 to 809 ms, median 678.8 / 718.7 ms, ratio 0.945, the same equalities;
mitigations 0.05-0.13% of the step. Not run on CUDA (no GPU was lent to this task).

    python -m src.benchmarks.t2i_step --threads 1   # tiny conditional UNet, 32 px, batch 16
    python -m src.benchmarks.t2i_step --device cuda --precision bf16-mixed --batch-size 64 --steps 20
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.benchmarks.csd_step import PRECISIONS, PeakMemory, StepTimer
from src.benchmarks.ddpm_step import (
    GRADIENT_CLIP_VAL,
    check_device_and_precision,
    quiet_lightning,
    set_threads,
    time_training_step,
)
from src.benchmarks.ddpm_step import PlainLoop as DDPMPlainLoop
from src.benchmarks.ddpm_step import print_report as print_step_report
from src.benchmarks.retrieval_metrics import warn_if_busy
from src.data.captioned_faces import BRIGHTNESS, CONTRAST, HAIR, NUM_FACES, POSITION, SIDE, face_captions
from src.data.captions import (
    INFERENCE_MITIGATIONS,
    TRAIN_MITIGATIONS,
    apply_train_mitigation,
    clip_tokenizer,
    noise_text_embeddings,
)
from src.models.text2img import Text2ImageModule
from src.nn.diffusion import training_target
from src.sample import mitigated_prompts

CONF = Path(__file__).resolve().parents[2] / "conf"
COND_UNET_CONFIGS = CONF / "model" / "cond_unet"
MODEL_CONFIG = CONF / "model" / "text2img.yaml"
MITIGATION_CONFIGS = CONF / "mitigation"
INFERENCE_MITIGATION_CONFIGS = CONF / "inference_mitigation"
# Keys of text2img.yaml that are Hydra plumbing, or interpolations the benchmark sets itself.
NOT_MODULE_KEYS = ("defaults", "_target_", "_convert_", "pretrained", "image_size", "train_mitigation")
WORST_CASE_P = 1.0


def load_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise SystemExit(f"{what}: {path} does not exist; choose one of {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def load_module_config(unet: str) -> dict:
    """`Text2ImageModule` keyword arguments: conf/model/text2img.yaml (less its Hydra keys and interpolations)
    with `unet` = conf/model/cond_unet/<unet>.yaml."""
    config = load_yaml(MODEL_CONFIG, "model config")
    for key in NOT_MODULE_KEYS:
        config.pop(key, None)
    config["unet"] = load_yaml(COND_UNET_CONFIGS / f"{unet}.yaml", f"--unet {unet}")
    return OmegaConf.to_container(OmegaConf.create(config), resolve=True)


def build_module(args) -> Text2ImageModule:
    """The module under test, with seeded (hence identical on both sides) random initial weights."""
    config = load_module_config(args.unet)
    torch.manual_seed(args.seed)
    return Text2ImageModule(image_size=args.image_size, train_mitigation={"name": "none"}, **config)


def make_caption_lists(batch_size: int, seed: int) -> list[list[str]]:
    """B caption lists of 5 (caption 0 naming the face, 4 paraphrases), written by `face_captions` of the
    embedded captioned faces from seeded attribute bins."""
    rng = np.random.default_rng(seed)
    lists = []
    for index in range(batch_size):
        bins = {"brightness_bin": len(BRIGHTNESS), "contrast_bin": len(CONTRAST), "hair_bin": len(HAIR),
                "side_bin": len(SIDE), "position_bin": len(POSITION)}  # fmt: skip
        attributes = {key: int(rng.integers(0, count)) for key, count in bins.items()}
        lists.append(face_captions(index % NUM_FACES, attributes))
    return lists


def make_batch(batch_size: int, image_size: int, seed: int) -> dict:
    """{"image": (B, 3, S, S) float32 uniform in [-1, 1], "caption": B captions (caption 0 of each image)}, the
    batch format of the captioned datamodule."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1
    return {"image": images, "caption": [captions[0] for captions in make_caption_lists(batch_size, seed)]}


class PlainLoop(DDPMPlainLoop):
    """The text-conditional step in plain diffusers + PyTorch; windows, optimizer and clipping as ddpm_step's."""

    def __init__(self, module: Text2ImageModule, args):
        super().__init__(module, args)
        self.module.text_encoder.eval()  # frozen; the module re-asserts eval() in every encode_prompts
        self.prompt_dropout = module.hparams.prompt_dropout
        self.empty = None  # (1, L, D), computed once as Text2ImageModule.empty_prompt

    def encode(self, captions: list[str]) -> torch.Tensor:
        text_encoder = self.module.text_encoder
        with torch.no_grad():
            return text_encoder(text_encoder.tokenize(captions).to(self.device))  # (B, L, D)

    def step(self, batch: dict) -> torch.Tensor:
        unet, noise_scheduler = self.module.unet, self.module.noise_scheduler
        clean = batch["image"].to(self.device)  # (B, C, H, W)
        captions = batch["caption"]
        with self.autocast():
            text = self.encode(captions)
            if self.prompt_dropout:
                drop = torch.rand(len(captions), device=self.device) < self.prompt_dropout
                if self.empty is None:
                    self.empty = self.encode([""])
                text = torch.where(drop[:, None, None], self.empty.expand_as(text), text)
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device)  # fmt: skip
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
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


# ---- mitigation cost -------------------------------------------------------------------------------------------------
def time_calls(function, repeats: int, device: torch.device) -> tuple[float, list]:
    """Median microseconds of `function(draw)` over draws 1..`repeats` after the untimed draw 0, and their
    outputs."""
    function(0)
    durations, outputs = [], []
    for draw in range(1, repeats + 1):
        start = time.perf_counter()
        outputs.append(function(draw))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations) * 1e6, outputs


def mitigation_settings(folder: Path, names) -> list[tuple[str, dict]]:
    """(name, options) per mitigation from `folder`/<name>.yaml, plus (name, options with p=1) where it has p."""
    settings = []
    for name in names:
        options = load_yaml(folder / f"{name}.yaml", f"mitigation {name}")
        options.pop("name", None)
        settings.append((name, options))
        if "p" in options and options["p"] != WORST_CASE_P:
            settings.append((name, {**options, "p": WORST_CASE_P}))
    return settings


def train_mitigation_costs(caption_lists: list[list[str]], text: torch.Tensor, step_ms: float, repeats: int,
                           seed: int) -> list[dict]:  # fmt: skip
    """Per train-time mitigation setting, the cost of one batch: {"mitigation", "options", "caption_us",
    "embedding_us" (gn's noise on `text`, (B, L, D)), "total_us", "of_step" (total / `step_ms`), "changed"
    (fraction of the timed captions that differ from caption 0)}."""
    tokenizer = clip_tokenizer()
    rows = []
    for name, options in mitigation_settings(MITIGATION_CONFIGS, TRAIN_MITIGATIONS):

        def transform(draw, name=name, options=options):
            return [apply_train_mitigation(name, captions, np.random.default_rng([seed, draw, index]), tokenizer,
                                           **options)
                    for index, captions in enumerate(caption_lists)]  # fmt: skip

        caption_us, outputs = time_calls(transform, repeats, torch.device("cpu"))
        embedding_us = 0.0
        if name == "gn":
            lam = float(options["lam"])
            embedding_us, _ = time_calls(lambda draw, lam=lam: text + lam * torch.randn_like(text), repeats,
                                         text.device)  # fmt: skip
        changed = [
            new != captions[0]
            for batch in outputs
            for new, captions in zip(batch, caption_lists, strict=True)
        ]
        total_us = caption_us + embedding_us
        rows.append({"mitigation": name, "options": options, "caption_us": caption_us,
                     "embedding_us": embedding_us, "total_us": total_us, "of_step": total_us / (step_ms * 1e3),
                     "changed": sum(changed) / len(changed)})  # fmt: skip
    return rows


def gni_noise(uncond: torch.Tensor, cond: torch.Tensor, lam: float, seeds: list[int]) -> torch.Tensor:
    """(B, 2, L, D) noised (uncond, cond) embeddings, each image's noise from its seed, as
    `Text2ImageModule.generate` draws the GNI noise (PAPERS.md §2.6)."""
    rows = [noise_text_embeddings(torch.stack([u, c]).cpu(), lam, torch.Generator().manual_seed(seed + 104_729))
            for u, c, seed in zip(uncond, cond, seeds, strict=True)]  # fmt: skip
    return torch.stack(rows).to(cond.device)


def cfg_step_ms(module: Text2ImageModule, text: torch.Tensor, image_size: int, repeats: int) -> float:
    """Median milliseconds of one classifier-free guidance denoising step: the EMA UNet on 2B inputs."""
    network = module.ema.module.eval()
    both = torch.cat([module.empty_prompt().expand_as(text), text])  # (2B, L, D)
    x = torch.randn(len(both), module.unet.config.in_channels, image_size, image_size, device=text.device)
    t = torch.full((len(both),), 500, device=text.device)
    with torch.no_grad():
        median_us, _ = time_calls(lambda draw: network(x, t, encoder_hidden_states=both).sample, repeats,
                                  text.device)  # fmt: skip
    return median_us / 1e3


def inference_mitigation_costs(prompts: list[str], text: torch.Tensor, empty: torch.Tensor, step_ms: float,
                               repeats: int, seed: int) -> list[dict]:  # fmt: skip
    """Per inference-time mitigation, the cost of one batch of prompts: {"mitigation", "options", "prompt_us",
    "embedding_us" (gni's noise on the (uncond, cond) embeddings), "total_us", "of_cfg_step" (total /
    `step_ms`), "changed"}."""
    uncond, seeds = empty.expand_as(text), [seed + i for i in range(len(prompts))]  # (B, L, D), one per image
    rows = []
    for name, options in mitigation_settings(INFERENCE_MITIGATION_CONFIGS, INFERENCE_MITIGATIONS):
        config = {"name": name, **options}
        prompt_us, outputs = time_calls(lambda draw, config=config: mitigated_prompts(prompts, seed + draw, config),
                                        repeats, torch.device("cpu"))  # fmt: skip
        embedding_us = 0.0
        if name == "gni":
            lam = float(options["lam"])
            embedding_us, _ = time_calls(lambda draw, lam=lam: gni_noise(uncond, text, lam, seeds), repeats,
                                         text.device)  # fmt: skip
        changed = [new != old for batch in outputs for new, old in zip(batch, prompts, strict=True)]
        total_us = prompt_us + embedding_us
        rows.append({"mitigation": name, "options": options, "prompt_us": prompt_us,
                     "embedding_us": embedding_us, "total_us": total_us, "of_cfg_step": total_us / (step_ms * 1e3),
                     "changed": sum(changed) / len(changed)})  # fmt: skip
    return rows


# ---- entry point -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", default="tiny", help="name of a conf/model/cond_unet/*.yaml")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="images (and captions) per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per side, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="steps of the untimed warm-up window per side")
    parser.add_argument("--mitigation-repeats", type=int, default=200, help="timed calls per mitigation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: see ddpm_step.set_threads)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_device_and_precision(args)
    if min(args.steps, args.repeats, args.warmup, args.mitigation_repeats, args.batch_size) < 1:
        raise SystemExit(
            f"--steps, --repeats, --warmup, --mitigation-repeats and --batch-size must be >= 1, got {args.steps}, "
            f"{args.repeats}, {args.warmup}, {args.mitigation_repeats}, {args.batch_size}"
        )
    load_module_config(args.unet)  # an unknown --unet fails here, naming the known ones
    return args


def main(argv=None) -> dict:
    """Runs the benchmark, prints the report and returns its numbers: ddpm_step's `summarize` keys plus
    "mitigations" (`train_mitigation_costs`), "cfg_step_ms" and "inference_mitigations"
    (`inference_mitigation_costs`)."""
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
        f"Text-to-image training step: UNet2DConditionModel {args.unet} ({parameters / 1e6:.2f}M parameters) at "
        f"{args.image_size} px, batch {args.batch_size} with captions, prompt dropout "
        f"{lightning_module.hparams.prompt_dropout}, device {args.device}, precision {args.precision}, gradient "
        f"clip {GRADIENT_CLIP_VAL}, EMA on both sides, torch threads {torch.get_num_threads()} ({threads})",
        flush=True,
    )
    warn_if_busy()
    summary = time_training_step(lightning_module, plain, batch, args, timer)

    module = lightning_module.to(device)
    text = module.encode_prompts(batch["caption"])  # (B, L, D)
    summary["mitigations"] = train_mitigation_costs(
        make_caption_lists(args.batch_size, args.seed), text, summary["lightning"]["median_ms"],
        args.mitigation_repeats, args.seed,
    )  # fmt: skip
    summary["cfg_step_ms"] = cfg_step_ms(module, text, args.image_size, args.steps)
    summary["inference_mitigations"] = inference_mitigation_costs(
        batch["caption"],
        text,
        module.empty_prompt(),
        summary["cfg_step_ms"],
        args.mitigation_repeats,
        args.seed,
    )
    module.cpu()
    print_report(args, summary, timer.memory, module.hparams.sample_steps)
    return summary


def options_text(options: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in options.items()) or "-"


def print_report(args, summary: dict, memory: PeakMemory, sample_steps: int) -> None:
    """ddpm_step's step table and same-math check, then the two mitigation-cost tables."""
    print_step_report(args, summary, memory, module_name="Text2ImageModule")
    print(
        f"\nTrain-time caption mitigations, one batch of {args.batch_size} captions (5 per image), median of "
        f"{args.mitigation_repeats} calls; ratio to the median Lightning step ({summary['lightning']['median_ms']:.1f} ms)"
    )
    print(f"{'mitigation':<22}{'captions (us)':>14}{'embedding (us)':>16}{'total (us)':>12}{'of step':>10}"
          f"{'changed':>9}")  # fmt: skip
    for row in summary["mitigations"]:
        label = f"{row['mitigation']} {options_text(row['options'])}"
        print(f"{label:<22}{row['caption_us']:>14.1f}{row['embedding_us']:>16.1f}{row['total_us']:>12.1f}"
              f"{row['of_step']:>10.2%}{row['changed']:>9.0%}")  # fmt: skip
    print(
        "  captions: made per image with its own seeded generator, as the captioned dataset does (in the DataLoader "
        "workers during training); embedding: gn's lam * randn_like on the (B, L, D) text embedding, in the step"
    )
    print(
        f"\nInference-time mitigations, one batch of {args.batch_size} prompts, median of {args.mitigation_repeats} "
        f"calls; ratio to one CFG denoising step ({summary['cfg_step_ms']:.1f} ms, EMA UNet on "
        f"{2 * args.batch_size} inputs; a generation runs {sample_steps})"
    )
    print(f"{'mitigation':<22}{'prompts (us)':>14}{'embedding (us)':>16}{'total (us)':>12}{'of step':>10}"
          f"{'changed':>9}")  # fmt: skip
    for row in summary["inference_mitigations"]:
        label = f"{row['mitigation']} {options_text(row['options'])}"
        print(f"{label:<22}{row['prompt_us']:>14.1f}{row['embedding_us']:>16.1f}{row['total_us']:>12.1f}"
              f"{row['of_cfg_step']:>10.2%}{row['changed']:>9.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
