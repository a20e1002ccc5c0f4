"""The SSCD copy-detection network (facebookresearch/sscd-copy-detection): a ResNet-50 / ResNeXt-101 32x4d trunk,
GeM pooling (p=3) and a linear projection; and reading its released checkpoints (TorchScript or state dict)."""

import zipfile
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from src.utils.checkpoints import load_checkpoint

SSCD_ARCHS = {"resnet50": ((3, 4, 6, 3), 1, 64, 512), "resnext101": ((3, 4, 23, 3), 32, 4, 1024)}


class GeMPool(nn.Module):
    """Global generalised-mean pooling (SSCD `GlobalGeMPool2d`): (B, C, H, W) -> (B, C),
    (mean over H*W of clamp(x, eps)^p)^(1/p). p=3 in SSCD; p=1 is average pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = float(p), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


def build_sscd(arch: str = "resnet50", dim: int | None = None, gem_p: float = 3.0) -> ResNet:
    """The SSCD descriptor network, randomly initialised: (B, 3, H, W) -> (B, dim) (not normalised).

    A torchvision ResNet (ResNeXt-101 32x4d through groups=32, width_per_group=4) whose average pool is GeM(p=3)
    and whose `fc` is the linear projection to `dim`: SSCD's torchvision variant (`Model` with a TV_ backbone) and
    the layout of its `*.torchvision.pt` state dicts. The official code L2-normalises after `fc`; `Extractor.forward`
    does it here. Classy Vision checkpoints (`*.classy.pt`) use other key names and are not supported.
    """
    if arch not in SSCD_ARCHS:
        raise ValueError(f"build_sscd: arch={arch!r}; expected one of {sorted(SSCD_ARCHS)}.")
    layers, groups, width, default_dim = SSCD_ARCHS[arch]
    net = ResNet(
        Bottleneck, list(layers), num_classes=dim or default_dim, groups=groups, width_per_group=width
    )
    net.avgpool = GeMPool(gem_p)  # ResNet.forward flattens after the pool, a no-op on (B, C)
    return net


SSCD_WEIGHTS = (
    "download sscd_disc_mixup.torchscript.pt (or the .torchvision.pt state dict) from "
    "facebookresearch/sscd-copy-detection and pass extractor.checkpoint=<that file>"
)


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold the model's code under `<archive>/code/`; torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def read_sscd_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A state dict for `build_sscd` from a torch.save file: a plain state dict or one under "state_dict" /
    "model", with a "module." / "backbone." / "model." prefix shared by all keys removed."""
    state = load_checkpoint(checkpoint, "SSCD weights", make=SSCD_WEIGHTS)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"SSCDExtractor: {checkpoint} is neither TorchScript nor a state dict of tensors; use the official "
            "*.torchscript.pt or *.torchvision.pt file, or a state dict of build_sscd(arch)."
        )
    for prefix in ("module.", "backbone.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
