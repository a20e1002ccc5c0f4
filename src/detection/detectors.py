"""Detectors of memorized prompts (docs/detection.md): per prompt, one number that is higher when the model copies
a training image for that prompt, read from the model's own predictions instead of from generated images.

Every detector is a function over a diffusers `UNet2DConditionModel` (the CPU testbed's or a Stable Diffusion
directory's), a diffusers sampling scheduler, and the prompts' text embeddings: `cond` (B, L, D), one row per
generation, and `uncond` (1 or B, L, D), the empty prompt's. `noise` (B, C, h, w) is each generation's x_T (the
seeded draw of `src.nn.diffusion.initial_noise`). They return one score per row; the caller averages the rows of
a prompt's generations. "ε" below is the network's raw output (ε, or v for v-prediction models such as SD 2.1).

- `noise_norm`: Wen et al. (ICLR 2024): ||ε(x_t, c) - ε(x_t, ∅)||₂ over the whole latent, averaged over the first
  `scored_steps` steps of classifier-free-guided sampling.
- `attention_entropy`: Ren et al. (ECCV 2024): the entropy of the conditional cross-attention over the text
  positions, averaged over the query positions, heads and chosen layers, at the first step (their mode "E") or over
  the last steps plus the change of the end-token entropy (mode "D").
- `score_anisotropy`: Asthana and Belagiannis (ICLR 2026): on pure noise x_T, the norm of the guidance direction at
  the first timestep plus a weight times the per-pixel cosine between ε(∅) and the guidance direction at a late
  timestep: two guided forward passes.
- `generation_similarity`: the slow reference, from images: minus the mean tiled l2 between a prompt's generations
  (they look alike when the model copies).
"""

import torch
import torch.nn.functional as F

from src.metrics.extraction import tiled_l2
from src.nn.attention import cross_attention, cross_attention_layers

DETECTORS = ("noise_norm", "attention_entropy", "score_anisotropy", "generation_similarity")


def guided_pass(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor):
    """(ε(x, ∅), ε(x, c)): one forward pass of the batch [x; x] with the embeddings [uncond; cond]."""
    uncond = uncond.expand_as(cond)
    both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    return both.chunk(2)


