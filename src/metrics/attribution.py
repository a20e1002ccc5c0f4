"""Style attribution with artist prototypes (docs/style.md#style-attribution): the CSD paper's General Style
Similarity (GSS) and the per-image similarity to a prototype.

- prototype of an artist: the mean of the L2-normalised embeddings of the artist's real images. The paper does
  not say whether it is normalised again before use, so both are kept: `raw` (the mean itself) and `unit` (the
  mean scaled to length 1).
- GSS of a generator for an artist: the prototype of the artist's references against the mean embedding of the
  generator's images for that artist. With raw means, this equals the mean dot product over every (reference,
  generated) pair; with unit means, it is the cosine of the two mean directions (at least as large).
- per-image style similarity: each generated image's cosine to the artist's unit prototype, read with the
  paper's heuristic: below 0.5 the style is absent, above 0.8 strongly present.
"""

import numpy as np
import torch

ABSENT, PRESENT = 0.5, 0.8


def _check_dims(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{what_a} have {a.shape[-1]} dimensions ({tuple(a.shape)}) and {what_b} {b.shape[-1]} "
            f"({tuple(b.shape)}): embed both with the same extractor."
        )


def prototype(embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"raw": mean of the rows, "unit": that mean with length 1} of (n, D) L2-normalised embeddings."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"prototype: expected (n >= 1, D) embeddings, got {tuple(embeddings.shape)}")
    mean = embeddings.double().mean(0)
    return {"raw": mean, "unit": mean / mean.norm().clamp_min(1e-12)}


def general_style_similarity(references: torch.Tensor, generated: torch.Tensor) -> dict[str, float]:
    """GSS of generated images (m, D) against an artist's references (n, D), both L2-normalised, with the raw and
    the unit prototypes (`gss_raw`, `gss_unit`), and the per-image similarities to the unit prototype summarised:
    their mean, the share below 0.5 (style absent) and above 0.8 (strongly present)."""
    _check_dims(references, generated, "reference embeddings", "generated embeddings")
    p, q = prototype(references), prototype(generated)
    per_image = generated.double() @ p["unit"]
    return {
        "gss_raw": float(p["raw"] @ q["raw"]),
        "gss_unit": float(p["unit"] @ q["unit"]),
        "image_mean": float(per_image.mean()),
        "share_absent": float((per_image < ABSENT).double().mean()),
        "share_present": float((per_image > PRESENT).double().mean()),
        "images": float(len(generated)),
    }


def gss_interval(
    references: torch.Tensor, generated: torch.Tensor, key: str = "gss_raw", draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of `gss_raw` or `gss_unit`, resampling the generated images (references fixed).
    Every draw's mean embedding comes from one (draws, m) count matrix product."""
    if key not in ("gss_raw", "gss_unit"):
        raise ValueError(f"gss_interval: key={key!r}; expected gss_raw or gss_unit")
    _check_dims(references, generated, "reference embeddings", "generated embeddings")
    p = prototype(references)
    m = len(generated)
    picks = torch.from_numpy(np.random.default_rng(seed).integers(0, m, (draws, m)))
    counts = torch.zeros(draws, m, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(draws, m, dtype=torch.float64)
    )
    means = counts @ generated.double() / m  # (draws, D)
    if key == "gss_raw":
        values = means @ p["raw"]
    else:
        values = (means @ p["unit"]) / means.norm(dim=1).clamp_min(1e-12)
    lo, hi = np.percentile(values.numpy(), [2.5, 97.5])
    return float(lo), float(hi)


def attribute(generated: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best prototype index (m,), its cosine (m,)) of each generated image against unit prototypes (A, D)."""
    _check_dims(generated, prototypes, "generated embeddings", "prototypes")
    scores = generated.double() @ prototypes.double().T
    best, index = scores.max(dim=1)
    return index, best
