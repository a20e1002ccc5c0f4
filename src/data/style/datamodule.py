"""Lightning data module for CSD: multi-label style training data plus a query/database retrieval benchmark.

Training sources (`train_format`):
- "style_bench": the embedded benchmark (`src.data.embedded.style_bench`), built under `bench_root` on first use.
- "folder": images under `train_root` listed in `train_annotations` (CSV `path,tags` or JSONL).
- "webdataset": tar shards `train_shards` with a fixed tag vocabulary `vocab_file` (LAION-Styles scale).
Retrieval benchmarks (`val_format`): "style_bench", "csv" (`val_csv`), "wikiart" (`val_root`, `val_csv`
names the csv inside it, default wikiart.csv), "domainnet" (`val_root`, `val_split_file`).
File formats: `src.data.style.multilabel` and `src.data.style.retrieval`.
"""

import logging
import math
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from src.data.images import ImageListDataset, collate_skip_none, for_ranks
from src.data.style.multilabel import StyleFolderDataset, TagVocabulary, style_webdataset
from src.data.style.retrieval import (
    RetrievalSet,
    load_domainnet,
    load_retrieval_csv,
    load_wikiart,
)
from src.data.style.transforms import CLIP_MEAN, CLIP_STD, csd_views, eval_transform

log = logging.getLogger(__name__)

TRAIN_FORMATS = ("style_bench", "folder", "webdataset")
VAL_FORMATS = ("style_bench", "csv", "wikiart", "domainnet")


def _require(value, key: str, why: str):
    if value is None or value == "???":
        raise ValueError(f"data.{key} is not set; it is required {why}")
    return value


