"""Features of a large image set on disk: shards of .npy rows, memory-mapped on read, listed by a manifest.

A LAION-scale training set (12 million images) has 12M x 512 features: 12 GB in float16, more than one process
should hold, extracted by several GPUs or jobs. A store is a folder:

    manifest.json          the store's key, extractor (name, config, weights digest), source, dim, dtype and
                           the shards in order (name, rows, first global row, bytes, sha256)
    shards/00000.npy       (rows, D) features of one unit of the source, float16 by default
    shards/00000.json      the shard's key, rows, sha256, the paths (or webdataset keys) of its rows and the
                           samples it skipped, with why

A unit of the source is `shard_size` consecutive images of a sorted folder listing, or one webdataset tar (as
img2dataset writes them). Unit j belongs to part j % parts, so N processes (`part=rank`, `parts=world size`,
one SLURM array task each, or the ranks of a torch.distributed group) extract disjoint units; a unit whose
sidecar is on disk with the store's key is not extracted again (resume after a crash or a pre-emption), and
whoever finds every unit done writes the manifest: merging is the manifest alone, no feature is copied.

`FeatureStore` opens a store and refuses one whose files do not match its manifest (a shard missing, truncated,
of another shape or dtype, or written under another key: another extractor, other weights, another source),
naming the shard. Search over a store streams it block by block (`src.replication.store_search`).
"""

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from src.data.images import ImageListDataset, UnreadableImage, folder_files, load_rgb
from src.nn.embed import embed_dataset
from src.utils.checkpoints import state_digest
from src.utils.run import distributed_part

log = logging.getLogger(__name__)

STORE_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
# Members of a webdataset sample that hold its image, in order of preference (img2dataset writes jpg).
SAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class StoreError(ValueError):
    """A store whose files do not match its manifest, or a request the store cannot serve."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, content) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- sources


def is_webdataset(source) -> bool:
    """A source names webdataset shards when it is a list of paths or a string ending in .tar (brace patterns
    such as `laion/{00000..00099}.tar` included)."""
    if isinstance(source, (list, tuple)):
        return True
    return str(source).endswith(".tar")


def expand_shards(source) -> list[str]:
    """The tar files of a webdataset source: a list, or one brace pattern expanded (`braceexpand`)."""
    from braceexpand import braceexpand

    urls = [str(s) for s in source] if isinstance(source, (list, tuple)) else list(braceexpand(str(source)))
    missing = [url for url in urls if "://" not in url and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} webdataset shards do not exist, first '{missing[0]}'"
        )
    return urls


def source_units(source, files: list[str] | None = None, shard_size: int = 100_000) -> tuple[dict, list]:
    """(description of the source, its units): for a folder, lists of `shard_size` relative paths of the sorted
    listing (or of `files`); for webdataset shards, one tar path each. The description keys the store: the
    folder's files with their sizes and modification times, or the tars with theirs."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if is_webdataset(source):
        urls = expand_shards(source)
        stats = [[url, *_size_and_time(url)] for url in urls]
        return {"kind": "webdataset", "shards": stats}, urls
    folder = Path(source)
    relative = folder_files(folder, files)
    listing = [[path, *_size_and_time(folder / path)] for path in relative]
    units = [relative[i : i + shard_size] for i in range(0, len(relative), shard_size)]
    return {"kind": "folder", "root": str(folder.resolve()), "files": listing}, units


def _size_and_time(path) -> tuple[int, int]:
    if "://" in str(path):
        return -1, -1  # remote shards: named only
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


