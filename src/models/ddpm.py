"""Unconditional DDPM (diffusers `UNet2DModel` + `DDPMScheduler`) for the memorization study of PAPERS.md §1.6.

A training step reads like the DDPM paper: draw noise and timesteps, `add_noise`, predict, mean-squared error against
the schedule's target (ε by default; `v_prediction` and `sample` as string options). An EMA copy of the UNet (torch's
`AveragedModel`, decay with diffusers' warm-up) is what `generate` samples from; DDPM and DDIM sampling use the
schedulers' own `set_timesteps` / `step` (src/nn/diffusion.py). AdamW with warm-up (diffusers' `get_scheduler`),
gradient clipping and bf16 come from the trainer config.
"""

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from src.nn.diffusion import (
    SAMPLERS,
    build_ema,
    build_noise_scheduler,
    build_optimizer,
    build_sampler,
    check_choice,
    sample_loop,
    to_uint8,
    training_target,
)
from src.utils.guards import stop_on_nonfinite_loss


class DDPMModule(L.LightningModule):
    """unet: keyword arguments of `UNet2DModel` (block_out_channels, down/up_block_types, layers_per_block, ...),
    see conf/model/unet/. noise: `build_noise_scheduler` arguments. optimizer: AdamW lr, betas, weight_decay, eps.
    scheduler: name (diffusers' get_scheduler) and warmup_steps. ema_decay: 0 switches EMA off (sampling then uses
    the trained weights). sampler / sample_steps: the defaults of `generate`.
    """

    def __init__(self, unet: dict, image_size: int = 64, channels: int = 3, noise: dict | None = None,
                 optimizer: dict | None = None, scheduler: dict | None = None, ema_decay: float = 0.9999,
                 sampler: str = "ddim", sample_steps: int = 50):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        check_choice("model.sampler", sampler, SAMPLERS)
        self.noise_scheduler = build_noise_scheduler(**(noise or {}))
        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **unet)
        self.ema = build_ema(self.unet, ema_decay)
        self.optim_cfg, self.sched_cfg = optimizer or {}, scheduler or {}
        self._ema_step = -1

    # ---- training ------------------------------------------------------------------------------------------------
    def diffusion_loss(self, clean: torch.Tensor) -> torch.Tensor:
        """Denoising loss of a batch of clean images in [-1, 1], (B, C, H, W)."""
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device)  # fmt: skip
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = self.unet(noisy, timesteps).sample
        target = training_target(self.noise_scheduler, clean, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int):
        if "image" not in batch:  # every image of the batch was unreadable
            return None
        loss = self.diffusion_loss(batch["image"])
        stop_on_nonfinite_loss(self, loss)
        self.log("train/loss", loss, prog_bar=True)
        if batch.get("num_skipped"):
            self.log("train/skipped_images", float(batch["num_skipped"]), reduce_fx="sum")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None and self.trainer.global_step != self._ema_step:  # once per optimizer step
            self._ema_step = self.trainer.global_step
            self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        return build_optimizer(self.unet.parameters(), self.optim_cfg, self.sched_cfg,
                               self.trainer.estimated_stepping_batches)  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["module_class"] = (
            f"{type(self).__module__}.{type(self).__qualname__}"  # read by src.sample
        )

    # ---- sampling --------------------------------------------------------------------------------------------------
    def sampling_network(self, use_ema: bool = True) -> UNet2DModel:
        return self.ema.module if use_ema and self.ema is not None else self.unet

    @torch.no_grad()
    def generate(self, seeds: list[int], sampler: str | None = None, steps: int | None = None,
                 use_ema: bool = True, progress: bool = False) -> torch.Tensor:  # fmt: skip
        """One image per seed, as uint8 (B, H, W, C) on the CPU. sampler: ddpm | ddim | dpm_solver (default
        `model.sampler`); steps: default `model.sample_steps` (DDPM-1000 is `sampler=ddpm steps=1000`)."""
        network = self.sampling_network(use_ema)
        was_training = network.training
        network.eval()
        hp = self.hparams
        schedule = build_sampler(sampler or hp.sampler, self.noise_scheduler)
        images = sample_loop(lambda x, t: network(x, t).sample, schedule,
                             (len(seeds), hp.channels, hp.image_size, hp.image_size), seeds,
                             steps or hp.sample_steps, self.device, progress=progress)  # fmt: skip
        network.train(was_training)
        return to_uint8(images)