class StyleDataModule(L.LightningDataModule):
    """Train batches {"images": (B, V, 3, S, S), "labels": (B, L) float, "index": (B,), "num_skipped": int};
    val/test batches {"image": (B, 3, S, S), "index": (B,), "num_skipped": int} over the query images followed
    by the database images of `val_set` / `test_set` (index < len(set.query) is a query).

    Unreadable images are dropped from batches and counted in "num_skipped"; a batch where all are unreadable
    holds only "num_skipped". In DDP, Lightning's distributed sampler pads the val/test set with repeated
    images, so place embeddings by "index" (the module keeps one row per index).
    The val set is the benchmark subsampled to val_max_queries / val_max_database (None = all; seeded by
    `seed`); the test set is the full benchmark when test_full, else the val set.
    """

    def __init__(
        self,
        train_format: str = "style_bench",
        train_root: str | None = None,
        train_annotations: str | None = None,
        train_shards=None,
        vocab_file: str | None = None,
        min_images_per_tag: int = 1,
        max_images_per_tag: int | None = None,
        epoch_length: int | None = None,
        val_format: str = "style_bench",
        val_root: str | None = None,
        val_csv: str | None = None,
        val_split_file: str | None = None,
        val_max_queries: int | None = None,
        val_max_database: int | None = None,
        val_with_replacement: bool = False,
        test_full: bool = True,
        image_size: int = 224,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        content_view: bool = False,
        crop_scale=(0.08, 1.0),
        vflip_p: float = 0.3,
        rotation_degrees: float = 0,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = True,
        bench_root: str | None = None,
        bench_seed: int = 0,
        bench_image_size: int = 96,
        bench_images_per_style: int = 250,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_format not in TRAIN_FORMATS:
            raise ValueError(f"data.train_format={train_format!r}: expected one of {TRAIN_FORMATS}")
        if val_format not in VAL_FORMATS:
            raise ValueError(f"data.val_format={val_format!r}: expected one of {VAL_FORMATS}")
        self.train_dataset = None
        self.vocab: TagVocabulary | None = None
        self.full_set: RetrievalSet | None = None
        self.val_set: RetrievalSet | None = None
        self.test_set: RetrievalSet | None = None

    # ---- building ------------------------------------------------------------------------------------------
    def _uses_bench(self) -> bool:
        return self.hparams.train_format == "style_bench" or self.hparams.val_format == "style_bench"

    def _bench_folder(self) -> Path:
        """Build the embedded benchmark (or reuse an earlier build) and return its folder."""
        from src.data.embedded.style_bench import build_style_bench

        hp = self.hparams
        root = _require(hp.bench_root, "bench_root", "to build the embedded style benchmark")
        return build_style_bench(
            root,
            seed=hp.bench_seed,
            image_size=hp.bench_image_size,
            images_per_style=hp.bench_images_per_style,
            num_workers=max(1, hp.num_workers),
        )

    def prepare_data(self) -> None:
        """Build the style benchmark once (Lightning calls this on one process per node)."""
        if self._uses_bench():
            self._bench_folder()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_train()
        if self.full_set is None:
            self.full_set = self._load_benchmark()
            hp = self.hparams
            self.val_set = self.full_set.subsample(
                hp.val_max_queries, hp.val_max_database, seed=hp.seed, replace=hp.val_with_replacement
            )
            self.test_set = self.full_set if hp.test_full else self.val_set
            log.info(
                "retrieval benchmark %s: val %d queries / %d database, test %d / %d, %d labels",
                hp.val_format,
                self.val_set.num_queries,
                self.val_set.num_database,
                self.test_set.num_queries,
                self.test_set.num_database,
                len(self.full_set.label_names),
            )

    def _views(self):
        hp = self.hparams
        return csd_views(
            hp.image_size,
            tuple(hp.mean),
            tuple(hp.std),
            content_view=hp.content_view,
            crop_scale=tuple(hp.crop_scale),
            vflip_p=hp.vflip_p,
            rotation_degrees=hp.rotation_degrees,
        )

    def _build_train(self):
        hp = self.hparams
        if hp.train_format == "webdataset":
            shards = _require(
                hp.train_shards, "train_shards", "for train_format=webdataset (a brace pattern or list)"
            )
            vocab_file = _require(hp.vocab_file, "vocab_file", "for train_format=webdataset (one tag a line)")
            self.vocab = TagVocabulary.from_file(vocab_file, hp.min_images_per_tag, hp.max_images_per_tag)
            per_worker = None
            if hp.epoch_length is not None:
                if hp.epoch_length < hp.batch_size * max(1, hp.num_workers):
                    raise ValueError(
                        f"data.epoch_length={hp.epoch_length} gives no full batch of data.batch_size={hp.batch_size} "
                        f"per worker (data.num_workers={hp.num_workers}): an epoch would hold no step. Use at least "
                        f"{hp.batch_size * max(1, hp.num_workers)}."
                    )
                # epoch_length counts samples per device; webdataset's with_epoch counts per worker.
                per_worker = math.ceil(hp.epoch_length / max(1, hp.num_workers))
            return style_webdataset(shards, self._views(), self.vocab, seed=hp.seed, epoch_length=per_worker)
        if hp.train_format == "style_bench":
            root = self._bench_folder()
            annotations = root / "train.csv"
        else:
            root = _require(hp.train_root, "train_root", "for train_format=folder (the image folder)")
            annotations = _require(
                hp.train_annotations,
                "train_annotations",
                "for train_format=folder (a path,tags CSV or JSONL)",
            )
        vocab = None
        if hp.vocab_file is not None:
            vocab = TagVocabulary.from_file(hp.vocab_file, hp.min_images_per_tag, hp.max_images_per_tag)
        dataset = StyleFolderDataset(
            root, annotations, self._views(), vocab, hp.min_images_per_tag, hp.max_images_per_tag
        )
        self.vocab = dataset.vocab
        return dataset

    def _load_benchmark(self) -> RetrievalSet:
        try:
            return self._read_benchmark()
        except FileNotFoundError as error:  # say which config keys point there
            raise FileNotFoundError(
                f"{error} (set by data.val_root / data.val_csv / data.val_split_file with "
                f"data.val_format={self.hparams.val_format})"
            ) from error

    def _read_benchmark(self) -> RetrievalSet:
        hp = self.hparams
        if hp.val_format == "style_bench":
            folder = self._bench_folder()
            return load_retrieval_csv(folder / "retrieval.csv", root=folder)
        if hp.val_format == "csv":
            return load_retrieval_csv(_require(hp.val_csv, "val_csv", "for val_format=csv"), root=hp.val_root)
        root = _require(hp.val_root, "val_root", f"for val_format={hp.val_format}")
        if hp.val_format == "wikiart":
            return load_wikiart(root, hp.val_csv or "wikiart.csv")
        split_file = _require(
            hp.val_split_file, "val_split_file", "for val_format=domainnet (a path,split CSV)"
        )
        return load_domainnet(root, split_file)

    # ---- loaders -------------------------------------------------------------------------------------------
    @property
    def num_tags(self) -> int:
        """Size of the tag vocabulary (the label dimension L); known after setup("fit")."""
        if self.vocab is None:
            raise RuntimeError("StyleDataModule.num_tags is known only after setup('fit')")
        return len(self.vocab)

    def _loader(self, dataset, batch_size: int, train: bool) -> DataLoader:
        hp = self.hparams
        iterable = hp.train_format == "webdataset" and train
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # Streams shuffle inside the pipeline; map-style sets get Lightning's DistributedSampler in DDP.
            shuffle=train and not iterable,
            drop_last=train,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate_skip_none,
        )

    def train_dataloader(self) -> DataLoader:
        batch_size = self.hparams.batch_size
        if self.hparams.train_format != "webdataset" and len(self.train_dataset) < batch_size:
            # drop_last=True would give an epoch with no batch, and Lightning would stop without training.
            raise ValueError(
                f"data.batch_size={batch_size} is larger than the {len(self.train_dataset)} training images, "
                "so no full batch exists; lower data.batch_size or add images"
            )
        dataset = self.train_dataset
        if self.hparams.train_format != "webdataset":  # under DDP unreadable images are replaced, not skipped
            dataset = for_ranks(dataset, self.trainer)
        return self._loader(dataset, batch_size, train=True)

    def _eval_loader(self, retrieval_set: RetrievalSet) -> DataLoader:
        transform = eval_transform(self.hparams.image_size, tuple(self.hparams.mean), tuple(self.hparams.std))
        dataset = ImageListDataset(
            retrieval_set.root, retrieval_set.query + retrieval_set.database, transform
        )
        return self._loader(dataset, self.hparams.eval_batch_size, train=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
