"""Captions of text-conditional diffusion data: the conditioning levels, the duplication settings and the
captions file of "Understanding and Mitigating Copying in Diffusion Models"
(docs/memorization.md#conditioning, docs/memorization.md#duplication; official code somepago/DCR
`datasets.py`, `diff_train.py`). The caption mitigations are in `src.mitigations`.

Pure functions, free of Lightning and Hydra; random choices take a `numpy.random.Generator` (`rng`).
"""

import hashlib
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from src.mitigations import caption_zero, random_token_caption
from src.utils.files import read_json

log = logging.getLogger(__name__)

CONDITIONING_LEVELS = ("nolevel", "classlevel", "instancelevel_blip", "instancelevel_random")
DUPLICATION_SETTINGS = ("nodup", "dup_both", "dup_image")


# ----------------------------------------------------------- conditioning (docs/memorization.md#conditioning)


def condition_caption(
    level: str, captions: list[str], class_name: str | None = None, random_caption: str | None = None
) -> str:
    """The training caption of one image under a conditioning level (docs/memorization.md#conditioning, DCR
    `--class_prompt`).

    - `nolevel`: the constant "An image";
    - `classlevel`: "An image of {class_name}";
    - `instancelevel_blip`: the image's caption 0;
    - `instancelevel_random`: `random_caption`, the image's fixed random-token caption (make them once with
      `random_captions_for`; DCR stores the token ids in `random_captions_4.json` and decodes them).

    DCR's `instancelevel_ogcap` (the original LAION caption) is `instancelevel_blip` on a captions file
    holding the LAION captions.
    """
    if level == "nolevel":
        return "An image"
    if level == "classlevel":
        if not class_name:
            raise ValueError("conditioning level 'classlevel' needs the image's class_name")
        return f"An image of {class_name}"
    if level == "instancelevel_blip":
        return caption_zero(captions)
    if level == "instancelevel_random":
        if not random_caption:
            raise ValueError(
                "conditioning level 'instancelevel_random' needs the image's random_caption "
                "(make a fixed one per image with random_captions_for)"
            )
        return random_caption
    raise ValueError(f"unknown conditioning level '{level}'; valid levels: {', '.join(CONDITIONING_LEVELS)}")


def random_captions_for(paths, tokenizer, seed: int, num_tokens: int = 4) -> dict[str, str]:
    """A fixed random-token caption per image, {path: caption} (docs/memorization.md#conditioning,
    `instancelevel_random`).

    Each image's caption is drawn from a generator seeded by (seed, SHA-256 of its path), so it depends only
    on the seed and the path: stable across runs and unchanged when images are added or removed. (DCR ships
    the token ids in a JSON file whose generation code is not public.)
    """
    captions = {}
    for path in paths:
        key = str(path)
        path_hash = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
        rng = np.random.default_rng([seed, path_hash])
        captions[key] = random_token_caption(tokenizer, rng, num_tokens)
    return captions


# ------------------------------------------------------------- duplication (docs/memorization.md#duplication)


def duplication_weights(
    num_images: int, weight_pc: float = 0.05, dup_weight: float = 5.0, seed: int = 0
) -> torch.Tensor:
    """Sampling weights (num_images,) float64 for `WeightedRandomSampler` (docs/memorization.md#duplication).

    Exactly `round(weight_pc * num_images)` images, chosen without replacement by `seed`, get `dup_weight`;
    the others 1. With the defaults the duplicated 5% make up 0.25/1.2 ≈ 20.8% of draws. DCR truncates
    (`int(weight_pc * N)`), floors the weight (`w * dup_weight // 1`) and picks with the global NumPy seed.
    An image counts as duplicated when its weight is > 1 (DCR `samplingweights[index] > 1`).
    """
    if num_images <= 0:
        raise ValueError(f"duplication_weights: num_images={num_images} must be > 0")
    if not 0.0 <= weight_pc <= 1.0:
        raise ValueError(f"duplication_weights: weight_pc={weight_pc} must lie in [0, 1]")
    if dup_weight <= 0:
        raise ValueError(f"duplication_weights: dup_weight={dup_weight} must be > 0")
    num_duplicated = round(weight_pc * num_images)
    chosen = np.random.default_rng(seed).choice(num_images, size=num_duplicated, replace=False)
    weights = torch.ones(num_images, dtype=torch.float64)
    weights[torch.from_numpy(chosen)] = float(dup_weight)
    return weights


