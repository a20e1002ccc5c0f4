"""Generate images from a trained checkpoint: `python -m src.sample ckpt_path=... num_images=1000 sampler=ddim steps=50`.

Image i is drawn from seed `seed + i` alone, so a run that stops (pre-emption, Ctrl-C) resumes by running the same
command: the images already in the folder are kept and only the missing ones are generated. The folder's
`manifest.json` records the checkpoint, seed, sampler and steps; a folder made with other settings is refused.
"""

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

import src.utils  # noqa: F401  (registers the config resolvers)
from src.data.captions import INFERENCE_MITIGATIONS, apply_inference_mitigation
from src.data.image_folder import fingerprint
from src.nn.diffusion import SAMPLERS, check_choice
from src.utils.run import find_resume_checkpoint, print_config_tree, resolve_device

log = logging.getLogger(__name__)

MANIFEST_KEYS = ("checkpoint", "seed", "sampler", "steps", "use_ema", "inference_mitigation", "prompts")


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def mitigated_prompts(prompts: list[str], seed: int, mitigation: dict | None) -> list[str]:
    """The prompts after an inference-time caption mitigation (PAPERS.md §2.6: rt, cwr, rna; gni and none leave the
    text as it is), prompt i with a generator seeded by (seed, i) so that a resumed run uses the same prompts."""
    name = (mitigation or {}).get("name", "none")
    check_choice("inference_mitigation.name", name, INFERENCE_MITIGATIONS)
    if name in ("none", "gni"):
        return list(prompts)
    repeats = int(mitigation.get("repeats", 2))
    return [apply_inference_mitigation(name, p, np.random.default_rng([seed, i]), repeats=repeats)
            for i, p in enumerate(prompts)]  # fmt: skip


def generate_to_folder(module, folder, num_images: int, seed: int = 0, sampler: str | None = None,
                       steps: int | None = None, batch_size: int = 64, use_ema: bool = True,
                       checkpoint: str | None = None, progress: bool = True, prompts: list[str] | None = None,
                       inference_mitigation: dict | None = None) -> Path:  # fmt: skip
    """Write `num_images` generations of `module` (any module with `generate(seeds, sampler, steps, use_ema)`, and
    `prompts=` for text-conditional ones) into `folder` as 000000.png ..., skipping those already there, and write
    `manifest.json`. Image i uses seed + i and, when given, prompts[i] after `inference_mitigation`
    ({name: none | gni | rt | cwr | rna, repeats, lam}); the exact prompts used are written to `prompts.json`
    ({image name: prompt}). Returns the folder.

    Raises ValueError when the folder holds a manifest with other settings (checkpoint, seed, sampler, steps, EMA,
    prompts, mitigation).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sampler = check_choice("sampler", sampler or module.hparams.sampler, SAMPLERS)
    steps = steps or module.hparams.sample_steps
    mitigation = dict(inference_mitigation or {"name": "none"})
    used = None
    if prompts is not None:
        if len(prompts) < num_images:
            raise ValueError(f"{len(prompts)} prompts for {num_images} images; give one prompt per image")
        used = mitigated_prompts(list(prompts[:num_images]), seed, mitigation)
    elif mitigation.get("name", "none") != "none":
        raise ValueError("an inference mitigation needs prompts (a text-conditional model)")
    manifest = {"checkpoint": checkpoint, "seed": seed, "sampler": sampler, "steps": steps, "use_ema": use_ema,
                "image_size": module.hparams.image_size, "inference_mitigation": mitigation,
                "prompts": None if used is None else fingerprint(used)}  # fmt: skip
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        changed = {k: (old.get(k), manifest[k]) for k in MANIFEST_KEYS if old.get(k) != manifest[k]}
        if changed:
            raise ValueError(
                f"{folder} holds generations made with other settings {changed} (folder's, requested); "
                "choose another output folder or the same settings"
            )
    todo = [i for i in range(num_images) if not (folder / image_name(i)).is_file()]
    manifest["num_images"] = num_images
    manifest_path.write_text(json.dumps(manifest, indent=2))
    if used is not None:
        (folder / "prompts.json").write_text(
            json.dumps({image_name(i): p for i, p in enumerate(used)}, indent=1)
        )
    if len(todo) < num_images:
        log.info("%s: %d of %d images already there; generating the other %d", folder, num_images - len(todo),
                 num_images, len(todo))  # fmt: skip
    bar = tqdm(
        total=num_images, initial=num_images - len(todo), desc="sampling", unit="img", disable=not progress
    )
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        extra = {}
        if used is not None:
            extra["prompts"] = [used[i] for i in indices]
            if mitigation.get("name") == "gni":
                extra["embedding_noise"] = float(mitigation.get("lam", 0.1))
        images = module.generate([seed + i for i in indices], sampler=sampler, steps=steps, use_ema=use_ema,
                                 **extra)  # fmt: skip
        for i, image in zip(indices, images.numpy(), strict=True):
            tmp = folder / f".{image_name(i)}.tmp"
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
            tmp.replace(folder / image_name(i))  # a killed run never leaves a half-written image
        bar.update(len(indices))
    bar.close()
    return folder


def load_module(ckpt_path: str, device) -> "torch.nn.Module":
    """The LightningModule saved in `ckpt_path` (its class is recorded in the checkpoint), on `device`, in eval."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    class_path = checkpoint.get("module_class", "src.models.ddpm.DDPMModule")
    module_class = hydra.utils.get_class(class_path)
    module = module_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return module.to(device).eval()


