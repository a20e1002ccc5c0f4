"""Diffusion fills for the inpainting copies of the partial-copy benchmark (`src.data.partial_copies`): the part of
a source that is kept stays, a diffusion model draws the rest.

- `RePaintFill`: a DDPM trained by this project (`experiment=ddpm_quickstart`, any `DDPMModule` checkpoint) with
  diffusers' `RePaintScheduler` (Lugmayr et al. 2022): at every step the known region is the source noised to
  that step, and the schedule jumps back `jump_length` steps `jump_n_sample - 1` times to harmonise. Runs on a CPU.
- `DiffusersFill`: a diffusers inpainting pipeline from a local directory (`AutoPipelineForInpainting`, e.g. Stable
  Diffusion inpainting), prompted with `prompt`.

Both return images whose kept pixels are the source's exactly (a pipeline that works in a latent space changes
them slightly; they are written back), and each image depends on its own seed alone, not on its batch.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

FILLS = ("repaint", "diffusers")


def _keep_known(
    sources: list[Image.Image], keeps: list[np.ndarray], filled: list[Image.Image]
) -> list[Image.Image]:
    out = []
    for source, keep, image in zip(sources, keeps, filled, strict=True):
        array = np.array(image.convert("RGB").resize(source.size, Image.Resampling.BICUBIC))
        array[keep] = np.asarray(source.convert("RGB"))[keep]
        out.append(Image.fromarray(array))
    return out


def _check(sources, keeps, seeds) -> None:
    if not (len(sources) == len(keeps) == len(seeds)):
        raise ValueError(
            f"fill: {len(sources)} images, {len(keeps)} masks and {len(seeds)} seeds; give one each."
        )
    for source, keep in zip(sources, keeps, strict=True):
        if keep.shape != (source.size[1], source.size[0]):
            raise ValueError(f"fill: a mask of shape {keep.shape} for an image of size {source.size} (W, H).")


class RePaintFill:
    """checkpoint: a `DDPMModule` checkpoint of this project (or `module`: such a module already built). steps:
    RePaint's `num_inference_steps`; jump_length / jump_n_sample: its resampling schedule (the paper: 10 / 10; a
    sample costs about steps * jump_n_sample UNet calls). eta: DDIM-like noise scale (RePaint: 0). The EMA
    weights are used when the module has them."""

    def __init__(
        self,
        checkpoint: str | None = None,
        steps: int = 50,
        jump_length: int = 10,
        jump_n_sample: int = 2,
        eta: float = 0.0,
        batch_size: int = 64,
        device: str = "cpu",
        module=None,
    ):
        from diffusers import RePaintScheduler

        if module is not None:
            unet, noise_config, image_size = _from_module(module)
        else:
            unet, noise_config, image_size = load_ddpm_unet(checkpoint)
        if noise_config.prediction_type != "epsilon":
            raise ValueError(
                "RePaint fill: diffusers' RePaintScheduler needs a DDPM that predicts the noise (epsilon)."
            )
        self.unet = unet.to(device).eval()
        self.scheduler = RePaintScheduler.from_config(noise_config)
        self.image_size = image_size
        self.steps, self.jump_length, self.jump_n_sample, self.eta = steps, jump_length, jump_n_sample, eta
        self.batch_size, self.device = batch_size, torch.device(device)

    @torch.no_grad()
    def raw(self, images: torch.Tensor, keep: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """RePaint's own output in [-1, 1]: images (B, 3, S, S) in [-1, 1], keep (B, 1, S, S) 1 = known."""
        from diffusers.utils.torch_utils import randn_tensor

        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        x = randn_tensor(images.shape, generator=generators, device=self.device)
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps, self.jump_length, self.jump_n_sample, self.device)
        scheduler.eta = self.eta
        t_last = scheduler.timesteps[0] + 1
        for t in scheduler.timesteps:
            if t < t_last:
                eps = self.unet(x, t).sample
                x = scheduler.step(eps, t, x, images, keep, generators).prev_sample
            else:
                x = scheduler.undo_step(x, t_last, generators)
            t_last = t
        return x

    def __call__(
        self, sources: list[Image.Image], keeps: list[np.ndarray], seeds: list[int]
    ) -> list[Image.Image]:
        _check(sources, keeps, seeds)
        for source in sources:
            if source.size != (self.image_size, self.image_size):
                raise ValueError(
                    f"RePaint fill: the DDPM draws {self.image_size} px images and a source is {source.size}; "
                    f"build the set with image_size={self.image_size}."
                )
        out = []
        for start in tqdm(range(0, len(sources), self.batch_size), desc="RePaint", unit="batch"):
            batch = slice(start, start + self.batch_size)
            images = torch.stack(
                [
                    torch.from_numpy(np.asarray(s.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)
                    for s in sources[batch]
                ]
            ).to(self.device)
            keep = torch.stack([torch.from_numpy(k.astype(np.float32))[None] for k in keeps[batch]]).to(
                self.device
            )
            x = self.raw(images, keep, seeds[batch])
            arrays = (
                ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            )
            out.extend(Image.fromarray(a) for a in arrays)
        return _keep_known(sources, keeps, out)


class DiffusersFill:
    """path: a local diffusers inpainting pipeline directory (model_index.json). prompt: the text for every fill
    ("" unconditional). steps / guidance: the pipeline's num_inference_steps / guidance_scale."""

    def __init__(
        self,
        path: str,
        prompt: str = "",
        steps: int = 50,
        guidance: float = 7.5,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        from diffusers import AutoPipelineForInpainting

        if not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"diffusers fill: no inpainting pipeline directory at {path} (no model_index.json). Give a local "
                "copy of one (e.g. stable-diffusion-inpainting saved with save_pretrained), or on a CPU use "
                "fill.kind=repaint with a DDPM checkpoint of this project."
            )
        self.pipe = AutoPipelineForInpainting.from_pretrained(path, torch_dtype=getattr(torch, dtype)).to(
            device
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt, self.steps, self.guidance = prompt, steps, guidance
        self.batch_size, self.device = batch_size, torch.device(device)

    def __call__(
        self, sources: list[Image.Image], keeps: list[np.ndarray], seeds: list[int]
    ) -> list[Image.Image]:
        _check(sources, keeps, seeds)
        out = []
        for start in tqdm(range(0, len(sources), self.batch_size), desc="inpainting", unit="batch"):
            batch = slice(start, start + self.batch_size)
            images = sources[batch]
            w, h = images[0].size
            masks = [
                Image.fromarray(np.where(k, 0, 255).astype(np.uint8)) for k in keeps[batch]
            ]  # white = fill
            out.extend(
                self.pipe(
                    prompt=[self.prompt] * len(images),
                    image=images,
                    mask_image=masks,
                    height=h,
                    width=w,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    generator=[torch.Generator(self.device).manual_seed(int(s)) for s in seeds[batch]],
                ).images
            )
        return _keep_known(sources, keeps, out)


def _from_module(module):
    """(UNet, noise scheduler config, image size) of a built `DDPMModule` (its EMA copy when it has one)."""
    if type(module).__name__ != "DDPMModule":
        raise ValueError(
            f"RePaint fill: the module is a {type(module).__name__}; RePaint needs an unconditional DDPM "
            "(experiment=ddpm_quickstart or ddpm_celebahq)."
        )
    unet = module.ema.module if getattr(module, "ema", None) is not None else module.unet
    return unet, module.noise_scheduler.config, int(module.hparams.image_size)


def load_ddpm_unet(checkpoint) -> tuple:
    """(UNet2DModel with the EMA weights when saved, else the trained ones; its noise scheduler config; image size)
    from a `DDPMModule` checkpoint of this project, read with weights_only=True."""
    from diffusers import UNet2DModel

    from src.nn.diffusion import build_noise_scheduler
    from src.utils.checkpoints import TRAIN_DIFFUSION, expect_module, load_checkpoint

    if checkpoint is None or not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"RePaint fill: no DDPM checkpoint at {checkpoint}; train one with `python -m src.train "
            "experiment=ddpm_quickstart` and give <run>/checkpoints/last.ckpt."
        )
    ckpt = load_checkpoint(checkpoint, "DDPM checkpoint", make=TRAIN_DIFFUSION)
    expect_module(ckpt, checkpoint, ("DDPMModule",), make=TRAIN_DIFFUSION)
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    channels = hp.get("channels", 3)
    unet = UNet2DModel(
        sample_size=hp["image_size"], in_channels=channels, out_channels=channels, **hp["unet"]
    )
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "unet."
    unet.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    noise = build_noise_scheduler(**(hp.get("noise") or {}))
    return unet, noise.config, int(hp["image_size"])


def build_fill(kind: str, **kwargs):
    """A fill from its config (`benchmark.fill`): kind repaint (`RePaintFill` arguments) or diffusers."""
    if kind == "repaint":
        return RePaintFill(**kwargs)
    if kind == "diffusers":
        return DiffusersFill(**kwargs)
    raise ValueError(f"fill.kind={kind!r}; expected one of {FILLS}")


def fill_key(fill: dict) -> str:
    """A short key of a fill config and the model it reads (the checkpoint's bytes, or the pipeline's file names
    and sizes), so a set built with another model is never reused."""
    fill = {k: v for k, v in fill.items() if k not in ("device", "batch_size")}
    model = Path(str(fill.pop("checkpoint", None) or fill.pop("path", None) or ""))
    digest = hashlib.sha1(json.dumps(fill, sort_keys=True, default=str).encode())
    if model.is_file():
        digest.update(model.read_bytes())
    elif model.is_dir():
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(model)}:{path.stat().st_size}".encode())
    return f"{fill.get('kind', 'fill')}{digest.hexdigest()[:10]}"
