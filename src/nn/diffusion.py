"""Diffusion building blocks shared by the unconditional and the text-conditional modules (no Lightning).

The network, the noise schedule and the sampling loop are separate pieces, as in diffusers: the UNet is a diffusers
model, the schedules are diffusers schedulers used through their own `add_noise`, `set_timesteps` and `step`, and
the loop below only wires them. Per-image random generators make sample i depend on its seed alone, not on the batch
it falls in, so interrupted sampling resumes with the same images.
"""

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}


def check_choice(key: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not known; valid: {', '.join(choices)}")
    return value


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                          beta_end: float = 0.02, prediction_type: str = "epsilon",
                          clip_sample: bool = True) -> DDPMScheduler:  # fmt: skip
    """The training noise schedule (DDPM: linear betas 1e-4 to 0.02 over 1,000 steps, ε-prediction)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                         clip_sample=clip_sample)  # fmt: skip


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


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZER_DEFAULTS = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8}
SCHEDULE_DEFAULTS = {"name": "constant_with_warmup", "warmup_steps": 500}


def build_optimizer(parameters, optimizer: dict, scheduler: dict, total_steps: int) -> dict:
    """AdamW (weight decay on matrices and convolutions only, not on biases and norms) and a diffusers learning-rate
    schedule with warm-up (`get_scheduler`), as Lightning's `configure_optimizers` returns them."""
    from diffusers.optimization import get_scheduler

    o, s = {**OPTIMIZER_DEFAULTS, **optimizer}, {**SCHEDULE_DEFAULTS, **scheduler}
    check_choice("model.scheduler.name", s["name"], LR_SCHEDULES)
    parameters = [p for p in parameters if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": o["weight_decay"]},
              {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]  # fmt: skip
    adamw = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    schedule = get_scheduler(
        s["name"], adamw, num_warmup_steps=s["warmup_steps"], num_training_steps=total_steps
    )
    return {"optimizer": adamw, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: noise drawn on the CPU is the same on any device and in any batch."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


@torch.no_grad()
def sample_loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sampler, shape: tuple,
                seeds: list[int], steps: int, device, dtype=torch.float32, progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Reverse diffusion from seeded Gaussian noise: (B, C, H, W) samples (pixels in about [-1, 1], or latents),
    B = len(seeds).

    denoise(x_t, t) returns the network's prediction (of the schedule's prediction type) for the batch; wrap the
    network there for classifier-free guidance or conditioning. `sampler.set_timesteps(steps)` picks the timesteps
    (DDPM uses all 1,000 when steps equals the training length).
    """
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]} images")
    generators = seeded_generators(seeds)
    x = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
    x = x * sampler.init_noise_sigma
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
