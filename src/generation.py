"""Generate images into a folder with a manifest: used by `python -m src.sample`, the end-of-training replication
analysis (src/callbacks/diffusion.py) and any code that draws from a trained diffusion module.

Image i is drawn from seed `seed + i` alone, so a run that stops (pre-emption, Ctrl-C) resumes by running the same
command: the images already in the folder are kept and only the missing ones are generated. The folder's
`manifest.json` records the content of the weights (the checkpoint file's SHA-256, or the module's state digest when
it was never saved), seed, sampler, steps, EMA, prompts and mitigation; a folder made with anything else is refused,
so one folder never mixes two models, even when a checkpoint file was overwritten with later weights. A folder that
holds images but no manifest is refused too (they would be taken for generations) unless `adopt=True`.
"""

import json
import logging
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from src.data.diffusion.image_folder import fingerprint
from src.data.images import IMAGE_EXTENSIONS, read_list
from src.mitigations import INFERENCE_MITIGATIONS, SAMPLING_MITIGATIONS, apply_inference_mitigation
from src.nn.diffusion import SAMPLERS, check_choice
from src.utils.checkpoints import TRAIN_DIFFUSION, expect_module, file_digest, load_checkpoint, state_digest
from src.utils.checks import check_number

log = logging.getLogger(__name__)

# What a folder's images depend on; "checkpoint" (the path) is recorded too, for the reader, but not compared.
MANIFEST_KEYS = ("weights_sha256", "seed", "sampler", "steps", "use_ema", "inference_mitigation", "prompts")


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


