"""Stop a run on a non-finite loss, with a checkpoint to inspect or resume from."""

import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def stop_on_nonfinite_loss(module: L.LightningModule, loss: torch.Tensor) -> None:
    """Raise NonFiniteLossError naming the step when `loss` is NaN/inf, after saving `nonfinite_step<N>.ckpt`
    (the weights before this step's update) into the run's checkpoint folder."""
    trainer = module.trainer
    # Agree across ranks (any rank non-finite stops all), so that the collective checkpoint save never deadlocks.
    if not trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss).all()), all=False):
        return
    step = trainer.global_step
    folder = Path(trainer.default_root_dir) / "checkpoints"
    path = folder / f"nonfinite_step{step}.ckpt"
    trainer.save_checkpoint(path)
    raise NonFiniteLossError(
        f"Loss is {loss.item()} at step {step}; saved the last finite state to {path}. Lower the learning rate, "
        "use bf16 instead of fp16, or resume with ckpt_path=<that file> after changing the config."
    )
