"""Captioned image data for text-conditional diffusion, with the duplication settings and train-time caption
mitigations of "Understanding and Mitigating Copying in Diffusion Models"
(docs/memorization.md#caption-mitigations; official code somepago/DCR `datasets.py` `ObjectAttributeDataset`,
`diff_train.py`).

An image folder (class names from the first subfolder level, for `classlevel`) and a captions JSON
`{relative_path: [caption_0, caption_1, ...]}` (`src.data.diffusion.captions.load_captions`). The training subset
and the control set come from `select_subsets` (`src.data.diffusion.image_folder`) over the captioned images.
Each draw of the training sampler gets the caption the model is fed:

- mitigation rc / rt / cwr / mc (instancelevel_blip only): `src.mitigations.apply_train_mitigation` on the
  image's captions; as in DCR, where `--trainspecial` replaces the conditioning branch;
- otherwise (mitigation none or gn; gn noises the text embeddings in the model): instancelevel_blip gives
  `duplicated_caption` (caption 0, or under dup_image a uniform draw among a duplicated image's captions) and the
  other levels `condition_caption`.

Images are drawn with replacement by weight, `WeightedRandomSampler` as DCR
(docs/memorization.md#duplication). The sampler also hands each draw its number (epoch * samples_per_epoch +
position), and the caption's random choices use a NumPy generator seeded by (seed, draw, index): the same
image drawn twice gets independent captions, and a run is reproducible whatever the number of workers.
"""

import json
import logging
from pathlib import Path, PurePosixPath

import lightning as L
import numpy as np
import torch
import torchvision.transforms as T
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from src.data.diffusion.captions import (
    CONDITIONING_LEVELS,
    DUPLICATION_SETTINGS,
    condition_caption,
    duplicated_caption,
    duplication_weights,
    load_captions,
    random_captions_for,
)
from src.data.diffusion.image_folder import fingerprint, select_subsets
from src.data.images import ImageListDataset, collate_skip_none, folder_files, for_ranks
from src.mitigations import TRAIN_MITIGATIONS, apply_train_mitigation, clip_tokenizer, multiple_captions

log = logging.getLogger(__name__)

CAPTION_ONLY_MITIGATIONS = ("none", "gn")  # leave the conditioning caption as it is (gn acts on embeddings)


def class_name_of(path: str) -> str | None:
    """The class of an image: its first subfolder, underscores read as spaces ("dark_face/x.png" -> "dark face");
    None for an image at the top of the folder."""
    parts = PurePosixPath(path).parts
    return parts[0].replace("_", " ") if len(parts) > 1 else None


def caption_transform(image_size: int, center_crop: bool = True, random_flip: bool = True) -> T.Compose:
    """DCR's training transform: bilinear resize of the short side, centre or random crop, optional horizontal
    flip, scale to [-1, 1]; gives (3, image_size, image_size)."""
    crop = T.CenterCrop(image_size) if center_crop else T.RandomCrop(image_size)
    steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True), crop]
    if random_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize([0.5], [0.5])])


class _DryRunTokenizer:
    def decode(self, token_ids) -> str:
        return " ".join(f"t{int(i)}" for i in token_ids)


def parse_mitigation(mitigation, conditioning: str, duplication: str) -> tuple[str, dict]:
    """(name, options) of a train-time mitigation config {name: rc, p: 0.1} (conf/mitigation/*.yaml), checked.

    None means `none`. Raises ValueError for an unknown name or option, a bad value (found by a dry run on a
    two-caption example), a caption-changing mitigation (rc, rt, cwr, mc) under another conditioning than
    instancelevel_blip (DCR `diff_train.py` allows `--trainspecial` only with BLIP captions), and such a
    mitigation with dup_image (DCR's `--trainspecial` branch ignores dup_image's caption draws; use dup_both).
    """
    if mitigation is None:
        return "none", {}
    options = (
        OmegaConf.to_container(mitigation, resolve=True)
        if isinstance(mitigation, DictConfig)
        else dict(mitigation)
    )
    name = options.pop("name", None)
    if name not in TRAIN_MITIGATIONS:
        raise ValueError(
            f"mitigation.name={name!r} is not a train-time mitigation; valid names: {', '.join(TRAIN_MITIGATIONS)}"
        )
    if name not in CAPTION_ONLY_MITIGATIONS and conditioning != "instancelevel_blip":
        raise ValueError(
            f"mitigation '{name}' changes the image's captions and needs data.conditioning=instancelevel_blip "
            f"(as in DCR diff_train.py); got conditioning '{conditioning}'. Use conditioning instancelevel_blip, "
            f"or mitigation none or gn"
        )
    if name not in CAPTION_ONLY_MITIGATIONS and duplication == "dup_image":
        raise ValueError(
            f"mitigation '{name}' replaces dup_image's caption draws (DCR's --trainspecial branch ignores "
            "--duplication); use data.duplication=dup_both with a mitigation"
        )
    apply_train_mitigation(
        name, ["a dry run", "another dry run"], np.random.default_rng(0), _DryRunTokenizer(), **options
    )
    return name, options


