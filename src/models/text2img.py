"""Text-conditional diffusion (diffusers `UNet2DConditionModel`) for the caption-mitigation study of PAPERS.md §2.

Two ways to build it:
- from scratch (`unet` keyword arguments, a frozen text encoder of src/nn/text_encoders.py, pixel space): the CPU
  runs on the embedded captioned faces;
- from a diffusers Stable Diffusion directory (`pretrained=DIR`): its UNet is fine-tuned, its text encoder and VAE
  stay frozen, its scheduler config fixes the prediction type (ε for SD 1.x, v for SD 2.1), latents are scaled by
  the VAE's `scaling_factor` — DCR's `diff_train.py` (§2.1).

The captions arrive already transformed by the data pipeline (conditioning level, duplication, the caption
mitigations mc / rc / rt / cwr); the `gn` mitigation (§2.5) adds λ·N(0, 1) to the text embeddings here, every
step, as DCR's `--rand_noise_lam`. `prompt_dropout` replaces a caption's embedding by the empty prompt's so that
classifier-free guidance works at sampling (our addition for models trained from scratch; DCR fine-tunes SD, which
already has it, with no dropout). Generation: CFG with `guidance_scale`, optional embedding noise (GNI, §2.6).
"""

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from src.data.captions import noise_text_embeddings
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
from src.nn.text_encoders import build_text_encoder
from src.utils.guards import stop_on_nonfinite_loss

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FROZEN_PRETRAINED = ("vae.", "text_encoder.")  # state-dict prefixes of the frozen Stable Diffusion parts


def check_stable_diffusion_dir(path) -> Path:
    """The diffusers Stable Diffusion directory `path`, or FileNotFoundError naming the missing components."""
    path = Path(path)
    missing = [name for name in SD_COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"model.pretrained='{path}' is not a complete diffusers Stable Diffusion directory: "
                                f"missing {', '.join(m + '/' for m in missing)} (expected {', '.join(SD_COMPONENTS)})")  # fmt: skip
    return path


