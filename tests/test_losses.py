"""Tests for src/losses.py: SupCon against hand-worked numbers and a loop reference, DDP gathering, DANN."""

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from src.losses import (
    GradientReversal,
    binary_label_mask,
    count_label_mask,
    dann_alpha,
    gather_with_grad,
    grad_reverse,
    supcon_loss,
)


def two_by_two_features() -> torch.Tensor:
    """B=2 samples, V=2 views, D=2: both views of sample 0 are (1, 0), both views of sample 1 are (0, 1)."""
    return torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (B, V, D)


def test_supcon_hand_worked_simclr():
    # Every anchor sees: its other view (dot 1), two views of the other sample (dot 0). With T = 1 and the
    # row max (the self term, 1) subtracted, the logits of the three contrasts are 0, -1, -1, so
    # log_prob(positive) = 0 - log(1 + 2/e) and the loss is log(1 + 2/e) = 0.551444.
    loss = supcon_loss(two_by_two_features(), temperature=1.0, base_temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-5)
    assert loss.item() == pytest.approx(0.551444, abs=1e-5)


def test_supcon_hand_worked_all_positive_mask():
    # mask = ones: every other view is a positive, with log-probs -1 - s, 0 - s, -1 - s (s = log(1 + 2/e)),
    # so the loss is 2/3 + log(1 + 2/e) = 1.218111.
    loss = supcon_loss(two_by_two_features(), mask=torch.ones(2, 2), temperature=1.0, base_temperature=1.0)
    assert loss.item() == pytest.approx(2 / 3 + math.log(1 + 2 / math.e), abs=1e-5)


def test_supcon_temperature_scale():
    # loss = -(T / base_T) * mean_log_prob_pos: with T = 0.5 the logits are 0, -2, -2, so the loss is
    # 0.5 * log(1 + 2 e^-2) with base 1.0, and twice that with base 0.5.
    features = two_by_two_features()
    expected = 0.5 * math.log(1 + 2 * math.exp(-2))
    assert supcon_loss(features, temperature=0.5).item() == pytest.approx(expected, abs=1e-5)
    assert supcon_loss(features, temperature=0.5, base_temperature=0.5).item() == pytest.approx(
        2 * expected, abs=1e-5
    )


def random_features(batch=6, views=2, dim=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, views, dim, generator=g), dim=-1)


def test_simclr_equals_identity_mask():
    features = random_features()
    torch.testing.assert_close(supcon_loss(features), supcon_loss(features, mask=torch.eye(6)))


def reference_supcon(features, mask, temperature, base_temperature):
    """Per-anchor Python loop straight from the formula in the supcon_loss docstring."""
    batch, views, _ = features.shape
    anchors = [(v, b) for v in range(views) for b in range(batch)]
    losses = []
    for v_i, b_i in anchors:
        f_i = features[b_i, v_i]
        logits = {(v, b): (f_i @ features[b, v]).item() / temperature for v, b in anchors}
        row_max = max(logits.values())  # the max includes the self term, as in the official code
        others = [a for a in anchors if a != (v_i, b_i)]
        log_denominator = math.log(sum(math.exp(logits[a] - row_max) for a in others) + 1e-6)
        weighted, total_weight = 0.0, 0.0
        for v, b in others:
            weight = mask[b_i, b].item()
            weighted += weight * (logits[(v, b)] - row_max - log_denominator)
            total_weight += weight
        losses.append(-(temperature / base_temperature) * weighted / (total_weight + 1e-6))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("views", [1, 2, 3])
def test_supcon_matches_loop_reference(views):
    features = random_features(batch=5, views=views, seed=views)
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 1, 1]])
    for mask in (count_label_mask(labels), binary_label_mask(labels), torch.eye(5)):
        for temperature, base in ((0.1, 1.0), (0.5, 0.07)):
            loss = supcon_loss(features, mask=mask, temperature=temperature, base_temperature=base)
            assert loss.item() == pytest.approx(reference_supcon(features, mask, temperature, base), rel=1e-5)


def test_count_and_binary_masks():
    labels = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    count = count_label_mask(labels)
    binary = binary_label_mask(labels)
    assert count[0, 1] == 2 and binary[0, 1] == 1  # samples 0 and 1 share two tags
    assert count[0, 2] == 0 and binary[0, 2] == 0
    assert torch.equal(binary, (count > 0).float())
    features = random_features(batch=4, views=1, seed=3)
    assert not torch.isclose(supcon_loss(features, mask=count), supcon_loss(features, mask=binary))


