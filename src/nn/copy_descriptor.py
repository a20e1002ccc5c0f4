"""The project's own copy-detection descriptor, trained with the SSCD recipe (docs/replication.md#a-copy-descriptor-
trained-here; `python -m src.train experiment=sscd_quickstart`): a timm convolutional trunk, GeM pooling (p = 3),
one linear projection, L2 normalisation: SSCD's model (Pizzi et al. 2022) at any size timm offers.
"""

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from src.nn.sscd import GeMPool
from src.utils.checkpoints import TRAIN_COPY_DESCRIPTOR, expect_module, load_checkpoint


class CopyDescriptorNet(nn.Module):
    """(B, 3, H, W) normalised images -> (B, dim) L2-normalised descriptors.

    backbone: a timm model whose `forward_features` gives a (B, C, h, w) map (ResNets, ConvNeXts, ...), built
    without weights (SSCD trains from scratch or from ImageNet weights; here always from scratch, or a local
    timm checkpoint through `pretrained`). The projection is initialised as SSCD's torchvision variant:
    Xavier-uniform weights, zero bias.

    input_norm: "none" (SSCD) or "channel": each image's channels standardised on their own before the trunk
    (instance normalisation without parameters), so a colour cast (each channel scaled and shifted) cannot
    change the descriptor: the invariance the pixel descriptor `normalize=channel` has, built in rather than
    learnt (the quickstart's choice, docs/replication.md#a-copy-descriptor-trained-here).

    output_stride: None (the backbone's own, 32 for ResNets) or 16 / 8: the last stages dilated instead of strided
    (timm's `output_stride`), so a 32 px input ends in a 2 x 2 or 4 x 4 map for GeM to pool rather than 1 x 1.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        dim: int = 128,
        pool_p: float = 3.0,
        pretrained=None,
        input_norm: str = "none",
        output_stride: int | None = None,
    ):
        super().__init__()
        if input_norm not in ("none", "channel"):
            raise ValueError(f"CopyDescriptorNet: input_norm={input_norm!r}; expected 'none' or 'channel'.")
        self.input_norm = input_norm
        kwargs = {"pretrained_cfg_overlay": {"file": str(pretrained)}} if pretrained else {}
        if output_stride is not None:
            kwargs["output_stride"] = int(output_stride)
        self.trunk = timm.create_model(
            backbone, pretrained=bool(pretrained), num_classes=0, global_pool="", **kwargs
        )
        self.pool = GeMPool(pool_p)
        self.fc = nn.Linear(self.trunk.num_features, dim)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "channel":
            images = F.instance_norm(images, eps=1e-5)
        features = self.trunk.forward_features(images)
        if features.ndim != 4:
            raise ValueError(
                f"CopyDescriptorNet: the backbone gives features of shape {tuple(features.shape)}; GeM pooling "
                "needs a (B, C, h, w) map: use a convolutional timm model (resnet18, resnet10t, convnext_atto, ...)."
            )
        return F.normalize(self.fc(self.pool(features)), dim=-1)


def load_copy_descriptor(path) -> tuple[CopyDescriptorNet, dict]:
    """A trained copy descriptor from our Lightning checkpoint (weights_only): (network in eval mode, info with
    `image_size`, `mean`, `std`, `backbone`, `dim`)."""
    path = Path(path)
    ckpt = load_checkpoint(path, "copy-descriptor checkpoint", make=TRAIN_COPY_DESCRIPTOR)
    expect_module(ckpt, path, ("CopyDescriptorModule",), make=TRAIN_COPY_DESCRIPTOR)
    hp = ckpt["hyper_parameters"]
    net = CopyDescriptorNet(
        hp["backbone"],
        hp["dim"],
        hp["pool_p"],
        input_norm=hp.get("input_norm", "none"),
        output_stride=hp.get("output_stride"),
    )
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    info = dict(
        hp["preprocess"], backbone=hp["backbone"], dim=hp["dim"], input_norm=hp.get("input_norm", "none")
    )
    return net.eval(), info
