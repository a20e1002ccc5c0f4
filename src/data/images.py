"""Images on disk, shared by every line of work: reading, listing, one dataset, batches and atomic builds.

- `load_rgb` (files) and `to_rgb` (already decoded images, e.g. from webdataset shards): every dataset treats
  grayscale, transparent, palette and 16-bit images the same way. The official CSD code calls
  `Image.open(path).convert("RGB")`, which paints transparent pixels black and clips 16-bit values to 255 (a white
  image); we composite on white and rescale instead.
- `list_images` / `folder_files`: the images of a folder, or a checked list of them; `read_list`: a list of paths
  (or prompts) from a .txt or .json file.
- `ImageListDataset`, `collate_skip_none`, `image_batches`: images by relative path, unreadable ones skipped and
  counted; `ImageRegionsDataset` / `region_boxes`: each image with its sub-regions (region matching).
- `build_atomically`: a data folder written once, atomically (the embedded data sets).
"""

import io
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, default_collate
from tqdm import tqdm

from src.utils.files import read_json, read_text

log = logging.getLogger(__name__)

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

    Raises FileNotFoundError naming the folder and the extensions when the folder is missing or has no image,
    NotADirectoryError when `folder` is a file.
    """
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"'{folder}' is a file, not a folder; give the folder that holds the images")
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


def folder_files(folder, files: list[str] | None = None) -> list[str]:
    """Relative paths (posix str) of the images to read under `folder`: every image (`list_images`, sorted) when
    `files` is None, else `files` in their order after checking that each one exists under `folder`.

    Raises FileNotFoundError naming the folder (and the extensions searched) when it is missing or holds no image,
    or naming how many listed files are missing and the first few; NotADirectoryError when `folder` is a file;
    ValueError for an empty list, an absolute or `..` path, or a path listed twice.
    """
    folder = Path(folder)
    if files is None:
        return [path.relative_to(folder).as_posix() for path in list_images(folder)]
    if folder.is_file():
        raise NotADirectoryError(f"'{folder}' is a file, not a folder; give the folder that holds the images")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder '{folder}' does not exist (it should hold the {len(files)} listed files)"
        )
    files = [Path(f).as_posix() for f in files]
    if not files:
        raise ValueError(
            f"the list of files to read from '{folder}' is empty; pass None to read the whole folder"
        )
    outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if outside:
        raise ValueError(
            f"listed files must be paths relative to '{folder}'; {len(outside)} are not, e.g. {outside[:3]}"
        )
    repeated = sorted(f for f, count in Counter(files).items() if count > 1)
    if repeated:
        raise ValueError(
            f"{len(repeated)} file(s) are listed more than once for '{folder}', e.g. {repeated[:3]}"
        )
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(files)} listed files do not exist under '{folder}', e.g. {missing[:5]}"
        )
    return files


def read_list(path, key: str | None = None) -> list[str]:
    """The list of strings (image paths, prompts) held by the file `path`, under one set of rules:

    - `.json`: a list of strings, or an object holding that list under `key` (e.g. key "train" or "control" of a
      run's `subset_index.json`, written by `src.data.diffusion.image_folder`);
    - any other suffix (`.txt`): one entry a line, surrounding spaces stripped, blank lines skipped.

    Raises FileNotFoundError for a missing file, ValueError naming the file and the line (bytes that are not
    UTF-8, bad JSON) or the entry (JSON) that is wrong, for a folder, or when the file holds no entry, KeyError
    when the JSON object lacks `key`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"list file '{path}' does not exist (expected a .txt or .json list)")
    if path.suffix.lower() != ".json":
        entries = [line.strip() for line in read_text(path, "list file").splitlines()]
        entries = [entry for entry in entries if entry]
    else:
        content = read_json(path, "list file")
        if isinstance(content, dict):
            if key is None:
                raise ValueError(f"list file '{path}' holds a JSON object; expected a JSON list of strings")
            if key not in content:
                raise KeyError(
                    f"list file '{path}' is a JSON object without the key {key!r} (keys: {sorted(content)})"
                )
            content = content[key]
        if not isinstance(content, list):
            raise ValueError(
                f"list file '{path}' must hold a JSON list of strings, not {type(content).__name__}"
            )
        for number, entry in enumerate(content):
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"list file '{path}', entry {number}: {entry!r} is not a non-empty string")
        entries = content
    if not entries:
        raise ValueError(f"list file '{path}' holds no entry")
    return entries


