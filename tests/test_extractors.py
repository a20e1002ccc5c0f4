"""Descriptor extractors on tiny real networks with random weights (no downloads). CSDExtractor is tested with
the CSD code."""

import inspect
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

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
    GeMPool,
    GramExtractor,
    OpenCLIPExtractor,
    PixelExtractor,
    SSCDExtractor,
    TimmExtractor,
    build_sscd,
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


def test_a_colour_cast_copy_scores_at_least_0_99_with_channel_normalisation(tmp_path):
    # A photo and its copy with each channel scaled and shifted on its own (a generator's colour drift), both
    # written as PNG and read back through the extractor's own transform.
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((96, 64))
    array = np.asarray(photo, dtype=np.float64) / 255
    cast = array * np.array([0.4, 0.9, 0.6]) + np.array([0.45, 0.05, 0.3])
    assert 0 <= cast.min() and cast.max() <= 1  # no clipping: the cast alone is what differs
    photo.save(tmp_path / "source.png")
    Image.fromarray((cast * 255).round().astype(np.uint8)).save(tmp_path / "copy.png")

    def similarity(extractor):
        load = extractor.transform()
        pair = torch.stack(
            [load(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("source", "copy")]
        )
        features = extractor(pair)
        return float(features[0] @ features[1])

    assert similarity(PixelExtractor(32, normalize="channel")) >= 0.99
    assert similarity(PixelExtractor(32)) < 0.9  # the default (one mean over all channels) misses this copy
    gray = PixelExtractor(32, normalize="gray")
    assert gray.dim == 32 * 32 and gray.name == "pixels32_gray"
    with pytest.raises(ValueError, match="normalize='hsv'.*global"):
        PixelExtractor(32, normalize="hsv")


def test_channel_and_gray_pixels_on_hand_values():
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # red: std 0.5 -> +-1
    image[0, 1] = 0.3  # constant green -> zeros
    image[0, 2] = torch.tensor([[0.2, 0.2], [0.6, 0.6]])  # blue: std 0.2 -> +-1
    channel = PixelExtractor(2, normalize="channel")
    expected = torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0, 0, 0, 0, -1.0, -1.0, 1.0, 1.0]]) / 8**0.5
    torch.testing.assert_close(channel(image), expected)
    luma = 0.299 * image[0, 0] + 0.587 * 0.3 + 0.114 * image[0, 2]
    centred = (luma - luma.mean()).flatten()
    torch.testing.assert_close(PixelExtractor(2, normalize="gray")(image), (centred / centred.norm())[None])


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
    "dino_vitb16_split",
    "pixels",
    "pixels_channel",
    "pixels_gray",
    "color_hist",
    "copy_descriptor",
    "vgg_gram",
    "clip_vitb16",
    "clip_vitl14",
    "dino_vitb16",
    "dino_vitb8",
    "csd",
    "sscd",
    "sscd_resnext101",
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


@pytest.mark.parametrize("name", ["pixels", "pixels_channel", "pixels_gray", "color_hist", "copy_descriptor"])
def test_weight_free_configs_instantiate(name):
    extractor = hydra.utils.instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    images = extractor.transform()(random_image()).unsqueeze(0)
    assert extractor(images).shape == (1, extractor.dim)


