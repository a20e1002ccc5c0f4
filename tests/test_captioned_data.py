"""Captioned data for text-conditional diffusion: the embedded captioned faces, conditioning levels, duplication
weights and the weighted sampler, train-time caption mitigations, and bad captions files
(docs/memorization.md#caption-mitigations)."""

import json
from collections import Counter

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from src.data.diffusion.captioned import CaptionedDataModule, WeightedDrawSampler, class_name_of
from src.data.embedded.captioned_faces import (
    CAPTIONS_FILE,
    CLASS_NAMES,
    IMAGES_DIR,
    build_captioned_faces,
    face_name,
)
from tests.conftest import compose_config


class StubTokenizer:
    """CLIP-style `decode`: one word per token id (the real CLIP tokenizer takes seconds to load)."""

    def decode(self, token_ids) -> str:
        return " ".join(f"tok{int(i)}" for i in token_ids)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned")
    build_captioned_faces(root, image_size=16)
    return root


def faces(data_dir, tmp_path, **kwargs) -> CaptionedDataModule:
    settings = {
        "root": "embedded_faces",
        "data_dir": str(data_dir),
        "image_size": 16,
        "batch_size": 4,
        "num_workers": 0,
        "pin_memory": False,
        "weights_file": str(tmp_path / "weights.json"),
        "tokenizer": StubTokenizer(),
    }
    module = CaptionedDataModule(**{**settings, **kwargs})
    module.setup()
    return module


# ---------------------------------------------------------------- the embedded captioned faces


def test_build_has_100_faces_in_brightness_classes_with_unique_first_captions(data_dir, tmp_path):
    folder = build_captioned_faces(data_dir, image_size=16)  # reuses the module's build
    captions = json.loads((folder / CAPTIONS_FILE).read_text())
    images = sorted(
        p.relative_to(folder / IMAGES_DIR).as_posix() for p in (folder / IMAGES_DIR).rglob("*.png")
    )
    assert sorted(captions) == images and len(images) == 100
    assert len({caps[0] for caps in captions.values()}) == 100  # caption 0 unique per image
    assert all(len(caps) >= 3 and len(set(caps)) == len(caps) for caps in captions.values())
    assert Counter(class_name_of(p) for p in images) == {c.replace("_", " "): 25 for c in CLASS_NAMES}
    for path, caps in captions.items():
        index = int(path.split("face_")[1][:3])
        assert face_name(index) in caps[0] and not any(face_name(index) in c for c in caps[1:])
    # the classes are brightness quartiles of the source faces, measured here independently
    from skimage.data import lfw_subset

    darkest = set(np.argsort(lfw_subset()[:100].mean(axis=(1, 2)), kind="stable")[:25].tolist())
    assert {int(p.split("face_")[1][:3]) for p in images if p.startswith("dark_face/")} == darkest
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["count"] == 100 and meta["image_size"] == 16

    again = build_captioned_faces(tmp_path, image_size=16)  # deterministic
    assert json.loads((again / CAPTIONS_FILE).read_text()) == captions
    path = images[7]
    assert np.array_equal(
        np.asarray(Image.open(again / IMAGES_DIR / path)), np.asarray(Image.open(folder / IMAGES_DIR / path))
    )


# ---------------------------------------------------------------- items and conditioning levels


def test_items_and_batches_hold_image_caption_and_index(data_dir, tmp_path):
    data = faces(data_dir, tmp_path, random_flip=False)
    item = data.dataset[3]
    assert item["image"].shape == (3, 16, 16) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["caption"] == data.captions[data.train_files[3]][0] and item["index"] == 3
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["num_skipped"] == 0
    assert batch["caption"] == [data.captions[data.train_files[i]][0] for i in batch["index"].tolist()]
    assert data.train_files == sorted(data.train_files) and len(data.captions) == 100


