"""The DCR extras of the replication analysis: training subsets, up-weighted split, complexity, FID and CLIP score.

Every network here is built at a tiny size or with random weights; nothing is downloaded.
"""

import io
import json
import math
import os
import urllib.error

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from src.data.images import load_rgb
from src.metrics.clip_score import clip_score_from_features
from src.metrics.complexity import (
    complexity_correlations,
    complexity_image,
    grey_entropy,
    jpeg_kilobytes,
    pearson,
    total_variation,
)
from src.metrics.frechet import frechet_distance
from src.metrics.replication import upweighted_split_stats
from src.nn.extractors import PixelExtractor, dcr_transform
from src.replication.analysis import analyse_replication
from src.replication.clip_score import clip_score_of_files, embed_images_and_prompts, load_clip
from src.replication.features import cache_key, cached_folder_features, extract_folder
from src.replication.fid import build_fid_inception, fid_between_folders, fid_transform
from src.replication.store import extract_store as cache_store
from src.utils.checkpoints import state_digest

TRAIN = [f"t{i:02d}.png" for i in range(10)]
COPIES = {"copy_t01.png": "t01.png", "copy_t04.png": "t04.png", "copy_t07.png": "t07.png"}
FAST = {"gallery_size": 2, "k": 2}  # a small gallery: drawing it is most of an analysis' time here


