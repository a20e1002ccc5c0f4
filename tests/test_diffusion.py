"""Diffusion pieces: schedules, targets, seeded sampling, EMA warm-up and the DDPM module at a tiny size."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from src.models.ddpm import DDPMModule
from src.nn.diffusion import build_noise_scheduler, build_sampler, ema_with_warmup, training_target

TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "attention_head_dim": 8}  # fmt: skip


def tiny_module(**kwargs) -> DDPMModule:
    torch.manual_seed(0)
    return DDPMModule(TINY_UNET, image_size=16, **kwargs)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="prediction_type='x'.*epsilon, v_prediction, sample"):
        build_noise_scheduler(prediction_type="x")
    with pytest.raises(ValueError, match="sampler='euler'.*ddpm, ddim, dpm_solver"):
        build_sampler("euler", build_noise_scheduler())
    with pytest.raises(ValueError, match="model.sampler='x'"):
        tiny_module(sampler="x")


def test_training_targets_follow_the_prediction_type():
    clean, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    alphas = build_noise_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(training_target(build_noise_scheduler(), clean, noise, t), noise)
    assert torch.equal(
        training_target(build_noise_scheduler(prediction_type="sample"), clean, noise, t), clean
    )
    v = training_target(build_noise_scheduler(prediction_type="v_prediction"), clean, noise, t)
    torch.testing.assert_close(v, alphas.sqrt() * noise - (1 - alphas).sqrt() * clean)


def test_noise_schedule_is_the_ddpm_one():
    config = build_noise_scheduler().config
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
        1000,
        1e-4,
        0.02,
        "linear",
    )


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_an_image_depends_on_its_seed_only_not_on_its_batch(sampler):
    module = tiny_module().eval()
    batch = module.generate([5, 6, 7], sampler=sampler, steps=3)
    alone = module.generate([6], sampler=sampler, steps=3)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 16, 16, 3)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])


def test_ema_warms_up_then_uses_the_decay():
    net = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.9))
    expected = float(net.weight)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update_parameters(net)
        if n == 0:
            expected = value  # the first update copies
        else:
            beta = min(0.9, (1 + n) / (10 + n))
            expected = beta * expected + (1 - beta) * value
        assert float(ema.module.weight) == pytest.approx(expected, rel=1e-6)


def test_a_training_step_lowers_the_loss_on_a_fixed_batch():
    module = tiny_module(optimizer={"lr": 1e-3})
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # same noise and timesteps each step: the loss must fall
        loss = module.diffusion_loss(images)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_ema_is_not_trained_and_checkpoints_rebuild_the_module(tmp_path):
    import lightning as L

    module = tiny_module(ema_decay=0.99)
    assert not any(p.requires_grad for p in module.ema.parameters())
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["module_class"] == "src.models.ddpm.DDPMModule"
    loaded = DDPMModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(loaded.generate([1], steps=2), module.generate([1], steps=2))