@pytest.fixture(scope="module")
def sscd_files(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised SSCD ResNet-50 saved as a state dict and as TorchScript (the official formats)."""
    torch.manual_seed(0)
    net = build_sscd("resnet50").eval()
    folder = tmp_path_factory.mktemp("sscd")
    torch.save(net.state_dict(), folder / "sscd_r50.pt")
    with warnings.catch_warnings():  # torch.jit is deprecated; the official SSCD files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), folder / "sscd_r50.torchscript.pt")
    return {"state_dict": folder / "sscd_r50.pt", "torchscript": folder / "sscd_r50.torchscript.pt"}


def testread_sscd_state_dict_and_torchscript_give_identical_unit_descriptors(sscd_files):
    from_state = SSCDExtractor(str(sscd_files["state_dict"]), arch="resnet50")
    from_script = SSCDExtractor(str(sscd_files["torchscript"]))
    assert isinstance(from_script.net, torch.jit.ScriptModule) and not isinstance(
        from_state.net, torch.jit.ScriptModule
    )
    images = torch.stack([from_state.transform()(random_image(seed=i)) for i in range(2)])  # (2, 3, 224, 224)
    images = F.interpolate(images, size=64)  # keep the ResNet-50 forward cheap
    ours, official = from_state(images), from_script(images)
    assert ours.shape == (2, 512) and from_state.dim == from_script.dim == 512
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(2))
    assert not from_script.train().training and all(not p.requires_grad for p in from_script.parameters())
    assert (
        from_state.name == "sscd_resnet50_sscd_r50_dcr"
        and from_script.name == "sscd_sscd_r50.torchscript_dcr"
    )


def test_sscd_gem_pooling_and_architectures():
    x = torch.rand(2, 5, 3, 4)
    expected = (x.clamp(min=1e-6) ** 3).flatten(2).mean(2) ** (1 / 3)  # SSCD GlobalGeMPool2d, p=3
    torch.testing.assert_close(GeMPool(3.0)(x), expected)
    torch.testing.assert_close(GeMPool(1.0)(x), x.mean(dim=(2, 3)))
    net = build_sscd("resnext101")  # sscd_disc_large: ResNeXt-101 32x4d trunk, 1024-d
    assert net.fc.weight.shape == (1024, 2048) and isinstance(net.avgpool, GeMPool)
    import timm

    trunk = timm.create_model("resnext101_32x4d", pretrained=False, num_classes=0)
    assert sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc.")) == sum(
        p.numel() for p in trunk.parameters()
    )
    with pytest.raises(ValueError, match="arch='vit'"):
        build_sscd("vit")


def test_sscd_bad_checkpoints(sscd_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SSCDExtractor(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="fc.weight"):
        SSCDExtractor(str(sscd_files["state_dict"]), dim=256)
    state = torch.load(sscd_files["state_dict"], weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected keys \\['extra.weight'\\]"):
        SSCDExtractor(str(tmp_path / "extra.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="neither TorchScript nor a state dict"):
        SSCDExtractor(str(tmp_path / "list.pt"))
    with pytest.raises(ValueError, match="preprocess='imagenet'"):
        SSCDExtractor(None, preprocess="imagenet")


def test_sscd_preprocessing_options():
    grey = Image.new("RGB", (300, 200), (128, 128, 128))
    # transform() reads only self.preprocess: no need to build a ResNet-50 per option
    dcr = SSCDExtractor.transform(SimpleNamespace(preprocess="dcr"))(grey)
    assert dcr.shape == (3, 224, 224)
    torch.testing.assert_close(dcr[:, 0, 0], torch.full((3,), (128 / 255 - 0.5) / 0.5))
    native = SSCDExtractor.transform(SimpleNamespace(preprocess="native"))(grey)
    assert native.shape == (3, 288, 432)  # shorter side 288, aspect kept, no crop
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(native[:, 0, 0], (128 / 255 - mean) / std)
    assert SSCDExtractor.transform(SimpleNamespace(preprocess="native_320"))(grey).shape == (3, 320, 320)


def test_dcr_preprocessing_for_timm_and_clip(extractors):
    grey = Image.new("RGB", (50, 40), (128, 128, 128))
    expected = torch.full((3,), (128 / 255 - 0.5) / 0.5)
    timm_dcr = TimmExtractor("test_vit", image_size=32, resize_size=36, preprocess="dcr")
    assert timm_dcr.mean == timm_dcr.std == (0.5, 0.5, 0.5) and timm_dcr.name.endswith("_token_dcr")
    torch.testing.assert_close(timm_dcr.transform()(grey)[:, 0, 0], expected)
    native = extractors["dino_token"]  # native stays the default, and its name unchanged
    assert native.preprocess == "native" and native.name == "timm_test_vit_random_token"
    with pytest.raises(ValueError, match="mean=std=0.5"):
        TimmExtractor("test_vit", image_size=32, preprocess="dcr", mean=(0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match="preprocess='clip'"):
        TimmExtractor("test_vit", image_size=32, preprocess="clip")
    clip_dcr = OpenCLIPExtractor("tiny-test-ViT", pretrained=None, preprocess="dcr")
    tensor = clip_dcr.transform()(grey)
    assert tensor.shape == (3, 32, 32) and clip_dcr.name.endswith("_dcr")
    torch.testing.assert_close(tensor[:, 0, 0], expected)


def test_sscd_config_instantiates_with_a_checkpoint(sscd_files):
    cfg = OmegaConf.load(CONF_DIR / "sscd.yaml")
    cfg.checkpoint = str(sscd_files["torchscript"])
    extractor = hydra.utils.instantiate(cfg)
    assert isinstance(extractor, SSCDExtractor) and extractor.dim == 512 and extractor.preprocess == "dcr"
