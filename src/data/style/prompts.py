"""The prompts of the CSD paper's Stable Diffusion style study (docs/style.md#stable-diffusion-style-study), each with
the styles it names, which are the ground truth when its generation is retrieved against a style-tagged database.

- `simple`: "A painting in the style of <artist>", one per artist, repeated with other seeds (the paper: 10).
- `woman`, `dog`, `house`: content-constrained prompts, five templates per subject (the paper: App. E.0.1, each
  repeated twice). The paper quotes one template per subject; the other four per subject are the project's,
  written in the same form (docs/style.md#unconfirmed).
- `user`: prompts written by users (a file, e.g. the Gustavosta Stable-Diffusion-Prompts test split), kept when they
  name at least one artist of the list; every artist named is a label.
"""

import re

import numpy as np

SETTINGS = ("simple", "woman", "dog", "house", "user")
SIMPLE = "A painting in the style of {artist}"
TEMPLATES = {
    "woman": [
        "A painting of a woman holding an umbrella in the style of {artist}",  # the paper's
        "A portrait of a woman in the style of {artist}",
        "A painting of a woman reading a book in the style of {artist}",
        "A painting of a woman walking in a garden in the style of {artist}",
        "A painting of an old woman by a window in the style of {artist}",
    ],
    "dog": [
        "A portrait of a dog in the style of {artist}",  # the paper's
        "A painting of a dog running on a beach in the style of {artist}",
        "A painting of a dog sleeping by a fire in the style of {artist}",
        "A painting of a dog in a field of flowers in the style of {artist}",
        "A painting of two dogs playing in the snow in the style of {artist}",
    ],
    "house": [
        "A painting of a house in a desert in the style of {artist}",  # the paper's
        "A painting of a house by a lake in the style of {artist}",
        "A painting of a house in a snowy forest in the style of {artist}",
        "A painting of a house on a hill at sunset in the style of {artist}",
        "A painting of a house in a busy city street in the style of {artist}",
    ],
}


def style_prompts(artists: list[str], setting: str, repeats: int) -> list[tuple[str, list[str]]]:
    """[(prompt, [artist])] of `setting` (simple, woman, dog or house), every prompt `repeats` times in a row."""
    if setting == "simple":
        templates = [SIMPLE]
    elif setting in TEMPLATES:
        templates = TEMPLATES[setting]
    else:
        raise ValueError(
            f"style prompts: setting={setting!r}; expected simple, woman, dog or house (user: user_prompts)"
        )
    if not artists:
        raise ValueError("style prompts: the artist list is empty")
    return [
        (template.format(artist=artist), [artist])
        for artist in artists
        for template in templates
        for _ in range(repeats)
    ]


def artists_named(prompt: str, artists: list[str]) -> list[str]:
    """The artists of the list that `prompt` names (case-insensitive, whole words), in the list's order."""
    return [a for a in artists if re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", prompt, flags=re.IGNORECASE)]


def user_prompts(
    lines: list[str], artists: list[str], max_prompts: int | None = None, seed: int = 0
) -> list[tuple[str, list[str]]]:
    """[(prompt, artists it names)] of the user prompts naming at least one artist; `max_prompts` of them drawn
    at random (the paper: 4,000), in their file order."""
    kept = [(line.strip(), artists_named(line, artists)) for line in lines if line.strip()]
    kept = [(prompt, named) for prompt, named in kept if named]
    if max_prompts is not None and len(kept) > max_prompts:
        pick = np.sort(np.random.default_rng(seed).choice(len(kept), max_prompts, replace=False))
        kept = [kept[i] for i in pick]
    return kept
