"""The partial-copy benchmark of "Diffusion Art or Digital Forgery" (docs/replication.md#the-partial-copy-benchmark):
copies that keep only part of a source image, to rank descriptors by how well they find them
(`python -m src.evaluate benchmark=copy_segmix extractor=...`).

Five kinds of copy, each made from a source image:

- `segmix`: one segment of the source pasted in place onto another image (the Forgery code's `segmix`);
- `segmix_hard`: the source first augmented (colour jitter, blur, grey, solarise, autocontrast, flips) and an
  object segment shrunk (U(0.75, 1)), rotated (U(-10, 10) degrees) and pasted at a random place; a background
  segment is pasted in place (`segmix_hard`);
- `segmix_resized`: object segments only, shrunk more (U(0.5, 1)), always moved (`segmix_resized`);
- `diagonal`: one side of a diagonal split of the source kept, the other side filled by a diffusion model;
- `patch`: a small square patch of the source kept (a quarter to two fifths of the side), the rest filled.

Segments come from masks in the VOC layout when given (`masks=<folder>`: a PNG per source with the same stem,
0 = background, 255 = void, other values objects), otherwise from Felzenszwalb's graph segmentation of the
source (scikit-image; no weights to download, and it returns a few large regions at these sizes, where SLIC
returns a grid of superpixels that are not objects); its largest region plays VOC's background.

The fill of the inpainting kinds is a real diffusion model (`src.nn.inpainting`): a DDPM trained by the project
with diffusers' RePaint scheduler on a CPU, or a diffusers inpainting pipeline from a local directory.

Content: `source=embedded` (the held-out photo cells and the LFW faces of `src.data.planted_copies`) or any image
folder. Each image is a source (its copies are made), a background (the canvas of segmix copies, never in the
database) or a distractor (in the database, copied by nothing). Layout (the Forgery code's evaluation layout: one
folder per source, its first file the query, then up to four copies)::

    <kind>_s{seed}_px{size}_c{copies}_<content and fill key>/
        sources/<id>/0_query.png, 1.png, ..., <copies>.png
        distractors/<id>.png
        meta.json

`load_copy_folders` reads that layout from any folder, so sets made elsewhere score the same way.
"""

import hashlib
import logging
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.data.images import build_atomically, list_images, load_rgb
from src.data.style.retrieval import RetrievalSet

log = logging.getLogger(__name__)

VERSION = "v1"
SEGMIX_KINDS = ("segmix", "segmix_hard", "segmix_resized")
INPAINT_KINDS = ("diagonal", "patch")
KINDS = SEGMIX_KINDS + INPAINT_KINDS
MAX_COPIES = 4  # the Forgery code's `numvals`
BACKGROUND, VOID = 0, -1
# Shares of the content: sources, then backgrounds (segmix canvases); the rest are distractors.
SOURCE_SHARE, BACKGROUND_SHARE = 0.5, 0.25
PATCH_SIDE = (0.25, 0.4)


def segment(image: Image.Image, min_share: float = 0.04) -> np.ndarray:
    """(H, W) int labels of `image` from Felzenszwalb's segmentation (regions of at least `min_share` of the
    image), relabelled so that the largest region is 0 (the background) and the others 1, 2, ..."""
    from skimage.segmentation import felzenszwalb

    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    h, w = array.shape[:2]
    raw = felzenszwalb(array, scale=max(h, w), sigma=0.8, min_size=max(1, int(min_share * h * w)))
    values, counts = np.unique(raw, return_counts=True)
    order = values[np.argsort(-counts, kind="stable")]
    labels = np.empty_like(raw)
    for new, old in enumerate(order):
        labels[raw == old] = new
    return labels.astype(np.int64)


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A VOC-style mask (0 background, 255 void, other values objects) as (H, W) labels at `size`, void -> -1."""
    mask = Image.open(path)
    if mask.mode not in ("P", "L", "I", "I;16"):
        raise ValueError(
            f"{path}: a segmentation mask must be a one-channel PNG of class ids (mode P or L), not mode "
            f"{mask.mode}; save the class ids, not a coloured rendering."
        )
    labels = np.asarray(mask.resize(size, Image.Resampling.NEAREST), dtype=np.int64)
    return np.where(labels == 255, VOID, labels)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor.clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.round(array * 255).astype(np.uint8))


def _augment(source: torch.Tensor, solarize: float, autocontrast: float) -> torch.Tensor:
    """The Forgery code's augmentation of a pasted source (torchvision, on [0, 1] tensors, torch's RNG)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.GaussianBlur(kernel_size=5, sigma=(0.1, 4.0)),
            T.RandomGrayscale(p=0.3),
            T.RandomSolarize(threshold=solarize),
            T.RandomAutocontrast(p=autocontrast),
        ]
    )(source)


