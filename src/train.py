"""Training entry point: `python -m src.train experiment=csd_quickstart` (any Hydra override; `-m` for sweeps).

Prints the resolved config, seeds, builds data, model, callbacks, loggers and trainer, scores the untrained model,
fits, tests, writes `metrics.json` in the run directory and returns the metric a sweeper optimises.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import rich
import rich.table
from omegaconf import DictConfig, OmegaConf

import src.utils  # noqa: F401  (registers the config resolvers)
from src.utils.checkpoints import expect_module, load_checkpoint
from src.utils.checks import check_number
from src.utils.run import (
    claim_run_dir,
    find_resume_checkpoint,
    instantiate_callbacks,
    instantiate_loggers,
    print_config_tree,
    save_metrics,
    to_float_dict,
)

log = logging.getLogger(__name__)


def print_before_after(before: dict, after: dict) -> None:
    """A table of every metric scored before and after training."""
    table = rich.table.Table(title="Retrieval before / after training")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right")
    for key in sorted(set(before) | set(after)):
        table.add_row(key, *(f"{d[key]:.4f}" if key in d else "-" for d in (before, after)))
    rich.print(table)


# Numeric trainer options: (key, lowest value, integer only, None allowed); Lightning's own errors for these
# come late (after data and model are built) or as a TypeError from a comparison.
TRAINER_NUMBERS = (
    ("max_steps", -1, True, False),
    ("max_epochs", -1, True, True),
    ("min_steps", 0, True, True),
    ("min_epochs", 0, True, True),
    ("accumulate_grad_batches", 1, True, False),
    ("log_every_n_steps", 1, True, False),
    ("check_val_every_n_epoch", 1, True, True),
    ("num_sanity_val_steps", -1, True, True),
    ("gradient_clip_val", 0, False, True),
)


def check_trainer_options(trainer_cfg: DictConfig) -> None:
    """ValueError naming `trainer.<key>` for a numeric Trainer option out of range (or not a number)."""
    for key, low, integer, allow_none in TRAINER_NUMBERS:
        if key in trainer_cfg:
            check_number(f"trainer.{key}", trainer_cfg[key], low=low, integer=integer, allow_none=allow_none)
    for key in ("val_check_interval", "limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if trainer_cfg.get(key) is not None:
            check_number(f"trainer.{key}", trainer_cfg[key], low=0)


def check_resume_checkpoint(ckpt_path: str, model_target: str) -> None:
    """CheckpointError when `ckpt_path` is not a readable checkpoint of the module this run builds."""
    expected = model_target.rsplit(".", 1)[-1]
    make = "resume from a run of the same kind of model, or drop ckpt_path to start a new run"
    checkpoint = load_checkpoint(ckpt_path, "ckpt_path", make=make, mmap=True)
    expect_module(checkpoint, ckpt_path, (expected,), make=make)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job and return its metrics (before/... keys hold the untrained model's scores)."""
    output_dir = Path(cfg.paths.output_dir)
    check_trainer_options(cfg.trainer)
    ckpt_path = find_resume_checkpoint(cfg.get("ckpt_path"))
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, cfg.model._target_)
    claim_run_dir(output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    if cfg.get("eval_before_training") and ckpt_path is None:
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({f"before/{k}": v for k, v in to_float_dict(trainer.callback_metrics).items()})
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(to_float_dict(trainer.callback_metrics))
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(to_float_dict(trainer.callback_metrics))

    if trainer.is_global_zero:
        save_metrics(metrics, output_dir / "metrics.json")
        before = {k.removeprefix("before/"): v for k, v in metrics.items() if k.startswith("before/test/")}
        after = {k: v for k, v in metrics.items() if k.startswith("test/")}
        if before or after:
            print_before_after(
                {k.removeprefix("test/"): v for k, v in before.items()},
                {k.removeprefix("test/"): v for k, v in after.items()},
            )
        log.info(f"Run directory: {output_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        metrics = train(cfg)
    finally:
        wandb = sys.modules.get("wandb")  # imported only when a W&B logger was used
        if (
            wandb is not None and wandb.run is not None
        ):  # close it so the next job of a multirun starts its own
            wandb.finish()
    metric = cfg.get("optimized_metric")
    if metric and metric not in metrics:
        log.warning(f"optimized_metric={metric!r} was not logged; available: {sorted(metrics)}")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
