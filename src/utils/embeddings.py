"""Saved retrieval embeddings: one `.npz` that re-scores a descriptor without the images.

Keys: `query`, `database` (float16/float32 (Q, D), (N, D)), `query_labels`, `database_labels` (bool (Q, L), (N, L)),
`label_names`, `query_paths`, `database_paths` (str arrays), `root` (str), `descriptor` (str).
"""

from pathlib import Path

import numpy as np
import torch


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
) -> Path:
    """Write the embeddings file; `half=True` stores float16 (as the official CSD code does) to halve the size."""
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
        descriptor=np.asarray(descriptor),
    )
    return path


def load_embeddings(path: str | Path) -> dict:
    """Read a file written by `save_embeddings`; embeddings come back as float32 torch tensors, labels as bool."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No embeddings file at {path} (written by `python -m src.evaluate save_embeddings=true` "
            "or by a training run's test stage as <run>/embeddings/test.npz)."
        )
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    for key in ("query", "database"):
        out[key] = torch.from_numpy(out[key].astype(np.float32))
    for key in ("query_labels", "database_labels"):
        out[key] = torch.from_numpy(out[key])
    for key in ("label_names", "query_paths", "database_paths"):
        out[key] = out[key].tolist()
    out["root"], out["descriptor"] = str(out["root"]), str(out["descriptor"])
    return out