def duplicated_caption(
    setting: str, captions: list[str], is_duplicated: bool, rng: np.random.Generator
) -> str:
    """The caption of one draw under a duplication setting (docs/memorization.md#duplication, DCR
    `--duplication`).

    `nodup` and `dup_both`: caption 0 (a duplicated image always comes with the same caption). `dup_image`:
    a duplicated image gets a caption drawn uniformly from its whole list (caption 0 included) on each
    draw; other images get caption 0.
    """
    if setting not in DUPLICATION_SETTINGS:
        raise ValueError(
            f"unknown duplication setting '{setting}'; valid settings: {', '.join(DUPLICATION_SETTINGS)}"
        )
    caption = caption_zero(captions)
    if setting == "dup_image" and is_duplicated:
        if len(captions) < 2:
            raise ValueError(
                f"duplication 'dup_image' needs several captions per duplicated image; this one has 1: {captions}"
            )
        return captions[int(rng.integers(0, len(captions)))]
    return caption


# ---------------------------------------------------------------- captions file


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_captions(path, image_paths, allow_missing: bool = False) -> dict[str, list[str]]:
    """Read a captions JSON `{relative_path: [caption_0, caption_1, ...]}` for the given images.

    A plain string value is read as a one-caption list. `image_paths` are the images' paths relative to the
    image root (DCR keys hold the full path instead); both sides are compared as normalised POSIX paths
    ("./a/b.jpg" == "a/b.jpg"). Returns {path: captions} in `image_paths` order.

    Images without captions and captions naming images not in `image_paths` are an error, reported with
    counts and the first names; with `allow_missing` they are logged as a warning and dropped (the returned
    mapping holds only the images that have captions; the config key is `data.allow_missing_captions`). An empty
    caption or caption list is always an error, and so is a file that is missing, not UTF-8 or not valid JSON
    (naming the line).
    """
    path = Path(path)
    raw = read_json(path, "captions file")
    if not isinstance(raw, dict):
        raise ValueError(
            f"captions file '{path}' must hold a JSON object {{relative_path: [caption, ...]}}, "
            f"not {type(raw).__name__}"
        )

    captions = {}
    for key, value in raw.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(caption, str) for caption in value):
            raise ValueError(
                f"captions file '{path}': image '{key}' must map to a caption string or a list of strings"
            )
        if len(value) == 0 or any(not caption.strip() for caption in value):
            raise ValueError(f"captions file '{path}': image '{key}' has an empty caption or caption list")
        captions[PurePosixPath(key).as_posix()] = value

    wanted = [PurePosixPath(str(image_path)).as_posix() for image_path in image_paths]
    wanted_set = set(wanted)
    uncaptioned = [image for image in wanted if image not in captions]
    unknown = [image for image in captions if image not in wanted_set]
    problems = []
    if uncaptioned:
        problems.append(
            f"{len(uncaptioned)} of {len(wanted)} images have no captions ({_names(uncaptioned)})"
        )
    if unknown:
        problems.append(
            f"{len(unknown)} captioned images do not exist among the {len(wanted)} images ({_names(unknown)})"
        )
    if problems:
        message = f"captions file '{path}': " + "; ".join(problems)
        if not allow_missing:
            raise ValueError(
                message + "; fix the file, or drop them with data.allow_missing_captions=true "
                "(allow_missing=True when calling load_captions)"
            )
        log.warning("%s; dropping them", message)
    return {image: captions[image] for image in wanted if image in captions}
