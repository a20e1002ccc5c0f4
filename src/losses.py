"""Contrastive losses and their helpers, as pure functions (no Lightning, no Hydra).

What CSD trains with (docs/style.md#loss, official code learn2phoenix/CSD `CSD/losses.py`,
`CSD/train_csd.py`):
- `supcon_loss`: the SupCon loss of Khosla et al. 2020 in its 'all' contrast mode. With `mask=None` it is
  SimCLR (the style SSL loss); with `mask = count_label_mask(Y)` it is CSD's multi-label loss (MCL).
- `gather_with_grad`: all-gathers features across DDP ranks before the loss (`--use_distributed_loss`), keeping
  gradients.
- `dann_alpha` and `grad_reverse`: the gradient-reversal layer in front of the content head and its
  DANN coefficient schedule (docs/style.md#model).

What the copy descriptor trains with (SSCD, Pizzi et al. 2022; official facebookresearch/sscd-copy-detection
`sscd/train.py`; docs/replication.md#a-copy-descriptor-trained-here):
- `copy_infonce_loss`: InfoNCE over views where each positive pair has its own term, the other positives left
  out of its denominator;
- `koleo_loss`: the differential-entropy (KoLeo) regulariser on each embedding's nearest non-matching neighbour.
"""

import math

import torch
import torch.distributed as dist


