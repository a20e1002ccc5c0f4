"""Text-conditional diffusion (diffusers `UNet2DConditionModel`) for the caption-mitigation study of
docs/memorization.md#caption-mitigations.

Two ways to build it:
- from scratch (`unet` keyword arguments, a frozen text encoder of src/nn/text_encoders.py, pixel space): the CPU
  runs on the embedded captioned faces;
- from a diffusers Stable Diffusion directory (`pretrained=DIR`): its UNet is fine-tuned, its text encoder and VAE
  stay frozen, its scheduler config fixes the prediction type (ε for SD 1.x, v for SD 2.1), latents are scaled by
  the VAE's `scaling_factor` — DCR's `diff_train.py` (docs/memorization.md#training-setup).

The captions arrive already transformed by the data pipeline (conditioning level, duplication, the caption
mitigations mc / rc / rt / cwr); the `gn` mitigation (docs/memorization.md#train-time-mitigations) adds λ·N(0,
1) to the text embeddings here, every step, as DCR's `--rand_noise_lam`. `prompt_dropout` replaces a caption's
embedding by the empty prompt's so that classifier-free guidance works at sampling (our addition for models
trained from scratch; DCR fine-tunes SD, which already has it, with no dropout). Generation: CFG with
`guidance_scale`, optional embedding noise (GNI, docs/memorization.md#inference-time-mitigations).
"""

import contextlib
import logging
from pathlib import Path

import lightning as L
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from src.detection.detectors import end_token_positions, guided_pass
from src.mitigations import (
    SAMPLING_MITIGATIONS,
    delayed_guidance_scale,
    noise_guidance_embeddings,
    noise_text_embeddings,
    optimize_prompt_embeddings,
)
from src.models import diffusion as shared  # what the two diffusion modules share
from src.nn.attention import cross_attention
from src.nn.diffusion import build_noise_scheduler, build_sampler, check_choice, denoising_loss, initial_noise
from src.nn.text_encoders import build_text_encoder
from src.utils.checkpoints import record_module_class

log = logging.getLogger(__name__)

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FROZEN_PRETRAINED = ("vae.", "text_encoder.")  # state-dict prefixes of the frozen Stable Diffusion parts


def check_stable_diffusion_dir(path) -> Path:
    """The diffusers Stable Diffusion directory `path`, or FileNotFoundError naming the missing components."""
    path = Path(path)
    missing = [name for name in SD_COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model.pretrained='{path}' is not a complete diffusers Stable Diffusion directory: "
            f"missing {', '.join(m + '/' for m in missing)} (expected {', '.join(SD_COMPONENTS)})"
        )
    return path


