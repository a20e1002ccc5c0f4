"""Which prompts make a text-to-image model copy? `python -m src.detect ckpt_path=<run>` scores every prompt with the
detectors of src/detection/detectors.py and compares the scores with what the model does (docs/detection.md).

Prompts: `prompts=training` takes each training image's prompt (its source is known) and each held-out image's
prompt (never trained on); a .txt / .json file gives other prompts (source unknown).

Ground truth per prompt: `truth.generations` generations (seeded and resumable, in a folder beside the run's
samples), each matched to its nearest training image with the `extractor` (cosine of L2-normalised features). A
generation is a copy when the similarity is at least `truth.threshold` and, for a training prompt, the nearest
image is the prompt's own source (for the other prompts: whichever training image it is). The prompt's copy share
is the share of its generations that are copies; the prompt is memorized when the share is at least
`truth.memorized_share`.

Written to logs/detect/runs/<name>_<time>/: scores.csv (per prompt: source, copy share, memorized, every detector's
score), detectors.csv / detectors.md (per detector: ROC AUC and TPR at 1% FPR with bootstrap intervals, Spearman
correlation with the copy share, milliseconds per prompt and the ratio to one generation), roc.png, scatter.png,
metrics.json; logged to W&B when a run is active.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import src.utils  # noqa: F401  (registers the config resolvers)
from src.detection.run import detect_module
from src.generation import load_module, run_datamodule, run_dir_of
from src.replication.report import log_report_to_wandb
from src.utils.run import (
    claim_run_dir,
    instantiate,
    print_config_tree,
    require_checkpoint,
    resolve_device,
    save_metrics,
)

log = logging.getLogger(__name__)


def detect(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    claim_run_dir(output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    ckpt_path = require_checkpoint(cfg.ckpt_path)
    device = resolve_device(cfg.device)
    module = load_module(ckpt_path, device)
    run_dir = run_dir_of(ckpt_path)
    datamodule = run_datamodule(
        run_dir, "src.detect", "give the folder of a text-to-image `python -m src.train` run"
    )
    settings = OmegaConf.to_container(cfg, resolve=True)
    result = detect_module(
        module, datamodule, settings, output_dir, run_dir / "samples", instantiate(cfg.extractor), device
    )
    result["summary"]["checkpoint"] = str(Path(ckpt_path).resolve())
    save_metrics(result["summary"], output_dir / "metrics.json")
    log_report_to_wandb(output_dir, result["summary"], prefix="detect", table="scores.csv")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="detect.yaml")
def main(cfg: DictConfig) -> None:
    detect(cfg)


if __name__ == "__main__":
    main()
