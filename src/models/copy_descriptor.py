"""Training a copy-detection descriptor with the SSCD recipe (Pizzi et al., CVPR 2022; official
facebookresearch/sscd-copy-detection `sscd/train.py`; docs/replication.md#a-copy-descriptor-trained-here).

Per step: two augmented views of each image (`src.data.copy_views`), mixup / cutmix of a few views, the
embeddings of all processes gathered, then InfoNCE (temperature 0.05) plus `entropy_weight` x the KoLeo
regulariser (30 in SSCD's code and paper). Mixup follows the official `ContrastiveMixup` through Classy Vision:
each view is mixed, with probability `mixup.prob` (0.05), with the view at the mirrored position of the batch
(2B - 1 - i, another image's other view), by mixup or cutmix (half each) with lambda ~ Beta(2, 2) (cutmix's lambda
corrected to the box's area); a mixed view matches both images, so both are its positives and neither is a
negative, and the lambdas do not weight the loss (as in the official code).

Validation and test score copy detection on the planted-copy benchmark (`val/uAP`, `val/recall@p90`, ...).
"""

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

from src.losses import copy_infonce_loss, gather_with_grad, koleo_loss
from src.metrics import copy_detection_metrics
from src.models.csd import gather_scored, gather_uneven
from src.nn.copy_descriptor import CopyDescriptorNet
from src.utils.checkpoints import record_module_class
from src.utils.guards import stop_on_nonfinite_loss


