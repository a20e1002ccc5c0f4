"""The replication benchmarks at tiny sizes: their tables have the expected rows, and every search variant finds
the brute-force top-1."""

import pytest
import torch

from src.benchmarks import extractor_throughput, replication_search

TINY = ["--generated", "40", "--train", "300", "--dim", "16"]


def brute_force_top1(generated: torch.Tensor, train: torch.Tensor):
    sims = generated.double() @ train.double().T  # (G, N)
    return sims.max(dim=1)


def test_features_are_seeded_unit_vectors():
    generated, train = replication_search.make_features(5, 7, 3, seed=1)
    assert generated.shape == (5, 3) and train.shape == (7, 3) and generated.dtype == torch.float32
    torch.testing.assert_close(train.norm(dim=1), torch.ones(7))
    again, _ = replication_search.make_features(5, 7, 3, seed=1)
    assert torch.equal(generated, again)


@pytest.mark.parametrize("variant", ["auto", "torch", "torch_half", "faiss", "dcr"])
def test_every_search_variant_finds_the_brute_force_top1(variant):
    args = replication_search.parse_args([*TINY, "--baseline-queries", "40", "--in-process"])
    result = replication_search.run_variant(variant, args)
    generated, train = replication_search.make_features(40, 300, 16, args.seed)
    best, index = brute_force_top1(generated, train)
    assert result["variant"] == variant and result["generated"] == 40
    assert result["seconds"] > 0 and result["peak_bytes"] >= 0
    assert result["indices"] == index.tolist()
    tolerance = 2e-3 if variant == "torch_half" else 1e-5  # float16 storage rounds the training features
    torch.testing.assert_close(torch.tensor(result["scores"]).double(), best, atol=tolerance, rtol=0)


def test_matmul_references_return_no_matches():
    args = replication_search.parse_args([*TINY, "--in-process"])
    for variant in ("matmul", "matmul_numpy"):
        result = replication_search.run_variant(variant, args)
        assert result["seconds"] > 0 and "indices" not in result


def test_search_benchmark_table_in_process(capsys):
    rows = replication_search.main([*TINY, "--baseline-queries", "10", "--in-process"])
    out = capsys.readouterr().out
    assert [row["variant"] for row in rows] == list(replication_search.VARIANTS)
    keys = {"label", "seconds", "gflops", "of_matmul", "peak_mib", "dcr_time_ratio", "dcr_memory_ratio"}
    assert all(keys <= set(row) for row in rows)
    by_variant = {row["variant"]: row for row in rows}
    # The DCR baseline ran on 10 of the 40 generations and is extrapolated x4; every search agrees with it there.
    assert by_variant["dcr"]["measured_generated"] == 10 and by_variant["dcr"]["extrapolated"]
    assert "DCR full matrix + topk EXTRAPOLATED" in out
    for variant in ("auto", "torch", "faiss"):
        assert by_variant[variant]["agree"] == by_variant[variant]["compared"] == 10
        assert by_variant[variant]["max_score_diff"] < 1e-5
    assert by_variant["auto"]["label"].endswith("(-> torch)")  # N = 300 < FAISS_MIN_DATABASE
    assert max(by_variant[v]["of_matmul"] for v in ("matmul", "matmul_numpy")) == pytest.approx(1.0)


def test_search_benchmark_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        replication_search.parse_args([*TINY, "--baseline-queries", "41"])
    with pytest.raises(SystemExit):
        replication_search.parse_args(["--generated", "0"])
    assert replication_search.parse_args(["--small"]).generated == replication_search.SMALL_SIZES["generated"]


@pytest.mark.slow
def test_search_benchmark_runs_each_variant_in_its_own_process(capsys):
    rows = replication_search.main([*TINY, "--variants", "torch", "faiss"])
    assert [row["variant"] for row in rows] == ["matmul", "torch", "faiss", "dcr"]
    assert all(row["agree"] == row["compared"] == 40 for row in rows if "agree" in row)
    assert "Replication search benchmark" in capsys.readouterr().out


def test_extractor_configs_build_without_downloads_or_say_why():
    extractor, reason = extractor_throughput.build_without_downloads("sscd")
    assert reason is None and extractor.name == "sscd_resnet50_random_dcr"
    extractor, reason = extractor_throughput.build_without_downloads("csd")
    assert extractor is None and "checkpoint" in reason
    with pytest.raises(FileNotFoundError, match="no extractor config"):
        extractor_throughput.build_without_downloads("nope")


