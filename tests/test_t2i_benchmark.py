"""The text-to-image training-step benchmark (src/benchmarks/t2i_step.py) at tiny sizes: both sides do the same math,
a plain loop missing a piece is caught, the mitigation tables have a row per mitigation with positive times."""

import numpy as np
import pytest
import torch

from src.benchmarks import ddpm_step
from src.benchmarks import t2i_step as bench
from src.data.captions import INFERENCE_MITIGATIONS, TRAIN_MITIGATIONS

T2I_TINY = ["--image-size", "16", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def one_thread():
    """The benchmark sets torch's thread count (1 on busy shared CPUs); restore it for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(one_thread):
    """One benchmark run at tiny sizes: its summary and printed report."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = bench.main(
            [*T2I_TINY, "--steps", "2", "--repeats", "1", "--warmup", "1", "--mitigation-repeats", "20"]
        )
    return summary, out.getvalue()


def test_same_math_and_step_report(tiny_run):
    """Same weights, captions and noise on both sides: the same first loss and the same weights (trained and EMA)
    after the warm-up window. The summary's ratios are those of its rows."""
    summary, out = tiny_run
    assert abs(summary["loss"]["lightning"] - summary["loss"]["plain"]) <= 1e-6
    assert summary["loss"]["plain"] > 0.1  # an untrained ε-prediction: MSE near 1, not a degenerate 0
    assert summary["weight_diff"]["unet"] <= 1e-7 and summary["weight_diff"]["ema"] <= 1e-7
    for name in ("lightning", "plain"):
        row = summary[name]
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["peak_mib"] > 0
    assert summary["ratio"] == summary["lightning"]["median_ms"] / summary["plain"]["median_ms"]
    assert summary["memory_ratio"] == summary["lightning"]["peak_mib"] / summary["plain"]["peak_mib"]
    assert f"ratio Lightning / plain (median step): {summary['ratio']:.3f}" in out
    assert "Lightning Trainer.fit (Text2ImageModule)" in out and "plain diffusers + PyTorch loop" in out


def test_train_mitigation_table(tiny_run):
    """A row per train-time mitigation (rc / rt / cwr also at p=1), positive times, the ratio to the step, and
    captions changed as the mitigation says: never by none / gn, always at p=1, about 4 in 5 by mc."""
    summary, out = tiny_run
    rows = summary["mitigations"]
    assert [(r["mitigation"], r["options"].get("p")) for r in rows] == [
        ("none", None), ("mc", None), ("gn", None), ("rc", 0.1), ("rc", 1.0), ("rt", 0.1), ("rt", 1.0),
        ("cwr", 0.1), ("cwr", 1.0),
    ]  # fmt: skip
    assert {r["mitigation"] for r in rows} == set(TRAIN_MITIGATIONS)
    step_us = summary["lightning"]["median_ms"] * 1e3
    for row in rows:
        assert row["caption_us"] > 0 and row["total_us"] == row["caption_us"] + row["embedding_us"]
        assert row["of_step"] == pytest.approx(row["total_us"] / step_us)
        assert (row["embedding_us"] > 0) == (row["mitigation"] == "gn")
    changed = {(r["mitigation"], r["options"].get("p")): r["changed"] for r in rows}
    assert changed[("none", None)] == changed[("gn", None)] == 0.0
    assert changed[("rc", 1.0)] == changed[("rt", 1.0)] == changed[("cwr", 1.0)] == 1.0
    assert 0.5 < changed[("mc", None)] < 1.0  # 80 captions, each caption 0 with probability 1/5
    assert rows[2]["options"] == {"lam": 0.1}  # conf/mitigation/gn.yaml
    assert "Train-time caption mitigations" in out and "rt p=1.0" in out


def test_inference_mitigation_table(tiny_run):
    summary, out = tiny_run
    rows = summary["inference_mitigations"]
    assert [r["mitigation"] for r in rows] == list(INFERENCE_MITIGATIONS)
    assert summary["cfg_step_ms"] > 0
    for row in rows:
        assert row["prompt_us"] > 0 and row["total_us"] == row["prompt_us"] + row["embedding_us"]
        assert row["of_cfg_step"] == pytest.approx(row["total_us"] / (summary["cfg_step_ms"] * 1e3))
        assert (row["embedding_us"] > 0) == (row["mitigation"] == "gni")
        assert row["changed"] == (0.0 if row["mitigation"] in ("none", "gni") else 1.0)
    assert "Inference-time mitigations" in out and "a generation runs 50" in out


