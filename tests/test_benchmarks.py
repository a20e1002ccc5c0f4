"""The benchmarks (benchmarks/) at tiny sizes: the harness measures what it says, the methods each benchmark
compares agree (same metrics, same top-1, same first loss and weights), and every table has the expected
rows."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException
from PIL import Image

from benchmarks import (
    ddpm_sampling,
    extractor_throughput,
    harness,
    lightning_overhead,
    replication_search,
)
from benchmarks import retrieval_metrics as retrieval_bench
from src.metrics import retrieval_metrics
from tests.conftest import ROOT


@pytest.fixture
def one_thread():
    """The benchmarks set torch's thread count; restore it for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- harness ---------------------------------------------------------------------------------------------
def test_table_aligns_text_left_numbers_right_and_marks_missing_values(capsys):
    rows = [{"name": "a", "ms": 1.25, "ratio": 0.5}, {"name": "longer name", "ms": 10.0}]
    harness.print_table(rows, [("name", "method", ""), ("ms", "time (ms)", ".1f"), ("ratio", "ratio", ".0%")])
    assert capsys.readouterr().out.splitlines() == [
        "method       time (ms)  ratio",
        "a                  1.2    50%",
        "longer name       10.0      -",
    ]


def test_interleave_alternates_which_side_goes_first(capsys):
    order = []
    results = harness.interleave(
        {
            "a": lambda: order.append("a") or {"n": len(order)},
            "b": lambda: order.append("b") or {"n": len(order)},
        },
        repeats=3,
        describe=lambda result: str(result["n"]),
    )
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert [r["n"] for r in results["a"]] == [1, 4, 5] and [r["n"] for r in results["b"]] == [2, 3, 6]
    assert "round 3/3: a 5, b 6" in capsys.readouterr().out


def test_time_calls_times_each_draw_after_an_untimed_one():
    draws = []
    median_us, outputs = harness.time_calls(
        lambda draw: draws.append(draw) or draw * 2, 3, torch.device("cpu")
    )
    assert draws == [0, 1, 2, 3] and outputs == [2, 4, 6] and median_us > 0


PEAK_SCRIPT = """
import builtins, sys, time, torch
from benchmarks import harness
before, held = harness.current_rss_bytes(), torch.ones(64 * harness.MIB // 4)
if harness.current_rss_bytes() - before < 48 * harness.MIB:
    print("SKIP"); sys.exit(0)
del held
if sys.argv[1] == "sampled-only":  # no writable clear_refs, no VmHWM line: only the sampler counts
    harness.vm_hwm_bytes = lambda: 0
    real_open = builtins.open
    def open_without_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)
    builtins.open = open_without_clear_refs
memory = harness.PeakMemory(torch.device("cpu"), interval=0.002)
memory.reset()
block = torch.ones(128 * harness.MIB // 4)  # larger than anything freed before in this process
time.sleep(0.1)
del block
print(memory.rise() // harness.MIB, memory.peak() >= memory.before + memory.rise(), repr(memory.note))
"""


