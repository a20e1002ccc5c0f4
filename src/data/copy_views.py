"""Training data of the copy descriptor: two strongly augmented views of each image (SSCD's "advanced"
augmentations, docs/replication.md#a-copy-descriptor-trained-here), and the planted-copy benchmark to validate on.

The augmentations, in SSCD's order (official `sscd/transforms/settings.py`, at 224 px there; sizes here are
relative to the image so they hold at any resolution):

1. horizontal flip, p 0.5;  2. rotation by 90 / 180 / 270 degrees, p 0.05;
3. text overlay, p 0.1: random printable characters in PIL's default font, size 10-30% of the short side, random
   colour, opacity 0.1-1 (SSCD draws AugLy's Noto fonts, which are not installed here);
4. emoji-like overlay, p 0.2: a random filled shape (ellipse, polygon or star, random colours, a dark outline
   and "eyes" half the time) of 10-50% of the short side, opacity 0.7-1 (SSCD draws Twemoji through AugLy);
5. free rotation 0-359 degrees, p 0.05;  6. random resized crop to `image_size`, scale 0.08-1;
7. colour jitter (brightness 0.8, contrast 0.8, saturation 0.8, hue 0.2), p 0.8;  8. grayscale, p 0.2;
9. Gaussian blur, p 0.5, radius U(1, 5) px at 224 px, scaled to `image_size`;
10. JPEG, p 0.2, quality U{0..100}.

Without `root` the images are built from what is installed: random crops of the photographs the style benchmark
deals to its train group only (`build_photo_crops`; the planted-copy benchmark is built from the other
photographs and the faces, so it is never trained on) and procedural "dead leaves" pictures (`build_dead_leaves`),
which add the variety that ten photographs lack.
"""

import logging
import math
import random
import string
from importlib import metadata
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import DataLoader
from torchvision import transforms as T

from src.data.images import (
    ImageListDataset,
    build_atomically,
    collate_skip_none,
    for_ranks,
    jpeg_roundtrip,
    list_images,
)
from src.data.style.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

log = logging.getLogger(__name__)

CROPS_VERSION = "v1"


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def overlay_text(image: Image.Image, rng: random.Random) -> Image.Image:
    """Random printable characters at a random place, size 10-30% of the short side, opacity 0.1-1."""
    w, h = image.size
    size = max(6, int(rng.uniform(0.1, 0.3) * min(w, h)))
    font = ImageFont.load_default(size=size)
    text = "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation) for _ in range(12))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    length = rng.randint(1, 12)
    while length > 1 and draw.textlength(text[:length], font=font) > w:
        length -= 1
    text = text[:length]
    box = draw.textbbox((0, 0), text, font=font)
    x = rng.uniform(0, max(0, w - (box[2] - box[0])))
    y = rng.uniform(0, max(0, h - (box[3] - box[1])))
    draw.text(
        (x - box[0], y - box[1]), text, font=font, fill=(*_random_colour(rng), int(255 * rng.uniform(0.1, 1)))
    )
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def overlay_shape(image: Image.Image, rng: random.Random) -> Image.Image:
    """An emoji-like sticker: a filled ellipse, polygon or star of 10-50% of the short side, opacity 0.7-1."""
    w, h = image.size
    side = max(4, int(rng.uniform(0.1, 0.5) * min(w, h)))
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    alpha = int(255 * rng.uniform(0.7, 1))
    fill, outline = (*_random_colour(rng), alpha), (0, 0, 0, alpha) if rng.random() < 0.5 else None
    kind = rng.choice(("ellipse", "polygon", "star"))
    if kind == "ellipse":
        draw.ellipse((x0, y0, x0 + side, y0 + side), fill=fill, outline=outline)
    else:
        n = rng.randint(3, 8)
        cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
        points = []
        for i in range(2 * n if kind == "star" else n):
            radius = r * (0.45 if kind == "star" and i % 2 else 1.0)
            angle = math.pi * i / n if kind == "star" else 2 * math.pi * i / n
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill, outline=outline)
    if outline is not None and side >= 12:  # eyes
        for dx in (-side / 6, side / 6):
            cx, cy, e = x0 + side / 2 + dx, y0 + side * 0.4, max(1, side / 14)
            draw.ellipse((cx - e, cy - e, cx + e, cy + e), fill=(0, 0, 0, alpha))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def paste_onto(image: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    """`image` shrunk to 40-80% of its side and pasted at a random place on `background` (resized to the image's
    size): a partial copy, the kind of the copy-detection sets of "Diffusion Art or Digital Forgery"."""
    w, h = image.size
    canvas = background.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    scale = rng.uniform(0.4, 0.8)
    small = image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
    canvas.paste(small, (rng.randint(0, w - small.width), rng.randint(0, h - small.height)))
    return canvas


def add_noise(image: Image.Image, std: float, rng: random.Random) -> Image.Image:
    """Gaussian pixel noise of `std` (in [0, 1] units), clipped: the grain of an imperfect generated copy."""
    x = np.asarray(image, dtype=np.float32) / 255
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, std, x.shape).astype(np.float32)
    return Image.fromarray(np.round(np.clip(x + noise, 0, 1) * 255).astype(np.uint8))


