"""Generate images into a folder with a manifest: used by `python -m src.sample`, the end-of-training replication
analysis (src/callbacks/diffusion.py) and any code that draws from a trained diffusion module.

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
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from src.data.diffusion.image_folder import fingerprint
from src.data.images import read_list
from src.mitigations import INFERENCE_MITIGATIONS, apply_inference_mitigation
from src.nn.diffusion import SAMPLERS, check_choice

log = logging.getLogger(__name__)

MANIFEST_KEYS = ("checkpoint", "seed", "sampler", "steps", "use_ema", "inference_mitigation", "prompts")


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def mitigated_prompts(prompts: list[str], seed: int, mitigation: dict | None) -> list[str]:
    """The prompts after an inference-time caption mitigation
    (docs/memorization.md#inference-time-mitigations: rt, cwr, rna; gni and none leave the text as it is),
    prompt i with a generator seeded by (seed, i) so that a resumed run uses the same prompts."""
    name = (mitigation or {}).get("name", "none")
    check_choice("inference_mitigation.name", name, INFERENCE_MITIGATIONS)
    if name in ("none", "gni"):
        return list(prompts)
    repeats = int(mitigation.get("repeats", 2))
    return [
        apply_inference_mitigation(name, p, np.random.default_rng([seed, i]), repeats=repeats)
        for i, p in enumerate(prompts)
    ]


def check_manifest(folder: Path, manifest: dict) -> None:
    """ValueError when `folder` holds a manifest whose settings (MANIFEST_KEYS) differ from `manifest`."""
    path = folder / "manifest.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    changed = {k: (old.get(k), manifest[k]) for k in MANIFEST_KEYS if old.get(k) != manifest[k]}
    if changed:
        raise ValueError(
            f"{folder} holds generations made with other settings {changed} (folder's, requested); "
            "choose another output folder or the same settings"
        )


def save_image(image: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W, C) image as PNG through a temporary file: a killed run never leaves a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    tmp.replace(path)


def generate_to_folder(
    module,
    folder,
    num_images: int,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    checkpoint: str | None = None,
    progress: bool = True,
    prompts: list[str] | None = None,
    inference_mitigation: dict | None = None,
) -> Path:
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
    manifest = {
        "checkpoint": checkpoint,
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "use_ema": use_ema,
        "image_size": module.hparams.image_size,
        "inference_mitigation": mitigation,
        "prompts": None if used is None else fingerprint(used),
    }
    check_manifest(folder, manifest)
    todo = [i for i in range(num_images) if not (folder / image_name(i)).is_file()]
    manifest["num_images"] = num_images
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if used is not None:
        (folder / "prompts.json").write_text(
            json.dumps({image_name(i): p for i, p in enumerate(used)}, indent=1)
        )
    if len(todo) < num_images:
        log.info(
            "%s: %d of %d images already there; generating the other %d",
            folder,
            num_images - len(todo),
            num_images,
            len(todo),
        )
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
        seeds = [seed + i for i in indices]
        images = module.generate(seeds, sampler=sampler, steps=steps, use_ema=use_ema, **extra)
        for i, image in zip(indices, images.numpy(), strict=True):
            save_image(image, folder / image_name(i))
        bar.update(len(indices))
    bar.close()
    return folder


def load_module(ckpt_path: str, device) -> torch.nn.Module:
    """The LightningModule saved in `ckpt_path` (its class is recorded in the checkpoint as `module_class`), on
    `device`, in eval mode. Loaded with `weights_only=True`."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module_class = hydra.utils.get_class(checkpoint.get("module_class", "src.models.ddpm.DDPMModule"))
    module = module_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return module.to(device).eval()


def run_dir_of(ckpt_path: str) -> Path:
    """The training run directory of a checkpoint (<run>/checkpoints/x.ckpt, or a checkpoint directly in <run>)."""
    ckpt = Path(ckpt_path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def default_folder(ckpt_path: str, sampler: str, steps: int, seed: int, mitigation: str = "none") -> Path:
    """<run>/samples/<checkpoint>_<sampler><steps>_seed<seed>[_<mitigation>]: the same command writes to (and
    resumes) one folder."""
    suffix = "" if mitigation == "none" else f"_{mitigation}"
    return run_dir_of(ckpt_path) / "samples" / f"{Path(ckpt_path).stem}_{sampler}{steps}_seed{seed}{suffix}"


def read_prompts(source, ckpt_path: str, num_images: int, seed: int) -> list[str] | None:
    """Generation prompts: None; "training" (the training run's prompts as DCR draws them,
    docs/memorization.md#generation-protocol: its data config rebuilt from the run's config_resolved.yaml,
    `train_prompts(num_images, seed)`); or a file (.txt, one prompt per line, or .json list), cycled to
    `num_images`."""
    if source in (None, ""):
        return None
    if source == "training":
        config_file = run_dir_of(ckpt_path) / "config_resolved.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"prompts=training reads the training run's {config_file}, which is missing; "
                "pass prompts=<file.txt or .json> instead"
            )
        datamodule = hydra.utils.instantiate(OmegaConf.load(config_file).data)
        datamodule.setup("predict")
        return datamodule.train_prompts(num_images, seed=seed)[0]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts={source!r}: no such file (a .txt with one prompt per line, a .json list, or 'training')"
        )
    prompts = read_list(path)
    return [prompts[i % len(prompts)] for i in range(num_images)]
