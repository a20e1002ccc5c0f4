"""Helpers for the Hydra entry points: printing the config, building loggers and callbacks, saving metrics."""

import json
import logging
import math
import netrc
import os
from pathlib import Path

import hydra
import rich.syntax
import rich.tree
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    """Print the resolved config as a rich tree (one branch per top-level group) and optionally save it as YAML."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        Path(save_to).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def wandb_has_credentials() -> bool:
    """True when W&B could authenticate: an API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Build the loggers of `cfg.logger`. W&B falls back to offline mode when it has no credentials, so a run
    never blocks on a login prompt or fails for lack of network (`wandb sync` uploads the run later)."""
    loggers: list[Logger] = []
    if not cfg:
        return loggers
    for name, logger_cfg in cfg.items():
        if not isinstance(logger_cfg, DictConfig) or "_target_" not in logger_cfg:
            continue
        if "WandbLogger" in logger_cfg._target_:
            if (
                os.environ.get("WANDB_MODE") is None
                and not wandb_has_credentials()
                and not logger_cfg.get("offline")
            ):
                log.warning(
                    "No W&B credentials found (WANDB_API_KEY or `wandb login`): logging offline. "
                    "Upload later with `wandb sync <run dir>/wandb/offline-run-*`."
                )
                logger_cfg = OmegaConf.merge(logger_cfg, {"offline": True})
            Path(logger_cfg.save_dir).mkdir(parents=True, exist_ok=True)
        log.info(f"Instantiating logger <{name}: {logger_cfg._target_}>")
        loggers.append(hydra.utils.instantiate(logger_cfg))
    return loggers


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Build every callback of `cfg.callbacks` that has a `_target_` (a null entry switches one off)."""
    callbacks: list[Callback] = []
    for name, cb_cfg in (cfg or {}).items():
        if isinstance(cb_cfg, DictConfig) and "_target_" in cb_cfg:
            log.info(f"Instantiating callback <{name}: {cb_cfg._target_}>")
            callbacks.append(hydra.utils.instantiate(cb_cfg))
    return callbacks


def to_float_dict(metrics: dict) -> dict[str, float]:
    """Tensors and numbers to plain floats (for JSON); non-numeric values are dropped."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def save_metrics(metrics: dict, path: str | Path) -> None:
    """Write metrics as JSON (NaN and inf written as null so every JSON reader accepts the file)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    Path(path).write_text(json.dumps(clean, indent=2, sort_keys=True))


def find_resume_checkpoint(ckpt_path: str | None) -> str | None:
    """Resolve `ckpt_path`: a checkpoint file, or a run directory whose `checkpoints/last.ckpt` is used."""
    if ckpt_path in (None, ""):
        return None
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no checkpoint there. Pass a .ckpt file or a run directory that holds "
            "checkpoints/last.ckpt (e.g. ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt)."
        )
    return str(path)


def require_checkpoint(ckpt_path: str | None) -> str:
    """`find_resume_checkpoint` for the entry points that read a trained model: ValueError when none is given."""
    resolved = find_resume_checkpoint(ckpt_path)
    if resolved is None:
        raise ValueError("ckpt_path is required: a .ckpt inside a training run folder, or the run folder")
    return resolved


# What every run leaves in its folder: the config that the entry point saves first, and the checkpoints.
RUN_MARKERS = ("config_resolved.yaml", "checkpoints")


def found_run(folder, markers=RUN_MARKERS) -> str | None:
    """The first of `markers` present in `folder`, or None when the folder holds no run."""
    folder = Path(folder)
    return next((name for name in markers if (folder / name).exists()), None)


def refusal(folder, marker: str) -> str:
    return (
        f"run folder '{folder}' already holds a run (it has {marker}); a run never writes into another run's "
        f"folder, which would mix their metrics, configs and checkpoints. To continue that run, resume it with "
        f"ckpt_path={folder} (the resumed run gets a folder of its own); for a new run, leave hydra.run.dir "
        "unset (each run gets a new timestamped folder) or give a folder that does not exist yet."
    )


def launched_as_another_rank() -> bool:
    """True in the processes a distributed launch adds (Lightning's DDP children, SLURM tasks): they join the run
    folder that rank 0 claimed."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def distributed_part() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else RANK / WORLD_SIZE (torchrun), else
    (0, 1): the default part of work that sharded extraction and sampling take."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def claim_run_dir(output_dir) -> None:
    """FileExistsError when `output_dir` already holds a run (RUN_MARKERS); called by every entry point before
    it writes anything, so a call from Python is refused like one from the command line. Processes of another
    rank than 0 join the folder that rank 0 claimed."""
    if launched_as_another_rank():
        return
    marker = found_run(output_dir)
    if marker:
        raise FileExistsError(refusal(output_dir, marker))


class RefuseExistingRunDir(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): refuses a `hydra.run.dir` or `hydra.sweep.dir` that already
    holds a run before Hydra writes its own files (.hydra/, the log) into it. Hydra turns exceptions raised by
    callbacks into warnings, so the refusal exits (SystemExit, status 1) with the message."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if launched_as_another_rank():
            return
        # A run dir named after a config choice (${hydra:runtime.choices.extractor}) resolves through HydraConfig,
        # which Hydra sets only after this callback; set it now (Hydra sets the same config again).
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        folder = Path(config.hydra.run.dir)
        marker = found_run(folder, (".hydra", *RUN_MARKERS))
        if marker:
            raise SystemExit(f"Error: {refusal(folder, marker)}")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir)
        if not folder.is_dir():
            return
        for job in sorted(p for p in folder.iterdir() if p.is_dir()):
            marker = found_run(job, (".hydra", *RUN_MARKERS))
            if marker:
                raise SystemExit(
                    f"Error: sweep folder '{folder}' already holds runs ({job.name}/{marker}); a sweep never writes "
                    "into another sweep's folder. Leave hydra.sweep.dir unset or give a new folder."
                )


def instantiate(node, **kwargs):
    """`hydra.utils.instantiate`, raising the constructor's own error (which names the file or key at fault)
    instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError)):
            raise error.__cause__ from None
        raise


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; any other value is a torch device string. Under torchrun
    (LOCAL_RANK set) `auto` and `cuda` are this process's GPU, cuda:<LOCAL_RANK>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return torch.device(name)
