"""Benchmark: what each detector of memorized prompts (docs/detection.md) costs per prompt, against one full
generation of that prompt, and what each mitigation that acts inside sampling adds per image, against plain
sampling.

The module is `Text2ImageModule` as conf/model/text2img.yaml builds it with `model/cond_unet=tiny` (further Hydra
overrides on the command line) and seeded random weights: the timings do not depend on what it learned. The
prompts are the embedded captioned faces' captions (`caption_lists` of benchmarks/harness.py).

- Detectors, with the options of conf/detect.yaml (the papers' defaults) and the cheap settings: the time to
  score `--prompts` prompts, divided by their number, against the time to generate one image of one prompt with
  the model's own sampler and steps (`Text2ImageModule.generate`, batch of one).
- Mitigations (`prompt_embedding`, `delayed_guidance`, `attention_rescale`, conf/inference_mitigation/): the time
  to generate a batch of `--prompts` images with the mitigation, against the same batch without, per image.

Each time is the median over `--repeats` calls after one untimed call.

On one NVIDIA H200 (torch 2.11, CUDA 13; 2026-11-27), tiny conditional UNet at 32 px, 8 prompts: one generation
569 ms (DDIM-50, batch of one, launch bound); noise_norm 80.8 ms per prompt (0.142 of a generation), its cheap
setting 2.3 ms (0.004), attention_entropy 2.5 ms (0.004), mode last 69.0 ms (0.121), score_anisotropy 3.0 ms
(0.005); per image against plain sampling (65.8 ms): prompt_embedding 1.18x, delayed_guidance 1.02x,
attention_rescale 1.34x. With Stable Diffusion 1.x shapes (the overrides of conf/model/text2img.yaml for an
860M-parameter UNet2DConditionModel, 320-640-1280-1280, 4 x 64 x 64 latents, a random 12-layer 768-wide text
encoder; float32; 4 prompts), read from the progress bars: noise_norm 5.5 s per prompt (4 generations x 50
steps, batched), its cheap setting 33 ms, attention_entropy 34 ms, mode last 1.56 s, score_anisotropy 63 ms; the
mitigations (`--only mitigations`, 4 prompts, 2 repeats): plain sampling 1,540 ms per image, prompt_embedding
2,776 ms (1.80x: its full 10 steps, the target 3 not reached on random weights), delayed_guidance 1.00x,
attention_rescale 1.08x; one generation of one prompt 2.59 s.

    python -m benchmarks.detection_cost --threads 1     # tiny conditional UNet, 32 px
    python -m benchmarks.detection_cost --device cuda --image-size 64
    python -m benchmarks.detection_cost --device cuda --image-size 64 --prompts 4 --repeats 2 model.channels=4 \
        model.unet.block_out_channels=[320,640,1280,1280] model.unet.layers_per_block=2 \
        model.unet.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D] \
        model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D] \
        model.unet.norm_num_groups=32 model.unet.attention_head_dim=8 model.text_encoder.width=768 \
        model.text_encoder.layers=12 model.text_encoder.heads=12 model.text_encoder.context_length=77 \
        [--only mitigations]                                                         # Stable Diffusion 1.x shapes
"""

import torch

from benchmarks.harness import (
    argument_parser,
    build_model,
    caption_lists,
    check_positive,
    load_config,
    print_table,
    setup,
    time_calls,
)
from src.detection.run import unet_scores
from src.mitigations import SAMPLING_MITIGATIONS

DETECT_DEFAULTS = {
    "noise_norm": {"generations": 4, "steps": 50, "scored_steps": None},
    "noise_norm (cheap)": {"generations": 1, "steps": 50, "scored_steps": 1},
    "attention_entropy": {"generations": 1, "steps": 50, "mode": "first", "layers": None, "last_steps": 10},
    "attention_entropy (mode last)": {"generations": 1, "steps": 50, "mode": "last", "last_steps": 10},
    "score_anisotropy": {
        "generations": 1,
        "steps": 50,
        "angle_index": -3,
        "norm_weight": 1.0,
        "angle_weight": 2.0,
    },
}


def median_seconds(function, repeats: int, device) -> float:
    """Median wall seconds of `function()` over `repeats` calls after one untimed call (`time_calls`)."""
    return time_calls(lambda draw: function(), repeats, device)[0] / 1e6


def main(argv=None) -> dict:
    parser = argument_parser(__doc__, overrides="model.guidance_scale=7.5")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8, help="prompts scored / images generated per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="the detectors' sampling schedule (papers: 50)")
    parser.add_argument(
        "--only", choices=("detectors", "mitigations"), help="time one half (the default: both)"
    )
    args = parser.parse_args(argv)
    check_positive(parser, args, ("image_size", "prompts", "repeats", "steps"))
    threads = setup(args)
    device = torch.device(args.device)
    module = build_model(
        "text2img", ["model/cond_unet=tiny", f"data.image_size={args.image_size}", *args.overrides], args.seed
    ).to(device)
    module.eval()
    prompts = [captions[0] for captions in caption_lists(args.prompts, args.seed)]
    print(
        f"Detectors and sampling mitigations: Text2ImageModule at {args.image_size} px, {args.prompts} prompts, "
        f"device {args.device}, {threads}; a generation: {module.hparams.sampler}-{module.hparams.sample_steps}",
        flush=True,
    )
    generation = median_seconds(lambda: module.generate([0], prompts[:1]), args.repeats, device)
    rows = []
    detectors = DETECT_DEFAULTS if args.only != "mitigations" else {}
    for label, options in detectors.items():
        name = label.split(" ")[0]
        options = {**options, "steps": args.steps}
        seconds = median_seconds(
            lambda name=name, options=options: unet_scores(module, name, prompts, options, 0, 64, True),
            args.repeats,
            device,
        )
        per_prompt = seconds / len(prompts)
        rows.append({"what": label, "ms": 1e3 * per_prompt, "ratio": per_prompt / generation})
    seeds = list(range(len(prompts)))
    if args.only == "detectors":
        print_rows(args, generation, rows)
        return {"generation_ms": 1e3 * generation, "rows": rows}
    plain = median_seconds(lambda: module.generate(seeds, prompts), args.repeats, device)
    rows.append({"what": "plain sampling (per image)", "ms": 1e3 * plain / len(prompts), "ratio": 1.0})
    for name in SAMPLING_MITIGATIONS:
        options = load_config("inference_mitigation", name)
        seconds = median_seconds(
            lambda options=options: module.generate(seeds, prompts, mitigation=options), args.repeats, device
        )
        rows.append(
            {
                "what": f"mitigation {name} (per image)",
                "ms": 1e3 * seconds / len(prompts),
                "ratio": seconds / plain,
            }
        )
    print_rows(args, generation, rows)
    return {"generation_ms": 1e3 * generation, "rows": rows}


def print_rows(args, generation: float, rows: list[dict]) -> None:
    print(f"\nOne generation of one prompt: {1e3 * generation:.1f} ms (median of {args.repeats})")
    print(
        "Detectors: ms per prompt and ratio to one generation; mitigations: ms per image and ratio to plain sampling"
    )
    print_table(rows, [("what", "what", ""), ("ms", "ms", ".1f"), ("ratio", "ratio", ".3f")])


if __name__ == "__main__":
    main()
