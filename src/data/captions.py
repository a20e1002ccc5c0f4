"""Caption handling for text-conditional diffusion and the caption-randomisation mitigations of
"Understanding and Mitigating Copying in Diffusion Models" (PAPERS.md §2.3-§2.6; official code somepago/DCR
`datasets.py`, `diff_train.py`, `sd_mitigation.py`, `diff_inference.py`).

Pure functions, free of Lightning and Hydra. Every random function takes a `numpy.random.Generator` (`rng`),
so a caller seeds one per sample (e.g. `np.random.default_rng([seed, epoch, index])`); text-embedding noise
takes a `torch.Generator`. Where DCR's code and paper differ, the code is followed and the docstring says so.

Tokenizers: random tokens are CLIP BPE ids drawn uniformly from [0, 49400) (DCR: `np.random.randint(49400)`)
and decoded with the CLIP tokenizer. Any object with `decode(list[int]) -> str` works (open_clip's
`SimpleTokenizer`, Hugging Face's `CLIPTokenizer`); `clip_tokenizer()` gives open_clip's, which ships its
vocabulary and needs no network. Decoded text is stripped of surrounding spaces, as Hugging Face's
`CLIPTokenizer.decode` (used by DCR) does; open_clip's decode leaves a trailing space after a word end.
"""

import functools
import hashlib
import inspect
import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import torch

log = logging.getLogger(__name__)

RANDOM_TOKEN_VOCAB = 49400  # DCR draws ids in [0, 49400): below the CLIP special tokens 49406/49407
RANDOM_NUMBER_RANGE = 100000  # DCR `rand_numb_add`: np.random.choice(100000)
TRAIN_INSERTIONS = 2  # words inserted by the train-time RT and CWR (hard-coded in DCR datasets.py)
CONDITIONING_LEVELS = ("nolevel", "classlevel", "instancelevel_blip", "instancelevel_random")
DUPLICATION_SETTINGS = ("nodup", "dup_both", "dup_image")


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's CLIP BPE tokenizer (the ViT-B-32 / SD text-encoder vocabulary of 49,408 ids), offline."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def decode_tokens(tokenizer, token_ids) -> str:
    """Decode CLIP token ids to text, stripped of surrounding spaces (as Hugging Face's CLIP decode does)."""
    return tokenizer.decode([int(token_id) for token_id in token_ids]).strip()


def _first_caption(captions: list[str]) -> str:
    if len(captions) == 0:
        raise ValueError("the image has no captions; every image needs at least one (caption 0)")
    return captions[0]


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mitigation probability p={p} must lie in [0, 1]")


# ---------------------------------------------------------------- conditioning (§2.3)


def condition_caption(
    level: str, captions: list[str], class_name: str | None = None, random_caption: str | None = None
) -> str:
    """The training caption of one image under a conditioning level (PAPERS.md §2.3, DCR `--class_prompt`).

    - `nolevel`: the constant "An image";
    - `classlevel`: "An image of {class_name}";
    - `instancelevel_blip`: the image's caption 0;
    - `instancelevel_random`: `random_caption`, the image's fixed random-token caption (make them once with
      `random_captions_for`; DCR stores the token ids in `random_captions_4.json` and decodes them).

    DCR's `instancelevel_ogcap` (the original LAION caption) is `instancelevel_blip` on a captions file
    holding the LAION captions.
    """
    if level == "nolevel":
        return "An image"
    if level == "classlevel":
        if not class_name:
            raise ValueError("conditioning level 'classlevel' needs the image's class_name")
        return f"An image of {class_name}"
    if level == "instancelevel_blip":
        return _first_caption(captions)
    if level == "instancelevel_random":
        if not random_caption:
            raise ValueError(
                "conditioning level 'instancelevel_random' needs the image's random_caption "
                "(make a fixed one per image with random_captions_for)"
            )
        return random_caption
    raise ValueError(f"unknown conditioning level '{level}'; valid levels: {', '.join(CONDITIONING_LEVELS)}")