class ImageListDataset(Dataset):
    """The images `root / paths[i]`: item {"image": transform(image), "index": i}, or None when the file cannot be
    read (logged once per file; `collate_skip_none` drops it and counts it in the batch).

    Datasets that add to the item (labels, captions) subclass it and build their item on `load(index)`.
    """

    def __init__(self, root, paths, transform):
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform
        self._reported = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image | None:
        """Image `index` as 8-bit RGB (`load_rgb`), or None when unreadable."""
        try:
            return load_rgb(self.root / self.paths[index])
        except UnreadableImage as error:
            if index not in self._reported:
                self._reported.add(index)
                log.warning("skipping unreadable image: %s", error)
            return None

    def __getitem__(self, index: int) -> dict | None:
        image = self.load(index)
        return None if image is None else {"image": self.transform(image), "index": index}


def region_boxes(width: int, height: int, scales, grid: int) -> list[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes of region matching (docs/replication.md#region-matching): for each
    scale s, boxes of s x the width and s x the height at `grid` x `grid` evenly spaced positions (corners
    included; one centred box when grid is 1). Raises ValueError for a scale outside (0, 1) or grid < 1."""
    if grid < 1 or int(grid) != grid:
        raise ValueError(f"region grid={grid}: must be a positive integer (positions per side).")
    boxes = []
    for scale in scales:
        if not 0 < scale < 1:
            raise ValueError(f"region scale {scale}: must be in (0, 1), a fraction of the image's side.")
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        lefts = np.linspace(0, width - w, grid).round().astype(int) if grid > 1 else [(width - w) // 2]
        tops = np.linspace(0, height - h, grid).round().astype(int) if grid > 1 else [(height - h) // 2]
        boxes += [(int(x), int(y), int(x) + w, int(y) + h) for y in tops for x in lefts]
    return boxes


class ImageRegionsDataset(ImageListDataset):
    """`ImageListDataset` whose item "image" is (1 + R, C, H, W): the whole image, then its R `region_boxes`
    crops, each through `transform`."""

    def __init__(self, root, paths, transform, scales, grid: int):
        super().__init__(root, paths, transform)
        self.scales, self.grid = tuple(scales), grid
        region_boxes(64, 64, self.scales, grid)  # refuses a bad scale or grid before any image is read

    def __getitem__(self, index: int) -> dict | None:
        image = self.load(index)
        if image is None:
            return None
        crops = [image] + [image.crop(box) for box in region_boxes(*image.size, self.scales, self.grid)]
        return {"image": torch.stack([self.transform(crop) for crop in crops]), "index": index}


class SubstituteUnreadable(Dataset):
    """A training set for DDP: an unreadable item (None) is replaced by the next readable one.

    Under DDP every rank must hold a batch of the same size at every step: the contrastive losses gather the
    ranks' batches, and a rank whose every image was unreadable would skip a step the others wait in forever.
    One process keeps skipping unreadable images (`collate_skip_none`); `for_ranks` wraps the training set in
    this when the trainer runs on several ranks. Key i is replaced by i + 1, i + 2, ... (modulo the length; a
    (draw, index) key of `WeightedDrawSampler` shifts its index), logged once per key; RuntimeError when no item
    is readable.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._reported = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        item, offset, size = self.dataset[key], 0, len(self.dataset)
        while item is None:
            offset += 1
            if offset >= size:
                raise RuntimeError(f"none of the {size} training items is readable")
            shifted = (key[0], (key[1] + offset) % size) if isinstance(key, tuple) else (key + offset) % size
            item = self.dataset[shifted]
        if offset and key not in self._reported:
            self._reported.add(key)
            log.warning(
                "unreadable training item %s replaced by the readable one %d further (under DDP each rank's batch "
                "keeps its size)",
                key,
                offset,
            )
        return item


def for_ranks(dataset, trainer):
    """`dataset` wrapped in `SubstituteUnreadable` when `trainer` runs on several ranks, else itself."""
    if trainer is not None and getattr(trainer, "world_size", 1) > 1:
        return SubstituteUnreadable(dataset)
    return dataset


class EpochRandomSampler(Sampler):
    """`RandomSampler(range(n), num_samples=num_samples)` that Lightning splits between ranks under DDP.

    Lightning replaces a plain `RandomSampler` with a `DistributedSampler` over the whole dataset, dropping
    `num_samples` (samples_per_epoch); any other sampler it wraps in `DistributedSamplerWrapper`, which hands each
    rank its share of the sampler's draws. In one process this draws exactly as `RandomSampler` (its seed from
    torch's global generator, so runs are unchanged); under torch.distributed every rank draws the same
    sequence, from a generator seeded by PL_GLOBAL_SEED and the epoch (set by Lightning), so the ranks' shares
    are disjoint.
    """

    def __init__(self, n: int, num_samples: int):
        self.n, self.num_samples, self.epoch = n, num_samples, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            seed = int(
                np.random.SeedSequence([int(os.getenv("PL_GLOBAL_SEED", 0)), self.epoch]).generate_state(1)[0]
            )
            generator = torch.Generator().manual_seed(seed)
        return iter(RandomSampler(range(self.n), num_samples=self.num_samples, generator=generator))


def collate_skip_none(batch: list) -> dict:
    """Default-collate the items that are not None and add "num_skipped" (how many were None).

    An all-None batch gives {"num_skipped": n} only; the LightningModule skips such a batch.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return {"num_skipped": len(batch)}
    collated = default_collate(kept)
    collated["num_skipped"] = len(batch) - len(kept)
    return collated


def image_batches(root, paths, transform, batch_size: int, num_workers: int = 0, desc: str = "images"):
    """Yield (images (B, ...), indices into `paths` (B,)) over the readable images `root / paths[i]`, in order,
    under a progress bar; unreadable files are logged and left out (`ImageListDataset`)."""
    loader = DataLoader(
        ImageListDataset(root, paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
    )
    for batch in tqdm(loader, desc=desc, unit="batch"):
        if "image" in batch:
            yield batch["image"], batch["index"]


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete the temporary folders of interrupted builds of `name` whose process is gone."""
    for tmp in root.glob(f".{name}.tmp-*"):
        pid = int(tmp.name.split("-")[-2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("removing the unfinished build %s (process %d is gone)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def build_atomically(root, name: str, write: Callable[[Path], dict], force: bool = False) -> Path:
    """The folder `root/name`, built by `write(tmp)` unless a complete build (one with meta.json) is there.

    `write` fills the temporary folder `tmp` and returns the content of meta.json. Atomic: the build is written
    into a temporary sibling folder renamed into place once meta.json exists, so an interrupted build is never
    taken for a complete one, and the temporary folders of interrupted builds are removed; when two processes
    race, the first rename wins. `force` rebuilds. Raises RuntimeError for a folder without meta.json.
    """
    root = Path(root)
    final = root / name
    if final.exists() and not force:
        if (final / "meta.json").is_file():
            log.info("reusing %s", final)
            return final
        raise RuntimeError(
            f"{final} exists but has no meta.json, so it is not a complete build of this code; "
            "remove it or pass force=True"
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        meta = write(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if force and final.exists():
            old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            log.info("another process finished %s first; using it", final)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    """`image` saved as JPEG at `quality` (0-100) and read back as RGB, in memory: JPEG artefacts as an edit."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