def supcon_loss(
    features: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 0.1,
    base_temperature: float = 1.0,
) -> torch.Tensor:
    """Supervised contrastive loss with every view as an anchor (SupCon, contrast_mode='all').

    Args:
        features: (B, V, D) L2-normalised embeddings, V views of each of B samples.
        mask: (B, B) positive weights between samples, or None for SimCLR (the positives of an anchor are the
            other views of its own sample, i.e. mask = eye(B)). Weights are used as given, not binarised:
            CSD passes `Y @ Y.T` of multi-hot labels (see `count_label_mask`).
        temperature: tau; CSD uses 0.1 (docs/style.md#loss).
        base_temperature: the loss is scaled by temperature / base_temperature. CSD keeps 1.0 (so every loss is
            x0.1); the original SupCon uses 0.07.

    Returns:
        Scalar loss, the mean over all B * V anchors.

    Follows the official SupCon as CSD uses it: the contrast set is all B * V views, self-contrast is removed
    with a logits mask, the row max is subtracted for stability, and CSD's eps terms are kept:
    log_prob = logits - log(sum(exp(logits) * logits_mask) + 1e-6) and
    mean_log_prob_pos = sum(mask * log_prob) / (sum(mask) + 1e-6). An anchor with no positive thus
    contributes 0 instead of NaN.
    """
    if features.dim() != 3:
        raise ValueError(
            f"supcon_loss: features must be 3-D (B, V, D), got shape {tuple(features.shape)}; "
            "add a view axis with features.unsqueeze(1) for a single view"
        )
    batch_size, n_views, _ = features.shape
    if mask is None:
        mask = torch.eye(batch_size, device=features.device, dtype=features.dtype)
    elif mask.shape != (batch_size, batch_size):
        raise ValueError(
            f"supcon_loss: mask must be (B, B) = ({batch_size}, {batch_size}) to match features "
            f"{tuple(features.shape)}, got {tuple(mask.shape)}"
        )
    mask = mask.to(device=features.device, dtype=features.dtype)

    # View-major stacking, as torch.cat(torch.unbind(features, dim=1)): row v * B + b is view v of sample b.
    contrast = features.transpose(0, 1).reshape(n_views * batch_size, -1)  # (V*B, D)
    logits = contrast @ contrast.T / temperature  # (V*B, V*B); every view is an anchor ('all' mode)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()

    n = n_views * batch_size
    logits_mask = 1.0 - torch.eye(n, device=features.device, dtype=features.dtype)  # no self-contrast
    pos_mask = mask.repeat(n_views, n_views) * logits_mask  # (V*B, V*B)

    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(dim=1, keepdim=True) + 1e-6)
    mean_log_prob_pos = (pos_mask * log_prob).sum(dim=1) / (pos_mask.sum(dim=1) + 1e-6)  # (V*B,)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def count_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positive weights = number of shared tags, `Y @ Y.T` (the official CSD code; our default).

    Args:
        labels: (B, L) multi-hot labels (bool, int or float).

    Returns:
        (B, B) float counts; pairs sharing two tags weigh twice as much as pairs sharing one. This departs from
        the paper's indicator (see `binary_label_mask`) and is what the released training code does
        (docs/style.md#loss). The diagonal is left in place: `supcon_loss` removes self-pairs.
    """
    if labels.dim() != 2:
        raise ValueError(
            f"count_label_mask: labels must be multi-hot (B, L), got shape {tuple(labels.shape)}"
        )
    y = labels.float()
    return y @ y.T


def binary_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positive weights = 1 if two images share any tag, else 0 (the paper's target s_ij, CSD paper §5).

    Args:
        labels: (B, L) multi-hot labels (bool, int or float).

    Returns:
        (B, B) float mask in {0, 1}: `(Y @ Y.T) > 0`.
    """
    return (count_label_mask(labels) > 0).float()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, x)
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # contiguous(): gloo silently mis-reads strided buffers, and the gradient of a loss that uses x.T or a
        # slice of the batch often arrives strided. all_reduce (not reduce_scatter) because gloo lacks the latter.
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` along dim 0 from every rank, in rank order, with gradients flowing back to each rank.

    Args:
        x: (b, ...) the local batch. Ranks may hold different b (images skipped as unreadable, an uneven last
            batch, even b = 0): each rank's batch is padded to the largest b for the collective and the padding
            removed from the result (and from the gradient).

    Returns:
        (sum of the ranks' b, ...) the global batch when torch.distributed is initialised with world size > 1;
        `x` itself otherwise.

    Why this gives the single-process gradient under DDP: every rank computes the same global loss L on the
    gathered batch. The backward sums the ranks' gradients for each slice, so rank r receives
    world_size * dL/dx_r. DDP then averages parameter gradients over ranks, dividing by world_size, which leaves
    exactly dL/dtheta of one process seeing the whole batch. This stands in for `utils.GatherLayer` of the
    official CSD code (`--use_distributed_loss`), whose backward we could not inspect: a GatherLayer that returns
    only the local slice of the gradient (a common variant) yields dL/dtheta / world_size after DDP's averaging,
    i.e. a learning rate world_size times smaller.

    Not `torch.distributed.nn.functional.all_gather`: it is deprecated, and on gloo (torch 2.15) its backward
    returns wrong gradients when the incoming gradient is non-contiguous, which SupCon's `contrast.T` produces
    (tests/test_losses.py catches it).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world_size = dist.get_world_size()
    # The sizes first: all_gather needs equal shapes, so uneven batches are padded to the largest.
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) == 1:
        return _GatherWithGrad.apply(x)
    largest = max(sizes)
    padding = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
    gathered = _GatherWithGrad.apply(torch.cat([x, padding]))  # (world_size * largest, ...)
    rows = torch.cat([torch.arange(n, device=x.device) + r * largest for r, n in enumerate(sizes)])
    return gathered[rows]


def dann_alpha(progress: float) -> float:
    """DANN coefficient alpha = 2 / (1 + exp(-10 p)) - 1 for training progress p = iter / iters.

    p is clamped to [0, 1]; alpha goes from 0 to ~0.99991. Follows Ganin & Lempitsky 2015 and the official CSD
    code's reversal coefficient (docs/style.md#model).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by -alpha in the backward pass (DANN)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = float(alpha)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.alpha * grad_output, None


def grad_reverse(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer: returns `x` unchanged, its gradient becomes -alpha * grad
    (docs/style.md#model)."""
    return GradientReversal.apply(x, alpha)


def copy_infonce_loss(
    rows: torch.Tensor,
    columns: torch.Tensor,
    match: torch.Tensor,
    self_index: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """SSCD's InfoNCE: for each positive pair (i, j), -log(exp(s_ij / t) / (exp(s_ij / t) + sum over the
    non-matches k of i of exp(s_ik / t))), averaged over the positives of row i, then over rows.

    Args:
        rows: (R, D) L2-normalised embeddings of this process's views (the anchors).
        columns: (C, D) L2-normalised embeddings of every view (all processes), containing the rows.
        match: (R, C) bool, True where a column shows the same image as the row (its own column included).
        self_index: (R,) the column of each row itself (left out: not a positive).
        temperature: SSCD's default 0.05.
    The official code adds 1e-6 to each denominator; the log-sum-exp form here does not need it.
    """
    logits = rows @ columns.T / temperature  # (R, C)
    is_self = torch.zeros_like(match)
    is_self[torch.arange(len(rows), device=rows.device), self_index] = True
    positive = match & ~is_self
    if not positive.any(dim=1).all():
        raise ValueError("copy_infonce_loss: every row needs a positive (another view of its image).")
    negatives = logits.masked_fill(match, float("-inf"))  # (R, C): only the non-matches
    negative_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # (R, 1); -inf when there is none
    per_pair = torch.logaddexp(logits, negative_lse.expand_as(logits)) - logits  # -log p_ij
    per_row = (per_pair * positive).sum(dim=1) / positive.sum(dim=1)
    return per_row.mean()


def koleo_loss(
    rows: torch.Tensor, columns: torch.Tensor, match: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """SSCD's differential-entropy regulariser: -mean over rows of log(distance to the nearest column that is not
    a match), the distance between unit vectors sqrt(max(2 - 2 cos, eps)). Multiply by the weight (SSCD 30)."""
    nearest = (rows @ columns.T).masked_fill(match, -100.0).max(dim=1).values
    return -torch.log(torch.sqrt(torch.clamp(2 - 2 * nearest, min=eps))).mean()
