"""CSD training: multi-label contrastive style loss + self-supervised views (docs/style.md#overview; official
CSD/train_csd.py).

Faithful to the official code by default, with the paper's variants as options:
- loss = lam_sup · L_sup + lambda_ssl · L_ssl + lambda_c · L_content with lam_sup = 5, lambda_ssl = 1, τ = 0.1,
  base temperature 1.0 (the paper's λ = lambda_ssl / lam_sup = 0.2);
  L_sup uses the first view as anchor and a count-valued label mask (`loss.label_mask=binary` is the paper's indicator).
- SGD with backbone / head parameter groups, linear LR scaling by global batch / 256, weight decay on backbone
  weights only, constant-with-warmup or cosine schedule, per-parameter gradient clipping (DINO style). The
  optimizer and the schedule are `_partial_` configs (conf/model/csd.yaml), given the groups here.
- the contrastive batch is gathered across GPUs with gradients flowing through the gather (`--use_distributed_loss`).
"""

import math

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate

from src.losses import binary_label_mask, count_label_mask, dann_alpha, gather_with_grad, supcon_loss
from src.metrics import retrieval_metrics, retrieval_topk
from src.nn.backbones import build_backbone
from src.nn.csd import CSDNet
from src.utils.checkpoints import record_module_class
from src.utils.guards import stop_on_nonfinite_loss

