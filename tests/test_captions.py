"""Caption handling and the caption-randomisation mitigations (PAPERS.md §2.3-§2.6), with seeded generators and
the real open_clip CLIP tokenizer."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from src.data.captions import (
    INFERENCE_MITIGATIONS,
    RANDOM_TOKEN_VOCAB,
    TRAIN_MITIGATIONS,
    add_random_numbers,
    add_random_tokens,
    apply_inference_mitigation,
    apply_train_mitigation,
    caption_word_repetition,
    clip_tokenizer,
    condition_caption,
    decode_tokens,
    duplicated_caption,
    duplication_weights,
    first_caption,
    gaussian_noise_caption,
    insert_words,
    load_captions,
    multiple_captions,
    noise_guidance_embeddings,
    noise_text_embeddings,
    random_caption_replacement,
    random_captions_for,
    random_token_addition,
    random_token_caption,
    repeat_caption_words,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "mitigation"
CAPTIONS = ["a red car on a road", "a car", "red automobile parked"]


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_decode_tokens_matches_clip_vocabulary(tokenizer):
    # "a photo of" are whole-word tokens 320, 1125, 539 in the CLIP BPE vocabulary; decode strips the end space.
    assert tokenizer.decode([320, 1125, 539]) == "a photo of "
    assert decode_tokens(tokenizer, np.array([320, 1125, 539])) == "a photo of"
    assert tokenizer.encode("a photo of") == [320, 1125, 539]


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


def test_random_token_caption_decodes_uniform_ids(tokenizer):
    ids = rng(3).integers(0, RANDOM_TOKEN_VOCAB, size=4)
    caption = random_token_caption(tokenizer, rng(3))
    assert caption == tokenizer.decode([int(i) for i in ids]).strip()
    assert caption == random_token_caption(tokenizer, rng(3))
    assert caption != random_token_caption(tokenizer, rng(4))
    # Ids stay below the special tokens: the start/end markers never appear.
    many = [random_token_caption(tokenizer, rng(seed), num_tokens=8) for seed in range(200)]
    assert not any("<start_of_text>" in text or "<end_of_text>" in text for text in many)


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


def test_insert_words_positions_follow_the_generator():
    caption = "a b c"
    inserted = insert_words(caption, ["X", "Y"], rng(1))
    positions = rng(1)
    words = ["a", "b", "c"]
    words.insert(int(positions.integers(0, 4)), "X")
    words.insert(int(positions.integers(0, 5)), "Y")
    assert inserted == " ".join(words)
    assert sorted(inserted.split(" ")) == ["X", "Y", "a", "b", "c"]
    # All len + 1 positions, both ends included, occur with roughly equal frequency.
    counts = Counter(insert_words(caption, ["X"], rng(seed)).split(" ").index("X") for seed in range(800))
    assert sorted(counts) == [0, 1, 2, 3]
    assert min(counts.values()) > 150
    # Splitting is on single spaces, as DCR does: a double space keeps an empty word.
    assert insert_words("a  b", [], rng(0)) == "a  b"
    assert insert_words("", ["X"], rng(0)) in ("X ", " X")


def test_add_random_tokens(tokenizer):
    prompt = add_random_tokens("one two three", rng(5), 3, tokenizer)
    expected_rng = rng(5)
    expected = "one two three"
    for _ in range(3):
        token = tokenizer.decode([int(expected_rng.integers(0, RANDOM_TOKEN_VOCAB, size=1)[0])]).strip()
        words = expected.split(" ")
        words.insert(int(expected_rng.integers(0, len(words) + 1)), token)
        expected = " ".join(words)
    assert prompt == expected
    assert add_random_tokens("one two three", rng(5), 0, tokenizer) == "one two three"


def test_repeat_caption_words_copies_words_of_the_prompt():
    for seed in range(50):
        prompt = repeat_caption_words("alpha beta gamma delta", rng(seed), 4)
        words = prompt.split(" ")
        assert len(words) == 8
        counts = Counter(words)
        assert set(counts) <= {"alpha", "beta", "gamma", "delta"}
        assert sum(counts.values()) - 4 == 4 and all(
            counts[w] >= 1 for w in ("alpha", "beta", "gamma", "delta")
        )


def test_add_random_numbers_in_range():
    numbers = []
    for seed in range(200):
        words = add_random_numbers("x y", rng(seed), 2).split(" ")
        added = [word for word in words if word not in ("x", "y")]
        assert len(added) == 2
        numbers += [int(word) for word in added]
    assert all(0 <= number < 100000 for number in numbers)
    assert max(numbers) > 90000 and min(numbers) < 10000
    assert add_random_numbers("x y", rng(9), 2) == add_random_numbers("x y", rng(9), 2)


def test_noise_text_embeddings():
    embeddings = torch.zeros(2, 3, 4)
    noised = noise_text_embeddings(embeddings, 0.5, torch.Generator().manual_seed(0))
    expected = 0.5 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noised, expected)
    assert noise_text_embeddings(embeddings, 0.0, torch.Generator()) is embeddings
    half = noise_text_embeddings(
        torch.ones(2, 3, 4, dtype=torch.float16), 0.1, torch.Generator().manual_seed(1)
    )
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="lam=-1"):
        noise_text_embeddings(embeddings, -1, torch.Generator())


def test_noise_guidance_embeddings_both_or_cond_half():
    uncond, cond = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    noisy_uncond, noisy_cond = noise_guidance_embeddings(uncond, cond, 0.1, torch.Generator().manual_seed(0))
    noise = 0.1 * torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy_uncond, noise[:2])
    torch.testing.assert_close(noisy_cond, 1 + noise[2:])
    clean_uncond, noisy_cond = noise_guidance_embeddings(
        uncond, cond, 0.1, torch.Generator().manual_seed(0), noise_uncond=False
    )
    assert torch.equal(clean_uncond, uncond)
    cond_noise = 0.1 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy_cond, 1 + cond_noise)


def test_first_caption_and_gn_return_caption_zero():
    assert first_caption(CAPTIONS, rng()) == CAPTIONS[0]
    assert gaussian_noise_caption(CAPTIONS, rng(), lam=0.3) == CAPTIONS[0]
    with pytest.raises(ValueError, match="lam=-0.1"):
        gaussian_noise_caption(CAPTIONS, rng(), lam=-0.1)


def test_multiple_captions_uniform():
    generator = rng(0)
    counts = Counter(multiple_captions(CAPTIONS, generator) for _ in range(3000))
    assert set(counts) == set(CAPTIONS)
    assert all(abs(count - 1000) < 100 for count in counts.values())
    with pytest.raises(ValueError, match="'mc' needs several captions per image; this image has 1"):
        multiple_captions(["only one"], rng())


def test_random_caption_replacement(tokenizer):
    assert all(
        random_caption_replacement(CAPTIONS, rng(s), p=0.0, tokenizer=tokenizer) == CAPTIONS[0]
        for s in range(100)
    )
    for seed in range(20):
        replaced = random_caption_replacement(CAPTIONS, rng(seed), p=1.0, tokenizer=tokenizer)
        expected_rng = rng(seed)
        expected_rng.random()
        ids = expected_rng.integers(0, RANDOM_TOKEN_VOCAB, size=4)
        assert replaced == tokenizer.decode([int(i) for i in ids]).strip()
        assert replaced != CAPTIONS[0]
    generator = rng(1)
    fired = sum(
        random_caption_replacement(CAPTIONS, generator, p=0.1, tokenizer=tokenizer) != CAPTIONS[0]
        for _ in range(2000)
    )
    assert 150 < fired < 250
    with pytest.raises(ValueError, match=r"p=1.5 must lie in \[0, 1\]"):
        random_caption_replacement(CAPTIONS, rng(), p=1.5)


def test_random_token_addition(tokenizer):
    assert random_token_addition(CAPTIONS, rng(2), p=0.0, tokenizer=tokenizer) == CAPTIONS[0]
    for seed in range(20):
        added = random_token_addition(CAPTIONS, rng(seed), p=1.0, tokenizer=tokenizer)
        expected_rng = rng(seed)
        expected_rng.random()
        assert added == add_random_tokens(CAPTIONS[0], expected_rng, 2, tokenizer)
        # Caption 0's words stay in order; two decoded tokens are added (a token may be empty after stripping).
        remaining = iter(added.split(" "))
        assert all(word in remaining for word in CAPTIONS[0].split(" "))
        assert len(added.split(" ")) == len(CAPTIONS[0].split(" ")) + 2


def test_caption_word_repetition():
    assert caption_word_repetition(CAPTIONS, rng(2), p=0.0) == CAPTIONS[0]
    for seed in range(20):
        repeated = caption_word_repetition(CAPTIONS, rng(seed), p=1.0)
        words = repeated.split(" ")
        assert len(words) == len(CAPTIONS[0].split(" ")) + 2
        assert set(words) == set(CAPTIONS[0].split(" "))


def test_apply_train_mitigation_registry_and_configs(tokenizer):
    assert set(TRAIN_MITIGATIONS) == {"none", "mc", "gn", "rc", "rt", "cwr"}
    for name in TRAIN_MITIGATIONS:
        options = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        assert options.pop("name") == name
        first = apply_train_mitigation(name, CAPTIONS, rng(4), tokenizer=tokenizer, **options)
        assert first == apply_train_mitigation(name, CAPTIONS, rng(4), tokenizer=tokenizer, **options)
        assert first == TRAIN_MITIGATIONS[name](CAPTIONS, rng(4), tokenizer=tokenizer, **options)
    assert apply_train_mitigation("rc", CAPTIONS, rng(0), p=1.0) != CAPTIONS[0]  # default tokenizer
    with pytest.raises(ValueError, match="valid names: none, mc, gn, rc, rt, cwr"):
        apply_train_mitigation("mixup", CAPTIONS, rng())
    with pytest.raises(
        ValueError, match=r"unknown options \['lam'\]; it accepts \['p', 'num_tokens', 'tokenizer'\]"
    ):
        apply_train_mitigation("rc", CAPTIONS, rng(), lam=0.1)


def test_apply_inference_mitigation(tokenizer):
    prompt = "Wall View 002"
    assert set(INFERENCE_MITIGATIONS) == {"none", "gni", "rt", "cwr", "rna"}
    assert apply_inference_mitigation("none", prompt, rng()) == prompt
    assert apply_inference_mitigation("gni", prompt, rng()) == prompt
    assert apply_inference_mitigation("rt", prompt, rng(3), tokenizer) == add_random_tokens(
        prompt, rng(3), 2, tokenizer
    )
    assert apply_inference_mitigation("cwr", prompt, rng(3), repeats=4) == repeat_caption_words(
        prompt, rng(3), 4
    )
    assert apply_inference_mitigation("rna", prompt, rng(3)) == add_random_numbers(prompt, rng(3), 2)
    assert len(apply_inference_mitigation("rna", prompt, rng(3), repeats=4).split(" ")) == 7
    with pytest.raises(ValueError, match="valid names: none, gni, rt, cwr, rna"):
        apply_inference_mitigation("rand_numb_add", prompt, rng())
    with pytest.raises(ValueError, match="repeats=-1"):
        apply_inference_mitigation("rna", prompt, rng(), repeats=-1)


def test_duplication_weights():
    weights = duplication_weights(1000, weight_pc=0.05, dup_weight=5.0, seed=3)
    assert weights.shape == (1000,) and weights.dtype == torch.float64
    assert int((weights == 5.0).sum()) == 50 and int((weights == 1.0).sum()) == 950
    # Duplicated images make up 250 / 1200 of the sampling mass (PAPERS.md §2.4).
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
    with caplog.at_level(logging.WARNING, logger="src.data.captions"):
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
    with pytest.raises(ValueError, match="broken.json' is not valid JSON"):
        load_captions(tmp_path / "broken.json", ["x.jpg"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_captions(tmp_path / "missing.json", ["x.jpg"])