class CopyAugment:
    """One view of SSCD's "advanced" augmentations (module docstring): PIL RGB image -> (3, S, S) normalised.

    Randomness comes from Python's `random` (seeded per DataLoader worker by torch), as in the official code.
    """

    def __init__(
        self,
        image_size: int = 64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_scale=(0.08, 1.0),
        paste_p: float = 0.0,
        noise_p: float = 0.0,
    ):
        self.image_size = int(image_size)
        self.paste_p = float(paste_p)
        self.noise_p = float(noise_p)
        self.crop = T.RandomResizedCrop(self.image_size, scale=tuple(crop_scale))
        self.jitter = T.ColorJitter(0.8, 0.8, 0.8, 0.2)
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.blur_scale = self.image_size / 224  # SSCD's blur radii are in pixels of a 224-px crop

    def __call__(self, image: Image.Image, background=None) -> torch.Tensor:
        """background: None, or a callable giving the image to paste onto (read only when the paste is drawn;
        an unreadable one, None, leaves the image as it is). With paste_p 0 nothing is drawn for it."""
        rng = random
        if self.paste_p > 0 and background is not None and rng.random() < self.paste_p:
            canvas = background()
            image = image if canvas is None else paste_onto(image, canvas, rng)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.05:
            image = image.rotate(rng.choice((90, 180, 270)), resample=Image.Resampling.BILINEAR)
        if rng.random() < 0.1:
            image = overlay_text(image, rng)
        if rng.random() < 0.2:
            image = overlay_shape(image, rng)
        if rng.random() < 0.05:
            image = image.rotate(rng.randint(0, 359), resample=Image.Resampling.BILINEAR)
        image = self.crop(image)
        if rng.random() < 0.8:
            image = self.jitter(image)
        if rng.random() < 0.2:
            image = image.convert("L").convert("RGB")
        if rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1, 5) * self.blur_scale))
        if self.noise_p > 0 and rng.random() < self.noise_p:
            image = add_noise(image, rng.uniform(0.02, 0.1), rng)
        if rng.random() < 0.2:
            image = jpeg_roundtrip(image, rng.randint(0, 100))
        return self.finish(image)


def build_photo_crops(
    root, count: int = 2000, image_size: int = 96, seed: int = 0, force: bool = False
) -> Path:
    """`count` random square crops (25-90% of the short side, flipped at random) of the style benchmark's
    train-group photographs at `image_size` px, written once under `root`; returns the image folder."""
    from src.data.embedded.style_bench import assign_photos, load_photo, random_crop

    name = f"photo_crops_s{seed}_px{image_size}_n{count}_{CROPS_VERSION}"

    def write(tmp: Path) -> dict:
        names = assign_photos(0)["train"]
        rng = np.random.default_rng([seed, 23])
        (tmp / "images").mkdir()
        for i in range(count):
            photo = names[i % len(names)]
            crop, _ = random_crop(load_photo(photo), image_size, rng)
            Image.fromarray(np.round(crop * 255).astype(np.uint8)).save(
                tmp / "images" / f"{photo}_{i:05d}.png"
            )
        log.info("photo crops: wrote %s (%d crops of %d photos)", name, count, len(names))
        return {
            "name": name,
            "photos": names,
            "count": count,
            "image_size": image_size,
            "seed": seed,
            "versions": {p: metadata.version(p) for p in ("scikit-image", "pillow", "numpy")},
        }

    return build_atomically(root, name, write, force) / "images"