def test_supcon_gradient_is_finite():
    features = random_features(batch=8, views=2, seed=4).requires_grad_(True)
    labels = torch.randint(0, 2, (8, 4))
    loss = supcon_loss(features, mask=count_label_mask(labels)) + supcon_loss(features)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_supcon_anchor_without_positive_is_finite():
    # With V = 1 and a label-less sample, an anchor has no positive at all: the eps keeps the loss finite.
    features = random_features(batch=3, views=1, seed=5)
    mask = count_label_mask(torch.tensor([[1, 0], [1, 0], [0, 0]]))
    assert torch.isfinite(supcon_loss(features, mask=mask))


def test_supcon_bad_shapes():
    with pytest.raises(ValueError, match=r"3-D \(B, V, D\).*\(4, 5\)"):
        supcon_loss(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"mask must be \(B, B\) = \(4, 4\).*got \(4, 3\)"):
        supcon_loss(random_features(batch=4), mask=torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"multi-hot \(B, L\)"):
        count_label_mask(torch.ones(4))


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_dann_alpha():
    assert dann_alpha(0.0) == 0.0
    assert dann_alpha(1.0) == pytest.approx(0.9999, abs=1e-4)
    assert dann_alpha(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_alpha(-3.0) == 0.0 and dann_alpha(7.0) == dann_alpha(1.0)  # clamped to [0, 1]


def test_grad_reverse_flips_and_scales():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, alpha=0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.25, -0.5, -0.75]))
    assert GradientReversal.apply(x, 1.0).requires_grad


# ---- DDP: a 2-process gloo run on CPU ----

WORLD_SIZE = 2


def full_batch(seed=0):
    """(inputs (8, 2, 4), multi-hot labels (8, 3), linear weight (4, 4)) shared by every rank and the reference."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(8, 2, 4, generator=g),
        (torch.rand(8, 3, generator=g) < 0.5).float(),
        torch.randn(4, 4, generator=g),
    )


def csd_style_loss(inputs, labels, weight):
    """A tiny CSD-like step: a shared linear head, L2-normalise, SimCLR + supervised SupCon on the first view."""
    features = F.normalize(inputs @ weight.T, dim=-1)  # (b, V, D)
    features = gather_with_grad(features)  # (B, V, D) under DDP
    labels = gather_with_grad(labels)
    return 5 * supcon_loss(features[:, 0:1], mask=count_label_mask(labels)) + supcon_loss(features)


def ddp_worker(rank, init_file, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        inputs, labels, weight = full_batch()
        local = slice(rank * 4, (rank + 1) * 4)
        x = inputs[local].clone().requires_grad_(True)  # this rank's half of the batch, a leaf
        w = weight.clone().requires_grad_(True)  # replicated parameter, as DDP keeps it
        loss = csd_style_loss(x, labels[local], w)
        loss.backward()
        w_grad = w.grad.clone()
        torch.distributed.all_reduce(w_grad)  # what DDP does to parameter grads: sum over ranks ...
        w_grad /= WORLD_SIZE  # ... then divide by world size
        # uneven batches (rank 0: nothing left after skipped images, rank 1: 3 rows) gather with gradients
        uneven = torch.full((3 * rank, 2), float(rank + 1), requires_grad=True)
        gathered = gather_with_grad(uneven)
        (gathered * torch.arange(len(gathered)).float()[:, None]).sum().backward()
        result = {
            "loss": loss.detach(),
            "x_grad": x.grad,
            "w_grad": w_grad,
            "uneven": gathered.detach(),
            "uneven_grad": uneven.grad,
        }
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_with_grad_matches_single_process_under_ddp():
    inputs, labels, weight = full_batch()
    x = inputs.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    expected_loss = csd_style_loss(x, labels, w)
    expected_loss.backward()

    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(
            ddp_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD_SIZE, join=True
        )
        results = [torch.load(os.path.join(tmp, f"{rank}.pt")) for rank in range(WORLD_SIZE)]

    for rank, result in enumerate(results):
        # Every rank computes the same global loss, equal to the single-process loss on the full batch.
        torch.testing.assert_close(result["loss"], expected_loss.detach())
        # The gather's backward sums the W identical losses' gradients, so each rank holds W * dL/dx_r for its
        # slice; DDP's division by W (shown on the parameter below) turns that into dL/dx_r.
        local = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(result["x_grad"] / WORLD_SIZE, x.grad[local])
        # The replicated parameter: DDP-averaged gradient == single-process gradient.
        torch.testing.assert_close(result["w_grad"], w.grad)
        assert torch.equal(result["uneven"], torch.full((3, 2), 2.0))  # rank 1's rows only
        # d/dx of sum(row i * i) summed over the 2 ranks' identical losses: 2 * i for rank 1's rows 0, 1, 2
        expected_grad = torch.zeros(0, 2) if rank == 0 else 2 * torch.arange(3.0)[:, None].expand(3, 2)
        torch.testing.assert_close(result["uneven_grad"], expected_grad)