@pytest.mark.parametrize("level", ["nolevel", "classlevel", "instancelevel_blip", "instancelevel_random"])
def test_conditioning_levels_give_the_dcr_captions_and_prompts(data_dir, tmp_path, level):
    data = faces(data_dir, tmp_path, conditioning=level)
    fed = {path: data.dataset.caption(i, draw=0) for i, path in enumerate(data.train_files)}
    first = data.train_files[0]  # "bright_face/face_..."
    expected = {
        "nolevel": "An image",
        "classlevel": f"An image of {class_name_of(first)}",
        "instancelevel_blip": data.captions[first][0],
    }
    if level in expected:
        assert data.dataset.caption(0, draw=5) == expected[level]
    prompts, sources = data.train_prompts(50, seed=1)
    assert len(prompts) == len(sources) == 50 and (prompts, sources) == data.train_prompts(50, seed=1)
    if level == "nolevel":
        assert prompts == ["An image"] * 50 and sources == [None] * 50
    else:
        assert prompts != data.train_prompts(50, seed=2)[0]
    if level == "classlevel":
        assert set(prompts) <= {f"An image of {c}" for c in data.class_names} and len(set(prompts)) == 4
        assert data.class_names == ["bright face", "dark face", "dim face", "light face"]
    if level.startswith("instancelevel"):
        assert all(fed[s] == p for p, s in zip(prompts, sources, strict=True))
    if level == "instancelevel_random":  # one fixed 4-token caption per image, the same on every draw
        fixed = [data.dataset.caption(i, draw=9) for i in range(100)]
        assert fixed == [data.dataset.caption(i, draw=0) for i in range(100)] and len(set(fixed)) == 100
        assert all(len(c.split()) == 4 and c.startswith("tok") for c in fixed)


# ---------------------------------------------------------------- train-time mitigations


def test_mitigations_change_captions_reproducibly(data_dir, tmp_path):
    none = faces(data_dir, tmp_path, mitigation={"name": "none"})
    assert all(
        none.dataset.caption(i, d) == none.captions[p][0]
        for d in (0, 3)
        for i, p in enumerate(none.train_files)
    )

    rc = faces(data_dir, tmp_path, mitigation={"name": "rc", "p": 1.0})
    replaced = [rc.dataset.caption(i, 0) for i in range(100)]
    assert all(
        c not in rc.captions[p] and len(c.split()) == 4 for c, p in zip(replaced, rc.train_files, strict=True)
    )
    assert replaced == [rc.dataset.caption(i, 0) for i in range(100)]  # seeded by (seed, draw, index)
    assert replaced != [rc.dataset.caption(i, 1) for i in range(100)]  # another draw, other tokens

    rt = faces(data_dir, tmp_path, mitigation={"name": "rt", "p": 1.0})
    for i, path in enumerate(rt.train_files[:10]):
        words = rt.dataset.caption(i, 0).split(" ")
        assert len(words) == len(rt.captions[path][0].split(" ")) + 2
        assert sum(w.startswith("tok") for w in words) == 2

    rc_off = faces(data_dir, tmp_path, mitigation={"name": "rc", "p": 0.0})
    assert [rc_off.dataset.caption(i, 0) for i in range(100)] == [
        rc_off.captions[p][0] for p in rc_off.train_files
    ]

    mc = faces(data_dir, tmp_path, mitigation={"name": "mc"})
    drawn = {mc.dataset.caption(0, d) for d in range(60)}
    assert drawn == set(mc.captions[mc.train_files[0]])  # all 5 captions, uniformly drawn


def test_dup_image_varies_only_the_up_weighted_images_captions(data_dir, tmp_path):
    data = faces(data_dir, tmp_path, duplication="dup_image")
    for index, weight in enumerate(data.weights.tolist()):
        drawn = {data.dataset.caption(index, d) for d in range(40)}
        assert len(drawn) > 1 if weight > 1 else drawn == {data.captions[data.train_files[index]][0]}


def test_caption_log_shows_what_the_model_is_fed(data_dir, tmp_path):
    data = faces(data_dir, tmp_path, mitigation={"name": "rc", "p": 1.0})
    rows = data.caption_log(n=8)
    assert len(rows) == 8 and rows == data.caption_log(n=8)
    for path, first, fed in rows:
        assert first == data.captions[path][0] and fed != first


