"""Unconditional DDPM (diffusers `UNet2DModel` + `DDPMScheduler`) for the memorization study of
docs/memorization.md#ddpm-on-nested-subsets.

A training step reads like the DDPM paper: draw noise and timesteps, `add_noise`, predict, mean-squared error against
the schedule's target (ε by default; `v_prediction` and `sample` as string options): `denoising_loss` of
src/nn/diffusion.py. An EMA copy of the UNet (torch's `AveragedModel`, decay with diffusers' warm-up) is what
`generate` samples from; DDPM and DDIM sampling use the schedulers' own `set_timesteps` / `step`. The optimizer and
learning-rate schedule are `_partial_` configs (conf/model/ddpm.yaml: AdamW with warm-up); gradient clipping and
bf16 come from the trainer config.
"""

import lightning as L
import torch
from diffusers import UNet2DModel

from src.models import diffusion as shared  # what the two diffusion modules share
from src.nn.diffusion import build_noise_scheduler, denoising_loss
from src.utils.checkpoints import record_module_class


class DDPMModule(L.LightningModule):
    """unet: keyword arguments of `UNet2DModel` (block_out_channels, down/up_block_types, layers_per_block, ...),
    see conf/model/unet/. noise: `build_noise_scheduler` arguments. optimizer: a `_partial_` optimizer config
    (`_target_: torch.optim.AdamW`, lr, betas, weight_decay, eps); scheduler: a `_partial_` config of
    `src.nn.diffusion.lr_schedule` (name, warmup_steps); both are needed to train, not to generate. ema_decay: 0
    switches EMA off (sampling then uses the trained weights). sampler / sample_steps: the defaults of `generate`.
    """

    def __init__(
        self,
        unet: dict,
        image_size: int = 64,
        channels: int = 3,
        noise: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        ema_decay: float = 0.9999,
        sampler: str = "ddim",
        sample_steps: int = 50,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.noise_scheduler = build_noise_scheduler(**(noise or {}))
        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **unet)
        shared.init_ema_and_sampler(self, ema_decay, sampler)

    # ---- training ------------------------------------------------------------------------------------------
    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": denoising loss} of a batch of clean images `batch["image"]` in [-1, 1], (B, C, H, W)."""
        return {
            "loss": denoising_loss(lambda x, t: self.unet(x, t).sample, self.noise_scheduler, batch["image"])
        }

    # the training hooks both diffusion modules share (src/models/diffusion.py)
    training_step = shared.diffusion_training_step
    on_train_batch_end = shared.update_ema
    configure_optimizers = shared.configure_unet_optimizers
    on_save_checkpoint = record_module_class

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        seeds: list[int],
        sampler: str | None = None,
        steps: int | None = None,
        use_ema: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """One image per seed, as uint8 (B, H, W, C) on the CPU. sampler: ddpm | ddim | dpm_solver (default
        `model.sampler`); steps: default `model.sample_steps` (DDPM-1000 is `sampler=ddpm steps=1000`)."""
        network = shared.sampling_network(self, use_ema)
        hp = self.hparams
        return shared.sample_images(
            self,
            network,
            lambda x, t: network(x, t).sample,
            (len(seeds), hp.channels, hp.image_size, hp.image_size),
            seeds,
            sampler,
            steps,
            progress=progress,
        )
