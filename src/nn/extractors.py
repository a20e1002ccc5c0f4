"""Image descriptors for retrieval evaluation and replication detection.

Each extractor declares its own preprocessing (`transform()`: PIL RGB image -> (3, H, W) tensor) and maps a batch
of preprocessed images to L2-normalised float32 descriptors (`forward`), so that similarity is a dot product
(docs/replication.md#split-product-similarity, docs/style.md#evaluation-protocol). Baseline preprocessing
follows the official CSD `main_sim.py` (docs/style.md#evaluation-protocol): CLIP uses its own preprocessing,
CSD its `branch0`, DINO / VGG Resize256 -> CenterCrop224 with ImageNet mean/std. Replication analysis follows
the DCR `diff_retrieval.py` instead
(docs/replication.md#split-product-similarity): Resize256 -> CenterCrop224 -> Normalize(0.5, 0.5) for every
extractor. Extractors used by both take `preprocess="native" | "dcr"`; the default keeps each one's native
preprocessing (what the retrieval configs expect) except SSCD, which defaults to "dcr".

Inputs must be RGB PIL images: convert grayscale / RGBA / palette images in the dataset (`image.convert("RGB")`).
The transforms raise on other modes instead of guessing how to drop alpha or expand gray.
Extractors are frozen: parameters do not require grad, `forward` runs under no_grad, and the module stays in eval
mode even when a parent calls `.train()`.
"""

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from src.nn.backbones import build_backbone, create_open_clip
from src.nn.sscd import SSCD_ARCHS, GeMPool, build_sscd, is_torchscript, read_sscd_state_dict  # noqa: F401

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DCR_MEAN = DCR_STD = (0.5, 0.5, 0.5)
POOLS = ("token", "avg", "tokens")
PREPROCESS = ("native", "dcr")


def require_rgb(image: Image.Image) -> Image.Image:
    """First stage of every transform: reject non-RGB images with a message saying where to convert them."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"Extractor transforms take PIL images; got {type(image).__name__}.")
    if image.mode != "RGB":
        raise ValueError(
            f"Extractor transforms take RGB PIL images; got mode {image.mode!r}. Convert in the dataset with "
            "image.convert('RGB') (for RGBA, composite on a background first if transparency matters)."
        )
    return image


def resize_crop_transform(
    image_size: int,
    resize_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR,
) -> T.Compose:
    """Resize(shorter side) -> CenterCrop -> ToTensor -> Normalize: PIL RGB -> (3, image_size, image_size)."""
    return T.Compose(
        [
            require_rgb,
            T.Resize(resize_size, interpolation=interpolation),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def dcr_transform(image_size: int = 224, resize_size: int | None = None) -> T.Compose:
    """The DCR replication preprocessing (`diff_retrieval.py`, docs/replication.md#split-product-similarity):
    Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize(0.5, 0.5). For a network fed at another size, the
    resize keeps DCR's 256/224 ratio."""
    if resize_size is None:
        resize_size = round(image_size * 256 / 224)
    return resize_crop_transform(image_size, resize_size, DCR_MEAN, DCR_STD)


def _check_preprocess(owner: str, preprocess: str, choices: tuple[str, ...] = PREPROCESS) -> str:
    if preprocess not in choices:
        raise ValueError(f"{owner}: preprocess={preprocess!r}; expected one of {choices}.")
    return preprocess


def _name_of(pretrained) -> str:
    """A short file-name-safe label for a weights choice (tag, checkpoint path, true/None)."""
    if isinstance(pretrained, str):
        return Path(pretrained).stem if ("/" in pretrained or "." in pretrained) else pretrained
    return "pretrained" if pretrained else "random"


class Extractor(nn.Module):
    """Base class: `transform()` gives the preprocessing, `forward` the L2-normalised descriptors.

    Subclasses set `name` (used in file names and logs) and `dim`, and implement `embed`
    ((B, 3, H, W) preprocessed -> (B, dim) unnormalised).
    """

    name: str = "extractor"
    dim: int

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, dim) L2-normalised float32 descriptors."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{self.name}: expected preprocessed images of shape (B, 3, H, W), got {tuple(images.shape)}."
            )
        param = next(self.parameters(), None)
        if param is not None:  # follow the weights, e.g. after extractor.half().cuda()
            images = images.to(device=param.device, dtype=param.dtype)
        # Normalise in float32: fp16 sums of squares over thousands of dims overflow.
        return F.normalize(self.embed(images).float(), dim=-1)

    def train(self, mode: bool = True):
        # A frozen descriptor: BatchNorm/dropout must not switch to training behaviour when a parent
        # LightningModule calls .train() on all its children.
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