def guidance_norm(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
    """(B,) ||ε_c - ε_u||₂ of each row, over all its elements."""
    return (eps_cond - eps_uncond).float().flatten(1).norm(dim=1)


def guided_trajectory(
    unet, sampler, cond, uncond, noise, steps: int, count: int, guidance_scale, generators=None
):
    """Yield (t, ε(x_t, ∅), ε(x_t, c)) for the first `count` of `steps` guided sampling steps from x_T = `noise`,
    stepping the sampler with guidance `guidance_scale` between them (not after the last one yielded)."""
    sampler.set_timesteps(steps, device=noise.device)
    timesteps = sampler.timesteps[:count]
    x = noise * sampler.init_noise_sigma
    for i, t in enumerate(timesteps):
        eps_u, eps_c = guided_pass(unet, sampler.scale_model_input(x, t), t, cond, uncond)
        yield t, eps_u, eps_c
        if i + 1 < len(timesteps):
            prediction = eps_u + guidance_scale * (eps_c - eps_u)
            x = sampler.step(prediction, t, x, generator=generators).prev_sample


@torch.no_grad()
def noise_norm(
    unet,
    sampler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 50,
    scored_steps: int | None = None,
    guidance_scale: float = 7.5,
    generators=None,
) -> torch.Tensor:
    """(B,) Wen et al.'s detection score: the mean of ||ε(x_t, c) - ε(x_t, ∅)||₂ over the first `scored_steps` of
    `steps` guided sampling steps from x_T = `noise` (None: all of them, their code's default; 1: the cheap setting
    of their headline). The guidance scale shapes the path only; it does not multiply the norm. Sampling stops
    after the last scored step."""
    trajectory = guided_trajectory(
        unet, sampler, cond, uncond, noise, steps, scored_steps or steps, guidance_scale, generators
    )
    return torch.stack([guidance_norm(eps_u, eps_c) for _, eps_u, eps_c in trajectory], 1).mean(1)


@torch.no_grad()
def score_anisotropy(
    unet,
    sampler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 50,
    angle_index: int = -3,
    norm_weight: float = 1.0,
    angle_weight: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Asthana and Belagiannis's score on pure noise x_T = `noise`, {"score", "norm", "angle"}, each (B,):

    - norm: ||ε(x_T, c) - ε(x_T, ∅)||₂ at the first timestep of a `steps`-step schedule;
    - angle: the cosine between ε(x_T, ∅) and ε(x_T, c) - ε(x_T, ∅) over the channel axis, per pixel, averaged
      over the pixels, at the timestep `timesteps[angle_index]` (their code: the third from last) on the same x_T;
    - score = norm_weight * norm + angle_weight * angle (their code: 1 and 2 for SD 1.4, 1 and 0.1 for SD 2).
    Their SD 2 code rescales the v-prediction difference to a score; here the raw output is used for both kinds.
    """
    sampler.set_timesteps(steps, device=noise.device)
    first, late = sampler.timesteps[0], sampler.timesteps[angle_index]
    x = noise * sampler.init_noise_sigma
    eps_u, eps_c = guided_pass(unet, sampler.scale_model_input(x, first), first, cond, uncond)
    norm = guidance_norm(eps_u, eps_c)
    eps_u, eps_c = guided_pass(unet, sampler.scale_model_input(x, late), late, cond, uncond)
    angle = F.cosine_similarity(eps_u.float(), (eps_c - eps_u).float(), dim=1).flatten(1).mean(1)
    return {"score": norm_weight * norm + angle_weight * angle, "norm": norm, "angle": angle}


def token_entropy(probs: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) -Σ p log p over the last axis of probs (B, L), natural log, 0 log 0 = 0; with `start` (B,), only over
    the positions from start[b] on (the end-token entropy of Ren et al.'s mode D). Nothing is renormalised."""
    terms = -torch.xlogy(probs, probs)
    if start is not None:
        positions = torch.arange(probs.shape[1], device=probs.device)
        terms = terms * (positions[None, :] >= start.to(probs.device)[:, None])
    return terms.sum(1)


def end_token_positions(token_ids: torch.Tensor, end_token_id: int) -> torch.Tensor:
    """(B,) the position of the first end token of each row of token_ids (B, L) (its last position when there
    is none: a prompt cut at the tokenizer's limit)."""
    is_end = token_ids == end_token_id
    first = is_end.int().argmax(1)
    return torch.where(is_end.any(1), first, torch.full_like(first, token_ids.shape[1] - 1))


@torch.no_grad()
def attention_entropy(
    unet,
    sampler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    end_positions: torch.Tensor,
    steps: int = 50,
    mode: str = "first",
    layers: list[int] | None = None,
    last_steps: int = 10,
    guidance_scale: float = 7.5,
    generators=None,
) -> torch.Tensor:
    """(B,) Ren et al.'s entropy of the conditional cross-attention over all L text positions (start token, words,
    end token and padding), the probabilities averaged over the query positions, the heads and the cross-attention
    layers `layers` (indices in forward order: down, middle, up; None: all).

    mode "first" (their mode E): at the first of `steps` guided sampling steps only (their default: the fourth
    cross-attention layer of SD 1.x, `layers=[3]`). mode "last" (their mode D): the mean entropy over the last
    `last_steps` steps, plus the mean entropy of the end positions (from the first end token, `end_positions`
    (B,), on) over those steps minus its value at the first step; all steps are sampled.
    """
    if mode not in ("first", "last"):
        raise ValueError(f"attention_entropy mode={mode!r} is not known; valid: first, last")
    names = list(cross_attention_layers(unet))
    if layers is not None:
        bad = [i for i in layers if not -len(names) <= i < len(names)]
        if bad:
            raise ValueError(
                f"attention_entropy layers {bad} out of range: the UNet has {len(names)} cross-attention layers"
            )
        names = [names[i] for i in layers]
    rows = len(cond)
    full, ends = [], []
    with cross_attention(unet, record=True) as probe:
        count = 1 if mode == "first" else steps
        for _ in guided_trajectory(
            unet, sampler, cond, uncond, noise, steps, count, guidance_scale, generators
        ):
            probs = probe.mean_over_layers(names)[rows:]  # the conditional half of the batch
            full.append(token_entropy(probs))
            ends.append(token_entropy(probs, end_positions))
            probe.clear()
    if mode == "first":
        return full[0]
    last = slice(len(full) - min(last_steps, len(full)), None)
    mean_full = torch.stack(full[last], 1).mean(1)
    return mean_full + torch.stack(ends[last], 1).mean(1) - ends[0]


def generation_similarity(images: torch.Tensor, grid: tuple[int, int] = (4, 4)) -> float:
    """Minus the mean tiled l2 (src.metrics.extraction.tiled_l2) over the pairs of one prompt's generations
    images (K, C, H, W) in [0, 1], K >= 2: near 0 when they are copies of one image."""
    if len(images) < 2:
        raise ValueError(f"generation_similarity needs at least 2 generations per prompt; got {len(images)}")
    distances = tiled_l2(images, images, grid)
    k = len(images)
    return -float(distances.sum() / (k * (k - 1)))