# ---------------------------------------------------------------- duplication weights and the sampler


def test_weights_file_up_weights_round_5_percent(data_dir, tmp_path):
    data = faces(data_dir, tmp_path, duplication="dup_both", subset_size=70)
    weights = json.loads((tmp_path / "weights.json").read_text())
    assert sorted(weights) == data.train_files and len(weights) == 70
    assert Counter(weights.values()) == {1.0: 66, 5.0: 4}  # round(0.05 * 70) = 4 (DCR truncates to 3)
    faces(data_dir, tmp_path, duplication="nodup")
    assert set(json.loads((tmp_path / "weights.json").read_text()).values()) == {1.0}


def test_sampler_draws_up_weighted_images_five_times_as_often(data_dir, tmp_path):
    data = faces(data_dir, tmp_path, duplication="dup_both", samples_per_epoch=24000)
    sampler = data.sampler()
    draws = list(sampler)
    assert [d for d, _ in draws] == list(range(24000))
    counts = np.bincount([i for _, i in draws], minlength=100)
    up = data.weights.numpy() > 1
    assert up.sum() == 5
    # 20.8% of draws (docs/memorization.md#duplication)
    assert counts[up].sum() / 24000 == pytest.approx(25 / 120, abs=0.012)
    assert counts[up].mean() / counts[~up].mean() == pytest.approx(5, rel=0.1)
    assert list(sampler) == draws
    sampler.set_epoch(1)
    again = list(sampler)
    assert again[0][0] == 24000 and [i for _, i in again] != [i for _, i in draws]


