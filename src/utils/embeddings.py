"""Saved retrieval embeddings: one `.npz` that re-scores a descriptor without the images.

Keys: `query`, `database` (float16/float32 (Q, D), (N, D)), `query_labels`, `database_labels` (bool (Q, L), (N, L)),
`label_names`, `query_paths`, `database_paths` (str arrays), `root` (str), `descriptor` (str), `task` (how the set
is scored) and `split_chunks` (token positions of a split-product descriptor; 1 for a global one).
"""

import zipfile
from pathlib import Path

import numpy as np
import torch

KEYS = (
    "query",
    "database",
    "query_labels",
    "database_labels",
    "label_names",
    "query_paths",
    "database_paths",
    "root",
    "descriptor",
)


def save_embeddings(
    path: str | Path,
    query,
    database,
    query_labels,
    database_labels,
    label_names,
    query_paths,
    database_paths,
    root: str | Path = "",
    descriptor: str = "",
    half: bool = False,
    task: str = "retrieval",
    split_chunks: int = 1,
) -> Path:
    """Write the embeddings file; `half=True` stores float16 (as the official CSD code does) to halve the size.
    split_chunks: the token positions of a token descriptor scored by split product (1: a global descriptor)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if half else np.float32

    def arr(x, dt):
        return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(dt)

    np.savez(
        path,
        query=arr(query, dtype),
        database=arr(database, dtype),
        query_labels=arr(query_labels, bool),
        database_labels=arr(database_labels, bool),
        label_names=np.asarray(label_names, dtype=str),
        query_paths=np.asarray([str(p) for p in query_paths], dtype=str),
        database_paths=np.asarray([str(p) for p in database_paths], dtype=str),
        root=np.asarray(str(root)),
        task=np.asarray(str(task)),
        split_chunks=np.asarray(int(split_chunks)),
        descriptor=np.asarray(descriptor),
    )
    return path


def _not_embeddings(path: Path, found: str) -> ValueError:
    """The error for a file that is not an embeddings file, saying what was found and what writes one."""
    return ValueError(
        f"embeddings file '{path}' is not an .npz written by save_embeddings ({found}); write one with "
        "`python -m src.evaluate save_embeddings=true` (or use a training run's <run>/embeddings/test.npz)"
    )


def load_embeddings(path: str | Path) -> dict:
    """Read a file written by `save_embeddings`; embeddings come back as float32 torch tensors, labels as bool.

    Raises FileNotFoundError for a missing file and ValueError naming the file, what it holds instead and the
    command that writes one for a file that is not such an .npz (a text file, a pickle, another archive).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No embeddings file at {path} (written by `python -m src.evaluate save_embeddings=true` "
            "or by a training run's test stage as <run>/embeddings/test.npz)."
        )
    with open(path, "rb") as file:
        if not file.read(4).startswith(b"PK"):
            raise _not_embeddings(path, "not a numpy .npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise _not_embeddings(path, f"not a readable .npz archive: {type(error).__name__}: {error}") from None
    missing = [key for key in KEYS if key not in out]
    if missing:
        raise _not_embeddings(path, f"missing keys {missing}")
    for key in ("query", "database"):
        out[key] = torch.from_numpy(out[key].astype(np.float32))
    for key in ("query_labels", "database_labels"):
        out[key] = torch.from_numpy(out[key])
    for key in ("label_names", "query_paths", "database_paths"):
        out[key] = out[key].tolist()
    out["root"], out["descriptor"] = str(out["root"]), str(out["descriptor"])
    out["task"] = str(out["task"]) if "task" in out else "retrieval"  # files written before copy detection
    out["split_chunks"] = int(out["split_chunks"]) if "split_chunks" in out else 1
    return out
