"""The embedded style benchmark: photographs shipped inside installed packages, rendered in procedural styles.

It exists on any machine without downloads, so `make demo` can train a small CSD model on a CPU and the tests
can run retrieval end to end. Layout of a build (``build_style_bench`` returns the folder)::

    style_bench_s{seed}_px{size}_n{per_style}_v1/
        images/<split>/<style>/<id>.png     split in train | database | query
        train.csv       path,tags           tags joined by "|": style:<name>|medium:..|technique:..|palette:..
        retrieval.csv   path,label,split    label = style name, split = query | database
        images.csv      path,split,style,tags,source,crop   one row per image (provenance)
        meta.json       seed, sizes, styles, counts, source photos per split, package versions

How it follows the CSD evaluation (docs/style.md#evaluation-protocol): a query is retrieved against the
database and a hit is the same style. The content of an image is a random crop (random scale and flips) of a
source photograph; whole photographs are dealt to the query, database and train groups, with no photograph in
two groups, so that query content is never seen in the database or in training and a content descriptor cannot
solve it. The styles and their shared palettes are in `src/data/embedded/styles.py`.
"""

import argparse
import csv
import json
import logging
import multiprocessing
import time
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from src.data.embedded.styles import STYLES, stylize
from src.data.images import build_atomically

log = logging.getLogger(__name__)

VERSION = "v1"
SPLITS = ("train", "database", "query")
# Fractions of each style's images; train takes the rest (~65%).
QUERY_FRACTION, DATABASE_FRACTION = 0.10, 0.25
# Fractions of the source photographs dealt to the query and database groups; train takes the rest.
QUERY_PHOTOS, DATABASE_PHOTOS = 0.22, 0.22
# Crops flatter than this (luminance std) are drawn again, at most MAX_CROP_TRIES times in all.
MIN_CROP_STD, MAX_CROP_TRIES = 0.03, 10


def _gray(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(image)[..., None], 3, axis=-1)


def _matplotlib_sample(name: str) -> np.ndarray:
    import matplotlib

    return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB"))


def _skimage(name: str, gray: bool = False):
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
        return _gray(image) if gray else np.asarray(image)[..., :3]

    return load


# Photographs that ship inside scikit-image and matplotlib (no download), by stratum. The two strata are
# dealt to the groups separately, so every group gets both scenes/objects and textures/microscopy/documents.
# Left out: skimage's lfw_subset (25x25 px faces, too small to crop), hubble_deep_field (black sky with
# sparse stars: most renderings came out a single flat colour), logos, synthetic test patterns, and data
# that `skimage.data` fetches from the internet.
SOURCE_PHOTOS: dict[str, dict] = {
    "scene": {
        "astronaut": _skimage("astronaut"),
        "chelsea": _skimage("chelsea"),
        "coffee": _skimage("coffee"),
        "rocket": _skimage("rocket"),
        "motorcycle": _skimage("stereo_motorcycle"),
        "camera": _skimage("camera", gray=True),
        "clock": _skimage("clock", gray=True),
        "coins": _skimage("coins", gray=True),
        "grace_hopper": lambda: _matplotlib_sample("grace_hopper.jpg"),
    },
    "texture": {
        "retina": _skimage("retina"),
        "immunohistochemistry": _skimage("immunohistochemistry"),
        "moon": _skimage("moon", gray=True),
        "brick": _skimage("brick", gray=True),
        "grass": _skimage("grass", gray=True),
        "gravel": _skimage("gravel", gray=True),
        "cell": _skimage("cell", gray=True),
        "page": _skimage("page", gray=True),
        "text": _skimage("text", gray=True),
    },
}
_LOADERS = {name: load for stratum in SOURCE_PHOTOS.values() for name, load in stratum.items()}


@cache
def load_photo(name: str) -> np.ndarray:
    """A source photograph as uint8 (H, W, 3); cached per process."""
    if name not in _LOADERS:
        raise KeyError(f"unknown source photo {name!r}; known: {sorted(_LOADERS)}")
    image = _LOADERS[name]()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise RuntimeError(
            f"source photo {name!r} loaded as {image.dtype} {image.shape}, expected uint8 (H, W, 3)"
        )
    return image


def assign_photos(seed: int) -> dict[str, list[str]]:
    """Deal whole source photographs to the query, database and train groups (disjoint), per stratum."""
    rng = np.random.default_rng([seed, 0])
    groups = {split: [] for split in SPLITS}
    for stratum in SOURCE_PHOTOS.values():
        names = [str(n) for n in rng.permutation(sorted(stratum))]
        n_query = max(1, round(QUERY_PHOTOS * len(names)))
        n_database = max(1, round(DATABASE_PHOTOS * len(names)))
        groups["query"] += names[:n_query]
        groups["database"] += names[n_query : n_query + n_database]
        groups["train"] += names[n_query + n_database :]
    return {split: sorted(names) for split, names in groups.items()}


def split_sizes(images_per_style: int) -> dict[str, int]:
    """Images per style in each split: ~10% query, ~25% database, the rest train (each at least 1)."""
    if images_per_style < 3:
        raise ValueError(f"images_per_style must be at least 3 (one per split); got {images_per_style}")
    n_query = max(1, round(QUERY_FRACTION * images_per_style))
    n_database = max(1, round(DATABASE_FRACTION * images_per_style))
    return {"train": images_per_style - n_query - n_database, "database": n_database, "query": n_query}


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """A square crop at a random scale and place, randomly flipped, resized to (size, size, 3) float32.

    The side is 25-90% of the photograph's short side. A nearly flat crop (luminance std < 0.03: clear sky,
    a bare wall) is drawn again, up to 10 times, since most styles render it as one flat colour.
    Returns the crop and [top, left, side, hflip, vflip].
    """
    h, w = photo.shape[:2]
    for _ in range(MAX_CROP_TRIES):
        side = max(16, int(min(h, w) * rng.uniform(0.25, 0.9)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize(
            (size, size), Image.LANCZOS
        )
        out = np.asarray(crop, dtype=np.float32) / 255.0
        if (out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).std() >= MIN_CROP_STD:
            break
    hflip, vflip = bool(rng.random() < 0.5), bool(rng.random() < 0.2)
    out = out[:, ::-1] if hflip else out
    out = out[::-1] if vflip else out
    return np.ascontiguousarray(out), [top, left, side, int(hflip), int(vflip)]


def _render(job: tuple) -> dict:
    """Render and write one image; every random choice comes from its own (seed, style, split, index) rng."""
    folder, seed, size, style_index, style, split, index, photos = job
    rng = np.random.default_rng([seed, 1, style_index, SPLITS.index(split), index])
    source = photos[int(rng.integers(len(photos)))]
    content, crop = random_crop(load_photo(source), size, rng)
    image, tags = stylize(content, style, rng)
    path = f"images/{split}/{style}/{index:05d}.png"
    Image.fromarray((image * 255).round().astype(np.uint8)).save(Path(folder) / path)
    return {
        "path": path,
        "split": split,
        "style": style,
        "tags": "|".join(tags),
        "source": source,
        "crop": crop,
    }


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _versions() -> dict[str, str]:
    return {pkg: metadata.version(pkg) for pkg in ("numpy", "scipy", "scikit-image", "pillow", "matplotlib")}


def build_style_bench(
    root: str | Path,
    seed: int = 0,
    image_size: int = 96,
    images_per_style: int = 250,
    force: bool = False,
    num_workers: int = 2,
) -> Path:
    """Build the benchmark under `root` (or reuse a complete earlier build) and return its folder.

    Deterministic for (seed, image_size, images_per_style): the same arguments give byte-identical files.
    Atomic (`src.data.images.build_atomically`): an interrupted build is never taken for a complete one.
    `force` rebuilds. `num_workers` > 1 renders in that many processes.
    """
    if image_size < 32:
        raise ValueError(
            f"image_size must be at least 32 px for the styles' strokes to show; got {image_size}"
        )
    sizes = split_sizes(images_per_style)
    name = f"style_bench_s{seed}_px{image_size}_n{images_per_style}_{VERSION}"
    start = time.perf_counter()

    def write(tmp: Path) -> dict:
        photos = assign_photos(seed)
        jobs = []
        for style_index, style in enumerate(STYLES):
            for split in SPLITS:
                (tmp / "images" / split / style).mkdir(parents=True)
                jobs += [
                    (str(tmp), seed, image_size, style_index, style, split, i, photos[split])
                    for i in range(sizes[split])
                ]
        log.info(
            "style benchmark: rendering %d images (%d styles x %s) from %d photos with %d worker(s) into %s",
            len(jobs),
            len(STYLES),
            sizes,
            sum(map(len, photos.values())),
            num_workers,
            tmp,
        )
        if num_workers > 1:
            # spawn: safe when the caller has threads (torch, a dataloader), unlike fork
            with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
                rows = pool.map(_render, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))
        else:
            rows = [_render(job) for job in jobs]
        log.info("style benchmark: rendered in %.1f s; writing the index files", time.perf_counter() - start)

        _write_csv(
            tmp / "train.csv",
            ["path", "tags"],
            [[r["path"], r["tags"]] for r in rows if r["split"] == "train"],
        )
        _write_csv(
            tmp / "retrieval.csv",
            ["path", "label", "split"],
            [[r["path"], r["style"], r["split"]] for r in rows if r["split"] != "train"],
        )
        _write_csv(
            tmp / "images.csv",
            ["path", "split", "style", "tags", "source", "crop"],
            [
                [r["path"], r["split"], r["style"], r["tags"], r["source"], " ".join(map(str, r["crop"]))]
                for r in rows
            ],
        )
        return {
            "name": name,
            "version": VERSION,
            "seed": seed,
            "image_size": image_size,
            "images_per_style": images_per_style,
            "styles": list(STYLES),
            "counts": {split: sizes[split] * len(STYLES) for split in SPLITS},
            "counts_per_style": sizes,
            "source_photos": photos,
            "versions": _versions(),
        }

    return build_atomically(root, name, write, force)


def load_style_bench(
    root, seed: int = 0, image_size: int = 96, images_per_style: int = 250, num_workers: int = 2
):
    """The benchmark's query/database split as a `RetrievalSet` (built on first use): `conf/benchmark/style_bench.yaml`."""
    from src.data.style.retrieval import load_retrieval_csv

    folder = build_style_bench(
        root, seed=seed, image_size=image_size, images_per_style=images_per_style, num_workers=num_workers
    )
    return load_retrieval_csv(folder / "retrieval.csv", root=folder)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the embedded style benchmark and print its counts.")
    parser.add_argument("--root", default="data", help="folder that receives the benchmark folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--images-per-style", type=int, default=250)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    folder = build_style_bench(
        args.root, args.seed, args.image_size, args.images_per_style, args.force, args.num_workers
    )
    meta = json.loads((folder / "meta.json").read_text())
    print(folder)
    print(f"{len(meta['styles'])} styles: {', '.join(meta['styles'])}")
    for split in SPLITS:
        print(
            f"{split:>8}: {meta['counts'][split]:5d} images from photos {', '.join(meta['source_photos'][split])}"
        )


if __name__ == "__main__":
    main()