def check_caption_settings(conditioning: str, duplication: str) -> None:
    """Raise ValueError, listing the valid values, for an unknown conditioning level or duplication setting, and
    for dup_image under another level than instancelevel_blip (its caption draws need caption lists)."""
    if conditioning not in CONDITIONING_LEVELS:
        raise ValueError(
            f"data.conditioning={conditioning!r} is unknown; valid levels: {', '.join(CONDITIONING_LEVELS)}"
        )
    if duplication not in DUPLICATION_SETTINGS:
        raise ValueError(
            f"data.duplication={duplication!r} is unknown; valid settings: {', '.join(DUPLICATION_SETTINGS)}"
        )
    if duplication == "dup_image" and conditioning != "instancelevel_blip":
        raise ValueError(
            f"data.duplication=dup_image draws among a duplicated image's captions and needs conditioning "
            f"instancelevel_blip; under '{conditioning}' every draw gets the same caption: use dup_both"
        )


class WeightedDrawSampler(Sampler):
    """`WeightedRandomSampler(weights, num_samples, replacement=True)` (DCR) yielding (draw, index) pairs.

    draw = epoch * num_samples + position numbers every draw of the run, so the dataset seeds each caption by
    it. The epoch (set by Lightning through `set_epoch`) and `seed` seed the draws of indices.
    """

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        sampler = WeightedRandomSampler(self.weights, self.num_samples, replacement=True, generator=generator)
        start = self.epoch * self.num_samples
        for position, index in enumerate(sampler):
            yield start + position, index


