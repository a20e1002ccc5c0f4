"""The embedded captioned face set: the 100 LFW faces of `skimage.data.lfw_subset` with captions written by us.

It stands in for a captioned training set (Imagenette + BLIP captions, LAION-10k;
docs/memorization.md#datasets) on machines without one, for the text-conditional copying study of
"Understanding and Mitigating Copying in Diffusion Models" (docs/memorization.md#caption-mitigations).
Captions are built deterministically from attributes measured on each 25 px face:

- brightness (mean grey level) quartile: the class, one of `CLASS_NAMES` (25 faces each), the image's subfolder;
- contrast (grey-level std), hair tone (mean of the top 5 rows), lighting side (left half minus right half
  mean) and horizontal position (intensity-weighted centroid): tertiles by rank.

Caption 0 (the `instancelevel_blip` caption) names every attribute plus a unique made-up name (`face_name`), so
each image has its own caption, as a BLIP caption of a LAION image mostly is. Captions 1..4 are paraphrases
without the name (independent captioners do not share a name for a person), used by the `mc` mitigation and by
`dup_image`. Layout of a build (``build_captioned_faces`` returns the build folder)::

    captioned_faces_px{size}_v1/
        images/{dark_face,dim_face,light_face,bright_face}/face_000.png ...
        captions.json   {"dark_face/face_007.png": [caption_0, ..., caption_4], ...} (paths relative to images/)
        meta.json       source, count, image size, classes, attributes per image, package versions
"""

import json
import logging
from importlib import metadata
from pathlib import Path

import numpy as np

from src.data.embedded.faces import NUM_FACES, face_images
from src.data.images import build_atomically

log = logging.getLogger(__name__)

VERSION = "v1"
IMAGES_DIR = "images"
CAPTIONS_FILE = "captions.json"
NATIVE_SIZE = (
    25  # lfw_subset faces are 25 x 25: attributes are measured there, so they do not depend on image_size
)
CLASS_NAMES = ("dark_face", "dim_face", "light_face", "bright_face")  # brightness quartiles, darkest first
SYLLABLES = ("ba", "ko", "mi", "ru", "te", "lo", "za", "ni", "fe", "du")  # 10 x 10 names for the 100 faces

# Words per attribute bin (lowest value first), and the paraphrase synonyms of the brightness words.
CONTRAST = ("low", "medium", "high")
HAIR = ("black", "brown", "fair")
SIDE = ("lit from the right", "evenly lit", "lit from the left")  # left-minus-right brightness, low to high
POSITION = ("placed left of centre", "centred", "placed right of centre")
BRIGHTNESS = ("dark", "dim", "light", "bright")
COMPLEXION = ("deeply shadowed", "muted", "soft", "glowing")


def face_name(index: int) -> str:
    """A unique made-up name for face `index` in [0, 100): two syllables, e.g. 0 -> "baba", 17 -> "kofe"."""
    if not 0 <= index < len(SYLLABLES) ** 2:
        raise ValueError(f"face index {index} outside [0, {len(SYLLABLES) ** 2})")
    return SYLLABLES[index // len(SYLLABLES)] + SYLLABLES[index % len(SYLLABLES)]


def _rank_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Equal-count bins by rank (ties broken by index): bin of each value in [0, num_bins)."""
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks * num_bins // len(values)


def face_attributes(faces: np.ndarray) -> list[dict]:
    """Per-face attributes of grey faces (N, H, W) in [0, 1]: measured values and their bins.

    Returns one dict per face: brightness, contrast, hair, side, position (floats) and the bins
    brightness_bin (quartile), contrast_bin, hair_bin, side_bin, position_bin (tertiles), all by rank.
    """
    _, height, width = faces.shape
    columns = np.arange(width, dtype=np.float64)
    measured = {
        "brightness": faces.mean(axis=(1, 2)),
        "contrast": faces.std(axis=(1, 2)),
        "hair": faces[:, : max(1, height // 5)].mean(axis=(1, 2)),
        "side": faces[:, :, : width // 2].mean(axis=(1, 2))
        - faces[:, :, (width + 1) // 2 :].mean(axis=(1, 2)),
        "position": (faces.sum(axis=1) * columns).sum(axis=1) / faces.sum(axis=(1, 2)),
    }
    bins = {
        name: _rank_bins(values, len(BRIGHTNESS) if name == "brightness" else 3)
        for name, values in measured.items()
    }
    return [
        {
            **{name: round(float(values[i]), 4) for name, values in measured.items()},
            **{f"{name}_bin": int(values[i]) for name, values in bins.items()},
        }
        for i in range(len(faces))
    ]


def face_captions(index: int, attributes: dict) -> list[str]:
    """Caption 0 (unique: names the face) and paraphrases 1..4 of one face's attributes."""
    brightness = BRIGHTNESS[attributes["brightness_bin"]]
    complexion = COMPLEXION[attributes["brightness_bin"]]
    contrast = CONTRAST[attributes["contrast_bin"]]
    hair = HAIR[attributes["hair_bin"]]
    side = SIDE[attributes["side_bin"]]
    position = POSITION[attributes["position_bin"]]
    return [
        f"portrait of {face_name(index)}, a {brightness} face with {hair} hair and {contrast} contrast, "
        f"{side}, {position}",
        f"a {brightness} headshot of a person with {hair} hair, {side}",
        f"close-up of a face with {contrast} contrast, {position} in the frame",
        f"grayscale photo of a person with {hair} hair and a {complexion} complexion",
        f"a {contrast}-contrast {brightness} portrait, {side}",
    ]


def build_captioned_faces(root, image_size: int = 32, force: bool = False) -> Path:
    """Write the captioned faces under `root` (or reuse a complete earlier build) and return the build folder.

    The folder holds `images/` (class subfolders of PNGs, RGB, bicubic from 25 px), `captions.json` and
    `meta.json`. Deterministic, and atomic like `build_embedded_faces`: written into a temporary sibling folder
    renamed into place once meta.json exists, so an interrupted build is never mistaken for a complete one.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 px; got {image_size}")
    name = f"captioned_faces_px{image_size}_{VERSION}"

    def write(tmp: Path) -> dict:
        grey = (
            np.stack([np.asarray(face)[..., 0] for face in face_images(NATIVE_SIZE)]) / 255.0
        )  # (100, 25, 25)
        attributes = face_attributes(grey)
        for class_name in CLASS_NAMES:
            (tmp / IMAGES_DIR / class_name).mkdir(parents=True)
        captions, records = {}, {}
        for i, image in enumerate(face_images(image_size)):
            path = f"{CLASS_NAMES[attributes[i]['brightness_bin']]}/face_{i:03d}.png"
            image.save(tmp / IMAGES_DIR / path)
            captions[path] = face_captions(i, attributes[i])
            records[path] = {"name": face_name(i), **attributes[i]}
        (tmp / CAPTIONS_FILE).write_text(json.dumps(captions, indent=1) + "\n")
        log.info("embedded captioned faces: writing %s (%d images at %d px)", name, NUM_FACES, image_size)
        return {
            "name": name,
            "source": "skimage.data.lfw_subset()[:100] (Labeled Faces in the Wild, 25 px grayscale); "
            "captions from pixel attributes (src/data/embedded/captioned_faces.py)",
            "count": NUM_FACES,
            "image_size": image_size,
            "classes": {c: sum(p.startswith(c + "/") for p in captions) for c in CLASS_NAMES},
            "captions_per_image": len(next(iter(captions.values()))),
            "attributes": records,
            "versions": {p: metadata.version(p) for p in ("scikit-image", "pillow")},
        }

    return build_atomically(root, name, write, force)