# ---------------------------------------------------------------- random text


def random_token_caption(tokenizer, rng: np.random.Generator, num_tokens: int = 4) -> str:
    """`num_tokens` CLIP token ids drawn uniformly from [0, 49400), decoded to one string (DCR `randrepl`).

    Sub-word tokens join their neighbours when decoded, so the text may hold fewer than `num_tokens` words.
    """
    token_ids = rng.integers(0, RANDOM_TOKEN_VOCAB, size=num_tokens)
    return decode_tokens(tokenizer, token_ids)


def random_captions_for(paths, tokenizer, seed: int, num_tokens: int = 4) -> dict[str, str]:
    """A fixed random-token caption per image, {path: caption} (PAPERS.md §2.3, `instancelevel_random`).

    Each image's caption is drawn from a generator seeded by (seed, SHA-256 of its path), so it depends only
    on the seed and the path: stable across runs and unchanged when images are added or removed. (DCR ships
    the token ids in a JSON file whose generation code is not public.)
    """
    captions = {}
    for path in paths:
        key = str(path)
        path_hash = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
        rng = np.random.default_rng([seed, path_hash])
        captions[key] = random_token_caption(tokenizer, rng, num_tokens)
    return captions


def insert_words(caption: str, words: list[str], rng: np.random.Generator) -> str:
    """Insert each word in turn at a uniform position of the caption's space-split word list (ends included).

    Follows DCR `insert_rand_word`: `caption.split(" ")`, insert at `randint(0, len)` inclusive, join with
    single spaces. Later words are inserted into the already-extended list.
    """
    word_list = caption.split(" ")
    for word in words:
        word_list.insert(int(rng.integers(0, len(word_list) + 1)), word)
    return " ".join(word_list)


def add_random_tokens(prompt: str, rng: np.random.Generator, repeats: int, tokenizer) -> str:
    """Insert `repeats` single random CLIP tokens, each decoded on its own (DCR `rand_word_add`, RT)."""
    for _ in range(repeats):
        prompt = insert_words(prompt, [random_token_caption(tokenizer, rng, num_tokens=1)], rng)
    return prompt


def repeat_caption_words(prompt: str, rng: np.random.Generator, repeats: int) -> str:
    """Insert `repeats` words drawn (with replacement) from the original prompt's words (DCR CWR)."""
    word_list = prompt.split(" ")
    for _ in range(repeats):
        prompt = insert_words(prompt, [word_list[int(rng.integers(0, len(word_list)))]], rng)
    return prompt


def add_random_numbers(prompt: str, rng: np.random.Generator, repeats: int) -> str:
    """Insert `repeats` random integers from [0, 100000), as text (DCR `rand_numb_add`, RNA)."""
    for _ in range(repeats):
        prompt = insert_words(prompt, [str(int(rng.integers(0, RANDOM_NUMBER_RANGE)))], rng)
    return prompt


# ---------------------------------------------------------------- text-embedding noise (GN, GNI)


def noise_text_embeddings(embeddings: torch.Tensor, lam: float, generator: torch.Generator) -> torch.Tensor:
    """embeddings + lam * N(0, 1), noise of the embeddings' shape (B, L, D) (PAPERS.md §2.5 GN, §2.6 GNI).

    DCR adds `rand_noise_lam * randn_like` to the text-encoder output at every training step
    (`--rand_noise_lam`, code default 0 = off, README suggests λ in [0, 1]); the paper's λ is UNCONFIRMED
    (0.1 suspected, the README's inference example). The noise is drawn on the generator's device in float32.
    """
    if lam < 0:
        raise ValueError(f"text-embedding noise scale lam={lam} must be >= 0")
    if lam == 0:
        return embeddings
    noise = torch.randn(embeddings.shape, generator=generator, device=generator.device)
    return embeddings + lam * noise.to(device=embeddings.device, dtype=embeddings.dtype)