def _image(seed: int, size: int = 48) -> Image.Image:
    """Images of different complexity: random colour blocks, from 2 x 2 large blocks to 16 x 16 small ones."""
    rng = np.random.default_rng(seed)
    cells = [2, 3, 4, 8, 16][seed % 5]
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.NEAREST)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/: 10 images (t00..t09) in a nested layout for t05..t09; generated/: 3 exact copies, 3 unrelated images
    and one corrupt file."""
    root = tmp_path_factory.mktemp("extras")
    (root / "train" / "sub").mkdir(parents=True)
    (root / "generated").mkdir()
    train = [name if i < 5 else f"sub/{name}" for i, name in enumerate(TRAIN)]
    for i, name in enumerate(train):
        _image(i).save(root / "train" / name)
    for copy, source in COPIES.items():
        _image(TRAIN.index(source)).save(root / "generated" / copy)
    for j in range(3):
        _image(100 + j).save(root / "generated" / f"new{j}.png")
    (root / "generated" / "broken.png").write_bytes(b"not a png")
    return root, train


def _train_path(train, name):
    return next(p for p in train if p.endswith(name))


# --- training subsets and the feature cache -------------------------------------------------------------------


def test_listed_files_restrict_the_folder_and_never_share_the_cache(folders, tmp_path):
    root, train = folders
    extractor, cache = PixelExtractor(8), tmp_path / "cache"
    full = cached_folder_features(extractor, root / "train", cache)
    subset = [train[7], train[2], train[4]]
    part = cached_folder_features(extractor, root / "train", cache, files=subset)
    assert (full.cache, part.cache) == ("miss", "miss") and len(list(cache.glob("*/manifest.json"))) == 2
    assert part.paths == subset  # the listed order
    rows = [full.paths.index(p) for p in subset]
    torch.testing.assert_close(part.features, full.features[rows])
    assert cached_folder_features(extractor, root / "train", cache, files=subset).cache == "hit"
    assert cached_folder_features(extractor, root / "train", cache).cache == "hit"
    # touching an image outside the subset invalidates the full folder's cache, not the subset's
    outside = root / "train" / train[0]
    stat = outside.stat()
    os.utime(outside, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cached_folder_features(extractor, root / "train", cache, files=subset).cache == "hit"
    assert cached_folder_features(extractor, root / "train", cache).cache == "miss"
    # another extractor config, or another extractor, never reads the same cache
    key = cache_key(root / "train", extractor.name, {"size": 8}, subset)
    assert key != cache_key(root / "train", extractor.name, {"size": 16}, subset)
    assert key != cache_key(root / "train", "pixels16", {"size": 8}, subset)
    assert key != cache_key(root / "train", extractor.name, {"size": 8}, subset[:2])


def test_listed_files_that_do_not_exist_are_named(folders):
    root, train = folders
    listed = [train[0], "gone1.png", train[1], "sub/gone2.png"]
    with pytest.raises(
        FileNotFoundError, match=r"2 of the 4 listed files do not exist .*gone1.png.*sub/gone2.png"
    ):
        extract_folder(PixelExtractor(8), root / "train", files=listed)
    with pytest.raises(ValueError, match="listed more than once"):
        extract_folder(PixelExtractor(8), root / "train", files=[train[0], train[0]])
    with pytest.raises(ValueError, match="relative to"):
        extract_folder(PixelExtractor(8), root / "train", files=[str(root / "train" / train[0])])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_folder(PixelExtractor(8), root / "nowhere", files=[train[0]])


# --- the analysis function --------------------------------------------------------------------------------------


def test_analysis_against_a_training_subset_and_held_out_images(folders, tmp_path):
    root, train = folders
    subset = [p for p in train if not p.endswith(("t04.png", "t07.png"))]
    held_out = [p for p in train if p not in subset]

    def analyse(files, out):
        options = {"threshold": 0.9, "cache_dir": tmp_path / "cache", "complexity": False, **FAST}
        generated, train_dir = root / "generated", root / "train"
        return analyse_replication(
            PixelExtractor(8), generated, train_dir, tmp_path / out, train_files=files, **options
        )

    stats = analyse(subset, "subset")
    report = json.loads((tmp_path / "subset" / "report.json").read_text())
    assert report["counts"]["train"] == 8 and report["train_files"] == 8
    assert report["counts"]["generated"] == 6 and [s["path"] for s in report["skipped"]["generated"]] == [
        "broken.png"
    ]
    assert stats["sim_gt_thr"] == pytest.approx(1 / 6)  # only copy_t01 has its source in the subset
    held = analyse(held_out, "held_out")
    assert held["sim_gt_thr"] == pytest.approx(2 / 6)  # copy_t04 and copy_t07
    for name in ("report.json", "matches.csv", "histogram.png", "gallery.png"):
        assert (tmp_path / "held_out" / name).stat().st_size > 0


def test_analysis_rejects_bad_input_with_the_values(folders, tmp_path):
    root, train = folders
    extractor = PixelExtractor(8)
    # a cache written by another extractor version under the same name and key: dims disagree
    files = train[:4]
    key = cache_key(root / "train", extractor.name, None, files, weights=state_digest(extractor))
    cache = tmp_path / "cache"
    store = cache_store(
        extractor, root / "train", cache / f"{extractor.name}_{key[:24]}", files=files, dtype="float32"
    )
    shard = store.root / "shards" / "00000.npy"
    np.save(shard, np.eye(4, 7, dtype=np.float32))
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["dim"], manifest["shards"][0]["bytes"] = 7, shard.stat().st_size
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"\(6, 192\).*\(4, 7\)"):
        analyse_replication(
            extractor, root / "generated", root / "train", tmp_path / "a", train_files=files, cache_dir=cache
        )
    with pytest.raises(ValueError, match="2 prompts for 6 readable generations"):
        analyse_replication(extractor, root / "generated", root / "train", tmp_path / "b", prompts=["a", "b"])
    with pytest.raises(ValueError, match="clip_score needs the generations' prompts"):
        analyse_replication(extractor, root / "generated", root / "nowhere", tmp_path / "c", clip_score={})
    with pytest.raises(ValueError, match=r"unknown fid option\(s\) \['weight'\]"):
        analyse_replication(
            extractor, root / "generated", root / "train", tmp_path / "d", fid={"weight": "x"}
        )


# --- up-weighted split ----------------------------------------------------------------------------------------


def test_upweighted_split_by_hand():
    stats = upweighted_split_stats([0.9, 0.2, 0.6, 0.4], [5, 1, 5, 1], min_weight=1.0, threshold=0.5)
    assert stats["sim_upweighted_count"] == 2 and stats["sim_not_upweighted_count"] == 2
    assert stats["sim_upweighted_mean"] == pytest.approx(0.75)
    assert stats["sim_upweighted_95pc"] == pytest.approx(0.6 + 0.95 * 0.3)  # numpy linear percentile
    assert stats["sim_upweighted_gt_thr"] == 1.0
    assert stats["sim_not_upweighted_mean"] == pytest.approx(0.3)
    assert stats["sim_not_upweighted_95pc"] == pytest.approx(0.2 + 0.95 * 0.2)
    assert stats["sim_not_upweighted_gt_thr"] == 0.0
    # min_weight is the training set's: here every match is up-weighted and the other group is empty
    empty = upweighted_split_stats([0.9, 0.2], [5, 5], min_weight=1.0)
    assert empty["sim_not_upweighted_count"] == 0 and math.isnan(empty["sim_not_upweighted_mean"])
    with pytest.raises(ValueError, match="below min_weight"):
        upweighted_split_stats([0.9], [0.5], min_weight=1.0)


def test_analysis_splits_by_sampling_weights_from_json_and_npy(folders, tmp_path):
    root, train = folders
    weights = {p: (5.0 if p.endswith(("t01.png", "t02.png")) else 1.0) for p in train}
    (tmp_path / "w.json").write_text(json.dumps(weights))
    np.save(
        tmp_path / "w.npy", np.array([weights[p] for p in sorted(train)])
    )  # aligned with the folder listing
    kwargs = {"threshold": 0.9, "complexity": False, **FAST}
    by_json = analyse_replication(
        PixelExtractor(8),
        root / "generated",
        root / "train",
        tmp_path / "json",
        sampling_weights=tmp_path / "w.json",
        **kwargs,
    )
    by_npy = analyse_replication(
        PixelExtractor(8),
        root / "generated",
        root / "train",
        tmp_path / "npy",
        sampling_weights=str(tmp_path / "w.npy"),
        **kwargs,
    )
    assert by_json == by_npy
    # copy_t01 matches an up-weighted image (sim 1), the other 5 generations do not (only 2 above 0.9)
    assert by_json["sim_upweighted_count"] >= 1 and by_json["sim_upweighted_gt_thr"] > 0
    assert by_json["sim_upweighted_count"] + by_json["sim_not_upweighted_count"] == 6
    assert by_json["sim_not_upweighted_gt_thr"] * by_json["sim_not_upweighted_count"] == pytest.approx(2)
    report = json.loads((tmp_path / "json" / "report.json").read_text())
    assert report["sampling_weights"]["num_upweighted_train"] == 2
    assert report["stats"]["sim_upweighted_count"] == by_json["sim_upweighted_count"]
    # the subset's weights as an array must be aligned with the listed files
    with pytest.raises(ValueError, match="10 values for 3 training files"):
        analyse_replication(
            PixelExtractor(8),
            root / "generated",
            root / "train",
            tmp_path / "bad",
            train_files=train[:3],
            sampling_weights=tmp_path / "w.npy",
            **kwargs,
        )


# --- complexity -------------------------------------------------------------------------------------------------


def _grey(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.uint8)
    return np.repeat(values[..., None], 3, axis=2)


def test_complexity_measures_by_hand():
    assert grey_entropy(_grey(np.full((4, 4), 77))) == 0.0
    assert grey_entropy(_grey([[0, 255], [255, 0]])) == pytest.approx(math.log(2))
    assert grey_entropy(_grey([[0, 50], [100, 200]])) == pytest.approx(math.log(4))
    # horizontal |10-0| + |40-20| = 30, vertical |20-0| + |40-10| = 50, three channels, weight 1e-4
    assert total_variation(_grey([[0, 10], [20, 40]])) == pytest.approx(3 * 80 * 1e-4)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    assert jpeg_kilobytes(noise) == len(buffer.getvalue()) / 1024
    assert jpeg_kilobytes(_grey(np.full((64, 64), 128))) < jpeg_kilobytes(noise) / 5
    assert complexity_image(Image.new("RGB", (300, 200))).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="uint8"):
        grey_entropy(np.zeros((4, 4, 3), dtype=np.float32))


def test_pearson_by_hand():
    r, p = pearson([1, 2, 3, 4], [1, 3, 2, 4])
    assert r == pytest.approx(0.8)  # sum dx dy = 4, sum dx^2 = sum dy^2 = 5
    assert 0 < p < 1
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])[0]) and math.isnan(pearson([1, 2], [2, 1])[0])
    out = complexity_correlations(torch.tensor([0.1, 0.2, 0.3]), {"tv": np.array([3.0, 2.0, 1.0])})
    assert out["cc_tv"] == pytest.approx(-1.0)


def test_analysis_correlates_top1_with_the_matched_images_complexity(folders, tmp_path):
    root, train = folders
    stats = analyse_replication(
        PixelExtractor(8), root / "generated", root / "train", tmp_path / "run", **FAST
    )
    assert (tmp_path / "run" / "complexity.png").stat().st_size > 0
    rows = np.genfromtxt(
        tmp_path / "run" / "complexity.csv", delimiter=",", names=True, dtype=None, encoding=None
    )
    assert len(rows) == 6
    for row in rows:  # each measure is the one of the generation's top-1 training image
        rgb = complexity_image(load_rgb(root / "train" / row["match_1"]))
        assert row["entropy"] == pytest.approx(grey_entropy(rgb), abs=1e-6)
        assert row["tv"] == pytest.approx(total_variation(rgb), abs=1e-6)
    for name in ("entropy", "jpeg_kb", "tv"):
        assert stats[f"cc_{name}"] == pytest.approx(pearson(rows[name], rows["sim_1"])[0], abs=1e-5)


# --- FID ----------------------------------------------------------------------------------------------------------


def test_frechet_distance_by_hand():
    # 1-D: N(1, 2) against N(5, 4) (ddof=1 variances): (1-5)^2 + 2 + 4 - 2 sqrt(8)
    assert frechet_distance([[0.0], [2.0]], [[3.0], [5.0], [7.0]]) == pytest.approx(22 - 2 * math.sqrt(8))
    # diagonal covariances: the sum over dimensions of (mu_a - mu_b)^2 + (sd_a - sd_b)^2
    a = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, -2.0], [1.0, 2.0]])  # means (1, 0), variances (2/3, 8/3)
    b = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 2.0], [1.0, 0.0]])  # means (1, 1), variances (2/3, 2/3)
    expected = (
        0**2 + 1**2 + (math.sqrt(2 / 3) - math.sqrt(2 / 3)) ** 2 + (math.sqrt(8 / 3) - math.sqrt(2 / 3)) ** 2
    )
    assert expected == pytest.approx(5 / 3)
    assert frechet_distance(a, b) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\(2, 1\) and \(2, 3\)"):
        frechet_distance(np.zeros((2, 1)), np.zeros((2, 3)))


class ChannelStats(nn.Module):
    """A 6-d stand-in for Inception: per-channel mean and std of a (B, 3, H, W) uint8 batch."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_between_folders_matches_a_direct_computation(folders):
    root, train = folders
    generated = ["copy_t01.png", "copy_t04.png", "copy_t07.png", "new0.png", "new1.png", "new2.png"]
    result = fid_between_folders(
        root / "train", root / "generated", fake_files=generated, feature=ChannelStats(), batch_size=4
    )
    assert (result["fid_num_real"], result["fid_num_fake"], result["fid_skipped"]) == (10, 6, 0)

    def features(folder, paths):
        return ChannelStats()(torch.stack([fid_transform()(load_rgb(folder / p)) for p in paths]))

    direct = frechet_distance(features(root / "train", train), features(root / "generated", generated))
    assert direct > 0.01 and result["fid"] == pytest.approx(direct, rel=1e-4)
    # the corrupt generation is skipped and counted
    assert fid_between_folders(root / "train", root / "generated", feature=ChannelStats())["fid_skipped"] == 1


