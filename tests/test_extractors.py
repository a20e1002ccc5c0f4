"""Descriptor extractors on tiny real networks with random weights (no downloads). CSDExtractor is tested with
the CSD code."""

import inspect
import json
from pathlib import Path

import hydra
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from src.nn.extractors import (
    ColorHistogramExtractor,
    Extractor,
    GramExtractor,
    OpenCLIPExtractor,
    PixelExtractor,
    TimmExtractor,
)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def extractors(tmp_path_factory) -> dict[str, Extractor]:
    torch.manual_seed(0)
    cfg = tmp_path_factory.mktemp("open_clip_cfg") / "tiny-test-ViT.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    return {
        "pixels": PixelExtractor(size=16),
        "hist": ColorHistogramExtractor(bins=4, image_size=32),
        "gram": GramExtractor("vgg11", pretrained=None, image_size=32, resize_size=36),
        "clip": OpenCLIPExtractor("tiny-test-ViT", pretrained=None),
        "dino_token": TimmExtractor("test_vit", pool="token", image_size=32, resize_size=36),
        "resnet_avg": TimmExtractor("test_resnet", pool="avg", image_size=32, resize_size=36),
    }


def random_image(height=40, width=52, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("key", ["pixels", "hist", "gram", "clip", "dino_token", "resnet_avg"])
def test_descriptor_shape_norm_dtype_and_frozen(extractors, key):
    extractor = extractors[key]
    transform = extractor.transform()
    images = torch.stack([transform(random_image(seed=i)) for i in range(3)])  # (3, 3, H, W)
    assert images.shape[:2] == (3, 3)
    descriptors = extractor(images)
    assert descriptors.shape == (3, extractor.dim) and descriptors.dtype == torch.float32
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(3))
    # the same image twice -> similarity 1
    twice = extractor(torch.stack([images[0], images[0]]))
    assert (twice[0] @ twice[1]).item() == pytest.approx(1.0, abs=1e-5)
    # frozen: no grads, and .train() from a parent module leaves it in eval mode
    assert not descriptors.requires_grad
    assert all(not p.requires_grad for p in extractor.parameters())
    assert not extractor.train().training
    assert extractor.name and isinstance(extractor.name, str)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_transforms_require_rgb(extractors, mode):
    image = random_image().convert(mode)
    with pytest.raises(ValueError, match="convert\\('RGB'\\)"):
        extractors["pixels"].transform()(image)
    with pytest.raises(ValueError, match="convert\\('RGB'\\)"):
        extractors["clip"].transform()(image)


def test_forward_rejects_wrong_layout(extractors):
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\)"):
        extractors["dino_token"](torch.rand(3, 32, 32))


def test_pixels_ignore_brightness_offset(extractors):
    extractor = extractors["pixels"]
    image = extractor.transform()(random_image()).unsqueeze(0) * 0.8
    torch.testing.assert_close(extractor(image), extractor(image + 0.1))


def test_histogram_counts_and_pixel_permutation_invariance(extractors):
    extractor = extractors["hist"]  # 4 bins per channel
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0  # half black, half white
    expected = torch.zeros(1, 64)
    expected[0, 0] = expected[0, 63] = 2**-0.5
    torch.testing.assert_close(extractor(image), expected)

    images = extractor.transform()(random_image()).unsqueeze(0)  # (1, 3, 32, 32)
    perm = torch.randperm(32 * 32)
    shuffled = images.flatten(2)[..., perm].view_as(images)
    torch.testing.assert_close(extractor(images), extractor(shuffled))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        extractor(images - 0.5)


def test_gram_matches_full_flattened_gram_of_official_code(extractors):
    """Scaled upper triangle == the official full C x C flattening, up to an isometry: same cosine similarity."""
    extractor = extractors["gram"]
    transform = extractor.transform()
    images = torch.stack([transform(random_image(seed=i)) for i in range(2)])
    ours = extractor(images)
    assert extractor.dim == 512 * 513 // 2
    with torch.no_grad():
        fmap = extractor.net.forward_intermediates(
            images, indices=[extractor.layer], intermediates_only=True
        )[0]
    assert fmap.shape[1:] == (512, 1, 1)  # 32 px input: the trunk after 5 max-pools
    flat = fmap.flatten(2)  # (B, C, HW)
    full = F.normalize((flat @ flat.transpose(1, 2) / flat.shape[1]).flatten(1), dim=1)  # (B, C*C) official
    assert (ours[0] @ ours[1]).item() == pytest.approx((full[0] @ full[1]).item(), abs=1e-5)


def test_timm_token_pool_is_the_class_token(extractors):
    extractor = extractors["dino_token"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(extractor.net(images), dim=1)  # timm's own token pooling, num_classes=0
    torch.testing.assert_close(extractor(images), expected)


def test_timm_avg_pool_on_vit_and_token_pool_needs_class_token():
    extractor = TimmExtractor("test_vit", pool="avg", image_size=32, resize_size=32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = extractor.net.forward_features(images)  # (2, 1 + patches, D)
    torch.testing.assert_close(extractor(images), F.normalize(tokens[:, 1:].mean(1), dim=1))
    with pytest.raises(ValueError, match="class token"):
        TimmExtractor("test_resnet", pool="token")
    with pytest.raises(ValueError, match="pool='max'"):
        TimmExtractor("test_resnet", pool="max")


def test_low_precision_model_returns_float32(extractors):
    extractor = TimmExtractor("test_vit", image_size=32, resize_size=32).to(torch.bfloat16)
    descriptors = extractor(torch.randn(2, 3, 32, 32))  # float32 input is cast to the weights' dtype
    assert descriptors.dtype == torch.float32
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2))


def test_clip_extractor_uses_clip_preprocessing(extractors):
    extractor = extractors["clip"]
    assert extractor.dim == 32
    tensor = extractor.transform()(random_image(height=40, width=60))
    assert tensor.shape == (3, 32, 32)
    # OpenAI normalisation: a mid-grey image maps to (0.5 - mean) / std
    grey = extractor.transform()(Image.new("RGB", (50, 50), (128, 128, 128)))
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(grey[:, 0, 0], (128 / 255 - mean) / std)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "extractor"
PAPER_CONFIGS = [
    "pixels",
    "color_hist",
    "vgg_gram",
    "clip_vitb16",
    "clip_vitl14",
    "dino_vitb16",
    "dino_vitb8",
    "csd",
]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_extractor_configs_name_real_classes_and_arguments(name):
    """Every conf/extractor file targets an Extractor whose signature accepts its arguments (no weights built)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    cls = hydra.utils.get_class(cfg.pop("_target_"))
    assert issubclass(cls, Extractor)
    inspect.signature(cls).bind(**cfg)


def test_extractor_configs_cover_the_folder():
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(PAPER_CONFIGS)


@pytest.mark.parametrize("name", ["pixels", "color_hist"])
def test_weight_free_configs_instantiate(name):
    extractor = hydra.utils.instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    images = extractor.transform()(random_image()).unsqueeze(0)
    assert extractor(images).shape == (1, extractor.dim)