class Text2ImageModule(L.LightningModule):
    """unet: `UNet2DConditionModel` keyword arguments (from scratch); text_encoder: `build_text_encoder` arguments;
    pretrained: a Stable Diffusion directory instead of both. train_mitigation: the train-time mitigation config
    ({name, lam, p}); only `gn` acts here. Other arguments (the `_partial_` optimizer and scheduler configs among
    them) as `DDPMModule`."""

    def __init__(
        self,
        unet: dict | None = None,
        text_encoder: dict | None = None,
        pretrained: str | None = None,
        image_size: int = 32,
        channels: int = 3,
        noise: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        ema_decay: float = 0.9999,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 3.0,
        prompt_dropout: float = 0.1,
        train_mitigation: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
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
            self.unet = UNet2DConditionModel(
                sample_size=image_size,
                in_channels=channels,
                out_channels=channels,
                cross_attention_dim=self.text_encoder.dim,
                **unet,
            )
            self.vae = None
            self.noise_scheduler = build_noise_scheduler(**(noise or {}))
        mitigation = dict(train_mitigation or {"name": "none"})
        self.embedding_noise = float(mitigation.get("lam", 0.0)) if mitigation.get("name") == "gn" else 0.0
        shared.init_ema_and_sampler(self, ema_decay, sampler)
        self._empty = None

    # ---- conditioning --------------------------------------------------------------------------------------
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
        if self.vae is None:
            return self.hparams.image_size
        return self.hparams.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor

    # ---- training ------------------------------------------------------------------------------------------
    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": denoising loss} of images `batch["image"]` in [-1, 1], (B, 3, H, W) (VAE latents with
        `pretrained`), conditioned on the frozen text encoder's states of `batch["caption"]` (B strings)."""
        captions = batch["caption"]
        clean = self.to_model_space(batch["image"])
        text = self.encode_prompts(captions)
        if self.hparams.prompt_dropout:
            drop = torch.rand(len(captions), device=self.device) < self.hparams.prompt_dropout
            text = torch.where(drop[:, None, None], self.empty_prompt().expand_as(text), text)
        # the GN mitigation (docs/memorization.md#train-time-mitigations)
        text = noise_text_embeddings(text, self.embedding_noise)

        def predict(x, t):
            return self.unet(x, t, encoder_hidden_states=text).sample

        return {"loss": denoising_loss(predict, self.noise_scheduler, clean)}

    # the training hooks both diffusion modules share (src/models/diffusion.py)
    training_step = shared.diffusion_training_step
    on_train_batch_end = shared.update_ema
    configure_optimizers = shared.configure_unet_optimizers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record_module_class(self, checkpoint)
        # the frozen SD parts are rebuilt from the directory: keep them out of the checkpoint (~400M parameters)
        if self.hparams.pretrained:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(FROZEN_PRETRAINED)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.pretrained:  # put back the frozen parts this module just loaded from the directory
            state = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(FROZEN_PRETRAINED):
                    state.setdefault(key, value)

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        seeds: list[int],
        prompts: list[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        use_ema: bool = True,
        guidance_scale: float | None = None,
        embedding_noise: float = 0.0,
        noise_uncond: bool = True,
        mitigation: dict | None = None,
        report: list | None = None,
    ) -> torch.Tensor:
        """One image per (seed, prompt), uint8 (B, H, W, C) on the CPU. embedding_noise: GNI λ
        (docs/memorization.md#inference-time-mitigations), drawn per image from its seed; DCR noises both the
        conditional and the unconditional embedding (`noise_uncond=True`). mitigation: one of the mitigations that
        act inside sampling (docs/detection.md#inference-time-mitigations), {name: prompt_embedding |
        delayed_guidance | attention_rescale, its options}; `report` (a list) receives what prompt_embedding
        reached per prompt."""
        if prompts is None or len(prompts) != len(seeds):
            raise ValueError(
                f"generate needs one prompt per seed; got {len(seeds)} seeds and "
                f"{None if prompts is None else len(prompts)} prompts"
            )
        network = shared.sampling_network(self, use_ema)
        hp = self.hparams
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        mitigation = dict(mitigation or {"name": "none"})
        name = mitigation.pop("name", "none")
        check_choice("inference mitigation", name, ("none", *SAMPLING_MITIGATIONS))
        sampler, steps = sampler or hp.sampler, steps or hp.sample_steps
        cond = self.encode_prompts(prompts)
        uncond = self.empty_prompt().expand_as(cond)
        uncond, cond = noise_guidance_embeddings(uncond, cond, embedding_noise, seeds, noise_uncond)
        channels, size = self.unet.config.in_channels, self.latent_size()
        shape = (len(seeds), channels, size, size)
        if name == "prompt_embedding":
            cond = self.optimized_prompts(
                network, cond, uncond, prompts, seeds, shape, sampler, steps, mitigation, report
            )
        probe = {}
        if name == "attention_rescale":
            probe = self.attention_rescale(prompts, **mitigation)

        def denoise(x, t):
            w = scale
            if name == "delayed_guidance":
                w = delayed_guidance_scale(t, scale, **mitigation)
            if w == 1.0 and not probe:
                return network(x, t, encoder_hidden_states=cond).sample
            both = network(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            unconditional, conditional = both.chunk(2)
            return unconditional + w * (conditional - unconditional)

        with cross_attention(network, **probe) if probe else contextlib.nullcontext():
            return shared.sample_images(
                self, network, denoise, shape, seeds, sampler, steps, decode=self.decode_latents
            )

    def attention_rescale(
        self, prompts: list[str], start_scale: float = 1.25, mask_padding: bool = True
    ) -> dict:
        """Ren et al.'s re-weighting (docs/detection.md#inference-time-mitigations), as `cross_attention` options
        for the batch [unconditional; conditional]: the start token's logit times `start_scale` on the conditional
        rows, and, with `mask_padding`, the positions after each prompt's first end token left out of the softmax
        in both halves."""
        keep = None
        if mask_padding:
            ids = self.text_encoder.tokenize(prompts)
            end = end_token_positions(ids, self.text_encoder.end_token_id)
            keep = torch.arange(ids.shape[1])[None, :] <= end[:, None]
            keep = torch.cat([keep, keep])
        conditional = torch.cat([torch.zeros(len(prompts)), torch.ones(len(prompts))]).bool()
        return {"start_scale": start_scale, "conditional": conditional, "keep": keep}

    def optimized_prompts(
        self, network, cond, uncond, prompts, seeds, shape, sampler, steps, options: dict, report: list | None
    ) -> torch.Tensor:
        """Wen et al.'s mitigation (`src.mitigations.optimize_prompt_embeddings`): the conditional embedding of
        each prompt of the batch optimised on its generations' x_T at the first sampling timestep; what each
        reached is appended to `report` (with its prompt), and a warning names the prompts that missed the
        target. The loss is their code's, the norm over the prompt's generations of the batch jointly; with
        `per_generation: true` in `options` it is divided by the square root of their number, so the target no
        longer depends on how many generations of a prompt share a batch."""
        options = dict(options)
        per_generation = bool(options.pop("per_generation", False))
        schedule = build_sampler(sampler, self.noise_scheduler)
        schedule.set_timesteps(steps, device=self.device)
        t = schedule.timesteps[0]
        x = initial_noise(shape, seeds, self.device) * schedule.init_noise_sigma
        x = schedule.scale_model_input(x, t)

        def loss(embedding, rows):
            eps_u, eps_c = guided_pass(network, x[rows], t, embedding.expand(len(rows), -1, -1), uncond[rows])
            norm = (eps_c - eps_u).float().norm()
            return norm / len(rows) ** 0.5 if per_generation else norm

        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        was_training = network.training
        network.eval()
        try:
            cond, reached = optimize_prompt_embeddings(loss, cond, list(groups.values()), **options)
        finally:
            network.train(was_training)
        missed = [entry for entry in reached if not entry["reached"]]
        for entry in reached:
            entry["prompt"] = prompts[entry["rows"][0]]
            entry["seeds"] = [seeds[i] for i in entry.pop("rows")]
        if missed:
            log.warning(
                "prompt_embedding: %d of %d prompt(s) stayed above target_loss=%s after %d steps (e.g. %r: %.3g -> %.3g)",
                len(missed),
                len(reached),
                options.get("target_loss", 3.0),
                missed[0]["steps"],
                missed[0]["prompt"],
                missed[0]["initial_loss"],
                missed[0]["final_loss"],
            )
        if report is not None:
            report.extend(reached)
        return cond

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of model-space samples (the VAE's decoder with `pretrained`; pixels already otherwise)."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample
