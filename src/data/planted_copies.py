"""The planted-copy benchmark: copies of known images hidden among distractors, to score copy detectors on any
machine (docs/replication.md#scoring-a-copy-detector; `python -m src.evaluate benchmark=planted_copies`).

Content never seen by the project's trained copy descriptor: the photographs that the embedded style benchmark
deals to its query and database groups (`src.data.embedded.style_bench.assign_photos`; the descriptor trains on
the train group's photographs), cut into a grid of non-overlapping squares so no two images share pixels, and
the 100 LFW faces shipped with scikit-image (the DDPM studies' faces). Each image has one role:

- source: in the database, and two of its copies are queries;
- distractor: in the database, copied by nothing;
- negative query: a query with no copy in the database (it can only give false positives);
- background: the canvas of a pasted copy (never in the database).

Each source's two copies are made by two different edits, drawn at random:
`colour_cast` (each channel scaled by U(0.45, 0.9) and shifted so it stays in [0, 1]: a generator's colour
drift), `blur` (Gaussian, sigma U(0.8, 1.6) px), `noise` (Gaussian, std U(0.04, 0.1)), `crop` (a square of
55-85% of the side, resized back), `paste` (the source shrunk to 50-70% of the side on a background), `jpeg`
(quality U{5..20}) and `drift` (a milder cast, blur and noise together: what a diffusion model's imperfect copy
looks like). The build is deterministic for its seed and cached (`build_atomically`). Layout::

    planted_copies_s{seed}_px{size}_v1/
        images/database/<id>.png, images/query/<id>__<edit>.png
        images.csv      path,split,role,source,edit    (source: the id a query copies; empty for the rest)
        meta.json
"""

import csv
import logging
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from src.data.images import build_atomically, jpeg_roundtrip
from src.data.style.retrieval import RetrievalSet

log = logging.getLogger(__name__)

VERSION = "v1"
EDITS = ("colour_cast", "blur", "noise", "crop", "paste", "jpeg", "drift")
COPIES_PER_SOURCE = 2
# Shares of the content given to each role; the rest are negative queries and backgrounds.
SOURCE_SHARE, DISTRACTOR_SHARE, NEGATIVE_SHARE = 0.4, 0.25, 0.25


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def photo_cells(names: list[str], size: int) -> list[tuple[str, Image.Image]]:
    """Non-overlapping square cells of each photograph (side: a fifth of its short side), resized to `size`;
    flat cells (luma std below the style benchmark's MIN_CROP_STD, 0.03) are left out."""
    from src.data.embedded.style_bench import MIN_CROP_STD, load_photo

    cells = []
    for name in names:
        photo = load_photo(name)
        h, w = photo.shape[:2]
        side = min(h, w) // 5
        for top in range(0, h - side + 1, side):
            for left in range(0, w - side + 1, side):
                crop = Image.fromarray(photo[top : top + side, left : left + side]).resize(
                    (size, size), Image.Resampling.LANCZOS
                )
                if (_to_array(crop) @ np.array([0.299, 0.587, 0.114])).std() >= MIN_CROP_STD:
                    cells.append((f"{name}_{top}_{left}", crop))
    return cells


def colour_cast(x: np.ndarray, rng: np.random.Generator, low: float = 0.45, high: float = 0.9) -> np.ndarray:
    """Each channel scaled by U(low, high) and shifted by a random share of the room left in [0, 1]."""
    scale = rng.uniform(low, high, size=3)
    scaled = x * scale
    room = 1 - scaled.reshape(-1, 3).max(axis=0)
    return scaled + rng.uniform(0, 1, size=3) * room


def edit_copy(
    source: Image.Image, edit: str, rng: np.random.Generator, background: Image.Image
) -> Image.Image:
    """One copy of `source` made by `edit` (see the module docstring), same size as the source."""
    size = source.size
    x = _to_array(source)
    if edit == "colour_cast":
        return _to_image(colour_cast(x, rng))
    if edit == "blur":
        return source.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6)))
    if edit == "noise":
        return _to_image(x + rng.normal(0, rng.uniform(0.04, 0.1), size=x.shape))
    if edit == "crop":
        side = int(round(size[0] * rng.uniform(0.55, 0.85)))
        top, left = (int(rng.integers(0, size[0] - side + 1)) for _ in range(2))
        return source.crop((left, top, left + side, top + side)).resize(size, Image.Resampling.BICUBIC)
    if edit == "paste":
        side = int(round(size[0] * rng.uniform(0.5, 0.7)))
        top, left = (int(rng.integers(0, size[0] - side + 1)) for _ in range(2))
        canvas = background.copy()
        canvas.paste(source.resize((side, side), Image.Resampling.BICUBIC), (left, top))
        return canvas
    if edit == "jpeg":
        return jpeg_roundtrip(source, int(rng.integers(5, 21)))
    if edit == "drift":
        y = colour_cast(x, rng, 0.6, 0.95)
        y = _to_array(_to_image(y).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9))))
        return _to_image(y + rng.normal(0, 0.03, size=y.shape))
    raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")


