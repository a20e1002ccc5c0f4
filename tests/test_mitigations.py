"""The caption mitigations and the text-embedding noise (docs/memorization.md#train-time-mitigations,
docs/memorization.md#inference-time-mitigations), with seeded generators and the real open_clip CLIP
tokenizer."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from src.mitigations import (
    INFERENCE_MITIGATIONS,
    RANDOM_TOKEN_VOCAB,
    SAMPLING_MITIGATIONS,
    TRAIN_MITIGATIONS,
    add_random_numbers,
    add_random_tokens,
    apply_inference_mitigation,
    apply_train_mitigation,
    caption_word_repetition,
    decode_tokens,
    first_caption,
    gaussian_noise_caption,
    insert_words,
    multiple_captions,
    noise_guidance_embeddings,
    noise_text_embeddings,
    random_caption_replacement,
    random_token_addition,
    random_token_caption,
    repeat_caption_words,
)
from tests.conftest import CAPTIONS

CONF = Path(__file__).resolve().parents[1] / "conf" / "mitigation"


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_decode_tokens_matches_clip_vocabulary(tokenizer):
    # "a photo of" are whole-word tokens 320, 1125, 539 in the CLIP BPE vocabulary; decode strips the end space.
    assert tokenizer.decode([320, 1125, 539]) == "a photo of "
    assert decode_tokens(tokenizer, np.array([320, 1125, 539])) == "a photo of"
    assert tokenizer.encode("a photo of") == [320, 1125, 539]


def test_random_token_caption_decodes_uniform_ids(tokenizer):
    ids = rng(3).integers(0, RANDOM_TOKEN_VOCAB, size=4)
    caption = random_token_caption(tokenizer, rng(3))
    assert caption == tokenizer.decode([int(i) for i in ids]).strip()
    assert caption == random_token_caption(tokenizer, rng(3))
    assert caption != random_token_caption(tokenizer, rng(4))
    # Ids stay below the special tokens: the start/end markers never appear.
    many = [random_token_caption(tokenizer, rng(seed), num_tokens=8) for seed in range(200)]
    assert not any("<start_of_text>" in text or "<end_of_text>" in text for text in many)


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
    torch.manual_seed(3)  # without a generator (training): torch's global one
    global_noise = noise_text_embeddings(embeddings, 0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(global_noise, 0.5 * torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="lam=-1"):
        noise_text_embeddings(embeddings, -1, torch.Generator())


def test_gni_noises_each_image_from_its_own_seed():
    uncond, cond = torch.zeros(3, 4, 5), torch.ones(3, 4, 5)
    noisy_uncond, noisy_cond = noise_guidance_embeddings(uncond, cond, 0.1, seeds=[7, 8, 9])
    assert noisy_uncond.shape == uncond.shape and noisy_cond.shape == cond.shape
    assert not torch.equal(noisy_uncond, uncond) and not torch.equal(noisy_cond, cond)
    assert (noisy_cond - 1).abs().max() < 1.0 and 0.05 < (noisy_cond - 1).std() < 0.2  # lam * N(0, 1)
    # an image's noise depends on its seed only, not on the batch around it
    alone_uncond, alone_cond = noise_guidance_embeddings(uncond[1:2], cond[1:2], 0.1, seeds=[8])
    assert torch.equal(alone_uncond[0], noisy_uncond[1]) and torch.equal(alone_cond[0], noisy_cond[1])
    assert not torch.equal(noisy_cond[0] - 1, noisy_cond[1] - 1)
    assert not torch.equal(noisy_uncond[0], noisy_cond[0] - 1)  # the two halves get different noise
    # noise_uncond=False keeps the unconditional embedding clean, the conditional one noised as before
    clean_uncond, same_cond = noise_guidance_embeddings(
        uncond, cond, 0.1, seeds=[7, 8, 9], noise_uncond=False
    )
    assert torch.equal(clean_uncond, uncond) and torch.equal(same_cond, noisy_cond)
    unchanged = noise_guidance_embeddings(uncond, cond, 0.0, seeds=[7, 8, 9])
    assert unchanged[0] is uncond and unchanged[1] is cond
    with pytest.raises(ValueError, match="lam=-1"):
        noise_guidance_embeddings(uncond, cond, -1, seeds=[7, 8, 9])


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
    assert set(INFERENCE_MITIGATIONS) == {"none", "gni", "rt", "cwr", "rna", *SAMPLING_MITIGATIONS}
    for name in SAMPLING_MITIGATIONS:  # they act inside sampling, not on the text
        assert apply_inference_mitigation(name, prompt, rng()) == prompt
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
