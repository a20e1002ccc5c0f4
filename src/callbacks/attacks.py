"""End a diffusion training run with attacks on the model it trained (docs/attacks.md), as it ends with its
replication report: `callbacks.attacks.names=[loss,pia,extraction] callbacks.attacks.options={extraction:
{edge_threshold: 0.1}}`. A name `extraction:rna` runs the extraction attack on generations made with an
inference-time mitigation (the options of `extraction` apply to it too)."""

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from src.attacks.run import attack_module, default_generations, flat_numbers

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
        bases = {name.partition(":")[0] for name in self.names}
        unknown = sorted(set(options) - bases)
        if unknown:
            raise ValueError(
                f"callbacks.attacks.options names attacks not in callbacks.attacks.names: {unknown}"
            )
        self.options = {}
        for name in self.names:
            base, _, mitigation = name.partition(":")
            self.options[name] = attack_options(base, options.get(base))
            if mitigation:
                self.options[name]["inference_mitigation"] = mitigation

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.names or not trainer.is_global_zero or getattr(trainer, "fast_dev_run", False):
            return
        run_dir = Path(trainer.default_root_dir)
        metrics = {}
        for name in self.names:
            tag, options = name.replace(":", "_"), self.options[name]
            summary = attack_module(
                pl_module,
                trainer.datamodule,
                options,
                run_dir / "attacks" / tag,
                run_dir,
                generations=default_generations(run_dir, pl_module, options),
                device=pl_module.device,
            )
            metrics.update({f"attack/{tag}/{k}": v for k, v in flat_numbers(summary).items()})
            log.info(f"attack {name}: report in {run_dir / 'attacks' / tag}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items() if v is not None})
