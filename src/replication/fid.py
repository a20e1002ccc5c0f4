"""Fréchet Inception Distance between the training folder and the generated folder
(docs/replication.md#dcr-measurement).

DCR `metrics/fid.py` (pytorch-fid) takes the 2048-d pool3 features of the FID Inception network (the TensorFlow
graph of 2015-12-05), batch 50, of the training folder (`--val_dir`) and of the generations folder, with no
precomputed reference statistics, and returns ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

Here torchmetrics' `FrechetInceptionDistance` does the same with torch-fidelity's port of those weights
(`weights-inception-2015-12-05-6726825d.pth`, the 2048-d "pool3" output). Each image goes through DCR's transform,
Resize(299) -> CenterCrop(299), as uint8; the network maps it to (x - 128) / 128. DCR normalises with
Normalize(0.5, 0.5) before a pytorch-fid `InceptionV3`, whose default `normalize_input=True` would rescale a second
time; DCR's `metrics/inception.py` is not in its repository, so whether its FIDs saw doubly normalised input is
UNCONFIRMED. We feed the standard [-1, 1] input, so our FIDs are comparable with other pytorch-fid / torch-fidelity
numbers.

The Inception weights are read from a local file (`weights=`), or from torch hub's cache / downloaded when none
is given; without either, `build_fid_inception` says how to provide the file.
"""

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from src.data.images import folder_files, image_batches

log = logging.getLogger(__name__)

FID_IMAGE_SIZE = 299
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"


def build_fid_inception(weights=None) -> nn.Module:
    """The FID Inception network (torchmetrics `NoTrainInceptionV3` over torch-fidelity), returning (B, 2048)
    pool3 features of (B, 3, H, W) uint8 images.

    weights: a local copy of `FID_WEIGHTS_FILE` (torch-fidelity's state dict), or None for torch hub's cache
    (`<torch hub dir>/checkpoints/`), downloaded from `FID_WEIGHTS_URL` when missing. Raises ModuleNotFoundError
    without torch-fidelity, FileNotFoundError for a missing file, ValueError for a file of another network, and
    RuntimeError naming the file and where to put it when no weights are given and the download fails.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as error:  # pragma: no cover - torchmetrics is a dependency
        raise ModuleNotFoundError(
            "FID needs torchmetrics[image]: pip install 'torchmetrics[image]'"
        ) from error

    def build(path):
        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
        )

    path = None if weights is None else Path(weights).expanduser()
    if path is not None and not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights '{path}' do not exist; download {FID_WEIGHTS_URL} on a machine with network "
            "and pass its local path (fid.weights=PATH)"
        )
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "FID needs torch-fidelity (the FID Inception network): pip install 'torch-fidelity>=0.3,<0.4'"
        )
    if path is not None:
        try:
            return build(str(path))
        except Exception as error:  # noqa: BLE001 - torch.load / load_state_dict errors name no remedy
            raise ValueError(
                f"'{path}' is not a state dict of the FID Inception network ({FID_WEIGHTS_FILE} from "
                f"torch-fidelity): {type(error).__name__}: {str(error)[:300]}"
            ) from error
    try:
        return build(None)
    except OSError as error:  # URLError and HTTPError are OSErrors
        cache = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
        raise RuntimeError(
            f"FID needs the Inception weights {FID_WEIGHTS_FILE}; none were given and the download failed "
            f"({type(error).__name__}: {error}). Download {FID_WEIGHTS_URL} on a machine with network, then pass "
            f"fid.weights=PATH (analyse_replication(fid={{'weights': PATH}})) or copy it to {cache}"
        ) from error


def fid_transform(size: int = FID_IMAGE_SIZE) -> T.Compose:
    """DCR's FID preprocessing (`metrics/fid.py`): Resize(size) -> CenterCrop(size), as a (3, size, size) uint8
    tensor (the FID network normalises it)."""
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])


@torch.no_grad()
def fid_between_folders(
    real_dir,
    fake_dir,
    *,
    real_files: list[str] | None = None,
    fake_files: list[str] | None = None,
    weights=None,
    feature: nn.Module | None = None,
    batch_size: int = 50,
    num_workers: int = 0,
    device="cpu",
) -> dict:
    """FID between the images of `real_dir` (the training folder in DCR) and `fake_dir` (the generations).

    Args:
        real_dir, fake_dir: image folders, read recursively, or restricted to `real_files` / `fake_files`
            (paths relative to the folder, as `src.data.images.folder_files`).
        weights: local FID Inception weights (see `build_fid_inception`); ignored when `feature` is given.
        feature: another network mapping (B, 3, 299, 299) uint8 images to (B, D) features (torchmetrics'
            custom feature extractor), e.g. a small one in tests.
        batch_size: images per forward pass (50 in DCR).

    Returns:
        {"fid": float, "fid_num_real": int, "fid_num_fake": int, "fid_skipped": int} (images used per side and
        unreadable files skipped on both sides).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    network = feature if feature is not None else build_fid_inception(weights)
    metric = FrechetInceptionDistance(feature=network, normalize=False).to(device)
    transform = fid_transform()
    counts, skipped = {}, 0
    for name, folder, files in (("real", real_dir, real_files), ("fake", fake_dir, fake_files)):
        paths = folder_files(folder, files)
        counts[name], desc = 0, f"FID {name} images"
        for images, _ in image_batches(folder, paths, transform, batch_size, num_workers, desc):
            metric.update(images.to(device), real=name == "real")
            counts[name] += len(images)
        skipped += len(paths) - counts[name]
        if counts[name] < 2:
            raise ValueError(f"FID needs >= 2 readable images per folder; '{folder}' has {counts[name]}")
    return {
        "fid": float(metric.compute()),
        "fid_num_real": counts["real"],
        "fid_num_fake": counts["fake"],
        "fid_skipped": skipped,
    }
