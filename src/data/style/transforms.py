"""Image transforms for CSD training and evaluation (docs/style.md#augmentations; official CSD
`CSD/loss_utils.py`).

The official code has three branches:
- branch0 (`eval_transform`): the deterministic view used for retrieval evaluation.
- branch1 (`style_view_transform`): geometric-only views for the style losses. The paper drops photometric
  augmentations because colour, contrast and blur are part of style.
- branch2 (`photometric_view_transform`): colour-changing view, used only by the content loss
  (lambda_c > 0), where changing the colours is the point.
All take PIL RGB images and return normalised float tensors (3, H, W).
"""

import torch
from torchvision import transforms as T

InterpolationMode = T.InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> T.Compose:
    """branch0: Resize(shorter side = image_size, bicubic) -> CenterCrop -> ToTensor -> Normalize; (3, S, S)."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def style_view_transform(
    image_size: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    crop_scale=(0.08, 1.0),
    vflip_p: float = 0.3,
    rotation_degrees: float = 0,
) -> T.Compose:
    """branch1: a random geometric view for the style losses; (3, S, S).

    RandomResizedCrop(bicubic, scale=crop_scale) -> HFlip(0.5) -> VFlip(vflip_p) -> RandomRotation -> Normalize.
    The official code draws the rotation once at import with `np.random.seed(0); np.random.choice([0, 90,
    180, 270])`, which evaluates to 0, so the released model was trained without rotation: the default
    here is 0 and the rotation stage is left out when it is 0. No colour is changed
    (docs/style.md#augmentations).
    """
    stages = [
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(p=vflip_p),
    ]
    if rotation_degrees:
        stages.append(T.RandomRotation(rotation_degrees, interpolation=InterpolationMode.BILINEAR))
    stages += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(stages)


def photometric_view_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> T.Compose:
    """branch2: the content-loss view, which changes colours on purpose; (3, S, S).

    Resize/CenterCrop -> HFlip -> ColorJitter(0.5, 0.5, 0.5, 0.1) with p=0.6 -> with p=0.8 all of
    [invert, grayscale (3 channels), GaussianBlur(5, sigma in (0.1, 4))] -> Normalize.
    """
    return T.Compose(
        [
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.6),
            T.RandomApply(
                [
                    T.RandomInvert(p=1.0),
                    T.Grayscale(num_output_channels=3),
                    T.GaussianBlur(5, sigma=(0.1, 4.0)),
                ],
                p=0.8,
            ),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class MultiView:
    """Apply several transforms to one image and stack the results: PIL -> (V, 3, H, W).

    The official `ContrastiveTransformations` returns a list; stacking keeps the batch a single tensor
    (B, V, 3, H, W) after collation.
    """

    def __init__(self, transforms):
        if not transforms:
            raise ValueError("MultiView needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([transform(image) for transform in self.transforms])

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"MultiView({len(self.transforms)} views)"


def csd_views(
    image_size: int, mean=CLIP_MEAN, std=CLIP_STD, content_view: bool = False, **style_kwargs
) -> MultiView:
    """The training views of the official code: two branch1 style views, plus a branch2 view when content_view.

    With content_view=False the batch is (B, 2, 3, S, S); with True it is (B, 3, 3, S, S) and view -1 is the
    photometric one. The official code always builds the third view and ignores it when lambda_c = 0; we
    skip it then to save the decoding work. `style_kwargs` go to `style_view_transform`
    (crop_scale, vflip_p, rotation_degrees).
    """
    style = style_view_transform(image_size, mean, std, **style_kwargs)
    views = [style, style]
    if content_view:
        views.append(photometric_view_transform(image_size, mean, std))
    return MultiView(views)
