"""End a text-to-image training run by scoring its prompts with the detectors of memorized prompts
(docs/detection.md), as it ends with its replication report: `callbacks.detect.detectors=[noise_norm,
score_anisotropy]`, other keys of conf/detect.yaml in `callbacks.detect.settings`."""

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from src.attacks.run import flat_numbers
from src.detection.run import detect_module

log = logging.getLogger(__name__)

DETECT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "detect.yaml"
SETTING_KEYS = ("prompts", "detectors", "seed", "batch_size", "use_ema", "bootstrap", "options")


def detect_settings(detectors: list[str], settings: dict | None) -> dict:
    """The settings of conf/detect.yaml (the keys of `SETTING_KEYS`) with `settings` merged in and `detectors`;
    ValueError naming the keys it does not know."""
    unknown = sorted(set(settings or {}) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(
            f"callbacks.detect.settings: unknown keys {unknown}; known: {', '.join(SETTING_KEYS)}"
        )
    base = OmegaConf.load(DETECT_CONFIG)
    chosen = OmegaConf.create({key: base[key] for key in SETTING_KEYS})
    merged = OmegaConf.to_container(OmegaConf.merge(chosen, settings or {}), resolve=True)
    merged["detectors"] = list(detectors)
    return merged


class DetectAtEnd(Callback):
    """When training ends, score the run's prompts with `detectors` (none: nothing runs) and write the report to
    `<run>/detection/`; the numbers are logged as `detect/<key>` and land in metrics.json. `extractor`: the ground
    truth's copy detector (a config with `_target_`; default the raw-pixel one)."""

    def __init__(
        self, detectors: list[str] | None = None, settings: dict | None = None, extractor: dict | None = None
    ):
        self.detectors = list(detectors or [])
        self.settings = detect_settings(self.detectors, settings) if self.detectors else None
        self.extractor = dict(extractor or {"_target_": "src.nn.extractors.PixelExtractor", "size": 32})

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.detectors or not trainer.is_global_zero or getattr(trainer, "fast_dev_run", False):
            return
        run_dir = Path(trainer.default_root_dir)
        result = detect_module(
            pl_module,
            trainer.datamodule,
            self.settings,
            run_dir / "detection",
            run_dir / "samples",
            instantiate(self.extractor),
            pl_module.device,
        )
        metrics = {f"detect/{k}": v for k, v in flat_numbers(result["summary"]).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items() if v is not None})