def check_manifest(folder: Path, manifest: dict, adopt: bool = False) -> list[str]:
    """ValueError when `folder` holds a manifest whose settings (MANIFEST_KEYS) differ from `manifest`, or images
    but no manifest (unless `adopt`). Returns the names of the images adopted (none unless `adopt`)."""
    path = folder / "manifest.json"
    if not path.is_file():
        images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            return []
        if not adopt:
            raise ValueError(
                f"{folder} holds {len(images)} image(s) but no manifest.json ({_names(images)}), so nothing says "
                "which model made them. Choose an empty or new output folder, or, if they are generations of "
                "this very checkpoint with these settings, pass adopt=true to keep them."
            )
        return images
    old = json.loads(path.read_text())
    changed = {k: (old.get(k), manifest[k]) for k in MANIFEST_KEYS if old.get(k) != manifest[k]}
    if changed:
        hint = ""
        if "weights_sha256" in changed:
            hint = (
                f" The weights differ from those that made the folder's images (it was made from "
                f"{old.get('checkpoint')!r}; a checkpoint file overwritten by later training has new weights)."
            )
        raise ValueError(
            f"{folder} holds generations made with other settings {changed} (folder's, requested).{hint} "
            "Choose another output folder, or the same weights and settings."
        )
    return []


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_adopted_sizes(folder: Path, names: list[str], image_size: int) -> None:
    """ValueError naming the adopted images whose size is not the model's `image_size` square."""
    wrong = []
    for name in names:
        with Image.open(folder / name) as image:
            if image.size != (image_size, image_size):
                wrong.append(f"{name} ({image.size[0]}x{image.size[1]})")
    if wrong:
        raise ValueError(
            f"{folder}: {len(wrong)} image(s) to adopt are not {image_size}x{image_size} like this model's "
            f"generations ({_names(wrong)}); they cannot be its generations. Choose another output folder."
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
    adopt: bool = False,
    weights_sha256: str | None = None,
    part: int = 0,
    parts: int = 1,
) -> Path:
    """Write `num_images` generations of `module` (any module with `generate(seeds, sampler, steps, use_ema)`, and
    `prompts=` for text-conditional ones) into `folder` as 000000.png ..., skipping those already there, and write
    `manifest.json`. Image i uses seed + i and, when given, prompts[i] after `inference_mitigation`
    ({name: none | gni | rt | cwr | rna | prompt_embedding | delayed_guidance | attention_rescale, and their
    options}); the exact prompts used are written to `prompts.json` ({image name: prompt}) and the time spent to
    `timing.json` (`write_timing`). `checkpoint` is the file the module was loaded from: its SHA-256 keys the folder
    (`file_digest`, remembered with its size and mtime); without one, the module's state digest does, unless the
    caller passes it as `weights_sha256` (computed once for many folders of one module). Returns the folder.

    part, parts: this call generates only the images of index range `part_range(num_images, part, parts)`, so
    `parts` processes (GPUs, SLURM array tasks) fill one folder together; as image i depends on seed + i alone,
    the folder is the same as one process's. Each part writes its own timing_part<p>of<P>.json.

    Raises ValueError when the folder holds a manifest with other weights or settings (seed, sampler, steps, EMA,
    prompts, mitigation), or images without a manifest unless `adopt` (then images of another size are refused),
    or when num_images, batch_size or steps is below 1.
    """
    check_number("num_images", num_images, low=1, integer=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("steps", steps, low=1, integer=True, allow_none=True)
    check_number("seed", seed, low=0, integer=True)
    first, end = part_range(num_images, part, parts)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output folder '{folder}' is a file; give a folder for the generations")
    folder.mkdir(parents=True, exist_ok=True)
    sampler = check_choice("sampler", sampler or module.hparams.sampler, SAMPLERS)
    steps = steps or module.hparams.sample_steps
    weights = weights_sha256
    if weights is None:
        is_file = checkpoint is not None and Path(checkpoint).is_file()
        weights = file_digest(checkpoint) if is_file else state_digest(module)
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
        "weights_sha256": weights,
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "use_ema": use_ema,
        "image_size": module.hparams.image_size,
        "inference_mitigation": mitigation,
        "prompts": None if used is None else fingerprint(used),
    }
    adopted = check_manifest(folder, manifest, adopt=adopt)
    if adopted:
        check_adopted_sizes(folder, adopted, module.hparams.image_size)
        log.warning(
            "%s: adopting %d image(s) found without a manifest: %s", folder, len(adopted), _names(adopted)
        )
        manifest["adopted"] = adopted
    elif (folder / "manifest.json").is_file():
        manifest["adopted"] = json.loads((folder / "manifest.json").read_text()).get("adopted", [])
    todo = [i for i in range(first, end) if not (folder / image_name(i)).is_file()]
    manifest["num_images"] = num_images
    # Every part writes the same manifest and prompts: written then renamed, so a reader never sees half a file.
    write_json_atomically(folder / "manifest.json", manifest, indent=2)
    if used is not None:
        write_json_atomically(
            folder / "prompts.json", {image_name(i): p for i, p in enumerate(used)}, indent=1
        )
    own = end - first
    if len(todo) < own:
        log.info(
            "%s: %d of %d images already there; generating the other %d",
            folder,
            own - len(todo),
            own,
            len(todo),
        )
    bar = tqdm(total=own, initial=own - len(todo), desc="sampling", unit="img", disable=not progress)
    report: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        extra = {}
        if used is not None:
            extra["prompts"] = [used[i] for i in indices]
            if mitigation.get("name") == "gni":
                extra["embedding_noise"] = float(mitigation.get("lam", 0.1))
            if mitigation.get("name") in SAMPLING_MITIGATIONS:
                extra["mitigation"], extra["report"] = mitigation, report
        seeds = [seed + i for i in indices]
        images = module.generate(seeds, sampler=sampler, steps=steps, use_ema=use_ema, **extra)
        for i, image in zip(indices, images.numpy(), strict=True):
            save_image(image, folder / image_name(i))
        bar.update(len(indices))
        if report:
            write_mitigation_report(folder, report, _part_suffix(part, parts))
    bar.close()
    if todo:
        write_timing(folder, len(todo), time.perf_counter() - started, _part_suffix(part, parts))
    return folder