def build_photo_cells(root, image_size: int = 96, force: bool = False) -> Path:
    """The train-group photographs cut into non-overlapping cells (a fifth of the short side, as the planted
    copies cut the other photographs), written once under `root`; returns the image folder. Unlike random crops,
    no two cells share pixels, so no negative of the contrastive loss is a copy of its anchor."""
    from src.data.embedded.style_bench import assign_photos
    from src.data.planted_copies import photo_cells

    name = f"photo_cells_px{image_size}_{CROPS_VERSION}"

    def write(tmp: Path) -> dict:
        names = assign_photos(0)["train"]
        (tmp / "images").mkdir()
        cells = photo_cells(sorted(names), image_size)
        for key, cell in cells:
            cell.save(tmp / "images" / f"{key}.png")
        log.info("photo cells: wrote %s (%d cells of %d photos)", name, len(cells), len(names))
        return {"name": name, "photos": names, "count": len(cells), "image_size": image_size}

    return build_atomically(root, name, write, force) / "images"


def dead_leaves_image(size: int, rng: np.random.Generator) -> Image.Image:
    """A "dead leaves" picture: opaque discs, rectangles and triangles of power-law sizes dropped on top of each
    other, each a flat colour, a colour gradient or colour stripes (the images of Baradad et al. 2021, "Learning to
    See by Looking at Noise", as procedural content with natural-image-like statistics)."""
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(int(rng.integers(40, 120))):
        radius = size * 0.5 * (0.03 / 0.5) ** rng.random()  # log-uniform from 3% to 50% of the side
        cx, cy = rng.uniform(-0.1, 1.1, 2) * size
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        elif kind == 1:
            w, h = radius * rng.uniform(0.5, 1.5, 2)
            draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=255)
        else:
            angles = rng.uniform(0, 2 * np.pi, 3)
            draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=255)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        fill = rng.integers(3)
        if fill == 0:
            paint = np.broadcast_to(a, (size, size, 3))
        else:
            angle = rng.uniform(0, np.pi)
            t = np.cos(angle) * xx + np.sin(angle) * yy
            if fill == 2:  # stripes
                t = 0.5 + 0.5 * np.sin(2 * np.pi * t * rng.uniform(3, 12))
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            paint = a * (1 - t[..., None]) + b * t[..., None]
        layer = Image.fromarray(np.asarray(paint, dtype=np.uint8))
        image.paste(layer, (0, 0), mask)
    return image


def build_dead_leaves(
    root, count: int = 2000, image_size: int = 96, seed: int = 0, force: bool = False
) -> Path:
    """`count` dead-leaves pictures (`dead_leaves_image`) written once under `root`; returns the image folder."""
    name = f"dead_leaves_s{seed}_px{image_size}_n{count}_{CROPS_VERSION}"

    def write(tmp: Path) -> dict:
        rng = np.random.default_rng([seed, 29])
        (tmp / "images").mkdir()
        for i in range(count):
            dead_leaves_image(image_size, rng).save(tmp / "images" / f"leaves_{i:05d}.png")
        log.info("dead leaves: wrote %s", name)
        return {"name": name, "count": count, "image_size": image_size, "seed": seed}

    return build_atomically(root, name, write, force) / "images"


class TwoViews(ImageListDataset):
    """Item: {"views": (2, 3, S, S) two independent augmentations of image i, "index": i}. Each view gets a random
    other image of the set as the background of the paste augmentation (`CopyAugment.paste_p`).

    reference: None (SSCD: both views augmented) or a transform for the first view (the image as a copy detector
    indexes it), so every positive pair is an original and an edited copy of it."""

    def __init__(self, root, paths, transform, reference=None):
        super().__init__(root, paths, transform)
        self.reference = reference

    def _background(self) -> Image.Image | None:
        """A random image of the set (None when unreadable), drawn when a view pastes onto another image."""
        return self.load(random.randrange(len(self)))

    def __getitem__(self, index: int) -> dict | None:
        image = self.load(index)
        if image is None:
            return None
        background = self._background if len(self) > 1 else None
        if self.reference is not None:
            views = [self.reference(image), self.transform(image, background)]
        else:
            views = [self.transform(image, background) for _ in range(2)]
        return {"views": torch.stack(views), "index": index}