def held_out_content(size: int) -> list[tuple[str, Image.Image]]:
    """(id, image) of the content the copy descriptor never trains on: the held-out photo cells and the faces."""
    from src.data.embedded.faces import face_images
    from src.data.embedded.style_bench import assign_photos

    groups = assign_photos(0)  # the style bench's deal: the copy descriptor trains on groups["train"] only
    cells = photo_cells(sorted(groups["query"] + groups["database"]), size)
    faces = [(f"face_{i:03d}", face) for i, face in enumerate(face_images(size))]
    return cells + faces


def build_planted_copies(root, seed: int = 0, image_size: int = 64, force: bool = False) -> Path:
    """Write the planted-copy benchmark under `root` (or reuse a complete build) and return its folder."""
    if image_size < 16:
        raise ValueError(f"planted copies: image_size must be at least 16 px; got {image_size}")
    name = f"planted_copies_s{seed}_px{image_size}_{VERSION}"

    def write(tmp: Path) -> dict:
        rng = np.random.default_rng([seed, 17])
        content = held_out_content(image_size)
        order = rng.permutation(len(content))
        n = len(content)
        cut = np.cumsum([round(SOURCE_SHARE * n), round(DISTRACTOR_SHARE * n), round(NEGATIVE_SHARE * n)])
        roles = {
            "source": order[: cut[0]],
            "distractor": order[cut[0] : cut[1]],
            "negative": order[cut[1] : cut[2]],
            "background": order[cut[2] :],
        }
        for split in ("database", "query"):
            (tmp / "images" / split).mkdir(parents=True)
        rows = []
        for role in ("source", "distractor"):
            for i in roles[role]:
                key, image = content[i]
                path = f"images/database/{key}.png"
                image.save(tmp / path)
                rows.append([path, "database", role, key if role == "source" else "", ""])
        backgrounds = [content[i][1] for i in roles["background"]]
        for i in roles["source"]:
            key, image = content[i]
            for edit in rng.choice(EDITS, size=COPIES_PER_SOURCE, replace=False):
                background = backgrounds[int(rng.integers(len(backgrounds)))]
                path = f"images/query/{key}__{edit}.png"
                edit_copy(image, str(edit), rng, background).save(tmp / path)
                rows.append([path, "query", "copy", key, str(edit)])
        for i in roles["negative"]:
            key, image = content[i]
            path = f"images/query/{key}__none.png"
            image.save(tmp / path)
            rows.append([path, "query", "negative", "", ""])
        with (tmp / "images.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "split", "role", "source", "edit"])
            writer.writerows(rows)
        counts = {role: len(index) for role, index in roles.items()}
        log.info("planted copies: writing %s (%s)", name, counts)
        return {
            "name": name,
            "seed": seed,
            "image_size": image_size,
            "counts": counts,
            "copies_per_source": COPIES_PER_SOURCE,
            "edits": list(EDITS),
            "versions": {p: metadata.version(p) for p in ("scikit-image", "pillow", "numpy")},
        }

    return build_atomically(root, name, write, force)


def read_planted_copies(folder) -> tuple[RetrievalSet, list[dict]]:
    """The benchmark at `folder` as a copy-detection `RetrievalSet` (a query's label is the source it copies;
    negative queries and distractors have none) and the rows of images.csv."""
    folder = Path(folder)
    with (folder / "images.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    sources = sorted({row["source"] for row in rows if row["source"]})
    column = {key: i for i, key in enumerate(sources)}
    split = {s: [row for row in rows if row["split"] == s] for s in ("query", "database")}

    def labels(part: list[dict]) -> torch.Tensor:
        multi_hot = torch.zeros(len(part), len(sources), dtype=torch.bool)
        for r, row in enumerate(part):
            if row["source"]:
                multi_hot[r, column[row["source"]]] = True
        return multi_hot

    rset = RetrievalSet(
        root=folder,
        query=[row["path"] for row in split["query"]],
        database=[row["path"] for row in split["database"]],
        query_labels=labels(split["query"]),
        database_labels=labels(split["database"]),
        label_names=sources,
        task="copy_detection",
    )
    return rset, rows


def load_planted_copies(root, seed: int = 0, image_size: int = 64) -> RetrievalSet:
    """`conf/benchmark/planted_copies.yaml`: the benchmark (built on first use) as a copy-detection set."""
    return read_planted_copies(build_planted_copies(root, seed, image_size))[0]