def part_range(num_images: int, part: int, parts: int) -> tuple[int, int]:
    """[first, end) image indices of `part` of `parts` near-equal consecutive ranges of range(num_images)."""
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part must be in [0, parts) with parts >= 1, got part={part}, parts={parts}")
    return part * num_images // parts, (part + 1) * num_images // parts


def _part_suffix(part: int, parts: int) -> str:
    return "" if parts == 1 else f"_part{part}of{parts}"


def write_json_atomically(path: Path, content, indent: int | None = None) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=indent))
    tmp.replace(path)


def write_timing(folder: Path, images: int, seconds: float, suffix: str = "") -> None:
    """`timing<suffix>.json`: the wall seconds spent generating the folder's images, summed over the calls that
    generated some (an interrupted folder's earlier calls included), and the seconds per image."""
    path = folder / f"timing{suffix}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    images += int(earlier.get("images", 0))
    seconds += float(earlier.get("seconds", 0.0))
    path.write_text(json.dumps({"images": images, "seconds": seconds, "seconds_per_image": seconds / images}))


def write_mitigation_report(folder: Path, report: list[dict], suffix: str = "") -> None:
    """`mitigation_report<suffix>.json`: what the prompt-embedding mitigation reached per prompt and batch of
    seeds, merged with what an earlier (interrupted) run of the folder wrote."""
    path = folder / f"mitigation_report{suffix}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else []
    seen = {tuple(entry["seeds"]) for entry in report}
    merged = [entry for entry in earlier if tuple(entry["seeds"]) not in seen] + report
    path.write_text(json.dumps(merged, indent=1))


DIFFUSION_MODULES = ("DDPMModule", "Text2ImageModule")


def load_module(ckpt_path: str, device) -> torch.nn.Module:
    """The diffusion LightningModule saved in `ckpt_path` (its class is recorded in the checkpoint as
    `module_class`), on `device`, in eval mode. Loaded with `weights_only=True`; a file that is not a diffusion
    checkpoint gets a CheckpointError saying what it is and how to train one."""
    checkpoint = load_checkpoint(ckpt_path, "checkpoint", make=TRAIN_DIFFUSION, mmap=True)
    expect_module(checkpoint, ckpt_path, DIFFUSION_MODULES, make=TRAIN_DIFFUSION)
    module_class = hydra.utils.get_class(checkpoint.get("module_class", "src.models.ddpm.DDPMModule"))
    del checkpoint
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


def run_datamodule(run_dir, needed_by: str, otherwise: str):
    """The datamodule of the training run in `run_dir`, rebuilt from its `config_resolved.yaml` (nothing written
    into the run) and set up: its training and held-out files, captions and transform, as the run saw them.
    FileNotFoundError says that `needed_by` reads the file and what to do `otherwise`."""
    config_file = Path(run_dir) / "config_resolved.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{needed_by} reads the training run's {config_file}, which is missing (the checkpoint is not inside "
            f"a run folder of `python -m src.train`); {otherwise}"
        )
    data = OmegaConf.load(config_file).data
    for key in ("index_file", "weights_file"):  # read the run, never write into it
        if key in data:
            data[key] = None
    datamodule = hydra.utils.instantiate(data)
    datamodule.setup("predict")
    return datamodule


def read_prompts(source, ckpt_path: str, num_images: int, seed: int) -> list[str] | None:
    """Generation prompts: None; "training" (the training run's prompts as DCR draws them,
    docs/memorization.md#generation-protocol: its data config rebuilt from the run's config_resolved.yaml,
    `train_prompts(num_images, seed)`); or a file (.txt, one prompt per line, or .json list), cycled to
    `num_images`."""
    if source in (None, ""):
        return None
    if source == "training":
        datamodule = run_datamodule(
            run_dir_of(ckpt_path), "prompts=training", "pass prompts=<file.txt or .json> instead"
        )
        return datamodule.train_prompts(num_images, seed=seed)[0]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts={source!r}: no such file (a .txt with one prompt per line, a .json list, or 'training')"
        )
    prompts = read_list(path)
    return [prompts[i % len(prompts)] for i in range(num_images)]
