"""The training entry point end to end: every experiment config, resume, sweeps, DDP, loggers and failure modes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from src.train import train
from tests.conftest import CONF, ROOT, compose_config, tiny_diffusion_overrides, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def run_module(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def train_cli(
    *overrides: str, data_dir: Path, log_dir: Path, devices: int = 1
) -> subprocess.CompletedProcess:
    """`python -m src.train <overrides>` on the tiny benchmark, logging under log_dir."""
    tiny = [*tiny_overrides(data_dir, devices=devices), f"paths.log_dir={log_dir}"]
    return run_module(["-m", "src.train", *overrides, *tiny])


def test_csd_vitl_has_the_paper_hyperparameters(tmp_path):
    cfg = compose_config("train.yaml", ["experiment=csd_vitl"], tmp_path)
    model = cfg.model
    assert (model.backbone.name, model.backbone.source, model.backbone.pretrained) == (
        "ViT-L-14",
        "open_clip",
        "openai",
    )
    assert model.optimizer._target_ == "torch.optim.SGD" and model.optimizer.momentum == 0.9
    assert (model.optimizer.lr, model.lr_backbone, model.optimizer.weight_decay) == (0.003, 1e-4, 1e-4)
    assert model.scale_lr and model.reference_batch == 256
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


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """train.yaml composed in this process with its `hydra` node (sweeper, launcher), as the command line
    would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("train.yaml", overrides, return_hydra_config=True)


def test_unknown_experiment_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose_with_hydra(["experiment=does_not_exist"])
    listed = str(error.value).split("Available options in 'experiment':")[1].split("Config search path")[0]
    assert listed.split() == EXPERIMENTS  # conf/experiment/base/ (what experiments share) is not listed


@pytest.mark.parametrize(
    ("experiment", "search", "target"),
    [
        ("csd_quickstart", "hparams_search=csd_optuna", "sweeper"),
        ("csd_quickstart", "hydra/launcher=slurm", "launcher"),
        ("csd_quickstart", "+sweep=csd_lambda", "params"),
        ("csd_quickstart", "+sweep=csd_temperature", "params"),
        ("csd_quickstart", "+sweep=csd_init", "params"),
        ("ddpm_quickstart", "+sweep=ddpm_quickstart_subsets", "params"),
        ("ddpm_celebahq", "+sweep=ddpm_celebahq_subsets", "params"),
        ("ddpm_quickstart", "+sweep=extraction_subsets", "params"),
        ("ddpm_quickstart", "+sweep=extraction_architecture", "params"),
        ("ddpm_celebahq", "+sweep=extraction_architecture_celebahq", "params"),
        ("t2i_mitigations", "+sweep=extraction_mitigations", "params"),
        ("t2i_mitigations", "+sweep=memorization_detection", "params"),
        ("t2i_mitigations", "+sweep=memorization_mitigation_settings", "params"),
    ],
)
def test_sweep_and_launcher_configs_compose(experiment, search, target):
    hydra_cfg = compose_with_hydra([f"experiment={experiment}", search]).hydra
    if target == "sweeper":
        assert "optuna" in hydra_cfg.sweeper._target_ and hydra_cfg.sweeper.params
    elif target == "launcher":
        assert "submitit" in hydra_cfg.launcher._target_
    else:
        assert hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweeper.params


def test_study_sweeps_give_each_arm_its_own_work():
    """The unmitigated arm alone is attacked (extraction) or generated (detection) through every inference
    mitigation; the other arms only plainly."""
    names = {
        arm: compose_with_hydra(
            ["experiment=t2i_mitigations", "+sweep=extraction_mitigations", f"+ablation={arm}"]
        ).callbacks.attacks.names
        for arm in ("none", "mc", "rc")
    }
    assert names["mc"] == names["rc"] == ["extraction", "loss", "pian"]
    assert names["none"] == [
        "extraction",
        *(f"extraction:{m}" for m in ("gni", "rt", "cwr", "rna")),
        "loss",
        "pian",
    ]
    for duplication, count in (("nodup", 7), ("dup_image", 0)):
        cfg = compose_with_hydra(
            ["experiment=t2i_mitigations", "+sweep=memorization_detection", f"data.duplication={duplication}"]
        )
        assert len(cfg.callbacks.replication.inference_mitigations) == count
        assert (
            cfg.run_name == f"memorization_detection_{duplication}"
            and len(cfg.callbacks.detect.detectors) == 6
        )
    settings = compose_with_hydra(
        ["experiment=t2i_mitigations", "+sweep=memorization_mitigation_settings"]
    ).callbacks.replication.inference_mitigations
    assert [m.name for m in settings] == ["prompt_embedding"] * 2 + ["delayed_guidance"] * 2
    assert len({m.label for m in settings}) == 4 and all(m.per_generation for m in settings[:2])