class CaptionedImageDataset(ImageListDataset):
    """Images `root / path` with the caption of each draw: item {"image": (3, H, W) in [-1, 1], "caption": str,
    "index": int}, or None when the image cannot be read (logged once per file; `collate_skip_none` drops it).

    Indexed by (draw, index) from `WeightedDrawSampler`, or by a plain index (then a per-process counter numbers
    the draws). captions: {path: [caption_0, ...]} for every path; duplicated: (N,) bool, images with sampling
    weight > 1 (dup_image); random_captions: {path: caption} for instancelevel_random; tokenizer: CLIP-style
    `decode` for the random tokens of rc / rt (default `clip_tokenizer()`).
    """

    def __init__(
        self,
        root,
        paths,
        captions: dict,
        transform,
        conditioning: str = "instancelevel_blip",
        duplication: str = "nodup",
        duplicated=None,
        mitigation=None,
        random_captions: dict | None = None,
        seed: int = 0,
        tokenizer=None,
    ):
        super().__init__(root, paths, transform)
        check_caption_settings(conditioning, duplication)
        self.captions = captions
        self.conditioning = conditioning
        self.duplication = duplication
        self.duplicated = [False] * len(self.paths) if duplicated is None else [bool(d) for d in duplicated]
        self.mitigation, self.mitigation_options = parse_mitigation(mitigation, conditioning, duplication)
        self.random_captions = random_captions or {}
        self.seed = seed
        self.tokenizer = tokenizer
        self._draws = 0
        self._check(captions)

    def _check(self, captions: dict) -> None:
        missing = [path for path in self.paths if path not in captions]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(self.paths)} images have no captions, e.g. {missing[:3]}"
            )
        if len(self.duplicated) != len(self.paths):
            raise ValueError(f"duplicated holds {len(self.duplicated)} flags for {len(self.paths)} images")
        if self.conditioning == "classlevel":
            top = [path for path in self.paths if class_name_of(path) is None]
            if top:
                raise ValueError(
                    f"conditioning 'classlevel' reads the class from the first subfolder, but {len(top)} images "
                    f"lie at the top of '{self.root}' (e.g. {top[:3]}); put every image in a class subfolder"
                )
        if self.conditioning == "instancelevel_random":
            unset = [path for path in self.paths if not self.random_captions.get(path)]
            if unset:
                raise ValueError(
                    f"instancelevel_random: {len(unset)} images have no random caption, e.g. {unset[:3]}"
                )
        several = [
            self.mitigation == "mc" or (self.duplication == "dup_image" and d) for d in self.duplicated
        ]
        for path, needed in zip(self.paths, several, strict=True):
            if needed and len(captions[path]) < 2:
                try:
                    multiple_captions(captions[path], np.random.default_rng(0))
                except ValueError as error:
                    setting = "mitigation 'mc'" if self.mitigation == "mc" else "duplication 'dup_image'"
                    raise ValueError(f"{setting}, image '{path}': {error}") from error

    def caption(self, index: int, draw: int) -> str:
        """The caption fed to the model for draw number `draw` of image `index` (see the module docstring)."""
        path = self.paths[index]
        captions = self.captions[path]
        rng = np.random.default_rng([self.seed, draw, index])
        if self.mitigation not in CAPTION_ONLY_MITIGATIONS:
            return apply_train_mitigation(
                self.mitigation, captions, rng, self.tokenizer, **self.mitigation_options
            )
        if self.conditioning == "instancelevel_blip":
            return duplicated_caption(self.duplication, captions, self.duplicated[index], rng)
        return condition_caption(
            self.conditioning, captions, class_name_of(path), self.random_captions.get(path)
        )

    def __getitem__(self, key) -> dict | None:
        if isinstance(key, tuple | list):
            draw, index = (int(k) for k in key)
        else:
            draw, index = self._draws, int(key)
            self._draws += 1
        image = self.load(index)
        if image is None:
            return None
        return {"image": self.transform(image), "caption": self.caption(index, draw), "index": index}


