"""Image backbones from open_clip and timm behind one factory (Lightning-free).

`build_backbone` returns the network that maps normalised images to *pre-projection* features, plus what is needed
to feed it (mean, std, image size). For CLIP towers the visual projection is taken out of the network and handed
back separately: CSD initialises its style and content heads from copies of it (docs/style.md#model; official
CSD/model.py), and the zero-shot CLIP baseline is `features @ projection`.
"""

import difflib
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

SOURCES = ("open_clip", "timm")


@dataclass
class Backbone:
    """A feature network and how to feed it.

    model: (B, 3, image_size, image_size) normalised images -> (B, feature_dim) pre-projection features.
    projection: (feature_dim, embed_dim) CLIP visual `proj` removed from `model` (`model(x) @ projection` equals
        the CLIP image embedding before normalisation); None for timm backbones and CLIP towers without a
        separate `proj` (RN50: the attention pool projects).
    mean, std: per-channel normalisation the weights expect (applied by the caller's transform).
    """

    model: nn.Module
    feature_dim: int
    projection: torch.Tensor | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    name: str


def _unknown_name_error(name: str, source: str, known: list[str], list_call: str) -> ValueError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    return ValueError(f"Unknown {source} model {name!r}.{hint} List all with `{list_call}`.")


def create_open_clip(
    name: str, pretrained: str | None = None, image_size: int | None = None, **kwargs
) -> nn.Module:
    """The full open_clip model (`name` e.g. "ViT-B-16"), random init when `pretrained` is None.

    `pretrained` is an open_clip tag ("openai") or a local checkpoint file of the *whole* CLIP model (open_clip
    loads it strictly). Tags trained with QuickGELU (all OpenAI ones) switch `force_quick_gelu` on: open_clip's
    plain "ViT-B-16"/"ViT-L-14" configs use nn.GELU and would only warn, giving subtly wrong features. A local
    checkpoint of OpenAI weights needs `force_quick_gelu=True` passed explicitly (or a "-quickgelu" model name).
    Extra kwargs go to `open_clip.create_model`.
    """
    import open_clip

    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise _unknown_name_error(name, "open_clip", open_clip.list_models(), "open_clip.list_models()")
    if pretrained is False:
        pretrained = None
    if pretrained is not None and not isinstance(pretrained, str):
        raise ValueError(
            f"open_clip pretrained={pretrained!r}: expected a tag such as 'openai' (see "
            f"open_clip.list_pretrained_tags_by_model({name!r})), a checkpoint file path, or None for random init."
        )
    if pretrained and not os.path.isfile(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            raise ValueError(
                f"open_clip pretrained={pretrained!r} for {name!r} is neither a known tag nor an existing file. "
                f"Tags for this model: {open_clip.list_pretrained_tags_by_model(name)}."
            )
        if tag_cfg.get("quick_gelu", False) and "force_quick_gelu" not in kwargs:
            log.info(
                "open_clip %s/%s was trained with QuickGELU: setting force_quick_gelu=True", name, pretrained
            )
            kwargs["force_quick_gelu"] = True
    # pretrained_text=False: we only keep the image tower, so never fetch text-tower weights on our behalf.
    kwargs.setdefault("pretrained_text", False)
    return open_clip.create_model(name, pretrained=pretrained or None, force_image_size=image_size, **kwargs)


def _square_size(size, name: str) -> int:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise ValueError(
            f"Backbone {name!r} has a non-square input size {size}; only square inputs are supported."
        )
    return int(size[0])


def _build_open_clip(name: str, pretrained: str | None, image_size: int | None, **kwargs) -> Backbone:
    clip = create_open_clip(name, pretrained, image_size, **kwargs)
    visual = clip.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        projection = proj.detach().clone()  # (feature_dim, embed_dim)
        visual.proj = (
            None  # the tower now returns pooled pre-projection features (open_clip skips a None proj)
        )
        feature_dim = projection.shape[0]
    else:
        # e.g. CLIP RN50: the projection is fused into the attention pool, so there is nothing to split off.
        log.info("open_clip %s: no separate visual projection; features are the tower's output", name)
        projection = None
        feature_dim = visual.output_dim
    cfg = visual.preprocess_cfg
    return Backbone(
        model=visual,
        feature_dim=feature_dim,
        projection=projection,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        image_size=_square_size(visual.image_size, name),
        name=name,
    )


def _build_timm(name: str, pretrained: bool | str | None, image_size: int | None, **kwargs) -> Backbone:
    import timm
    import timm.data

    arch = name.split(".")[0]
    hub = name.startswith(("hf-hub:", "hf_hub:"))
    if not hub and not timm.is_model(arch):
        raise _unknown_name_error(name, "timm", timm.list_models(), "timm.list_models()")
    if not hub and "." in name and name not in timm.list_pretrained(f"{arch}.*"):
        raise ValueError(
            f"Unknown timm weight tag in {name!r}. Tagged names for {arch!r}: {timm.list_pretrained(f'{arch}.*')}."
        )
    if isinstance(pretrained, str):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"timm pretrained={pretrained!r} is not a file. Pass true (weights from the model name's tag), "
                "a local checkpoint path, or null for random init."
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=pretrained)
    model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **kwargs)
    data_cfg = timm.data.resolve_model_data_config(model)
    default_size = _square_size(data_cfg["input_size"][1:], name)
    if image_size is not None and image_size != default_size and hasattr(model, "set_input_size"):
        # ViTs have a fixed token grid: resample the position embedding to the new size. CNNs accept any size,
        # so for them image_size only changes the preprocessing.
        model.set_input_size(img_size=(image_size, image_size))
    return Backbone(
        model=model,
        feature_dim=model.num_features,
        projection=None,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        image_size=image_size or default_size,
        name=name,
    )


def build_backbone(
    name: str,
    source: str = "open_clip",
    pretrained: str | bool | None = None,
    image_size: int | None = None,
    **kwargs,
) -> Backbone:
    """Build an image backbone that outputs pre-projection features (see `Backbone`).

    source="open_clip": `name` is an open_clip model ("ViT-B-16", "ViT-L-14": 768-d / 1024-d features with a
        768x512 / 1024x768 projection, docs/style.md#model); `pretrained` a tag ("openai"), a full-CLIP
        checkpoint path, or None. Only the image tower is kept. OpenAI tags switch on QuickGELU (see
        `create_open_clip`). `image_size` maps to open_clip's `force_image_size`.
    source="timm": `name` is a timm model, optionally with a weight tag ("vit_base_patch16_224.dino",
        "resnet50"); `pretrained` true (download the tag's weights), a checkpoint path, or None/false. The
        classifier is removed (num_classes=0), so the output is timm's pooled pre-logits feature.
    Extra kwargs go to `open_clip.create_model` / `timm.create_model`.
    """
    if source == "open_clip":
        return _build_open_clip(name, pretrained, image_size, **kwargs)
    if source == "timm":
        return _build_timm(name, pretrained, image_size, **kwargs)
    raise ValueError(f"Unknown backbone source {source!r}; expected one of {SOURCES}.")