class PixelExtractor(Extractor):
    """Raw-pixel baseline: size x size thumbnail, flattened, centred (and scaled), L2-normalised.

    normalize (docs/replication.md#pixel-descriptors-and-colour-drift):
    - "global" (default, the figures of every published study here): one mean removed over all three channels;
      the dot product is the Pearson correlation of the thumbnails. A colour cast (each channel scaled and
      shifted on its own) lowers it.
    - "channel": each channel standardised on its own (mean removed, divided by its standard deviation); the
      descriptor, and so the similarity, does not change under a per-channel positive scale and shift.
    - "gray": the thumbnail's luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B), mean removed; size x size
      dims; ignores hue casts but not a change of one channel's contrast.
    A constant image (or channel, with "channel") maps to zeros.
    """

    NORMALIZE = ("global", "channel", "gray")
    LUMA = (0.299, 0.587, 0.114)

    def __init__(self, size: int = 32, normalize: str = "global"):
        super().__init__()
        if normalize not in self.NORMALIZE:
            raise ValueError(f"PixelExtractor: normalize={normalize!r}; expected one of {self.NORMALIZE}.")
        self.size = size
        self.normalize = normalize
        self.dim = (1 if normalize == "gray" else 3) * size * size
        self.name = f"pixels{size}" if normalize == "global" else f"pixels{size}_{normalize}"
        self._freeze()

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return T.Compose([require_rgb, T.Resize((self.size, self.size)), T.ToTensor()])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"{self.name}: expected {self.size}x{self.size} images, got {tuple(images.shape[-2:])}."
            )
        if self.normalize == "gray":
            luma = torch.tensor(self.LUMA, dtype=images.dtype, device=images.device)
            flat = torch.einsum("bchw,c->bhw", images, luma).flatten(1)
            return flat - flat.mean(dim=1, keepdim=True)
        if self.normalize == "channel":
            per_channel = images.flatten(2)  # (B, 3, size*size)
            centred = per_channel - per_channel.mean(dim=2, keepdim=True)
            std = centred.pow(2).mean(dim=2, keepdim=True).sqrt()
            return (centred / std.clamp_min(1e-6)).flatten(1)
        flat = images.flatten(1)  # (B, 3*size*size)
        return flat - flat.mean(dim=1, keepdim=True)


class ColorHistogramExtractor(Extractor):
    """Joint RGB colour histogram with bins^3 cells (fraction of pixels per cell), L2-normalised.

    Pixels are quantised from their 8-bit values (value * bins // 256), so cell edges are exact. The image is
    resized to image_size x image_size first only to bound the cost; a histogram ignores the aspect ratio.
    """

    def __init__(self, bins: int = 8, image_size: int = 64):
        super().__init__()
        if not 1 <= bins <= 256:
            raise ValueError(f"ColorHistogramExtractor: bins={bins} must be in [1, 256].")
        self.bins = bins
        self.image_size = image_size
        self.dim = bins**3
        self.name = f"color_hist{bins}"
        self._freeze()

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return T.Compose([require_rgb, T.Resize((self.image_size, self.image_size)), T.ToTensor()])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.min() < 0 or images.max() > 1:
            raise ValueError(
                f"{self.name}: expected unnormalised images in [0, 1] (ToTensor output), got values in "
                f"[{images.min().item():.3f}, {images.max().item():.3f}]; use this extractor's transform()."
            )
        levels = (images.float() * 255).round().long() * self.bins // 256  # (B, 3, H, W) in [0, bins)
        cell = (levels[:, 0] * self.bins + levels[:, 1]) * self.bins + levels[:, 2]  # (B, H, W)
        cell = cell.flatten(1)  # (B, H*W)
        counts = torch.zeros(cell.shape[0], self.dim, device=images.device)
        counts.scatter_add_(1, cell, torch.ones_like(cell, dtype=counts.dtype))
        return counts / cell.shape[1]


