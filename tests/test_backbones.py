"""build_backbone on tiny real open_clip / timm networks with random weights (no downloads)."""

import json

import open_clip
import pytest
import timm
import torch

from src.nn import backbones
from src.nn.backbones import build_backbone, create_open_clip

IMAGENET_MEAN = (0.485, 0.456, 0.406)


# A real open_clip ViT CLIP at toy size (registered like any open_clip config): 64-d features, 64x32 projection.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip_cfg") / "tiny-test-ViT.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return path.stem


def test_open_clip_local_checkpoint_round_trip_and_projection_split(tiny_clip_name, tmp_path):
    torch.manual_seed(0)
    reference = create_open_clip(tiny_clip_name, None).eval()
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(tiny_clip_name, source="open_clip", pretrained=str(path))

    assert backbone.feature_dim == 64 and backbone.projection.shape == (64, 32)
    assert backbone.image_size == 32
    assert backbone.mean == open_clip.OPENAI_DATASET_MEAN and backbone.std == open_clip.OPENAI_DATASET_STD
    assert backbone.model.proj is None
    # every weight loaded bit-exactly; proj moved out of the tower into `projection`
    expected = reference.visual.state_dict()
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(expected) - {"proj"}
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(backbone.projection, reference.visual.proj.detach())

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone.model.eval()(images)
        clip_embedding = reference.encode_image(images)
    assert features.shape == (2, 64)
    torch.testing.assert_close(features @ backbone.projection, clip_embedding)


def test_open_clip_vit_b16_dims_and_image_size_override():
    """docs/style.md#model: CLIP ViT-B/16 has 768-d pre-projection features and a 768x512 projection."""
    backbone = build_backbone("ViT-B-16", pretrained=None, image_size=32)
    assert backbone.name == "ViT-B-16" and backbone.image_size == 32
    assert backbone.feature_dim == 768 and backbone.projection.shape == (768, 512)
    with torch.no_grad():
        assert backbone.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 768)


def test_openai_tags_switch_on_quick_gelu(monkeypatch):
    """OpenAI CLIP was trained with QuickGELU; open_clip's plain configs use GELU and only warn (no download here)."""
    calls = {}

    def fake_create_model(name, **kwargs):
        calls.update(kwargs, name=name)
        return "model"

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    assert create_open_clip("ViT-L-14", "openai") == "model"
    assert calls["force_quick_gelu"] is True and calls["pretrained"] == "openai"
    calls.clear()
    create_open_clip("ViT-B-16", "laion2b_s34b_b88k")  # trained with GELU
    assert "force_quick_gelu" not in calls


def test_open_clip_rn50_has_no_separate_projection():
    """CLIP RN50 projects inside its attention pool: the tower's 1024-d output is the feature, projection None."""
    backbone = build_backbone("RN50", image_size=64)
    assert backbone.projection is None and backbone.feature_dim == 1024
    with torch.no_grad():
        assert backbone.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


def test_timm_resnet18():
    backbone = build_backbone("resnet18", source="timm", pretrained=None)
    assert backbone.feature_dim == 512 and backbone.projection is None
    assert backbone.image_size == 224 and backbone.mean == IMAGENET_MEAN
    assert backbone.model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_timm_vit_image_size_override():
    backbone = build_backbone("vit_tiny_patch16_224", source="timm", image_size=32)
    assert backbone.feature_dim == 192 and backbone.image_size == 32
    assert backbone.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_timm_local_checkpoint_round_trip(tmp_path):
    reference = timm.create_model("resnet18", num_classes=10)  # the classifier is dropped on load
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", source="timm", pretrained=str(path))
    expected = reference.state_dict()
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(
    ("name", "source", "match"),
    [
        ("ViT-B-3", "open_clip", "Close matches: .*'ViT-B-32'.*open_clip.list_models"),
        ("resnet-18", "timm", "Close matches: .*'resnet18'.*timm.list_models"),
        ("vit_base_patch16_224.dinoo", "timm", "vit_base_patch16_224.dino'"),
    ],
)
def test_unknown_model_names_suggest_close_matches(name, source, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(name, source=source)


def test_bad_source_and_weights_are_reported():
    with pytest.raises(ValueError, match="expected one of \\('open_clip', 'timm'\\)"):
        build_backbone("ViT-B-32", source="hf")
    with pytest.raises(ValueError, match="Tags for this model: .*'openai'"):
        build_backbone("ViT-B-32", pretrained="opnai")
    with pytest.raises(ValueError, match="expected a tag"):
        build_backbone("ViT-B-32", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not a file"):
        build_backbone("resnet18", source="timm", pretrained="/nonexistent/weights.pth")


def test_module_imports_without_lightning_or_hydra():
    source = open(backbones.__file__).read()
    assert "lightning" not in source and "hydra" not in source
