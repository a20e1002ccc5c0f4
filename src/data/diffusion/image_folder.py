"""Unconditional diffusion data: an image folder, a seeded nested training subset and a held-out control set.

The memorization study of "Diffusion Art or Digital Forgery" (docs/memorization.md#ddpm-on-nested-subsets)
trains DDPMs on 300 / 3,000 / 30,000 CelebA-HQ images and compares their generations with what they saw.
`select_subsets` fixes a seeded order of the folder's files: the training subset is the first `subset_size`
usable files of that order and the control set the last `control_size`, so the 300 lie inside the 3,000 inside
the 30,000, and the control images are never trained on by any subset size (when the folder is larger than the
largest subset plus the control set). The selection is written to `<run>/subset_index.json` and stored in
every checkpoint, so the replication analysis compares against exactly the trained images and a resume refuses
another selection. The captioned data (`src.data.diffusion.captioned`) selects its subset and control set with
the same function.
"""

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.images import (
    EpochRandomSampler,
    ImageListDataset,
    UnreadableImage,
    collate_skip_none,
    folder_files,
    for_ranks,
    load_rgb,
)

log = logging.getLogger(__name__)


def _unusable_reason(path: Path) -> str | None:
    """None when the file decodes fully to RGB (`load_rgb`, exactly as training reads it), else why not."""
    try:
        load_rgb(path)
    except UnreadableImage as error:
        return error.reason
    except Exception as error:  # noqa: BLE001 - a decoder failure outside load_rgb's list skips the file too
        return f"{type(error).__name__}: {error}"
    return None


def select_subsets(
    root, subset_size: int | None, control_size: int = 0, seed: int = 0, files: list[str] | None = None
) -> dict:
    """The nested training subset and the control set of the image folder `root`.

    Returns {"root", "seed", "subset_size", "control_size", "num_files", "train": [relative paths],
    "control": [relative paths], "skipped": [{"path", "reason"}]}. The candidates are `files` (paths relative to
    `root`) or else every image of the folder, sorted; they are taken in the order of a permutation seeded with
    `seed`: the training subset is the first `subset_size` usable files of that order, the control set the last
    `control_size` ones. A file is usable when it decodes fully (`load_rgb`, as training reads it, under a
    progress bar), so the selection holds only images training really uses; unusable files met on the way are
    skipped and listed. `subset_size=None` trains on every usable file outside the control set. The control set
    holds fewer files (with a warning) when the subset leaves fewer. Raises ValueError naming the numbers when
    there are fewer (usable) files than subset_size.
    """
    root = Path(root)
    files = folder_files(root) if files is None else list(files)
    if (subset_size is not None and subset_size < 1) or control_size < 0:
        raise ValueError(f"subset_size must be >= 1 and control_size >= 0; got {subset_size}, {control_size}")
    if subset_size is not None and subset_size > len(files):
        raise ValueError(
            f"data.subset_size={subset_size} is larger than the folder '{root}', which holds {len(files)} images; "
            "lower data.subset_size or point data.root at a larger folder"
        )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    skipped, train, control = [], [], []
    to_check = len(files) if subset_size is None else min(len(files), subset_size + control_size)
    progress = tqdm(total=to_check, desc="checking images", unit="image", leave=False, disable=to_check < 200)

    def take(position: int, chosen: list) -> None:
        path = files[order[position]]
        reason = _unusable_reason(root / path)
        (skipped.append({"path": path, "reason": reason}) if reason else chosen.append(path))
        if reason:  # one more file to check in place of the skipped one
            progress.total = min(len(files), progress.total + 1)
        progress.update()

    front, back = 0, len(order) - 1
    if subset_size is None:  # the control set first, then every usable file before it
        while len(control) < control_size and front <= back:
            take(back, control)
            back -= 1
        while front <= back:
            take(front, train)
            front += 1
    else:
        while len(train) < subset_size and front <= back:
            take(front, train)
            front += 1
        while len(control) < control_size and front <= back:
            take(back, control)
            back -= 1
    progress.close()
    if len(train) < (subset_size or 1):
        raise ValueError(
            f"the folder '{root}' has {len(files)} images but {len(skipped)} are unreadable (e.g. {skipped[:3]}), "
            f"leaving fewer than data.subset_size={subset_size or 1} usable ones"
        )
    if len(control) < control_size:
        log.warning(
            "control set: %d held-out images instead of data.control_size=%d (the training subset takes the rest "
            "of the %d images of %s)",
            len(control),
            control_size,
            len(files),
            root,
        )
    if skipped:
        log.warning(
            "skipped %d unreadable image(s) of %s while selecting the subset: %s",
            len(skipped),
            root,
            skipped[:5],
        )
    return {
        "root": str(root),
        "seed": seed,
        "subset_size": subset_size,
        "control_size": control_size,
        "num_files": len(files),
        "train": train,
        "control": control,
        "skipped": skipped,
    }


