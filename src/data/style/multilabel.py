"""Multi-label style training sets: annotation files, the tag vocabulary, a folder dataset and a
webdataset stream (docs/style.md#laion-styles, LAION-Styles; official CSD `data/laion.py`).

Formats (also what the embedded style bench writes, `src.data.embedded.style_bench`):
- CSV with a header `path,tags`; `tags` holds the image's tags separated by `|`; `path` is relative to the
  image root (or absolute).
- JSONL, one object a line: `{"path": "a/b.jpg", "tags": ["impressionism", "claude monet"]}`.
- Tag vocabulary file: one tag a line, optionally `tag<TAB>count` (count = number of images with the tag);
  the official `laion-styles-subset-tags.txt` is the plain form.
- Webdataset shards: tar files whose samples hold an image (`.jpg`, `.jpeg`, `.png` or `.webp`) and a
  `.json` with a `tags` list.
"""

import csv
import io
import json
import logging
import zlib
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from src.data.images import ImageListDataset, to_rgb

log = logging.getLogger(__name__)

TAG_SEPARATOR = "|"
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _split_tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(TAG_SEPARATOR) if tag.strip()]


def read_annotations(path) -> list[tuple[str, list[str]]]:
    """Read a `path,tags` CSV or a JSONL annotation file into [(image_path, [tag, ...]), ...] in file order.

    The format is chosen by the suffix (.csv, or .jsonl/.json). An image with an empty tag field is kept
    with an empty list (the dataset counts and excludes it). Errors name the file, the line and what was
    expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_annotations_csv(path)
    if suffix in (".jsonl", ".json"):
        return _read_annotations_jsonl(path)
    raise ValueError(
        f"annotation file '{path}': unknown suffix '{suffix}'; expected .csv (path,tags) or .jsonl"
    )


def _read_annotations_csv(path: Path) -> list[tuple[str, list[str]]]:
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "tags"} <= set(reader.fieldnames):
            raise ValueError(
                f"annotation file '{path}', line 1: expected a header with columns 'path' and 'tags', "
                f"found {reader.fieldnames}"
            )
        for row in reader:
            if not row["path"]:
                raise ValueError(f"annotation file '{path}', line {reader.line_num}: empty 'path'")
            items.append((row["path"], _split_tags(row["tags"] or "")))
    return items


def _read_annotations_jsonl(path: Path) -> list[tuple[str, list[str]]]:
    items = []
    with open(path, encoding="utf-8") as handle:
        for line_num, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            expected = 'expected a JSON object like {"path": "a/b.jpg", "tags": ["tag1", "tag2"]}'
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"annotation file '{path}', line {line_num}: {error}; {expected}") from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
                raise ValueError(f"annotation file '{path}', line {line_num}: no 'path' string; {expected}")
            tags = record.get("tags")
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise ValueError(
                    f"annotation file '{path}', line {line_num}: 'tags' is not a list of strings; {expected}"
                )
            items.append((record["path"], [tag.strip() for tag in tags if tag.strip()]))
    return items


class TagVocabulary:
    """An ordered list of style tags and their multi-hot encoding.

    `counts` (tag -> number of images) is kept when known, so `save` can write it back.
    """

    def __init__(self, tags, counts: dict | None = None):
        self.tags = list(tags)
        if len(set(self.tags)) != len(self.tags):
            duplicates = sorted(tag for tag, n in Counter(self.tags).items() if n > 1)
            raise ValueError(f"tag vocabulary has duplicate tags: {duplicates[:10]}")
        self.index = {tag: i for i, tag in enumerate(self.tags)}
        self.counts = counts

    @classmethod
    def from_tag_lists(cls, tag_lists, min_images: int = 1, max_images: int | None = None) -> "TagVocabulary":
        """Build from per-image tag lists, keeping tags used by min_images..max_images images (inclusive).

        docs/style.md#laion-styles step 4 drops tags with more than 100,000 images (generic words such as
        "picture"). Tags are sorted so the label order does not depend on the file order.
        """
        counts = Counter(tag for tags in tag_lists for tag in set(tags))
        return cls._filtered(counts, min_images, max_images, source="the annotations")

    @classmethod
    def from_file(cls, path, min_images: int = 1, max_images: int | None = None) -> "TagVocabulary":
        """Read one tag a line, or `tag<TAB>count`; file order is kept.

        Filtering by count needs counts: a file without them is accepted only with the default filter
        (min_images=1, max_images=None).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tag vocabulary file '{path}' does not exist (expected one tag a line)")
        counts, has_counts = {}, []
        with open(path, encoding="utf-8") as handle:
            for line_num, line in enumerate(handle, start=1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                tag, _, count = line.partition("\t")
                tag = tag.strip()
                if tag in counts:
                    raise ValueError(f"tag vocabulary file '{path}', line {line_num}: duplicate tag '{tag}'")
                if count:
                    try:
                        counts[tag] = int(count)
                    except ValueError:
                        raise ValueError(
                            f"tag vocabulary file '{path}', line {line_num}: count '{count}' is not an integer; "
                            "expected 'tag' or 'tag<TAB>count'"
                        ) from None
                else:
                    counts[tag] = None
                has_counts.append(bool(count))
        if not counts:
            raise ValueError(f"tag vocabulary file '{path}' holds no tag")
        if all(has_counts):
            return cls._filtered(counts, min_images, max_images, source=f"'{path}'", keep_order=True)
        if min_images > 1 or max_images is not None:
            raise ValueError(
                f"tag vocabulary file '{path}' has lines without a count, so min_images={min_images} / "
                f"max_images={max_images} cannot be applied; write 'tag<TAB>count' lines or leave the filter off"
            )
        return cls(counts.keys())

    @classmethod
    def _filtered(cls, counts, min_images, max_images, source, keep_order=False) -> "TagVocabulary":
        upper = float("inf") if max_images is None else max_images
        kept = {tag: n for tag, n in counts.items() if min_images <= n <= upper}
        too_rare = sum(n < min_images for n in counts.values())
        too_common = sum(n > upper for n in counts.values())
        if too_rare or too_common:
            log.warning(
                "tag vocabulary from %s: dropped %d tags used by fewer than %d images and %d tags used by more "
                "than %s images; %d tags kept",
                source,
                too_rare,
                min_images,
                too_common,
                max_images,
                len(kept),
            )
        if not kept:
            raise ValueError(
                f"tag vocabulary from {source}: no tag is used by {min_images}..{max_images} images; "
                "loosen min_images_per_tag / max_images_per_tag"
            )
        tags = list(kept) if keep_order else sorted(kept)
        return cls(tags, counts={tag: kept[tag] for tag in tags})

    def save(self, path) -> None:
        """Write one tag a line, with `<TAB>count` when counts are known (readable by `from_file`)."""
        with open(path, "w", encoding="utf-8") as handle:
            for tag in self.tags:
                count = None if self.counts is None else self.counts.get(tag)
                handle.write(f"{tag}\t{count}\n" if count is not None else f"{tag}\n")

    def __len__(self) -> int:
        return len(self.tags)

    def known(self, tags) -> list[str]:
        """The tags that are in the vocabulary."""
        return [tag for tag in tags if tag in self.index]

    def encode(self, tags) -> torch.Tensor:
        """Multi-hot float32 vector (L,); unknown tags are ignored (the datasets count them beforehand)."""
        labels = torch.zeros(len(self.tags), dtype=torch.float32)
        for tag in tags:
            if tag in self.index:
                labels[self.index[tag]] = 1.0
        return labels


class StyleFolderDataset(ImageListDataset):
    """Images under `root` listed in an annotation file, with multi-hot style labels.

    Item: {"images": transform(image) -- (V, 3, H, W) with MultiView or (3, H, W), "labels": (L,) float32,
    "index": int}, or None when the image cannot be read (logged once per file; `collate_skip_none` of
    `src.data.images` drops it).
    Images whose tags are all outside the vocabulary are excluded up front, counted and logged.
    """

    def __init__(
        self,
        root,
        annotations,
        transform,
        vocab: TagVocabulary | None = None,
        min_images_per_tag: int = 1,
        max_images_per_tag: int | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.train_root: folder '{self.root}' does not exist; expected a folder holding the images "
                "that data.train_annotations lists (paths relative to this folder)"
            )
        annotations = Path(annotations)
        if not annotations.is_file():
            raise FileNotFoundError(
                f"data.train_annotations: file '{annotations}' does not exist; expected a CSV with columns "
                "'path,tags' (tags separated by '|') or a JSONL file with {\"path\": ..., \"tags\": [...]} lines"
            )
        items = read_annotations(annotations)
        if vocab is None:
            vocab = TagVocabulary.from_tag_lists(
                [tags for _, tags in items], min_images_per_tag, max_images_per_tag
            )
        self.vocab = vocab
        self.items = [(path, vocab.known(tags)) for path, tags in items]
        self.items = [(path, tags) for path, tags in self.items if tags]
        self.num_excluded = len(items) - len(self.items)
        if self.num_excluded:
            log.warning(
                "%s: excluded %d of %d images whose tags are all outside the %d-tag vocabulary (or empty)",
                annotations,
                self.num_excluded,
                len(items),
                len(vocab),
            )
        if not self.items:
            raise ValueError(
                f"data.train_annotations: no image in '{annotations}' has a tag in the vocabulary"
            )
        super().__init__(self.root, [path for path, _ in self.items], transform)

    def __getitem__(self, index: int) -> dict | None:
        image = self.load(index)
        if image is None:
            return None
        tags = self.items[index][1]
        return {"images": self.transform(image), "labels": self.vocab.encode(tags), "index": index}


def decode_shard_image(key: str, data: bytes):
    """Webdataset decoder for image members: bytes -> 8-bit RGB PIL image (same rules as `load_rgb`).

    Returns None for other members, so webdataset's default handlers decode them (json -> dict).
    """
    if key.lower().rsplit(".", 1)[-1] not in SHARD_IMAGE_KEYS:
        return None
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def _log_and_skip(error: Exception) -> bool:
    """Webdataset handler: log the broken sample or shard and go on (wds.warn_and_continue also sleeps 0.5 s)."""
    where = " ".join(
        f"{name}={getattr(error, name)}" for name in ("url", "key") if getattr(error, name, None)
    )
    cause = error.__cause__ or error.__context__
    log.warning(
        "skipping a webdataset sample or shard %s: %r%s",
        where,
        error,
        f" caused by {cause!r}" if cause else "",
    )
    return True


class _ShardSampleToItem:
    """Map a decoded shard sample to the folder dataset's item dict; None (dropped) when no tag is known.

    Drops are counted per worker and logged on the first one and then every 1000th. "index" is the CRC32
    of the sample key: streams have no global position, and a stable id still lets one trace a sample.
    """

    def __init__(self, transform, vocab: TagVocabulary):
        self.transform = transform
        self.vocab = vocab
        self.num_dropped = 0

    def __call__(self, sample: dict) -> dict | None:
        key = sample["__key__"]
        image = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
        if image is None:
            raise ValueError(
                f"sample '{key}' from {sample.get('__url__')} has no {'/'.join(SHARD_IMAGE_KEYS)} member"
            )
        meta = sample.get("json")
        if not isinstance(meta, dict) or not isinstance(meta.get("tags"), list):
            raise ValueError(
                f"sample '{key}' from {sample.get('__url__')} has no .json member with a 'tags' list"
            )
        tags = self.vocab.known(meta["tags"])
        if not tags:
            self.num_dropped += 1
            if self.num_dropped == 1 or self.num_dropped % 1000 == 0:
                log.warning(
                    "webdataset: dropped %d samples with no tag in the vocabulary so far", self.num_dropped
                )
            return None
        return {
            "images": self.transform(image),
            "labels": self.vocab.encode(tags),
            "index": zlib.crc32(key.encode("utf-8")),
        }


def style_webdataset(
    urls, transform, vocab: TagVocabulary, shuffle: int = 1000, seed: int = 0, epoch_length=None
):
    """A streaming multi-label style dataset over tar shards (open_clip-style pipeline).

    urls: a brace pattern ("shards/{000000..000999}.tar") or a list of shard paths/URLs.
    Shards are split across ranks (`split_by_node`) and DataLoader workers (`split_by_worker`), so every
    sample is read once per pass; keep #shards >= world_size * num_workers. Broken shards and samples are
    logged and skipped. Items are the same dicts as `StyleFolderDataset`, plus the "__key__" that webdataset
    adds (collate with `collate_skip_none`).
    Shuffling: the shard order is drawn from `seed` + the epoch count of the worker (webdataset's
    detshuffle; the count advances only with persistent workers), the sample order by a `shuffle`-sized
    buffer with a per-process random seed (not reproducible, as in the official code). shuffle=0 keeps
    the shard and sample order.
    epoch_length: samples per epoch *per DataLoader worker* (webdataset's `with_epoch`); the stream then
    repeats the shards as needed, so every rank sees the same number of batches (needed by DDP). None
    gives one pass over the shards.
    """
    import webdataset as wds

    if isinstance(urls, (list, tuple)):
        urls = [str(url) for url in urls]
    dataset = (
        wds.WebDataset(
            urls,
            shardshuffle=100 if shuffle else False,
            detshuffle=True,
            seed=seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=_log_and_skip,
        )
        .shuffle(shuffle)
        .decode(decode_shard_image, handler=_log_and_skip)
        .map(_ShardSampleToItem(transform, vocab), handler=_log_and_skip)
    )
    if epoch_length is not None:
        dataset = dataset.with_epoch(int(epoch_length))
    return dataset