LOSS_KEYS = (
    "temperature",
    "base_temperature",
    "lam_sup",
    "lambda_ssl",
    "lambda_c",
    "label_mask",
    "adversarial",
    "clamp_content_loss",
    "gather",
)
SCHEDULES = ("constant", "constant_with_warmup", "cosine")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at `step`: linear warmup from 0, then constant or cosine down to `min_ratio`."""
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, name: str, warmup_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """CSD's learning-rate schedule, stepped once per optimizer step: `lr_factor` of each parameter group's own
    learning rate, the cosine ending at `min_lr` for every group. The `model.scheduler` config is a `_partial_` of
    this function."""
    if name not in SCHEDULES:
        raise ValueError(f"model.scheduler.name={name!r}: expected one of {SCHEDULES}.")
    factors = [
        lambda step, base=group["lr"]: lr_factor(step, name, warmup_steps, total_steps, min_lr / base)
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def clip_gradients_per_parameter(parameters, max_norm: float) -> None:
    """Scale each parameter's gradient to L2 norm <= max_norm on its own (DINO's `clip_gradients`, used by CSD)."""
    for p in parameters:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose first dimension differs between ranks (no gradient); identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    padded = torch.zeros((int(max(sizes)), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


def gather_scored(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (embeddings, dataset indices) batches of an evaluation, gathered over every rank, sorted by index, one
    row per index (Lightning's distributed sampler repeats a few samples to even out the ranks)."""
    embeddings = gather_uneven(torch.cat([e for e, _ in outputs]))
    indices = gather_uneven(torch.cat([i for _, i in outputs]))
    order = torch.argsort(indices, stable=True)
    indices, embeddings = indices[order], embeddings[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return embeddings[keep], indices[keep]


class CSDModule(L.LightningModule):
    """Trains a CSD style descriptor and scores it by query/database style retrieval.

    loss: the loss weights and options of LOSS_KEYS (conf/model/csd.yaml). optimizer: a `_partial_` optimizer
    config whose `lr` is the heads' learning rate; lr_backbone is the backbone's, both times global batch /
    reference_batch when `scale_lr`; the optimizer's `weight_decay` acts on backbone weights only. scheduler: a
    `_partial_` config of `lr_schedule`.

    Validation and test batches hold query images then database images of the datamodule's `val_set` /
    `test_set` (`index < len(set.query)` marks a query); embeddings are gathered over all ranks and scored with
    `retrieval_metrics`. The last scored retrieval is kept in `self.last_retrieval` for callbacks (gallery, saving).
    """

    def __init__(
        self,
        backbone: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict,
        lr_backbone: float,
        scale_lr: bool,
        reference_batch: int,
        embed_dim: int | None = None,
        content_head: str = "copy",
        clip_grad: float | None = 3.0,
        freeze_heads_steps: int = 0,
        batch_size: int = 64,
        eval_ks: tuple[int, ...] = (1, 10, 100),
        preprocess: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        missing = [key for key in LOSS_KEYS if key not in loss]
        if missing:
            raise ValueError(f"model.loss lacks {missing}: conf/model/csd.yaml lists every loss key.")
        self.loss_cfg = dict(loss)
        if loss["label_mask"] not in ("count", "binary"):
            raise ValueError(f"model.loss.label_mask={loss['label_mask']!r}: expected 'count' or 'binary'.")
        if not loss["adversarial"] and loss["lambda_c"] > 0 and loss["clamp_content_loss"] is None:
            raise ValueError(
                "model.loss.adversarial=false negates the content loss, which is unbounded below: "
                "set model.loss.clamp_content_loss (e.g. 3.0)."
            )
        self.net = CSDNet(build_backbone(**backbone), embed_dim, content_head)
        if (
            loss["lambda_c"] == 0
        ):  # the content branch is off (official default): keep DDP free of unused params
            self.net.content_head.requires_grad_(False)
        self.eval_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_retrieval: dict | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, P) L2-normalised style descriptors."""
        return self.net.embed(images)

    # ---- training ------------------------------------------------------------------------------------------
    def csd_loss(self, style: torch.Tensor, content: torch.Tensor | None, labels: torch.Tensor) -> dict:
        """Loss terms on (possibly gathered) embeddings: style (B, V, P), content (B, V, P) or None, labels (B, L)."""
        c = self.loss_cfg
        temps = {"temperature": c["temperature"], "base_temperature": c["base_temperature"]}
        ssl = supcon_loss(style[:, :2], None, **temps)  # SimCLR over the two geometric views
        mask = count_label_mask(labels) if c["label_mask"] == "count" else binary_label_mask(labels)
        sup = supcon_loss(style[:, :1], mask, **temps)  # first view is the anchor (official code)
        terms = {"loss_ssl": ssl, "loss_sup": sup}
        total = c["lam_sup"] * sup + c["lambda_ssl"] * ssl
        if content is not None:
            content_loss = supcon_loss(content[:, [0, -1]], None, **temps)  # plain vs photometric view
            if c["clamp_content_loss"] is not None:
                content_loss = content_loss.clamp(max=c["clamp_content_loss"])
            if not c["adversarial"]:
                content_loss = -content_loss
            terms["loss_content"] = content_loss
            total = total + c["lambda_c"] * content_loss
        terms["loss"] = total
        return terms

    def reversal_alpha(self) -> float | None:
        """DANN coefficient of the gradient reversal in front of the content head at this step (None: the content
        loss is negated instead, `loss.adversarial=false`)."""
        if not self.loss_cfg["adversarial"]:
            return None
        return dann_alpha(self.global_step / max(1, self.trainer.estimated_stepping_batches))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms (`csd_loss`: loss_ssl, loss_sup, loss_content when lambda_c > 0, and their weighted sum
        `loss`) of views `batch["images"]` (B, V, 3, H, W) with multi-hot labels `batch["labels"]` (B, L); the
        embeddings are gathered across GPUs first when `loss.gather`."""
        images, labels = batch["images"], batch["labels"].float()
        with_content = self.loss_cfg["lambda_c"] > 0
        if with_content and images.shape[1] < 3:
            raise ValueError("model.loss.lambda_c > 0 needs the photometric view: set data.content_view=true")
        alpha = self.reversal_alpha() if with_content else None
        _, style, content = self.net(images.flatten(0, 1), with_content=with_content, reverse_alpha=alpha)
        style = style.unflatten(0, images.shape[:2])  # (B, V, P)
        content = content.unflatten(0, images.shape[:2]) if content is not None else None
        if self.loss_cfg["gather"]:
            style, labels = gather_with_grad(style), gather_with_grad(labels)
            content = gather_with_grad(content) if content is not None else None
        return self.csd_loss(style, content, labels)

    def training_step(self, batch: dict, batch_idx: int):
        if batch.get("num_skipped"):
            self.log("train/skipped_images", float(batch["num_skipped"]), reduce_fx="sum")
        if "images" not in batch:  # every image of the batch was unreadable
            return None
        terms = self.loss(batch)
        stop_on_nonfinite_loss(self, terms["loss"])
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True)
        if self.loss_cfg["lambda_c"] > 0:
            self.log("train/dann_alpha", float(self.reversal_alpha() or 0.0))
        return terms["loss"]

    def on_after_backward(self) -> None:
        if self.global_step < self.hparams.freeze_heads_steps:  # DINO's `cancel_gradients_last_layer`
            for p in [*self.net.style_head.parameters(), *self.net.content_head.parameters()]:
                p.grad = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.clip_grad:
            clip_gradients_per_parameter(self.parameters(), self.hparams.clip_grad)
        if gradient_clip_val:  # the trainer's global clipping still works when asked for
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        global_batch = hp.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        scale = global_batch / hp.reference_batch if hp.scale_lr else 1.0
        decay, no_decay = [], []
        for p in self.net.backbone.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        heads = [
            p for m in (self.net.style_head, self.net.content_head) for p in m.parameters() if p.requires_grad
        ]
        backbone_lr, heads_lr = hp.lr_backbone * scale, hp.optimizer["lr"] * scale
        # the optimizer's own weight_decay acts on the first group only: backbone weights
        groups = [
            {"params": decay, "lr": backbone_lr, "name": "backbone"},
            {"params": no_decay, "lr": backbone_lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
            {"params": heads, "lr": heads_lr, "weight_decay": 0.0, "name": "heads"},
        ]
        optimizer = instantiate(hp.optimizer, _convert_="all")(groups)
        total_steps = self.trainer.estimated_stepping_batches
        scheduler = instantiate(hp.scheduler, _convert_="all")(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- retrieval evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: dict) -> None:
        if "image" in batch:
            self.eval_outputs.append((self.net.embed(batch["image"]).float(), batch["index"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._score_retrieval("val", self.trainer.datamodule.val_set)

    def on_test_epoch_end(self) -> None:
        self._score_retrieval("test", self.trainer.datamodule.test_set)

    def _score_retrieval(self, stage: str, retrieval_set) -> None:
        outputs, self.eval_outputs = self.eval_outputs, []
        if not outputs or self.trainer.sanity_checking:
            return
        embeddings, indices = gather_scored(outputs)
        num_query = len(retrieval_set.query)
        labels = torch.cat([retrieval_set.query_labels, retrieval_set.database_labels]).to(indices.device)[
            indices
        ]
        is_query = indices < num_query
        if is_query.sum() == 0 or (~is_query).sum() == 0:
            raise RuntimeError(f"{stage}: no readable query or database image left to score retrieval.")
        ks = tuple(self.hparams.eval_ks)
        metrics = retrieval_metrics(
            embeddings[is_query], embeddings[~is_query], labels[is_query], labels[~is_query], ks
        )
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)
        self.log(f"{stage}/num_scored", float(len(indices)))
        _, top = retrieval_topk(embeddings[is_query], embeddings[~is_query], k=min(5, int((~is_query).sum())))
        self.last_retrieval = {
            "stage": stage,
            "set": retrieval_set,
            "query_index": indices[is_query].cpu(),  # rows of the set's query list
            "database_index": (indices[~is_query] - num_query).cpu(),  # rows of the set's database list
            "query_embeddings": embeddings[is_query].cpu(),
            "database_embeddings": embeddings[~is_query].cpu(),
            "top5": top.cpu(),  # (Q, 5) positions into database_index
            "metrics": metrics,
        }

    on_save_checkpoint = record_module_class

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("backbone")
        if saved is not None:
            keys = ("name", "source")
            mine = {k: self.hparams.backbone.get(k) for k in keys}
            theirs = {k: saved.get(k) for k in keys}
            if mine != theirs:
                raise ValueError(
                    f"Checkpoint was trained with backbone {theirs}, but this run builds {mine}: "
                    "resume with the same model.backbone, or start a new run without ckpt_path."
                )
