"""Detectors of memorized prompts and the mitigations that act inside sampling (src/detection.py,
src/nn/attention.py, src/mitigations.py): hand-checkable cases on fake and tiny UNets."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from src.detection.detectors import (
    attention_entropy,
    end_token_positions,
    generation_similarity,
    noise_norm,
    score_anisotropy,
    token_entropy,
)
from src.mitigations import delayed_guidance_scale, optimize_prompt_embeddings
from src.nn.attention import cross_attention, cross_attention_layers
from tests.conftest import tiny_unet


class ConstantUNet(torch.nn.Module):
    """Output channel c = the text embedding's (position 0, feature c) value, everywhere: ε(x, c) and ε(x, ∅) are
    set by the embeddings alone."""

    def forward(self, x, t, encoder_hidden_states):
        values = encoder_hidden_states[:, 0, : x.shape[1]]
        return SimpleNamespace(sample=values[:, :, None, None].expand_as(x).clone())


def embeddings(values: list[list[float]], length: int = 4, dim: int = 3) -> torch.Tensor:
    out = torch.zeros(len(values), length, dim)
    out[:, 0, :] = torch.tensor(values)
    return out


def test_noise_norm_is_the_norm_of_the_guidance_direction():
    cond = embeddings([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    uncond = embeddings([[0.0, 0.0, 0.0]])
    noise = torch.randn(2, 3, 4, 4)
    for scored in (1, 3, None):
        scores = noise_norm(
            ConstantUNet(), DDIMScheduler(), cond, uncond, noise, steps=5, scored_steps=scored
        )
        # ||(1, 2, 2)|| = 3 per pixel, over 16 pixels: 3 * sqrt(16) = 12
        assert scores.tolist() == pytest.approx([12.0, 0.0])


def test_score_anisotropy_adds_the_weighted_per_pixel_cosine():
    cond = embeddings([[1.0, 1.0, 0.0]])
    uncond = embeddings([[1.0, 0.0, 0.0]])  # direction (0, 1, 0): orthogonal to ε(∅) -> cosine 0
    out = score_anisotropy(ConstantUNet(), DDIMScheduler(), cond, uncond, torch.randn(1, 3, 2, 2), steps=10)
    assert out["norm"].item() == pytest.approx(2.0)  # 1 per pixel over 4 pixels
    assert out["angle"].item() == pytest.approx(0.0, abs=1e-6)
    cond = embeddings([[2.0, 0.0, 0.0]])  # direction (1, 0, 0): along ε(∅) -> cosine 1
    out = score_anisotropy(
        ConstantUNet(), DDIMScheduler(), cond, uncond, torch.randn(1, 3, 2, 2), steps=10, angle_weight=0.5
    )
    assert out["angle"].item() == pytest.approx(1.0)
    assert out["score"].item() == pytest.approx(2.0 + 0.5)


def test_token_entropy_and_end_positions_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert token_entropy(probs).tolist() == pytest.approx([math.log(2), math.log(4)])
    # from position 1 on: -0.5 log 0.5 for the first row, 3 * -0.25 log 0.25 for the second
    tail = token_entropy(probs, torch.tensor([1, 1]))
    assert tail.tolist() == pytest.approx([0.5 * math.log(2), 0.75 * math.log(4)])
    ids = torch.tensor([[9, 5, 7, 0, 0], [9, 5, 5, 5, 5]])
    assert end_token_positions(ids, 7).tolist() == [2, 4]  # no end token: the last position (a cut prompt)


def tiny_conditional_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, cross_attention_dim=8, **tiny_unet(conditional=True)
    ).eval()


def test_attention_entropy_of_uniform_attention_is_log_length():
    unet = tiny_conditional_unet()
    for layer in cross_attention_layers(unet).values():  # keys all zero: every text position gets 1/L
        torch.nn.init.zeros_(layer.to_k.weight)
    cond, uncond = torch.randn(2, 6, 8), torch.randn(1, 6, 8)
    noise = torch.randn(2, 3, 16, 16)
    ends = torch.tensor([2, 3])
    first = attention_entropy(unet, DDIMScheduler(), cond, uncond, noise, ends, steps=4)
    assert first.tolist() == pytest.approx([math.log(6)] * 2, rel=1e-5)
    # mode last: mean entropy (log 6) + mean end entropy - end entropy at step 0 (equal at every step) = log 6
    last = attention_entropy(
        unet, DDIMScheduler(), cond, uncond, noise, ends, steps=4, mode="last", last_steps=2
    )
    assert last.tolist() == pytest.approx([math.log(6)] * 2, rel=1e-5)
    with pytest.raises(ValueError, match="out of range: the UNet has 4 cross-attention layers"):
        attention_entropy(unet, DDIMScheduler(), cond, uncond, noise, ends, steps=4, layers=[7])


def test_cross_attention_processor_matches_diffusers_and_masks():
    unet = tiny_conditional_unet()
    x, text = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 8)
    with torch.no_grad():
        reference = unet(x, 10, encoder_hidden_states=text).sample
        with cross_attention(unet, record=True) as probe:
            same = unet(x, 10, encoder_hidden_states=text).sample
        keep = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
        with cross_attention(unet, record=True, keep=keep) as masked:
            unet(x, 10, encoder_hidden_states=text)
    assert torch.allclose(reference, same, atol=1e-5)
    assert list(probe.layers)[0].startswith("down_blocks") and "mid_block" in list(probe.layers)[1]
    probs = masked.mean_over_layers()
    assert probs[0, 2:].abs().max() == 0 and probs[1, 4] == 0
    assert probs.sum(1).tolist() == pytest.approx([1.0, 1.0])
    # the processors are put back
    assert all(
        type(layer.processor).__name__ != "CrossAttentionProcessor"
        for layer in cross_attention_layers(unet).values()
    )


def test_start_token_scale_acts_on_the_conditional_rows_only():
    unet = tiny_conditional_unet()
    x, text = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 8)
    rows = torch.tensor([False, True])
    with torch.no_grad(), cross_attention(unet, record=True) as plain:
        unet(x, 10, encoder_hidden_states=text)
    with torch.no_grad(), cross_attention(unet, record=True, start_scale=3.0, conditional=rows) as scaled:
        unet(x, 10, encoder_hidden_states=text)
    name = list(plain.layers)[0]  # the first layer sees the same input in both passes
    before, after = plain.layers[name][0], scaled.layers[name][0]
    assert torch.allclose(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_cross_attention_refuses_an_unconditional_unet():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **tiny_unet())
    with pytest.raises(ValueError, match="no cross-attention layers"), cross_attention(unet):
        pass


def test_generation_similarity_is_zero_for_copies():
    image = torch.rand(1, 3, 8, 8)
    assert generation_similarity(image.repeat(3, 1, 1, 1)) == pytest.approx(
        0.0, abs=2e-3
    )  # float error in sqrt
    assert generation_similarity(torch.rand(3, 3, 8, 8)) < -0.1
    with pytest.raises(ValueError, match="at least 2"):
        generation_similarity(image)


def test_delayed_guidance_scale_switches_after_the_transition():
    assert delayed_guidance_scale(torch.tensor(900), 7.5, before=0.0, transition=500) == 0.0
    assert delayed_guidance_scale(torch.tensor(500), 7.5, before=0.0, transition=500) == 7.5
    assert delayed_guidance_scale(100, 7.5, before=-2.0, transition=650) == 7.5


def test_prompt_embedding_optimisation_lowers_the_norm_and_keeps_the_start_token():
    target = torch.randn(1, 4, 3)

    def loss(embedding, rows):
        return (embedding - target).norm()

    cond = torch.zeros(3, 4, 3)
    new, report = optimize_prompt_embeddings(loss, cond, [[0, 1], [2]], lr=0.1, max_steps=5, target_loss=0.0)
    assert [entry["rows"] for entry in report] == [[0, 1], [2]]
    for entry in report:
        assert entry["final_loss"] < entry["initial_loss"] and entry["steps"] == 5 and not entry["reached"]
    assert torch.equal(new[0], new[1]) and new[:, 0].abs().max() == 0  # shared per group; start token fixed
    reached = optimize_prompt_embeddings(loss, cond, [[0]], target_loss=1e9)[1][0]
    assert reached["reached"] and reached["steps"] == 0
