"""Reading images from disk as 8-bit RGB, and listing image folders.

Every dataset in `src.data` goes through `load_rgb` (files) or `to_rgb` (already decoded images, e.g. from
webdataset shards), so all of them treat grayscale, transparent, palette and 16-bit images the same way.
The official CSD code calls `Image.open(path).convert("RGB")`, which paints transparent pixels black and
clips 16-bit values to 255 (a white image); we composite on white and rescale instead.
"""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Pillow opens 16-bit grayscale PNG/TIFF as one of these modes (which one depends on the file and the
# Pillow version); 8-bit grayscale opens as "L", so a 32-bit "I" image holds 16-bit data in practice.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImage(OSError):
    """An image file that is missing, corrupt, truncated or in a mode we cannot convert to RGB."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any common mode to a new 8-bit RGB image.

    - 16-bit grayscale (I;16*, I): values 0..65535 are rescaled to 0..255 (Pillow's own convert clips them).
    - Transparency (RGBA, LA, PA, or a palette/L/RGB image with a `transparency` entry) is composited on
      white, so transparent backgrounds do not turn black.
    - Everything else (L, 1, P, CMYK, YCbCr, RGB) goes through Pillow's `convert("RGB")`.
    Raises ValueError for float images ("F"), whose value range is unknown.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        pixels = np.clip(pixels, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.round(pixels).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise ValueError(
            "32-bit float images (mode 'F') have no known value range; convert them to 8 or 16 bit"
        )
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path) -> Image.Image:
    """Read an image file fully and return it as 8-bit RGB (see `to_rgb` for the mode rules).

    Raises UnreadableImage(path, reason) for a missing, corrupt or truncated file; the caller decides
    whether to skip it (datasets return None and log it) or to stop.
    """
    try:
        with Image.open(path) as image:
            # load() forces decoding, so a truncated file fails here and not later inside a transform.
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise UnreadableImage(path, "file does not exist") from None
    except UnidentifiedImageError:
        raise UnreadableImage(
            path, "not an image file Pillow can identify (corrupt or wrong format)"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(path, f"{type(error).__name__}: {error}") from None


def list_images(folder) -> list[Path]:
    """All image files under `folder` (recursive), sorted, with a suffix in IMAGE_EXTENSIONS (any case).

    Raises FileNotFoundError naming the folder and the extensions when the folder is missing or has no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder '{folder}' does not exist (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(
            f"image folder '{folder}' holds no image file with one of the extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return paths
