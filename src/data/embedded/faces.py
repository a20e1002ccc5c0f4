"""The embedded face set: the 100 LFW faces that scikit-image ships (`skimage.data.lfw_subset`), as a folder of PNGs.

It stands in for CelebA-HQ on machines without the dataset (`experiment=ddpm_quickstart`, the tests): the faces are
25 x 25 grayscale crops, written as RGB PNGs upsampled (bicubic) to `image_size`. The other 100 images of
`lfw_subset` are non-faces and are left out. Layout of a build (``build_embedded_faces`` returns the folder)::

    faces_px{size}_v1/
        images/face_000.png ... face_099.png
        meta.json       source, count, image size, package versions
"""

import logging
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from src.data.images import build_atomically

log = logging.getLogger(__name__)

VERSION = "v1"
NUM_FACES = 100  # lfw_subset(): 100 faces, then 100 non-faces


def face_images(image_size: int = 32) -> list[Image.Image]:
    """The 100 shipped faces as RGB images of `image_size` px (bicubic from 25 px)."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:NUM_FACES]  # (100, 25, 25) float64 in [0, 1]
    images = []
    for face in faces:
        gray = Image.fromarray(np.round(face * 255).astype(np.uint8), mode="L")
        images.append(gray.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB"))
    return images


def build_embedded_faces(root, image_size: int = 32, force: bool = False) -> Path:
    """Write the faces under `root` (or reuse a complete earlier build, see
    `src.data.images.build_atomically`) and return the image
    folder. Deterministic for an image size."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 px; got {image_size}")
    name = f"faces_px{image_size}_{VERSION}"

    def write(tmp: Path) -> dict:
        (tmp / "images").mkdir()
        for i, image in enumerate(face_images(image_size)):
            image.save(tmp / "images" / f"face_{i:03d}.png")
        log.info("embedded faces: writing %s (%d images at %d px)", name, NUM_FACES, image_size)
        return {
            "name": name,
            "source": "skimage.data.lfw_subset()[:100] (Labeled Faces in the Wild, 25 px grayscale)",
            "count": NUM_FACES,
            "image_size": image_size,
            "versions": {p: metadata.version(p) for p in ("scikit-image", "pillow")},
        }

    return build_atomically(root, name, write, force) / "images"