class CopyDataModule(L.LightningDataModule):
    """Images to train a copy descriptor on (`root`, any folder, searched recursively; or, when null, the
    `embedded` sets: `photos`, the crops of the train-group photographs, and `dead_leaves`, procedural pictures)
    and the planted-copy benchmark to validate and test on (`src.data.planted_copies`)."""

    def __init__(
        self,
        root: str | None = None,
        data_dir: str = "data",
        embedded: tuple[str, ...] = ("photos", "dead_leaves"),
        crops: int = 2000,
        dead_leaves: int = 2000,
        crops_image_size: int = 96,
        image_size: int = 64,
        crop_scale=(0.08, 1.0),
        paste_p: float = 0.0,
        noise_p: float = 0.0,
        views: str = "symmetric",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        benchmark_seed: int = 0,
        benchmark_image_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        if views not in ("symmetric", "reference"):
            raise ValueError(f"data.views={views!r}: expected 'symmetric' (SSCD) or 'reference'.")
        self.save_hyperparameters()
        self.val_set = self.test_set = None

    def _folders(self) -> list[Path]:
        hp = self.hparams
        if hp.root is not None:
            return [Path(hp.root).expanduser()]
        builders = {
            "photos": lambda: build_photo_crops(hp.data_dir, hp.crops, hp.crops_image_size, hp.seed),
            "photo_cells": lambda: build_photo_cells(hp.data_dir, hp.crops_image_size),
            "dead_leaves": lambda: build_dead_leaves(
                hp.data_dir, hp.dead_leaves, hp.crops_image_size, hp.seed
            ),
        }
        unknown = set(hp.embedded) - set(builders)
        if unknown or not hp.embedded:
            raise ValueError(
                f"data.embedded={list(hp.embedded)}: expected a non-empty list of {sorted(builders)}."
            )
        return [builders[name]() for name in hp.embedded]

    def prepare_data(self) -> None:
        from src.data.planted_copies import build_planted_copies

        self._folders()
        build_planted_copies(
            self.hparams.data_dir, self.hparams.benchmark_seed, self.hparams.benchmark_image_size
        )

    def setup(self, stage: str | None = None) -> None:
        from src.data.planted_copies import load_planted_copies

        hp = self.hparams
        folders = self._folders()
        paths = [path for folder in folders for path in list_images(folder)]
        folder = ", ".join(str(f) for f in folders)
        if len(paths) < 2:
            raise ValueError(
                f"data.root={folder} holds {len(paths)} images; the contrastive loss needs at least 2 (and a "
                f"full batch of data.batch_size={hp.batch_size})."
            )
        if len(paths) < hp.batch_size:
            raise ValueError(
                f"data.batch_size={hp.batch_size} is larger than the {len(paths)} images in {folder}; lower "
                "data.batch_size or add images."
            )
        self.indexed = eval_transform(hp.image_size, hp.mean, hp.std)  # an image as the descriptor indexes it
        reference = self.indexed if hp.views == "reference" else None
        self.train_dataset = TwoViews(
            "/",
            paths,
            CopyAugment(hp.image_size, hp.mean, hp.std, hp.crop_scale, hp.paste_p, hp.noise_p),
            reference,
        )
        self.val_set = self.test_set = load_planted_copies(
            hp.data_dir, hp.benchmark_seed, hp.benchmark_image_size
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            for_ranks(
                self.train_dataset, self.trainer
            ),  # under DDP unreadable images are replaced, not skipped
            batch_size=hp.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate_skip_none,
        )

    def _eval_loader(self, rset) -> DataLoader:
        hp = self.hparams
        dataset = ImageListDataset(rset.root, rset.query + rset.database, self.indexed)
        return DataLoader(dataset, batch_size=hp.eval_batch_size, num_workers=0, collate_fn=collate_skip_none)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
