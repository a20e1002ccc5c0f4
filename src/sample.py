"""Generate images from a trained checkpoint: `python -m src.sample ckpt_path=... num_images=1000 sampler=ddim steps=50`,
or from a diffusers Stable Diffusion directory: `python -m src.sample pretrained=<dir> prompts=<file> output_folder=<dir>`.

Running the same command again resumes: the images already in the output folder are kept and only the missing ones
are generated (src/generation.py). `part=p parts=P` (or torchrun's RANK / WORLD_SIZE) generates the p-th of P
index ranges, so P GPUs or SLURM array tasks fill one folder: `-m part='range(8)' parts=8 hydra/launcher=...`. Text-conditional models take `prompts=training` or a prompt file, and an
inference-time mitigation (`inference_mitigation=rna`).
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import src.utils  # noqa: F401  (registers the config resolvers)
from src.generation import default_folder, generate_to_folder, load_module, part_range, read_prompts
from src.nn.diffusion import SAMPLERS, check_choice
from src.utils.checks import check_number
from src.utils.run import (
    claim_run_dir,
    distributed_part,
    print_config_tree,
    require_checkpoint,
    resolve_device,
)

log = logging.getLogger(__name__)


def pretrained_module(cfg: DictConfig):
    """A `Text2ImageModule` straight from a diffusers Stable Diffusion directory (no training run, no EMA)."""
    from src.models.text2img import Text2ImageModule

    check_number("image_size", cfg.image_size, low=8, integer=True)
    module = Text2ImageModule(
        pretrained=cfg.pretrained,
        image_size=cfg.image_size,
        ema_decay=0.0,
        sampler=cfg.sampler or "ddim",
        sample_steps=cfg.steps or 50,
        guidance_scale=cfg.guidance_scale,
    )
    return module.to(resolve_device(cfg.device)).eval()


def sample(cfg: DictConfig) -> Path:
    check_number("num_images", cfg.num_images, low=1, integer=True)
    check_number("batch_size", cfg.batch_size, low=1, integer=True)
    check_number("steps", cfg.steps, low=1, integer=True, allow_none=True)
    check_number("seed", cfg.seed, low=0, integer=True)
    part, parts = distributed_part()  # torchrun: RANK / WORLD_SIZE
    part = part if cfg.part is None else cfg.part
    parts = parts if cfg.parts is None else cfg.parts
    if parts == 1 or part == 0:
        claim_run_dir(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_resolved.yaml")
    if cfg.get("pretrained"):
        module, ckpt_path = pretrained_module(cfg), str(cfg.pretrained)
        if not cfg.output_folder:
            raise ValueError(
                "pretrained=<Stable Diffusion dir> has no training run to write into: give output_folder"
            )
        if cfg.prompts in (None, "", "training"):
            raise ValueError("pretrained=<Stable Diffusion dir> needs prompts=<file.txt or .json>")
    else:
        ckpt_path = require_checkpoint(cfg.ckpt_path)
        module = load_module(ckpt_path, resolve_device(cfg.device))
    sampler = check_choice("sampler", cfg.sampler or module.hparams.sampler, SAMPLERS)
    steps = cfg.steps or module.hparams.sample_steps
    mitigation = OmegaConf.to_container(cfg.inference_mitigation, resolve=True)
    prompts = read_prompts(cfg.prompts, ckpt_path, cfg.num_images, cfg.prompt_seed)
    folder = Path(
        cfg.output_folder or default_folder(ckpt_path, sampler, steps, cfg.seed, mitigation["name"])
    )
    generate_to_folder(
        module,
        folder,
        cfg.num_images,
        seed=cfg.seed,
        sampler=sampler,
        steps=steps,
        batch_size=cfg.batch_size,
        use_ema=cfg.use_ema,
        checkpoint=str(Path(ckpt_path).resolve()),
        prompts=prompts,
        inference_mitigation=mitigation,
        adopt=cfg.adopt,
        part=part,
        parts=parts,
    )
    first, end = part_range(cfg.num_images, part, parts)
    log.info(f"images {first}..{end - 1} of {cfg.num_images} (part {part} of {parts}) in {folder}")
    return folder


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample.yaml")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