def segmix_copy(
    source: Image.Image, labels: np.ndarray, background: Image.Image, kind: str, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """One segmix copy of `source` on `background` (resized to the source's size) and the (H, W) bool mask of the
    copy's pixels that came from the source. `labels`: the source's segments (0 background, -1 void)."""
    from torchvision.transforms import functional as TF

    size = source.size
    canvas = _to_tensor(background.resize(size, Image.Resampling.BICUBIC))
    src = _to_tensor(source)
    classes = [
        int(c) for c in np.unique(labels) if c != VOID and (kind != "segmix_resized" or c != BACKGROUND)
    ]
    if not classes:
        raise ValueError(
            f"segmix: the source has no {'object ' if kind == 'segmix_resized' else ''}segment to paste"
        )
    c = int(rng.choice(classes))
    mask = torch.from_numpy(labels == c)
    if kind == "segmix":
        canvas[:, mask] = src[:, mask]
        return _to_image(canvas), mask.numpy()
    hard = kind == "segmix_hard"
    with torch.random.fork_rng():
        torch.manual_seed(int(rng.integers(1 << 62)))
        src = _augment(src, solarize=0.9 if hard else 0.8, autocontrast=0.3 if hard else 0.5)
    seg = torch.from_numpy(labels).float()[None]
    if rng.uniform() >= 0.5:
        src, seg = src.flip(-1), seg.flip(-1)
    if rng.uniform() >= 0.8:
        src, seg = src.flip(-2), seg.flip(-2)
    if hard and c == BACKGROUND:  # the background is pasted where it is
        mask = seg[0] == c
        canvas[:, mask] = src[:, mask]
        return _to_image(canvas), mask.numpy()
    low = 0.75 if hard else 0.5
    ratio = rng.uniform(low, 1.0)
    new = (max(1, int(src.shape[1] * ratio)), max(1, int(src.shape[2] * ratio)))
    src = TF.resize(src, list(new), antialias=True)
    seg = TF.resize(seg, list(new), interpolation=TF.InterpolationMode.NEAREST)
    angle = float(rng.uniform(-10, 10))
    src = TF.rotate(src, angle, expand=True)
    seg = TF.rotate(seg, angle, expand=True, fill=float(VOID))
    keep = seg[0] == c
    ys, xs = torch.nonzero(keep, as_tuple=True)
    if len(ys) == 0:  # the segment vanished in the resize: paste in place instead
        mask = torch.from_numpy(labels == c)
        canvas[:, mask] = _to_tensor(source)[:, mask]
        return _to_image(canvas), mask.numpy()
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    piece, keep = src[:, y0:y1, x0:x1], keep[y0:y1, x0:x1]
    h, w = canvas.shape[1:]
    top = int(rng.integers(0, max(1, h - piece.shape[1] + 1)))
    left = int(rng.integers(0, max(1, w - piece.shape[2] + 1)))
    piece, keep = piece[:, : h - top, : w - left], keep[: h - top, : w - left]
    out_mask = torch.zeros(h, w, dtype=torch.bool)
    out_mask[top : top + keep.shape[0], left : left + keep.shape[1]] = keep
    region = canvas[:, top : top + keep.shape[0], left : left + keep.shape[1]]
    region[:, keep] = piece[:, keep]
    return _to_image(canvas), out_mask.numpy()


def diagonal_keep(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: the pixels kept from the source, one side of a diagonal (either diagonal, either side,
    drawn at random); the other side is filled."""
    y, x = np.mgrid[:size, :size]
    side = (x + y < size - 1) if rng.uniform() < 0.5 else (x > y)
    return side if rng.uniform() < 0.5 else ~side


def patch_keep(size: int, rng: np.random.Generator, share=PATCH_SIDE) -> np.ndarray:
    """(size, size) bool: a square patch of the source kept (side U(share) of the image's, placed at random)."""
    side = max(1, int(round(size * rng.uniform(*share))))
    top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    keep = np.zeros((size, size), dtype=bool)
    keep[top : top + side, left : left + side] = True
    return keep


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha1()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _content(source: str, image_size: int) -> tuple[list[tuple[str, Image.Image]], str]:
    if source == "embedded":
        from src.data.planted_copies import held_out_content

        return held_out_content(image_size), "embedded"
    folder = Path(source)
    paths = list_images(folder)
    content = []
    for path in paths:
        image = load_rgb(path)
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        square = image.crop((left, top, left + side, top + side))
        content.append((path.stem, square.resize((image_size, image_size), Image.Resampling.BICUBIC)))
    return content, f"folder{_fingerprint(paths)}"


def _roles(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    order = rng.permutation(n)
    cut = np.cumsum([round(SOURCE_SHARE * n), round(BACKGROUND_SHARE * n)])
    return {"source": order[: cut[0]], "background": order[cut[0] : cut[1]], "distractor": order[cut[1] :]}


def build_partial_copies(
    root,
    kind: str,
    source: str = "embedded",
    seed: int = 0,
    image_size: int = 64,
    copies: int = MAX_COPIES,
    masks: str | None = None,
    fill: dict | None = None,
    max_sources: int | None = None,
    force: bool = False,
    filler=None,
) -> Path:
    """Write one partial-copy set under `root` (or reuse a complete build with the same content key) and return
    its folder. fill: `src.nn.inpainting.build_fill` arguments, needed by the inpainting kinds. max_sources: at
    most this many sources (the first of the seeded draw; the others become distractors), to bound the cost of
    a diffusion fill. filler: a fill already built (e.g. a `RePaintFill` of a module in memory) used instead of
    building one from `fill`; the key then also covers its UNet's weights."""
    if kind not in KINDS:
        raise ValueError(f"partial copies: kind={kind!r}; expected one of {KINDS}")
    if not 1 <= copies <= MAX_COPIES:
        raise ValueError(
            f"partial copies: copies={copies}; the layout holds 1 to {MAX_COPIES} copies per source"
        )
    if image_size < 16:
        raise ValueError(f"partial copies: image_size must be at least 16 px; got {image_size}")
    if kind in INPAINT_KINDS and not fill:
        raise ValueError(
            f"partial copies: kind={kind} fills the image with a diffusion model: give benchmark.fill "
            "(kind: repaint with a DDPM checkpoint of this project, or kind: diffusers with an inpainting "
            "pipeline directory; conf/benchmark/copy_diagonal.yaml)."
        )
    content, content_key = _content(source, image_size)
    rng = np.random.default_rng([seed, 14])
    roles = _roles(len(content), rng)
    if max_sources is not None and len(roles["source"]) > max_sources:
        roles["distractor"] = np.concatenate([roles["distractor"], roles["source"][max_sources:]])
        roles["source"] = roles["source"][:max_sources]
    if len(roles["source"]) == 0 or (kind in SEGMIX_KINDS and len(roles["background"]) == 0):
        raise ValueError(
            f"partial copies: {source} holds {len(content)} images; a set needs at least 4 (sources, backgrounds "
            "and distractors). Add images to the folder."
        )
    from src.nn.inpainting import fill_key

    key = content_key
    if masks:
        key += f"_masks{_fingerprint(list_images(masks))}"
    if kind in INPAINT_KINDS:
        key += f"_{fill_key(fill)}"
        if filler is not None:
            from src.utils.checkpoints import state_digest

            key += state_digest(filler.unet)[:10]
    limit = "" if max_sources is None else f"_n{max_sources}"
    name = f"{kind}_s{seed}_px{image_size}_c{copies}{limit}_{key}_{VERSION}"

    def write(tmp: Path) -> dict:
        (tmp / "distractors").mkdir()
        for i in roles["distractor"]:
            content[i][1].save(tmp / "distractors" / f"{content[i][0]}.png")
        sources = [content[i] for i in roles["source"]]
        segments, no_segment = {}, []
        if kind in SEGMIX_KINDS:
            for key_, image in sources:
                labels = read_mask(Path(masks) / f"{key_}.png", image.size) if masks else segment(image)
                usable = [
                    c
                    for c in np.unique(labels)
                    if c != VOID and (kind != "segmix_resized" or c != BACKGROUND)
                ]
                if usable:
                    segments[key_] = labels
                else:  # nothing to paste (a flat image; no object for segmix_resized): a distractor instead
                    no_segment.append(key_)
                    image.save(tmp / "distractors" / f"{key_}.png")
            if no_segment:
                log.warning(
                    "partial copies: %d sources without a segment to paste became distractors",
                    len(no_segment),
                )
            sources = [(key_, image) for key_, image in sources if key_ in segments]
        for key_, image in sources:
            folder = tmp / "sources" / key_
            folder.mkdir(parents=True)
            image.save(folder / "0_query.png")
        if kind in SEGMIX_KINDS:
            backgrounds = [content[i][1] for i in roles["background"]]
            for key_, image in sources:
                labels = segments[key_]
                for j in range(1, copies + 1):
                    background = backgrounds[int(rng.integers(len(backgrounds)))]
                    segmix_copy(image, labels, background, kind, rng)[0].save(
                        tmp / "sources" / key_ / f"{j}.png"
                    )
        else:
            from src.nn.inpainting import build_fill

            fill_images = filler if filler is not None else build_fill(**fill)
            jobs = []
            for key_, image in sources:
                for j in range(1, copies + 1):
                    keep = (
                        diagonal_keep(image_size, rng) if kind == "diagonal" else patch_keep(image_size, rng)
                    )
                    jobs.append(
                        (tmp / "sources" / key_ / f"{j}.png", image, keep, int(rng.integers(1 << 31)))
                    )
            filled = fill_images([j[1] for j in jobs], [j[2] for j in jobs], [j[3] for j in jobs])
            for (path, *_), image in zip(jobs, filled, strict=True):
                image.save(path)
        log.info("partial copies: wrote %s (%d sources x %d copies)", name, len(sources), copies)
        return {
            "name": name,
            "kind": kind,
            "source": str(source),
            "seed": seed,
            "image_size": image_size,
            "copies": copies,
            "masks": str(masks) if masks else None,
            "fill": fill,
            "max_sources": max_sources,
            "counts": {role: len(index) for role, index in roles.items()},
            "sources_without_segment": no_segment,
            "versions": {p: metadata.version(p) for p in ("scikit-image", "pillow", "numpy", "torch")},
        }

    return build_atomically(root, name, write, force)


def load_copy_folders(folder) -> RetrievalSet:
    """A set in the Forgery evaluation layout as a `RetrievalSet` (task `partial_copy`): each folder of
    `<folder>/sources/` is a source, its first file (in name order) the query and the rest its copies in the
    database; `<folder>/distractors/` (optional) adds database images copied by nothing."""
    folder = Path(folder)
    groups = (
        sorted(p for p in (folder / "sources").iterdir() if p.is_dir())
        if (folder / "sources").is_dir()
        else []
    )
    if not groups:
        raise FileNotFoundError(
            f"{folder}: no source folders under {folder / 'sources'}; the layout is sources/<id>/ with the query "
            "first and its copies after it (src/data/partial_copies.py)."
        )
    query, database, q_label, d_label, empty = [], [], [], [], []
    for column, group in enumerate(groups):
        files = [p.relative_to(folder).as_posix() for p in list_images(group)]
        if len(files) < 2:
            empty.append(group.name)
            continue
        query.append(files[0])
        q_label.append(column)
        database.extend(files[1:])
        d_label.extend([column] * (len(files) - 1))
    if empty:
        log.warning("partial copies: %d source folders without copies left out: %s", len(empty), empty[:5])
    distractors = (
        [p.relative_to(folder).as_posix() for p in list_images(folder / "distractors")]
        if (folder / "distractors").is_dir()
        else []
    )
    database += distractors
    names = [g.name for g in groups]
    query_labels = torch.zeros(len(query), len(names), dtype=torch.bool)
    query_labels[torch.arange(len(query)), torch.tensor(q_label)] = True
    database_labels = torch.zeros(len(database), len(names), dtype=torch.bool)
    database_labels[torch.arange(len(d_label)), torch.tensor(d_label)] = True
    return RetrievalSet(
        root=folder,
        query=query,
        database=database,
        query_labels=query_labels,
        database_labels=database_labels,
        label_names=names,
        num_dropped_queries=len(empty),
        task="partial_copy",
    )


def load_partial_copies(root, kind: str, **kwargs) -> RetrievalSet:
    """`conf/benchmark/copy_*.yaml`: the set (built on first use) ready to score."""
    return load_copy_folders(build_partial_copies(root, kind, **kwargs))