def noise_guidance_embeddings(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    lam: float,
    generator: torch.Generator,
    noise_uncond: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GNI for classifier-free guidance: noise the prompt embeddings, (uncond, cond) each (B, L, D).

    DCR `sd_mitigation.py` noises the output of diffusers 0.14 `_encode_prompt`, which is the concatenation
    [uncond; cond], so both halves get noise: that is `noise_uncond=True` (default, noise drawn once on the
    concatenation in that order). `noise_uncond=False` noises only the text-conditional half, which is what
    the paper's description (noise on the prompt embedding) would also allow.
    """
    if not noise_uncond:
        return uncond, noise_text_embeddings(cond, lam, generator)
    both = noise_text_embeddings(torch.cat([uncond, cond]), lam, generator)  # (2B, L, D)
    return both[: len(uncond)], both[len(uncond) :]


# ---------------------------------------------------------------- train-time mitigations (§2.5)


def first_caption(captions: list[str], rng: np.random.Generator, tokenizer=None) -> str:
    """`none`: caption 0, no mitigation."""
    return _first_caption(captions)


def multiple_captions(captions: list[str], rng: np.random.Generator, tokenizer=None) -> str:
    """`mc` (DCR `--trainspecial allcaps`): a caption drawn uniformly from the image's captions on each draw."""
    if len(captions) < 2:
        raise ValueError(
            f"mitigation 'mc' needs several captions per image; this image has {len(captions)}: {captions}"
        )
    return captions[int(rng.integers(0, len(captions)))]


def gaussian_noise_caption(
    captions: list[str], rng: np.random.Generator, lam: float = 0.1, tokenizer=None
) -> str:
    """`gn` (DCR `--rand_noise_lam`): caption 0; the mitigation is `noise_text_embeddings(..., lam)` applied
    by the model to the text-encoder output. `lam` is accepted here so a whole mitigation config can be
    passed; default 0.1 is UNCONFIRMED (PAPERS.md §2.5)."""
    if lam < 0:
        raise ValueError(f"mitigation 'gn': lam={lam} must be >= 0")
    return _first_caption(captions)


def random_caption_replacement(
    captions: list[str], rng: np.random.Generator, p: float = 0.1, num_tokens: int = 4, tokenizer=None
) -> str:
    """`rc` (DCR `--trainspecial randrepl`): with probability p, caption 0 is replaced by a random
    `num_tokens`-token caption (`random_token_caption`); otherwise caption 0. p=0.1 is DCR's code default;
    the paper's p is UNCONFIRMED. DCR tests `uniform() <= p`; here `random() < p`, so p=0 never fires."""
    _check_probability(p)
    caption = _first_caption(captions)
    if rng.random() < p:
        return random_token_caption(tokenizer or clip_tokenizer(), rng, num_tokens)
    return caption


def random_token_addition(
    captions: list[str], rng: np.random.Generator, p: float = 0.1, tokenizer=None
) -> str:
    """`rt` (DCR `--trainspecial randwordadd`): with probability p, insert 2 random decoded CLIP tokens at
    random word positions of caption 0 (`add_random_tokens`)."""
    _check_probability(p)
    caption = _first_caption(captions)
    if rng.random() < p:
        return add_random_tokens(caption, rng, TRAIN_INSERTIONS, tokenizer or clip_tokenizer())
    return caption


def caption_word_repetition(
    captions: list[str], rng: np.random.Generator, p: float = 0.1, tokenizer=None
) -> str:
    """`cwr` (DCR `--trainspecial wordrepeat`): with probability p, insert 2 words sampled from caption 0
    itself at random positions (`repeat_caption_words`)."""
    _check_probability(p)
    caption = _first_caption(captions)
    if rng.random() < p:
        return repeat_caption_words(caption, rng, TRAIN_INSERTIONS)
    return caption


TRAIN_MITIGATIONS = {
    "none": first_caption,
    "mc": multiple_captions,
    "gn": gaussian_noise_caption,
    "rc": random_caption_replacement,
    "rt": random_token_addition,
    "cwr": caption_word_repetition,
}


def apply_train_mitigation(
    name: str, captions: list[str], rng: np.random.Generator, tokenizer=None, **options
) -> str:
    """The training caption of one image under train-time mitigation `name` (PAPERS.md §2.5).

    `captions` is the image's caption list (caption 0 first); `options` are the mitigation's keys from
    `conf/mitigation/<name>.yaml` (`p`, `lam`, `num_tokens`). `tokenizer` decodes random tokens (default:
    `clip_tokenizer()`). DCR allows these only with `instancelevel_blip` conditioning.
    """
    if name not in TRAIN_MITIGATIONS:
        raise ValueError(
            f"unknown train-time mitigation '{name}'; valid names: {', '.join(TRAIN_MITIGATIONS)}"
        )
    function = TRAIN_MITIGATIONS[name]
    accepted = [key for key in inspect.signature(function).parameters if key not in ("captions", "rng")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"train-time mitigation '{name}' got unknown options {unknown}; it accepts {accepted}"
        )
    return function(captions, rng, tokenizer=tokenizer, **options)


# ---------------------------------------------------------------- inference-time mitigations (§2.6)


def _unchanged_prompt(prompt: str, rng: np.random.Generator, repeats: int, tokenizer) -> str:
    return prompt


INFERENCE_MITIGATIONS = {
    "none": _unchanged_prompt,
    # GNI changes the prompt embeddings (noise_guidance_embeddings), not the prompt text.
    "gni": _unchanged_prompt,
    "rt": lambda prompt, rng, repeats, tokenizer: add_random_tokens(
        prompt, rng, repeats, tokenizer or clip_tokenizer()
    ),
    "cwr": lambda prompt, rng, repeats, tokenizer: repeat_caption_words(prompt, rng, repeats),
    "rna": lambda prompt, rng, repeats, tokenizer: add_random_numbers(prompt, rng, repeats),
}


def apply_inference_mitigation(
    name: str, prompt: str, rng: np.random.Generator, tokenizer=None, repeats: int = 2
) -> str:
    """The generation prompt under inference-time mitigation `name` (PAPERS.md §2.6, DCR `--rand_augs`).

    `rt` inserts `repeats` random decoded tokens, `cwr` `repeats` words copied from the prompt, `rna`
    `repeats` random integers in [0, 100000); `none` and `gni` return the prompt unchanged (GNI noises the
    embeddings: `noise_guidance_embeddings`). `repeats` defaults to 2 as in `diff_inference.py`;
    `sd_mitigation.py` defaults to 4; the paper's count is UNCONFIRMED.
    """
    if name not in INFERENCE_MITIGATIONS:
        raise ValueError(
            f"unknown inference-time mitigation '{name}'; valid names: {', '.join(INFERENCE_MITIGATIONS)}"
        )
    if repeats < 0:
        raise ValueError(f"inference-time mitigation '{name}': repeats={repeats} must be >= 0")
    return INFERENCE_MITIGATIONS[name](prompt, rng, repeats, tokenizer)


# ---------------------------------------------------------------- duplication (§2.4)


def duplication_weights(
    num_images: int, weight_pc: float = 0.05, dup_weight: float = 5.0, seed: int = 0
) -> torch.Tensor:
    """Sampling weights (num_images,) float64 for `WeightedRandomSampler` (PAPERS.md §2.4).

    Exactly `round(weight_pc * num_images)` images, chosen without replacement by `seed`, get `dup_weight`;
    the others 1. With the defaults the duplicated 5% make up 0.25/1.2 ≈ 20.8% of draws. DCR truncates
    (`int(weight_pc * N)`), floors the weight (`w * dup_weight // 1`) and picks with the global NumPy seed.
    An image counts as duplicated when its weight is > 1 (DCR `samplingweights[index] > 1`).
    """
    if num_images <= 0:
        raise ValueError(f"duplication_weights: num_images={num_images} must be > 0")
    if not 0.0 <= weight_pc <= 1.0:
        raise ValueError(f"duplication_weights: weight_pc={weight_pc} must lie in [0, 1]")
    if dup_weight <= 0:
        raise ValueError(f"duplication_weights: dup_weight={dup_weight} must be > 0")
    num_duplicated = round(weight_pc * num_images)
    chosen = np.random.default_rng(seed).choice(num_images, size=num_duplicated, replace=False)
    weights = torch.ones(num_images, dtype=torch.float64)
    weights[torch.from_numpy(chosen)] = float(dup_weight)
    return weights


def duplicated_caption(
    setting: str, captions: list[str], is_duplicated: bool, rng: np.random.Generator
) -> str:
    """The caption of one draw under a duplication setting (PAPERS.md §2.4, DCR `--duplication`).

    `nodup` and `dup_both`: caption 0 (a duplicated image always comes with the same caption). `dup_image`:
    a duplicated image gets a caption drawn uniformly from its whole list (caption 0 included) on each
    draw; other images get caption 0.
    """
    if setting not in DUPLICATION_SETTINGS:
        raise ValueError(
            f"unknown duplication setting '{setting}'; valid settings: {', '.join(DUPLICATION_SETTINGS)}"
        )
    caption = _first_caption(captions)
    if setting == "dup_image" and is_duplicated:
        if len(captions) < 2:
            raise ValueError(
                f"duplication 'dup_image' needs several captions per duplicated image; this one has 1: {captions}"
            )
        return captions[int(rng.integers(0, len(captions)))]
    return caption


# ---------------------------------------------------------------- captions file


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_captions(path, image_paths, allow_missing: bool = False) -> dict[str, list[str]]:
    """Read a captions JSON `{relative_path: [caption_0, caption_1, ...]}` for the given images.

    A plain string value is read as a one-caption list. `image_paths` are the images' paths relative to the
    image root (DCR keys hold the full path instead); both sides are compared as normalised POSIX paths
    ("./a/b.jpg" == "a/b.jpg"). Returns {path: captions} in `image_paths` order.

    Images without captions and captions naming images not in `image_paths` are an error, reported with
    counts and the first names; with `allow_missing` they are logged as a warning and dropped (the returned
    mapping holds only the images that have captions). An empty caption or caption list is always an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file '{path}' does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"captions file '{path}' is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(
            f"captions file '{path}' must hold a JSON object {{relative_path: [caption, ...]}}, "
            f"not {type(raw).__name__}"
        )

    captions = {}
    for key, value in raw.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(caption, str) for caption in value):
            raise ValueError(
                f"captions file '{path}': image '{key}' must map to a caption string or a list of strings"
            )
        if len(value) == 0 or any(not caption.strip() for caption in value):
            raise ValueError(f"captions file '{path}': image '{key}' has an empty caption or caption list")
        captions[PurePosixPath(key).as_posix()] = value

    wanted = [PurePosixPath(str(image_path)).as_posix() for image_path in image_paths]
    wanted_set = set(wanted)
    uncaptioned = [image for image in wanted if image not in captions]
    unknown = [image for image in captions if image not in wanted_set]
    problems = []
    if uncaptioned:
        problems.append(
            f"{len(uncaptioned)} of {len(wanted)} images have no captions ({_names(uncaptioned)})"
        )
    if unknown:
        problems.append(
            f"{len(unknown)} captioned images do not exist among the {len(wanted)} images ({_names(unknown)})"
        )
    if problems:
        message = f"captions file '{path}': " + "; ".join(problems)
        if not allow_missing:
            raise ValueError(message + "; fix the file or pass allow_missing=True to drop them")
        log.warning("%s; dropping them", message)
    return {image: captions[image] for image in wanted if image in captions}
