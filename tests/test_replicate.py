"""`python -m src.replicate`: planted copies in generated folders made from skimage's shipped images."""

import csv
import json
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

import src.replication.features as features_module
from src.replicate import replicate
from tests.conftest import compose_config

BASE = ["astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "immunohistochemistry"]
EXACT = {"copy_astronaut.png": "astronaut.png", "copy_coffee_crop0.png": "coffee_crop0.png"}
JITTER = {"jitter_coins.png": "coins.png", "jitter_ihc.png": "immunohistochemistry.png"}
FLIP_CROP = {"flip_chelsea.png": "chelsea", "flip_rocket.png": "rocket", "crop_camera.png": "camera"}
UNRELATED = ["other_moon.png", "other_page.png", "other_hubble.png", "noise0.png", "noise1.png"]
NUM_GENERATED = len(EXACT) + len(JITTER) + len(FLIP_CROP) + len(UNRELATED)


def _shipped(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 64))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/: 7 skimage images + 2 random crops of each (21); generated/: exact copies, colour jitters, flips, a
    crop, unrelated images and noise (12), plus one corrupt file."""
    root = tmp_path_factory.mktemp("replicate")
    rng = np.random.default_rng(0)
    train = {n: _shipped(n) for n in BASE}
    for n in BASE:
        for j in range(2):
            x, y = rng.integers(0, 24, 2)
            train[f"{n}_crop{j}"] = train[n].crop((x, y, x + 40, y + 40)).resize((64, 64))
    generated = {
        "copy_astronaut": train["astronaut"],
        "copy_coffee_crop0": train["coffee_crop0"],
        "jitter_coins": ImageEnhance.Brightness(ImageEnhance.Contrast(train["coins"]).enhance(1.3)).enhance(
            0.8
        ),
        "jitter_ihc": ImageEnhance.Color(train["immunohistochemistry"]).enhance(0.5),
        "flip_chelsea": ImageOps.mirror(train["chelsea"]),
        "flip_rocket": ImageOps.mirror(train["rocket"]),
        "crop_camera": train["camera"].crop((8, 8, 56, 56)).resize((64, 64)),
        "other_moon": _shipped("moon"),
        "other_page": _shipped("page"),
        "other_hubble": _shipped("hubble_deep_field"),
        **{f"noise{i}": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(2)},
    }
    for folder, images in (("train", train), ("generated", generated)):
        (root / folder).mkdir()
        for name, image in images.items():
            image.save(root / folder / f"{name}.png")
    (root / "generated" / "corrupt.png").write_bytes(b"not an image")
    return root


def run(root, out, extractor="pixels", *extra):
    overrides = [
        f"extractor={extractor}",
        f"generated={root / 'generated'}",
        f"train={root / 'train'}",
        f"paths.data_dir={root / 'data'}",
        "num_workers=0",
        "batch_size=8",
        "device=cpu",
        *extra,
    ]
    if extractor == "sscd":
        overrides.append("extractor.checkpoint=null")  # random SSCD architecture: nothing to download
        torch.manual_seed(0)  # the random weights, and so the ranking, are fixed
    stats = replicate(compose_config("replicate.yaml", overrides, out))
    with open(out / "matches.csv") as f:
        rows = list(csv.DictReader(f))
    return stats, json.loads((out / "report.json").read_text()), rows


def test_pixels_rank_planted_copies_first_and_second_run_hits_the_cache(folders, tmp_path, monkeypatch):
    stats, report, rows = run(folders, tmp_path / "a", "pixels", "threshold=0.9", "k=3")
    for name in ("report.json", "matches.csv", "histogram.png", "gallery.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    assert report["train_cache"] == "miss"
    assert [s["path"] for s in report["skipped"]["generated"]] == ["corrupt.png"] and report["skipped"][
        "train"
    ] == []
    assert "not an image" in report["skipped"]["generated"][0]["reason"]
    assert report["counts"] == {
        "generated": NUM_GENERATED,
        "train": 21,
        "generated_skipped": 1,
        "train_skipped": 0,
        "above_threshold": 4,
    }
    # Pixels (Pearson correlation of thumbnails) see exact and colour-jittered copies (sim > 0.98), not flips or
    # crops: those 4 rank first in the report, each matched to its source, and are the share above 0.9.
    planted = {**EXACT, **JITTER}
    assert {r["generated"] for r in rows[:4]} == set(planted)
    assert all(r["match_1"] == planted[r["generated"]] for r in rows[:4])
    assert all(float(r["sim_1"]) > 0.98 for r in rows[:4]) and float(rows[4]["sim_1"]) < 0.9
    assert stats["sim_gt_thr"] == pytest.approx(len(planted) / NUM_GENERATED)
    # flips and the crop still find an image of their source among the training images
    for r in rows:
        if r["generated"] in FLIP_CROP:
            assert r["match_1"].startswith(FLIP_CROP[r["generated"]]), r
    assert list(rows[0]) == ["generated", "match_1", "sim_1", "match_2", "sim_2", "match_3", "sim_3"]

    def no_extraction(*args, **kwargs):
        raise AssertionError("the training folder was extracted again despite a valid cache")

    with (
        monkeypatch.context() as patch
    ):  # the generated folder is extracted through src.replicate's own import
        patch.setattr(features_module, "extract_folder", no_extraction)
        again, report_b, _ = run(folders, tmp_path / "b", "pixels", "threshold=0.9", "k=3")
    assert report_b["train_cache"] == "hit" and again == stats


def test_random_sscd_ranks_exact_copies_first_and_misses_the_pixel_cache(folders, tmp_path):
    run(folders, tmp_path / "pixels", "pixels")  # fills the cache for pixels
    # A random ResNet-50 maps every image close to one direction (all similarities > 0.99), yet identical inputs
    # still give identical features: the exact copies rank first with similarity 1.
    stats, report, rows = run(folders, tmp_path / "sscd", "sscd", "threshold=0.99999")
    assert report["train_cache"] == "miss" and report["extractor"] == "sscd_resnet50_random_dcr"
    assert {r["generated"] for r in rows[:2]} == set(EXACT)
    assert all(r["match_1"] == EXACT[r["generated"]] and float(r["sim_1"]) > 0.99999 for r in rows[:2])
    assert stats["sim_gt_thr"] == pytest.approx(len(EXACT) / NUM_GENERATED)
    # the colour-jittered copies are matched to their source too; flips and crops are not, for every random init
    for r in rows:
        if r["generated"] in JITTER:
            assert r["match_1"] == JITTER[r["generated"]], r


def test_touched_training_file_misses_the_cache(folders, tmp_path):
    assert run(folders, tmp_path / "a")[1]["train_cache"] in ("hit", "miss")
    assert run(folders, tmp_path / "b")[1]["train_cache"] == "hit"
    touched = folders / "train" / "coins.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run(folders, tmp_path / "c")[1]["train_cache"] == "miss"
    assert run(folders, tmp_path / "d", "pixels", "cache_dir=null")[1]["train_cache"] == "off"


@pytest.mark.parametrize("which", ["generated", "train"])
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_folder_names_the_path_and_the_extensions(folders, tmp_path, which, state):
    bad = tmp_path / "bad"
    if state == "empty":
        bad.mkdir()
        (bad / "notes.txt").write_text("no images here")
    with pytest.raises(Exception, match=rf"{bad}.*\.jpg, \.jpeg, \.png"):
        run(folders, tmp_path / "run", "pixels", f"{which}={bad}")


def test_prompts_and_wandb_logging(folders, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.json"
    names = sorted(p.name for p in (folders / "generated").iterdir() if p.name != "corrupt.png")
    prompts.write_text(json.dumps({n: f"a picture called {n}" for n in names}))
    logged = []
    fake = types.SimpleNamespace(
        run=object(),
        log=logged.append,
        Image=lambda path: ("image", path),
        Table=lambda columns, data: ("table", columns, len(data)),
    )
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    stats, _, rows = run(folders, tmp_path / "run", "pixels", f"prompts={prompts}")
    assert all(r["prompt"] == f"a picture called {r['generated']}" for r in rows)
    assert logged[0]["replication/sim_gt_thr"] == stats["sim_gt_thr"]
    assert logged[0]["replication/matches"][2] == NUM_GENERATED
    assert (
        logged[0]["replication/gallery"][0] == "image" and logged[0]["replication/complexity"][0] == "image"
    )
    with pytest.raises(ValueError, match="prompts.txt' has 1 lines for 12"):
        (tmp_path / "prompts.txt").write_text("one line\n")
        run(folders, tmp_path / "run2", "pixels", f"prompts={tmp_path / 'prompts.txt'}")


def test_training_subset_sampling_weights_and_extras_from_the_config(folders, tmp_path):
    names = sorted(p.name for p in (folders / "train").iterdir())
    subset = [n for n in names if not n.startswith("astronaut")]  # 18 of the 21 images
    index = tmp_path / "subset_index.json"
    index.write_text(json.dumps({"train": subset, "control": [n for n in names if n not in subset]}))
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({n: 5.0 if n.startswith("coins") else 1.0 for n in subset}))
    stats, report, rows = run(
        folders,
        tmp_path / "run",
        "pixels",
        f"train_files={index}",
        f"sampling_weights={weights}",
        "threshold=0.9",
    )
    assert report["counts"]["train"] == 18 and not any(r["match_1"].startswith("astronaut") for r in rows)
    assert report["sampling_weights"]["num_upweighted_train"] == 3
    upweighted = [
        float(r["sim_1"]) for r in rows if r["match_1"].startswith("coins")
    ]  # jitter_coins at least
    assert stats["sim_upweighted_count"] == len(upweighted) >= 1
    assert stats["sim_upweighted_mean"] == pytest.approx(np.mean(upweighted), abs=1e-6)
    assert stats["sim_upweighted_count"] + stats["sim_not_upweighted_count"] == NUM_GENERATED
    assert {"cc_entropy", "cc_jpeg_kb", "cc_tv"} <= set(stats) and (
        tmp_path / "run" / "complexity.png"
    ).is_file()
    # the held-out images of the same index: the planted copy of the astronaut finds its source
    held, report, rows = run(
        folders,
        tmp_path / "held",
        "pixels",
        f"train_files={index}",
        "train_files_key=control",
        "complexity=false",
    )
    assert report["counts"]["train"] == 3 and rows[0]["generated"] == "copy_astronaut.png"
    assert "cc_entropy" not in held and not (tmp_path / "held" / "complexity.png").exists()


def test_extras_fail_before_extraction_with_how_to_fix(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none.pth' do not exist.*fid.weights=PATH"):
        run(
            folders,
            tmp_path / "fid",
            "pixels",
            "fid.enabled=true",
            f"fid.weights={tmp_path / 'none.pth'}",
            f"train={tmp_path / 'not_read'}",
        )
    with pytest.raises(ValueError, match="clip_score needs the generations' prompts"):
        run(folders, tmp_path / "clip", "pixels", "clip_score.enabled=true", f"train={tmp_path / 'not_read'}")