@pytest.mark.parametrize("mode", ["vmhwm", "sampled-only"])
def test_peak_memory_sees_an_allocation_freed_before_reading(mode):
    """In a fresh process, as the benchmarks measure (`run_worker`): in a long-lived one, freed pages that stay
    resident can hold a new allocation without any rise of the resident set."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if result.stdout.strip() == "SKIP":
        pytest.skip("this kernel's /proc/self/statm does not show a 64 MiB allocation as resident")
    rise_mib, consistent, note = result.stdout.split(maxsplit=2)
    assert int(rise_mib) >= 96 and consistent == "True"
    assert ("sampled" in note) == (mode == "sampled-only")


def test_check_device_rejects_fp16_on_cpu_and_missing_cuda():
    with pytest.raises(SystemExit, match="bf16-mixed"):
        harness.check_device(lightning_overhead.parse_args(["--module", "ddpm", "--precision", "16-mixed"]))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            harness.check_device(lightning_overhead.parse_args(["--module", "ddpm", "--device", "cuda"]))


@pytest.mark.slow
def test_run_worker_names_the_worker_that_failed():
    with pytest.raises(RuntimeError, match="worker 'chunked' exited with code 2"):
        harness.run_worker("retrieval_metrics", "chunked", {"queries": -1, "no_such_option": 1})


# ---- retrieval metrics -----------------------------------------------------------------------------------
def test_retrieval_baseline_and_phases_agree_with_retrieval_metrics():
    query, database, query_labels, database_labels = retrieval_bench.make_data(40, 300, 16, 5, seed=0)
    ks = (1, 10, 100)
    ours = retrieval_metrics(query, database, query_labels, database_labels, ks=ks, chunk_size=16)
    assert retrieval_bench.full_argsort_metrics(query, database, query_labels, database_labels, ks) == ours
    for method in ("chunked", "full"):
        phases = retrieval_bench.time_phases(method, query, database, query_labels, database_labels, ks, 16)
        assert set(phases) == {"matmul", "select", "hits", "count_relevant", "metrics"}
        assert all(seconds >= 0.0 for seconds in phases.values())


@pytest.mark.slow
def test_retrieval_benchmark_runs_each_method_in_its_own_process(capsys, one_thread):
    argv = [
        "--queries",
        "40",
        "--database",
        "300",
        "--dim",
        "16",
        "--labels",
        "5",
        "--baseline-queries",
        "20",
    ]
    ours, base = retrieval_bench.main([*argv, "--threads", "1"])
    assert ours["queries"] == 40 and base["queries"] == 20 and ours["shared_metrics"] == base["metrics"]
    out = capsys.readouterr().out
    assert "EXTRAPOLATED x2.0" in out and "max |chunked - baseline| = 0.00e+00" in out
    assert "ceiling for any exact float32 method" in out
    # the bf16 search: the same top 100 of every query as float32's, the same metrics
    assert ours["bf16"]["row_keys"] == ours["row_keys"] and ours["bf16"]["metrics"] == ours["metrics"]
    assert "equal to float32's (indices, in order) for 40 of 40 queries" in out


# ---- replication search ----------------------------------------------------------------------------------
TINY = ["--generated", "40", "--train", "300", "--dim", "16", "--threads", "1"]


def test_features_are_seeded_unit_vectors():
    generated, train = replication_search.make_features(5, 7, 3, seed=1)
    assert generated.shape == (5, 3) and train.shape == (7, 3) and generated.dtype == torch.float32
    torch.testing.assert_close(train.norm(dim=1), torch.ones(7))
    again, _ = replication_search.make_features(5, 7, 3, seed=1)
    assert torch.equal(generated, again)


@pytest.mark.parametrize("variant", ["auto", "torch", "torch_half", "bf16_rerank", "faiss", "dcr"])
def test_every_search_variant_finds_the_brute_force_top1(variant):
    args = replication_search.parse_args([*TINY, "--baseline-queries", "40"])
    result = replication_search.measure(variant, args)
    generated, train = replication_search.make_features(40, 300, 16, args.seed)
    best, index = (generated.double() @ train.double().T).max(dim=1)
    assert result["variant"] == variant and result["generated"] == 40
    assert result["seconds"] > 0 and result["peak_bytes"] >= 0
    assert result["indices"] == index.tolist()
    tolerance = 2e-3 if variant == "torch_half" else 1e-5  # float16 storage rounds the training features
    torch.testing.assert_close(torch.tensor(result["scores"]).double(), best, atol=tolerance, rtol=0)


def test_matmul_references_return_no_matches():
    args = replication_search.parse_args(TINY)
    for variant in ("matmul", "matmul_numpy", "matmul_bf16"):
        result = replication_search.measure(variant, args)
        assert result["seconds"] > 0 and "indices" not in result


def test_search_benchmark_table_in_process(capsys, one_thread):
    rows = replication_search.main([*TINY, "--baseline-queries", "10", "--in-process"])
    out = capsys.readouterr().out
    assert [row["variant"] for row in rows] == [v for v in replication_search.VARIANTS if v != "matmul_tf32"]
    keys = {"label", "seconds", "gflops", "of_matmul", "peak_mib", "dcr_time_ratio", "dcr_memory_ratio"}
    assert all(keys <= set(row) for row in rows)
    by_variant = {row["variant"]: row for row in rows}
    # The DCR baseline ran on 10 of the 40 generations, extrapolated x4; every search agrees with it there.
    assert by_variant["dcr"]["measured_generated"] == 10 and by_variant["dcr"]["extrapolated"]
    assert "DCR full matrix + topk EXTRAPOLATED" in out
    for variant in ("auto", "torch", "bf16_rerank", "faiss"):
        assert by_variant[variant]["agree"] == by_variant[variant]["compared"] == 10
        assert by_variant[variant]["max_score_diff"] < 1e-5
        assert by_variant[variant]["float32_top1"] == "40/40"
    assert by_variant["bf16_rerank"]["recomputed"] >= 0 and by_variant["bf16_rerank"]["of_bf16_matmul"] > 0
    assert by_variant["auto"]["label"].endswith("(-> torch)")  # N = 300 < FAISS_MIN_DATABASE
    assert max(by_variant[v]["of_matmul"] for v in ("matmul", "matmul_numpy")) == pytest.approx(1.0)


def test_search_benchmark_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        replication_search.parse_args([*TINY, "--baseline-queries", "41"])
    with pytest.raises(SystemExit):
        replication_search.parse_args(["--generated", "0"])
    assert replication_search.parse_args(["--small"]).generated == replication_search.SMALL_SIZES["generated"]


@pytest.mark.slow
def test_search_benchmark_runs_each_variant_in_its_own_process(capsys, one_thread):
    rows = replication_search.main([*TINY, "--variants", "torch", "faiss"])
    assert [row["variant"] for row in rows] == ["matmul", "torch", "faiss", "dcr"]
    assert all(row["agree"] == row["compared"] == 40 for row in rows if "agree" in row)
    assert "Replication search benchmark" in capsys.readouterr().out


# ---- extractor throughput --------------------------------------------------------------------------------
def test_extractor_configs_build_without_downloads_or_say_why():
    extractor, reason = extractor_throughput.build_without_downloads("sscd")
    assert reason is None and extractor.name == "sscd_resnet50_random_dcr"
    extractor, reason = extractor_throughput.build_without_downloads("csd")
    assert extractor is None and "checkpoint" in reason
    with pytest.raises(FileNotFoundError, match="choose one of"):
        extractor_throughput.build_without_downloads("nope")


def test_flop_count_of_resnet50():
    sscd, _ = extractor_throughput.build_without_downloads("sscd")
    flops = extractor_throughput.flops_per_image(sscd, torch.zeros(3, 224, 224))
    assert 8.0e9 < flops < 8.4e9  # ResNet-50 at 224 px: 4.1 G multiply-adds (+ the 2048 x 512 projection)


def vit_flops(attention: bool = True, image_size=224, patch=16, width=768, layers=12, out_dim=512) -> int:
    """FLOPs (2 per multiply-accumulate) of a ViT image tower on one image, as matrix products: the patch
    embedding (P patches of 3 * patch^2 values onto `width`); per layer, for N = P + 1 tokens (the class
    token), the q, k, v and output projections (4 N d^2) and the MLP of width 4d (8 N d^2), and with
    `attention` its two products Q K^T and softmax(.) V (2 N^2 d over all heads); then the class token's
    projection (d x out_dim)."""
    patches = (image_size // patch) ** 2
    n = patches + 1
    per_layer = 12 * n * width**2 + (2 * n * n * width if attention else 0)
    return 2 * (patches * 3 * patch**2 * width + layers * per_layer + width * out_dim)


@pytest.mark.slow
def test_flop_count_of_clip_counts_attention():
    """The counter sees attention at all (nn.MultiheadAttention's fused fast path and the CPU attention kernel
    both hide it from torch's own formulas) and the total is the analytic count of ViT-B/16, 35.1 GFLOP."""
    clip, _ = extractor_throughput.build_without_downloads("clip_vitb16")
    flops = extractor_throughput.flops_per_image(clip, torch.zeros(3, 224, 224))
    assert flops == pytest.approx(vit_flops(), rel=0.05)
    attention = vit_flops() - vit_flops(attention=False)  # 2.9 GFLOP
    assert flops > vit_flops(attention=False) + attention / 2
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on


def test_extractor_benchmark_table(capsys, one_thread):
    argv = [
        "--extractors",
        "pixels",
        "color_hist",
        "csd",
        "--batch-size",
        "2",
        "--batches",
        "2",
        "--threads",
        "1",
    ]
    rows, skipped = extractor_throughput.main(argv)
    assert [row["extractor"] for row in rows] == ["pixels", "color_hist"]
    assert list(skipped) == ["csd"]
    pixels, hist = rows
    assert pixels["input"] == "32x32" and pixels["dim"] == 3 * 32 * 32
    assert hist["input"] == "64x64" and hist["dim"] == 8**3
    for row in rows:
        assert row["images_per_s"] > 0 and row["preprocess_images_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(2000 / row["ms_per_batch"])
        assert row["gflops_per_image"] == 0.0  # no matrix product or convolution in either
    out = capsys.readouterr().out
    assert "Extractor throughput on cpu" in out and "csd skipped: needs checkpoint" in out


def test_extractor_benchmark_rejects_unknown_configs():
    with pytest.raises(SystemExit):
        extractor_throughput.parse_args(["--extractors", "sscd", "nope"])
    assert extractor_throughput.parse_args(["--extractors", "all"]).extractors == harness.config_names(
        "extractor"
    )


# ---- Lightning overhead ----------------------------------------------------------------------------------
STEP_TINY = ["--batch-size", "2", "--threads", "1", "--steps", "2", "--repeats", "1", "--warmup", "1"]


@pytest.mark.parametrize(
    "module, image_size", [("ddpm", "16"), pytest.param("csd", "32", marks=pytest.mark.slow)]
)
def test_lightning_overhead_same_math_and_report(module, image_size, capsys, one_thread):
    """Both sides start from the same weights and noise: the same first loss, and bitwise the same weights of
    every submodule (for DDPM the trained UNet and its EMA copy) after the warm-up window on the CPU."""
    summary = lightning_overhead.main(["--module", module, "--image-size", image_size, *STEP_TINY])
    assert summary["loss"]["lightning"] == summary["loss"]["plain"] > 0.01
    expected = {"ddpm": {"unet", "ema"}, "csd": {"net"}}[module]
    assert set(summary["weight_diff"]) == expected and set(summary["weight_diff"].values()) == {0.0}
    for name in ("lightning", "plain"):
        row = summary[name]
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["peak_mib"] > 0
    assert summary["ratio"] == summary["lightning"]["median_ms"] / summary["plain"]["median_ms"]
    assert summary["memory_ratio"] == summary["lightning"]["peak_mib"] / summary["plain"]["peak_mib"]
    out = capsys.readouterr().out
    assert f"ratio Lightning / plain (median step): {summary['ratio']:.3f}" in out
    assert f"Lightning Trainer.fit ({summary['module']})" in out and "plain PyTorch loop" in out


def test_lightning_overhead_plain_loop_without_ema_is_caught(one_thread):
    """The weight check has teeth: a plain loop that skips the EMA update ends with a different EMA copy."""
    args = lightning_overhead.parse_args(["--module", "ddpm", "--image-size", "16", *STEP_TINY])
    lightning_overhead.quiet_lightning()
    batch = lightning_overhead.make_batch(args)
    timer = harness.StepTimer(harness.PeakMemory(torch.device("cpu")))
    lightning = lightning_overhead.build_module(args)
    lightning_overhead.lightning_window(lightning, batch, args.warmup, args, timer)
    plain = lightning_overhead.PlainLoop(lightning_overhead.build_module(args), args)
    plain.module.ema.update_parameters = lambda model: None  # the bug under test
    plain.window(batch, args.warmup, timer)
    diff = lightning_overhead.weight_differences(lightning, plain.module)
    assert diff["unet"] == 0.0 and diff["ema"] > 0.0


def test_lightning_overhead_arguments():
    with pytest.raises(SystemExit):
        lightning_overhead.parse_args([])  # --module is required
    csd = lightning_overhead.parse_args(["--module", "csd"])
    assert (csd.image_size, csd.batch_size) == (64, 32)
    ddpm = lightning_overhead.parse_args(["--module", "ddpm", "--batch-size", "4", "model/unet=ddpm_64"])
    assert (ddpm.image_size, ddpm.batch_size, ddpm.overrides) == (32, 4, ["model/unet=ddpm_64"])
    with pytest.raises(MissingConfigException, match="nope"):
        lightning_overhead.build_module(
            lightning_overhead.parse_args(["--module", "ddpm", "model/unet=nope"])
        )


def test_csd_batch_has_two_views_and_one_to_three_labels():
    batch = lightning_overhead.csd_batch(4, 32, 10, seed=0)
    assert batch["images"].shape == (4, 2, 3, 32, 32)
    assert ((batch["labels"] > 0).sum(dim=1) >= 1).all() and ((batch["labels"] > 0).sum(dim=1) <= 3).all()
    assert torch.equal(lightning_overhead.csd_batch(4, 32, 10, seed=0)["labels"], batch["labels"])


# ---- DDPM sampling ---------------------------------------------------------------------------------------
SAMPLING_TINY = ["--image-size", "16", "--batch-size", "2", "--threads", "1"]


def test_ddpm_sampling_arguments():
    with pytest.raises(SystemExit):
        ddpm_sampling.parse_args(["--ddpm-steps", "0"])
    assert ddpm_sampling.parse_args([]).ddpm_steps == 20  # the CPU default
    assert ddpm_sampling.parse_args(["--ddpm-steps", "1000"]).ddpm_steps == 1000


def test_ddpm_sampling_summary_by_hand():
    mib = harness.MIB
    calls = {
        "ddpm": [{"seconds": s, "peak": p * mib} for s, p in ((2.0, 3), (5.0, 1), (4.0, 1))],
        "ddim": [{"seconds": 1.0, "peak": 2 * mib}],
    }
    rows = ddpm_sampling.summarize(calls, {"ddpm": 10, "ddim": 50}, batch_size=8)
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
    names = [r["name"] for r in ddpm_sampling.summarize(calls, {"ddpm": 1000, "ddim": 50}, 8)]
    assert names == ["DDPM-1000", "DDIM-50"]


def test_ddpm_sampling_benchmark_table(capsys, one_thread):
    rows = ddpm_sampling.main([*SAMPLING_TINY, "--ddpm-steps", "4", "--ddim-steps", "3", "--repeats", "1"])
    assert [row["name"] for row in rows] == ["DDPM-4", "DDPM-1000", "DDIM-3"]
    ddpm, ddpm_full, ddim = rows
    for row in (ddpm, ddim):
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"]) and row["peak_mib"] > 0
        assert row["ms_per_step"] == pytest.approx(row["seconds"] / row["steps"] * 1e3)
    assert ddpm_full["images_per_s"] == pytest.approx(ddpm["images_per_s"] * 4 / 1000)
    out = capsys.readouterr().out
    assert "DDPM-1000 (extrapolated)" in out and "DDPM runs 4 of the 1000 timesteps" in out


def test_ddpm_sampling_call_returns_the_seeded_images(one_thread):
    args = ddpm_sampling.parse_args(SAMPLING_TINY)
    module = ddpm_sampling.build_module(args)
    memory = harness.PeakMemory(torch.device("cpu"))
    result = ddpm_sampling.time_generate(module, "ddim", 2, args, memory)
    assert result["images"].shape == (2, 16, 16, 3) and result["images"].dtype == torch.uint8
    assert torch.equal(result["images"], module.generate([0, 1], sampler="ddim", steps=2))
    assert result["seconds"] > 0 and result["peak"] > 0


def test_partial_copy_benchmark_runs_tiny(capsys, one_thread, tmp_path):
    from benchmarks import partial_copies

    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
            (32, 32)
        ).save(tmp_path / f"{i}.png")
    result = partial_copies.main(
        [
            "--sources",
            "2",
            "--source",
            str(tmp_path),
            "--repaint-steps",
            "2",
            "--batch-size",
            "2",
            "--repeats",
            "1",
        ]
        + ["--queries", "8", "--database", "64", "--dim", "8"]
    )
    assert [row["name"] for row in result["build"]] == [f"build {kind}" for kind in partial_copies.KINDS]
    assert result["repaint"][1]["ratio"] == 1.0 and result["scoring"][0]["ratio"] == 1.0
    assert "s / 100 sources" in capsys.readouterr().out


def test_store_search_benchmark_workers_at_tiny_size(one_thread, tmp_path):
    """The store benchmark's pieces in this process (the script runs each in its own): prefix stores share the
    largest one's shards, the search finds the planted copies, the sampled background is a subset, the index's
    recall is measured against the exact top-1."""
    from types import SimpleNamespace

    from benchmarks import store_search
    from src.replication.store import FeatureStore

    stores = store_search.build_stores(tmp_path, [600, 1200], seed=0, shard_rows=300)
    small, large = FeatureStore(stores[600]), FeatureStore(stores[1200])
    assert len(small) == 600 and len(large.shards) == 4
    assert np.array_equal(small.features().numpy(), large.features()[:600].numpy())  # a prefix, hard-linked
    args = SimpleNamespace(
        store=stores[1200], queries_from=stores[1200], queries=40, seed=0, out=tmp_path / "top1.npy"
    )
    found = store_search.worker_search(args)
    top1 = np.load(tmp_path / "top1.npy")
    queries = store_search.make_queries(large, 40, 0)
    copies_of = (
        torch.randint(0, 1200, (20,), generator=torch.Generator().manual_seed(7)).sort().values.numpy()
    )
    assert found["rows"] == 1200 and (top1[:20] == copies_of).mean() > 0.9 and len(queries) == 40
    background = store_search.worker_background(SimpleNamespace(store=stores[600], anchors=50, seed=0))
    assert background["sampled"]["anchors"] == 50 and background["exact"]["anchors"] == 600
    index = store_search.worker_index(
        SimpleNamespace(
            store=stores[1200], queries=40, seed=0, index="IVF4,Flat", exact=tmp_path / "top1.npy"
        )
    )
    assert index["recall"] == 1.0 and index["queries"] == 40  # every list visited: exact


def test_region_matching_benchmark_runs_tiny(capsys, one_thread):
    """The search methods agree on every top-1 (each in its own process), and the extraction table has its rows."""
    from benchmarks import region_matching

    result = region_matching.main(
        ["--queries", "16", "--database", "40", "--regions", "4", "--dim", "8", "--k", "3"]
        + ["--images", "2", "--repeats", "1", "--threads", "1"]
    )
    search = {row["name"]: row for row in result["search"]}
    assert search["dense"]["speed"] == 1.0 and search["region_topk"]["same"] == "True"
    assert [row["name"] for row in result["extraction"]] == ["whole images", "regions (49 crops)"]
    assert "top-1 = dense" in capsys.readouterr().out