def test_gni_noise_is_what_generate_draws():
    """`gni_noise` draws each image's noise from its seed as `Text2ImageModule.generate` does: seed + 104729."""
    uncond, cond = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    noised = bench.gni_noise(uncond, cond, 0.5, seeds=[7, 8])  # (B, 2, L, D)
    for row, seed in enumerate((7, 8)):
        expected = 0.5 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed + 104_729))
        torch.testing.assert_close(noised[row], torch.stack([uncond[row], cond[row]]) + expected)


def test_batch_and_captions():
    lists = bench.make_caption_lists(3, seed=0)
    assert [len(captions) for captions in lists] == [5, 5, 5]
    assert lists[1][0].startswith("portrait of bako, a ")  # face_name(1): caption 0 names the face
    assert bench.make_caption_lists(3, seed=0) == lists and bench.make_caption_lists(3, seed=1) != lists
    batch = bench.make_batch(3, 16, seed=0)
    assert batch["image"].shape == (3, 3, 16, 16) and -1 <= batch["image"].min() <= batch["image"].max() <= 1
    assert batch["caption"] == [captions[0] for captions in lists]


def test_module_follows_the_model_config(one_thread):
    module = bench.build_module(bench.parse_args(T2I_TINY))
    assert module.hparams.prompt_dropout == 0.1 and module.hparams.optimizer["weight_decay"] == 0.01
    assert module.text_encoder.dim == 128 and module.text_encoder.context_length == 32
    assert module.unet.config.block_out_channels == [32, 64, 64] and module.unet.config.sample_size == 16
    again = bench.build_module(bench.parse_args(T2I_TINY))
    assert all(
        torch.equal(a, b)
        for a, b in zip(module.state_dict().values(), again.state_dict().values(), strict=True)
    )


def run_warmup_pair(break_plain):
    """The warm-up window on both sides, with `break_plain(plain)` applied to the plain loop first."""
    args = bench.parse_args([*T2I_TINY, "--warmup", "1"])
    bench.quiet_lightning()
    batch = bench.make_batch(args.batch_size, args.image_size, args.seed)
    timer = bench.StepTimer(bench.PeakMemory(torch.device("cpu")), torch.device("cpu"))
    lightning = bench.build_module(args)
    warm_l = ddpm_step.lightning_window(lightning, batch, args.warmup, args, timer)
    plain = bench.PlainLoop(bench.build_module(args), args)
    break_plain(plain)
    warm_p = plain.window(batch, args.warmup, timer)
    return warm_l["loss"], warm_p["loss"], ddpm_step.max_weight_difference(lightning, plain.module)


def test_plain_loop_without_ema_is_caught(one_thread):
    """The weight check has teeth: a plain loop that skips the EMA update ends with a different EMA copy."""

    def no_ema(plain):
        plain.module.ema.update_parameters = lambda model: None

    loss_l, loss_p, diff = run_warmup_pair(no_ema)
    assert loss_l == loss_p and diff["unet"] == 0.0 and diff["ema"] > 0.0


def test_plain_loop_without_prompt_dropout_is_caught(one_thread):
    """A plain loop without prompt dropout draws no `torch.rand`, so its noise and timesteps differ from the first
    step on: both the loss and the weights disagree."""

    def no_dropout(plain):
        plain.prompt_dropout = 0.0

    loss_l, loss_p, diff = run_warmup_pair(no_dropout)
    assert abs(loss_l - loss_p) > 1e-4 and diff["unet"] > 0.0 and diff["ema"] > 0.0


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="choose one of tiny"):  # names the configs that exist
        bench.parse_args(["--unet", "nope"])
    with pytest.raises(SystemExit, match="bf16-mixed"):
        bench.parse_args(["--precision", "16-mixed"])
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench.parse_args(["--mitigation-repeats", "0"])
    args = bench.parse_args([])
    assert (args.unet, args.image_size, args.batch_size) == ("tiny", 32, 16)


def test_time_calls_times_each_draw():
    draws = []
    median_us, outputs = bench.time_calls(lambda draw: draws.append(draw) or draw * 2, 3, torch.device("cpu"))
    assert draws == [0, 1, 2, 3] and outputs == [2, 4, 6] and median_us > 0  # draw 0 is the untimed call
    assert np.isfinite(median_us)
