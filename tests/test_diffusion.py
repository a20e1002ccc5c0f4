"""Diffusion pieces: schedules, targets, the denoising loss, seeded sampling, EMA, the optimizer from the YAML
`_partial_` configs and the DDPM module at a tiny size."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel

from src.models.ddpm import DDPMModule
from src.nn.diffusion import (
    build_ema,
    build_noise_scheduler,
    build_optimizer,
    build_sampler,
    denoising_loss,
    ema_step,
    ema_with_warmup,
    lr_schedule,
    training_target,
)
from tests.conftest import tiny_unet

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY_UNET = tiny_unet()


def training_configs(model: str, **optimizer) -> dict:
    """The `optimizer` (updated with `optimizer`) and `scheduler` `_partial_` configs of conf/model/<model>.yaml."""
    cfg = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    return {
        "optimizer": {**OmegaConf.to_container(cfg.optimizer), **optimizer},
        "scheduler": OmegaConf.to_container(cfg.scheduler),
    }


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
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="model.scheduler.name='step'.*constant, constant_with_warmup"):
        lr_schedule(optimizer, 10, name="step", warmup_steps=1)


def test_training_targets_follow_the_prediction_type():
    clean, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    alphas = build_noise_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(training_target(build_noise_scheduler(), clean, noise, t), noise)
    assert torch.equal(
        training_target(build_noise_scheduler(prediction_type="sample"), clean, noise, t), clean
    )
    v = training_target(build_noise_scheduler(prediction_type="v_prediction"), clean, noise, t)
    torch.testing.assert_close(v, alphas.sqrt() * noise - (1 - alphas).sqrt() * clean)


def test_denoising_loss_draws_noise_then_timesteps_and_scores_the_target():
    scheduler = build_noise_scheduler(prediction_type="v_prediction")
    clean = torch.randn(3, 2, 4, 4)
    seen = {}

    def predict(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    torch.manual_seed(0)
    loss = denoising_loss(predict, scheduler, clean)
    torch.manual_seed(0)
    noise, t = torch.randn_like(clean), torch.randint(0, 1000, (3,))
    assert torch.equal(seen["t"], t) and torch.equal(seen["x"], scheduler.add_noise(clean, noise, t))
    target = training_target(scheduler, clean, noise, t)
    assert torch.equal(loss, target.pow(2).mean())
    assert torch.equal(denoising_loss(predict, scheduler, clean, noise, t), loss)


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


def test_the_ema_steps_once_per_optimizer_step():
    net = torch.nn.Linear(1, 1, bias=False)
    ema = build_ema(net, 0.9)
    last = -1
    for step in [1, 1, 2, 2, 2, 3]:  # optimizer steps seen at the end of six batches (gradient accumulation)
        last = ema_step(ema, net, step, last)
    assert last == 3 and int(ema.n_averaged) == 3
    assert ema_step(None, net, 4, last) == last  # no EMA: nothing to do


def test_a_training_step_lowers_the_loss_on_a_fixed_batch():
    module = tiny_module()
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # same noise and timesteps each step: the loss must fall
        loss = module.loss({"image": images})["loss"]
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_the_optimizer_and_schedule_come_from_the_yaml_partials():
    configs = {key: instantiate(value) for key, value in training_configs("ddpm").items()}
    built = build_optimizer(tiny_module().unet.parameters(), configs["optimizer"], configs["scheduler"], 1000)
    optimizer, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
    weights, others = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW) and weights["lr"] == 0.0  # the warm-up starts at 0
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim <= 1 for p in others["params"])
    assert (weights["weight_decay"], others["weight_decay"], weights["betas"]) == (0.0, 0.0, (0.9, 0.999))
    for _ in range(250):
        optimizer.step(), schedule.step()
    assert weights["lr"] == pytest.approx(0.5e-4)  # half-way through the 500 warm-up steps to 1e-4


def test_ema_is_not_trained_and_checkpoints_rebuild_the_module(tmp_path):
    module = tiny_module(ema_decay=0.99, **training_configs("ddpm"))
    assert not any(p.requires_grad for p in module.ema.parameters())
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["module_class"] == "src.models.ddpm.DDPMModule"
    loaded = DDPMModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.hparams.optimizer == training_configs("ddpm")["optimizer"]
    assert torch.equal(loaded.generate([1], steps=2), module.generate([1], steps=2))