def test_flop_count_of_resnet50():
    sscd, _ = extractor_throughput.build_without_downloads("sscd")
    flops = extractor_throughput.flops_per_image(sscd, torch.zeros(3, 224, 224))
    assert 8.0e9 < flops < 8.4e9  # ResNet-50 at 224 px: 4.1 G multiply-adds (+ the 2048 x 512 projection)


@pytest.mark.slow
def test_flop_count_of_clip_sees_the_fused_attention():
    from torch.utils.flop_counter import FlopCounterMode

    clip, _ = extractor_throughput.build_without_downloads("clip_vitb16")
    image = torch.zeros(3, 224, 224)
    flops = extractor_throughput.flops_per_image(clip, image)
    assert 34.5e9 < flops < 36e9  # ViT-B/16 at 224 px: 17.6 G multiply-adds
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on
    with FlopCounterMode(display=False) as counter:  # nn.MultiheadAttention's fused fast path is not counted
        clip(image.unsqueeze(0))
    assert counter.get_total_flops() < 0.8 * flops


def test_extractor_benchmark_table(capsys):
    argv = [
        "--extractors",
        "pixels",
        "color_hist",
        "csd",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--batches",
        "2",
    ]
    rows, skipped = extractor_throughput.main(argv)
    assert [row["extractor"] for row in rows] == ["pixels", "color_hist"]
    assert list(skipped) == ["csd"]
    pixels, hist = rows
    assert pixels["input"] == (32, 32) and pixels["dim"] == 3 * 32 * 32
    assert hist["input"] == (64, 64) and hist["dim"] == 8**3
    for row in rows:
        assert row["images_per_s"] > 0 and row["preprocess_images_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(2000 / row["ms_per_batch"])
        assert row["gflops_per_image"] == 0.0  # no matrix product or convolution in either
    out = capsys.readouterr().out
    assert "Extractor throughput on the CPU" in out and "csd" in out and "skipped" in out


def test_extractor_benchmark_rejects_unknown_configs():
    with pytest.raises(SystemExit):
        extractor_throughput.parse_args(["--extractors", "sscd", "nope"])
    assert extractor_throughput.parse_args(["--extractors", "all"]).extractors == (
        extractor_throughput.available_configs()
    )


# ---- DDPM benchmarks (src/benchmarks/ddpm_step.py, ddpm_sampling.py) ------------------------------------------------
DDPM_TINY = ["--image-size", "16", "--batch-size", "2", "--threads", "1"]


@pytest.fixture
def one_thread():
    """The DDPM benchmarks set torch's thread count (1: OpenMP threads on busy shared CPUs wait for each other);
    restore it for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ddpm_step_benchmark_same_math_and_report(capsys, one_thread):
    """Both sides start from the same weights and noise: same first loss, bitwise the same weights (trained and
    EMA) after the warm-up window on the CPU. The summary's ratios are those of its rows."""
    from src.benchmarks import ddpm_step

    summary = ddpm_step.main([*DDPM_TINY, "--steps", "2", "--repeats", "1", "--warmup", "1"])
    assert summary["loss"]["lightning"] == summary["loss"]["plain"]
    assert summary["loss"]["plain"] > 0.1  # an untrained ε-prediction: MSE near 1, not a degenerate 0
    assert summary["weight_diff"] == {"unet": 0.0, "ema": 0.0}
    for name in ("lightning", "plain"):
        row = summary[name]
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["peak_mib"] > 0
    assert summary["ratio"] == summary["lightning"]["median_ms"] / summary["plain"]["median_ms"]
    assert summary["memory_ratio"] == summary["lightning"]["peak_mib"] / summary["plain"]["peak_mib"]
    out = capsys.readouterr().out
    assert f"ratio Lightning / plain (median step): {summary['ratio']:.3f}" in out
    assert "Lightning Trainer.fit (DDPMModule)" in out and "plain diffusers + PyTorch loop" in out


def test_ddpm_step_plain_loop_without_ema_is_caught(one_thread):
    """The weight check has teeth: a plain loop that skips the EMA update ends with a different EMA copy."""
    from src.benchmarks import ddpm_step as bench

    args = bench.parse_args([*DDPM_TINY, "--warmup", "1"])
    batch = bench.make_batch(args.batch_size, args.image_size, args.seed)
    timer = bench.StepTimer(bench.PeakMemory(torch.device("cpu")), torch.device("cpu"))
    lightning = bench.build_module(args)
    bench.lightning_window(lightning, batch, args.warmup, args, timer)
    plain = bench.PlainLoop(bench.build_module(args), args)
    plain.module.ema.update_parameters = lambda model: None  # the bug under test
    plain.window(batch, args.warmup, timer)
    diff = bench.max_weight_difference(lightning, plain.module)
    assert diff["unet"] == 0.0 and diff["ema"] > 0.0


def test_ddpm_benchmarks_reject_bad_arguments():
    from src.benchmarks import ddpm_sampling, ddpm_step

    with pytest.raises(SystemExit, match="tiny"):  # names the configs that exist
        ddpm_step.build_module(ddpm_step.parse_args(["--unet", "nope"]))
    with pytest.raises(SystemExit, match="bf16-mixed"):
        ddpm_step.parse_args(["--precision", "16-mixed"])
    with pytest.raises(SystemExit, match="1..1000"):
        ddpm_sampling.parse_args(["--ddpm-steps", "0"])
    assert ddpm_sampling.parse_args([]).ddpm_steps == 20  # the CPU default
    assert ddpm_sampling.parse_args(["--ddpm-steps", "1000"]).ddpm_steps == 1000


def test_ddpm_sampling_summary_by_hand():
    from src.benchmarks.ddpm_sampling import MIB, summarize

    calls = {
        "ddpm": [{"seconds": s, "peak": p * MIB} for s, p in ((2.0, 3), (5.0, 1), (4.0, 1))],
        "ddim": [{"seconds": 1.0, "peak": 2 * MIB}],
    }
    rows = summarize(calls, {"ddpm": 10, "ddim": 50}, batch_size=8)
    assert [(r["name"], r["extrapolated"]) for r in rows] == [
        ("DDPM-10", False),
        ("DDPM-1000", True),
        ("DDIM-50", False),
    ]
    ddpm, ddpm_full, ddim = rows
    assert ddpm["seconds"] == 4.0 and ddpm["images_per_s"] == 2.0  # median of 2, 5, 4 s; 8 images
    assert ddpm["ms_per_step"] == 400.0 and ddpm["peak_mib"] == 3.0
    assert ddpm_full["seconds"] == 400.0 and ddpm_full["images_per_s"] == pytest.approx(0.02)
    assert ddpm_full["ms_per_step"] == 400.0 and ddpm_full["peak_mib"] is None
    assert ddim["images_per_s"] == 8.0 and ddim["ms_per_step"] == pytest.approx(20.0)
    assert ddim["peak_mib"] == 2.0
    assert [r["name"] for r in summarize(calls, {"ddpm": 1000, "ddim": 50}, 8)] == ["DDPM-1000", "DDIM-50"]


def test_ddpm_sampling_benchmark_table(capsys, one_thread):
    from src.benchmarks import ddpm_sampling

    rows = ddpm_sampling.main([*DDPM_TINY, "--ddpm-steps", "4", "--ddim-steps", "3", "--repeats", "1"])
    assert [row["name"] for row in rows] == ["DDPM-4", "DDPM-1000", "DDIM-3"]
    ddpm, ddpm_full, ddim = rows
    for row in (ddpm, ddim):
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"]) and row["peak_mib"] > 0
        assert row["ms_per_step"] == pytest.approx(row["seconds"] / row["steps"] * 1e3)
    assert ddpm_full["images_per_s"] == pytest.approx(ddpm["images_per_s"] * 4 / 1000)
    out = capsys.readouterr().out
    assert "DDPM-1000 (extrapolated)" in out and "DDPM runs 4 of the 1000 timesteps" in out


def test_ddpm_sampling_call_returns_the_seeded_images(one_thread):
    from src.benchmarks import ddpm_sampling
    from src.benchmarks.ddpm_step import build_module

    args = ddpm_sampling.parse_args(DDPM_TINY)
    module = build_module(args)
    memory = ddpm_sampling.PeakMemory(torch.device("cpu"))
    result = ddpm_sampling.time_generate(module, "ddim", 2, args, memory)
    assert result["images"].shape == (2, 16, 16, 3) and result["images"].dtype == torch.uint8
    assert torch.equal(result["images"], module.generate([0, 1], sampler="ddim", steps=2))
    assert result["seconds"] > 0 and result["peak"] > 0
