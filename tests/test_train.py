"""The training entry point end to end: every experiment config, resume, sweeps, DDP, loggers and failure modes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from src.train import train
from tests.conftest import (
    CONF,
    ROOT,
    compose_config,
    tiny_diffusion_overrides,
    tiny_overrides,
    tiny_sd_overrides,
    tiny_text2img_overrides,
)

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
CSD_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("csd_")]
TEXT2IMG_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith(("t2i_", "sd_"))]
DIFFUSION_EXPERIMENTS = [e for e in EXPERIMENTS if e not in CSD_EXPERIMENTS + TEXT2IMG_EXPERIMENTS]


def run_module(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_csd_vitl_has_the_paper_hyperparameters(tmp_path):
    cfg = compose_config("train.yaml", ["experiment=csd_vitl"], tmp_path)
    model = cfg.model
    assert (model.backbone.name, model.backbone.source, model.backbone.pretrained) == (
        "ViT-L-14",
        "open_clip",
        "openai",
    )
    assert model.optimizer.name == "sgd" and model.optimizer.momentum == 0.9
    assert (model.optimizer.lr, model.optimizer.lr_backbone, model.optimizer.weight_decay) == (
        0.003,
        1e-4,
        1e-4,
    )
    assert model.optimizer.scale_lr and model.optimizer.reference_batch == 256
    assert (model.loss.temperature, model.loss.base_temperature, model.loss.lam_sup) == (0.1, 1.0, 5.0)
    assert model.loss.label_mask == "count" and model.loss.lambda_c == 0.0
    assert model.scheduler.name == "constant_with_warmup" and model.scheduler.warmup_steps == 30000
    assert model.clip_grad == 3.0
    assert cfg.trainer.max_steps == 80000 and cfg.data.batch_size == 16 and cfg.data.image_size == 224
    assert cfg.data.val_format == "wikiart"


def test_cfg_job_prints_the_config():
    result = run_module(["-m", "src.train", "experiment=csd_vitl", "--cfg", "job"])
    assert result.returncode == 0, result.stderr
    assert "ViT-L-14" in result.stdout and "lam_sup: 5.0" in result.stdout


def test_unknown_experiment_lists_the_valid_ones():
    result = run_module(["-m", "src.train", "experiment=does_not_exist"])
    assert result.returncode != 0
    assert "csd_quickstart" in result.stderr and "csd_vitl" in result.stderr


@pytest.mark.parametrize(
    ("experiment", "search"),
    [
        ("csd_quickstart", "hparams_search=csd_optuna"),
        ("csd_quickstart", "hydra/launcher=slurm"),
        ("csd_quickstart", "+sweep=csd_lambda"),
        ("csd_quickstart", "+sweep=csd_temperature"),
        ("csd_quickstart", "+sweep=csd_init"),
        ("ddpm_quickstart", "+sweep=ddpm_quickstart_subsets"),
        ("ddpm_celebahq", "+sweep=ddpm_celebahq_subsets"),
    ],
)
def test_sweep_and_launcher_configs_compose(experiment, search):
    result = run_module(["-m", "src.train", f"experiment={experiment}", search, "--cfg", "hydra"])
    assert result.returncode == 0, result.stderr
    assert "sweeper" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("experiment", CSD_EXPERIMENTS)
def test_every_csd_experiment_runs_a_few_cpu_steps(experiment, data_dir, tiny_cluster_data, tmp_path):
    cluster = experiment.startswith("csd_vit")  # tiny random ViTs on tiny shards + the WikiArt layout
    overrides = [f"experiment={experiment}", *tiny_overrides(data_dir, bench=not cluster)]
    if cluster:
        overrides += [
            "model.backbone.pretrained=null",
            "data.image_size=32",
            "model.scheduler.warmup_steps=1",
            f"data.train_shards='{tiny_cluster_data['shards']}'",
            f"data.val_root={tiny_cluster_data['wikiart']}",
            f"data.vocab_file={tiny_cluster_data['vocab']}",
            "data.epoch_length=16",
        ]
    cfg = compose_config("train.yaml", overrides, tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    for key in ("before/test/mAP@10", "test/mAP@10", "val/mAP@10", "test/recall@1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "galleries").glob("test_*.png")), "no retrieval gallery was drawn"
    assert (tmp_path / "embeddings" / "test.npz").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", DIFFUSION_EXPERIMENTS)
def test_every_diffusion_experiment_trains_samples_and_analyses_replication(experiment, data_dir, tmp_path):
    cfg = compose_config(
        "train.yaml", [f"experiment={experiment}", *tiny_diffusion_overrides(data_dir)], tmp_path
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    for target in ("train", "control"):
        assert 0.0 <= metrics[f"replication/{target}/sim_gt_thr"] <= 1.0
        assert (tmp_path / "replication" / target / "report.json").is_file()
    assert len(list((tmp_path / "samples" / "final").glob("*.png"))) == 6
    assert (tmp_path / "replication" / "train_vs_control.png").is_file()
    assert list((tmp_path / "samples").glob("grid_step*.png")), "no sample grid was drawn"
    index = json.loads((tmp_path / "subset_index.json").read_text())
    assert len(index["train"]) == 8 and len(index["control"]) == 8
    assert json.loads((tmp_path / "metrics.json").read_text())["replication/train/sim_95pc"] == pytest.approx(
        metrics["replication/train/sim_95pc"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("experiment", TEXT2IMG_EXPERIMENTS)
def test_every_text2img_experiment_trains_samples_and_analyses_replication(
    experiment, data_dir, tiny_sd_dir, tmp_path
):
    if experiment.startswith("sd_"):  # Stable Diffusion fine-tuning: the tiny SD directory at 16 px
        overrides = tiny_sd_overrides(data_dir, tiny_sd_dir)
    else:
        overrides = tiny_text2img_overrides(data_dir)
    cfg = compose_config("train.yaml", [f"experiment={experiment}", *overrides], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["replication/train/sim_gt_thr"] <= 1.0
    prompts = json.loads((tmp_path / "samples" / "final" / "prompts.json").read_text())
    assert len(prompts) == 6 and all(prompts.values())
    assert (tmp_path / "captions_fed.csv").is_file() and (tmp_path / "sampling_weights.json").is_file()
    report = json.loads((tmp_path / "replication" / "train" / "report.json").read_text())
    assert report["counts"]["generated"] == 6


@pytest.mark.slow
def test_diffusion_resume_keeps_the_subset_and_refuses_another(data_dir, tmp_path):
    overrides = [
        "experiment=ddpm_quickstart",
        *tiny_diffusion_overrides(data_dir),
        "callbacks.replication=null",
    ]
    train(compose_config("train.yaml", overrides, tmp_path / "a"))
    first_index = json.loads((tmp_path / "a" / "subset_index.json").read_text())
    resumed = [*overrides, "trainer.max_steps=4", f"ckpt_path={tmp_path / 'a'}"]
    train(compose_config("train.yaml", resumed, tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert json.loads((tmp_path / "b" / "subset_index.json").read_text())["train"] == first_index["train"]
    other = [*resumed, "data.subset_size=9"]
    with pytest.raises(ValueError, match="subset_size=8.*subset_size=9"):
        train(compose_config("train.yaml", other, tmp_path / "c"))


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(data_dir, tmp_path):
    first = compose_config(
        "train.yaml", ["experiment=csd_quickstart", *tiny_overrides(data_dir)], tmp_path / "a"
    )
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    second = compose_config(
        "train.yaml",
        [
            "experiment=csd_quickstart",
            *tiny_overrides(data_dir),
            "trainer.max_steps=4",
            f"ckpt_path={tmp_path / 'a'}",
        ],
        tmp_path / "b",
    )
    train(second)
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_resume_with_another_backbone_says_which(data_dir, tmp_path):
    train(
        compose_config("train.yaml", ["experiment=csd_quickstart", *tiny_overrides(data_dir)], tmp_path / "a")
    )
    cfg = compose_config(
        "train.yaml",
        [
            "experiment=csd_quickstart",
            *tiny_overrides(data_dir),
            "trainer.max_steps=4",
            "model.backbone.name=resnet18",
            f"ckpt_path={tmp_path / 'a'}",
        ],
        tmp_path / "b",
    )
    with pytest.raises(ValueError, match="resnet10t"):
        train(cfg)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_checkpoint(data_dir, tmp_path, monkeypatch):
    from src.models.csd import CSDModule
    from src.utils.guards import NonFiniteLossError

    original = CSDModule.csd_loss

    def nan_loss(self, *args):
        terms = original(self, *args)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(CSDModule, "csd_loss", nan_loss)
    cfg = compose_config(
        "train.yaml",
        ["experiment=csd_quickstart", *tiny_overrides(data_dir), "eval_before_training=false"],
        tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match="step 0"):
        train(cfg)
    assert (tmp_path / "checkpoints" / "nonfinite_step0.ckpt").is_file()


@pytest.mark.slow
def test_wandb_logs_offline_without_credentials(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    overrides = [
        "experiment=csd_quickstart",
        *tiny_overrides(data_dir),
        "logger=wandb",
        "eval_before_training=false",
    ]
    cfg = compose_config("train.yaml", overrides, tmp_path / "run")
    with open_dict(cfg):
        cfg.logger.wandb.name = "offline-test"
    train(cfg)
    import wandb

    wandb.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "W&B did not fall back to offline mode"


@pytest.mark.slow
def test_two_job_multirun_gets_two_run_directories(data_dir, tmp_path):
    result = run_module(
        [
            "-m",
            "src.train",
            "-m",
            "experiment=csd_quickstart",
            "seed=0,1",
            "eval_before_training=false",
            *tiny_overrides(data_dir),
            f"paths.log_dir={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = sorted((tmp_path / "train" / "multiruns").glob("*/*/metrics.json"))
    assert len(metrics) == 2 and metrics[0].parent != metrics[1].parent
    assert all("test/mAP@10" in json.loads(m.read_text()) for m in metrics)
    table = run_module(
        ["experiments/csd_style_retrieval/aggregate.py", str(tmp_path / "train" / "multiruns")]
    )
    assert table.returncode == 0, table.stderr
    assert "seed=0" in table.stdout and "seed=1" in table.stdout and "| mAP@1 |" in table.stdout


@pytest.mark.slow
def test_two_process_cpu_ddp_trains(data_dir, tmp_path):
    result = run_module(
        [
            "-m",
            "src.train",
            "experiment=csd_quickstart",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.sync_batchnorm=false",
            *tiny_overrides(data_dir, devices=2),
            f"paths.log_dir={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "train" / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["test/mAP@10"] <= 1.0