def default_folder(ckpt_path: str, sampler: str, steps: int, seed: int, mitigation: str = "none") -> Path:
    """<run>/samples/<checkpoint>_<sampler><steps>_seed<seed>[_<mitigation>]: the same command writes to (and
    resumes) one folder."""
    ckpt = Path(ckpt_path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    suffix = "" if mitigation == "none" else f"_{mitigation}"
    return run_dir / "samples" / f"{ckpt.stem}_{sampler}{steps}_seed{seed}{suffix}"


def read_prompts(source, ckpt_path: str, num_images: int, seed: int) -> list[str] | None:
    """Generation prompts: None; "training" (the training run's prompts as DCR draws them, PAPERS.md §2.7: its data
    config rebuilt from the run's config_resolved.yaml, `train_prompts(num_images, seed)`); or a file (.txt, one
    prompt per line, or .json list), cycled to `num_images`."""
    if source in (None, ""):
        return None
    if source == "training":
        ckpt = Path(ckpt_path)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        config_file = run_dir / "config_resolved.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"prompts=training reads the training run's {config_file}, which is missing; "
                                    "pass prompts=<file.txt or .json> instead")  # fmt: skip
        datamodule = hydra.utils.instantiate(OmegaConf.load(config_file).data)
        datamodule.setup("predict")
        return datamodule.train_prompts(num_images, seed=seed)[0]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompts={source!r}: no such file (a .txt with one prompt per line, a .json list, "
                                "or 'training')")  # fmt: skip
    prompts = json.loads(path.read_text()) if path.suffix == ".json" else path.read_text().splitlines()
    prompts = [p for p in (prompts.values() if isinstance(prompts, dict) else prompts)]
    if not prompts or any(not str(p).strip() for p in prompts):
        raise ValueError(f"prompts file '{path}' is empty or holds an empty prompt")
    return [str(prompts[i % len(prompts)]) for i in range(num_images)]


def sample(cfg: DictConfig) -> Path:
    print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_resolved.yaml")
    ckpt_path = find_resume_checkpoint(cfg.ckpt_path)
    if ckpt_path is None:
        raise ValueError("ckpt_path is required: a .ckpt file or a training run directory")
    module = load_module(ckpt_path, resolve_device(cfg.device))
    sampler = check_choice("sampler", cfg.sampler or module.hparams.sampler, SAMPLERS)
    steps = cfg.steps or module.hparams.sample_steps
    mitigation = OmegaConf.to_container(cfg.inference_mitigation, resolve=True)
    prompts = read_prompts(cfg.prompts, ckpt_path, cfg.num_images, cfg.prompt_seed)
    folder = Path(cfg.output_folder) if cfg.output_folder else default_folder(ckpt_path, sampler, steps, cfg.seed,
                                                                              mitigation["name"])  # fmt: skip
    generate_to_folder(module, folder, cfg.num_images, seed=cfg.seed, sampler=sampler, steps=steps,
                       batch_size=cfg.batch_size, use_ema=cfg.use_ema, checkpoint=str(Path(ckpt_path).resolve()),
                       prompts=prompts, inference_mitigation=mitigation)  # fmt: skip
    log.info(f"{cfg.num_images} images in {folder}")
    return folder


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample.yaml")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
