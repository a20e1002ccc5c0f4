"""Benchmark: what each caption mitigation (docs/memorization.md#caption-mitigations) costs per batch, against
its step.

The module is `Text2ImageModule` as conf/model/text2img.yaml builds it with `model/cond_unet=tiny` (further
Hydra overrides on the command line) and seeded random weights; the batch is B seeded images with 5 captions
each, written as the embedded captioned faces write them (`caption_lists` of benchmarks/harness.py).

- Train-time (`TRAIN_MITIGATIONS`: none, mc, gn, rc, rt, cwr): the time to make the B training captions of one
  batch as `CaptionedDataset.caption` does, i.e. per image a NumPy generator seeded by (seed, draw, index) and
  `apply_train_mitigation(name, its 5 captions, rng, clip_tokenizer(), **options)`, with the options of
  conf/mitigation/<name>.yaml (p=0.1) and, for rc / rt / cwr, also p=1 (every caption transformed, the worst
  case). `gn` leaves the text alone and adds λ·N(0, 1) to the (B, L, D) text embedding in the step
  (`noise_text_embeddings`, as `Text2ImageModule.loss`): its embedding column. The ratio is to one training
  step: the module's `loss` on the batch (caption 0 of each image), backward and the optimizer step, in plain
  PyTorch. In training the caption part runs in the DataLoader workers (num_workers 4 in conf/data),
  overlapping the step; with num_workers=0 it adds to it.
- Inference-time (`INFERENCE_MITIGATIONS`: none, gni, rt, cwr, rna, options of
  conf/inference_mitigation/*.yaml; the mitigations that act inside sampling are benchmarked by
  benchmarks/detection_cost.py): the prompt text of one batch of B prompts (`mitigated_prompts`) and, for
  gni, the per-image seeded noise on the (uncond, cond) embeddings that `Text2ImageModule.generate` draws
  (`noise_guidance_embeddings`). The ratio is to one classifier-free guidance denoising step (EMA UNet forward
  on 2B), of which a generation runs `sample_steps`.

Each time is the median over `--repeats` calls after one untimed call (on CUDA every call synchronises); the
two steps are the median over `--steps` calls.

Reference run (with the training-step script this one was split from: ratio to the median Lightning step, tiny
UNet at 32 px, batch 16, 1 thread on 2 AMD EPYC vCPUs under 20% busy). Train-time captions of one batch: 339
us with no mitigation (the per-image generators and `apply_train_mitigation` calls), 372 us mc, 437 / 660 us
rc at p=0.1 / 1, 439 / 821 us rt, 401 / 526 us cwr; gn 367 us of captions plus 250 us of embedding noise. The
worst, rt at p=1, is 0.20% of the 403 ms step; gn's embedding noise, the only cost inside the step, 0.06%.
Inference-time, per batch of 16 prompts: rt 488 us, cwr 282 us, rna 272 us, gni 784 us, at most 0.28% of one
CFG denoising step (278 ms). Not run on CUDA.

    python -m benchmarks.mitigation_cost --threads 1     # tiny conditional UNet, 32 px, batch 16: 1 min
    python -m benchmarks.mitigation_cost --device cuda --batch-size 64
"""

import numpy as np
import torch

from benchmarks.harness import (
    argument_parser,
    build_model,
    caption_lists,
    check_positive,
    image_batch,
    load_config,
    optimizers_outside_trainer,
    print_table,
    setup,
    time_calls,
)
from src.generation import mitigated_prompts
from src.mitigations import (
    INFERENCE_MITIGATIONS,
    SAMPLING_MITIGATIONS,
    TRAIN_MITIGATIONS,
    apply_train_mitigation,
    clip_tokenizer,
    noise_guidance_embeddings,
    noise_text_embeddings,
)

WORST_CASE_P = 1.0


def mitigation_settings(group: str, names) -> list[tuple[str, dict]]:
    """(name, options) of each conf/<group>/<name>.yaml, plus (name, options with p=1) where it has a p."""
    settings = []
    for name in names:
        options = load_config(group, name)
        options.pop("name", None)
        settings.append((name, options))
        if "p" in options and options["p"] != WORST_CASE_P:
            settings.append((name, {**options, "p": WORST_CASE_P}))
    return settings


def training_step_ms(module, batch: dict, repeats: int) -> float:
    """Median milliseconds of one plain training step: the module's loss, backward, the optimizer step."""
    optimizer, _ = optimizers_outside_trainer(module, repeats + 1)
    module.train()

    def step(draw):
        loss = module.loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    median_us, _ = time_calls(step, repeats, module.device)
    return median_us / 1e3


