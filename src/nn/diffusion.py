"""Diffusion building blocks shared by the unconditional and the text-conditional modules (no Lightning).

The network, the noise schedule and the sampling loop are separate pieces, as in diffusers: the UNet is a diffusers
model, the schedules are diffusers schedulers used through their own `add_noise`, `set_timesteps` and `step`, and
the loop below only wires them. Per-image random generators make sample i depend on its seed alone, not on the batch
it falls in, so interrupted sampling resumes with the same images.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}


def check_choice(key: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not known; valid: {', '.join(choices)}")
    return value


def build_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    clip_sample: bool = True,
) -> DDPMScheduler:
    """The training noise schedule (DDPM: linear betas 1e-4 to 0.02 over 1,000 steps, ε-prediction)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    )


def build_sampler(name: str, noise_scheduler) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
    """A sampling scheduler (`ddpm`, `ddim`, `dpm_solver`) on the training schedule's betas and prediction type."""
    check_choice("sampler", name, SAMPLERS)
    return SAMPLERS[name].from_config(noise_scheduler.config)


def training_target(noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the network learns to predict under the schedule's `prediction_type` (ε, v or x0)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    raise ValueError(f"prediction_type={kind!r} is not known; valid: {', '.join(PREDICTION_TYPES)}")


def denoising_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise_scheduler,
    clean: torch.Tensor,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loss of a batch of clean images or latents (B, C, H, W), as the DDPM paper's training step:
    noise ε ~ N(0, I) and timesteps t ~ U{0, ..., T-1} (drawn in this order when not given), x_t = `add_noise`(x_0, ε,
    t), then the mean squared error between `predict(x_t, t)` and the schedule's target (`training_target`).

    predict(x_t, t) is the network's forward: wrap it there for conditioning (text embeddings).
    """
    if noise is None:
        noise = torch.randn_like(clean)
    if timesteps is None:
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = predict(noisy, timesteps)
    target = training_target(noise_scheduler, clean, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, name: str, warmup_steps: int):
    """diffusers' learning-rate schedule `name` (`get_scheduler`: constant, or linear warm-up over `warmup_steps`
    then constant, linear decay or cosine decay to 0 at `total_steps`), stepped once per optimizer step. The
    `model.scheduler` config is a `_partial_` of this function."""
    from diffusers.optimization import get_scheduler

    check_choice("model.scheduler.name", name, LR_SCHEDULES)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def build_optimizer(parameters, optimizer: Callable, scheduler: Callable, total_steps: int) -> dict:
    """The optimizer and learning-rate schedule of a diffusion UNet, as Lightning's `configure_optimizers` returns
    them. optimizer: a partial optimizer class (AdamW with its lr, betas, eps, weight_decay: `model.optimizer`),
    given two parameter groups of the trainable `parameters`: weight decay on matrices and convolutions, none on
    biases and norms. scheduler: a partial of `lr_schedule` (`model.scheduler`), given the optimizer and
    `total_steps`."""
    parameters = [p for p in parameters if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim > 1]},
        {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
    ]
    built = optimizer(groups)
    return {
        "optimizer": built,
        "lr_scheduler": {"scheduler": scheduler(built, total_steps), "interval": "step"},
    }


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: noise drawn on the CPU is the same on any device and in any batch."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def initial_noise(
    shape: tuple, seeds: list[int], device, dtype=torch.float32, generators=None
) -> torch.Tensor:
    """x_T ~ N(0, I) of shape (B, ...), row i drawn on the CPU from a generator seeded with seeds[i] (the noise
    `sample_loop` starts from, before the sampler's `init_noise_sigma`), or from `generators[i]` when given (they
    then go on to draw the sampler's noise)."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]} images")
    generators = generators or seeded_generators(seeds)
    return randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def sample_loop(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler,
    shape: tuple,
    seeds: list[int],
    steps: int,
    device,
    dtype=torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Reverse diffusion from seeded Gaussian noise: (B, C, H, W) samples (pixels in about [-1, 1], or latents),
    B = len(seeds).

    denoise(x_t, t) returns the network's prediction (of the schedule's prediction type) for the batch; wrap the
    network there for classifier-free guidance or conditioning. `sampler.set_timesteps(steps)` picks the timesteps
    (DDPM uses all 1,000 when steps equals the training length).
    """
    generators = seeded_generators(seeds)
    x = initial_noise(shape, seeds, device, dtype, generators) * sampler.init_noise_sigma
    sampler.set_timesteps(steps, device=device)
    for t in tqdm(sampler.timesteps, desc="denoising", unit="step", leave=False, disable=not progress):
        model_input = sampler.scale_model_input(x, t)
        prediction = denoise(model_input, t)
        x = sampler.step(prediction, t, x, generator=generators).prev_sample
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C) on the CPU, for saving."""
    return ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def ema_with_warmup(decay: float) -> Callable:
    """`multi_avg_fn` for torch's `AveragedModel`: EMA whose decay grows as min(decay, (1 + n) / (10 + n)) with the
    number of updates n (diffusers' `EMAModel` warm-up), so short runs are not dominated by the initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        # tensor arithmetic on the update count: no host-device sync in the training step
        n = torch.as_tensor(num_averaged, dtype=torch.float32, device=averaged[0].device)
        weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
        delta = torch._foreach_sub([c.to(a.dtype) for a, c in zip(averaged, current, strict=True)], averaged)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(averaged, delta)

    return update


def build_ema(network: torch.nn.Module, decay: float):
    """A frozen EMA copy of `network` (torch's `AveragedModel` with `ema_with_warmup`), or None when decay is 0.
    Frozen so that neither DDP nor the optimizer sees it; update it with `.update_parameters(network)` once per
    optimizer step."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    ema = AveragedModel(network, multi_avg_fn=ema_with_warmup(decay))
    return ema.requires_grad_(False)


def ema_step(ema, network: torch.nn.Module, step: int, last_step: int) -> int:
    """Update `ema` (from `build_ema`; None: no EMA) from `network` once per optimizer step. Called after every
    batch with the optimizer `step` count: it acts only when `step` moved past `last_step` (with gradient accumulation
    most batches end without an optimizer step). Returns the step of the last update."""
    if ema is None or step == last_step:
        return last_step
    ema.update_parameters(network)
    return step
