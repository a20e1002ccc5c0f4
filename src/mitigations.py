"""Caption mitigations and text-embedding noise of "Understanding and Mitigating Copying in Diffusion Models"
(docs/memorization.md#train-time-mitigations, docs/memorization.md#inference-time-mitigations; official code
somepago/DCR `datasets.py`, `diff_train.py`, `sd_mitigation.py`, `diff_inference.py`), as pure seeded
functions for training and inference.

- train time: `apply_train_mitigation` (mc, gn, rc, rt, cwr) gives the caption an image is trained with; the
  data pipeline (`src.data.diffusion.captioned`) calls it per draw, and the model adds the `gn` noise with
  `noise_text_embeddings`;
- inference: `apply_inference_mitigation` (rt, cwr, rna) changes a generation prompt, and GNI noises the prompt
  embeddings with `noise_guidance_embeddings`, which `Text2ImageModule.generate` calls.

Free of Lightning and Hydra. Every random function takes a `numpy.random.Generator` (`rng`), so a caller seeds
one per sample (e.g. `np.random.default_rng([seed, epoch, index])`); text-embedding noise takes a
`torch.Generator` or per-image seeds. Where DCR's code and paper differ, the code is followed and the docstring
says so.

Tokenizers: random tokens are CLIP BPE ids drawn uniformly from [0, 49400) (DCR: `np.random.randint(49400)`)
and decoded with the CLIP tokenizer. Any object with `decode(list[int]) -> str` works (open_clip's
`SimpleTokenizer`, Hugging Face's `CLIPTokenizer`); `clip_tokenizer()` gives open_clip's, which ships its
vocabulary and needs no network. Decoded text is stripped of surrounding spaces, as Hugging Face's
`CLIPTokenizer.decode` (used by DCR) does; open_clip's decode leaves a trailing space after a word end.
"""

import functools
import inspect

import numpy as np
import torch

RANDOM_TOKEN_VOCAB = 49400  # DCR draws ids in [0, 49400): below the CLIP special tokens 49406/49407
RANDOM_NUMBER_RANGE = 100000  # DCR `rand_numb_add`: np.random.choice(100000)
TRAIN_INSERTIONS = 2  # words inserted by the train-time RT and CWR (hard-coded in DCR datasets.py)
# Added to an image's seed to seed its GNI noise, so that the noise stream differs from the stream of the
# image's initial latent, which the sampler draws from the seed itself (an arbitrary prime).
GNI_SEED_OFFSET = 104_729


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's CLIP BPE tokenizer (the ViT-B-32 / SD text-encoder vocabulary of 49,408 ids), offline."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def decode_tokens(tokenizer, token_ids) -> str:
    """Decode CLIP token ids to text, stripped of surrounding spaces (as Hugging Face's CLIP decode does)."""
    return tokenizer.decode([int(token_id) for token_id in token_ids]).strip()


def caption_zero(captions: list[str]) -> str:
    """Caption 0 of an image's caption list; ValueError when the list is empty."""
    if len(captions) == 0:
        raise ValueError("the image has no captions; every image needs at least one (caption 0)")
    return captions[0]


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mitigation probability p={p} must lie in [0, 1]")


# ---------------------------------------------------------------- random text


def random_token_caption(tokenizer, rng: np.random.Generator, num_tokens: int = 4) -> str:
    """`num_tokens` CLIP token ids drawn uniformly from [0, 49400), decoded to one string (DCR `randrepl`).

    Sub-word tokens join their neighbours when decoded, so the text may hold fewer than `num_tokens` words.
    """
    token_ids = rng.integers(0, RANDOM_TOKEN_VOCAB, size=num_tokens)
    return decode_tokens(tokenizer, token_ids)


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