class Text2ImageModule(L.LightningModule):
    """unet: `UNet2DConditionModel` keyword arguments (from scratch); text_encoder: `build_text_encoder` arguments;
    pretrained: a Stable Diffusion directory instead of both. train_mitigation: the train-time mitigation config
    ({name, lam, p}); only `gn` acts here. Other arguments as `DDPMModule`."""

    def __init__(self, unet: dict | None = None, text_encoder: dict | None = None, pretrained: str | None = None,
                 image_size: int = 32, channels: int = 3, noise: dict | None = None, optimizer: dict | None = None,
                 scheduler: dict | None = None, ema_decay: float = 0.9999, sampler: str = "ddim",
                 sample_steps: int = 50, guidance_scale: float = 3.0, prompt_dropout: float = 0.1,
                 train_mitigation: dict | None = None):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        check_choice("model.sampler", sampler, SAMPLERS)
        if pretrained:
            path = check_stable_diffusion_dir(pretrained)
            self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False).eval()
            self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
            self.text_encoder = build_text_encoder("stable_diffusion", path=str(path))
        else:
            if unet is None:
                raise ValueError(
                    "model.unet (UNet2DConditionModel arguments) or model.pretrained is required"
                )
            self.text_encoder = build_text_encoder(**(text_encoder or {}))
            self.unet = UNet2DConditionModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                             cross_attention_dim=self.text_encoder.dim, **unet)  # fmt: skip
            self.vae = None
            self.noise_scheduler = build_noise_scheduler(**(noise or {}))
        mitigation = dict(train_mitigation or {"name": "none"})
        self.embedding_noise = float(mitigation.get("lam", 0.0)) if mitigation.get("name") == "gn" else 0.0
        self.ema = build_ema(self.unet, ema_decay)
        self.optim_cfg, self.sched_cfg = optimizer or {}, scheduler or {}
        self._ema_step = -1
        self._empty = None

    # ---- conditioning ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) frozen text-encoder hidden states of the prompts."""
        self.text_encoder.eval()
        return self.text_encoder(self.text_encoder.tokenize(prompts).to(self.device))

    def empty_prompt(self) -> torch.Tensor:
        """(1, L, D) embedding of the empty prompt, computed once per device (the text encoder is frozen)."""
        if self._empty is None or self._empty.device != self.device:
            self._empty = self.encode_prompts([""])
        return self._empty

    def latent_size(self) -> int:
        return self.hparams.image_size // (2 ** (len(self.vae.config.block_out_channels) - 1)) if self.vae else \
            self.hparams.image_size  # fmt: skip

    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor

    # ---- training ------------------------------------------------------------------------------------------------------
    def diffusion_loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        clean = self.to_model_space(images)
        text = self.encode_prompts(captions)
        if self.hparams.prompt_dropout:
            drop = torch.rand(len(captions), device=self.device) < self.hparams.prompt_dropout
            text = torch.where(drop[:, None, None], self.empty_prompt().expand_as(text), text)
        if self.embedding_noise:  # the GN mitigation (PAPERS.md §2.5)
            text = text + self.embedding_noise * torch.randn_like(text)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device)  # fmt: skip
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=text).sample
        target = training_target(self.noise_scheduler, clean, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int):
        if "image" not in batch:
            return None
        loss = self.diffusion_loss(batch["image"], batch["caption"])
        stop_on_nonfinite_loss(self, loss)
        self.log("train/loss", loss, prog_bar=True)
        if batch.get("num_skipped"):
            self.log("train/skipped_images", float(batch["num_skipped"]), reduce_fx="sum")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None and self.trainer.global_step != self._ema_step:
            self._ema_step = self.trainer.global_step
            self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        return build_optimizer(self.unet.parameters(), self.optim_cfg, self.sched_cfg,
                               self.trainer.estimated_stepping_batches)  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if (
            self.hparams.pretrained
        ):  # frozen SD parts are rebuilt from the directory: keep them out (~400M params)
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(FROZEN_PRETRAINED)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.pretrained:  # put back the frozen parts this module just loaded from the directory
            state = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(FROZEN_PRETRAINED):
                    state.setdefault(key, value)

    # ---- sampling ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, seeds: list[int], prompts: list[str] | None = None, sampler: str | None = None,
                 steps: int | None = None, use_ema: bool = True, guidance_scale: float | None = None,
                 embedding_noise: float = 0.0, noise_uncond: bool = True) -> torch.Tensor:  # fmt: skip
        """One image per (seed, prompt), uint8 (B, H, W, C) on the CPU. embedding_noise: GNI λ (PAPERS.md §2.6),
        drawn per image from its seed; DCR noises both the conditional and the unconditional embedding
        (`noise_uncond=True`)."""
        if prompts is None or len(prompts) != len(seeds):
            raise ValueError(f"generate needs one prompt per seed; got {len(seeds)} seeds and "
                             f"{None if prompts is None else len(prompts)} prompts")  # fmt: skip
        network = self.ema.module if use_ema and self.ema is not None else self.unet
        was_training = network.training
        network.eval()
        hp = self.hparams
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.encode_prompts(prompts)
        uncond = self.empty_prompt().expand_as(cond)
        if embedding_noise:
            rows = [noise_text_embeddings(torch.stack([u, c]).cpu(), embedding_noise,
                                          torch.Generator().manual_seed(int(seed) + 104_729))
                    for u, c, seed in zip(uncond, cond, seeds, strict=True)]  # fmt: skip
            noised = torch.stack(rows).to(self.device)  # (B, 2, L, D)
            uncond = noised[:, 0] if noise_uncond else uncond
            cond = noised[:, 1]

        def denoise(x, t):
            if scale == 1.0:
                return network(x, t, encoder_hidden_states=cond).sample
            both = network(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            unconditional, conditional = both.chunk(2)
            return unconditional + scale * (conditional - unconditional)

        channels = self.unet.config.in_channels
        size = self.latent_size()
        x = sample_loop(denoise, build_sampler(sampler or hp.sampler, self.noise_scheduler),
                        (len(seeds), channels, size, size), seeds, steps or hp.sample_steps, self.device)  # fmt: skip
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        network.train(was_training)
        return to_uint8(x)