class GramExtractor(Extractor):
    """VGG Gram-matrix style descriptor (docs/style.md#evaluation-protocol, docs/style.md#table-1 "VGG Gram"
    row; official CSD `main_sim.py`).

    The official code takes torchvision VGG16 (IMAGENET1K_V1 = timm "vgg16.tv_in1k") `features(x)`, i.e. the last
    conv block after its max-pool, forms G = F F^T for F (B, C, H*W), flattens the full C x C matrix and
    L2-normalises; the evaluation then PCAs to 1024 dims (done by the evaluation entry point, not here).
    We keep the upper triangle (diagonal included) with off-diagonal entries scaled by sqrt(2): the map is an
    isometry on symmetric matrices, so dot products, norms and PCA equal the full flattening at half the size
    (C(C+1)/2 dims, 131,328 for VGG). G is divided by H*W (a scale, removed by the L2 normalisation).

    layer indexes timm's feature taps (`forward_intermediates`): for VGG 0-4 are the conv stages before their
    max-pool and 5 (= -1) the trunk output after the last max-pool, the official choice.
    """

    def __init__(
        self,
        model: str = "vgg16",
        pretrained: bool | str | None = None,
        layer: int = -1,
        image_size: int = 224,
        resize_size: int = 256,
    ):
        super().__init__()
        net = build_backbone(model, source="timm", pretrained=pretrained).model
        if not hasattr(net, "forward_intermediates"):
            raise ValueError(
                f"GramExtractor: timm model {model!r} has no forward_intermediates; use a CNN like vgg16."
            )
        taps = len(net.feature_info)
        if not -taps <= layer < taps:
            raise ValueError(
                f"GramExtractor: layer={layer} out of range for {model!r} ({taps} feature taps)."
            )
        self.layer = layer % taps
        channels = net.feature_info[self.layer]["num_chs"]
        net.prune_intermediate_layers([self.layer], prune_head=True)  # drops VGG's 100M-parameter fc head
        self.net = net
        rows, cols = torch.triu_indices(channels, channels)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        weight = torch.where(rows == cols, 1.0, math.sqrt(2.0))
        self.register_buffer("weight", weight, persistent=False)
        self.image_size, self.resize_size = image_size, resize_size
        self.dim = channels * (channels + 1) // 2
        self.name = f"gram_{model}_{_name_of(pretrained)}_l{self.layer}"
        self._freeze()

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return resize_crop_transform(self.image_size, self.resize_size, IMAGENET_MEAN, IMAGENET_STD)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        (fmap,) = self.net.forward_intermediates(
            images, indices=[self.layer], intermediates_only=True, stop_early=True
        )
        # float32: a Gram entry sums H*W products of post-ReLU activations and overflows fp16.
        feats = fmap.float().flatten(2)  # (B, C, H*W)
        gram = feats @ feats.transpose(1, 2) / feats.shape[-1]  # (B, C, C)
        return gram[:, self.rows, self.cols] * self.weight  # (B, C(C+1)/2)


