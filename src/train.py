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
from src.utils.run import (
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job and return its metrics (before/... keys hold the untrained model's scores)."""
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = find_resume_checkpoint(cfg.get("ckpt_path"))
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