def test_sampler_yields_draw_numbers_per_epoch():
    sampler = WeightedDrawSampler(torch.ones(3), num_samples=4, seed=0)
    sampler.set_epoch(2)
    assert [d for d, _ in sampler] == [8, 9, 10, 11] and len(sampler) == 4


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def folder(tmp_path):
    """6 PNGs in two class subfolders, each with two captions."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    captions = {}
    for i in range(6):
        path = f"{'cats' if i % 2 else 'dogs'}/{i}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(root / path)
        captions[path] = [f"picture {i}", f"another view of picture {i}"]
    return root, captions


def folder_data(root, captions, tmp_path, **kwargs) -> CaptionedDataModule:
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return faces(
        None, tmp_path, root=str(root), captions=str(tmp_path / "captions.json"), image_size=8, **kwargs
    )


def test_captions_file_must_match_the_images_unless_allowed(folder, tmp_path):
    root, captions = folder
    lacking = {k: v for k, v in captions.items() if k != "cats/1.png"}
    with pytest.raises(ValueError, match=r"1 of 6 images have no captions \(cats/1.png\)"):
        folder_data(root, lacking, tmp_path)
    assert folder_data(root, lacking, tmp_path, allow_missing_captions=True).train_files == sorted(lacking)

    extra = {**captions, "cats/gone.png": ["a missing image"]}
    with pytest.raises(
        ValueError, match=r"1 captioned images do not exist among the 6 images \(cats/gone.png\)"
    ):
        folder_data(root, extra, tmp_path)
    assert folder_data(root, extra, tmp_path, allow_missing_captions=True).train_files == sorted(captions)

    with pytest.raises(ValueError, match="'dogs/0.png' has an empty caption"):
        folder_data(root, {**captions, "dogs/0.png": ["fine", " "]}, tmp_path)


def test_bad_settings_are_refused_with_the_valid_values(folder, tmp_path):
    root, captions = folder
    with pytest.raises(
        ValueError, match="valid levels: nolevel, classlevel, instancelevel_blip, instancelevel_random"
    ):
        folder_data(root, captions, tmp_path, conditioning="instance")
    with pytest.raises(ValueError, match="valid settings: nodup, dup_both, dup_image"):
        folder_data(root, captions, tmp_path, duplication="dup")
    with pytest.raises(ValueError, match="mitigation 'rc' .* needs data.conditioning=instancelevel_blip"):
        folder_data(root, captions, tmp_path, conditioning="classlevel", mitigation={"name": "rc", "p": 0.1})
    assert folder_data(
        root, captions, tmp_path, conditioning="classlevel", mitigation={"name": "gn", "lam": 0.1}
    )
    with pytest.raises(ValueError, match="valid names: none, mc, gn, rc, rt, cwr"):
        folder_data(root, captions, tmp_path, mitigation={"name": "dropout"})
    with pytest.raises(ValueError, match=r"got unknown options \['q'\]"):
        folder_data(root, captions, tmp_path, mitigation={"name": "rc", "q": 0.1})
    with pytest.raises(ValueError, match="use data.duplication=dup_both"):
        folder_data(root, captions, tmp_path, duplication="dup_image", mitigation={"name": "cwr", "p": 0.1})
    single = {k: v[:1] for k, v in captions.items()}
    with pytest.raises(ValueError, match="mitigation 'mc', image 'cats/1.png': .*needs several captions"):
        folder_data(root, single, tmp_path, mitigation={"name": "mc"})
    (root / "top.png").write_bytes((root / "cats/1.png").read_bytes())
    with pytest.raises(ValueError, match="1 images lie at the top"):
        folder_data(root, {**captions, "top.png": ["x"]}, tmp_path, conditioning="classlevel")


def test_unreadable_images_are_left_out_of_the_selection_or_skipped_and_counted(folder, tmp_path, caplog):
    root, captions = folder
    (root / "cats/1.png").write_bytes(b"not a png")
    data = folder_data(root, captions, tmp_path, batch_size=5, samples_per_epoch=60, control_size=1)
    assert "cats/1.png" not in data.train_files + data.control_files  # found unusable while selecting
    assert len(data.train_files) == 4 and len(data.control_files) == 1
    assert "skipped 1 unreadable image(s)" in caplog.text
    (root / data.train_files[0]).write_bytes(b"broken after the selection")
    batches = list(data.train_dataloader())
    skipped = sum(b["num_skipped"] for b in batches)
    kept = sum(len(b["caption"]) for b in batches if "caption" in b)
    assert skipped > 0 and skipped + kept == 60


# ---------------------------------------------------------------- the configs


def test_captioned_faces_config_composes_with_a_mitigation(data_dir, tmp_path):
    overrides = ["data=captioned_faces", "mitigation=rc", f"paths.data_dir={data_dir}", "data.image_size=16"]
    cfg = compose_config("train", overrides, tmp_path)
    data = hydra.utils.instantiate(cfg.data, tokenizer=StubTokenizer())
    assert data.mitigation == ("rc", {"p": 0.1})
    settings = (data.hparams.conditioning, data.hparams.duplication, data.hparams.root)
    assert settings == ("instancelevel_blip", "nodup", "embedded_faces")
    assert len(data.train_files) == 100 and (tmp_path / "sampling_weights.json").is_file()


def test_control_images_are_held_out_and_subsets_nest(data_dir, tmp_path):
    small = faces(data_dir, tmp_path, subset_size=10, control_size=20)
    large = faces(data_dir, tmp_path, subset_size=40, control_size=20)
    assert len(small.control_files) == 20 and small.control_files == large.control_files
    assert not set(small.control_files) & set(large.train_files)  # never trained on
    assert set(small.train_files) < set(large.train_files)  # the same seeded order: nested subsets
    every = faces(data_dir, tmp_path, control_size=20)
    assert len(every.train_files) == 80 and not set(every.train_files) & set(every.control_files)
    assert faces(data_dir, tmp_path, subset_size=10).control_files == []
    with pytest.raises(ValueError, match=r"data.subset_size=90 must lie in \[1, 80\].*20 of them held out"):
        faces(data_dir, tmp_path, subset_size=90, control_size=20)
    with pytest.raises(ValueError, match=r"data.control_size=100 must lie in \[0, 99\]"):
        faces(data_dir, tmp_path, control_size=100)
