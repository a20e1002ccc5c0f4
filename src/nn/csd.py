"""The CSD network: a backbone with a style head and a content head (docs/style.md#model; official code
CSD/model.py).

Lightning-free, so notebooks and extractors can use a trained descriptor without the training harness.
"""

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.losses import grad_reverse
from src.nn.backbones import Backbone, build_backbone
from src.utils.checkpoints import TRAIN_CSD, CheckpointError, checkpoint_kind, described, load_checkpoint

log = logging.getLogger(__name__)


class ProjectionHead(nn.Module):
    """The official code's `content_proj_head='custom'` head: Linear→GELU→Linear→Dropout, a residual, then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.shortcut = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim), nn.Dropout(dropout)
        )
        self.norm = nn.LayerNorm(out_dim)
        for layer in (self.shortcut, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.shortcut(x) + self.mlp(x))


def make_linear_head(backbone: Backbone, embed_dim: int | None) -> nn.Linear:
    """A head initialised from CLIP's visual projection (`x @ proj` == `Linear(proj.T)`), or a fresh linear layer
    for backbones without one (timm). For CLIP the head keeps proj's output size unless `embed_dim` says otherwise."""
    if backbone.projection is not None and embed_dim in (None, backbone.projection.shape[1]):
        head = nn.Linear(backbone.feature_dim, backbone.projection.shape[1], bias=False)
        head.weight.data.copy_(backbone.projection.T)
        return head
    if embed_dim is None:
        raise ValueError(
            f"Backbone {backbone.name!r} has no CLIP projection to initialise the heads from: set model.embed_dim "
            "(e.g. model.embed_dim=512)."
        )
    return nn.Linear(backbone.feature_dim, embed_dim)


class CSDNet(nn.Module):
    """Backbone + L2-normalised style and content embeddings.

    The content head sits behind a gradient-reversal layer (docs/style.md#model): its coefficient `alpha`
    follows the DANN schedule and is passed in by the training loop. Style embeddings are the descriptor used
    at inference.
    """

    def __init__(self, backbone: Backbone, embed_dim: int | None = None, content_head: str = "copy"):
        super().__init__()
        if content_head not in ("copy", "custom"):
            raise ValueError(
                f"model.content_head={content_head!r}: expected 'copy' (CLIP proj copy) or 'custom'."
            )
        self.backbone = backbone.model
        self.style_head = make_linear_head(backbone, embed_dim)
        if content_head == "copy":
            self.content_head = copy.deepcopy(self.style_head)
        else:
            self.content_head = ProjectionHead(backbone.feature_dim, self.style_head.out_features)
        self.embed_dim = self.style_head.out_features

    def forward(self, images: torch.Tensor, with_content: bool = False, reverse_alpha: float | None = None):
        """images (B, 3, H, W) -> features (B, F), style (B, P), content (B, P) or None.

        `reverse_alpha` puts a gradient-reversal layer with that coefficient in front of the content head (the
        adversarial mode); None feeds the features straight in (the official `--non_adv_train` mode)."""
        features = self.backbone(images)  # (B, F)
        style = F.normalize(self.style_head(features), dim=-1)
        content = None
        if with_content:
            content_in = features if reverse_alpha is None else grad_reverse(features, reverse_alpha)
            content = F.normalize(self.content_head(content_in), dim=-1)
        return features, style, content

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The CSD style descriptor: (B, 3, H, W) -> (B, P) L2-normalised."""
        return self.forward(images)[1]


class StyleEmbedder(nn.Module):
    """Wraps a CSDNet so that calling it returns only the style embedding (what retrieval and extractors need)."""

    def __init__(self, net: CSDNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images)


def load_csd(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a CSD descriptor for inference: returns (module images -> style embeddings, preprocessing info).

    Reads our Lightning checkpoints (the config that rebuilds the network is inside) and the official release's
    `checkpoint.pth` (`model_state_dict` with `backbone.*`, `last_layer_style`, `last_layer_content`: the OpenAI
    CLIP ViT-L/14 visual tower, docs/style.md#model; reported on learn2phoenix/CSD#8). Loaded with
    `weights_only=True`. The info dict has `image_size`, `mean`, `std`, `backbone`.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, "CSD checkpoint", make=TRAIN_CSD)
    kind = checkpoint_kind(ckpt)
    if kind == "CSDModule":
        hp = ckpt["hyper_parameters"]
        backbone_cfg = dict(
            hp["backbone"], pretrained=None
        )  # weights come from the checkpoint, not a download
        backbone = build_backbone(**backbone_cfg)
        net = CSDNet(backbone, hp.get("embed_dim"), hp.get("content_head", "copy"))
        state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
    elif "model_state_dict" in ckpt:
        backbone_cfg = {
            "name": "ViT-L-14",
            "source": "open_clip",
            "pretrained": None,
            "force_quick_gelu": True,
        }
        backbone = build_backbone(**backbone_cfg)
        net = CSDNet(backbone)
        state = ckpt["model_state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        mapped = {}
        for key, value in state.items():
            if key.startswith("backbone."):
                mapped[key] = value
            elif key == "last_layer_style":
                mapped["style_head.weight"] = value.T
            elif key == "last_layer_content":
                mapped["content_head.weight"] = value.T
        missing, unexpected = net.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(f"{path} is not an official CSD ViT-L/14 checkpoint: missing {missing[:5]}...")
    else:
        raise CheckpointError(
            f"CSD checkpoint '{path}' is {described(kind)}; expected a checkpoint of CSDModule or the official CSD "
            f"release's checkpoint.pth. To get one, {TRAIN_CSD}."
        )
    info = {
        "image_size": backbone.image_size,
        "mean": backbone.mean,
        "std": backbone.std,
        "backbone": backbone_cfg,
    }
    # Our checkpoints record the preprocessing the descriptor was trained with; it wins over the backbone default.
    info.update(
        {k: v for k, v in ckpt.get("hyper_parameters", {}).get("preprocess", {}).items() if v is not None}
    )
    return StyleEmbedder(net).eval(), info
