"""Captions of the diffusion data (docs/memorization.md#conditioning, docs/memorization.md#duplication):
conditioning levels, fixed random captions, duplication weights and the captions file."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data.diffusion.captions import (
    condition_caption,
    duplicated_caption,
    duplication_weights,
    load_captions,
    random_captions_for,
)
from tests.conftest import CAPTIONS


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_condition_caption_levels():
    assert condition_caption("nolevel", CAPTIONS) == "An image"
    assert condition_caption("classlevel", CAPTIONS, class_name="church") == "An image of church"
    assert condition_caption("instancelevel_blip", CAPTIONS) == "a red car on a road"
    assert condition_caption("instancelevel_random", CAPTIONS, random_caption="xq zz") == "xq zz"
    with pytest.raises(ValueError, match="class_name"):
        condition_caption("classlevel", CAPTIONS)
    with pytest.raises(ValueError, match="random_captions_for"):
        condition_caption("instancelevel_random", CAPTIONS)
    with pytest.raises(ValueError, match="no captions"):
        condition_caption("instancelevel_blip", [])
    with pytest.raises(ValueError, match="nolevel, classlevel, instancelevel_blip, instancelevel_random"):
        condition_caption("instancelevel_ogcap", CAPTIONS)


def test_random_captions_for_is_fixed_per_path(tokenizer):
    paths = [f"class_{i % 3}/img_{i}.jpg" for i in range(20)]
    captions = random_captions_for(paths, tokenizer, seed=7)
    assert list(captions) == paths
    assert all(captions[path] for path in paths)
    assert len(set(captions.values())) == len(paths)
    # The same seed gives the same captions, whatever the order or the other images.
    reordered = random_captions_for(paths[::-1][:5], tokenizer, seed=7)
    assert all(reordered[path] == captions[path] for path in reordered)
    other_seed = random_captions_for(paths, tokenizer, seed=8)
    assert sum(other_seed[path] != captions[path] for path in paths) >= 18


def test_duplication_weights():
    weights = duplication_weights(1000, weight_pc=0.05, dup_weight=5.0, seed=3)
    assert weights.shape == (1000,) and weights.dtype == torch.float64
    assert int((weights == 5.0).sum()) == 50 and int((weights == 1.0).sum()) == 950
    # Duplicated images make up 250 / 1200 of the sampling mass (docs/memorization.md#duplication).
    assert float(weights[weights > 1].sum() / weights.sum()) == pytest.approx(250 / 1200)
    assert torch.equal(weights, duplication_weights(1000, seed=3))
    assert not torch.equal(weights, duplication_weights(1000, seed=4))
    assert int((duplication_weights(30, weight_pc=0.1, dup_weight=2.0) == 2.0).sum()) == 3
    assert torch.equal(duplication_weights(10, weight_pc=0.0), torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_pc=1.5"):
        duplication_weights(10, weight_pc=1.5)
    with pytest.raises(ValueError, match="num_images=0"):
        duplication_weights(0)


def test_duplicated_caption():
    for setting in ("nodup", "dup_both"):
        assert all(
            duplicated_caption(setting, CAPTIONS, dup, rng(s)) == CAPTIONS[0]
            for dup in (0, 1)
            for s in range(30)
        )
    assert all(duplicated_caption("dup_image", CAPTIONS, False, rng(s)) == CAPTIONS[0] for s in range(30))
    generator = rng(0)
    counts = Counter(duplicated_caption("dup_image", CAPTIONS, True, generator) for _ in range(3000))
    assert set(counts) == set(CAPTIONS) and all(abs(count - 1000) < 100 for count in counts.values())
    assert duplicated_caption("dup_image", ["solo"], False, rng()) == "solo"
    with pytest.raises(ValueError, match="'dup_image' needs several captions"):
        duplicated_caption("dup_image", ["solo"], True, rng())
    with pytest.raises(ValueError, match="valid settings: nodup, dup_both, dup_image"):
        duplicated_caption("dup", CAPTIONS, True, rng())


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_load_captions_reads_lists_and_strings(tmp_path):
    path = write_json(tmp_path / "captions.json", {"./a/1.jpg": ["one", "uno"], "b/2.jpg": "two"})
    assert load_captions(path, ["b/2.jpg", Path("a/1.jpg")]) == {
        "b/2.jpg": ["two"],
        "a/1.jpg": ["one", "uno"],
    }


def test_load_captions_reports_missing_and_unknown(tmp_path, caplog):
    content = {f"img_{i}.jpg": [f"caption {i}"] for i in range(10)}
    path = write_json(tmp_path / "captions.json", content)
    images = [f"img_{i}.jpg" for i in range(3, 20)]  # 0-2 unknown to the folder, 10-19 uncaptioned
    with pytest.raises(ValueError) as error:
        load_captions(path, images)
    message = str(error.value)
    assert (
        "10 of 17 images have no captions (img_10.jpg, img_11.jpg, img_12.jpg, img_13.jpg, img_14.jpg, ... (5 more))"
        in message
    )
    assert "3 captioned images do not exist among the 17 images (img_0.jpg, img_1.jpg, img_2.jpg)" in message
    assert "allow_missing=True" in message
    with caplog.at_level(logging.WARNING, logger="src.data.diffusion.captions"):
        kept = load_captions(path, images, allow_missing=True)
    assert list(kept) == [f"img_{i}.jpg" for i in range(3, 10)]
    assert "10 of 17 images have no captions" in caplog.text and "dropping them" in caplog.text


def test_load_captions_rejects_empty_and_malformed(tmp_path):
    for bad in ({"x.jpg": []}, {"x.jpg": ""}, {"x.jpg": ["fine", "  "]}):
        with pytest.raises(ValueError, match="image 'x.jpg' has an empty caption"):
            load_captions(write_json(tmp_path / "c.json", bad), ["x.jpg"], allow_missing=True)
    with pytest.raises(ValueError, match="image 'x.jpg' must map to a caption string or a list of strings"):
        load_captions(write_json(tmp_path / "c.json", {"x.jpg": [1, 2]}), ["x.jpg"])
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_captions(write_json(tmp_path / "c.json", ["x"]), ["x.jpg"])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json', line 1 column 2: not valid JSON"):
        load_captions(tmp_path / "broken.json", ["x.jpg"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_captions(tmp_path / "missing.json", ["x.jpg"])