class _BytesImages(Dataset):
    """Decoded samples of one tar: item {"image", "index"}, or None when the bytes are not a readable image."""

    def __init__(self, samples: list[tuple[str, bytes]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            image = load_rgb(io.BytesIO(self.samples[index][1]))
        except UnreadableImage:
            return None
        return {"image": self.transform(image), "index": index}


def _tar_samples(url: str) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """(key, image bytes) of each sample of one tar, in order, and the samples without an image (skipped)."""
    import webdataset as wds

    samples, skipped = [], []
    for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
        members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        image_key = next((k for k in SAMPLE_IMAGE_KEYS if k in members), None)
        if image_key is None:
            skipped.append({"path": sample["__key__"], "reason": f"no image member (has {sorted(members)})"})
        else:
            samples.append((sample["__key__"], members[image_key]))
    return samples, skipped


def extract_unit(extractor, source, unit, kind: str, batch_size, num_workers, device, desc):
    """(features (M, D) float32 or None, names of the M readable items, skipped items with why) of one unit: a
    list of files of the folder `source`, or one webdataset tar."""
    if kind == "webdataset":
        samples, skipped = _tar_samples(unit)
        dataset, names = _BytesImages(samples, extractor.transform()), [s[0] for s in samples]

        def load(i):
            return load_rgb(io.BytesIO(samples[i][1]))
    else:
        dataset, names, skipped = ImageListDataset(source, unit, extractor.transform()), unit, []

        def load(i):
            return load_rgb(Path(source) / unit[i])

    features, index = embed_dataset(extractor, dataset, batch_size, num_workers, device, desc)
    kept = index.tolist()
    missing = sorted(set(range(len(names))) - set(kept))
    skipped = skipped + [{"path": names[i], "reason": _why_unreadable(load, i)} for i in missing]
    if features is not None and features.ndim != 2:
        raise ValueError(
            f"{extractor.name} gives features of shape {tuple(features.shape)}; a feature store holds global "
            "(B, D) descriptors (token features are not supported here)"
        )
    return features, [names[i] for i in kept], skipped


def _why_unreadable(load, i) -> str:
    """Why `load_rgb` rejects item i (read again for the few skipped items only, to list the reason)."""
    try:
        load(i)
    except UnreadableImage as error:
        return error.reason
    return "unreadable while extracting"


# ---------------------------------------------------------------------------------------------------- writing


def store_key(
    description: dict, extractor_name: str, extractor_config: dict | None, weights: str, dtype: str
):
    # The folder's location is not part of the key: a copy of the folder elsewhere is the same source.
    content = {k: v for k, v in description.items() if k != "root"}
    blob = json.dumps(
        [STORE_VERSION, extractor_name, extractor_config or {}, weights, dtype, content],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _unit_done(shards: Path, name: str, key: str) -> bool:
    sidecar = shards / f"{name}.json"
    if not sidecar.is_file() or not (shards / f"{name}.npy").is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("key") == key
    except (json.JSONDecodeError, OSError):
        return False


def extract_store(
    extractor,
    source,
    store_dir,
    *,
    files: list[str] | None = None,
    shard_size: int = 100_000,
    dtype: str = "float16",
    part: int | None = None,
    parts: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device="cpu",
    extractor_config: dict | None = None,
) -> "FeatureStore | None":
    """Extract the features of this part's units of `source` into the store `store_dir`.

    Args:
        extractor: an `src.nn.extractors.Extractor` on `device` (global (B, D) descriptors).
        source: an image folder (read recursively; `files=` restricts it to listed relative paths), or webdataset
            shards (a list of tar paths, or a brace pattern `dir/{00000..00099}.tar`).
        shard_size: images per shard for a folder (a webdataset store has one shard per tar).
        dtype: "float16" (half the disk and memory; scores then differ by ~1e-3) or "float32".
        part, parts: this process extracts the units j with j % parts == part (default: the torch.distributed
            rank and world size, or RANK / WORLD_SIZE, or 0 of 1).

    Returns:
        The opened `FeatureStore` when every unit is done (this call wrote the manifest), else None (other
        parts still extracting; their units are logged). Units already done under the same key are skipped.
        With part and parts from a torch.distributed group, the ranks meet at a barrier and rank 0 writes the
        manifest; every rank returns the store.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    group = (
        part is None
        and parts is None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )
    default_part, default_parts = distributed_part()
    part = default_part if part is None else int(part)
    parts = default_parts if parts is None else int(parts)
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part must be in [0, parts) with parts >= 1, got part={part}, parts={parts}")
    description, units = source_units(source, files, shard_size)
    key = store_key(description, extractor.name, extractor_config, state_digest(extractor), dtype)
    root = Path(store_dir)
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    _check_store_key(root, key)
    names = [f"{j:05d}" for j in range(len(units))]
    mine = [j for j in range(len(units)) if j % parts == part]
    todo = [j for j in mine if not _unit_done(shards, names[j], key)]
    if len(todo) < len(mine):
        log.info(f"store {root}: {len(mine) - len(todo)} of this part's {len(mine)} shards already done")
    for number, j in enumerate(todo):
        desc = f"shard {names[j]} ({number + 1}/{len(todo)} of part {part}/{parts})"
        features, kept, skipped = extract_unit(
            extractor, source, units[j], description["kind"], batch_size, num_workers, device, desc
        )
        if features is None:
            features = torch.zeros(0, 0)
        if skipped:
            log.warning(f"shard {names[j]}: {len(skipped)} samples skipped (listed in {names[j]}.json)")
        _write_shard(shards, names[j], key, features.numpy().astype(dtype), kept, skipped, units[j])
    return _finish(root, key, description, names, extractor, extractor_config, dtype, shard_size, group)


def _check_store_key(root: Path, key: str) -> None:
    manifest = root / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("key")
        if found != key:
            raise StoreError(
                f"store '{root}' holds features under another key (another source, extractor, weights or dtype): "
                "give a new store folder, or delete this one to rebuild it"
            )


def _write_shard(shards: Path, name: str, key: str, array: np.ndarray, paths, skipped, unit) -> None:
    """The .npy first, then its sidecar, each written then renamed: a sidecar on disk means the shard is whole."""
    target = shards / f"{name}.npy"
    tmp = shards / f"{name}.tmp{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(array))
    tmp.replace(target)
    sidecar = {
        "key": key,
        "rows": int(array.shape[0]),
        "bytes": target.stat().st_size,
        "sha256": _sha256(target),
        "unit": unit if isinstance(unit, str) else f"{len(unit)} files from '{unit[0]}'" if unit else "",
        "paths": list(paths),
        "skipped": skipped,
    }
    _write_json(shards / f"{name}.json", sidecar)


def _finish(root, key, description, names, extractor, extractor_config, dtype, shard_size, group):
    """Write the manifest when every unit is done (under a torch.distributed `group`: rank 0, after a barrier)."""
    if group:
        torch.distributed.barrier()
        if torch.distributed.get_rank() != 0:
            torch.distributed.barrier()  # rank 0 writes the manifest
            return FeatureStore(root)
    shards = root / "shards"
    pending = [name for name in names if not _unit_done(shards, name, key)]
    if pending:
        log.info(
            f"store {root}: {len(pending)} of {len(names)} shards left to other parts (first {pending[0]})"
        )
        return None
    made_by = {"name": extractor.name, "config": extractor_config or {}, "weights": state_digest(extractor)}
    source = {k: v for k, v in description.items() if k in ("kind", "root")}
    source["items"] = len(description.get("files", description.get("shards", [])))
    _write_manifest(root, key, names, made_by, source, shard_size, dtype)
    if group:
        torch.distributed.barrier()
    return FeatureStore(root)


def _write_manifest(root: Path, key: str, names: list[str], made_by: dict, source: dict, shard_size, dtype):
    """manifest.json from the shards' sidecars, in the order of `names`."""
    shards = root / "shards"
    entries, start, dim, skipped = [], 0, None, 0
    for name in names:
        sidecar = json.loads((shards / f"{name}.json").read_text())
        if sidecar["rows"] and dim is None:
            dim = int(np.load(shards / f"{name}.npy", mmap_mode="r").shape[1])
        entry = {"name": name, "rows": sidecar["rows"], "start": start}
        entries.append(entry | {"bytes": sidecar["bytes"], "sha256": sidecar["sha256"]})
        start += sidecar["rows"]
        skipped += len(sidecar["skipped"])
    if dim is None:
        raise RuntimeError(
            f"no readable image in any of the {len(names)} units of the source of store '{root}'"
        )
    manifest = {
        "version": STORE_VERSION,
        "key": key,
        "extractor": made_by,
        "source": source,
        "shard_size": shard_size,
        "dim": dim,
        "dtype": dtype,
        "rows": start,
        "skipped": skipped,
        "shards": entries,
    }
    _write_json(root / MANIFEST, manifest)
    log.info(f"store {root}: {start} rows of {dim} dims in {len(names)} shards ({skipped} samples skipped)")


def write_store(
    root, shards, made_by: dict, source: dict | None = None, dtype: str = "float16"
) -> "FeatureStore":
    """A store from features computed elsewhere: `shards` yields (array (rows, D), paths or keys of the rows);
    `made_by` = {"name", "config", "weights"} says which extractor made them (the report checks it), `source`
    what they describe. The key is a hash of the three and the dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    source = source or {"kind": "arrays"}
    key = store_key(source, made_by.get("name", ""), made_by.get("config"), made_by.get("weights", ""), dtype)
    _check_store_key(root, key)
    names, shard_size = [], 0
    for j, (array, paths) in enumerate(shards):
        if len(paths) != len(array):
            raise ValueError(f"shard {j}: {len(array)} rows but {len(paths)} paths")
        names.append(f"{j:05d}")
        shard_size = max(shard_size, len(array))
        _write_shard(root / "shards", names[-1], key, np.asarray(array).astype(dtype), paths, [], "arrays")
    _write_manifest(root, key, names, made_by, source, shard_size, dtype)
    return FeatureStore(root)


# ---------------------------------------------------------------------------------------------------- reading


class FeatureStore:
    """A store opened for reading, checked against its manifest.

    verify: "size" (each shard's .npy exists, its header says (rows, dim) of the manifest's dtype, its size is
    the manifest's, its sidecar carries the manifest's key) or "hash" (also the sha256 of every shard).
    """

    def __init__(self, root, verify: str = "size"):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            partial = sorted((self.root / "shards").glob("*.json")) if (self.root / "shards").is_dir() else []
            raise StoreError(
                f"'{self.root}' has no {MANIFEST}: it is not a feature store"
                + (
                    f", or its extraction is unfinished ({len(partial)} shards done; run the missing parts)"
                    if partial
                    else ""
                )
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != STORE_VERSION:
            raise StoreError(
                f"store '{self.root}' is version {self.manifest.get('version')}, expected {STORE_VERSION}"
            )
        self.key, self.dim, self.dtype = self.manifest["key"], self.manifest["dim"], self.manifest["dtype"]
        self.shards = self.manifest["shards"]
        if verify not in ("size", "hash"):
            raise ValueError(f"verify must be 'size' or 'hash', got {verify!r}")
        for shard in self.shards:
            self._check(shard, verify)
        self._paths = None
        self._starts = np.array([shard["start"] for shard in self.shards] + [len(self)])

    def shard_of(self, rows) -> np.ndarray:
        """The index into `shards` of each global row (an empty shard shares its start with the next: the last
        shard starting at or before the row holds it)."""
        return np.searchsorted(self._starts, np.asarray(rows), side="right") - 1

    def _check(self, shard: dict, verify: str) -> None:
        name = shard["name"]
        npy, sidecar = self.root / "shards" / f"{name}.npy", self.root / "shards" / f"{name}.json"
        where = f"store '{self.root}' shard {name}"
        if not npy.is_file() or not sidecar.is_file():
            raise StoreError(
                f"{where} is missing ({npy.name} or {sidecar.name}); re-run the extraction of its part"
            )
        if npy.stat().st_size != shard["bytes"]:
            raise StoreError(
                f"{where} has {npy.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated or rewritten)"
            )
        try:
            array = np.load(npy, mmap_mode="r")
        except ValueError as error:
            raise StoreError(f"{where} is not a readable .npy file: {error}") from None
        rows = shard["rows"]
        expected = (rows, self.dim) if rows else array.shape
        if array.shape != expected or (rows and array.dtype != np.dtype(self.dtype)):
            raise StoreError(
                f"{where} holds {array.shape} {array.dtype}, the manifest says ({rows}, {self.dim}) {self.dtype}"
            )
        if json.loads(sidecar.read_text()).get("key") != self.key:
            raise StoreError(f"{where} was written under another key (another extractor, weights or source)")
        if verify == "hash" and _sha256(npy) != shard["sha256"]:
            raise StoreError(f"{where} does not match its sha256 in the manifest (the file changed)")

    def __len__(self) -> int:
        return self.manifest["rows"]

    @property
    def paths(self) -> "StorePaths":
        """The path (folder) or key (webdataset) of every row, in row order: a sequence that reads a shard's
        sidecar when one of its rows is asked for (12M paths would take a few GB as one list)."""
        if self._paths is None:
            self._paths = StorePaths(self)
        return self._paths

    @property
    def skipped(self) -> list[dict]:
        return [s for shard in self.shards for s in self._sidecar(shard["name"])["skipped"]]

    def _sidecar(self, name: str) -> dict:
        return json.loads((self.root / "shards" / f"{name}.json").read_text())

    def shard_arrays(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, memory-mapped (rows, D) array) of each non-empty shard, in order."""
        for shard in self.shards:
            if shard["rows"]:
                yield shard["start"], np.load(self.root / "shards" / f"{shard['name']}.npy", mmap_mode="r")

    def features(self) -> torch.Tensor:
        """Every row as one (N, D) float32 tensor: for stores that fit in memory (the replication cache)."""
        out = torch.empty(len(self), self.dim, dtype=torch.float32)
        for start, array in self.shard_arrays():
            out[start : start + len(array)] = torch.from_numpy(np.asarray(array, dtype=np.float32))
        return out

    def rows_at(self, indices) -> torch.Tensor:
        """(len(indices), D) float32 features of the given global rows (random access through the memory map)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        which = self.shard_of(indices)
        for number in np.unique(which):
            shard = self.shards[number]
            array = np.load(self.root / "shards" / f"{shard['name']}.npy", mmap_mode="r")
            mask = which == number
            out[mask] = array[indices[mask] - shard["start"]]
        return torch.from_numpy(out)


class StorePaths(Sequence):
    """The row names of a store as a read-only sequence, one shard's sidecar in memory at a time (plus the last
    few read). Compares equal to a list of the same names."""

    KEEP = 4  # sidecars kept in memory

    def __init__(self, store: FeatureStore):
        self.store = store
        self._cache: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.store)

    def _shard_paths(self, number: int) -> list[str]:
        if number not in self._cache:
            if len(self._cache) >= self.KEEP:
                self._cache.pop(next(iter(self._cache)))
            self._cache[number] = self.store._sidecar(self.store.shards[number]["name"])["paths"]
        return self._cache[number]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a store of {len(self)} rows")
        number = int(self.store.shard_of(index))
        return self._shard_paths(number)[index - self.store.shards[number]["start"]]

    def __iter__(self):
        for number, shard in enumerate(self.store.shards):
            if shard["rows"]:
                yield from self._shard_paths(number)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Sequence)
            and len(other) == len(self)
            and all(a == b for a, b in zip(self, other, strict=True))
        )
