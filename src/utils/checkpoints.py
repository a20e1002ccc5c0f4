"""Checkpoints and weight files: one loader that says what a file is when it is not what was asked for, and the
content digests that key caches and sample folders.

`load_checkpoint` reads every torch file the project opens (Lightning checkpoints, extractor weights, sampling
weights), always with `weights_only=True`, and turns each way a file can be wrong into one `CheckpointError`
naming the path, what was found (missing, a folder, empty, text, truncated, Python objects that weights-only
loading refuses, a checkpoint of another module) and the command that makes the right kind of file.

`file_digest` is a file's SHA-256, read in 1 MiB chunks and remembered in a small JSON table (under
$COPYSCOPE_CACHE_DIR, default ~/.cache/copyscope) beside the file's size and modification time, so a 5 GB
checkpoint is hashed once and re-hashed only after it changes. `state_digest` hashes the tensors of a module in
memory (for an extractor or a model that was never saved).
"""

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

CACHE_DIR_ENV = "COPYSCOPE_CACHE_DIR"
CHUNK = 1 << 20

TRAIN_DIFFUSION = "train one with `python -m src.train experiment=ddpm_quickstart` (or text2img_quickstart)"
TRAIN_CSD = (
    "train one with `python -m src.train experiment=csd_quickstart` and pass <run>/checkpoints/last.ckpt, "
    "or give the official CSD release's checkpoint.pth"
)
TRAIN_COPY_DESCRIPTOR = (
    "train one with `python -m src.train experiment=sscd_quickstart` and pass <run>/checkpoints/last.ckpt"
)


class CheckpointError(ValueError):
    """A checkpoint or weight file is not what was asked for; the message names the path, the kind found and the
    fix."""


def cache_dir() -> Path:
    """Where the project keeps small per-user tables (file digests): $COPYSCOPE_CACHE_DIR or ~/.cache/copyscope."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "copyscope")


def _read_digest_table(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: digests are recomputed, never trusted from a bad table


def file_digest(path) -> str:
    """SHA-256 (hex) of a file's bytes, remembered with the file's size and mtime (ns) so an unchanged file is
    not read again."""
    path = Path(path).resolve()
    stat = path.stat()
    table_path = cache_dir() / "file_digests.json"
    entry = _read_digest_table(table_path).get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    try:  # re-read before writing, so concurrent runs lose at most their own entry
        table = _read_digest_table(table_path)
        table[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": value}
        table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = table_path.with_name(f".{table_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        tmp.replace(table_path)
    except OSError:
        pass  # a read-only home: the digest is still right, only not remembered
    return value


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's state: every parameter and buffer's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path, what: str = "checkpoint", make: str = "", mmap: bool = False):
    """`torch.load(path, weights_only=True)` on the CPU, or a `CheckpointError` that names `path` as `what`,
    says what the file is instead, and ends with `make` (how to get the right file).

    `mmap=True` maps a zip-format file instead of reading it (cheap for inspecting a large checkpoint)."""
    path = Path(path)
    fix = f" To get one, {make}." if make else ""
    if not path.exists():
        raise FileNotFoundError(f"{what} '{path}' does not exist.{fix}")
    if path.is_dir():
        raise CheckpointError(f"{what} '{path}' is a folder, not a file.{fix}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} '{path}' is empty (0 bytes): an interrupted save or copy?{fix}")
    with open(path, "rb") as f:
        head = f.read(64)
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(b"PK\x03\x04") and not is_zip:
        raise CheckpointError(
            f"{what} '{path}' is truncated or corrupt: a zip archive ({size} bytes) without its end record, as "
            f"left by an interrupted save or copy. Copy or save it again.{fix}"
        )
    if not is_zip and not head.startswith(b"\x80"):  # neither torch's zip format nor a pickle
        shown = head[:24].decode("utf-8", errors="replace")
        raise CheckpointError(
            f"{what} '{path}' is not a torch checkpoint: it starts with {shown!r} "
            f"({'text' if _looks_like_text(head) else 'unknown binary data'}).{fix}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{what} '{path}' holds Python objects other than tensors and plain containers, which "
                "weights-only loading refuses (unpickling them could run arbitrary code). If you trust its "
                "source, load it once with torch.load(weights_only=False) and save only its tensors "
                f"(the state dict).{fix}"
            ) from None
        raise CheckpointError(f"{what} '{path}' is corrupt ({error}).{fix}") from None
    except (RuntimeError, EOFError, IndexError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{what} '{path}' could not be read as a torch file ({type(error).__name__}: {error}); it is "
            f"truncated, corrupt or of another format.{fix}"
        ) from None


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def record_module_class(module: torch.nn.Module, checkpoint: dict) -> None:
    """Store the module's import path in a checkpoint being saved (`on_save_checkpoint`), read by
    `checkpoint_kind` and `src.generation.load_module`."""
    checkpoint["module_class"] = f"{type(module).__module__}.{type(module).__qualname__}"


def checkpoint_kind(checkpoint) -> str:
    """What a loaded torch file is, in words: the Lightning module class (recorded as `module_class`, or
    recognised by its hyperparameters in older checkpoints), the official CSD release, a state dict, or else."""
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}, not a checkpoint dict"
    if "module_class" in checkpoint:
        return str(checkpoint["module_class"]).rsplit(".", 1)[-1]
    if "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
        hparams = checkpoint["hyper_parameters"]
        if "backbone" in hparams:
            return "CSDModule"
        if "unet" in hparams:
            return "Text2ImageModule" if "text_encoder" in hparams else "DDPMModule"
        return "a Lightning checkpoint of an unknown module"
    if "model_state_dict" in checkpoint:
        return "the official CSD release (model_state_dict)"
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return f"a state dict of {len(checkpoint)} tensors"
    return f"a dict with keys {sorted(map(str, checkpoint))[:6]}"


def expect_module(checkpoint, path, expected: tuple[str, ...], make: str = "") -> str:
    """The module class name of a Lightning checkpoint when it is one of `expected` (class names, e.g.
    ("DDPMModule", "Text2ImageModule")); else a CheckpointError naming the path, the kind found and `make`."""
    kind = checkpoint_kind(checkpoint)
    if kind in expected:
        return kind
    fix = f" To get one, {make}." if make else ""
    raise CheckpointError(
        f"'{path}' is {described(kind)}; expected a checkpoint of {' or '.join(expected)}.{fix}"
    )


def described(kind: str) -> str:
    """A `checkpoint_kind` in a sentence: 'a checkpoint of DDPMModule' for class names, descriptions as they
    are."""
    return f"a checkpoint of {kind}" if kind.endswith("Module") else kind