class CaptionedDataModule(L.LightningDataModule):
    """A captioned image folder for text-conditional diffusion (docs/memorization.md#caption-mitigations):
    conditioning level, duplication weights and train-time caption mitigation (see the module docstring; the
    keys in conf/data/captioned_folder.yaml).

    root: the image folder (recursive), or "embedded_faces" for the 100 captioned LFW faces built under `data_dir`
    (src/data/embedded/captioned_faces.py; `captions` may then be null). subset_size: a seeded subset of the captioned images
    (null: all). control_size: captioned images held out from training (the last of the same seeded order, so they
    never overlap the subset), compared with the generations as the no-copy baseline
    (docs/memorization.md#ddpm-on-nested-subsets). samples_per_epoch: draws per epoch (null: max(N, 100
    batches)). weights_file: where the per-image sampling weights {relative path: weight} are written (read by
    `src.replicate sampling_weights=`).
    tokenizer: CLIP-style `decode` for random tokens (instancelevel_random, rc, rt); default `clip_tokenizer()`.
    """

    def __init__(
        self,
        root: str,
        captions: str | None = None,
        conditioning: str = "instancelevel_blip",
        duplication: str = "nodup",
        weight_pc: float = 0.05,
        dup_weight: float = 5.0,
        mitigation=None,
        allow_missing_captions: bool = False,
        subset_size: int | None = None,
        subset_seed: int = 0,
        control_size: int = 0,
        seed: int = 0,
        image_size: int = 256,
        center_crop: bool = True,
        random_flip: bool = True,
        batch_size: int = 16,
        num_workers: int = 4,
        samples_per_epoch: int | None = None,
        weights_file: str | None = None,
        data_dir: str | None = None,
        pin_memory: bool = True,
        tokenizer=None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        check_caption_settings(conditioning, duplication)
        self.mitigation = parse_mitigation(mitigation, conditioning, duplication)
        if root != "embedded_faces" and captions is None:
            raise ValueError(f"data.captions is null: the image folder '{root}' needs a captions JSON file")
        self.tokenizer = tokenizer
        self.dataset: CaptionedImageDataset | None = None
        self.control_files: list[str] = []
        self.weights: torch.Tensor | None = None

    def _build_dir(self) -> Path:
        from src.data.embedded.captioned_faces import build_captioned_faces

        if self.hparams.data_dir is None:
            raise ValueError("data.root=embedded_faces needs data.data_dir to build the captioned faces in")
        return build_captioned_faces(self.hparams.data_dir, image_size=self.hparams.image_size)

    @property
    def root(self) -> Path:
        """The image folder."""
        if self.hparams.root == "embedded_faces":
            from src.data.embedded.captioned_faces import IMAGES_DIR

            return self._build_dir() / IMAGES_DIR
        return Path(self.hparams.root)

    @property
    def captions_file(self) -> Path:
        if self.hparams.captions is None:
            from src.data.embedded.captioned_faces import CAPTIONS_FILE

            return self._build_dir() / CAPTIONS_FILE
        return Path(self.hparams.captions)

    def prepare_data(self) -> None:
        self.root  # noqa: B018 - builds the embedded faces once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        root = self.root
        files = folder_files(root)
        captions = load_captions(self.captions_file, files, allow_missing=hp.allow_missing_captions)
        captioned = sorted(captions)
        available = len(captioned) - hp.control_size
        if hp.control_size < 0 or available < 1:
            raise ValueError(
                f"data.control_size={hp.control_size} must lie in [0, {len(captioned) - 1}]: '{root}' has "
                f"{len(captioned)} captioned images and training needs at least one"
            )
        if hp.subset_size is not None and not 1 <= hp.subset_size <= available:
            raise ValueError(
                f"data.subset_size={hp.subset_size} must lie in [1, {available}]: '{root}' has {len(captioned)} "
                f"captioned images, {hp.control_size} of them held out (data.control_size)"
            )
        index = select_subsets(root, hp.subset_size, hp.control_size, hp.subset_seed, files=captioned)
        train = sorted(index["train"])
        self.control_files = sorted(index["control"])
        if hp.duplication == "nodup":
            self.weights = torch.ones(len(train), dtype=torch.float64)
        else:
            self.weights = duplication_weights(len(train), hp.weight_pc, hp.dup_weight, seed=hp.seed)
        random_captions = None
        if hp.conditioning == "instancelevel_random":
            random_captions = random_captions_for(train, self.tokenizer or clip_tokenizer(), seed=hp.seed)
        name, options = self.mitigation
        self.dataset = CaptionedImageDataset(
            root,
            train,
            {path: captions[path] for path in train},
            caption_transform(hp.image_size, hp.center_crop, hp.random_flip),
            hp.conditioning,
            hp.duplication,
            duplicated=(self.weights > 1).tolist(),
            mitigation={"name": name, **options},
            random_captions=random_captions,
            seed=hp.seed,
            tokenizer=self.tokenizer,
        )
        if hp.weights_file and (self.trainer is None or self.trainer.is_global_zero):
            path = Path(hp.weights_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(zip(train, self.weights.tolist(), strict=True)), indent=1))
        log.info(
            "captioned data: %d images of %s (%d captioned of %d files, %d held out), conditioning %s, "
            "duplication %s (%d up-weighted), mitigation %s",
            len(train),
            root,
            len(captioned),
            len(files),
            len(self.control_files),
            hp.conditioning,
            hp.duplication,
            int((self.weights > 1).sum()),
            name,
        )

    @property
    def train_files(self) -> list[str]:
        """The training images, paths relative to `root`, sorted (the order of the weights and indices)."""
        self.setup()
        return self.dataset.paths

    @property
    def captions(self) -> dict[str, list[str]]:
        """{path: [caption_0, ...]} of the training images, as loaded from the captions file."""
        self.setup()
        return self.dataset.captions

    @property
    def class_names(self) -> list[str]:
        """The sorted class names of the training images (first subfolder, underscores as spaces)."""
        return sorted({name for name in map(class_name_of, self.train_files) if name is not None})

    def num_samples(self) -> int:
        return self.hparams.samples_per_epoch or max(len(self.train_files), 100 * self.hparams.batch_size)

    def sampler(self) -> WeightedDrawSampler:
        self.setup()
        return WeightedDrawSampler(self.weights, self.num_samples(), seed=self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        hp = self.hparams
        return DataLoader(
            for_ranks(self.dataset, self.trainer),  # under DDP unreadable images are replaced, not skipped
            batch_size=hp.batch_size,
            sampler=self.sampler(),
            num_workers=hp.num_workers,
            collate_fn=collate_skip_none,
            drop_last=True,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
        )

    def image_transform(self) -> T.Compose:
        """The training transform without its random flip: the images as the model saw them, in [-1, 1]."""
        return caption_transform(self.hparams.image_size, center_crop=True, random_flip=False)

    def image_prompts(self) -> dict[str, str]:
        """The prompt the model was trained with for each training image: its caption 0 (instancelevel_blip), its
        fixed random caption (instancelevel_random), "An image of {class}" (classlevel) or "An image"."""
        self.setup()
        level = self.hparams.conditioning
        prompts = {}
        for path in self.train_files:
            if level == "nolevel":
                prompts[path] = "An image"
            elif level == "classlevel":
                prompts[path] = f"An image of {class_name_of(path)}"
            elif level == "instancelevel_blip":
                prompts[path] = self.captions[path][0]
            else:
                prompts[path] = self.dataset.random_captions[path]
        return prompts

    def train_prompts(self, n: int, seed: int = 42) -> tuple[list[str], list[str | None]]:
        """n generation prompts as DCR `diff_inference.py` (docs/memorization.md#conditioning,
        docs/memorization.md#generation-protocol), and the training image each came from (None where it came
        from no image).

        nolevel: "An image"; classlevel: "An image of {class}", classes drawn uniformly; instancelevel_blip:
        caption 0 of training images drawn uniformly with replacement; instancelevel_random: their fixed random
        captions. Draws use `np.random.default_rng(seed)` (DCR seeds NumPy's global generator with 42).
        """
        self.setup()
        rng = np.random.default_rng(seed)
        level = self.hparams.conditioning
        if level == "nolevel":
            return ["An image"] * n, [None] * n
        if level == "classlevel":
            classes = self.class_names
            return [f"An image of {classes[i]}" for i in rng.integers(0, len(classes), size=n)], [None] * n
        paths = [self.train_files[i] for i in rng.integers(0, len(self.train_files), size=n)]
        if level == "instancelevel_blip":
            return [self.captions[path][0] for path in paths], paths
        return [self.dataset.random_captions[path] for path in paths], paths

    def caption_log(self, n: int = 16, epoch: int = 0) -> list[tuple[str, str, str]]:
        """(path, caption 0, caption fed to the model) of the first n draws of `epoch`: what training sees."""
        sampler = self.sampler()
        sampler.set_epoch(epoch)
        rows = []
        for draw, index in sampler:
            if len(rows) == n:
                break
            path = self.dataset.paths[index]
            rows.append((path, self.dataset.captions[path][0], self.dataset.caption(index, draw)))
        return rows

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the training images and their sampling weights."""
        self.setup()
        return {"train": self.train_files, "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """On resume: refuse another selection of images or weights than the checkpoint's."""
        self.setup()
        if state["train"] == self.train_files and state["weights"] == self.weights.tolist():
            return
        raise ValueError(
            f"cannot resume: the checkpoint was trained on {len(state['train'])} images (fingerprint "
            f"{fingerprint(state['train'])}) with {sum(w > 1 for w in state['weights'])} up-weighted, but this "
            f"config gives {len(self.train_files)} images (fingerprint {fingerprint(self.train_files)}) with "
            f"{int((self.weights > 1).sum())} up-weighted. Resume with the checkpoint's data.subset_size, "
            "data.subset_seed, data.seed and data.duplication on the same folder and captions."
        )
