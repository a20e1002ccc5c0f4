"""What the two diffusion modules (`DDPMModule`, `Text2ImageModule`) share, as functions of the module: the
training hooks (assigned as methods in both classes, so neither needs a common base class) and seeded sampling
with the EMA or the trained UNet."""

import lightning as L
import torch
from hydra.utils import instantiate

from src.nn.diffusion import (
    SAMPLERS,
    build_ema,
    build_optimizer,
    build_sampler,
    check_choice,
    ema_step,
    sample_loop,
    to_uint8,
)
from src.utils.guards import stop_on_nonfinite_loss


def init_ema_and_sampler(module: L.LightningModule, ema_decay: float, sampler: str) -> None:
    """After the module built `module.unet`: its EMA copy (`ema_decay` 0: none) and a check of the default
    sampler's name."""
    check_choice("model.sampler", sampler, SAMPLERS)
    module.ema = build_ema(module.unet, ema_decay)
    module._ema_step = -1


def diffusion_training_step(module: L.LightningModule, batch: dict, batch_idx: int) -> torch.Tensor | None:
    """`module.loss(batch)`, stopped on a non-finite value, each term logged as `train/<key>`; None for a batch
    whose every image was unreadable (the collate left no "image")."""
    if "image" not in batch:
        return None
    terms = module.loss(batch)
    stop_on_nonfinite_loss(module, terms["loss"])
    module.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True)
    if batch.get("num_skipped"):
        module.log("train/skipped_images", float(batch["num_skipped"]), reduce_fx="sum")
    return terms["loss"]


def update_ema(module: L.LightningModule, outputs, batch, batch_idx) -> None:
    """One EMA step of `module.ema` towards `module.unet` per optimizer step (not per micro-batch)."""
    module._ema_step = ema_step(module.ema, module.unet, module.trainer.global_step, module._ema_step)


def configure_unet_optimizers(module: L.LightningModule):
    """The `_partial_` optimizer and schedule of the module's hyper-parameters, over the UNet's parameters."""
    optimizer = instantiate(module.hparams.optimizer, _convert_="all")
    scheduler = instantiate(module.hparams.scheduler, _convert_="all")
    return build_optimizer(
        module.unet.parameters(), optimizer, scheduler, module.trainer.estimated_stepping_batches
    )


@torch.no_grad()
def sample_images(
    module: L.LightningModule,
    network: torch.nn.Module,
    denoise,
    shape: tuple[int, ...],
    seeds: list[int],
    sampler: str | None,
    steps: int | None,
    decode=None,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 (B, H, W, C) images on the CPU: `sample_loop` on the module's noise schedule with `sampler` / `steps`
    (default: `model.sampler` / `model.sample_steps`), then `decode` (latents to pixels) if given. `denoise(x, t)`
    calls `network`, which is in eval mode meanwhile."""
    was_training = network.training
    network.eval()
    try:
        scheduler = build_sampler(sampler or module.hparams.sampler, module.noise_scheduler)
        steps = steps or module.hparams.sample_steps
        x = sample_loop(denoise, scheduler, shape, seeds, steps, module.device, progress=progress)
    finally:
        network.train(was_training)
    return to_uint8(x if decode is None else decode(x))


def sampling_network(module: L.LightningModule, use_ema: bool = True) -> torch.nn.Module:
    """The EMA copy of the UNet when there is one and `use_ema`, else the trained UNet."""
    return module.ema.module if use_ema and module.ema is not None else module.unet