def cfg_step_ms(module, text: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one classifier-free guidance denoising step: the EMA UNet on 2B inputs."""
    network = module.ema.module.eval()
    both = torch.cat([module.empty_prompt().expand_as(text), text])  # (2B, L, D)
    size = module.hparams.image_size
    x = torch.randn(len(both), module.unet.config.in_channels, size, size, device=text.device)
    t = torch.full((len(both),), 500, device=text.device)
    with torch.no_grad():
        median_us, _ = time_calls(
            lambda draw: network(x, t, encoder_hidden_states=both).sample, repeats, text.device
        )
    return median_us / 1e3


def train_mitigation_costs(lists: list[list[str]], text: torch.Tensor, step_ms: float, args) -> list[dict]:
    """Per train-time mitigation setting, the cost of one batch: {"mitigation", "options", "text_us",
    "embedding_us" (gn's noise on `text`, (B, L, D)), "total_us", "of_step" (total / `step_ms`), "changed"
    (fraction of the timed captions that differ from caption 0)}."""
    tokenizer = clip_tokenizer()
    rows = []
    for name, options in mitigation_settings("mitigation", TRAIN_MITIGATIONS):

        def transform(draw, name=name, options=options):
            return [
                apply_train_mitigation(
                    name, captions, np.random.default_rng([args.seed, draw, index]), tokenizer, **options
                )
                for index, captions in enumerate(lists)
            ]

        embedding = None
        if name == "gn":

            def embedding(draw, lam=float(options["lam"])):
                return noise_text_embeddings(text, lam)  # as `Text2ImageModule.loss` draws it

        originals = [captions[0] for captions in lists]
        rows.append(
            cost_row(name, options, transform, embedding, originals, step_ms, args.repeats, text.device)
        )
    return rows


def inference_mitigation_costs(
    prompts: list[str], text: torch.Tensor, empty: torch.Tensor, step_ms: float, args
):
    """Per inference-time mitigation, the cost of one batch of prompts: the keys of `train_mitigation_costs`,
    with "embedding_us" gni's noise on the (uncond, cond) embeddings and "of_step" the share of one CFG
    step."""
    uncond, seeds = (
        empty.expand_as(text),
        [args.seed + i for i in range(len(prompts))],
    )  # (B, L, D), one per image
    rows = []
    text_mitigations = [name for name in INFERENCE_MITIGATIONS if name not in SAMPLING_MITIGATIONS]
    for name, options in mitigation_settings("inference_mitigation", text_mitigations):
        config = {"name": name, **options}

        def transform(draw, config=config):
            return mitigated_prompts(prompts, args.seed + draw, config)

        embedding = None
        if name == "gni":

            def embedding(draw, lam=float(options["lam"])):
                return noise_guidance_embeddings(uncond, text, lam, seeds)

        rows.append(
            cost_row(name, options, transform, embedding, prompts, step_ms, args.repeats, text.device)
        )
    return rows


def cost_row(name, options, transform, embedding, originals, step_ms, repeats, device) -> dict:
    """Times `transform(draw)` (the text, on the CPU) and `embedding(draw)` (the noise, if any) for one
    setting."""
    text_us, outputs = time_calls(transform, repeats, torch.device("cpu"))
    embedding_us = time_calls(embedding, repeats, device)[0] if embedding else 0.0
    changed = [new != old for batch in outputs for new, old in zip(batch, originals, strict=True)]
    total_us = text_us + embedding_us
    return {
        "mitigation": f"{name} {' '.join(f'{key}={value}' for key, value in options.items()) or '-'}",
        "name": name,
        "options": options,
        "text_us": text_us,
        "embedding_us": embedding_us,
        "total_us": total_us,
        "of_step": total_us / (step_ms * 1e3),
        "changed": sum(changed) / len(changed),
    }


def parse_args(argv=None):
    parser = argument_parser(__doc__, overrides="model.prompt_dropout=0")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="images (and prompts) per batch")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per mitigation")
    parser.add_argument("--steps", type=int, default=5, help="timed training and CFG steps")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("repeats", "steps", "batch_size"))
    return args


def main(argv=None) -> dict:
    """Runs the benchmark, prints the two tables and returns {"step_ms", "cfg_step_ms", "train" (rows of
    `train_mitigation_costs`), "inference" (rows of `inference_mitigation_costs`)}."""
    args = parse_args(argv)
    threads = setup(args)
    sizes = [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}"]
    module = build_model("text2img", ["model/cond_unet=tiny", *sizes, *args.overrides], args.seed).to(
        args.device
    )
    batch = image_batch(args.batch_size, args.image_size, args.seed, captions=True)
    batch["image"] = batch["image"].to(args.device)
    print(
        f"Caption mitigations: Text2ImageModule at {args.image_size} px, batch {args.batch_size}, device "
        f"{args.device}, {threads}",
        flush=True,
    )
    result = {"step_ms": training_step_ms(module, batch, args.steps)}
    text = module.encode_prompts(batch["caption"])  # (B, L, D)
    result["cfg_step_ms"] = cfg_step_ms(module, text, args.steps)
    result["train"] = train_mitigation_costs(
        caption_lists(args.batch_size, args.seed), text, result["step_ms"], args
    )
    result["inference"] = inference_mitigation_costs(
        batch["caption"], text, module.empty_prompt(), result["cfg_step_ms"], args
    )

    columns = [("mitigation", "mitigation", ""), ("text_us", "text (us)", ".1f")]
    columns += [("embedding_us", "embedding (us)", ".1f"), ("total_us", "total (us)", ".1f")]
    columns += [("of_step", "of step", ".2%"), ("changed", "changed", ".0%")]
    print(
        f"\nTrain-time caption mitigations, one batch of {args.batch_size} images (5 captions each), median "
        f"of {args.repeats} calls; ratio to one training step ({result['step_ms']:.1f} ms: loss, backward, "
        "optimizer)"
    )
    print_table(result["train"], columns)
    print(
        "  text: captions made per image with its own seeded generator, as the captioned dataset does (in "
        "the DataLoader workers during training); embedding: gn's noise on the (B, L, D) text embedding, in "
        "the step"
    )
    print(
        f"\nInference-time mitigations, one batch of {args.batch_size} prompts, median of {args.repeats} "
        f"calls; ratio to one CFG denoising step ({result['cfg_step_ms']:.1f} ms, EMA UNet on "
        f"{2 * args.batch_size} inputs; a generation runs {module.hparams.sample_steps})"
    )
    print_table(result["inference"], columns)
    return result


if __name__ == "__main__":
    main()
