"""Attack a trained diffusion checkpoint: `python -m src.attack attack=extraction ckpt_path=<run> attack.edge_threshold=0.1`.

attack=extraction (generate and filter) and attack=adaptive (the adaptive-distance score) look for training
images the model reproduces; attack=loss | secmi | pia are membership inference attacks, members being the run's
training subset and non-members its held-out control images (docs/attacks.md). The run folder of the checkpoint
supplies the training set, its transform and captions. Generations are kept beside the training run's other
samples (<run>/samples/attack_<sampler><steps>_seed<seed>/, or `attack.generations=<folder>`), in
folders keyed by weights and settings (src/generation.py), so an interrupted attack resumes by running the same
command again and only the missing images are generated.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import src.utils  # noqa: F401  (registers the config resolvers)
from src.attacks.run import MEMBERSHIP_ATTACKS, attack_module, default_generations, flat_numbers
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


def attack(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    claim_run_dir(output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    options = OmegaConf.to_container(cfg.attack, resolve=True)
    ckpt_path = require_checkpoint(cfg.ckpt_path)
    device = resolve_device(cfg.device)
    module = load_module(ckpt_path, device)
    datamodule = None
    if options["name"] not in MEMBERSHIP_ATTACKS:
        datamodule = run_datamodule(
            run_dir_of(ckpt_path),
            f"attack={options['name']}",
            "attack a checkpoint that lies in its training run folder",
        )
    extractor = instantiate(cfg.duplicates) if options.get("prompts") == "duplicated" else None
    summary = attack_module(
        module,
        datamodule,
        options,
        output_dir,
        run_dir_of(ckpt_path),
        generations=default_generations(run_dir_of(ckpt_path), module, options),
        duplicates_extractor=extractor,
        device=device,
    )
    summary["checkpoint"] = str(Path(ckpt_path).resolve())
    metrics = flat_numbers(summary)
    save_metrics(metrics, output_dir / "metrics.json")
    log_report_to_wandb(output_dir, metrics, prefix=f"attack/{options['name']}")
    log.info(f"Attack {options['name']}: report in {output_dir}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="attack.yaml")
def main(cfg: DictConfig) -> None:
    attack(cfg)


if __name__ == "__main__":
    main()