def diffusion_transform(image_size: int, random_flip: bool = True) -> T.Compose:
    """Resize the short side, centre-crop, optional horizontal flip, scale to [-1, 1] (the DDPM convention)."""
    steps = [
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(image_size),
    ]
    if random_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize([0.5], [0.5])])


def fingerprint(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


class ImageFolderDataModule(L.LightningDataModule):
    """Training subset and control set of an image folder (see `select_subsets`) for unconditional diffusion.

    root: the image folder (recursive), or the string "embedded_faces" for the 100 faces shipped with
    scikit-image, written under `data_dir` on first use (src/data/embedded/faces.py).
    samples_per_epoch: images drawn per epoch (without replacement, repeating the subset as often as needed), so a
    300-image subset and a 30,000-image subset see the same number of images per epoch; null: max(subset, 100
    batches). Training length is set by `trainer.max_steps`.
    index_file: where the selection is written (the run directory's subset_index.json).
    """

    def __init__(
        self,
        root: str,
        subset_size: int,
        control_size: int = 0,
        subset_seed: int = 0,
        image_size: int = 64,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        samples_per_epoch: int | None = None,
        index_file: str | None = None,
        data_dir: str | None = None,
        pin_memory: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.index: dict | None = None

    @property
    def root(self) -> Path:
        if self.hparams.root == "embedded_faces":
            from src.data.embedded.faces import build_embedded_faces

            if self.hparams.data_dir is None:
                raise ValueError("data.root=embedded_faces needs data.data_dir to build the faces in")
            return build_embedded_faces(self.hparams.data_dir, image_size=self.hparams.image_size)
        return Path(self.hparams.root)

    def prepare_data(self) -> None:
        self.root  # noqa: B018 - builds the embedded faces once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        hp = self.hparams
        self.index = select_subsets(self.root, hp.subset_size, hp.control_size, hp.subset_seed)
        if hp.index_file and (self.trainer is None or self.trainer.is_global_zero):
            path = Path(hp.index_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.index, indent=1))
        log.info(
            "training subset: %d of %d images of %s (seed %d), control set: %d images",
            len(self.index["train"]),
            self.index["num_files"],
            self.index["root"],
            hp.subset_seed,
            len(self.index["control"]),
        )

    @property
    def train_files(self) -> list[str]:
        self.setup()
        return self.index["train"]

    @property
    def control_files(self) -> list[str]:
        self.setup()
        return self.index["control"]

    def image_transform(self) -> T.Compose:
        """The training transform without its random flip: the images as the model saw them, in [-1, 1]."""
        return diffusion_transform(self.hparams.image_size, random_flip=False)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = ImageListDataset(
            self.root, self.train_files, diffusion_transform(hp.image_size, hp.random_flip)
        )
        num_samples = hp.samples_per_epoch or max(len(dataset), 100 * hp.batch_size)
        # without replacement, repeated: every image is seen equally often whatever the subset size; under DDP
        # the ranks share these draws (EpochRandomSampler) and replace unreadable images (for_ranks)
        sampler = EpochRandomSampler(len(dataset), num_samples)
        dataset = for_ranks(dataset, self.trainer)
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            collate_fn=collate_skip_none,
            drop_last=True,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
        )

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the selection the weights were trained on."""
        self.setup()
        return {key: self.index[key] for key in ("seed", "subset_size", "control_size", "train", "control")}

    def load_state_dict(self, state: dict) -> None:
        """On resume: refuse to continue on another selection than the checkpoint's, and say why."""
        self.setup()
        if state["train"] == self.index["train"] and state["control"] == self.index["control"]:
            return
        saved = f"subset_size={state['subset_size']}, subset_seed={state['seed']}, control_size={state['control_size']}"
        hp = self.hparams
        asked = f"subset_size={hp.subset_size}, subset_seed={hp.subset_seed}, control_size={hp.control_size}"
        if saved == asked:
            why = "the folder's content changed since (files added, removed or unreadable)"
        else:
            why = f"the config asks {asked}"
        raise ValueError(
            f"cannot resume: the checkpoint was trained on {len(state['train'])} images chosen with {saved} "
            f"(train fingerprint {fingerprint(state['train'])}), but {why} (fingerprint "
            f"{fingerprint(self.index['train'])}). Resume with the checkpoint's data.subset_size / data.subset_seed "
            "on the same folder, or start a new run without ckpt_path."
        )