class OpenCLIPExtractor(Extractor):
    """CLIP image embedding (`encode_image`, projection included) with CLIP's own preprocessing.

    preprocess="native" (default): open_clip's validation transform for the model (Resize shorter side bicubic ->
    CenterCrop -> OpenAI mean/std for the OpenAI weights), as in the official CSD baselines
    (docs/style.md#evaluation-protocol).
    preprocess="dcr": the DCR replication transform (docs/replication.md#split-product-similarity) at the
    model's input size s: Resize(round(s * 256 / 224)) -> CenterCrop(s) -> Normalize(0.5, 0.5), i.e.
    Resize256/CenterCrop224 at 224 px. OpenAI tags switch on QuickGELU (see `create_open_clip`).
    """

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str | None = "openai",
        image_size: int | None = None,
        preprocess: str = "native",
    ):
        super().__init__()
        self.preprocess = _check_preprocess("OpenCLIPExtractor", preprocess)
        self.visual = create_open_clip(model, pretrained, image_size).visual  # the text tower is dropped
        self.preprocess_cfg = dict(self.visual.preprocess_cfg)
        dim = getattr(self.visual, "output_dim", None)
        self.dim = dim or _probe_dim(self.visual, self.preprocess_cfg["size"])
        # Only non-default preprocessing is named, so native names (and caches keyed by them) stay as they were.
        suffix = "" if preprocess == "native" else f"_{preprocess}"
        self.name = f"clip_{model}_{_name_of(pretrained)}{suffix}"
        self._freeze()

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        import open_clip

        cfg = self.preprocess_cfg
        if self.preprocess == "dcr":
            size = cfg["size"]
            if not isinstance(size, int):
                if size[0] != size[1]:
                    raise ValueError(f"{self.name}: preprocess='dcr' needs a square input size, got {size}.")
                size = size[0]
            return dcr_transform(size)
        clip_transform = open_clip.image_transform(
            cfg["size"],
            is_train=False,
            mean=cfg["mean"],
            std=cfg["std"],
            interpolation=cfg["interpolation"],
            resize_mode=cfg["resize_mode"],
            fill_color=cfg["fill_color"],
        )
        return T.Compose([require_rgb, clip_transform])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class TimmExtractor(Extractor):
    """A timm network's descriptor: the class token ("token", DINO's descriptor) or the mean of the patch tokens
    ("avg"; for CNNs timm's own global average pool). ViT tokens are taken after the final norm.
    "tokens": every output token (a ViT's class and patch tokens; a CNN's last feature map, one token per
    position) flattened into one vector, for the split-product similarity of the partial-copy benchmark
    (docs/replication.md#split-product-similarity); `split_chunks` is then the number of tokens.

    Preprocessing: Resize(resize_size) -> CenterCrop(image_size) -> Normalize(mean, std).
    preprocess="native" (default): mean/std default to the weights' own (ImageNet for DINO, the paper's choice,
    docs/style.md#evaluation-protocol). preprocess="dcr": Normalize(0.5, 0.5) as the DCR replication code
    (docs/replication.md#split-product-similarity); with the default sizes this is DCR's Resize256 ->
    CenterCrop224. mean/std cannot be given with "dcr".
    """

    def __init__(
        self,
        model: str = "vit_base_patch16_224.dino",
        pretrained: bool | str | None = None,
        pool: str = "token",
        image_size: int = 224,
        resize_size: int = 256,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        preprocess: str = "native",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"TimmExtractor: pool={pool!r}; expected one of {POOLS}.")
        self.preprocess = _check_preprocess("TimmExtractor", preprocess)
        if preprocess == "dcr" and (mean is not None or std is not None):
            raise ValueError(
                f"TimmExtractor: preprocess='dcr' normalises with mean=std=0.5; got mean={mean}, std={std}. "
                "Leave mean/std unset, or use preprocess='native' with your own mean/std."
            )
        backbone = build_backbone(model, source="timm", pretrained=pretrained, image_size=image_size)
        self.net = backbone.model
        self.is_vit = hasattr(self.net, "num_prefix_tokens")
        if pool == "token" and getattr(self.net, "cls_token", None) is None:
            raise ValueError(
                f"TimmExtractor: pool='token' needs a model with a class token; {model!r} has none."
            )
        self.pool = pool
        self.image_size, self.resize_size = image_size, resize_size
        if preprocess == "dcr":
            self.mean, self.std = DCR_MEAN, DCR_STD
        else:
            self.mean = tuple(mean) if mean is not None else backbone.mean
            self.std = tuple(std) if std is not None else backbone.std
        self.dim = backbone.feature_dim
        if pool == "tokens":
            self.split_chunks = _probe_tokens(self, image_size)
            self.dim *= self.split_chunks
        # Only non-default preprocessing is named, so native names (and caches keyed by them) stay as they were.
        suffix = "" if preprocess == "native" else f"_{preprocess}"
        self.name = f"timm_{model}_{_name_of(pretrained)}_{pool}{suffix}"
        self._freeze()

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return resize_crop_transform(self.image_size, self.resize_size, self.mean, self.std)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, T, D): a ViT's output tokens after the final norm, or a CNN's last map as (B, h * w, C)."""
        features = self.net.forward_features(images)
        return features if self.is_vit else features.flatten(2).transpose(1, 2)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool == "tokens":
            return self.tokens(images).flatten(1)
        if not self.is_vit:
            return self.net(images)  # (B, C): timm's pooled pre-logits (num_classes=0)
        tokens = self.net.forward_features(images)  # (B, T, D) after the final norm
        if self.pool == "token":
            return tokens[:, 0]
        return tokens[:, self.net.num_prefix_tokens :].mean(dim=1)


# SSCD trunks (facebookresearch/sscd-copy-detection, sscd/models/model.py): (Bottleneck blocks per stage, groups,
# width per group, default descriptor size). disc_mixup is ResNet-50 / 512-d, disc_large ResNeXt-101 32x4d / 1024-d.
SSCD_PREPROCESS = ("dcr", "native", "native_320")


class SSCDExtractor(Extractor):
    """SSCD copy-detection descriptor (Pizzi et al. 2022; facebookresearch/sscd-copy-detection), the extractor of
    the DCR replication studies (docs/replication.md#feature-extractors): ResNet-50 (`sscd_disc_mixup`, 512-d)
    or ResNeXt-101 32x4d (`sscd_disc_large`, 1024-d) -> GeM pooling (p=3) -> linear -> L2 normalisation.

    checkpoint: an official TorchScript file (`sscd_disc_mixup.torchscript.pt`; loaded with torch.jit.load, `arch`
    and `dim` are then ignored: the file defines the network), a state dict of `build_sscd(arch, dim)` (the official
    `*.torchvision.pt` layout), or None for random weights (tests only).
    preprocess: "dcr" (default): Resize256 -> CenterCrop224 -> Normalize(0.5, 0.5), the DCR `diff_retrieval.py`
    choice (docs/replication.md#split-product-similarity; DCR's `embedding_search` uses the same sizes with
    ImageNet mean/std instead).
    "native": SSCD README `small_288`, Resize(288) on the shorter side, no crop, ImageNet mean/std; images of
    different aspect ratios give different sizes, so batch them one at a time or by aspect ratio.
    "native_320": SSCD README `skew_320`, Resize((320, 320)) ignoring the aspect ratio, ImageNet mean/std.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        arch: str = "resnet50",
        dim: int | None = None,
        preprocess: str = "dcr",
    ):
        super().__init__()
        self.preprocess = _check_preprocess("SSCDExtractor", preprocess, SSCD_PREPROCESS)
        if arch not in SSCD_ARCHS:
            raise ValueError(f"SSCDExtractor: arch={arch!r}; expected one of {sorted(SSCD_ARCHS)}.")
        if checkpoint is None:
            self.net = build_sscd(arch, dim)
        else:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"SSCDExtractor: checkpoint {path} does not exist; download e.g. sscd_disc_mixup.torchscript.pt "
                    "from facebookresearch/sscd-copy-detection and pass its local path."
                )
            if is_torchscript(path):
                with (
                    warnings.catch_warnings()
                ):  # torch.jit is deprecated, but the official releases are TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    self.net = torch.jit.load(str(path), map_location="cpu")
            else:
                self.net = build_sscd(arch, dim)
                state = read_sscd_state_dict(path)
                ours = self.net.state_dict()
                resized = [k for k, v in state.items() if k in ours and v.shape != ours[k].shape]
                if resized:
                    raise ValueError(
                        f"SSCDExtractor: {path} does not fit build_sscd(arch={arch!r}, dim={dim}): {resized[0]} "
                        f"has shape {tuple(state[resized[0]].shape)}, expected {tuple(ours[resized[0]].shape)} "
                        f"({len(resized)} tensors differ). Check arch and dim (fc.weight is (dim, 2048))."
                    )
                missing, unexpected = self.net.load_state_dict(state, strict=False)
                if missing or unexpected:
                    raise ValueError(
                        f"SSCDExtractor: {path} does not fit build_sscd(arch={arch!r}, dim={dim}): missing keys "
                        f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                        f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(missing)} / {len(unexpected)}). "
                        "Check arch and dim, or use the official TorchScript file."
                    )
        self.dim = _probe_dim(self.net, 64)
        if dim is not None and dim != self.dim:
            raise ValueError(f"SSCDExtractor: dim={dim} but {checkpoint} gives {self.dim}-d descriptors.")
        if checkpoint is None:
            self.name = f"sscd_{arch}_random_{preprocess}"
        elif isinstance(self.net, torch.jit.ScriptModule):  # the file, not `arch`, defines the network
            self.name = f"sscd_{Path(checkpoint).stem}_{preprocess}"
        else:
            self.name = f"sscd_{arch}_{Path(checkpoint).stem}_{preprocess}"
        self._freeze()

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        if self.preprocess == "dcr":
            return dcr_transform(224, 256)
        size = 288 if self.preprocess == "native" else (320, 320)
        return T.Compose(
            [require_rgb, T.Resize(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class TrainedNetExtractor(Extractor):
    """A network trained here, read from its checkpoint with its preprocessing: Resize(short side = image_size,
    bicubic) -> CenterCrop -> Normalize(mean, std). Subclasses set `net`, `image_size`, `mean` and `std`."""

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return resize_crop_transform(
            self.image_size, self.image_size, self.mean, self.std, T.InterpolationMode.BICUBIC
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class CSDExtractor(TrainedNetExtractor):
    """A trained CSD style descriptor (docs/style.md#model: style-head embedding, dot-product similarity).

    Loads our Lightning checkpoints or the official release via `src.nn.csd.load_csd`. Preprocessing is the
    official `branch0`: Resize(image_size, bicubic) -> CenterCrop(image_size) -> Normalize(mean, std) with the
    values stored alongside the checkpoint.
    """

    def __init__(self, checkpoint: str):
        super().__init__()
        from src.nn.csd import load_csd  # lazy: keeps this module importable without the CSD code

        self.net, info = load_csd(checkpoint)
        missing = {"image_size", "mean", "std"} - set(info)
        if missing:
            raise ValueError(f"CSDExtractor: load_csd({checkpoint!r}) info lacks {sorted(missing)}.")
        self.image_size = int(info["image_size"])
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.dim = _probe_dim(self.net, self.image_size)
        self.name = f"csd_{Path(checkpoint).stem}"
        self._freeze()


class CopyDescriptorExtractor(TrainedNetExtractor):
    """The project's copy descriptor, trained with the SSCD recipe (docs/replication.md#a-copy-descriptor-trained-here;
    `python -m src.train experiment=sscd_quickstart`): a timm trunk, GeM, a linear projection.

    checkpoint: our Lightning checkpoint (`<run>/checkpoints/last.ckpt`; the network and its preprocessing are
    read from it), or None for a randomly initialised network of `backbone` / `dim` at `image_size` (the
    untrained baseline, `input_norm` as the network's). Preprocessing: Resize(short side = image_size, bicubic) -> CenterCrop -> ImageNet
    normalisation, the training size and statistics.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        backbone: str = "resnet10t",
        dim: int = 128,
        image_size: int = 64,
        input_norm: str = "none",
        seed: int = 0,
    ):
        super().__init__()
        from src.nn.copy_descriptor import CopyDescriptorNet, load_copy_descriptor

        if checkpoint is None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.net = CopyDescriptorNet(backbone, dim, input_norm=input_norm)
            info = {"image_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
            self.name = f"copy_descriptor_{backbone}_random{seed}"
        else:
            self.net, info = load_copy_descriptor(checkpoint)
            self.name = f"copy_descriptor_{Path(checkpoint).parent.parent.name}_{Path(checkpoint).stem}"
        self.image_size = int(info["image_size"])
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.dim = _probe_dim(self.net, self.image_size)
        self._freeze()


@torch.no_grad()
def _probe_tokens(extractor: "TimmExtractor", size: int) -> int:
    """Number of output tokens of `extractor` at `size` px, from one blank image."""
    param = next(extractor.net.parameters())
    was_training = extractor.net.training
    extractor.net.eval()
    try:
        return extractor.tokens(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)).shape[
            1
        ]
    finally:
        extractor.net.train(was_training)


@torch.no_grad()
def _probe_dim(module: nn.Module, size) -> int:
    """Output width of `module` from one blank image (for networks that do not state it)."""
    h, w = (size, size) if isinstance(size, int) else size
    param = next(module.parameters())
    was_training = module.training
    module.eval()
    out = module(torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype))
    module.train(was_training)
    return out.shape[-1]