def noise_text_embeddings(
    embeddings: torch.Tensor, lam: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """embeddings + lam * N(0, 1), noise of the embeddings' shape (B, L, D)
    (docs/memorization.md#train-time-mitigations GN, docs/memorization.md#inference-time-mitigations GNI).

    DCR adds `rand_noise_lam * randn_like` to the text-encoder output at every training step
    (`--rand_noise_lam`, code default 0 = off, README suggests λ in [0, 1]); the paper's λ is UNCONFIRMED
    (0.1 suspected, the README's inference example). With a `generator` the noise is drawn on its device in
    float32; without one, from torch's global generator in the embeddings' dtype and device (training, GN).
    """
    if lam < 0:
        raise ValueError(f"text-embedding noise scale lam={lam} must be >= 0")
    if lam == 0:
        return embeddings
    if generator is None:
        return embeddings + lam * torch.randn_like(embeddings)
    noise = torch.randn(embeddings.shape, generator=generator, device=generator.device)
    return embeddings + lam * noise.to(device=embeddings.device, dtype=embeddings.dtype)


def noise_guidance_embeddings(
    uncond: torch.Tensor, cond: torch.Tensor, lam: float, seeds, noise_uncond: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """GNI for classifier-free guidance (docs/memorization.md#inference-time-mitigations): the prompt
    embeddings (uncond, cond), each (B, L, D), plus lam * N(0, 1) noise.

    DCR `sd_mitigation.py` noises the output of diffusers 0.14 `_encode_prompt`, the concatenation
    [uncond; cond], so both get noise. Here image i's noise is drawn on the CPU, as one (2, L, D) tensor for its
    (uncond, cond) in that order, from a generator seeded with `seeds[i] + GNI_SEED_OFFSET`: an image gets the same
    noise whatever batch it is generated in. `noise_uncond=False` keeps the unconditional embedding clean (the
    conditional one gets the same noise as with True), which the paper's description (noise on the prompt
    embedding) would also allow.
    """
    if lam == 0:
        return uncond, cond
    rows = [
        noise_text_embeddings(
            torch.stack([u, c]).cpu(), lam, torch.Generator().manual_seed(int(seed) + GNI_SEED_OFFSET)
        )
        for u, c, seed in zip(uncond, cond, seeds, strict=True)
    ]
    noised = torch.stack(rows).to(cond.device)  # (B, 2, L, D)
    return (noised[:, 0] if noise_uncond else uncond), noised[:, 1]


# --------------------------------------- train-time mitigations (docs/memorization.md#train-time-mitigations)


def first_caption(captions: list[str], rng: np.random.Generator, tokenizer=None) -> str:
    """`none`: caption 0, no mitigation."""
    return caption_zero(captions)


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
    passed; default 0.1 is UNCONFIRMED (docs/memorization.md#train-time-mitigations)."""
    if lam < 0:
        raise ValueError(f"mitigation 'gn': lam={lam} must be >= 0")
    return caption_zero(captions)


def random_caption_replacement(
    captions: list[str], rng: np.random.Generator, p: float = 0.1, num_tokens: int = 4, tokenizer=None
) -> str:
    """`rc` (DCR `--trainspecial randrepl`): with probability p, caption 0 is replaced by a random
    `num_tokens`-token caption (`random_token_caption`); otherwise caption 0. p=0.1 is DCR's code default;
    the paper's p is UNCONFIRMED. DCR tests `uniform() <= p`; here `random() < p`, so p=0 never fires."""
    _check_probability(p)
    caption = caption_zero(captions)
    if rng.random() < p:
        return random_token_caption(tokenizer or clip_tokenizer(), rng, num_tokens)
    return caption


def random_token_addition(
    captions: list[str], rng: np.random.Generator, p: float = 0.1, tokenizer=None
) -> str:
    """`rt` (DCR `--trainspecial randwordadd`): with probability p, insert 2 random decoded CLIP tokens at
    random word positions of caption 0 (`add_random_tokens`)."""
    _check_probability(p)
    caption = caption_zero(captions)
    if rng.random() < p:
        return add_random_tokens(caption, rng, TRAIN_INSERTIONS, tokenizer or clip_tokenizer())
    return caption


def caption_word_repetition(
    captions: list[str], rng: np.random.Generator, p: float = 0.1, tokenizer=None
) -> str:
    """`cwr` (DCR `--trainspecial wordrepeat`): with probability p, insert 2 words sampled from caption 0
    itself at random positions (`repeat_caption_words`)."""
    _check_probability(p)
    caption = caption_zero(captions)
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
    """The training caption of one image under train-time mitigation `name`
    (docs/memorization.md#train-time-mitigations).

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


# ------------------------------- inference-time mitigations (docs/memorization.md#inference-time-mitigations)


def _unchanged_prompt(prompt: str, rng: np.random.Generator, repeats: int, tokenizer) -> str:
    return prompt


SAMPLING_MITIGATIONS = ("prompt_embedding", "delayed_guidance", "attention_rescale")  # inside `generate`
INFERENCE_MITIGATIONS = {
    "none": _unchanged_prompt,
    # GNI changes the prompt embeddings (noise_guidance_embeddings), not the prompt text; the three newer
    # mitigations act inside sampling (docs/detection.md#inference-time-mitigations): `Text2ImageModule.generate`.
    "gni": _unchanged_prompt,
    "rt": lambda prompt, rng, repeats, tokenizer: add_random_tokens(
        prompt, rng, repeats, tokenizer or clip_tokenizer()
    ),
    "cwr": lambda prompt, rng, repeats, tokenizer: repeat_caption_words(prompt, rng, repeats),
    "rna": lambda prompt, rng, repeats, tokenizer: add_random_numbers(prompt, rng, repeats),
    **{name: _unchanged_prompt for name in SAMPLING_MITIGATIONS},
}


def apply_inference_mitigation(
    name: str, prompt: str, rng: np.random.Generator, tokenizer=None, repeats: int = 2
) -> str:
    """The generation prompt under inference-time mitigation `name`
    (docs/memorization.md#inference-time-mitigations, DCR `--rand_augs`).

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


def mitigation_tag(options: dict) -> str:
    """The folder tag of one inference-mitigation setting: its `label` when given, else its `name`."""
    return str(options.get("label", options["name"]))


# ---------------------------------- mitigations inside sampling (docs/detection.md#inference-time-mitigations)


def delayed_guidance_scale(t, scale: float, before: float = 0.0, transition: int = 500) -> float:
    """Jain et al. (CVPR 2025), static transition: guidance `before` while the timestep t > `transition`, then
    the normal `scale` (their README: 0 before and t = 500 on SD 2.1; -2 and 650 for opposite guidance)."""
    return before if int(t) > transition else scale


def optimize_prompt_embeddings(
    loss_fn,
    cond: torch.Tensor,
    groups: list[list[int]],
    lr: float = 0.05,
    max_steps: int = 10,
    target_loss: float = 3.0,
) -> tuple[torch.Tensor, list[dict]]:
    """Wen et al. (ICLR 2024): per group of rows (the generations of one prompt), AdamW steps (lr, PyTorch's
    default weight decay 0.01) on their shared conditional embedding cond[group[0]] (L, D) until
    `loss_fn(embedding (1, L, D), rows) -> scalar` (the joint ||ε_c - ε_u||₂ of the group's x_T at the first
    timestep) is at most `target_loss`, for at most `max_steps` steps; the start token's embedding (position 0) is
    not changed. The loss is checked before each step, as in their code.

    Returns the new cond (rows of a group share its embedding) and per group {rows, initial_loss, final_loss,
    steps, reached}: a prompt whose target was not reached in the budget says how far it got."""
    new = cond.clone()
    report = []
    for rows in groups:
        embedding = cond[rows[0] : rows[0] + 1].detach().clone().float().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=lr)
        losses, steps = [], 0
        with torch.enable_grad():
            while True:
                loss = loss_fn(embedding.to(cond.dtype), rows)
                losses.append(float(loss.detach()))
                if losses[-1] <= target_loss or steps == max_steps:
                    break
                (grad,) = torch.autograd.grad(loss, embedding)
                grad[:, 0] = 0  # the start token stays as it is
                embedding.grad = grad
                optimizer.step()
                steps += 1
        new[rows] = embedding.detach().to(cond.dtype).expand(len(rows), -1, -1)
        report.append(
            {
                "rows": list(rows),
                "initial_loss": losses[0],
                "final_loss": losses[-1],
                "steps": steps,
                "reached": losses[-1] <= target_loss,
            }
        )
    return new, report
