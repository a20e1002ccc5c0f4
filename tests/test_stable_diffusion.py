"""Stable Diffusion fine-tuning (docs/memorization.md#training-setup) on a tiny random SD 2.1-like directory
written by the tests: latent v-prediction loss, frozen text encoder and VAE, seeded CFG generation,
checkpoints, incomplete directories."""

import shutil

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from src.models.text2img import Text2ImageModule
from tests.conftest import TINY_SD, compose_config
from tests.test_diffusion import training_configs

CAPTIONS = ["the man on a photo", "a woman in the sun"]


@pytest.fixture
def module(tiny_sd_dir) -> Text2ImageModule:
    torch.manual_seed(0)
    return Text2ImageModule(
        pretrained=str(tiny_sd_dir),
        image_size=TINY_SD["image_size"],
        ema_decay=0,
        prompt_dropout=0,
        guidance_scale=7.5,
        sample_steps=3,
    )


def fixed_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    size = TINY_SD["image_size"]
    return torch.rand(len(CAPTIONS), 3, size, size, generator=generator) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def seeded_loss(module: Text2ImageModule, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return module.loss({"image": images, "caption": CAPTIONS})["loss"]


def test_the_pretrained_directory_sets_the_pieces(module):
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    assert module.latent_size() == TINY_SD["image_size"] // 2
    assert module.text_encoder.dim == module.unet.config.cross_attention_dim == TINY_SD["text_dim"]
    ids = module.text_encoder.tokenize(CAPTIONS)
    assert ids.shape == (2, TINY_SD["max_length"])
    assert module.encode_prompts(CAPTIONS).shape == (2, TINY_SD["max_length"], TINY_SD["text_dim"])


def test_loss_is_the_v_prediction_mse_on_scaled_vae_latents(module):
    images = fixed_images()
    loss = seeded_loss(module, images)
    # the same random draws, in the same order, by hand: latents x scaling_factor, ε, t, then v = √ᾱ ε − √(1−ᾱ) x0
    torch.manual_seed(0)
    latents = module.vae.encode(images).latent_dist.sample() * TINY_SD["scaling_factor"]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (len(CAPTIONS),))
    alpha_bar = module.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    with torch.no_grad():
        prediction = module.unet(
            noisy, timesteps, encoder_hidden_states=module.encode_prompts(CAPTIONS)
        ).sample
    assert latents.shape == (2, 4, 8, 8)
    assert loss.item() == pytest.approx(F.mse_loss(prediction, velocity).item(), rel=1e-5)


def test_training_lowers_the_loss_and_leaves_text_encoder_and_vae_frozen(module):
    images = fixed_images()
    frozen = {name: p.clone() for name, p in module.named_parameters() if not name.startswith("unet.")}
    with torch.no_grad():
        before = sum(seeded_loss(module, images, seed).item() for seed in range(4))
    optimizer = torch.optim.Adam(module.unet.parameters(), lr=2e-3)
    for step in range(30):
        loss = seeded_loss(module, images, seed=step % 4)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in module.unet.parameters())
            assert all(p.grad is None for p in module.text_encoder.parameters())
            assert all(p.grad is None for p in module.vae.parameters())
        optimizer.step()
    with torch.no_grad():
        after = sum(seeded_loss(module, images, seed).item() for seed in range(4))
    assert after < 0.7 * before, (before, after)
    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)


def test_generate_gives_seeded_uint8_images(module):
    images = module.generate([0, 1], prompts=CAPTIONS)
    assert (
        images.shape == (2, TINY_SD["image_size"], TINY_SD["image_size"], 3) and images.dtype == torch.uint8
    )
    assert torch.equal(images, module.generate([0, 1], prompts=CAPTIONS))
    assert not torch.equal(images[0], module.generate([2], prompts=CAPTIONS[:1])[0])
    unguided = module.generate([0, 1], prompts=CAPTIONS, guidance_scale=1.0)
    assert not torch.equal(images, unguided)


def test_a_lightning_checkpoint_reloads(tiny_sd_dir, tmp_path):
    torch.manual_seed(0)
    module = Text2ImageModule(
        pretrained=str(tiny_sd_dir), image_size=TINY_SD["image_size"], **training_configs("text2img", lr=1e-3)
    )
    images = fixed_images()
    batches = [{"image": images, "caption": CAPTIONS}] * 2
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("unet.") for k in saved)
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in saved)  # rebuilt from the SD directory
    reloaded = Text2ImageModule.load_from_checkpoint(tmp_path / "last.ckpt")
    untrained = Text2ImageModule(pretrained=module.hparams.pretrained, image_size=TINY_SD["image_size"])
    assert not all(
        torch.equal(a, b) for a, b in zip(untrained.unet.parameters(), module.unet.parameters(), strict=True)
    )
    for name, value in module.unet.state_dict().items():
        assert torch.equal(value, reloaded.unet.state_dict()[name]), name
    assert torch.equal(module.generate([3], CAPTIONS[:1]), reloaded.generate([3], CAPTIONS[:1]))


def test_an_incomplete_directory_names_the_missing_components(tiny_sd_dir, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"missing vae/, tokenizer/"):
        Text2ImageModule(pretrained=str(broken), image_size=TINY_SD["image_size"])


def test_the_experiment_without_model_pretrained_says_so(tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_config("train.yaml", ["experiment=sd_finetune_laion10k"], tmp_path)
    assert cfg.model.optimizer.lr == 5e-6 and cfg.model.ema_decay == 0 and cfg.trainer.max_steps == 100_000
    with pytest.raises(InstantiationException, match="model.pretrained is required"):
        instantiate(cfg.model)