def test_fid_weights_errors_say_how_to_provide_the_file(tmp_path, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=r"weights-inception-2015-12-05-6726825d.pth.*fid.weights=PATH"
    ):
        build_fid_inception(tmp_path / "missing.pth")
    with monkeypatch.context() as patch:
        patch.setattr("torchmetrics.utilities.imports._TORCH_FIDELITY_AVAILABLE", False)
        with pytest.raises(ModuleNotFoundError, match="pip install 'torch-fidelity"):
            build_fid_inception(None)
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    (tmp_path / "other.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a state dict of the FID Inception"):
        build_fid_inception(tmp_path / "other.pth")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"download failed .*fid.weights=PATH"):
        build_fid_inception(None)


@pytest.mark.slow
def test_fid_inception_loads_a_local_weights_file(tmp_path, monkeypatch):
    """A randomly initialised FID Inception saved to a file comes back through `fid.weights` unchanged."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from torchmetrics.image.fid import NoTrainInceptionV3

    with monkeypatch.context() as patch:  # build without weights: no download, no loading
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(NoTrainInceptionV3, "load_state_dict", lambda self, state: None, raising=False)
        torch.manual_seed(0)
        random_net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    expected = random_net.state_dict()
    torch.save(expected, tmp_path / "inception.pth")
    loaded = build_fid_inception(tmp_path / "inception.pth").state_dict()
    assert loaded.keys() == expected.keys() and len(expected) > 300
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    features = build_fid_inception(tmp_path / "inception.pth")(images)
    assert features.shape == (1, 2048)
    torch.testing.assert_close(features, random_net(images), rtol=1e-5, atol=0)


# --- CLIP score ---------------------------------------------------------------------------------------------------


def test_clip_score_from_features_by_hand():
    score = clip_score_from_features(
        torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    )
    assert score == pytest.approx((1 / math.sqrt(2) - 1) / 2)  # mean cosine, negative values kept, not x100
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        clip_score_from_features(torch.zeros(2, 2), torch.zeros(3, 2))


def _tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    return model, open_clip.get_tokenizer("ViT-B-16")


def test_clip_score_of_files_matches_a_direct_computation(folders):
    root, _ = folders
    model, tokenizer = _tiny_clip()
    paths = ["copy_t01.png", "broken.png", "new0.png", "new1.png"]
    prompts = [
        "a blocky picture",
        "never read",
        "noise " * 100,
        "a photo",
    ]  # the long prompt is truncated to 77
    images, texts, kept = embed_images_and_prompts(
        model, tokenizer, root / "generated", paths, prompts, batch_size=3
    )
    assert kept == [0, 2, 3] and images.shape == texts.shape == (3, 16)
    with torch.no_grad():
        direct_images = model.encode_image(
            torch.stack([dcr_transform(32)(load_rgb(root / "generated" / paths[i])) for i in kept])
        )
        direct_texts = model.encode_text(tokenizer([prompts[i] for i in kept]))
    torch.testing.assert_close(images, direct_images, rtol=1e-4, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(direct_images, direct_texts).mean().item()
    score = clip_score_of_files(model, tokenizer, root / "generated", paths, prompts)
    assert score == pytest.approx(cosine, abs=1e-5)


def test_load_clip_builds_vit_b16_and_its_tokenizer():
    model, tokenizer = load_clip("ViT-B-16", pretrained=None)  # random weights: nothing downloaded
    assert model.visual.image_size == (224, 224) and tokenizer(["a photo"]).shape == (1, 77)
    assert not any(p.requires_grad for p in model.parameters())


# --- everything at once -------------------------------------------------------------------------------------------


def test_analysis_with_every_extra(folders, tmp_path):
    root, train = folders
    model, tokenizer = _tiny_clip()
    prompts = {
        p: f"picture {p}"
        for p in ["copy_t01.png", "copy_t04.png", "copy_t07.png", "new0.png", "new1.png", "new2.png"]
    }
    (tmp_path / "captions.json").write_text(json.dumps({p: [f"caption of {p}", "second"] for p in train}))
    weights = {p: 1.0 + (i % 3 == 0) for i, p in enumerate(train)}
    stats = analyse_replication(
        PixelExtractor(8),
        root / "generated",
        root / "train",
        tmp_path / "run",
        prompts=prompts,
        sampling_weights=weights,
        fid={"feature": ChannelStats(), "batch_size": 4},
        clip_score={"model": model, "tokenizer": tokenizer, "train_captions": tmp_path / "captions.json"},
        **FAST,
    )
    for key in ("sim_95pc", "sim_upweighted_mean", "cc_entropy", "fid", "clip_score", "clip_score_train"):
        assert key in stats and math.isfinite(stats[key]), key
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stats"]["fid"] == stats["fid"] and report["fid"]["fid_num_real"] == 10
    assert report["clip_score"]["num_generated"] == 6
    names = sorted(prompts)
    direct = clip_score_of_files(model, tokenizer, root / "generated", names, [prompts[n] for n in names])
    assert stats["clip_score"] == pytest.approx(direct, abs=1e-6)
    captions = [f"caption of {p}" for p in sorted(train)]
    assert stats["clip_score_train"] == pytest.approx(
        clip_score_of_files(model, tokenizer, root / "train", sorted(train), captions), abs=1e-6
    )