def test_two_settings_of_one_mitigation_need_their_own_labels():
    from src.callbacks.diffusion import ReplicationAnalysis

    settings = [{"name": "gni", "lam": 0.1}, {"name": "gni", "lam": 0.5}]
    with pytest.raises(ValueError, match=r"\['gni'\] appear more than once.*label"):
        ReplicationAnalysis(None, inference_mitigations=settings)
    ReplicationAnalysis(None, inference_mitigations=[settings[0], {**settings[1], "label": "gni_strong"}])


def check_csd_run(run_dir: Path, metrics: dict) -> None:
    for key in ("before/test/mAP@10", "test/mAP@10", "val/mAP@10", "test/recall@1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "galleries").glob("test_*.png")), "no retrieval gallery was drawn"
    assert (run_dir / "embeddings" / "test.npz").is_file()


def check_copy_run(run_dir: Path, metrics: dict) -> None:
    for key in ("before/test/uAP", "test/uAP", "val/uAP", "test/recall@p90", "train/koleo"):
        assert 0.0 <= metrics[key] <= 1.0 or key == "train/koleo", key
    assert metrics["test/num_queries"] > metrics["test/num_with_copy"] > 0  # planted copies and negatives
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def check_ddpm_run(run_dir: Path, metrics: dict) -> None:
    for target in ("train", "control"):
        assert 0.0 <= metrics[f"replication/{target}/sim_gt_thr"] <= 1.0
        assert (run_dir / "replication" / target / "report.json").is_file()
    assert len(list((run_dir / "samples" / "final").glob("*.png"))) == 6
    assert (run_dir / "replication" / "train_vs_control.png").is_file()
    assert list((run_dir / "samples").glob("grid_step*.png")), "no sample grid was drawn"
    index = json.loads((run_dir / "subset_index.json").read_text())
    assert len(index["train"]) == 8 and len(index["control"]) == 8
    assert json.loads((run_dir / "metrics.json").read_text())["replication/train/sim_95pc"] == pytest.approx(
        metrics["replication/train/sim_95pc"]
    )


def check_t2i_run(run_dir: Path, metrics: dict) -> None:
    assert 0.0 <= metrics["replication/train/sim_gt_thr"] <= 1.0
    prompts = json.loads((run_dir / "samples" / "final" / "prompts.json").read_text())
    assert len(prompts) == 6 and all(prompts.values())
    assert (run_dir / "captions_fed.csv").is_file() and (run_dir / "sampling_weights.json").is_file()
    report = json.loads((run_dir / "replication" / "train" / "report.json").read_text())
    assert report["counts"]["generated"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_few_cpu_steps(experiment, tiny_run):
    """Each experiment config composes and trains two CPU steps with the tiny overrides of its kind (read
    from the model's class), then leaves what its kind promises: retrieval scores, galleries and embeddings
    for CSD; generations and a replication analysis for diffusion."""
    run = tiny_run(experiment)
    assert torch.isfinite(torch.tensor(run.metrics["train/loss"]))
    {"csd": check_csd_run, "ddpm": check_ddpm_run, "t2i": check_t2i_run, "copy": check_copy_run}[run.kind](
        run.run_dir, run.metrics
    )


@pytest.mark.slow
def test_diffusion_resume_keeps_the_subset_and_refuses_another(data_dir, tiny_run, tmp_path):
    first = tiny_run("ddpm_quickstart").run_dir
    first_index = json.loads((first / "subset_index.json").read_text())
    overrides = [
        "experiment=ddpm_quickstart",
        *tiny_diffusion_overrides(data_dir),
        "callbacks.replication=null",
    ]
    resumed = [*overrides, "trainer.max_steps=4", f"ckpt_path={first}"]
    train(compose_config("train.yaml", resumed, tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert json.loads((tmp_path / "b" / "subset_index.json").read_text())["train"] == first_index["train"]
    other = [*resumed, "data.subset_size=9"]
    with pytest.raises(ValueError, match="subset_size=8.*subset_size=9"):
        train(compose_config("train.yaml", other, tmp_path / "c"))


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(data_dir, tiny_run, tmp_path):
    first = tiny_run("csd_quickstart").run_dir
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    second = compose_config(
        "train.yaml",
        [
            "experiment=csd_quickstart",
            *tiny_overrides(data_dir),
            "trainer.max_steps=4",
            f"ckpt_path={first}",
        ],
        tmp_path,
    )
    train(second)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_resume_with_another_backbone_says_which(data_dir, tiny_run, tmp_path):
    first = tiny_run("csd_quickstart").run_dir
    cfg = compose_config(
        "train.yaml",
        [
            "experiment=csd_quickstart",
            *tiny_overrides(data_dir),
            "trainer.max_steps=4",
            "model.backbone.name=resnet18",
            f"ckpt_path={first}",
        ],
        tmp_path,
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
        "test=false",
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
    overrides = ["-m", "experiment=csd_quickstart", "seed=0,1", "eval_before_training=false"]
    result = train_cli(*overrides, data_dir=data_dir, log_dir=tmp_path)
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
    overrides = [
        "experiment=csd_quickstart",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.sync_batchnorm=false",
    ]
    result = train_cli(*overrides, data_dir=data_dir, log_dir=tmp_path, devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "train" / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["test/mAP@10"] <= 1.0