def mix_views(
    images: torch.Tensor, targets: torch.Tensor, prob: float, alpha: float, cutmix_prob: float, rng
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mixup / cutmix of a few views (module docstring); `rng` a numpy Generator.

    images: (V, 3, H, W), V = 2B views (all first views, then all second views); targets (V, T) multi-hot bool.
    Returns the mixed images, targets with the partner's image added to each mixed view, and how many were mixed.
    """
    views = images.shape[0]
    chosen = np.flatnonzero(rng.random(views) < prob)
    if len(chosen) == 0:
        return images, targets, 0
    mixed, new_targets = images.clone(), targets.clone()
    height, width = images.shape[-2:]
    for i in chosen.tolist():
        j = views - 1 - i
        lam = float(rng.beta(alpha, alpha))
        if rng.random() < cutmix_prob:
            cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            mixed[i, :, top:bottom, left:right] = images[j, :, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)  # Classy Vision's correct_lam
        else:
            mixed[i] = lam * images[i] + (1 - lam) * images[j]
        if lam < 1:
            new_targets[i] |= targets[j]
    return mixed, new_targets, len(chosen)


class CopyDescriptorModule(L.LightningModule):
    """Trains `CopyDescriptorNet` (conf/model/copy_descriptor.yaml).

    optimizer: a `_partial_` optimizer config (timm's LARS as SSCD, or AdamW) given every parameter; its `lr` is
    multiplied by global batch / `reference_batch` when `scale_lr` (SSCD: 0.3 per 256 images); keys set to null
    are left out. scheduler: a `_partial_` of `src.models.csd.lr_schedule` (linear warm-up, cosine to `min_lr`).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        dim: int = 128,
        pool_p: float = 3.0,
        temperature: float = 0.05,
        entropy_weight: float = 30.0,
        mixup: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        scale_lr: bool = True,
        reference_batch: int = 256,
        batch_size: int = 64,
        preprocess: dict | None = None,
        copy_thresholds: tuple[float, ...] = (0.5, 0.75, 0.9),
        pretrained: str | None = None,
        input_norm: str = "none",
        output_stride: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if temperature <= 0:
            raise ValueError(f"model.temperature={temperature}: must be positive (SSCD: 0.05).")
        if entropy_weight < 0:
            raise ValueError(
                f"model.entropy_weight={entropy_weight}: must be >= 0 (SSCD: 30; 0 turns KoLeo off)."
            )
        self.net = CopyDescriptorNet(backbone, dim, pool_p, pretrained, input_norm, output_stride)
        self.mixup = dict(mixup or {"prob": 0.0})
        self._mix_rng = None
        self.eval_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch["views"]  # (B, 2, 3, S, S)
        b, rank = views.shape[0], self.global_rank
        images = torch.cat([views[:, 0], views[:, 1]])  # (2B, ...): first views, then second views
        targets = torch.eye(b, dtype=torch.bool, device=images.device).repeat(2, 1)  # (2B, B) local image ids
        mixed = 0
        if self.mixup.get("prob", 0) > 0 and self.training:
            if self._mix_rng is None:  # seeded from torch's RNG (seed_everything), one stream per process
                self._mix_rng = np.random.default_rng([int(torch.randint(1 << 31, (1,))), rank])
            images, targets, mixed = mix_views(
                images,
                targets,
                self.mixup["prob"],
                self.mixup.get("alpha", 2.0),
                self.mixup.get("cutmix_prob", 0.5),
                self._mix_rng,
            )
        rows = self.net(images)
        columns = gather_with_grad(rows)  # (world * 2B, D)
        world = len(columns) // len(rows)
        # Image ids are global: process r's images are columns r*B .. r*B + B - 1 of the target matrix.
        padded = torch.zeros(len(rows), world * b, dtype=torch.bool, device=rows.device)
        padded[:, rank * b : (rank + 1) * b] = targets
        all_targets = gather_uneven(padded)  # itself in one process
        match = (padded.float() @ all_targets.float().T) > 0  # (2B, world * 2B)
        self_index = torch.arange(len(rows), device=rows.device) + rank * len(rows)
        # Each term takes its own rows @ columns.T (2B x world*2B x D, negligible beside the network): sharing one
        # product would change the backward's rounding, and so the published runs' digits.
        infonce = copy_infonce_loss(rows, columns, match, self_index, self.hparams.temperature)
        koleo = koleo_loss(rows, columns, match)
        total = infonce + self.hparams.entropy_weight * koleo
        return {"loss": total, "infonce": infonce.detach(), "koleo": koleo.detach(), "mixed": float(mixed)}

    def training_step(self, batch: dict, batch_idx: int):
        if "views" not in batch:  # every image of the batch was unreadable
            self.log("train/skipped_images", float(batch["num_skipped"]), reduce_fx="sum")
            return None
        terms = self.loss(batch)
        stop_on_nonfinite_loss(self, terms["loss"])
        self.log_dict({f"train/{k}": float(v) for k, v in terms.items() if k != "loss"})
        self.log("train/loss", terms["loss"].detach(), prog_bar=True)
        if batch.get("num_skipped"):
            self.log("train/skipped_images", float(batch["num_skipped"]), reduce_fx="sum")
        return terms["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        global_batch = hp.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        scale = global_batch / hp.reference_batch if hp.scale_lr else 1.0
        # keys set to null are left out, so an experiment can swap LARS for an optimizer without its options
        optimizer_cfg = {k: v for k, v in dict(hp.optimizer).items() if v is not None}
        lr = optimizer_cfg.pop("lr") * scale
        optimizer = instantiate(optimizer_cfg, _convert_="all")(self.parameters(), lr=lr)
        scheduler = instantiate(hp.scheduler, _convert_="all")(
            optimizer, self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- copy-detection evaluation on the planted copies ----------------------------------------------------
    def _eval_step(self, batch: dict) -> None:
        if "image" in batch:
            self.eval_outputs.append((self.net(batch["image"]).float(), batch["index"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._score("val", self.trainer.datamodule.val_set)

    def on_test_epoch_end(self) -> None:
        self._score("test", self.trainer.datamodule.test_set)

    def _score(self, stage: str, rset) -> None:
        outputs, self.eval_outputs = self.eval_outputs, []
        if not outputs or self.trainer.sanity_checking:
            return
        embeddings, indices = (x.cpu() for x in gather_scored(outputs))
        labels = torch.cat([rset.query_labels, rset.database_labels])[indices]
        is_query = indices < len(rset.query)
        metrics = copy_detection_metrics(
            embeddings[is_query],
            embeddings[~is_query],
            labels[is_query],
            labels[~is_query],
            thresholds=tuple(self.hparams.copy_thresholds),
            bootstrap=0,
        )
        self.log_dict({f"{stage}/{k}": float(v) for k, v in metrics.items()}, rank_zero_only=False)

    on_save_checkpoint = record_module_class
