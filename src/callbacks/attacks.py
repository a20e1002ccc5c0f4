"""End a diffusion training run with attacks on the model it trained (docs/attacks.md), as it ends with its
replication report: `callbacks.attacks.names=[loss,pia,extraction] callbacks.attacks.options={extraction:
{edge_threshold: 0.1}}`."""

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from src.attacks.run import attack_module, flat_numbers

log = logging.getLogger(__name__)

ATTACK_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "attack"


def attack_options(name: str, overrides: dict | None = None) -> dict:
    """conf/attack/<name>.yaml with `overrides` merged in; ValueError naming the attacks there for another
    name."""
    path = ATTACK_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in ATTACK_CONFIGS.glob("*.yaml"))
        raise ValueError(f"callbacks.attacks.names: unknown attack {name!r}; expected one of {known}")
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), overrides or {}), resolve=True)


class AttacksAtEnd(Callback):
    """When training ends, run each attack of `names` (with the defaults of conf/attack/<name>.yaml, updated by
    `options[name]`) on the trained module and its datamodule. Reports go to `<run>/attacks/<name>/`; the numbers
    are logged as `attack/<name>/<key>` and land in metrics.json."""

    def __init__(self, names: list[str] | None = None, options: dict | None = None):
        self.names = list(names or [])
        options = dict(options or {})
        self.options = {name: attack_options(name, options.pop(name, None)) for name in self.names}
        if options:
            raise ValueError(
                f"callbacks.attacks.options names attacks not in callbacks.attacks.names: {sorted(options)}"
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.names or not trainer.is_global_zero or getattr(trainer, "fast_dev_run", False):
            return
        run_dir = Path(trainer.default_root_dir)
        metrics = {}
        for name in self.names:
            out = run_dir / "attacks" / name
            summary = attack_module(
                pl_module, trainer.datamodule, self.options[name], out, run_dir, device=pl_module.device
            )
            metrics.update({f"attack/{name}/{k}": v for k, v in flat_numbers(summary).items()})
            log.info(f"attack {name}: report in {out}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items() if v is not None})
